"""Original Stable Diffusion single-file checkpoints: reading, architecture detection, strict loading.

Checkpoints are built here from small random models saved in the original key layout, with the
extras real files carry (schedule buffers, EMA copies, HF CLIP position_ids, VAE loss weights);
full-size SD 1.5 / 2.1 detection runs on shapes only (networks built on the meta device).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import CONFIGS, TINY, TINY_SD1
from ldm.checkpoint import PREFIXES
from ldm.config import load_config
from ldm.build import ModelState
from ldm.convert import detect_config, ema_key, read_checkpoint
from ldm.convert.single_file import write
from ldm.errors import CheckpointError
from ldm.models import build_models
from ldm.pipeline import LDMPipeline


TEXT_SMALL = [
    "model.unet.context_dim=128",
    "model.text_encoder.width=128",
    "model.text_encoder.layers=2",
    "model.text_encoder.heads=2",  # CLIP convention: heads of 64 channels
    "model.text_encoder.intermediate_size=256",
]
SD1_SMALL = [
    "model.unet.model_channels=32",
    "model.vae.ch=32",
    "model.vae.ch_mult=[1,2]",
    "model.text_encoder.projection_dim=128",
    *TEXT_SMALL,
]
SD2_SMALL = [
    "model.unet.model_channels=64",  # SD 2.x heads are 64 channels wide
    "model.unet.channel_mult=[1,2,2]",
    "model.vae.ch=32",
    "model.vae.ch_mult=[1,2,2]",
    "model.vae.attn_resolutions=[4]",
    "model.text_encoder.projection_dim=64",
    *TEXT_SMALL,
    "model.text_encoder.layers=3",
]
# The x4 upscaler's layout at a tenth of its width: 8 heads per level, self-attention off at levels 0-2.
X4_SMALL = ["model.unet.model_channels=32", "model.vae.ch=32", "model.text_encoder.projection_dim=128", *TEXT_SMALL]
SMALL = {
    "sd1": ("sd15.yaml", SD1_SMALL),
    "sd2": ("sd21.yaml", SD2_SMALL),
    "inpaint": ("sd15.yaml", [*SD1_SMALL, "model.unet.in_channels=9"]),
    "tiny": ("../tests/configs/tiny64.yaml", TINY_SD1),
    "x4": ("sd-x4-upscaler.yaml", X4_SMALL),
}


@functools.lru_cache(maxsize=None)
def small_pipe(name: str) -> LDMPipeline:
    """A small random model (shared by the tests: never modify it)."""
    base, overrides = SMALL[name]
    return LDMPipeline.from_config(load_config(CONFIGS / base, overrides), seed=0)


@functools.lru_cache(maxsize=None)
def small_state(name: str) -> dict[str, torch.Tensor]:
    """`small_pipe(name)` in the original layout with all extras (shared: copy before changing)."""
    return original_state(small_pipe(name))


def low_scale_buffers(pipe: LDMPipeline) -> dict[str, torch.Tensor]:
    """What the original x4 upscaler's `AbstractLowScaleModel.register_schedule` stores (float32):
    its "linear" schedule, sqrt(beta) evenly spaced, over 1000 steps."""
    low = pipe.model_config.low_res
    betas = torch.linspace(math.sqrt(low.beta_start), math.sqrt(low.beta_end), low.num_timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": torch.cat([ac.new_ones(1), ac[:-1]]),
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": ac.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
    }
    return {f"low_scale_model.{k}": v.float() for k, v in out.items()}


def schedule_buffers(pipe: LDMPipeline) -> dict[str, torch.Tensor]:
    """The schedule buffers the original `LatentDiffusion.register_schedule` stores (float32), with
    its per-timestep `logvar`."""
    return {**write.schedule_buffers(pipe.diffusion), "logvar": torch.zeros(pipe.diffusion.num_timesteps)}


def original_state(pipe: LDMPipeline, *, extras: bool = True) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original single-file prefixes, plus (with `extras`) what
    real files also hold: schedule buffers, EMA copies, position_ids and VAE loss weights."""
    state = {}
    for name, module in pipe.modules.items():
        for k, v in module.state_dict().items():
            state[PREFIXES[name] + k] = v.detach().clone()
    if extras:
        state.update(schedule_buffers(pipe))
        if pipe.model_config.low_res is not None:
            state.update(low_scale_buffers(pipe))
        for k, v in pipe.unet.state_dict().items():
            state[ema_key(k)] = 0.5 * v + 0.25  # any values that differ from the trained weights
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
        state["first_stage_model.loss.logvar"] = torch.zeros(())
        state["first_stage_model.loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
        if pipe.text_encoder.cfg.kind == "hf_clip":
            n = pipe.text_encoder.cfg.context_length
            state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(n)[None]
    return state


def assert_same_weights(pipe: LDMPipeline, state: dict[str, torch.Tensor], *, use_ema: bool = False) -> None:
    for name, module in pipe.modules.items():
        for k, v in module.state_dict().items():
            ref = state[ema_key(k)] if use_ema and name == "unet" else state[PREFIXES[name] + k]
            assert v.dtype == ref.dtype, (name, k)
            assert torch.equal(v, ref), (name, k)


@pytest.fixture(scope="module")
def sd1() -> tuple[LDMPipeline, dict[str, torch.Tensor]]:
    return small_pipe("sd1"), small_state("sd1")


@pytest.fixture(scope="module")
def sd1_file(sd1, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sd1") / "model.safetensors"
    save_file(sd1[1], str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, prediction_type",
    [("sd15.yaml", None), ("sd21.yaml", None), ("sd21-v.yaml", "v"), ("sd15.yaml", "eps")],
)
def test_detects_full_size_models_from_shapes(config, prediction_type):
    expected = load_config(CONFIGS / config).model
    with torch.device("meta"):
        unet, vae, text = build_models(expected)
    state = {}
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        state.update({PREFIXES[name] + k: v for k, v in module.state_dict().items()})
    detected, report = detect_config(state, prediction_type=prediction_type)
    assert detected == expected
    assert ("assumed" in report) == (prediction_type is None)
    assert ("1.x" if "15" in config else "2.x") in report


@pytest.mark.parametrize("name", list(SMALL))
def test_detection_gives_back_the_config_that_built_the_weights(name):
    pipe = small_pipe(name)
    detected, report = detect_config(small_state(name))
    assert detected == pipe.model_config
    assert ("inpainting" in report) == (name == "inpaint")
    assert ("upscaler" in report) == (name == "x4")
    assert f"{ {'inpaint': 9, 'x4': 7}.get(name, 4)} input channels" in report


def test_detect_v_prediction_when_asked(sd1):
    detected, report = detect_config(sd1[1], prediction_type="v")
    assert detected.diffusion.prediction_type == "v"
    assert "as given" in report


def test_diffusers_unet_state_dict_gets_a_hint():
    state = {
        "conv_in.weight": torch.zeros(320, 4, 3, 3),
        "time_embedding.linear_1.weight": torch.zeros(1280, 320),
        "down_blocks.0.resnets.0.norm1.weight": torch.zeros(320),
    }
    with pytest.raises(CheckpointError, match=r"3 tensors under .*diffusers.*from_diffusers"):
        detect_config(state)


def test_bare_unet_state_dict_gets_a_hint(sd1):
    pipe, _ = sd1
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\..*bare U-Net"):
        detect_config(pipe.unet.state_dict())


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_safetensors_loads_bit_exact_and_reports(sd1, sd1_file):
    pipe, state = sd1
    loaded = LDMPipeline.from_single_file(sd1_file)
    assert loaded.model_config == pipe.model_config
    assert_same_weights(loaded, state)
    assert loaded.dtype == torch.float32
    report = loaded.load_report
    assert "Stable Diffusion 1.x" in report
    assert f"{len(pipe.unet.state_dict())} EMA tensors" in report
    assert "match the schedule" in report
    assert "VAE loss" in report
    # the re-created (non-persistent) position ids make the text encoder compute what it did
    tokens = pipe.text_encoder.tokenize(["a red circle", ""])
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(tokens), pipe.text_encoder(tokens))
        x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
        assert torch.equal(loaded.unet(x, 10, ctx), pipe.unet(x, 10, ctx))


def test_loaded_weights_are_memory_mapped_not_copied(sd1_file):
    loaded = LDMPipeline.from_single_file(sd1_file)
    mapped = read_checkpoint(sd1_file)
    # the parameters use the file's mapping directly: writing to them does not touch the file
    w = loaded.unet.input_blocks[0][0].weight
    assert not w.is_meta and w.device.type == "cpu"
    with torch.no_grad():
        w.add_(1)
    assert torch.equal(read_checkpoint(sd1_file)["model.diffusion_model.input_blocks.0.0.weight"],
                       mapped["model.diffusion_model.input_blocks.0.0.weight"])


@pytest.mark.parametrize("wrapped", [True, False])
def test_ckpt_with_and_without_state_dict_wrapper(tmp_path, wrapped):
    pipe, state = small_pipe("sd2"), small_state("sd2")
    obj = {"state_dict": state, "global_step": 470000, "epoch": 3} if wrapped else state
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    loaded = LDMPipeline.from_single_file(path)
    assert loaded.model_config == pipe.model_config
    assert loaded.text_encoder.cfg.kind == "open_clip"
    assert_same_weights(loaded, state)


def test_legacy_non_zip_pickle_loads(tmp_path, sd1):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": sd1[1]}, path, _use_new_zipfile_serialization=False)
    assert_same_weights(LDMPipeline.from_single_file(path), sd1[1])


def test_fp16_stays_fp16_and_dtype_converts(tmp_path, sd1):
    pipe, _ = sd1
    state = {k: v.half() if v.is_floating_point() else v for k, v in sd1[1].items()}
    path = tmp_path / "fp16.safetensors"
    save_file(state, str(path))
    half = LDMPipeline.from_single_file(path)
    assert half.dtype == torch.float16
    assert all(p.dtype == torch.float16 for m in half.modules.values() for p in m.parameters())
    assert_same_weights(half, state)
    full = LDMPipeline.from_single_file(path, dtype="fp32")
    assert all(p.dtype == torch.float32 for m in full.modules.values() for p in m.parameters())
    assert torch.equal(full.unet.out[2].weight, state["model.diffusion_model.out.2.weight"].float())
    # integer buffers keep their dtype
    ids = full.text_encoder.transformer.text_model.embeddings.position_ids
    assert ids.dtype == torch.int64 and torch.equal(ids[0], torch.arange(77))


def test_use_ema_loads_the_ema_weights(sd1, sd1_file):
    pipe, state = sd1
    loaded = LDMPipeline.from_single_file(sd1_file, use_ema=True)
    assert_same_weights(loaded, state, use_ema=True)
    assert not torch.equal(loaded.unet.out[0].weight, pipe.unet.out[0].weight)
    assert "EMA weights" in loaded.load_report


def test_use_ema_without_ema_weights_is_an_error(tmp_path, sd1):
    path = tmp_path / "emaonly.safetensors"
    save_file(original_state(sd1[0], extras=False), str(path))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        LDMPipeline.from_single_file(path, use_ema=True)
    assert_same_weights(LDMPipeline.from_single_file(path), sd1[1])


def test_partial_ema_is_an_error(tmp_path, sd1):
    state = dict(sd1[1])
    del state[ema_key("out.2.weight")]
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"EMA copies for \d+ of \d+ .*out\.2\.weight"):
        LDMPipeline.from_single_file(path, use_ema=True)


