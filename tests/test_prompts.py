"""Prompt syntax and long prompts: A1111's parse (exact weights), our refusals, chunking into
context_length - 2 tokens, hand-computed weighted embeddings, bit-identity of plain prompts."""

import pytest
import torch

from ldm.config import TextEncoderConfig
from ldm.models.prompt_encoder import apply_weights, chunk_count, encode_pair, encode_prompts, tokenize_prompt
from ldm.models.text import TextEncoder
from ldm.models.tokenizer import BOS_ID, EOS_ID
from ldm.prompts import PromptSyntaxError, parse_prompt

# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # the examples of A1111's parse_prompt_attention docstring, with their exact float weights
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).)",
            [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)],
        ),
        ("((word))", [("word", 1.2100000000000002)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:0)", [("word", 0.0)]),
        ("(word:-1.5)", [("word", -1.5)]),
        ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
        ("a\\\\b", [("a\\b", 1.0)]),
        ("ratio 16:9, a|b", [("ratio 16:9, a|b", 1.0)]),  # colons and bars outside brackets are text
        ("(a\\:b)", [("a:b", 1.1)]),
        ("", [("", 1.0)]),
    ],
)
def test_parse_matches_a1111(prompt, expected):
    assert parse_prompt(prompt) == [expected]


def test_break_splits_sections():
    assert parse_prompt("a (red:1.3) circle BREAK white background") == [
        [("a ", 1.0), ("red", 1.3), (" circle", 1.0)], [("white background", 1.0)]]
    assert parse_prompt("a BREAK") == [[("a", 1.0)], [("", 1.0)]]
    # BREAK is a word of its own, in upper case
    assert parse_prompt("BREAKFAST break") == [[("BREAKFAST break", 1.0)]]
    # inside brackets it still breaks, and the weight spans both sections
    assert parse_prompt("(a BREAK b)") == [[("a", 1.1)], [("b", 1.1)]]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("(unbalanced", r"'\(' is never closed at character 0; close it with '\)', or write \\\("),
        ("a [dim", r"'\[' is never closed at character 2"),
        ("smile :)", r"'\)' closes no '\(' at character 7; remove it, or write \\\)"),
        ("x]", r"'\]' closes no '\['"),
        ("(cat:abc)", r"malformed weight ':abc\)' at character 4; a weight is a number right after the colon, "
                      r"as in \(word:1.3\); write \\: for a literal colon"),
        ("(cat: 1.2)", r"malformed weight ': 1.2\)'"),
        ("(cat:)", r"malformed weight ':\)'"),
        ("(cat:1.2.3)", r"the weight '1.2.3' is not a number"),
        ("[cat:dog:0.5]", r"prompt editing \[from:to:when\] is not supported"),
        ("[cat|dog]", r"alternation \[a\|b\] is not supported"),
        ("a cat AND a dog", r"composable prompts \(AND\) are not supported at character 6"),
        ("a cat <lora:paper_cut:0.8>", r"LoRA tags such as <lora:paper_cut:0.8> are not read from prompts at "
                                       r"character 6; load the LoRA with --lora paper_cut.safetensors:0.8 "
                                       r"\(pipe.load_lora\) and remove the tag"),
        ("<lyco:x> cat", r"--lora x.safetensors \(pipe.load_lora\)"),
        ("<hypernet:h:1>", r"hypernetworks \(<hypernet:h:1>\) are not supported"),
    ],
)
def test_malformed_prompts_are_refused_naming_the_spot_and_fix(prompt, message):
    with pytest.raises(PromptSyntaxError, match=message):
        parse_prompt(prompt)


def test_error_quotes_the_prompt():
    with pytest.raises(PromptSyntaxError, match=r"^prompt 'a \(red:x\) circle': "):
        parse_prompt("a (red:x) circle")


# ---------------------------------------------------------------------------------------------
# Chunking
# ---------------------------------------------------------------------------------------------


def encoder(kind: str = "hf_clip", context_length: int = 77, seed: int = 0) -> TextEncoder:
    torch.manual_seed(seed)
    act = "gelu" if kind == "open_clip" else "quick_gelu"
    cfg = TextEncoderConfig(kind=kind, width=32, layers=2, heads=2, projection_dim=16, activation=act,
                            context_length=context_length)
    return TextEncoder(cfg).eval()


