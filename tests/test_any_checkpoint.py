"""Any checkpoint in every tool: `LDMPipeline.load` and `--ckpt` read our model file, original single files
(.safetensors, .ckpt, misnamed ones, the older SD 1.x text-encoder layout) and diffusers folders, told
apart by the file itself; the --config / --prediction-type hints; the model used without --ckpt.

The files are written from one small random model in the SD 1.x conventions (so that detection gives
its architecture back) with our own writers."""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import TINY, TINY_SD1, randomize
from ldm import LDMPipeline
from ldm.cli import bench, convert, eval as eval_tool, img2img, inpaint, measure_load_memory, model_choice, txt2img
from ldm.cli.common import add_model_args
from ldm.config import load_config
from ldm.convert import detect_config
from ldm.errors import CheckpointError
from ldm.png_settings import read_png_settings

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = [*TINY_SD1, "sample.height=32", "sample.width=32", "sample.steps=2"]
SIZE = ["--height", "32", "--width", "32"]  # original files carry no sampling defaults: 512 px unless told


@pytest.fixture(scope="module")
def pipe() -> LDMPipeline:
    return randomize(LDMPipeline.from_config(TINY, SMALL, seed=0))


@pytest.fixture(scope="module")
def files(pipe, tmp_path_factory):
    """The model in every format, and misnamed: {name: path}."""
    d = tmp_path_factory.mktemp("models")
    out = {
        "ours": pipe.save(d / "ours.safetensors"),
        "single_st": pipe.save_single_file(d / "single.safetensors"),
        "single_ckpt": pipe.save_single_file(d / "single.ckpt"),
        "diffusers": pipe.save_diffusers(d / "diffusers"),
    }
    out["ckpt_named_bin"] = shutil.copy(out["single_ckpt"], d / "weights.bin")
    out["safetensors_named_ckpt"] = shutil.copy(out["single_st"], d / "really-safetensors.ckpt")
    return out


def same_weights(a: LDMPipeline, b: LDMPipeline) -> bool:
    return all(torch.equal(x, y) for name in ("unet", "vae", "text_encoder")
               for x, y in zip(a.modules[name].state_dict().values(), b.modules[name].state_dict().values()))


@pytest.mark.parametrize("name, fmt", [("ours", "ours"), ("single_st", "single"), ("single_ckpt", "single"),
                                       ("diffusers", "diffusers"), ("ckpt_named_bin", "single"),
                                       ("safetensors_named_ckpt", "single")])
def test_load_reads_every_format_from_the_file_itself(pipe, files, name, fmt):
    loaded = LDMPipeline.load(files[name])
    assert loaded.source.format == fmt and loaded.source.path == str(files[name])
    assert same_weights(loaded, pipe)
    assert loaded.model_config.unet == pipe.model_config.unet  # detection gives the architecture back


def test_a_ckpt_is_never_called_corrupt(files):
    with pytest.raises(CheckpointError, match=r"is a PyTorch pickle checkpoint \(\.ckpt\), not an ldm model file; "
                                              r"load it with LDMPipeline\.load\(path\)") as e:
        LDMPipeline.from_checkpoint(files["single_ckpt"])
    assert "corrupt" not in str(e.value) and "truncated" not in str(e.value)


def test_older_text_encoder_layout_loads(pipe, tmp_path, files):
    """SD 1.x files saved before transformers' CLIP gained `text_model.`: cond_stage_model.transformer.{embeddings,
    encoder,final_layer_norm}.*"""
    state = load_file(files["single_st"])
    root = "cond_stage_model.transformer."
    old = {(root + k[len(root + "text_model."):] if k.startswith(root + "text_model.") else k): v
           for k, v in state.items()}
    assert root + "embeddings.token_embedding.weight" in old and root + "final_layer_norm.weight" in old
    with pytest.raises(CheckpointError, match="cannot detect the text encoder"):
        detect_config(old)  # detection alone sees the standard layout only
    save_file(old, tmp_path / "old.safetensors")
    loaded = LDMPipeline.load(tmp_path / "old.safetensors")
    assert same_weights(loaded, pipe)
    n_text = len(pipe.text_encoder.state_dict()) + 1  # + position_ids, which the file carries too
    assert f"older layout without 'text_model.': {n_text} keys moved under it" in loaded.load_report
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(["a red circle"]), pipe.text_encoder(["a red circle"]))


