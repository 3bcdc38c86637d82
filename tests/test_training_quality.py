"""Training works, measured the way a user would measure it: a tiny model trained for a few hundred
steps (stage 1, then stage 2 on its latents) beats the same model untrained on held-out denoising
loss and on prompt adherence of its generated images (ldm-eval's metrics); a slow test (-m slow)
runs the README's training and checks that the samples draw the prompt's colour."""

from pathlib import Path

import pytest

from helpers import CONFIGS
from ldm import LDMPipeline
from ldm.config import load_config
from ldm.eval.heldout import heldout_items, heldout_loss, prompt_adherence
from ldm.train.ldm_trainer import LDMTrainer
from ldm.train.vae_trainer import VAETrainer

RESOLUTION = 32  # sd_tiny's: 32 px images, 16x16x4 latents
# A narrower U-Net and text encoder than sd_tiny's, on sd_tiny's autoencoder.
NARROW = [
    "model.unet.model_channels=32", "model.unet.num_head_channels=16", "model.unet.context_dim=64",
    "model.text_encoder.width=64", "model.text_encoder.heads=2", "model.text_encoder.projection_dim=64",
]
COMMON = ["train.log_with=none", "train.sample_every=0", "train.warmup_steps=20"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train_tiny(tmp_path: Path, vae_steps: int, ldm_overrides: list[str]) -> LDMTrainer:
    """Stage 1 for `vae_steps`, then a stage-2 trainer (not yet run) on its VAE file."""
    vae_cfg = load_config(
        CONFIGS / "vae_tiny.yaml",
        [*COMMON, f"train.output_dir={tmp_path / 'vae'}", f"train.steps={vae_steps}", "data.heldout_size=32"],
    )
    vae_file = VAETrainer(vae_cfg).train()
    cfg = load_config(
        CONFIGS / "sd_tiny.yaml",
        [*COMMON, f"train.output_dir={tmp_path / 'ldm'}", f"train.vae_checkpoint={vae_file}", "data.heldout_size=16",
         *ldm_overrides],
    )
    return LDMTrainer(cfg)


def test_a_few_hundred_steps_beat_the_untrained_model_on_heldout_loss_and_adherence(tmp_path):
    trainer = train_tiny(tmp_path, 150, [*NARROW, "train.steps=300", "train.batch_size=8", "train.save_every=300",
                                         "train.ema_decay=0.99"])
    items = heldout_items(48, RESOLUTION, seed=1)
    untrained = trainer.inference_pipeline()  # a copy: training does not change it
    trained = LDMPipeline.from_checkpoint(trainer.train())
    before, after = heldout_loss(untrained, items), heldout_loss(trained, items)
    # The zero-initialised U-Net predicts 0, so its loss is the mean square of the v target:
    # alpha^2 E[eps^2] + sigma^2 E[z^2], about 1 for unit-variance latents.
    assert before["loss"] == pytest.approx(1.0, abs=0.3)
    assert after["loss"] < 0.5 * before["loss"]  # measured: 1.12 -> 0.29 at 300 steps (0.14 at 500)
    assert all(after[f"loss_t{t}"] < before[f"loss_t{t}"] for t in (100, 300, 500, 700, 900))

    # Prompt adherence: every prompt asks for one object. The untrained model decodes flat noise
    # with no object in it; the trained one draws exactly one object in most images (measured: 0%
    # -> 81% of 48). Colour and position need far more training than a test can afford.
    captions = [it["caption"] for it in heldout_items(48, RESOLUTION, seed=2)]
    adh_before = prompt_adherence(untrained, captions, resolution=RESOLUTION, progress=False)
    adh_after = prompt_adherence(trained, captions, resolution=RESOLUTION, progress=False)
    assert adh_before["count"] <= 0.1
    assert adh_after["count"] >= adh_before["count"] + 0.5


@pytest.mark.slow  # trains sd_tiny as the README does (~17 minutes on one thread)
def test_the_readme_run_draws_the_prompts_colour(tmp_path):
    # configs/vae_tiny.yaml then configs/sd_tiny.yaml as they are (no logs or sample grids), then
    # tools/eval.py's adherence on its 128 held-out prompts at cfg 7.5.
    quiet = ["train.log_with=none", "train.sample_every=0"]
    vae_cfg = load_config(CONFIGS / "vae_tiny.yaml", [*quiet, f"train.output_dir={tmp_path / 'vae'}"])
    cfg = load_config(CONFIGS / "sd_tiny.yaml", [
        *quiet, f"train.output_dir={tmp_path / 'ldm'}", f"train.vae_checkpoint={VAETrainer(vae_cfg).train()}"])
    pipe = LDMPipeline.from_checkpoint(LDMTrainer(cfg).train())
    captions = [it["caption"] for it in heldout_items(128, RESOLUTION, seed=0)]
    adh = prompt_adherence(pipe, captions, resolution=RESOLUTION, cfg=7.5, progress=False)
    # Measured on the README's command: 96% colour and 100% background (docs/training.md, "The tiny
    # run"); chance is 1 in 7 for colour and 1 in 3 for the background.
    assert adh["colour"] >= 0.85
    assert adh["background"] >= 0.9
