"""Built-in synthetic dataset: coloured shapes on a plain background, with captions and exact ground truth.

A scene is 1..k objects (default at most 1 for training, 2 for evaluation), each in its own cell of a
3x3 grid, on one of three background colours. Everything is drawn with hard-edged numpy masks (no
anti-aliasing), so every pixel is exactly one palette colour and `ldm.eval.adherence.detect` recovers
the scene exactly from a rendered image. The same scenes serve as prompts for the prompt-adherence
metric: generate from `caption()`, detect what was drawn, compare with `parse_caption(prompt)`.

Vocabulary (every word appears in captions):
    colours      red, orange, yellow, green, cyan, blue, purple      (objects only)
    backgrounds  white, black, gray                                   (never an object colour)
    shapes       circle, square, triangle (pointing up)
    sizes        small (0.45 of a cell side), large (0.85 of a cell side)
    positions    top left, top, top right, left, center, right, bottom left, bottom, bottom right

Caption grammar (deterministic; objects in reading order, the order `sample_scene` produces):
    caption  := (object (" and " object)* | "nothing") ", on a " BACKGROUND " background"
    object   := "a " SIZE " " COLOUR " " SHAPE " " PLACE
    PLACE    := "at the top left" | "at the top" | "at the top right" | "on the left" | "in the center"
              | "on the right" | "at the bottom left" | "at the bottom" | "at the bottom right"
e.g. "a small red circle at the top left and a large blue triangle on the right, on a white background".

Held-out combinations: `HELDOUT_PAIRS` names six attribute pairs (three colour-shape, three
shape-position). A training stream drawn with `combinations="seen"` never shows an object holding
one; evaluation on `combinations="unseen"` shows only such objects, so a model trained that way is
scored on captions it cannot have memorised, only composed from words it knows.

Any resolution >= 16 renders; from 24 px up every shape keeps an outline the detector tells apart
(below that a small object is 2-3 pixels across).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

# Object colours, chosen far apart in RGB (nearest pair: orange/yellow, ~90 apart) and far from
# every background (nearest pair: purple/gray, ~100 apart).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "cyan": (40, 205, 220),
    "blue": (40, 70, 220),
    "purple": (150, 60, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle")
# Side of the shape's bounding box as a fraction of the grid cell's side.
SIZES: dict[str, float] = {"small": 0.45, "large": 0.85}
# Grid cells in reading order: name -> (row, col).
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
GRID = 3
# How a position reads in a caption.
PLACES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
SPLITS = ("train", "heldout")
# Attribute pairs that a model trained with `combinations="seen"` never sees together, so that the
# "unseen" scenes test whether it composes words it knows rather than recalling captions it read:
# one colour-shape pair per shape and one shape-position pair per shape. Every word, and every
# other pair of words, still occurs in training; 24% of single objects hold a held-out pair.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("orange", "circle"), ("cyan", "square"), ("purple", "triangle"),
    ("circle", "bottom left"), ("square", "top right"), ("triangle", "center"),
})
COMBINATIONS = ("all", "seen", "unseen")

Rng = random.Random | np.random.Generator


@dataclass
class Shape:
    """One object: a `shape` of a `colour` and `size`, centred in the grid cell named by `position`."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PLACES[self.position]}"

    @property
    def unseen(self) -> bool:
        """Whether the object holds a pair of `HELDOUT_PAIRS` (never shown with `combinations="seen"`)."""
        return (self.colour, self.shape) in HELDOUT_PAIRS or (self.shape, self.position) in HELDOUT_PAIRS


