"""The one data entry point: a folder trains like the shards made from it, the held-out split,
crops and their offsets, aspect-ratio buckets, the small-image rule, and bad input (each a clear
error or a counted skip naming the file and the fix)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import ROOT
from ldm.config import ConfigError, DataConfig, load_config
from ldm.data.batches import HashSplit, check_data, folder_images, heldout_items, training_batches
from ldm.data.reader import make_image_text_loader
from ldm.data.sources import folder_items
from ldm.data.transforms import make_buckets, nearest_bucket



def write_image(path: Path, size=(24, 20), seed: int = 0, fmt: str = "PNG", **save) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format=fmt, **save)


def make_folder(root: Path, n: int, size=(24, 20), captions: bool = True) -> Path:
    for i in range(n):
        write_image(root / f"img{i:02d}.png", size, seed=i)
        if captions:
            (root / f"img{i:02d}.txt").write_text(f"picture number {i}\n")
    return root


def data(root, **kw) -> DataConfig:
    fields = dict(source="folder", urls=str(root), resolution=16, num_workers=0, shuffle_buffer=0, epoch_length=4,
                  heldout_fraction=0.25)
    d = DataConfig(**{**fields, **kw})
    d.validate()
    return d


def one_epoch(d: DataConfig, batch_size: int = 2, seed: int = 0) -> list[dict]:
    stream = training_batches(d, batch_size=batch_size, grad_accum=1, seed=seed, rank=0, world=1)
    return [next(stream) for _ in range(d.epoch_length)]


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_a_folder_reads_like_the_shards_made_from_it(tmp_path):
    make_folder(tmp_path / "img", 12)
    r = subprocess.run([sys.executable, "tools/make_shards.py", "--images", str(tmp_path / "img"), "--out",
                        str(tmp_path / "shards" / "s"), "--max-count", "3", "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    folder = data(tmp_path / "img", epoch_length=100)
    shards = data(tmp_path / "shards", source="shards", epoch_length=100)
    read = {}
    for name, d in (("folder", folder), ("shards", shards)):
        loader = make_image_text_loader(folder_images(d) if name == "folder" else d.urls, resolution=16,
                                        batch_size=1, num_workers=0, shuffle_buffer=0)
        read[name] = {b["key"][0]: (b["image"], b["caption"][0]) for b in loader}
    assert read["folder"].keys() == read["shards"].keys() and len(read["folder"]) == 12
    for key, (image, caption) in read["folder"].items():
        assert torch.equal(image, read["shards"][key][0]) and caption == read["shards"][key][1]
    # Both split the same samples off for evaluation, and never train on them.
    held = {k for k in read["folder"] if HashSplit(0.25, True)(k)}
    assert 0 < len(held) < 12
    for d in (folder, shards):
        trained = set(keys(one_epoch(d)))
        assert trained and not trained & held
        assert {b for b in trained} <= read["folder"].keys() - held
        assert len(heldout_items(d, seed=0)) == len(held)


def test_the_held_out_split_is_a_fixed_share_of_the_keys():
    names = [f"{i:09d}_photo_{i}" for i in range(4000)]
    held = [n for n in names if HashSplit(0.1, True)(n)]
    assert 340 < len(held) < 460  # ~10%
    assert held == [n for n in names if not HashSplit(0.1, False)(n)]  # the training share is the rest
    assert [n for n in names if HashSplit(0.1, True)(n)] == held  # the same on every call


def test_heldout_urls_replace_the_split(tmp_path):
    make_folder(tmp_path / "train", 6)
    make_folder(tmp_path / "val", 3)
    d = data(tmp_path / "train", heldout_urls=str(tmp_path / "val"), epoch_length=3)
    assert len(set(keys(one_epoch(d)))) == 6  # all of data.urls trains
    assert [it["caption"] for it in heldout_items(d, seed=0)] == [f"picture number {i}" for i in range(3)]


def test_crop_offsets_are_recorded_and_reproduce_the_crop(tmp_path):
    write_image(tmp_path / "wide.png", size=(40, 16), seed=3)
    (tmp_path / "wide.txt").write_text("a wide picture")
    items = folder_items(tmp_path)
    centre = next(iter(make_image_text_loader(items, resolution=16, batch_size=1, num_workers=0)))
    assert centre["crop"].tolist() == [[0, 12]] and centre["original_size"].tolist() == [[16, 40]]
    full = torch.from_numpy(np.array(Image.open(tmp_path / "wide.png"))).permute(2, 0, 1).float() / 127.5 - 1
    offsets = set()
    for seed in range(6):
        batch = next(iter(make_image_text_loader(items, resolution=16, batch_size=1, num_workers=0, crop="random",
                                                 seed=seed)))
        top, left = batch["crop"][0].tolist()
        assert torch.equal(batch["image"][0], full[:, top:top + 16, left:left + 16])  # no resize: 16 px high
        offsets.add(left)
    assert len(offsets) > 1


def test_buckets_cover_the_area_and_batches_hold_one_shape(tmp_path):
    assert make_buckets(512, 64, 2.0) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]
    assert all(w * h <= 32 * 32 and max(w / h, h / w) <= 2 for w, h in make_buckets(32, 4, 2.0))
    assert nearest_bucket(1200, 800, make_buckets(512, 64, 2.0)) == (640, 384)
    for i in range(4):
        write_image(tmp_path / f"wide{i}.png", size=(48, 24), seed=i)
        write_image(tmp_path / f"tall{i}.png", size=(24, 48), seed=10 + i)
    for p in tmp_path.glob("*.png"):
        p.with_suffix(".txt").write_text(p.stem)
    d = data(tmp_path, resolution=32, buckets=True, bucket_step=8, heldout_fraction=0.0, epoch_length=4)
    shapes = [tuple(b["image"].shape) for b in one_epoch(d)]
    assert sorted(set(shapes)) == [(2, 3, 24, 40), (2, 3, 40, 24)]
    with pytest.raises(ConfigError, match="multiple of data.bucket_step 8; try 24 or 32"):
        data(tmp_path, resolution=28, buckets=True, bucket_step=8)


def test_small_images_are_upscaled_or_skipped_and_counted(tmp_path, caplog):
    write_image(tmp_path / "tiny.png", size=(6, 6), seed=1)
    write_image(tmp_path / "small.png", size=(12, 12), seed=2)
    write_image(tmp_path / "big.png", size=(20, 20), seed=3)
    for p in tmp_path.glob("*.png"):
        p.with_suffix(".txt").write_text(p.stem)
    loader = make_image_text_loader(folder_items(tmp_path), resolution=16, batch_size=1, num_workers=0)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert sorted(b["caption"][0] for b in batches) == ["big", "small"]
    assert loader.skipped.as_dict() == {"too_small": 1, "upscaled": 1} and loader.skipped.total == 1
    assert "tiny.png" in caplog.text and "lower data.min_size" in caplog.text
    keep_all = make_image_text_loader(folder_items(tmp_path), resolution=16, batch_size=1, num_workers=0, min_size=0)
    assert len(list(keep_all)) == 3


def test_exif_orientation_applies_to_folder_images(tmp_path):
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 32, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    im.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    (tmp_path / "phone.txt").write_text("a phone photo")
    batch = next(iter(make_image_text_loader(folder_items(tmp_path), resolution=16, batch_size=1, num_workers=0)))
    assert batch["original_size"].tolist() == [[32, 20]]  # upright: taller than wide


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_a_folder_without_images_is_an_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(ValueError, match=f"no images in {tmp_path} .searched recursively"):
        check_data(data(tmp_path))
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "s-000000.tar"), encoder=False) as w:
        w.write({"__key__": "a", "txt": b"x"})
    with pytest.raises(ValueError, match="holds 1 .tar shards: use data.source=shards"):
        check_data(data(tmp_path))


def test_images_without_captions_are_an_error_or_a_counted_skip(tmp_path, caplog):
    make_folder(tmp_path / "none", 3, captions=False)
    with pytest.raises(ValueError, match=r"none of the 3 images .* has a caption \(e.g. .*img00.png has no img00.txt\); "
                                         r"add a .txt caption beside each image, or set data.allow_empty_captions"):
        check_data(data(tmp_path / "none"))
    assert len(folder_images(data(tmp_path / "none", allow_empty_captions=True))) == 3
    make_folder(tmp_path / "some", 8)
    (tmp_path / "some" / "img03.txt").unlink()
    with caplog.at_level(logging.WARNING):
        items = folder_images(data(tmp_path / "some"))
    assert len(items) == 7 and "img03" not in " ".join(it.key for it in items)
    assert "skipping 1 of 8 images without a caption" in caplog.text and "img03.png" in caplog.text


def test_unreadable_files_are_skipped_counted_and_named(tmp_path, caplog):
    make_folder(tmp_path, 4)
    (tmp_path / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "img02.png").write_bytes(b"")
    loader = make_image_text_loader(folder_items(tmp_path), resolution=16, batch_size=1, num_workers=0)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == 2
    assert loader.skipped.as_dict() == {"undecodable_image": 1, "empty_image": 1}
    assert "img01.png" in caplog.text and "delete or replace it" in caplog.text


def test_urls_that_match_nothing_are_errors_not_the_built_in_data(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        check_data(data(tmp_path / "nowhere-{000000..000003}.tar", source="shards"))
    with pytest.raises(ValueError, match="neither a folder of images nor a caption table"):
        check_data(data(tmp_path / "nowhere"))
    make_folder(tmp_path / "img", 2)
    with pytest.raises(ValueError, match="holds 2 images: read them directly with data.source=folder"):
        check_data(data(tmp_path / "img", source="shards"))
    with pytest.raises(ConfigError, match="data.source='folder' needs data.urls"):
        DataConfig(source="folder").validate()


def test_a_resolution_the_vae_cannot_divide_is_an_error_with_the_fix():
    with pytest.raises(ConfigError, match="data.resolution 30 is not a multiple of the VAE's downsampling factor 4; "
                                         "try 28 or 32"):
        load_config(ROOT / "tests/configs/tiny64.yaml", ["data.resolution=30"])


def test_a_folder_with_nothing_held_out_says_how_to_hold_some_out(tmp_path):
    make_folder(tmp_path, 3)
    with pytest.raises(ValueError, match="none of the 3 images .* is held out at data.heldout_fraction=0.0"):
        check_data(data(tmp_path, heldout_fraction=0.0))
    with pytest.raises(ValueError, match="stage 1 trains on images"):
        check_data(data(tmp_path, source="latents"), images=True)


def test_caption_tables_are_a_folder_source(tmp_path):
    make_folder(tmp_path / "pics", 4, captions=False)
    rows = [{"file": f"pics/img{i:02d}.png", "text": f"row {i}"} for i in range(4)]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = data(tmp_path / "captions.jsonl", image_column="file", caption_column="text", heldout_fraction=0.0)
    assert [it.caption for it in folder_images(d)] == [f"row {i}" for i in range(4)]
    with pytest.raises(ValueError, match="no column 'image'"):
        folder_images(data(tmp_path / "captions.jsonl"))