def test_mismatched_alphas_cumprod_is_an_error(tmp_path, sd1):
    state = dict(sd1[1])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)  # DDPM's linear schedule
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    del state["betas"]
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    expected = r"alphas_cumprod .*first 0\.9999.*scaled_linear 0\.00085\.\.0\.012.*first 0\.99915"
    with pytest.raises(CheckpointError, match=expected):
        LDMPipeline.from_single_file(path)


def test_unknown_key_is_an_error_naming_it(tmp_path, sd1):
    state = dict(sd1[1])
    state["control_model.zero_convs.0.weight"] = torch.zeros(3)
    state["model.diffusion_model.extra.weight"] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"control_model\.zero_convs\.0\.weight"):
        LDMPipeline.from_single_file(path)
    del state["control_model.zero_convs.0.weight"]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): extra\.weight"):
        LDMPipeline.from_single_file(path)


def test_stray_ema_key_is_an_error(tmp_path, sd1):
    state = dict(sd1[1])
    state["model_ema.diffusion_modelnotaweight"] = torch.zeros(3)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="model_ema.diffusion_modelnotaweight"):
        LDMPipeline.from_single_file(path)


def test_damaged_position_ids_are_replaced(tmp_path, sd1, caplog):
    pipe, state = sd1
    state = dict(state)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[key] = torch.arange(77, dtype=torch.float32)[None] - 1e-3  # as in some merged files
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    loaded = LDMPipeline.from_single_file(path)
    assert "damaged" in loaded.load_report
    assert torch.equal(loaded.text_encoder.transformer.text_model.embeddings.position_ids[0], torch.arange(77))