def test_vae_attention_stored_as_linear_weights_loads(pipe, tmp_path, files):
    state = load_file(files["single_st"])
    attn = [k for k in state if ".mid.attn_1." in k and k.endswith("weight") and state[k].ndim == 4]
    assert len(attn) == 8  # q, k, v, proj_out in the encoder and the decoder
    save_file({k: (v.flatten(1) if k in attn else v) for k, v in state.items()}, tmp_path / "linear.safetensors")
    loaded = LDMPipeline.load(tmp_path / "linear.safetensors")
    assert same_weights(loaded, pipe) and "8 reshaped to 1x1 convolutions" in loaded.load_report


def test_prediction_type_and_config_hints(pipe, files):
    assert LDMPipeline.load(files["single_st"]).diffusion.prediction_type == "eps"
    for name in ("single_st", "ours", "diffusers"):
        hinted = LDMPipeline.load(files[name], prediction_type="v_prediction")
        assert hinted.diffusion.prediction_type == "v" and hinted.source.prediction_type == "v"
    # a model that breaks the SD 1.x conventions (heads of 32 channels): the shapes load either way,
    # and only its config makes the U-Net compute what it was trained to
    plain = randomize(LDMPipeline.from_config(TINY, ["sample.height=32", "sample.width=32"], seed=0))
    path = plain.save_single_file(files["ours"].parent / "unconventional.ckpt")
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 128)
    with torch.no_grad():
        want = plain.unet(x, t, ctx)
        guessed = LDMPipeline.load(path).unet(x, t, ctx)
        config = load_config(TINY, ["sample.height=32", "sample.width=32"])
        given = LDMPipeline.load(path, config=config).unet(x, t, ctx)
    assert torch.equal(given, want) and not torch.allclose(guessed, want, atol=1e-3)
    with pytest.raises(CheckpointError, match="diffusers folder, whose configs describe it; drop --config"):
        LDMPipeline.load(files["diffusers"], config=TINY)


def test_config_and_overrides_beside_ckpt_replace_detection_and_are_recorded(files, tmp_path):
    """A1111's "clip skip 2" for an SD 1.x file: the architecture given with --config, one setting changed."""
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--ckpt", str(files["single_ckpt"]), "--config", str(TINY),
                              *[a for o in SMALL for a in ("--set", o)],
                              "--set", "model.text_encoder.layer=penultimate",
                              "--device", "cpu"])
    pipe = model_choice.load_pipeline(args)
    assert pipe.text_encoder.cfg.layer == "penultimate" and pipe.defaults.height == 32
    assert pipe.source.config == str(TINY) and pipe.source.overrides[-1] == "model.text_encoder.layer=penultimate"
    assert pipe.source.record()["overrides"][-1] == "model.text_encoder.layer=penultimate"


@pytest.mark.parametrize("name", ["single_ckpt", "single_st", "diffusers", "ours"])
def test_txt2img_takes_every_format_and_records_it(files, tmp_path, capsys, name):
    out = tmp_path / "out"
    assert txt2img.main(["--ckpt", str(files[name]), "--prompt", "a red circle", "--steps", "2", "--seed", "3",
                         *SIZE, "--out", str(out), "--device", "cpu"]) == 0
    settings = read_png_settings(out / "00000-3.png")
    assert settings.model["path"] == str(files[name])
    sha = settings.model["sha256"]
    if name == "diffusers":
        assert sha is None and "Model hash" not in (out / "00000-3.png").read_bytes().decode("latin-1")
    else:
        assert sha == hashlib.sha256(files[name].read_bytes()).hexdigest()


