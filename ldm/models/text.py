"""Text encoders: prompts -> the (B, 77, D) hidden states the U-Net cross-attends to.

Two CLIP text transformers behind one interface, each with the parameter names of the original
Stable Diffusion checkpoints (`cond_stage_model.` + the state-dict keys of `TextEncoder`):

- `hf_clip` (SD 1.x, OpenAI CLIP ViT-L/14): a `transformers.CLIPTextModel` built from the config
  with random weights, under `transformer.text_model.*`. Padded with `<|endoftext|>`.
- `open_clip` (SD 2.x, OpenCLIP ViT-H/14): `OpenCLIPTextTower`, our own module computing the
  OpenCLIP text transformer, under `model.*`. Padded with 0.

Both are pre-LayerNorm causal transformers. `layer="penultimate"` skips the last block and applies
the final LayerNorm to the block before it (SD 2.x; "clip skip 2" for SD 1.x models).
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from ..errors import ConfigError
from .tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, CLIPTokenizer

# Each kind pads as the tokenizer of its original checkpoints did; the padding tokens come after
# <|endoftext|>, so under the causal mask they never change the states of the prompt's tokens.
PAD_IDS = {"hf_clip": EOS_ID, "open_clip": 0}
# The text width (= the U-Net's context width) of the public families, to name them in errors.
FAMILY_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}

_SHARED_TOKENIZER: CLIPTokenizer | None = None


def _tokenizer() -> CLIPTokenizer:
    # One instance for the process: its word cache is shared by every encoder.
    global _SHARED_TOKENIZER
    if _SHARED_TOKENIZER is None:
        _SHARED_TOKENIZER = CLIPTokenizer()
    return _SHARED_TOKENIZER


# ---------------------------------------------------------------------------------------------
# OpenCLIP text tower
# ---------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation of OpenAI's CLIP (Hendrycks & Gimpel 2016, sec. 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()  # exact (erf) GELU, as OpenCLIP ViT-H/14
    raise ConfigError(f"text_encoder.activation must be 'quick_gelu' or 'gelu' (got {name!r})")


class InProjection(nn.Module):
    """The fused q/k/v projection as a module of its own, holding no weights (they stay on the
    attention layer under OpenCLIP's names), so that forward hooks (LoRA) can reach its output."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, bias)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused input projection.

    Parameters are laid out as in `nn.MultiheadAttention` (`in_proj_weight` stacks the query, key
    and value projections, (3w, w)), which is how OpenCLIP checkpoints store them.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.in_proj = InProjection()
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        qkv = self.in_proj(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3w)
        q, k, v = qkv.view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(q k^T / sqrt(hs)) v
        return self.out_proj(y.transpose(1, 2).reshape(b, t, w))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = _activation(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_size: int, activation: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_size, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_size: int, activation: str):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_size, activation) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        for block in self.resblocks[: len(self.resblocks) - skip_last]:
            x = block(x)
        return x


class OpenCLIPTextTower(nn.Module):
    """The text half of an OpenCLIP model, with its parameter names.

    `text_projection` and `logit_scale` do not take part in conditioning; they are kept so that SD
    2.x checkpoints (which store them) load strictly.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_size, cfg.activation)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, cfg.projection_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """OpenCLIP's text-tower initialisation (Radford et al. 2021 code release): residual output
        projections scaled down by sqrt(2 * layers) so the residual stream's variance stays bounded."""
        w, n = self.cfg.width, self.cfg.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        attn_std = w**-0.5
        proj_std = w**-0.5 * (2 * n) ** -0.5
        fc_std = (2 * w) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=w**-0.5)
        self.logit_scale.fill_(math.log(1 / 0.07))  # temperature 0.07 (CLIP paper, sec. 2.5)

    def forward(self, tokens: torch.Tensor, skip_last: int = 0) -> torch.Tensor:
        """(B, T) ids -> (B, T, width) states after the final LayerNorm, skipping the last
        `skip_last` blocks."""
        t = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:t]  # (B, T, w)
        x = self.transformer(x, skip_last=skip_last)
        return self.ln_final(x)


# ---------------------------------------------------------------------------------------------
# HF CLIP
# ---------------------------------------------------------------------------------------------


class _HFTextModelHolder(nn.Module):
    """Gives a transformers 5 `CLIPTextModel` (which has no `text_model` level) the
    `text_model.*` parameter names of SD 1.x checkpoints and transformers 4."""

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model


