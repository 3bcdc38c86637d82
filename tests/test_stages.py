"""Two stages from one command: which data stage 1 reads (the user's, unless the VAE config sets
its own), and errors that come before any training."""

import dataclasses
from pathlib import Path

import pytest

from helpers import ROOT
from ldm.config import load_config
from ldm.config_io import missing_start
from ldm.train.stages import stage1_config, train_stages



def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_quickstart_stage_1_is_vae_tiny_as_it_is():
    assert stage1_config(load_config(ROOT / "configs/sd_tiny.yaml")) == load_config(ROOT / "configs/vae_tiny.yaml")
    small, vae_small = stage1_config(load_config(ROOT / "configs/sd_small.yaml")), load_config(ROOT / "configs/vae_small.yaml")
    assert small.data.num_workers == 8  # sd_small's loader setting carries; the rest is vae_small's
    assert dataclasses.replace(small, data=dataclasses.replace(small.data, num_workers=2)) == vae_small


def test_the_users_data_carries_into_stage_1_unless_the_vae_config_sets_it(tmp_path):
    vae = write(tmp_path / "vae.yaml", f"base: {ROOT / 'configs/vae_tiny.yaml'}\n")  # resolution 32, its own
    mine = write(tmp_path / "mine.yaml", f"base: {ROOT / 'configs/sd_tiny.yaml'}\n"
                 f"data:\n  source: folder\n  urls: /photos\n  crop: random\n  resolution: 64\n"
                 f"train:\n  vae_config: {vae}\n")
    cfg = load_config(mine)
    stage1 = stage1_config(cfg)
    d = stage1.data
    assert (d.source, d.urls, d.crop) == ("folder", "/photos", "random")  # carried
    assert (d.resolution, d.shapes_max_objects, d.caption_dropout) == (32, 4, 0.1)  # the VAE config's own
    assert stage1.train.output_dir == "runs/vae_tiny" and stage1.train.steps == 1500  # its train section stays
    # Command-line data overrides reach both stages, over the VAE config's own keys too.
    overrides = ["data.resolution=16", "train.steps=7"]
    stage1 = stage1_config(load_config(mine, overrides), overrides)
    assert stage1.data.resolution == 16 and stage1.train.steps == 1500
    # A VAE config with its own data keeps it.
    own = write(tmp_path / "own.yaml", f"base: {vae}\ndata:\n  source: shards\n  urls: /vae-shards\n")
    stage1 = stage1_config(load_config(mine, [f"train.vae_config={own}"]))
    assert (stage1.data.source, stage1.data.urls, stage1.data.crop) == ("shards", "/vae-shards", "random")


def test_bad_data_and_mismatched_paths_fail_before_stage_1(tmp_path):
    vae = write(tmp_path / "vae.yaml", f"base: {ROOT / 'configs/vae_tiny.yaml'}\ntrain:\n  output_dir: {tmp_path}/vae\n")
    common = [f"train.vae_config={vae}", f"train.output_dir={tmp_path}/ldm"]
    cfg = load_config(ROOT / "configs/sd_tiny.yaml", [*common, f"train.vae_checkpoint={tmp_path}/other/vae.safetensors"])
    with pytest.raises(ValueError, match=r"other/vae.safetensors does not exist, and stage 1 .* would write "
                                         r".*vae/vae.safetensors instead"):
        train_stages(cfg, log=lambda line: None)
    cfg = load_config(ROOT / "configs/sd_tiny.yaml", [*common, f"train.vae_checkpoint={tmp_path}/vae/vae.safetensors",
                                                      "data.source=folder", f"data.urls={tmp_path}/empty"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images in"):
        train_stages(cfg, log=lambda line: None)
    assert not (tmp_path / "vae").exists() and not (tmp_path / "ldm").exists()
    cfg = load_config(ROOT / "configs/sd_tiny.yaml", [f"train.vae_checkpoint={tmp_path}/none.safetensors",
                                                      "train.vae_config="])
    with pytest.raises(ValueError, match="train.vae_config is empty"):
        train_stages(cfg, log=lambda line: None)


def test_a_missing_base_model_fails_before_any_training(tmp_path):
    # sr_tiny_128 fine-tunes sr_tiny: both of its stages start from a file (missing here).
    vae = write(tmp_path / "vae.yaml", f"base: {ROOT / 'configs/vae_sr_tiny_128.yaml'}\n"
                f"train:\n  output_dir: {tmp_path}/vae\n  init_from: {tmp_path}/vae_sr_tiny/vae.safetensors\n")
    common = [f"train.vae_config={vae}", f"train.vae_checkpoint={tmp_path}/vae/vae.safetensors",
              f"train.output_dir={tmp_path}/sr"]
    cfg = load_config(ROOT / "configs/sr_tiny_128.yaml", [*common, f"train.init_from={tmp_path}/sr_tiny/model.safetensors"])
    with pytest.raises(ValueError, match=r"^train.init_from: .*sr_tiny/model.safetensors not found: check the path"):
        train_stages(cfg, log=lambda line: None)
    cfg = load_config(ROOT / "configs/sr_tiny_128.yaml", [*common, f"train.init_from={tmp_path}"])  # exists: stage 1's is checked
    with pytest.raises(ValueError, match=r"^train.init_from of .*vae.yaml: .*vae_sr_tiny/vae.safetensors not found"):
        train_stages(cfg, log=lambda line: None)
    assert not (tmp_path / "vae").exists() and not (tmp_path / "sr").exists()


def test_missing_start_names_the_shipped_run_that_writes_the_file():
    assert "`python tools/train_ldm.py configs/sr_tiny.yaml` writes it" in missing_start("runs/sr_tiny/model.safetensors")
    assert "`python tools/train_ldm.py configs/sd_tiny.yaml` or `python tools/train_vae.py configs/vae_tiny.yaml`" \
        in missing_start("runs/vae_tiny/vae.safetensors")
    assert missing_start("elsewhere/model.safetensors").endswith("check the path, or point train.init_from at an "
                                                                 "existing model file or folder")
