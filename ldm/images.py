"""Pixels in: every picture the project reads (training data, shard writing, img2img, masks) is
decoded by `decode_image`, so a photo looks the same to the trainer and to the pipeline.

What it does to a file, in order:
- EXIF orientation is applied (a phone photo stored sideways comes out the right way up);
- 16-bit and 32-bit greyscale (PNG `I;16`, `I`, TIFF `F`) is scaled to 8 bits, not clipped;
- CMYK (including Adobe's inverted JPEGs, which PIL reads) and YCbCr/LAB/HSV are converted to RGB;
- transparency (RGBA, LA, palette images with a transparent index) is composited over white, so a
  transparent pixel never shows the colour it happens to hide.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# What `decode_image` accepts: encoded bytes, a file path, or an already open PIL image.
ImageSource = Union[bytes, bytearray, memoryview, str, Path, Image.Image]

# Transparent pixels are composited over this colour.
BACKGROUND = (255, 255, 255)


def open_image(source: ImageSource, *, draft: int | None = None) -> Image.Image:
    """Open and fully decode `source` with its EXIF orientation applied; the mode is left as stored.

    `draft`: for JPEGs, let the decoder shrink by 1/2, 1/4 or 1/8 while both sides stay >= draft
    (much faster for large photos that are resized down anyway). Raises ValueError naming the file
    for anything that is not a readable image."""
    if isinstance(source, Image.Image):
        im = source
        name = getattr(source, "filename", "") or "image"
    else:
        name = "image bytes"
        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_dir():
                raise ValueError(f"{path} is a folder, not an image file; pass the path of one image")
            if not path.is_file():
                raise ValueError(f"image file not found: {path}")
            name, data = str(path), path.read_bytes()
        else:
            data = bytes(source)
        if not data:
            raise ValueError(f"{name} is empty (0 bytes), not an image")
        try:
            im = Image.open(io.BytesIO(data))
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
        except UnidentifiedImageError:
            raise ValueError(f"{name} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
            raise ValueError(f"{name} could not be decoded ({e}); the file is truncated or corrupt") from None
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, by the rules in this module's docstring."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _wide_grey_to_rgb(im)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("L", "1") and "transparency" in im.info:
        im = im.convert("LA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")


def decode_image(source: ImageSource, *, draft: int | None = None) -> Image.Image:
    """`source` (bytes, path or PIL image) -> 8-bit RGB PIL image, the way every reader sees it."""
    return to_rgb(open_image(source, draft=draft))


def decode_grey(source: ImageSource) -> Image.Image:
    """`source` -> 8-bit greyscale ("L"), for masks: wide greyscale scaled, transparency over white."""
    return to_rgb(open_image(source)).convert("L")


def _wide_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> RGB, scaled to the full 8-bit range by its bit depth.

    Integer images use the range of their storage (16 bits for `I;16*`; for `I`, 16 bits unless a
    value exceeds 65535, then 32); float images are taken as [0, 1] unless their values exceed 1,
    then as [0, max]."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        top = float(np.nanmax(a)) if a.size else 1.0
        scale = 1.0 if top <= 1.0 else top
        grey = np.clip(np.nan_to_num(a / scale), 0, 1) * 255
    else:
        a = a.astype(np.int64)
        top = 65535 if im.mode != "I" or a.size == 0 or int(a.max()) <= 65535 else 2**32 - 1
        grey = np.clip(a, 0, top) * (255 / top)
    g = Image.fromarray(np.round(grey).astype(np.uint8), mode="L")
    return g.convert("RGB")
