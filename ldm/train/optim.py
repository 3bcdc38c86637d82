"""The optimizer and learning-rate schedule a training stage steps: AdamW (fused where it can be,
bitsandbytes' 8-bit AdamW on request), the warm-up + cosine/constant schedule."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..config import TrainConfig


def make_optimizer(
    params: list[nn.Parameter] | list[dict], cfg: TrainConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW as `cfg.optimizer` says: "adamw" is torch's, fused into one kernel when every parameter is
    on one CUDA or CPU device (on 2 CPU cores the fused step over sd_tiny's 11M parameters takes about
    a sixth of the foreach one's time); "adamw8bit" is bitsandbytes' 8-bit AdamW on CUDA, and torch's
    (with a warning saying why) where bitsandbytes is missing or the parameters are not on a GPU.

    `params`: parameters, or param groups (dicts with "params" and optionally their own "lr")."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    groups = [g for g in groups if g["params"]]
    devices = {p.device for g in groups for p in g["params"]}
    options = {"lr": cfg.lr if lr is None else lr, "betas": cfg.adam_betas, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw8bit":
        bnb, why = _bitsandbytes(devices)
        if bnb is not None:
            return bnb.optim.AdamW8bit(groups, **options)
        warnings.warn(f"train.optimizer=adamw8bit: {why}; training with torch's AdamW instead, whose moments take "
                      f"8 bytes per trained parameter instead of 2 (set train.optimizer=adamw to silence this)",
                      stacklevel=2)
    fused = len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, **options, fused=fused or None)


def _bitsandbytes(devices: set[torch.device]):
    """(the bitsandbytes module, "") where its 8-bit optimizers can run on `devices`, else (None, why not)."""
    if any(d.type != "cuda" for d in devices):
        return None, f"bitsandbytes' 8-bit optimizers need the parameters on a CUDA GPU (they are on {devices})"
    try:
        import bitsandbytes
    except ImportError:
        return None, "bitsandbytes is not installed (pip install bitsandbytes, or pip install ldm[train8bit])"
    return bitsandbytes, ""


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """"adamw8bit" or "adamw": which optimizer a training state's moments belong to."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    return "adamw8bit" if "8bit" in type(inner).__name__ else "adamw"


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
