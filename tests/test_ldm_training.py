import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, SD_TINY
from ldm import LDMPipeline
from ldm.checkpoint import save_model_file
from ldm.config import load_config
from ldm.models.vae import AutoencoderKL
from ldm.train.checkpoint import find_latest_state, load_training_state
from ldm.train.ldm_trainer import LDMTrainer

TINY = [
    "model.unet.model_channels=32", "model.unet.num_head_channels=16", "model.text_encoder.width=32",
    "model.unet.context_dim=32", "model.text_encoder.heads=2", "model.text_encoder.projection_dim=32",
    "model.vae.ch=16", "data.resolution=16", "data.heldout_size=8", "train.batch_size=2", "train.steps=6", "train.warmup_steps=2",
    "train.save_every=3", "train.sample_every=0", "train.log_with=none", "train.ema_decay=0.9",
    "sample.height=16", "sample.width=16", "sample.steps=2",
]


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
    cfg = load_config(SD_TINY, TINY)
    torch.manual_seed(0)
    vae = AutoencoderKL(cfg.model.vae)
    return save_model_file(tmp_path_factory.mktemp("vae") / "vae.safetensors", {"vae": vae}, cfg)


def config(out, vae_file, *extra):
    return load_config(
        SD_TINY,
        [*TINY, f"train.output_dir={out}", f"train.vae_checkpoint={vae_file}", *extra],
    )


def unet_state(out):
    weights, trainer, meta = load_training_state(find_latest_state(out))
    return weights, trainer, meta


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, vae_file):
    full = LDMTrainer(config(tmp_path / "a", vae_file)).train()
    LDMTrainer(config(tmp_path / "b", vae_file)).train(until=3)
    assert find_latest_state(tmp_path / "b").name == "state-00000003"
    resumed = LDMTrainer(config(tmp_path / "b", vae_file), resume=True)
    assert resumed.step == 3
    resumed.train()
    (wa, ta, ma), (wb, tb, mb) = unet_state(tmp_path / "a"), unet_state(tmp_path / "b")
    assert ma["step"] == mb["step"] == 6
    for part in ("unet", "text_encoder"):
        assert wa[part].keys() == wb[part].keys()
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part
    for name in ta["ema"]:
        shadow_a, shadow_b = ta["ema"][name]["shadow"], tb["ema"][name]["shadow"]
        assert all(torch.equal(shadow_a[k], shadow_b[k]) for k in shadow_a)
    # The export is the EMA model and loads as an inference pipeline.
    pipe = LDMPipeline.from_checkpoint(full)
    images = pipe.generate("a red circle", steps=2, seed=0, progress=False, output_type="tensor")
    assert images.shape == (1, 3, 16, 16)


def test_training_reduces_the_loss(tmp_path, vae_file):
    cfg = config(tmp_path, vae_file, "train.steps=30", "train.lr=1e-3", "train.save_every=30", "train.batch_size=4",
                 "train.log_with=tensorboard", "train.sample_every=15", "model.diffusion.prediction_type=eps",
                 "train.min_snr_gamma=null")
    trainer = LDMTrainer(cfg)
    batch = next(trainer.batches())
    with torch.no_grad():
        before = sum(trainer.loss(batch, 10_000, k).item() for k in range(8)) / 8
    # The zero-initialised U-Net predicts eps = 0, so its loss is E[noise^2] = 1.
    assert before == pytest.approx(1.0, abs=0.15)
    trainer.train()
    with torch.no_grad():
        after = sum(trainer.loss(batch, 10_000, k).item() for k in range(8)) / 8
    assert after < 0.9 * before
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))  # TensorBoard logs
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000015.png", "step-00000030.png"]


