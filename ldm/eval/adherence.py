"""Shapes prompt adherence: detect the scene drawn in an image and score it against its prompt.

`detect` reads an image of the shapes world (`ldm.data.shapes`) back into a `Scene`:

1. background: per-channel median of the border pixels, snapped to the nearest background colour;
2. every pixel is labelled with the nearest of [background] + object colours; foreground = not the
   background label;
3. foreground pixels are grouped into 4-connected components; components smaller than a quarter of
   the smallest rendered object are specks and ignored;
4. a component holding two well-represented object colours (counted over its best-fitting pixels, so
   the mixed colours on blurred edges do not count) is split by colour, and one wider than a grid
   cell is split by grid cell (two objects run together);
5. per object: colour = nearest object colour to the per-channel median of its best-fitting half of
   pixels; position = grid cell of its centroid; size = bounding-box side vs the midpoint of small
   and large; shape = triangle when less than 0.4 of its mass lies above the box's middle (an upward
   triangle has 1/4, a circle or square 1/2), else square when more than 1/4 of the box's corner
   regions (|u| + |v| > 1.45 in box coordinates u, v in [-1, 1]) is filled (circle: none, as a circle
   never gets past |u| + |v| = sqrt(2); square: all), else circle.

On rendered images every pixel is exactly a palette colour, so detection is exact at every resolution
from 24 px up (tested for every object in every cell); on generated images the nearest-colour
labelling, the speck threshold and the medians keep it robust to noise and blur.

`score` compares a detected scene with the prompt's; `adherence` averages scores over images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..data.shapes import BACKGROUNDS, COLOURS, GRID, POSITIONS, SHAPES, SIZES, Scene, Shape, parse_caption

ATTRIBUTES = ("colour", "shape", "size", "position", "count", "background", "all")

_OBJECT_NAMES = list(COLOURS)
_OBJECT_RGB = np.array([COLOURS[c] for c in _OBJECT_NAMES], dtype=np.float32)  # (K, 3)
_BACKGROUND_NAMES = list(BACKGROUNDS)
_BACKGROUND_RGB = np.array([BACKGROUNDS[c] for c in _BACKGROUND_NAMES], dtype=np.float32)  # (B, 3)
_POSITION_NAMES = {rc: name for name, rc in POSITIONS.items()}
_SIZE_THRESHOLD = (SIZES["small"] + SIZES["large"]) / 2  # bounding-box side / cell side
_TRIANGLE_TOP_MASS = 0.4  # share of mass above the box's middle: triangle 0.25 (<= 1/3 when tiny), else 0.5
_CORNER = 1.45  # |u| + |v| beyond which a box point is in a corner region (circle: at most sqrt(2))
_SQUARE_CORNERS = 0.25  # share of corner regions filled: circle 0, square 1 (blur rounds its corners)
_SQUARE_FILL = 0.9  # boxes too small to have corner regions: share filled (square 1)
_CONFIDENT_DISTANCE = 30.0  # RGB distance (0..255) within which a pixel surely has its colour
_DOMINANT_SHARE = 0.25  # a colour with this share of a component's confident pixels is an object
_CELL_SPLIT_EXTENT = 1.15  # a component wider than this many cells is two objects run together
_CELL_SHARE = 0.2  # ... and each cell with this share of its pixels holds one of them


def to_rgb_array(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """float32 (H, W, 3) in 0..255 from a PIL image, a uint8 (H, W, 3) array, or a float tensor/array
    (3, H, W). A float input is read in `value_range`; by default [-1, 1] when it has negative values,
    else [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, torch.Tensor):
        image = image.detach().to("cpu", torch.float32).numpy()
    a = np.asarray(image)
    if a.dtype == np.uint8:
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"a uint8 image must be (H, W, 3) (got {a.shape})")
        return a.astype(np.float32)
    if a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"a float image must be (3, H, W) (got {a.shape}); pass batches as a list or (B, 3, H, W)")
    lo, hi = value_range if value_range is not None else ((-1.0, 1.0) if a.min() < 0 else (0.0, 1.0))
    a = (a.astype(np.float32) - lo) * (255.0 / (hi - lo))
    return np.clip(a, 0.0, 255.0).transpose(1, 2, 0)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask: (labels int64 (H, W), -1 off the mask; count).

    Min-label propagation with pointer jumping, all in numpy: each round every pixel takes the
    smallest label among itself and its neighbours, then follows label -> label's label to the root.
    """
    h, w = mask.shape
    big = h * w
    lab = np.where(mask, np.arange(big).reshape(h, w), big)
    fg = np.flatnonzero(mask)
    if fg.size == 0:
        return np.full((h, w), -1, dtype=np.int64), 0
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = big
        flat = new.reshape(-1)
        while True:  # pointer jumping; labels of foreground pixels are foreground pixel indices
            jumped = flat[flat[fg]]
            if np.array_equal(jumped, flat[fg]):
                break
            flat[fg] = jumped
        if np.array_equal(new, lab):
            break
        lab = new
    roots, dense = np.unique(lab[mask], return_inverse=True)
    out = np.full((h, w), -1, dtype=np.int64)
    out[mask] = dense
    return out, len(roots)


def _nearest(rgb: np.ndarray, palette: np.ndarray) -> int:
    return int(np.argmin(((palette - rgb) ** 2).sum(-1)))


def _describe(ys: np.ndarray, xs: np.ndarray, rgb: np.ndarray, fit: np.ndarray, cell: float) -> tuple[Shape, int]:
    """One object from its pixels' rows, columns, colours (N, 3) and squared distances to their
    nearest palette colour (N,); returns it with its area."""
    n = len(ys)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    # Colour from the best-fitting half of the pixels: on blurred edges the object's colour mixes
    # with the background's, and on a small object edges are much of its area.
    core = fit <= np.median(fit)
    colour = _OBJECT_NAMES[_nearest(np.median(rgb[core], axis=0), _OBJECT_RGB)]
    row = min(GRID - 1, int((ys.mean() + 0.5) // cell))
    col = min(GRID - 1, int((xs.mean() + 0.5) // cell))
    size = "large" if max(bh, bw) / cell >= _SIZE_THRESHOLD else "small"
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    top = (np.count_nonzero(ys < cy) + 0.5 * np.count_nonzero(ys == cy)) / n
    # Corner regions of the box, |u| + |v| > 1.45 in box coordinates u, v in [-1, 1]: a circle never
    # reaches them (its maximum is sqrt(2)), a square fills them.
    u, v = np.meshgrid((np.arange(x0, x1 + 1) - cx) / (bw / 2), (np.arange(y0, y1 + 1) - cy) / (bh / 2))
    corner = np.abs(u) + np.abs(v) > _CORNER
    filled = np.zeros((bh, bw), dtype=bool)
    filled[ys - y0, xs - x0] = True
    corner_fill = filled[corner].mean() if corner.any() else float(n / (bh * bw) >= _SQUARE_FILL)
    if top < _TRIANGLE_TOP_MASS:
        shape = "triangle"
    elif corner_fill > _SQUARE_CORNERS:
        shape = "square"
    else:
        shape = "circle"
    return Shape(shape, colour, size, _POSITION_NAMES[(row, col)]), n


def _split_by_cell(ys, xs, cell: float) -> list[np.ndarray]:
    """Index arrays of the pixels in each grid cell that holds a real share of a too-wide component."""
    rows = np.minimum(GRID - 1, (ys + 0.5) // cell).astype(int)
    cols = np.minimum(GRID - 1, (xs + 0.5) // cell).astype(int)
    cells = rows * GRID + cols
    counts = np.bincount(cells, minlength=GRID * GRID)
    keep = np.flatnonzero(counts >= _CELL_SHARE * len(ys))
    return [np.flatnonzero(cells == c) for c in keep]


def detect(image, max_objects: int = 2, value_range: tuple[float, float] | None = None) -> Scene:
    """The scene drawn in `image` (PIL, uint8 (H, W, 3), or float (3, H, W) in [0, 1] / [-1, 1]):
    at most `max_objects` objects (the largest), in reading order. See the module docstring."""
    rgb = to_rgb_array(image, value_range)  # (H, W, 3)
    h, w, _ = rgb.shape
    if h != w:
        raise ValueError(f"detect expects a square image (got {h}x{w}); crop or resize it to a square")
    cell = h / GRID

    b = max(1, h // 64)
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    bg = _nearest(np.median(border, axis=0), _BACKGROUND_RGB)

    palette = np.concatenate([_BACKGROUND_RGB[bg : bg + 1], _OBJECT_RGB])  # (1 + K, 3)
    # (H, W, 1 + K) squared distances |x|^2 - 2 x.p + |p|^2; exact in float32 for 0..255 integers
    d2 = (rgb * rgb).sum(-1, keepdims=True) - 2 * (rgb @ palette.T) + (palette * palette).sum(-1)
    np.maximum(d2, 0, out=d2)
    label = d2.argmin(-1)  # 0 = background, k = object colour k - 1
    best = np.take_along_axis(d2, label[..., None], -1)[..., 0]
    comps, n = connected_components(label > 0)

    smallest_area = 0.5 * (SIZES["small"] * cell) ** 2  # a small triangle
    min_area = max(3.0, 0.25 * smallest_area)
    areas = np.bincount(comps[comps >= 0], minlength=n)
    found: list[tuple[Shape, int]] = []
    for c in np.flatnonzero(areas >= min_area):
        ys, xs = np.nonzero(comps == c)
        labs, dist = label[ys, xs], best[ys, xs]
        # Colours present in the component, counted over its best-fitting pixels only.
        confident = dist <= max(_CONFIDENT_DISTANCE**2, float(np.median(dist)))
        counts = np.bincount(labs[confident], minlength=len(palette))
        dominant = [k for k in np.flatnonzero(counts) if k > 0
                    and counts[k] >= max(_DOMINANT_SHARE * confident.sum(), 0.5 * min_area)]
        pieces = [np.arange(len(ys))]
        if len(dominant) > 1:  # two objects of different colours touch: split by nearest dominant colour
            owner = np.asarray(dominant)[d2[ys, xs][:, dominant].argmin(-1)]
            pieces = []
            for k in dominant:
                sub = np.zeros((h, w), dtype=bool)
                sub[ys[owner == k], xs[owner == k]] = True
                sub_comps, m = connected_components(sub)
                if m:
                    largest = np.bincount(sub_comps[sub_comps >= 0]).argmax()
                    in_largest = sub_comps[ys, xs] == largest
                    pieces.append(np.flatnonzero(in_largest))
        for p in pieces:
            py, px = ys[p], xs[p]
            extent = max(py.max() - py.min() + 1, px.max() - px.min() + 1) / cell
            parts = [p]
            if max_objects > 1 and extent > _CELL_SPLIT_EXTENT:  # same-colour objects run together
                parts = [p[q] for q in _split_by_cell(py, px, cell)] or [p]
            for q in parts:
                if len(q) >= min_area:
                    found.append(_describe(ys[q], xs[q], rgb[ys[q], xs[q]], dist[q], cell))

    # The largest objects, one per cell (generated images may put two in one cell), in reading order.
    by_cell: dict[str, Shape] = {}
    for obj, _ in sorted(found, key=lambda f: -f[1]):
        if len(by_cell) < max_objects:
            by_cell.setdefault(obj.position, obj)
    objects = [by_cell[p] for p in POSITIONS if p in by_cell]
    return Scene(objects, _BACKGROUND_NAMES[bg])


def _match(prompt: Scene, detected: Scene) -> list[Shape | None]:
    """For each prompt object, the detected object it is compared with: the one in the same cell,
    else an unused one of the same colour, else None."""
    by_cell = {o.position: o for o in detected.objects}
    used: set[int] = set()
    matched: list[Shape | None] = [None] * len(prompt.objects)
    for i, p in enumerate(prompt.objects):
        if p.position in by_cell:
            matched[i] = by_cell[p.position]
            used.add(id(matched[i]))
    for i, p in enumerate(prompt.objects):
        if matched[i] is None:
            for d in detected.objects:
                if id(d) not in used and d.colour == p.colour:
                    matched[i] = d
                    used.add(id(d))
                    break
    return matched


def score(prompt: Scene, detected: Scene) -> dict[str, bool]:
    """Per-attribute agreement of a detected scene with the prompt's scene.

    Each prompt object is matched to the detected object in its grid cell, else to an unused detected
    object of its colour, else to nothing. colour / shape / size / position: every prompt object has a
    match and the match agrees on that attribute (position agrees only for a same-cell match).
    count: as many objects detected as prompted. background: same background. all: everything above.
    """
    matched = _match(prompt, detected)
    result = {
        attr: all(m is not None and getattr(m, attr) == getattr(p, attr) for p, m in zip(prompt.objects, matched))
        for attr in ("colour", "shape", "size", "position")
    }
    result["count"] = len(detected.objects) == len(prompt.objects)
    result["background"] = detected.background == prompt.background
    result["all"] = all(result.values())
    return result


def detect_all(images: Sequence | torch.Tensor, prompts: Sequence[str | Scene],
               value_range: tuple[float, float] | None = None) -> list[tuple[Scene, Scene]]:
    """(prompt's scene, detected scene) for each image. `images`: a list of images `detect` accepts,
    or a (B, 3, H, W) tensor; `prompts`: captions (parsed with `parse_caption`) or scenes."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts; pass one prompt per image")
    pairs = []
    for image, prompt in zip(images, prompts):
        want = parse_caption(prompt) if isinstance(prompt, str) else prompt
        pairs.append((want, detect(image, max_objects=max(2, len(want.objects)), value_range=value_range)))
    return pairs


