"""Shapes prompt adherence: exact detection on rendered scenes, robustness to noise and blur, scoring."""

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    parse_caption,
    render,
    render_array,
    sample_scene,
)
from ldm.eval.adherence import ATTRIBUTES, adherence, connected_components, detect, score
from tests.helpers import FAST, SD_TINY


def _scenes(seed: int, n: int, max_objects: int = 2) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, max_objects) for _ in range(n)]


def _as_float(scene: Scene, resolution: int) -> np.ndarray:
    return render_array(scene, resolution).transpose(2, 0, 1).astype(np.float32) / 255  # (3, H, W) in [0, 1]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (3, H, W) with replicated borders (numpy: small and thread-free)."""
    r = round(3 * sigma)
    g = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    g /= g.sum()
    _, h, w = x.shape
    y = np.pad(x, ((0, 0), (r, r), (r, r)), mode="edge")
    y = sum(gk * y[:, :, k : k + w] for k, gk in enumerate(g))  # along rows
    return sum(gk * y[:, k : k + h, :] for k, gk in enumerate(g))  # along columns


def _degrade(scene: Scene, resolution: int, sigma: float, noise: float, rng: np.random.Generator) -> np.ndarray:
    x = _blur(_as_float(scene, resolution), sigma)
    return np.clip(x + noise * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


def test_connected_components():
    mask = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 1, 1],
            [1, 0, 0, 0, 0],
            [1, 1, 1, 0, 1],
        ],
        dtype=bool,
    )
    labels, n = connected_components(mask)
    assert n == 4  # diagonal neighbours are not connected
    assert (labels[~mask] == -1).all()
    assert labels[0, 0] == labels[1, 1] and labels[2, 0] == labels[3, 2] and labels[0, 4] == labels[1, 3]
    assert len({labels[0, 0], labels[2, 0], labels[0, 4], labels[3, 4]}) == 4
    spiral = np.ones((9, 9), dtype=bool)  # one long winding component
    spiral[1:-1:2, :-1] = False
    spiral[1:-1:4, -1] = True
    assert connected_components(spiral)[1] == 1
    assert connected_components(np.zeros((4, 4), dtype=bool))[1] == 0


@pytest.mark.parametrize("resolution", [24, 32, 48, 64, 96, 256])
def test_detect_is_exact_for_every_object_in_every_cell(resolution):
    for i, (shape, size, position) in enumerate(
        (sh, sz, p) for sh in SHAPES for sz in SIZES for p in POSITIONS
    ):
        scene = Scene([Shape(shape, ["red", "yellow", "purple"][i % 3], size, position)], ["white", "black", "gray"][i % 3])
        assert detect(render(scene, resolution)) == scene


@pytest.mark.parametrize("resolution", [32, 64])
def test_detect_is_exact_on_rendered_scenes(resolution):
    scenes = _scenes(resolution, 500)
    assert [detect(render(s, resolution)) for s in scenes] == scenes


def test_detect_is_exact_at_256_px():
    scenes = _scenes(256, 60)
    assert [detect(render(s, 256)) for s in scenes] == scenes


def test_detect_reads_every_input_form():
    scene = Scene([Shape("triangle", "green", "large", "bottom right")], "black")
    x = torch.from_numpy(_as_float(scene, 32))
    for image in [render(scene, 32), render_array(scene, 32), x, x * 2 - 1, x.numpy(), x.double()]:
        assert detect(image) == scene
    assert detect(x * 255, value_range=(0, 255)) == scene
    with pytest.raises(ValueError, match="square"):
        detect(torch.zeros(3, 32, 48))


@pytest.mark.parametrize("resolution, sigma", [(32, 0.6), (64, 0.8), (256, 1.0)])
def test_detect_is_robust_to_noise_and_blur(resolution, sigma):
    scenes = _scenes(resolution + 1, 200 if resolution < 256 else 40)
    rng = np.random.default_rng(0)
    images = [_degrade(s, resolution, sigma, 0.05, rng) for s in scenes]
    a = adherence(images, scenes)
    assert a["colour"] >= 0.95 and a["position"] >= 0.95
    assert a["size"] >= 0.95 and a["count"] >= 0.95 and a["background"] == 1.0
    assert a["shape"] >= 0.9  # small shapes are 5 px across at 32 px: blur rounds them


def test_score_exact_match_and_single_mismatches():
    prompt = Scene([Shape("circle", "red", "small", "top left"), Shape("square", "blue", "large", "center")], "white")
    assert score(prompt, prompt) == dict.fromkeys(ATTRIBUTES, True)

    def changed(**kw):
        first = Shape(**{**prompt.objects[0].__dict__, **kw})
        return Scene([first, prompt.objects[1]], prompt.background)

    for attr, value in [("colour", "green"), ("shape", "triangle"), ("size", "large")]:
        want = dict.fromkeys(ATTRIBUTES, True) | {attr: False, "all": False}
        assert score(prompt, changed(**{attr: value})) == want, attr
    # Drawn in the wrong cell: matched by colour, so only the position is wrong.
    moved = changed(position="bottom right")
    assert score(prompt, moved) == dict.fromkeys(ATTRIBUTES, True) | {"position": False, "all": False}
    # Wrong background only.
    assert score(prompt, Scene(prompt.objects, "black")) == dict.fromkeys(ATTRIBUTES, True) | {
        "background": False, "all": False}
    # An object missing: its attributes cannot match, and the count is off.
    missing = score(prompt, Scene(prompt.objects[1:], "white"))
    assert missing == {"colour": False, "shape": False, "size": False, "position": False, "count": False,
                       "background": True, "all": False}
    # An extra object: every prompted object is right, the count is not.
    extra = Scene(prompt.objects + [Shape("triangle", "yellow", "small", "bottom")], "white")
    assert score(prompt, extra) == dict.fromkeys(ATTRIBUTES, True) | {"count": False, "all": False}
    # Colours swapped between the two cells: positions right, colours wrong.
    swapped = Scene([Shape("circle", "blue", "small", "top left"), Shape("square", "red", "large", "center")], "white")
    result = score(prompt, swapped)
    assert not result["colour"] and result["position"] and result["shape"] and result["count"]


