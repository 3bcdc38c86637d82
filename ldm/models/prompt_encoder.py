"""Prompts of any length, with attention weights, -> the U-Net's context, as AUTOMATIC1111 builds it.

A prompt is parsed (`ldm.prompts`: `(word:1.3)`, `[word]`, BREAK, ...) and tokenized into chunks
of `context_length - 2` tokens (75 for CLIP's 77), each framed by the start and end tokens and
padded like the encoder's single prompts. Every chunk goes through the text encoder on its own,
and the chunks' hidden states are concatenated along the sequence: a prompt of 100 tokens gives
(B, 154, D). The U-Net's cross-attention takes any context length.

Weights act on the encoder's output, as in A1111's "Original" emphasis: each token's hidden state
is multiplied by its weight, then the chunk is rescaled so that its mean equals the unweighted
mean. (A1111 takes that mean over the whole batch; we take it per prompt, so that an image does not
depend on the other prompts of its batch. For one prompt the two are the same.) A chunk whose
weights are all 1 is left exactly as the encoder gave it, so a plain prompt that fits in one chunk
gives the same context, bit for bit, as `encoder(prompts)`.

Chunk boundaries follow A1111 too: a BREAK ends the chunk; a textual-inversion embedding is never
split between chunks; and when a chunk fills up within `COMMA_BACKTRACK` tokens after a comma, the
words after the comma move to the next chunk (A1111's default "comma padding backtrack" of 20).
A batch (and a prompt and its negative prompt) is padded with empty chunks to one chunk count:
the encoding of an empty prompt, as A1111 pads its unconditional context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..config import TextEncoderConfig
from ..prompts import parse_prompt
from .text import PAD_IDS, TextEncoder
from .text import _tokenizer as shared_tokenizer
from .tokenizer import BOS_ID, EOS_ID, CLIPTokenizer

COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default (0 turns the rule off)


@dataclass
class PromptChunks:
    """One prompt's chunks: full-length token ids (start, end and padding included) and the weight
    of each position."""

    ids: list[list[int]] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class _Chunker:
    """Fills chunks token by token (A1111's `tokenize_line`)."""

    def __init__(self, tokenizer: CLIPTokenizer, context_length: int, pad_id: int, backtrack: int):
        self.size = context_length - 2  # tokens of the prompt per chunk
        self.pad_id = pad_id
        self.comma = tokenizer.encoder[",</w>"]
        self.backtrack = backtrack
        self.out = PromptChunks()
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.last_comma = -1

    def close(self) -> None:
        """Frame the current chunk with start/end tokens, pad it, and start a new one."""
        fill = self.size - len(self.tokens)
        ids = [BOS_ID, *self.tokens, EOS_ID] + [self.pad_id] * fill
        self.out.ids.append(ids)
        self.out.weights.append([1.0, *self.weights, 1.0] + [1.0] * fill)
        self.tokens, self.weights, self.last_comma = [], [], -1

    def add(self, ids: list[int], weight: float) -> None:
        """Add one token, or the ids of one embedding (kept together), at `weight`."""
        if ids[0] == self.comma:
            self.last_comma = len(self.tokens)
        elif (
            self.backtrack
            and len(self.tokens) == self.size
            and self.last_comma != -1
            and len(self.tokens) - self.last_comma <= self.backtrack
        ):
            # full, and a comma is near: the words after it move to the next chunk
            cut = self.last_comma + 1
            moved, moved_weights = self.tokens[cut:], self.weights[cut:]
            self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
            self.close()
            self.tokens, self.weights = moved, moved_weights
        if len(self.tokens) == self.size or len(self.tokens) + len(ids) > self.size:
            self.close()
        self.tokens.extend(ids)
        self.weights.extend([weight] * len(ids))


def tokenize_prompt(
    encoder: TextEncoder, prompt: str, *, weighting: bool = True, backtrack: int = COMMA_BACKTRACK
) -> PromptChunks:
    """A prompt's chunks. With `weighting=False` the prompt is taken literally (brackets and BREAK
    are text), and only split into chunks."""
    return _chunks(encoder.tokenizer, encoder.context_length, encoder.pad_id, encoder.added_tokens, prompt,
                   weighting, backtrack)


def chunk_count(prompt: str, cfg: TextEncoderConfig, *, weighting: bool = True) -> int:
    """How many chunks `prompt` takes in a text encoder of config `cfg` (without textual-inversion
    words), found without building the encoder: prompts of one count give contexts of one length.
    Raises `ldm.prompts.PromptSyntaxError` for a prompt the syntax cannot read."""
    return len(_chunks(shared_tokenizer(), cfg.context_length, PAD_IDS[cfg.kind], {}, prompt, weighting,
                       COMMA_BACKTRACK))


def _chunks(tokenizer: CLIPTokenizer, context_length: int, pad_id: int, added: Mapping[str, list[int]],
            prompt: str, weighting: bool, backtrack: int) -> PromptChunks:
    sections = parse_prompt(prompt) if weighting else [[(prompt, 1.0)]]
    embedding_len = {ids[0]: len(ids) for ids in added.values()}  # an embedding's ids stay together
    chunker = _Chunker(tokenizer, context_length, pad_id, backtrack)
    for s, section in enumerate(sections):
        if s:
            chunker.close()  # BREAK
        for text, weight in section:
            ids = tokenizer.encode(text, added)
            i = 0
            while i < len(ids):
                n = embedding_len.get(ids[i], 1)
                chunker.add(ids[i : i + n], weight)
                i += n
    if chunker.tokens or not chunker.out.ids:
        chunker.close()
    return chunker.out


def empty_chunk(encoder: TextEncoder) -> tuple[list[int], list[float]]:
    """The chunk of an empty prompt: start, end, padding; all weights 1."""
    n = encoder.context_length
    return [BOS_ID, EOS_ID] + [encoder.pad_id] * (n - 2), [1.0] * n


def encode_chunks(encoder: TextEncoder, prompts: Sequence[PromptChunks], num_chunks: int | None = None) -> torch.Tensor:
    """(B, num_chunks * context_length, D): each prompt's chunks, padded with empty chunks."""
    n = max([len(p) for p in prompts] + [num_chunks or 0])
    empty = empty_chunk(encoder)
    outputs = []
    for c in range(n):
        rows = [(p.ids[c], p.weights[c]) if c < len(p) else empty for p in prompts]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        z = encoder(ids)  # (B, L, D)
        weights = torch.tensor([r[1] for r in rows], dtype=torch.float32)
        outputs.append(apply_weights(z, weights))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each position's hidden state by its weight, then restore each row's mean
    (A1111's "Original" emphasis, per prompt). z: (B, L, D); weights: (B, L). Rows whose weights
    are all 1 are returned untouched."""
    weighted = (weights != 1).any(dim=1)  # (B,)
    if not bool(weighted.any()):
        return z
    w = weights.to(z.device)[:, :, None]  # (B, L, 1)
    zf = z.float()
    scaled = zf * w
    scaled = scaled * (zf.mean(dim=(1, 2), keepdim=True) / scaled.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted.to(z.device)[:, None, None], scaled.to(z.dtype), z)


def encode_prompts(
    encoder: TextEncoder, prompts: Sequence[str], *, weighting: bool = True, num_chunks: int | None = None
) -> torch.Tensor:
    """Prompts -> (B, n * context_length, D) context; n is the largest chunk count (or `num_chunks`)."""
    return encode_chunks(encoder, [tokenize_prompt(encoder, p, weighting=weighting) for p in prompts], num_chunks)


def encode_pair(
    encoder: TextEncoder, prompts: Sequence[str], negatives: Sequence[str], *, weighting: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditional and unconditional contexts, padded to the same chunk count (which CFG's
    batched U-Net call needs). Each is encoded in its own batch, as `encoder(prompts)` would be."""
    cond = [tokenize_prompt(encoder, p, weighting=weighting) for p in prompts]
    uncond = [tokenize_prompt(encoder, p, weighting=weighting) for p in negatives]
    n = max(len(c) for c in [*cond, *uncond])
    return encode_chunks(encoder, cond, n), encode_chunks(encoder, uncond, n)
