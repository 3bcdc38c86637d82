"""Samplers: the registry of every sampler by name, and the first-order and Heun samplers.

Every sampler is a pure function with the one signature (see `sampler_core` for the contract)

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, generator=None, callback=None[, eta]) -> x0

The families live in their own modules: first order and Heun here, the multistep solvers
(DPM-Solver++(2M), LMS, UniPC) in `samplers_multistep`, the stochastic DPM-Solver++ variants in
`samplers_sde`. Only samplers in STOCHASTIC_SAMPLERS accept `eta`; `ddpm` draws noise too but has
no eta. Names people type in other tools (`DPM++ 2M Karras`, `euler_ancestral`) are mapped to
these in `names`.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import Tensor

from .sampler_core import (
    Denoise,
    GeneratorArg,
    StepCallback,
    ancestral_step,
    call_denoiser,
    check_args,
    check_eta,
    euler_to,
    randn_like,
)
from .samplers_multistep import sample_dpmpp_2m, sample_lms, sample_uni_pc, sample_uni_pc_bh2
from .samplers_sde import sample_dpmpp_2m_sde, sample_dpmpp_sde

__all__ = [
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_euler_a",
    "sample_heun",
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "SAMPLER_NAMES",
    "KARRAS_SUFFIX",
]


def sample_euler(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022 Alg. 2 without the Heun
    correction). Deterministic; identical to DDIM with eta = 0."""
    sig, extra = check_args(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = call_denoiser(denoiser, x, sig[i], extra)
        if callback is not None:
            callback(i, x, denoised)
        x = euler_to(x, denoised, sig[i], sig[i + 1])
    return x


def _ancestral(
    denoiser: Denoise, x: Tensor, sigmas: Tensor, extra_args, generator, callback, eta: float
) -> Tensor:
    """Deterministic Euler step to sigma_down, then fresh noise of std sigma_up (see ancestral_step).

    In VE form this is exactly DDIM (Song et al. 2021 eq. 12): x' = x0 + sigma_down * eps_hat + sigma_up * z
    with eps_hat = (x - x0) / sigma.
    """
    check_eta(eta)
    sig, extra = check_args(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = call_denoiser(denoiser, x, sig[i], extra)
        if callback is not None:
            callback(i, x, denoised)
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        x = euler_to(x, denoised, sig[i], down)
        if up > 0:
            x = x + up * randn_like(x, generator)
    return x


def sample_ddim(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16), in VE form.

    eta = 0 is the deterministic DDIM sampler (the same path as `sample_euler`); eta = 1 has the
    DDPM posterior variance (the same path as `sample_ddpm` for the same generator).
    """
    return _ancestral(denoiser, x, sigmas, extra_args, generator, callback, eta)


def sample_euler_a(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then noise of std sigma_up. Its update
    is DDIM's, with eta = 1 by default."""
    return _ancestral(denoiser, x, sigmas, extra_args, generator, callback, eta)


def sample_ddpm(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x' | x, x0) (Ho et al. 2020 eq. 6-7), with x0
    the denoiser's estimate.

    In VE form the forward step from sigma' to sigma adds N(0, sigma^2 - sigma'^2), so the posterior
    is Gaussian with mean x0 + (sigma'^2 / sigma^2)(x - x0) and variance sigma'^2 (1 - sigma'^2 / sigma^2).
    Works between any two sigmas, so it also runs with skipped steps.
    """
    sig, extra = check_args(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = call_denoiser(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        ratio = (s_next / s) ** 2
        x = denoised + ratio * (x - denoised)  # posterior mean
        if s_next > 0:
            x = x + s_next * math.sqrt(1 - ratio) * randn_like(x, generator)
    return x


def sample_heun(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022 Alg. 2 with S_churn = 0): deterministic,
    two denoiser calls per step except the last (to sigma = 0), which is an Euler step."""
    sig, extra = check_args(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = call_denoiser(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        x_euler = euler_to(x, denoised, s, s_next)
        if s_next == 0:
            x = x_euler
            continue
        d = (x - denoised) / s
        d_next = (x_euler - call_denoiser(denoiser, x_euler, s_next, extra)) / s_next
        x = x + (s_next - s) * (d + d_next) / 2  # Alg. 2 line 8: trapezoidal rule
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "lms": sample_lms,
    "uni_pc": sample_uni_pc,
    "uni_pc_bh2": sample_uni_pc_bh2,
}

# Samplers that accept `eta` (others reject it as an unexpected keyword).
STOCHASTIC_SAMPLERS = frozenset({"ddim", "euler_a", "dpmpp_2m_sde", "dpmpp_sde"})

# `<name>_karras` is `<name>` with Karras spacing as its default (see names.parse_sampler).
KARRAS_SUFFIX = "_karras"
SAMPLER_NAMES = tuple(sorted([*SAMPLERS, *(n + KARRAS_SUFFIX for n in SAMPLERS)]))
