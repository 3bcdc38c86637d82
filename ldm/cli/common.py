"""What the command-line tools share: error reporting, model and sampling arguments, writing PNGs."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from ..convert.formats import PREDICTION_NAMES
from ..devices import DTYPES
from ..diffusion import SAMPLERS, SPACINGS, STOCHASTIC_SAMPLERS, parse_sampler, parse_schedule
from ..images import make_grid, save_png
from ..models.attention import ATTENTION_BACKENDS
from ..options import SamplingOptions
from ..pipeline import LDMPipeline
from ..png_settings import png_text
from .adapters import add_adapter_args
from .checks import check_image_tool_inputs, check_memory
from .model_choice import CHECKPOINT_ENV, DEFAULT_CHECKPOINT, load_pipeline
from .reproduce import add_from_png_arg, apply_png_settings, check_model, parse_noting_given, recorded_model

# Bad input (configs, checkpoints, arguments) raises these (ConfigError and CheckpointError are ValueErrors),
# and so does a disk that cannot take the output (ldm.atomic.DiskError is an OSError).
USER_ERRORS = (ValueError, ImportError, OSError)


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
    """The model flags; `load_pipeline` (ldm/cli/model_choice.py) reads them."""
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt", default=None, metavar="MODEL",
                       help="the model: an ldm .safetensors, an original Stable Diffusion .safetensors or .ckpt, or a "
                            f"diffusers folder, told apart by the file itself (default: ${CHECKPOINT_ENV}, else "
                            f"{DEFAULT_CHECKPOINT}, which the README's training writes)")
    group.add_argument("--config", default=None,
                       help="alone: a config YAML or shipped config's name (sd_tiny, sd15, ...) built with RANDOM "
                            "weights (for testing); with --ckpt: the architecture of an original file that detection "
                            "gets wrong")
    group.add_argument("--prediction-type", default=None, choices=sorted(PREDICTION_NAMES), metavar="TYPE",
                       help="with --ckpt: what the U-Net predicts, for files that cannot tell: v for the SD 2.x "
                            "768-v models (eps, v, x0; default: the file's, else eps)")
    group.add_argument("--vae", default=None, metavar="VAE",
                       help="a standalone VAE to use instead of the model's (e.g. vae-ft-mse-840000-ema-pruned."
                            "safetensors; original or diffusers layout, a file or a folder)")
    group.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="config override with --config, e.g. --set model.unet.model_channels=64 or, with --ckpt, "
                            "--set model.text_encoder.layer=penultimate (A1111's clip skip 2) (repeatable)")
    group.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, mps, or auto (default: cuda if available)")
    group.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                       help="weights dtype (default: fp16 on GPUs, fp32 on CPU)")
    group.add_argument("--attention", default="sdpa", choices=ATTENTION_BACKENDS,
                       help="attention backend (default sdpa; xformers needs `pip install xformers`)")
    group.add_argument("--allow-nan", action="store_true",
                       help="write images even when a network produces NaN/Inf (a warning instead of an error; "
                            "for debugging a model)")
    add_adapter_args(group)  # --lora, --embedding


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
    parser.add_argument("--prompt", default=None, help="what to draw (required unless --from-png gives it)")
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
    parser.add_argument("--no-prompt-weighting", dest="prompt_weighting", action="store_false",
                        help="take the prompt literally: no (word:1.3) / [word] weights, no BREAK")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the first image; image k uses seed + k (default: random)")
    parser.add_argument("--n", dest="num_images", type=int, default=1, metavar="N", help="number of images (default 1)")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The `SamplingOptions` the parsed flags give: every field with a flag of its name."""
    return SamplingOptions(**{name: getattr(args, name) for name in SamplingOptions.names() if hasattr(args, name)})


def save_images(images: Sequence[Image.Image], out: str | Path, pipe: LDMPipeline | None = None
                ) -> tuple[list[Path], Path]:
    """Write each image as NNNNN-SEED.png (numbering continues what is in `out`) and a grid, each with
    its settings in the PNG text chunks (`ldm.png_settings`: A1111's `parameters` and our JSON),
    naming `pipe`'s model, LoRAs and embeddings, device and dtype."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"(\d{5})-", p.name))]
    start = max(taken, default=-1) + 1
    paths = []
    for k, image in enumerate(images):
        path = out / f"{start + k:05d}-{image.info.get('seed', 'noseed')}.png"
        paths.append(save_png(image, path, image_text(image.info, pipe)))
    grid = save_png(make_grid(images), out / f"{start:05d}-grid.png", image_text(images[0].info, pipe))
    return paths, grid


def image_text(info: Mapping[str, Any], pipe: LDMPipeline | None) -> dict[str, str]:
    """The PNG text chunks of an image whose settings are `info`, made by `pipe`: its model, LoRAs
    and embeddings, device and dtype (`ldm.png_settings.png_text`)."""
    model = {**(pipe.source.record() if pipe.source else {}), **pipe.adapters_record()} if pipe else None
    runtime = {"device": str(pipe.device), "dtype": str(pipe.dtype).removeprefix("torch.")} if pipe else None
    return png_text(info, model, runtime=runtime)


def image_tool(parser: argparse.ArgumentParser, argv: list[str] | None, *, out: str,
               draw: Callable[[LDMPipeline, argparse.Namespace, SamplingOptions], list[Image.Image]]) -> int:
    """The rest of an image tool's main: add the sampling, model and --from-png arguments to its
    `parser`, parse `argv` (settings a --from-png image records fill the flags not given), check the
    inputs (`ldm.cli.checks`), load the model, check the memory the call needs, `draw(pipe, args,
    options)`, and write the images to --out (default `out`) with their settings, saying where they went."""
    add_sampling_args(parser, out=out)
    add_model_args(parser)
    add_from_png_arg(parser)
    args, given = parse_noting_given(parser, argv)
    png = apply_png_settings(args, given, args.from_png) if args.from_png else None
    if args.prompt is None:
        parser.error("the following arguments are required: --prompt (or --from-png IMAGE)")
    size = check_image_tool_inputs(args)  # the output folder, prompts and pictures, before the model loads
    pipe = load_pipeline(args, *recorded_model(png, args.from_png))
    if png is not None:
        check_model(png, pipe, args.from_png)
    options = sampling_options(args)
    check_memory(pipe, options, size)
    images = draw(pipe, args, options)
    paths, grid = save_images(images, args.out, pipe)
    for path in paths:
        print(f"wrote {path}")
    print(f"wrote grid {grid}")
    return 0
