"""Generate images from a text prompt.

    ldm-txt2img --ckpt model.safetensors --prompt "a red circle" --n 4
    ldm-txt2img --ckpt v1-5-pruned-emaonly.ckpt --vae vae-ft-mse-840000-ema-pruned.safetensors --prompt "a cat"
    ldm-txt2img --ckpt v2-1_768-ema-pruned.safetensors --prediction-type v --prompt "a cat"
    ldm-txt2img --from-png outputs/txt2img/00003-42.png                  # the same image again
    ldm-txt2img --config sd_tiny --prompt "a red circle"                  # random weights
    ldm-txt2img --ckpt model.safetensors --prompt "a red circle" --hires-scale 2 --hires-strength 0.5
    ldm-txt2img --ckpt model.safetensors --prompt "a red circle" --hires-scale 4 --upscaler x4.safetensors

--ckpt takes an ldm model file, an original Stable Diffusion .safetensors / .ckpt or a diffusers
folder; without it, $LDM_CHECKPOINT or runs/sd_tiny/model.safetensors (the README's training output).
Writes one PNG per image and a grid; each PNG carries its settings as AUTOMATIC1111's `parameters`
text (which A1111 and ComfyUI read) and as JSON under `ldm` (which --from-png reads).
Hires fix (--hires-scale) generates at the model's size, upscales (the latents, or the image with an
upscaler model given to --upscaler, in any format ldm-convert reads), then redraws at the larger
size with img2img at --hires-strength; its settings go into the PNG text chunks too.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from ..options import LATENT_UPSCALER
from ..pipeline import load_model
from .common import image_tool, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    hires = parser.add_argument_group("hires fix")
    hires.add_argument("--hires-scale", type=float, default=None,
                       help="generate, upscale by this factor, and redraw at the larger size (e.g. 2; default: off)")
    hires.add_argument("--hires-strength", dest="strength", type=float, default=None,
                       help="img2img strength of the redraw, in [0, 1] (default 0.5)")
    hires.add_argument("--hires-steps", type=int, default=None,
                       help="steps of the redraw's schedule, of which steps x strength run (default: --steps)")
    hires.add_argument("--upscaler", dest="hires_upscaler", default=None, metavar=f"{LATENT_UPSCALER}|PATH",
                       help=f"{LATENT_UPSCALER}: interpolate the latents (default); PATH: an upscaler model (any format)")
    return image_tool(parser, argv, out="outputs/txt2img", draw=draw)


def draw(pipe, args: argparse.Namespace, options) -> list:
    """generate, with the upscaler model that --upscaler names loaded (after the options are checked)."""
    upscaler = None
    if options.resolved(pipe.defaults).hires_upscaler not in (None, LATENT_UPSCALER):
        upscaler = load_model(options.hires_upscaler, kind="upscaler").to(pipe.device, pipe.dtype)
        upscaler.set_attention_backend(args.attention)
    return pipe.generate(**options.to_dict(), upscaler=upscaler)


run = partial(run_main, main)  # the ldm-txt2img entry point

if __name__ == "__main__":
    sys.exit(run())
