"""Super-resolution with a latent upscaler (the SD x4 upscaler, or one trained here): `pipe.upscale`.

It reads as the pipeline's other methods do: check inputs (including whether the activations fit
in memory), encode the prompt, noise-augment the low-resolution image to `noise_level`, sample
latents of the image's size beside it, decode them to an image `vae.downsample_factor` times
larger. The image is not encoded: the U-Net sees its pixels. Large inputs run in overlapping tiles
(`tiles.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ..diffusion import check_noise_level, low_res_schedule, noise_augment, randn_like, sigmas_from_schedule
from ..images import ImageInput, load_image
from ..options import check_negatives, check_prompts
from .stages import Generators, StepCallback
from .tiles import TiledDenoiser, check_tiles, decode_tiled, plan_tiles


class Upscaling:
    """`upscale`, a base class of `LDMPipeline` (the pipeline of an upscaler model)."""

    @torch.inference_mode()
    def upscale(
        self,
        image: ImageInput,
        prompt: str | list[str] = "",
        negative_prompt: str | list[str] | None = None,
        *,
        tile_size: int | str | None = None,
        tile_overlap: int | None = None,
        generator: Generators = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        **options: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Upscale `image` (PIL image, path, list of those, or a (B, 3, h, w) tensor in [0, 1]) by the
        upscaler's factor, guided by `prompt` ("" works: upscalers are trained with empty captions too).

        `options`: noise_level, steps, cfg, sampler, seed, num_images, spacing, eta, guidance_rescale,
        prompt_weighting (see `SamplingOptions`). `noise_level` (0..low_res.max_noise_level; default low_res.noise_level,
        20 for SD) is how much the input is noised before the model sees it: more makes the model trust
        it less and invent more. Image k of the batch is seeded with `seed + k`, which first draws the
        input's augmentation noise, then the initial latents. `tile_size` (low-resolution pixels, or
        "auto") upscales in overlapping tiles of `tile_overlap` pixels; without it, a size whose
        activations would not fit in the device's free memory is refused, with the tile size that would.
        """
        # 1. check inputs, memory included, before any work
        self._check_unet_kind("upscale")
        low_res = self.model_config.low_res
        opts = self._options("upscale", options, output_type, prompt=prompt, negative_prompt=negative_prompt)
        opts = opts.replace(noise_level=check_noise_level(
            low_res.noise_level if opts.noise_level is None else opts.noise_level, low_res.max_noise_level))
        prompts = check_prompts(opts.prompt)
        check_tiles(tile_size, tile_overlap)
        pixels = load_image(image)  # (B, 3, h, w) in [0, 1]
        prompts, (pixels,) = self._broadcast(prompts, pixels)
        negatives = check_negatives(opts.negative_prompt, len(prompts))
        n = len(prompts) * opts.num_images
        h, w = pixels.shape[-2:]
        f = self.vae.downsample_factor
        opts = opts.replace(height=h * f, width=w * f)
        tile, overlap = plan_tiles(self, n, h, w, tile_size, tile_overlap)
        sigmas = sigmas_from_schedule(self.schedule, opts.steps, opts.spacing)
        generators, seeds = self._generators(opts.seed, generator, n)

        # 2. encode prompts
        cond, uncond = self._encode_conditions(prompts, negatives, opts)

        # 3. the low-resolution image noised to its level (noise drawn before the latents', per image)
        lowres = (2 * pixels - 1).repeat_interleave(opts.num_images, dim=0)  # (B, 3, h, w) in [-1, 1]
        aug_noise = randn_like(torch.empty(lowres.shape), generators)
        levels = torch.full((n,), opts.noise_level, dtype=torch.long)
        lowres = noise_augment(lowres, levels, low_res_schedule(low_res), aug_noise).to(self.device)
        for args in (cond, uncond):  # guidance changes only the text; image and level are the same
            args["c_concat"], args["y"] = lowres, levels.to(self.device)
        x = self._initial_noise(generators, h * f, w * f) * sigmas[0]  # (B, C, h, w): latents of the output

        # 4. sample, every denoiser call in tiles when tiling
        wrap = (lambda d: TiledDenoiser(d, tile, overlap)) if tile else None
        latents = self._sample(opts, x, sigmas, cond, uncond, generators, progress, callback, wrap=wrap)

        # 5. decode, in the same tiles
        if tile:
            images = decode_tiled(self, latents, tile, overlap)
            self._check_finite(images, "decoded pixels", "VAE decoder")
        else:
            images = self._decode(latents)
        extra = {"upscale": f, **({"tile_size": tile, "tile_overlap": overlap} if tile else {})}
        return self._output(images, output_type, opts, prompts, negatives, seeds, extra)
