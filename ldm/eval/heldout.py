"""Evaluation on held-out data: denoising loss at fixed timesteps, and prompt adherence on the
built-in shapes data (generate from held-out captions, detect what was drawn, compare).

Both are deterministic for a given checkpoint: the held-out items, the noise, and the sampling
seeds are fixed, so two checkpoints are compared on exactly the same work.
"""

from __future__ import annotations

import torch

from ..data.degrade import downscale
from ..data.shapes import Scene, ShapesDataset
from ..diffusion import diffusion_loss, low_res_schedule, noise_augment, q_sample, upscaler_input
from ..pipeline import LDMPipeline
from .adherence import detect_all, summarize

EVAL_TIMESTEPS = (100, 300, 500, 700, 900)


def heldout_items(n: int, resolution: int, seed: int = 0, max_objects: int = 1, combinations: str = "all") -> list[dict]:
    """n items of the held-out image stream; `combinations` "seen" / "unseen" restricts their objects
    to those without / with a pair of `ldm.data.shapes.HELDOUT_PAIRS`."""
    data = ShapesDataset(resolution=resolution, length=n, seed=seed, max_objects=max_objects, split="heldout",
                         combinations=combinations)
    return [data[i] for i in range(n)]


@torch.inference_mode()
def heldout_loss(
    pipe: LDMPipeline, items: list[dict], timesteps=EVAL_TIMESTEPS, batch_size: int = 32, seed: int = 0
) -> dict[str, float]:
    """Mean denoising loss per timestep (and overall) on `items` ({"image" or "latent", "caption"}),
    with fixed noise. An upscaler sees each image's bicubic downscale noised to its default noise
    level (fixed noise too) beside the latents."""
    device, dtype = pipe.device, pipe.dtype
    low_res = pipe.model_config.low_res
    totals = {t: 0.0 for t in timesteps}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        if "latent" in chunk[0]:  # cached posterior means (data.source=latents)
            if low_res is not None:
                raise ValueError("an upscaler is measured on images (its input is made from their pixels), "
                                 "not on cached latents")
            z = torch.stack([it["latent"] for it in chunk]).to(device).float() * pipe.vae.scaling_factor
        else:
            images = torch.stack([it["image"] for it in chunk]).to(device, dtype)
            z = pipe.vae.encode(images).mean.float() * pipe.vae.scaling_factor
        context = pipe.text_encoder([it["caption"] for it in chunk]).to(dtype)  # as training encodes captions
        extra = {}
        if low_res is not None:  # (B, 3, h, w) augmented low-resolution input, and its level as the label
            lowres = downscale(images.float(), pipe.vae.downsample_factor)
            levels = torch.full((len(chunk),), low_res.noise_level, device=device, dtype=torch.long)
            aug = torch.randn(lowres.shape, generator=torch.Generator().manual_seed(seed * 1000 + start)).to(device)
            extra = {"low_res": noise_augment(lowres, levels, low_res_schedule(low_res), aug), "y": levels}
        for t in timesteps:
            g = torch.Generator().manual_seed(seed * 1000 + t + start)
            noise = torch.randn(z.shape, generator=g).to(device)
            tt = torch.full((len(chunk),), t, device=device, dtype=torch.long)
            x_t = q_sample(z, tt, noise, pipe.schedule)
            if extra:
                pred = pipe.unet(upscaler_input(x_t, extra["low_res"]).to(dtype), tt, context, extra["y"]).float()
            else:
                pred = pipe.unet(x_t.to(dtype), tt, context).float()
            loss = diffusion_loss(pred, z, noise, tt, pipe.schedule, pipe.diffusion.prediction_type)
            totals[t] += loss.item() * len(chunk)
    out = {f"loss_t{t}": totals[t] / len(items) for t in timesteps}
    out["loss"] = sum(totals.values()) / (len(items) * len(timesteps))
    return out


def generate_and_detect(
    pipe: LDMPipeline,
    captions: list[str],
    *,
    resolution: int,
    cfg: float = 7.5,
    steps: int = 20,
    sampler: str = "dpmpp_2m",
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> list[tuple[Scene, Scene]]:
    """Generate one image per caption (image k seeded seed + k) and detect what it shows: a
    (prompt scene, detected scene) pair per caption."""
    images = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        images.append(pipe.generate(chunk, cfg=cfg, steps=steps, sampler=sampler, seed=seed + start, height=resolution,
                                    width=resolution, output_type="tensor", progress=progress))
    return detect_all(torch.cat(images), captions, value_range=(0.0, 1.0))


def prompt_adherence(pipe: LDMPipeline, captions: list[str], **kwargs) -> dict[str, float]:
    """Share of generated images agreeing with their caption, per attribute (`summarize`); keyword
    arguments as for `generate_and_detect`."""
    return summarize(generate_and_detect(pipe, captions, **kwargs))
