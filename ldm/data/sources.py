"""Where image-caption samples come from: a folder with sidecar captions, a JSONL/CSV table, or the
built-in shapes. Both the shard writer and the folder reader list their images here.

A raw sample is the dict webdataset reads from a shard: `__key__` (no dots), the image bytes under
their extension (`png`, `jpg`, ...), the caption under `txt` and optional metadata under `json`.
`folder_samples`, `table_samples` and `shapes_samples` yield such samples (or `Skip(reason)`
markers) for `write_shards`; `list_items` gives the reader the same listing, keyed alike, so a
folder read directly trains on exactly the samples `tools/make_shards.py --images` would write.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image

from ..images import open_image, to_rgb

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
TABLE_SUFFIXES = (".jsonl", ".json", ".ndjson", ".csv", ".tsv")


@dataclass
class Skip:
    """A source item that will not be written, and why (e.g. "missing_caption")."""

    reason: str
    detail: str = ""


@dataclass
class Item:
    """One image of a folder or table: its sample key, file, caption (None: none given) and metadata."""

    key: str
    path: Path
    caption: str | None
    meta: dict = field(default_factory=dict)


def make_key(index: int, stem: str) -> str:
    """Keys sort in source order, stay unique, and keep a readable hint of the file name."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:48]
    return f"{index:09d}_{safe}" if safe else f"{index:09d}"


def image_ext(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower().lstrip(".")


def list_images(root: str | os.PathLike) -> list[Path]:
    """Images under `root` (recursive), sorted, by extension (jpg/jpeg/png/webp, any case)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist or is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and image_ext(p) in IMAGE_EXTS)


def read_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL (`.jsonl`, `.json` with one object per line), CSV (`.csv`) or TSV (`.tsv`) file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"caption table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not valid JSON ({e}); expected one object per line") from e
        return rows
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    raise ValueError(f"{path}: unknown table format {suffix!r}; use .jsonl, .csv or .tsv")


def folder_items(root: str | os.PathLike) -> list[Item]:
    """The images under `root` with their sidecar captions (`a/b.jpg` + `a/b.txt`; None where missing)."""
    root = Path(root)
    items = []
    for i, path in enumerate(list_images(root)):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        rel = path.relative_to(root)
        items.append(Item(make_key(i, str(rel.with_suffix(""))), path, caption, {"path": rel.as_posix()}))
    return items


def table_items(path: str | os.PathLike, *, image_key: str = "image", caption_key: str = "caption") -> list[Item]:
    """The rows of a JSONL/CSV table: image paths relative to the table's folder, captions, and the
    other columns as metadata. A row without an image path has `path` set to the table itself."""
    path = Path(path)
    rows = read_table(path)
    for key, option in ((image_key, "image"), (caption_key, "caption")):
        if rows and key not in rows[0]:
            raise ValueError(f"{path}: no column {key!r} (columns: {', '.join(rows[0])}); "
                             f"name the {option} column (--{option}-key, or data.{option}_column)")
    items = []
    for i, row in enumerate(rows):
        image = row.get(image_key)
        caption = row.get(caption_key)
        meta = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
        meta["path"] = str(image or "")
        stem = Path(str(image)).stem if image else ""
        items.append(Item(make_key(i, stem), path.parent / str(image) if image else path,
                          None if caption is None else str(caption), meta))
    return items


def caption_problem(item: Item, allow_empty_captions: bool) -> str | None:
    """"missing_caption" / "empty_caption" when `item` cannot train as captioned, else None."""
    if allow_empty_captions:
        return None
    if item.caption is None:
        return "missing_caption"
    return "empty_caption" if not item.caption.strip() else None


def _checked_image(data: bytes, ext: str, resize: int | None) -> bytes:
    """Decode fully (so truncated files are caught); re-encode only when `resize` shrinks the image.

    A re-encoded image is decoded the way the reader would (EXIF orientation applied, alpha over
    white, wide greyscale scaled), so shrinking never changes what training sees but its size."""
    im = open_image(data)
    if resize is None or min(im.size) <= resize:
        return data
    im = to_rgb(im)
    scale = resize / min(im.size)
    size = (max(resize, round(im.width * scale)), max(resize, round(im.height * scale)))
    out = io.BytesIO()
    fmt = _PIL_FORMATS[ext]
    im.resize(size, Image.BICUBIC).save(out, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return out.getvalue()


def item_sample(item: Item, *, allow_empty_captions: bool, resize: int | None) -> dict[str, Any] | Skip:
    """The shard sample of one item (its image checked by a full decode), or why it is skipped."""
    problem = caption_problem(item, allow_empty_captions)
    if problem is not None:
        return Skip(problem, str(item.path))
    if item.path.suffix.lower() in TABLE_SUFFIXES:  # a table row with no image path
        return Skip("missing_image", f"{item.path}: row {int(item.key[:9])} names no image")
    ext = image_ext(item.path)
    if ext not in IMAGE_EXTS:
        return Skip("unsupported_format", str(item.path))
    try:
        data = _checked_image(item.path.read_bytes(), ext, resize)
    except FileNotFoundError:
        return Skip("missing_image", str(item.path))
    except Exception as e:  # any decoder error: the file is unusable, not the run
        return Skip("unreadable_image", f"{item.path}: {e}")
    return {"__key__": item.key, ext: data, "txt": (item.caption or "").strip().encode("utf-8"),
            "json": json.dumps(item.meta, ensure_ascii=False).encode("utf-8")}


def folder_samples(root: str | os.PathLike, *, allow_empty_captions: bool = False,
                   resize: int | None = None) -> Iterator[dict[str, Any] | Skip]:
    """Samples from a folder of images with sidecar captions (`a/b.jpg` + `a/b.txt`)."""
    for item in folder_items(root):
        yield item_sample(item, allow_empty_captions=allow_empty_captions, resize=resize)


def table_samples(path: str | os.PathLike, *, image_key: str = "image", caption_key: str = "caption",
                  allow_empty_captions: bool = False, resize: int | None = None) -> Iterator[dict[str, Any] | Skip]:
    """Samples from a JSONL/CSV listing image paths (relative to the table's folder) and captions.

    Other columns go into the sample's `.json` metadata.
    """
    for item in table_items(path, image_key=image_key, caption_key=caption_key):
        yield item_sample(item, allow_empty_captions=allow_empty_captions, resize=resize)


def shapes_samples(n: int, *, resolution: int = 64, seed: int = 0, split: str = "train",
                   max_objects: int = 1) -> Iterator[dict[str, Any]]:
    """Samples of the built-in shapes dataset: lossless PNG image, caption, and the scene ground truth as `.json`."""
    from .shapes import ShapesDataset  # imported here: writing other sources must not depend on it

    dataset = ShapesDataset(resolution=resolution, length=n, seed=seed, split=split, max_objects=max_objects)
    for i in range(n):
        item = dataset[i]
        pixels = ((item["image"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (3, H, W)
        out = io.BytesIO()
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, format="PNG")
        meta = {"scene": item["scene"], "seed": seed, "split": split, "index": i}
        yield {"__key__": f"{split}_{i:09d}", "png": out.getvalue(), "txt": item["caption"].encode("utf-8"),
               "json": json.dumps(meta, default=str).encode("utf-8")}
