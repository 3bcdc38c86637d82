"""What the network predicts (eps, v or x0), the exact conversions between them, and the training loss.

With x_t = alpha * x0 + sigma * eps and v = alpha * eps - sigma * x0 (Salimans & Ho 2022), any one
prediction together with x_t determines the other two. The formulas below solve that 2x2 linear
system exactly for any (alpha, sigma), so they hold for VP schedules (alpha^2 + sigma^2 = 1) and
need no such assumption. alpha and sigma may be Python floats, 0-d tensors or per-sample (B,)
tensors; (B,) is broadcast over the remaining dims of x_t.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import PREDICTION_TYPES
from .schedule import Schedule


def _check_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction_type!r}; valid types: {', '.join(PREDICTION_TYPES)}")


def _bcast(c: float | Tensor, like: Tensor) -> Tensor | float:
    """(B,) coefficients -> (B, 1, ..., 1) so they broadcast over `like` (B, ...)."""
    if not isinstance(c, Tensor):
        return c
    if c.ndim == 1 and like.ndim > 1:
        return c.reshape(-1, *([1] * (like.ndim - 1)))
    return c


def _x0_eps(pred: Tensor, x_t: Tensor, alpha, sigma, src: str) -> tuple[Tensor, Tensor]:
    """Solve x_t = a x0 + s eps together with the prediction `pred` of kind `src` for (x0, eps)."""
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if src == "eps":
        return (x_t - s * pred) / a, pred
    if src == "x0":
        return pred, (x_t - a * pred) / s
    # src == "v": [a s; -s a] [x0; eps] = [x_t; v], determinant a^2 + s^2
    norm = a * a + s * s
    return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm


def convert_prediction(pred: Tensor, x_t: Tensor, alpha, sigma, src: str, dst: str) -> Tensor:
    """Convert a network output of kind `src` ("eps" | "v" | "x0") at x_t into kind `dst`."""
    _check_type(src)
    _check_type(dst)
    if src == dst:
        return pred
    a, s = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if dst == "x0" and src == "eps":
        return (x_t - s * pred) / a
    if dst == "eps" and src == "x0":
        return (x_t - a * pred) / s
    x0, eps = _x0_eps(pred, x_t, alpha, sigma, src)
    if dst == "x0":
        return x0
    if dst == "eps":
        return eps
    return a * eps - s * x0  # v = alpha * eps - sigma * x0


def pred_to_x0(pred: Tensor, x_t: Tensor, alpha, sigma, prediction_type: str) -> Tensor:
    return convert_prediction(pred, x_t, alpha, sigma, prediction_type, "x0")


def pred_to_eps(pred: Tensor, x_t: Tensor, alpha, sigma, prediction_type: str) -> Tensor:
    return convert_prediction(pred, x_t, alpha, sigma, prediction_type, "eps")


def target_for(prediction_type: str, x0: Tensor, noise: Tensor, alpha, sigma) -> Tensor:
    """The regression target for a network predicting `prediction_type`."""
    _check_type(prediction_type)
    if prediction_type == "eps":
        return noise
    if prediction_type == "x0":
        return x0
    return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0  # v


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, schedule: Schedule) -> Tensor:
    """x_t = alpha_t x0 + sigma_t eps for integer timesteps t of shape (B,), in x0's dtype."""
    alpha, sigma = schedule.alpha_sigma(t, dtype=torch.promote_types(x0.dtype, torch.float32))
    return (_bcast(alpha, x0) * x0 + _bcast(sigma, x0) * noise).to(x0.dtype)


def sample_timesteps(n: int, num_timesteps: int, shift: float, generator: torch.Generator) -> Tensor:
    """n training timesteps in [0, num_timesteps), on the CPU.

    shift = 1 draws them uniformly. Otherwise u ~ U(0, 1) is mapped to shift * u / (1 + (shift - 1) u)
    (the resolution shift of SD3, applied to t / num_timesteps): shift > 1 spends more of the
    training at high noise, where a sample's layout and colours are decided, and shift 3 puts half
    the timesteps above 3/4 of the schedule.
    """
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0 (got {shift})")
    if shift == 1:
        return torch.randint(0, num_timesteps, (n,), generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    u = shift * u / (1 + (shift - 1) * u)
    return (u * num_timesteps).long().clamp(max=num_timesteps - 1)


def snr(t: Tensor, schedule: Schedule, dtype: torch.dtype = torch.float32) -> Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 for integer timesteps t (0 at a zero-SNR step)."""
    ac = schedule.alphas_cumprod
    return (ac / (1 - ac)).to(dtype=dtype).to(t.device)[t]


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: str, floor: float = 0.0) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), written for each target.

    The weight is min(SNR, gamma) on the x0 loss; an eps loss equals SNR times the x0 loss and a v
    loss (SNR + 1) times it, hence min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).

    `floor` > 0 raises the x0 weight to max(min(SNR, gamma), floor). Without it the steps of high
    noise weigh almost nothing (their x0 weight is SNR: 0.02 at t = 800 of SD's schedule, exactly 0
    at a zero-SNR step), and those are the steps where a sample's layout is decided from the text
    alone; floor 1 is the "truncated SNR" weighting of Salimans & Ho 2022 capped at gamma.
    """
    _check_type(prediction_type)
    if floor < 0 or floor > gamma:
        raise ValueError(f"the Min-SNR floor must be in [0, gamma={gamma}] (got {floor})")
    clipped = snr_t.clamp(min=floor, max=gamma)  # SNR >= 0: floor 0 is plain Min-SNR
    if prediction_type == "x0":
        return clipped
    if prediction_type == "v":
        return clipped / (snr_t + 1)
    if floor > 0:
        raise ValueError(
            f"a Min-SNR floor ({floor}) is for v or x0 prediction: an eps loss already weighs the high-noise "
            "steps fully (its weight there is 1), and a floor would make it infinite at zero SNR; set it to 0"
        )
    # min(snr, g) / snr = min(1, g / snr); written so that snr = 0 (zero terminal SNR) gives 1, not nan
    return (gamma / snr_t).clamp(max=1)


def diffusion_loss(
    model_output: Tensor,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    schedule: Schedule,
    prediction_type: str,
    min_snr_gamma: float | None = None,
    reduction: str = "mean",
    min_snr_floor: float = 0.0,
) -> Tensor:
    """MSE between the network output and its target, optionally Min-SNR-gamma weighted (with
    `min_snr_floor`, see `min_snr_weight`).

    The squared error is averaged over each sample's elements, weighted per sample, then averaged
    over the batch (`reduction="mean"`, a scalar) or returned per sample (`reduction="none"`, (B,)).
    Computed in at least float32 whatever the model's dtype.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none' (got {reduction!r})")
    if min_snr_gamma is not None and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0 or None (got {min_snr_gamma!r}); 5 is typical")
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    alpha, sigma = schedule.alpha_sigma(t, dtype=dtype)
    target = target_for(prediction_type, x0.to(dtype), noise.to(dtype), alpha, sigma)
    per_sample = (model_output.to(dtype) - target).square().flatten(1).mean(1)  # (B,)
    if min_snr_gamma is not None:
        weight = min_snr_weight(snr(t, schedule, dtype), min_snr_gamma, prediction_type, min_snr_floor)
        per_sample = per_sample * weight
    return per_sample.mean() if reduction == "mean" else per_sample
