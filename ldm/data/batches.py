"""The one way training reads data: `training_batches(cfg.data, ...)` gives either stage its
micro-batches from any source, and `heldout_items(cfg.data, ...)` the held-out images it is
measured on. A new source is added here once.

Sources (`data.source`):
    shapes   the built-in rendered scenes; batch of step s is a pure function of s (no files)
    folder   images with sidecar .txt captions, or a JSONL/CSV caption table, read directly
    shards   webdataset .tar shards (tools/make_shards.py), local or `pipe:` URLs
    latents  cached latents (tools/cache_latents.py); stage 2 only

The held-out split of folder, shard and latent data: a sample whose key hashes below
`data.heldout_fraction` is held out, by every rank and both stages alike, so it is never trained on
(or `data.heldout_urls` names separate held-out data, and training reads all of `data.urls`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import DataConfig
from .reader import ShardLoader, make_image_text_loader, make_latent_loader
from .sources import TABLE_SUFFIXES, Item, caption_problem, folder_items, table_items
from .transforms import make_buckets
from .urls import expand_urls

log = logging.getLogger(__name__)

IMAGE_SOURCES = ("shapes", "folder", "shards")
HELDOUT_BATCH = 32
_warned: set[str] = set()  # folders whose uncaptioned images were named once in this process


@dataclass(frozen=True)
class HashSplit:
    """key -> bool: in the held-out share (`heldout=True`) or in the training share. Picklable,
    so DataLoader workers started by spawn get it too."""

    fraction: float
    heldout: bool

    def __call__(self, key: str) -> bool:
        unit = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
        return (unit < self.fraction) == self.heldout


def folder_images(data: DataConfig, urls: str | None = None) -> list[Item]:
    """The captioned images of a folder (sidecar .txt) or caption table; images without a caption
    are skipped with a warning naming them (or kept with "" when data.allow_empty_captions)."""
    path = Path(urls or data.urls)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        items = table_items(path, image_key=data.image_column, caption_key=data.caption_column)
    elif path.is_dir():
        items = folder_items(path)
    else:
        raise ValueError(f"data.urls={str(path)!r} is neither a folder of images nor a caption table "
                         "(.jsonl, .csv, .tsv); check the path")
    if not items:
        tars = sorted(path.glob("*.tar")) if path.is_dir() else []
        hint = f"; it holds {len(tars)} .tar shards: use data.source=shards" if tars else ""
        raise ValueError(f"no images in {path} (searched recursively for .jpg, .jpeg, .png, .webp){hint}")
    problems = [(item, caption_problem(item, data.allow_empty_captions)) for item in items]
    missing = [(item, p) for item, p in problems if p is not None]
    if len(missing) == len(items):
        raise ValueError(f"none of the {len(items)} images in {path} has a caption (e.g. {missing[0][0].path} has "
                         f"no {missing[0][0].path.with_suffix('.txt').name}); add a .txt caption beside each image, "
                         "or set data.allow_empty_captions=true to train them with an empty caption")
    if missing and str(path) not in _warned:
        _warned.add(str(path))
        names = ", ".join(str(item.path) for item, _ in missing[:3])
        log.warning("skipping %d of %d images without a caption (%s, ...): add a .txt beside each, or set "
                    "data.allow_empty_captions=true to train them with an empty caption", len(missing), len(items), names)
    return [item for item, p in problems if p is None]


def _image_shards(data: DataConfig, urls: str, keep: HashSplit | None) -> tuple[list[Item] | str, HashSplit | None]:
    """What the reader reads, and the split it still has to apply: a folder's images are split here,
    before any file is opened; shard samples as they stream by."""
    if data.source != "folder":
        return urls, keep
    return [item for item in folder_images(data, urls) if keep is None or keep(item.key)], None


def _split(data: DataConfig, heldout: bool) -> HashSplit | None:
    """The training (or held-out) share of data.urls; None where a side reads all of its data."""
    if data.heldout_urls:  # training reads all of data.urls, evaluation all of data.heldout_urls
        return None
    if data.heldout_fraction == 0:
        return HashSplit(0.0, True) if heldout else None
    return HashSplit(data.heldout_fraction, heldout)


def buckets_of(data: DataConfig) -> list[tuple[int, int]] | None:
    return make_buckets(data.resolution, data.bucket_step, data.max_aspect_ratio) if data.buckets else None


def shapes_batches(
    data: DataConfig, batch_size: int, start_step: int, micro_steps: int, rank: int, world: int, seed: int
) -> Iterator[dict]:
    """Micro-batches of the built-in dataset from optimizer step `start_step` on: micro-batch m of
    step s on rank r holds items ((s * micro_steps + m) * world + r) * batch_size + j."""
    from .shapes import ShapesDataset

    dataset = ShapesDataset(resolution=data.resolution, length=2**62, seed=seed, max_objects=data.shapes_max_objects,
                            combinations=data.shapes_combinations, scale=data.shapes_scale)
    index = start_step * micro_steps
    while True:
        base = (index * world + rank) * batch_size
        items = [dataset[base + j] for j in range(batch_size)]
        yield {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
        index += 1


class Batches:
    """Micro-batches forever; `position()` is what a training state stores to resume the stream."""

    def __init__(self, source: str, iterator: Iterator[dict], loader: ShardLoader | None = None):
        self.source = source
        self.loader = loader
        self._iterator = iterator

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict:
        return next(self._iterator)

    def position(self, step: int) -> dict[str, Any]:
        position: dict[str, Any] = {"source": self.source, "step": step}
        if self.loader is not None:
            position["loader"] = self.loader.state_dict()
        return position


def _forever(loader: ShardLoader) -> Iterator[dict]:
    while True:
        yield from loader  # the loader moves to the next epoch by itself


def training_batches(data: DataConfig, *, batch_size: int, grad_accum: int, seed: int, rank: int, world: int,
                     start_step: int = 0, position: dict | None = None) -> Batches:
    """Micro-batches of `data` for training from optimizer step `start_step` on, rank `rank` of
    `world`: {"image" (B, 3, H, W) in [-1, 1] | "latent" (B, C, h, w), "caption": [str], ...}.

    `position`: what `Batches.position` returned when the state being resumed was saved."""
    if position is not None and position.get("source", data.source) != data.source:
        raise ValueError(f"the training state read data.source={position['source']!r}, this run reads "
                         f"{data.source!r}; resume with the same data, or start a new train.output_dir")
    if data.source == "shapes":
        return Batches("shapes", shapes_batches(data, batch_size, start_step, grad_accum, rank, world, seed))
    common = dict(batch_size=batch_size, num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer, seed=seed,
                  epoch_length=data.epoch_length, rank=rank, world_size=world)
    if data.source == "latents":
        loader = make_latent_loader(data.urls, keep=_split(data, heldout=False), **common)
    else:
        shards, keep = _image_shards(data, data.urls, _split(data, heldout=False))
        loader = make_image_text_loader(shards, resolution=data.resolution, crop=data.crop, buckets=buckets_of(data),
                                        min_size=data.min_size, keep=keep, **common)
    if position is not None and "loader" in position:
        loader.load_state_dict(position["loader"])
    return Batches(data.source, _forever(loader), loader)


def heldout_items(data: DataConfig, seed: int, n: int | None = None) -> list[dict]:
    """Up to `n` (default data.heldout_size) held-out items, in a fixed order: {"image": (3, R, R)
    centre crops in [-1, 1] (or "latent"), "caption"}. Shapes: the disjoint held-out split of the
    scenes; other sources: the held-out share of data.urls, or data.heldout_urls."""
    n = data.heldout_size if n is None else n
    if n < 1:
        raise ValueError(f"data.heldout_size must be >= 1 to measure the model on held-out data (got {n})")
    if data.source == "shapes":
        from .shapes import ShapesDataset

        dataset = ShapesDataset(data.resolution, n, seed, data.shapes_max_objects, split="heldout",
                                combinations=data.shapes_combinations, scale=data.shapes_scale)
        return [{k: v for k, v in dataset[i].items() if k != "scene"} for i in range(n)]
    urls = data.heldout_urls or data.urls
    keep = _split(data, heldout=True)
    one_pass = dict(batch_size=HELDOUT_BATCH, num_workers=0, shuffle_buffer=0, seed=seed, rank=0, world_size=1)
    if data.source == "latents":
        loader = make_latent_loader(urls, keep=keep, **one_pass)
    else:
        shards, keep = _image_shards(data, urls, keep)
        loader = make_image_text_loader(shards, resolution=data.resolution, min_size=data.min_size, keep=keep,
                                        **one_pass) if shards else []  # none: reported below
    field = "latent" if data.source == "latents" else "image"
    items: list[dict] = []
    for batch in loader:
        items += [{field: x, "caption": c} for x, c in zip(batch[field], batch["caption"])]
        if len(items) >= n:
            break
    if not items:
        where = data.heldout_urls or (f"{data.urls} at data.heldout_fraction={data.heldout_fraction} (the share of "
                                      "samples held out of training)")
        raise ValueError(f"no held-out samples in {where}; raise data.heldout_fraction (e.g. 0.05), or name "
                         "separate held-out data with data.heldout_urls")
    return items[:n]


def describe(data: DataConfig) -> str:
    """One line for the log: which data a stage reads, and how."""
    if data.source == "shapes":
        return f"data.source=shapes (built-in scenes, up to {data.shapes_max_objects} objects), {data.resolution} px"
    where = f"data.source={data.source} data.urls={data.urls}"
    if data.source == "folder":
        items = folder_images(data)
        held = sum(map(_split(data, heldout=True), (it.key for it in items))) if not data.heldout_urls else 0
        where += f" ({len(items)} captioned images, {held} held out)"
    if data.source == "latents":
        return where
    size = f"buckets of ~{data.resolution}^2 px" if data.buckets else f"{data.resolution} px"
    return f"{where}, {size}, {data.crop} crops"


def check_data(data: DataConfig, *, images: bool = False) -> None:
    """Fail now, with the fix, on data that cannot train: a folder with no (captioned) images, URLs
    that match nothing, a folder whose held-out share is empty; `images`: cached latents for stage 1."""
    if images and data.source not in IMAGE_SOURCES:
        raise ValueError(f"stage 1 trains on images, and data.source={data.source!r} holds cached latents: give "
                         "stage 1 the image data (data.source=folder or shards, and data.urls, in its VAE config)")
    if data.source == "shapes":
        return
    for urls in filter(None, (data.urls, data.heldout_urls)):
        if data.source == "folder":
            folder_images(data, urls)
        else:
            expand_urls(urls)
    if data.source == "folder" and not data.heldout_urls:
        keys = [item.key for item in folder_images(data)]
        if not any(map(_split(data, heldout=True), keys)):
            raise ValueError(f"none of the {len(keys)} images in {data.urls} is held out at data.heldout_fraction="
                             f"{data.heldout_fraction}; raise it (e.g. {max(0.05, 2 / len(keys)):.2g}), or name "
                             "separate held-out data with data.heldout_urls")
