"""The model a run starts from: `train.init_from` in any format, and the config the run then trains.

Both stage-2 trainers (the whole model, `ldm_trainer.py`, and LoRA adapters, `lora_trainer.py`)
start from `load_base(cfg)`. The file is read by `LDMPipeline.load`: our model file, an original
single file (`.safetensors`, `.ckpt` through the safe loader) or a diffusers folder. What the run
trains is then decided as a Stable Diffusion user expects:

- the architecture (U-Net, VAE, text encoder) and the latent scale are the file's: weights cannot
  be trained into another shape, so the config's `model` section does not choose them; where it
  differs, the differences are printed as not used;
- the noise schedule and prediction type are the file's where the file records them (our files,
  diffusers folders); an original single file records neither, so they come from the config
  (`model.diffusion`; `configs/sd21_finetune.yaml` says `v`), and a config of the other model
  family (SD 1.x vs 2.x, told by the text encoder) is refused, since its prediction type would be
  a guess about this file;
- the settings of the run itself stay the config's: gradient checkpointing, dropout, and whether
  the text encoder trains (`RUN_SETTINGS`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config, ModelConfig, to_dict
from ..convert.formats import detect_input_format
from ..pipeline import LDMPipeline
from ..pipeline.files import load_model

# Keys of the config's `model` section that belong to the run, not to the weights.
RUN_SETTINGS = {"unet": ("gradient_checkpointing", "dropout"), "vae": ("dropout",), "text_encoder": ("trainable",)}
FAMILIES = {"hf_clip": "SD 1.x (CLIP ViT-L text encoder)", "open_clip": "SD 2.x (OpenCLIP text encoder)"}
SHOWN = 6  # differences named in the note; the rest are counted


@dataclass
class Base:
    """The loaded base model (float32, on the CPU) and the model config the run trains."""

    pipe: LDMPipeline
    model: ModelConfig
    notes: list[str]


def load_base(cfg: Config, what: str = "train.init_from", kind: str | None = None) -> Base:
    """The model `cfg.train.init_from` and the model config of a run on it (see the module docstring).
    `kind` ("text-to-image" or "upscaler"; default: the config's) refuses a model of the other kind."""
    path = cfg.train.init_from
    kind = kind or ("upscaler" if cfg.model.low_res else "text-to-image")
    fmt = detect_input_format(path)
    notes = []
    if fmt == "single":
        pred = cfg.model.diffusion.prediction_type
        pipe = load_model(path, fmt, prediction_type=pred, kind=kind)
        _check_family(cfg.model, pipe.model_config, path)
        notes.append(f"{what}: {path} is an original single file, which records no prediction type: "
                     f"{pred!r} from model.diffusion.prediction_type")
    else:
        pipe = load_model(path, fmt, kind=kind)
    if pipe.model_config.inpainting:
        raise ValueError(f"{path} is an inpainting model ({pipe.unet.cfg.in_channels} input channels); "
                         "training needs a text-to-image base model")
    pipe.to(dtype=torch.float32)  # master weights train in float32; train.mixed_precision autocasts
    model = pipe.model_config
    model = dataclasses.replace(model, **{
        part: dataclasses.replace(getattr(model, part), **{k: getattr(getattr(cfg.model, part), k) for k in keys})
        for part, keys in RUN_SETTINGS.items()})
    differ = differences(cfg.model, model)
    if differ:
        shown = ", ".join(differ[:SHOWN]) + (f" (+{len(differ) - SHOWN} more)" if len(differ) > SHOWN else "")
        notes.append(f"{what}: the architecture, latent scale and schedule are {path}'s; the config's model "
                     f"section differs in {len(differ)} key{'s' * (len(differ) > 1)}, not used: {shown}")
    return Base(pipe, model, notes)


def _check_family(config: ModelConfig, found_model: ModelConfig, path: str) -> None:
    """Refuse a config of the other SD family for an original file (whose prediction type it gives)."""
    found, wanted = found_model.text_encoder.kind, config.text_encoder.kind
    if found != wanted:
        fix = "configs/sd21_finetune.yaml (768-v; add model.diffusion.prediction_type=eps for a 512 px 2.x base model)" \
            if found == "open_clip" else "configs/sd15_finetune.yaml"
        raise ValueError(f"train.init_from: {path} is {FAMILIES.get(found, found)} but the config describes "
                         f"{FAMILIES.get(wanted, wanted)}; an original file records no prediction type, so the "
                         f"config's would be a guess about this model: use {fix}")


def differences(config: ModelConfig, used: ModelConfig) -> list[str]:
    """`model.<key> <config's> -> <used>` for every key where the two differ."""
    out: list[str] = []

    def walk(a: Any, b: Any, name: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in a:
                walk(a[key], b.get(key), f"{name}.{key}")
        elif a != b:
            out.append(f"{name} {a} -> {b}")

    walk(to_dict(config), to_dict(used), "model")
    return out

