"""What every workload starts from: the pristine model (random weights, or a loaded file), the device, the speed switches."""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import Config
from ..pipeline import LDMPipeline
from ..speed import optimize_unet, optimize_vae, speed_config
from .measure import synchronize, time_calls
from .options import BenchOptions, Row


def randomize_weights_(module: nn.Module, seed: int) -> None:
    """Draw every float tensor at unit activation scale: matrices and kernels N(0, 1/fan_in), norm
    weights 1 + N(0, 0.01), biases N(0, 0.01). Zero-initialised output layers become non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.state_dict().items():
            if not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


@dataclass
class Setup:
    """Everything the workloads share: the pristine CPU model every workload copies its networks from."""

    options: BenchOptions
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    speed: Any  # ldm.speed.SpeedConfig, or None when no switch is set
    peak: float | None
    pristine: LDMPipeline  # fp32, on the CPU: random weights, or the benchmarked model file's
    log: Callable[[str], None]

    @property
    def factor(self) -> int:
        return self.pristine.vae.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.cfg.model.unet.in_channels

    def fresh(self, module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """A copy of a pristine network on the device, in `dtype` (the benchmark dtype by default)."""
        return copy.deepcopy(module).to(self.device, dtype or self.dtype).eval()

    def randn(self, *shape: int, dtype: torch.dtype | None = None, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.options.seed + seed)
        return torch.randn(shape, generator=g).to(self.device, dtype or self.dtype)

    def row(self, workload: str, impl: str, shape: str, unit: str, fn: Callable[[], Any], items: int,
            flops: int | None) -> Row:
        """Time `fn` (one call handles `items` iterations or images) into a row."""
        self.log(f"  {workload} {shape}: {impl}")
        for _ in range(self.options.warmup):
            fn()
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        median = statistics.median(time_calls(fn, self.device, self.options.repeats, warmup=0))
        seconds = median / 1e3
        tflops = flops / seconds / 1e12 if flops else None
        return Row(
            workload=workload, impl=impl, shape=shape, unit=unit, median_ms=median, rate=items / seconds,
            flops=flops, tflops_per_s=tflops, mfu=tflops / self.peak if tflops and self.peak else None,
            peak_mem_gib=torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
        )


def speed_config_of(switches: dict[str, Any]):
    """`ldm.speed.SpeedConfig` of the switches set, or None when none is (plain eager models)."""
    active = {k: v for k, v in switches.items() if v}
    return speed_config(**active) if active else None


def impl_name(base: str, switches: dict[str, Any]) -> str:
    parts = [k if v is True else f"{k}({v})" for k, v in switches.items() if v]
    return "+".join([base, *parts])


def check_resolution(resolution: int, factor: int, what: str) -> None:
    if resolution < factor or resolution % factor:
        lo, hi = max(factor, resolution - resolution % factor), resolution - resolution % factor + factor
        raise ValueError(f"{what} must be a multiple of the VAE factor {factor} (got {resolution}); try {lo} or {hi}")


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_compiler(speed: Any) -> None:
    """Compiled models are rebuilt per workload and shape (`dynamic=False` with a reset between shapes)."""
    if speed is not None and getattr(speed, "compile", None):
        torch._dynamo.reset()


def optimize_unet_or_none(unet: nn.Module, speed: Any) -> nn.Module:
    return unet if speed is None else optimize_unet(unet, speed)


def optimize_vae_or_none(vae: nn.Module, speed: Any) -> nn.Module:
    return vae if speed is None else optimize_vae(vae, speed)
