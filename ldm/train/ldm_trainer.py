"""Stage 2: train the U-Net (and optionally the text encoder) on VAE latents.

Builds the models and supplies the step the shared loop (`ldm.train.loop.Trainer`) runs: draw a
batch, encode it to latents, noise it at random timesteps, predict, and step the optimizer. The
held-out denoising loss is measured before the first step and at the end; the export is an
inference model file with the EMA weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..build import load_state_strict
from ..config import Config
from ..convert.vae_file import vae_from_file
from ..data.batches import heldout_items
from ..devices import peak_memory
from ..diffusion import Schedule, diffusion_loss, q_sample, sample_timesteps
from ..eval.heldout import heldout_loss
from ..images import make_grid
from ..models import build_models
from ..pipeline import LDMPipeline
from .base_model import load_base
from .checkpoint import read_state_json
from .ema import EMA
from .fsdp import scatter_like, shard
from .loop import Trainer, caption_keep_mask, step_generator
from .optim import make_lr_scheduler, make_optimizer

DEFAULT_PROMPTS = (
    "a large red circle in the center on a white background",
    "a small blue square at the top left on a white background",
    "a large green triangle at the bottom right on a white background",
    "a small yellow circle on the right on a black background",
)


class LDMTrainer(Trainer):
    """Owns one stage-2 run: models, optimizer, EMA, data position, and the output directory."""

    NAME = "ldm"
    NO_FSDP = ""  # the U-Net (and a trained text encoder) are sharded under FSDP
    STATE_PARTS = ("unet", "text_encoder")
    STATE_OBJECTS = ("optimizer", "scheduler", "ema")

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False):
        t = cfg.train
        # The models come first, before the output folder is taken: a file that cannot be read, or
        # does not fit the config, is an error before anything is written.
        if t.init_from:  # fine-tuning: architecture, weights and VAE from a model file of any format
            base = load_base(cfg)
            cfg.model, notes = base.model, base.notes
            unet, vae, text_encoder = base.pipe.unet, base.pipe.vae, base.pipe.text_encoder
            if t.vae_checkpoint:  # another VAE for the same latents (the model's latent scale is kept)
                vae = base.pipe.load_vae(t.vae_checkpoint).vae
                cfg.model = dataclasses.replace(cfg.model, vae=vae.cfg)
                notes.append(f"train.vae_checkpoint: the VAE of {t.vae_checkpoint} instead of {t.init_from}'s")
        else:
            # The VAE is fixed in stage 2 and defines the latent space (and its scaling factor).
            if not t.vae_checkpoint:
                raise ValueError("train.vae_checkpoint is empty: stage 2 needs a VAE (a stage-1 file or any SD VAE "
                                 "file or folder), or a model to fine-tune in train.init_from, which brings its own")
            vae = vae_from_file(t.vae_checkpoint, cfg.model.vae)
            cfg.model.vae, notes = vae.cfg, []
            cfg.validate()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(t.seed)
                unet, _, text_encoder = build_models(cfg.model)
        cfg.validate()
        super().__init__(cfg, resume=resume, overwrite=overwrite, resume_with_changes=resume_with_changes)
        acc = self.accelerator
        for line in notes:
            acc.print(line)
        self.vae = vae.to(acc.device).eval().requires_grad_(False)
        unet.set_gradient_checkpointing(cfg.model.unet.gradient_checkpointing)
        if t.channels_last:  # convolutions then produce channels_last activations too
            unet.to(memory_format=torch.channels_last)
        self.train_text = cfg.model.text_encoder.trainable
        self.schedule = Schedule.from_config(cfg.model.diffusion)
        unet.requires_grad_(True).to(acc.device)  # on the device before the EMA copies it
        text_encoder.requires_grad_(self.train_text).to(acc.device)
        self.ema = {"unet": EMA(unet, t.ema_decay)} if t.ema_decay > 0 else {}
        if self.ema and self.train_text:
            self.ema["text_encoder"] = EMA(text_encoder, t.ema_decay)

        state = self.resume_state()
        if state is not None:
            weights, trainer = state
            load_state_strict(unet, weights["unet"], f"{self._state} [unet]")
            load_state_strict(text_encoder, weights["text_encoder"], f"{self._state} [text_encoder]")
            for name, ema in self.ema.items():
                ema.load_state_dict(trainer["ema"][name])

        # A frozen text encoder has nothing for DDP to synchronise: only trained modules are wrapped.
        unet, text_encoder = unet.to(acc.device), text_encoder.to(acc.device)
        if t.compile is not None:  # in place: state-dict keys stay; static shapes, timesteps are tensors
            unet.compile(mode=t.compile, dynamic=False)
        trained = {"unet": unet, "text_encoder": text_encoder} if self.train_text else {"unet": unet}
        if self.fsdp:  # sharded in place (the EMA too); the optimizer is built on the shards
            for name, module in trained.items():
                shard(module, acc.device, acc.mixed_precision)
                if name in self.ema:
                    self.ema[name].shadow = scatter_like(self.ema[name].shadow, module.state_dict())
            held = sum(p.to_local().numel() for p in unet.parameters())
            acc.print(f"{self.NAME}: FSDP over {acc.num_processes} processes shards the {' and '.join(trained)}: "
                      f"{held:,} of the U-Net's {sum(p.numel() for p in unet.parameters()):,} parameters per process")
        optimizer = make_optimizer(self._groups(unet, text_encoder), t)
        if state is not None:
            self.check_optimizer(optimizer)
        if self.fsdp:
            optimizer = acc.prepare(optimizer)
        else:
            *prepared, optimizer = acc.prepare(*trained.values(), optimizer)
            trained = dict(zip(trained, prepared))
            unet, text_encoder = trained["unet"], trained.get("text_encoder", text_encoder)
        scheduler = make_lr_scheduler(optimizer, t)
        if state is not None:
            # After the scheduler exists: its constructor resets the learning rate that this restores.
            self.load_optimizer(optimizer, trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            self.resumed()
        self.unet, self.text_encoder, self.optimizer, self.scheduler = unet, text_encoder, optimizer, scheduler
        self.prompts = list(t.sample_prompts) or (list(DEFAULT_PROMPTS) if cfg.data.source == "shapes" else [])
        self._heldout: list[dict] | None = None

    # ------------------------------------------------------------------------------------------

    def loss(self, batch: dict, step: int, micro: int) -> torch.Tensor:
        """Denoising loss of one micro-batch; all randomness from the (seed, step, rank) generator."""
        cfg, acc = self.cfg, self.accelerator
        g = step_generator(cfg.train.seed, step, acc.process_index, stream=micro)
        if "latent" in batch:  # cached posterior means (tools/cache_latents.py)
            z = batch["latent"].to(acc.device).float() * self.vae.scaling_factor
        else:
            with torch.no_grad():
                posterior = self.vae.encode(batch["image"].to(acc.device))
                eps = torch.randn(posterior.mean.shape, generator=g).to(acc.device)
                z = (posterior.mean + posterior.std * eps) * self.vae.scaling_factor
        b = z.shape[0]
        t = sample_timesteps(b, self.schedule.num_timesteps, cfg.train.timestep_shift, g).to(acc.device)
        noise = torch.randn(z.shape, generator=g).to(acc.device)
        if cfg.train.offset_noise > 0:  # per-channel offsets let the model shift overall brightness
            noise = noise + cfg.train.offset_noise * torch.randn(b, z.shape[1], 1, 1, generator=g).to(acc.device)
        keep = caption_keep_mask(b, cfg.data.caption_dropout, g)
        x_t = q_sample(z, t, noise, self.schedule)
        if "context" in batch and not self.train_text:  # cached embeddings of a frozen text encoder
            with torch.no_grad():
                empty = self.text_encoder([""]).to(acc.device)
            context = torch.where(keep.to(acc.device)[:, None, None], batch["context"].to(acc.device), empty)
        else:
            captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]
            with torch.set_grad_enabled(self.train_text):
                context = self.text_encoder(captions)
        pred = self.unet(x_t, t, context)
        return diffusion_loss(
            pred.float(), z, noise, t, self.schedule, cfg.model.diffusion.prediction_type, cfg.train.min_snr_gamma,
            min_snr_floor=cfg.train.min_snr_floor,
        )

    def train_step(self, step: int, data) -> tuple[dict[str, float], dict[str, str]]:
        t = self.cfg.train
        (loss,), _ = self.accumulate(step, data, [self.unet], lambda batch, s, m: ([self.loss(batch, s, m)], {}))
        if self.bad.check(loss, step):
            if t.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(self._params(), t.max_grad_norm)
            self.optimizer.step()
            for name, ema in self.ema.items():
                ema.update(self.accelerator.unwrap_model(getattr(self, name)))
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss.item()}, {"loss": f"{loss.item():.4f}"}

    def train(self, until: int | None = None) -> Path:
        """Run to `train.steps` and export the inference model file (returned); the held-out loss
        is measured before the first step and after the last. With `until`, stop after that step
        with a saved state, as an interrupt would (a later run resumes from it)."""
        if self.step == 0 and until != 0:
            self._write_metrics(heldout_loss_start=self.heldout_loss())
        return super().train(until)

    def _groups(self, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> list[dict]:
        """The optimizer's parameter groups: the U-Net's, and the text encoder's when it trains."""
        t = self.cfg.train
        text_params = list(text_encoder.parameters()) if self.train_text else []
        if t.text_encoder_lr is None:  # one group: states saved before the option still load
            return [{"params": [*unet.parameters(), *text_params]}]
        # make_optimizer drops the text group when it is empty (a frozen text encoder)
        return [{"params": list(unet.parameters())}, {"params": text_params, "lr": t.text_encoder_lr}]

    def train_mode(self) -> None:
        self.unet.train()
        self.text_encoder.train()

    def _params(self):
        params = list(self.unet.parameters())
        return params + list(self.text_encoder.parameters()) if self.train_text else params

    # ------------------------------------------------------------------------------------------

    def state_parts(self):
        acc = self.accelerator
        weights = {
            "unet": acc.unwrap_model(self.unet).state_dict(),
            "text_encoder": acc.unwrap_model(self.text_encoder).state_dict(),
        }
        trainer = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": {name: ema.state_dict() for name, ema in self.ema.items()},
        }
        return weights, trainer

    def heldout(self) -> list[dict]:
        if self._heldout is None:
            self._heldout = heldout_items(self.cfg.data, self.cfg.train.seed)
        return self._heldout

    def heldout_loss(self, pipe: LDMPipeline | None = None) -> float:
        """Mean denoising loss of the EMA model on the held-out items (fixed noise and timesteps),
        on the main rank (NaN on the others). Every rank calls it, unless `pipe` is given."""
        if pipe is None:
            pipe = self.inference_pipeline()
        if pipe is None:  # not the main rank
            return float("nan")
        with torch.random.fork_rng(devices=[]):
            return heldout_loss(pipe, self.heldout())["loss"]

    def _write_metrics(self, **values: float) -> None:
        """Merge `values` into <output_dir>/metrics.json and say them (rank 0)."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        path = self.out / "metrics.json"
        metrics = read_state_json(self.out, path.name) or {}
        metrics.update(values, heldout_size=len(self.heldout()))
        write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
        when = {"heldout_loss_start": "before the first step", "heldout_loss": f"at step {self.step}"}
        for name, value in values.items():
            if name in when:
                acc.print(f"held-out denoising loss {when[name]}: {value:.4f} ({len(self.heldout())} images)")

    def inference_pipeline(self) -> LDMPipeline | None:
        """A pipeline on the EMA weights (the trained ones when EMA is off), on this device, on the
        main rank (None on the others). Every rank calls it: under FSDP the weights are gathered."""
        acc = self.accelerator

        def weights():
            modules = {name: acc.unwrap_model(getattr(self, name)) for name in ("unet", "text_encoder")}
            return {name: self.ema[name].state_dict_for(module) if name in self.ema else module.state_dict()
                    for name, module in modules.items()}

        whole = self.whole(weights)
        if whole is None:
            return None
        with torch.random.fork_rng(devices=[]):  # building the copy draws initial weights
            unet, _, text_encoder = build_models(self.cfg.model)
        unet.load_state_dict(whole["unet"])
        text_encoder.load_state_dict(whole["text_encoder"])
        pipe = LDMPipeline(self.vae, unet, text_encoder, self.cfg.model.diffusion, defaults=self.cfg.sample,
                            low_res=self.cfg.model.low_res)
        return pipe.to(acc.device)

    def sample_grid(self) -> Path | None:
        """Samples of `train.sample_prompts` (default: the first held-out captions) at fixed seeds."""
        pipe = self.inference_pipeline()
        if pipe is None:
            return None
        t = self.cfg.train
        prompts = self.prompts or [item["caption"] for item in self.heldout()[:4]]
        images = pipe.generate(
            prompts, steps=t.sample_steps, cfg=t.sample_cfg, seed=0, sampler="dpmpp_2m", progress=False,
            height=self.cfg.data.resolution, width=self.cfg.data.resolution,
        )
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid(images, cols=math.ceil(math.sqrt(len(images)))).save(path)
        self.unet.train()
        return path

    def export(self) -> Path:
        """The final inference model file (EMA weights), loadable by LDMPipeline.from_checkpoint."""
        acc = self.accelerator
        path = self.out / "model.safetensors"
        pipe = self.inference_pipeline()
        if acc.is_main_process:
            self.write_export(f"the model file {path.name}", lambda: pipe.save(path))
            acc.print(f"exported {path}")
            self._write_metrics(heldout_loss=self.heldout_loss(pipe), steps=self.step, **self.resources())
        acc.wait_for_everyone()
        return path

    def resources(self) -> dict[str, float]:
        """The speed of the last steps and the peak memory of the run so far (said, and kept in metrics.json)."""
        device = self.accelerator.device
        peak = peak_memory(device)
        values = {"images_per_s": round(self.images_per_s, 3)}
        if peak is not None:
            values["peak_memory_gib"] = round(peak / 2**30, 3)
        where = "of CUDA tensors" if device.type == "cuda" else "resident"
        self.accelerator.print(f"speed {values['images_per_s']:.2f} img/s over the last steps; peak memory "
                               + (f"{values['peak_memory_gib']:.2f} GiB ({where})" if peak is not None else "unknown"))
        return values
