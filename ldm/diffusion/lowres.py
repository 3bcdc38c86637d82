"""An upscaler's noise math: the low-resolution input's noise augmentation, and its training loss.

The x4 upscaler (Stability's `LatentUpscaleDiffusion`) conditions on a low-resolution image that is
itself noised with a schedule of its own, x_lr = sqrt(abar_l) image + sqrt(1 - abar_l) noise, at an
integer level l that the U-Net also receives as a class label. Training draws l uniformly from
[0, max_noise_level), so the model learns to trust the image less as l grows; at sampling a small
level (20) hides compression artefacts and noise in the input and lets the model add detail.
The U-Net's input is [noisy latents, augmented image] along the channels, in that order.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..config import LowResConfig
from .objective import diffusion_loss, q_sample, sample_timesteps
from .schedule import Schedule, make_betas


def low_res_schedule(cfg: LowResConfig) -> Schedule:
    """The noise schedule of the low-resolution input (its own, not the latents')."""
    return Schedule.from_betas(make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end))


def check_noise_level(level: int, max_noise_level: int) -> int:
    """An integer noise level in [0, max_noise_level], or an error that says the range."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= max_noise_level:
        raise ValueError(
            f"noise_level must be an integer in [0, {max_noise_level}] (got {level!r}); 20 is typical: "
            "more noise hides flaws of the input and lets the model invent more detail"
        )
    return level


def sample_noise_levels(n: int, max_noise_level: int, generator: torch.Generator) -> Tensor:
    """n training noise levels, uniform in [0, max_noise_level) as in the original, int64 on the CPU."""
    return torch.randint(0, max_noise_level, (n,), generator=generator)


def noise_augment(image: Tensor, levels: Tensor, schedule: Schedule, noise: Tensor) -> Tensor:
    """The low-resolution image (B, C, h, w) in [-1, 1] noised to integer `levels` (B,) of the
    low-resolution `schedule`: sqrt(abar_l) image + sqrt(1 - abar_l) noise, in the image's dtype."""
    return q_sample(image, levels.to(image.device), noise, schedule)


def upscaler_input(x_t: Tensor, low_res: Tensor) -> Tensor:
    """The U-Net's input: the noisy latents (B, C, h, w) and the augmented low-resolution image
    (B, 3, h, w) side by side, latents first (the original's `c_concat` order)."""
    if x_t.shape[-2:] != low_res.shape[-2:]:
        raise ValueError(
            f"the low-resolution image ({low_res.shape[-1]}x{low_res.shape[-2]}) must have the latents' size "
            f"({x_t.shape[-1]}x{x_t.shape[-2]}): an upscaler's factor is its VAE's"
        )
    return torch.cat([x_t, low_res.to(x_t.dtype)], dim=1)


def upscaler_loss(
    model: Callable[..., Tensor],
    z0: Tensor,
    low_res: Tensor,
    context: Tensor,
    *,
    schedule: Schedule,
    low_res_schedule: Schedule,
    max_noise_level: int,
    prediction_type: str,
    generator: torch.Generator,
    timestep_shift: float = 1.0,
    offset_noise: float = 0.0,
    min_snr_gamma: float | None = None,
    min_snr_floor: float = 0.0,
) -> Tensor:
    """The denoising loss of one upscaler batch (a scalar, float32).

    z0: (B, C, h, w) scaled latents of the high-resolution images; low_res: (B, 3, h, w) their
    low-resolution versions in [-1, 1] (`ldm.data.degrade.make_low_res`); context: (B, L, D) text
    hidden states (captions already dropped out). `model(x, t, context, y)` is the U-Net.

    From `generator` (a CPU generator, so a seed gives the same step on every device), in this
    order: timesteps, latent noise, offset noise (only when `offset_noise` > 0), noise levels,
    augmentation noise. Then x_t = q_sample(z0, t), the image is augmented to its level, and the
    U-Net's prediction from [x_t, image] is regressed on its target (`diffusion_loss`).
    """
    b, device = z0.shape[0], z0.device
    t = sample_timesteps(b, schedule.num_timesteps, timestep_shift, generator).to(device)
    noise = torch.randn(z0.shape, generator=generator).to(device)
    if offset_noise > 0:  # per-channel offsets let the model shift overall brightness
        noise = noise + offset_noise * torch.randn(b, z0.shape[1], 1, 1, generator=generator).to(device)
    levels = sample_noise_levels(b, max_noise_level, generator).to(device)
    aug_noise = torch.randn(low_res.shape, generator=generator).to(device)
    x_t = q_sample(z0, t, noise, schedule)
    image = noise_augment(low_res.to(z0.dtype), levels, low_res_schedule, aug_noise.to(z0.dtype))
    pred = model(upscaler_input(x_t, image), t, context, levels)
    return diffusion_loss(pred.float(), z0, noise, t, schedule, prediction_type, min_snr_gamma,
                          min_snr_floor=min_snr_floor)


__all__ = [
    "low_res_schedule",
    "check_noise_level",
    "sample_noise_levels",
    "noise_augment",
    "upscaler_input",
    "upscaler_loss",
]
