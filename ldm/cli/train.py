"""Train a latent text-to-image diffusion model (stage 2), training its VAE first if needed.

    python tools/train_ldm.py configs/sd_tiny.yaml                      # the built-in data, CPU-sized
    python tools/train_ldm.py configs/sd_small.yaml train.steps=20000 data.source=shards data.urls=/data/shards
    python tools/train_ldm.py configs/sd_tiny.yaml --resume             # continue from the latest state
    python tools/train_ldm.py configs/sd_tiny.yaml --resume-with-changes train.steps=4000   # ... and train longer
    python tools/train_ldm.py configs/sd_tiny.yaml --overwrite          # a new run; the old one moves aside
    accelerate launch --num_processes 8 tools/train_ldm.py configs/sd_small.yaml

When `train.vae_checkpoint` does not exist yet, stage 1 runs first with `train.vae_config`, on the
data stage 2 reads (`data.*` keys carry over unless the VAE config sets them; see docs/training.md).

    python tools/train_ldm.py configs/sd_tiny.yaml data.source=folder data.urls=my_images/   # your own images

Fine-tuning Stable Diffusion: `train.init_from` names the model (an original SD 1.x/2.x .safetensors
or .ckpt, a diffusers folder, our file), whose architecture and VAE the run keeps (no stage 1):

    python tools/train_ldm.py configs/sd15_finetune.yaml train.init_from=v1-5-pruned-emaonly.safetensors \\
        data.source=folder data.urls=my_photos/          # -> runs/sd15_finetune/model.safetensors

With `train.lora.rank`, LoRA adapters train on the base model `train.init_from` instead (no stage 1),
and the run exports a LoRA file (docs/lora.md):

    python tools/train_ldm.py configs/sd_tiny.yaml train.lora.rank=8 train.init_from=runs/sd_tiny/model.safetensors \\
        data.source=folder data.urls=my_images/          # -> runs/sd_tiny/lora/lora.safetensors
"""

from __future__ import annotations

import sys
from functools import partial

from ..config import load_config
from .common import run_main
from .train_args import parse_training_args, training_parser


def main(argv: list[str] | None = None) -> int:
    args = parse_training_args(training_parser(__doc__, "configs/sd_tiny.yaml"), argv)

    from ..train.stages import train_stages

    cfg = load_config(args.config, args.overrides)
    path = train_stages(cfg, args.overrides, resume=args.resume, overwrite=args.overwrite,
                        resume_with_changes=args.resume_with_changes)
    if path is None:  # interrupted: the state is saved
        return 130
    if cfg.model.low_res is not None:  # an upscaler
        print(f"model: {path}")
        print(f"try:   python tools/upscale.py --ckpt {path} --image SMALL.png --out BIG.png")
        return 0
    prompt = cfg.train.sample_prompts[0] if cfg.train.sample_prompts else (
        "a large red circle in the center on a white background" if cfg.data.source == "shapes"
        else "a caption like those of your images")
    model = f"--ckpt {cfg.train.init_from} --lora {path}" if cfg.train.lora.rank else f"--ckpt {path}"
    print(f"{'LoRA' if cfg.train.lora.rank else 'model'}: {path}")
    print(f"try:   python tools/txt2img.py {model} --prompt \"{prompt}\"")
    return 0


run = partial(run_main, main)  # the ldm-train entry point

if __name__ == "__main__":
    sys.exit(run())
