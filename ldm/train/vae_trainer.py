"""Stage 1: train the KL autoencoder (with a patch discriminator from `disc_start` on).

Builds the autoencoder and discriminator and supplies the step the shared loop
(`ldm.train.loop.Trainer`) runs: draw a batch, encode it, sample the posterior with the step's own
noise, decode, and step the autoencoder's optimizer (and the discriminator's once it is active).
At the end the held-out PSNR and the latent scaling factor are measured on held-out images of the
training data (any source) and the VAE (EMA weights) is exported as a model file that
`load_vae_file` reads and stage 2 trains on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

from ..atomic import write_text_atomic
from ..checkpoint import load_state_strict, save_model_file
from ..config import Config, DataConfig
from ..config_io import require_start
from ..convert.vae_file import vae_from_file
from ..data.batches import heldout_items
from ..images import make_grid, to_pil
from ..models.vae import AutoencoderKL, DiagonalGaussian
from .ema import EMA
from .loop import Trainer, step_generator
from .optim import make_lr_scheduler, make_optimizer
from .vae_loss import PatchDiscriminator, VAELoss, lpips_from_config

# GAN practice (and the original autoencoder training): a short memory for the first moment.
DISC_BETAS = (0.5, 0.9)
SAMPLE_IMAGES = 8  # held-out images shown in each reconstruction grid


class Autoencode(nn.Module):
    """x -> (reconstruction, posterior), with the posterior sampled using the given noise.

    The trained module: wrapping encode + decode in one `forward` lets accelerate apply mixed
    precision and DDP gradient synchronisation to the whole pass."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.vae.encode(images)
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # (B, embed_dim, H/f, W/f)
        return self.vae.decode(z), posterior


