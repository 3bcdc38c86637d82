"""Make a picture larger with an upscaler model (the SD x4 upscaler, or one trained here).

    ldm-upscale --ckpt x4-upscaler.safetensors --image in.png --out out.png
    ldm-upscale --ckpt x4-upscaler-ema.ckpt --image big.png --out huge.png --tile auto
    ldm-upscale --ckpt runs/sr_tiny/model.safetensors --image sample.png --out big.png --prompt "a red circle"

The output is the model's factor (4) times larger. --ckpt takes our model file, an original single
file or a diffusers folder (--config alone builds an upscaler with random weights, for testing).
--noise-level (0..350 for SD) noises the input before the model sees it: more hides its flaws and
lets the model invent more detail. Inputs whose upscale would not fit in memory are refused with
the --tile size that fits; --tile auto picks it. The PNG records its settings as the other tools'
do (AUTOMATIC1111's `parameters` text and our JSON).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from ..diffusion import SAMPLERS, parse_sampler, parse_schedule
from ..images import decode_image, save_png
from .checks import check_output_file, check_text, positive_int
from .common import _checked, add_model_args, image_text, load_pipeline, run_main, sampling_options


def tile_arg(value: str) -> int | str:
    try:
        return value if value == "auto" else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile takes a size in input pixels or 'auto' (got {value!r})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, required=True, help="the picture to upscale")
    parser.add_argument("--out", type=Path, required=True, help="output PNG (with --n > 1: OUT-1.png, OUT-2.png, ...)")
    parser.add_argument("--prompt", default="", help="what the picture shows (default: none)")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--noise-level", type=int, default=None,
                        help="noise added to the input, 0..max_noise_level (default: the model's, 20 for SD)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the model's; 1 = off)")
    parser.add_argument("--sampler", default=None, metavar="NAME", type=_checked(parse_sampler),
                        help=f"sampler (default: the model's): one of {', '.join(SAMPLERS)}, or an A1111 or ComfyUI name")
    parser.add_argument("--spacing", default=None, metavar="SCHEDULE", type=_checked(parse_schedule),
                        help="timestep spacing, overriding the sampler's")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: random); image k uses seed + k")
    parser.add_argument("--n", dest="num_images", type=positive_int, default=1, metavar="N",
                        help="number of upscales of the picture (default 1)")
    parser.add_argument("--tile", type=tile_arg, default=None, metavar="SIZE|auto",
                        help="upscale in overlapping tiles of SIZE input pixels (auto: only if needed, the largest that fits)")
    parser.add_argument("--tile-overlap", type=int, default=None,
                        help="input pixels shared by neighbouring tiles (default 16)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if not args.ckpt and not args.config:
        raise ValueError("pass --ckpt UPSCALER (our model file, an original single file or a diffusers folder)")
    # before the model loads: the output can be written, the texts are UTF-8, the picture decodes
    check_output_file(args.out, "--out")
    for flag, text in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        if text is not None:
            check_text(flag, text)
    picture = decode_image(args.image)

    pipe = load_pipeline(args, kind="upscaler")
    images = pipe.upscale(picture, **sampling_options(args).to_dict(), tile_size=args.tile,
                          tile_overlap=args.tile_overlap)
    for k, image in enumerate(images):
        path = args.out if len(images) == 1 else args.out.with_name(f"{args.out.stem}-{k + 1}{args.out.suffix}")
        save_png(image, path, image_text(image.info, pipe))
        print(f"wrote {path} ({image.width}x{image.height}, seed {image.info['seed']})")
    return 0


run = partial(run_main, main)  # the ldm-upscale entry point

if __name__ == "__main__":
    sys.exit(run())
