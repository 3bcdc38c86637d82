"""Models in any format by path: `load_model` and `save_model` pick the reader or writer from the path
(or the format named): our model file, an original single file, or a diffusers folder. `load_model`
also checks the kind of model (text-to-image or upscaler) a tool needs, before the weights load
where the file tells."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoint import read_model_config
from ..config import Config
from ..convert.formats import FORMATS, detect_input_format, infer_output_format, normalise_prediction_type
from ..errors import CheckpointError
from .ldm_pipeline import LDMPipeline

MODEL_KINDS = ("text-to-image", "upscaler")


def load_model(
    path: str | Path,
    fmt: str | None = None,
    *,
    config: str | Path | Config | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    trust_pickle: bool = False,
    kind: str | None = None,
) -> LDMPipeline:
    """Load an LDMPipeline from any supported format (detected from `path` when `fmt` is None); with
    `kind` ("text-to-image" or "upscaler"), a model of the other kind is refused (`check_model_kind`)."""
    fmt = fmt or detect_input_format(path)
    if kind is not None and fmt == "ours" and config is None:
        check_model_kind(read_model_config(path), kind, path)
    pipe = _load(path, fmt, config=config, prediction_type=prediction_type, use_ema=use_ema, trust_pickle=trust_pickle)
    if kind is not None:
        check_model_kind(pipe.config, kind, path)
    return pipe


def check_model_kind(config: Config | None, kind: str | None, name: str | Path) -> None:
    """Refuse an upscaler where a text-to-image model is wanted and the other way round, saying
    which tool takes it (`config` None: nothing known yet; `kind` None: either; nothing checked)."""
    if kind is not None and kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MODEL_KINDS)} (got {kind!r})")
    if config is None or kind is None:
        return
    if kind == "text-to-image" and config.model.low_res is not None:
        raise ValueError(
            f"{name} is an upscaler model (it takes a low-resolution image), not a text-to-image model: upscale "
            f"pictures with `python tools/upscale.py --ckpt {name} --image IN.png --out OUT.png`, or use it for "
            f"hires fix: `python tools/txt2img.py --ckpt MODEL --prompt ... --hires-scale 2 --upscaler {name}`"
        )
    if kind == "upscaler" and config.model.low_res is None:
        raise ValueError(
            f"{name} is a text-to-image model, not an upscaler (no model.low_res section): pass an upscaler such "
            f"as the SD x4 upscaler, or make larger images with hires fix: `python tools/txt2img.py --ckpt {name} "
            "--prompt ... --hires-scale 2`"
        )


def _load(path: str | Path, fmt: str, *, config: str | Path | Config | None, prediction_type: str | None,
          use_ema: bool, trust_pickle: bool) -> LDMPipeline:
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
