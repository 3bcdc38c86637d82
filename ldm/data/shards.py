"""webdataset shards: writing them from images + captions, and reading them as training batches.

A shard is a plain `.tar` whose members are grouped into samples by their name up to the first dot:

    000000001_cat.jpg    image bytes, original format (png / jpg / jpeg / webp)
    000000001_cat.txt    caption, UTF-8
    000000001_cat.json   optional metadata (source path, shapes scene ground truth, ...)

Writing: a source (`folder_samples`, `table_samples`, `shapes_samples`) yields samples or
`Skip(reason)` markers; `write_shards` packs them into size-bounded shards `{prefix}-000000.tar`,
each written as `*.tar.partial` and renamed when complete, and writes `{prefix}-index.json`.

Reading: `make_image_text_loader(urls, ...)` returns a `ShardLoader` (a torch DataLoader) yielding
`{"image": (B, 3, R, R) in [-1, 1], "caption": [str], "key": [str]}`. Shards are split across
ranks and DataLoader workers ("slots"); broken samples are skipped and counted in a
`SkipCounter` shared by all workers. With `epoch_length` set, every slot cycles through its
shards forever and each rank yields exactly `epoch_length` batches per epoch, so DDP never waits
on a rank that ran dry. The stream is a pure function of (seed, epoch, rank, world_size,
num_workers); `loader.state_dict()` / `load_state_dict()` give the exact position for resume.

`make_latent_loader` reads pre-computed latent shards (`.latent.npy` or `.latent.pth`, `.txt`,
optional `.emb.npy`) written by `write_latent_shards`.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import multiprocessing
import os
import random
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from ..images import decode_image, open_image, to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
MB = 1_000_000  # --max-size is in megabytes (10^6 bytes)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


@dataclass
class Skip:
    """A source item that will not be written, and why (e.g. "missing_caption")."""

    reason: str
    detail: str = ""


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
    """Write samples from `source` into shards `{prefix}-000000.tar`, ... and `{prefix}-index.json`.

    `source` yields sample dicts (`__key__` plus bytes per extension) or `Skip` markers, which are
    counted by reason. An exception from the source propagates after the shard being written is
    deleted; shards completed before it stay (they are valid), and no index is written.
    Existing shards with this prefix are an error, unless `overwrite` (then they are deleted first).
    """
    from tqdm.auto import tqdm

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


def _make_key(index: int, stem: str) -> str:
    # Keys sort in source order, stay unique, and keep a readable hint of the file name.
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:48]
    return f"{index:09d}_{safe}" if safe else f"{index:09d}"


def _checked_image(data: bytes, ext: str, resize: int | None) -> bytes:
    """Decode fully (so truncated files are caught); re-encode only when `resize` shrinks the image.

    A re-encoded image is decoded the way the reader would (EXIF orientation applied, alpha over
    white, wide greyscale scaled), so shrinking never changes what training sees but its size."""
    im = open_image(data)
    if resize is None or min(im.size) <= resize:
        return data
    im = to_rgb(im)
    scale = resize / min(im.size)
    size = (max(resize, round(im.width * scale)), max(resize, round(im.height * scale)))
    out = io.BytesIO()
    fmt = _PIL_FORMATS[ext]
    im.resize(size, Image.BICUBIC).save(out, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def _image_sample(key: str, path: Path, caption: str | None, meta: dict, *,
                  allow_empty_captions: bool, resize: int | None) -> dict[str, Any] | Skip:
    if caption is None and not allow_empty_captions:
        return Skip("missing_caption", str(path))
    caption = (caption or "").strip()
    if not caption and not allow_empty_captions:
        return Skip("empty_caption", str(path))
    ext = path.suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS:
        return Skip("unsupported_format", str(path))
    try:
        data = _checked_image(path.read_bytes(), ext, resize)
    except FileNotFoundError:
        return Skip("missing_image", str(path))
    except Exception as e:  # any decoder error: the file is unusable, not the run
        return Skip("unreadable_image", f"{path}: {e}")
    return {"__key__": key, ext: data, "txt": caption.encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def list_images(root: str | os.PathLike) -> list[Path]:
    """Images under `root` (recursive), sorted, by extension (jpg/jpeg/png/webp, any case)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def folder_samples(root: str | os.PathLike, *, allow_empty_captions: bool = False,
                   resize: int | None = None) -> Iterator[dict[str, Any] | Skip]:
    """Samples from a folder of images with sidecar captions (`a/b.jpg` + `a/b.txt`)."""
    root = Path(root)
    for i, path in enumerate(list_images(root)):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        rel = path.relative_to(root)
        yield _image_sample(_make_key(i, str(rel.with_suffix(""))), path, caption, {"path": rel.as_posix()},
                            allow_empty_captions=allow_empty_captions, resize=resize)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL (`.jsonl`, `.json` with one object per line), CSV (`.csv`) or TSV (`.tsv`) file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e}); expected one object per line") from e
        return rows
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unknown table format {suffix!r}; use .jsonl, .csv or .tsv")


