"""Pictures in and out: decoding files, image and mask tensors, grids, PNGs with their settings.

Every picture the project reads (training data, shard writing, img2img, masks) is decoded by
`decode_image`, so a photo looks the same to the trainer and to the pipeline; `load_image` and
`load_mask` turn pictures into the tensors the pipeline takes, `to_pil` and `make_grid` turn
tensors back into pictures, and `save_png` writes one atomically with its settings in the PNG text
chunks (`ldm.png_settings` decides what they say).

What it does to a file, in order:
- EXIF orientation is applied (a phone photo stored sideways comes out the right way up);
- 16-bit and 32-bit greyscale (PNG `I;16`, `I`, TIFF `F`) is scaled to 8 bits, not clipped;
- CMYK (including Adobe's inverted JPEGs, which PIL reads) and YCbCr/LAB/HSV are converted to RGB;
- transparency (RGBA, LA, palette images with a transparent index) is composited over white, so a
  transparent pixel never shows the colour it happens to hide.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .atomic import atomic_path

# What `decode_image` accepts: encoded bytes, a file path, or an already open PIL image.
ImageSource = Union[bytes, bytearray, memoryview, str, Path, Image.Image]

# An input picture of the pipeline: a PIL image, a file path, a list of those, or a tensor in [0, 1].
ImageInput = Union[Image.Image, str, Path, torch.Tensor, Sequence[Union[Image.Image, str, Path]]]

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
        except Image.DecompressionBombError as e:
            raise ValueError(f"{name} is too large to decode safely ({e}); resize it first") from None
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


# ---------------------------------------------------------------------------------------------
# Pictures <-> tensors
# ---------------------------------------------------------------------------------------------


def load_image(image: ImageInput) -> torch.Tensor:
    """A picture (PIL image, path, list of those, or tensor) -> float32 (B, 3, H, W) in [0, 1], CPU.

    Tensors must be (B, 3, H, W) or (3, H, W) with values in [0, 1]. Files and PIL images are
    decoded by `decode_image` (EXIF orientation, 16-bit grey, CMYK, alpha over white)."""
    if isinstance(image, torch.Tensor):
        return _tensor_batch(image, channels=3, min_ndim=3, what="image", shapes="(B, 3, H, W) or (3, H, W)")
    tensors = _decode_all(image, decode_image, "image")
    if len({t.shape for t in tensors}) > 1:
        raise ValueError(f"images differ in size ({', '.join(f'{t.shape[2]}x{t.shape[1]}' for t in tensors)}); "
                         "resize them to one size first")
    return torch.stack(tensors)


def load_mask(mask: ImageInput) -> torch.Tensor:
    """An inpainting mask -> float32 (B, 1, H, W) in [0, 1], CPU; 1 (white) = repaint, 0 (black) = keep.

    PIL images (any mode) are converted to grey by `decode_grey`; tensors may be (H, W), (1, H, W) or
    (B, 1, H, W) with values in [0, 1]. Values between 0 and 1 feather the final paste."""
    if isinstance(mask, torch.Tensor):
        return _tensor_batch(mask, channels=1, min_ndim=2, what="mask", shapes="(H, W), (1, H, W) or (B, 1, H, W)")
    tensors = _decode_all(mask, decode_grey, "mask")
    if len({t.shape for t in tensors}) > 1:
        raise ValueError("masks differ in size; resize them to the image size first")
    return torch.stack(tensors)


def _tensor_batch(x: torch.Tensor, *, channels: int, min_ndim: int, what: str, shapes: str) -> torch.Tensor:
    """A tensor in [0, 1] of `min_ndim` to 4 dimensions -> float32 (B, channels, H, W) on the CPU
    (missing leading dimensions become 1); `shapes` names the accepted shapes in the error."""
    t = x.detach().to("cpu", torch.float32)
    if min_ndim <= t.ndim < 4:
        t = t.reshape((1,) * (4 - t.ndim) + tuple(t.shape))
    if t.ndim != 4 or t.shape[1] != channels:
        raise ValueError(f"{what} tensor must have shape {shapes} (got {tuple(x.shape)})")
    _check_unit_range(t, what)
    return t


def _decode_all(pictures: ImageInput, decode: Callable[[ImageSource], Image.Image], what: str) -> list[torch.Tensor]:
    """A picture or a list of pictures (PIL images or paths), each decoded -> float32 (C, H, W) in [0, 1]."""
    items = [pictures] if isinstance(pictures, (Image.Image, str, Path)) else list(pictures)
    if not items:
        raise ValueError(f"{what} list is empty")
    return [_pil_to_tensor(decode(item)) for item in items]


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> float32 (C, H, W) in [0, 1]."""
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    channels = len(image.getbands())
    return array.reshape(image.height, image.width, channels).permute(2, 0, 1).float() / 255


def _check_unit_range(x: torch.Tensor, name: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
        raise ValueError(f"{name} tensor values must be in [0, 1] (got {lo:.3g} .. {hi:.3g}); "
                         "for [-1, 1] data pass (x + 1) / 2")


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images row by row into one picture (about square by default)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


# ---------------------------------------------------------------------------------------------
# PNG files with their settings
# ---------------------------------------------------------------------------------------------

def save_png(image: Image.Image, path: str | Path, text: Mapping[str, str] | None = None) -> Path:
    """Write `image` as a PNG atomically, with `text` as its text chunks (keyword -> text; see
    `ldm.png_settings.png_text` for the settings of a generated image)."""
    path = Path(path)
    with atomic_path(path, fsync=False) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_text_info(text or {}))
    return path


def png_text_info(text: Mapping[str, str]) -> PngInfo:
    """PIL's `pnginfo` for a PNG whose text chunks are `text` (keyword -> text)."""
    meta = PngInfo()
    for key, value in text.items():
        meta.add_text(key, value)
    return meta


def png_text_chunks(path: str | Path) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) of a PNG file, keyword -> text. Raises ValueError naming the
    file when it is not a PNG."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.format != "PNG":
                raise ValueError(f"{path} is a {im.format} image, not a PNG; settings are read from PNG text chunks")
            return {str(k): str(v) for k, v in im.text.items()}
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable PNG ({e})") from None