def test_text_encoder_has_its_own_learning_rate(tmp_path, vae_file):
    trainer = LDMTrainer(config(tmp_path, vae_file, "train.lr=1e-3", "train.text_encoder_lr=2e-5"))
    unet_group, text_group = trainer.optimizer.param_groups
    text_params = {id(p) for p in trainer.accelerator.unwrap_model(trainer.text_encoder).parameters()}
    assert {id(p) for p in text_group["params"]} == text_params
    assert not text_params & {id(p) for p in unet_group["params"]}
    # Both follow the schedule: warm-up over 2 steps starts at half of each rate.
    assert (unet_group["lr"], text_group["lr"]) == pytest.approx((0.5e-3, 1e-5))
    # Without it the text encoder shares the U-Net's group (the layout of states saved before it).
    trainer = LDMTrainer(config(tmp_path / "b", vae_file, "train.text_encoder_lr=null"))
    assert len(trainer.optimizer.param_groups) == 1


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path, vae_file, monkeypatch):
    cfg = config(tmp_path, vae_file, "train.max_bad_steps=3")
    trainer = LDMTrainer(cfg)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    monkeypatch.setattr(trainer, "loss", lambda *a: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="NaN/Inf for 3 steps in a row"):
        trainer.train()
    assert trainer.bad.total == 3
    assert all(torch.equal(before[k], v) for k, v in trainer.unet.state_dict().items())


