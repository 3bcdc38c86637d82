"""The one training loop both stages run (`Trainer.train`), and what it is built from:
accelerator, optimizer, LR schedule, per-step randomness, interrupt handling, bad-loss guard,
and the training state's place on disk. Each trainer supplies its own step.

Randomness is stateless: the noise, timesteps and caption dropout of step s on rank r come from
a generator seeded with (seed, s, r); the built-in data of step s is a pure function of s, and
file data resumes from the loader position saved with the state. So a run resumed from the
state saved at step k replays steps k+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import check_free_space, disk_error, format_bytes
from ..config import Config, to_dict
from ..data.batches import Batches, check_data, describe, training_batches
from ..errors import NonFiniteError
from .checkpoint import list_states, load_training_state, save_training_state
from .folder import RunFolder
from .optim import optimizer_kind
from .accelerator import make_accelerator
from .fsdp import check_settings, fsdp_requested, gather, load_optimizer_state


def step_generator(seed: int, step: int, rank: int, stream: int = 0) -> torch.Generator:
    """The generator for everything random in one step on one rank (and one stream of it)."""
    # Distinct 64-bit seeds per (seed, step, rank, stream), fixed across runs and machines.
    mixed = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def caption_keep_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: which captions survive dropout with probability p (classifier-free guidance training).
    Always draws n numbers, so the rest of the step's randomness does not depend on p."""
    return torch.rand(n, generator=generator) >= p


