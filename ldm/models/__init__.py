"""Networks: the U-Net, the KL autoencoder and the text encoders. None of them knows the noise math."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .text import TextEncoder
    from .unet import UNet
    from .vae import AutoencoderKL


def build_models(cfg: ModelConfig) -> tuple[UNet, AutoencoderKL, TextEncoder]:
    """Build the three networks of a latent diffusion model from its config (random weights)."""
    from .text import TextEncoder
    from .unet import UNet
    from .vae import AutoencoderKL

    cfg.validate()
    return UNet(cfg.unet), AutoencoderKL(cfg.vae), TextEncoder(cfg.text_encoder)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per network (and total), built on the meta device so no memory is used."""
    with torch.device("meta"):
        unet, vae, text_encoder = build_models(cfg)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    counts["total"] = sum(counts.values())
    return counts
