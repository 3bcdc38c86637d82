"""The noise math: schedules, prediction types and losses, the VE denoiser, samplers and guidance.

The networks know none of this: a U-Net maps (x_t, t, context) to a prediction, and everything
that turns predictions into training targets or images lives here.
"""

from .denoiser import Denoiser
from .guidance import CFGDenoiser
from .lowres import (
    check_noise_level,
    low_res_schedule,
    noise_augment,
    sample_noise_levels,
    upscaler_input,
    upscaler_loss,
)
from .objective import (
    PREDICTION_TYPES,
    convert_prediction,
    diffusion_loss,
    min_snr_weight,
    pred_to_eps,
    pred_to_x0,
    q_sample,
    sample_timesteps,
    snr,
    target_for,
)
from .names import SamplerChoice, a1111_name, parse_sampler, parse_schedule
from .sampler_core import ancestral_step, randn_like
from .samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_euler_a,
    sample_heun,
)
from .samplers_multistep import sample_dpmpp_2m, sample_lms, sample_uni_pc, sample_uni_pc_bh2
from .samplers_sde import sample_dpmpp_2m_sde, sample_dpmpp_sde
from .schedule import (
    MIN_ALPHA_CUMPROD,
    SPACINGS,
    Schedule,
    make_betas,
    rescale_zero_terminal_snr,
    sigmas_from_schedule,
)

__all__ = [
    "MIN_ALPHA_CUMPROD",
    "SPACINGS",
    "Schedule",
    "make_betas",
    "rescale_zero_terminal_snr",
    "sigmas_from_schedule",
    "PREDICTION_TYPES",
    "convert_prediction",
    "pred_to_x0",
    "pred_to_eps",
    "target_for",
    "q_sample",
    "sample_timesteps",
    "snr",
    "min_snr_weight",
    "diffusion_loss",
    "Denoiser",
    "CFGDenoiser",
    "low_res_schedule",
    "check_noise_level",
    "sample_noise_levels",
    "noise_augment",
    "upscaler_input",
    "upscaler_loss",
    "randn_like",
    "ancestral_step",
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_euler_a",
    "sample_heun",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_lms",
    "sample_uni_pc",
    "sample_uni_pc_bh2",
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "SAMPLER_NAMES",
    "SamplerChoice",
    "parse_sampler",
    "parse_schedule",
    "a1111_name",
]
