"""What every sampler shares: the argument checks, the denoiser call, the Euler step and the noise.

The sampler contract (one signature for all, see `samplers.py`):

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, generator=None, callback=None[, eta]) -> x0

- `denoiser(x, sigma, **extra_args) -> x0` is a VE denoiser (see `Denoiser`, `CFGDenoiser`); it is
  called with sigma of shape (B,).
- `x` is the initial noise already multiplied by sigmas[0]; `sigmas` is descending and ends with 0
  (see `sigmas_from_schedule`), or with a small sigma > 0, in which case the sampler returns x at
  that noise level. Step sizes are read once as Python floats, so `sigmas` may live on any device.
- `callback(i, x, denoised)` is called once per step i = 0 .. len(sigmas) - 2 with the x the step
  starts from and the denoiser's x0 estimate at that point.
- `generator`: None, one torch.Generator, or a list with one generator per batch row; row k's
  noise then comes only from generator k (see `randn_like`).

Notation: sigma is the current noise level, sigma' the next; d = (x - D(x, sigma)) / sigma is the
derivative of the probability-flow ODE dx/dsigma (Karras et al. 2022 eq. 1 with sigma(t) = t);
lambda = -log(sigma) is half the log-SNR and h = lambda' - lambda = log(sigma / sigma') the step in it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

Denoise = Callable[..., Tensor]
StepCallback = Callable[[int, Tensor, Tensor], None]
GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


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


def check_eta(eta: float) -> None:
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0 (got {eta!r}); 0 is deterministic, 1 is the default noise")


def check_args(x: Tensor, sigmas: Tensor | Sequence[float], extra_args: dict | None) -> tuple[list[float], dict]:
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


def call_denoiser(denoiser: Denoise, x: Tensor, sigma: float, extra: dict[str, Any]) -> Tensor:
    """Call the denoiser with sigma as a (B,) tensor on x's device (float32, or float64 for float64 x)."""
    s = torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    return denoiser(x, s, **extra)


def euler_to(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """One Euler step of the probability-flow ODE from sigma to sigma_to (Karras et al. 2022 eq. 1).

    x + (sigma_to - sigma) * (x - D) / sigma, written as D + (sigma_to / sigma) (x - D) so that
    sigma_to = 0 returns D exactly. In lambda it is also the exact first-order step of DPM-Solver++
    (Lu et al. 2022 eq. 9): x' = (sigma' / sigma) x + (1 - e^{-h}) D.
    """
    return denoised + (sigma_to / sigma) * (x - denoised)
