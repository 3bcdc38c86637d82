"""Generate images from a text prompt.

    ldm-txt2img --ckpt model.safetensors --prompt "a red circle" --n 4
    ldm-txt2img --ckpt v1-5-pruned-emaonly.ckpt --vae vae-ft-mse-840000-ema-pruned.safetensors --prompt "a cat"
    ldm-txt2img --ckpt v2-1_768-ema-pruned.safetensors --prediction-type v --prompt "a cat"
    ldm-txt2img --from-png outputs/txt2img/00003-42.png                  # the same image again
    ldm-txt2img --config sd_tiny --prompt "a red circle"                  # random weights

--ckpt takes an ldm model file, an original Stable Diffusion .safetensors / .ckpt or a diffusers
folder; without it, $LDM_CHECKPOINT or runs/sd_tiny/model.safetensors (the README's training output).
Writes one PNG per image and a grid; each PNG carries its settings as AUTOMATIC1111's `parameters`
text (which A1111 and ComfyUI read) and as JSON under `ldm` (which --from-png reads).
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
