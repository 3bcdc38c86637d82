"""diffusers on the same weights: builds its U-Net, VAE and pipeline from our pristine model, checks that
they compute what ours do, and times them as ours are timed."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..convert.diffusers import (
    scheduler_config_to_diffusers,
    text_config_to_diffusers,
    text_rules,
    to_diffusers_state,
    unet_config_to_diffusers,
    unet_rules,
    vae_config_to_diffusers,
    vae_rules,
    write_tokenizer,
)
from .measure import relative_error
from .options import CFG_SCALE, PROMPT, Row
from .setup import Setup, free_memory, impl_name

# Largest allowed max|ours - theirs| / max|theirs| between our networks and diffusers' on the same weights.
AGREEMENT_TOLERANCE = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class MismatchError(RuntimeError):
    """Our network and the diffusers network with the same weights compute different outputs."""


def require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            f'comparing with diffusers needs the diffusers package ({e}); install it with pip install -e ".[bench]"'
        ) from None
    return diffusers


class Diffusers:
    """Builds diffusers' U-Net, VAE and pipeline with the weights of the pristine model, checks that
    they compute what ours do, and times them as ours are timed: eager, and compiled with the same
    mode (and channels_last when that switch is on) when compiling is asked for."""

    def __init__(self, s: Setup):
        self.diffusers = require_diffusers()
        self.compile_mode = s.options.speed.get("compile")
        self.channels_last = bool(s.options.speed.get("channels_last"))
        self.tolerance = AGREEMENT_TOLERANCE[s.dtype]

    def unet(self, s: Setup, dtype: torch.dtype | None = None) -> nn.Module:
        cfg = s.cfg.model.unet
        config = unet_config_to_diffusers(cfg, s.options.resolution // s.factor)
        state = to_diffusers_state(s.pristine.unet.state_dict(), unet_rules(cfg))
        return _to(_load_on_meta(self.diffusers.UNet2DConditionModel, config, state), s.device, dtype or s.dtype)

    def vae(self, s: Setup) -> nn.Module:
        cfg = s.cfg.model.vae
        config = vae_config_to_diffusers(cfg, s.options.resolution)
        state = to_diffusers_state(s.pristine.vae.state_dict(), vae_rules(cfg))
        return _to(_load_on_meta(self.diffusers.AutoencoderKL, config, state), s.device, s.dtype)

    def text_encoder(self, s: Setup) -> nn.Module:
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
            yield impl_name("diffusers", switches), torch.compile(model, mode=mode, dynamic=False)

    @contextmanager
    def guard(self, s: Setup, emit: Callable[[Row], None], workload: str, shape: str) -> Iterator[None]:
        """Run diffusers' side of a workload; if it fails (a disagreement with ours, a model diffusers
        cannot run, out of memory), emit a failed row with the reason instead of losing the others."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - every failure becomes a row; the run goes on
            s.log(f"  {workload} {shape}: diffusers failed: {type(e).__name__}: {e}")
            emit(Row.failed(workload, "diffusers", e, shape))
            free_memory(s.device)

    def rows(self, s: Setup, workload: str, shape: str, unit: str, flops: int | None, eager: nn.Module,
             call: Callable[[nn.Module], Callable[[], Any]], err: float, ours: Row,
             emit: Callable[[Row], None]) -> None:
        """Rows of an eager model already checked against ours and, when compiling, of it compiled."""
        for impl, model in self.variants(lambda: eager):
            row = s.row(workload, impl, shape, unit, call(model), 1, flops)
            row.max_rel_err = err
            row.ldm_speedup = row.median_ms / ours.median_ms
            emit(row)

    def pipeline_rows(self, s: Setup, shape: str, ours: dict[int, Row], emit: Callable[[Row], None]) -> None:
        """diffusers' StableDiffusionPipeline with DDIM on the same weights: one image at the resolution
        for each step count of `ours` (our row per step count)."""
        res = s.options.resolution
        for impl, unet in self.variants(lambda: self.unet(s)):
            pipe = self._pipeline(s, unet)
            for steps, our_row in ours.items():

                def call(steps: int = steps) -> torch.Tensor:
                    g = torch.Generator().manual_seed(s.options.seed)
                    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=CFG_SCALE, height=res, width=res,
                                generator=g, output_type="pt").images

                row = s.row(our_row.workload, impl, shape, "img/s", call, 1, our_row.flops)
                row.ldm_speedup = row.median_ms / our_row.median_ms
                emit(row)
            del pipe, unet
            free_memory(s.device)

    def _pipeline(self, s: Setup, unet: nn.Module):
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
