"""Speed switches for inference: memory format, fused layers, torch.compile, CUDA graphs, VAE tiling.

Every switch computes what the plain float32 path computes (tests compare them on the CPU) and
none changes a state-dict key, so checkpoints save and load exactly as before. `optimize_unet` and
`optimize_vae` put the given module in the state a `SpeedConfig` describes (switches that are off
are undone: fused layers split again, weights back to the contiguous format) and return a wrapper
to call in its place. Save the module you passed in, not the wrapper.

    pipe.optimize(channels_last=True, fuse_qkv=True, fused_norm_act=True, compile="max-autotune-no-cudagraphs")

torch.compile and CUDA graphs specialise on shapes. The wrappers turn timesteps into a float32
(B,) tensor before the network sees them, and compile with `dynamic=False`: the U-Net compiles
once per input shape and never again across prompts, seeds or sampling steps. A new image size or
batch size compiles (or captures) once more.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import COMPILE_MODES, UNetConfig, VAEConfig
from .models.attention import BasicTransformerBlock, CrossAttention
from .models.layers import GroupNorm32
from .models.unet import UNet
from .models.vae import AutoencoderKL, Decoder, DiagonalGaussian, Encoder, ResnetBlock

# Compile modes that capture CUDA graphs themselves: no room for `cuda_graphs` on top.
_GRAPHING_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class SpeedConfig:
    """Which speed-ups to use; the defaults are the plain path. All are safe to combine except
    `cuda_graphs` with a compile mode that already captures graphs."""

    channels_last: bool = False  # model weights + activations in torch.channels_last (NHWC convs on GPUs)
    fuse_qkv: bool = False  # U-Net self-attention q/k/v as one Linear, cross-attention k/v as one
    fused_norm_act: bool = False  # GroupNorm + SiLU as one op, in the input's dtype where that is exact enough
    compile: str | None = None  # None or a torch.compile mode (COMPILE_MODES); dynamic=False, once per shape
    cuda_graphs: bool = False  # capture the U-Net call per input shape and replay it (CUDA only)
    vae_tiling: bool = False  # encode/decode large images in overlapping tiles, blended linearly
    vae_slicing: bool = True  # encode/decode one image of the batch at a time
    vae_tile_size: int = 64  # tile side in latents (x the VAE factor in pixels: 512 for SD)
    vae_tile_overlap: int = 16  # latents shared by neighbouring tiles (blend width)
    fixed_batch: int = 0  # > 0: every U-Net call runs exactly this many rows (padded or split; see FastUNet)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"speed switch {f.name} must be True or False (got {value!r})")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(
                f"unknown compile mode {self.compile!r}; valid modes: {', '.join(COMPILE_MODES)} (or None for eager)"
            )
        if self.cuda_graphs and self.compile in _GRAPHING_MODES:
            raise ValueError(
                f"compile={self.compile!r} already captures CUDA graphs; set cuda_graphs=False, or use "
                "compile='default' or 'max-autotune-no-cudagraphs' with cuda_graphs=True"
            )
        for name in ("vae_tile_size", "vae_tile_overlap", "fixed_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer (got {value!r})")
        if self.fixed_batch < 0:
            raise ValueError(f"fixed_batch must be >= 0 (got {self.fixed_batch}); 0 turns it off")
        if self.vae_tile_size < 1 or not 0 <= self.vae_tile_overlap < self.vae_tile_size:
            raise ValueError(
                f"need vae_tile_size >= 1 and 0 <= vae_tile_overlap < vae_tile_size (got {self.vae_tile_size} "
                f"and {self.vae_tile_overlap}); 64 and 16 are typical"
            )


def speed_config(config: SpeedConfig | None = None, **switches: Any) -> SpeedConfig:
    """A checked SpeedConfig from a config or from switches by name (not both); unnamed ones are off."""
    if config is not None and switches:
        raise ValueError("pass a SpeedConfig or switches by name, not both")
    if config is None:
        names = [f.name for f in dataclasses.fields(SpeedConfig)]
        for key in switches:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise TypeError(f"unknown speed switch {key!r}; {hint}valid switches: {', '.join(names)}")
        config = SpeedConfig(**switches)
    config.validate()
    return config


# ---------------------------------------------------------------------------------------------
# In-place module changes (reversible, state-dict keys unchanged)
# ---------------------------------------------------------------------------------------------


def set_memory_format(model: nn.Module, channels_last: bool) -> None:
    """Store every 4-D weight of `model` channels_last (NHWC) or back in the contiguous format."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def fuse_qkv(model: nn.Module, enabled: bool = True) -> None:
    """Fuse (or split again) the attention projections of every transformer block in `model`:
    q/k/v of self-attention, k/v of cross-attention (see `CrossAttention.fuse_projections`)."""
    for m in model.modules():
        if isinstance(m, BasicTransformerBlock):
            if enabled:
                m.attn1.fuse_projections(self_attention=not m.disable_self_attn)
                m.attn2.fuse_projections(self_attention=False)
        elif isinstance(m, CrossAttention) and not enabled:
            m.unfuse_projections()


