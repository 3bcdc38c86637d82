"""Models in any format by path: `load_model` and `save_model` pick the reader or writer from the path
(or the format named): our model file, an original single file, or a diffusers folder. `load_model`
also checks the kind of model (text-to-image or upscaler) a tool needs, before the weights load
where the file tells."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import read_model_config
from ..config import Config
from ..convert.formats import FORMATS, detect_input_format, infer_output_format
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
    vae: str | Path | None = None,
    kind: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> LDMPipeline:
    """Load an LDMPipeline from any supported format (detected from the file itself when `fmt` is
    None); the same as `LDMPipeline.load`. With `kind` ("text-to-image" or "upscaler"), a model of
    the other kind is refused (`check_model_kind`): from the header alone for our model files."""
    fmt = fmt or detect_input_format(path)
    if kind is not None and fmt == "ours" and config is None:
        check_model_kind(read_model_config(path), kind, path)
    pipe = LDMPipeline.load(path, fmt, config=config, prediction_type=prediction_type, vae=vae, use_ema=use_ema,
                            trust_pickle=trust_pickle, device=device, dtype=dtype)
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
