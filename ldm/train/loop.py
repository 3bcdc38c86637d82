"""Pieces every trainer shares: accelerator, optimizer, LR schedule, per-step randomness,
deterministic batches of the built-in data, interrupt handling, and the step bookkeeping.

Randomness is stateless: the noise, timesteps and caption dropout of step s on rank r come from
a generator seeded with (seed, s, r), and the built-in data of step s is a pure function of s.
So a run resumed from the state saved at step k replays steps k+1.. exactly as an uninterrupted
run would, with no RNG state to save.
"""

from __future__ import annotations

import math
import signal
import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..config import DataConfig, TrainConfig


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles): where it does, bf16
    autocast (with channels_last) makes sd_tiny's training steps ~1.2x faster on CPU; where not, it
    can make them slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def make_accelerator(cfg: TrainConfig, project_dir: str):
    """An Accelerator for single or multi-process runs (launched with `accelerate launch`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None if cfg.log_with == "none" else cfg.log_with
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            log_with = None
    elif log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ImportError("train.log_with=wandb needs `pip install wandb` (or use tensorboard/none)") from e
    from accelerate.state import AcceleratorState

    # Accelerate keeps one precision per process, and a run's stages may differ (train_ldm.py trains
    # the VAE, then the LDM, in one process): a new precision resets that state, keeping the
    # process group.
    if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    if cfg.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warnings.warn(
            "train.mixed_precision=bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast may "
            "run slower than float32 here; set train.mixed_precision=no",
            stacklevel=2,
        )
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # lets `torchrun` start gloo multi-process runs on CPU-only machines
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs"),
    )


def make_optimizer(
    params: list[nn.Parameter] | list[dict], cfg: TrainConfig, lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW, fused into one kernel when every parameter is on one CUDA or CPU device (on 2 CPU
    cores the fused step over sd_tiny's 11M parameters takes about a sixth of the foreach one's time).

    `params`: parameters, or param groups (dicts with "params" and optionally their own "lr")."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    devices = {p.device for g in groups for p in g["params"]}
    fused = len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups, lr=cfg.lr if lr is None else lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused or None
    )


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 0 at `steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def step_generator(seed: int, step: int, rank: int, stream: int = 0) -> torch.Generator:
    """The generator for everything random in one step on one rank (and one stream of it)."""
    # Distinct 64-bit seeds per (seed, step, rank, stream), fixed across runs and machines.
    mixed = (seed * 1_000_003 + step) * 65_537 + rank * 257 + stream
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def shapes_batches(
    data: DataConfig, batch_size: int, start_step: int, micro_steps: int, rank: int, world: int, seed: int
) -> Iterator[dict]:
    """Micro-batches of the built-in dataset from optimizer step `start_step` on: micro-batch m of
    step s on rank r holds items ((s * micro_steps + m) * world + r) * batch_size + j."""
    from ..data.shapes import ShapesDataset

    dataset = ShapesDataset(resolution=data.resolution, length=2**62, seed=seed, max_objects=data.shapes_max_objects)
    index = start_step * micro_steps
    while True:
        base = (index * world + rank) * batch_size
        items = [dataset[base + j] for j in range(batch_size)]
        yield {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
        index += 1


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
            raise FloatingPointError(
                f"loss was NaN/Inf for {self.consecutive} steps in a row (last at step {step}); "
                "lower train.lr, raise train.warmup_steps, use bf16 instead of fp16, or check the data"
            )
        return False


class Trainer:
    """Bookkeeping both trainers share around their own step: periodic logs, sample grids and
    states, and the end of a run. Subclasses set cfg, accelerator, out, step, scheduler, bad and
    EXPORT_NAME, and provide sample_grid(), save_state() and export()."""

    EXPORT_NAME = "model.safetensors"

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

    def finish(self, bar) -> Path:
        """Save the final state; export when the run reached train.steps (else say how to resume)."""
        t, acc = self.cfg.train, self.accelerator
        bar.close()
        self.save_state()
        if self.step < t.steps:
            acc.print(f"stopped at step {self.step} of {t.steps}; continue with --resume")
            acc.end_training()
            return self.out / self.EXPORT_NAME
        path = self.export()
        acc.end_training()
        return path
