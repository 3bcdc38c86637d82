"""Samplers: pure functions that integrate from noise to data in the VE parameterisation.

Every sampler has the one signature

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, generator=None, callback=None[, eta]) -> x0

- `denoiser(x, sigma, **extra_args) -> x0` is a VE denoiser (see `Denoiser`, `CFGDenoiser`); it is
  called with sigma of shape (B,).
- `x` is the initial noise already multiplied by sigmas[0]; `sigmas` is descending and ends with 0
  (see `sigmas_from_schedule`). Step sizes are read once as Python floats, so `sigmas` may live on
  any device.
- `callback(i, x, denoised)` is called once per step i = 0 .. len(sigmas) - 2 with the x the step
  starts from and the denoiser's x0 estimate at that point.
- `generator`: None, one torch.Generator, or a list with one generator per batch row; row k's
  noise then comes only from generator k (see `randn_like`).
- Only samplers in STOCHASTIC_SAMPLERS accept `eta`. `ddpm` draws noise too but has no eta.

Notation: sigma is the current noise level, sigma' the next; d = (x - D(x, sigma)) / sigma is the
derivative of the probability-flow ODE dx/dsigma (Karras et al. 2022 eq. 1 with sigma(t) = t).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

Denoise = Callable[..., Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None

__all__ = [
    "randn_like",
    "ancestral_step",
    "sample_ddpm",
    "sample_ddim",
    "sample_euler",
    "sample_euler_a",
    "sample_heun",
    "sample_dpmpp_2m",
    "SAMPLERS",
    "STOCHASTIC_SAMPLERS",
    "SAMPLER_NAMES",
    "resolve_sampler",
]


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def randn_like(x: Tensor, generator: GeneratorArg = None) -> Tensor:
    """Standard normal noise shaped like x, on x's device, in x's dtype.

    With a list of generators (one per row of x), row k is drawn from generator k alone, as
    randn(x.shape[1:]); so row k equals the single-row result for that generator, whatever the
    batch. Noise is drawn on each generator's device in float32 (float64 for float64 x) and then
    moved and cast, so a CPU generator gives the same noise on every device.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=dtype).to(x.dtype)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=dtype).to(x.device, x.dtype)
    gens = list(generator)
    if x.ndim == 0 or len(gens) != x.shape[0]:
        raise ValueError(
            f"got {len(gens)} generators for a batch of {x.shape[0] if x.ndim else 0}; "
            "pass one generator, or exactly one per batch row"
        )
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=dtype).to(x.device) for g in gens]
    return torch.stack(rows).to(x.dtype)


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise
    of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2.

    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is DDIM's sigma_t(eta) (Song et
    al. 2021 eq. 16) rewritten in VE form; eta = 1 gives the DDPM posterior std. Capped at
    sigma_next so that eta > 1 stays well defined.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(0.0, 1 - (sigma_next / sigma) ** 2)))
    return math.sqrt(sigma_next**2 - up**2), up


def _check_eta(eta: float) -> None:
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (got {eta!r}); 0 is deterministic, 1 is ancestral")


def _setup(x: Tensor, sigmas: Tensor | Sequence[float], extra_args: dict | None) -> tuple[list[float], dict]:
    """Validate the shared arguments; return sigmas as Python floats (read once) and extra_args."""
    values = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if len(values) < 2:
        raise ValueError(f"sigmas needs at least 2 values (start and end), got {len(values)}")
    if any(not math.isfinite(s) or s < 0 for s in values):
        raise ValueError("sigmas must be finite and >= 0")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError("sigmas must be strictly decreasing (and end >= 0), e.g. from sigmas_from_schedule")
    if x.ndim == 0:
        raise ValueError("x must have a batch dimension")
    return values, dict(extra_args or {})


def _denoise(denoiser: Denoise, x: Tensor, sigma: float, extra: dict[str, Any]) -> Tensor:
    """Call the denoiser with sigma as a (B,) tensor on x's device (float32, or float64 for float64 x)."""
    s = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    return denoiser(x, s, **extra)


def _euler_to(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_to (Karras et al. 2022 eq. 1).

    x + (sigma_to - sigma) * (x - D) / sigma, written as D + (sigma_to / sigma) (x - D) so that
    sigma_to = 0 returns D exactly.
    """
    return denoised + (sigma_to / sigma) * (x - denoised)


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------


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
    sig, extra = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = _denoise(denoiser, x, sig[i], extra)
        if callback is not None:
            callback(i, x, denoised)
        x = _euler_to(x, denoised, sig[i], sig[i + 1])
    return x


def _ancestral(
    denoiser: Denoise, x: Tensor, sigmas: Tensor, extra_args, generator, callback, eta: float
) -> Tensor:
    """Deterministic Euler step to sigma_down, then fresh noise of std sigma_up (see ancestral_step).

    In VE form this is exactly DDIM (Song et al. 2021 eq. 12): x' = x0 + sigma_down * eps_hat + sigma_up * z
    with eps_hat = (x - x0) / sigma.
    """
    _check_eta(eta)
    sig, extra = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        denoised = _denoise(denoiser, x, sig[i], extra)
        if callback is not None:
            callback(i, x, denoised)
        down, up = ancestral_step(sig[i], sig[i + 1], eta)
        x = _euler_to(x, denoised, sig[i], down)
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
    sig, extra = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, s, extra)
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
    sig, extra = _setup(x, sigmas, extra_args)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        x_euler = _euler_to(x, denoised, s, s_next)
        if s_next == 0:
            x = x_euler
            continue
        d = (x - denoised) / s
        d_next = (x_euler - _denoise(denoiser, x_euler, s_next, extra)) / s_next
        x = x + (s_next - s) * (d + d_next) / 2  # Alg. 2 line 8: trapezoidal rule
    return x


def sample_dpmpp_2m(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), a second-order multistep solver in data prediction.

    With lambda = -log(sigma) (log-SNR / 2 in VE form) and h = lambda' - lambda, the first-order
    update x' = (sigma' / sigma) x + (1 - e^{-h}) D is exact for a constant D; the multistep
    correction replaces D by (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_{i-1} / h_i. The first step
    and the final step to sigma = 0 are first order (the latter returns D exactly).
    """
    sig, extra = _setup(x, sigmas, extra_args)
    prev_denoised: Tensor | None = None
    h_prev = 0.0
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = _denoise(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        if s_next == 0:
            x = denoised
            break
        h = math.log(s / s_next)
        d = denoised
        if prev_denoised is not None and h_prev > 0:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev_denoised  # Alg. 2 line 8
        x = (s_next / s) * x - math.expm1(-h) * d  # Alg. 2 line 9 (VE form)
        prev_denoised, h_prev = denoised, h
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
}

# Samplers that accept `eta` (others reject it as an unexpected keyword).
STOCHASTIC_SAMPLERS = frozenset({"ddim", "euler_a"})

KARRAS_SUFFIX = "_karras"
SAMPLER_NAMES = tuple(sorted([*SAMPLERS, *(n + KARRAS_SUFFIX for n in SAMPLERS)]))


def resolve_sampler(name: str) -> tuple[Callable[..., Tensor], str | None]:
    """Sampler name -> (function, default spacing). `<name>_karras` means `<name>` with Karras
    sigmas, returned as default spacing "karras"; a plain name has no default (None)."""
    if name in SAMPLERS:
        return SAMPLERS[name], None
    if name.endswith(KARRAS_SUFFIX) and name[: -len(KARRAS_SUFFIX)] in SAMPLERS:
        return SAMPLERS[name[: -len(KARRAS_SUFFIX)]], "karras"
    raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLER_NAMES)}")
