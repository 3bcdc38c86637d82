"""Classifier-free guidance (Ho & Salimans 2021), written once as a wrapper around any VE denoiser."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .objective import convert_prediction


def _check_scale(scale: float) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(
            f"guidance scale must be a finite number >= 0 (got {scale!r}); 7.5 is typical, 1 turns guidance off"
        )


def _check_rescale(rescale: float) -> None:
    if isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1:
        raise ValueError(
            f"guidance rescale must be a number in [0, 1] (got {rescale!r}); 0.7 is typical, 0 turns it off"
        )


def _batch_args(uncond: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
    """Concatenate matching keyword arguments along the batch as [uncond, cond]."""
    if set(uncond) != set(cond):
        raise ValueError(f"cond and uncond must have the same keys (got {sorted(cond)} and {sorted(uncond)})")
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Tensor) and isinstance(u, Tensor):
            if u.shape[1:] != c.shape[1:]:
                raise ValueError(
                    f"cond[{key!r}] has shape {tuple(c.shape)} but uncond[{key!r}] has {tuple(u.shape)}; "
                    "they must match beyond the batch dim (pad the shorter context to the same length)"
                )
            out[key] = torch.cat([u, c])
        elif u is None and c is None:
            out[key] = None
        else:
            raise ValueError(f"cond[{key!r}] and uncond[{key!r}] must both be tensors (or both None)")
    return out


def _per_sample_std(x: Tensor) -> Tensor:
    """(B, ...) -> (B, 1, ..., 1) standard deviation over each sample's elements."""
    return x.flatten(1).std(dim=1).reshape(-1, *([1] * (x.ndim - 1)))


class CFGDenoiser:
    """x0 = u + scale * (c - u), where u and c are the denoiser's x0 for the unconditional and
    conditional arguments, computed in ONE denoiser call on a batch [uncond; cond] (2B rows).
    Every channel is guided.

    Guidance acts on x0. That is the same as guiding eps or v: at fixed (x, sigma) both are affine
    functions of x0 with the same coefficients for u and c, and an affine map commutes with the
    combination (1 - scale) u + scale c, whose weights sum to 1.

    Guidance rescale (Lin et al. 2024 sec. 3.4, eq. 15-16) is not affine (it uses a per-sample std),
    so the space matters. It is applied to the v prediction, the space of the paper's v-prediction
    models: v_rescaled = v_cfg * std(v_cond) / std(v_cfg) per sample, blended as
    rescale * v_rescaled + (1 - rescale) * v_cfg, and converted back to x0. v is derived from x0
    whatever the model predicts. (For eps models diffusers rescales eps instead, which differs.)

    scale == 1 skips the unconditional half: one call on the conditional batch of B rows.
    """

    def __init__(self, denoiser: Callable[..., Tensor], scale: float, rescale: float = 0.0):
        _check_scale(scale)
        _check_rescale(rescale)
        self.denoiser = denoiser
        self.scale = float(scale)
        self.rescale = float(rescale)

    def __call__(self, x: Tensor, sigma: Tensor | float, *, cond: dict[str, Any], uncond: dict[str, Any]) -> Tensor:
        if self.scale == 1:
            return self.denoiser(x, sigma, **cond)
        sigma = torch.as_tensor(sigma, device=x.device)
        sigma_in = sigma if sigma.ndim == 0 else torch.cat([sigma, sigma])
        out = self.denoiser(torch.cat([x, x]), sigma_in, **_batch_args(uncond, cond))
        cdtype = torch.promote_types(x.dtype, torch.float32)
        u, c = out.to(cdtype).chunk(2)  # (B, ...) each
        guided = u + self.scale * (c - u)
        if self.rescale > 0:
            guided = self._rescale(x.to(cdtype), sigma.to(cdtype), guided, c)
        return guided.to(x.dtype)

    def _rescale(self, x: Tensor, sigma: Tensor, guided: Tensor, cond: Tensor) -> Tensor:
        # VE x at sigma -> VP x_t = alpha x, alpha = 1/sqrt(sigma^2 + 1), sigma_t = sigma * alpha
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
        alpha = (sigma.square() + 1).rsqrt()
        sigma_t = sigma * alpha
        x_t = x * alpha.reshape(-1, *([1] * (x.ndim - 1)))
        v_cfg = convert_prediction(guided, x_t, alpha, sigma_t, "x0", "v")
        v_cond = convert_prediction(cond, x_t, alpha, sigma_t, "x0", "v")
        std_cfg, std_cond = _per_sample_std(v_cfg), _per_sample_std(v_cond)
        factor = torch.where(std_cfg > 0, std_cond / std_cfg, torch.ones_like(std_cfg))  # match the cond std
        factor = self.rescale * factor + (1 - self.rescale)  # blend with the plain guided v
        return convert_prediction(v_cfg * factor, x_t, alpha, sigma_t, "v", "x0")
