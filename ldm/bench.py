"""Benchmarks of the networks, the pipeline and the data loaders: time, throughput, FLOPs, MFU, memory.

Workloads (the names `BenchOptions.workloads` takes):

- `unet`: one classifier-free-guidance U-Net step, inference: batch 2 (cond + uncond) at the latent
  size of `resolution` (512 px -> 64x64 latents for the SD VAE).
- `train`: one U-Net training step per (resolution, batch): autocast in the benchmark dtype over fp32
  weights, AdamW (fused on CUDA), MSE loss on random targets, backward, optimizer step.
- `vae`: VAE decode of one image at `resolution`.
- `generate`: `LDMPipeline.generate` of one image with DDIM and CFG for each step count, text encoding
  and VAE decode included.
- `data`: the data loaders alone at each training shape: the built-in shapes batches the trainer
  draws, the image-shard loader (PNG decode, resize) and the latent-shard loader.

Each row is the median of `repeats` timed calls after `warmup` untimed ones (CUDA events around each
call on GPUs, `time.perf_counter` elsewhere). FLOPs are counted once per workload with
`torch.utils.flop_counter.FlopCounterMode` on the eager model (the speed switches change how the
arithmetic runs, not how much of it there is); TFLOP/s is FLOPs / median time, and MFU is that over
the device's dense peak for the dtype. Peak memory is `torch.cuda.max_memory_allocated` over the
timed calls, models included, each workload building its own models on an empty device.

Weights are random, every float tensor drawn at unit activation scale (the zero-initialised output
layers included), so outputs are not trivially zero and the comparison with diffusers
(`vs_diffusers`: the same architecture built in diffusers with the same weights through
`ldm.convert.diffusers`) checks real numbers before it times anything.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import Config, TrainConfig, load_config
from .errors import ConfigError
from .pipeline import LDMPipeline, parse_dtype

WORKLOADS = ("unet", "train", "vae", "generate", "data")
SPEED_SWITCHES = ("channels_last", "fuse_qkv", "fused_norm_act", "compile", "cuda_graphs")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# (resolution px, batch) of the training step by default: the shapes of the published SD 1.5 numbers
# on GPUs, one small shape elsewhere.
GPU_TRAIN_SHAPES = ((256, 64), (512, 16))
CPU_TRAIN_SHAPES = ((64, 4),)

# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, TFLOP/s: (bf16 and fp16, tf32).
# The first name found in torch.cuda.get_device_name() wins, so the specific names come first.
# (The published SD 1.5 reference MFUs divide by ~790, the bf16 rate an H100 reaches in practice.)
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
)

# Largest allowed max|ours - theirs| / max|theirs| between our networks and diffusers' on the same weights.
AGREEMENT_TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}

CFG_SCALE = 7.5
CFG_TIMESTEP = 500.0
PROMPT = "a large red circle in the center on a white background"


class MismatchError(RuntimeError):
    """Our network and the diffusers network with the same weights compute different outputs."""


@dataclass
class BenchOptions:
    """What to benchmark and how. `speed` holds `ldm.speed.SpeedConfig` switches (only the ones set)."""

    config: str | Path
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

    def validate(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Measuring: time, memory, FLOPs
# ---------------------------------------------------------------------------------------------


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
    _synchronize(device)
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


def _synchronize(device: torch.device) -> None:
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


# ---------------------------------------------------------------------------------------------
# Setup: config, device, models
# ---------------------------------------------------------------------------------------------


def resolve_config(name: str | Path) -> Path:
    """A config path, or the name of one in configs/ ("sd15" -> configs/sd15.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / str(name)):
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {str(name)!r} not found: pass a YAML path or one of the names in configs/ ({known})")


