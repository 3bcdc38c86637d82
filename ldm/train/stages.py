"""Both stages from one config: stage 1 trains the VAE when `train.vae_checkpoint` is missing, on
the data stage 2 reads, then stage 2 trains the latent diffusion model on it (a text-to-image
model, or an upscaler when the config has a `model.low_res` section; or, with `train.lora.rank`,
LoRA adapters on the base model `train.init_from`, which needs no stage 1). A
fine-tune (`train.init_from` with `train.vae_checkpoint` empty) trains on the model's own VAE: no stage 1.

Which data stage 1 reads: the VAE config (`train.vae_config`) with the stage-2 run's `data`
carried over, except the `data` keys the VAE config file sets itself (and `caption_dropout`, which
is stage 2's alone); `data.*` overrides given on the command line apply to both stages. So `train_ldm.py configs/sd_tiny.yaml data.source=folder
data.urls=photos/` trains the autoencoder on the photos too (not on the built-in shapes), while a
VAE config may still keep its own resolution or its own data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..config import Config, load_config
from ..config_io import load_yaml, merge, require_start, to_dict
from ..data.batches import check_data
from .checkpoint import list_states


def data_overrides(overrides: Sequence[str]) -> list[str]:
    """The command-line overrides of `data.*` keys."""
    return [o for o in overrides if o.strip().startswith("data.")]


def stage1_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """Stage 1's config for the stage-2 config `cfg` (loaded with `overrides`): `train.vae_config`
    with `cfg.data` carried over where the VAE config file does not set a key, then the
    command line's `data.*` overrides."""
    if not cfg.train.vae_config:
        raise ValueError(f"VAE checkpoint {cfg.train.vae_checkpoint} not found and train.vae_config is empty: "
                         "train a VAE first (tools/train_vae.py), or name its config in train.vae_config")
    raw = load_yaml(cfg.train.vae_config)
    own = set(raw.get("data") or {}) | {"caption_dropout"}
    carried = {k: v for k, v in to_dict(cfg.data).items() if k not in own}
    return load_config(merge(raw, {"data": carried}), data_overrides(overrides))


def stage1_target(cfg: Config, vae_cfg: Config) -> Path:
    """Where stage 1 writes its VAE file, checked to be exactly `train.vae_checkpoint`: a mistyped
    path is an error before anything is written, never a run that writes somewhere else."""
    from .vae_trainer import VAETrainer

    vae_path = Path(cfg.train.vae_checkpoint)
    stage1_dir = Path(vae_cfg.train.output_dir)
    exported = stage1_dir / VAETrainer.EXPORT_NAME
    if exported.resolve() != vae_path.resolve():
        if exported.is_file():
            fix = f"did you mean train.vae_checkpoint={exported}? That file exists"
        else:
            fix = (f"to train the VAE there, set train.vae_checkpoint={exported}, or set train.output_dir in "
                   f"{cfg.train.vae_config} to the folder of {vae_path} (the file is named {VAETrainer.EXPORT_NAME})")
        raise ValueError(f"train.vae_checkpoint {vae_path} does not exist, and stage 1 ({cfg.train.vae_config}) "
                         f"would write {exported} instead: {fix}")
    if stage1_dir.resolve() == Path(cfg.train.output_dir).resolve():
        raise ValueError(f"stage 1 and stage 2 would both write to {stage1_dir}: give {cfg.train.vae_config} and this "
                         "config different train.output_dir folders")
    return exported


def train_stages(cfg: Config, overrides: Sequence[str] = (), *, resume: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False, log: Callable[[str], None] = print) -> Path | None:
    """Stage 1 if the VAE file is missing, then stage 2. Returns the exported model file, or None
    when a stage stopped early (interrupted; its state is saved, rerun with `resume=True`).

    `resume` continues the stage that was interrupted: stage 1 when the VAE file is still missing
    (an error when stage 1 has no state either: there is nothing to continue), else stage 2. A
    stage 2 that starts after stage 1 finished in this call starts fresh. `overwrite` and
    `resume_with_changes` apply to each stage as `ldm.train.folder` says."""
    from .ldm_trainer import LDMTrainer
    from .lora_trainer import LoRATrainer
    from .upscaler_trainer import UpscalerTrainer
    from .vae_trainer import VAETrainer

    check_data(cfg.data)  # bad data fails now, not after stage 1
    require_start(cfg.train.init_from)  # ... and so does a missing base model
    options = {"overwrite": overwrite, "resume_with_changes": resume_with_changes}
    if cfg.train.lora.rank:  # adapters on a whole base model, whose VAE it brings: no stage 1
        return _finished(LoRATrainer(cfg, resume=resume, **options))
    if not cfg.train.init_from and not cfg.train.vae_checkpoint:
        raise ValueError("train.vae_checkpoint and train.init_from are both empty: name the model to fine-tune "
                         "(train.init_from=FILE: an SD 1.x/2.x .safetensors/.ckpt, a diffusers folder or our file), "
                         "or the VAE to train a new model on (train.vae_checkpoint, with train.vae_config to make it)")
    vae_path = Path(cfg.train.vae_checkpoint)
    if cfg.train.init_from and not cfg.train.vae_checkpoint:  # fine-tuning: the model brings its VAE
        log(f"stage 2: latent diffusion, fine-tuning {cfg.train.init_from} on its own VAE (no stage 1)")
        return _finished(LDMTrainer(cfg, resume=resume, **options))
    if not vae_path.exists():  # a VAE file, or a diffusers VAE folder
        vae_cfg = stage1_config(cfg, overrides)
        stage1_target(cfg, vae_cfg)
        check_data(vae_cfg.data, images=True)
        require_start(vae_cfg.train.init_from, cfg.train.vae_config)  # named by its config, before VAETrainer checks it
        if resume and not list_states(vae_cfg.train.output_dir):
            raise ValueError(f"--resume: nothing to continue: the VAE file {vae_path} does not exist and stage 1 has "
                             f"no training state in {vae_cfg.train.output_dir}; check train.vae_checkpoint, or drop "
                             "--resume to train stage 1 from step 0")
        log(f"stage 1: VAE checkpoint {vae_path} not found; training it "
            f"{'on' if resume else 'first'} with {cfg.train.vae_config}")
        stage1 = VAETrainer(vae_cfg, resume=resume, **options)
        stage1.train()
        if stage1.step < vae_cfg.train.steps:  # interrupted: its state is saved; stage 2 must wait
            log(f"stage 1 stopped at step {stage1.step}; run the same command with --resume to continue")
            return None
        resume = False  # stage 2 has not started yet
    upscaler = cfg.model.low_res is not None
    log(f"stage 2: {'the latent upscaler' if upscaler else 'latent diffusion'} on the VAE {vae_path}")
    return _finished((UpscalerTrainer if upscaler else LDMTrainer)(cfg, resume=resume, **options))


def _finished(trainer) -> Path | None:
    """Train; the export's path, or None when stopped early."""
    path = trainer.train()
    return path if trainer.step >= trainer.cfg.train.steps else None
