"""Probes of where prompt following breaks in a shapes model: text embedding, cross-attention, latent, loss.

Each answers one question about a trained `LDMPipeline` on the built-in shapes data
(`ldm.data.shapes`), with numbers rather than pictures alone:

- `text_separation`: how far apart does the text encoder put two captions that differ in one
  attribute (relative to two unrelated captions), and can a linear read-out of its output recover
  each attribute (`linear_readout`)? Information the encoder drops cannot reach the image.
- `attention_on_cell`: at a noise level where the object is not yet visible in x_t, does the
  cross-attention of each word put more weight on the pixels of the object's grid cell than
  elsewhere, at each U-Net level? `cross_attention_maps` returns the maps themselves (for pictures).
- `reconstruction_adherence`: does the autoencoder's latent carry each attribute: the detector's
  verdict on the reconstructions of every single-object scene, per size and shape.
- `swap_loss`: does the U-Net use an attribute: its denoising loss with one attribute of the
  caption swapped for another value, relative to the true caption, per timestep. 1.0 means the
  model ignores that word at that noise level.
- `noise_prior`: what does the text alone make the model draw: its prediction of the clean image
  from pure noise at the last timestep, where sampling starts and nothing but the caption says
  where the object goes (the optimum is the scene itself: a caption fixes every pixel).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch

from ..data.shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, Shape, render_array, sample_scene
from ..diffusion import diffusion_loss, pred_to_x0, q_sample
from ..models.attention import CrossAttention
from ..pipeline import LDMPipeline
from .adherence import detect, score

OBJECT_ATTRIBUTES = ("colour", "shape", "size", "position")
VOCABULARY = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS),
              "background": list(BACKGROUNDS)}


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(f"probe/{seed}")
    return [sample_scene(rng, 1) for _ in range(n)]


def _value(scene: Scene, attr: str) -> str:
    return scene.background if attr == "background" else getattr(scene.objects[0], attr)


def swapped(scene: Scene, attr: str, rng: random.Random) -> Scene:
    """The single-object `scene` with `attr` changed to another value drawn from `rng`."""
    current = _value(scene, attr)
    other = rng.choice([v for v in VOCABULARY[attr] if v != current])
    if attr == "background":
        return Scene(scene.objects, other)
    return Scene([replace(scene.objects[0], **{attr: other})], scene.background)


# ---------------------------------------------------------------------------------------------
# Text


@torch.inference_mode()
def _encode(pipe: LDMPipeline, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    return torch.cat([pipe.encode_prompt(captions[i : i + batch_size]).float().cpu()
                      for i in range(0, len(captions), batch_size)])  # (N, L, D)


def text_separation(pipe: LDMPipeline, n: int = 256, seed: int = 0) -> dict[str, float]:
    """Per attribute: mean distance between the contexts of a caption and of the same caption with
    that attribute swapped, divided by the mean distance between two unrelated captions. Near 0:
    the encoder barely tells those words apart."""
    rng = random.Random(f"separation/{seed}")
    scenes = _scenes(n, seed)
    base = _encode(pipe, [s.caption() for s in scenes])
    unrelated = torch.linalg.vector_norm(base - base.roll(1, 0), dim=(1, 2)).mean()
    out = {}
    for attr in VOCABULARY:
        other = _encode(pipe, [swapped(s, attr, rng).caption() for s in scenes])
        out[attr] = float(torch.linalg.vector_norm(base - other, dim=(1, 2)).mean() / unrelated)
    return out


def linear_readout(pipe: LDMPipeline, n_train: int = 1024, n_test: int = 256, ridge: float = 1e-2,
                   seed: int = 0) -> dict[str, dict[str, float]]:
    """Held-out accuracy of ridge-regression read-outs of each attribute from the text context.

    Features: "last" (the final position's state: padding comes after the caption, and under the
    causal mask it is the one state that has seen the whole caption), "mean" (the mean over all
    positions) and "all" (every position's state, concatenated). Returns {feature: {attr: acc}}."""
    scenes = _scenes(n_train + n_test, seed + 1)
    ctx = _encode(pipe, [s.caption() for s in scenes])  # (N, L, D)
    features = {"last": ctx[:, -1], "mean": ctx.mean(1), "all": ctx.flatten(1)}
    out: dict[str, dict[str, float]] = {}
    for name, x in features.items():
        x = x.double()
        x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        xtr, xte = x[:n_train], x[n_train:]
        out[name] = {}
        for attr, values in VOCABULARY.items():
            labels = torch.tensor([values.index(_value(s, attr)) for s in scenes])
            y = torch.nn.functional.one_hot(labels[:n_train], len(values)).double()
            # Solve in the smaller of the two Gram forms: w = X^T (X X^T + r I)^-1 y.
            gram = xtr @ xtr.T + ridge * len(xtr) * torch.eye(len(xtr), dtype=x.dtype)
            w = xtr.T @ torch.linalg.solve(gram, y)
            out[name][attr] = float(((xte @ w).argmax(1) == labels[n_train:]).double().mean())
    return out


# ---------------------------------------------------------------------------------------------
# Cross-attention


def word_tokens(pipe: LDMPipeline, caption: str) -> list[tuple[str, list[int]]]:
    """(word, context indices of its tokens) for each space-separated word of `caption`; index 0
    is the start token."""
    tok = pipe.text_encoder.tokenizer
    out, pos = [], 1
    for word in caption.split():
        n = len(tok.encode(word))
        out.append((word.strip(","), list(range(pos, pos + n))))
        pos += n
    return out


class _AttentionRecorder:
    """Forward hooks on every cross-attention layer: keep softmax(q k^T / sqrt(d)), head-averaged."""

    def __init__(self, unet: torch.nn.Module):
        self.maps: list[tuple[str, torch.Tensor]] = []
        self.hooks = [m.register_forward_hook(self._hook(name)) for name, m in unet.named_modules()
                      if isinstance(m, CrossAttention) and name.endswith("attn2")]

    def _hook(self, name: str):
        def hook(module: CrossAttention, args, _output) -> None:
            x, context = args[0], args[1]
            if module.fused is not None:
                raise ValueError("attention maps need unfused projections (pipe.unet has fused ones)")
            q, k = module._split_heads(module.to_q(x)), module._split_heads(module.to_k(context))  # (B, h, N|L, d)
            p = ((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)  # (B, h, N, L)
            self.maps.append((name, p.mean(1)))  # (B, N, L)
        return hook

    def __enter__(self) -> _AttentionRecorder:
        return self

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


@torch.inference_mode()
def cross_attention_maps(pipe: LDMPipeline, scenes: Sequence[Scene], t: int, seed: int = 0,
                         resolution: int | None = None) -> list[tuple[str, torch.Tensor]]:
    """(layer name, (B, L, h, w) attention of each context position over the pixels) for every
    cross-attention layer, for the scenes' latents noised to timestep `t` (fixed noise)."""
    res = resolution or pipe.defaults.height
    images = torch.stack([torch.from_numpy(render_array(s, res)).permute(2, 0, 1) for s in scenes])
    images = images.float().div(127.5).sub(1).to(pipe.device, pipe.dtype)
    z = pipe.vae.encode(images).mean.float() * pipe.vae.scaling_factor
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.device)
    tt = torch.full((len(scenes),), t, device=z.device, dtype=torch.long)
    x_t = q_sample(z, tt, noise, pipe.schedule)
    context = pipe.encode_prompt([s.caption() for s in scenes])
    with _AttentionRecorder(pipe.unet) as rec:
        pipe.unet(x_t.to(pipe.dtype), tt, context)
    out = []
    for name, p in rec.maps:
        n = p.shape[1]
        side = int(round(n**0.5))
        out.append((name, p.transpose(1, 2).reshape(len(scenes), -1, side, side).cpu()))
    return out


def _cell_mask(position: str, side: int) -> torch.Tensor:
    row, col = POSITIONS[position]
    idx = (torch.arange(side) + 0.5) * 3 / side
    return (idx.floor() == row)[:, None] & (idx.floor() == col)[None, :]


def attention_on_cell(pipe: LDMPipeline, n: int = 64, t: int = 800, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per cross-attention layer and word group (colour, shape, size, position words, the padding
    after the caption): the mean attention weight on the object's grid cell divided by that on the
    rest of the image. 1.0: the word is read the same everywhere, so it cannot say where to draw."""
    scenes = _scenes(n, seed + 2)
    maps = cross_attention_maps(pipe, scenes, t, seed)
    out: dict[str, dict[str, float]] = {}
    groups = ("colour", "shape", "size", "position", "padding")
    for name, m in maps:  # m: (B, L, h, w)
        ratios = {g: [] for g in groups}
        for b, scene in enumerate(scenes):
            obj = scene.objects[0]
            cell = _cell_mask(obj.position, m.shape[-1])
            words = word_tokens(pipe, scene.caption())
            where = {"colour": [i for w, ix in words if w == obj.colour for i in ix],
                     "shape": [i for w, ix in words if w == obj.shape for i in ix],
                     "size": [i for w, ix in words if w == obj.size for i in ix],
                     "position": [i for w, ix in words if w in obj.position.split() for i in ix],
                     "padding": list(range(words[-1][1][-1] + 2, m.shape[1]))}  # after the end token
            for g, ix in where.items():
                if ix:
                    a = m[b, ix].sum(0)  # (h, w)
                    ratios[g].append(float(a[cell].mean() / a[~cell].mean().clamp_min(1e-12)))
        out[name] = {g: float(np.mean(v)) for g, v in ratios.items() if v}
    return out


# ---------------------------------------------------------------------------------------------
# Latent


@torch.inference_mode()
def reconstruction_adherence(vae: torch.nn.Module, resolution: int, batch_size: int = 128) -> dict[str, float]:
    """The detector's verdict on `vae`'s reconstructions (from the posterior means) of every
    single-object scene (each shape, colour, size and cell on each background): {attribute: share
    right} overall, plus "shape/<size> <shape>" per size and shape."""
    res = resolution
    param = next(vae.parameters())
    scenes = [Scene([Shape(sh, c, sz, p)], bg) for bg in BACKGROUNDS for c in COLOURS for sh in SHAPES
              for sz in SIZES for p in POSITIONS]
    totals: dict[str, list[bool]] = {}
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i : i + batch_size]
        x = torch.stack([torch.from_numpy(render_array(s, res)).permute(2, 0, 1) for s in chunk])
        x = x.float().div(127.5).sub(1).to(param.device, param.dtype)
        rec = vae.decode(vae.encode(x).mean).float().clamp(-1, 1).cpu()
        for scene, img in zip(chunk, rec):
            got = score(scene, detect(img, value_range=(-1.0, 1.0)))
            for attr, ok in got.items():
                totals.setdefault(attr, []).append(ok)
            o = scene.objects[0]
            totals.setdefault(f"shape/{o.size} {o.shape}", []).append(got["shape"])
    return {k: float(np.mean(v)) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------
# Loss


@torch.inference_mode()
def swap_loss(pipe: LDMPipeline, n: int = 128, timesteps: Sequence[int] = (100, 300, 500, 700, 900),
              seed: int = 0, batch_size: int = 64) -> dict[str, dict[int, float]]:
    """{attribute: {t: loss with that attribute of the caption swapped / loss with the true
    caption}} on n single-object scenes, same noise for both."""
    res = pipe.defaults.height
    scenes = _scenes(n, seed + 3)
    rng = random.Random(f"swap/{seed}")
    variants = {"true": scenes, **{a: [swapped(s, a, rng) for s in scenes] for a in VOCABULARY}}
    losses = {k: {t: 0.0 for t in timesteps} for k in variants}
    for i in range(0, n, batch_size):
        chunk = scenes[i : i + batch_size]
        x = torch.stack([torch.from_numpy(render_array(s, res)).permute(2, 0, 1) for s in chunk])
        x = x.float().div(127.5).sub(1).to(pipe.device, pipe.dtype)
        z = pipe.vae.encode(x).mean.float() * pipe.vae.scaling_factor
        for name, vs in variants.items():
            context = pipe.encode_prompt([s.caption() for s in vs[i : i + batch_size]])
            for t in timesteps:
                noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed * 1000 + t + i)).to(z.device)
                tt = torch.full((len(chunk),), t, device=z.device, dtype=torch.long)
                pred = pipe.unet(q_sample(z, tt, noise, pipe.schedule).to(pipe.dtype), tt, context).float()
                loss = diffusion_loss(pred, z, noise, tt, pipe.schedule, pipe.diffusion.prediction_type)
                losses[name][t] += loss.item() * len(chunk)
    return {a: {t: losses[a][t] / losses["true"][t] for t in timesteps} for a in VOCABULARY}


@torch.inference_mode()
def noise_prior(pipe: LDMPipeline, n: int = 64, draws: int = 4, seed: int = 0) -> dict[str, float]:
    """The model's clean-image prediction from pure noise at the last timestep, averaged over
    `draws` noises and decoded, for n single-object captions. Per pixel, its distance from the
    caption's background colour (RGB, in [-1, 1] units) is the "ink" drawn there, and per grid
    cell its mean ink:

    contrast:    (ink on the object's cell - mean ink on the other cells) / the true scene's ink on
                 the object's cell. 0: the caption alone puts nothing in its place; 1: the object
                 at full colour (a uniform tint, e.g. a background a little off, cancels out);
    place_right: share of captions whose inkiest cell is the object's (1/9 when it is random).
    """
    res = pipe.defaults.height
    scenes = _scenes(n, seed + 4)
    context = pipe.encode_prompt([s.caption() for s in scenes])
    t = pipe.schedule.num_timesteps - 1
    tt = torch.full((n,), t, device=pipe.device, dtype=torch.long)
    alpha, sigma = pipe.schedule.alpha_sigma(tt)  # (n,), on tt's device; pred_to_x0 broadcasts them
    f, ch = pipe.vae.downsample_factor, pipe.unet.cfg.out_channels
    g = torch.Generator().manual_seed(seed)
    x0 = 0
    for _ in range(draws):
        x_t = torch.randn(n, ch, res // f, res // f, generator=g).to(pipe.device)  # unit variance: where sampling starts
        pred = pipe.unet(x_t.to(pipe.dtype), tt, context).float()
        x0 = x0 + pred_to_x0(pred, x_t, alpha, sigma, pipe.diffusion.prediction_type) / draws
    img = pipe.vae.decode((x0 / pipe.vae.scaling_factor).to(pipe.dtype)).float().clamp(-1, 1).cpu()
    cells = {p: _cell_mask(p, res) for p in POSITIONS}
    contrast, right = [], []
    for scene, im in zip(scenes, img):
        bg = torch.tensor(BACKGROUNDS[scene.background], dtype=torch.float32).div(127.5).sub(1)[:, None, None]
        truth = torch.from_numpy(render_array(scene, res)).permute(2, 0, 1).float().div(127.5).sub(1)
        ink, true_ink = (im - bg).norm(dim=0), (truth - bg).norm(dim=0)
        where = scene.objects[0].position
        per_cell = {p: float(ink[m].mean()) for p, m in cells.items()}
        others = np.mean([v for p, v in per_cell.items() if p != where])
        contrast.append((per_cell[where] - others) / float(true_ink[cells[where]].mean()))
        right.append(max(per_cell, key=per_cell.get) == where)
    return {"contrast": float(np.mean(contrast)), "place_right": float(np.mean(right)), "t": t}
