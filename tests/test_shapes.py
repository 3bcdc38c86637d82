"""Built-in shapes dataset: vocabulary, captions and their parser, rendering, determinism, splits."""

import json
import random

import numpy as np
import pytest
import torch

from ldm.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    Shape,
    ShapesDataset,
    box_side,
    collate,
    from_json,
    parse_caption,
    render,
    render_array,
    sample_scene,
    shape_mask,
    to_json,
)


def test_palette_is_well_separated():
    objects = np.array(list(COLOURS.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUNDS.values()), dtype=float)
    d_obj = np.linalg.norm(objects[:, None] - objects[None], axis=-1)
    d_obj[np.diag_indices(len(objects))] = np.inf
    assert d_obj.min() > 80
    assert np.linalg.norm(objects[:, None] - backgrounds[None], axis=-1).min() > 80
    assert not set(COLOURS) & set(BACKGROUNDS)


def test_caption_reads_naturally():
    scene = Scene([Shape("circle", "red", "small", "top left"), Shape("triangle", "blue", "large", "right")], "white")
    assert scene.caption() == (
        "a small red circle at the top left and a large blue triangle on the right, on a white background"
    )
    assert Scene([Shape("square", "green", "large", "center")], "gray").caption() == (
        "a large green square in the center, on a gray background"
    )
    empty = Scene([], "black")  # what detect returns for an image with nothing on it
    assert empty.caption() == "nothing, on a black background" and parse_caption(empty.caption()) == empty


@pytest.mark.parametrize("rng", [random.Random(0), np.random.default_rng(0)], ids=["random", "numpy"])
def test_caption_round_trip(rng):
    seen = set()
    for _ in range(2000):
        scene = sample_scene(rng, max_objects=2)
        assert parse_caption(scene.caption()) == scene
        assert from_json(to_json(scene)) == scene
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
        seen.update((o.shape, o.colour, o.size, o.position) for o in scene.objects)
        seen.add(scene.background)
    # every word of the vocabulary is sampled
    words = {w for t in seen for w in (t if isinstance(t, tuple) else (t,))}
    assert words >= set(SHAPES) | set(COLOURS) | set(SIZES) | set(POSITIONS) | set(BACKGROUNDS)


def test_parse_caption_is_lenient_about_form_only():
    want = Scene([Shape("circle", "red", "small", "center"), Shape("square", "cyan", "large", "top left")], "gray")
    assert parse_caption("A small red circle in the centre and a large cyan square in the top-left on a grey background.") == want
    for bad in [
        "",
        "a red circle",
        "a small red circle at the top left",  # no background
        "a small pink circle at the top left, on a white background",  # unknown colour
        "a small red hexagon at the top left, on a white background",
        "a small red circle at the top left, on a red background",  # objects' colours are not backgrounds
        "a small red circle at the top left and a large blue square at the top left, on a white background",
    ]:
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_scene_validates():
    with pytest.raises(ValueError, match="colour"):
        Shape("circle", "white", "small", "top")
    with pytest.raises(ValueError, match="distinct"):
        Scene([Shape("circle", "red", "small", "top"), Shape("square", "blue", "large", "top")], "black")
    with pytest.raises(ValueError, match="max_objects"):
        sample_scene(random.Random(0), max_objects=0)


@pytest.mark.parametrize("resolution", [16, 24, 32, 63, 64, 100, 256])
def test_render_is_exact_palette_and_objects_stay_in_their_cells(resolution):
    rng = random.Random(resolution)
    cell = resolution / 3
    for _ in range(50):
        scene = sample_scene(rng, max_objects=2)
        img = render(scene, resolution)
        assert img.mode == "RGB" and img.size == (resolution, resolution)
        a = np.asarray(img)
        packed = np.unique(a.astype(np.int64) @ np.array([1 << 16, 1 << 8, 1]))  # one int per colour
        colours = {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}
        assert colours == {BACKGROUNDS[scene.background]} | {COLOURS[o.colour] for o in scene.objects}
    for shape in SHAPES:
        for size in SIZES:
            for position, (row, col) in POSITIONS.items():
                rows, cols, mask = shape_mask(shape, size, position, resolution)
                assert mask.shape == (box_side(size, resolution),) * 2 and mask.any(axis=0).all()
                # the box lies strictly inside its cell, so neighbours never touch
                assert row * cell < rows.start + 0.5 and rows.stop - 0.5 < (row + 1) * cell
                assert col * cell < cols.start + 0.5 and cols.stop - 0.5 < (col + 1) * cell


