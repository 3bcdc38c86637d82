"""Convert a model between our model file, original single files and diffusers folders.

    ldm-convert model.safetensors out_diffusers/            # ours -> diffusers folder
    ldm-convert out_diffusers/ model.safetensors            # diffusers -> ours
    ldm-convert v1-5-pruned.ckpt sd15.safetensors --ema     # original -> ours (EMA weights)
    ldm-convert model.safetensors sd.ckpt --dtype fp16      # ours -> original single file
    ldm-convert 768-v.ckpt out/ --config sd21-v --prediction-type v
    ldm-convert model.ckpt baked.safetensors --vae vae-ft-mse-840000-ema-pruned.safetensors
    ldm-convert --ckpt model.safetensors out_diffusers/     # the input may also be given as --ckpt

The input's format is read from the file itself (a folder is diffusers, a pickle an original single
file, a `.safetensors` ours when it carries our config, else an original file); the output's
follows its path (`.safetensors` ours, `.ckpt` an original file, no suffix a diffusers folder).
--from / --to say either instead. Without an input, $LDM_CHECKPOINT or runs/sd_tiny/model.safetensors
(the README's training output) is converted.
Writing into an existing diffusers folder replaces its model (unet/, vae/, text_encoder/,
scheduler/, tokenizer/, model_index.json) and keeps every other file in it.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from ..convert.formats import FORMATS, PREDICTION_NAMES, describe, infer_output_format
from ..devices import parse_dtype
from ..pipeline import load_model, save_model
from .common import run_main
from .model_choice import default_model


def same_place(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (also through links)."""
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, nargs="?", default=None,
                        help="model file or diffusers folder to read (or --ckpt)")
    parser.add_argument("output", type=Path, help="model file or diffusers folder to write")
    parser.add_argument("--ckpt", type=Path, default=None, metavar="MODEL",
                        help="the input, as the other tools take it")
    parser.add_argument("--from", dest="src", choices=FORMATS, help="input format (default: from the path)")
    parser.add_argument("--to", dest="dst", choices=FORMATS, help="output format (default: from the path)")
    parser.add_argument("--config", help="architecture (YAML or a shipped config's name) for inputs that carry "
                                         "none (original single files)")
    parser.add_argument("--prediction-type", choices=sorted(PREDICTION_NAMES),
                        help="what the U-Net predicts (e.g. v for SD 2.x 768 models); default: the input's")
    parser.add_argument("--vae", type=Path, default=None,
                        help="a standalone VAE to write in place of the input's (original or diffusers layout)")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of an original training checkpoint")
    parser.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), help="cast the written weights (default: as read)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of .ckpt files that weights-only loading rejects "
                             "(trusted files only)")
    args = parser.parse_args(argv)
    if args.input is not None and args.ckpt is not None:
        parser.error(f"two inputs: {args.input} and --ckpt {args.ckpt}; give one")
    source = args.input or args.ckpt
    if source is None:
        source, why = default_model()
        print(f"note: converting the {why}", file=sys.stderr)
    if same_place(source, args.output):
        raise ValueError(f"input and output are the same ({source}): converting in place would rewrite what is "
                         "being read; write to a new path, and replace the old one yourself once the new one loads")

    pipe = load_model(
        source,
        args.src,
        config=args.config,
        prediction_type=args.prediction_type,
        use_ema=args.ema,
        trust_pickle=args.trust_pickle,
        vae=args.vae,
    )
    dst = args.dst or infer_output_format(args.output)
    written = save_model(pipe, args.output, dst, dtype=parse_dtype(args.dtype) if args.dtype else None)
    print(describe(Path(written), dst))
    return 0


run = partial(run_main, main)  # the ldm-convert entry point

if __name__ == "__main__":
    sys.exit(run())
