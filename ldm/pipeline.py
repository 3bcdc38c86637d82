"""LDMPipeline: text -> latents -> images, and loading/saving whole models.

`generate` reads as numbered stages: check inputs, encode prompts, prepare noise, sample, decode.
The networks stay ignorant of the noise math (that lives in `ldm.diffusion`), and the sampler is
picked by name from a registry of functions that share one signature.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_state_strict, read_model_file, save_model_file
from .config import Config, DiffusionConfig, ModelConfig, SampleConfig, load_config
from .diffusion import (
    STOCHASTIC_SAMPLERS,
    CFGDenoiser,
    Denoiser,
    Schedule,
    randn_like,
    resolve_sampler,
    sigmas_from_schedule,
)
from .errors import CheckpointError
from .models import build_models
from .models.attention import set_attention_backend
from .models.text import TextEncoder
from .models.unet import UNet
from .models.vae import AutoencoderKL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**63 - 1


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


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
        pipe = cls.from_config(cfg)
        for name, module in pipe.modules.items():
            load_state_strict(module, parts[name], f"{path} [{name}]")
        return pipe.to(device, dtype)

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
        """
        d = self.defaults
        steps = d.steps if steps is None else steps
        cfg = d.cfg if cfg is None else cfg
        sampler = sampler or d.sampler
        height = d.height if height is None else height
        width = d.width if width is None else width
        if negative_prompt is None:
            negative_prompt = d.negative_prompt

        # 1. check inputs: every mistake is reported before any work is done
        prompts = self._check_prompts(prompt)
        negatives = self._check_negatives(negative_prompt, len(prompts))
        self._check_size(height, width)
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
        if self.unet.cfg.in_channels != self.vae.cfg.embed_dim:
            raise ValueError(
                f"this U-Net takes {self.unet.cfg.in_channels} input channels (an inpainting model); "
                "use pipe.inpaint(image, mask, prompt) instead of generate"
            )
        sample_fn, default_spacing = resolve_sampler(sampler)
        base = sampler.removesuffix("_karras") if default_spacing else sampler
        options = {}
        if eta is not None:
            if base not in STOCHASTIC_SAMPLERS:
                raise ValueError(
                    f"eta applies only to stochastic samplers ({', '.join(sorted(STOCHASTIC_SAMPLERS))}); "
                    f"{sampler!r} is deterministic"
                )
            options["eta"] = eta
        spacing = spacing or default_spacing or "trailing"
        sigmas = sigmas_from_schedule(self.schedule, steps, spacing)
        batch = len(prompts) * num_images
        generators, seeds = self._generators(seed, generator, batch)

        # 2. encode prompts: [p0 x num_images, p1 x num_images, ...]
        device = self.device
        context = self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)
        cond = {"context": context}
        uncond = {"context": self.encode_prompt(negatives).repeat_interleave(num_images, dim=0)}

        # 3. initial noise, drawn per image from its own CPU generator so results match across devices
        f = self.vae.downsample_factor
        shape = (batch, self.unet.cfg.in_channels, height // f, width // f)
        noise = randn_like(torch.empty(shape, dtype=torch.float32), generators)
        x = noise.to(device) * sigmas[0]

        # 4. sample
        dtype = self.dtype

        def unet(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self.unet(x_t.to(dtype), t, context)  # sampler state stays fp32; the U-Net runs in its dtype

        denoiser = CFGDenoiser(Denoiser(unet, self.schedule, self.diffusion.prediction_type), cfg, guidance_rescale)
        bar = tqdm(total=steps, desc="sampling", disable=not progress, leave=False)

        def on_step(i: int, x_i: torch.Tensor, denoised: torch.Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, x_i, denoised)

        try:
            latents = sample_fn(
                denoiser,
                x,
                sigmas,
                extra_args={"cond": cond, "uncond": uncond},
                generator=generators,
                callback=on_step,
                **options,
            )
        finally:
            bar.close()

        # 5. decode one image at a time (decoding is the memory peak at large sizes)
        images = torch.cat([self.decode_latents(z[None]) for z in latents]).float().cpu()
        if output_type == "tensor":
            return images
        info = {"sampler": sampler, "steps": steps, "cfg": cfg, "spacing": spacing, "width": width, "height": height}
        out = []
        for k, img in enumerate(images):
            pil = to_pil(img)
            p = k // num_images
            pil.info.update(info, prompt=prompts[p], negative_prompt=negatives[p], seed=seeds[k])
            out.append(pil)
        return out

    @torch.inference_mode()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1]."""
        x = self.vae.decode((z / self.vae.scaling_factor).to(self.dtype))
        return ((x.float() + 1) / 2).clamp(0, 1)

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

    def _check_size(self, height: int, width: int) -> None:
        f = self.vae.downsample_factor
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v < f:
                raise ValueError(f"{name} must be an integer >= {f} (got {v!r})")
            if v % f:
                lo, hi = v - v % f, v - v % f + f
                raise ValueError(f"{name} must be a multiple of {f} (got {v}); try {lo} or {hi}")

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
