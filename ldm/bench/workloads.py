"""The workloads: one CFG U-Net step, one training step, a VAE decode, a whole `generate`, the data loaders."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..data.batches import shapes_batches
from ..data.reader import make_image_text_loader, make_latent_loader
from ..data.sources import shapes_samples
from ..data.writer import write_latent_shards, write_shards
from ..pipeline import LDMPipeline
from ..train.optim import make_optimizer
from .measure import count_flops
from .options import CFG_SCALE, CFG_TIMESTEP, CPU_TRAIN_SHAPES, GPU_TRAIN_SHAPES, PROMPT, Row
from .setup import Setup, free_memory, impl_name, optimize_unet_or_none, optimize_vae_or_none, reset_compiler
from .vs_diffusers import Diffusers

Emit = Callable[[Row], None]  # takes each row as soon as it is measured


def _bench_unet(s: Setup, theirs: Diffusers | None, emit: Emit) -> None:
    """One CFG step: the U-Net on batch 2 (cond + uncond) at the latent size of the resolution."""
    side = s.options.resolution // s.factor
    x = s.randn(2, s.latent_channels, side, side)
    t = torch.full((2,), CFG_TIMESTEP, device=s.device)
    context = s.randn(2, s.cfg.model.text_encoder.context_length, s.cfg.model.unet.context_dim, seed=1)
    shape = f"2x{s.latent_channels}x{side}x{side}"

    unet = s.fresh(s.pristine.unet)
    with torch.inference_mode():
        flops = count_flops(lambda: unet(x, t, context))
        reset_compiler(s.speed)
        model = optimize_unet_or_none(unet, s.speed)
        ours = s.row("unet", impl_name("ldm", s.options.speed), shape, "it/s", lambda: model(x, t, context), 1, flops)
        emit(ours)
        out = model(x, t, context).clone() if theirs is not None else None
        del unet, model
        free_memory(s.device)
        if theirs is None:
            return

        def call(net: nn.Module) -> Callable[[], torch.Tensor]:
            return lambda: net(x, t, context).sample

        with theirs.guard(s, emit, "unet", shape):
            their_unet = theirs.unet(s)
            err = theirs.check("U-Net", out, call(their_unet)())
            theirs.rows(s, "unet", shape, "it/s", flops, their_unet, call, err, ours, emit)


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
    return make_optimizer(list(model.parameters()), TrainConfig())


def _bench_train(s: Setup, theirs: Diffusers | None, emit: Emit) -> None:
    """One training step per (resolution, batch): fp32 weights, autocast in the benchmark dtype."""
    amp = None if s.dtype == torch.float32 else s.dtype
    # CUDA graphs replay inference only; every other switch applies to training as well
    switches = {k: v for k, v in s.options.speed.items() if k != "cuda_graphs"}
    train_speed = dataclasses.replace(s.speed, cuda_graphs=False) if s.speed is not None else None
    for resolution, batch in train_shapes_of(s):
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
        reset_compiler(train_speed)
        model = optimize_unet_or_none(unet, train_speed)
        optimizer = _make_optimizer(model)
        step = _train_step(model, optimizer, x, t, context, target, amp, lambda out: out)
        ours = s.row("train", impl_name("ldm", switches), shape, "img/s", step, batch, flops)
        emit(ours)
        del unet, model, optimizer, step
        free_memory(s.device)
        if theirs is None:
            continue
        with theirs.guard(s, emit, "train", shape):
            for impl, their_unet in theirs.variants(lambda: theirs.unet(s, torch.float32).train()):
                optimizer = _make_optimizer(their_unet)
                step = _train_step(their_unet, optimizer, x, t, context, target, amp, lambda out: out.sample)
                row = s.row("train", impl, shape, "img/s", step, batch, flops)
                row.ldm_speedup = row.median_ms / ours.median_ms
                emit(row)
                del their_unet, optimizer, step
                free_memory(s.device)


def train_shapes_of(s: Setup) -> Sequence[tuple[int, int]]:
    if s.options.train_shapes is not None:
        return s.options.train_shapes
    return GPU_TRAIN_SHAPES if s.device.type == "cuda" else CPU_TRAIN_SHAPES


def _bench_vae(s: Setup, theirs: Diffusers | None, emit: Emit) -> None:
    """VAE decode of one image at the resolution."""
    side = s.options.resolution // s.factor
    z = s.randn(1, s.cfg.model.vae.embed_dim, side, side)
    shape = f"1x{s.cfg.model.vae.embed_dim}x{side}x{side}"
    vae = s.fresh(s.pristine.vae)
    with torch.inference_mode():
        flops = count_flops(lambda: vae.decode(z))
        reset_compiler(s.speed)
        model = optimize_vae_or_none(vae, s.speed)
        ours = s.row("vae", impl_name("ldm", s.options.speed), shape, "img/s", lambda: model.decode(z), 1, flops)
        emit(ours)
        out = model.decode(z).clone() if theirs is not None else None
        del vae, model
        free_memory(s.device)
        if theirs is None:
            return

        def call(net: nn.Module) -> Callable[[], torch.Tensor]:
            return lambda: net.decode(z).sample

        with theirs.guard(s, emit, "vae", shape):
            their_vae = theirs.vae(s)
            err = theirs.check("VAE decoder", out, call(their_vae)())
            theirs.rows(s, "vae", shape, "img/s", flops, their_vae, call, err, ours, emit)


def _bench_generate(s: Setup, theirs: Diffusers | None, emit: Emit) -> None:
    """`LDMPipeline.generate` of one image (DDIM, CFG 7.5), text encoding and decode included."""
    res = s.options.resolution
    shape = f"{res}px x1"
    p = s.pristine
    pipe = LDMPipeline(s.fresh(p.vae), s.fresh(p.unet), s.fresh(p.text_encoder), p.diffusion, defaults=p.defaults,
                       low_res=p.model_config.low_res)

    def generate(on: LDMPipeline, steps: int) -> Callable[[], torch.Tensor]:
        return lambda: on.generate(PROMPT, steps=steps, cfg=CFG_SCALE, sampler="ddim", seed=s.options.seed,
                                   height=res, width=res, output_type="tensor", progress=False)

    flops = {steps: count_flops(generate(pipe, steps)) for steps in s.options.generate_steps}
    reset_compiler(s.speed)
    fast = pipe.optimize(**{k: v for k, v in s.options.speed.items() if v}) if s.speed is not None else pipe
    ours = {}
    for steps in s.options.generate_steps:
        ours[steps] = s.row(f"generate_{steps}", impl_name("ldm", s.options.speed), shape, "img/s",
                            generate(fast, steps), 1, flops[steps])
        emit(ours[steps])
    del pipe, fast
    free_memory(s.device)
    if theirs is not None:
        with theirs.guard(s, emit, f"generate_{','.join(map(str, ours))}", shape):
            theirs.pipeline_rows(s, shape, ours, emit)


def _bench_data(s: Setup, theirs: Diffusers | None, emit: Emit) -> None:
    """Images/s of the loaders alone, at each training shape (no model involved)."""
    workers = s.options.data_workers
    for resolution, batch in train_shapes_of(s):
        shape = f"{resolution}px x{batch}"
        data = dataclasses.replace(s.cfg.data, resolution=resolution)
        batches = shapes_batches(data, batch, 0, 1, 0, 1, s.options.seed)
        emit(s.row("data_shapes", "ldm", shape, "img/s", lambda: next(batches), batch, None))
        with tempfile.TemporaryDirectory(prefix="ldm-bench-") as tmp:
            samples = 2 * batch  # read over and over: `epoch_length` repeats the data
            images = Path(tmp) / "images"
            images.mkdir()
            write_shards(shapes_samples(samples, resolution=resolution, seed=s.options.seed), images / "shapes",
                         progress=False)
            loader = make_image_text_loader(str(images), resolution=resolution, batch_size=batch, num_workers=workers,
                                            epoch_length=10**9, rank=0, world_size=1, seed=s.options.seed)
            emit(_loader_row(s, "data_shards", shape, loader, batch))
            latents = Path(tmp) / "latents"
            latents.mkdir()
            side = resolution // s.factor
            g = torch.Generator().manual_seed(s.options.seed)
            items = ({"key": f"{i:06d}", "latent": torch.randn(s.latent_channels, side, side, generator=g),
                      "caption": PROMPT} for i in range(samples))
            write_latent_shards(items, latents / "latents", progress=False)
            loader = make_latent_loader(str(latents), batch_size=batch, num_workers=workers, epoch_length=10**9,
                                        rank=0, world_size=1, seed=s.options.seed)
            emit(_loader_row(s, "data_latents", shape, loader, batch))


def _loader_row(s: Setup, workload: str, shape: str, loader, batch: int) -> Row:
    """Time `next` on a fresh iterator of `loader`; its workers stop when this returns."""
    batches: Iterator[Any] = iter(loader)
    impl = f"ldm (workers={s.options.data_workers})"
    return s.row(workload, impl, shape, "img/s", lambda: next(batches), batch, None)


WORKLOAD_RUNNERS = {
    "unet": _bench_unet,
    "train": _bench_train,
    "vae": _bench_vae,
    "generate": _bench_generate,
    "data": _bench_data,
}
