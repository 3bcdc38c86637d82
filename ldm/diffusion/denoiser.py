"""The bridge between a network that predicts eps / v / x0 at a timestep and the samplers, which
want a VE denoiser D(x, sigma) -> x0.

With x = x0 + sigma * eps (VE) and x_t = alpha_t x0 + sigma_t eps (VP), the network input is
x_t = x / sqrt(sigma^2 + 1), with alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma / sqrt(sigma^2 + 1),
at the (fractional) timestep whose schedule sigma equals `sigma`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .objective import PREDICTION_TYPES, convert_prediction
from .schedule import Schedule


class Denoiser:
    """Wraps `model(x_t, t, **extra_args) -> prediction` as `D(x, sigma, **extra_args) -> x0` (VE).

    Holds no parameters of its own (it is not an nn.Module): move and save the model itself.
    """

    def __init__(self, model: Callable[..., Tensor], schedule: Schedule, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction type {prediction_type!r}; valid types: {', '.join(PREDICTION_TYPES)}"
            )
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra_args: Any) -> Tensor:
        """x: (B, ...) in VE space; sigma: scalar or (B,). Returns x0 in x's dtype."""
        # Coefficients in float32 (float64 if x is float64), whatever the model's dtype.
        cdtype = torch.promote_types(x.dtype, torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(cdtype)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or of shape ({x.shape[0]},) (got {tuple(sigma.shape)})")
        alpha = (sigma.square() + 1).rsqrt()  # (B,) VP alpha_t
        sigma_vp = sigma * alpha  # (B,) VP sigma_t
        x_t = x.to(cdtype) * alpha.reshape(-1, *([1] * (x.ndim - 1)))
        t = self.schedule.sigma_to_t(sigma)  # (B,) fractional timesteps
        out = self.model(x_t.to(x.dtype), t, **extra_args)
        x0 = convert_prediction(out.to(cdtype), x_t, alpha, sigma_vp, self.prediction_type, "x0")
        return x0.to(x.dtype)
