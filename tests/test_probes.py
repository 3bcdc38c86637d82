"""Prompt-following probes (ldm.eval.probes) on tiny untrained models, where the right answer is
known: a U-Net that ignores its context loses nothing when a word is swapped, an autoencoder that
reconstructs exactly keeps every attribute, attention maps are distributions over the words."""

import random

import pytest
import torch
from torch import nn

from ldm import LDMPipeline
from ldm.data.shapes import Scene, Shape, parse_caption
from ldm.eval import probes
from tests.helpers import FAST, SD_TINY, randomize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return LDMPipeline.from_config(SD_TINY, FAST)


def test_swap_loss_is_exactly_one_for_a_unet_that_ignores_the_text(pipe):
    # A fresh U-Net ends in a zero convolution: its output, and so its loss, ignores the caption.
    ratios = probes.swap_loss(pipe, n=8, timesteps=(200, 800))
    assert set(ratios) == {"colour", "shape", "size", "position", "background"}
    assert all(r == 1.0 for per_t in ratios.values() for r in per_t.values())
    # Once every path carries signal, swapping a word changes the loss.
    live = randomize(LDMPipeline.from_config(SD_TINY, FAST))
    assert any(abs(r - 1.0) > 1e-4 for per_t in probes.swap_loss(live, n=8, timesteps=(800,)).values()
               for r in per_t.values())


def test_swapped_changes_exactly_one_attribute():
    scene = Scene([Shape("circle", "red", "small", "top left")], "white")
    rng = random.Random(0)
    for attr in ("colour", "shape", "size", "position", "background"):
        other = probes.swapped(scene, attr, rng)
        diff = {k for k in ("colour", "shape", "size", "position") if getattr(other.objects[0], k) != getattr(scene.objects[0], k)}
        diff |= {"background"} if other.background != scene.background else set()
        assert diff == {attr}


def test_text_separation_and_readout_of_a_random_encoder(pipe):
    sep = probes.text_separation(pipe, n=16)
    assert all(0.05 < v < 1.5 for v in sep.values()), sep
    readout = probes.linear_readout(pipe, n_train=256, n_test=64)
    # Every word has its own embedding, so the concatenated states hold every attribute.
    assert all(acc >= 0.95 for acc in readout["all"].values()), readout["all"]


def test_word_tokens_cover_the_caption(pipe):
    caption = "a large cyan triangle in the center, on a gray background"
    words = probes.word_tokens(pipe, caption)
    ids = pipe.text_encoder.tokenize([caption])[0]
    tok = pipe.text_encoder.tokenizer
    assert [w for w, _ in words] == caption.replace(",", "").split()
    assert tok.decode(ids[words[2][1]]).strip() == "cyan"  # two tokens: "cy" + "an"
    assert len(words[2][1]) == 2 and words[0][1] == [1] and words[-1][1][-1] == len(tok.encode(caption))


def test_cross_attention_maps_are_distributions_over_the_context(pipe):
    scenes = [parse_caption("a large red circle at the top left, on a white background")] * 2
    maps = probes.cross_attention_maps(pipe, scenes, t=500)
    assert len(maps) == 7  # the transformers of sd_tiny's U-Net: 2 down, 1 middle, 4 up
    sides = sorted({m.shape[-1] for _, m in maps})
    assert sides == [8, 16]
    for _, m in maps:
        assert m.shape[:2] == (2, pipe.text_encoder.context_length)
        torch.testing.assert_close(m.sum(1), torch.ones(2, *m.shape[-2:]))
    ratios = probes.attention_on_cell(pipe, n=4, t=800)
    assert set(ratios) == {name for name, _ in maps}
    assert all(0.5 < r < 2 for layer in ratios.values() for r in layer.values())


class _Identity(nn.Module):
    """An autoencoder that reconstructs exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return type("Posterior", (), {"mean": x})()

    def decode(self, z):
        return z


def test_reconstruction_probe_of_an_exact_autoencoder_is_perfect():
    result = probes.reconstruction_adherence(_Identity(), 32)
    assert result["all"] == 1.0 and result["shape/small triangle"] == 1.0
    assert set(result) >= {"colour", "shape", "size", "position", "count", "background"}


def test_noise_prior_scores_a_decoder_that_draws_the_truth_or_only_the_background(pipe, monkeypatch):
    from ldm.data.shapes import BACKGROUNDS, render_array

    scenes = probes._scenes(16, 4)  # the captions noise_prior asks for, in its order
    truth = torch.stack([torch.from_numpy(render_array(s, 32)).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    blank = torch.stack([torch.tensor(BACKGROUNDS[s.background]).float().div(127.5).sub(1)[:, None, None].expand(3, 32, 32)
                         for s in scenes])
    # Whatever the U-Net predicts, a decoder that returns the scenes draws each object fully in place
    monkeypatch.setattr(pipe.vae, "decode", lambda z: truth)
    result = probes.noise_prior(pipe, n=16, draws=1)
    assert result["contrast"] == pytest.approx(1.0) and result["place_right"] == 1.0 and result["t"] == 999
    # ... one that returns the backgrounds draws nothing anywhere (a uniform tint changes nothing)
    monkeypatch.setattr(pipe.vae, "decode", lambda z: blank)
    assert probes.noise_prior(pipe, n=16, draws=1)["contrast"] == 0.0
    monkeypatch.setattr(pipe.vae, "decode", lambda z: (truth + 0.2).clamp(-1, 1))
    assert probes.noise_prior(pipe, n=16, draws=1)["place_right"] == 1.0


def test_probe_tool_prints_and_writes_the_text_probe_and_checks_its_arguments(tmp_path, capsys):
    import json

    from ldm.cli.probe import main

    args = ["--config", str(SD_TINY), *[a for kv in FAST for a in ("--set", kv)]]
    assert main([*args, "--only", "text", "--n", "8", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "text: held-out accuracy of a linear read-out" in out and "position" in out
    result = json.loads((tmp_path / "p.json").read_text())
    assert set(result) == {"text_separation", "text_readout"}
    assert set(result["text_readout"]) == {"last", "mean", "all"}
    with pytest.raises(SystemExit):
        main([*args, "--only", "latent,novel"])
    assert "--only takes a comma-separated subset of text, attention, latent, swap, prior (got 'latent,novel')" in capsys.readouterr().err
