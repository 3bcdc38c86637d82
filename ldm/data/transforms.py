"""From a raw sample to a training item: decode, the small-image rule, aspect-ratio buckets,
resize and crop (centre or random, the offsets kept), and tensors; latent samples likewise.

Every image goes through `ldm.images.decode_image` (EXIF orientation, alpha over white, CMYK and
wide greyscale converted), so training sees a picture the way the pipeline does.

The small-image rule: an image whose shorter side is below `min_size` is skipped and counted
(`too_small`); one between `min_size` and the target size is upscaled (bicubic) and counted
(`upscaled`). `min_size=None` means half the training resolution, 0 keeps every image.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images import decode_image
from .sources import IMAGE_EXTS

CROPS = ("center", "random")


class BrokenSample(Exception):
    """Raised by a decoder for a sample that cannot be used; `reason` names why (see reader.SKIP_REASONS)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def make_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) buckets: sides multiples of `step`, at most resolution^2 pixels (as close to
    it as the step allows), aspect ratios within [1 / max_ratio, max_ratio]; the square included."""
    if step < 1 or resolution % step:
        raise ValueError(f"data.resolution {resolution} must be a multiple of data.bucket_step {step}")
    area = resolution * resolution
    buckets = set()
    for w in range(step, int(resolution * max_ratio) + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            buckets.add((w, h))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def resize_crop(im: Image.Image, width: int, height: int | None = None,
                rng: random.Random | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the image covers width x height (bicubic), then crop the centre (or a random
    window if `rng`). Returns the crop and its (top, left) offset in the resized image."""
    height = width if height is None else height
    scale = max(width / im.width, height / im.height)
    w, h = max(width, round(im.width * scale)), max(height, round(im.height * scale))
    if (w, h) != im.size:
        im = im.resize((w, h), Image.BICUBIC)
    if rng is None:
        left, top = (w - width) // 2, (h - height) // 2
    else:
        left, top = rng.randint(0, w - width), rng.randint(0, h - height)
    return im.crop((left, top, left + width, top + height)), (top, left)


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor (3, H, W) in [-1, 1]."""
    array = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())  # (H, W, 3)
    return array.permute(2, 0, 1).float() / 127.5 - 1.0


@dataclass
class ImageTextDecoder:
    """Raw sample -> {"image": (3, H, W) in [-1, 1], "caption", "key", "crop": (top, left),
    "original_size": (height, width)[, "meta": dict | None]}; H = W = resolution, or the sample's
    aspect-ratio bucket when `buckets` is given. An upscaled image sets "upscaled": True."""

    resolution: int
    crop: str = "center"
    with_meta: bool = False
    buckets: list[tuple[int, int]] | None = None
    min_size: int | None = None

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS} (got {self.crop!r})")
        if self.min_size is None:
            self.min_size = self.resolution // 2

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise BrokenSample("missing_image")
        if "txt" not in sample:
            raise BrokenSample("missing_caption")
        if len(sample[ext]) == 0:
            raise BrokenSample("empty_image")
        try:
            im = decode_image(sample[ext], draft=self.resolution)
        except Exception as e:  # PIL raises many types for bad bytes; any of them means "skip"
            raise BrokenSample("undecodable_image", str(e)) from e
        if min(im.size) == 0:
            raise BrokenSample("empty_image")
        if min(im.size) < self.min_size:
            raise BrokenSample("too_small", f"{im.width}x{im.height} px, data.min_size is {self.min_size}")
        width, height = (self.resolution,) * 2 if self.buckets is None else nearest_bucket(*im.size, self.buckets)
        original = (im.height, im.width)
        upscaled = im.width < width or im.height < height
        im, offset = resize_crop(im, width, height, rng if self.crop == "random" else None)
        out = {"image": image_to_tensor(im), "caption": sample["txt"].decode("utf-8", errors="replace").strip(),
               "key": sample["__key__"], "crop": torch.tensor(offset), "original_size": torch.tensor(original)}
        if upscaled:
            out["upscaled"] = True
        if self.with_meta:
            try:
                out["meta"] = json.loads(sample["json"]) if "json" in sample else None
            except ValueError:
                out["meta"] = None
        return out


def _load_tensor(data: bytes, ext: str) -> torch.Tensor:
    if ext.endswith("npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).copy())
    tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    return tensor


@dataclass
class LatentDecoder:
    """Raw sample -> {"latent": (C, h, w), "caption": str, "key": str[, "context": (L, D)]}."""

    def __call__(self, sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
        ext = next((e for e in ("latent.npy", "latent.pth") if e in sample), None)
        if ext is None:
            raise BrokenSample("missing_latent")
        if "txt" not in sample:
            raise BrokenSample("missing_caption")
        try:
            out = {"latent": _load_tensor(sample[ext], ext).float()}
            for emb in ("emb.npy", "emb.pth"):
                if emb in sample:
                    out["context"] = _load_tensor(sample[emb], emb).float()
        except Exception as e:
            raise BrokenSample("bad_tensor", str(e)) from e
        out["caption"] = sample["txt"].decode("utf-8", errors="replace").strip()
        out["key"] = sample["__key__"]
        return out
