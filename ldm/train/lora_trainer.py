"""LoRA training: low-rank adapters on a frozen base model, exported as a kohya-layout LoRA file.

`train.lora.rank > 0` turns stage 2 (`LDMTrainer`) into this: the base model (`train.init_from`: our
file, an original SD `.safetensors`/`.ckpt`, or a diffusers folder) is loaded with its own
architecture and VAE, every one of its weights is frozen, and `ldm.models.lora.LoRANetwork`
adapters on the chosen layers (`train.lora.targets`, optionally the text encoder's) are the only
trained tensors. The data, the loss, the loop, resume and the held-out loss are the LDM trainer's;
what differs is what is built, what a training state holds (the adapters), and the export:
`<output>/lora.safetensors` in the layout A1111, ComfyUI, diffusers and `pipe.load_lora` read,
with the training settings in its `ss_*` metadata. No EMA: LoRA runs are short and
kohya's trainers keep none either.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from ..build import load_state_strict
from ..config import Config, ModelConfig, to_dict
from ..convert.lora import layers, save_lora
from ..diffusion import Schedule
from ..models.lora import LoRANetwork, Target
from ..pipeline import LDMPipeline
from .base_model import load_base
from .ldm_trainer import DEFAULT_PROMPTS, LDMTrainer
from .loop import Trainer
from .optim import make_lr_scheduler, make_optimizer

# Named groups of U-Net layers (searched in diffusers-style module names, as kohya and peft name them).
TARGET_GROUPS = {
    "attention": r"\.attn[12]\.to_(q|k|v|out\.0)$",  # diffusers' DreamBooth-LoRA default
    "transformer": r"\.attentions\.\d+\.",  # kohya's default: everything in the attention blocks
    "resnet": r"\.(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$",  # LoCon
    "all": r".",
}


def lora_targets(model: ModelConfig, targets: tuple[str, ...], text_encoder: bool) -> list[Target]:
    """The weights a new LoRA adapts: the U-Net layers `targets` select (groups or regular
    expressions), and with `text_encoder` every attention and MLP layer of the text encoder that
    its output depends on. Each target in a fixed order (by its diffusers-style name)."""
    by_name = {layer.diffusers: layer for layer in layers(model.unet, model.text_encoder).values()}
    unet = sorted(name for name in by_name if name.startswith("unet."))
    chosen: set[str] = set()
    for entry in targets:
        try:
            pattern = re.compile(TARGET_GROUPS.get(entry, entry))
        except re.error as e:
            raise ValueError(f"train.lora.targets: {entry!r} is neither a group ({', '.join(TARGET_GROUPS)}) "
                             f"nor a regular expression ({e})") from None
        found = [name for name in unet if pattern.search(name.removeprefix("unet."))]
        if not found:
            raise ValueError(f"train.lora.targets: {entry!r} matches no layer of this U-Net; use a group "
                             f"({', '.join(TARGET_GROUPS)}) or a pattern for names such as {unet[0]!r}, {unet[-1]!r}")
        chosen.update(found)
    if text_encoder:
        skipped = 1 if model.text_encoder.layer == "penultimate" else 0  # its output never reaches the U-Net
        used = range(model.text_encoder.layers - skipped)
        chosen.update(name for name in by_name if name.startswith("text_encoder.")
                      and int(re.search(r"\.layers\.(\d+)\.", name).group(1)) in used)
    return [by_name[name].target for name in sorted(chosen)]


class _Adapted(nn.Module):
    """The U-Net with the LoRA adapters as its submodules, so that accelerate and DDP see the
    trained parameters (the adapters act through hooks on the U-Net's and text encoder's layers)."""

    def __init__(self, unet: nn.Module, lora: LoRANetwork):
        super().__init__()
        self.unet, self.lora = unet, lora

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, context)


class LoRATrainer(LDMTrainer):
    """One LoRA run: the base model frozen, adapters trained, a LoRA file exported."""

    NAME = "lora"
    EXPORT_NAME = "lora.safetensors"
    STATE_PARTS = ("lora",)  # a state holds the adapters, not the frozen base model
    NO_FSDP = "a LoRA trains only its adapters (megabytes), which every rank holds whole"

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False):
        cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
        t = cfg.train
        if not t.init_from:
            raise ValueError("train.lora needs a base model to adapt: set train.init_from to a model file (ours, an "
                             "original SD .safetensors/.ckpt) or a diffusers folder")
        found = load_base(cfg, kind="text-to-image")  # its own architecture and VAE (see ldm.train.base_model), in float32
        base, cfg.model = found.pipe, found.model
        t.output_dir = t.lora.output_dir = t.lora.output_dir or str(Path(t.output_dir) / "lora")
        cfg.validate()
        Trainer.__init__(self, cfg, resume=resume, overwrite=overwrite, resume_with_changes=resume_with_changes)
        acc, lc = self.accelerator, t.lora
        acc.print(f"lora: rank {lc.rank}, alpha {lc.alpha or lc.rank:g} on {t.init_from}; writing to {self.out}")
        for line in found.notes:
            acc.print(line)
        for module in base.modules.values():
            module.requires_grad_(False)
        self.vae = base.vae.to(acc.device).eval()
        unet, text_encoder = base.unet, base.text_encoder
        networks = {"unet": unet, "text_encoder": text_encoder}
        targets = lora_targets(cfg.model, lc.targets, lc.text_encoder)
        lora = LoRANetwork.create(networks, targets, lc.rank, lc.alpha,
                                  generator=torch.Generator().manual_seed(t.seed))
        acc.print(f"lora: {len(targets)} layers, {sum(p.numel() for p in lora.parameters()):,} trained parameters")
        unet.set_gradient_checkpointing(cfg.model.unet.gradient_checkpointing)
        if t.channels_last:
            unet.to(memory_format=torch.channels_last)
        self.train_text = lc.text_encoder
        self.schedule = Schedule.from_config(cfg.model.diffusion)
        adapters = {"unet": [], "text_encoder": []}
        for target, adapter in zip(lora.targets, lora.adapters):
            adapters[target.network] += list(adapter.parameters())
        groups = [{"params": adapters["unet"]}, {"params": adapters["text_encoder"], "lr": t.text_encoder_lr or t.lr}]
        optimizer = make_optimizer(groups, t)  # an empty text group is dropped
        self.ema = {}

        state = self.resume_state(optimizer)
        if state is not None:
            weights, trainer = state
            load_state_strict(lora, weights["lora"], f"{self._state} [lora]")
        lora.attach(networks)
        text_encoder.to(acc.device)
        if t.compile is not None:
            unet.compile(mode=t.compile, dynamic=False)
        adapted, optimizer = acc.prepare(_Adapted(unet, lora), optimizer)
        scheduler = make_lr_scheduler(optimizer, t)
        if state is not None:
            optimizer.load_state_dict(trainer["optimizer"])
            scheduler.load_state_dict(trainer["scheduler"])
            self.resumed()
        self.unet, self.text_encoder, self.optimizer, self.scheduler = adapted, text_encoder, optimizer, scheduler
        self.lora, self.base_unet = lora, unet
        self.prompts = list(t.sample_prompts) or (list(DEFAULT_PROMPTS) if cfg.data.source == "shapes" else [])
        self._heldout: list[dict] | None = None

    def _params(self):
        return list(self.lora.parameters())

    def state_parts(self):
        trainer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "ema": {}}
        return {"lora": self.lora.state_dict()}, trainer

    def inference_pipeline(self) -> LDMPipeline | None:
        """A pipeline on the base networks with the LoRA as trained (its hooks stay attached), on
        the main rank (None on the others)."""
        if not self.accelerator.is_main_process:
            return None
        return LDMPipeline(self.vae, self.base_unet, self.text_encoder, self.cfg.model.diffusion,
                           defaults=self.cfg.sample)

    def sample_grid(self) -> Path | None:
        path = super().sample_grid()
        self.train_mode()
        return path

    def export(self) -> Path:
        """The LoRA file (kohya layout, training settings in its metadata); the held-out loss with it."""
        acc = self.accelerator
        path = self.out / self.EXPORT_NAME
        if acc.is_main_process:
            save_lora(path, self.lora.weights(), self.cfg.model, metadata=self.metadata())
            acc.print(f"exported {path}")
            self._write_metrics(heldout_loss=self.heldout_loss(), steps=self.step, **self.resources())
        acc.wait_for_everyone()
        return path

    def metadata(self) -> dict[str, str]:
        """kohya's `ss_*` training keys (what A1111 and ComfyUI show of a LoRA), and our whole config."""
        cfg, t = self.cfg, self.cfg.train
        info = {
            "ss_sd_model_name": Path(t.init_from).name,
            "ss_output_name": Path(self.EXPORT_NAME).stem,
            "ss_learning_rate": str(t.lr),
            "ss_unet_lr": str(t.lr),
            "ss_network_train_unet_only": str(not t.lora.text_encoder),
            "ss_max_train_steps": str(t.steps),
            "ss_steps": str(self.step),
            "ss_batch_size_per_device": str(t.batch_size),
            "ss_gradient_accumulation_steps": str(t.grad_accum),
            "ss_num_processes": str(self.accelerator.num_processes),
            "ss_lr_scheduler": t.lr_schedule,
            "ss_lr_warmup_steps": str(t.warmup_steps),
            "ss_optimizer": "torch.optim.AdamW",
            "ss_mixed_precision": str(self.accelerator.mixed_precision),
            "ss_seed": str(t.seed),
            "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
            "ss_noise_offset": str(t.offset_noise),
            "ss_min_snr_gamma": str(t.min_snr_gamma),
            "ss_caption_dropout_rate": str(cfg.data.caption_dropout),
            "ldm_train_config": json.dumps(to_dict(cfg)),
        }
        if t.lora.text_encoder:
            info["ss_text_encoder_lr"] = str(t.text_encoder_lr or t.lr)
        return info