def fuse_norm_act(model: nn.Module, enabled: bool = True) -> None:
    """Make every GroupNorm that a SiLU follows apply the SiLU itself (`GroupNorm32.fuse_silu`).

    In `nn.Sequential`s (the U-Net) the SiLU module after the norm becomes an `nn.Identity` (and a
    SiLU again when disabled); the VAE applies its SiLUs through `norm_silu`, which sees the flag.
    """
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            for i in range(len(m) - 1):
                if isinstance(m[i], GroupNorm32):
                    act = m[i + 1]
                    if enabled and isinstance(act, nn.SiLU):
                        m[i].fuse_silu, m[i + 1] = True, nn.Identity()
                    elif not enabled and m[i].fuse_silu and isinstance(act, nn.Identity):
                        m[i].fuse_silu, m[i + 1] = False, nn.SiLU()
        elif isinstance(m, ResnetBlock):
            m.norm1.fuse_silu = m.norm2.fuse_silu = enabled
        elif isinstance(m, (Encoder, Decoder)):
            m.norm_out.fuse_silu = enabled


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(
            f"cuda_graphs needs the model and its inputs on a CUDA device (got {device}); "
            "move them to a GPU first (pipe.to('cuda')) or set cuda_graphs=False"
        )


class CUDAGraphRunner:
    """Calls `fn(*tensors)` by replaying a CUDA graph captured at the inputs' shapes (inference only).

    The first call at a new key (shapes, dtypes, strides, device, and where `module`'s weights live)
    copies the inputs into static buffers, runs `fn` `warmup` times on a side stream (so lazy
    initialisation and autotuning stay out of the graph), then captures one call. Every call copies
    its inputs into the buffers, replays the graph and returns a copy of the static output, so a
    result stays valid after the next replay. A new key captures again and frees the old graph.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], module: nn.Module, warmup: int = 2) -> None:
        self.fn = fn
        self.module = module
        self.warmup = warmup
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: list[torch.Tensor] = []
        self._output: torch.Tensor | None = None

    @torch.inference_mode()
    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        _require_cuda(args[0].device)
        weights = next(self.module.parameters())
        key = tuple((a.shape, a.dtype, a.stride(), a.device) for a in args) + (weights.data_ptr(), weights.dtype)
        if key != self._key:
            self._capture(args)
            self._key = key
        for buffer, a in zip(self._inputs, args):
            buffer.copy_(a)
        self._graph.replay()
        return self._output.clone()

    def _capture(self, args: tuple[torch.Tensor, ...]) -> None:
        self._graph = self._output = None  # free the previous graph's memory before capturing anew
        self._inputs = [a.clone() for a in args]  # clone keeps the strides (channels_last stays so)
        stream = torch.cuda.Stream(device=args[0].device)
        stream.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn(*self._inputs)
        torch.cuda.current_stream(args[0].device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._output = self.fn(*self._inputs)
        self._graph = graph


# ---------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------


def _compiled(fn: Callable[..., Any], mode: str | None) -> Callable[..., Any]:
    """`fn` under torch.compile in `mode` with static shapes (one compile per shape), or `fn`."""
    return torch.compile(fn, mode=mode, dynamic=False) if mode is not None else fn


class FastUNet(nn.Module):
    """Calls a U-Net as a SpeedConfig says; same signature and result as `UNet.forward`.

    forward(x (B, C, H, W), t (B,) or scalar, context (B, L, D)[, y (B,)]) -> (B, out_channels, H, W).
    Timesteps are turned into a float32 (B,) tensor on x's device first, so that a compiled
    forward or a captured graph sees a tensor input, never a Python number to specialise on.

    With `fixed_batch` = R, the U-Net only ever sees batches of exactly R rows: B rows run as
    ceil(B / R) calls, the last one padded with zero rows that are dropped from the result. CPU
    and GPU libraries pick their matmul and convolution kernels by shape (on a CPU, oneDNN
    convolves one image differently from two, and MKL multiplies 1 or 2 rows differently from 3
    or more), so the same row can round differently in batches of different sizes. At one fixed
    shape every row goes through the same kernels, and a row's result depends only on its own
    inputs, not on which or how many rows share the call. It also means one compile and one CUDA
    graph capture per image size. The cost is the padded rows' compute when a call is not full.
    """

    def __init__(self, unet: UNet, speed: SpeedConfig) -> None:
        super().__init__()
        self.unet = unet
        self.speed = speed
        # a bound method, not a module: the U-Net's weights are registered once, under `unet.`;
        # `__call__` rather than `forward`, so hooks registered on the U-Net still run
        self._forward = _compiled(unet.__call__, speed.compile)
        self._graph = CUDAGraphRunner(self._forward, unet) if speed.cuda_graphs else None

    @property
    def cfg(self) -> UNetConfig:
        return self.unet.cfg

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0]).contiguous()  # (B,), a plain tensor: the same guards every call
        rows = self.speed.fixed_batch
        if rows and x.shape[0] != rows:
            return self._fixed_batches(x, t, context, y, rows)
        return self._call(x, t, context, y)

    def _fixed_batches(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                       rows: int) -> torch.Tensor:
        """The U-Net over x in calls of exactly `rows` rows, the last padded with zeros."""
        out = []
        for start in range(0, x.shape[0], rows):
            parts = [a[start : start + rows] for a in (x, t, context) + (() if y is None else (y,))]
            n = parts[0].shape[0]
            if n < rows:
                parts = [torch.cat([a, a.new_zeros((rows - n, *a.shape[1:]))]) for a in parts]
            out.append(self._call(*parts)[:n])
        return torch.cat(out)

    def _call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
              ) -> torch.Tensor:
        if self.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        args = (x, t, context) if y is None else (x, t, context, y)  # y: class labels (upscalers)
        if self._graph is not None:
            return self._graph(*args)
        if self.speed.compile in _GRAPHING_MODES and x.is_cuda:
            # torch.compile's own CUDA graphs reuse their output memory on the next replay: start
            # a new replay step per call and hand out a copy, so earlier results stay valid
            torch.compiler.cudagraph_mark_step_begin()
            return self._forward(*args).clone()
        return self._forward(*args)


def optimize_unet(unet: UNet, cfg: SpeedConfig) -> FastUNet:
    """Set `unet` to the state `cfg` describes (in place) and return the module to call instead.

    The returned module has the U-Net's signature, unet(x, t, context). With `cfg.compile` the
    forward is compiled with `dynamic=False` on the first call at each input shape; pass
    timesteps as tensors of one shape (the wrapper does) so steps and prompts never recompile.
    With `cfg.cuda_graphs` the U-Net must already be on a CUDA device.
    """
    cfg.validate()
    if cfg.cuda_graphs:
        _require_cuda(next(unet.parameters()).device)
    set_memory_format(unet, cfg.channels_last)
    fuse_qkv(unet, cfg.fuse_qkv)
    fuse_norm_act(unet, cfg.fused_norm_act)
    return FastUNet(unet, cfg)


# ---------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Starts of `tile`-long windows `stride` apart covering [0, size), the last flush with the end."""
    return [*range(0, size - tile, stride), size - tile]


