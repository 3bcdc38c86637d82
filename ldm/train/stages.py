"""Both stages from one config: stage 1 trains the VAE when `train.vae_checkpoint` is missing, on
the data stage 2 reads, then stage 2 trains the latent diffusion model on it (a text-to-image
model, or an upscaler when the config has a `model.low_res` section).

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
from ..config_io import load_yaml, merge, to_dict
from ..data.batches import check_data


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


def train_stages(cfg: Config, overrides: Sequence[str] = (), *, resume: bool = False,
                 log: Callable[[str], None] = print) -> Path | None:
    """Stage 1 if the VAE file is missing, then stage 2. Returns the exported model file, or None
    when a stage stopped early (interrupted; its state is saved, rerun with `resume=True`)."""
    from .ldm_trainer import LDMTrainer
    from .upscaler_trainer import UpscalerTrainer
    from .vae_trainer import VAETrainer

    check_data(cfg.data)  # bad data fails now, not after stage 1
    vae_path = Path(cfg.train.vae_checkpoint)
    if not vae_path.is_file():
        vae_cfg = stage1_config(cfg, overrides)
        exported = Path(vae_cfg.train.output_dir) / VAETrainer.EXPORT_NAME
        if exported.resolve() != vae_path.resolve():
            raise ValueError(f"stage 1 would write {exported} but train.vae_checkpoint is {vae_path}: make "
                             f"{cfg.train.vae_config}'s train.output_dir and this config's train.vae_checkpoint agree")
        check_data(vae_cfg.data, images=True)
        log(f"stage 1: VAE checkpoint {vae_path} not found; training it first with {cfg.train.vae_config}")
        stage1 = VAETrainer(vae_cfg, resume=resume)
        stage1.train()
        if stage1.step < vae_cfg.train.steps:  # interrupted: its state is saved; stage 2 must wait
            log(f"stage 1 stopped at step {stage1.step}; run the same command with --resume to continue")
            return None
    upscaler = cfg.model.low_res is not None
    log(f"stage 2: {'the latent upscaler' if upscaler else 'latent diffusion'} on the VAE {vae_path}")
    trainer = (UpscalerTrainer if upscaler else LDMTrainer)(cfg, resume=resume)
    path = trainer.train()
    return path if trainer.step >= cfg.train.steps else None