def test_adherence_on_rendered_images_with_a_wrong_colour():
    scenes = _scenes(7, 40, max_objects=1)
    images = [render(s, 32) for s in scenes]
    perfect = adherence(images, [s.caption() for s in scenes])
    assert perfect == dict.fromkeys(ATTRIBUTES, 1.0) | {"n": 40.0}
    recoloured = [Scene([Shape(o.shape, "orange" if o.colour != "orange" else "red", o.size, o.position)
                         for o in s.objects], s.background) for s in scenes]
    a = adherence([render(s, 32) for s in recoloured], scenes)
    assert a["colour"] == 0.0 and a["all"] == 0.0
    assert a["shape"] == a["size"] == a["position"] == a["count"] == a["background"] == 1.0
    with pytest.raises(ValueError, match="prompt"):
        adherence(images, scenes[:3])


def test_random_noise_scores_near_chance():
    scenes = _scenes(11, 150)
    rng = np.random.default_rng(0)
    for make in (lambda: rng.random((3, 32, 32)), lambda: 0.5 * rng.standard_normal((3, 32, 32))):
        a = adherence([make() for _ in scenes], [s.caption() for s in scenes])
        assert a["colour"] < 0.4 and a["shape"] < 0.4 and a["position"] < 0.4 and a["all"] < 0.05


def test_confusion_counts_what_was_drawn_for_what_was_asked():
    from ldm.eval.adherence import confusion, detect_all, summarize

    red = Scene([Shape("circle", "red", "small", "top left")], "white")
    pairs = [
        (red, red),  # right
        (red, Scene([Shape("square", "blue", "small", "top left")], "white")),  # blue square for a red circle
        (red, Scene([Shape("circle", "red", "large", "center"), Shape("circle", "red", "small", "bottom")], "black")),
        (red, Scene([], "white")),  # nothing drawn
    ]
    conf = confusion(pairs)
    asked, drawn, counts = conf["colour"]
    assert asked == list(COLOURS) and drawn == list(COLOURS) + ["none"]
    assert counts[0, 0] == 2 and counts[0, drawn.index("blue")] == 1 and counts[0, -1] == 1 and counts.sum() == 4
    # The third image is matched by colour (nothing in the top left cell): drawn in the center, large.
    asked, drawn, counts = conf["position"]
    assert counts[0, 0] == 2 and counts[0, drawn.index("center")] == 1 and counts[0, -1] == 1
    assert conf["size"][2].tolist() == [[2, 1, 1], [0, 0, 0]]
    assert conf["shape"][2][0].tolist() == [2, 1, 0, 1]
    assert conf["count"][2][1].tolist() == [1, 2, 1, 0]
    assert conf["background"][2].tolist() == [[3, 1, 0], [0, 0, 0], [0, 0, 0]]
    # The diagonal agrees with the scores of single-object prompts.
    assert summarize(pairs)["colour"] == counts_share(conf["colour"]) == 0.5
    images = [render(got, 32) for _, got in pairs]
    assert detect_all(images, [want.caption() for want, _ in pairs]) == pairs


def counts_share(entry) -> float:
    asked, drawn, counts = entry
    return sum(counts[i, drawn.index(a)] for i, a in enumerate(asked)) / counts.sum()


def test_confusion_image_has_a_panel_per_attribute():
    from ldm.eval.adherence import confusion
    from ldm.eval.report import confusion_image

    scenes = _scenes(3, 30, max_objects=1)
    im = confusion_image(confusion([(s, s) for s in scenes]), "perfect")
    assert im.mode == "RGB" and im.width > 400 and im.height > 300
    # A perfect model fills only diagonal cells, in the darkest shade.
    assert (np.asarray(im) == (40, 80, 200)).all(-1).sum() > 0


def test_eval_tool_scores_seen_and_unseen_combinations_and_writes_the_report(tmp_path, capsys, one_thread):
    from ldm.cli.eval import main

    args = ["--config", str(SD_TINY), *[a for kv in FAST for a in ("--set", kv)], "--n", "3", "--steps", "1",
            "--skip-loss", "--report", str(tmp_path / "report"), "--out", str(tmp_path / "m.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"adherence\s+seen\s+unseen", out) and re.search(r"\nall\s+\S+%\s+\S+%", out)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {f"adherence_{s}_{a}" for s in ("seen", "unseen") for a in ATTRIBUTES}
    for split in ("seen", "unseen"):
        assert Image.open(tmp_path / "report" / f"confusion-{split}.png").width > 400
        lines = (tmp_path / "report" / f"detections-{split}.jsonl").read_text().splitlines()
        assert len(lines) == 3 and set(json.loads(lines[0])) == {"prompt", "drawn"}
    unseen = [parse_caption(json.loads(x)["prompt"]) for x in (tmp_path / "report" / "detections-unseen.jsonl").open()]
    assert all(o.unseen for s in unseen for o in s.objects)
    with pytest.raises(SystemExit):
        main(["--config", str(SD_TINY), "--combinations", "novel"])
    assert "expected a comma-separated list of seen, unseen, all (got 'novel')" in capsys.readouterr().err
