"""Textual inversion: new words for a text encoder, each one or more learned input vectors.

An embedding named `name` with n vectors becomes n new token ids after the encoder's vocabulary
(`cfg.vocab_size`, `cfg.vocab_size + 1`, ...). The tokenizer gives those ids wherever the name
stands as a word of its own in a prompt (case-insensitively, as A1111 matches names), and the
token table looks them up among the added vectors. The table keeps its weight and its state-dict
key: the added vectors are a non-persistent buffer, so saving the model never writes them, and
removing every embedding leaves the encoder as it was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .text import FAMILY_WIDTHS, TextEncoder
from .tokenizer import clean_text


class ExtendedEmbedding(nn.Embedding):
    """A token table (the same `weight` parameter as the table it extends) plus added rows, which
    ids from `num_embeddings` on select."""

    added: torch.Tensor

    @classmethod
    def extending(cls, table: nn.Embedding) -> ExtendedEmbedding:
        with torch.device("meta"):
            ext = cls(table.num_embeddings, table.embedding_dim, padding_idx=table.padding_idx)
        ext.weight = table.weight  # the same parameter: state dict and training are unchanged
        ext.register_buffer("added", table.weight.new_zeros(0, table.embedding_dim), persistent=False)
        return ext

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        base = self.num_embeddings
        if self.added.shape[0] == 0:
            return super().forward(ids)
        extra = ids >= base  # (B, T)
        out = F.embedding(ids.clamp(max=base - 1), self.weight, self.padding_idx)  # (B, T, D)
        if not bool(extra.any()):
            return out
        vectors = F.embedding((ids - base).clamp(min=0), self.added.to(out.dtype))  # (B, T, D)
        return torch.where(extra[..., None], vectors, out)


def _table(encoder: TextEncoder) -> ExtendedEmbedding:
    """The encoder's token table, extended in place on first use."""
    table = encoder.token_embedding
    if isinstance(table, ExtendedEmbedding):
        return table
    ext = ExtendedEmbedding.extending(table)
    for path, module in encoder.named_modules():
        if module is table:
            parent, _, attr = path.rpartition(".")
            setattr(encoder.get_submodule(parent), attr, ext)
            return ext
    raise RuntimeError("the text encoder's token table is not one of its modules")


def check_embedding(encoder: TextEncoder, name: str, vectors: torch.Tensor, source: str) -> tuple[str, torch.Tensor]:
    """(the name as prompts match it, the (n, width) vectors), or a ValueError naming `source`."""
    key = clean_text(name)
    if not any(c.isalnum() for c in key):
        raise ValueError(f"{source}: an embedding needs a name with a letter or digit (got {name!r}); pass token=")
    if key in encoder.added_tokens:
        raise ValueError(
            f"{source}: an embedding named {name!r} is already loaded; unload it first "
            f"(pipe.unload_textual_inversion({name!r})) or pass another token="
        )
    if vectors.ndim == 1:
        vectors = vectors[None]
    width = encoder.cfg.width
    if vectors.ndim != 2 or vectors.shape[1] != width or vectors.shape[0] < 1:
        got = "x".join(map(str, vectors.shape))
        family = f" ({FAMILY_WIDTHS[int(vectors.shape[-1])]})" if int(vectors.shape[-1]) in FAMILY_WIDTHS else ""
        raise ValueError(
            f"{source}: the embedding's vectors are {got}, but this model's text encoder takes vectors of "
            f"width {width}; it was made for another model{family}: use an embedding trained for this one"
        )
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{source}: the embedding holds NaN or infinite values; the file is broken")
    size = encoder.context_length - 2
    if vectors.shape[0] > size:
        raise ValueError(
            f"{source}: the embedding has {vectors.shape[0]} vectors, more than the {size} tokens a chunk "
            "of this model's prompts holds"
        )
    return key, vectors


@torch.no_grad()
def add_embedding(encoder: TextEncoder, name: str, vectors: torch.Tensor, source: str = "embedding") -> list[int]:
    """Teach `encoder` the word `name`: (n, width) vectors -> n new token ids (returned)."""
    key, vectors = check_embedding(encoder, name, vectors, source)
    table = _table(encoder)
    start = table.num_embeddings + table.added.shape[0]
    table.added = torch.cat([table.added, vectors.to(table.added.device, table.added.dtype)])
    ids = list(range(start, start + vectors.shape[0]))
    encoder.added_tokens[key] = ids
    return ids


@torch.no_grad()
def remove_embedding(encoder: TextEncoder, name: str | None = None) -> None:
    """Forget one added word (or, with None, all of them); the others keep working."""
    table = encoder.token_embedding
    if not isinstance(table, ExtendedEmbedding):
        return
    names = list(encoder.added_tokens) if name is None else [clean_text(name)]
    missing = [n for n in names if n not in encoder.added_tokens]
    if missing:
        loaded = ", ".join(encoder.added_tokens) or "none"
        raise ValueError(f"no embedding named {missing[0]!r} is loaded (loaded: {loaded})")
    base = table.num_embeddings
    kept = {n: ids for n, ids in encoder.added_tokens.items() if n not in names}
    rows, new_ids, start = [], {}, base
    for n, ids in kept.items():
        rows.append(table.added[ids[0] - base : ids[-1] + 1 - base])
        new_ids[n] = list(range(start, start + len(ids)))
        start += len(ids)
    table.added = torch.cat(rows) if rows else table.added[:0]
    encoder.added_tokens.clear()
    encoder.added_tokens.update(new_ids)