def test_sizes_and_shapes_differ_as_described():
    assert box_side("small", 64) == 10 and box_side("large", 64) == 18
    fill = {s: shape_mask(s, "large", "center", 256)[2].mean() for s in SHAPES}
    assert fill["square"] == 1.0
    assert fill["circle"] == pytest.approx(np.pi / 4, abs=0.02)
    assert fill["triangle"] == pytest.approx(0.5, abs=0.03)


def test_render_rejects_tiny_resolution():
    with pytest.raises(ValueError, match=">= 16"):
        render_array(Scene([], "white"), 8)


def test_dataset_is_deterministic_and_order_independent():
    a = ShapesDataset(resolution=32, length=100, seed=3, max_objects=2)
    b = ShapesDataset(resolution=32, length=100, seed=3, max_objects=2)
    forward = [a[i] for i in range(20)]
    backward = [b[i] for i in reversed(range(20))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"]) and x["caption"] == y["caption"] and x["scene"] == y["scene"]
    captions = [x["caption"] for x in forward]
    assert len(set(captions)) > 15  # different items differ
    assert not any(torch.equal(x["image"], y["image"]) for x, y in zip(forward, forward[1:]))
    other_seed = ShapesDataset(resolution=32, length=100, seed=4, max_objects=2)
    assert [other_seed[i]["caption"] for i in range(20)] != captions
    endless = ShapesDataset(resolution=32, length=2**62, seed=3, max_objects=2)  # as the training loop uses it
    assert endless[5]["caption"] == captions[5] and endless[2**62 - 1]["caption"]


@pytest.mark.parametrize("resolution", [16, 32, 64, 96])
def test_dataset_items(resolution):
    ds = ShapesDataset(resolution=resolution, length=10)
    assert len(ds) == 10
    for i in range(10):
        item = ds[i]
        x = item["image"]
        assert x.dtype == torch.float32 and x.shape == (3, resolution, resolution)
        assert x.min() >= -1 and x.max() <= 1
        scene = Scene.from_dict(json.loads(json.dumps(item["scene"])))
        assert scene.caption() == item["caption"] and len(scene.objects) == 1
        assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0),
                           torch.from_numpy(render_array(scene, resolution)))
    with pytest.raises(IndexError):
        ds[10]


def test_scaled_dataset_gives_windows_of_larger_renders():
    whole = ShapesDataset(resolution=32, length=50, seed=2, max_objects=4)
    windows = ShapesDataset(resolution=32, length=50, seed=2, max_objects=4, scale=4)
    seen = set()
    for i in range(50):
        item = windows[i]
        top, left = windows.window(i)
        assert 0 <= top <= 96 and 0 <= left <= 96
        seen.add((top, left))
        scene = whole.scene(i)  # the same scene as the unscaled stream's, rendered at 128 px
        big = torch.from_numpy(render_array(scene, 128)).permute(2, 0, 1)
        assert item["image"].shape == (3, 32, 32)
        assert torch.equal(((item["image"] + 1) * 127.5).round().to(torch.uint8), big[:, top:top + 32, left:left + 32])
        assert item["caption"] == "" and item["scene"] == scene.to_dict()
        assert windows.window(i) == ShapesDataset(resolution=32, length=50, seed=2, scale=4).window(i)  # deterministic
    assert len(seen) > 40  # windows anywhere in the scene, not one fixed crop
    assert whole.window(3) == (0, 0) and whole[3]["caption"] == whole.scene(3).caption()
    with pytest.raises(ValueError, match="scale must be >= 1"):
        ShapesDataset(scale=0)


