"""Stochastic DPM-Solver++ samplers: DPM-Solver++(2M) SDE and DPM-Solver++ SDE.

Both solve the reverse-time SDE rather than the probability-flow ODE: part of each step's noise is
removed deterministically and fresh noise is added, which corrects errors of earlier steps; `eta`
scales the fresh noise (1, the default, is the SDE; 0 turns both back into ODE solvers).

Noise is a Brownian motion W(sigma) sampled exactly at the noise levels a step visits: the
increment over [sigma', sigma] is sqrt(sigma - sigma') * z with z ~ N(0, 1) drawn from the
generator, independently per interval, and a step's noise is the increment over its interval
divided by the square root of its length. For DPM-Solver++(2M) SDE that is one plain normal draw
per step. DPM-Solver++ SDE visits a midpoint inside the step, so its two noises overlap: the
second contains the first, as in k-diffusion's and diffusers' Brownian-tree noise. Their trees
give the same distribution but a different realisation (and need torchsde); ours draws per image
from the image's own generator, so a batch equals single runs.
"""

from __future__ import annotations

import math

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
from .samplers_multistep import dpmpp_2m

__all__ = ["sample_dpmpp_2m_sde", "sample_dpmpp_sde"]


def sample_dpmpp_2m_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022 sec. 4.3; k-diffusion's midpoint form): `dpmpp_2m` with
    noise. eta = 1 is the SDE solver (diffusers' "sde-dpmsolver++"), eta = 0 is exactly
    DPM-Solver++(2M); see `samplers_multistep.dpmpp_2m` for the update."""
    check_eta(eta)
    return dpmpp_2m(denoiser, x, sigmas, extra_args, generator, callback, eta)


def sample_dpmpp_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++ SDE: a two-stage (second-order) step through the lambda midpoint
    sigma_m = sqrt(sigma sigma') (k-diffusion's sample_dpmpp_sde with r = 1/2).

    Stage 1: an ancestral step sigma -> sigma_m with D(x, sigma) gives x_m; stage 2 restarts from x
    and takes the ancestral step sigma -> sigma' with D(x_m, sigma_m). Each ancestral step is the
    exact first-order DPM-Solver++ step to sigma_down plus noise of std sigma_up (`ancestral_step`);
    the two noises are the Brownian increments over [sigma_m, sigma] and [sigma', sigma], so they
    are correlated. Two denoiser calls per step; the step to sigma = 0 is one Euler step (returns D).
    """
    check_eta(eta)
    sig, extra = check_args(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = call_denoiser(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        if s_next == 0:
            x = denoised
            break
        s_mid = math.sqrt(s * s_next)  # lambda midpoint
        noise_mid = noise_next = 0.0
        if eta > 0:  # W(s_mid) - W(s) and W(s_next) - W(s), each over the root of its interval
            z1, z2 = randn_like(x, generator), randn_like(x, generator)
            noise_mid = z1
            noise_next = (math.sqrt(s - s_mid) * z1 + math.sqrt(s_mid - s_next) * z2) / math.sqrt(s - s_next)
        down, up = ancestral_step(s, s_mid, eta)
        x_mid = euler_to(x, denoised, s, down) + up * noise_mid
        denoised_mid = call_denoiser(denoiser, x_mid, s_mid, extra)
        down, up = ancestral_step(s, s_next, eta)
        x = euler_to(x, denoised_mid, s, down) + up * noise_next
    return x
