"""SamplingOptions: everything besides the model and the input pictures that decides a generated image.

`LDMPipeline.generate`, `img2img`, `inpaint` and `upscale` take its fields as keyword arguments
(`pipe.generate("a red circle", steps=30, cfg=7.5, seed=0)`, or `pipe.generate(**options.to_dict())`),
the command-line tools build one from their flags, and every generated image records its own
resolved copy in `image.info` (one prompt, its seed, the model's defaults filled in), which is what
the PNG writer stores. A new sampling option is one new field here (and its use in the pipeline);
`to_dict` / `from_dict` carry it through JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .config import SampleConfig
from .diffusion import STOCHASTIC_SAMPLERS, parse_sampler

LATENT_UPSCALER = "latent"  # hires fix's default upscaler: interpolate the latents (A1111's "Latent")
HIRES_STRENGTH = 0.5  # hires fix's default redraw strength
MAX_HIRES_SCALE = 8


@dataclass
class SamplingOptions:
    """One generation request. None means "the model's default" (its config's `sample` section) or,
    for `seed`, a random seed (each image records the seed it got)."""

    prompt: str | list[str] = ""
    negative_prompt: str | list[str] | None = None  # what to steer away from; None: the model's default
    steps: int | None = None
    cfg: float | None = None  # classifier-free guidance scale; 1 turns guidance off
    sampler: str | None = None  # ours (ldm.diffusion.SAMPLER_NAMES), or an A1111 / ComfyUI name
    spacing: str | None = None  # timestep spacing or A1111 schedule type; None: the sampler's, else trailing
    eta: float | None = None  # noise scale of the stochastic samplers (STOCHASTIC_SAMPLERS); None: theirs
    guidance_rescale: float = 0.0  # CFG rescale (Lin et al. 2024), in [0, 1]
    prompt_weighting: bool = True  # A1111's (word:1.3) / [word] / BREAK syntax (ldm.prompts); False: literal text
    seed: int | None = None  # seed of the first image; image k of a call uses seed + k
    num_images: int = 1  # images per prompt
    height: int | None = None  # text-to-image only (img2img and inpaint draw at their image's size)
    width: int | None = None
    strength: float | None = None  # img2img, inpaint and hires fix's redraw: the noise level to start from, in [0, 1]
    # upscale only: noise added to the low-resolution input, 0..max_noise_level (checked by upscale,
    # which knows the model's range); None: the model's default
    noise_level: int | None = None
    # Hires fix (generate only): generate at height x width, upscale by hires_scale with hires_upscaler
    # ("latent": interpolate the latents; else the name of an upscaler model), then redraw at the
    # larger size with img2img at `strength` (default 0.5) over a hires_steps-step schedule (default: steps).
    hires_scale: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str | None = None

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(SamplingOptions))

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-ready data (several prompts as a list)."""
        out = dataclasses.asdict(self)
        for key in ("prompt", "negative_prompt"):
            if isinstance(out[key], tuple):
                out[key] = list(out[key])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingOptions:
        """The options `to_dict` wrote (or a JSON request); unknown keys are an error that names them.
        Values are checked when the options are used (`resolved`)."""
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown sampling options: {', '.join(unknown)}; valid: {', '.join(cls.names())}")
        return cls(**data)

    def replace(self, **changes: Any) -> SamplingOptions:
        return dataclasses.replace(self, **changes)

    def resolved(self, defaults: SampleConfig) -> SamplingOptions:
        """A copy with the model's defaults filled in (steps, cfg, sampler, negative prompt; the spacing
        from the sampler) and every value checked: a ValueError names the bad one and the fix."""
        steps = defaults.steps if self.steps is None else self.steps
        cfg = defaults.cfg if self.cfg is None else self.cfg
        sampler = self.sampler or defaults.sampler
        negative = defaults.negative_prompt if self.negative_prompt is None else self.negative_prompt
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1 (got {steps!r}); 20-50 is typical")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int) or self.num_images < 1:
            raise ValueError(f"num_images must be an integer >= 1 (got {self.num_images!r})")
        if not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or cfg < 0:
            raise ValueError(f"cfg must be a finite number >= 0 (got {cfg!r}); 7.5 is typical, 1 turns guidance off")
        rescale = self.guidance_rescale
        if not isinstance(rescale, (int, float)) or not math.isfinite(rescale) or not 0 <= rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1] (got {rescale!r}); 0.7 is typical")
        if self.strength is not None:
            check_strength(self.strength)
        if not isinstance(self.prompt_weighting, bool):
            raise ValueError(f"prompt_weighting must be True or False (got {self.prompt_weighting!r})")
        choice = parse_sampler(sampler, self.spacing)  # ours, A1111's or ComfyUI's names
        if self.eta is not None and choice.sampler not in STOCHASTIC_SAMPLERS:
            raise ValueError(
                f"eta applies only to stochastic samplers ({', '.join(sorted(STOCHASTIC_SAMPLERS))}); "
                f"{sampler!r} is deterministic"
            )
        sampler, spacing = choice.sampler, choice.spacing or "trailing"
        strength = None if self.strength is None else float(self.strength)
        resolved = {"negative_prompt": negative, "steps": steps, "cfg": cfg, "sampler": sampler, "spacing": spacing,
                    "strength": strength}
        return self.replace(**{**resolved, **self._resolved_hires(steps, strength)})

    def _resolved_hires(self, steps: int, strength: float | None) -> dict[str, Any]:
        """The hires fix fields with their defaults filled in (nothing when hires_scale is None)."""
        if self.hires_scale is None:
            given = [name for name in ("hires_steps", "hires_upscaler") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{given[0]} belongs to hires fix: set hires_scale too (e.g. 2)")
            return {}
        scale, hires_steps = self.hires_scale, steps if self.hires_steps is None else self.hires_steps
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 < scale <= MAX_HIRES_SCALE:
            raise ValueError(f"hires_scale must be a number in (1, {MAX_HIRES_SCALE}] (got {scale!r}); 2 is typical")
        if isinstance(hires_steps, bool) or not isinstance(hires_steps, int) or hires_steps < 1:
            raise ValueError(f"hires_steps must be an integer >= 1 (got {hires_steps!r})")
        upscaler = LATENT_UPSCALER if self.hires_upscaler is None else self.hires_upscaler
        if not isinstance(upscaler, str) or not upscaler:
            raise ValueError(f"hires_upscaler must be {LATENT_UPSCALER!r} or an upscaler model's name (got {upscaler!r})")
        return {"hires_scale": float(scale), "hires_steps": hires_steps, "hires_upscaler": upscaler,
                "strength": HIRES_STRENGTH if strength is None else strength}

    def image_info(self) -> dict[str, Any]:
        """What one generated image records in `image.info`: these (resolved, one-image) options without
        the ones that are None (no strength for text-to-image, no eta unless given) and `num_images`."""
        info = {k: v for k, v in self.to_dict().items() if v is not None and k != "num_images"}
        info["seed"] = self.seed  # None when the caller passed generators instead of a seed
        return info


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(
            f"strength must be a number in [0, 1] (got {strength!r}); "
            "0 keeps the image, 1 ignores it, 0.75 is typical"
        )
    return float(strength)


def check_prompts(prompt: str | Sequence[str]) -> list[str]:
    """A prompt or a list of prompts -> a non-empty list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt list is empty; pass a string or a non-empty list of strings")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must be strings; item {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


def check_negatives(negative: str | Sequence[str], n: int) -> list[str]:
    """One negative prompt for all `n` prompts, or one per prompt -> a list of `n`."""
    negatives = [negative] * n if isinstance(negative, str) else list(negative)
    if len(negatives) != n:
        raise ValueError(
            f"got {len(negatives)} negative prompts for {n} prompts; pass one string or one per prompt"
        )
    return negatives