def _build_hf_clip(cfg: TextEncoderConfig) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    hf_cfg = CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.context_length,
        hidden_act=cfg.activation,
        projection_dim=cfg.projection_dim,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_IDS["hf_clip"],
        attn_implementation="sdpa",
    )
    model = CLIPTextModel(hf_cfg)
    # transformers 4 nests the transformer under `text_model`; 5 does not.
    return model if hasattr(model, "text_model") else _HFTextModelHolder(model)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Prompts -> (B, context_length, width) conditioning for the U-Net's cross-attention.

    `encoder(["a cat", ""])` tokenizes (warning when a prompt is cut at the context length) and
    encodes on the device of the parameters; a (B, T) id tensor is used as given. A frozen encoder
    (`trainable=False`) has no gradients and stays in eval mode whatever its parent does.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size < VOCAB_SIZE:
            raise ConfigError(
                f"text_encoder.vocab_size must be at least {VOCAB_SIZE}, the size of the CLIP BPE "
                f"vocabulary its tokenizer emits (got {cfg.vocab_size})"
            )
        self.cfg = cfg
        # textual-inversion words -> their ids (from cfg.vocab_size on; see ldm.models.textual_inversion)
        self.added_tokens: dict[str, list[int]] = {}
        if cfg.kind == "hf_clip":
            self.transformer = _build_hf_clip(cfg)
        else:
            self.model = OpenCLIPTextTower(cfg)
        if not cfg.trainable:
            self.requires_grad_(False)
            self.train(False)

    @property
    def context_dim(self) -> int:
        return self.cfg.width

    @property
    def pad_id(self) -> int:
        return PAD_IDS[self.cfg.kind]

    @property
    def tokenizer(self) -> CLIPTokenizer:
        return _tokenizer()

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def token_embedding(self) -> nn.Embedding:
        """The table that maps token ids to the transformer's input vectors."""
        if self.cfg.kind == "open_clip":
            return self.model.token_embedding
        return self.transformer.text_model.embeddings.token_embedding

    def train(self, mode: bool = True) -> TextEncoder:
        # A frozen encoder is always in eval mode (no dropout, fixed behaviour), even when a
        # parent module is put into training.
        return super().train(mode and self.cfg.trainable)

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """(B, context_length) int64 ids on the CPU. Warns once per call, naming each prompt that
        was cut to fit the context length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        tokens, dropped = self.tokenizer(
            list(prompts), self.cfg.context_length, pad_id=self.pad_id, added=self.added_tokens
        )
        cut = [(i, n) for i, n in enumerate(dropped) if n]
        if cut:
            detail = ", ".join(f"prompt {i}: {n} token{'s' if n > 1 else ''} dropped" for i, n in cut)
            warnings.warn(
                f"prompts longer than the text encoder's {self.cfg.context_length}-token limit "
                f"(start and end tokens included) were truncated ({detail})",
                stacklevel=2,
            )
        return tokens

    def forward(self, prompts: str | Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Prompts (or (B, T) token ids, T <= context_length) -> (B, T, width) hidden states."""
        if isinstance(prompts, torch.Tensor):
            tokens = prompts
            if tokens.dim() != 2 or tokens.dtype != torch.long:
                raise ValueError(
                    f"token ids must be a (batch, length) int64 tensor (got {tuple(tokens.shape)} {tokens.dtype})"
                )
            if tokens.shape[1] > self.cfg.context_length:
                raise ValueError(
                    f"token ids are {tokens.shape[1]} long; this encoder takes at most "
                    f"{self.cfg.context_length} (tokenize with encoder.tokenize to truncate)"
                )
        else:
            tokens = self.tokenize(prompts)
        device = next(self.parameters()).device
        tokens = tokens.to(device)
        skip_last = 1 if self.cfg.layer == "penultimate" else 0
        if self.cfg.kind == "open_clip":
            return self.model(tokens, skip_last=skip_last)
        text_model = self.transformer.text_model
        if not skip_last:
            return text_model(input_ids=tokens).last_hidden_state
        # hidden_states holds the embeddings, then each block's output: [-2] is the penultimate block.
        hidden = text_model(input_ids=tokens, output_hidden_states=True).hidden_states[-2]
        return text_model.final_layer_norm(hidden)
