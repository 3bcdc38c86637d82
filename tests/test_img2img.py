import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FAST, ROOT, TINY
from ldm import LDMPipeline
from ldm.diffusion import sigmas_from_schedule
from ldm.png_settings import read_png_settings


@pytest.fixture(scope="module")
def image():
    return torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))


def i2i(p, image, strength, prompt="a red circle", **kw):
    kw.setdefault("steps", 4)
    kw.setdefault("progress", False)
    return p.img2img(image, prompt, strength, output_type="tensor", **kw)


def test_strength_0_returns_the_vae_round_trip_without_sampling(tiny_pipe, image):
    calls = []
    out = i2i(tiny_pipe, image, 0.0, seed=0, callback=lambda *a: calls.append(a))
    assert calls == []
    assert torch.equal(out, tiny_pipe.decode_latents(tiny_pipe.encode_image(image)).cpu())


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_strength_1_equals_text_to_image_with_the_same_seed(tiny_pipe, image, sampler):
    out = i2i(tiny_pipe, image, 1.0, seed=11, sampler=sampler, num_images=2)
    ref = tiny_pipe.generate("a red circle", seed=11, steps=4, sampler=sampler, num_images=2, progress=False,
                        output_type="tensor")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("steps", "strength", "expected"), [(10, 0.35, 3), (4, 0.75, 3), (5, 0.5, 2), (3, 0.2, 0)])
def test_intermediate_strength_runs_int_steps_times_strength_steps(tiny_pipe, image, steps, strength, expected):
    seen = []
    i2i(tiny_pipe, image, strength, seed=3, steps=steps, sampler="euler", callback=lambda i, x, d: seen.append((i, x)))
    assert [i for i, _ in seen] == list(range(expected))
    if expected:
        # the first step starts from the image latents noised to the first kept sigma of the full schedule
        sigma = sigmas_from_schedule(tiny_pipe.schedule, steps, "trailing")[steps - expected]
        noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(seen[0][1][0], tiny_pipe.encode_image(image)[0] + sigma * noise.double(),
                                   atol=1e-5, rtol=0, check_dtype=False)


def test_strength_changes_the_image_gradually(tiny_pipe, image):
    base = tiny_pipe.decode_latents(tiny_pipe.encode_image(image)).cpu()
    diffs = [float((i2i(tiny_pipe, image, s, seed=5, steps=5) - base).abs().mean()) for s in (0.2, 0.6, 1.0)]
    assert 0 < diffs[0] < diffs[1] < diffs[2]


def test_image_k_of_a_batch_equals_a_single_run_with_seed_plus_k(tiny_pipe, image):
    batch = i2i(tiny_pipe, image, 0.6, seed=100, num_images=3, sampler="euler_a")
    assert batch.shape == (3, 3, 32, 32)
    for k in range(3):
        torch.testing.assert_close(batch[k : k + 1], i2i(tiny_pipe, image, 0.6, seed=100 + k, sampler="euler_a"),
                                   atol=1e-5, rtol=0)


def test_images_pair_with_prompts(tiny_pipe, image):
    two = torch.cat([image, image.flip(-1)])
    both = i2i(tiny_pipe, two, 0.5, seed=0)  # one prompt for both images
    assert both.shape == (2, 3, 32, 32)
    torch.testing.assert_close(both[1:], i2i(tiny_pipe, two[1:], 0.5, seed=1), atol=1e-5, rtol=0)
    assert i2i(tiny_pipe, two, 0.5, prompt=["a", "b"], seed=0).shape == (2, 3, 32, 32)  # one prompt per image
    with pytest.raises(ValueError, match="same number of each"):
        i2i(tiny_pipe, two, 0.5, prompt=["a", "b", "c"], seed=0)


def test_pil_and_path_inputs_give_pil_images_with_strength(tiny_pipe, tmp_path):
    pil = Image.fromarray((torch.rand(24, 40, 3) * 255).to(torch.uint8).numpy())
    pil.save(tmp_path / "in.png")
    a = tiny_pipe.img2img(pil, "a red circle", 0.5, steps=2, seed=1, progress=False)
    b = tiny_pipe.img2img(tmp_path / "in.png", "a red circle", 0.5, steps=2, seed=1, progress=False)
    assert len(a) == 1 and a[0].size == (40, 24)
    assert a[0].tobytes() == b[0].tobytes()
    assert a[0].info["strength"] == 0.5 and a[0].info["seed"] == 1 and a[0].info["width"] == 40


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_strength_is_an_error(tiny_pipe, image, strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        i2i(tiny_pipe, image, strength)


def test_bad_images_are_errors(tiny_pipe, image, tmp_path):
    with pytest.raises(ValueError, match=r"image height must be a multiple of 4 \(got 30\); try 28 or 32; resize"):
        i2i(tiny_pipe, image[..., :30, :], 0.5)
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\]"):
        i2i(tiny_pipe, image * 2 - 1, 0.5)
    with pytest.raises(ValueError, match=r"shape \(B, 3, H, W\)"):
        i2i(tiny_pipe, image[:, :1], 0.5)
    with pytest.raises(ValueError, match="image file not found"):
        i2i(tiny_pipe, tmp_path / "missing.png", 0.5)
    inpainting = LDMPipeline.from_config(TINY, FAST + ["model.unet.in_channels=9"])
    with pytest.raises(ValueError, match=r"use pipe.inpaint"):
        i2i(inpainting, image, 0.5)


def test_img2img_tool_writes_pngs_with_strength(tmp_path):
    Image.fromarray((torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "in.png")
    out = tmp_path / "out"
    small = [a for o in FAST for a in ("--set", o)]
    r = subprocess.run(
        [sys.executable, "tools/img2img.py", "--config", str(TINY), *small, "--init-image", str(tmp_path / "in.png"),
         "--strength", "0.5", "--prompt", "a red circle", "--steps", "2", "--seed", "4", "--n", "2",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-4.png", "00000-grid.png", "00001-5.png"]
    recorded = read_png_settings(out / "00001-5.png").options
    assert (recorded.strength, recorded.seed, recorded.steps) == (0.5, 5, 2)
    assert "Denoising strength: 0.5" in Image.open(out / "00001-5.png").text["parameters"]
    again = subprocess.run(  # the settings (strength included) and the model come from the PNG
        [sys.executable, "tools/img2img.py", "--from-png", str(out / "00001-5.png"), "--init-image",
         str(tmp_path / "in.png"), "--out", str(tmp_path / "again")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0, again.stderr
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "again" / "00000-5.png"))),
                       torch.from_numpy(np.array(Image.open(out / "00001-5.png"))))
    bad = subprocess.run(
        [sys.executable, "tools/img2img.py", "--config", str(TINY), *small, "--init-image", str(tmp_path / "in.png"),
         "--strength", "2", "--prompt", "x", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode == 2 and "error: strength must be a number in [0, 1]" in bad.stderr
