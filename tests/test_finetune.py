"""Fine-tuning Stable Diffusion (configs/sd15_finetune.yaml): an original-layout SD 1.x file with random
weights, channel-reduced (its architecture detected as a real file's is), fine-tuned for a few steps on a
small folder of images through the training tool: the U-Net moves, the frozen VAE and text encoder stay
bit for bit, a resumed run equals an uninterrupted one, and the export loads back through
`from_single_file` and diffusers; the VAE of such a file also serves latent caching and the trainers'
`train.vae_checkpoint` / the VAE trainer's `train.init_from`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from helpers import CONFIGS, TINY, TINY_SD1, randomize
from ldm import LDMPipeline
from ldm.cli.train import main as train_main
from ldm.config import load_config
from ldm.train.checkpoint import find_latest_state, load_training_state
from ldm.train.ldm_trainer import LDMTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

SD15_FINETUNE = CONFIGS / "sd15_finetune.yaml"
# TINY in the SD 1.x conventions, smaller still: detection gives this architecture back from the file.
REDUCED = [*TINY_SD1, "model.unet.model_channels=32", "model.text_encoder.width=64", "model.unet.context_dim=64",
           "model.text_encoder.projection_dim=64", "model.vae.ch=32", "sample.height=32", "sample.width=32"]
# The run, shrunk: 32 px aspect buckets (factor-4 VAE), 4 steps at batch 2, a state every 2 steps.
RUN = ["data.resolution=32", "data.bucket_step=16", "data.heldout_fraction=0.2", "data.heldout_size=2",
       "data.num_workers=0", "train.batch_size=2", "train.steps=4", "train.warmup_steps=1", "train.lr=1e-3",
       "train.save_every=2", "train.sample_every=0", "train.log_with=none", 'train.mixed_precision="no"',
       "train.channels_last=false", "train.sample_steps=2"]


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
    """A random-weight SD 1.x model in the original single-file layout (no config in it)."""
    pipe = randomize(LDMPipeline.from_config(TINY, REDUCED, seed=0))
    return pipe.save_single_file(tmp_path_factory.mktemp("base") / "sd-reduced.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Ten captioned pictures of three shapes (square, wide, tall)."""
    root = tmp_path_factory.mktemp("photos")
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        size = [(40, 40), (64, 32), (32, 64)][i % 3]
        pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"photo{i}.png")
        (root / f"photo{i}.txt").write_text(f"a photo of thing {i % 4}")
    return root


