"""Models in any format by path: `load_model` and `save_model` pick the reader or writer from the path
(or the format named): our model file, an original single file, or a diffusers folder."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..convert.formats import FORMATS, infer_output_format
from .ldm_pipeline import LDMPipeline


def load_model(
    path: str | Path,
    fmt: str | None = None,
    *,
    config: str | Path | Config | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    trust_pickle: bool = False,
    vae: str | Path | None = None,
) -> LDMPipeline:
    """Load an LDMPipeline from any supported format (detected from the file itself when `fmt` is
    None); the same as `LDMPipeline.load`."""
    return LDMPipeline.load(path, fmt, config=config, prediction_type=prediction_type, vae=vae, use_ema=use_ema,
                            trust_pickle=trust_pickle)


def save_model(pipe: LDMPipeline, path: str | Path, fmt: str | None = None, *,
               dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` in `fmt` (inferred from `path` when None), its weights cast to `dtype` if given."""
    fmt = fmt or infer_output_format(path)
    if fmt == "single":
        return pipe.save_single_file(path, dtype=dtype)
    if dtype is not None:
        pipe.to(dtype=dtype)
    if fmt == "ours":
        return pipe.save(path)
    if fmt == "diffusers":
        return pipe.save_diffusers(path)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
