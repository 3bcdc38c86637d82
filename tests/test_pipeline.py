import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import FAST, TINY, randomize
from ldm import LDMPipeline
from ldm.checkpoint import CONFIG_KEY
from ldm.errors import CheckpointError


@pytest.fixture(scope="module")
def pipe():
    return LDMPipeline.from_config(TINY, FAST, seed=0)


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    return pipe.save(tmp_path_factory.mktemp("ckpt") / "model.safetensors")


def gen(p, prompt="a red circle", **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("progress", False)
    return p.generate(prompt, output_type="tensor", **kw)


def test_generate_returns_pil_images_with_settings_in_info(pipe):
    images = pipe.generate(["a red circle", "a blue square"], "blurry", num_images=2, seed=7, steps=2, progress=False)
    assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (32, 32)
    assert [im.info["seed"] for im in images] == [7, 8, 9, 10]
    assert [im.info["prompt"] for im in images] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert images[3].info["negative_prompt"] == "blurry" and images[0].info["steps"] == 2


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_generate_is_deterministic_per_seed(sampler):
    p = randomize(LDMPipeline.from_config(TINY, FAST, seed=0))
    a = gen(p, seed=3, sampler=sampler)
    b = gen(p, seed=3, sampler=sampler)
    c = gen(p, seed=4, sampler=sampler)
    assert a.shape == (1, 3, 32, 32)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_a1111_and_comfyui_sampler_names_run_our_sampler_and_are_recorded_as_ours(pipe):
    ref = gen(pipe, seed=3, sampler="dpmpp_2m_karras")
    for sampler, spacing in [("DPM++ 2M Karras", None), ("DPM++ 2M", "Karras"), ("dpmpp_2m", "karras")]:
        assert torch.equal(gen(pipe, seed=3, sampler=sampler, spacing=spacing), ref)
    image = pipe.generate("a red circle", seed=3, steps=3, sampler="DPM++ 2M", spacing="Karras", progress=False)[0]
    assert (image.info["sampler"], image.info["spacing"]) == ("dpmpp_2m", "karras")
    comfy = gen(pipe, seed=3, sampler="euler_ancestral", spacing="normal")
    assert torch.equal(comfy, gen(pipe, seed=3, sampler="euler_a", spacing="linspace"))
    with pytest.raises(ValueError, match="nearest is 'euler_a'"):
        gen(pipe, sampler="DPM2 a")


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde"])
def test_image_k_of_a_batch_equals_a_single_run_with_seed_plus_k(sampler):
    p = randomize(LDMPipeline.from_config(TINY, FAST, seed=0))
    batch = gen(p, seed=100, num_images=3, sampler=sampler)
    for k in range(3):
        single = gen(p, seed=100 + k, sampler=sampler)
        torch.testing.assert_close(batch[k : k + 1], single, atol=1e-5, rtol=0)


def test_output_depends_on_prompt_and_guidance():
    p = randomize(LDMPipeline.from_config(TINY, FAST, seed=0))
    base = gen(p, seed=0, cfg=7.5)
    assert (base - gen(p, "a blue square", seed=0, cfg=7.5)).abs().max() > 1e-4
    assert (base - gen(p, seed=0, cfg=1.0)).abs().max() > 1e-4
    assert (base - gen(p, seed=0, cfg=7.5, negative_prompt="green")).abs().max() > 1e-4


def test_odd_aspect_ratio(pipe):
    out = gen(pipe, seed=0, height=24, width=44)
    assert out.shape == (1, 3, 24, 44)
    assert out.min() >= 0 and out.max() <= 1


def test_save_load_round_trip_is_bit_exact_and_strict(saved):
    p = randomize(LDMPipeline.from_config(TINY, FAST, seed=0), seed=5)
    path = p.save(saved.parent / "rand.safetensors")
    q = LDMPipeline.from_checkpoint(path)
    for name, module in p.modules.items():
        a, b = module.state_dict(), q.modules[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert q.model_config == p.model_config and q.defaults == p.defaults
    assert torch.equal(gen(p, seed=1), gen(q, seed=1))


def test_file_uses_the_original_single_file_layout_and_carries_its_config(pipe, saved):
    tensors = load_file(str(saved))
    prefixes = {k.split(".")[0] for k in tensors}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in tensors
    assert "first_stage_model.quant_conv.weight" in tensors
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in tensors
    n_params = sum(sum(t.numel() for t in m.state_dict().values()) for m in pipe.modules.values())
    assert sum(t.numel() for t in tensors.values()) == n_params
    with safe_open(str(saved), "pt") as f:
        config = json.loads(f.metadata()[CONFIG_KEY])
    assert config["model"]["unet"]["model_channels"] == 32
    assert config["model"]["diffusion"]["prediction_type"] == "eps"


def test_missing_and_corrupt_checkpoints_are_reported(tmp_path, saved):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        LDMPipeline.from_checkpoint(tmp_path / "nope.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LDMPipeline.from_checkpoint(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        LDMPipeline.from_checkpoint(garbage)


def test_checkpoint_that_does_not_match_its_config_names_the_keys(tmp_path, saved):
    tensors = load_file(str(saved))
    with safe_open(str(saved), "pt") as f:
        metadata = f.metadata()
    dropped = "model.diffusion_model.out.2.weight"
    del tensors[dropped]
    tensors["model.diffusion_model.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing \(1\): out\.2\.weight") as e:
        LDMPipeline.from_checkpoint(bad)
    assert "unexpected (1): extra.weight" in str(e.value)
    # A config describing another architecture: shapes disagree, named key by key.
    with pytest.raises(CheckpointError, match="shape mismatch"):
        LDMPipeline.from_checkpoint(saved, config=TINY)


def test_file_without_config_needs_one(tmp_path, saved, pipe):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(saved)), str(bare))
    with pytest.raises(CheckpointError, match="carries no config"):
        LDMPipeline.from_checkpoint(bare)


def test_failed_save_leaves_no_file_and_keeps_the_old_one(tmp_path, pipe, monkeypatch):
    import ldm.checkpoint as ck

    target = tmp_path / "m.safetensors"
    pipe.save(target)
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        pipe.save(target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    with pytest.raises(CheckpointError, match="try 'x.safetensors'"):
        pipe.save(tmp_path / "x.ckpt")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"height": 30}, ValueError, r"height must be a multiple of 4 \(got 30\); try 28 or 32"),
        ({"width": 0}, ValueError, "width must be an integer >= 4"),
        ({"steps": 0}, ValueError, r"steps must be an integer >= 1 \(got 0\)"),
        ({"sampler": "plms"}, ValueError, "dpmpp_2m_karras"),
        ({"cfg": -1.0}, ValueError, "cfg must be a finite number >= 0"),
        ({"cfg": math.nan}, ValueError, "cfg must be a finite number >= 0"),
        ({"num_images": 0}, ValueError, "num_images must be an integer >= 1"),
        ({"negative_prompt": ["a", "b"]}, ValueError, "2 negative prompts for 1 prompts"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "either seed or generator"),
        ({"seed": -1}, ValueError, "seed must be an integer"),
        ({"eta": 0.5, "sampler": "euler"}, ValueError, "eta applies only to stochastic samplers"),
        ({"guidance_rescale": 2.0}, ValueError, r"guidance_rescale must be in \[0, 1\]"),
    ],
)
def test_bad_generate_arguments_raise_named_errors(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        pipe.generate("a red circle", progress=False, **kwargs)


def test_empty_prompt_list_is_an_error(pipe):
    with pytest.raises(ValueError, match="prompt list is empty"):
        pipe.generate([], progress=False)


def test_half_precision_weights_follow_to(pipe):
    p = LDMPipeline.from_config(TINY, FAST, seed=0, dtype="bf16")
    assert p.dtype == torch.bfloat16
    out = gen(p, seed=0, steps=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        p.to(dtype="fp8")


def test_attention_backends_give_the_same_images():
    p = randomize(LDMPipeline.from_config(TINY, FAST, seed=0))
    sdpa = gen(p, seed=2)
    math_path = gen(p.set_attention_backend("math"), seed=2)
    torch.testing.assert_close(sdpa, math_path, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="valid backends: sdpa, xformers, math"):
        p.set_attention_backend("flash")


def test_our_file_is_an_original_layout_single_file(saved, pipe):
    """Our model file loads through the original-checkpoint path too (its keys are SD's)."""
    from ldm.config import load_config

    q = LDMPipeline.from_single_file(saved, config=load_config(TINY, FAST))
    for name, module in pipe.modules.items():
        a, b = module.state_dict(), q.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
