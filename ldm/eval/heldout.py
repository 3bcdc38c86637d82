"""Evaluation on held-out data: denoising loss at fixed timesteps, and prompt adherence on the
built-in shapes data (generate from held-out captions, detect what was drawn, compare).

Both are deterministic for a given checkpoint: the held-out items, the noise, and the sampling
seeds are fixed, so two checkpoints are compared on exactly the same work.
"""

from __future__ import annotations

import torch

from ..data.shapes import Scene, ShapesDataset
from ..diffusion import diffusion_loss, q_sample
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
    with fixed noise."""
    device, dtype = pipe.device, pipe.dtype
    totals = {t: 0.0 for t in timesteps}
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        if "latent" in chunk[0]:  # cached posterior means (data.source=latents)
            z = torch.stack([it["latent"] for it in chunk]).to(device).float() * pipe.vae.scaling_factor
        else:
            images = torch.stack([it["image"] for it in chunk]).to(device, dtype)
            z = pipe.vae.encode(images).mean.float() * pipe.vae.scaling_factor
        context = pipe.text_encoder([it["caption"] for it in chunk]).to(dtype)  # as training encodes captions
        for t in timesteps:
            g = torch.Generator().manual_seed(seed * 1000 + t + start)
            noise = torch.randn(z.shape, generator=g).to(device)
            tt = torch.full((len(chunk),), t, device=device, dtype=torch.long)
            x_t = q_sample(z, tt, noise, pipe.schedule)
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
