"""Measuring: wall or CUDA time of repeated calls, FLOPs of one call, the device's peak, relative error."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.utils.flop_counter as flop_counter
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, TFLOP/s: (bf16 and fp16, tf32).
# The first name found in torch.cuda.get_device_name() wins, so the specific names come first.
# (The published SD 1.5 reference MFUs divide by ~790, the bf16 rate an H100 reaches in practice.)
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
)


def _cpu_flash_attention_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """SDPA's CPU flash kernel, which FlopCounterMode does not know: QK^T and AV, 4 * b * h * Lq * Lk * d."""
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                       out_shape=None, **kwargs) -> int:
    """Backward of SDPA's CPU flash kernel, counted as FlopCounterMode counts the GPU kernels' backward."""
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flop,
}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions and attention, forward and any backward it runs)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


def time_calls(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of each of `repeats` calls of `fn`, after `warmup` untimed calls.

    On CUDA each call sits between two recorded events and the time is the GPU's, read after the
    end event completes; elsewhere it is wall time."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops_for(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense tensor-core peak of a known GPU for `dtype` (fp32 runs on TF32 cores), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_TFLOPS:
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| / max |theirs|, in float32 (inf when either holds a non-finite value)."""
    a, b = ours.detach().float(), theirs.detach().float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
