"""Redraw an image to follow a text prompt (SDEdit).

    ldm-img2img --ckpt model.safetensors --init-image photo.png --prompt "an oil painting" --strength 0.6
    ldm-img2img --config sd_tiny --init-image in.png --prompt "a red circle"   # random weights
    ldm-img2img --from-png outputs/img2img/00000-4.png --init-image photo.png     # the same again

--strength 0 keeps the image, 1 ignores it (text-to-image); int(steps * strength) steps run. The
image's sides must be multiples of the VAE factor (8 for SD): resize or crop it first. --ckpt takes
any model format (see ldm-txt2img --help). Writes one PNG per image (its settings, strength
included, as A1111's `parameters` text and as JSON) and a grid.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from .common import image_tool, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-image", type=Path, required=True, help="the image to start from")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much to change the image, in [0, 1] (default 0.75)")
    return image_tool(parser, argv, out="outputs/img2img",
                      draw=lambda pipe, args, options: pipe.img2img(args.init_image, **options.to_dict()))


run = partial(run_main, main)  # the ldm-img2img entry point

if __name__ == "__main__":
    sys.exit(run())
