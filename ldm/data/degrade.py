"""Low-resolution inputs for upscaler training, made on the fly from the high-resolution images.

Every function takes and returns float images (B, 3, H, W) in [-1, 1], the training batches' range.
`make_low_res` is what a trainer calls: an optional Gaussian blur (optics, resampling in the wild),
the downscale by the upscaling factor, an optional JPEG round trip (what images on the web went
through), as `DegradeConfig` says. Its randomness comes from one generator, drawn in a fixed order
whatever the options, so a (seed, step) pair always makes the same inputs.
"""

from __future__ import annotations

import io
import math

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..config import RESAMPLE_MODES, DegradeConfig


def check_divisible(height: int, width: int, factor: int, what: str = "image") -> None:
    """Both sides multiples of `factor`, or an error naming the nearest sizes that are."""
    for name, v in (("height", height), ("width", width)):
        if v < factor or v % factor:
            lo, hi = max(factor, v - v % factor), v - v % factor + factor
            raise ValueError(
                f"{what} {name} must be a multiple of the upscaling factor {factor} (got {v}); "
                f"crop or resize it to {lo}" + (f" or {hi}" if hi != lo else "")
            )


def downscale(images: Tensor, factor: int, resample: str = "bicubic") -> Tensor:
    """(B, C, H, W) -> (B, C, H / factor, W / factor). "bicubic" and "bilinear" are antialiased
    (the filter widened by the factor, as PIL does); "area" is the mean of each factor x factor
    block. Bicubic overshoot is clipped to [-1, 1]."""
    if resample not in RESAMPLE_MODES:
        raise ValueError(f"resample must be one of {RESAMPLE_MODES} (got {resample!r})")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be an integer >= 1 (got {factor!r})")
    h, w = images.shape[-2:]
    check_divisible(h, w, factor)
    if factor == 1:
        return images
    if resample == "area":
        return F.avg_pool2d(images, factor)
    out = F.interpolate(images, size=(h // factor, w // factor), mode=resample, antialias=True, align_corners=False)
    return out.clamp(-1, 1)


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur image k of (B, C, H, W) with a Gaussian of std `sigma[k]` pixels (sigma 0: unchanged).

    Separable kernels of radius ceil(3 max sigma), normalised to sum 1, reflect padding at the
    borders (so a constant image stays constant)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    b, c, h, w = images.shape
    if sigma.shape[0] != b or (sigma < 0).any():
        raise ValueError(f"sigma must hold one value >= 0 per image ({b}); got {sigma.tolist()}")
    radius = math.ceil(3 * float(sigma.max()))
    if radius == 0:
        return images
    radius = min(radius, h - 1, w - 1)  # reflect padding needs a pad below the side length
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp(min=1e-6)[:, None]
    kernel = torch.exp(-0.5 * (x[None] / s) ** 2)  # (B, k)
    kernel = torch.where(sigma[:, None] > 0, kernel, (x[None] == 0).float())  # sigma 0: a delta
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0).to(images)  # (B * C, k)
    flat = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)  # along H
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)  # along W
    return flat.reshape(b, c, h, w)


def jpeg_round_trip(images: Tensor, quality: list[int] | Tensor) -> Tensor:
    """Each image of (B, 3, H, W) through an 8-bit JPEG at its own `quality` (1..100) and back."""
    quality = [int(q) for q in torch.as_tensor(quality).reshape(-1)]
    if len(quality) != images.shape[0] or not all(1 <= q <= 100 for q in quality):
        raise ValueError(f"quality must hold one value in 1..100 per image ({images.shape[0]}); got {quality}")
    out = []
    for image, q in zip(images, quality):
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB").save(buffer, format="JPEG", quality=q)
        decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        back = torch.frombuffer(bytearray(decoded.tobytes()), dtype=torch.uint8).reshape(*array.shape[1:], 3)
        out.append(back.permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out).to(images)


def make_low_res(images: Tensor, factor: int, cfg: DegradeConfig, generator: torch.Generator) -> Tensor:
    """The upscaler's low-resolution inputs for a batch of high-resolution images (B, 3, H, W) in
    [-1, 1]: (B, 3, H / factor, W / factor) in [-1, 1].

    From `generator`, always in this order and always all of them (so other randomness of a step
    does not depend on the options): B uniforms deciding the blur, B blur stds, B uniforms deciding
    the JPEG, B JPEG qualities."""
    cfg.validate()
    b = images.shape[0]
    blurred = torch.rand(b, generator=generator) < cfg.blur_prob
    lo, hi = cfg.blur_sigma
    sigma = lo + (hi - lo) * torch.rand(b, generator=generator)
    compressed = torch.rand(b, generator=generator) < cfg.jpeg_prob
    quality = torch.randint(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1, (b,), generator=generator)
    x = images
    if blurred.any():
        x = gaussian_blur(x, torch.where(blurred, sigma, torch.zeros_like(sigma)))
    x = downscale(x, factor, cfg.resample)
    if compressed.any():
        idx = compressed.nonzero().flatten()
        x = x.clone()
        x[idx] = jpeg_round_trip(x[idx], quality[idx])
    return x


__all__ = ["check_divisible", "downscale", "gaussian_blur", "jpeg_round_trip", "make_low_res"]
