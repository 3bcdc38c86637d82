"""Key layouts in circulation mapped onto the standard original one, before detection and loading.

Files saved by different tools and versions name a few tensors differently; each difference here is
renamed or reshaped (never guessed), and reported:

- SD 1.x text encoders saved from transformers before its CLIP model gained the `text_model.`
  level: `cond_stage_model.transformer.embeddings.*`, `.encoder.*`, `.final_layer_norm.*` instead of
  `cond_stage_model.transformer.text_model.*`.
- VAE mid-block attention saved as Linear weights (C, C) instead of 1x1 convolutions (C, C, 1, 1),
  as some converters write it; the values are the same.
"""

from __future__ import annotations

import re
from typing import Mapping

from torch import Tensor

from ...checkpoint import PREFIXES
from ...errors import CheckpointError

TEXT_ROOT = PREFIXES["text_encoder"] + "transformer."
_OLD_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_VAE_ATTENTION = re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def standard_text_keys(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """`state` with the older SD 1.x text-encoder keys moved under `text_model.`, and how many moved."""
    out: dict[str, Tensor] = {}
    moved = 0
    for key, value in state.items():
        if key.startswith(TEXT_ROOT) and key[len(TEXT_ROOT):].startswith(_OLD_TEXT_PARTS):
            key = f"{TEXT_ROOT}text_model.{key[len(TEXT_ROOT):]}"
            moved += 1
        if key in out:
            raise CheckpointError(f"the file holds {key!r} in both the older text-encoder layout (without "
                                  "'text_model.') and the current one; it is damaged or a mix of two files")
        out[key] = value
    return out, moved


def conv_vae_attention(state: Mapping[str, Tensor], prefix: str) -> tuple[dict[str, Tensor], int]:
    """`state` with VAE attention weights under `prefix` stored as (C, C) made (C, C, 1, 1) views, and how many."""
    out = dict(state)
    changed = 0
    for key, value in state.items():
        if key.startswith(prefix) and value.ndim == 2 and _VAE_ATTENTION.match(key[len(prefix):]):
            out[key] = value[:, :, None, None]
            changed += 1
    return out, changed


def standard_layout(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """A whole original checkpoint's tensors in the standard layout, and a report line per change."""
    state, moved = standard_text_keys(state)
    state, reshaped = conv_vae_attention(state, PREFIXES["vae"])
    notes = []
    if moved:
        notes.append(f"  text encoder in the older layout without 'text_model.': {moved} keys moved under it")
    if reshaped:
        notes.append(f"  VAE attention stored as Linear weights: {reshaped} reshaped to 1x1 convolutions")
    return state, notes
