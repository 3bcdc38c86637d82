"""Checkpoint files in, safely: the tensors of a `.safetensors` file or a PyTorch pickle.

Tensors are memory-mapped from the file, not copied. Pickles are opened with `weights_only=True`,
which refuses anything but tensors and plain containers, unless the caller says it trusts the file
(unpickling can run code); a pickle that holds more than tensors gets an error saying how to
convert it once into a safe `.safetensors` file.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ...checkpoint import file_kind
from ...errors import CheckpointError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = "python tools/convert.py --trust-pickle {path} {out}"


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` or PyTorch pickle (`.ckpt`, `.pt`, `.pth`, `.bin`) file.

    Tensors are memory-mapped from the file, not copied. A `{"state_dict": ...}` wrapper (as
    written by training frameworks, beside `global_step`, `epoch`, ...) is unwrapped. Pickles are
    read with `weights_only=True`, which refuses anything but tensors and plain containers; pass
    `trust_pickle=True` only for files from a source you trust, since unpickling can run code.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass a single .safetensors or .ckpt file "
            "(a diffusers folder loads with LDMPipeline.from_diffusers)"
        )
    kind = file_kind(path)
    if kind == "safetensors":
        tensors = _read_safetensors(path)
    elif kind in ("zip", "pickle"):
        obj = _read_pickle(path, legacy=kind == "pickle", trust=trust_pickle)
        tensors = _unwrap_state_dict(obj, path)
    else:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
        raise CheckpointError(
            f"{path} is not a checkpoint: {size} bytes starting with {head[:8]!r} match neither a "
            ".safetensors header nor a PyTorch pickle (zip or legacy); it may be truncated, "
            "an HTML error page saved by a failed download, or another format"
        )
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def read_weights_file(path: str | Path, *, what: str, trust_pickle: bool = False,
                      fix: str = "") -> tuple[object, dict[str, str]]:
    """(content, metadata) of a small weights file (a LoRA, an embedding): a `.safetensors` file's
    tensors and its metadata, or what a pickle holds (read weights-only unless trusted) and {}.
    `what` names the kind of file in errors; `fix` says how to open a pickle that holds more."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}" if not path.exists() else f"{path} is not a {what} file")
    with open(path, "rb") as f:
        head = f.read(16)
    kind = _sniff(head, path.stat().st_size)
    if kind == "safetensors":
        from safetensors import safe_open

        tensors = _read_safetensors(path)
        with safe_open(str(path), framework="pt") as f:
            return tensors, dict(f.metadata() or {})
    if kind in ("zip", "pickle"):
        return _read_pickle(path, legacy=kind == "pickle", trust=trust_pickle, fix=fix), {}
    raise CheckpointError(
        f"{path} is not a {what} file: it is neither .safetensors nor a PyTorch pickle (it may be "
        "truncated, or an HTML page saved by a failed download)"
    )


def _sniff(head: bytes, size: int) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"  # protocol marker of a legacy (pre-zip) torch.save
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open maps the file: get_tensor returns copy-on-write views of it, not copies.
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated or corrupt: "
            "download or export it again"
        ) from None


def _read_pickle(path: Path, *, legacy: bool, trust: bool, fix: str = "") -> object:
    if trust:
        return _read_trusted_pickle(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # old non-zip pickles cannot be memory-mapped; read them into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be corrupt"
            ) from None
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        what = f" (it holds an object of type {found.group(1)})" if found else ""
        out = path.with_suffix(".safetensors")
        fix = fix or (
            "convert it once to a safe .safetensors file:\n"
            f"  {CONVERT_HINT.format(path=path, out=out)}\n"
            "and load the .safetensors file from then on."
        )
        raise CheckpointError(
            f"{path} is a pickle that holds more than tensors{what}, so it was not opened: "
            f"unpickling such a file can run arbitrary code on this machine. Only if you trust its source, {fix}"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated "
            "or corrupt: download or export it again"
        ) from None


class _Placeholder:
    """Stands in for a class a trusted pickle names but this environment lacks (e.g. a PyTorch
    Lightning callback stored beside the weights); it keeps whatever state it is given."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            log.info("trusted pickle: %s.%s is not importable here; kept as a placeholder", module, name)
            return _Placeholder


class _LenientPickleModule:
    """A `pickle_module` for `torch.load` whose unpickler tolerates missing classes."""

    Unpickler = _LenientUnpickler
    load = pickle.load
    __name__ = "ldm_lenient_pickle"


def _read_trusted_pickle(path: Path) -> object:
    try:
        try:
            return torch.load(
                path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_LenientPickleModule
            )
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LenientPickleModule)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated "
            "or corrupt: download or export it again"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        extra = [k for k in obj if k != "state_dict"]
        if extra:
            log.info("%s: ignored top-level entries beside state_dict: %s", path, ", ".join(map(str, extra)))
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        more = f" (+{len(not_tensors) - 5} more)" if len(not_tensors) > 5 else ""
        raise CheckpointError(
            f"{path}: the state dict holds {len(not_tensors)} entries that are not tensors: "
            f"{', '.join(not_tensors[:5])}{more}"
        )
    return dict(obj)
