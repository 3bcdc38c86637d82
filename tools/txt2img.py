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
    add_sampling_args(parser, out="outputs/txt2img")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    add_model_args(parser)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args)
    images = pipe.generate(args.prompt, height=args.height, width=args.width, **sampling_kwargs(args))
    paths, grid = save_images(images, args.out, model=args.ckpt or args.config)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote grid {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
