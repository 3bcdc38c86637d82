"""LDMPipeline: text (and an image, and a mask) -> latents -> images, and loading/saving whole models.

`generate`, `img2img` and `inpaint` read as the same numbered stages (check inputs, encode prompts,
prepare the starting latents, sample, decode), written once as private helpers they share.
The networks stay ignorant of the noise math (that lives in `ldm.diffusion`), and the sampler is
picked by name from a registry of functions that share one signature.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import read_model_file, save_model_file
from .config import Config, DiffusionConfig, ModelConfig, SampleConfig, load_config
from .diffusion import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    CFGDenoiser,
    Denoiser,
    Schedule,
    parse_sampler,
    randn_like,
    sigmas_from_schedule,
)
from .errors import CheckpointError
from .images import decode_grey, decode_image
from .models import build_models
from .models.attention import set_attention_backend
from .models.text import TextEncoder
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .speed import FastUNet, FastVAE, SpeedConfig, optimize_unet, optimize_vae, speed_config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**63 - 1

# An input picture: a PIL image, a file path, a list of those, or a tensor in [0, 1].
ImageInput = Union[Image.Image, str, Path, torch.Tensor, Sequence[Union[Image.Image, str, Path]]]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass
class _Run:
    """The checked sampling options of one call."""

    sampler: str
    sample_fn: Callable[..., torch.Tensor]
    options: dict[str, Any]  # extra sampler keywords (eta)
    steps: int
    cfg: float
    guidance_rescale: float
    spacing: str


class KnownRegionDenoiser:
    """Latent blending for inpainting with an ordinary (non-inpainting) U-Net.

    Wraps a VE denoiser so that, at every call, the kept region (mask 0) of x is replaced by the
    image latents noised to the current sigma, known + sigma * noise, and the x0 estimate there is
    the image latents themselves. The repainted region (mask 1) is the sampler's own. So the U-Net
    always sees the known content at the right noise level around the hole, and each sampler step
    from sigma to sigma' leaves the kept region at known + sigma' * noise (exactly, for the
    deterministic first-order samplers). Wrapping the denoiser rather than editing x in a step
    callback keeps samplers pure, also covers the extra calls inside a step (Heun) and gives
    multistep solvers (DPM-Solver++) a consistent history.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], *, known: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor):
        self.denoiser = denoiser
        self.known = known  # (B, C, h, w) scaled image latents
        self.noise = noise  # (B, C, h, w) the noise the image latents were noised with
        self.repaint = mask > 0.5  # (B, 1, h, w) True where the sampler draws

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        x = torch.where(self.repaint, x, self.known + s * self.noise)  # VE forward process q(x | x0) at sigma
        return torch.where(self.repaint, self.denoiser(x, sigma, **kwargs), self.known)


