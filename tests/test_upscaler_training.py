"""Training an upscaler: the step (its low-resolution inputs made from each image by data.degrade,
caption dropout, the documented order of draws), every image source through the one data entry
point, exact resume, the export (a model file that upscales, with PSNR against bicubic in
metrics.json), both stages from tools/train_ldm.py, and the errors before any work."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CONFIGS
from ldm import LDMPipeline
from ldm.checkpoint import save_model_file
from ldm.cli import make_shards, train
from ldm.config import load_config
from ldm.data.degrade import make_low_res
from ldm.diffusion import upscaler_loss
from ldm.models.vae import AutoencoderKL
from ldm.train.checkpoint import find_latest_state, load_training_state
from ldm.train.loop import caption_keep_mask, step_generator
from ldm.train.upscaler_trainer import UpscalerTrainer

SR_TINY = CONFIGS / "sr_tiny.yaml"
# sr_tiny at toy size: 32 px images from 8 px inputs, 8x8 latents, a two-level U-Net.
SMALL = [
    "model.unet.channel_mult=[1,2]", "model.unet.attention_resolutions=[2]", "model.unet.num_heads=2",
    "model.unet.context_dim=32", "model.text_encoder.width=32", "model.text_encoder.heads=2",
    "model.text_encoder.projection_dim=32", "model.text_encoder.layers=1", "data.resolution=32",
    "data.heldout_size=3", "train.batch_size=2", "train.steps=4", "train.warmup_steps=2", "train.save_every=2",
    "train.sample_every=0", "train.log_with=none", "train.ema_decay=0.9", "train.sample_steps=2",
    "sample.height=32", "sample.width=32",
]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    cfg = load_config(SR_TINY, SMALL)
    torch.manual_seed(0)
    return save_model_file(tmp_path_factory.mktemp("vae") / "vae.safetensors", {"vae": AutoencoderKL(cfg.model.vae)}, cfg)


def config(out, vae_file, *extra):
    return load_config(SR_TINY, [*SMALL, f"train.output_dir={out}", f"train.vae_checkpoint={vae_file}", *extra])


def make_folder(root, n=12, size=40):
    """Captioned pictures with detail at every scale (smooth colour fields plus a checkerboard)."""
    root.mkdir(parents=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC)).copy()
        image[(np.indices((size, size)).sum(0) // (1 + i % 3)) % 2 == 0] //= 2
        Image.fromarray(image).save(root / f"pic{i:02d}.png")
        (root / f"pic{i:02d}.txt").write_text(f"picture {i}\n")
    return root


def test_the_step_is_the_documented_draws_of_one_generator(tmp_path, vae_file):
    cfg = config(tmp_path, vae_file, "data.degrade.blur_prob=1.0", "data.degrade.jpeg_prob=1.0",
                 "data.caption_dropout=0.5")
    trainer = UpscalerTrainer(cfg)
    batch = next(trainer.batches())
    with torch.no_grad():
        loss = trainer.loss(batch, 7, 0)
        # the same loss, written out: posterior sample, degradation, caption dropout, then upscaler_loss
        g = step_generator(cfg.train.seed, 7, 0)
        posterior = trainer.vae.encode(batch["image"])
        z = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)) * trainer.vae.scaling_factor
        low = make_low_res(batch["image"], 4, cfg.data.degrade, g)
        keep = caption_keep_mask(2, 0.5, g)
        context = trainer.text_encoder([c if k else "" for c, k in zip(batch["caption"], keep.tolist())])
        expected = upscaler_loss(trainer.unet, z, low, context, schedule=trainer.schedule,
                                 low_res_schedule=trainer.low_res_schedule, prediction_type="v", generator=g,
                                 max_noise_level=cfg.model.low_res.max_noise_level, min_snr_gamma=cfg.train.min_snr_gamma)
    assert low.shape == (2, 3, 8, 8) and loss.item() == expected.item()


def test_resumed_run_equals_an_uninterrupted_one_and_the_export_upscales(tmp_path, vae_file):
    full = UpscalerTrainer(config(tmp_path / "a", vae_file)).train()
    UpscalerTrainer(config(tmp_path / "b", vae_file)).train(until=2)
    resumed = UpscalerTrainer(config(tmp_path / "b", vae_file), resume=True)
    assert resumed.step == 2
    resumed.train()
    (wa, ta, ma), (wb, tb, mb) = (load_training_state(find_latest_state(tmp_path / r)) for r in "ab")
    assert ma["step"] == mb["step"] == 4
    assert all(torch.equal(wa["unet"][k], wb["unet"][k]) for k in wa["unet"])
    assert all(torch.equal(ta["ema"]["unet"]["shadow"][k], tb["ema"]["unet"]["shadow"][k]) for k in ta["ema"]["unet"]["shadow"])
    pipe = LDMPipeline.from_checkpoint(full)
    assert pipe.model_config.low_res == load_config(SR_TINY).model.low_res
    assert pipe.upscale(torch.rand(1, 3, 8, 12), steps=2, seed=0, output_type="tensor", progress=False).shape == (1, 3, 32, 48)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["heldout_n"] == 3 and metrics["steps"] == 4
    for key in ("heldout_loss_start", "heldout_loss", "heldout_psnr_bicubic", "heldout_psnr_model",
                "heldout_hf_ratio_bicubic", "heldout_hf_ratio_model"):
        assert math.isfinite(metrics[key]), key


def test_folder_and_shard_images_train_it_too(tmp_path, vae_file):
    folder = make_folder(tmp_path / "pics")
    assert make_shards.main(["--images", str(folder), "--out", str(tmp_path / "shards" / "s"), "--quiet"]) == 0
    for source, urls in (("folder", folder), ("shards", tmp_path / "shards")):
        cfg = config(tmp_path / source, vae_file, f"data.source={source}", f"data.urls={urls}", "data.num_workers=0",
                     "data.heldout_fraction=0.25", "data.epoch_length=4", "train.steps=2")
        trainer = UpscalerTrainer(cfg)
        assert trainer.train() == tmp_path / source / "model.safetensors"
        metrics = json.loads((tmp_path / source / "metrics.json").read_text())
        assert metrics["steps"] == 2 and 1 <= metrics["heldout_n"] <= 3, source


def test_sample_grids_show_input_bicubic_model_and_truth(tmp_path, vae_file):
    trainer = UpscalerTrainer(config(tmp_path, vae_file))
    grid = Image.open(trainer.sample_grid())
    assert grid.size == (4 * 128, 3 * 128)  # 4 columns, one row per held-out image (3), 32 px enlarged 4x
    truth = np.asarray(grid)[:128:4, 384::4]  # every pixel as it is: nearest neighbours
    expected = ((trainer.heldout()[0]["image"] + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert np.array_equal(truth, expected)


def test_errors_before_any_work(tmp_path, vae_file):
    with pytest.raises(ValueError, match=r"cached latents \(data.source=latents\) cannot train it"):
        UpscalerTrainer(config(tmp_path, vae_file, "data.source=latents", f"data.urls={tmp_path}"))
    t2i = load_config(CONFIGS / "sd_tiny.yaml", [f"train.vae_checkpoint={vae_file}"])
    with pytest.raises(ValueError, match="needs a model.low_res section"):
        UpscalerTrainer(t2i)
    assert not any(tmp_path.iterdir())


def test_train_ldm_trains_the_vae_then_the_upscaler(tmp_path, capsys):
    vae_yaml = tmp_path / "vae.yaml"
    vae_yaml.write_text(f"base: {CONFIGS / 'vae_sr_tiny.yaml'}\n"
                        f"train:\n  output_dir: {tmp_path / 'vae'}\n  steps: 2\n  batch_size: 2\n  save_every: 2\n"
                        "  sample_every: 0\n  log_with: none\n")
    assert train.main([str(SR_TINY), *SMALL, f"train.vae_config={vae_yaml}", "data.heldout_size=2",
                       f"train.vae_checkpoint={tmp_path / 'vae' / 'vae.safetensors'}",
                       f"train.output_dir={tmp_path / 'sr'}"]) == 0
    out = capsys.readouterr().out
    assert "stage 1: VAE checkpoint" in out and "stage 2: the latent upscaler on the VAE" in out
    assert "held-out 4x upscaling of 2 images, PSNR: bicubic" in out
    assert f"try:   python tools/upscale.py --ckpt {tmp_path / 'sr' / 'model.safetensors'}" in out
    assert LDMPipeline.from_checkpoint(tmp_path / "sr" / "model.safetensors").model_config.is_upscaler
