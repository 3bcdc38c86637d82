"""The latent upscaler: its config and U-Net features, the noise augmentation and loss, `upscale`
(seeds, noise level, tiling, the memory check), hires fix and the tools, on tiny random models."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CONFIGS, FAST, ROOT, TINY, randomize
from ldm import LDMPipeline
from ldm.bench import randomize_weights_
from ldm.cli import eval as evaluate
from ldm.cli import txt2img, upscale
from ldm.cli.common import run_main
from ldm.config import load_config
from ldm.diffusion import (
    Schedule,
    low_res_schedule,
    noise_augment,
    sample_noise_levels,
    target_for,
    upscaler_input,
    upscaler_loss,
)
from ldm.errors import ConfigError
from ldm.images import to_pil
from ldm.models import build_models, count_parameters
from ldm.models.unet import UNet
from ldm.options import SamplingOptions
from ldm.png_settings import read_png_settings, settings_from_a1111
from ldm.pipeline.hires import hires_size
from ldm.pipeline.tiles import estimate_upscale_memory, plan_tiles

SR = ROOT / "tests" / "configs" / "sr_test.yaml"
X4 = CONFIGS / "sd-x4-upscaler.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.lru_cache(maxsize=None)
def sr_pipe() -> LDMPipeline:
    """The tiny upscaler with every weight random at unit activation scale (shared: never modify)."""
    pipe = LDMPipeline.from_config(SR)
    for i, module in enumerate(pipe.modules.values()):
        randomize_weights_(module, i)
    return pipe


def smooth_image(size=(32, 32), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size[0] // 4, size[1] // 4, generator=g)
    return torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / float((a - b).square().mean()))


def up(pipe, image, **kw):
    kw.setdefault("seed", 0)
    kw.setdefault("progress", False)
    kw.setdefault("output_type", "tensor")
    return pipe.upscale(image, kw.pop("prompt", "a red circle"), **kw)


# ---------------------------------------------------------------------------------------------
# Config and U-Net
# ---------------------------------------------------------------------------------------------


# The published x4 upscaler: the networks of Stability's configs/stable-diffusion/x4-upscaling.yaml
# (what x4-upscaler-ema.ckpt holds), in the keys diffusers' single-file converter reads.
X4_UPSCALING_YAML = {"model": {"params": {
    "scale_factor": 0.08333,
    "unet_config": {"params": {
        "num_classes": 1000, "image_size": 128, "in_channels": 7, "out_channels": 4, "model_channels": 256,
        "attention_resolutions": [2, 4, 8], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 4],
        "disable_self_attentions": [True, True, True, False], "disable_middle_self_attn": False, "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
        "use_linear_in_transformer": True,
    }},
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }}},
}}}
OPEN_CLIP_VIT_H_TEXT_MPARAMS = 354.03  # open_clip's docs/model_profile.csv, ViT-H-14 text_mparams


def test_x4_config_has_the_published_parameter_counts():
    """Our x4 config against the published model: diffusers' own converter builds its U-Net and VAE
    from Stability's x4-upscaling.yaml, and open_clip publishes the ViT-H/14 text tower's size."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    cfg = load_config(X4).model
    counts = count_parameters(cfg)
    # the numbers in the comment of configs/sd-x4-upscaler.yaml
    assert counts == {"unet": 473_398_020, "vae": 55_325_927, "text_encoder": 354_032_641, "total": 882_756_588}
    assert all(f"{n:,}" in X4.read_text() for n in counts.values())
    with torch.device("meta"):
        ours = UNet(cfg.unet).state_dict()
    checkpoint = {"model.diffusion_model." + k: v for k, v in ours.items()}  # the converter reads a few shapes
    unet_config = sfu.create_unet_diffusers_config_from_ldm(X4_UPSCALING_YAML, checkpoint)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(X4_UPSCALING_YAML, checkpoint)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
    assert sum(p.numel() for p in unet.parameters()) == counts["unet"]
    assert sum(p.numel() for p in vae.parameters()) == counts["vae"]
    assert unet.class_embedding.weight.shape == (1000, 1024) and unet_config["only_cross_attention"] == [True] * 3 + [False]
    assert round(counts["text_encoder"] / 1e6, 2) == OPEN_CLIP_VIT_H_TEXT_MPARAMS


