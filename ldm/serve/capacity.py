"""How many pictures fit in one U-Net call: activation memory per picture against the free memory.

Inference keeps every encoder block's output alive until the decoder consumes it (the skips), and
the heaviest block needs a few tensors of its own size on top; attention scores add
heads x tokens^2 per layer when the backend materialises them (`math`; SDPA and xformers do not).
The VAE decodes one picture at a time, so its peak is paid once per batch, not per picture.
These counts follow from the configs, so the limit is known before anything runs; the factors
below leave room for allocator slack and the kernels' workspaces.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import UNetConfig, VAEConfig

WORKING_TENSORS = 6  # tensors of the largest activation's size alive at once inside one block
MEMORY_FRACTION = 0.8  # of the free memory; the rest is left to the allocator and other processes


def unet_activation_elements(cfg: UNetConfig, latent_h: int, latent_w: int, *, scores: bool = False,
                             context_tokens: int = 77) -> int:
    """Elements of activation memory one U-Net row needs at a latent size (B = 1)."""
    mc, levels = cfg.model_channels, len(cfg.channel_mult)
    sizes = [(-(-latent_h // 2**i)) * (-(-latent_w // 2**i)) for i in range(levels)]  # ceil, as Downsample
    skips = mc * sizes[0]  # the input conv
    largest = 0
    for level, mult in enumerate(cfg.channel_mult):
        ch = mc * mult
        skips += cfg.num_res_blocks * ch * sizes[level]
        if level != levels - 1:
            skips += ch * sizes[level + 1]
        # decoder blocks at this level take [h, skip] concatenated: up to twice the channels
        largest = max(largest, 2 * ch * sizes[level])
    attention = 0
    if scores:
        for level, mult in enumerate(cfg.channel_mult):
            if 2**level in cfg.attention_resolutions:
                ch = mc * mult
                heads = cfg.num_heads or ch // cfg.num_head_channels
                attention = max(attention, heads * sizes[level] * (sizes[level] + context_tokens))
    return skips + WORKING_TENSORS * largest + attention


def vae_decode_elements(cfg: VAEConfig, height: int, width: int) -> int:
    """Elements of activation memory decoding one picture needs (the upsampled levels dominate)."""
    largest = 0
    for level in range(len(cfg.ch_mult)):
        pixels = (height // 2**level) * (width // 2**level)
        incoming = cfg.ch_mult[level + 1] if level + 1 < len(cfg.ch_mult) else cfg.ch_mult[level]
        largest = max(largest, cfg.ch * max(cfg.ch_mult[level], incoming) * pixels)
    return WORKING_TENSORS * largest


def free_memory(device: torch.device) -> int:
    """Bytes free for activations on `device`: CUDA's free memory, else the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def images_per_call(pipe, height: int, width: int, cap: int, *, free: int | None = None,
                    rows_per_image: int = 2) -> int:
    """Pictures per U-Net call (1..cap) that fit at height x width on `pipe`'s device.

    `rows_per_image` is 2 under classifier-free guidance (cond and uncond rows). `free` overrides
    the measured free memory (bytes)."""
    f = pipe.vae.downsample_factor
    elem = torch.finfo(pipe.dtype).bits // 8
    backend = next((m.backend for m in pipe.unet.modules() if hasattr(m, "backend")), "sdpa")
    context = getattr(pipe.text_encoder.cfg, "context_length", 77)
    per_image = rows_per_image * elem * unet_activation_elements(
        pipe.unet.cfg, height // f, width // f, scores=backend == "math", context_tokens=context)
    decode = elem * vae_decode_elements(pipe.vae.cfg, height, width)
    budget = MEMORY_FRACTION * (free_memory(pipe.device) if free is None else free) - decode
    return max(1, min(cap, int(budget // per_image)))


def largest_size(pipe, cap: int, *, step: int = 64, top: int = 2048, free: int | None = None) -> int:
    """The largest square side (a multiple of `step`, at most `top`) at which `cap` pictures fit
    in one U-Net call on `pipe`'s device; `step` when none does."""
    free = free_memory(pipe.device) if free is None else free
    for side in range(top, step - 1, -step):
        if images_per_call(pipe, side, side, cap, free=free) == cap:
            return side
    return step
