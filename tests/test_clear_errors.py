"""Bad input to the tools and the library ends in one clear error before the work is done, never in
a traceback after it, a silently wrong result, or lost files: counts, devices, pictures, output
folders, prompts, sizes, nested configs, models that produce NaN, and paths that would clobber."""

import errno
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import FAST, ROOT, TINY, randomize
from ldm import LDMPipeline
from ldm.checkpoint import CONFIG_KEY, read_model_file
from ldm.cli import convert, eval as eval_tool, img2img, inpaint, make_shards, txt2img
from ldm.cli.common import run_main
from ldm.config import load_config
from ldm.convert.diffusers import read_diffusers
from ldm.errors import CheckpointError, ConfigError, NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = ["--config", str(TINY), *[arg for override in FAST for arg in ("--set", override)], "--steps", "1"]


def run(tool, *argv) -> tuple[int, str]:
    """(exit code, stderr) of a tool's entry point; argparse's own refusals exit too."""
    try:
        return run_main(partial(tool.main, [str(a) for a in argv])), ""
    except SystemExit as e:
        return e.code, ""


@pytest.fixture
def model_file(tmp_path_factory) -> Path:
    return randomize(LDMPipeline.from_config(TINY, FAST)).save(tmp_path_factory.mktemp("m") / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def test_eval_counts_must_be_positive_and_its_output_a_file(tmp_path, capsys):
    for flag in ("--n", "--batch-size"):
        assert run(eval_tool, *MODEL[:-2], flag, "0")[0] == 2
        assert f"argument {flag}: must be at least 1 (got 0)" in capsys.readouterr().err
    assert run(eval_tool, *MODEL[:-2], "--out", tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert f"error: --out {tmp_path} is a folder; pass a file path" in err and "note:" not in err


def test_an_unknown_device_is_named(tmp_path, capsys):
    assert run(txt2img, *MODEL, "--prompt", "x", "--device", "banana", "--out", tmp_path) == (2, "")
    err = capsys.readouterr().err
    assert "error: unknown device 'banana'; use cuda, cuda:N, cpu, mps or auto" in err and "note:" not in err


@pytest.mark.parametrize("what", ["text", "folder"])
def test_pictures_that_are_not_images_are_refused_before_the_model_loads(tmp_path, capsys, what):
    bad = tmp_path / "in.png"
    if what == "text":
        bad.write_text("not a picture")
    else:
        bad.mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "ok.png")
    expected = "is not an image file PIL can read" if what == "text" else "is a folder, not an image file"
    for tool, flags in ((img2img, ["--init-image", bad]), (inpaint, ["--image", bad, "--mask", tmp_path / "ok.png"]),
                        (inpaint, ["--image", tmp_path / "ok.png", "--mask", bad])):
        assert run(tool, *MODEL, *flags, "--prompt", "x", "--out", tmp_path / "out")[0] == 2
        err = capsys.readouterr().err
        assert f"error: {bad} {expected}" in err and "note:" not in err  # "note:" comes with the model


def test_an_output_path_that_cannot_take_images_is_refused_before_sampling(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "a-file"
    taken.write_text("mine")
    assert run(txt2img, *MODEL, "--prompt", "x", "--out", taken)[0] == 2
    assert f"error: --out {taken} is a file, not a folder" in capsys.readouterr().err
    assert taken.read_text() == "mine"

    def read_only(self, *args, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert run(txt2img, *MODEL, "--prompt", "x", "--out", tmp_path / "ro")[0] == 2
    assert f"error: cannot write --out to {tmp_path / 'ro'}: the file system is read-only" in capsys.readouterr().err


def test_a_prompt_that_is_not_utf8_is_refused_before_sampling(tmp_path, capsys):
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what a Latin-1 terminal hands Python
    for flag in ("--prompt", "--negative-prompt"):
        argv = ["--prompt", "ok", "--negative-prompt", "ok"]
        argv[argv.index(flag) + 1] = latin1
        assert run(txt2img, *MODEL, *argv, "--out", tmp_path)[0] == 2
        err = capsys.readouterr().err
        assert f"error: {flag} is not valid UTF-8 (a byte at position 3 is in another encoding)" in err
    assert not list(tmp_path.iterdir())


def test_sizes_beyond_the_memory_are_refused_naming_the_limit(tmp_path, capsys, monkeypatch):
    assert run(txt2img, *MODEL, "--prompt", "x", "--height", "100000", "--width", "100000", "--out", tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert "error: 1 image of 100000x100000 needs at least" in err and "not even one image fits" in err
    monkeypatch.setattr("ldm.cli.checks.available_memory", lambda device: 2**30)
    assert run(txt2img, *MODEL, "--prompt", "x", "--n", "100000", "--out", tmp_path)[0] == 2
    err = capsys.readouterr().err
    assert "error: 100000 images of 32x32 need at least" in err and "and 1.0 GiB is free (at most about" in err
    assert "lower --n or the size" in err and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# Files that would be clobbered, and paths that went elsewhere
# ---------------------------------------------------------------------------------------------


def test_convert_refuses_to_write_over_its_input(model_file, capsys):
    before = model_file.read_bytes()
    assert run(convert, model_file, model_file)[0] == 2
    assert "error: input and output are the same" in capsys.readouterr().err
    assert model_file.read_bytes() == before


def test_convert_into_a_diffusers_folder_keeps_the_users_other_files(model_file, tmp_path):
    folder = tmp_path / "diffusers"
    assert run(convert, model_file, folder)[0] == 0
    (folder / "README.md").write_text("my notes")
    (folder / "feature_extractor").mkdir()
    (folder / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    (folder / "unet" / "stale.bin").write_bytes(b"the old model's")
    pipe = LDMPipeline.from_checkpoint(model_file)
    with torch.no_grad():
        pipe.unet.out[-1].bias.add_(1.0)
    changed = pipe.save(tmp_path / "changed.safetensors")
    assert run(convert, changed, folder)[0] == 0
    assert (folder / "README.md").read_text() == "my notes"
    assert (folder / "feature_extractor" / "preprocessor_config.json").read_text() == "{}"
    assert not (folder / "unet" / "stale.bin").exists()  # the model's own folders are replaced whole
    back = read_diffusers(folder).parts["unet"]
    assert torch.equal(back["out.2.bias"], pipe.unet.out[-1].bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed.safetensors", "diffusers"]  # no leftovers


def test_make_shards_into_a_folder_with_a_trailing_slash(tmp_path):
    out = tmp_path / "shards" / "train"
    assert run(make_shards, "--shapes", "3", "--resolution", "16", "--out", f"{out}/", "--quiet")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-index.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["train"]
    assert json.loads((out / "train-index.json").read_text())["samples"] == 3


def test_make_shards_resize_zero_is_refused(tmp_path, capsys):
    assert run(make_shards, "--images", tmp_path, "--out", tmp_path / "s", "--resize", "0")[0] == 2
    assert "argument --resize: must be at least 1 (got 0)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Configs nested beyond reason
# ---------------------------------------------------------------------------------------------


def test_deeply_nested_configs_are_errors_not_recursion_errors(tmp_path, model_file):
    deep = "[" * 100_000 + "]" * 100_000
    tensors, _ = read_model_file(model_file)
    flat = {f"model.diffusion_model.{k}": v for k, v in tensors["unet"].items()}
    save_file(flat, str(tmp_path / "deep.safetensors"), metadata={CONFIG_KEY: deep})
    with pytest.raises(CheckpointError, match="nested too deeply to be a config"):
        LDMPipeline.from_checkpoint(tmp_path / "deep.safetensors")
    (tmp_path / "deep.yaml").write_text(deep)
    with pytest.raises(ConfigError, match="deep.yaml is nested too deeply to be a config"):
        load_config(tmp_path / "deep.yaml")
    folder = LDMPipeline.from_checkpoint(model_file).save_diffusers(tmp_path / "d")
    (folder / "unet" / "config.json").write_text(deep)
    with pytest.raises(CheckpointError, match="config.json is nested too deeply to be a config"):
        read_diffusers(folder)
    with pytest.raises(ConfigError, match="override 'train.steps=.*': the value is not valid YAML"):
        load_config(ROOT / "configs/sd_tiny.yaml", ["train.steps=" + deep])


# ---------------------------------------------------------------------------------------------
# Models that produce NaN
# ---------------------------------------------------------------------------------------------


def test_a_unet_that_produces_nan_stops_sampling_naming_its_file(model_file):
    pipe = LDMPipeline.from_checkpoint(model_file)
    with torch.no_grad():
        pipe.unet.out[-1].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"the U-Net of {model_file} produced NaN/Inf \(\d+% of the sampled "
                                             r"latents\): its weights may hold NaN/Inf, or float32 overflowed"):
        pipe.generate("x", steps=2, seed=0, progress=False)
    pipe.allow_nan = True
    with pytest.warns(UserWarning, match="going on because allow_nan is set"):
        images = pipe.generate("x", steps=2, seed=0, progress=False)
    assert len(images) == 1


def test_a_vae_that_produces_nan_stops_decoding_and_the_tools_say_so(model_file, tmp_path, capsys):
    pipe = LDMPipeline.from_checkpoint(model_file)
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    broken = pipe.save(tmp_path / "broken.safetensors")
    with pytest.raises(NonFiniteError, match=r"the VAE decoder of .*broken.safetensors produced NaN/Inf \(33% of the "
                                             r"decoded pixels\)"):
        LDMPipeline.from_checkpoint(broken).generate("x", steps=1, seed=0, progress=False)
    assert run(txt2img, "--ckpt", broken, "--prompt", "x", "--steps", "1", "--out", tmp_path / "out")[0] == 2
    assert "error: the VAE decoder of" in capsys.readouterr().err and not list((tmp_path / "out").iterdir())
    swapped = LDMPipeline.from_checkpoint(model_file).load_vae(broken)  # a VAE file is named as itself
    with pytest.raises(NonFiniteError, match=rf"the VAE decoder of {broken} produced NaN/Inf"):
        swapped.generate("x", steps=1, seed=0, progress=False)
    with pytest.warns(UserWarning, match="allow_nan"):
        rc = run(txt2img, "--ckpt", broken, "--prompt", "x", "--steps", "1", "--out", tmp_path / "out", "--allow-nan")[0]
    assert rc == 0 and len(list((tmp_path / "out").iterdir())) == 2  # the image and the grid
