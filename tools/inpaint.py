#!/usr/bin/env python
"""Repaint the masked part of an image to follow a text prompt.

    python tools/inpaint.py --ckpt sd-inpainting.safetensors --image photo.png --mask mask.png --prompt "a cat"
    python tools/inpaint.py --config configs/sd_tiny.yaml --image in.png --mask mask.png --prompt "a red circle"

The mask is a grey image of the same size: white = repaint, black = keep (grey feathers the edge).
Pixels outside the mask are kept exactly. Works with inpainting models (9 input channels) and,
by latent blending, with ordinary ones. Writes one PNG per image (settings in the text chunks) and a grid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import (  # noqa: E402
    add_model_args,
    add_sampling_args,
    load_pipeline,
    run_main,
    sampling_kwargs,
    save_images,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="the image to repaint")
    parser.add_argument("--mask", type=Path, required=True, help="mask image: white = repaint, black = keep")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="noise level to start from inside the mask, in [0, 1] (default 1: redraw from scratch)")
    add_sampling_args(parser, out="outputs/inpaint")
    add_model_args(parser)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args)
    images = pipe.inpaint(args.image, args.mask, args.prompt, strength=args.strength, **sampling_kwargs(args))
    paths, grid = save_images(images, args.out, model=args.ckpt or args.config)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote grid {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
