"""Running a benchmark and reporting it: `run_bench` measures every workload asked for, `format_table` prints it."""

from __future__ import annotations

from typing import Callable

import torch

from ..config import load_config, resolve_config
from ..devices import parse_dtype, pick_device
from ..pipeline import LDMPipeline
from .measure import peak_tflops_for
from .options import WORKLOADS, BenchOptions, BenchResult, Row
from .profile import profile_unet
from .setup import (
    Setup,
    check_resolution,
    free_memory,
    impl_name,
    randomize_weights_,
    reset_compiler,
    speed_config_of,
)
from .vs_diffusers import Diffusers, require_diffusers
from .workloads import WORKLOAD_RUNNERS


def run_bench(options: BenchOptions, log: Callable[[str], None] | None = None,
              on_row: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """Build the config's model with random weights (or load the model file) and measure each
    workload; `log` gets progress lines, `on_row` the result so far after each row (to save it as
    it grows). A workload that fails (ours or diffusers') becomes a row with its `error`, and the
    others still run."""
    options.validate()
    log = log or (lambda line: None)
    if options.ckpt is not None:
        log(f"loading {options.ckpt}")
        pristine = LDMPipeline.load(options.ckpt, device="cpu", dtype=torch.float32)
        path, cfg = options.ckpt, pristine.config
    else:
        path = resolve_config(options.config)
        cfg = load_config(path, options.overrides)
    factor = cfg.model.vae.downsample_factor
    check_resolution(options.resolution, factor, "resolution")
    for resolution, _ in options.train_shapes or ():
        check_resolution(resolution, factor, "training resolution")
    device = pick_device(options.device)
    dtype = parse_dtype(options.dtype) if options.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    speed = speed_config_of(options.speed)
    if options.vs_diffusers:
        require_diffusers()  # before minutes of building and timing
    if options.ckpt is None:
        log(f"building {path} with random weights")
        pristine = LDMPipeline.from_config(cfg, seed=options.seed)
        randomize_weights_(pristine.unet, options.seed)
        randomize_weights_(pristine.vae, options.seed + 1)
    peak = options.peak_tflops or peak_tflops_for(device, dtype)
    if peak is None and device.type == "cuda":
        log(f"no peak TFLOP/s known for {torch.cuda.get_device_name(device)}; MFU is n/a (pass a peak to get it)")
    s = Setup(options, cfg, device, dtype, speed, peak, pristine, log)
    theirs = Diffusers(s) if options.vs_diffusers else None
    result = BenchResult(
        config=str(path), device=_device_name(device), dtype=str(dtype).removeprefix("torch."),
        resolution=options.resolution, speed={k: v for k, v in options.speed.items() if v}, peak_tflops=peak,
        versions=_versions(options.vs_diffusers), rows=[],
    )

    def emit(row: Row) -> None:
        result.rows.append(row)
        if on_row is not None:
            on_row(result)

    for name in WORKLOADS:
        if name not in options.workloads:
            continue
        log(f"{name}:")
        try:
            WORKLOAD_RUNNERS[name](s, theirs, emit)
        except Exception as e:  # noqa: BLE001 - a failed workload is a row; the next one still runs
            log(f"  {name} failed: {type(e).__name__}: {e}")
            emit(Row.failed(name, impl_name("ldm", options.speed), e))
            free_memory(device)
            reset_compiler(speed)
    if options.profile:
        log("profile:")
        try:
            result.profile = profile_unet(s, theirs)
        except Exception as e:  # noqa: BLE001 - the measured rows stand without it
            log(f"  profile failed: {type(e).__name__}: {e}")
            result.profile = {"error": f"{type(e).__name__}: {e}"}
        if on_row is not None:
            on_row(result)
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def _versions(with_diffusers: bool) -> dict[str, str]:
    versions = {"torch": torch.__version__}
    if with_diffusers:
        versions["diffusers"] = require_diffusers().__version__
    return versions


def _si(value: float, unit: str) -> str:
    """3 significant digits with an SI prefix: 1.61e12 -> "1.61 T" + unit."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _duration(ms: float) -> str:
    return f"{ms / 1e3:.3g} s" if ms >= 1e3 else f"{ms:.3g} ms"


def format_table(result: BenchResult) -> str:
    """The rows as an aligned text table, with a heading naming the model, device and dtype."""
    header = ("workload", "impl", "shape", "median", "rate", "FLOP", "FLOP/s", "MFU", "peak mem", "rel err",
              "ldm speedup")
    lines = [tuple(header)]
    first = {}
    for r in result.rows:  # each workload's rows together (diffusers' come after all of ours)
        first.setdefault(r.workload, len(first))
    for r in sorted(result.rows, key=lambda r: first[r.workload]):
        if r.error is not None:
            lines.append((r.workload, r.impl, r.shape, "failed", *[""] * (len(header) - 4)))
            continue
        lines.append((
            r.workload, r.impl, r.shape, _duration(r.median_ms), f"{r.rate:.4g} {r.unit}" if r.rate < 1e4
            else f"{r.rate:.0f} {r.unit}",
            _si(r.flops, "") if r.flops else "n/a",
            _si(r.tflops_per_s * 1e12, "") if r.tflops_per_s else "n/a",
            f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a",
            f"{r.peak_mem_gib:.2f} GiB" if r.peak_mem_gib is not None else "n/a",
            f"{r.max_rel_err:.2g}" if r.max_rel_err is not None else "",
            f"{r.ldm_speedup:.2f}x" if r.ldm_speedup is not None else "",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    left = 3  # workload, impl and shape read left-aligned; numbers right-aligned
    text = [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    peak = f"{result.peak_tflops:g} TFLOP/s peak" if result.peak_tflops else "no peak known: MFU n/a"
    speed = ", ".join(f"{k}={v}" for k, v in result.speed.items()) or "none"
    title = (f"{result.config} on {result.device}, {result.dtype}, {result.resolution} px; speed switches: {speed}; "
             f"{peak}; " + ", ".join(f"{k} {v}" for k, v in result.versions.items()))
    failures = [f"failed: {r.workload} {r.impl}{' ' + r.shape if r.shape else ''}: {r.error}" for r in result.failures]
    return "\n".join([title, *text, *failures])
