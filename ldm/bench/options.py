"""What a benchmark run measures and what it returns: `BenchOptions`, `Row`, `BenchResult`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

WORKLOADS = ("unet", "train", "vae", "generate", "data")
SPEED_SWITCHES = ("channels_last", "fuse_qkv", "fused_norm_act", "compile", "cuda_graphs")

# (resolution px, batch) of the training step by default: the shapes of the published SD 1.5 numbers
# on GPUs, one small shape elsewhere.
GPU_TRAIN_SHAPES = ((256, 64), (512, 16))
CPU_TRAIN_SHAPES = ((64, 4),)

CFG_SCALE = 7.5
CFG_TIMESTEP = 500.0
PROMPT = "a large red circle in the center on a white background"


@dataclass
class BenchOptions:
    """What to benchmark and how: the random weights of `config`, or the model file `ckpt` (any
    format `LDMPipeline.load` reads). `speed` holds `ldm.speed.SpeedConfig` switches (only the ones set)."""

    config: str | Path | None = None
    ckpt: str | Path | None = None
    overrides: Sequence[str] = ()
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bf16 on CUDA, fp32 elsewhere
    resolution: int = 512  # image side for unet, vae and generate
    train_shapes: Sequence[tuple[int, int]] | None = None  # (resolution, batch); None: the device's default
    generate_steps: Sequence[int] = (30, 50)
    repeats: int = 20
    warmup: int = 3
    workloads: Sequence[str] = WORKLOADS
    speed: dict[str, Any] = field(default_factory=dict)
    vs_diffusers: bool = False
    peak_tflops: float | None = None  # overrides the per-device lookup (needed for MFU on CPUs)
    data_workers: int = 4
    seed: int = 0
    profile: bool = False  # also profile one CFG U-Net step (ours, and diffusers' with vs_diffusers)

    def validate(self) -> None:
        if (self.config is None) == (self.ckpt is None):
            raise ValueError("benchmark either a config (random weights) or a model file (ckpt), not "
                             f"{'both' if self.config else 'neither'}")
        if self.ckpt is not None and self.overrides:
            raise ValueError("config overrides apply to a config (random weights); a model file carries its config")
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown or not self.workloads:
            raise ValueError(f"unknown workloads {unknown or '(none given)'}; choose from {', '.join(WORKLOADS)}")
        bad = [k for k in self.speed if k not in SPEED_SWITCHES]
        if bad:
            raise ValueError(f"unknown speed switches {bad}; choose from {', '.join(SPEED_SWITCHES)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {self.repeats}, {self.warmup})")
        if not self.generate_steps or any(s < 1 for s in self.generate_steps):
            raise ValueError(f"generate steps must be integers >= 1 (got {list(self.generate_steps)})")
        if self.train_shapes is not None and any(r < 1 or b < 1 for r, b in self.train_shapes):
            raise ValueError(f"training resolutions and batches must be >= 1 (got {list(self.train_shapes)})")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak TFLOP/s must be > 0 (got {self.peak_tflops})")
        if self.data_workers < 0:
            raise ValueError(f"data workers must be >= 0 (got {self.data_workers})")


@dataclass
class Row:
    """One measured line of the table. Times in ms; `rate` in `unit` (it/s or img/s); FLOPs per call."""

    workload: str
    impl: str  # "ldm", "ldm+channels_last", "diffusers", "diffusers+compile(...)"
    shape: str
    unit: str
    median_ms: float
    rate: float
    flops: int | None = None
    tflops_per_s: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    max_rel_err: float | None = None  # diffusers rows: against our output on the same weights and inputs
    ldm_speedup: float | None = None  # diffusers rows: their median time / ours (> 1: ours is faster)
    error: str | None = None  # a row that failed: why (its numbers are NaN); the other rows still count

    @classmethod
    def failed(cls, workload: str, impl: str, error: BaseException, shape: str = "") -> Row:
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        return cls(workload=workload, impl=impl, shape=shape, unit="", median_ms=math.nan, rate=math.nan,
                   error=reason.rstrip(": "))


@dataclass
class BenchResult:
    """The rows and what they were measured on."""

    config: str
    device: str
    dtype: str
    resolution: int
    speed: dict[str, Any]
    peak_tflops: float | None
    versions: dict[str, str]
    rows: list[Row]
    profile: dict[str, Any] | None = None  # `ldm.bench.profile.profile_unet`'s, when asked for

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.error is not None]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
