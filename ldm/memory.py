"""Memory that sampling and decoding will need, estimated from the configs before any work starts.

The estimates count activations only (the weights are already loaded, and the free memory a
device reports excludes them): the skip connections a U-Net keeps, the largest block's working
set, and attention scores where the backend materialises them ("math" everywhere; the "sdpa"
kernels work in blocks, except that on GPUs heads wider than 256 channels, such as the VAE's one
512-channel head, are assumed to fall back to the scores). Measured on a CPU with the x4 layout at
a quarter of its width (float32), the estimates grow with the pixels as the peak memory does
(U-Net 7.4 KiB per latent pixel both measured and estimated, VAE decoder 26 measured vs 32
estimated) and leave out a fixed ~100 MiB of first-call buffers. Their use is to refuse a size that
cannot fit, with advice, instead of failing minutes later.
"""

from __future__ import annotations

import math

import torch

from .config import UNetConfig, VAEConfig

# Working set of a ResBlock in activations of its width (input, float32 norm copies, SiLU, conv
# outputs, residual), and of a transformer block in activations of its width (q, k, v, attention
# output, the 8x-wide GEGLU projection and its product).
RESBLOCK_ACTIVATIONS = 6
TRANSFORMER_ACTIVATIONS = 20
FLASH_MAX_HEAD_DIM = 256  # widest head the fused GPU attention kernels take


def _areas(h: int, w: int, levels: int) -> list[int]:
    """Pixels per level of a network that halves (rounding up) the resolution at each level."""
    out = []
    for _ in range(levels):
        out.append(h * w)
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return out


def _scores(batch: int, heads: int, queries: int, keys: int, head_dim: int, backend: str, cuda: bool) -> int:
    """Bytes of materialised attention scores (float32), 0 where the backend works in blocks."""
    blocked = backend == "xformers" or (backend == "sdpa" and (not cuda or head_dim <= FLASH_MAX_HEAD_DIM))
    return 0 if blocked else batch * heads * queries * keys * 4


def unet_activation_bytes(
    cfg: UNetConfig, batch: int, h: int, w: int, itemsize: int, *, backend: str = "sdpa", cuda: bool = False,
    context_len: int = 77,
) -> int:
    """Peak activation memory of one U-Net call on (batch, C, h, w) latents (no gradients)."""
    levels = len(cfg.channel_mult)
    areas = _areas(h, w, levels)
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    skips = cfg.model_channels * areas[0]  # conv_in
    for level in range(levels):
        skips += cfg.num_res_blocks * chans[level] * areas[level]
        if level + 1 < levels:
            skips += chans[level] * areas[level + 1]  # the downsampler's output
    working, scores = 0, 0
    for level in range(levels):
        wider = chans[min(level + 1, levels - 1)]  # the decoder's first block there takes the level below's width
        working = max(working, (wider + chans[level] + RESBLOCK_ACTIVATIONS * chans[level]) * areas[level])
        if 2**level in cfg.attention_resolutions:
            working = max(working, TRANSFORMER_ACTIVATIONS * chans[level] * areas[level])
            if cfg.num_head_channels is not None:
                heads, dim = chans[level] // cfg.num_head_channels, cfg.num_head_channels
            else:
                heads, dim = cfg.num_heads, chans[level] // cfg.num_heads
            keys = context_len if cfg.self_attention_disabled(level) else areas[level]
            scores = max(scores, _scores(batch, heads, areas[level], keys, dim, backend, cuda))
            scores = max(scores, _scores(batch, heads, areas[level], context_len, dim, backend, cuda))
    return batch * itemsize * (skips + working) + scores


def decoder_activation_bytes(
    cfg: VAEConfig, batch: int, h: int, w: int, itemsize: int, *, backend: str = "sdpa", cuda: bool = False
) -> int:
    """Peak activation memory of decoding (batch, C, h, w) latents to (batch, 3, h f, w f) pixels."""
    levels = len(cfg.ch_mult)
    areas = list(reversed(_areas(h * 2 ** (levels - 1), w * 2 ** (levels - 1), levels)))  # latent size first
    chans = [cfg.ch * m for m in reversed(cfg.ch_mult)]
    working = 0
    for level in range(levels):
        entering = chans[max(level - 1, 0)]  # the upsampled tensor still has the wider level's channels
        working = max(working, (entering + RESBLOCK_ACTIVATIONS * chans[level]) * areas[level])
    mid = 4 * chans[0] * areas[0]  # q, k, v and the output of the mid-block attention
    scores = _scores(batch, 1, areas[0], areas[0], chans[0], backend, cuda)
    return batch * itemsize * max(working, mid) + scores


__all__ = ["unet_activation_bytes", "decoder_activation_bytes"]