def summarize(pairs: Sequence[tuple[Scene, Scene]]) -> dict[str, float]:
    """Fraction of (prompt, detected) pairs agreeing, per attribute of `score` (keys `ATTRIBUTES`),
    plus "n", the number of pairs."""
    totals = dict.fromkeys(ATTRIBUTES, 0)
    for want, got in pairs:
        for attr, ok in score(want, got).items():
            totals[attr] += ok
    n = len(pairs)
    return {**{attr: totals[attr] / n if n else 0.0 for attr in ATTRIBUTES}, "n": float(n)}


def adherence(images: Sequence | torch.Tensor, prompts: Sequence[str | Scene],
              value_range: tuple[float, float] | None = None) -> dict[str, float]:
    """Fraction of images agreeing with their prompt, per attribute of `score` (keys `ATTRIBUTES`),
    plus "n", the number of images. Arguments as for `detect_all`."""
    return summarize(detect_all(images, prompts, value_range))


CONFUSION_LABELS = {
    "colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES),
    "position": list(POSITIONS), "background": list(BACKGROUNDS), "count": ["0", "1", "2", "3+"],
}


def confusion(pairs: Sequence[tuple[Scene, Scene]]) -> dict[str, tuple[list[str], list[str], np.ndarray]]:
    """What was drawn when X was asked for, per attribute: {attr: (asked labels, drawn labels,
    counts (asked, drawn))}. Object attributes compare each prompt object with its match (as `score`
    does); a prompt object with no match is drawn as "none"."""
    out = {}
    for attr, labels in CONFUSION_LABELS.items():
        drawn = labels + (["none"] if attr in ("colour", "shape", "size", "position") else [])
        out[attr] = (labels, drawn, np.zeros((len(labels), len(drawn)), dtype=np.int64))
    for want, got in pairs:
        for attr in ("colour", "shape", "size", "position"):
            labels, drawn, counts = out[attr]
            for p, m in zip(want.objects, _match(want, got)):
                counts[labels.index(getattr(p, attr)), drawn.index(getattr(m, attr) if m else "none")] += 1
        labels, _, counts = out["background"]
        counts[labels.index(want.background), labels.index(got.background)] += 1
        out["count"][2][min(len(want.objects), 3), min(len(got.objects), 3)] += 1
    return out