def _pick_device(name: str) -> torch.device:
    """The device a name asks for ("auto": CUDA when available); a ValueError when CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for CUDA but no CUDA device is available; use cpu")
    return device


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
class _Setup:
    """Everything the workloads share: the pristine CPU model every workload copies its networks from."""

    options: BenchOptions
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    speed: Any  # ldm.speed.SpeedConfig, or None when no switch is set
    peak: float | None
    pristine: LDMPipeline  # fp32, on the CPU, random weights
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
        _synchronize(self.device)
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


def _speed_config(switches: dict[str, Any]):
    """`ldm.speed.SpeedConfig` of the switches set, or None when none is (plain eager models)."""
    active = {k: v for k, v in switches.items() if v}
    if not active:
        return None
    try:
        from .speed import speed_config
    except ImportError as e:
        raise ImportError(f"speed switches {sorted(active)} need ldm.speed, which could not be imported ({e})") from e
    return speed_config(**active)


def _impl_name(base: str, switches: dict[str, Any]) -> str:
    parts = [k if v is True else f"{k}({v})" for k, v in switches.items() if v]
    return "+".join([base, *parts])


def _check_resolution(resolution: int, factor: int, what: str) -> None:
    if resolution < factor or resolution % factor:
        lo, hi = max(factor, resolution - resolution % factor), resolution - resolution % factor + factor
        raise ValueError(f"{what} must be a multiple of the VAE factor {factor} (got {resolution}); try {lo} or {hi}")


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reset_compiler(speed: Any) -> None:
    """Compiled models are rebuilt per workload and shape (`dynamic=False` with a reset between shapes)."""
    if speed is not None and getattr(speed, "compile", None):
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------


def _bench_unet(s: _Setup, theirs: _Diffusers | None) -> list[Row]:
    """One CFG step: the U-Net on batch 2 (cond + uncond) at the latent size of the resolution."""
    side = s.options.resolution // s.factor
    x = s.randn(2, s.latent_channels, side, side)
    t = torch.full((2,), CFG_TIMESTEP, device=s.device)
    context = s.randn(2, s.cfg.model.text_encoder.context_length, s.cfg.model.unet.context_dim, seed=1)
    shape = f"2x{s.latent_channels}x{side}x{side}"

    unet = s.fresh(s.pristine.unet)
    with torch.inference_mode():
        flops = count_flops(lambda: unet(x, t, context))
        _reset_compiler(s.speed)
        model = _optimize_unet(unet, s.speed)
        ours = s.row("unet", _impl_name("ldm", s.options.speed), shape, "it/s", lambda: model(x, t, context), 1, flops)
        out = model(x, t, context).clone() if theirs is not None else None
        del unet, model
        _free(s.device)
        if theirs is None:
            return [ours]
        their_unet = theirs.unet(s)

        def call(net: nn.Module) -> Callable[[], torch.Tensor]:
            return lambda: net(x, t, context).sample

        err = theirs.check("U-Net", out, call(their_unet)())
        return [ours, *theirs.rows(s, "unet", shape, "it/s", flops, their_unet, call, err, ours)]


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, x: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor, target: torch.Tensor, amp: torch.dtype | None,
                output: Callable[[Any], torch.Tensor]) -> Callable[[], None]:
    """One training step: autocast forward, MSE against `target`, backward, optimizer step (when given)."""

    def step() -> None:
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = output(model(x, t, context))
        F.mse_loss(pred.float(), target).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    from .train.loop import make_optimizer

    return make_optimizer(list(model.parameters()), TrainConfig())


def _bench_train(s: _Setup, theirs: _Diffusers | None) -> list[Row]:
    """One training step per (resolution, batch): fp32 weights, autocast in the benchmark dtype."""
    amp = None if s.dtype == torch.float32 else s.dtype
    # CUDA graphs replay inference only; every other switch applies to training as well
    switches = {k: v for k, v in s.options.speed.items() if k != "cuda_graphs"}
    train_speed = dataclasses.replace(s.speed, cuda_graphs=False) if s.speed is not None else None
    rows = []
    for resolution, batch in _train_shapes(s):
        side = resolution // s.factor
        x = s.randn(batch, s.latent_channels, side, side, dtype=torch.float32)
        target = s.randn(batch, s.cfg.model.unet.out_channels, side, side, dtype=torch.float32, seed=2)
        g = torch.Generator().manual_seed(s.options.seed)
        t = torch.randint(0, s.cfg.model.diffusion.num_timesteps, (batch,), generator=g).to(s.device)
        context = s.randn(batch, s.cfg.model.text_encoder.context_length, s.cfg.model.unet.context_dim,
                          dtype=torch.float32, seed=1)
        shape = f"{resolution}px x{batch}"

        unet = s.fresh(s.pristine.unet, torch.float32).train()
        flops = count_flops(_train_step(unet, None, x, t, context, target, amp, lambda out: out))
        unet.zero_grad(set_to_none=True)
        _reset_compiler(train_speed)
        model = _optimize_unet(unet, train_speed)
        optimizer = _make_optimizer(model)
        step = _train_step(model, optimizer, x, t, context, target, amp, lambda out: out)
        ours = s.row("train", _impl_name("ldm", switches), shape, "img/s", step, batch, flops)
        rows.append(ours)
        del unet, model, optimizer, step
        _free(s.device)
        if theirs is not None:
            for impl, their_unet in theirs.variants(lambda: theirs.unet(s, torch.float32).train()):
                optimizer = _make_optimizer(their_unet)
                step = _train_step(their_unet, optimizer, x, t, context, target, amp, lambda out: out.sample)
                row = s.row("train", impl, shape, "img/s", step, batch, flops)
                row.ldm_speedup = row.median_ms / ours.median_ms
                rows.append(row)
                del their_unet, optimizer, step
                _free(s.device)
    return rows


def _train_shapes(s: _Setup) -> Sequence[tuple[int, int]]:
    if s.options.train_shapes is not None:
        return s.options.train_shapes
    return GPU_TRAIN_SHAPES if s.device.type == "cuda" else CPU_TRAIN_SHAPES


def _bench_vae(s: _Setup, theirs: _Diffusers | None) -> list[Row]:
    """VAE decode of one image at the resolution."""
    side = s.options.resolution // s.factor
    z = s.randn(1, s.cfg.model.vae.embed_dim, side, side)
    shape = f"1x{s.cfg.model.vae.embed_dim}x{side}x{side}"
    vae = s.fresh(s.pristine.vae)
    with torch.inference_mode():
        flops = count_flops(lambda: vae.decode(z))
        _reset_compiler(s.speed)
        model = _optimize_vae(vae, s.speed)
        ours = s.row("vae", _impl_name("ldm", s.options.speed), shape, "img/s", lambda: model.decode(z), 1, flops)
        out = model.decode(z).clone() if theirs is not None else None
        del vae, model
        _free(s.device)
        if theirs is None:
            return [ours]
        their_vae = theirs.vae(s)

        def call(net: nn.Module) -> Callable[[], torch.Tensor]:
            return lambda: net.decode(z).sample

        err = theirs.check("VAE decoder", out, call(their_vae)())
        return [ours, *theirs.rows(s, "vae", shape, "img/s", flops, their_vae, call, err, ours)]


def _bench_generate(s: _Setup, theirs: _Diffusers | None) -> list[Row]:
    """`LDMPipeline.generate` of one image (DDIM, CFG 7.5), text encoding and decode included."""
    res = s.options.resolution
    shape = f"{res}px x1"
    p = s.pristine
    pipe = LDMPipeline(s.fresh(p.vae), s.fresh(p.unet), s.fresh(p.text_encoder), p.diffusion, defaults=p.defaults)

    def generate(on: LDMPipeline, steps: int) -> Callable[[], torch.Tensor]:
        return lambda: on.generate(PROMPT, steps=steps, cfg=CFG_SCALE, sampler="ddim", seed=s.options.seed,
                                   height=res, width=res, output_type="tensor", progress=False)

    flops = {steps: count_flops(generate(pipe, steps)) for steps in s.options.generate_steps}
    _reset_compiler(s.speed)
    fast = pipe.optimize(**{k: v for k, v in s.options.speed.items() if v}) if s.speed is not None else pipe
    ours = {
        steps: s.row(f"generate_{steps}", _impl_name("ldm", s.options.speed), shape, "img/s", generate(fast, steps), 1,
                     flops[steps])
        for steps in s.options.generate_steps
    }
    del pipe, fast
    _free(s.device)
    rows = list(ours.values())
    if theirs is not None:
        rows += theirs.pipeline_rows(s, shape, ours)
    order = {row.workload: i for i, row in enumerate(ours.values())}
    return sorted(rows, key=lambda row: order[row.workload])  # stable: ours first within each step count


def _bench_data(s: _Setup, theirs: _Diffusers | None) -> list[Row]:
    """Images/s of the loaders alone, at each training shape (no model involved)."""
    from .data.shards import (
        make_image_text_loader,
        make_latent_loader,
        shapes_samples,
        write_latent_shards,
        write_shards,
    )
    from .train.loop import shapes_batches

    rows = []
    workers = s.options.data_workers
    for resolution, batch in _train_shapes(s):
        shape = f"{resolution}px x{batch}"
        data = dataclasses.replace(s.cfg.data, resolution=resolution)
        batches = shapes_batches(data, batch, 0, 1, 0, 1, s.options.seed)
        rows.append(s.row("data_shapes", "ldm", shape, "img/s", lambda: next(batches), batch, None))
        with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
            samples = 2 * batch  # read over and over: `epoch_length` repeats the data
            images = Path(tmp) / "images"
            images.mkdir()
            write_shards(shapes_samples(samples, resolution=resolution, seed=s.options.seed), images / "shapes",
                         progress=False)
            loader = make_image_text_loader(str(images), resolution=resolution, batch_size=batch, num_workers=workers,
                                            epoch_length=10**9, rank=0, world_size=1, seed=s.options.seed)
            rows.append(_loader_row(s, "data_shards", shape, loader, batch))
            latents = Path(tmp) / "latents"
            latents.mkdir()
            side = resolution // s.factor
            g = torch.Generator().manual_seed(s.options.seed)
            items = ({"key": f"{i:06d}", "latent": torch.randn(s.latent_channels, side, side, generator=g),
                      "caption": PROMPT} for i in range(samples))
            write_latent_shards(items, latents / "latents", progress=False)
            loader = make_latent_loader(str(latents), batch_size=batch, num_workers=workers, epoch_length=10**9,
                                        rank=0, world_size=1, seed=s.options.seed)
            rows.append(_loader_row(s, "data_latents", shape, loader, batch))
    return rows


def _loader_row(s: _Setup, workload: str, shape: str, loader, batch: int) -> Row:
    """Time `next` on a fresh iterator of `loader`; its workers stop when this returns."""
    batches: Iterator[Any] = iter(loader)
    impl = f"ldm (workers={s.options.data_workers})"
    return s.row(workload, impl, shape, "img/s", lambda: next(batches), batch, None)


_WORKLOAD_RUNNERS = {
    "unet": _bench_unet,
    "train": _bench_train,
    "vae": _bench_vae,
    "generate": _bench_generate,
    "data": _bench_data,
}


def _optimize_unet(unet: nn.Module, speed: Any) -> nn.Module:
    if speed is None:
        return unet
    from .speed import optimize_unet

    return optimize_unet(unet, speed)


def _optimize_vae(vae: nn.Module, speed: Any) -> nn.Module:
    if speed is None:
        return vae
    from .speed import optimize_vae

    return optimize_vae(vae, speed)


# ---------------------------------------------------------------------------------------------
# diffusers, on the same weights
# ---------------------------------------------------------------------------------------------


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f'comparing with diffusers needs the diffusers package ({e}); install it with pip install -e ".[bench]"'
        ) from None
    return diffusers


class _Diffusers:
    """Builds diffusers' U-Net, VAE and pipeline with the weights of the pristine model, checks that
    they compute what ours do, and times them as ours are timed: eager, and compiled with the same
    mode (and channels_last when that switch is on) when compiling is asked for."""

    def __init__(self, s: _Setup):
        self.diffusers = _require_diffusers()
        self.compile_mode = s.options.speed.get("compile")
        self.channels_last = bool(s.options.speed.get("channels_last"))
        self.tolerance = AGREEMENT_TOLERANCE[s.dtype]

    def unet(self, s: _Setup, dtype: torch.dtype | None = None) -> nn.Module:
        from .convert.diffusers import to_diffusers_state, unet_config_to_diffusers, unet_rules

        cfg = s.cfg.model.unet
        config = unet_config_to_diffusers(cfg, s.options.resolution // s.factor)
        state = to_diffusers_state(s.pristine.unet.state_dict(), unet_rules(cfg))
        return _to(_load_on_meta(self.diffusers.UNet2DConditionModel, config, state), s.device, dtype or s.dtype)

    def vae(self, s: _Setup) -> nn.Module:
        from .convert.diffusers import to_diffusers_state, vae_config_to_diffusers, vae_rules

        cfg = s.cfg.model.vae
        config = vae_config_to_diffusers(cfg, s.options.resolution)
        state = to_diffusers_state(s.pristine.vae.state_dict(), vae_rules(cfg))
        return _to(_load_on_meta(self.diffusers.AutoencoderKL, config, state), s.device, s.dtype)

    def text_encoder(self, s: _Setup) -> nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        from .convert.diffusers import text_config_to_diffusers, text_rules, to_diffusers_state

        cfg = s.cfg.model.text_encoder
        rules, _ = text_rules(cfg)  # the second list: tensors a CLIPTextModel has no place for (unused here)
        model = CLIPTextModel(CLIPTextConfig(**text_config_to_diffusers(cfg)))
        state = to_diffusers_state(s.pristine.text_encoder.state_dict(), rules)
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 dropped that level
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
        return _to(model, s.device, s.dtype)

    def check(self, what: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
        """The relative error of our output against theirs; MismatchError above the dtype's tolerance."""
        err = relative_error(ours, theirs)
        if not err <= self.tolerance:
            raise MismatchError(
                f"our {what} and diffusers' on the same weights and inputs disagree: max relative error "
                f"{err:.3g} > tolerance {self.tolerance:g} for {str(ours.dtype).removeprefix('torch.')}; "
                "the timings would compare different computations"
            )
        return err

    def variants(self, build: Callable[[], nn.Module]) -> Iterator[tuple[str, nn.Module]]:
        """(impl name, model): eager and, when compiling, compiled diffusers, each from `build()`."""
        yield "diffusers", build()
        if self.compile_mode:
            torch._dynamo.reset()
            model = build()
            if self.channels_last:
                model = model.to(memory_format=torch.channels_last)
            mode = None if self.compile_mode == "default" else self.compile_mode
            switches = {"channels_last": self.channels_last, "compile": self.compile_mode}
            yield _impl_name("diffusers", switches), torch.compile(model, mode=mode, dynamic=False)

    def rows(self, s: _Setup, workload: str, shape: str, unit: str, flops: int | None, eager: nn.Module,
             call: Callable[[nn.Module], Callable[[], Any]], err: float, ours: Row) -> list[Row]:
        """Rows of an eager model already checked against ours and, when compiling, of it compiled."""
        rows = []
        for impl, model in self.variants(lambda: eager):
            row = s.row(workload, impl, shape, unit, call(model), 1, flops)
            row.max_rel_err = err
            row.ldm_speedup = row.median_ms / ours.median_ms
            rows.append(row)
        return rows

    def pipeline_rows(self, s: _Setup, shape: str, ours: dict[int, Row]) -> list[Row]:
        """diffusers' StableDiffusionPipeline with DDIM on the same weights: one image at the resolution
        for each step count of `ours` (our row per step count)."""
        res = s.options.resolution
        rows = []
        for impl, unet in self.variants(lambda: self.unet(s)):
            pipe = self._pipeline(s, unet)
            for steps, our_row in ours.items():

                def call(steps: int = steps) -> torch.Tensor:
                    g = torch.Generator().manual_seed(s.options.seed)
                    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=CFG_SCALE, height=res, width=res,
                                generator=g, output_type="pt").images

                row = s.row(our_row.workload, impl, shape, "img/s", call, 1, our_row.flops)
                row.ldm_speedup = row.median_ms / our_row.median_ms
                rows.append(row)
            del pipe, unet
            _free(s.device)
        return rows

    def _pipeline(self, s: _Setup, unet: nn.Module):
        from transformers import CLIPTokenizer

        from .convert.diffusers import scheduler_config_to_diffusers, write_tokenizer

        with tempfile.TemporaryDirectory(prefix="ldm-bench-tokenizer-") as tmp:
            write_tokenizer(Path(tmp), s.cfg.model.text_encoder.kind)
            tokenizer = CLIPTokenizer.from_pretrained(tmp)
        scheduler = self.diffusers.DDIMScheduler.from_config(scheduler_config_to_diffusers(s.cfg.model.diffusion))
        pipe = self.diffusers.StableDiffusionPipeline(
            vae=self.vae(s), text_encoder=self.text_encoder(s), tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def _to(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to the device and cast only when the dtype differs (diffusers warns about any cast)."""
    model = model.to(device)
    if next(model.parameters()).dtype != dtype:
        model = model.to(dtype)
    return model.eval()


def _load_on_meta(cls, config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """A diffusers model built on the meta device (no random init) with `state` assigned strictly."""
    with torch.device("meta"):
        model = cls.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{cls.__name__}: tensors left unset after loading: {left[:5]}")
    return model


# ---------------------------------------------------------------------------------------------
# Entry point and table
# ---------------------------------------------------------------------------------------------


def run_bench(options: BenchOptions, log: Callable[[str], None] | None = None) -> BenchResult:
    """Build the config's model with random weights and measure each workload; `log` gets progress lines."""
    options.validate()
    log = log or (lambda line: None)
    path = resolve_config(options.config)
    cfg = load_config(path, options.overrides)
    factor = cfg.model.vae.downsample_factor
    _check_resolution(options.resolution, factor, "resolution")
    for resolution, _ in options.train_shapes or ():
        _check_resolution(resolution, factor, "training resolution")
    device = _pick_device(options.device)
    dtype = parse_dtype(options.dtype) if options.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    speed = _speed_config(options.speed)
    if options.vs_diffusers:
        _require_diffusers()  # before minutes of building and timing
    log(f"building {path} with random weights")
    pristine = LDMPipeline.from_config(cfg, seed=options.seed)
    randomize_weights_(pristine.unet, options.seed)
    randomize_weights_(pristine.vae, options.seed + 1)
    peak = options.peak_tflops or peak_tflops_for(device, dtype)
    if peak is None and device.type == "cuda":
        log(f"no peak TFLOP/s known for {torch.cuda.get_device_name(device)}; MFU is n/a (pass a peak to get it)")
    s = _Setup(options, cfg, device, dtype, speed, peak, pristine, log)
    theirs = _Diffusers(s) if options.vs_diffusers else None
    rows: list[Row] = []
    for name in WORKLOADS:
        if name in options.workloads:
            log(f"{name}:")
            rows += _WORKLOAD_RUNNERS[name](s, theirs)
    return BenchResult(
        config=str(path), device=_device_name(device), dtype=str(dtype).removeprefix("torch."),
        resolution=options.resolution, speed={k: v for k, v in options.speed.items() if v}, peak_tflops=peak,
        versions=_versions(options.vs_diffusers), rows=rows,
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def _versions(with_diffusers: bool) -> dict[str, str]:
    versions = {"torch": torch.__version__}
    if with_diffusers:
        versions["diffusers"] = _require_diffusers().__version__
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
    for r in result.rows:
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
    return "\n".join([title, *text])
