"""Model formats by name and how to tell them apart: our model file, original single files, diffusers folders.

- `ours`: one `.safetensors` in the original key layout with our config in its metadata
  (`LDMPipeline.save` / `from_checkpoint`).
- `single`: an original Stable Diffusion single file (`.safetensors` or `.ckpt`): the same keys, no
  config, plus the schedule buffers (`betas`, `alphas_cumprod`, ...) that the original code and the
  tools built on it expect (`ldm.convert.single_file`).
- `diffusers`: a diffusers folder (`ldm.convert.diffusers`).

`ldm.pipeline.load_model` / `save_model` read and write any of them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from safetensors import safe_open

from ..checkpoint import CONFIG_KEY, file_kind, read_model_config
from ..config import PREDICTION_TYPES, Config, load_config
from ..errors import CheckpointError
from .diffusers.configs import PREDICTION_TO_DIFFUSERS
from .diffusers.folder import read_diffusers_config
from .single_file.load import read_single_file_config
from .single_file.reader import PICKLE_SUFFIXES

FORMATS = ("ours", "single", "diffusers")
# Our names of the prediction types, and diffusers' spelling of each ("v_prediction" -> "v").
PREDICTION_NAMES = {**{name: name for name in PREDICTION_TYPES},
                    **{theirs: ours for ours, theirs in PREDICTION_TO_DIFFUSERS.items()}}


def normalise_prediction_type(name: str) -> str:
    """Our name for a prediction type given in our or diffusers' spelling ("v_prediction" -> "v")."""
    if name not in PREDICTION_NAMES:
        raise ValueError(f"unknown prediction type {name!r}; use one of eps, v, x0 (or epsilon, v_prediction, sample)")
    return PREDICTION_NAMES[name]


def detect_input_format(path: str | Path) -> str:
    """The format of the model at `path`, read from the file itself, not its name: a folder is a
    diffusers model; a PyTorch pickle (`.ckpt`, `.pt`, ... or misnamed) an original single file; a
    `.safetensors` file is ours when its metadata holds our config, else an original single file."""
    path = Path(path)
    if path.is_dir():
        return "diffusers"
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    kind = file_kind(path)
    if kind in ("zip", "pickle"):
        return "single"
    if kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # a corrupt header raises several kinds of errors
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e}); it may be truncated or "
                                  "corrupt: download or export it again") from None
        return "ours" if CONFIG_KEY in metadata else "single"
    raise CheckpointError(
        f"{path} ({path.stat().st_size} bytes) is neither a .safetensors file nor a PyTorch pickle (.ckpt) by its "
        "first bytes, nor a diffusers folder; it may be truncated, an HTML page saved by a failed download, "
        "or another format"
    )


def model_config(path: str | Path, fmt: str | None = None, *, config: str | Path | Config | None = None,
                 prediction_type: str | None = None) -> Config:
    """The config of the model at `path` (any format, told apart by `detect_input_format` unless `fmt`
    says), without reading its weights: an ldm file's stored one, a diffusers folder's `config.json`
    files, an original file's detected from its tensor shapes (or `config`, as `LDMPipeline.load`
    takes it). `prediction_type` (ours or diffusers' spelling) replaces the model's."""
    fmt = fmt or detect_input_format(path)
    pred = normalise_prediction_type(prediction_type) if prediction_type else None
    if fmt == "single":
        return read_single_file_config(path, config=config, prediction_type=pred)
    if fmt == "diffusers":
        if config is not None:
            raise CheckpointError(f"{path} is a diffusers folder, whose configs describe it; drop --config")
        cfg = read_diffusers_config(path)
    elif fmt == "ours":
        cfg = config if isinstance(config, Config) else load_config(config) if config else read_model_config(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return with_prediction_type(cfg, pred) if pred else cfg


def with_prediction_type(config: Config, prediction_type: str) -> Config:
    """A copy of `config` whose model predicts `prediction_type` (eps, v or x0)."""
    diffusion = dataclasses.replace(config.model.diffusion, prediction_type=prediction_type)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, diffusion=diffusion))


def infer_output_format(path: str | Path) -> str:
    """`.safetensors` -> ours, `.ckpt` -> single, anything without a suffix (or a folder) -> diffusers."""
    path = Path(path)
    if path.is_dir() or path.suffix == "" or str(path).endswith(os.sep):
        return "diffusers"
    if path.suffix in PICKLE_SUFFIXES:
        return "single"
    if path.suffix == ".safetensors":
        return "ours"
    raise CheckpointError(f"cannot tell which format to write for {path}; pass --to ours|single|diffusers")


def describe(path: Path, fmt: str) -> str:
    """One line on what was written: format, size and (for folders) the files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        return f"wrote {fmt} folder {path} ({len(files)} files, {size / 2**20:.1f} MiB)"
    return f"wrote {fmt} file {path} ({path.stat().st_size / 2**20:.1f} MiB)"
