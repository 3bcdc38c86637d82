"""LDMPipeline: text (and an image, and a mask) -> latents -> images.

`generate`, `img2img` and `inpaint` read as the same numbered stages (check inputs, encode prompts,
prepare the starting latents, sample, decode), written once in `stages.py`; an upscaler model's
`upscale` is in `upscale.py`, generate's hires fix in `hires.py`; loading and saving are in
`loading.py`. The networks stay ignorant of the noise math (that lives in `ldm.diffusion`), and the
sampler is picked by name from a registry of functions that share one signature.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..config import Config, DiffusionConfig, LowResConfig, ModelConfig, SampleConfig
from ..devices import parse_dtype
from ..diffusion import Schedule, sigmas_from_schedule
from ..diffusion.blending import KnownRegionDenoiser
from ..images import ImageInput, load_image, load_mask
from ..models.attention import set_attention_backend
from ..models.lora import LoRAStack
from ..models.prompt_encoder import encode_prompts
from ..models.text import TextEncoder
from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from ..options import check_negatives, check_prompts
from ..png_settings import settings_from_png
from ..speed import FastUNet, FastVAE, SpeedConfig, optimize_unet, optimize_vae, speed_config
from .adapters import AdapterMethods
from .hires import UPSCALER_MODEL, HiresPass
from .loading import Loading
from .stages import Generators, Stages, StepCallback
from .upscale import Upscaling


class LDMPipeline(Loading, Stages, AdapterMethods, Upscaling):
    """A latent text-to-image diffusion model: VAE, U-Net, text encoder and noise schedule.

    Build it from components, from a config (random weights), or from a saved model file.
    LoRAs and textual-inversion embeddings load onto it (`adapters.py`).
    The sampling keywords of `generate`, `img2img`, `inpaint` and `upscale` (steps, cfg, sampler,
    seed, num_images, spacing, eta, guidance_rescale, prompt_weighting, and height/width and hires
    fix for generate) are the fields of `ldm.options.SamplingOptions`; None takes the model's
    default (`pipe.defaults`). With `low_res` (an upscaler's low-resolution input,
    `ModelConfig.low_res`) it is a latent upscaler: `upscale` instead of `generate`.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet,
        text_encoder: TextEncoder,
        diffusion: DiffusionConfig | None = None,
        *,
        defaults: SampleConfig | None = None,
        low_res: LowResConfig | None = None,
    ):
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.diffusion = diffusion or DiffusionConfig()
        self.defaults = defaults or SampleConfig()
        self.model_config = ModelConfig(
            unet=unet.cfg, vae=vae.cfg, text_encoder=text_encoder.cfg, diffusion=self.diffusion, low_res=low_res
        )
        self.model_config.validate()
        self.schedule = Schedule.from_config(self.diffusion)
        for module in self.modules.values():
            module.eval()
        # what sampling, encoding and decoding call: the plain networks until `optimize`
        self.speed = SpeedConfig()
        self.fast_unet, self.fast_vae = FastUNet(unet, self.speed), FastVAE(vae, self.speed)
        self.loras = LoRAStack({"unet": unet, "text_encoder": text_encoder})
        self.embedding_files: dict[str, str] = {}  # textual-inversion word -> the file it was read from

    @property
    def config(self) -> Config:
        """The model's config and sampling defaults (what a saved file records)."""
        return Config(model=self.model_config, sample=self.defaults)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LDMPipeline:
        """Move every network to `device` and/or cast it to `dtype` ("fp32", "fp16", "bf16")."""
        dtype = parse_dtype(dtype) if dtype is not None else None
        for module in self.modules.values():
            module.to(device=device, dtype=dtype)
        self.loras.to(device, dtype)
        return self

    def optimize(self, config: SpeedConfig | None = None, **switches: Any) -> LDMPipeline:
        """Apply speed switches to the U-Net and VAE: a `SpeedConfig`, or its fields by name.

        `pipe.optimize(channels_last=True, fuse_qkv=True, compile="max-autotune-no-cudagraphs")`.
        Switches not given are off (the defaults), so `pipe.optimize()` restores the plain path.
        generate, img2img and inpaint then use the fast modules; weights and saved files are
        unchanged. Call it after `to()` when using cuda_graphs (see `ldm.speed`).
        """
        speed = speed_config(config, **switches)
        with self.loras.detached():  # LoRA hooks move to the rebuilt projections
            self.fast_unet = optimize_unet(self.unet, speed)
        self.fast_vae = optimize_vae(self.vae, speed)
        self.speed = speed
        return self

    # The sampling options a PNG written by the tools (or by AUTOMATIC1111) records:
    # `pipe.generate(**LDMPipeline.settings_from_png("image.png").to_dict())` makes it again.
    settings_from_png = staticmethod(settings_from_png)

    def set_attention_backend(self, name: str) -> LDMPipeline:
        """Run the U-Net's and VAE's attention through "sdpa" (default), "xformers" or "math"."""
        for module in (self.unet, self.vae):
            set_attention_backend(module, name)
        return self

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        generator: Generators = None,
        upscaler: LDMPipeline | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        **options: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate `num_images` images per prompt.

        `options`: steps, cfg, sampler, seed, height, width, num_images, spacing, eta,
        guidance_rescale, prompt_weighting, and hires fix's hires_scale, strength, hires_steps,
        hires_upscaler (see `SamplingOptions` and `hires.py`; `upscaler` is the upscaler model that
        hires_upscaler names). Prompts use A1111's syntax (`(word:1.3)`, `[word]`, BREAK; see
        `ldm.prompts`) unless `prompt_weighting=False`, and may be longer than the text encoder's
        context (encoded in chunks). Image k of the batch (prompt-major order) is seeded with
        `seed + k`, so it equals a single-image run with that seed (for prompts of one chunk count:
        shorter prompts of a batch are padded with empty chunks). Returns PIL images (with prompt,
        seed and settings in `image.info`) or, with `output_type="tensor"`, a (B, 3, H, W) tensor
        in [0, 1].
        """
        # 1. check inputs: every mistake is reported before any work is done
        if upscaler is not None and options.get("hires_scale") is not None:
            options.setdefault("hires_upscaler", UPSCALER_MODEL)
        opts = self._options("generate", options, output_type, prompt=prompt, negative_prompt=negative_prompt)
        prompts = check_prompts(opts.prompt)
        negatives = check_negatives(opts.negative_prompt, len(prompts))
        self._check_size(opts.height, opts.width)
        self._check_unet_kind("generate")
        hires = HiresPass.plan(self, opts, upscaler)
        sigmas = sigmas_from_schedule(self.schedule, opts.steps, opts.spacing)
        generators, seeds = self._generators(opts.seed, generator, len(prompts) * opts.num_images)

        # 2. encode prompts: [p0 x num_images, p1 x num_images, ...]
        cond, uncond = self._encode_conditions(prompts, negatives, opts)

        # 3. initial noise, drawn per image from its own CPU generator so results match across devices
        x = self._initial_noise(generators, opts.height, opts.width) * sigmas[0]

        # 4. sample
        latents = self._sample(opts, x, sigmas, cond, uncond, generators, progress, callback)

        # 5. hires fix: upscale and redraw at the larger size
        if hires is not None:
            latents = hires.redraw(self, latents, opts, (prompts, negatives), (cond, uncond), seeds, generators,
                                   progress, callback)

        # 6. decode
        return self._output(self._decode(latents), output_type, opts, prompts, negatives, seeds)

    @torch.inference_mode()
    def img2img(
        self,
        image: ImageInput,
        prompt: str | list[str],
        strength: float | None = 0.75,
        negative_prompt: str | list[str] | None = None,
        *,
        generator: Generators = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        **options: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Redraw `image` to follow `prompt` (SDEdit, Meng et al. 2022).

        The image is encoded to latents (the VAE posterior mean), noised to the sigma where
        `strength` enters the `steps`-step schedule, and sampled from there: `int(steps * strength)`
        steps run. strength 0 returns the VAE round trip of the image; strength 1 starts from pure
        noise and equals `generate` with the same seed. `image`: PIL image, path, list of those, or
        a tensor (B, 3, H, W) / (3, H, W) in [0, 1]; H and W multiples of the VAE factor. One image
        per prompt, or one image for all prompts (and one prompt for all images). `options`: as for
        `generate`, without height and width.
        """
        # 1. check inputs
        strength = 0.75 if strength is None else strength
        opts = self._options("img2img", options, output_type, prompt=prompt, negative_prompt=negative_prompt,
                             strength=strength)
        prompts = check_prompts(opts.prompt)
        pixels = load_image(image)
        self._check_size(*pixels.shape[-2:], what="image ")
        prompts, (pixels,) = self._broadcast(prompts, pixels)
        negatives = check_negatives(opts.negative_prompt, len(prompts))
        self._check_unet_kind("img2img")
        opts = opts.replace(height=pixels.shape[-2], width=pixels.shape[-1])
        sigmas = self._strength_sigmas(opts)
        generators, seeds = self._generators(opts.seed, generator, len(prompts) * opts.num_images)

        # 2. encode prompts
        cond, uncond = self._encode_conditions(prompts, negatives, opts)

        # 3. encode the image and noise it to the starting sigma
        z0 = self.encode_image(pixels).repeat_interleave(opts.num_images, dim=0)  # (B, C, h, w)
        noise = self._initial_noise(generators, *pixels.shape[-2:])
        x = self._noised(z0, noise, sigmas, opts.steps)

        # 4. sample the remaining steps
        latents = self._sample(opts, x, sigmas, cond, uncond, generators, progress, callback)

        # 5. decode
        return self._output(self._decode(latents), output_type, opts, prompts, negatives, seeds)

    @torch.inference_mode()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        strength: float | None = 1.0,
        generator: Generators = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        **options: Any,
    ) -> list[Image.Image] | torch.Tensor:
        """Repaint the white part of `mask` (1 = repaint, 0 = keep) to follow `prompt`.

        Inpainting U-Nets (in_channels = 2 * latent channels + 1) see the latent mask and the
        latents of the masked image beside the noisy latents. Ordinary U-Nets get latent blending:
        every denoiser call sees the kept region as the image's latents noised to the current sigma.
        Either way the output keeps the unmasked pixels exactly: the result is pasted over the input
        through the mask (soft masks blend). `strength` < 1 starts from the noised image latents, as
        in `img2img`. `mask`: PIL image ("L" or RGB, converted to grey), path, or tensor (H, W),
        (1, H, W) or (B, 1, H, W) in [0, 1], the image's size. `options`: as for `img2img`.
        """
        # 1. check inputs
        strength = 1.0 if strength is None else strength
        opts = self._options("inpaint", options, output_type, prompt=prompt, negative_prompt=negative_prompt,
                             strength=strength)
        prompts = check_prompts(opts.prompt)
        pixels, masks = load_image(image), load_mask(mask)
        self._check_size(*pixels.shape[-2:], what="image ")
        if masks.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(
                f"mask size {masks.shape[-1]}x{masks.shape[-2]} differs from the image size "
                f"{pixels.shape[-1]}x{pixels.shape[-2]}; resize the mask to the image first"
            )
        prompts, (pixels, masks) = self._broadcast(prompts, pixels, masks)
        negatives = check_negatives(opts.negative_prompt, len(prompts))
        self._check_unet_kind("inpaint")
        opts = opts.replace(height=pixels.shape[-2], width=pixels.shape[-1])
        sigmas = self._strength_sigmas(opts)
        generators, seeds = self._generators(opts.seed, generator, len(prompts) * opts.num_images)

        # 2. encode prompts
        cond, uncond = self._encode_conditions(prompts, negatives, opts)

        # 3. latents of the image, the latent mask, the masked image; the starting point
        n = opts.num_images
        keep = masks < 0.5  # (B, 1, H, W) binary mask for the U-Net's inputs, as SD's inpainting models were trained
        z0 = self.encode_image(pixels).repeat_interleave(n, dim=0)  # (B, C, h, w)
        f = self.vae.downsample_factor
        # a latent is repainted if any of its f x f pixels is (max-pool), so blending never overwrites repainted pixels
        latent_mask = F.max_pool2d((~keep).float(), f).repeat_interleave(n, dim=0).to(self.device)  # (B, 1, h, w)
        noise = self._initial_noise(generators, *pixels.shape[-2:])
        x = self._noised(z0, noise, sigmas, opts.steps)
        wrap = None
        if self.model_config.inpainting:
            # U-Net input channels: [noisy latents (C), mask (1), masked-image latents (C)]
            masked_pixels = torch.where(keep, pixels, 0.5)  # repainted pixels grey (0 in the VAE's [-1, 1])
            masked = self.encode_image(masked_pixels).repeat_interleave(n, dim=0)
            c_concat = torch.cat([latent_mask, masked], dim=1)
            cond["c_concat"] = uncond["c_concat"] = c_concat
        else:
            wrap = partial(KnownRegionDenoiser, known=z0, noise=noise, mask=latent_mask)
            x = torch.where(latent_mask > 0, x, z0 + noise * sigmas[0])  # kept region: the image at sigma_start

        # 4. sample
        latents = self._sample(opts, x, sigmas, cond, uncond, generators, progress, callback, wrap=wrap)
        if not self.model_config.inpainting:
            latents = torch.where(latent_mask > 0, latents, z0)

        # 5. decode, then keep the unmasked pixels exactly: out = m * generated + (1 - m) * input
        images = self._decode(latents)
        m = masks.repeat_interleave(n, dim=0)
        images = m * images + (1 - m) * pixels.repeat_interleave(n, dim=0)
        return self._output(images, output_type, opts, prompts, negatives, seeds)

    # ------------------------------------------------------------------------------------------
    # The networks, one call each
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str], *, weighting: bool = True) -> torch.Tensor:
        """(B, L, D) text hidden states in the U-Net's dtype: A1111's prompt syntax unless
        `weighting=False`, and L a multiple of the context length for long prompts
        (`ldm.models.prompt_encoder`)."""
        return encode_prompts(self.text_encoder, prompts, weighting=weighting).to(self.dtype)

    @torch.inference_mode()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] -> scaled latents (B, C, h, w), float32 on the pipeline's device.

        Uses the posterior mean (deterministic; SD's posterior std is tiny next to the latents).
        One image at a time unless vae_slicing is off, like decoding."""
        latents = self.fast_vae.encode((2 * images - 1).to(self.device, self.dtype)).mean
        return latents.float() * self.vae.scaling_factor

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
        x = self.fast_vae.decode((z / self.vae.scaling_factor).to(self.dtype))
        return ((x.float() + 1) / 2).clamp(0, 1)
