"""The KL autoencoder of Stable Diffusion: images <-> latents with a diagonal Gaussian posterior.

Parameter names follow the original `AutoencoderKL` (`encoder`, `decoder`, `quant_conv`,
`post_quant_conv`), so an original checkpoint loads with `strict=True` once its
`first_stage_model.` prefix is stripped. `encode`/`decode` do not apply `scaling_factor`;
callers multiply latents by it before diffusion and divide before decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .attention import AttentionLayer, attention
from .layers import Upsample, norm_silu, normalization

_EPS = 1e-6  # GroupNorm eps of the original autoencoder


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over latents, from moments (B, 2C, H, W) = cat([mean, logvar])."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, H, W) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W: 0.5 * sum(mu^2 + var - 1 - logvar)."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))  # (B,)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a residual (1x1 `nin_shortcut` when channels change)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = normalization(in_channels, groups, eps=_EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalization(out_channels, groups, eps=_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return self.nin_shortcut(x) + h


class AttnBlock(AttentionLayer):
    """Single-head self-attention over pixels with 1x1-conv q, k, v and output projection."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = normalization(channels, groups, eps=_EPS)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # (B, 1, H*W, C), contiguous: the fused sdpa kernels need the channels at stride 1 and fall
            # back to materialising the (H*W)^2 scores otherwise (2.2 GiB instead of 0.13 GiB on a
            # CPU for a 128x128 latent, the x4 upscaler's VAE decoding a 512 px image)
            return t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous()

        out = attention(tokens(self.q(y)), tokens(self.k(y)), tokens(self.v(y)), self.backend)
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (the original's asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResnetBlocks, optional attention, and a resampler."""

    def __init__(
        self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        # registered as `downsample` or `upsample`, the original's names
        self.resample_name = name if resample is not None else None
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        if self.resample_name is not None:
            x = getattr(self, self.resample_name)(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _has_attn(cfg: VAEConfig, level: int) -> bool:
    # attn_resolutions holds downsampling factors: 1 = full image resolution, 2 = half, ...
    return 2**level in cfg.attn_resolutions


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        ch = cfg.ch
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.ch_mult):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(ch, cfg.ch * mult, g, cfg.dropout))
                ch = cfg.ch * mult
                if _has_attn(cfg, level):
                    attns.append(AttnBlock(ch, g))
            downsample = Downsample(ch) if level != n - 1 else None
            self.down.append(Level(blocks, attns, downsample, "downsample"))
        self.mid = MidBlock(ch, g, cfg.dropout)
        self.norm_out = normalization(ch, g, eps=_EPS)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h*f, w*f).

    `up[i]` works at the resolution of encoder level i (`up[0]` is the full image resolution), and
    runs from the last index to the first, as in the original.
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        g, n = cfg.norm_groups, len(cfg.ch_mult)
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = MidBlock(ch, g, cfg.dropout)
        levels = []
        for level in reversed(range(n)):
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(ch, cfg.ch * cfg.ch_mult[level], g, cfg.dropout))
                ch = cfg.ch * cfg.ch_mult[level]
                if _has_attn(cfg, level):
                    attns.append(AttnBlock(ch, g))
            upsample = Upsample(ch) if level != 0 else None
            levels.append(Level(blocks, attns, upsample, "upsample"))
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = normalization(ch, g, eps=_EPS)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(norm_silu(self.norm_out, h))


class AutoencoderKL(nn.Module):
    """encode(x) -> DiagonalGaussian over latents; decode(z) -> image. Images are in [-1, 1]."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def scaling_factor(self) -> float:
        """Multiply latents by this before diffusion, divide before `decode`."""
        return self.cfg.scaling_factor

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side."""
        return self.cfg.downsample_factor

    def check_image_size(self, height: int, width: int) -> None:
        """Raise ValueError unless both sides are multiples of the downsampling factor."""
        f = self.downsample_factor
        for name, size in (("height", height), ("width", width)):
            if size % f:
                lower, upper = size // f * f, (size // f + 1) * f
                hint = f"try {lower} or {upper}" if lower > 0 else f"try {upper}"
                raise ValueError(f"image {name} {size} must be a multiple of {f}; {hint}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) with H, W multiples of `downsample_factor`."""
        self.check_image_size(x.shape[-2], x.shape[-1])
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # over (B, embed_dim, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w), unscaled latents -> (B, out_channels, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))
