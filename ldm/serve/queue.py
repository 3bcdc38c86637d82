"""The batching queue: requests wait in one line, and those that can share a U-Net call run together.

A request becomes a `Job` of one or more pictures (`ImageTask`s, each with its own prompt and seed)
and a `BatchKey`: everything that must be equal for pictures to go through the same sampler
loop (model, mode, size, steps, sampler, guidance, strength). The worker asks for the next batch:
the job at the head of the line gives as many of its pictures as fit, then every later job with
the same key fills the rest, in arrival order, up to `max_batch` pictures. A compatible request
rides along with an earlier one, and a big request is split over several batches. A batch that
is not full waits until its head has been in line `batch_wait` seconds (by default a tenth of
the recent batches' duration) for more to arrive: with a fixed U-Net batch shape a partial batch
costs as much as a full one, and clients answered together send their next requests together,
milliseconds to a fraction of a second apart. Nothing here touches a model; the worker runs what
it is given.

Thread safety: the HTTP side (one event loop) submits, cancels and reads positions; the worker
thread takes batches and reports results. One lock guards the line.
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

MODES = ("txt2img", "img2img", "inpaint", "load")
AUTO_WAIT = 0.1  # without a batch_wait, a batch that is not full waits this fraction of a recent batch's time


@dataclass(frozen=True)
class BatchKey:
    """What pictures must have in common to share U-Net calls."""

    model: str
    mode: str  # one of MODES; "load" only loads `model` (a switch of model), with no pictures
    width: int = 0
    height: int = 0
    steps: int = 0
    sampler: str = ""
    spacing: str | None = None
    cfg: float = 0.0
    eta: float | None = None
    strength: float | None = None  # img2img and inpaint
    chunks: int = 1  # the prompt pair's chunk count (ldm.models.prompt_encoder): one context length per call

    @property
    def sampling_steps(self) -> int:
        """Steps the sampler runs: img2img and inpaint skip the first steps * (1 - strength)."""
        if self.strength is None:
            return self.steps
        return min(int(self.steps * self.strength), self.steps)


@dataclass
class ImageTask:
    """One picture to make."""

    prompt: str
    negative_prompt: str
    seed: int
    init_image: Image.Image | None = None  # img2img and inpaint, already at the key's size
    mask: Image.Image | None = None  # inpaint: "L", white = repaint


@dataclass
class JobResult:
    """What a job hands back: one picture per task made (fewer when interrupted)."""

    images: list[Image.Image]
    interrupted: bool = False


class QueueFull(Exception):
    """The line holds as many pictures as it may; `retry_after` estimates when there is room."""

    def __init__(self, queued: int, limit: int, retry_after: int):
        super().__init__(
            f"the queue is full ({queued} images waiting, at most {limit}); retry in about {retry_after} s"
        )
        self.retry_after = retry_after


class Job:
    """One request: its pictures, where it stands, and the future its response waits on."""

    def __init__(self, key: BatchKey, tasks: list[ImageTask], job_id: str | None = None):
        self.id = job_id or uuid.uuid4().hex
        self.key = key
        self.tasks = tasks
        self.results: list[Image.Image | None] = [None] * len(tasks)
        self.future: concurrent.futures.Future[JobResult] = concurrent.futures.Future()
        self.state = "queued"  # queued -> running -> done; or cancelled (client gone) / failed
        self.scheduled = 0  # tasks handed to batches so far
        self.finished = 0  # tasks with a result
        self.step = 0  # sampling step of the batch running this job's pictures now
        self.created = time.monotonic()
        self.started: float | None = None
        self.cancelled = False  # the client is gone: drop its pictures, never decode them
        self.interrupted = False  # the client asked to stop: hand back what there is
        self.preview: Image.Image | None = None
        self.preview_at = 0.0  # time.monotonic() of the last preview
        self.preview_wanted = False  # someone polls progress with previews: the worker makes one

    @property
    def remaining(self) -> int:
        return len(self.tasks) - self.scheduled

    @property
    def active(self) -> bool:
        """Still owed a response."""
        return not self.future.done()

    def progress(self) -> float:
        """Fraction done, counting the steps of the batch running now."""
        steps = max(self.key.sampling_steps, 1)
        running = (self.scheduled - self.finished) if self.state == "running" else 0
        return min(1.0, (self.finished + running * self.step / steps) / max(len(self.tasks), 1))

    def resolve(self, interrupted: bool = False) -> None:
        """Hand back the pictures made so far (all of them unless interrupted)."""
        if self.active:
            self.state = "done"
            self.future.set_result(JobResult([im for im in self.results if im is not None], interrupted))

    def fail(self, error: BaseException) -> None:
        if self.active:
            self.state = "failed"
            self.future.set_exception(error)


@dataclass
class Slice:
    """Tasks [start, stop) of one job, as part of a batch."""

    job: Job
    start: int
    stop: int

    @property
    def tasks(self) -> list[ImageTask]:
        return self.job.tasks[self.start : self.stop]


@dataclass
class Batch:
    """Pictures that run through one sampler loop, in slice order."""

    key: BatchKey
    slices: list[Slice]
    stop_all: bool = False  # /interrupt without a task: stop the batch, hand back what there is
    started: float = field(default_factory=time.monotonic)

    @property
    def tasks(self) -> list[ImageTask]:
        return [t for s in self.slices for t in s.tasks]

    @property
    def size(self) -> int:
        return sum(s.stop - s.start for s in self.slices)

    def should_stop(self) -> bool:
        """True once no job in the batch wants its pictures finished."""
        return self.stop_all or all(s.job.cancelled or s.job.interrupted or not s.job.active for s in self.slices)


class BatchQueue:
    """One line of jobs; `next_batch` hands the worker the head job plus compatible ones.

    `max_batch`: pictures per batch; `max_waiting`: pictures that may wait (not yet handed to a
    batch) before `submit` raises QueueFull; `batch_wait`: seconds a batch that is not full may
    wait, counted from its head's arrival (None: AUTO_WAIT times the recent batches' duration).
    """

    def __init__(self, max_batch: int, max_waiting: int, batch_wait: float | None = None):
        if max_batch < 1 or max_waiting < 1 or (batch_wait is not None and batch_wait < 0):
            raise ValueError(f"need max_batch >= 1, max_waiting >= 1 and batch_wait >= 0 "
                             f"(got {max_batch}, {max_waiting} and {batch_wait})")
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.batch_wait = batch_wait
        self._line: list[Job] = []  # jobs with tasks not yet handed out, in arrival order
        self._jobs: dict[str, Job] = {}  # every job still owed a response, by id
        self._cond = threading.Condition()
        self.running: Batch | None = None
        self._rate = 0.0  # pictures per second, averaged over recent batches
        self._batch_seconds = 0.0  # duration of a batch, averaged likewise
        self._closed = False

    # -- the HTTP side -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Put `job` at the end of the line, or raise QueueFull (ValueError for a reused id)."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if job.id in self._jobs:
                raise ValueError(f"task id {job.id!r} is already in use; send another force_task_id")
            waiting = self._waiting()
            if waiting and waiting + len(job.tasks) > self.max_waiting:
                raise QueueFull(waiting, self.max_waiting, self._retry_after(waiting + len(job.tasks) - self.max_waiting))
            job.created = time.monotonic()
            self._line.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """0 while its pictures are being made, k >= 1 when k - 1 requests wait ahead of it."""
        with self._cond:
            if job.state == "running" or job not in self._line:
                return 0
            return 1 + self._line.index(job)

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job's waiting tasks; a running batch drops its rows."""
        with self._cond:
            job.cancelled = True
            self._drop_waiting(job)
            if job.active and job.scheduled == job.finished:
                job.state = "cancelled"
                job.future.cancel()
            self._forget(job)

    def interrupt(self, job: Job | None = None) -> None:
        """Stop one job (or, with None, the running batch): it hands back what it has made."""
        with self._cond:
            if job is None:
                if self.running is not None:
                    self.running.stop_all = True
                    for s in self.running.slices:
                        s.job.interrupted = True
                        self._drop_waiting(s.job)
                return
            job.interrupted = True
            self._drop_waiting(job)
            if job.scheduled == job.finished:  # nothing of it is running: answer at once
                job.resolve(interrupted=True)
                self._forget(job)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {"queue_size": len(self._line), "queued_images": self._waiting(),
                    "running_images": self.running.size if self.running else 0,
                    "images_per_second": round(self._rate, 4)}

    def eta(self, job: Job) -> float:
        """Seconds until `job` is done, from the recent rate of pictures per second."""
        with self._cond:
            if self._rate <= 0:
                return 0.0
            ahead = sum(j.remaining for j in self._line[: self._line.index(job)]) if job in self._line else 0
            running = self.running.size * (1 - self._batch_progress()) if self.running else 0
            mine = len(job.tasks) - job.finished
            return (ahead + running + mine) / self._rate

    def close(self) -> None:
        """Refuse new jobs and fail the waiting ones; wake the worker so it can stop."""
        with self._cond:
            self._closed = True
            for job in list(self._line):
                job.fail(RuntimeError("the server shut down before this request ran"))
            self._line.clear()
            self._cond.notify_all()

    # -- the worker side -----------------------------------------------------------------------

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The head job's next tasks plus compatible jobs' tasks, up to max_batch; None on timeout
        or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._line or self._closed, timeout) or self._closed:
                return None
            while self._line and not self._closed:  # a batch that is not full waits a little for company
                head = self._line[0]
                wait = head.created + self._wait_budget() - time.monotonic()
                if wait <= 0 or self._compatible(head.key) >= self.max_batch:
                    break
                self._cond.wait(wait)
            if not self._line or self._closed:
                return None
            key = self._line[0].key
            room = self.max_batch if key.mode != "load" else 1
            slices = []
            for job in list(self._line):
                if room == 0:
                    break
                if job.key != key:
                    continue
                take = min(room, job.remaining) if key.mode != "load" else 0
                slices.append(Slice(job, job.scheduled, job.scheduled + take))
                job.scheduled += take
                room -= max(take, 1 if key.mode == "load" else 0)
                job.state = "running"
                job.step = 0
                job.started = job.started or time.monotonic()
                if job.remaining == 0:
                    self._line.remove(job)
            self.running = Batch(key, slices)
            return self.running

    def finish(self, batch: Batch, seconds: float) -> None:
        """The worker is done with `batch` (its jobs already got their pictures)."""
        with self._cond:
            if batch.size and seconds > 0:
                rate = batch.size / seconds
                self._rate = rate if self._rate == 0 else 0.7 * self._rate + 0.3 * rate
                self._batch_seconds = seconds if self._batch_seconds == 0 else 0.7 * self._batch_seconds + 0.3 * seconds
            for s in batch.slices:
                if not s.job.active:
                    self._drop_waiting(s.job)
                    self._forget(s.job)
                elif s.job.remaining:
                    s.job.state = "queued"
            self.running = None

    # -- helpers (lock held) ---------------------------------------------------------------------

    def _waiting(self) -> int:
        return sum(j.remaining for j in self._line)

    def _wait_budget(self) -> float:
        return self.batch_wait if self.batch_wait is not None else AUTO_WAIT * self._batch_seconds

    def _compatible(self, key: BatchKey) -> int:
        return sum(j.remaining for j in self._line if j.key == key) if key.mode != "load" else self.max_batch

    def _drop_waiting(self, job: Job) -> None:
        if job in self._line:
            self._line.remove(job)
            job.tasks = job.tasks[: job.scheduled]
            job.results = job.results[: job.scheduled]

    def _forget(self, job: Job) -> None:
        if not job.active or job.cancelled:
            self._jobs.pop(job.id, None)

    def _batch_progress(self) -> float:
        b = self.running
        return b.slices[0].job.step / max(b.key.sampling_steps, 1) if b and b.slices else 0.0

    def _retry_after(self, excess: int) -> int:
        """Seconds until `excess` more pictures have left the line, at the recent rate."""
        if self._rate <= 0:
            return 5
        return max(1, min(600, math.ceil(excess / self._rate)))
