#!/usr/bin/env python
"""Generate images from a text prompt.

    python tools/txt2img.py --ckpt model.safetensors --prompt "a red circle" --n 4
    python tools/txt2img.py --config configs/sd_tiny.yaml --prompt "a red circle"   # random weights

Writes one PNG per image (prompt, seed, sampler, steps and cfg in the PNG text chunks) and a grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import add_model_args, load_pipeline, run_main, save_images  # noqa: E402
from ldm.diffusion import SAMPLER_NAMES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; 1 = off)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, e.g. 30)")
    parser.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, metavar="NAME",
                        help=f"sampler (default: the model's); one of {', '.join(SAMPLER_NAMES)}")
    parser.add_argument("--spacing", default=None, choices=("leading", "trailing", "linspace", "karras"),
                        help="timestep spacing (default: karras for *_karras samplers, else trailing)")
    parser.add_argument("--eta", type=float, default=None, help="noise scale of the stochastic samplers ddim and euler_a (ddim: 0 = deterministic)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale factor in [0, 1]")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first image; image k uses seed + k (default: random)")
    parser.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/txt2img"), help="output folder (default outputs/txt2img)")
    add_model_args(parser)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args)
    images = pipe.generate(
        args.prompt,
        args.negative_prompt,
        steps=args.steps,
        cfg=args.cfg,
        sampler=args.sampler,
        spacing=args.spacing,
        eta=args.eta,
        guidance_rescale=args.guidance_rescale,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_images=args.n,
    )
    paths, grid = save_images(images, args.out, model=args.ckpt or args.config)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote grid {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
