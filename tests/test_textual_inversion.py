"""Textual inversion: A1111 and diffusers files, the same context as diffusers' load_textual_inversion,
names matched as words, chunks that never split an embedding, unloading, bad files."""

from __future__ import annotations

import fractions

import pytest
import torch
from safetensors.torch import save_file
from test_diffusers_interop import make_pipe

from ldm.convert.embeddings import read_embedding, save_embedding
from ldm.errors import CheckpointError
from ldm.models.prompt_encoder import tokenize_prompt
from ldm.models.textual_inversion import ExtendedEmbedding

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTH = 128  # the text width of the test pipelines


def vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture()
def pipe():
    return make_pipe("sd1")


def test_every_file_layout_reads(tmp_path):
    v = vectors(3)
    torch.save({"string_to_param": {"*": v}, "string_to_token": {"*": 265}, "name": "in-file", "step": 500,
                "sd_checkpoint": "abc", "sd_checkpoint_name": "model"}, tmp_path / "a1111.pt")
    save_file({"emb_params": v}, str(tmp_path / "a1111.safetensors"))
    torch.save({"<cat-toy>": v[0]}, tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": v}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save(v, tmp_path / "bare.pt")
    for name, expected_name, expected in [
        ("a1111.pt", "a1111", v), ("a1111.safetensors", "a1111", v), ("learned_embeds.bin", "<cat-toy>", v[:1]),
        ("learned_embeds.safetensors", "<cat-toy>", v), ("bare.pt", "bare", v),
    ]:
        got_name, got = read_embedding(tmp_path / name)
        assert got_name == expected_name and torch.equal(got, expected), name
    assert read_embedding(tmp_path / "a1111.pt", token="mine")[0] == "mine"
    path = save_embedding(tmp_path / "out.safetensors", "out", v)
    assert read_embedding(path)[0] == "out" and torch.equal(read_embedding(path)[1], v)


def test_bad_embedding_files_name_the_file_and_fix(tmp_path, pipe):
    torch.save({"string_to_param": {"*": vectors(1)}, "hash": fractions.Fraction(1, 3)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd.pt is a pickle that holds more than tensors.*trust_pickle=True"):
        read_embedding(tmp_path / "odd.pt")
    save_file({"clip_l": vectors(1), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(CheckpointError, match="is an SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors")
    save_file({"a": vectors(1), "b": vectors(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(CheckpointError, match="not a textual-inversion embedding in a known layout"):
        read_embedding(tmp_path / "two.safetensors")
    save_file({"emb_params": torch.zeros(2, 768)}, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(ValueError, match=r"vectors are 2x768, but this model's text encoder takes vectors of width "
                                         r"128; it was made for another model \(SD 1.x\)"):
        pipe.load_textual_inversion(tmp_path / "sd1.safetensors")
    with pytest.raises(CheckpointError, match="embedding not found"):
        pipe.load_textual_inversion(tmp_path / "missing.pt")
    assert pipe.text_encoder.added_tokens == {}


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_context_matches_diffusers_load_textual_inversion(tmp_path, variant):
    from diffusers import StableDiffusionPipeline

    
    ours = make_pipe(variant)
    folder = ours.save_diffusers(tmp_path / "model")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    save_file({"<cat-toy>": vectors(3, seed=1)}, str(tmp_path / "cat.safetensors"))
    torch.save({"<sun>": vectors(1, seed=2)[0]}, tmp_path / "learned_embeds.bin")
    for path in ("cat.safetensors", "learned_embeds.bin"):
        assert ours.load_textual_inversion(tmp_path / path) in ("<cat-toy>", "<sun>")
        theirs.load_textual_inversion(str(tmp_path / path))
    prompt = "a <cat-toy> figure under the <sun>, on a table"
    with torch.no_grad():
        mine = ours.encode_prompt([prompt])
        theirs_ctx, _ = theirs.encode_prompt(prompt, "cpu", 1, False)
    assert mine.shape == theirs_ctx.shape == (1, 77, WIDTH)
    torch.testing.assert_close(mine, theirs_ctx, rtol=1e-5, atol=1e-5)
    # and the embedding changed the context from the plain words
    ours.unload_textual_inversion()
    with torch.no_grad():
        assert (ours.encode_prompt([prompt]) - mine).abs().max() > 1e-2


def test_names_match_as_words_case_insensitively(pipe, tmp_path):
    save_file({"emb_params": vectors(2)}, str(tmp_path / "EasyNegative.safetensors"))
    assert pipe.load_textual_inversion(tmp_path / "EasyNegative.safetensors") == "EasyNegative"
    te = pipe.text_encoder
    ids = te.added_tokens["easynegative"]
    assert ids == [te.cfg.vocab_size, te.cfg.vocab_size + 1]
    enc = te.tokenizer.encode
    for text in ("easynegative", "EASYNEGATIVE, blurry", "(easyNegative:1.2)"):
        assert ids[0] in tokenize_prompt(te, text).ids[0], text
    for text in ("easynegativev2", "myeasynegative", "easy negative"):
        assert ids[0] not in tokenize_prompt(te, text).ids[0], text
    assert te.tokenize(["a photo, easynegative"])[0, 1:7].tolist() == [*enc("a photo,"), *ids, te.tokenizer.eos_id]
    with pytest.raises(ValueError, match="an embedding named 'EasyNegative' is already loaded"):
        pipe.load_textual_inversion(tmp_path / "EasyNegative.safetensors")


def test_embedding_vectors_reach_the_transformer_and_unload_cleanly(pipe, tmp_path):
    te = pipe.text_encoder
    original = {k: v.clone() for k, v in te.state_dict().items()}
    v = vectors(2, seed=5)
    save_embedding(tmp_path / "tok.safetensors", "tok", v)
    pipe.load_textual_inversion(tmp_path / "tok.safetensors")
    assert isinstance(te.token_embedding, ExtendedEmbedding)
    ids = torch.tensor([tokenize_prompt(te, "a tok").ids[0]])
    with torch.no_grad():
        embedded = te.token_embedding(ids)
    assert torch.equal(embedded[0, 2:4], v)  # [BOS, a, tok_0, tok_1, EOS, ...]
    assert te.state_dict().keys() == original.keys()  # the added vectors are never saved
    before = pipe.encode_prompt(["a tok"])
    save_embedding(tmp_path / "other.safetensors", "other", vectors(1, seed=6))
    pipe.load_textual_inversion(tmp_path / "other.safetensors")
    pipe.unload_textual_inversion("tok")  # "other" moves down and keeps working
    assert te.added_tokens == {"other": [te.cfg.vocab_size]}
    pipe.unload_textual_inversion()
    assert te.added_tokens == {} and all(torch.equal(original[k], t) for k, t in te.state_dict().items())
    assert not torch.equal(pipe.encode_prompt(["a tok"]), before)
    with pytest.raises(ValueError, match=r"no embedding named 'tok' is loaded \(loaded: none\)"):
        pipe.unload_textual_inversion("tok")


def test_an_embedding_is_never_split_between_chunks(pipe, tmp_path):
    te = pipe.text_encoder
    save_embedding(tmp_path / "wide.safetensors", "wide", vectors(4))
    pipe.load_textual_inversion(tmp_path / "wide.safetensors")
    ids = te.added_tokens["wide"]
    chunks = tokenize_prompt(te, " ".join(["cat"] * 73) + " wide")  # 73 + 4 > 75: the embedding moves on
    assert len(chunks) == 2
    assert chunks.ids[0][1:75] == te.tokenizer.encode(" ".join(["cat"] * 73)) + [te.tokenizer.eos_id]
    assert chunks.ids[1][1:6] == [*ids, te.tokenizer.eos_id]
    weighted = tokenize_prompt(te, "(wide:1.5) cat")
    assert weighted.weights[0][1:6] == [1.5] * 4 + [1.0]