def _blend_weights(n: int, ramp: int, first: bool, last: bool, device: torch.device) -> torch.Tensor:
    """(n,) weights of one tile along one axis: rising linearly over `ramp` samples from each side
    that another tile overlaps, 1 elsewhere. Neighbours overlapping by `ramp` sum to exactly 1."""
    pos = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    w = torch.ones(n, device=device)
    if ramp > 0 and not first:
        w = torch.minimum(w, pos / ramp)
    if ramp > 0 and not last:
        w = torch.minimum(w, (n - pos) / ramp)
    return w


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int) -> torch.Tensor:
    """fn(x) computed on overlapping `tile` x `tile` windows of x (B, C, H, W), blended linearly.

    `fn` maps (B, C, h, w) to (B, C', h * s, w * s) for one scale s (the VAE factor when decoding,
    its inverse when encoding: then tile starts must land on multiples of the factor). Windows are
    `tile - overlap` apart, the last flush with the edge; sides no larger than `tile` are taken
    whole. Each output pixel is the weighted mean of the tiles covering it, weights ramping
    linearly across each overlap. When x fits in one tile this is exactly fn(x).
    """
    height, width = x.shape[-2:]
    if height <= tile and width <= tile:
        return fn(x)
    th, tw = min(tile, height), min(tile, width)
    rows, cols = _tile_starts(height, th, tile - overlap), _tile_starts(width, tw, tile - overlap)
    out = weight = None
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            y = fn(x[..., top : top + th, left : left + tw])  # (B, C', oh, ow)
            oh, ow = y.shape[-2:]
            if (top * oh) % th or (left * ow) % tw:
                raise ValueError(f"tile start ({top}, {left}) does not map to a whole output pixel; "
                                 "use tile sizes and overlaps that are multiples of the VAE factor")
            if out is None:
                out = y.new_zeros((*y.shape[:2], height * oh // th, width * ow // tw), dtype=torch.float32)
                weight = y.new_zeros(out.shape[-2:], dtype=torch.float32)
            wy = _blend_weights(oh, overlap * oh // th, i == 0, i == len(rows) - 1, y.device)
            wx = _blend_weights(ow, overlap * ow // tw, j == 0, j == len(cols) - 1, y.device)
            w = wy[:, None] * wx[None, :]  # (oh, ow)
            oy, ox = top * oh // th, left * ow // tw
            out[..., oy : oy + oh, ox : ox + ow] += y.float() * w
            weight[oy : oy + oh, ox : ox + ow] += w
    return (out / weight).to(y.dtype)


class FastVAE(nn.Module):
    """encode/decode of an AutoencoderKL as a SpeedConfig says; the same results as the VAE's own
    (tiling blends tile seams, so it is close to, not equal to, the untiled result).

    Slicing runs the batch one image at a time; tiling splits each image into overlapping tiles of
    `vae_tile_size` latents (x the VAE factor in pixels); compile compiles the encoder and decoder.
    """

    def __init__(self, vae: AutoencoderKL, speed: SpeedConfig) -> None:
        super().__init__()
        self.vae = vae
        self.speed = speed
        self._encoder = _compiled(vae.encoder.__call__, speed.compile)
        self._decoder = _compiled(vae.decoder.__call__, speed.compile)

    @property
    def cfg(self) -> VAEConfig:
        return self.vae.cfg

    @property
    def scaling_factor(self) -> float:
        return self.vae.scaling_factor

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        self.vae.check_image_size(x.shape[-2], x.shape[-1])
        f = self.downsample_factor
        return DiagonalGaussian(self._batched(self._moments, x, f))  # moments (B, 2 * embed_dim, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w), unscaled latents -> (B, out_channels, h*f, w*f)."""
        return self._batched(self._pixels, z, 1)

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.quant_conv(self._encoder(self._memory_format(x)))

    def _pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self._decoder(self.vae.post_quant_conv(self._memory_format(z)))

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.speed.channels_last else x

    def _batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, unit: int) -> torch.Tensor:
        """fn over x, per image when slicing, per tile when tiling; `unit` input pixels per latent."""
        s = self.speed

        def run(part: torch.Tensor) -> torch.Tensor:
            if s.vae_tiling:
                return tiled_apply(fn, part, s.vae_tile_size * unit, s.vae_tile_overlap * unit)
            return fn(part)

        if s.vae_slicing and x.shape[0] > 1:
            return torch.cat([run(part) for part in x.split(1)])
        return run(x)


def optimize_vae(vae: AutoencoderKL, cfg: SpeedConfig) -> FastVAE:
    """Set `vae` to the state `cfg` describes (in place) and return the module whose `encode` and
    `decode` to call instead. Uses channels_last, fused_norm_act, compile (encoder and decoder,
    `dynamic=False`), vae_slicing and vae_tiling; fuse_qkv and cuda_graphs apply to the U-Net only."""
    cfg.validate()
    set_memory_format(vae, cfg.channels_last)
    fuse_norm_act(vae, cfg.fused_norm_act)
    return FastVAE(vae, cfg)
