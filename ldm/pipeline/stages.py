"""The stages `generate`, `img2img`, `inpaint` and `upscale` share: checking a call's options and inputs, encoding
prompts, drawing the starting noise, sampling with the guided denoiser, decoding, and the output.

`Stages` is a base class of `LDMPipeline`; its methods use the pipeline's networks and schedule.
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..diffusion import SAMPLERS, CFGDenoiser, Denoiser, randn_like, sigmas_from_schedule
from ..errors import NonFiniteError
from ..images import to_pil
from ..models.prompt_encoder import encode_pair
from ..options import SamplingOptions
from .source import ModelSource

MAX_SEED = 2**63 - 1
OUTPUT_TYPES = ("pil", "tensor")
# The sampling options each method has no use for (img2img, inpaint and upscale draw at their image's
# size; hires fix is generate's; the noise level is the upscaler's input).
HIRES = ("hires_scale", "hires_steps", "hires_upscaler")
NOT_TAKEN = {
    "generate": ("noise_level",),
    "img2img": ("height", "width", "noise_level", *HIRES),
    "inpaint": ("height", "width", "noise_level", *HIRES),
    "upscale": ("height", "width", "strength", *HIRES),
}

# Called after every sampler step with (step index, x, denoised x0).
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]
Generators = torch.Generator | Sequence[torch.Generator] | None


class Stages:
    """The numbered stages of the generation methods, written once."""

    # Where the networks came from (set by the loaders), named when one of them misbehaves.
    source: ModelSource | None = None
    # NaN/Inf from a network stops a call with NonFiniteError; True only warns (for debugging).
    allow_nan: bool = False

    # ------------------------------------------------------------------------------------------
    # 1. Checking a call
    # ------------------------------------------------------------------------------------------

    def _options(self, method: str, options: dict[str, Any], output_type: str, **given: Any) -> SamplingOptions:
        """The call's sampling options (the keywords of `SamplingOptions`) with the model's defaults
        filled in and every value checked; fields the method does not take must be None."""
        names = SamplingOptions.names()
        unknown = [k for k in options if k not in names]
        if unknown:
            takes = [n for n in names if n not in given and n not in NOT_TAKEN[method]]
            raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}; "
                            f"its sampling options are {', '.join(takes)}")
        opts = SamplingOptions(**given, **options)
        taken = [n for n in NOT_TAKEN[method] if getattr(opts, n) is not None]
        if method == "generate":
            if opts.strength is not None and opts.hires_scale is None:
                raise ValueError(f"strength applies to img2img, inpaint and hires fix (with hires_scale), not plain "
                                 f"generate (got {opts.strength!r})")
            opts = opts.replace(height=self.defaults.height if opts.height is None else opts.height,
                                width=self.defaults.width if opts.width is None else opts.width)
        elif opts.height is not None or opts.width is not None:
            raise ValueError(f"{method} draws at the size of its image (got height={opts.height!r}, "
                             f"width={opts.width!r}); resize or crop the image instead")
        if taken:
            raise ValueError(f"{taken[0]} does not apply to {method} (got {getattr(opts, taken[0])!r})")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'pil' or 'tensor' (got {output_type!r})")
        return opts.resolved(self.defaults)

    def _check_unet_kind(self, method: str) -> None:
        """generate and img2img need a U-Net that takes latents only; inpaint also takes an inpainting
        U-Net; upscale needs an upscaler."""
        if method == "upscale":
            if not self.model_config.is_upscaler:
                raise ValueError(
                    "this model is not an upscaler (it has no model.low_res section); load an upscaler such as the SD "
                    "x4 upscaler, or make a text-to-image model's images larger with hires fix (hires_scale=2, "
                    "txt2img --hires-scale 2)"
                )
            return
        if self.model_config.is_upscaler:
            raise ValueError(
                f"this model is an upscaler (its U-Net takes the latents beside a low-resolution image): use "
                f"pipe.upscale(image, prompt) instead of {method}, or pass it to a text-to-image model's hires "
                "fix as the upscaler"
            )
        if self.model_config.inpainting and method != "inpaint":
            raise ValueError(
                f"this U-Net takes {self.unet.cfg.in_channels} input channels (an inpainting model); "
                f"use pipe.inpaint(image, mask, prompt) instead of {method}"
            )

    def _check_size(self, height: int, width: int, *, what: str = "") -> None:
        """Both sides multiples of the VAE factor. `what` prefixes the names ("image ") of sizes
        that come from an input image, whose errors then say that resizing is the caller's job."""
        f = self.vae.downsample_factor
        advice = "; resize or crop the image first" if what else ""
        for name, v in ((what + "height", height), (what + "width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f:
                raise ValueError(f"{name} must be an integer >= {f} (got {v!r}){advice}")
            if v % f:
                lo, hi = v - v % f, v - v % f + f
                raise ValueError(f"{name} must be a multiple of {f} (got {v}); try {lo} or {hi}{advice}")

    @staticmethod
    def _broadcast(prompts: list[str], *tensors: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
        """Pair prompts with a batch of images (and masks): each has 1 or n entries, n the largest."""
        n = max(len(prompts), *(t.shape[0] for t in tensors))
        sizes = {"prompts": len(prompts), **{f"input {i}": t.shape[0] for i, t in enumerate(tensors)}}
        if any(size not in (1, n) for size in sizes.values()):
            got = ", ".join(str(s) for s in [len(prompts), *(t.shape[0] for t in tensors)])
            raise ValueError(
                f"got batches of {got} (prompts, images[, masks]); pass one of each, or the same number of each"
            )
        prompts = prompts * n if len(prompts) == 1 else prompts
        return prompts, [t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t for t in tensors]

    @staticmethod
    def _generators(seed: int | None, generator: Generators, batch: int) -> tuple[list[torch.Generator], list[int | None]]:
        """One CPU generator per image: image k gets seed + k."""
        if generator is not None:
            if seed is not None:
                raise ValueError("pass either seed or generator, not both")
            gens = [generator] * batch if isinstance(generator, torch.Generator) else list(generator)
            if len(gens) != batch:
                raise ValueError(f"got {len(gens)} generators for {batch} images; pass one, or one per image")
            return gens, [None] * batch
        if seed is None:
            seed = secrets.randbelow(2**32)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - batch:
            raise ValueError(f"seed must be an integer in [0, 2**63 - 1 - batch] (got {seed!r})")
        seeds = [seed + k for k in range(batch)]
        return [torch.Generator().manual_seed(s) for s in seeds], seeds

    # ------------------------------------------------------------------------------------------
    # 2.-3. Conditions and starting latents
    # ------------------------------------------------------------------------------------------

    def _encode_conditions(
        self, prompts: list[str], negatives: list[str], opts: SamplingOptions
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """cond and uncond keyword arguments for CFGDenoiser, in batch order [p0 x n, p1 x n, ...],
        padded to the same number of chunks (`ldm.models.prompt_encoder`)."""
        cond, uncond = encode_pair(self.text_encoder, prompts, negatives, weighting=opts.prompt_weighting)
        n = opts.num_images
        return ({"context": cond.to(self.dtype).repeat_interleave(n, dim=0)},
                {"context": uncond.to(self.dtype).repeat_interleave(n, dim=0)})

    def _initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """(B, C, h, w) standard normal latents, row k from generator k (on the CPU for generators
        made by seed), float32 on the pipeline's device."""
        f = self.vae.downsample_factor
        shape = (len(generators), self.vae.cfg.embed_dim, height // f, width // f)
        return randn_like(torch.empty(shape, dtype=torch.float32), generators).to(self.device)

    def _strength_sigmas(self, opts: SamplingOptions) -> torch.Tensor:
        """The tail of the `steps`-step sigma schedule that `strength` keeps: int(steps * strength)
        steps, starting at the first kept step's sigma (just [0] when no step is kept)."""
        full = sigmas_from_schedule(self.schedule, opts.steps, opts.spacing)
        kept = min(int(opts.steps * opts.strength), opts.steps)
        return full[opts.steps - kept :]

    @staticmethod
    def _noised(z0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
        """The sampler's starting point for image latents z0: z0 + sigma_start * noise (VE forward
        process). With the full schedule (strength 1) the image is dropped, x = sigma_max * noise, so
        that the result equals text-to-image with the same seed."""
        if len(sigmas) == steps + 1:
            return noise * sigmas[0]
        return z0 + noise * sigmas[0]

    # ------------------------------------------------------------------------------------------
    # 4.-5. Sampling, decoding, output
    # ------------------------------------------------------------------------------------------

    def _sample(
        self,
        opts: SamplingOptions,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        progress: bool,
        callback: StepCallback | None,
        *,
        wrap: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from x over `sigmas` with the guided denoiser (optionally wrapped)."""
        if len(sigmas) < 2:
            return x  # nothing to sample (strength 0)
        dtype = self.dtype

        def unet(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, c_concat=None, y=None) -> torch.Tensor:
            if c_concat is not None:  # inpainting and upscaler U-Nets: extra input channels beside the noisy latents
                x_t = torch.cat([x_t, c_concat.to(x_t.dtype)], dim=1)
            # sampler state stays fp32; the U-Net runs in its dtype. y: an upscaler's noise level
            return self.fast_unet(x_t.to(dtype), t, context, y)

        denoiser = Denoiser(unet, self.schedule, self.diffusion.prediction_type)
        denoiser = CFGDenoiser(denoiser, opts.cfg, opts.guidance_rescale)
        if wrap is not None:
            denoiser = wrap(denoiser)
        sample_fn = SAMPLERS[opts.sampler]  # opts are resolved: our canonical name
        extra = {} if opts.eta is None else {"eta": opts.eta}
        bar = tqdm(total=len(sigmas) - 1, desc="sampling", disable=not progress, leave=False)

        def on_step(i: int, x_i: torch.Tensor, denoised: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, x_i, denoised)

        self._check_finite(x, "starting latents", "VAE encoder")  # img2img / inpaint start from encoded images
        try:
            latents = sample_fn(
                denoiser,
                x,
                sigmas,
                extra_args={"cond": cond, "uncond": uncond},
                generator=generators,
                callback=on_step,
                **extra,
            )
        finally:
            bar.close()
        self._check_finite(latents, "sampled latents", "U-Net")
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode (one image at a time unless vae_slicing is off: decoding is the memory peak at large
        sizes); float32 on the CPU."""
        images = self.decode_latents(latents).float().cpu()
        self._check_finite(images, "decoded pixels", "VAE decoder")
        return images

    def _check_finite(self, x: torch.Tensor, what: str, network: str) -> None:
        """One reduction over `x`: NaN/Inf stops the call with an error naming the network and its file
        (a warning with `allow_nan`), instead of an image that silently comes out black."""
        # NaN and Inf survive a sum, which is ~20x cheaper than isfinite(x).all() on the CPU (a 512 px
        # picture: 1.6 ms instead of 32); only a failed sum looks at every element.
        if bool(torch.isfinite(x.sum(dtype=torch.float32))):
            return
        finite = torch.isfinite(x)
        if bool(finite.all()):  # finite values whose sum overflowed
            return
        share = 1 - finite.float().mean().item()
        # a swapped-in VAE (`load_vae`) is named by its own file
        where = self.source and ((network.startswith("VAE") and self.source.vae) or self.source.path
                                 or self.source.config)
        source = f" of {where}" if where else ""
        message = (f"the {network}{source} produced NaN/Inf ({share:.0%} of the {what}): its weights may hold "
                   f"NaN/Inf, or {str(self.dtype).removeprefix('torch.')} overflowed (try fp32 or bf16)")
        if self.allow_nan:
            warnings.warn(message + "; going on because allow_nan is set", stacklevel=3)
            return
        raise NonFiniteError(message + "; allow_nan=True (--allow-nan) returns the images anyway, for debugging")

    @staticmethod
    def _output(
        images: torch.Tensor,
        output_type: str,
        opts: SamplingOptions,
        prompts: list[str],
        negatives: list[str],
        seeds: list[int | None],
        extra: dict[str, Any] | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """The images as a tensor, or as PIL images that each record their own options in `image.info`
        (and `extra`: what else decided them, such as an upscale's tile size)."""
        if output_type == "tensor":
            return images
        out = []
        for k, img in enumerate(images):
            pil = to_pil(img)
            p = k // opts.num_images
            one = opts.replace(prompt=prompts[p], negative_prompt=negatives[p], seed=seeds[k], num_images=1)
            pil.info.update(one.image_info(), **(extra or {}))
            out.append(pil)
        return out
