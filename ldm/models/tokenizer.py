"""CLIP's byte-level BPE tokenizer, offline, over the vocabulary vendored in `ldm/assets`.

Both text encoders of Stable Diffusion (OpenAI CLIP ViT-L/14 for SD 1.x, OpenCLIP ViT-H/14 for
SD 2.x) share this tokenizer; they differ only in the id used for padding.

Pipeline, as in CLIP (Radford et al. 2021, sec. 2.4, and GPT-2's byte-level BPE):
  1. clean: repair mojibake (ftfy), unescape HTML entities twice, collapse whitespace, lowercase;
  2. split into pre-tokens with CLIP's regex (contractions, letter runs, single digits, other runs);
  3. map each pre-token's UTF-8 bytes to printable unicode characters (one per byte);
  4. apply the BPE merges in rank order, the last symbol carrying the `</w>` end-of-word marker;
  5. look the resulting symbols up in the 49408-entry vocabulary.
"""

from __future__ import annotations

import functools
import gzip
import html
from importlib import resources
from typing import Iterable, Mapping, Sequence

import ftfy
import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# The vocabulary is 256 byte symbols, the same 256 with `</w>`, one symbol per merge, and the two
# special tokens; the file holds more merges than that, of which only the first are used.
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2

# Pre-tokens: the special tokens whole, English contractions, runs of letters, single digits, and
# runs of anything else that is not whitespace. A prompt that spells out a special token gets that
# token, as in CLIP. Case-insensitive like CLIP's, which matters even on lowercased text for the
# few characters that case-fold onto ASCII letters (the long s in "'ſ" is the contraction "'s").
_PRE_TOKEN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")
_BPE_CACHE_LIMIT = 100_000  # words; the cache is cleared when it grows past this


@functools.lru_cache(maxsize=None)
def byte_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters.

    Bytes that are already printable Latin-1 characters map to themselves; the 68 others (control
    characters, space, and a few unprintable Latin-1 points) take the code points 256, 257, ...
    in byte order. The dict's order (printable first, then the rest) is the order of the first
    256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """CLIP's text normalisation: ftfy, HTML unescape (twice, for doubly escaped scrapes),
    whitespace collapsed to single spaces, stripped, lowercased."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=4)
def _load_tables(path: str | None) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """(symbol -> id, merge pair -> rank), read once per vocabulary file."""
    if path is None:
        raw = resources.files("ldm").joinpath("assets", VOCAB_FILE).read_bytes()
    else:
        with open(path, "rb") as f:
            raw = f.read()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    # Line 0 is a version header; merges follow, one "left right" pair a line.
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"{path or VOCAB_FILE} is not a CLIP BPE merges file: expected {NUM_MERGES} merge lines "
            f"of two symbols after the header"
        )
    byte_symbols = list(byte_to_unicode().values())
    symbols = [*byte_symbols, *(s + END_OF_WORD for s in byte_symbols), *("".join(m) for m in merges)]
    symbols += [BOS_TOKEN, EOS_TOKEN]
    encoder = {s: i for i, s in enumerate(symbols)}
    ranks = {m: r for r, m in enumerate(merges)}
    return encoder, ranks


@functools.lru_cache(maxsize=64)
def _added_pattern(names: tuple[str, ...]) -> regex.Pattern:
    """A regex whose one group is any of `names` (cleaned like prompts), longest first, where no
    letter or digit touches it: split() then alternates text and names."""
    cleaned = sorted({clean_text(n) for n in names}, key=len, reverse=True)
    alternatives = "|".join(regex.escape(n) for n in cleaned)
    return regex.compile(rf"(?<![\p{{L}}\p{{N}}])({alternatives})(?![\p{{L}}\p{{N}}])")


class CLIPTokenizer:
    """CLIP's BPE tokenizer. `encode`/`decode` map text to ids and back; calling it on a batch of
    prompts gives the fixed-length (B, context_length) id tensor the text transformers take.

    `vocab_path` selects another merges file of the same format (default: the vendored one).
    """

    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def __init__(self, vocab_path: str | None = None):
        self.encoder, self.ranks = _load_tables(None if vocab_path is None else str(vocab_path))
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.byte_encoder = byte_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        # Word -> space-joined BPE symbols. The special tokens are their own single symbols.
        self._cache: dict[str, str] = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}

    # ------------------------------------------------------------------ BPE

    def bpe(self, word: str) -> list[str]:
        """Split one pre-token (already byte-mapped) into vocabulary symbols."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached.split(" ")
        symbols = self._merge(word)
        if len(self._cache) >= _BPE_CACHE_LIMIT:
            self._cache = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}
        self._cache[word] = " ".join(symbols)
        return symbols

    def _merge(self, word: str) -> list[str]:
        # Start from single characters, the last one marked as the end of the word.
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            # The adjacent pair merged earliest in training goes first; stop when none is known.
            best_rank, best = None, None
            for pair in zip(parts, parts[1:]):
                rank = self.ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            # Merge every occurrence of the chosen pair, scanning left to right.
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, added: Mapping[str, Sequence[int]] | None = None) -> list[int]:
        """Token ids of `text`, without the start and end tokens.

        `added` maps extra words (textual-inversion names) to their ids: each is found in the
        cleaned text, case-insensitively, where no letter or digit touches it, and gives its ids
        in place of BPE tokens."""
        ids: list[int] = []
        cleaned = clean_text(text)
        pattern = _added_pattern(tuple(sorted(added))) if added else None
        if pattern is None:
            return self._encode_clean(cleaned, ids)
        lowered = {clean_text(name): list(v) for name, v in added.items()}
        for i, part in enumerate(pattern.split(cleaned)):
            if i % 2:
                ids.extend(lowered[part])
            else:
                self._encode_clean(part, ids)
        return ids

    def _encode_clean(self, cleaned: str, ids: list[int]) -> list[int]:
        for piece in _PRE_TOKEN.findall(cleaned):
            word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: word ends become spaces; the start/end tokens are dropped unless asked.

        Padding with id 0 (OpenCLIP's convention) decodes as "!"; strip padding before decoding.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = (BOS_ID, EOS_ID) if skip_special_tokens else ()
        data = bytearray()
        for i in ids:
            if int(i) in skip:
                continue
            symbol = self.decoder[int(i)]
            word_end = symbol.endswith(END_OF_WORD) and symbol != END_OF_WORD
            if word_end:
                symbol = symbol[: -len(END_OF_WORD)]
            # Every symbol character stands for one byte (the special tokens are plain ASCII).
            data.extend(self.byte_decoder[c] for c in symbol)
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    # ------------------------------------------------------------------ batches

    def __call__(
        self,
        prompts: Sequence[str],
        context_length: int = 77,
        *,
        pad_id: int,
        added: Mapping[str, Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Tokenize a batch: `<|startoftext|> ids <|endoftext|>`, padded with `pad_id`.

        Returns the (B, context_length) int64 ids and, per prompt, the number of tokens that did
        not fit and were dropped (0 when it fit). A truncated prompt still ends in
        `<|endoftext|>`, whose hidden state CLIP pools.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings; wrap a single prompt as [prompt]")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 to hold the start and end tokens (got {context_length})")
        out = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)
        dropped = []
        for row, prompt in enumerate(prompts):
            ids = [BOS_ID, *self.encode(prompt, added), EOS_ID]
            excess = max(0, len(ids) - context_length)
            if excess:
                ids = [*ids[: context_length - 1], EOS_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            dropped.append(excess)
        return out, dropped
