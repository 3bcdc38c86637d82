import csv
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from helpers import ROOT
from ldm.data.reader import make_image_text_loader, make_latent_loader
from ldm.data.sources import Skip, folder_samples, shapes_samples, table_samples
from ldm.data.writer import write_latent_shards, write_shards


def image_bytes(i: int, fmt: str = "PNG", size=(24, 20), noise: bool = False) -> bytes:
    if noise:
        array = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        im = Image.fromarray(array)
    else:
        im = Image.new("RGB", size, (10 * i % 256, 200, 30))
    out = io.BytesIO()
    im.save(out, format=fmt)
    return out.getvalue()


def make_tar_shards(folder: Path, n: int, per_shard: int) -> list[str]:
    """n good samples with keys s000.. and captions 'caption i', `per_shard` to a shard."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, n, per_shard):
        path = folder / f"sh-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(path), encoder=False) as w:
            for i in range(start, min(n, start + per_shard)):
                w.write({"__key__": f"s{i:03d}", "png": image_bytes(i), "txt": f"caption {i}".encode()})
        paths.append(str(path))
    return paths


def read_all(urls, **kw):
    kw = {"resolution": 16, "batch_size": 4, "num_workers": 0, "shuffle_buffer": 0, **kw}
    loader = make_image_text_loader(urls, **kw)
    batches = list(loader)
    return loader, batches


def keys_of(batches):
    return [k for b in batches for k in b["key"]]


def check_batch(batch, resolution=16):
    image = batch["image"]
    assert image.dtype == torch.float32 and image.shape[1:] == (3, resolution, resolution)
    assert image.shape[0] == len(batch["caption"]) == len(batch["key"])
    assert image.min() >= -1 and image.max() <= 1


def test_folder_round_trip_counts_images_without_captions(tmp_path):
    src = tmp_path / "images"
    (src / "nested" / "deeper").mkdir(parents=True)
    files = {"a.jpg": "JPEG", "b.PNG": "PNG", "nested/c.webp": "WEBP", "nested/deeper/d.jpeg": "JPEG",
             "nested/e.v2.png": "PNG", "nocaption.png": "PNG"}
    for i, (name, fmt) in enumerate(files.items()):
        (src / name).write_bytes(image_bytes(i, fmt, size=(30 + i, 20)))
        if name != "nocaption.png":
            (src / name).with_suffix(".txt").write_text(f"  caption of {name}\n")
    (src / "notes.txt").write_text("not an image")

    summary = write_shards(folder_samples(src), tmp_path / "out" / "train", max_count=2, progress=False)
    assert summary.written == 5 and summary.skipped == {"missing_caption": 1}
    assert [s.samples for s in summary.shards] == [2, 2, 1]
    index = json.loads((tmp_path / "out" / "train-index.json").read_text())
    assert index["samples"] == 5 and [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]

    # the image bytes are stored unchanged, under their original extension
    raw = list(wds.WebDataset(str(tmp_path / "out" / "train-{000000..000002}.tar"), shardshuffle=False))
    by_path = {json.loads(s["json"])["path"]: s for s in raw}
    assert by_path["b.PNG"]["png"] == (src / "b.PNG").read_bytes()
    assert by_path["nested/deeper/d.jpeg"]["jpeg"] == (src / "nested/deeper/d.jpeg").read_bytes()
    assert "webp" in by_path["nested/c.webp"]

    loader, batches = read_all(tmp_path / "out")
    assert keys_of(read_all(tmp_path / "out" / "train-index.json")[1]) == keys_of(batches)
    for b in batches:
        check_batch(b)
    captions = sorted(c for b in batches for c in b["caption"])
    assert captions == sorted(f"caption of {n}" for n in files if n != "nocaption.png")
    assert loader.skipped.total == 0

    summary = write_shards(folder_samples(src, allow_empty_captions=True), tmp_path / "all" / "train", progress=False)
    assert summary.written == 6 and summary.skipped == {}
    _, batches = read_all(tmp_path / "all")
    assert sum(c == "" for b in batches for c in b["caption"]) == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_table_round_trip(tmp_path, fmt):
    (tmp_path / "imgs").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(image_bytes(i, "JPEG", size=(20, 28)))
        rows.append({"file": f"imgs/{i}.jpg", "text": f"photo {i}", "source": "test"})
    rows.append({"file": "imgs/missing.jpg", "text": "gone", "source": "test"})
    table = tmp_path / f"captions.{fmt}"
    if fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file", "text", "source"])
            writer.writeheader()
            writer.writerows(rows)

    with pytest.raises(ValueError, match="no column 'image'"):
        list(table_samples(table))
    summary = write_shards(table_samples(table, image_key="file", caption_key="text"), tmp_path / "sh" / "t",
                           progress=False)
    assert summary.written == 5 and summary.skipped == {"missing_image": 1}

    _, batches = read_all(tmp_path / "sh", with_meta=True, batch_size=2)
    for b in batches:
        check_batch(b)
    assert [c for b in batches for c in b["caption"]] == [f"photo {i}" for i in range(5)]
    assert all(m["source"] == "test" for b in batches for m in b["meta"])


def test_shapes_round_trip_is_pixel_exact(tmp_path):
    from ldm.data.shapes import ShapesDataset

    summary = write_shards(shapes_samples(6, resolution=32, seed=3), tmp_path / "shapes", progress=False)
    assert summary.written == 6
    _, batches = read_all(str(tmp_path / "shapes-000000.tar"), resolution=32, batch_size=4, with_meta=True)
    assert [len(b["key"]) for b in batches] == [4, 2]
    dataset = ShapesDataset(resolution=32, length=6, seed=3)
    for j, (image, caption, meta) in enumerate(zip(*(torch.cat([b["image"] for b in batches]),
                                                     [c for b in batches for c in b["caption"]],
                                                     [m for b in batches for m in b["meta"]]))):
        item = dataset[j]
        assert caption == item["caption"] and meta["scene"] == item["scene"]
        assert torch.allclose(image, item["image"], atol=1e-6)


def test_broken_samples_are_skipped_and_counted_across_workers(tmp_path):
    good = image_bytes(0, "JPEG")
    with wds.TarWriter(str(tmp_path / "bad-000000.tar"), encoder=False) as w:
        for i in range(6):
            w.write({"__key__": f"ok{i}", "jpg": good, "txt": f"fine {i}".encode()})
        w.write({"__key__": "truncated", "jpg": good[: len(good) // 2], "txt": b"cut"})
        w.write({"__key__": "nocaption", "jpg": good})
        w.write({"__key__": "zerosize", "jpg": b"", "txt": b"empty"})
        w.write({"__key__": "noimage", "txt": b"only text"})
    with wds.TarWriter(str(tmp_path / "bad-000001.tar"), encoder=False) as w:
        for i in range(6, 9):
            w.write({"__key__": f"ok{i}", "jpg": good, "txt": f"fine {i}".encode()})
        w.write({"__key__": "garbage", "png": b"not a png at all", "txt": b"junk"})

    with pytest.warns(UserWarning, match=r"skipped 5 samples \(broken, unreadable or too small\) in epoch 0"):
        loader, batches = read_all(tmp_path, num_workers=2, batch_size=2)
    assert sorted(keys_of(batches)) == [f"ok{i}" for i in range(9)]
    assert loader.skipped.as_dict() == {"missing_image": 1, "missing_caption": 1, "empty_image": 1,
                                        "undecodable_image": 2}

    # the writer also skips unreadable files instead of failing
    src = tmp_path / "folder"
    src.mkdir()
    (src / "ok.jpg").write_bytes(good)
    (src / "cut.jpg").write_bytes(good[:100])
    (src / "empty.png").write_bytes(b"")
    for name in ("ok", "cut", "empty"):
        (src / f"{name}.txt").write_text(name)
    summary = write_shards(folder_samples(src), tmp_path / "w" / "x", progress=False)
    assert summary.written == 1 and summary.skipped == {"unreadable_image": 2}


def test_shard_size_and_count_bounds(tmp_path):
    samples = [{"__key__": f"k{i:03d}", "png": image_bytes(i, noise=True, size=(32, 32)), "txt": b"x"}
               for i in range(20)]
    max_mb = 0.02  # ~6 samples of ~3.6 kB each, with tar headers and padding
    summary = write_shards(iter(samples), tmp_path / "s", max_size_mb=max_mb, max_count=None, progress=False)
    assert len(summary.shards) > 2 and sum(s.samples for s in summary.shards) == 20
    for s in summary.shards:
        size = (tmp_path / s.name).stat().st_size
        assert size == s.bytes <= max_mb * 1e6
    summary = write_shards(iter(samples), tmp_path / "c", max_count=7, progress=False)
    assert [s.samples for s in summary.shards] == [7, 7, 6]

    # rewriting a prefix must not mix old and new shards
    with pytest.raises(ValueError, match="exist already"):
        write_shards(iter(samples), tmp_path / "c", max_count=7, progress=False)
    summary = write_shards(iter(samples[:3]), tmp_path / "c", max_count=7, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.glob("c-*")) == ["c-000000.tar", "c-index.json"]


def test_crash_mid_shard_leaves_no_partial_final_shard(tmp_path):
    def source():
        for i in range(5):
            yield {"__key__": f"k{i}", "png": image_bytes(i), "txt": b"x"}
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(source(), tmp_path / "s", max_count=3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]
    _, batches = read_all(tmp_path)
    assert keys_of(batches) == ["k0", "k1", "k2"]


@pytest.mark.parametrize("n_shards", [8, 2])  # 8 >= 4 slots: shards split; 2 < 4 slots: samples split
def test_two_ranks_two_workers_see_disjoint_samples(tmp_path, n_shards):
    n = 24
    make_tar_shards(tmp_path, n, per_shard=n // n_shards)
    seen = []
    for rank in (0, 1):
        _, batches = read_all(tmp_path, num_workers=2, rank=rank, world_size=2, batch_size=2, shuffle_buffer=4)
        seen.append(keys_of(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(n)]


def test_equal_batch_counts_per_rank_with_uneven_data(tmp_path):
    make_tar_shards(tmp_path, 13, per_shard=4)  # 4 shards of 4, 4, 4, 1 samples
    for rank in (0, 1):
        loader = make_image_text_loader(tmp_path, resolution=16, batch_size=3, num_workers=2, shuffle_buffer=5,
                                        epoch_length=7, rank=rank, world_size=2)
        assert len(loader) == 7
        for epoch in range(2):
            batches = list(loader)
            assert [len(b["key"]) for b in batches] == [3] * 7, (rank, epoch)
            for b in batches:
                check_batch(b)
        assert loader.state_dict()["epoch"] == 2


def test_stream_is_deterministic_and_resumes_exactly(tmp_path):
    make_tar_shards(tmp_path, 20, per_shard=5)
    kw = dict(resolution=12, batch_size=2, num_workers=2, shuffle_buffer=6, seed=7, epoch_length=5,
              crop="random", rank=0, world_size=1)
    loader = make_image_text_loader(tmp_path, **kw)
    epochs = [list(loader) for _ in range(2)]
    assert keys_of(epochs[0]) != keys_of(epochs[1])

    again = make_image_text_loader(tmp_path, **kw)
    assert keys_of(list(again)) == keys_of(epochs[0])

    # interrupted after 2 batches of epoch 1: a new loader with the saved position continues the stream
    loader = make_image_text_loader(tmp_path, **kw)
    list(loader)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    resumed = make_image_text_loader(tmp_path, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert keys_of(rest) == keys_of(epochs[1][2:])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, epochs[1][2:]))
    # saved right after the last batch of epoch 0: resumes with epoch 1
    resumed.load_state_dict({"seed": 7, "epoch": 0, "batch": 5})
    assert keys_of(list(resumed)) == keys_of(epochs[1])
    with pytest.raises(ValueError, match="num_workers=2"):
        make_image_text_loader(tmp_path, **{**kw, "num_workers": 1}).load_state_dict(state)


def test_pipe_and_brace_urls(tmp_path):
    paths = make_tar_shards(tmp_path, 6, per_shard=2)
    expected = [f"s{i:03d}" for i in range(6)]
    assert keys_of(read_all(tmp_path)[1]) == expected
    assert keys_of(read_all(str(tmp_path / "sh-{000000..000002}.tar"))[1]) == expected
    assert keys_of(read_all([f"pipe:cat {p}" for p in paths])[1]) == expected
    assert keys_of(read_all(f"pipe:cat {tmp_path}/sh-{{000000..000002}}.tar")[1]) == expected
    with pytest.raises(ValueError, match="does not exist"):
        make_image_text_loader(str(tmp_path / "nope-{0..1}.tar"), resolution=16, batch_size=1)


def test_latent_shards_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    items = [{"key": f"img{i}", "latent": torch.randn(4, 8, 6, generator=gen), "caption": f"latent {i}",
              "context": torch.randn(5, 16, generator=gen)} for i in range(5)]
    summary = write_latent_shards(iter(items), tmp_path / "lat", max_count=2, progress=False)
    assert summary.written == 5 and len(summary.shards) == 3
    loader = make_latent_loader(tmp_path, batch_size=2, num_workers=0, shuffle_buffer=0)
    batches = list(loader)
    assert [b["latent"].shape for b in batches] == [(2, 4, 8, 6), (2, 4, 8, 6), (1, 4, 8, 6)]
    assert torch.equal(torch.cat([b["latent"] for b in batches]), torch.stack([x["latent"] for x in items]))
    assert torch.equal(torch.cat([b["context"] for b in batches]), torch.stack([x["context"] for x in items]))
    assert [c for b in batches for c in b["caption"]] == [x["caption"] for x in items]

    # .latent.pth samples without embeddings read too; no "context" then
    with wds.TarWriter(str(tmp_path / "pth.tar"), encoder=False) as w:
        for i in range(2):
            buf = io.BytesIO()
            torch.save(torch.full((4, 2, 2), float(i)), buf)
            w.write({"__key__": f"p{i}", "latent.pth": buf.getvalue(), "txt": b"pth"})
    batch = next(iter(make_latent_loader(str(tmp_path / "pth.tar"), batch_size=2, num_workers=0, shuffle_buffer=0)))
    assert batch["latent"].shape == (2, 4, 2, 2) and "context" not in batch


def test_make_shards_tool(tmp_path):
    r = subprocess.run([sys.executable, "tools/make_shards.py", "--shapes", "5", "--resolution", "16",
                        "--max-count", "2", "--out", str(tmp_path / "shapes" / "train"), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote 5 samples into 3 shards" in r.stdout
    index = json.loads((tmp_path / "shapes" / "train-index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [2, 2, 1]

    from ldm.cli import make_shards as tool

    with pytest.raises(ValueError, match="missing.csv does not exist"):
        tool.main(["--table", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "x")])
    (tmp_path / "c.csv").write_text("image,caption\nnope.png,a caption\n")
    assert tool.main(["--table", str(tmp_path / "c.csv"), "--out", str(tmp_path / "x"), "--quiet"]) == 1


def test_skip_markers_are_counted_by_reason(tmp_path):
    source = [Skip("missing_caption"), {"__key__": "a", "png": image_bytes(0), "txt": b"a"}, Skip("missing_caption"),
              Skip("unreadable_image", "x.jpg: broken")]
    summary = write_shards(iter(source), tmp_path / "s", progress=False)
    assert summary.written == 1 and summary.skipped == {"missing_caption": 2, "unreadable_image": 1}
    assert Counter(json.loads((tmp_path / "s-index.json").read_text())["skipped"]) == Counter(summary.skipped)


def test_all_broken_data_with_epoch_length_is_an_error_not_a_hang(tmp_path):
    with wds.TarWriter(str(tmp_path / "b.tar"), encoder=False) as w:
        for i in range(3):
            w.write({"__key__": f"k{i}", "png": image_bytes(i)})  # no captions
    loader = make_image_text_loader(tmp_path, resolution=16, batch_size=2, num_workers=0, epoch_length=3)
    with pytest.raises(RuntimeError, match=r"no usable sample in any of the 1 shards \(found only broken samples"):
        list(loader)
    assert loader.skipped.as_dict()["missing_caption"] >= 3


@pytest.mark.parametrize("broken", ["corrupt images", "unreadable tars"])
def test_a_slot_whose_shards_are_all_broken_reads_from_the_others_instead_of_stopping(tmp_path, broken, caplog):
    # Shards 1 and 3 are broken; with two slots and no shuffling, slot 1 owns exactly those.
    good = make_tar_shards(tmp_path / "good", 8, 4)
    for i in (1, 3):
        path = tmp_path / f"bad-{i}.tar"
        if broken == "corrupt images":
            with wds.TarWriter(str(path), encoder=False) as w:
                for j in range(4):
                    w.write({"__key__": f"bad{i}{j}", "png": b"not a png", "txt": b"broken"})
        else:
            path.write_bytes(b"not a tar archive at all" * 100)
    urls = [good[0], str(tmp_path / "bad-1.tar"), good[1], str(tmp_path / "bad-3.tar")]
    loader = make_image_text_loader(urls, resolution=16, batch_size=2, num_workers=0, shuffle_buffer=0,
                                    epoch_length=3, rank=1, world_size=2)
    with pytest.warns(UserWarning, match="skipped"):
        batches = list(loader)
    assert len(batches) == 3 and all(len(b["key"]) == 2 for b in batches)
    assert keys_of(batches) == ["s001", "s003", "s005", "s007", "s001", "s003"]  # one in two of all shards' samples
    assert "slot 1 of 2 (rank x worker)" in caplog.text
    assert "it now reads one in 2 samples of all 4 shards" in caplog.text
    assert "got no samples" in caplog.text if broken == "unreadable tars" else "found only broken samples" in caplog.text


def test_exif_orientation_applies_to_shard_images_as_to_files(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (20, 32, 3), dtype=np.uint8)  # stored 32 wide, 20 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 20 wide, 32 tall
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", exif=exif.tobytes(), quality=95)
    with wds.TarWriter(str(tmp_path / "p-000000.tar"), encoder=False) as w:
        w.write({"__key__": "phone", "jpg": out.getvalue(), "txt": b"a phone photo"})
    batch = next(iter(make_image_text_loader(tmp_path, resolution=16, batch_size=1, num_workers=0)))
    assert batch["original_size"].tolist() == [[32, 20]]  # (height, width): upright, taller than wide
    from ldm.data.transforms import image_to_tensor, resize_crop
    from ldm.images import decode_image

    upright = decode_image(out.getvalue(), draft=16)  # as the reader decodes it
    assert upright.size == (20, 32)
    expected = image_to_tensor(resize_crop(upright, 16)[0])
    assert torch.allclose(batch["image"][0], expected, atol=1e-6)
