"""Original single files out: our weights under the original prefixes, plus the noise-schedule buffers
(`betas`, `alphas_cumprod`, ...) that the original code and the tools built on it expect."""

from __future__ import annotations

from pathlib import Path

import torch

from ...atomic import atomic_path
from ...build import ModelState
from ...checkpoint import PREFIXES, atomic_save_safetensors
from ...config import DiffusionConfig
from ...errors import ConfigError
from ...diffusion.schedule import make_betas, rescale_zero_terminal_snr
from .upscaler import LOW_SCALE_BUFFERS, LOW_SCALE_PREFIX, low_res_as_diffusion


def schedule_buffers(cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers of the original `LatentDiffusion` (ddpm.py `register_schedule`),
    computed in float64 and stored as float32 as there (v_posterior = 0)."""
    betas = make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = betas * (1 - ac_prev) / (1 - ac)  # DDPM eq. 7, beta tilde
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": ac.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),  # DDPM eq. 7, mu tilde
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def single_file_tensors(state: ModelState, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of an original single file: model weights under the original prefixes (cast to
    `dtype` when given), the schedule buffers in float32 (an upscaler's low-resolution ones under
    `low_scale_model.`), and SD 1.x's CLIP `position_ids`."""
    extra = state.config.model.unet.parts_outside_sd_layout()
    if extra:
        raise ConfigError(
            f"{'; '.join(extra)}: the original Stable Diffusion U-Net has no such part, so this model has no "
            "single-file form; keep it in our .safetensors file (LDMPipeline.save)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, part in state.parts.items():
        for key, value in part.items():
            value = value.detach().cpu()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[PREFIXES[name] + key] = value.contiguous()
    model = state.config.model
    tensors.update(schedule_buffers(model.diffusion))
    if model.low_res is not None:  # an upscaler's low-resolution augmentation, as the original stores it
        buffers = schedule_buffers(low_res_as_diffusion(model.low_res))
        tensors.update({LOW_SCALE_PREFIX + k: buffers[k] for k in LOW_SCALE_BUFFERS})
    te = model.text_encoder
    if te.kind == "hf_clip":
        ids = torch.arange(te.context_length, dtype=torch.long)[None]
        tensors[PREFIXES["text_encoder"] + "transformer.text_model.embeddings.position_ids"] = ids
    return tensors


def write_single_file(state: ModelState, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write an original-layout single file atomically: `.safetensors`, or a `.ckpt` pickle of {"state_dict"}."""
    path = Path(path)
    tensors = single_file_tensors(state, dtype)
    if path.suffix == ".safetensors":
        return atomic_save_safetensors(tensors, path, {"format": "pt"})
    with atomic_path(path, fsync=False) as tmp:
        torch.save({"state_dict": tensors}, tmp)
    return path
