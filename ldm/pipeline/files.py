"""Models in any format by path: `load_model` and `save_model` pick the reader or writer from the path
(or the format named): our model file, an original single file, or a diffusers folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config
from ..convert.formats import FORMATS, detect_input_format, infer_output_format, normalise_prediction_type
from ..errors import CheckpointError
from .ldm_pipeline import LDMPipeline


def load_model(
    path: str | Path,
    fmt: str | None = None,
    *,
    config: str | Path | Config | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    trust_pickle: bool = False,
) -> LDMPipeline:
    """Load an LDMPipeline from any supported format (detected from `path` when `fmt` is None)."""
    fmt = fmt or detect_input_format(path)
    if fmt == "single":
        pred = normalise_prediction_type(prediction_type) if prediction_type else None
        return LDMPipeline.from_single_file(path, prediction_type=pred, config=config, use_ema=use_ema,
                                            trust_pickle=trust_pickle)
    if use_ema:
        raise CheckpointError(f"--ema applies to original single files only; {path} is a {fmt} model")
    if fmt == "ours":
        pipe = LDMPipeline.from_checkpoint(path, config=config)
    elif fmt == "diffusers":
        if config is not None:
            raise CheckpointError(f"{path} is a diffusers folder, whose configs describe it; drop --config")
        pipe = LDMPipeline.from_diffusers(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _with_prediction_type(pipe, prediction_type) if prediction_type else pipe


def _with_prediction_type(pipe: LDMPipeline, prediction_type: str) -> LDMPipeline:
    diffusion = dataclasses.replace(pipe.diffusion, prediction_type=normalise_prediction_type(prediction_type))
    return LDMPipeline(pipe.vae, pipe.unet, pipe.text_encoder, diffusion, defaults=pipe.defaults,
                       low_res=pipe.model_config.low_res)


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