def test_config_overrides_detection(tmp_path):
    # the tiny test model breaks the SD 1.x conventions (heads of 32, VAE norm groups 8): the shapes
    # are the same either way, so detection cannot know; the config says it
    pipe = LDMPipeline.from_config(TINY, seed=3)
    state = original_state(pipe)
    path = tmp_path / "tiny.safetensors"
    save_file(state, str(path))
    guessed = LDMPipeline.from_single_file(path).model_config
    assert (guessed.unet.num_heads, guessed.vae.norm_groups) == (8, 32)
    loaded = LDMPipeline.from_single_file(path, config=TINY)
    assert loaded.model_config == pipe.model_config
    assert_same_weights(loaded, state)
    assert "given" in loaded.load_report


def test_from_state_checks_keys(sd1):
    pipe, _ = sd1
    parts = {name: dict(m.state_dict()) for name, m in pipe.modules.items()}
    del parts["vae"]["quant_conv.weight"]
    cfg = load_config(CONFIGS / "sd15.yaml", SD1_SMALL)
    with pytest.raises(CheckpointError, match=r"(?s)\[vae\].*missing \(1\): quant_conv\.weight"):
        LDMPipeline.from_state(ModelState(cfg, parts))


# ---------------------------------------------------------------------------------------------
# Unsafe and broken files
# ---------------------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path, sd1):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": sd1[1], "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        LDMPipeline.from_single_file(path)
    msg = str(info.value)
    assert "arbitrary code" in msg
    assert "tools/convert.py --trust-pickle" in msg and "evil.safetensors" in msg
    assert "system" in msg  # names what the pickle wanted to import
    assert not marker.exists()