class LDMPipeline:
    """A latent text-to-image diffusion model: VAE, U-Net, text encoder and noise schedule.

    Build it from components, from a config (random weights), or from a saved model file.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: UNet,
        text_encoder: TextEncoder,
        diffusion: DiffusionConfig | None = None,
        *,
        defaults: SampleConfig | None = None,
    ):
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.diffusion = diffusion or DiffusionConfig()
        self.defaults = defaults or SampleConfig()
        self.model_config = ModelConfig(
            unet=unet.cfg, vae=vae.cfg, text_encoder=text_encoder.cfg, diffusion=self.diffusion
        )
        self.model_config.validate()
        self.schedule = Schedule.from_config(self.diffusion)
        for module in self.modules.values():
            module.eval()
        # what sampling, encoding and decoding call: the plain networks until `optimize`
        self.speed = SpeedConfig()
        self.fast_unet, self.fast_vae = FastUNet(unet, self.speed), FastVAE(vae, self.speed)

    # ------------------------------------------------------------------------------------------
    # Construction, saving, loading
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: str | Path | Config,
        overrides: Sequence[str] = (),
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> LDMPipeline:
        """Build a model with random weights (initialised from `seed`) from a YAML path or Config."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet, vae, text_encoder = build_models(cfg.model)
        pipe = cls(vae, unet, text_encoder, cfg.model.diffusion, defaults=cfg.sample)
        return pipe.to(device, dtype)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        *,
        config: str | Path | Config | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> LDMPipeline:
        """Load a model file written by `save` (strictly: every tensor must match the config).

        `config` overrides the config stored in the file (needed for files that carry none)."""
        parts, stored = read_model_file(path)
        cfg = config if isinstance(config, Config) or config is None else load_config(config)
        cfg = cfg or stored
        if cfg is None:
            raise CheckpointError(
                f"{path} carries no config in its metadata; pass the architecture explicitly, e.g. "
                "LDMPipeline.from_checkpoint(path, config='configs/sd15.yaml')"
            )
        from .convert import build_pipeline_from_state

        # Built on the meta device with the file's tensors assigned in place: no random init, no second copy.
        return build_pipeline_from_state(cfg, parts, device=device, dtype=dtype)

    @classmethod
    def from_single_file(
        cls,
        path: str | Path,
        *,
        prediction_type: str | None = None,
        config: str | Path | Config | None = None,
        use_ema: bool = False,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_pickle: bool = False,
    ) -> LDMPipeline:
        """Load an original Stable Diffusion 1.x / 2.x checkpoint (.ckpt or .safetensors).

        The architecture is detected from the tensors (see `pipe.load_report`); pass
        `prediction_type="v"` for the 768-v models, which the tensors cannot reveal."""
        from .convert import load_single_file

        return load_single_file(path, prediction_type=prediction_type, config=config, use_ema=use_ema,
                                device=device, dtype=dtype, trust_pickle=trust_pickle)

    @classmethod
    def from_diffusers(
        cls, folder: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
    ) -> LDMPipeline:
        """Load a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, scheduler/)."""
        from .convert.diffusers import load_diffusers

        return load_diffusers(folder, device=device, dtype=dtype)

    def save_diffusers(self, folder: str | Path) -> Path:
        """Write a folder that diffusers' StableDiffusionPipeline classes open."""
        from .convert.diffusers import save_diffusers

        return save_diffusers(self, folder)

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file (original SD key layout, config in the metadata), atomically."""
        config = Config(model=self.model_config, sample=self.defaults)
        return save_model_file(path, self.modules, config)

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
        return self

    def optimize(self, config: SpeedConfig | None = None, **switches: Any) -> LDMPipeline:
        """Apply speed switches to the U-Net and VAE: a `SpeedConfig`, or its fields by name.

        `pipe.optimize(channels_last=True, fuse_qkv=True, compile="max-autotune-no-cudagraphs")`.
        Switches not given are off (the defaults), so `pipe.optimize()` restores the plain path.
        generate, img2img and inpaint then use the fast modules; weights and saved files are
        unchanged. Call it after `to()` when using cuda_graphs (see `ldm.speed`).
        """
        speed = speed_config(config, **switches)
        self.fast_unet = optimize_unet(self.unet, speed)
        self.fast_vae = optimize_vae(self.vae, speed)
        self.speed = speed
        return self

    def set_attention_backend(self, name: str) -> LDMPipeline:
        """Run the U-Net's and VAE's attention through "sdpa" (default), "xformers" or "math"."""
        for module in (self.unet, self.vae):
            set_attention_backend(module, name)
        return self

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) text hidden states in the U-Net's dtype."""
        return self.text_encoder(prompts).to(self.dtype)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images: int = 1,
        spacing: str | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate `num_images` images per prompt.

        Image k of the batch (prompt-major order) is seeded with `seed + k`, so it equals a
        single-image run with that seed. Returns PIL images (with prompt, seed and settings in
        `image.info`) or, with `output_type="tensor"`, a (B, 3, H, W) tensor in [0, 1].
        `sampler` and `spacing` take our names, A1111's and ComfyUI's (`"DPM++ 2M"`, `"Karras"`;
        see `ldm.diffusion.parse_sampler`); `image.info` records ours.
        """
        height = self.defaults.height if height is None else height
        width = self.defaults.width if width is None else width

        # 1. check inputs: every mistake is reported before any work is done
        prompts = self._check_prompts(prompt)
        negatives = self._check_negatives(self._negative(negative_prompt), len(prompts))
        self._check_size(height, width)
        run = self._check_run(steps, cfg, sampler, spacing, eta, guidance_rescale, num_images, output_type)
        if self.unet.cfg.in_channels != self.vae.cfg.embed_dim:
            raise ValueError(
                f"this U-Net takes {self.unet.cfg.in_channels} input channels (an inpainting model); "
                "use pipe.inpaint(image, mask, prompt) instead of generate"
            )
        sigmas = sigmas_from_schedule(self.schedule, run.steps, run.spacing)
        generators, seeds = self._generators(seed, generator, len(prompts) * num_images)

        # 2. encode prompts: [p0 x num_images, p1 x num_images, ...]
        cond, uncond = self._encode_conditions(prompts, negatives, num_images)

        # 3. initial noise, drawn per image from its own CPU generator so results match across devices
        x = self._initial_noise(generators, height, width) * sigmas[0]

        # 4. sample
        latents = self._sample(run, x, sigmas, cond, uncond, generators, progress, callback)

        # 5. decode
        images = self._decode(latents)
        info = {"width": width, "height": height}
        return self._output(images, output_type, run, info, prompts, negatives, seeds, num_images)

    @torch.inference_mode()
    def img2img(
        self,
        image: ImageInput,
        prompt: str | Sequence[str],
        strength: float = 0.75,
        negative_prompt: str | Sequence[str] | None = None,
        *,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_images: int = 1,
        spacing: str | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Redraw `image` to follow `prompt` (SDEdit, Meng et al. 2022).

        The image is encoded to latents (the VAE posterior mean), noised to the sigma where
        `strength` enters the `steps`-step schedule, and sampled from there: `int(steps * strength)`
        steps run. strength 0 returns the VAE round trip of the image; strength 1 starts from pure
        noise and equals `generate` with the same seed. `image`: PIL image, path, list of those, or
        a tensor (B, 3, H, W) / (3, H, W) in [0, 1]; H and W multiples of the VAE factor. One image
        per prompt, or one image for all prompts (and one prompt for all images).
        """
        # 1. check inputs
        prompts = self._check_prompts(prompt)
        run = self._check_run(steps, cfg, sampler, spacing, eta, guidance_rescale, num_images, output_type)
        strength = self._check_strength(strength)
        pixels = load_image(image)
        self._check_size(*pixels.shape[-2:], what="image ")
        prompts, (pixels,) = self._broadcast(prompts, pixels)
        negatives = self._check_negatives(self._negative(negative_prompt), len(prompts))
        if self.unet.cfg.in_channels != self.vae.cfg.embed_dim:
            raise ValueError(
                f"this U-Net takes {self.unet.cfg.in_channels} input channels (an inpainting model); "
                "use pipe.inpaint(image, mask, prompt) instead of img2img"
            )
        sigmas = self._strength_sigmas(run, strength)
        generators, seeds = self._generators(seed, generator, len(prompts) * num_images)

        # 2. encode prompts
        cond, uncond = self._encode_conditions(prompts, negatives, num_images)

        # 3. encode the image and noise it to the starting sigma
        z0 = self.encode_image(pixels).repeat_interleave(num_images, dim=0)  # (B, C, h, w)
        noise = self._initial_noise(generators, *pixels.shape[-2:])
        x = self._noised(z0, noise, sigmas, run.steps)

        # 4. sample the remaining steps
        latents = self._sample(run, x, sigmas, cond, uncond, generators, progress, callback)

        # 5. decode
        images = self._decode(latents)
        info = {"width": pixels.shape[-1], "height": pixels.shape[-2], "strength": strength}
        return self._output(images, output_type, run, info, prompts, negatives, seeds, num_images)

    @torch.inference_mode()
    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        strength: float = 1.0,
        steps: int | None = None,
        cfg: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        num_images: int = 1,
        spacing: str | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    ) -> list[Image.Image] | torch.Tensor:
        """Repaint the white part of `mask` (1 = repaint, 0 = keep) to follow `prompt`.

        Inpainting U-Nets (in_channels = 2 * latent channels + 1) see the latent mask and the
        latents of the masked image beside the noisy latents. Ordinary U-Nets get latent blending:
        every denoiser call sees the kept region as the image's latents noised to the current sigma.
        Either way the output keeps the unmasked pixels exactly: the result is pasted over the input
        through the mask (soft masks blend). `strength` < 1 starts from the noised image latents, as
        in `img2img`. `mask`: PIL image ("L" or RGB, converted to grey), path, or tensor (H, W),
        (1, H, W) or (B, 1, H, W) in [0, 1], the image's size.
        """
        # 1. check inputs
        prompts = self._check_prompts(prompt)
        run = self._check_run(steps, cfg, sampler, spacing, eta, guidance_rescale, num_images, output_type)
        strength = self._check_strength(strength)
        pixels, masks = load_image(image), load_mask(mask)
        self._check_size(*pixels.shape[-2:], what="image ")
        if masks.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(
                f"mask size {masks.shape[-1]}x{masks.shape[-2]} differs from the image size "
                f"{pixels.shape[-1]}x{pixels.shape[-2]}; resize the mask to the image first"
            )
        prompts, (pixels, masks) = self._broadcast(prompts, pixels, masks)
        negatives = self._check_negatives(self._negative(negative_prompt), len(prompts))
        latent_channels = self.vae.cfg.embed_dim
        inpainting_unet = self.unet.cfg.in_channels == 2 * latent_channels + 1
        sigmas = self._strength_sigmas(run, strength)
        generators, seeds = self._generators(seed, generator, len(prompts) * num_images)

        # 2. encode prompts
        cond, uncond = self._encode_conditions(prompts, negatives, num_images)

        # 3. latents of the image, the latent mask, the masked image; the starting point
        n = num_images
        keep = masks < 0.5  # (B, 1, H, W) binary mask for the U-Net's inputs, as SD's inpainting models were trained
        z0 = self.encode_image(pixels).repeat_interleave(n, dim=0)  # (B, C, h, w)
        f = self.vae.downsample_factor
        # a latent is repainted if any of its f x f pixels is (max-pool), so blending never overwrites repainted pixels
        latent_mask = F.max_pool2d((~keep).float(), f).repeat_interleave(n, dim=0).to(self.device)  # (B, 1, h, w)
        noise = self._initial_noise(generators, *pixels.shape[-2:])
        x = self._noised(z0, noise, sigmas, run.steps)
        wrap = None
        if inpainting_unet:
            # U-Net input channels: [noisy latents (C), mask (1), masked-image latents (C)]
            masked_pixels = torch.where(keep, pixels, 0.5)  # repainted pixels grey (0 in the VAE's [-1, 1])
            masked = self.encode_image(masked_pixels).repeat_interleave(n, dim=0)
            c_concat = torch.cat([latent_mask, masked], dim=1)
            cond["c_concat"] = uncond["c_concat"] = c_concat
        else:
            wrap = partial(KnownRegionDenoiser, known=z0, noise=noise, mask=latent_mask)
            x = torch.where(latent_mask > 0, x, z0 + noise * sigmas[0])  # kept region: the image at sigma_start

        # 4. sample
        latents = self._sample(run, x, sigmas, cond, uncond, generators, progress, callback, wrap=wrap)
        if not inpainting_unet:
            latents = torch.where(latent_mask > 0, latents, z0)

        # 5. decode, then keep the unmasked pixels exactly: out = m * generated + (1 - m) * input
        images = self._decode(latents)
        m = masks.repeat_interleave(n, dim=0)
        images = m * images + (1 - m) * pixels.repeat_interleave(n, dim=0)
        info = {"width": pixels.shape[-1], "height": pixels.shape[-2], "strength": strength}
        return self._output(images, output_type, run, info, prompts, negatives, seeds, num_images)

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

    # ------------------------------------------------------------------------------------------
    # Stages shared by generate, img2img and inpaint
    # ------------------------------------------------------------------------------------------

    def _check_run(
        self,
        steps: int | None,
        cfg: float | None,
        sampler: str | None,
        spacing: str | None,
        eta: float | None,
        guidance_rescale: float,
        num_images: int,
        output_type: str,
    ) -> _Run:
        """Check the sampling options (defaults from the model's config) and resolve the sampler."""
        d = self.defaults
        steps = d.steps if steps is None else steps
        cfg = d.cfg if cfg is None else cfg
        sampler = sampler or d.sampler
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (got {steps!r}); 20-50 is typical")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1 (got {num_images!r})")
        if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
            raise ValueError(f"cfg must be a finite number >= 0 (got {cfg!r}); 7.5 is typical, 1 turns guidance off")
        if not math.isfinite(guidance_rescale) or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1] (got {guidance_rescale!r}); 0.7 is typical")
        if output_type not in ("pil", "tensor"):
            raise ValueError(f"output_type must be 'pil' or 'tensor' (got {output_type!r})")
        choice = parse_sampler(sampler, spacing)  # ours, A1111's or ComfyUI's names
        options = {}
        if eta is not None:
            if choice.sampler not in STOCHASTIC_SAMPLERS:
                raise ValueError(
                    f"eta applies only to stochastic samplers ({', '.join(sorted(STOCHASTIC_SAMPLERS))}); "
                    f"{sampler!r} is deterministic"
                )
            options["eta"] = eta
        spacing = choice.spacing or "trailing"
        return _Run(choice.sampler, SAMPLERS[choice.sampler], options, steps, cfg, guidance_rescale, spacing)

    @staticmethod
    def _check_strength(strength: float) -> float:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise ValueError(
                f"strength must be a number in [0, 1] (got {strength!r}); "
                "0 keeps the image, 1 ignores it, 0.75 is typical"
            )
        return float(strength)

    def _strength_sigmas(self, run: _Run, strength: float) -> torch.Tensor:
        """The tail of the `run.steps`-step sigma schedule that `strength` keeps: int(steps * strength)
        steps, starting at the first kept step's sigma (just [0] when no step is kept)."""
        full = sigmas_from_schedule(self.schedule, run.steps, run.spacing)
        kept = min(int(run.steps * strength), run.steps)
        return full[run.steps - kept :]

    @staticmethod
    def _noised(z0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, steps: int) -> torch.Tensor:
        """The sampler's starting point for image latents z0: z0 + sigma_start * noise (VE forward
        process). With the full schedule (strength 1) the image is dropped, x = sigma_max * noise, so
        that the result equals text-to-image with the same seed."""
        if len(sigmas) == steps + 1:
            return noise * sigmas[0]
        return z0 + noise * sigmas[0]

    def _broadcast(self, prompts: list[str], *tensors: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
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

    def _negative(self, negative_prompt: str | Sequence[str] | None) -> str | Sequence[str]:
        return self.defaults.negative_prompt if negative_prompt is None else negative_prompt

    def _encode_conditions(
        self, prompts: list[str], negatives: list[str], num_images: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """cond and uncond keyword arguments for CFGDenoiser, in batch order [p0 x n, p1 x n, ...]."""
        cond = {"context": self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)}
        uncond = {"context": self.encode_prompt(negatives).repeat_interleave(num_images, dim=0)}
        return cond, uncond

    def _initial_noise(self, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
        """(B, C, h, w) standard normal latents, row k from generator k (on the CPU for generators
        made by seed), float32 on the pipeline's device."""
        f = self.vae.downsample_factor
        shape = (len(generators), self.vae.cfg.embed_dim, height // f, width // f)
        return randn_like(torch.empty(shape, dtype=torch.float32), generators).to(self.device)

    def _sample(
        self,
        run: _Run,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        cond: dict[str, torch.Tensor],
        uncond: dict[str, torch.Tensor],
        generators: list[torch.Generator],
        progress: bool,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None,
        *,
        wrap: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from x over `sigmas` with the guided denoiser (optionally wrapped)."""
        if len(sigmas) < 2:
            return x  # nothing to sample (strength 0)
        dtype = self.dtype

        def unet(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, c_concat=None) -> torch.Tensor:
            if c_concat is not None:  # inpainting U-Net: extra input channels beside the noisy latents
                x_t = torch.cat([x_t, c_concat.to(x_t.dtype)], dim=1)
            return self.fast_unet(x_t.to(dtype), t, context)  # sampler state stays fp32; the U-Net runs in its dtype

        denoiser = Denoiser(unet, self.schedule, self.diffusion.prediction_type)
        denoiser = CFGDenoiser(denoiser, run.cfg, run.guidance_rescale)
        if wrap is not None:
            denoiser = wrap(denoiser)
        bar = tqdm(total=len(sigmas) - 1, desc="sampling", disable=not progress, leave=False)

        def on_step(i: int, x_i: torch.Tensor, denoised: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, x_i, denoised)

        try:
            return run.sample_fn(
                denoiser,
                x,
                sigmas,
                extra_args={"cond": cond, "uncond": uncond},
                generator=generators,
                callback=on_step,
                **run.options,
            )
        finally:
            bar.close()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode (one image at a time unless vae_slicing is off: decoding is the memory peak at large
        sizes); float32 on the CPU."""
        return self.decode_latents(latents).float().cpu()

    @staticmethod
    def _output(
        images: torch.Tensor,
        output_type: str,
        run: _Run,
        info: dict,
        prompts: list[str],
        negatives: list[str],
        seeds: list[int | None],
        num_images: int,
    ) -> list[Image.Image] | torch.Tensor:
        if output_type == "tensor":
            return images
        info = {"sampler": run.sampler, "steps": run.steps, "cfg": run.cfg, "spacing": run.spacing, **info}
        out = []
        for k, img in enumerate(images):
            pil = to_pil(img)
            p = k // num_images
            pil.info.update(info, prompt=prompts[p], negative_prompt=negatives[p], seed=seeds[k])
            out.append(pil)
        return out

    # ------------------------------------------------------------------------------------------
    # Input checks
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _check_prompts(prompt: str | Sequence[str]) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt list is empty; pass a string or a non-empty list of strings")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")
        return prompts

    @staticmethod
    def _check_negatives(negative: str | Sequence[str], n: int) -> list[str]:
        negatives = [negative] * n if isinstance(negative, str) else list(negative)
        if len(negatives) != n:
            raise ValueError(
                f"got {len(negatives)} negative prompts for {n} prompts; pass one string or one per prompt"
            )
        return negatives

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
    def _generators(
        seed: int | None, generator: torch.Generator | Sequence[torch.Generator] | None, batch: int
    ) -> tuple[list[torch.Generator], list[int | None]]:
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


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image."""
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images row by row into one picture (about square by default)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def load_image(image: ImageInput) -> torch.Tensor:
    """A picture (PIL image, path, list of those, or tensor) -> float32 (B, 3, H, W) in [0, 1], CPU.

    Tensors must be (B, 3, H, W) or (3, H, W) with values in [0, 1]. Files and PIL images are
    decoded by `ldm.images.decode_image` (EXIF orientation, 16-bit grey, CMYK, alpha over white)."""
    if isinstance(image, torch.Tensor):
        x = image.detach().to("cpu", torch.float32)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must have shape (B, 3, H, W) or (3, H, W) (got {tuple(image.shape)})")
        _check_unit_range(x, "image")
        return x
    images = [image] if isinstance(image, (Image.Image, str, Path)) else list(image)
    if not images:
        raise ValueError("image list is empty")
    tensors = [_pil_to_tensor(decode_image(im)) for im in images]
    if len({t.shape for t in tensors}) > 1:
        raise ValueError(f"images differ in size ({', '.join(f'{t.shape[2]}x{t.shape[1]}' for t in tensors)}); "
                         "resize them to one size first")
    return torch.stack(tensors)


def load_mask(mask: ImageInput) -> torch.Tensor:
    """An inpainting mask -> float32 (B, 1, H, W) in [0, 1], CPU; 1 (white) = repaint, 0 (black) = keep.

    PIL images (any mode) are converted to grey by `ldm.images.decode_grey`; tensors may be (H, W), (1, H, W) or
    (B, 1, H, W) with values in [0, 1]. Values between 0 and 1 feather the final paste."""
    if isinstance(mask, torch.Tensor):
        m = mask.detach().to("cpu", torch.float32)
        m = m[None, None] if m.ndim == 2 else m[None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"mask tensor must have shape (H, W), (1, H, W) or (B, 1, H, W) (got {tuple(mask.shape)})")
        _check_unit_range(m, "mask")
        return m
    masks = [mask] if isinstance(mask, (Image.Image, str, Path)) else list(mask)
    if not masks:
        raise ValueError("mask list is empty")
    tensors = [_pil_to_tensor(decode_grey(m)) for m in masks]
    if len({t.shape for t in tensors}) > 1:
        raise ValueError("masks differ in size; resize them to the image size first")
    return torch.stack(tensors)


def _pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit PIL image -> float32 (C, H, W) in [0, 1]."""
    array = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    channels = len(image.getbands())
    return array.reshape(image.height, image.width, channels).permute(2, 0, 1).float() / 255


def _check_unit_range(x: torch.Tensor, name: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
        raise ValueError(f"{name} tensor values must be in [0, 1] (got {lo:.3g} .. {hi:.3g}); "
                         "for [-1, 1] data pass (x + 1) / 2")