def test_x4_unet_has_the_original_keys_for_class_embedding_and_cross_only_levels():
    cfg = load_config(X4).model.unet
    with torch.device("meta"):
        state = UNet(cfg).state_dict()
    assert state["label_emb.weight"].shape == (1000, 1024)
    assert state["input_blocks.0.0.weight"].shape == (256, 7, 3, 3)
    # levels 1 and 2 (512 channels) attend to the text twice; level 3 (1024) and the middle keep self-attention
    assert state["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"].shape == (512, 1024)
    assert state["input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"].shape == (512, 512)
    assert state["output_blocks.2.1.transformer_blocks.0.attn1.to_k.weight"].shape == (1024, 1024)
    assert state["output_blocks.3.1.transformer_blocks.0.attn1.to_k.weight"].shape == (512, 1024)
    assert state["middle_block.1.transformer_blocks.0.attn1.to_k.weight"].shape == (1024, 1024)
    assert not any(k.startswith("input_blocks.1.1.") for k in state)  # level 0: no attention


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.low_res=null"], r"an upscaler \(latents \+ low-resolution image\) also needs a model.low_res section"),
    (["model.unet.in_channels=4"], r"in_channels \(4\) of an upscaler must be vae.embed_dim \+ vae.in_channels \(4 \+ 3 = 7\)"),
    (["model.unet.num_classes=null"], "set unet.num_classes above low_res.max_noise_level"),
    (["model.unet.num_classes=300"], "set unet.num_classes above low_res.max_noise_level"),
    (["model.unet.disable_self_attentions=[true, false]"], "needs one flag per level"),
    (["model.low_res.max_noise_level=1000"], r"max_noise_level must be in \[1, num_timesteps - 1\]"),
    (["model.low_res.noise_level=400"], r"noise_level must be in \[0, max_noise_level\] = \[0, 350\]"),
    (["model.low_res=null", "model.unet.in_channels=4"], "only upscalers receive"),
])
def test_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(X4, overrides)


def test_sr_tiny_upscales_any_size_four_times():
    cfg = load_config(CONFIGS / "sr_tiny.yaml")
    counts = count_parameters(cfg.model)
    assert all(f"{counts[part]:,}" in (CONFIGS / "sr_tiny.yaml").read_text() for part in ("unet", "vae", "text_encoder"))
    pipe = LDMPipeline.from_config(cfg)
    for size in (8, 32):  # it trains on 8 px inputs; the README chain gives it 32 px samples
        out = pipe.upscale(torch.rand(1, 3, size, size), steps=1, seed=0, output_type="tensor", progress=False)
        assert out.shape == (1, 3, 4 * size, 4 * size)


def test_sr_tiny_128_is_sr_tiny_trained_at_the_chain_size():
    base, chain = load_config(CONFIGS / "sr_tiny.yaml"), load_config(CONFIGS / "sr_tiny_128.yaml")
    assert chain.model == base.model  # the same networks; only the data and the run differ
    assert chain.data.resolution == chain.sample.height == chain.sample.width == 128  # 32 px in, 128 px out
    assert chain.data.degrade.blur_prob > 0  # the chain's inputs are softer than a clean downscale
    vae = load_config(ROOT / chain.train.vae_config)
    assert vae.data.resolution == 128 and chain.train.vae_checkpoint == f"{vae.train.output_dir}/vae.safetensors"


def test_existing_configs_have_no_upscaler_parts():
    for name in ("sd15", "sd21", "sd_tiny"):
        cfg = load_config(CONFIGS / f"{name}.yaml").model
        assert cfg.low_res is None and cfg.unet.num_classes is None and cfg.unet.disable_self_attentions == ()


def test_unet_takes_class_labels_exactly_when_it_has_an_embedding():
    unet = sr_pipe().unet
    x, ctx = torch.randn(2, 7, 8, 8), torch.randn(2, 16, 64)
    with torch.no_grad():
        a = unet(x, 10, ctx, torch.tensor([0, 0]))
        b = unet(x, 10, ctx, torch.tensor([0, 300]))
        plain = LDMPipeline.from_config(TINY).unet
        with pytest.raises(ValueError, match="has no class embedding"):
            plain(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 128), torch.tensor([1]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match=r"takes class labels y \(B,\)"):
        unet(x, 10, ctx)
    with pytest.raises(ValueError, match=r"class labels y must have shape \(2,\)"):
        unet(x, 10, ctx, torch.tensor([1, 2, 3]))


