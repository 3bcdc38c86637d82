"""Building blocks of the U-Net: timestep embedding, ResBlock, Downsample, Upsample, norms, zero-init.

Module and parameter names follow the original Stable Diffusion U-Net (`in_layers`, `emb_layers`,
`out_layers`, `skip_connection`, `op`, `conv`) so original checkpoints load without renaming.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, in float32.

    emb[:, i] = cos(t * f_i) and emb[:, half + i] = sin(t * f_i) with f_i = max_period^(-i / half),
    the layout of the original U-Net (cos first). An odd `dim` gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype; returns the input's dtype.

    With `fuse_silu` set (the speed switch `fused_norm_act`) it returns SiLU(GroupNorm(x)) through
    `group_norm_silu`, and the SiLU that followed it in the model is dropped (see `norm_silu`).
    """

    fuse_silu: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_silu:
            return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def group_norm_silu(
    x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """SiLU(GroupNorm(x)) for x (B, C, ...), returned in x's dtype; under torch.compile one kernel.

    Normalises in x's own dtype where the group_norm kernel accumulates its statistics in float32
    (every dtype on CUDA, float32 and bfloat16 on the CPU), which skips the float32 copies of x and
    of the result; elsewhere (float16 on the CPU) it upcasts like GroupNorm32.
    """
    if x.is_cuda or x.dtype in (torch.float32, torch.bfloat16):
        return F.silu(F.group_norm(x, groups, weight, bias, eps))
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.silu(F.group_norm(x.float(), groups, weight, bias, eps)).to(x.dtype)


def norm_silu(norm: GroupNorm32, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)), for models that apply the SiLU functionally; `norm` applies it itself when fused."""
    y = norm(x)
    return y if norm.fuse_silu else F.silu(y)


def normalization(channels: int, groups: int, eps: float = 1e-5) -> GroupNorm32:
    """The GroupNorm used throughout the models (eps 1e-5 in U-Net ResBlocks, 1e-6 elsewhere)."""
    return GroupNorm32(groups, channels, eps=eps)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (for residual output layers)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def maybe_checkpoint(fn: Callable[..., torch.Tensor], *args: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Run `fn(*args)`, through activation checkpointing when `enabled` and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv, residual."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, groups: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(in_channels, groups),
            nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if in_channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(in_channels, out_channels, 1)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W), emb: (B, emb_channels) -> (B, C_out, H, W)
        return maybe_checkpoint(self._forward, x, emb, enabled=self.gradient_checkpointing and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (padding 1: odd sides round up)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, ceil(H/2), ceil(W/2))


class Upsample(nn.Module):
    """Nearest-neighbour resize, then a 3x3 conv.

    `size` is the target (H, W); by default the resolution doubles. The U-Net passes the size of
    the skip tensor this output is concatenated with, so latents of any size round-trip exactly.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            size = (2 * x.shape[-2], 2 * x.shape[-1])
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
