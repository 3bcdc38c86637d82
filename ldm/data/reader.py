"""Reading training batches from shards or a folder: split over ranks and workers, shuffled, broken
samples skipped and counted, equal batch counts per rank, and an exact position for resume.

`make_image_text_loader(urls, ...)` returns a `ShardLoader` (a torch DataLoader) yielding
`{"image": (B, 3, H, W) in [-1, 1], "caption": [str], "key": [str], "crop": (B, 2),
"original_size": (B, 2)}`. Its input is a list of *shards*: `.tar` URLs (paths, folders, brace
patterns, `pipe:` commands, index files), or the images of a folder or caption table
(`ldm.data.sources.Item`, one image each), which stream through the same code. Shards are split
across ranks and DataLoader workers ("slots"); broken samples are skipped, named in a warning and
counted in a `SkipCounter` shared by all workers. With `epoch_length` set, every slot cycles
through its shards forever and each rank yields exactly `epoch_length` batches per epoch, so DDP
never waits on a rank that ran dry; a slot whose own shards give no usable sample in a whole
pass (they are all broken, unreadable or held out) widens to a share of all shards rather than
stopping the run, and only data with no usable sample anywhere is an error. The stream is a pure
function of (seed, epoch, rank, world_size, num_workers); `loader.state_dict()` /
`load_state_dict()` give the exact position.

`make_latent_loader` reads pre-computed latent shards (`.latent.npy` or `.latent.pth`, `.txt`,
optional `.emb.npy`) written by `ldm.data.writer.write_latent_shards`.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset

from .sources import Item, image_ext
from .urls import expand_urls
from .transforms import BrokenSample, ImageTextDecoder, LatentDecoder

log = logging.getLogger(__name__)

WARNINGS_PER_REASON = 3  # broken samples named in warnings, per reason and worker, each epoch

SKIP_REASONS = ("missing_image", "missing_caption", "missing_latent", "empty_image", "undecodable_image",
                "too_small", "bad_tensor", "read_error")
NOTES = ("upscaled",)  # counted, not skipped
FIXES = {
    "missing_image": "the sample has no image file (or it was deleted after listing)",
    "missing_caption": "give it a caption (a .txt beside the image)",
    "empty_image": "the file is empty: delete or replace it",
    "undecodable_image": "not an image PIL can read (truncated or corrupt): delete or replace it",
    "too_small": "lower data.min_size to train it upscaled (0 keeps every image), or remove it",
    "bad_tensor": "re-create the latent shards (tools/cache_latents.py)",
    "missing_latent": "re-create the latent shards (tools/cache_latents.py)",
}

Shard = str | Item  # a .tar URL, or one image of a folder or table


class SkipCounter:
    """Counts skipped samples by reason (and upscaled images), shared by all DataLoader workers.

    Backed by `multiprocessing.Value`s created in the main process and inherited by the workers,
    so the counts are readable from the main process at any time, during or after iteration.
    `total` counts skips only."""

    def __init__(self, context: str | None = None):
        # Values must come from the same start method (fork, spawn, ...) as the workers they go to.
        ctx = multiprocessing.get_context(context)
        self._values = {r: ctx.Value("q", 0) for r in (*SKIP_REASONS, *NOTES)}

    def add(self, reason: str, n: int = 1) -> None:
        value = self._values[reason]
        with value.get_lock():
            value.value += n

    def as_dict(self) -> dict[str, int]:
        return {r: v.value for r, v in self._values.items() if v.value}

    @property
    def total(self) -> int:
        return sum(self._values[r].value for r in SKIP_REASONS)

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world_size): as given, else from torch.distributed, else env RANK/WORLD_SIZE, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            found = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size) (got rank={rank}, world_size={world_size})")
    return rank, world_size


def _shuffled(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle through a buffer of `size` items (size <= 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            i = rng.randrange(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensor fields, list the others; a field missing from any sample is left out of the batch."""
    keys = [k for k in samples[0] if all(k in s for s in samples)]
    return {k: torch.stack([s[k] for s in samples]) if isinstance(samples[0][k], torch.Tensor)
            else [s[k] for s in samples] for k in keys}


