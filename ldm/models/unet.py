"""The Stable Diffusion U-Net: maps (noisy latent, timestep, text context) to a prediction.

The module tree is that of the original `openaimodel.UNetModel` (`time_embed`, `input_blocks`,
`middle_block`, `output_blocks`, `out`), so an original checkpoint loads with `strict=True` once
its `model.diffusion_model.` prefix is stripped. The network knows nothing of noise schedules.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import UNetConfig
from .attention import BasicTransformerBlock, SpatialTransformer
from .layers import Downsample, ResBlock, Upsample, normalization, timestep_embedding, zero_module


class UNetBlock(nn.Sequential):
    """A run of layers, each fed what it needs: ResBlocks the timestep embedding, transformers the
    context, upsamplers the size of the skip tensor that comes next."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor,
        out_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """Cross-attention U-Net of any size, from tiny test models to SD 1.x / 2.x."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        mc = cfg.model_channels
        emb_ch = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        if cfg.num_classes is not None:  # class labels (the upscaler's noise level), added to the time embedding
            self.label_emb = nn.Embedding(cfg.num_classes, emb_ch)

        # Encoder: the input conv, then per level num_res_blocks ResBlocks (+ transformer), then a
        # Downsample except at the last level. Every block's output is a skip for the decoder.
        self.input_blocks = nn.ModuleList([UNetBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        if cfg.text_layout_grid:  # the mean text state -> a coarse map added to the input conv's output
            self.layout = zero_module(nn.Linear(cfg.context_dim, mc * cfg.text_layout_grid**2))
        skip_channels = [mc]
        ch, factor = mc, 1
        last_level = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                if factor in cfg.attention_resolutions:
                    layers.append(self._transformer(ch, level))
                self.input_blocks.append(UNetBlock(*layers))
                skip_channels.append(ch)
            if level != last_level:
                self.input_blocks.append(UNetBlock(Downsample(ch)))
                skip_channels.append(ch)
                factor *= 2

        self.middle_block = UNetBlock(self._resblock(ch, ch), self._transformer(ch, None), self._resblock(ch, ch))

        # Decoder: per level num_res_blocks + 1 ResBlocks, each taking one skip, then an Upsample
        # except at the top level.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [self._resblock(ch + skip_channels.pop(), mult * mc)]
                ch = mult * mc
                if factor in cfg.attention_resolutions:
                    layers.append(self._transformer(ch, level))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    factor //= 2
                self.output_blocks.append(UNetBlock(*layers))

        self.out = nn.Sequential(
            normalization(ch, cfg.norm_groups),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1)),
        )
        self.set_gradient_checkpointing(cfg.gradient_checkpointing)

    def _resblock(self, in_ch: int, out_ch: int) -> ResBlock:
        cfg = self.cfg
        return ResBlock(in_ch, out_ch, 4 * cfg.model_channels, cfg.norm_groups, cfg.dropout)

    def _transformer(self, ch: int, level: int | None) -> SpatialTransformer:
        """The transformer of a level (None: the middle block, which always keeps self-attention)."""
        cfg = self.cfg
        if cfg.num_head_channels is not None:
            heads, dim_head = ch // cfg.num_head_channels, cfg.num_head_channels
        else:
            heads, dim_head = cfg.num_heads, ch // cfg.num_heads
        return SpatialTransformer(
            ch,
            heads,
            dim_head,
            cfg.transformer_depth,
            cfg.context_dim,
            cfg.norm_groups,
            cfg.use_linear_in_transformer,
            cfg.dropout,
            disable_self_attn=level is not None and cfg.self_attention_disabled(level),
            position_freqs=cfg.position_embedding_freqs,
        )

    def _layout(self, context: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, model_channels, *size): the text's coarse layout map, bilinearly resized to the latent."""
        g = self.cfg.text_layout_grid
        grid = self.layout(context.mean(dim=1)).view(context.shape[0], self.cfg.model_channels, g, g)
        return nn.functional.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute ResBlock and transformer activations in the backward pass (training only)."""
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.gradient_checkpointing = enabled

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, in_channels, H, W) latents of any H, W; t: timesteps, (B,) or a scalar (float
        allowed); context: (B, L, context_dim); y: (B,) integer class labels, given exactly when the
        U-Net has `num_classes` (the upscaler's noise level). Returns (B, out_channels, H, W) in x's dtype."""
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"timesteps must be a scalar or have shape ({b},) to match x; got {tuple(t.shape)}")
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(dtype))  # (B, 4 * mc)
        if (y is None) != (self.cfg.num_classes is None):
            raise ValueError(
                "this U-Net takes class labels y (B,) (an upscaler's noise level)" if y is None
                else "this U-Net has no class embedding (unet.num_classes is null); do not pass y"
            )
        if y is not None:
            if y.shape != (b,):
                raise ValueError(f"class labels y must have shape ({b},) to match x; got {tuple(y.shape)}")
            emb = emb + self.label_emb(y.to(x.device, torch.long)).to(dtype)  # (B, 4 * mc)
        context = context.to(dtype)

        h = x.to(dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0 and self.cfg.text_layout_grid:
                h = h + self._layout(context, h.shape[-2:])
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an Upsample ending this block resizes to the skip the next block concatenates
            out_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, out_size)
        return self.out(h).to(x.dtype)