class Interrupt:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps (second Ctrl-C: exit now)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt received: saving a training state at the end of this step (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Throughput:
    """Images per second over a sliding window of steps."""

    window: int = 20
    _marks: list[tuple[float, int]] = field(default_factory=list)

    def update(self, images: int) -> float:
        now = time.perf_counter()
        total = (self._marks[-1][1] if self._marks else 0) + images
        self._marks.append((now, total))
        self._marks = self._marks[-self.window :]
        (t0, n0), (t1, n1) = self._marks[0], self._marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nest of dicts, lists and tuples (a state dict, an optimizer state)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class BadLossGuard:
    """Counts non-finite losses: the step is skipped; too many in a row stops training clearly."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """True if the loss is finite (go ahead); False to skip this step. Raises when persistent."""
        if torch.isfinite(loss).all():
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            raise NonFiniteError(
                f"loss was NaN/Inf for {self.consecutive} steps in a row (last at step {step}); "
                "lower train.lr, raise train.warmup_steps, use bf16 instead of fp16, or check the data"
            )
        return False


class Trainer(ABC):
    """One stage's run: the output directory, the accelerator, resume, the data stream and the loop.

    The output directory is taken as `ldm.train.folder` says (a lock; a folder holding another
    run is refused unless `overwrite` moves it aside; `resume` continues the newest state and refuses
    one whose config differs in anything that changes the result, unless `resume_with_changes`).

    A subclass builds its models and optimizers in `__init__` (after `super().__init__`, between
    `resume_state()` and `accelerator.prepare`), and provides:
      NAME, EXPORT_NAME           tracker and progress-bar name, export file name;
      STATE_PARTS, STATE_OBJECTS  the weight files and trainer entries its states hold;
      OPTIMIZERS                  the attribute names of its optimizers (for the disk-space estimate);
      NO_FSDP                     why it trains with DDP replicas under an FSDP launch, or "" if it
                                  shards its trained modules then (`self.fsdp`; see ldm.train.fsdp);
      train_step(step, data)      one optimizer step (see `accumulate`) -> (logs, bar postfix);
      state_parts()               (weights by name, trainer objects) for the training state;
      sample_grid(), export()     periodic samples, and the final model file.
    """

    NAME = "model"
    EXPORT_NAME = "model.safetensors"
    STATE_PARTS: tuple[str, ...] = ()
    STATE_OBJECTS: tuple[str, ...] = ("optimizer", "scheduler")
    OPTIMIZERS: tuple[str, ...] = ("optimizer",)
    NO_FSDP = "this trainer does not shard its modules"

    def __init__(self, cfg: Config, *, resume: bool = False, images: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False):
        """`images`: the stage trains on pixels, so cached latents are not data for it. `resume`:
        continue the run in train.output_dir (an error when it has no state); `overwrite`: start a new
        run even where another one is, moving that one aside; `resume_with_changes`: resume a state
        whose config differs in result-changing settings (the differences are printed)."""
        check_data(cfg.data, images=images)  # bad data fails before anything is built
        self.cfg = cfg
        t = cfg.train
        self.out = Path(t.output_dir)
        self.accelerator = make_accelerator(t, str(self.out))
        self.step = 0
        self.images_per_s = 0.0  # over the last steps trained (the progress bar's img_s)
        self.bad = BadLossGuard(t.max_bad_steps)
        self.data: Batches | None = None
        self._position: dict | None = None  # the data position of the state resumed from
        acc = self.accelerator
        self.fsdp = fsdp_requested() and acc.num_processes > 1 and not self.NO_FSDP
        if fsdp_requested() and not self.fsdp:
            why = f"{self.NO_FSDP}: training with DDP" if acc.num_processes > 1 else "one process has nothing to shard"
            acc.print(f"{self.NAME}: launched with FSDP, but {why}")
        if self.fsdp:
            check_settings(acc.mixed_precision)
        self.folder = RunFolder(self.out, self.NAME, self.EXPORT_NAME, main=acc.is_main_process, log=acc.print)
        self.folder.open(resume=resume, overwrite=overwrite)  # rank 0 takes the folder; the others wait
        acc.wait_for_everyone()
        self._state = self.folder.state() if resume else None
        self._resume_with_changes = resume_with_changes
        acc.print(f"{self.NAME}: reads {describe(cfg.data)}")  # the first thing to check in a log
        if cfg.train.mixed_precision == "auto":
            acc.print(f"{self.NAME}: train.mixed_precision=auto -> {acc.mixed_precision} on this device")

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse to continue a state's Adam moments with another kind of optimizer (trainers that
        build their optimizer after `resume_state`, on sharded weights, call this then)."""
        saved = getattr(self, "_saved_optimizer", None)
        if saved is None or optimizer_kind(optimizer) == saved:
            return
        self.folder.release()
        raise ValueError(f"{self._state} was trained with {saved} and this run would continue with "
                         f"{optimizer_kind(optimizer)}, whose moments differ: resume where bitsandbytes and a "
                         f"GPU are {'present' if saved == 'adamw8bit' else 'absent'} as they were, or set "
                         f"train.optimizer={saved}")

    def resume_state(self, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict] | None:
        """(weights, trainer objects) of the state to resume from, or None for a fresh run; sets
        the step, the bad-step count and the data position. A subclass calls it once its config is
        final (stage 2 takes the VAE's from the VAE file), so the comparison with the state's sees it,
        and with its `optimizer`, whose kind must be the one the state's moments belong to."""
        if self._state is None:
            return None
        try:
            self.folder.check_resume(self._state, self.cfg, allow_changes=self._resume_with_changes)
            weights, trainer, meta = load_training_state(self._state, self.STATE_PARTS, self.STATE_OBJECTS)
            self._saved_optimizer = meta.get("optimizer", "adamw")
            if optimizer is not None:
                self.check_optimizer(optimizer)
        except BaseException:
            self.folder.release()
            raise
        self.step = meta["step"]
        self.bad.total = meta.get("bad_steps", 0)
        self._position = meta.get("data_position")
        return weights, trainer

    def resumed(self) -> None:
        if self._state is not None:
            self.accelerator.print(f"resumed from {self._state} at step {self.step}")

    def batches(self) -> Batches:
        """Micro-batches from the current step (and the resumed data position) on."""
        t, acc = self.cfg.train, self.accelerator
        return training_batches(self.cfg.data, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed,
                                rank=acc.process_index, world=acc.num_processes, start_step=self.step,
                                position=self._position)

    def accumulate(
        self, step: int, data: Iterable[dict], models: list[nn.Module],
        losses: Callable[[dict, int, int], tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]],
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The micro-batches of optimizer step `step`: `losses(batch, step, micro)` gives losses
        (None: not this time) and logs; each loss is backpropagated in turn. Returns each loss's
        mean over micro-batches and ranks, and the logs' means over micro-batches."""
        t, acc = self.cfg.train, self.accelerator
        totals: list[torch.Tensor] = []
        logs: dict[str, float] = {}
        for micro in range(t.grad_accum):
            batch = next(data)
            with acc.accumulate(*models):
                parts, micro_logs = losses(batch, step, micro)
                totals = totals or [torch.zeros((), device=acc.device) for _ in parts]
                for i, loss in enumerate(parts):
                    if loss is not None:
                        acc.backward(loss)  # accelerate divides by grad_accum
                        totals[i] += loss.detach() / t.grad_accum
            for k, v in micro_logs.items():
                logs[k] = logs.get(k, 0.0) + v.item() / t.grad_accum
        return [acc.reduce(total, reduction="mean") for total in totals], logs

    @abstractmethod
    def train_step(self, step: int, data: Batches) -> tuple[dict[str, float], dict[str, str]]:
        """One optimizer step (micro-batches through `accumulate`) -> (logs, progress-bar postfix)."""

    def train(self, until: int | None = None) -> Path:
        """Run to `train.steps` and export (the export's path is returned). With `until`, stop after
        that step with a saved state, as an interrupt would (a later run resumes from it). The
        output folder is given up at the end, however the run ends."""
        self.folder.hold()
        try:
            return self._train(until)
        finally:
            self.folder.release()

    def _train(self, until: int | None) -> Path:
        cfg, acc = self.cfg, self.accelerator
        t = cfg.train
        if acc.is_main_process:
            self.check_disk_space()
            acc.init_trackers(self.NAME, config={"config": json.dumps(to_dict(cfg))})
        if self.data is None:
            self.data = self.batches()
        images_per_step = t.batch_size * t.grad_accum * acc.num_processes
        speed = Throughput()
        bar = tqdm(total=t.steps, initial=self.step, desc=self.NAME, disable=not acc.is_main_process,
                   dynamic_ncols=True)
        self.train_mode()
        with Interrupt() as interrupt:
            stop = t.steps if until is None else min(until, t.steps)
            while self.step < stop and not interrupt.requested:
                logs, postfix = self.train_step(self.step, self.data)
                self.scheduler.step()
                self.step += 1
                rate = self.images_per_s = speed.update(images_per_step)
                if acc.is_main_process:
                    bar.update(1)
                    bar.set_postfix({**postfix, "img_s": f"{rate:.1f}"}, refresh=False)
                self.after_step({**logs, "images_per_s": rate})
        return self.finish(bar)

    @abstractmethod
    def train_mode(self) -> None:
        """Put the trained modules in training mode."""

    def after_step(self, logs: dict[str, float]) -> None:
        """Call after `self.step` advanced: logs every log_every, samples every sample_every,
        saves a state every save_every."""
        t, acc = self.cfg.train, self.accelerator
        if self.step % t.log_every == 0:
            acc.log({**logs, "lr": self.scheduler.get_last_lr()[0], "bad_steps": self.bad.total}, step=self.step)
        if t.sample_every and self.step % t.sample_every == 0:
            self.sample_grid()
        if self.step % t.save_every == 0:
            self.save_state()

    @abstractmethod
    def state_parts(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """(weights by name, optimizer/scheduler/EMA states) for the training state."""

    @abstractmethod
    def sample_grid(self) -> Path | None:
        """Write a grid of samples (or reconstructions) for the current step; rank 0 only."""

    @abstractmethod
    def export(self) -> Path:
        """Write the final model file and return its path."""

    def whole(self, parts: Callable[[], Any]) -> Any:
        """`parts()` (a nest of state dicts) with whole tensors on the main rank, None on the others.
        Every rank calls it: under FSDP the shards are gathered; else only the main rank computes."""
        acc = self.accelerator
        if self.fsdp:
            return gather(parts(), acc.is_main_process)
        return parts() if acc.is_main_process else None

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a saved optimizer state (whole tensors), cut into shards under FSDP."""
        if self.fsdp:
            load_optimizer_state(optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def state_bytes(self) -> int:
        """About how many bytes one training state takes on disk: its tensors, plus the two Adam
        moments of every parameter whose optimizer has not stepped yet."""
        weights, trainer = self.state_parts()
        moments = 0
        for name in self.OPTIMIZERS:
            optimizer = getattr(self, name)
            moments += sum(2 * p.numel() * 4 for group in optimizer.param_groups for p in group["params"]
                           if p not in optimizer.state)
        return tensor_bytes(weights) + tensor_bytes(trainer) + moments

    def export_bytes(self) -> int:
        """About how many bytes the exported model file takes (the trained weights)."""
        return tensor_bytes(self.state_parts()[0])

    def check_disk_space(self) -> None:
        """Before the first step: room for the states still to come (`keep_states`, plus the one
        being written before the oldest is removed) and the export."""
        t = self.cfg.train
        states, size = max(0, t.keep_states + 1 - len(list_states(self.out))), self.state_bytes()
        check_free_space(self.out, states * size + self.export_bytes(),
                         f"this run ({states} training states of {format_bytes(size)} with train.keep_states="
                         f"{t.keep_states}, and the export)")

    def _resume_advice(self) -> str:
        states = list_states(self.out)
        kept = f"{states[-1].name} is intact" if states else "no state was written yet"
        return f"{kept}; free space (or lower train.keep_states), then run the same command with --resume"

    def save_state(self) -> None:
        """Write the training state of the current step (rank 0), with the data position. A disk
        that cannot take it stops the run with an error that says why, before anything is written
        when the free space is known to be short; the previous state stays intact either way."""
        acc = self.accelerator
        acc.wait_for_everyone()
        parts = self.whole(self.state_parts)
        if not acc.is_main_process:
            return
        weights, trainer = parts
        if self.data is not None:
            position = self.data.position(self.step)
        else:  # saved before reading any data: the resumed position still holds
            position = {**(self._position or {"source": self.cfg.data.source}), "step": self.step}
        meta = {"data_position": position, "bad_steps": self.bad.total, "trainer": self.NAME,
                "optimizer": optimizer_kind(self.optimizer)}
        what = f"the training state of step {self.step}"
        try:
            check_free_space(self.out, self.state_bytes(), what)
            save_training_state(self.out, self.step, weights, trainer, meta, json.dumps(to_dict(self.cfg), indent=2),
                                self.cfg.train.keep_states)
        except OSError as e:
            raise disk_error(e, what, self.out, self._resume_advice()) from e

    def write_export(self, what: str, write: Callable[[], Any]) -> None:
        """Run `write()` (which writes the export) with the free space checked first and a disk
        error turned into one that says why."""
        try:
            check_free_space(self.out, self.export_bytes(), what)
            write()
        except OSError as e:
            raise disk_error(e, what, self.out, "the training states are intact; free space, then run the same "
                             "command with --resume to export") from e

    def finish(self, bar) -> Path:
        """Save the final state; export when the run reached train.steps (else say how to resume)."""
        t, acc = self.cfg.train, self.accelerator
        bar.close()
        self.save_state()
        if self.step < t.steps:
            acc.print(f"stopped at step {self.step} of {t.steps}; continue with --resume")
            self.end_trackers()
            return self.out / self.EXPORT_NAME
        path = self.export()
        self.end_trackers()
        return path

    def end_trackers(self) -> None:
        """Close the loggers. Unlike `Accelerator.end_training`, this keeps the process group, which
        the next stage of a run (stage 2 after stage 1) trains in; it ends at exit."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