@pytest.fixture(scope="module")
def enc():
    return encoder()


def body(ids: list[int]) -> list[int]:
    """The prompt tokens of a chunk: between the start token and the first end token."""
    return ids[1 : ids.index(EOS_ID)]


def test_plain_prompt_is_one_chunk_with_the_encoders_own_ids(enc):
    chunks = tokenize_prompt(enc, "a red circle, left of a tree")
    assert len(chunks) == 1
    assert chunks.ids[0] == enc.tokenize(["a red circle, left of a tree"])[0].tolist()
    assert chunks.weights[0] == [1.0] * 77


def test_weights_follow_their_tokens(enc):
    chunks = tokenize_prompt(enc, "a (red:1.3) circle [dim]")
    words = enc.tokenizer.encode
    assert body(chunks.ids[0]) == words("a") + words("red") + words("circle") + words("dim")
    n = len(body(chunks.ids[0]))
    assert chunks.weights[0][: n + 2] == [1.0, 1.0, 1.3, 1.0, 1 / 1.1, 1.0]


def test_long_prompt_chunks_of_75_and_comma_backtrack(enc):
    # 30 words without commas: 75 + 5 tokens
    words = " ".join(["cat"] * 80)
    chunks = tokenize_prompt(enc, words)
    assert [len(body(ids)) for ids in chunks.ids] == [75, 5]
    assert all(len(ids) == 77 and ids[0] == BOS_ID for ids in chunks.ids)
    # "x, y y y y ..." : when the chunk fills, the words after the last comma (within 20 tokens) move on
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    chunks = tokenize_prompt(enc, prompt)
    first, second = (body(ids) for ids in chunks.ids)
    assert len(first) == 71 and first[-1] == enc.tokenizer.encode(",")[0]  # the comma stays
    assert second == enc.tokenizer.encode(" ".join(["dog"] * 10))
    assert len(tokenize_prompt(enc, prompt, backtrack=0).ids[0]) == 77
    assert len(body(tokenize_prompt(enc, prompt, backtrack=0).ids[0])) == 75


def test_chunk_count_from_the_config_alone_agrees_with_the_encoder(enc):
    prompts = ["a cat", " ".join(["cat"] * 80), "a BREAK b BREAK c", "(a:1.2) " * 80, ""]
    counts = [chunk_count(p, enc.cfg) for p in prompts]
    assert counts == [len(tokenize_prompt(enc, p)) for p in prompts] == [1, 2, 3, 2, 1]
    assert chunk_count("a BREAK b", enc.cfg, weighting=False) == 1
    with pytest.raises(PromptSyntaxError, match="never closed"):
        chunk_count("(a", enc.cfg)


def test_break_starts_a_new_chunk(enc):
    chunks = tokenize_prompt(enc, "a red circle BREAK white background")
    assert [enc.tokenizer.decode(body(ids)) for ids in chunks.ids] == ["a red circle", "white background"]
    assert len(tokenize_prompt(enc, "BREAK a")) == 2  # an empty first chunk, as in A1111
    assert len(tokenize_prompt(enc, "a BREAK")) == 1
    # without weighting, BREAK and brackets are words
    literal = tokenize_prompt(enc, "(a) BREAK b", weighting=False)
    assert len(literal) == 1 and body(literal.ids[0]) == enc.tokenizer.encode("(a) BREAK b")


def test_small_context_chunks_of_context_minus_two():
    small = encoder(context_length=32)
    chunks = tokenize_prompt(small, " ".join(["cat"] * 40))
    assert [len(ids) for ids in chunks.ids] == [32, 32]
    assert [len(body(ids)) for ids in chunks.ids] == [30, 10]


