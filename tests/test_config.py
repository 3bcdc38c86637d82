import json

import pytest
import torch

from helpers import CONFIGS, SD_TINY
from ldm.config import Config, apply_overrides, from_dict, load_config, load_yaml, resolve_config, to_dict
from ldm.errors import ConfigError


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips_through_json(path):
    cfg = load_config(path)
    again = from_dict(Config, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def test_base_inheritance_overrides_only_what_it_names():
    v = load_config(CONFIGS / "sd21-v.yaml")
    eps = load_config(CONFIGS / "sd21.yaml")
    assert v.model.diffusion.prediction_type == "v" and eps.model.diffusion.prediction_type == "eps"
    assert (v.sample.height, eps.sample.height) == (768, 512)
    assert v.model.unet == eps.model.unet and v.model.text_encoder == eps.model.text_encoder


def test_public_architectures():
    sd15 = load_config(CONFIGS / "sd15.yaml").model
    sd21 = load_config(CONFIGS / "sd21.yaml").model
    assert (sd15.unet.num_heads, sd15.unet.context_dim, sd15.unet.use_linear_in_transformer) == (8, 768, False)
    assert (sd21.unet.num_head_channels, sd21.unet.context_dim, sd21.unet.use_linear_in_transformer) == (64, 1024, True)
    assert (sd15.text_encoder.kind, sd21.text_encoder.kind, sd21.text_encoder.layer) == ("hf_clip", "open_clip", "penultimate")
    assert sd15.latent_factor == 8 and sd15.vae.scaling_factor == 0.18215


def test_overrides_are_parsed_as_yaml_values():
    cfg = load_config(
        SD_TINY,
        ["model.unet.model_channels=32", "sample.cfg=3.5", "train.lr=1e-3", "model.unet.channel_mult=[1, 2, 2]", "sample.negative_prompt=blurry"],
    )
    assert cfg.model.unet.model_channels == 32
    assert cfg.sample.cfg == 3.5
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; float fields accept it
    assert cfg.model.unet.channel_mult == (1, 2, 2)
    assert cfg.sample.negative_prompt == "blurry"


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["model.unet.model_channels"])


def test_unknown_key_suggests_the_nearest_one():
    with pytest.raises(ConfigError, match=r"unknown key Config\.model\.unet\.chanel_mult; did you mean 'channel_mult'"):
        load_config(SD_TINY, ["model.unet.chanel_mult=[1,2]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.unet.model_channels=abc", "model_channels must be an integer"),
        ("model.unet.use_linear_in_transformer=3", "must be true or false"),
        ("model.unet.num_heads=4", "exactly one of num_heads"),
        ("model.unet.context_dim=256", r"context_dim \(256\) must equal text_encoder.width \(128\)"),
        ("model.diffusion.prediction_type=epsilon", "prediction_type must be one of"),
        ("model.diffusion.beta_schedule=quadratic", "beta_schedule must be one of"),
        ("model.unet.attention_resolutions=[8]", r"attention_resolutions \[8\] are not downsampling factors"),
        ("model.unet.model_channels=40", "multiple of norm_groups=32"),
        ("model.text_encoder.kind=t5", "text_encoder.kind must be one of"),
        ("train.timestep_shift=0", r"timestep_shift must be > 0, 1 for uniform"),
        ("train.text_encoder_lr=0", r"text_encoder_lr must be > 0, or null to use train.lr"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SD_TINY, [override])


def test_base_loops_and_missing_files_are_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_yaml(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")


def test_shipped_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names do not depend on the working directory
    assert resolve_config("sd15") == resolve_config("sd15.yaml") == CONFIGS / "sd15.yaml"
    assert load_config("sd21-v") == load_config(CONFIGS / "sd21-v.yaml")  # `base:` is found beside it
    with pytest.raises(ConfigError, match=r"config 'sd16' not found: pass a YAML path or one of the names in "
                                          r"configs/ \(sd-x4-upscaler, sd15, sd15_finetune, sd21, .*sd_tiny"):
        load_config("sd16")
    with pytest.raises(ConfigError, match="config 'configs/sd15.yaml' not found"):
        load_config("configs/sd15.yaml")  # a path is a path: relative to the working directory


def test_mixed_precision_reads_a_bare_no_and_auto_follows_the_device(monkeypatch):
    from ldm.train import accelerator as loop

    assert load_config(SD_TINY, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML's false
    assert load_config(SD_TINY, ["train.mixed_precision=auto"]).train.mixed_precision == "auto"
    with pytest.raises(ConfigError, match=r"train.mixed_precision must be one of .*'auto'.* \(got 'bf17'\)"):
        load_config(SD_TINY, ["train.mixed_precision=bf17"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert loop.resolve_mixed_precision("auto") == "no" and loop.resolve_mixed_precision("bf16") == "bf16"
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert loop.resolve_mixed_precision("auto") == "bf16" and loop.resolve_mixed_precision("no") == "no"
