#!/usr/bin/env python
"""Train a latent text-to-image diffusion model (stage 2), training its VAE first if needed.

    python tools/train_ldm.py configs/sd_tiny.yaml                      # the built-in data, CPU-sized
    python tools/train_ldm.py configs/sd_small.yaml train.steps=20000 data.source=shards data.urls=/data/shards
    python tools/train_ldm.py configs/sd_tiny.yaml --resume             # continue from the latest state
    accelerate launch --num_processes 8 tools/train_ldm.py configs/sd_small.yaml

When `train.vae_checkpoint` does not exist yet, stage 1 runs first with `train.vae_config`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import run_main  # noqa: E402
from ldm.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="config YAML (e.g. configs/sd_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=500")
    parser.add_argument("--resume", action="store_true", help="continue from the latest training state in train.output_dir")
    args = parser.parse_args(argv)

    from ldm.train.ldm_trainer import LDMTrainer
    from ldm.train.vae_trainer import VAETrainer

    cfg = load_config(args.config, args.overrides)
    vae_path = Path(cfg.train.vae_checkpoint)
    if not vae_path.is_file():
        if not cfg.train.vae_config:
            raise ValueError(f"VAE checkpoint {vae_path} not found and train.vae_config is empty: train a VAE first")
        print(f"stage 1: VAE checkpoint {vae_path} not found; training it first with {cfg.train.vae_config}")
        vae_cfg = load_config(cfg.train.vae_config)
        stage1 = VAETrainer(vae_cfg, resume=args.resume)
        exported = stage1.train()
        if stage1.step < vae_cfg.train.steps:  # interrupted: its state is saved; stage 2 must wait
            print(f"stage 1 stopped at step {stage1.step}; run the same command with --resume to continue")
            return 130
        if exported.resolve() != vae_path.resolve():
            raise ValueError(
                f"stage 1 wrote {exported} but train.vae_checkpoint is {vae_path}: make {cfg.train.vae_config}'s "
                "train.output_dir and this config's train.vae_checkpoint agree"
            )
        print("stage 2: latent diffusion")
    trainer = LDMTrainer(cfg, resume=args.resume)
    path = trainer.train()
    if trainer.step < cfg.train.steps:
        return 130
    print(f"model: {path}")
    print(f"try:   python tools/txt2img.py --ckpt {path} --prompt \"a large red circle in the center on a white background\"")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
