"""What the tests share, importable by name because pytest puts tests/ on sys.path: paths, the
small test models' config overrides, `randomize` and `random_lora`. Fixtures built from them are in conftest.py."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm import LDMPipeline
from ldm.convert.lora import layers
from ldm.models.lora import LoRANetwork

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SD_TINY = CONFIGS / "sd_tiny.yaml"  # the README's CPU model (its settings are tuned for quality and may change)
TINY = ROOT / "tests" / "configs" / "tiny64.yaml"  # the plumbing tests' tiny model
# Even smaller than the tiny test model, so every test here runs in well under a second of sampling.
FAST = ["model.unet.model_channels=32", "model.text_encoder.width=64", "model.unet.context_dim=64",
        "model.text_encoder.heads=2", "model.text_encoder.projection_dim=64", "model.vae.ch=16",
        "sample.height=32", "sample.width=32", "sample.steps=3",
        "model.unet.text_layout_grid=0"]  # the SD layout, so every format can be written
INPAINTING = [*FAST, "model.unet.in_channels=9"]
# The tiny test model changed only where the SD 1.x conventions differ from it (heads, proj, norm groups).
TINY_SD1 = [
    "model.unet.num_heads=8",
    "model.unet.num_head_channels=null",
    "model.unet.use_linear_in_transformer=false",
    "model.unet.attention_resolutions=[2,1]",
    "model.vae.norm_groups=32",
    "model.vae.scaling_factor=0.18215",
    "model.text_encoder.heads=2",
    "model.text_encoder.intermediate_size=512",
    "model.text_encoder.trainable=false",
]


def randomize(target: LDMPipeline | nn.Module, seed: int = 1, scale: float = 0.02):
    """Give zero-initialised parameters N(0, scale^2) values so outputs depend on every weight
    (a pipeline's networks draw in turn from one generator). Returns `target`."""
    modules = target.modules.values() if isinstance(target, LDMPipeline) else [target]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for param in m.parameters():
                if param.abs().max() == 0:
                    param.copy_(torch.randn(param.shape, generator=g) * scale)
    return target


def random_lora(pipe, seed: int, rank: int = 4) -> LoRANetwork:
    """A LoRA over every attention projection and resnet conv of U-Net and text encoder."""
    index = layers(pipe.model_config.unet, pipe.model_config.text_encoder)
    targets = sorted({layer.target for layer in index.values()}, key=str)
    net = LoRANetwork.create(pipe.modules, targets, rank=rank, alpha=rank / 2,
                             generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for adapter in net.adapters:
            adapter.up.copy_(torch.randn(adapter.up.shape, generator=g) * 0.1)
    return net
