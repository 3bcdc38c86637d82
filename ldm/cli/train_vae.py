"""Train the KL autoencoder (stage 1) and export it as a VAE file for stage 2.

    python tools/train_vae.py configs/vae_tiny.yaml                        # the built-in data, CPU-sized
    python tools/train_vae.py configs/vae_small.yaml vae_loss.lpips_weights=/weights/lpips_vgg.safetensors
    python tools/train_vae.py configs/vae_tiny.yaml --resume               # continue from the latest state
    python tools/train_vae.py configs/vae_tiny.yaml --overwrite            # a new run; the old one moves aside
    accelerate launch --num_processes 8 tools/train_vae.py configs/vae_small.yaml

Writes train.output_dir/vae.safetensors (EMA weights, with the measured latent scaling_factor in its
config), metrics.json (held-out PSNR, scaling_factor, steps), samples/ and training states.
"""

from __future__ import annotations

import sys
from functools import partial

from ..config import load_config
from .common import run_main
from .train_args import parse_training_args, training_parser


def main(argv: list[str] | None = None) -> int:
    args = parse_training_args(training_parser(__doc__, "configs/vae_tiny.yaml"), argv)

    from ..train.vae_trainer import VAETrainer

    cfg = load_config(args.config, args.overrides)
    trainer = VAETrainer(cfg, resume=args.resume, overwrite=args.overwrite,
                         resume_with_changes=args.resume_with_changes)
    path = trainer.train()
    if trainer.step < cfg.train.steps:
        print(f"training state: {trainer.out} (step {trainer.step} of {cfg.train.steps})")
        return 130
    print(f"vae:     {path}")
    print(f"metrics: {trainer.out / 'metrics.json'}")
    print(f"samples: {trainer.out / 'samples'}")
    return 0


run = partial(run_main, main)  # the ldm-train-vae entry point

if __name__ == "__main__":
    sys.exit(run())
