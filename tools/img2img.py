#!/usr/bin/env python
"""Redraw an image to follow a text prompt (SDEdit).

    python tools/img2img.py --ckpt model.safetensors --init-image photo.png --prompt "an oil painting" --strength 0.6
    python tools/img2img.py --config configs/sd_tiny.yaml --init-image in.png --prompt "a red circle"   # random weights

--strength 0 keeps the image, 1 ignores it (text-to-image); int(steps * strength) steps run. The
image's sides must be multiples of the VAE factor (8 for SD): resize or crop it first. Writes one
PNG per image (prompt, seed, settings and strength in the PNG text chunks) and a grid.
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
    parser.add_argument("--init-image", type=Path, required=True, help="the image to start from")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="how much to change the image, in [0, 1] (default 0.75)")
    add_sampling_args(parser, out="outputs/img2img")
    add_model_args(parser)
    args = parser.parse_args(argv)

    pipe = load_pipeline(args)
    images = pipe.img2img(args.init_image, args.prompt, args.strength, **sampling_kwargs(args))
    paths, grid = save_images(images, args.out, model=args.ckpt or args.config)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote grid {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
