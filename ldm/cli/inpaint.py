"""Repaint the masked part of an image to follow a text prompt.

    ldm-inpaint --ckpt sd-inpainting.safetensors --image photo.png --mask mask.png --prompt "a cat"
    ldm-inpaint --config sd_tiny --image in.png --mask mask.png --prompt "a red circle"

The mask is a grey image of the same size: white = repaint, black = keep (grey feathers the edge).
Pixels outside the mask are kept exactly. Works with inpainting models (9 input channels) and,
by latent blending, with ordinary ones. --ckpt takes any model format, --from-png the settings of an
earlier image (see ldm-txt2img --help). Writes one PNG per image (settings in the text chunks) and a grid.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from .common import image_tool, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="the image to repaint")
    parser.add_argument("--mask", type=Path, required=True, help="mask image: white = repaint, black = keep")
    parser.add_argument("--strength", type=float, default=1.0,
                        help="noise level to start from inside the mask, in [0, 1] (default 1: redraw from scratch)")
    return image_tool(parser, argv, out="outputs/inpaint",
                      draw=lambda pipe, args, options: pipe.inpaint(args.image, args.mask, **options.to_dict()))


run = partial(run_main, main)  # the ldm-inpaint entry point

if __name__ == "__main__":
    sys.exit(run())
