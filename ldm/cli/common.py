"""What the command-line tools share: error reporting, model and sampling arguments, writing PNGs."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..checkpoint import read_model_config
from ..config import load_config
from ..devices import DTYPES, pick_device, pick_dtype
from ..diffusion import SAMPLERS, SPACINGS, STOCHASTIC_SAMPLERS, parse_sampler, parse_schedule
from ..images import make_grid, save_png
from ..models.attention import ATTENTION_BACKENDS
from ..options import SamplingOptions
from ..pipeline import LDMPipeline, check_model_kind

# Bad input (configs, checkpoints, arguments) raises these; ConfigError and CheckpointError are ValueErrors.
USER_ERRORS = (ValueError, ImportError)


def run_main(main: Callable[[], int]) -> int:
    """Run a tool's main(); bad input is printed as one `error:` line, not a traceback."""
    try:
        return main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--ckpt", default=None, help="model file (.safetensors written by LDMPipeline.save or training)")
    source.add_argument("--config", default=None,
                        help="config YAML, or the name of a shipped one (sd_tiny, sd15, ...): builds the model "
                             "with RANDOM weights (for testing)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override with --config, e.g. --set model.unet.model_channels=64 (repeatable)")
    group.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, mps, or auto (default: cuda if available)")
    group.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="weights dtype (default: fp16 on GPUs, fp32 on CPU)")
    group.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS,
                       help="attention backend (default sdpa; xformers needs `pip install xformers`)")


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the text but reports parse's ValueError as a usage error."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return check


def add_sampling_args(parser: argparse.ArgumentParser, *, out: str) -> None:
    """The prompt and sampling options every image tool shares (all but the image size and strength).
    Each flag's `dest` is its `SamplingOptions` field, which `sampling_options` reads."""
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (default 7.5; 1 = off)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, e.g. 30)")
    parser.add_argument("--sampler", default=None, metavar="NAME", type=_checked(parse_sampler),
                        help=f"sampler (default: the model's): one of {', '.join(SAMPLERS)} (+ _karras), or an "
                             "A1111 or ComfyUI name such as 'DPM++ 2M Karras' or euler_ancestral")
    parser.add_argument("--spacing", default=None, metavar="SCHEDULE", type=_checked(parse_schedule),
                        help=f"timestep spacing, overriding the sampler's: one of {', '.join(SPACINGS)}, or an A1111 "
                             "schedule type or ComfyUI scheduler such as Karras or normal (default: trailing)")
    parser.add_argument("--eta", type=float, default=None,
                        help=f"noise scale of the stochastic samplers {', '.join(sorted(STOCHASTIC_SAMPLERS))} "
                             "(ddim: default 0 = deterministic; the others: default 1)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale factor in [0, 1]")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first image; image k uses seed + k (default: random)")
    parser.add_argument("--n", dest="num_images", type=int, default=1, metavar="N", help="number of images (default 1)")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The `SamplingOptions` the parsed flags give: every field with a flag of its name."""
    return SamplingOptions(**{name: getattr(args, name) for name in SamplingOptions.names() if hasattr(args, name)})


def load_pipeline(args: argparse.Namespace, kind: str | None = "text-to-image") -> LDMPipeline:
    """Build the pipeline the --ckpt/--config/--device/--dtype arguments describe; a model that is not
    of `kind` (None: any) is refused before its weights load."""
    if not args.ckpt and not args.config:
        raise SystemExit("error: pass --ckpt MODEL.safetensors (trained weights) or --config CONFIG.yaml (random weights)")
    if args.overrides and not args.config:
        raise SystemExit("error: --set overrides apply to --config only; a checkpoint carries its own config")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.ckpt:
        check_model_kind(read_model_config(args.ckpt), kind, args.ckpt)
        pipe = LDMPipeline.from_checkpoint(args.ckpt, device=device, dtype=dtype)
    else:
        cfg = load_config(args.config, args.overrides)
        check_model_kind(cfg, kind, args.config)
        print(f"note: {args.config} is built with random weights; expect noise-like images until it is trained",
              file=sys.stderr)
        pipe = LDMPipeline.from_config(cfg, device=device, dtype=dtype)
    return pipe.set_attention_backend(args.attention)


def save_images(images: Sequence[Image.Image], out: str | Path, model: str | None = None) -> tuple[list[Path], Path]:
    """Write each image as NNNNN-SEED.png (numbering continues what is in `out`) and a grid, each with
    its settings in the PNG text chunks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    start = max(taken, default=-1) + 1
    paths = []
    for k, image in enumerate(images):
        paths.append(save_png(image, out / f"{start + k:05d}-{image.info.get('seed', 'noseed')}.png", model=model))
    grid = save_png(make_grid(images), out / f"{start:05d}-grid.png", info=images[0].info, model=model)
    return paths, grid


def image_tool(parser: argparse.ArgumentParser, argv: list[str] | None, *, out: str,
               draw: Callable[[LDMPipeline, argparse.Namespace, SamplingOptions], list[Image.Image]]) -> int:
    """The rest of an image tool's main: add the sampling and model arguments to its `parser`, parse
    `argv`, load the model, `draw(pipe, args, options)`, and write the images to --out (default
    `out`) with their settings, saying where they went."""
    add_sampling_args(parser, out=out)
    add_model_args(parser)
    args = parser.parse_args(argv)
    pipe = load_pipeline(args)
    images = draw(pipe, args, sampling_options(args))
    paths, grid = save_images(images, args.out, model=args.ckpt or args.config)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote grid {grid}")
    return 0
