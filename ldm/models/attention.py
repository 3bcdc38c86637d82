"""Attention backends and the U-Net's SpatialTransformer.

Every attention layer calls `attention(q, k, v, backend)` and keeps its backend in a `backend`
attribute; `set_attention_backend(model, name)` switches a whole model at once.

  - "sdpa": torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels on GPU)
  - "xformers": xformers.ops.memory_efficient_attention (optional dependency)
  - "math": softmax(Q K^T / sqrt(d)) V written out in float32, the reference for tests
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import maybe_checkpoint, normalization, zero_module

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
DEFAULT_ATTENTION_BACKEND = "sdpa"


def _unknown_backend(name: str) -> ValueError:
    return ValueError(f"unknown attention backend {name!r}; valid backends: {', '.join(ATTENTION_BACKENDS)}")


def _xformers_ops():
    try:
        import xformers.ops
    except ImportError as e:
        raise ImportError(
            "the 'xformers' attention backend needs the xformers package: `pip install xformers` "
            "(or `pip install ldm[xformers]`), or use the default backend 'sdpa'"
        ) from e
    return xformers.ops


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = DEFAULT_ATTENTION_BACKEND
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, L, d) tensors; k and v may have a different length."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "xformers":
        ops = _xformers_ops()
        # xformers wants (B, L, heads, d)
        out = ops.memory_efficient_attention(
            q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        )
        return out.transpose(1, 2)
    if backend == "math":
        scale = q.shape[-1] ** -0.5
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, heads, Lq, Lk)
        return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # (B, heads, Lq, d)
    raise _unknown_backend(backend)


class AttentionLayer(nn.Module):
    """Base of every module that calls `attention()`: holds the backend it uses."""

    def __init__(self) -> None:
        super().__init__()
        self.backend = DEFAULT_ATTENTION_BACKEND


def set_attention_backend(module: nn.Module, name: str) -> None:
    """Make every attention layer inside `module` use backend `name` (one of ATTENTION_BACKENDS)."""
    if name not in ATTENTION_BACKENDS:
        raise _unknown_backend(name)
    if name == "xformers":
        _xformers_ops()  # fail now, with the install hint, rather than at the first forward
    for m in module.modules():
        if isinstance(m, AttentionLayer):
            m.backend = name


class CrossAttention(AttentionLayer):
    """Multi-head attention from x (B, N, query_dim) to context (B, L, context_dim); self-attention
    when no context is given.

    `fuse_projections` replaces to_q/to_k/to_v by one Linear `to_qkv` (self-attention) or to_k/to_v
    by `to_kv` (cross-attention): one matmul instead of three. The state dict keeps the separate
    `to_q`/`to_k`/`to_v` keys either way (state-dict hooks split and join the fused weight), so
    checkpoints are unaffected; `unfuse_projections` restores the separate layers.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fused: str | None = None  # None, "qkv" or "kv": which projections `to_qkv` / `to_kv` hold
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.register_state_dict_post_hook(_split_fused_weight)
        self.register_load_state_dict_pre_hook(_join_fused_weight)

    def fuse_projections(self, self_attention: bool) -> None:
        """Compute q, k, v (`self_attention`: then the layer must be called without context) or
        k, v from the context with one Linear whose weight stacks theirs along the output dim."""
        if self.fused is not None:
            return
        names = FUSED_NAMES["qkv" if self_attention else "kv"]
        layers = [getattr(self, n) for n in names]
        if self_attention and self.to_q.in_features != self.to_k.in_features:
            raise ValueError(
                f"cannot fuse q/k/v of a cross-attention layer (query dim {self.to_q.in_features}, context dim "
                f"{self.to_k.in_features}); fuse it with self_attention=False (k/v only)"
            )
        weight = torch.cat([layer.weight for layer in layers])  # (len(names) * inner, in_features)
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        fused.weight = nn.Parameter(weight.detach(), requires_grad=layers[0].weight.requires_grad)
        for n in names:
            delattr(self, n)
        self.fused = "qkv" if self_attention else "kv"
        setattr(self, "to_" + self.fused, fused)
        self._modules["to_out"] = self._modules.pop("to_out")  # keep to_out last, as built

    def unfuse_projections(self) -> None:
        """Undo `fuse_projections`: separate to_q, to_k, to_v layers holding the same weights."""
        if self.fused is None:
            return
        fused = getattr(self, "to_" + self.fused)
        delattr(self, "to_" + self.fused)
        names = FUSED_NAMES[self.fused]
        for n, w in zip(names, fused.weight.detach().chunk(len(names))):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            layer.weight = nn.Parameter(w.clone(), requires_grad=fused.weight.requires_grad)
            setattr(self, n, layer)
        self._modules["to_out"] = self._modules.pop("to_out")  # to_q, to_k, to_v, to_out: the built order
        self.fused = None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused == "qkv":
            if context is not None:
                raise ValueError("this attention layer has fused q/k/v (self-attention only) but got a context")
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # (B, N, inner) each
        else:
            context = x if context is None else context
            q = self.to_q(x)
            if self.fused == "kv":
                k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, L, inner) each
            else:
                k, v = self.to_k(context), self.to_v(context)
        out = attention(self._split_heads(q), self._split_heads(k), self._split_heads(v), self.backend)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)  # (B, N, heads * d)
        return self.to_out(out)