class SlotShare:
    """Which samples a slot reads, widened when its share holds no usable sample in a whole pass:
    "own" (its shards), "strided" (every n-th sample of all shards), "all" (every sample)."""

    MODES = ("own", "strided", "all")

    def __init__(self, mode: str):
        self.mode = mode
        self.last_pass: int | None = None  # samples read in the last whole pass in this mode

    def widen(self, slot: int, nslots: int, shards: int, why: str) -> None:
        if self.mode == "all":
            raise RuntimeError(f"no usable sample in any of the {shards} shards ({why}); check the data")
        self.mode = self.MODES[self.MODES.index(self.mode) + 1]
        self.last_pass = None
        reads = f"one in {nslots} samples of all {shards} shards" if self.mode == "strided" else "every sample"
        log.warning("slot %d of %d (rank x worker) %s in a whole pass; it now reads %s, so some samples repeat within "
                    "an epoch: check the shards", slot, nslots, why, reads)


def _item_sample(item: Item) -> dict[str, Any]:
    """The raw sample of one folder image, read now (a file that vanished has no image)."""
    sample = {"__key__": item.key, "__url__": str(item.path), "txt": (item.caption or "").strip().encode("utf-8")}
    try:
        sample[image_ext(item.path)] = item.path.read_bytes()
    except OSError:
        pass
    return sample