def test_open_clip_chunks_pad_with_zero_after_the_end_token():
    oc = encoder("open_clip")
    ids = tokenize_prompt(oc, "a cat").ids[0]
    assert ids[:4] == [BOS_ID, *oc.tokenizer.encode("a cat"), EOS_ID] and ids[4:] == [0] * 73
    assert ids == oc.tokenize(["a cat"])[0].tolist()


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def test_weighting_by_hand_on_constant_states():
    # every hidden state 1: weighted states are w_i, their mean sum(w) / L, so the rescaled
    # value at position i is w_i * L / sum(w)
    z = torch.ones(2, 5, 3)
    w = torch.tensor([[1.0, 1.3, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    out = apply_weights(z, w)
    expected = torch.tensor([1, 1.3, 1, 1, 1]) * 5 / 5.3
    torch.testing.assert_close(out[0, :, 0], expected, rtol=0, atol=2.4e-7)  # two float32 ulps
    assert torch.equal(out[1], z[1])  # all weights 1: untouched


def test_weighting_by_hand_on_real_states(enc):
    ids = torch.tensor([tokenize_prompt(enc, "a red circle").ids[0]])
    with torch.no_grad():
        z = enc(ids)  # (1, 77, D)
        out = encode_prompts(enc, ["a (red:1.5) circle"])
    w = torch.ones(77)
    w[2] = 1.5  # [BOS, a, red, circle, EOS, ...]
    scaled = z * w[None, :, None]
    expected = scaled * (z.mean() / scaled.mean())
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, z, atol=1e-3)
    assert abs(out.mean().item() - z.mean().item()) < 1e-6


@pytest.mark.parametrize("kind", ["hf_clip", "open_clip"])
def test_plain_prompts_give_the_encoders_context_bit_for_bit(kind):
    te = encoder(kind)
    prompts = ["a red circle", "two blue squares, left of a tree", ""]
    with torch.no_grad():
        cond, uncond = encode_pair(te, prompts, ["blurry"] * 3)
        assert torch.equal(cond, te(prompts)) and torch.equal(uncond, te(["blurry"] * 3))


def test_chunks_are_encoded_separately_and_concatenated(enc):
    with torch.no_grad():
        both = encode_prompts(enc, ["a red circle BREAK white background"])
        a, b = enc(["a red circle"]), enc(["white background"])
    assert both.shape == (1, 154, 32)
    assert torch.equal(both, torch.cat([a, b], dim=1))


def test_cond_and_uncond_pad_to_the_same_chunk_count_with_empty_chunks(enc):
    long = " ".join(["cat"] * 100)
    with torch.no_grad():
        cond, uncond = encode_pair(enc, [long], [""])
        empty = enc([""])
        assert cond.shape == uncond.shape == (1, 154, 32)
        assert torch.equal(uncond, torch.cat([empty, empty], dim=1))
        # a batch pads its shorter prompts the same way
        batch = encode_prompts(enc, [long, "a cat"])
        assert torch.equal(batch[1:, 77:], empty)


def test_long_prompt_is_no_longer_cut(enc):
    with torch.no_grad():
        ctx = encode_prompts(enc, [" ".join(["cat"] * 75) + " dog"])
    assert ctx.shape == (1, 154, 32)  # 76 tokens: two chunks, nothing dropped


# ---------------------------------------------------------------------------------------------
# In the pipeline
# ---------------------------------------------------------------------------------------------


def test_pipeline_weights_prompts_by_default(tmp_path):
    from helpers import randomize

    from ldm.pipeline import LDMPipeline

    # (randomized: a freshly built U-Net's zero-initialised output projections ignore the prompt)
    pipe = randomize(LDMPipeline.from_config("tests/configs/tiny64.yaml", ["sample.height=32", "sample.width=32"]))
    run = dict(steps=2, seed=3, output_type="tensor", progress=False)
    plain = pipe.generate("a red circle", **run)
    assert torch.equal(plain, pipe.generate("a red circle", prompt_weighting=False, **run))
    weighted = pipe.generate("a (red:1.5) circle", **run)
    assert not torch.equal(weighted, pipe.generate("a (red:1.5) circle", prompt_weighting=False, **run))
    long = pipe.generate(", ".join(["a red circle"] * 25), negative_prompt="blurry", **run)  # 2 chunks vs 1
    assert long.shape == plain.shape and torch.isfinite(long).all()
    steps = []
    with pytest.raises(PromptSyntaxError, match="malformed weight"):
        pipe.img2img(plain, "a (red:x) circle", negative_prompt="ok", callback=lambda *a: steps.append(a), **run)
    with pytest.raises(PromptSyntaxError, match="is never closed"):
        pipe.generate("a red circle", negative_prompt="(blurry", **run)
    assert steps == []
