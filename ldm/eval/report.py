"""Pictures of an evaluation: per-attribute confusion matrices and cross-attention maps, as PIL images.

`confusion_image` draws what `ldm.eval.adherence.confusion` counted: one panel per attribute, a row
per value asked for, a column per value drawn, each cell shaded by its share of the row and
labelled with it in percent, so a user sees at a glance which words the model mixes up.
`attention_image` lays out `ldm.eval.probes.cross_attention_maps` as layers x words;
`save_figure` writes either as a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..atomic import atomic_path

_CELL = 30  # pixels per matrix cell
_FONT_SIZE = 11
_PAD = 8


def _font(size: int = _FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _shade(share: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    s = min(max(share, 0.0), 1.0)
    return (int(255 - 215 * s), int(255 - 175 * s), int(255 - 55 * s))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    return int(draw.textlength(text, font=font))


def _panel(title: str, asked: Sequence[str], drawn: Sequence[str], counts: np.ndarray) -> Image.Image:
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(_text_width(probe, a, font) for a in asked) + _PAD
    top = max(_text_width(probe, d, font) for d in drawn) + 2 * _PAD + _FONT_SIZE + 4
    w = max(left + _CELL * len(drawn), _text_width(probe, title, _font(_FONT_SIZE + 1))) + 2 * _PAD
    h = top + _CELL * len(asked) + _PAD
    im = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(im)
    draw.text((_PAD // 2, 2), title, fill="black", font=_font(_FONT_SIZE + 1))
    for j, label in enumerate(drawn):  # column labels written bottom-up
        lab = Image.new("RGB", (_text_width(probe, label, font) + 2, _FONT_SIZE + 4), "white")
        ImageDraw.Draw(lab).text((1, 0), label, fill="black", font=font)
        lab = lab.rotate(90, expand=True)
        im.paste(lab, (left + j * _CELL + (_CELL - lab.width) // 2, top - lab.height - 2))
    rows = counts.sum(1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    for i, label in enumerate(asked):
        y = top + i * _CELL
        draw.text((left - _PAD // 2 - _text_width(draw, label, font), y + (_CELL - _FONT_SIZE) // 2), label,
                  fill="black", font=font)
        for j in range(len(drawn)):
            x = left + j * _CELL
            draw.rectangle([x, y, x + _CELL - 1, y + _CELL - 1], fill=_shade(shares[i, j]), outline=(220, 220, 220))
            if counts[i, j]:
                text = f"{round(100 * shares[i, j])}"
                colour = "white" if shares[i, j] > 0.55 else "black"
                draw.text((x + (_CELL - _text_width(draw, text, font)) // 2, y + (_CELL - _FONT_SIZE) // 2), text,
                          fill=colour, font=font)
    return im


def confusion_image(confusions: Mapping[str, tuple[Sequence[str], Sequence[str], np.ndarray]],
                    title: str = "") -> Image.Image:
    """All attributes' confusion matrices side by side (two rows of panels), under `title` and a
    legend."""
    title = f"{title}{'; ' if title else ''}rows: asked, columns: drawn, numbers: % of the row"
    panels = [_panel(f"{attr} ({_diagonal_share(a, d, c):.0%} of {'objects' if len(d) > len(a) else 'images'} right)", a, d, c) for attr, (a, d, c) in confusions.items()]
    per_row = (len(panels) + 1) // 2
    rows = [panels[i : i + per_row] for i in range(0, len(panels), per_row)]
    head = _FONT_SIZE + 10
    width = max(sum(p.width for p in r) for r in rows)
    heights = [max(p.height for p in r) for r in rows]
    im = Image.new("RGB", (width, head + sum(heights)), "white")
    ImageDraw.Draw(im).text((_PAD, 3), title, fill="black", font=_font(_FONT_SIZE + 2))
    y = head
    for r, h in zip(rows, heights):
        x = 0
        for p in r:
            im.paste(p, (x, y))
            x += p.width
        y += h
    return im


def _diagonal_share(asked: Sequence[str], drawn: Sequence[str], counts: np.ndarray) -> float:
    right = sum(counts[i, list(drawn).index(a)] for i, a in enumerate(asked))
    return right / max(1, counts.sum())


def attention_image(maps: Sequence[tuple[str, torch.Tensor]], words: Sequence[tuple[str, Sequence[int]]],
                    scale: int = 4) -> Image.Image:
    """Cross-attention of one caption: a row per layer (`(name, (L, h, w))` from
    `cross_attention_maps`, one batch item), a column per word (its tokens' weights summed), each
    map normalised to its own maximum and upsampled to the largest layer's size times `scale`."""
    font = _font()
    side = max(m.shape[-1] for _, m in maps) * scale
    names = [name.replace(".transformer_blocks.0.attn2", "") for name, _ in maps]
    label_w = max(len(n) for n in names) * 7 + _PAD
    head = _FONT_SIZE + 8
    im = Image.new("RGB", (label_w + len(words) * (side + 2), head + len(maps) * (side + 2)), "white")
    draw = ImageDraw.Draw(im)
    for j, (word, _) in enumerate(words):
        draw.text((label_w + j * (side + 2) + 2, 2), word, fill="black", font=font)
    for i, ((_, m), name) in enumerate(zip(maps, names)):
        y = head + i * (side + 2)
        draw.text((2, y + side // 2 - _FONT_SIZE // 2), name, fill="black", font=font)
        for j, (_, ix) in enumerate(words):
            a = m[list(ix)].sum(0).float()
            a = (a / a.max().clamp_min(1e-12) * 255).round().to(torch.uint8).numpy()
            tile = Image.fromarray(a, mode="L").resize((side, side), Image.NEAREST)
            im.paste(tile.convert("RGB"), (label_w + j * (side + 2), y))
    return im


def save_figure(image: Image.Image, path: str | Path) -> Path:
    """Write a figure as a PNG atomically, creating its folder (no generation settings: it is no sample)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, fsync=False) as tmp:
        image.save(tmp, format="PNG")
    return path