class ShardDataset(IterableDataset):
    """Batches decoded from shards, split over ranks and DataLoader workers.

    The stream of each (rank, worker) "slot" is a function of (seed, epoch, slot, number of slots):
      - shards are split over slots when there are at least as many shards as slots, otherwise
        every slot reads all shards and keeps every n-th sample (slower, but still disjoint);
      - shard order is shuffled per pass (same order for all slots) when shuffle_buffer > 1, and
        `.tar` samples pass through a buffer of `shuffle_buffer` (a folder's images are shards of
        one image each, so shuffling their order shuffles them fully); random crops come from
        the slot's own RNG;
      - `keep(key)` False drops a sample before it is decoded (the held-out split);
      - a batch holds samples of one shape (aspect-ratio buckets fill one batch each);
      - epoch_length=None: one pass over the slot's share, the last batches may be short;
        epoch_length=N: passes repeat, and worker w of W yields its share of exactly N batches
        (batches w, w+W, ...), which the DataLoader interleaves back into order 0..N-1.
    """

    def __init__(self, shards: list[Shard], decode: Callable[[dict, random.Random], dict], *, batch_size: int,
                 shuffle_buffer: int = 1000, seed: int = 0, epoch_length: int | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 keep: Callable[[str], bool] | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"epoch_length must be at least 1 batch (got {epoch_length}); None reads one pass")
        if not shards:
            raise ValueError("no shards or images to read; check data.urls")
        self.urls = shards
        self.decode = decode
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_length = epoch_length
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.drop_last = drop_last
        self.keep = keep
        self.epoch = 0
        self.skipped = SkipCounter()
        self._warned: dict[str, int] = {}
        if self.world_size > 1 and epoch_length is None:
            log.warning("one-pass reading on %d ranks: ranks may get different numbers of batches, which hangs DDP "
                        "training at the epoch end; set epoch_length for training", self.world_size)
        if len(self.urls) < self.world_size:
            log.info("%d shards for %d ranks: every rank reads all shards and keeps its share of samples",
                     len(self.urls), self.world_size)

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("a one-pass shard dataset has no length; set epoch_length for a fixed number of batches")
        return self.epoch_length

    def _read(self, shards: list[Shard]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        def handler(exn: Exception) -> bool:
            self.skipped.add("read_error")
            log.warning("shard read error (skipped): %r", exn)
            return True

        tars = [s for s in shards if isinstance(s, str)]
        if len(tars) == len(shards):
            yield from wds.tarfile_samples([{"url": u} for u in tars], handler=handler)
            return
        for shard in shards:
            if isinstance(shard, str):
                yield from wds.tarfile_samples([{"url": shard}], handler=handler)
            else:
                yield _item_sample(shard)

    def _raw_samples(self, slot: int, nslots: int, share: SlotShare) -> Iterator[dict[str, Any]]:
        """Undecoded samples of this slot, pass after pass (one pass when epoch_length is None), from
        the shards `share.mode` gives it at the start of each pass."""
        pass_index = 0
        while True:
            urls = list(self.urls)
            if self.shuffle_buffer > 1:
                random.Random(f"shards-{self.seed}-{self.epoch}-{pass_index}").shuffle(urls)
            mode = share.mode
            mine = urls[slot::nslots] if mode == "own" else urls
            n = 0
            for i, sample in enumerate(self._read(mine)):
                if (mode != "strided" or i % nslots == slot) and (self.keep is None or self.keep(sample["__key__"])):
                    n += 1
                    yield sample
            if self.epoch_length is None:
                return
            if n == 0 and share.mode == mode:
                share.widen(slot, nslots, len(self.urls), f"got no samples from {len(mine)} shards")
            elif share.mode == mode:
                share.last_pass = n
            pass_index += 1

    def _skip(self, sample: dict[str, Any], e: BrokenSample) -> None:
        self.skipped.add(e.reason)
        seen = self._warned[e.reason] = self._warned.get(e.reason, 0) + 1
        if seen <= WARNINGS_PER_REASON:
            where = sample.get("__url__", "?")
            detail = f" ({e.detail})" if e.detail else ""
            log.warning("skipped sample %s of %s: %s%s; %s", sample.get("__key__"), where, e.reason, detail,
                        FIXES.get(e.reason, "check the data"))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        slot = self.rank * num_workers + worker
        nslots = self.world_size * num_workers
        rng = random.Random(f"samples-{self.seed}-{self.epoch}-{slot}-{nslots}")
        if self.epoch_length is None:
            quota = None
        else:  # this worker's batches are w, w + W, ... < epoch_length
            quota = max(0, (self.epoch_length - worker + num_workers - 1) // num_workers)
            if quota == 0:
                return
        tar_buffer = self.shuffle_buffer if any(isinstance(s, str) for s in self.urls) else 0
        pending: dict[tuple, list[dict[str, Any]]] = {}  # samples by shape, until a batch is full
        share = SlotShare("own" if len(self.urls) >= nslots else "strided")
        produced = broken = 0
        for sample in _shuffled(self._raw_samples(slot, nslots, share), tar_buffer, rng):
            try:
                item = self.decode(sample, rng)
                broken = 0
            except BrokenSample as e:
                self._skip(sample, e)
                broken += 1
                # a whole pass of broken samples in a row (the shuffle buffer may hold some back)
                if quota is not None and share.last_pass is not None and broken > share.last_pass + tar_buffer:
                    share.widen(slot, nslots, len(self.urls), f"found only broken samples (skipped so far: "
                                f"{self.skipped.as_dict()})")
                    broken = 0
                continue
            if item.pop("upscaled", False):
                self.skipped.add("upscaled")
            shape = tuple(next(v.shape for k, v in item.items() if k in ("image", "latent")))
            batch = pending.setdefault(shape, [])
            batch.append(item)
            if len(batch) == self.batch_size:
                yield collate(pending.pop(shape))
                produced += 1
                if quota is not None and produced >= quota:
                    return
        if not self.drop_last and quota is None:
            for batch in pending.values():
                yield collate(batch)


class ShardLoader(DataLoader):
    """A DataLoader over a ShardDataset that knows its position in the stream.

    Iterating continues from the current position (`epoch`, `batch`) and advances it; a finished
    pass moves to the next epoch. `state_dict()` / `load_state_dict()` save and restore the
    position: a loader re-created with the same seed, ranks and num_workers continues the exact
    same stream (the first `batch` batches of the epoch are regenerated and dropped).
    Skipped samples are counted in `loader.skipped` and warned about at the end of each epoch.
    """

    def __init__(self, dataset: ShardDataset, *, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context: str | None = None):
        if num_workers == 0:
            multiprocessing_context = prefetch_factor = None
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         prefetch_factor=prefetch_factor, persistent_workers=False,
                         multiprocessing_context=multiprocessing_context)
        dataset.skipped = SkipCounter(multiprocessing_context)
        self.epoch = 0
        self.batch = 0

    @property
    def skipped(self) -> SkipCounter:
        return self.dataset.skipped

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.dataset.seed, "epoch": self.epoch, "batch": self.batch,
                "num_workers": self.num_workers, "world_size": self.dataset.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, mine in (("seed", self.dataset.seed), ("num_workers", self.num_workers),
                          ("world_size", self.dataset.world_size)):
            if key in state and state[key] != mine:
                raise ValueError(f"data position was saved with {key}={state[key]}, this loader has {key}={mine}; "
                                 f"re-create the loader with {key}={state[key]} to resume the same stream")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def set_epoch(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.dataset.epoch_length is not None and self.batch >= self.dataset.epoch_length:
            self.epoch, self.batch = self.epoch + 1, 0  # saved right after an epoch's last batch
        self.dataset.epoch = self.epoch  # read by the workers, which are started by super().__iter__()
        start, before = self.batch, self.skipped.total
        for i, batch in enumerate(super().__iter__()):
            if i < start:
                continue
            self.batch = i + 1
            yield batch
        new = self.skipped.total - before
        if new:
            warnings.warn(f"skipped {new} samples (broken, unreadable or too small) in epoch {self.epoch}; all "
                          f"epochs, by reason: {self.skipped.as_dict()}", stacklevel=2)
        self.epoch, self.batch = self.epoch + 1, 0


def _shards(urls: str | os.PathLike | Iterable[str | os.PathLike] | list[Item]) -> list[Shard]:
    if isinstance(urls, list) and urls and all(isinstance(u, Item) for u in urls):
        return urls
    return expand_urls(urls)


def make_image_text_loader(
    urls,
    *,
    resolution: int,
    batch_size: int,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch_length: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    crop: str = "center",
    buckets: list[tuple[int, int]] | None = None,
    min_size: int | None = None,
    keep: Callable[[str], bool] | None = None,
    with_meta: bool = False,
    drop_last: bool = False,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """A DataLoader of {"image": (B, 3, H, W) in [-1, 1], "caption": [str], "key": [str], "crop": (B, 2)
    (top, left), "original_size": (B, 2) (height, width)} from shards or a folder's images.

    urls: path, folder (its *.tar), brace pattern, `pipe:` command, or a list of these; or a list
        of `Item`s (`ldm.data.sources.folder_items` / `table_items`), one image each.
    crop: "center" or "random"; buckets: (width, height) sizes (`transforms.make_buckets`) to give
        each image the one nearest its aspect ratio (H = W = resolution without); min_size: the
        small-image rule (`ldm.data.transforms`); keep: key -> bool, False drops the sample.
    epoch_length: batches per rank per epoch (repeating the data as needed), the same on every
        rank, which DDP training needs; None reads each rank's share once (evaluation).
    rank, world_size: default from torch.distributed, else env RANK / WORLD_SIZE.
    multiprocessing_context: worker start method ("fork", "spawn", "forkserver"; default: the platform's).
    Do not pass the loader through `accelerate.prepare`: it splits the data across ranks itself.
    """
    decode = ImageTextDecoder(resolution, crop, with_meta, buckets, min_size)
    dataset = ShardDataset(_shards(urls), decode, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                           epoch_length=epoch_length, rank=rank, world_size=world_size, drop_last=drop_last, keep=keep)
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                       multiprocessing_context=multiprocessing_context)


def make_latent_loader(
    urls,
    *,
    batch_size: int,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    epoch_length: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    keep: Callable[[str], bool] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
) -> ShardLoader:
    """Like `make_image_text_loader`, for latent shards: {"latent": (B, C, h, w), "caption": [str],
    "key": [str], "context": (B, L, D) when every sample of the batch has an `.emb.npy`}."""
    dataset = ShardDataset(expand_urls(urls), LatentDecoder(), batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                           seed=seed, epoch_length=epoch_length, rank=rank, world_size=world_size,
                           drop_last=drop_last, keep=keep)
    return ShardLoader(dataset, num_workers=num_workers, pin_memory=pin_memory,
                       multiprocessing_context=multiprocessing_context)