# the projections a fused layer holds, in the order of its rows
FUSED_NAMES = {"qkv": ("to_q", "to_k", "to_v"), "kv": ("to_k", "to_v")}


def _split_fused_weight(module: CrossAttention, state: dict[str, torch.Tensor], prefix: str, _meta: dict) -> None:
    """state_dict hook: write a fused weight as the separate to_q/to_k/to_v weights, in their order."""
    if module.fused is None:
        return
    own = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
    fused = own.pop(f"{prefix}to_{module.fused}.weight")
    names = FUSED_NAMES[module.fused]
    split = {f"{prefix}{n}.weight": w for n, w in zip(names, fused.chunk(len(names)))}
    for name in ("to_q", "to_k", "to_v"):
        key = f"{prefix}{name}.weight"
        state[key] = split[key] if key in split else own.pop(key)
    state.update(own)  # to_out.*


def _join_fused_weight(module: CrossAttention, state: dict[str, torch.Tensor], prefix: str, *_args) -> None:
    """load_state_dict pre-hook: stack separate to_q/to_k/to_v weights into the fused one."""
    if module.fused is None:
        return
    keys = [f"{prefix}{n}.weight" for n in FUSED_NAMES[module.fused]]
    if all(k in state for k in keys):
        state[f"{prefix}to_{module.fused}.weight"] = torch.cat([state.pop(k) for k in keys])


class GEGLU(nn.Module):
    """Linear to twice the width, then value * GELU(gate)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the context, and feed-forward, each residual.

    `disable_self_attn` makes the first attention attend to the context as well (the original
    `disable_self_attn`, used by the x4 upscaler at high resolution where self-attention is costly).
    """

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0,
        disable_self_attn: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else dim, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # x: (B, N, dim), context: (B, L, context_dim)
        return maybe_checkpoint(self._forward, x, context, enabled=self.gradient_checkpointing and self.training)

    def _forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class FourierPositions(nn.Module):
    """Where each pixel of a feature map is, as a learned projection of Fourier features of its
    coordinates: (H, W) -> (H * W, dim), to be added to the pixel tokens.

    Coordinates are pixel centres scaled to [0, 1] on each axis, so a pixel means the same place in
    the image at every feature-map size; the features are sin and cos of pi * k * coordinate for
    k = 1..freqs on both axes (4 * freqs numbers). The projection starts at zero: a fresh layer
    leaves the model as it would be without it, and learns from the first step.
    """

    def __init__(self, freqs: int, dim: int) -> None:
        super().__init__()
        self.freqs = freqs
        self.proj = zero_module(nn.Linear(4 * freqs, dim, bias=False))

    def forward(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        k = torch.arange(1, self.freqs + 1, device=device, dtype=torch.float32) * torch.pi  # (F,)
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        ay = (ys[:, None] * k)[:, None, :].expand(h, w, -1)  # (H, W, F)
        ax = (xs[:, None] * k)[None, :, :].expand(h, w, -1)
        feats = torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=-1).reshape(h * w, -1)  # (H*W, 4F)
        return self.proj(feats.to(self.proj.weight.dtype)).to(dtype)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on a context by cross-attention.

    GroupNorm, project in (1x1 conv as in SD 1.x, or Linear as in SD 2.x), `depth` transformer
    blocks, zero-initialised projection out, residual around the whole. With `position_freqs` > 0
    the projected tokens also get `FourierPositions`, so attention (to the text above all) can tell
    one part of the image from another; without it, only the convolutions' zero padding says where
    a pixel is (the original Stable Diffusion layout).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        groups: int,
        use_linear: bool,
        dropout: float = 0.0,
        disable_self_attn: bool = False,
        position_freqs: int = 0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.pos_embed = FourierPositions(position_freqs, inner) if position_freqs > 0 else None
        self.norm = normalization(channels, groups, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = zero_module(nn.Linear(inner, channels))
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = zero_module(nn.Conv2d(inner, channels, 1))
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn) for _ in range(depth)]
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)  # (B, inner, H, W)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, inner or C)
        if self.use_linear:
            x = self.proj_in(x)  # (B, H*W, inner)
        if self.pos_embed is not None:
            x = x + self.pos_embed(h, w, x.device, x.dtype)  # (H*W, inner) broadcast over B
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)  # (B, H*W, C)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)  # (B, C, H, W)
        return x + residual
