"""The upscaler's configs: its low-resolution input (`model.low_res`) and how training makes that
input from each image (`data.degrade`). `ldm.config` re-exports both beside the other configs."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass
class LowResConfig:
    """An upscaler's low-resolution input (the original `ImageConcatWithNoiseAugmentation`).

    The image, in [-1, 1], is noised to an integer level of its own schedule (x = sqrt(abar_l) image
    + sqrt(1 - abar_l) noise) and concatenated with the noisy latents, so it has the latents' size:
    the upscaling factor is the VAE's. The U-Net's class embedding receives the level. Training
    draws levels in [0, max_noise_level); sampling takes one in [0, max_noise_level].
    """

    beta_schedule: str = "scaled_linear"  # the original's "linear" (evenly spaced in sqrt(beta))
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_timesteps: int = 1000
    max_noise_level: int = 350
    noise_level: int = 20  # the default at sampling: more noise lets the model invent more detail

    def validate(self) -> None:
        """Ranges; the schedule's name is checked with the model (`ModelConfig.validate`)."""
        if not 0 < self.max_noise_level < self.num_timesteps:
            raise ConfigError(
                f"low_res.max_noise_level must be in [1, num_timesteps - 1] = [1, {self.num_timesteps - 1}] "
                f"(got {self.max_noise_level})"
            )
        if not 0 <= self.noise_level <= self.max_noise_level:
            raise ConfigError(
                f"low_res.noise_level must be in [0, max_noise_level] = [0, {self.max_noise_level}] "
                f"(got {self.noise_level})"
            )

    def check_unet(self, in_channels: int, num_classes: int | None, latent_channels: int, image_channels: int) -> None:
        """The U-Net of an upscaler takes the latents and the image side by side, and the noise level as a class."""
        self.validate()
        if in_channels != latent_channels + image_channels:
            raise ConfigError(
                f"unet.in_channels ({in_channels}) of an upscaler must be vae.embed_dim + vae.in_channels "
                f"({latent_channels} + {image_channels} = {latent_channels + image_channels}): the noisy latents and "
                "the low-resolution image side by side"
            )
        if num_classes is None or num_classes <= self.max_noise_level:
            raise ConfigError(
                f"an upscaler's U-Net embeds the noise level 0..{self.max_noise_level} as a class: set "
                f"unet.num_classes above low_res.max_noise_level (the SD x4 upscaler uses 1000; got {num_classes})"
            )


RESAMPLE_MODES = ("bicubic", "bilinear", "area")


@dataclass
class DegradeConfig:
    """How upscaler training makes the low-resolution input from each training image
    (`ldm.data.degrade.make_low_res`): an optional blur, the downscale by the VAE factor, an optional
    JPEG round trip. Both options are off by default: a plain antialiased bicubic downscale. Turn
    them on to train an upscaler for real photographs, whose small versions are rarely clean."""

    resample: str = "bicubic"  # "bicubic" | "bilinear" (both antialiased) | "area" (block means)
    blur_prob: float = 0.0  # share of images blurred before the downscale
    blur_sigma: tuple[float, float] = (0.4, 1.6)  # Gaussian std drawn from this range, in full-resolution pixels
    jpeg_prob: float = 0.0  # share of low-resolution images sent through JPEG
    jpeg_quality: tuple[int, int] = (40, 95)  # JPEG quality drawn from this range (inclusive)

    def validate(self) -> None:
        if self.resample not in RESAMPLE_MODES:
            raise ConfigError(f"data.degrade.resample must be one of {RESAMPLE_MODES} (got {self.resample!r})")
        for name in ("blur_prob", "jpeg_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"data.degrade.{name} must be in [0, 1] (got {getattr(self, name)})")
        lo, hi = self.blur_sigma
        if not 0 <= lo <= hi:
            raise ConfigError(f"data.degrade.blur_sigma must be [low, high] with 0 <= low <= high (got {list(self.blur_sigma)})")
        lo, hi = self.jpeg_quality
        if not 1 <= lo <= hi <= 100:
            raise ConfigError(
                f"data.degrade.jpeg_quality must be [low, high] with 1 <= low <= high <= 100 (got {list(self.jpeg_quality)})"
            )