def test_sigkill_at_any_moment_leaves_a_loadable_state(tmp_path, vae_file):
    out = tmp_path / "run"
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from ldm.config import load_config\nfrom ldm.train.ldm_trainer import LDMTrainer\n"
        "cfg = load_config(%r, %r)\nLDMTrainer(cfg, resume=sys.argv[1] == 'resume').train()\n"
    ) % (str(ROOT), str(SD_TINY),
         [*TINY, f"train.output_dir={out}", f"train.vae_checkpoint={vae_file}", "train.steps=100000", "train.save_every=1"])
    steps_seen = []
    for extra in (0.05, 0.37):  # kill at different points of the save/step cycle
        how = "resume" if steps_seen else "new"
        proc = subprocess.Popen([sys.executable, "-c", code, how], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 240
        target = (steps_seen[-1] if steps_seen else 0) + 2
        while time.time() < deadline and proc.poll() is None:
            state = find_latest_state(out)
            if state is not None and int(state.name.split("-")[1]) >= target:
                break
            time.sleep(0.05)
        time.sleep(extra)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        weights, trainer, meta = load_training_state(find_latest_state(out))
        assert meta["step"] >= target and "unet" in weights and "optimizer" in trainer
        steps_seen.append(meta["step"])
    # The second run resumed from what the first kill left: its states continue the count.
    assert steps_seen[1] > steps_seen[0]


@pytest.mark.parametrize("source", ["shards", "folder"])
def test_training_from_files_resumes_at_the_same_data_position(tmp_path, vae_file, source):
    from ldm.data.sources import shapes_samples
    from ldm.data.writer import write_shards

    samples = list(shapes_samples(24, resolution=16, seed=3))
    if source == "shards":
        write_shards(iter(samples), str(tmp_path / "data" / "train"), max_count=8, progress=False)
    else:  # the same images as a folder with sidecar captions
        (tmp_path / "data").mkdir()
        for sample in samples:
            (tmp_path / "data" / f"{sample['__key__']}.png").write_bytes(sample["png"])
            (tmp_path / "data" / f"{sample['__key__']}.txt").write_bytes(sample["txt"])
    data = [f"data.source={source}", f"data.urls={tmp_path / 'data'}", "data.num_workers=0", "data.epoch_length=4",
            "data.shuffle_buffer=8", "data.heldout_fraction=0.2", "data.heldout_size=4"]
    LDMTrainer(config(tmp_path / "a", vae_file, *data)).train()
    LDMTrainer(config(tmp_path / "b", vae_file, *data)).train(until=3)
    _, _, meta = unet_state(tmp_path / "b")
    assert meta["data_position"]["loader"]["batch"] == 3
    LDMTrainer(config(tmp_path / "b", vae_file, *data), resume=True).train()
    (wa, _, ma), (wb, _, mb) = unet_state(tmp_path / "a"), unet_state(tmp_path / "b")
    assert ma["data_position"]["loader"] == mb["data_position"]["loader"]  # 6 batches: epoch 1, batch 2
    assert all(torch.equal(wa["unet"][k], wb["unet"][k]) for k in wa["unet"])
    # The held-out loss was measured before the first step and after the last, on held-out images.
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps"] == 6 and 0 < metrics["heldout_size"] <= 4
    assert math.isfinite(metrics["heldout_loss_start"]) and math.isfinite(metrics["heldout_loss"])


def test_cached_latents_train_like_images(tmp_path, vae_file):
    from ldm.checkpoint import load_vae_file
    from ldm.data.latents import cache_latents
    from ldm.data.reader import make_latent_loader
    from ldm.data.sources import shapes_samples
    from ldm.data.writer import write_shards

    write_shards(shapes_samples(6, resolution=16, seed=4), str(tmp_path / "img" / "s"), progress=False)
    vae = load_vae_file(vae_file)
    summary = cache_latents(str(tmp_path / "img"), str(tmp_path / "lat" / "s"), vae, resolution=16, batch_size=4,
                            num_workers=0, progress=False)
    assert summary.written == 6
    batch = next(iter(make_latent_loader(str(tmp_path / "lat"), batch_size=6, num_workers=0, shuffle_buffer=0)))
    side = 16 // vae.downsample_factor
    assert batch["latent"].shape == (6, 4, side, side)
    # The cache holds the posterior means of the images it was made from.
    from ldm.data.reader import make_image_text_loader

    imgs = next(iter(make_image_text_loader(str(tmp_path / "img"), resolution=16, batch_size=6, num_workers=0,
                                            shuffle_buffer=0)))
    assert batch["caption"] == imgs["caption"]  # both read in shard order
    with torch.no_grad():
        means = vae.encode(imgs["image"]).mean
    torch.testing.assert_close(batch["latent"].float(), means, atol=1e-5, rtol=0)
    trainer = LDMTrainer(config(tmp_path / "run", vae_file, "data.source=latents", f"data.urls={tmp_path / 'lat'}",
                                "data.num_workers=0", "train.steps=2", "data.heldout_fraction=0.5"))
    trainer.train()
    assert trainer.step == 2
    # The held-out loss read the held-out latents (half of the six, by key), never trained on.
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < metrics["heldout_size"] < 6 and math.isfinite(metrics["heldout_loss"])


def test_two_process_training_keeps_ranks_identical(tmp_path, vae_file):
    out = tmp_path / "dist"
    out.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(ROOT / "tests/dist_train_script.py"), str(out),
         *TINY, f"train.output_dir={tmp_path / 'run'}", f"train.vae_checkpoint={vae_file}", "train.steps=4",
         "train.save_every=2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert len(ranks[0]["captions"]) == len(ranks[1]["captions"]) == 4 * 2
    assert ranks[0]["captions"] != ranks[1]["captions"]  # each rank trains on its own items
    # Only rank 0 wrote states and the export.
    assert find_latest_state(tmp_path / "run").name == "state-00000004"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_init_from_starts_from_a_model_file_with_its_architecture(tmp_path, vae_file, capsys):
    source = LDMPipeline.from_config(SD_TINY, TINY, seed=7)
    path = source.save(tmp_path / "init.safetensors")
    trainer = LDMTrainer(config(tmp_path / "run", vae_file, f"train.init_from={path}"))
    mine = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    assert all(torch.equal(mine[k], v) for k, v in source.unet.state_dict().items())
    # the file's architecture is used; the config's other one is named as not used
    other = LDMTrainer(config(tmp_path / "run2", vae_file, f"train.init_from={path}", "model.unet.model_channels=64"))
    assert other.cfg.model.unet == source.model_config.unet
    assert "differs in 1 key, not used: model.unet.model_channels 64 -> 32" in capsys.readouterr().out


def test_stages_of_different_precision_run_in_one_process(tmp_path, monkeypatch):
    from ldm.config import TrainConfig
    from ldm.train import accelerator as loop

    first = loop.make_accelerator(TrainConfig(mixed_precision="no", log_with="none"), str(tmp_path / "a"))
    assert first.mixed_precision == "no"
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bfloat16"):
        second = loop.make_accelerator(TrainConfig(mixed_precision="bf16", log_with="none"), str(tmp_path / "b"))
    assert second.mixed_precision == "bf16"
    assert loop.make_accelerator(TrainConfig(log_with="none"), str(tmp_path / "c")).mixed_precision == "no"


def test_an_fsdp_launch_leaves_accelerate_unsharded_and_one_process_trains_whole(tmp_path, vae_file, monkeypatch,
                                                                                  capsys):
    from accelerate.utils import DistributedType

    from ldm.config import TrainConfig
    from ldm.train import accelerator as loop
    from ldm.train.fsdp import fsdp_requested

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    acc = loop.make_accelerator(TrainConfig(log_with="none"), str(tmp_path / "acc"))
    assert acc.distributed_type != DistributedType.FSDP  # the trainer shards, not accelerate's prepare
    assert fsdp_requested()  # the request itself is kept
    trainer = LDMTrainer(config(tmp_path / "run", vae_file))
    assert not trainer.fsdp
    assert "launched with FSDP, but one process has nothing to shard" in capsys.readouterr().out


def test_fsdp_training_resumes_and_exports_what_ddp_exports(tmp_path, vae_file):
    out = tmp_path / "dist"
    out.mkdir()
    run = ["train.steps=3", "train.save_every=1", "data.heldout_size=4", 'train.mixed_precision="no"',
           "train.batch_size=1", "train.grad_accum=2", "train.sample_every=3"]
    r = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(ROOT / "tests/dist_fsdp_script.py"), str(out), "2",  # FSDP: stop after step 2, resume in a new trainer
         *TINY, f"train.vae_checkpoint={vae_file}", *run],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "state-00000002 at step 2" in r.stdout
    assert "ldm: FSDP over 2 processes shards the unet and text_encoder" in r.stdout
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(rank["fsdp"] and rank["step"] == 3 for rank in ranks)
    assert (out / "fsdp" / "samples" / "step-00000003.png").is_file()  # rank 0 drew from the gathered EMA
    # Each rank held half of the U-Net and of its EMA, not a replica.
    total = ranks[0]["total"]
    assert sum(rank["local"] for rank in ranks) == total and all(rank["local"] < total for rank in ranks)
    assert [rank["ema_local"] for rank in ranks] == [rank["local"] for rank in ranks]

    def close(a: dict, b: dict, atol: float = 5e-5) -> None:
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=atol), (k, (a[k] - b[k]).abs().max())

    # The export and the final state (weights, EMA, Adam moments) equal the DDP run's within float
    # tolerance (the ranks sum gradients in another order), in the same layout.
    close(load_file(out / "ddp" / "model.safetensors"), load_file(out / "fsdp" / "model.safetensors"))
    (wd, td, _), (wf, tf, _) = (unet_state(out / run) for run in ("ddp", "fsdp"))
    for part in ("unet", "text_encoder"):
        close(wd[part], wf[part])
        close(td["ema"][part]["shadow"], tf["ema"][part]["shadow"])
    assert td["optimizer"]["param_groups"] == tf["optimizer"]["param_groups"]
    for i, moments in td["optimizer"]["state"].items():
        close(moments, tf["optimizer"]["state"][i])
    # ... and the tolerance is far below what one step changes.
    before, _, _ = load_training_state(out / "fsdp" / "state-00000002")
    assert max((before["unet"][k] - wf["unet"][k]).abs().max() for k in wf["unet"]) > 1e-4
    # The FSDP run's state resumes in a single process, moments and all.
    single = LDMTrainer(config(out / "fsdp", vae_file, *run, "train.steps=4"), resume=True, resume_with_changes=True)
    moments = single.optimizer.state_dict()["state"]
    assert single.step == 3 and all(torch.equal(moments[i]["exp_avg"], tf["optimizer"]["state"][i]["exp_avg"])
                                    for i in moments)
    single.train()
    assert find_latest_state(out / "fsdp").name == "state-00000004"
