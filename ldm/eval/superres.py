"""How well an upscaler upscales: PSNR and sharpness against bicubic on held-out images, and a
picture of low-res / bicubic / the model / the ground truth side by side.

Each held-out image (the ground truth) is downscaled by the model's factor (antialiased bicubic,
`ldm.data.degrade.downscale`), then upscaled back by bicubic interpolation and by the model. PSNR
is the mean over images of 10 log10(1 / MSE) in [0, 1] RGB. Sharpness is the high-frequency
energy ratio: the energy of x - blur(x) (a Gaussian of std `HF_SIGMA` output pixels, so the band
a 4x downscale removes) of the upscale over that of the ground truth; 1 means as much fine detail
as the truth, bicubic gives far less, and a ratio above 1 means invented detail (or noise). Both
are deterministic for a given checkpoint: the images, the seeds and the noise level are fixed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.degrade import downscale, gaussian_blur
from ..images import make_grid, to_pil

HF_SIGMA = 1.5  # output pixels: the blur whose residual is the band a 4x downscale loses


def psnr(x: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of images (B, 3, H, W) in [0, 1] against the truth."""
    mse = (x.float() - truth.float()).square().flatten(1).mean(1).clamp(min=1e-10)
    return 10 * torch.log10(1 / mse)


def high_frequency_energy(x: torch.Tensor, sigma: float = HF_SIGMA) -> torch.Tensor:
    """(B,) mean squared x - blur(x) of images (B, 3, H, W)."""
    blurred = gaussian_blur(x.float(), torch.full((x.shape[0],), sigma))
    return (x.float() - blurred).square().flatten(1).mean(1)


def bicubic_upscale(low: torch.Tensor, factor: int) -> torch.Tensor:
    """Images (B, 3, h, w) in [0, 1] -> (B, 3, h f, w f), bicubic, clipped to [0, 1]."""
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(0, 1)


@torch.inference_mode()
def upscale_comparison(
    pipe, images: torch.Tensor, *, prompts: list[str] | None = None, steps: int | None = None,
    noise_level: int | None = None, seed: int = 0, batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """For ground-truth images (N, 3, H, W) in [-1, 1]: {"truth", "low", "bicubic", "model"}, each
    in [0, 1] (low at 1/factor the size). `pipe` is an upscaler LDMPipeline; image k of the model's
    upscales is seeded `seed + k`, with `prompts[k]` (default: the empty prompt)."""
    f = pipe.vae.downsample_factor
    truth = ((images.float() + 1) / 2).clamp(0, 1).cpu()
    low = ((downscale(images.float().cpu(), f) + 1) / 2).clamp(0, 1)
    prompts = prompts or [""] * len(images)
    model = []
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        model.append(pipe.upscale(low[start:end], prompts[start:end], steps=steps, noise_level=noise_level,
                                  seed=seed + start, output_type="tensor", progress=False))
    return {"truth": truth, "low": low, "bicubic": bicubic_upscale(low, f), "model": torch.cat(model)}


def superres_scores(comparison: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR (mean dB) and the high-frequency energy ratio of bicubic and of the model against the truth."""
    truth = comparison["truth"]
    truth_hf = high_frequency_energy(truth).sum().item()
    scores: dict[str, float] = {"n": len(truth)}
    for name in ("bicubic", "model"):
        x = comparison[name]
        scores[f"psnr_{name}"] = psnr(x, truth).mean().item()
        scores[f"hf_ratio_{name}"] = high_frequency_energy(x).sum().item() / truth_hf if truth_hf > 0 else math.nan
    return scores


def comparison_grid(comparison: dict[str, torch.Tensor], n: int = 4, min_size: int = 128) -> Image.Image:
    """One row per image: the low-resolution input, bicubic, the model, the ground truth, each
    enlarged with nearest neighbours (pixels as they are) to a side of at least `min_size`."""
    h, w = comparison["truth"].shape[-2:]
    zoom = max(1, -(-min_size // min(h, w)))
    tiles = []
    for k in range(min(n, len(comparison["truth"]))):
        for name in ("low", "bicubic", "model", "truth"):
            tiles.append(to_pil(F.interpolate(comparison[name][k : k + 1], size=(h * zoom, w * zoom),
                                              mode="nearest")[0]))
    return make_grid(tiles, cols=4)