@dataclass
class Scene:
    """Objects (each in its own grid cell) on a plain `background`."""

    objects: list[Shape]
    background: str

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {list(BACKGROUNDS)}")
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must be in distinct grid cells (got positions {cells})")

    def caption(self) -> str:
        """Natural text describing the scene; `parse_caption` inverts it."""
        objects = " and ".join(o.phrase() for o in self.objects) if self.objects else "nothing"
        return f"{objects}, on a {self.background} background"

    def to_dict(self) -> dict:
        """JSON-able ground truth: {"background": str, "objects": [{"shape", "colour", "size", "position"}]}."""
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls([Shape(**o) for o in d["objects"]], d["background"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        return cls.from_dict(json.loads(text))


def to_json(scene: Scene) -> str:
    return scene.to_json()


def from_json(text: str) -> Scene:
    return Scene.from_json(text)


# ----------------------------------------------------------------------------------------------
# Sampling


def _randrange(rng: Rng, n: int) -> int:
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    return int(rng.integers(n))


def _sample_without_replacement(rng: Rng, n: int, k: int) -> list[int]:
    if isinstance(rng, random.Random):
        return rng.sample(range(n), k)
    return [int(v) for v in rng.choice(n, size=k, replace=False)]


def sample_scene(rng: Rng, max_objects: int = 1, combinations: str = "all") -> Scene:
    """A random scene: 1..max_objects objects (uniform count) in distinct cells, listed in reading
    order; every attribute uniform and independent.

    `combinations="seen"` redraws an object's shape, colour and size until it holds no pair of
    `HELDOUT_PAIRS`; `"unseen"` until it holds one (uniform over the allowed objects in its cell
    either way). `"all"` draws exactly the stream it always has."""
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)} (got {max_objects})")
    if combinations not in COMBINATIONS:
        raise ValueError(f"combinations must be one of {COMBINATIONS} (got {combinations!r})")
    colours, sizes, positions = list(COLOURS), list(SIZES), list(POSITIONS)
    n = 1 + _randrange(rng, max_objects)
    cells = sorted(_sample_without_replacement(rng, len(positions), n))
    objects = []
    for c in cells:
        while True:
            obj = Shape(
                shape=SHAPES[_randrange(rng, len(SHAPES))],
                colour=colours[_randrange(rng, len(colours))],
                size=sizes[_randrange(rng, len(sizes))],
                position=positions[c],
            )
            # Terminates: every cell allows both kinds (the colour-shape pairs hold out no position).
            if combinations == "all" or obj.unseen == (combinations == "unseen"):
                break
        objects.append(obj)
    return Scene(objects, list(BACKGROUNDS)[_randrange(rng, len(BACKGROUNDS))])


# ----------------------------------------------------------------------------------------------
# Rendering


def cell_size(resolution: int) -> float:
    return resolution / GRID


def box_side(size: str, resolution: int) -> int:
    """Side in pixels of the bounding box of an object of `size`: SIZES[size] of a cell, rounded, and
    at least one pixel short of a cell so objects in neighbouring cells never touch."""
    cell = cell_size(resolution)
    return max(2, min(math.floor(SIZES[size] * cell + 0.5), math.floor(cell) - 1))


@lru_cache(maxsize=256)
def _outline(shape: str, side: int) -> np.ndarray:
    """(side, side) bool mask of a shape inscribed in a square of `side` pixels. A pixel belongs to the
    shape when its centre lies inside the exact outline; no anti-aliasing. The box is symmetric, so
    circle and square are too, and an upward triangle keeps 1/4 of its mass above the box's middle."""
    d = np.arange(side) + 0.5 - side / 2  # pixel centres relative to the box centre
    dy, dx = d[:, None], d[None, :]
    h = side / 2
    if shape == "circle":
        mask = dx * dx + dy * dy <= h * h
    elif shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "triangle":  # apex (0, -h), base from (-h, h) to (h, h)
        mask = 2 * np.abs(dx) <= dy + h
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
    mask.setflags(write=False)
    return mask


def shape_mask(shape: str, size: str, position: str, resolution: int) -> tuple[slice, slice, np.ndarray]:
    """(rows, cols, mask): where one object lies in a resolution x resolution image. Its bounding box
    is `box_side` pixels, centred in the grid cell (rounded to whole pixels); mask is read-only."""
    cell = cell_size(resolution)
    row, col = POSITIONS[position]
    side = box_side(size, resolution)
    y0 = math.floor((row + 0.5) * cell - side / 2 + 0.5)
    x0 = math.floor((col + 0.5) * cell - side / 2 + 0.5)
    return slice(y0, y0 + side), slice(x0, x0 + side), _outline(shape, side)


