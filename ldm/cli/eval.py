"""Evaluate a checkpoint: held-out denoising loss and prompt adherence on the built-in shapes data.

    ldm-eval --ckpt runs/sd_tiny/model.safetensors
    ldm-eval --ckpt runs/sd_tiny/model.safetensors --n 512 --cfg 7.5 --out metrics.json

Adherence: for held-out captions ("a small red circle at the top left on a white background"),
the fraction of generated images whose detected colour / shape / size / position / count /
background match the caption. The detector is exact on rendered scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from ..atomic import write_text_atomic
from ..eval.heldout import heldout_items, heldout_loss, prompt_adherence
from .checks import check_output_file, positive_int
from .common import add_model_args, load_pipeline, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=positive_int, default=256, help="held-out items (default 256)")
    parser.add_argument("--resolution", type=positive_int, default=None,
                        help="image size (default: the model's sample size)")
    parser.add_argument("--max-objects", type=positive_int, default=1, help="objects per held-out scene (default 1)")
    parser.add_argument("--cfg", type=float, default=7.5, help="guidance scale for adherence (default 7.5)")
    parser.add_argument("--steps", type=positive_int, default=20, help="sampling steps for adherence (default 20)")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--skip-loss", action="store_true", help="only prompt adherence")
    parser.add_argument("--skip-adherence", action="store_true", help="only the held-out loss")
    parser.add_argument("--out", type=Path, default=None, help="also write the metrics as JSON here")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.out:
        check_output_file(args.out, "--out")  # before the evaluation, not after it

    pipe = load_pipeline(args)
    resolution = args.resolution or pipe.defaults.height
    items = heldout_items(args.n, resolution, seed=args.seed, max_objects=args.max_objects)
    metrics: dict[str, float] = {}
    if not args.skip_loss:
        metrics.update(heldout_loss(pipe, items, batch_size=args.batch_size, seed=args.seed))
    if not args.skip_adherence:
        adh = prompt_adherence(pipe, [it["caption"] for it in items], resolution=resolution, cfg=args.cfg,
                               steps=args.steps, sampler=args.sampler, seed=args.seed, batch_size=args.batch_size)
        metrics.update({f"adherence_{k}": v for k, v in adh.items() if k != "n"})
    for key, value in metrics.items():
        print(f"{key:<24} {value:.4f}")
    if args.out:
        write_text_atomic(args.out, json.dumps(metrics, indent=2))
        print(f"wrote {args.out}")
    return 0


run = partial(run_main, main)  # the ldm-eval entry point

if __name__ == "__main__":
    sys.exit(run())