def test_cross_only_level_attends_to_the_text_in_its_first_attention():
    unet = sr_pipe().unet
    block = unet.input_blocks[1][1].transformer_blocks[0]  # level 0: disabled
    assert block.disable_self_attn and block.attn1.to_k.in_features == 64
    assert not unet.input_blocks[3][1].transformer_blocks[0].disable_self_attn  # level 1: self-attention
    seen = []
    hook = block.attn1.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    ctx = torch.randn(1, 16, 64)
    with torch.no_grad():
        unet(torch.randn(1, 7, 8, 8), 10, ctx, torch.tensor([5]))
    hook.remove()
    assert torch.equal(seen[0], ctx)


def test_fused_projections_give_the_same_output_with_cross_only_levels():
    from ldm.speed import fuse_qkv

    pipe = LDMPipeline.from_config(SR)
    randomize_weights_(pipe.unet, 3)
    x, ctx, y = torch.randn(1, 7, 8, 8), torch.randn(1, 16, 64), torch.tensor([20])
    with torch.no_grad():
        ref = pipe.unet(x, 5, ctx, y)
        fuse_qkv(pipe.unet)
        assert pipe.unet.input_blocks[1][1].transformer_blocks[0].attn1.fused == "kv"
        torch.testing.assert_close(pipe.unet(x, 5, ctx, y), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Noise augmentation and the loss
# ---------------------------------------------------------------------------------------------


def test_noise_augmentation_matches_diffusers_low_res_scheduler():
    from diffusers import DDPMScheduler

    cfg = load_config(X4).model.low_res
    theirs = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    image, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    levels = torch.tensor([0, 20, 350])
    ours = noise_augment(image, levels, low_res_schedule(cfg), noise)
    torch.testing.assert_close(ours, theirs.add_noise(image, noise, levels), atol=1e-5, rtol=1e-5)  # theirs: float32
    # the original's "linear" schedule: sqrt(beta) evenly spaced from 0.01 to sqrt(0.02)
    step = (math.sqrt(0.02) - 0.01) / 999
    abar_350 = math.prod(1 - (0.01 + i * step) ** 2 for i in range(351))
    assert math.isclose(low_res_schedule(cfg).alphas_cumprod[350].item(), abar_350, rel_tol=1e-12)
    assert float((ours[0] - image[0]).abs().max()) < 0.05  # level 0 keeps the image almost untouched


def test_training_noise_levels_are_uniform_below_the_maximum():
    levels = sample_noise_levels(20_000, 350, torch.Generator().manual_seed(0))
    assert levels.dtype == torch.long and int(levels.min()) == 0 and int(levels.max()) == 349
    assert abs(float(levels.float().mean()) - 174.5) < 3


def test_upscaler_input_puts_latents_first_and_checks_sizes():
    x_t, image = torch.zeros(1, 4, 8, 8), torch.ones(1, 3, 8, 8)
    out = upscaler_input(x_t, image)
    assert out.shape == (1, 7, 8, 8) and out[:, :4].eq(0).all() and out[:, 4:].eq(1).all()
    with pytest.raises(ValueError, match="must have the latents' size"):
        upscaler_input(x_t, torch.ones(1, 3, 16, 16))


def test_upscaler_loss_is_zero_for_the_exact_prediction_and_sees_the_augmented_image():
    sched = Schedule.from_config(load_config(X4).model.diffusion)
    low_cfg = load_config(X4).model.low_res
    low_sched = low_res_schedule(low_cfg)
    z0, low_res, ctx = torch.randn(4, 4, 8, 8), torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 5, 16)
    seen = {}

    def oracle(x, t, context, y):
        # the exact v for the x_t it is given, recovering the noise from x_t and z0
        seen.update(x=x, t=t, y=y, context=context)
        alpha, sigma = sched.alpha_sigma(t)
        a, s = alpha[:, None, None, None], sigma[:, None, None, None]
        noise = (x[:, :4] - a * z0) / s
        return target_for("v", z0, noise, alpha, sigma)

    loss = upscaler_loss(oracle, z0, low_res, ctx, schedule=sched, low_res_schedule=low_sched, max_noise_level=350,
                         prediction_type="v", generator=torch.Generator().manual_seed(1))
    assert float(loss) < 1e-8
    # the draws, in the documented order: timesteps, latent noise, levels, augmentation noise
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (4,), generator=g)
    torch.randn(z0.shape, generator=g)
    levels = torch.randint(0, 350, (4,), generator=g)
    aug = torch.randn(low_res.shape, generator=g)
    assert torch.equal(seen["t"], t) and torch.equal(seen["y"], levels) and torch.equal(seen["context"], ctx)
    torch.testing.assert_close(seen["x"][:, 4:], noise_augment(low_res, levels, low_sched, aug))


