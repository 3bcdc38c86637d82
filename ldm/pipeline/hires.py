"""Hires fix, generate's second pass: make the base sample larger, then redraw it there with img2img.

A text-to-image model composes well near the size it was trained at; asked for many more pixels
at once it repeats objects and loses the layout. Hires fix keeps the composition of a base-size
sample and spends a second, partial pass on detail: the base latents are upscaled, either by
interpolation in latent space (`hires_upscaler="latent"`, no VAE round trip) or by decoding them
and running an upscaler model (the SD x4 upscaler or one trained here, then resized to the
target), and img2img at `strength` redraws the result at the larger size. Both passes use the same
seeds, so image k of a batch is reproducible from its seed and the settings in its metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..options import LATENT_UPSCALER, SamplingOptions

LATENT_MODE = "bilinear"  # how latents are interpolated (A1111's "Latent" upscaler)
UPSCALER_MODEL = "upscaler model"  # hires_upscaler's name for a model passed without one

# `pipe` and `upscaler` below are LDMPipelines (not imported here: the pipeline imports this module).


def hires_size(height: int, width: int, scale: float, factor: int) -> tuple[int, int]:
    """The size the second pass runs at: round(side * scale), which must be a multiple of the VAE
    factor; the error names the nearest scales that give one."""
    out = []
    for name, side in (("height", height), ("width", width)):
        target = round(side * scale)
        if target % factor:
            lo, hi = target - target % factor, target - target % factor + factor
            raise ValueError(
                f"hires {name} {side} x {scale:g} = {target} is not a multiple of {factor} (the VAE factor); "
                f"use a scale giving {lo} or {hi}, e.g. hires_scale={lo / side:.4g} or {hi / side:.4g}"
            )
        out.append(target)
    return out[0], out[1]


@dataclass
class HiresPass:
    """The second pass of one generate call, checked before the first pass runs."""

    height: int
    width: int
    upscaler: Any = None  # an upscaler pipeline; None: interpolate the latents

    @classmethod
    def plan(cls, pipe, opts: SamplingOptions, upscaler: Any = None) -> HiresPass | None:
        """None without hires_scale; else the larger size, with `upscaler` checked against hires_upscaler."""
        if opts.hires_scale is None:
            if upscaler is not None:
                raise ValueError("an upscaler model is for hires fix: set hires_scale too (e.g. 2)")
            return None
        height, width = hires_size(opts.height, opts.width, opts.hires_scale, pipe.vae.downsample_factor)
        if upscaler is None:
            if opts.hires_upscaler != LATENT_UPSCALER:
                raise ValueError(
                    f"hires_upscaler={opts.hires_upscaler!r} names an upscaler model: pass the model too, "
                    f"generate(..., upscaler=load_model(path)), or use hires_upscaler={LATENT_UPSCALER!r}"
                )
            return cls(height, width)
        if opts.hires_upscaler == LATENT_UPSCALER:
            raise ValueError(f"hires_upscaler={LATENT_UPSCALER!r} interpolates the latents, but an upscaler model was "
                             "passed too: name the model in hires_upscaler (e.g. its file name), or drop it")
        if not getattr(getattr(upscaler, "model_config", None), "is_upscaler", False):
            raise ValueError(
                "the hires upscaler must be an upscaler model (with a model.low_res section, e.g. the SD x4 upscaler); "
                f"this one is a text-to-image model: use hires_upscaler={LATENT_UPSCALER!r} to interpolate latents instead"
            )
        return cls(height, width, upscaler)

    def redraw(self, pipe, latents: torch.Tensor, opts: SamplingOptions, texts: tuple[list[str], list[str]],
               conditions: tuple[dict, dict], seeds: list[int | None], generators: list[torch.Generator],
               progress: bool, callback) -> torch.Tensor:
        """The base sample's latents (B, C, h, w) -> latents of the redraw at the larger size. `texts`:
        the call's (prompts, negative prompts); `conditions`: their (cond, uncond) from the first pass."""
        f = pipe.vae.downsample_factor
        if self.upscaler is None:
            start = F.interpolate(latents, size=(self.height // f, self.width // f), mode=LATENT_MODE)
        else:
            start = pipe.encode_image(self._upscaled(pipe, latents, opts.num_images, texts, seeds, generators, progress))
        # the redraw is img2img of `start` with the same seeds: image k's noise from seed + k again
        if seeds[0] is not None:
            generators = [torch.Generator().manual_seed(s) for s in seeds]
        redraw = opts.replace(steps=opts.hires_steps)
        sigmas = pipe._strength_sigmas(redraw)
        noise = pipe._initial_noise(generators, self.height, self.width)
        x = pipe._noised(start, noise, sigmas, redraw.steps)
        return pipe._sample(redraw, x, sigmas, *conditions, generators, progress, callback)

    def _upscaled(self, pipe, latents: torch.Tensor, n: int, texts: tuple[list[str], list[str]],
                  seeds: list[int | None], generators: list[torch.Generator], progress: bool) -> torch.Tensor:
        """The base images upscaled by the model with each image's prompt and seed, then resized to
        the target with an antialiased bicubic filter: (B, 3, H, W) in [0, 1]."""
        prompts, negatives = texts
        each = [p for p in prompts for _ in range(n)]  # image k's prompt, so image k keeps seed + k
        each_negative = [q for q in negatives for _ in range(n)]
        seeding = {"seed": seeds[0]} if seeds[0] is not None else {"generator": generators}
        pixels = pipe.decode_latents(latents).float().cpu()  # (B, 3, h, w) in [0, 1]
        larger = self.upscaler.upscale(pixels, each, each_negative, output_type="tensor", progress=progress, **seeding)
        if larger.shape[-2:] != (self.height, self.width):
            larger = F.interpolate(larger, size=(self.height, self.width), mode="bicubic", antialias=True).clamp(0, 1)
        return larger