def table_samples(path: str | os.PathLike, *, image_key: str = "image", caption_key: str = "caption",
                  allow_empty_captions: bool = False, resize: int | None = None) -> Iterator[dict[str, Any] | Skip]:
    """Samples from a JSONL/CSV listing image paths (relative to the table's folder) and captions.

    Other columns go into the sample's `.json` metadata.
    """
    path = Path(path)
    rows = read_table(path)
    if rows and image_key not in rows[0]:
        raise ValueError(f"{path}: no column {image_key!r} (columns: {', '.join(rows[0])}); set --image-key")
    if rows and caption_key not in rows[0]:
        raise ValueError(f"{path}: no column {caption_key!r} (columns: {', '.join(rows[0])}); set --caption-key")
    for i, row in enumerate(rows):
        image = row.get(image_key)
        if not image:
            yield Skip("missing_image", f"{path}: row {i} has no {image_key!r}")
            continue
        image_path = path.parent / str(image)
        caption = row.get(caption_key)
        meta = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
        meta["path"] = str(image)
        yield _image_sample(_make_key(i, Path(str(image)).stem), image_path,
                            None if caption is None else str(caption), meta,
                            allow_empty_captions=allow_empty_captions, resize=resize)


def shapes_samples(n: int, *, resolution: int = 64, seed: int = 0, split: str = "train",
                   max_objects: int = 1) -> Iterator[dict[str, Any]]:
    """Samples of the built-in shapes dataset: lossless PNG image, caption, and the scene ground truth as `.json`."""
    from .shapes import ShapesDataset  # imported here: writing other sources must not depend on it

    dataset = ShapesDataset(resolution=resolution, length=n, seed=seed, split=split, max_objects=max_objects)
    for i in range(n):
        item = dataset[i]
        pixels = ((item["image"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
        out = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, format="PNG")
        meta = {"scene": item["scene"], "seed": seed, "split": split, "index": i}
        yield {"__key__": f"{split}_{i:09d}", "png": out.getvalue(), "txt": item["caption"].encode("utf-8"),
               "json": json.dumps(meta, default=str).encode("utf-8")}


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
            sample = {"__key__": _make_key(i, str(item.get("key", ""))),
                      "latent.npy": _array_bytes(item["latent"]),
                      "txt": str(item["caption"]).encode("utf-8")}
            if item.get("context") is not None:
                sample["emb.npy"] = _array_bytes(item["context"])
            if item.get("meta") is not None:
                sample["json"] = json.dumps(item["meta"], default=str).encode("utf-8")
            yield sample

    return write_shards(samples(), prefix, max_count=max_count, max_size_mb=max_size_mb, total=total,
                        progress=progress, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

# With epoch_length set the data repeats forever; this many broken samples in a row with no good
# one means the slot's data is all broken, and is an error rather than an endless loop.
MAX_CONSECUTIVE_BROKEN = 10_000

SKIP_REASONS = ("missing_image", "missing_caption", "missing_latent", "empty_image", "undecodable_image",
                "bad_tensor", "read_error")


class BrokenSample(Exception):
    """Raised by a decoder for a sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipCounter:
    """Counts skipped samples by reason, shared by all DataLoader workers of a loader.

    Backed by `multiprocessing.Value`s created in the main process and inherited by the workers,
    so the counts are readable from the main process at any time, during or after iteration.
    """

    def __init__(self, context: str | None = None):
        # Values must come from the same start method (fork, spawn, ...) as the workers they go to.
        ctx = multiprocessing.get_context(context)
        self._values = {r: ctx.Value("q", 0) for r in SKIP_REASONS}

    def add(self, reason: str) -> None:
        value = self._values[reason]
        with value.get_lock():
            value.value += 1

    def as_dict(self) -> dict[str, int]:
        return {r: v.value for r, v in self._values.items() if v.value}

    @property
    def total(self) -> int:
        return sum(v.value for v in self._values.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def expand_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard URLs from paths, brace patterns (`a-{000000..000009}.tar`), `pipe:` commands, folders,
    or index files.

    A folder stands for the `*.tar` files in it (sorted); a `.json` index written by `write_shards`
    for the shards it lists. Local paths must exist.
    """
    from webdataset.shardlists import expand_urls as expand_braces

    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    result: list[str] = []
    for item in items:
        item = str(item)
        if not item.startswith("pipe:") and "://" not in item and os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise ValueError(f"no *.tar shards in folder {item}")
            result += found
            continue
        if item.endswith(".json") and os.path.isfile(item):
            with open(item, encoding="utf-8") as f:
                shards = json.load(f).get("shards", [])
            if not shards:
                raise ValueError(f"index {item} lists no shards")
            item = [os.path.join(os.path.dirname(item), s["name"]) for s in shards]
            for url in item:
                if not os.path.isfile(url):
                    raise ValueError(f"shard {url} listed in the index does not exist")
            result += item
            continue
        for url in expand_braces(item):
            if not url.startswith("pipe:") and "://" not in url and not os.path.isfile(url):
                raise ValueError(f"shard {url} does not exist (from {item!r})")
            result.append(url)
    if not result:
        raise ValueError(f"no shards found in {urls!r}")
    return result


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from torch.distributed, else env RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) (got rank={rank}, world_size={world_size})")
    return rank, world_size


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle through a buffer of `size` items (size <= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor fields, list the others; a field missing from any sample is left out of the batch."""
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: torch.stack([s[k] for s in samples]) if isinstance(samples[0][k], torch.Tensor)
            else [s[k] for s in samples] for k in keys}


class ShardDataset(IterableDataset):
    """Batches decoded from shards, split over ranks and DataLoader workers.

    The stream of each (rank, worker) "slot" is a function of (seed, epoch, slot, number of slots):
      - shards are split over slots when there are at least as many shards as slots, otherwise
        every slot reads all shards and keeps every n-th sample (slower, but still disjoint);
      - shard order is shuffled per pass (same order for all slots) when shuffle_buffer > 1,
        samples through a buffer of `shuffle_buffer`, random crops from the slot's own RNG;
      - epoch_length=None: one pass over the slot's share, the last batch may be short;
        epoch_length=N: passes repeat, and worker w of W yields its share of exactly N batches
        (batches w, w+W, ...), which the DataLoader interleaves back into order 0..N-1.
    """

    def __init__(self, urls, decode: Callable[[dict, random.Random], dict], *, batch_size: int,
                 shuffle_buffer: int = 1000, seed: int = 0, epoch_length: int | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be at least 1 batch (got {epoch_length}); None reads one pass")
        self.urls = expand_urls(urls)
        self.decode = decode
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_length = epoch_length
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.drop_last = drop_last
        self.epoch = 0
        self.skipped = SkipCounter()
        if self.world_size > 1 and epoch_length is None:
            log.warning("one-pass reading on %d ranks: ranks may get different numbers of batches, which hangs DDP "
                        "training at the epoch end; set epoch_length for training", self.world_size)
        if len(self.urls) < self.world_size:
            log.info("%d shards for %d ranks: every rank reads all shards and keeps its share of samples",
                     len(self.urls), self.world_size)

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("a one-pass shard dataset has no length; set epoch_length for a fixed number of batches")
        return self.epoch_length

    def _raw_samples(self, slot: int, nslots: int) -> Iterator[dict[str, Any]]:
        """Undecoded samples of this slot, pass after pass (one pass when epoch_length is None)."""
        import webdataset as wds

        def handler(exn: Exception) -> bool:
            self.skipped.add("read_error")
            log.warning("shard read error (skipped): %r", exn)
            return True

        split_shards = len(self.urls) >= nslots
        pass_index = 0
        while True:
            urls = list(self.urls)
            if self.shuffle_buffer > 1:
                random.Random(f"shards-{self.seed}-{self.epoch}-{pass_index}").shuffle(urls)
            mine = urls[slot::nslots] if split_shards else urls
            samples = wds.tarfile_samples([{"url": u} for u in mine], handler=handler)
            n = 0
            for i, sample in enumerate(samples):
                if split_shards or i % nslots == slot:
                    n += 1
                    yield sample
            if self.epoch_length is None:
                return
            if n == 0:
                raise RuntimeError(f"slot {slot} of {nslots} got no samples from {len(mine)} shards in a whole "
                                   "pass; check the shards, or use fewer workers")
            pass_index += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot = self.rank * num_workers + worker
        nslots = self.world_size * num_workers
        rng = random.Random(f"samples-{self.seed}-{self.epoch}-{slot}-{nslots}")
        if self.epoch_length is None:
            quota = None
        else:  # this worker's batches are w, w + W, ... < epoch_length
            quota = max(0, (self.epoch_length - worker + num_workers - 1) // num_workers)
            if quota == 0:
                return
        batch: list[dict[str, Any]] = []
        produced = broken = 0
        for sample in _shuffled(self._raw_samples(slot, nslots), self.shuffle_buffer, rng):
            try:
                batch.append(self.decode(sample, rng))
                broken = 0
            except BrokenSample as e:
                self.skipped.add(e.reason)
                log.debug("skipped sample %s (%s) from %s", sample.get("__key__"), e.reason, sample.get("__url__"))
                broken += 1
                if broken >= MAX_CONSECUTIVE_BROKEN:
                    raise RuntimeError(f"{broken} broken samples in a row and none usable (skipped so far: "
                                       f"{self.skipped.as_dict()}); check the shards {self.urls[:3]}...") from None
                continue
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
                produced += 1
                if quota is not None and produced >= quota:
                    return
        if batch and not self.drop_last and quota is None:
            yield collate(batch)


class ShardLoader(DataLoader):
    """A DataLoader over a ShardDataset that knows its position in the stream.

    Iterating continues from the current position (`epoch`, `batch`) and advances it; a finished
    pass moves to the next epoch. `state_dict()` / `load_state_dict()` save and restore the
    position: a loader re-created with the same seed, ranks and num_workers continues the exact
    same stream (the first `batch` batches of the epoch are regenerated and dropped).
    Skipped samples are counted in `loader.skipped` and warned about at the end of each epoch.
    """

    def __init__(self, dataset: ShardDataset, *, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context: str | None = None):
        if num_workers == 0:
            multiprocessing_context = prefetch_factor = None
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         prefetch_factor=prefetch_factor, persistent_workers=False,
                         multiprocessing_context=multiprocessing_context)
        dataset.skipped = SkipCounter(multiprocessing_context)
        self.epoch = 0
        self.batch = 0

    @property
    def skipped(self) -> SkipCounter:
        return self.dataset.skipped

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.dataset.seed, "epoch": self.epoch, "batch": self.batch,
                "num_workers": self.num_workers, "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.dataset.seed), ("num_workers", self.num_workers),
                          ("world_size", self.dataset.world_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"data position was saved with {key}={state[key]}, this loader has {key}={mine}; "
                                 f"re-create the loader with {key}={state[key]} to resume the same stream")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.dataset.epoch_length is not None and self.batch >= self.dataset.epoch_length:
            self.epoch, self.batch = self.epoch + 1, 0  # saved right after an epoch's last batch
        self.dataset.epoch = self.epoch  # read by the workers, which are started by super().__iter__()
        start, before = self.batch, self.skipped.total
        for i, batch in enumerate(super().__iter__()):
            if i < start:
                continue
            self.batch = i + 1
            yield batch
        new = self.skipped.total - before
        if new:
            warnings.warn(f"skipped {new} broken samples or unreadable shards in epoch {self.epoch} "
                          f"(all epochs, by reason: {self.skipped.as_dict()})", stacklevel=2)
        self.epoch, self.batch = self.epoch + 1, 0


def resize_crop(im: Image.Image, resolution: int, rng: random.Random | None = None) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop the centre (or a random square if `rng`)."""
    scale = resolution / min(im.size)
    w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BICUBIC)
    if rng is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    return im.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())  # (H, W, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class ImageTextDecoder:
    """Raw sample -> {"image": (3, R, R) in [-1, 1], "caption": str, "key": str[, "meta": dict | None]}."""

    resolution: int
    random_crop: bool = False
    with_meta: bool = False

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BrokenSample("missing_image")
        if "txt" not in sample:
            raise BrokenSample("missing_caption")
        if len(sample[ext]) == 0:
            raise BrokenSample("empty_image")
        try:
            im = decode_image(sample[ext], draft=self.resolution)
        except Exception as e:  # PIL raises many types for bad bytes; any of them means "skip"
            raise BrokenSample("undecodable_image") from e
        if min(im.size) == 0:
            raise BrokenSample("empty_image")
        im = resize_crop(im, self.resolution, rng if self.random_crop else None)
        out = {"image": image_to_tensor(im), "caption": sample["txt"].decode("utf-8", errors="replace").strip(),
               "key": sample["__key__"]}
        if self.with_meta:
            try:
                out["meta"] = json.loads(sample["json"]) if "json" in sample else None
            except ValueError:
                out["meta"] = None
        return out


def _load_tensor(data: bytes, ext: str) -> torch.Tensor:
    if ext.endswith("npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    return tensor


@dataclass
class LatentDecoder:
    """Raw sample -> {"latent": (C, h, w), "caption": str, "key": str[, "context": (L, D)]}."""

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        ext = next((e for e in ("latent.npy", "latent.pth") if e in sample), None)
        if ext is None:
            raise BrokenSample("missing_latent")
        if "txt" not in sample:
            raise BrokenSample("missing_caption")
        try:
            out = {"latent": _load_tensor(sample[ext], ext).float()}
            for emb in ("emb.npy", "emb.pth"):
                if emb in sample:
                    out["context"] = _load_tensor(sample[emb], emb).float()
        except Exception as e:
            raise BrokenSample("bad_tensor") from e
        out["caption"] = sample["txt"].decode("utf-8", errors="replace").strip()
        out["key"] = sample["__key__"]
        return out


def make_image_text_loader(
    urls,
    *,
    resolution: int,
    batch_size: int,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch_length: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    random_crop: bool = False,
    with_meta: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """A DataLoader of {"image": (B, 3, R, R) in [-1, 1], "caption": [str], "key": [str]} from shards.

    urls: path, folder (its *.tar), brace pattern, `pipe:` command, or a list of these.
    epoch_length: batches per rank per epoch (repeating the data as needed), the same on every
        rank, which DDP training needs; None reads each rank's share once (evaluation).
    rank, world_size: default from torch.distributed, else env RANK / WORLD_SIZE.
    multiprocessing_context: worker start method ("fork", "spawn", "forkserver"; default: the platform's).
    Do not pass the loader through `accelerate.prepare`: it splits the data across ranks itself.
    """
    dataset = ShardDataset(urls, ImageTextDecoder(resolution, random_crop, with_meta), batch_size=batch_size,
                           shuffle_buffer=shuffle_buffer, seed=seed, epoch_length=epoch_length, rank=rank,
                           world_size=world_size, drop_last=drop_last)
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                       multiprocessing_context=multiprocessing_context)


def make_latent_loader(
    urls,
    *,
    batch_size: int,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch_length: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """Like `make_image_text_loader`, for latent shards: {"latent": (B, C, h, w), "caption": [str],
    "key": [str], "context": (B, L, D) when every sample of the batch has an `.emb.npy`}."""
    dataset = ShardDataset(urls, LatentDecoder(), batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                           epoch_length=epoch_length, rank=rank, world_size=world_size, drop_last=drop_last)
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                       multiprocessing_context=multiprocessing_context)
