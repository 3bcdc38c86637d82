"""The Accelerator a training stage runs in: its mixed precision ("auto" resolved for this
device), trackers, the CPU (gloo) switch for multi-process runs without CUDA, and the process
group's end at exit."""

from __future__ import annotations

import atexit
import warnings

import torch

from ..config import TrainConfig
from .fsdp import without_accelerate_fsdp


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles): where it does, bf16
    autocast (with channels_last) makes sd_tiny's training steps ~1.2x faster on CPU; where not, it
    can make them slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_mixed_precision(setting: str) -> str:
    """`train.mixed_precision` as accelerate takes it: "auto" becomes "bf16" where this device
    computes bfloat16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and "no"
    elsewhere, where bf16 autocast would be emulated and run slower than float32."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


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
    precision = resolve_mixed_precision(cfg.mixed_precision)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    if cfg.mixed_precision == "bf16" and not torch.cuda.is_available() and not cpu_has_native_bf16():
        warnings.warn(
            "train.mixed_precision=bf16 on a CPU without native bfloat16 (AVX512-BF16 or AMX): autocast may "
            "run slower than float32 here; set train.mixed_precision=no (or auto)",
            stacklevel=2,
        )
    atexit.unregister(end_process_group)  # once, however many stages a process runs
    atexit.register(end_process_group)
    with without_accelerate_fsdp():  # an FSDP run's trainer shards its modules itself (ldm.train.fsdp)
        return Accelerator(
            cpu=not torch.cuda.is_available(),  # lets `torchrun` start gloo multi-process runs on CPU-only machines
            mixed_precision=precision,
            gradient_accumulation_steps=cfg.grad_accum,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=f"{project_dir}/logs"),
        )


def end_process_group() -> None:
    """At exit: end the process group that the run's stages trained in (see `Trainer.end_trackers`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