def test_upscaler_loss_trains_the_unet():
    pipe = randomize(LDMPipeline.from_config(SR, seed=0))  # zero-initialised output layers would block the gradient
    unet = pipe.unet.train()
    sched, low = pipe.schedule, pipe.model_config.low_res
    z0, low_res, ctx = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 16, 64)
    loss = upscaler_loss(unet, z0, low_res, ctx, schedule=sched, low_res_schedule=low_res_schedule(low),
                         max_noise_level=low.max_noise_level, prediction_type="v",
                         generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert unet.label_emb.weight.grad.abs().sum() > 0 and unet.input_blocks[0][0].weight.grad[:, 4:].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# upscale()
# ---------------------------------------------------------------------------------------------


def test_upscale_makes_images_four_times_larger_with_their_settings():
    pipe = sr_pipe()
    images = pipe.upscale(smooth_image((16, 12)), "a red circle", noise_level=30, seed=5, progress=False)
    assert images[0].size == (48, 64)
    info = images[0].info
    assert (info["noise_level"], info["seed"], info["upscale"], info["width"], info["height"]) == (30, 5, 4, 48, 64)
    assert (info["prompt"], info["steps"], info["cfg"]) == ("a red circle", 4, 3.0)


def test_upscale_batches_equal_single_runs_and_the_noise_level_matters():
    pipe = sr_pipe()
    image = torch.cat([smooth_image(seed=1), smooth_image(seed=2)])[:, :, :16, :16]
    batch = up(pipe, image, seed=3)
    assert batch.shape == (2, 3, 64, 64)
    torch.testing.assert_close(batch[1:], up(pipe, image[1:], seed=4), atol=1e-5, rtol=0)
    other = up(pipe, image[:1], seed=3, noise_level=200)
    assert float((other - batch[:1]).abs().mean()) > 1e-3


@pytest.mark.parametrize("level", [-1, 351, 2.5, True])
def test_noise_level_out_of_range_is_refused_before_any_work(level):
    calls = []
    with pytest.raises(ValueError, match=r"noise_level must be an integer in \[0, 350\]"):
        sr_pipe().upscale(smooth_image((8, 8)), noise_level=level, callback=lambda *a: calls.append(a))
    assert not calls


def test_text_to_image_models_and_upscalers_refuse_each_others_methods():
    with pytest.raises(ValueError, match="not an upscaler .* hires fix"):
        LDMPipeline.from_config(TINY).upscale(smooth_image((8, 8)))
    for method, args in (("generate", ("x",)), ("img2img", (smooth_image(), "x")),
                         ("inpaint", (smooth_image(), torch.zeros(32, 32), "x"))):
        with pytest.raises(ValueError, match=f"is an upscaler .* instead of {method}"):
            getattr(sr_pipe(), method)(*args)


def test_tiles_as_large_as_the_image_change_nothing():
    pipe, image = sr_pipe(), smooth_image((16, 16))
    assert torch.equal(up(pipe, image, tile_size=16), up(pipe, image))


def test_tiled_upscale_agrees_closely_with_the_untiled_one():
    # A 32x32 input in 2 x 2 tiles of 24 overlapping by 16 (every denoiser call, and the decoding
    # in latent tiles of 24 overlapping by 8): the tiles see other GroupNorm statistics and less
    # context, yet agree with the whole image far more closely than two seeds agree with each
    # other. Measured with these unit-scale random weights: 26.6 dB, and 9.5 dB between seeds.
    pipe, image = sr_pipe(), smooth_image((32, 32))
    whole, tiled = up(pipe, image), up(pipe, image, tile_size=24, tile_overlap=8)
    other_seed = up(pipe, image, seed=1)
    close, apart = psnr(whole, tiled), psnr(whole, other_seed)
    print(f"tiled vs untiled: {close:.1f} dB; another seed: {apart:.1f} dB")
    assert close > 24 and apart < 15
    # no seam: across the tile edges (output pixels 32 and 96: tiles span inputs 0-24 and 8-32) the
    # tiled image changes from pixel to pixel as much as the untiled one does there, no more
    for dim in (-1, -2):
        step = lambda x: (x.narrow(dim, 1, 127) - x.narrow(dim, 0, 127)).abs().transpose(dim, -1).mean(dim=(0, 1, 2))
        for edge in (31, 95):
            assert float(step(tiled)[edge]) < 1.2 * float(step(whole)[edge])


def test_bad_tile_options_are_refused():
    pipe = sr_pipe()
    with pytest.raises(ValueError, match="tile_size must be an integer >= 8"):
        pipe.upscale(smooth_image((8, 8)), tile_size=4)
    with pytest.raises(ValueError, match=r"tile_overlap must be an integer in \[0, tile_size / 2\)"):
        pipe.upscale(smooth_image((8, 8)), tile_size=16, tile_overlap=8)
    with pytest.raises(ValueError, match="tile_overlap needs tile_size"):
        pipe.upscale(smooth_image((8, 8)), tile_overlap=4)


def test_memory_estimate_grows_with_size_and_shrinks_with_tiles():
    pipe = sr_pipe()
    small, big = (estimate_upscale_memory(pipe, 1, s, s, None) for s in (64, 128))
    assert 3.5 < big / small < 4.5  # activations scale with the pixels
    assert estimate_upscale_memory(pipe, 1, 1024, 1024, 64) < estimate_upscale_memory(pipe, 1, 1024, 1024, None) / 10
    cfg = load_config(X4).model
    with torch.device("meta"):  # the real x4 model's shapes, without initialising 900M weights
        unet, vae, text_encoder = build_models(cfg)
    x4 = LDMPipeline(vae, unet, text_encoder, cfg.diffusion, low_res=cfg.low_res).to(dtype=torch.float16)
    # the real x4 model at 512 -> 2048 px in fp16: 8 GiB of activations untiled, half a GiB in 128 px tiles
    untiled, tiled = (estimate_upscale_memory(x4, 1, 512, 512, t) / 2**30 for t in (None, 128))
    assert 6 < untiled < 10 and tiled < 1


def test_a_size_that_does_not_fit_is_refused_with_the_tile_that_fits(monkeypatch):
    import ldm.pipeline.tiles as tiles_module

    pipe = sr_pipe()
    need_64 = estimate_upscale_memory(pipe, 1, 64, 64, None)
    monkeypatch.setattr(tiles_module, "available_memory", lambda device: need_64 // 2)
    calls = []
    with pytest.raises(ValueError, match=r"upscaling 1 image\(s\) of 64x64 to 256x256 needs about .* free on cpu; "
                                         r"pass tile_size=(\d+) \(tools/upscale.py --tile \1\)"):
        pipe.upscale(torch.rand(1, 3, 64, 64), callback=lambda *a: calls.append(a))
    assert not calls
    tile, overlap = plan_tiles(pipe, 1, 64, 64, "auto")
    budget = 0.9 * (need_64 // 2)
    assert (tile, overlap) == (32, 8)  # the largest of the sizes "auto" tries that fits; 48 does not
    assert estimate_upscale_memory(pipe, 1, 64, 64, 32) <= budget < estimate_upscale_memory(pipe, 1, 64, 64, 48)
    assert plan_tiles(pipe, 1, 64, 64, 32, 4) == (32, 4)  # a given size is used as it is


# ---------------------------------------------------------------------------------------------
# Hires fix
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def t2i_pipe() -> LDMPipeline:
    """The tiny text-to-image model with every weight random at unit activation scale (shared: never modify)."""
    pipe = LDMPipeline.from_config(TINY, [*FAST, "sample.steps=4"])
    for i, module in enumerate(pipe.modules.values()):
        randomize_weights_(module, 10 + i)
    return pipe


def test_hires_fix_with_latent_upscaling_redraws_at_the_larger_size():
    pipe = t2i_pipe()
    images = pipe.generate("a red circle", hires_scale=2, strength=0.5, seed=4, num_images=2, progress=False)
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    info = images[1].info
    assert (info["seed"], info["strength"], info["hires_scale"], info["hires_upscaler"]) == (5, 0.5, 2.0, "latent")
    assert (info["width"], info["height"], info["hires_steps"]) == (32, 32, 4)  # the base size; steps by default
    # image 1 is the image of seed 5: both passes use seed + k. A batch of one and a batch of two
    # may round differently in the CPU's matrix kernels (~4e-6 here), so pixels may differ by one level
    single = pipe.generate("a red circle", hires_scale=2, strength=0.5, seed=5, progress=False, output_type="tensor")
    assert pixel_gap(images[1], to_pil(single[0])) <= 1
    assert pixel_gap(images[0], to_pil(single[0])) > 50  # seed 4's picture is another
    # and its record reproduces it
    again = pipe.generate(**SamplingOptions.from_dict(info).to_dict(), progress=False)[0]
    assert pixel_gap(again, images[1]) <= 1


def pixel_gap(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def test_hires_fix_at_strength_zero_decodes_the_interpolated_latents():
    pipe = t2i_pipe()
    seen = []  # the first pass's last x0 estimate is its result (the last step lands on sigma 0)
    out = pipe.generate("a red circle", hires_scale=1.5, strength=0.0, sampler="euler", seed=2, progress=False,
                        output_type="tensor", callback=lambda i, x, denoised: seen.append(denoised))
    assert len(seen) == 4  # the redraw ran no step
    expected = pipe.decode_latents(torch.nn.functional.interpolate(seen[-1], size=(12, 12), mode="bilinear"))
    torch.testing.assert_close(out, expected.cpu(), atol=1e-6, rtol=0)


def test_hires_fix_with_an_upscaler_model():
    pipe, upscaler = t2i_pipe(), sr_pipe()
    images = pipe.generate("a red circle", hires_scale=2, strength=0.3, upscaler=upscaler,
                           hires_upscaler="sr.safetensors", seed=1, progress=False)
    assert images[0].size == (64, 64) and images[0].info["hires_upscaler"] == "sr.safetensors"
    unnamed = pipe.generate("a red circle", hires_scale=2, strength=0.3, upscaler=upscaler, seed=1, progress=False)
    assert unnamed[0].info["hires_upscaler"] == "upscaler model" and unnamed[0].tobytes() == images[0].tobytes()


def test_hires_fix_errors_name_the_fix():
    pipe = t2i_pipe()
    with pytest.raises(ValueError, match=r"hires height 32 x 1.1 = 35 is not a multiple of 4.*use a scale giving 32 or 36"):
        pipe.generate("x", hires_scale=1.1)
    with pytest.raises(ValueError, match=r"hires_scale must be a number in \(1, 8\]"):
        pipe.generate("x", hires_scale=1)
    with pytest.raises(ValueError, match="must be an upscaler model"):
        pipe.generate("x", hires_scale=2, upscaler=pipe)
    with pytest.raises(ValueError, match="hires_upscaler='bicubic' names an upscaler model: pass the model too"):
        pipe.generate("x", hires_scale=2, hires_upscaler="bicubic")
    with pytest.raises(ValueError, match="an upscaler model is for hires fix: set hires_scale too"):
        pipe.generate("x", upscaler=sr_pipe())
    with pytest.raises(ValueError, match="hires_steps belongs to hires fix: set hires_scale too"):
        pipe.generate("x", hires_steps=3)
    with pytest.raises(ValueError, match="noise_level does not apply to generate"):
        pipe.generate("x", noise_level=3)
    assert hires_size(32, 48, 1.5, 8) == (48, 72)


# ---------------------------------------------------------------------------------------------
# Command-line tools
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    sr, t2i = folder / "sr.safetensors", folder / "t2i.safetensors"
    sr_pipe().save(sr)
    t2i_pipe().save(t2i)
    to_pil(smooth_image((16, 12))[0]).save(folder / "small.png")
    return sr, t2i, folder / "small.png"


def test_upscale_tool_writes_the_larger_png_with_its_settings(model_files, tmp_path, capsys):
    sr, _, small = model_files
    out = tmp_path / "big.png"
    assert upscale.main(["--ckpt", str(sr), "--image", str(small), "--out", str(out), "--prompt", "a red circle",
                         "--noise-level", "25", "--seed", "3", "--steps", "2", "--tile", "auto"]) == 0
    assert f"wrote {out} (48x64, seed 3)" in capsys.readouterr().out
    settings = read_png_settings(out)
    o = settings.options
    assert (o.noise_level, o.seed, o.prompt, o.width, o.height) == (25, 3, "a red circle", 48, 64)
    assert settings.model["path"] == str(sr)
    parameters = Image.open(out).text["parameters"]
    assert "Size: 48x64" in parameters and "Model: sr" in parameters and "Noise level: 25" in parameters
    assert settings_from_a1111(parameters).options.noise_level == 25


def error_of(main, argv: list[str], capsys) -> str:
    """The `error:` line a tool prints for `argv` (exit code 2, no traceback)."""
    assert run_main(lambda: main(argv)) == 2
    return capsys.readouterr().err


def test_tools_refuse_the_wrong_kind_of_model_naming_the_right_tool(model_files, tmp_path, capsys):
    sr, t2i, small = model_files
    err = error_of(txt2img.main, ["--ckpt", str(sr), "--prompt", "x", "--out", str(tmp_path)], capsys)
    assert "is an upscaler model" in err and "python tools/upscale.py --ckpt" in err
    err = error_of(upscale.main, ["--ckpt", str(t2i), "--image", str(small), "--out", str(tmp_path / "x.png")], capsys)
    assert "is a text-to-image model, not an upscaler" in err and "--hires-scale 2" in err
    err = error_of(txt2img.main, ["--ckpt", str(t2i), "--prompt", "x", "--hires-scale", "2", "--upscaler", str(t2i),
                                  "--out", str(tmp_path)], capsys)
    assert "is a text-to-image model, not an upscaler" in err
    err = error_of(upscale.main, ["--ckpt", str(sr), "--image", str(small), "--out", str(tmp_path / "x.png"),
                                  "--noise-level", "999"], capsys)
    assert "noise_level must be an integer in [0, 350] (got 999)" in err
    assert not any(tmp_path.iterdir())


def test_txt2img_hires_fix_with_an_upscaler_model(model_files, tmp_path, capsys):
    sr, t2i, _ = model_files
    assert txt2img.main(["--ckpt", str(t2i), "--prompt", "a red circle", "--seed", "2", "--steps", "2", "--hires-scale",
                         "2", "--hires-strength", "0.5", "--upscaler", str(sr), "--out", str(tmp_path)]) == 0
    image = Image.open(tmp_path / "00000-2.png")
    assert image.size == (64, 64)
    o = read_png_settings(tmp_path / "00000-2.png").options
    assert (o.hires_scale, o.hires_upscaler, o.strength, o.width) == (2.0, str(sr), 0.5, 32)
    assert "Size: 32x32" in image.text["parameters"]
    assert "Denoising strength: 0.5, Hires upscale: 2.0, Hires steps: 2, Hires upscaler: sr.safetensors" \
        in image.text["parameters"]


def test_eval_scores_an_upscaler_against_bicubic(model_files, tmp_path, capsys):
    sr, _, _ = model_files
    grid, out = tmp_path / "grid.png", tmp_path / "metrics.json"
    assert evaluate.main(["--ckpt", str(sr), "--n", "2", "--steps", "2", "--grid", str(grid), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 2 and {"loss", "psnr_bicubic", "psnr_model", "hf_ratio_bicubic", "hf_ratio_model"} <= set(metrics)
    assert 0 < metrics["hf_ratio_bicubic"] < 1  # bicubic loses the fine detail of the shapes' edges
    assert Image.open(grid).size == (4 * 128, 2 * 128)  # low-res, bicubic, model, truth; one row per image, 64 px x 2


def test_superres_measures_on_analytic_cases():
    from ldm.eval.superres import bicubic_upscale, high_frequency_energy, psnr

    truth = torch.full((2, 3, 16, 16), 0.5)
    assert torch.allclose(psnr(truth + 0.1, truth), torch.tensor([20.0, 20.0]))  # MSE 0.01
    assert torch.equal(high_frequency_energy(truth), torch.zeros(2))  # a flat image has no fine detail
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * torch.ones(1, 3, 1, 1)  # (1, 3, 16, 16)
    assert float(high_frequency_energy(checker)) > 0.2  # nearly all of its energy (0.25 around the mean) is fine
    torch.testing.assert_close(bicubic_upscale(truth[:, :, :4, :4], 4), truth)
