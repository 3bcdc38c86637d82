"""Where a CFG U-Net step spends its time: `torch.profiler` over a few steps of ours and of diffusers'
on the same weights, as the top kernels (or CPU ops, without a GPU) by self time."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .options import CFG_TIMESTEP
from .setup import Setup, free_memory, optimize_unet_or_none, reset_compiler
from .vs_diffusers import Diffusers

PROFILED_STEPS = 5


def profile_unet(s: Setup, theirs: Diffusers | None, top: int = 15) -> dict[str, Any]:
    """{"steps": n, "ours": [kernels], "diffusers": [kernels]}, each kernel a dict of name, self time
    per step (ms), share of the step's device time and calls per step; the largest `top` first."""
    side = s.options.resolution // s.factor
    x = s.randn(2, s.latent_channels, side, side)
    t = torch.full((2,), CFG_TIMESTEP, device=s.device)
    context = s.randn(2, s.cfg.model.text_encoder.context_length, s.cfg.model.unet.context_dim, seed=1)
    out: dict[str, Any] = {"steps": PROFILED_STEPS, "shape": f"2x{s.latent_channels}x{side}x{side}"}
    with torch.inference_mode():
        reset_compiler(s.speed)
        ours = optimize_unet_or_none(s.fresh(s.pristine.unet), s.speed)
        out["ours"] = _top_kernels(lambda: ours(x, t, context), s, top)
        del ours
        free_memory(s.device)
        if theirs is not None:
            unet = theirs.unet(s)
            for impl, model in theirs.variants(lambda: unet):
                out[impl] = _top_kernels(_call(model, x, t, context), s, top)
            del unet
            free_memory(s.device)
    return out


def _call(model: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> Callable[[], Any]:
    return lambda: model(x, t, context).sample


def _top_kernels(fn: Callable[[], Any], s: Setup, top: int) -> list[dict[str, Any]]:
    cuda = s.device.type == "cuda"
    for _ in range(max(2, s.options.warmup)):
        fn()
    if cuda:
        torch.cuda.synchronize(s.device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_STEPS):
            fn()
        if cuda:
            torch.cuda.synchronize(s.device)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    if cuda:  # device kernels only: the ones with device time and no CPU-side op name of their own
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(self_time(e) for e in events) or 1.0
    ranked = sorted(events, key=self_time, reverse=True)[:top]
    return [{"name": e.key[:120], "ms_per_step": self_time(e) / 1e3 / PROFILED_STEPS,
             "share": self_time(e) / total, "calls_per_step": e.count / PROFILED_STEPS} for e in ranked]


def format_profile(profiles: dict[str, Any]) -> str:
    """The top kernels of each implementation, one block each."""
    lines = [f"profile of one CFG U-Net step ({profiles['shape']}), {profiles['steps']} steps averaged:"]
    for impl, kernels in profiles.items():
        if impl in ("steps", "shape"):
            continue
        lines.append(f"  {impl}: {sum(k['ms_per_step'] for k in kernels):.3g} ms in its top {len(kernels)}")
        for k in kernels:
            lines.append(f"    {k['ms_per_step']:9.3f} ms  {100 * k['share']:5.1f}%  x{k['calls_per_step']:<5g} {k['name']}")
    return "\n".join(lines)
