"""Stage 1: loss terms on analytic cases, LPIPS mechanics from a local weights file, the
discriminator schedule, exact resume, and the exported VAE file with its measured scaling factor."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import CONFIGS
from ldm.checkpoint import load_vae_file
from ldm.config import VAELossConfig, load_config
from ldm.errors import CheckpointError
from ldm.models.vae import DiagonalGaussian
from ldm.train.checkpoint import find_latest_state, load_training_state
from ldm.train.vae_loss import (
    LPIPS,
    PatchDiscriminator,
    VAELoss,
    adaptive_weight,
    generator_adv_loss,
    hinge_d_loss,
    kl_loss,
    l1_loss,
    l2_loss,
    load_lpips,
    lpips_from_config,
)
from ldm.config import ConfigError
from ldm.train.vae_trainer import VAETrainer, heldout_images, latent_scaling_factor, narrow_posterior_, psnr

TINY = [
    "model.vae.ch=16", "data.resolution=16", "data.heldout_size=8", "train.batch_size=2", "train.steps=6",
    "train.warmup_steps=2", "train.save_every=3", "train.sample_every=0", "train.log_with=none",
    "train.ema_decay=0.9", "vae_loss.disc_start=3", "vae_loss.disc_weight=0.5", "vae_loss.disc_layers=2",
    "vae_loss.disc_channels=16",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def config(out, *extra):
    return load_config(CONFIGS / "vae_tiny.yaml", [*TINY, f"train.output_dir={out}", *extra])


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def test_l1_is_zero_for_identical_images_and_the_mean_gap_otherwise():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert l1_loss(x, x).item() == 0.0
    assert l1_loss(x, x + 0.25).item() == pytest.approx(0.25)


def test_kl_of_the_prior_is_zero_and_of_a_shifted_mean_is_half_the_squared_norm():
    zeros = torch.zeros(2, 8, 3, 3)  # mean 0, logvar 0: the posterior is the prior
    assert kl_loss(DiagonalGaussian(zeros)).item() == 0.0
    moments = torch.cat([torch.full((2, 4, 3, 3), 2.0), torch.zeros(2, 4, 3, 3)], dim=1)
    assert kl_loss(DiagonalGaussian(moments)).item() == pytest.approx(0.5 * 4.0 * 4 * 3 * 3)  # sum over latent


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - x): 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + x): 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.0 / 3))
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0  # both margins met
    assert generator_adv_loss(torch.tensor([1.0, 3.0])).item() == -2.0


def test_adaptive_weight_is_the_gradient_norm_ratio_on_the_last_layer():
    torch.manual_seed(0)
    layer = nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)
    out = layer(x)
    rec = out.pow(2).mean()
    adv = -3.0 * out.mean()
    g_rec = torch.autograd.grad(rec, layer.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, layer.weight, retain_graph=True)[0]
    w = adaptive_weight(rec, adv, layer.weight)
    assert w.item() == pytest.approx((g_rec.norm() / (g_adv.norm() + 1e-4)).item(), rel=1e-6)
    assert not w.requires_grad
    # A vanishing adversarial gradient is clamped to the upper bound.
    assert adaptive_weight(10.0 * rec, 0.0 * out.sum(), layer.weight).item() == 1e4


def test_vae_loss_adds_the_weighted_terms():
    cfg = VAELossConfig(kl_weight=0.1, disc_weight=0.5, disc_start=0)
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 3, 1)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    recon = layer(images)
    posterior = DiagonalGaussian(torch.randn(2, 8, 2, 2))
    logits = recon.mean(dim=1, keepdim=True)  # a stand-in discriminator
    loss, logs = VAELoss(cfg).generator(images, recon, posterior, logits, layer.weight)
    expected = logs["l1"] + 0.1 * logs["kl"] + 0.5 * logs["d_weight"] * logs["g_loss"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    plain, plain_logs = VAELoss(cfg).generator(images, recon, posterior, None, None)
    assert "g_loss" not in plain_logs and plain.item() == pytest.approx((logs["l1"] + 0.1 * logs["kl"]).item())
    assert VAELoss(cfg).disc_active(0) and not VAELoss(VAELossConfig(disc_weight=0.0, disc_start=0)).disc_active(5)


def test_reconstruction_weighs_l1_and_l2_and_needs_one_of_them():
    images = torch.zeros(1, 3, 4, 4)
    recon = torch.zeros(1, 3, 4, 4)
    recon[0, 0, 0, 0] = 2.0  # one pixel off by 2 in 48: L1 = 2/48, L2 = 4/48
    assert l2_loss(images, recon).item() == pytest.approx(4 / 48)
    rec, logs = VAELoss(VAELossConfig(l1_weight=0.5, l2_weight=3.0)).reconstruction(images, recon)
    assert rec.item() == pytest.approx(0.5 * 2 / 48 + 3.0 * 4 / 48)
    assert set(logs) == {"l1", "l2"}
    rec, logs = VAELoss(VAELossConfig(l1_weight=0.0, l2_weight=1.0)).reconstruction(images, recon)
    assert rec.item() == pytest.approx(4 / 48) and set(logs) == {"l2"}
    with pytest.raises(ConfigError, match="set l1_weight or l2_weight"):
        VAELossConfig(l1_weight=0.0, l2_weight=0.0).validate()
    with pytest.raises(ConfigError, match="l2_weight must be >= 0"):
        VAELossConfig(l2_weight=-1.0).validate()


def test_narrow_posterior_sets_the_log_variance_and_leaves_the_mean_alone(tmp_path):
    cfg = config(tmp_path, "vae_loss.init_logvar=-8")
    torch.manual_seed(0)
    from ldm.models.vae import AutoencoderKL

    vae = AutoencoderKL(cfg.model.vae)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    before = vae.encode(x)
    narrow_posterior_(vae, -8.0)
    after = vae.encode(x)
    torch.testing.assert_close(after.mean, before.mean)
    assert before.std.mean().item() > 0.5  # the default init: std near 1
    assert (after.logvar - -8.0).abs().max().item() < 1.0  # log-variance now near -8 everywhere
    trainer = VAETrainer(cfg)  # the trainer applies it to a fresh run
    assert torch.all(trainer.vae.quant_conv.bias[cfg.model.vae.embed_dim :] == -8.0)


def test_patch_discriminator_gives_a_logit_map_and_explains_small_images():
    d = PatchDiscriminator(3, channels=8, layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert d(torch.randn(1, 3, 24, 24)).shape == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="lower vae_loss.disc_layers"):
        d(torch.randn(1, 3, 16, 16))
    assert all(isinstance(m, nn.GroupNorm) for m in d.modules() if "Norm" in type(m).__name__)


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    """Random VGG16 + LPIPS weights in the expected layout (the heads non-negative, as trained ones are)."""
    torch.manual_seed(0)
    state = LPIPS().state_dict()
    state = {k: (v.abs() if k.startswith("lin") else v).contiguous() for k, v in state.items()}
    path = tmp_path_factory.mktemp("lpips") / "lpips.safetensors"
    save_file(state, str(path))
    return path


def test_lpips_from_a_local_file_is_zero_for_identical_images_and_positive_otherwise(lpips_file):
    lpips = load_lpips(lpips_file)
    assert sorted(lpips.state_dict()) == sorted(LPIPS().state_dict())
    assert lpips.state_dict()["features.28.weight"].shape == (512, 512, 3, 3)  # torchvision's conv5_3
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    # Gradients flow to the images (for the loss), never into LPIPS itself.
    y.requires_grad_(True)
    lpips(x, y).sum().backward()
    assert y.grad is not None and all(p.grad is None for p in lpips.parameters())


def test_lpips_accepts_original_slice_names_and_names_missing_keys(tmp_path):
    state = LPIPS().state_dict()
    renamed = {k.replace("features.28.", "net.slice5.28."): v for k, v in state.items()}
    renamed["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)  # present in original files, not needed
    torch.save(renamed, tmp_path / "lpips.pth")
    load_lpips(tmp_path / "lpips.pth")
    del state["lin4.model.1.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="lin4.model.1.weight"):
        load_lpips(tmp_path / "broken.safetensors")


def test_lpips_is_off_without_weights_and_says_how_to_enable_it(tmp_path, lpips_file):
    lpips, status = lpips_from_config(VAELossConfig(lpips_weights=""))
    assert lpips is None and status.startswith("LPIPS off") and "vae_loss.lpips_weights" in status
    lpips, status = lpips_from_config(VAELossConfig(lpips_weights=str(tmp_path / "nowhere.safetensors")))
    assert lpips is None and "does not exist" in status
    lpips, status = lpips_from_config(VAELossConfig(lpips_weights=str(lpips_file)))
    assert isinstance(lpips, LPIPS) and status.startswith("LPIPS on")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def states(out):
    weights, trainer, meta = load_training_state(find_latest_state(out))
    return weights, trainer, meta


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # Crosses disc_start (3) and uses gradient accumulation; the resume happens at step 3 exactly.
    extra = ("train.grad_accum=2",)
    VAETrainer(config(tmp_path / "a", *extra)).train()
    VAETrainer(config(tmp_path / "b", *extra)).train(until=3)
    assert find_latest_state(tmp_path / "b").name == "state-00000003"
    resumed = VAETrainer(config(tmp_path / "b", *extra), resume=True)
    assert resumed.step == 3
    resumed.train()
    (wa, ta, ma), (wb, tb, mb) = states(tmp_path / "a"), states(tmp_path / "b")
    assert ma["step"] == mb["step"] == 6
    for part in ("vae", "disc"):
        assert wa[part].keys() == wb[part].keys()
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part
    shadow_a, shadow_b = ta["ema"]["shadow"], tb["ema"]["shadow"]
    assert all(torch.equal(shadow_a[k], shadow_b[k]) for k in shadow_a)
    exported_a = load_vae_file(tmp_path / "a/vae.safetensors").state_dict()
    exported_b = load_vae_file(tmp_path / "b/vae.safetensors").state_dict()
    assert all(torch.equal(exported_a[k], exported_b[k]) for k in exported_a)


def test_discriminator_is_untouched_before_disc_start_and_trained_after(tmp_path):
    trainer = VAETrainer(config(tmp_path))
    disc = trainer.accelerator.unwrap_model(trainer.disc)
    initial = {k: v.clone() for k, v in disc.state_dict().items()}
    trainer.train(until=3)  # steps 0, 1, 2: before disc_start
    assert all(torch.equal(initial[k], v) for k, v in disc.state_dict().items())
    assert not trainer.disc_optimizer.state  # never stepped
    trainer.train(until=4)  # step 3: the discriminator joins
    assert any(not torch.equal(initial[k], v) for k, v in disc.state_dict().items())


def test_training_reduces_the_reconstruction_loss(tmp_path):
    cfg = config(tmp_path, "train.steps=50", "train.lr=1e-3", "train.save_every=50", "train.batch_size=4",
                 "vae_loss.disc_weight=0")
    trainer = VAETrainer(cfg)
    batch = next(trainer.batches())

    def rec():  # vae_tiny's reconstruction term: squared error
        with torch.no_grad():
            return sum(trainer.losses(batch, 10_000, k)[2]["l2"].item() for k in range(2))

    before = rec()
    trainer.train()
    assert rec() < 0.7 * before


def test_export_holds_the_ema_vae_with_its_measured_scaling_factor(tmp_path, capsys):
    trainer = VAETrainer(config(tmp_path, "train.sample_every=3"))
    path = trainer.train()
    assert path == tmp_path / "vae.safetensors"
    assert "LPIPS off" in capsys.readouterr().out  # reported once, with how to enable it
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 6 and math.isfinite(metrics["psnr"])
    vae = load_vae_file(path)
    factor = vae.cfg.scaling_factor
    assert math.isfinite(factor) and factor > 0 and factor == metrics["scaling_factor"]
    # The EMA weights were exported, and recomputing the factor from them gives the stored one.
    ema = trainer.ema.state_dict_for(trainer.vae)
    assert all(torch.equal(ema[k], v) for k, v in vae.state_dict().items())
    images = heldout_images(trainer.cfg.data, trainer.cfg.train.seed)
    assert images.shape == (8, 3, 16, 16)
    assert latent_scaling_factor(vae, images, 2, seed=trainer.cfg.train.seed) == pytest.approx(factor, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["recon-00000003.png", "recon-00000006.png"]


def test_psnr_of_known_errors():
    x = torch.zeros(2, 3, 4, 4)
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=1e-4)  # error 0.1 on [0, 1]: 10 log10(1 / 0.01)


def test_non_finite_losses_are_skipped_then_stop_training(tmp_path, monkeypatch):
    trainer = VAETrainer(config(tmp_path, "train.max_bad_steps=3"))
    before = {k: v.clone() for k, v in trainer.vae.state_dict().items()}

    def nan_loss(batch, step, micro):
        nan = torch.tensor(float("nan"), requires_grad=True)
        return nan, None, {"rec": nan.detach()}

    monkeypatch.setattr(trainer, "losses", nan_loss)
    with pytest.raises(FloatingPointError, match="NaN/Inf for 3 steps in a row"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.vae.state_dict().items())


def test_stage_1_trains_and_measures_on_a_folder_of_images(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for i in range(24):  # smooth colour ramps, so a few steps already reconstruct something
        ramp = torch.linspace(0, 1, 20)[None, :, None] * torch.rand(1, 1, 3, generator=rng)
        pixels = (255 * (ramp + 0.5 * torch.rand(1, 1, 3, generator=rng)).clamp(0, 1)).expand(20, 20, 3)
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / f"p{i}.png")
        (tmp_path / f"p{i}.txt").write_text(f"ramp {i}")
    folder = ["data.source=folder", f"data.urls={tmp_path}", "data.num_workers=0", "data.heldout_fraction=0.25",
              "data.epoch_length=3", "vae_loss.disc_weight=0"]
    trainer = VAETrainer(config(tmp_path / "run", *folder))
    from ldm.data.batches import HashSplit, folder_images

    held = [it for it in folder_images(trainer.cfg.data) if HashSplit(0.25, True)(it.key)]
    images = heldout_images(trainer.cfg.data, 0)
    assert images.shape == (len(held), 3, 16, 16) and 0 < len(held) < 24
    path = trainer.train()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["heldout_size"] == len(held) and math.isfinite(metrics["psnr"])
    # The scaling factor was measured on these held-out images (reproducible from the export).
    vae = load_vae_file(path)
    assert latent_scaling_factor(vae, images, 2, seed=0) == pytest.approx(metrics["scaling_factor"], rel=1e-6)
    # Resumed mid-run, the folder stream continues where it stopped: same weights as one run.
    VAETrainer(config(tmp_path / "b", *folder)).train(until=4)
    VAETrainer(config(tmp_path / "b", *folder), resume=True).train()
    exported = load_vae_file(tmp_path / "b" / "vae.safetensors").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in vae.state_dict().items())


def test_stage_1_refuses_cached_latents(tmp_path):
    cfg = config(tmp_path, "data.source=latents", f"data.urls={tmp_path}")
    with pytest.raises(ValueError, match="stage 1 trains on images"):
        VAETrainer(cfg).train()


def test_tool_trains_and_reports_where_things_went(tmp_path, capsys):
    from ldm.cli import train_vae

    argv = [str(CONFIGS / "vae_tiny.yaml"), *TINY, "train.steps=2", f"train.output_dir={tmp_path}"]
    assert train_vae.main(argv) == 0
    out = capsys.readouterr().out
    assert f"vae:     {tmp_path / 'vae.safetensors'}" in out and "held-out PSNR" in out
    assert train_vae.main([*argv, "train.steps=3", "--resume-with-changes"]) == 0  # three steps instead of two
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 3


def test_vae_configs_match_the_models_they_train():
    for vae_cfg, ldm_cfg in (("vae_tiny", "sd_tiny"), ("vae_small", "sd_small"), ("vae_sr_tiny", "sr_tiny"),
                             ("vae_sr_tiny_128", "sr_tiny_128")):
        a = load_config(CONFIGS / f"{vae_cfg}.yaml").model.vae
        b = load_config(CONFIGS / f"{ldm_cfg}.yaml").model.vae
        assert a == b, vae_cfg
