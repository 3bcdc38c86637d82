"""Fully sharded data parallel training: whether a run shards, how a module is sharded, and how
whole state dicts are gathered from the shards (to save, sample and export) and cut back into
shards (to resume).

A run launched with FSDP (`accelerate launch --use_fsdp`, an accelerate config with
`distributed_type: FSDP`, or ACCELERATE_USE_FSDP=true under torchrun) shards the stage-2 U-Net
(and a trained text encoder) with torch's FSDP2 `fully_shard`: each U-Net block (and each text
transformer layer) is one unit, gathered for its forward and backward and released after. The
trainer shards the modules itself rather than through `Accelerator.prepare`, so one code path
runs on GPUs (NCCL) and on CPUs (gloo), where accelerate does not apply FSDP.

Parameters, gradients, Adam moments and the EMA are all sharded: each of N ranks holds 1/N of
them. Training states and exports hold whole tensors, gathered to rank 0 in the same layout as
a DDP run's, so a state saved with FSDP resumes with DDP and the other way round.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

FSDP_ENV = "ACCELERATE_USE_FSDP"  # what `accelerate launch --use_fsdp` and FSDP configs set


def fsdp_requested() -> bool:
    """Whether this process was launched for FSDP."""
    return os.environ.get(FSDP_ENV, "false").lower() == "true"


@contextmanager
def without_accelerate_fsdp() -> Iterator[None]:
    """Hide the FSDP request from accelerate while its state is built: it then sets up plain
    multi-process training (process group, devices, gradient accumulation) and the trainer
    shards its modules itself. (Accelerate 1.x applies FSDP only on GPU-like devices, and its
    FSDP2 path takes one model per `prepare`.)"""
    value = os.environ.pop(FSDP_ENV, None)
    try:
        yield
    finally:
        if value is not None:
            os.environ[FSDP_ENV] = value


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The submodules sharded as units of their own, innermost first: every `UNetBlock` and every
    element of an `nn.ModuleList` that is not inside another unit. What is left (the U-Net's
    time embedding and output layer, the text embeddings) is the root's unit."""
    from ..models.unet import UNetBlock

    units: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, UNetBlock) or isinstance(m, nn.ModuleList):
                if any(p.requires_grad for p in child.parameters()):
                    units.append(child)
                    continue
            visit(child)

    visit(module)
    return units


def reshard_after_forward() -> bool:
    """Accelerate's `fsdp_reshard_after_forward` (true/false, or FSDP1's sharding strategy): whether
    a unit's gathered weights are freed after its forward (gathered again for the backward)."""
    value = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower()
    return value in ("true", "1", "full_shard", "hybrid_shard")


def check_settings(mixed_precision: str) -> None:
    """Refuse the FSDP settings the trainers do not implement, naming the fix."""
    if mixed_precision not in ("no", "bf16"):
        raise ValueError(f"train.mixed_precision={mixed_precision} with FSDP: use bf16 (it needs no loss scaling, "
                         "which sharded fp16 gradients would) or no")
    if os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true":
        raise ValueError("FSDP parameter offload to the CPU is not supported by the trainers: launch without "
                         "--fsdp_offload_params (or set fsdp_offload_params: false in the accelerate config)")


def shard(module: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """Shard `module` in place over all ranks (FSDP2) on `device`; with bf16, its forward runs
    under autocast, as accelerate runs a DDP model's. Returns the module (now an FSDPModule).
    The settings passed `check_settings` before anything was built."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    module.to(device, memory_format=torch.contiguous_format)  # FSDP shards contiguous tensors only
    reshard = reshard_after_forward()
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    if mixed_precision == "bf16":
        module.forward = torch.autocast(device.type, dtype=torch.bfloat16)(module.forward)
    return module


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather(obj: Any, main: bool) -> Any:
    """`obj` (a nest of dicts, lists and tuples holding tensors) with every sharded tensor made
    whole, on the CPU, on the main rank; None on the others. Every rank must call it, with nests
    of the same structure (the gathers are collective, one tensor at a time)."""

    def whole(x: Any) -> Any:
        if is_sharded(x):
            full = x.full_tensor()
            return full.cpu() if main else None
        if isinstance(x, dict):
            return {k: whole(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(whole(v) for v in x)
        return x

    result = whole(obj)
    return result if main else None


def scatter_like(full: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full` (whole tensors, the same on every rank) cut into the shards of `like`'s tensors of the
    same names, keeping `full`'s dtypes; entries whose `like` is not sharded stay whole."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name, value in full.items():
        ref = like.get(name)
        if is_sharded(ref):
            value = distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
        out[name] = value
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load an optimizer state of whole tensors (as saved by a DDP run or by `gather`) into an
    optimizer over sharded parameters: each moment is cut into its parameter's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, entries in state["state"].items():
        param = params[index] if isinstance(index, int) and index < len(params) else None
        if param is None or not is_sharded(param):
            per_param[index] = entries
            continue
        like = {k: param for k, v in entries.items() if torch.is_tensor(v) and v.shape == param.shape}
        per_param[index] = {**entries, **scatter_like({k: entries[k] for k in like}, like)}
    optimizer.load_state_dict({**state, "state": per_param})
