"""Latent blending: inpainting with an ordinary (non-inpainting) U-Net, as a wrapper around any denoiser."""

from __future__ import annotations

from typing import Any, Callable

import torch


class KnownRegionDenoiser:
    """Latent blending for inpainting with an ordinary (non-inpainting) U-Net.

    Wraps a VE denoiser so that, at every call, the kept region (mask 0) of x is replaced by the
    image latents noised to the current sigma, known + sigma * noise, and the x0 estimate there is
    the image latents themselves. The repainted region (mask 1) is the sampler's own. So the U-Net
    always sees the known content at the right noise level around the hole, and each sampler step
    from sigma to sigma' leaves the kept region at known + sigma' * noise (exactly, for the
    deterministic first-order samplers). Wrapping the denoiser rather than editing x in a step
    callback keeps samplers pure, also covers the extra calls inside a step (Heun) and gives
    multistep solvers (DPM-Solver++) a consistent history.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], *, known: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor):
        self.denoiser = denoiser
        self.known = known  # (B, C, h, w) scaled image latents
        self.noise = noise  # (B, C, h, w) the noise the image latents were noised with
        self.repaint = mask > 0.5  # (B, 1, h, w) True where the sampler draws

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x = torch.where(self.repaint, x, self.known + s * self.noise)  # VE forward process q(x | x0) at sigma
        return torch.where(self.repaint, self.denoiser(x, sigma, **kwargs), self.known)
