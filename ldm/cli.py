"""Shared pieces of the command-line tools: model arguments, device/dtype choice, writing PNGs."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .diffusion import SAMPLERS, SPACINGS, STOCHASTIC_SAMPLERS, parse_sampler, parse_schedule
from .models.attention import ATTENTION_BACKENDS
from .pipeline import DTYPES, LDMPipeline, make_grid

# Bad input (configs, checkpoints, arguments) raises these; ConfigError and CheckpointError are ValueErrors.
USER_ERRORS = (ValueError, ImportError)


def run_main(main) -> int:
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
    source.add_argument("--config", default=None, help="config YAML: builds the model with RANDOM weights (for testing)")
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
    """The prompt and sampling options every image tool shares (all but the image size)."""
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
    parser.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of LDMPipeline.generate / img2img / inpaint that add_sampling_args parsed."""
    return {
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "cfg": args.cfg,
        "sampler": args.sampler,
        "spacing": args.spacing,
        "eta": args.eta,
        "guidance_rescale": args.guidance_rescale,
        "seed": args.seed,
        "num_images": args.n,
    }


def pick_device(name: str) -> torch.device:
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {name} asked for CUDA but no CUDA device is available; use --device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def load_pipeline(args: argparse.Namespace) -> LDMPipeline:
    """Build the pipeline the --ckpt/--config/--device/--dtype arguments describe."""
    if not args.ckpt and not args.config:
        raise SystemExit("error: pass --ckpt MODEL.safetensors (trained weights) or --config CONFIG.yaml (random weights)")
    if args.overrides and not args.config:
        raise SystemExit("error: --set overrides apply to --config only; a checkpoint carries its own config")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.ckpt:
        pipe = LDMPipeline.from_checkpoint(args.ckpt, device=device, dtype=dtype)
    else:
        print(f"note: {args.config} is built with random weights; expect noise-like images until it is trained",
              file=sys.stderr)
        pipe = LDMPipeline.from_config(args.config, args.overrides, device=device, dtype=dtype)
    return pipe.set_attention_backend(args.attention)


def png_info(image: Image.Image, model: str | None) -> PngInfo:
    """PNG text chunks: each setting on its own key, plus the common one-string 'parameters' form."""
    i = image.info
    meta = PngInfo()
    fields = ("prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "spacing", "width", "height", "strength")
    for key in fields:
        if key in i:
            meta.add_text(key, str(i[key]))
    if model:
        meta.add_text("model", str(model))
    parameters = (
        f"{i.get('prompt', '')}\nNegative prompt: {i.get('negative_prompt', '')}\n"
        f"Steps: {i.get('steps')}, Sampler: {i.get('sampler')}, CFG scale: {i.get('cfg')}, "
        f"Seed: {i.get('seed')}, Size: {i.get('width')}x{i.get('height')}"
        + (f", Denoising strength: {i['strength']}" if "strength" in i else "")
        + (f", Model: {Path(model).name}" if model else "")
    )
    meta.add_text("parameters", parameters)
    return meta


def save_images(images: Sequence[Image.Image], out: str | Path, model: str | None = None) -> tuple[list[Path], Path]:
    """Write each image as NNNNN-SEED.png (numbering continues what is in `out`) and a grid."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    start = max(taken, default=-1) + 1
    paths = []
    for k, image in enumerate(images):
        path = out / f"{start + k:05d}-{image.info.get('seed', 'noseed')}.png"
        _atomic_png(image, path, png_info(image, model))
        paths.append(path)
    grid = out / f"{start:05d}-grid.png"
    _atomic_png(make_grid(images), grid, png_info(images[0], model))
    return paths, grid


def _atomic_png(image: Image.Image, path: Path, meta: PngInfo) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
