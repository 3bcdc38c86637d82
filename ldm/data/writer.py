"""Writing webdataset shards: samples from a source packed into size-bounded `.tar` files.

A shard is a plain `.tar` whose members are grouped into samples by their name up to the first dot:

    000000001_cat.jpg    image bytes, original format (png / jpg / jpeg / webp)
    000000001_cat.txt    caption, UTF-8
    000000001_cat.json   optional metadata (source path, shapes scene ground truth, ...)

A source (`ldm.data.sources`: folder, table, shapes) yields samples or `Skip(reason)` markers;
`write_shards` packs them into shards `{prefix}-000000.tar`, ..., each written as `*.tar.partial`
and renamed when complete, and writes `{prefix}-index.json`. `write_latent_shards` stores
pre-computed latents the same way.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .sources import Skip, make_key

log = logging.getLogger(__name__)

MB = 1_000_000  # --max-size is in megabytes (10^6 bytes)


@dataclass
class ShardInfo:
    name: str  # file name, relative to the index file's folder
    samples: int
    bytes: int


@dataclass
class WriteSummary:
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few skipped items per reason
    shards: list[ShardInfo] = field(default_factory=list)
    index_path: str = ""

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [f"wrote {self.written} samples into {len(self.shards)} shards ({self.bytes / MB:.1f} MB); "
                 f"skipped {skipped} ({reasons}); index: {self.index_path}"]
        lines += [f"  {reason}, e.g. {'; '.join(items)}" for reason, items in sorted(self.examples.items())]
        return "\n".join(lines)


def _tar_member_size(n: int) -> int:
    # One 512-byte header plus the data padded to 512-byte blocks (ustar format).
    return 512 + (n + 511) // 512 * 512


def _tar_file_size(member_bytes: int) -> int:
    # Two zero blocks close the archive, and tarfile pads the file to a 10240-byte record.
    return (member_bytes + 1024 + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE


def _sample_tar_size(sample: dict[str, Any]) -> int:
    return sum(_tar_member_size(len(v)) for k, v in sample.items() if not k.startswith("_"))


def shard_prefix(prefix: str | os.PathLike) -> Path:
    """The path shards are named by. A prefix that ends in a path separator or names an existing
    folder means shards inside that folder, named after it (`data/train/` ->
    `data/train/train-000000.tar` and `data/train/train-index.json`)."""
    text = os.fspath(prefix)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        name = path.resolve().name
        if not name:
            raise ValueError(f"{text!r} names no shard prefix; pass a folder and a name, e.g. "
                             f"{text.rstrip('/')}/shards/train")
        return path / name
    return path


def existing_shards(prefix: str | os.PathLike) -> list[Path]:
    """Shards (and leftover partial shards) named `{prefix}-NNNNNN.tar[.partial]`, and the index."""
    prefix = Path(prefix)
    number = "[0-9]" * 6
    names = (f"{prefix.name}-{number}.tar", f"{prefix.name}-{number}.tar.partial", f"{prefix.name}-index.json")
    return sorted(p for name in names for p in prefix.parent.glob(name))


class ShardSink:
    """Packs samples into `{prefix}-{i:06d}.tar`, each at most `max_count` samples and `max_size` bytes.

    Each shard is written as `<name>.partial` and renamed when it is closed; if writing fails, the
    open partial shard is deleted, so a final-named shard is always complete. A sample larger than
    `max_size` on its own gets a shard to itself (with a warning).
    """

    def __init__(self, prefix: str | os.PathLike, *, max_count: int | None = 10_000, max_size: int | None = None,
                 overwrite: bool = False):
        if max_count is not None and max_count < 1:
            raise ValueError(f"max_count must be at least 1 (got {max_count})")
        if max_size is not None and max_size < _tar_file_size(0) + 1024:
            raise ValueError(f"max_size must be at least {_tar_file_size(0) + 1024} bytes (got {max_size})")
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        old = existing_shards(self.prefix)
        if old and not overwrite:
            raise ValueError(f"shards with the prefix {self.prefix} exist already ({len(old)} files, e.g. {old[0]}); "
                             "choose another prefix, or overwrite them (--overwrite)")
        for path in old:
            path.unlink()
        self.max_count = max_count
        self.max_size = max_size
        self.shards: list[ShardInfo] = []
        self._writer = None
        self._file = None
        self._path: Path | None = None
        self._count = 0
        self._member_bytes = 0

    def write(self, sample: dict[str, Any]) -> None:
        """`sample`: {"__key__": str (no dots), ext: bytes, ...}."""
        key = sample["__key__"]
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain '.': webdataset splits names at the first dot")
        size = _sample_tar_size(sample)
        if self._writer is not None:
            full = self.max_count is not None and self._count >= self.max_count
            too_big = self.max_size is not None and _tar_file_size(self._member_bytes + size) > self.max_size
            if full or too_big:
                self._close_shard()
        if self._writer is None:
            self._open_shard()
        if self.max_size is not None and _tar_file_size(size) > self.max_size:
            warnings.warn(f"sample {key} ({size} bytes in tar) is larger than the shard size bound {self.max_size}; "
                          "it gets a shard of its own", stacklevel=2)
        self._writer.write(sample)
        self._count += 1
        self._member_bytes += size

    def _open_shard(self) -> None:
        import webdataset as wds

        self._path = Path(f"{self.prefix}-{len(self.shards):06d}.tar")
        self._file = open(f"{self._path}.partial", "wb")
        # encoder=False: values are bytes already; mtime fixed so equal inputs give equal shards.
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self._count = 0
        self._member_bytes = 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        partial = f"{self._path}.partial"
        os.replace(partial, self._path)
        self.shards.append(ShardInfo(self._path.name, self._count, self._path.stat().st_size))
        self._writer = self._file = None

    def close(self) -> None:
        if self._writer is not None:
            self._close_shard()

    def abort(self) -> None:
        """Drop the shard being written (called when writing fails)."""
        if self._writer is not None:
            try:
                self._writer.close()  # finishes the tar stream (into the file about to be deleted)
            except Exception:  # the original error matters, not this one
                pass
            self._file.close()
            Path(f"{self._path}.partial").unlink(missing_ok=True)
            self._writer = self._file = None

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_shards(
    source: Iterable[dict[str, Any] | Skip],
    prefix: str | os.PathLike,
    *,
    max_count: int | None = 10_000,
    max_size_mb: float | None = None,
    total: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> WriteSummary:
    """Write samples from `source` into shards `{prefix}-000000.tar`, ... and `{prefix}-index.json`
    (a prefix `DIR/` writes `DIR/DIR-000000.tar`, ...: see `shard_prefix`).

    `source` yields sample dicts (`__key__` plus bytes per extension) or `Skip` markers, which are
    counted by reason. An exception from the source propagates after the shard being written is
    deleted; shards completed before it stay (they are valid), and no index is written.
    Existing shards with this prefix are an error, unless `overwrite` (then they are deleted first).
    """
    from tqdm.auto import tqdm

    prefix = shard_prefix(prefix)
    summary = WriteSummary()
    max_size = None if max_size_mb is None else int(max_size_mb * MB)
    sink = ShardSink(prefix, max_count=max_count, max_size=max_size, overwrite=overwrite)
    bar = tqdm(source, total=total, disable=not progress, unit="img", desc=f"writing {Path(prefix).name}")
    with sink:
        for item in bar:
            if isinstance(item, Skip):
                summary.skipped[item.reason] = summary.skipped.get(item.reason, 0) + 1
                if item.detail:
                    log.info("skipped (%s): %s", item.reason, item.detail)
                    examples = summary.examples.setdefault(item.reason, [])
                    if len(examples) < 3:
                        examples.append(item.detail)
            else:
                sink.write(item)
                summary.written += 1
            bar.set_postfix(written=summary.written, skipped=sum(summary.skipped.values()), refresh=False)
    bar.close()
    summary.shards = sink.shards
    index = Path(f"{prefix}-index.json")
    index.write_text(json.dumps({
        "samples": summary.written,
        "bytes": summary.bytes,
        "skipped": summary.skipped,
        "shards": [{"name": s.name, "samples": s.samples, "bytes": s.bytes} for s in summary.shards],
    }, indent=1) + "\n")
    summary.index_path = str(index)
    return summary


def _array_bytes(x: Any) -> bytes:
    out = io.BytesIO()
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def write_latent_shards(items: Iterable[dict[str, Any]], prefix: str | os.PathLike, *,
                        max_count: int | None = 10_000, max_size_mb: float | None = None,
                        total: int | None = None, progress: bool = True, overwrite: bool = False) -> WriteSummary:
    """Write pre-computed latents as shards readable by `make_latent_loader`.

    Each item: {"key": str, "latent": (C, h, w) tensor/array, "caption": str, optional "context":
    (L, D) text embedding, optional "meta": dict}. Stored as `.latent.npy`, `.txt`, `.emb.npy`, `.json`.
    """
    def samples():
        for i, item in enumerate(items):
            key = str(item.get("key", ""))  # the image's key, so both share the held-out split
            sample = {"__key__": key if key and "." not in key else make_key(i, key),
                      "latent.npy": _array_bytes(item["latent"]),
                      "txt": str(item["caption"]).encode("utf-8")}
            if item.get("context") is not None:
                sample["emb.npy"] = _array_bytes(item["context"])
            if item.get("meta") is not None:
                sample["json"] = json.dumps(item["meta"], default=str).encode("utf-8")
            yield sample

    return write_shards(samples(), prefix, max_count=max_count, max_size_mb=max_size_mb, total=total,
                        progress=progress, overwrite=overwrite)
