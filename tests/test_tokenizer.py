"""CLIP BPE tokenizer: published ids, the vocabulary's structure, round trips, batching."""

import gzip
import json
from importlib import resources

import pytest
import regex
import torch

from ldm.models.tokenizer import BOS_ID, EOS_ID, NUM_MERGES, VOCAB_FILE, CLIPTokenizer, clean_text


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def test_reference_ids(tok):
    # The well-known CLIP ids of "a photo of a cat" (SD 1.x / OpenAI CLIP / OpenCLIP agree).
    ids, dropped = tok(["a photo of a cat"], pad_id=EOS_ID)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert dropped == [0]
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    # The merges must build each of these words into its single vocabulary token.
    for word, token_id in {"photo": 1125, "cat": 2368, "a": 320, "of": 539}.items():
        assert tok.encode(word) == [token_id]


def test_vocabulary_layout(tok):
    # 256 byte symbols, the same with </w>, one token per merge, then the two specials.
    assert len(tok.encoder) == 49408
    assert tok.decoder[0] == "!" and tok.decoder[256] == "!</w>"
    assert tok.decoder[512] == "in" and tok.decoder[513] == "th"  # the first two merges
    assert tok.decoder[BOS_ID] == "<|startoftext|>" and tok.decoder[EOS_ID] == "<|endoftext|>"
    # Every byte has a symbol, so no input text can fail to encode.
    assert tok.encode("\x00\x7f é 🐱") and tok.decode(tok.encode("é 🐱")) == "é 🐱"


def test_every_vocab_entry_round_trips(tok):
    words = texts = 0
    for symbol, token_id in tok.encoder.items():
        if token_id >= BOS_ID:
            continue
        text = tok.decode([token_id])
        # Skip the entries that are partial UTF-8 sequences or that cleaning rewrites (capitals,
        # mojibake that ftfy repairs): they cannot come back unchanged from any text.
        if "\ufffd" in text or clean_text(text) != text:
            continue
        texts += 1
        assert tok.decode(tok.encode(text)) == text, symbol
        if symbol.endswith("</w>") and regex.fullmatch(r"\p{L}+", text):
            words += 1
            # A whole word in the vocabulary encodes to exactly that token.
            assert tok.encode(text) == [token_id], symbol
    assert texts > 48_000 and words > 33_000


def test_cleaning_and_pre_tokenisation(tok):
    assert clean_text("  A\tCAT&amp;amp;dog \n") == "a cat&dog"
    # ftfy leaves entities alone in text that holds "<"; the two unescapes still apply.
    assert clean_text("<b> CAT&amp;amp;dog") == "<b> cat&dog"
    assert tok.encode("A   PHOTO\nof a\tcat") == tok.encode("a photo of a cat")
    # Contractions split off; digits are single tokens.
    assert tok.decode(tok.encode("don't")) == "don 't"
    assert tok.decode(tok.encode("2024")) == "2 0 2 4"
    assert tok.decode([BOS_ID, 320, EOS_ID], skip_special_tokens=False) == "<|startoftext|>a <|endoftext|>"
    assert tok.decode(torch.tensor([BOS_ID, 320, 2368, EOS_ID])) == "a cat"


def test_matches_transformers_tokenizer(tok, tmp_path):
    # An independent BPE implementation over the same vocabulary must give the same ids.
    # (transformers' CLIP tokenizer neither unescapes HTML entities nor lets ftfy straighten curly
    # quotes, so neither appears here.)
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    lines = gzip.decompress(resources.files("ldm").joinpath("assets", VOCAB_FILE).read_bytes()).decode()
    merges = lines.split("\n")[1 : 1 + NUM_MERGES]
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (tmp_path / "vocab.json").write_text(json.dumps(tok.encoder), encoding="utf-8")
    hf = HFCLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    prompts = [
        "An astronaut riding a horse on Mars, 4k, trending on ArtStation!!",
        "a red circle above a blue square",
        "HELLO\tworld\n\nnew-line's I'll we've they'd",
        "café naïve Ünïcödé 🐱🐶 — (quoted) …",
        "日本語のテキスト 中文 한국어",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
        "",
    ]
    for prompt in prompts:
        assert hf(prompt)["input_ids"] == [BOS_ID, *tok.encode(prompt), EOS_ID], prompt


@pytest.mark.parametrize("pad_id", [EOS_ID, 0])
def test_batch_padding_and_empty_prompt(tok, pad_id):
    ids, dropped = tok(["", "a cat"], context_length=77, pad_id=pad_id)
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == [BOS_ID, EOS_ID] + [pad_id] * 75
    assert ids[1].tolist() == [BOS_ID, 320, 2368, EOS_ID] + [pad_id] * 73
    assert dropped == [0, 0]


def test_truncation_keeps_end_token(tok):
    long = " ".join(["cat"] * 100)  # 100 tokens + start + end
    ids, dropped = tok([long, "a cat"], context_length=77, pad_id=0)
    assert ids.shape == (2, 77)
    assert ids[0, 0] == BOS_ID and ids[0, -1] == EOS_ID
    assert (ids[0, 1:-1] == 2368).all()
    assert dropped == [102 - 77, 0]
    # Exactly full: no truncation, no padding.
    ids, dropped = tok([" ".join(["cat"] * 75)], pad_id=0)
    assert dropped == [0] and ids[0, -1] == EOS_ID and (ids[0, 1:-1] == 2368).all()


def test_rejects_bare_string(tok):
    with pytest.raises(TypeError, match="list of strings"):
        tok("a cat", pad_id=0)