def test_trusted_pickle_with_unimportable_classes_loads(tmp_path, sd1):
    # a training callback of a framework that is not installed, as in many SD 1.x .ckpt files
    fake = types.ModuleType("not_installed_framework")

    class Callback:
        def __init__(self):
            self.monitor = "val/loss"

    Callback.__module__ = fake.__name__
    Callback.__qualname__ = "Callback"
    fake.Callback = Callback
    sys.modules[fake.__name__] = fake
    try:
        path = tmp_path / "trainer.ckpt"
        torch.save({"state_dict": sd1[1], "callbacks": {"cb": Callback()}}, path)
    finally:
        del sys.modules[fake.__name__]
    with pytest.raises(CheckpointError, match="not_installed_framework.Callback"):
        read_checkpoint(path)
    state = read_checkpoint(path, trust_pickle=True)
    assert state.keys() == sd1[1].keys()


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    path.write_bytes(noise.numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: 4096 bytes"):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_truncated_file_is_reported(tmp_path, sd1, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_file(sd1[1], str(path))
    else:
        torch.save(sd1[1], path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="directory"):
        read_checkpoint(tmp_path)


def test_non_tensor_entries_in_a_state_dict_are_named(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a.weight": torch.zeros(2), "note": "hello"}}, path)
    with pytest.raises(CheckpointError, match="not tensors: note"):
        read_checkpoint(path)


def test_schedule_tolerance_accepts_fp16_buffers(tmp_path, sd1):
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in sd1[1].items()}
    assert not math.isclose(state["alphas_cumprod"][-1].item(), sd1[1]["alphas_cumprod"][-1].item(), rel_tol=1e-6)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    assert LDMPipeline.from_single_file(path).dtype == torch.float16


def test_sdxl_layout_is_named():
    state = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
    }
    with pytest.raises(CheckpointError, match="SDXL"):
        detect_config(state)


