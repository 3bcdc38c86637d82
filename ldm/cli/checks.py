"""What the tools check before the work starts, so that bad input never costs a sampling run: the
output folder, prompts that cannot be written to a PNG, unreadable input pictures, counts that
must be positive, and the memory a generation call needs against what the device has free."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..atomic import check_writable_dir, format_bytes
from ..devices import available_memory
from ..images import decode_image, decode_grey
from ..options import SamplingOptions

# The image tools' picture flags (by `dest`) and how each is decoded.
PICTURES = {"init_image": decode_image, "image": decode_image, "mask": decode_grey}
TEXTS = ("prompt", "negative_prompt")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def check_text(flag: str, text: str) -> None:
    """`text` must be writable as UTF-8 (PNG text chunks, JSON): bytes in another encoding reach
    Python as lone surrogates, which fail only when the result is saved."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{flag} is not valid UTF-8 (a byte at position {e.start} is in another encoding); "
                         "pass the text as UTF-8, e.g. set your terminal to UTF-8") from None


def check_output_file(path: Path, flag: str) -> None:
    """`path` can be written as a file: not a folder, in a folder that takes files."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass a file path, e.g. {path / 'metrics.json'}")
    check_writable_dir(path.parent, f"the folder of {flag}")


def check_image_tool_inputs(args: argparse.Namespace) -> tuple[int, int] | None:
    """Before the model loads: the output folder takes files, the prompts are UTF-8 and the input
    pictures decode. Returns the (height, width) of the input picture, if any."""
    check_writable_dir(args.out, "--out")
    for name in TEXTS:
        if getattr(args, name, None) is not None:
            check_text(f"--{name.replace('_', '-')}", getattr(args, name))
    size = None
    for name, decode in PICTURES.items():
        path = getattr(args, name, None)
        if path is not None:
            picture = decode(Path(path))
            size = size or (picture.height, picture.width)
    return size


def generation_bytes(pipe, images: int, height: int, width: int, guided: bool) -> int:
    """A lower bound of the memory one generation call needs: the U-Net's activations over the batch
    (the skip connections it keeps and the working tensors of its first level), the VAE decoding one
    image at a time, and the pixels out (float tensor, picture, grid)."""
    u, v = pipe.unet.cfg, pipe.vae.cfg
    f = pipe.vae.downsample_factor
    element = torch.empty((), dtype=pipe.dtype).element_size()
    h, w = -(-height // f), -(-width // f)
    skips = sum((u.num_res_blocks + 1) * u.model_channels * mult * -(-h // 2**level) * -(-w // 2**level)
                for level, mult in enumerate(u.channel_mult))
    unet = (2 if guided else 1) * images * element * (skips + 3 * u.model_channels * h * w)
    speed = pipe.speed
    side = speed.vae_tile_size * f  # tiling decodes one tile at a time
    area = min(height, side) * min(width, side) if speed.vae_tiling else height * width
    vae = (1 if speed.vae_slicing else images) * 3 * v.ch * v.ch_mult[0] * area * element
    pixels = images * height * width * 3 * (4 + 1 + 1)
    return unet + vae + pixels


def check_memory(pipe, options: SamplingOptions, size: tuple[int, int] | None = None) -> None:
    """Refuse a call that cannot fit in the device's free memory, naming the limit, instead of an
    allocator failure halfway (`size`: the input picture's (height, width), for img2img/inpaint)."""
    free = available_memory(pipe.device)
    if free is None:
        return
    height, width = size or (options.height or pipe.defaults.height, options.width or pipe.defaults.width)
    n = options.num_images
    guided = (pipe.defaults.cfg if options.cfg is None else options.cfg) != 1
    needed = generation_bytes(pipe, n, height, width, guided)
    if needed <= free:
        return
    one = generation_bytes(pipe, 1, height, width, guided)
    fits = f"at most about {free // one} images of this size fit" if one <= free else "not even one image fits"
    what = f"{n} images of {width}x{height} need" if n > 1 else f"1 image of {width}x{height} needs"
    raise ValueError(f"{what} at least {format_bytes(needed)} of memory on {pipe.device}, and {format_bytes(free)} "
                     f"is free ({fits}); lower --n or the size")
