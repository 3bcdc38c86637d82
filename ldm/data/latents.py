"""Precomputing latents (and, for a frozen text encoder, text embeddings) into shards, so stage-2
training can skip the VAE encoder (and the text encoder) on every step.

A latent sample stores the VAE posterior mean, unscaled (the trainer multiplies by the VAE's
scaling factor), so one cache serves any later change of the scaling factor. Training from
means drops the posterior's sampling noise, which for a KL-regularised VAE with a tiny variance
changes little; encode images on the fly when you want it.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..models.text import TextEncoder
from ..models.vae import AutoencoderKL
from .reader import make_image_text_loader
from .writer import WriteSummary, write_latent_shards


@torch.inference_mode()
def encode_batches(
    loader, vae: AutoencoderKL, text_encoder: TextEncoder | None = None, device: str | torch.device = "cpu"
) -> Iterator[dict]:
    """Latent items for `write_latent_shards` from an image-text loader (one pass)."""
    for batch in loader:
        mean = vae.encode(batch["image"].to(device, next(vae.parameters()).dtype)).mean.float().cpu()
        context = text_encoder(batch["caption"]).float().cpu() if text_encoder is not None else None
        for i, key in enumerate(batch["key"]):
            yield {
                "key": key,
                "latent": mean[i],
                "caption": batch["caption"][i],
                "context": None if context is None else context[i],
            }


def cache_latents(
    urls: str,
    prefix: str,
    vae: AutoencoderKL,
    *,
    resolution: int,
    batch_size: int = 16,
    num_workers: int = 2,
    text_encoder: TextEncoder | None = None,
    device: str | torch.device = "cpu",
    max_count: int = 10_000,
    overwrite: bool = False,
    progress: bool = True,
) -> WriteSummary:
    """Encode every sample of the image shards at `urls` once into latent shards at `prefix`."""
    loader = make_image_text_loader(
        urls, resolution=resolution, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=0, world_size=1, rank=0
    )
    vae = vae.to(device).eval()
    if text_encoder is not None:
        text_encoder = text_encoder.to(device).eval()
    items = encode_batches(loader, vae, text_encoder, device)
    return write_latent_shards(items, prefix, max_count=max_count, progress=progress, overwrite=overwrite)