def command(out, sd_file, photos, *extra) -> list[str]:
    return [str(SD15_FINETUNE), f"train.init_from={sd_file}", "data.source=folder", f"data.urls={photos}", *RUN,
            f"train.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sd_file, photos):
    """The one command, run to the end: (output folder, what it printed)."""
    out = tmp_path_factory.mktemp("run") / "a"
    from contextlib import redirect_stdout
    from io import StringIO

    said, threads = StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests run (a module fixture is set up before `one_thread`)
    # 8-bit AdamW needs bitsandbytes and a CUDA GPU; elsewhere the run says why and uses torch's AdamW
    with pytest.warns(UserWarning, match=r"train.optimizer=adamw8bit: (bitsandbytes' 8-bit optimizers need the "
                                         r"parameters on a CUDA GPU|bitsandbytes is not installed)"), \
            redirect_stdout(said):
        assert train_main(command(out, sd_file, photos)) == 0
    torch.set_num_threads(threads)
    return out, said.getvalue()


def states(pipe: LDMPipeline, name: str) -> dict[str, torch.Tensor]:
    return pipe.modules[name].state_dict()


def test_the_one_command_fine_tunes_the_unet_and_nothing_else(finished, sd_file):
    out, said = finished
    assert "no stage 1" in said and "stage 1:" not in said
    assert f"{sd_file} is an original single file, which records no prediction type: 'eps'" in said
    assert "model.unet.model_channels 320 -> 32" in said  # the config's SD 1.5 sizes are reported as not used
    assert f"model: {out / 'model.safetensors'}" in said and f"--ckpt {out / 'model.safetensors'}" in said

    base, tuned = LDMPipeline.load(sd_file), LDMPipeline.load(out / "model.safetensors")
    # the file's architecture, not sd15.yaml's; the run's gradient checkpointing recorded with it
    assert tuned.model_config.unet == dataclasses.replace(base.model_config.unet, gradient_checkpointing=True)
    assert tuned.model_config.vae.scaling_factor == 0.18215 and tuned.diffusion.prediction_type == "eps"
    for name in ("vae", "text_encoder"):  # frozen: bit for bit the file's
        a, b = states(base, name), states(tuned, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = states(base, "unet"), states(tuned, "unet")
    assert all(not torch.equal(a[k], b[k]) for k in a)  # every U-Net tensor moved (the export is the EMA)


def test_the_export_loads_through_from_single_file_and_diffusers(finished, sd_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    path = finished[0] / "model.safetensors"
    ours = LDMPipeline.load(path)
    single = LDMPipeline.from_single_file(path)  # read as an original file: detection, no stored config
    assert single.model_config.unet == dataclasses.replace(ours.model_config.unet, gradient_checkpointing=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = states(ours, name), states(single, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # diffusers converts the file with its own code; only the component configs come from a folder
    theirs = StableDiffusionPipeline.from_single_file(str(path), config=str(ours.save_diffusers(tmp_path / "cfg")),
                                                      local_files_only=True)
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([250.0]), torch.randn(1, 77, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(theirs.unet(x, t, ctx).sample, ours.unet(x, t, ctx), atol=1e-5, rtol=1e-5)
        tokens = theirs.tokenizer(["a photo of thing 1"], padding="max_length", max_length=77,
                                  return_tensors="pt").input_ids
        torch.testing.assert_close(theirs.text_encoder(tokens)[0], ours.text_encoder(["a photo of thing 1"]),
                                   atol=1e-5, rtol=1e-5)


def test_a_resumed_run_equals_an_uninterrupted_one(finished, sd_file, photos, tmp_path):
    out = tmp_path / "b"
    cfg = load_config(SD15_FINETUNE, command(out, sd_file, photos)[1:])
    with pytest.warns(UserWarning, match="adamw8bit"):
        trainer = LDMTrainer(cfg)
    # the config's run settings on the file's U-Net: gradient checkpointing on
    assert all(m.gradient_checkpointing for m in trainer.unet.modules() if hasattr(m, "gradient_checkpointing"))
    trainer.train(until=2)  # stopped after step 2 with a state, as a kill after that save leaves it
    assert find_latest_state(out).name == "state-00000002"
    with pytest.warns(UserWarning, match="adamw8bit"):
        assert train_main([*command(out, sd_file, photos), "--resume"]) == 0
    (wa, ta, ma), (wb, tb, mb) = (load_training_state(find_latest_state(d)) for d in (finished[0], out))
    assert ma["step"] == mb["step"] == 4 and ma["optimizer"] == "adamw"
    for part in ("unet", "text_encoder"):
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part
    ea, eb = ta["ema"]["unet"]["shadow"], tb["ema"]["unet"]["shadow"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    a, b = LDMPipeline.load(finished[0] / "model.safetensors"), LDMPipeline.load(out / "model.safetensors")
    assert all(torch.equal(v, states(b, "unet")[k]) for k, v in states(a, "unet").items())


def test_a_config_of_the_other_family_or_no_model_is_refused(sd_file, photos, tmp_path):
    cfg = load_config(CONFIGS / "sd21_finetune.yaml", [f"train.init_from={sd_file}", f"data.urls={photos}",
                                                        f"train.output_dir={tmp_path / 'x'}"])
    with pytest.raises(ValueError, match=r"is SD 1.x \(CLIP ViT-L text encoder\) but the config describes SD 2.x .*"
                                         r"use configs/sd15_finetune.yaml"):
        LDMTrainer(cfg)
    assert not (tmp_path / "x").exists()  # refused before the output folder was made
    with pytest.raises(ValueError, match="train.vae_checkpoint and train.init_from are both empty"):
        train_main([str(SD15_FINETUNE), f"data.urls={photos}", f"train.output_dir={tmp_path / 'y'}"])


def test_the_sd_vae_of_such_a_file_serves_caching_and_both_trainers(sd_file, photos, tmp_path):
    from ldm.cli import cache_latents, make_shards
    from ldm.train.vae_trainer import VAETrainer

    base = LDMPipeline.load(sd_file)
    # Latent caching with the VAE read from the whole original file
    assert make_shards.main(["--images", str(photos), "--out", str(tmp_path / "shards" / "s")]) == 0
    assert cache_latents.main(["--vae", str(sd_file), "--shards", str(tmp_path / "shards"), "--out",
                               str(tmp_path / "latents" / "l"), "--resolution", "32", "--num-workers", "0",
                               "--text-from", str(sd_file)]) == 0
    cfg = load_config(SD15_FINETUNE, command(tmp_path / "c", sd_file, tmp_path / "latents", "data.source=latents",
                                             "data.buckets=false", "train.steps=1", "train.optimizer=adamw")[1:])
    trainer = LDMTrainer(cfg)
    batch = next(trainer.batches())
    assert batch["latent"].shape == (2, 4, 8, 8) and batch["context"].shape == (2, 77, 64)
    trainer.train()  # one step on the cached latents, scaled by the file's VAE's factor
    assert trainer.vae.scaling_factor == 0.18215

    # train.vae_checkpoint = the original file, stage 2 from scratch: its VAE, the config's latent scale
    cfg = load_config(TINY, [*REDUCED, f"train.vae_checkpoint={sd_file}", f"train.output_dir={tmp_path / 'd'}",
                             "model.vae.scaling_factor=0.2", "train.log_with=none"])
    vae = LDMTrainer(cfg).vae
    assert vae.cfg.scaling_factor == 0.2  # an original file records none
    assert all(torch.equal(v, states(base, "vae")[k]) for k, v in vae.state_dict().items())

    # the VAE trainer fine-tunes the file's VAE (its architecture, not the config's)
    cfg = load_config(CONFIGS / "vae_tiny.yaml", [f"train.init_from={sd_file}", f"train.output_dir={tmp_path / 'e'}",
                                                  "train.log_with=none"])
    vae_trainer = VAETrainer(cfg)
    assert vae_trainer.cfg.model.vae.ch == 32 and vae_trainer.cfg.model.vae.ch_mult == (1, 2, 2)
    assert all(torch.equal(v, states(base, "vae")[k]) for k, v in vae_trainer.vae.state_dict().items())
