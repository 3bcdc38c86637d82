"""The one thread that runs models: takes batches from the queue, samples them, hands out pictures.

A batch is one call of `LDMPipeline.generate`, `img2img` or `inpaint` with one prompt, negative
prompt and generator per picture, so every picture keeps its own seed. The step callback keeps
each job's progress, makes a preview when a client asked for one (at most every
`preview_every` seconds per job), and stops the batch once no job in it wants its pictures
(clients gone or interrupted): interrupted jobs get the sampler's current estimate, decoded.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch
from PIL import Image

from ..images import to_pil
from ..pipeline import LDMPipeline
from .catalog import ModelCatalog
from .queue import Batch, BatchQueue, Job, Slice

log = logging.getLogger("ldm.serve")


class Interrupted(Exception):
    """Raised from the step callback to leave the sampler loop early."""


class Worker:
    """Runs batches from `queue` on the models of `catalog` in a background thread."""

    def __init__(self, queue: BatchQueue, catalog: ModelCatalog, *, preview_every: float = 1.0):
        self.queue = queue
        self.catalog = catalog
        self.preview_every = preview_every
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> Worker:
        self._thread = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the batch running now (interrupted), failing what still waits."""
        self._stop.set()
        self.queue.interrupt()
        self.queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self.queue.next_batch(timeout=0.5)
            if batch is not None:
                self.run(batch)

    # ------------------------------------------------------------------------------------------

    def run(self, batch: Batch) -> None:
        """Run one batch to the end (or interruption) and settle every job in it."""
        start = time.monotonic()
        try:
            pipe = self.catalog.pipeline(batch.key.model)
            if batch.key.mode != "load":
                self._sample(pipe, batch)
            for s in batch.slices:
                self._settle(s.job)
        except BaseException as error:  # every job in the batch learns why it failed
            log.exception("batch of %d pictures failed", batch.size)
            for s in batch.slices:
                s.job.fail(error)
        finally:
            self.queue.finish(batch, time.monotonic() - start)

    def _sample(self, pipe: LDMPipeline, batch: Batch) -> None:
        latest: list[torch.Tensor] = []

        def on_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            latest[:] = [denoised]
            self._on_step(pipe, batch, i, denoised)

        try:
            images = run_batch(pipe, batch, on_step)
        except Interrupted:
            for s, rows in _rows(batch):
                if s.job.interrupted and s.job.active and latest:
                    self._store(s, _decode(pipe, latest[0][rows]))
            return
        for s, rows in _rows(batch):
            self._store(s, images[rows])

    def _on_step(self, pipe: LDMPipeline, batch: Batch, i: int, denoised: torch.Tensor) -> None:
        now = time.monotonic()
        for s, rows in _rows(batch):
            job = s.job
            job.step = i + 1
            if job.interrupted and job.active and not batch.should_stop():
                self._store(s, _decode(pipe, denoised[rows]))  # leave now; the others go on
                self._settle(job)
            elif job.preview_wanted and job.active and now - job.preview_at >= self.preview_every:
                job.preview, job.preview_at = _decode(pipe, denoised[rows][:1])[0], now
                job.preview_wanted = False
        if batch.should_stop():
            raise Interrupted

    def _store(self, s: Slice, images: list[Image.Image]) -> None:
        job = s.job
        for k, image in enumerate(images):
            task = job.tasks[s.start + k] if s.start + k < len(job.tasks) else None
            if task is not None and job.results[s.start + k] is None:
                image.info["seed"] = task.seed  # the pipeline cannot know it: it got generators
                job.results[s.start + k] = image
        job.finished = max(job.finished, s.start + len(images))

    def _settle(self, job: Job) -> None:
        """Resolve a job whose pictures are all made (or that was interrupted); drop a cancelled one."""
        if job.cancelled:
            job.future.cancel()
        elif job.interrupted:
            job.resolve(interrupted=True)
        elif job.finished == len(job.tasks):
            job.resolve()


def _rows(batch: Batch) -> list[tuple[Slice, slice]]:
    """Each slice of the batch with its rows in the batch's tensors."""
    out, start = [], 0
    for s in batch.slices:
        n = s.stop - s.start
        out.append((s, slice(start, start + n)))
        start += n
    return out


def _decode(pipe: LDMPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (n, C, h, w) -> n RGB pictures."""
    with torch.inference_mode():
        return [to_pil(im) for im in pipe.decode_latents(latents).float().cpu()]


def run_batch(pipe: LDMPipeline, batch: Batch, callback: Callable[[int, torch.Tensor, torch.Tensor], None]
              ) -> list[Image.Image]:
    """One pipeline call for every picture of the batch, each with its own prompt and seed."""
    key, tasks = batch.key, batch.tasks
    common = dict(
        steps=key.steps, cfg=key.cfg, sampler=key.sampler, spacing=key.spacing, eta=key.eta,
        generator=[torch.Generator().manual_seed(t.seed) for t in tasks],
        progress=False, callback=callback,
    )
    prompts, negatives = [t.prompt for t in tasks], [t.negative_prompt for t in tasks]
    if key.mode == "txt2img":
        return pipe.generate(prompts, negatives, height=key.height, width=key.width, **common)
    images = [t.init_image for t in tasks]
    if key.mode == "img2img":
        return pipe.img2img(images, prompts, key.strength, negatives, **common)
    if key.mode == "inpaint":
        return pipe.inpaint(images, [t.mask for t in tasks], prompts, negatives, strength=key.strength, **common)
    raise ValueError(f"unknown batch mode {key.mode!r}")
