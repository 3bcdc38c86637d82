"""Train a latent text-to-image diffusion model (stage 2), training its VAE first if needed.

    python tools/train_ldm.py configs/sd_tiny.yaml                      # the built-in data, CPU-sized
    python tools/train_ldm.py configs/sd_small.yaml train.steps=20000 data.source=shards data.urls=/data/shards
    python tools/train_ldm.py configs/sd_tiny.yaml --resume             # continue from the latest state
    accelerate launch --num_processes 8 tools/train_ldm.py configs/sd_small.yaml

When `train.vae_checkpoint` does not exist yet, stage 1 runs first with `train.vae_config`, on the
data stage 2 reads (`data.*` keys carry over unless the VAE config sets them; see docs/training.md).

    python tools/train_ldm.py configs/sd_tiny.yaml data.source=folder data.urls=my_images/   # your own images
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..config import load_config
from .common import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="config YAML (e.g. configs/sd_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=500")
    parser.add_argument("--resume", action="store_true", help="continue from the latest training state in train.output_dir")
    args = parser.parse_args(argv)

    from ..train.stages import train_stages

    cfg = load_config(args.config, args.overrides)
    path = train_stages(cfg, args.overrides, resume=args.resume)
    if path is None:  # interrupted: the state is saved
        return 130
    print(f"model: {path}")
    if cfg.model.low_res is not None:  # an upscaler
        print(f"try:   python tools/upscale.py --ckpt {path} --image SMALL.png --out BIG.png")
        return 0
    prompt = cfg.train.sample_prompts[0] if cfg.train.sample_prompts else (
        "a large red circle in the center on a white background" if cfg.data.source == "shapes"
        else "a caption like those of your images")
    print(f"try:   python tools/txt2img.py --ckpt {path} --prompt \"{prompt}\"")
    return 0


run = partial(run_main, main)  # the ldm-train entry point

if __name__ == "__main__":
    sys.exit(run())
