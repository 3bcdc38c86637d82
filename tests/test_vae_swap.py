"""`--vae FILE` / `LDMPipeline.load(model, vae=...)` / `pipe.load_vae(...)`: a standalone VAE in place of the
model's, from every layout users have (original, a whole checkpoint's, diffusers folders and files,
diffusers' older attention names), checked against diffusers' own AutoencoderKL."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import TINY, TINY_SD1, randomize
from ldm import LDMPipeline
from ldm.cli import txt2img
from ldm.errors import CheckpointError
from ldm.png_settings import read_png_settings

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = [*TINY_SD1, "sample.height=32", "sample.width=32", "sample.steps=2"]
OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    pipe = randomize(LDMPipeline.from_config(TINY, SMALL, seed=0))
    return pipe, pipe.save(d / "model.safetensors")


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Another model of the same design, whose VAE is swapped in; and a folder to write its VAE to."""
    return randomize(LDMPipeline.from_config(TINY, SMALL, seed=1), seed=2), tmp_path_factory.mktemp("vae")


def assert_vae_is(pipe: LDMPipeline, vae) -> None:
    for (k, a), b in zip(pipe.vae.state_dict().items(), vae.state_dict().values()):
        assert torch.equal(a, b), k


def test_original_layout_vae_with_training_leftovers(model, other, tmp_path):
    pipe, path = model
    donor, _ = other
    state = {**donor.vae.state_dict(), "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight":
             torch.randn(8, 3, 4, 4), "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(5)}
    save_file(state, tmp_path / "vae-ft.safetensors")
    torch.save({"state_dict": state}, tmp_path / "vae-ft.ckpt")
    for vae_file in ("vae-ft.safetensors", "vae-ft.ckpt"):
        swapped = LDMPipeline.load(path, vae=tmp_path / vae_file)
        assert_vae_is(swapped, donor.vae)
        assert "4 training leftovers (loss.*, model_ema counters) dropped" in swapped.load_report
        assert swapped.vae.scaling_factor == pipe.vae.scaling_factor and swapped.source.vae == str(tmp_path / vae_file)
        for name in ("unet", "text_encoder"):  # the rest of the model is untouched
            assert all(torch.equal(a, b) for a, b in zip(swapped.modules[name].state_dict().values(),
                                                         pipe.modules[name].state_dict().values()))


def test_the_vae_of_a_whole_checkpoint(model, other, tmp_path):
    _, path = model
    donor, _ = other
    donor.save_single_file(tmp_path / "donor.ckpt")
    donor.save(tmp_path / "donor.safetensors")
    for source in ("donor.ckpt", "donor.safetensors"):
        assert_vae_is(LDMPipeline.load(path, vae=tmp_path / source), donor.vae)


def test_diffusers_vae_folders_and_files_decode_as_diffusers_does(model, other, tmp_path):
    from diffusers import AutoencoderKL

    _, path = model
    donor, d = other
    folder = donor.save_diffusers(d / "donor")
    # diffusers' older attention names, as in many published vae/ folders
    old = tmp_path / "old-vae"
    old.mkdir()
    state = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for k, v in state.items():
        for new, was in OLD_NAMES.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{was}.")
        renamed[k] = v
    assert sum(".query." in k for k in renamed) == 4  # weight and bias, encoder and decoder
    save_file(renamed, old / "diffusion_pytorch_model.safetensors")
    (old / "config.json").write_text((folder / "vae" / "config.json").read_text())
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        reference = AutoencoderKL.from_pretrained(old).decode(z).sample
        for source in (folder, folder / "vae", folder / "vae" / "diffusion_pytorch_model.safetensors", old):
            swapped = LDMPipeline.load(path, vae=source)
            assert_vae_is(swapped, donor.vae)
            ours = swapped.vae.decode(z)
            assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_load_vae_in_place_equals_loading_with_it(model, other, tmp_path):
    _, path = model
    donor, _ = other
    save_file(donor.vae.state_dict(), tmp_path / "vae.safetensors")
    pipe = LDMPipeline.load(path).set_attention_backend("math").load_vae(tmp_path / "vae.safetensors")
    assert_vae_is(pipe, donor.vae)
    assert {m.backend for m in pipe.vae.modules() if hasattr(m, "backend")} == {"math"}  # kept for the new VAE
    assert pipe.model_config.vae == donor.vae.cfg and pipe.source.vae == str(tmp_path / "vae.safetensors")
    a = pipe.generate("a red circle", steps=2, seed=0, output_type="tensor", progress=False)
    b = LDMPipeline.load(path, vae=tmp_path / "vae.safetensors").set_attention_backend("math").generate(
        "a red circle", steps=2, seed=0, output_type="tensor", progress=False)
    assert torch.equal(a, b)


def test_vae_flag_is_recorded_as_a1111_does_and_reused_from_the_png(model, other, tmp_path, capsys):
    _, path = model
    donor, _ = other
    vae = tmp_path / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(donor.vae.state_dict(), vae)
    out = tmp_path / "out"
    assert txt2img.main(["--ckpt", str(path), "--vae", str(vae), "--prompt", "a red circle", "--steps", "2",
                         "--seed", "4", "--device", "cpu", "--out", str(out)]) == 0
    vae_hash = hashlib.sha256(vae.read_bytes()).hexdigest()
    parameters = Image.open(out / "00000-4.png").text["parameters"]
    assert parameters.endswith(f", VAE hash: {vae_hash[:10]}, VAE: vae-ft-mse-840000-ema-pruned.safetensors")
    recorded = read_png_settings(out / "00000-4.png").model
    assert (recorded["vae"], recorded["vae_sha256"]) == (str(vae), vae_hash)
    assert txt2img.main(["--from-png", str(out / "00000-4.png"), "--device", "cpu", "--out", str(tmp_path / "b")]) == 0
    assert Image.open(tmp_path / "b" / "00000-4.png").tobytes() == Image.open(out / "00000-4.png").tobytes()


def test_a_vae_for_other_latents_or_not_a_vae_is_refused(model, tmp_path):
    pipe, path = model
    wide = LDMPipeline.from_config(TINY, [*SMALL, "model.vae.z_channels=8", "model.vae.embed_dim=8",
                                          "model.unet.in_channels=8", "model.unet.out_channels=8"])
    save_file(wide.vae.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"this VAE makes latents of 8 channels at 1/4 of the image size, but "
                                              r"the model's U-Net works on 4 channels at 1/4"):
        LDMPipeline.load(path, vae=tmp_path / "wide.safetensors")
    save_file(pipe.unet.state_dict(), tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=r"unet.safetensors is not a VAE: its \d+ tensors sit under "):
        pipe.load_vae(tmp_path / "unet.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        pipe.load_vae(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="VAE not found"):
        pipe.load_vae(tmp_path / "missing.safetensors")
    config = json.loads((pipe.save_diffusers(tmp_path / "d") / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 4  # the folder itself loads (the test above); a stray tensor does not:
    extra = load_file(tmp_path / "d" / "vae" / "diffusion_pytorch_model.safetensors")
    save_file({**extra, "encoder.extra.weight": torch.zeros(1)},
              tmp_path / "d" / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): encoder.extra.weight"):
        pipe.load_vae(tmp_path / "d" / "vae")
