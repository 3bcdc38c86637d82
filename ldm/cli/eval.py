"""Evaluate a checkpoint: held-out denoising loss and prompt adherence on the built-in shapes data
(an upscaler: held-out loss, and PSNR and sharpness against bicubic).

    ldm-eval --ckpt runs/sd_tiny/model.safetensors
    ldm-eval --ckpt runs/sd_tiny/model.safetensors --n 512 --cfg 7.5 --out metrics.json
    ldm-eval --ckpt runs/sr_tiny/model.safetensors --n 64 --max-objects 4 --grid sr.png

Adherence: for held-out captions ("a small red circle at the top left on a white background"),
the fraction of generated images whose detected colour / shape / size / position / count /
background match the caption. The detector is exact on rendered scenes. An upscaler upscales the
held-out scenes' 4x downscales (empty prompt, seeds --seed + k, its default noise level) and is
scored against bicubic (ldm/eval/superres.py); --grid writes the first rows of low-res / bicubic /
model / truth.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

from ..eval.heldout import heldout_items, heldout_loss, prompt_adherence
from ..eval.superres import comparison_grid, superres_scores, upscale_comparison
from .common import add_model_args, load_pipeline, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256, help="held-out items (default 256)")
    parser.add_argument("--resolution", type=int, default=None, help="image size (default: the model's sample size)")
    parser.add_argument("--max-objects", type=int, default=1, help="objects per held-out scene (default 1)")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale for adherence (default 7.5)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps for adherence or upscaling (default 20)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-loss", action="store_true", help="only prompt adherence")
    parser.add_argument("--skip-adherence", action="store_true", help="only the held-out loss")
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics as JSON here")
    parser.add_argument("--grid", type=Path, default=None,
                        help="upscalers: write low-res / bicubic / model / truth rows of the first 4 images here")
    add_model_args(parser)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args, kind=None)
    upscaler = pipe.model_config.is_upscaler
    if args.grid and not upscaler:
        raise SystemExit("error: --grid compares upscalers with bicubic; this is a text-to-image model")
    resolution = args.resolution or pipe.defaults.height
    items = heldout_items(args.n, resolution, seed=args.seed, max_objects=args.max_objects)
    metrics: dict[str, float] = {}
    if not args.skip_loss:
        metrics.update(heldout_loss(pipe, items, batch_size=args.batch_size, seed=args.seed))
    if upscaler:
        comparison = upscale_comparison(pipe, torch.stack([it["image"] for it in items]), steps=args.steps,
                                        seed=args.seed, batch_size=args.batch_size)
        metrics.update(superres_scores(comparison))
        if args.grid:
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            comparison_grid(comparison).save(args.grid)
            print(f"wrote {args.grid}")
    elif not args.skip_adherence:
        adh = prompt_adherence(pipe, [it["caption"] for it in items], resolution=resolution, cfg=args.cfg,
                               steps=args.steps, sampler=args.sampler, seed=args.seed, batch_size=args.batch_size)
        metrics.update({f"adherence_{k}": v for k, v in adh.items() if k != "n"})
    for key, value in metrics.items():
        print(f"{key:<24} {value:.4f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}")
    return 0


run = partial(run_main, main)  # the ldm-eval entry point

if __name__ == "__main__":
    sys.exit(run())