def test_image_tools_eval_convert_bench_take_a_ckpt(files, tmp_path, capsys):
    Image.new("RGB", (32, 32), "white").save(tmp_path / "in.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "mask.png")
    ckpt = str(files["single_ckpt"])
    common = ["--ckpt", ckpt, "--prompt", "a red circle", "--steps", "2", "--seed", "1", "--device", "cpu"]
    assert img2img.main([*common, "--init-image", str(tmp_path / "in.png"), "--out", str(tmp_path / "i2i")]) == 0
    assert inpaint.main([*common, "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                         "--out", str(tmp_path / "inp")]) == 0
    assert eval_tool.main(["--ckpt", ckpt, "--n", "4", "--resolution", "32", "--skip-adherence", "--batch-size",
                           "4", "--device", "cpu"]) == 0
    assert re.search(r"^loss +\d+\.\d{4}\b", capsys.readouterr().out, re.M)
    assert convert.main(["--ckpt", ckpt, str(tmp_path / "converted.safetensors")]) == 0
    assert same_weights(LDMPipeline.load(tmp_path / "converted.safetensors"), LDMPipeline.load(ckpt))
    assert bench.main(["--ckpt", ckpt, "--workloads", "unet", "--resolution", "32", "--repeats", "1", "--warmup",
                       "0", "--device", "cpu"]) == 0
    assert f"{ckpt} on cpu" in capsys.readouterr().out


@pytest.mark.slow  # two fresh processes importing torch and transformers: about 40 s on 2 busy cores
def test_measure_load_memory_takes_a_ckpt(files, capsys):
    assert measure_load_memory.main(["--ckpt", str(files["single_st"])]) == 0
    assert "single.safetensors" in capsys.readouterr().out


def test_without_ckpt_the_trained_model_or_the_environment_variable_is_used(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(model_choice.CHECKPOINT_ENV, raising=False)
    args = ["--prompt", "x", "--steps", "1", "--seed", "0", *SIZE, "--device", "cpu", "--out", str(tmp_path / "o")]
    with pytest.raises(ValueError) as e:
        txt2img.main(args)
    assert "pass --ckpt MODEL" in str(e.value) and "or set LDM_CHECKPOINT=MODEL" in str(e.value)
    assert "runs/sd_tiny/model.safetensors, which the README's training writes" in str(e.value)

    monkeypatch.setenv(model_choice.CHECKPOINT_ENV, str(files["single_ckpt"]))
    assert txt2img.main(args) == 0
    assert f"note: using model {files['single_ckpt']} (from $LDM_CHECKPOINT" in capsys.readouterr().err

    monkeypatch.setenv(model_choice.CHECKPOINT_ENV, str(tmp_path / "gone.safetensors"))
    with pytest.raises(ValueError, match=r"\$LDM_CHECKPOINT names .*gone.safetensors, which does not exist"):
        txt2img.main(args)

    monkeypatch.delenv(model_choice.CHECKPOINT_ENV)
    (tmp_path / "runs" / "sd_tiny").mkdir(parents=True)
    shutil.copy(files["ours"], tmp_path / "runs" / "sd_tiny" / "model.safetensors")
    assert txt2img.main(args) == 0
    assert "note: using model runs/sd_tiny/model.safetensors (what the README's training writes" in \
        capsys.readouterr().err


def test_bad_model_flags_are_refused_before_loading(files, tmp_path):
    args = ["--prompt", "x", "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="--set overrides apply to a --config"):
        txt2img.main(["--ckpt", str(files["ours"]), "--set", "model.unet.model_channels=8", *args])
    with pytest.raises(CheckpointError, match="not found"):
        txt2img.main(["--ckpt", str(tmp_path / "missing.ckpt"), *args])
    (tmp_path / "page.safetensors").write_text("<html>Not Found</html>")
    with pytest.raises(CheckpointError, match="neither a .safetensors file nor a PyTorch pickle"):
        txt2img.main(["--ckpt", str(tmp_path / "page.safetensors"), *args])
    with pytest.raises(SystemExit):
        txt2img.main(["--ckpt", str(files["ours"]), "--prediction-type", "velocity", *args])


def test_serve_offers_models_in_every_format(pipe, files, tmp_path, caplog):
    from ldm.cli.serve import build_parser, catalog_from_args

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(files["single_ckpt"], models / "a.ckpt")
    shutil.copytree(files["diffusers"], models / "b")
    save_file(pipe.vae.state_dict(), models / "just-a-vae.safetensors")
    args = build_parser().parse_args(["--ckpt", str(files["single_st"]), "--models-dir", str(models),
                                      "--device", "cpu"])
    catalog = catalog_from_args(args)
    assert list(catalog.entries) == ["single.safetensors", "a.ckpt", "b"]  # b's own files are not models
    assert "skipping" in caplog.text and "just-a-vae.safetensors" in caplog.text
    for title, entry in catalog.entries.items():
        assert entry.cfg.model.unet == pipe.model_config.unet  # known before loading
    loaded = catalog.pipeline("a.ckpt")
    assert same_weights(loaded, pipe) and catalog.entries["a.ckpt"].sha256 == hashlib.sha256(
        (models / "a.ckpt").read_bytes()).hexdigest()
    assert catalog.entries["a.ckpt"].record()["path"] == str(models / "a.ckpt")
