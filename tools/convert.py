#!/usr/bin/env python
"""Convert a model between our model file, original single files and diffusers folders.

    python tools/convert.py model.safetensors out_diffusers/            # ours -> diffusers folder
    python tools/convert.py out_diffusers/ model.safetensors            # diffusers -> ours
    python tools/convert.py v1-5-pruned.ckpt sd15.safetensors --ema     # original -> ours (EMA weights)
    python tools/convert.py model.safetensors sd.ckpt --dtype fp16      # ours -> original single file
    python tools/convert.py 768-v.ckpt out/ --config configs/sd21-v.yaml --prediction-type v

Formats follow the paths unless --from / --to say otherwise: a folder is diffusers, `.ckpt` an
original single file, `.safetensors` ours when it carries our config (else an original file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import run_main  # noqa: E402
from ldm.convert.formats import (  # noqa: E402
    FORMATS,
    PREDICTION_NAMES,
    describe,
    infer_output_format,
    load_model,
    save_model,
)
from ldm.pipeline import parse_dtype  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="model file or diffusers folder to read")
    parser.add_argument("output", type=Path, help="model file or diffusers folder to write")
    parser.add_argument("--from", dest="src", choices=FORMATS, help="input format (default: from the path)")
    parser.add_argument("--to", dest="dst", choices=FORMATS, help="output format (default: from the path)")
    parser.add_argument("--config", help="architecture YAML for inputs that carry none (original single files)")
    parser.add_argument("--prediction-type", choices=sorted(PREDICTION_NAMES),
                        help="what the U-Net predicts (e.g. v for SD 2.x 768 models); default: the input's")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of an original training checkpoint")
    parser.add_argument("--dtype", choices=("fp16", "fp32", "bf16"), help="cast the written weights (default: as read)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow full unpickling of .ckpt files that weights-only loading rejects "
                             "(trusted files only)")
    args = parser.parse_args(argv)

    pipe = load_model(
        args.input,
        args.src,
        config=args.config,
        prediction_type=args.prediction_type,
        use_ema=args.ema,
        trust_pickle=args.trust_pickle,
    )
    dst = args.dst or infer_output_format(args.output)
    written = save_model(pipe, args.output, dst, dtype=parse_dtype(args.dtype) if args.dtype else None)
    print(describe(Path(written), dst))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