def latent_shape(vae: AutoencoderKL, images: torch.Tensor) -> tuple[int, ...]:
    b, _, h, w = images.shape
    f = vae.downsample_factor
    return (b, vae.cfg.embed_dim, h // f, w // f)


def heldout_images(data: DataConfig, seed: int) -> torch.Tensor:
    """The first `data.heldout_size` held-out images of the data: (N, 3, H, W) in [-1, 1]."""
    return torch.stack([item["image"] for item in heldout_items(data, seed)])


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Decode the posterior means of `images` (on the VAE's device), clamped to [-1, 1], on the CPU."""
    device = next(vae.parameters()).device
    out = [vae.decode(vae.encode(x.to(device)).mean).float().clamp(-1, 1).cpu() for x in images.split(batch_size)]
    return torch.cat(out)


def psnr(images: torch.Tensor, recon: torch.Tensor) -> float:
    """Mean over images of the PSNR in dB of [0, 1] images, from tensors in [-1, 1]."""
    mse = ((images.float() - recon.float()) / 2).pow(2).mean(dim=(1, 2, 3))  # [-1, 1] -> [0, 1] halves errors
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, batch_size: int, seed: int = 0) -> float:
    """1 / std of posterior samples over `images` (all latent elements pooled).

    Samples, not means: stage 2 diffuses posterior samples (as Stable Diffusion did when it measured
    0.18215), so these are what should have unit variance. The noise is seeded, so the value is
    reproducible; with a trained VAE the posterior std is small and means give nearly the same value.
    """
    device = next(vae.parameters()).device
    g = torch.Generator().manual_seed(seed)
    latents = []
    for x in images.split(batch_size):
        posterior = vae.encode(x.to(device))
        noise = torch.randn(posterior.mean.shape, generator=g).to(device)
        latents.append((posterior.mean + posterior.std * noise).float().cpu())
    std = torch.cat(latents).std().item()
    if not (math.isfinite(std) and std > 0):
        raise FloatingPointError(f"the VAE's latents have std {std}; the run diverged, train again with a lower lr")
    return 1.0 / std


@torch.no_grad()
def narrow_posterior_(vae: AutoencoderKL, logvar: float) -> None:
    """Start the posterior's log-variance near `logvar`: the log-variance half of `quant_conv`
    gets that bias and a tenth of its initial weights (a fresh model only; training moves it on)."""
    conv = vae.quant_conv
    half = conv.out_channels // 2  # moments = cat([mean, logvar]) along channels
    conv.bias[half:] = logvar
    conv.weight[half:] *= 0.1


class VAETrainer(Trainer):
    """Owns one stage-1 run: autoencoder, discriminator, their optimizers, EMA, and the output directory."""

    NAME = "vae"
    EXPORT_NAME = "vae.safetensors"
    STATE_PARTS = ("vae", "disc")
    STATE_OBJECTS = ("optimizer", "disc_optimizer", "scheduler", "ema")
    OPTIMIZERS = ("optimizer", "disc_optimizer")
    NO_FSDP = ("the autoencoder is small (SD's: 84M parameters, 1.3 GB with gradients and AdamW moments), so every "
               "rank holds it whole")

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False):
        t, lc = cfg.train, cfg.vae_loss
        start = None
        if t.init_from:  # fine-tuning a VAE (as vae-ft-mse was): any VAE file or folder, or a model's VAE
            require_start(t.init_from)
            start = vae_from_file(t.init_from, cfg.model.vae)
            cfg.model.vae = dataclasses.replace(start.cfg, dropout=cfg.model.vae.dropout)
            cfg.validate()
        super().__init__(cfg, resume=resume, images=True, overwrite=overwrite,
                         resume_with_changes=resume_with_changes)
        acc = self.accelerator

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            vae = AutoencoderKL(cfg.model.vae) if start is None else start
            disc = PatchDiscriminator(cfg.model.vae.out_channels, lc.disc_channels, lc.disc_layers)
        if start is not None:
            acc.print(f"vae: starts from {t.init_from} (its architecture; latent scale measured again at the end)")
        elif lc.init_logvar is not None:
            narrow_posterior_(vae, lc.init_logvar)
        vae.requires_grad_(True).train().to(acc.device)  # on the device before the EMA copies it
        optimizer = make_optimizer(list(vae.parameters()), t)
        disc_opt_cfg = dataclasses.replace(t, adam_betas=DISC_BETAS, weight_decay=0.0)
        disc_optimizer = make_optimizer(list(disc.parameters()), disc_opt_cfg, lr=lc.disc_lr)
        self.ema = EMA(vae, t.ema_decay) if t.ema_decay > 0 else None

        lpips, self.lpips_status = lpips_from_config(lc)
        acc.print(self.lpips_status)
        self.objective = VAELoss(lc, lpips.to(acc.device) if lpips is not None else None)

        state = self.resume_state(optimizer)
        if state is not None:
            weights, trainer = state
            load_state_strict(vae, weights["vae"], f"{self._state} [vae]")
            load_state_strict(disc, weights["disc"], f"{self._state} [disc]")
            if self.ema is not None:
                self.ema.load_state_dict(trainer["ema"])

        model, disc, optimizer, disc_optimizer = acc.prepare(Autoencode(vae), disc, optimizer, disc_optimizer)
        scheduler = make_lr_scheduler(optimizer, t)
        if state is not None:
            # After the scheduler exists: its constructor resets the learning rate that this restores.
            optimizer.load_state_dict(trainer["optimizer"])
            disc_optimizer.load_state_dict(trainer["disc_optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            self.resumed()
        self.model, self.disc, self.optimizer, self.disc_optimizer = model, disc, optimizer, disc_optimizer
        self.scheduler = scheduler
        self._heldout: torch.Tensor | None = None

    @property
    def vae(self) -> AutoencoderKL:
        """The trained autoencoder (not its EMA)."""
        return self.accelerator.unwrap_model(self.model).vae

    # ------------------------------------------------------------------------------------------

    def losses(self, batch: dict, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(autoencoder loss, discriminator loss or None before disc_start, logs) of one micro-batch;
        the posterior noise comes from the (seed, step, rank, micro) generator."""
        acc = self.accelerator
        g = step_generator(self.cfg.train.seed, step, acc.process_index, stream=micro)
        images = batch["image"].to(acc.device)
        noise = torch.randn(latent_shape(self.vae, images), generator=g).to(acc.device)
        recon, posterior = self.model(images, noise)
        if not self.objective.disc_active(step):
            loss, logs = self.objective.generator(images, recon, posterior, None, None)
            return loss, None, logs
        # D(recon) with the discriminator's weights detached: gradients reach the autoencoder only.
        disc = acc.unwrap_model(self.disc)
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        logits_fake = torch.func.functional_call(disc, frozen, (recon,))
        last_layer = self.vae.decoder.conv_out.weight
        loss, logs = self.objective.generator(images, recon, posterior, logits_fake, last_layer)
        # Real and fake in one call (one DDP forward per backward); GroupNorm keeps samples independent.
        logits_real, logits_fake_d = self.disc(torch.cat([images, recon.detach()])).chunk(2)
        d_loss, d_logs = self.objective.discriminator(logits_real, logits_fake_d)
        return loss, d_loss, {**logs, **d_logs}

    def train_step(self, step: int, data) -> tuple[dict[str, float], dict[str, str]]:
        t, acc = self.cfg.train, self.accelerator
        disc_on = self.objective.disc_active(step)

        def micro_losses(batch, s, m):
            loss, d_loss, parts = self.losses(batch, s, m)
            return [loss, d_loss], parts

        (loss, d_loss), logs = self.accumulate(step, data, [self.model, self.disc], micro_losses)
        if self.bad.check(loss + d_loss, step):
            # Clip each model right before its own step: with fp16, accelerate's gradient
            # scaler unscales every optimizer at a clip and resets them at each step.
            if t.max_grad_norm > 0:
                acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)
            self.optimizer.step()
            if disc_on:
                if t.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.disc.parameters(), t.max_grad_norm)
                self.disc_optimizer.step()
            if self.ema is not None:
                self.ema.update(self.vae)
        self.optimizer.zero_grad(set_to_none=True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        postfix = {"loss": f"{loss.item():.4f}", "rec": f"{logs['rec']:.4f}"}
        if disc_on:
            postfix["d"] = f"{d_loss.item():.3f}"
        return {"loss": loss.item(), **logs}, postfix

    def train(self, until: int | None = None) -> Path:
        """Run to `train.steps`, measure and export the VAE file (returned). The held-out images are
        read first, so data without any fails before training. With `until`, stop after that
        step with a saved state, as an interrupt would (a later run resumes from it)."""
        self.heldout()
        return super().train(until)

    def train_mode(self) -> None:
        self.model.train()
        self.disc.train()

    # ------------------------------------------------------------------------------------------

    def state_parts(self):
        acc = self.accelerator
        weights = {"vae": self.vae.state_dict(), "disc": acc.unwrap_model(self.disc).state_dict()}
        trainer = {
            "optimizer": self.optimizer.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else {},
        }
        return weights, trainer

    def inference_vae(self) -> AutoencoderKL:
        """A copy of the autoencoder with the EMA weights (the trained ones when EMA is off), in eval mode."""
        vae = AutoencoderKL(self.cfg.model.vae)
        trained = self.vae
        vae.load_state_dict(self.ema.state_dict_for(trained) if self.ema is not None else trained.state_dict())
        return vae.to(self.accelerator.device).eval()

    def heldout(self) -> torch.Tensor:
        if self._heldout is None:
            self._heldout = heldout_images(self.cfg.data, self.cfg.train.seed)
        return self._heldout

    def sample_grid(self) -> Path | None:
        """Held-out inputs beside their reconstructions (input, recon, input, recon, ...) as a PNG."""
        acc = self.accelerator
        if not acc.is_main_process:
            return None
        images = self.heldout()[:SAMPLE_IMAGES]
        recon = reconstruct(self.inference_vae(), images, self.cfg.train.batch_size)
        tiles = [to_pil((x + 1) / 2) for pair in zip(images, recon) for x in pair]
        path = self.out / "samples" / f"recon-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(tiles, cols=2 * math.ceil(math.sqrt(len(images)))).save(path)
        return path

    def export(self) -> Path:
        """Measure held-out PSNR and the latent scaling factor, then write `vae.safetensors` (EMA
        weights, the factor in its config) and `metrics.json`. Returns the VAE file's path."""
        acc = self.accelerator
        path = self.out / "vae.safetensors"
        if acc.is_main_process:
            vae = self.inference_vae()
            images = self.heldout()
            bs = self.cfg.train.batch_size
            value = psnr(images, reconstruct(vae, images, bs))
            factor = latent_scaling_factor(vae, images, bs, seed=self.cfg.train.seed)
            cfg = copy.deepcopy(self.cfg)
            cfg.model.vae.scaling_factor = factor
            vae.cfg = cfg.model.vae
            self.write_export(f"the VAE file {path.name}", lambda: save_model_file(path, {"vae": vae}, cfg))
            metrics = {"psnr": value, "scaling_factor": factor, "steps": self.step, "heldout_size": len(images)}
            write_text_atomic(self.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            acc.log({"heldout_psnr": value, "scaling_factor": factor}, step=self.step)
            acc.print(f"held-out PSNR {value:.2f} dB on {len(images)} images; latent scaling_factor {factor:.5f}")
            acc.print(f"exported {path}")
            t = self.cfg.train
            if not (t.sample_every and self.step % t.sample_every == 0):  # not drawn at this step yet
                self.sample_grid()
        acc.wait_for_everyone()
        return path
