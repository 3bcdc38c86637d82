"""Generate images from a text prompt.

    ldm-txt2img --ckpt model.safetensors --prompt "a red circle" --n 4
    ldm-txt2img --config sd_tiny --prompt "a red circle"                  # random weights

Writes one PNG per image (prompt, seed, sampler, steps and cfg in the PNG text chunks) and a grid.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from .common import image_tool, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    return image_tool(parser, argv, out="outputs/txt2img",
                      draw=lambda pipe, args, options: pipe.generate(**options.to_dict()))


run = partial(run_main, main)  # the ldm-txt2img entry point

if __name__ == "__main__":
    sys.exit(run())
