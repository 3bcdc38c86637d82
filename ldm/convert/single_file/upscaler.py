"""The latent upscaler's conventions in files from elsewhere: what the SD x4 upscaler's original
single file holds beyond a text-to-image model's, and what its tensors cannot tell.

An original x4 file (`LatentUpscaleDiffusion`) has the usual three networks, a `label_emb` in its
U-Net, and the buffers of its low-resolution noise augmentation under `low_scale_model.*` (the
schedule; `max_noise_level` is a constructor argument and is not stored). Detection keeps what
the shapes say (7 input channels, the class count, which levels lack self-attention) and fills in
the family's conventions (x4-upscaling.yaml): 8 heads per level, latent scale 0.08333, the
scaled-linear schedule 0.0001..0.02 with v prediction for the latents, and for the low-resolution
image the same schedule with max_noise_level 350.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import Tensor

from ...config import DiffusionConfig, LowResConfig, ModelConfig

LOW_SCALE_PREFIX = "low_scale_model."
X4_NUM_HEADS = 8
X4_SCALING_FACTOR = 0.08333
X4_DIFFUSION = DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction_type="v")
X4_LOW_RES = LowResConfig(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, max_noise_level=350)
LOW_SCALE_BUFFERS = (  # what the original's AbstractLowScaleModel registers
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
)


def is_upscaler_state(state: Mapping[str, Tensor]) -> bool:
    """Whether an original-layout state dict is a latent upscaler's (noise-level embedding or
    low-resolution augmentation buffers)."""
    return "model.diffusion_model.label_emb.weight" in state or any(k.startswith(LOW_SCALE_PREFIX) for k in state)


def split_low_scale(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(everything else, the `low_scale_model.*` buffers with the prefix stripped)."""
    rest, low = {}, {}
    for key, value in state.items():
        if key.startswith(LOW_SCALE_PREFIX):
            low[key[len(LOW_SCALE_PREFIX):]] = value
        else:
            rest[key] = value
    return rest, low


def low_res_as_diffusion(cfg: LowResConfig) -> DiffusionConfig:
    """The low-resolution schedule as a DiffusionConfig, for the code that builds or checks schedules."""
    return DiffusionConfig(beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
                           num_timesteps=cfg.num_timesteps)


def x4_conventions(detected: ModelConfig, prediction_type: str | None) -> ModelConfig:
    """A detected upscaler config completed with the x4 family's conventions (see the module doc)."""
    u = detected.unet
    flags = list(u.disable_self_attentions)
    attended = [level for level in range(len(u.channel_mult)) if 2**level in u.attention_resolutions]
    if flags and attended:
        # a level without attention has no flag to detect (it changes nothing there); it takes the flag
        # of the nearest level above with attention, which writes the x4 layout as x4-upscaling.yaml does
        for level in range(len(flags)):
            if level not in attended:
                flags[level] = flags[min(attended, key=lambda a: (a < level, abs(a - level)))]
    unet = dataclasses.replace(u, num_heads=X4_NUM_HEADS, num_head_channels=None, disable_self_attentions=tuple(flags))
    vae = dataclasses.replace(detected.vae, scaling_factor=X4_SCALING_FACTOR)
    diffusion = dataclasses.replace(X4_DIFFUSION, prediction_type=prediction_type or X4_DIFFUSION.prediction_type)
    return ModelConfig(unet=unet, vae=vae, text_encoder=detected.text_encoder, diffusion=diffusion,
                       low_res=dataclasses.replace(X4_LOW_RES))


def describe_upscaler(cfg: ModelConfig) -> list[str]:
    """Report lines on what detection decided beyond a text-to-image model's."""
    low, u = cfg.low_res, cfg.unet
    off = [level for level, flag in enumerate(u.disable_self_attentions) if flag]
    return [
        f"  upscaler: noise level embedded as one of {u.num_classes} classes; self-attention off at levels {off}",
        f"  low-resolution input: {low.beta_schedule} {low.beta_start}..{low.beta_end} over {low.num_timesteps} "
        f"steps, max_noise_level {low.max_noise_level} (family convention, not stored in the file)",
    ]


__all__ = [
    "LOW_SCALE_PREFIX",
    "LOW_SCALE_BUFFERS",
    "is_upscaler_state",
    "split_low_scale",
    "low_res_as_diffusion",
    "x4_conventions",
    "describe_upscaler",
]