def test_heldout_split_is_a_different_stream():
    train = ShapesDataset(resolution=32, length=1000, seed=0, max_objects=2, split="train")
    heldout = ShapesDataset(resolution=32, length=1000, seed=0, max_objects=2, split="heldout")
    train_scenes = [train.scene(i).to_json() for i in range(1000)]
    heldout_scenes = [heldout.scene(i).to_json() for i in range(1000)]
    # Same index, different scene almost always (two random 2-object scenes coincide rarely).
    assert sum(t == h for t, h in zip(train_scenes, heldout_scenes)) < 5
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")


def test_dataset_works_with_a_dataloader():
    ds = ShapesDataset(resolution=32, length=8, max_objects=2)  # scenes with 1 and 2 objects
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate)))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["caption"]) == 8
    assert batch["scene"] == [ds[i]["scene"] for i in range(8)]


def test_combination_split_keeps_heldout_pairs_out_of_training_and_in_the_unseen_set():
    from ldm.data.shapes import HELDOUT_PAIRS

    seen = ShapesDataset(resolution=32, length=3000, seed=0, max_objects=2, combinations="seen")
    unseen = ShapesDataset(resolution=32, length=600, seed=0, max_objects=2, split="heldout", combinations="unseen")
    seen_objects = [o for i in range(len(seen)) for o in seen.scene(i).objects]
    unseen_objects = [o for i in range(len(unseen)) for o in unseen.scene(i).objects]
    assert not any(o.unseen for o in seen_objects) and all(o.unseen for o in unseen_objects)
    pairs = lambda objs: {(o.colour, o.shape) for o in objs} | {(o.shape, o.position) for o in objs}  # noqa: E731
    assert pairs(seen_objects).isdisjoint(HELDOUT_PAIRS)
    assert pairs(unseen_objects) >= HELDOUT_PAIRS  # every held-out pair is tested
    # Every word and every other colour-shape and shape-position pair is still trained on.
    all_pairs = {(c, s) for c in COLOURS for s in SHAPES} | {(s, p) for s in SHAPES for p in POSITIONS}
    assert pairs(seen_objects) == all_pairs - HELDOUT_PAIRS
    assert {o.size for o in seen_objects} == set(SIZES) and {o.colour for o in seen_objects} == set(COLOURS)
    # One object in 4.2 holds a held-out pair: 1/7 colour-shape + 1/9 shape-position - 1/63 both.
    everything = ShapesDataset(resolution=32, length=4000, seed=0)
    share = np.mean([everything.scene(i).objects[0].unseen for i in range(4000)])
    assert share == pytest.approx(1 / 7 + 1 / 9 - 1 / 63, abs=0.02)


def test_combination_split_leaves_the_all_stream_unchanged_and_checks_its_name():
    a = ShapesDataset(resolution=32, length=50, seed=5, max_objects=2)
    b = ShapesDataset(resolution=32, length=50, seed=5, max_objects=2, combinations="all")
    assert [a.scene(i) for i in range(50)] == [b.scene(i) for i in range(50)]
    seen = ShapesDataset(resolution=32, length=50, seed=5, max_objects=2, combinations="seen")
    # Scenes without a held-out pair are drawn exactly as before (the redraw only replaces objects).
    assert all(s == seen.scene(i) for i, s in enumerate(a.scene(i) for i in range(50))
               if not any(o.unseen for o in s.objects))
    with pytest.raises(ValueError, match="combinations"):
        ShapesDataset(combinations="novel")
    with pytest.raises(ValueError, match="combinations"):
        sample_scene(random.Random(0), 1, combinations="train")
