"""Upscaling in tiles, and the memory check before it: how many bytes an upscale needs, which tile
size fits, a denoiser that runs on overlapping tiles, and decoding in tiles.

Tiling (`tile_size`, in low-resolution pixels = latents) runs every denoiser call on overlapping
tiles and blends their x0 estimates with weights ramping linearly across each overlap, so the
sampler itself sees one whole image (MultiDiffusion, Bar-Tal et al. 2023) and no seam can form
between tiles; decoding runs in the same tiles, blended the same way (`ldm.speed.tiled_apply`).
Only the tile's activations are ever in memory, so the output size is bounded by the memory for
the image itself, not by the networks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..atomic import format_bytes
from ..devices import available_memory
from ..memory import decoder_activation_bytes, unet_activation_bytes
from ..models.attention import AttentionLayer
from ..speed import tiled_apply

# `pipe` below is an LDMPipeline (not imported here: the pipeline imports this module).

DEFAULT_TILE_OVERLAP = 16  # latents shared by neighbouring tiles (x the factor in output pixels)
TILE_SIZES = (256, 192, 128, 96, 64, 48, 32, 24, 16)  # what "auto" tries, largest first
MEMORY_HEADROOM = 0.9  # use at most this share of the free memory


class TiledDenoiser:
    """Runs a (guided) denoiser on overlapping tiles of x and blends the x0 estimates.

    Spatial conditioning (tensors of cond/uncond with x's height and width: the upscaler's
    low-resolution image) is cut into the same tiles; everything else (text, noise level) is
    passed whole. With x no larger than one tile this is exactly the wrapped denoiser.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], tile: int, overlap: int):
        self.denoiser, self.tile, self.overlap = denoiser, tile, overlap

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *, cond: dict[str, Any], uncond: dict[str, Any]):
        groups = {"cond": cond, "uncond": uncond}
        spatial = [(which, key) for which, args in groups.items() for key, v in args.items()
                   if isinstance(v, torch.Tensor) and v.ndim == 4 and v.shape[-2:] == x.shape[-2:]]
        tensors = [x] + [groups[which][key].to(x.dtype) for which, key in spatial]
        sizes = [t.shape[1] for t in tensors]

        def run(window: torch.Tensor) -> torch.Tensor:  # (B, C + spatial channels, h, w) -> x0 (B, C, h, w)
            parts = window.split(sizes, dim=1)
            args = {which: dict(group) for which, group in groups.items()}
            for (which, key), part in zip(spatial, parts[1:]):
                args[which][key] = part
            return self.denoiser(parts[0], sigma, **args)

        return tiled_apply(run, torch.cat(tensors, dim=1), self.tile, self.overlap)


def estimate_upscale_memory(pipe, batch: int, height: int, width: int, tile: int | None) -> int:
    """Bytes of activations an upscale of `batch` images of height x width (low-resolution pixels)
    needs at its peak, untiled or in `tile`-sized tiles."""
    h, w = (min(tile, height), min(tile, width)) if tile else (height, width)
    cuda = pipe.device.type == "cuda"
    itemsize = torch.finfo(pipe.dtype).bits // 8
    backend = next((m.backend for m in pipe.unet.modules() if isinstance(m, AttentionLayer)), "sdpa")
    unet = unet_activation_bytes(pipe.unet.cfg, 2 * batch, h, w, itemsize, backend=backend, cuda=cuda,
                                 context_len=pipe.text_encoder.cfg.context_length)
    decode_batch = 1 if pipe.speed.vae_slicing else batch
    decoder = decoder_activation_bytes(pipe.vae.cfg, decode_batch, h, w, itemsize, backend=backend, cuda=cuda)
    f = pipe.vae.downsample_factor
    images = batch * (pipe.vae.cfg.embed_dim + 3 + 3 * f * f) * height * width * 4  # latents, input, output (fp32)
    return max(unet, decoder) + images


def _overlap(tile: int, tile_overlap: int | None) -> int:
    """The given overlap, or by default 16 latents (a quarter of tiles smaller than 64), checked."""
    overlap = min(DEFAULT_TILE_OVERLAP, tile // 4) if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < tile // 2:
        raise ValueError(
            f"tile_overlap must be an integer in [0, tile_size / 2) = [0, {tile // 2}) (got {overlap!r}); "
            f"{DEFAULT_TILE_OVERLAP} is typical"
        )
    return overlap


def check_tiles(tile_size: int | str | None, tile_overlap: int | None) -> None:
    if tile_size is None and tile_overlap is not None:
        raise ValueError("tile_overlap needs tile_size (a size in low-resolution pixels, or 'auto')")
    if tile_size is None or tile_size == "auto":
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 8:
        raise ValueError(f"tile_size must be an integer >= 8 (low-resolution pixels), 'auto' or None (got {tile_size!r})")
    _overlap(tile_size, tile_overlap)


def plan_tiles(pipe, batch: int, height: int, width: int, tile_size: int | str | None,
               tile_overlap: int | None = None) -> tuple[int | None, int]:
    """(tile size, overlap) to use (tile None: untiled), or an error when the activations cannot fit.

    A given size is used as it is; None upscales whole if the activations fit in the device's free
    memory and is otherwise refused naming the largest tile that fits; "auto" takes that tile."""
    check_tiles(tile_size, tile_overlap)
    if isinstance(tile_size, int):
        return tile_size, _overlap(tile_size, tile_overlap)
    free = available_memory(pipe.device)

    def fits(tile: int | None) -> bool:
        return free is None or estimate_upscale_memory(pipe, batch, height, width, tile) <= MEMORY_HEADROOM * free

    if fits(None):
        return None, 0
    smaller = [t for t in TILE_SIZES if t < max(height, width) and _fits_overlap(t, tile_overlap) and fits(t)]
    if tile_size == "auto" and smaller:
        return smaller[0], _overlap(smaller[0], tile_overlap)
    f = pipe.vae.downsample_factor
    need = format_bytes(estimate_upscale_memory(pipe, batch, height, width, None))
    advice = (f"pass tile_size={smaller[0]} (tools/upscale.py --tile {smaller[0]}) or tile_size='auto' to upscale "
              "in overlapping tiles" if smaller else "even the smallest tiles do not fit: free memory, or upscale "
              "fewer images at once")
    raise ValueError(
        f"upscaling {batch} image(s) of {width}x{height} to {width * f}x{height * f} needs about {need} of "
        f"activations, more than the {format_bytes(free)} free on {pipe.device}; {advice}"
    )


def _fits_overlap(tile: int, tile_overlap: int | None) -> bool:
    return tile_overlap is None or tile_overlap < tile // 2


def decode_tiled(pipe, latents: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """Scaled latents (B, C, h, w) -> images (B, 3, h f, w f) in [0, 1] (float32, CPU), decoded in
    overlapping tiles of `tile` latents blended linearly, one image at a time."""
    z = (latents / pipe.vae.scaling_factor).to(pipe.dtype)
    out = [tiled_apply(pipe.fast_vae.decode, part, tile, overlap) for part in z.split(1)]
    return ((torch.cat(out).float() + 1) / 2).clamp(0, 1).cpu()