def render_array(scene: Scene, resolution: int) -> np.ndarray:
    """The scene as uint8 RGB of shape (resolution, resolution, 3)."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16 (got {resolution}); smaller shapes lose their outline")
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        rows, cols, mask = shape_mask(o.shape, o.size, o.position, resolution)
        img[rows, cols][mask] = COLOURS[o.colour]
    return img


def render(scene: Scene, resolution: int) -> Image.Image:
    """The scene as an RGB PIL image of resolution x resolution pixels."""
    return Image.fromarray(render_array(scene, resolution), mode="RGB")


# ----------------------------------------------------------------------------------------------
# Parsing captions


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SYNONYMS = {"grey": "gray", "centre": "center", "middle": "center", "top-left": "top left",
             "top-right": "top right", "bottom-left": "bottom left", "bottom-right": "bottom right"}
_OBJECT_RE = re.compile(
    rf"(?:a|an|one) (?P<size>{_alternatives(SIZES)}) (?P<colour>{_alternatives(COLOURS)}) "
    rf"(?P<shape>{_alternatives(SHAPES)}) (?:at|in|on) the (?P<position>{_alternatives(POSITIONS)})"
)
_CAPTION_RE = re.compile(
    rf"(?P<objects>.+?),? on an? (?P<background>{_alternatives(BACKGROUNDS)}) background"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes: the inverse of `Scene.caption()`.

    Tolerates case, extra spaces, a final full stop, "grey", "centre"/"middle", "an"/"one" and any
    of at/in/on before a position. Raises ValueError on anything else.
    """
    t = " ".join(text.lower().replace(",", " , ").split()).rstrip(".").strip()
    t = t.replace(" ,", ",")
    for word, canonical in _SYNONYMS.items():
        t = re.sub(rf"\b{re.escape(word)}\b", canonical, t)
    m = _CAPTION_RE.fullmatch(t)
    if m is None:
        raise ValueError(f"cannot parse caption {text!r}: expected '<objects>, on a <background> background' "
                         f"with a background in {list(BACKGROUNDS)}")
    objects = []
    parts = [] if m["objects"] == "nothing" else re.split(r",? and |, ", m["objects"])
    for part in parts:
        om = _OBJECT_RE.fullmatch(part.strip())
        if om is None:
            raise ValueError(f"cannot parse {part!r} in caption {text!r}: expected "
                             f"'a <size> <colour> <shape> at the <position>', e.g. 'a small red circle at the top left'")
        objects.append(Shape(om["shape"], om["colour"], om["size"], om["position"]))
    return Scene(objects, m["background"])


# ----------------------------------------------------------------------------------------------
# Dataset


class ShapesDataset(torch.utils.data.Dataset):
    """`length` rendered scenes; item i depends only on (seed, split, i), never on access order.

    Items: {"image": float32 (3, H, W) in [-1, 1], "caption": str, "scene": dict (`Scene.to_dict`)}.
    `split="heldout"` draws from a random stream disjoint from "train" for the same seed, so
    held-out images are never the training ones (the scene vocabulary is shared: a held-out caption
    may also occur in training, as with any finite vocabulary). `combinations` ("all", "seen" or
    "unseen", see `sample_scene`) keeps the pairs of `HELDOUT_PAIRS` out of a training stream, or
    draws only objects holding one, so that a model is also tested on captions it cannot have read.
    `scale` > 1 renders each scene `scale` times larger and returns a random resolution-sized window
    of it, with an empty caption (the window may not show what the caption names): objects up to
    `scale` times larger than a whole scene's, the data an upscaler to `scale` times needs.
    """

    def __init__(self, resolution: int = 64, length: int = 100_000, seed: int = 0, max_objects: int = 1,
                 split: str = "train", combinations: str = "all", scale: int = 1):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (got {split!r})")
        if combinations not in COMBINATIONS:
            raise ValueError(f"combinations must be one of {COMBINATIONS} (got {combinations!r})")
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16 (got {resolution})")
        if length < 0 or seed < 0:
            raise ValueError(f"length and seed must be >= 0 (got length={length}, seed={seed})")
        if not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS)} (got {max_objects})")
        if scale < 1:
            raise ValueError(f"scale must be >= 1 (got {scale}); 1 renders whole scenes")
        self.resolution, self.length, self.seed = resolution, length, seed
        self.max_objects, self.split, self.combinations, self.scale = max_objects, split, combinations, scale

    def __len__(self) -> int:
        return self.length

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a ShapesDataset of length {self.length}")
        # A Mersenne Twister seeded with the text "seed/split/i", which Python hashes with SHA-512: a
        # well-mixed stream per item and split (integer seeds that differ only in high bits can start
        # alike), and ~10x cheaper to set up than a numpy Generator.
        return sample_scene(random.Random(f"{self.seed}/{self.split}/{i}"), self.max_objects, self.combinations)

    def window(self, i: int) -> tuple[int, int]:
        """(top, left) of item i's window in its scene rendered `scale` times larger; (0, 0) at scale 1."""
        if self.scale == 1:
            return 0, 0
        rng = random.Random(f"{self.seed}/{self.split}/{i}/window")
        span = self.resolution * (self.scale - 1)
        return rng.randint(0, span), rng.randint(0, span)

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(int(i))
        img = render_array(scene, self.resolution * self.scale)
        if self.scale > 1:  # a window of the larger render: the caption would name objects it may not show
            top, left = self.window(int(i))
            img = img[top:top + self.resolution, left:left + self.resolution]
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # (3, H, W) uint8
        return {
            "image": img.float().div_(127.5).sub_(1.0),
            "caption": scene.caption() if self.scale == 1 else "",
            "scene": scene.to_dict(),
        }


def collate(batch: list[dict]) -> dict:
    """DataLoader `collate_fn` for ShapesDataset items: images stacked to (B, 3, H, W), captions and
    scenes kept as lists (scenes hold different numbers of objects, which the default collate rejects)."""
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
        "scene": [b["scene"] for b in batch],
    }