def test_bad_prediction_type_is_rejected(sd1):
    with pytest.raises(ValueError, match="'v'"):
        detect_config(sd1[1], prediction_type="epsilon")


def test_given_config_object_is_not_modified(sd1_file):
    cfg = load_config(CONFIGS / "sd15.yaml", SD1_SMALL)
    pipe = LDMPipeline.from_single_file(sd1_file, config=cfg, prediction_type="v")
    assert pipe.diffusion.prediction_type == "v"
    assert cfg.model.diffusion.prediction_type == "eps"


# ---------------------------------------------------------------------------------------------
# The x4 upscaler
# ---------------------------------------------------------------------------------------------


def test_detects_the_full_size_x4_upscaler_from_shapes():
    expected = load_config(CONFIGS / "sd-x4-upscaler.yaml").model
    with torch.device("meta"):
        unet, vae, text = build_models(expected)
    state = {}
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        state.update({PREFIXES[name] + k: v for k, v in module.state_dict().items()})
    detected, report = detect_config(state)
    assert detected == expected
    assert "x4 upscaler layout" in report and "self-attention off at levels [0, 1, 2]" in report
    assert "prediction type v (family convention)" in report


def test_x4_upscaler_file_loads_strictly_and_upscales(tmp_path):
    pipe, state = small_pipe("x4"), small_state("x4")
    path = tmp_path / "x4-upscaler-ema.ckpt"
    torch.save({"state_dict": state, "global_step": 1}, path)
    loaded = LDMPipeline.from_single_file(path)
    assert loaded.model_config == pipe.model_config
    assert_same_weights(loaded, state)
    report = loaded.load_report
    assert "low-resolution input: file's alphas_cumprod and betas match the schedule (8 buffers" in report
    assert "max_noise_level 350" in report
    out = loaded.upscale(torch.rand(1, 3, 8, 8), steps=2, seed=0, output_type="tensor", progress=False)
    assert out.shape == (1, 3, 32, 32)


def test_x4_low_resolution_buffers_are_checked(tmp_path):
    state = dict(small_state("x4"))
    state["low_scale_model.alphas_cumprod"] = state["low_scale_model.alphas_cumprod"] ** 1.1
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"alphas_cumprod .* does not match .*schedule of the low-resolution input: model.low_res"):
        LDMPipeline.from_single_file(tmp_path / "bad.safetensors")
    state = dict(small_state("x4"))
    state["low_scale_model.extra"] = torch.zeros(3)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unknown low-resolution buffers low_scale_model.extra"):
        LDMPipeline.from_single_file(tmp_path / "extra.safetensors")


def test_x4_buffers_with_a_text_to_image_config_are_refused(tmp_path):
    save_file(small_state("x4"), str(tmp_path / "x4.safetensors"))
    config = load_config(CONFIGS / "sd21.yaml", SD2_SMALL)
    with pytest.raises(CheckpointError, match="low-resolution buffers .* describes no upscaler"):
        LDMPipeline.from_single_file(tmp_path / "x4.safetensors", config=config)


def test_x4_exports_the_original_layout(tmp_path):
    pipe = small_pipe("x4")
    ours = write.single_file_tensors(pipe.state())
    expected = original_state(pipe, extras=False) | schedule_buffers(pipe) | low_scale_buffers(pipe)
    expected.pop("logvar")
    assert ours.keys() == expected.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-6, atol=0)
