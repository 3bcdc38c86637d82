import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import INPAINTING, ROOT, TINY
from ldm.diffusion import sigmas_from_schedule
from ldm.png_settings import read_png_settings


@pytest.fixture(scope="module")
def image():
    return torch.rand((1, 3, 32, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mask():
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:20, 10:26] = 1  # edges not on the 4-pixel latent grid
    return m


def paint(p, image, mask, prompt="a red circle", **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("progress", False)
    return p.inpaint(image, mask, prompt, output_type="tensor", **kw)


@pytest.mark.parametrize("model", ["tiny_pipe", "tiny_inpainting_pipe"])
def test_unmasked_pixels_are_kept_exactly(model, image, mask, request):
    p = request.getfixturevalue(model)
    out = paint(p, image, mask, seed=1, num_images=2, steps=2)
    keep = (mask == 0).expand_as(out)
    assert torch.equal(out[keep], image.expand_as(out)[keep])
    assert (out - image).abs()[~keep].mean() > 1e-2  # the hole was repainted


@pytest.mark.parametrize("model", ["tiny_pipe", "tiny_inpainting_pipe"])
def test_pil_input_and_output_keep_unmasked_pixels(model, image, mask, request):
    p = request.getfixturevalue(model)
    pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
    pil_mask = Image.fromarray((mask[0, 0] * 255).to(torch.uint8).numpy(), mode="L").convert("RGB")  # RGB mask too
    out = p.inpaint(pil, pil_mask, "a red circle", steps=2, seed=3, progress=False)[0]
    a, b = torch.from_numpy(np.array(out)), torch.from_numpy(np.array(pil))  # (H, W, 3) uint8
    keep = mask[0, 0] == 0
    assert torch.equal(a[keep], b[keep]) and not torch.equal(a[~keep], b[~keep])
    assert out.info["strength"] == 1.0 and out.size == (32, 32)


@pytest.mark.parametrize("model", ["tiny_pipe", "tiny_inpainting_pipe"])
def test_mask_of_zeros_returns_the_input(model, image, request):
    p = request.getfixturevalue(model)
    assert torch.equal(paint(p, image, torch.zeros(32, 32), seed=0), image)


def test_soft_mask_blends_the_result_over_the_input(tiny_pipe, image, mask):
    # The model sees the mask binarised at 0.5; the final paste uses it as given: m * result + (1 - m) * input.
    hard = paint(tiny_pipe, image, mask, seed=2)
    strong = paint(tiny_pipe, image, mask * 0.75, seed=2)  # same hole for the model, pasted at 75%
    torch.testing.assert_close(strong, 0.75 * mask * hard + (1 - 0.75 * mask) * image, atol=1e-6, rtol=0)
    weak = paint(tiny_pipe, image, mask * 0.25, seed=2)  # nothing repainted: the VAE round trip, pasted at 25%
    round_trip = tiny_pipe.decode_latents(tiny_pipe.encode_image(image)).cpu()
    torch.testing.assert_close(weak, 0.25 * mask * round_trip + (1 - 0.25 * mask) * image, atol=1e-6, rtol=0)


def test_inpainting_unet_gets_noisy_latents_then_mask_then_masked_image_latents(tiny_inpainting_pipe, image, mask):
    inputs = []
    hook = tiny_inpainting_pipe.unet.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    try:
        paint(tiny_inpainting_pipe, image, mask, seed=4, steps=2, cfg=5.0)
    finally:
        hook.remove()
    assert len(inputs) == 2 and inputs[0].shape == (2, 9, 8, 8)  # [uncond; cond] x 9 channels
    x = inputs[0]
    latent_mask = torch.zeros(1, 1, 8, 8)
    latent_mask[..., 2:5, 2:7] = 1  # every latent touching the hole (max-pool of 4x4 blocks)
    masked = torch.where(mask < 0.5, image, 0.5)
    masked_latents = tiny_inpainting_pipe.encode_image(masked)
    for half in (x[:1], x[1:]):  # CFG's unconditional and conditional rows carry the same extra channels
        assert torch.equal(half[:, 4:5], latent_mask)
        torch.testing.assert_close(half[:, 5:9], masked_latents, atol=1e-6, rtol=0)
    # channels 0-3: the pure-noise start (strength 1) in the U-Net's VP scaling
    sigma = tiny_inpainting_pipe.schedule.sigma_max
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(x[1, :4], noise * sigma / (sigma**2 + 1) ** 0.5, atol=1e-5, rtol=0)


def test_latent_blending_keeps_the_known_region_on_the_noised_image(tiny_pipe, image, mask):
    z0 = tiny_pipe.encode_image(image)[0]
    noise = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(6))
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:5, 2:7] = False
    seen = []
    paint(tiny_pipe, image, mask, seed=6, steps=4, sampler="euler", callback=lambda i, x, d: seen.append((x[0], d[0])))
    sigmas = sigmas_from_schedule(tiny_pipe.schedule, 4, "trailing")
    assert len(seen) == 4
    for (x, denoised), sigma in zip(seen, sigmas):
        assert torch.equal(denoised[:, keep], z0[:, keep])  # the x0 estimate there is the image itself
        # and each Euler step leaves the kept region at the image noised to the next sigma
        torch.testing.assert_close(x[:, keep], z0[:, keep] + float(sigma) * noise[:, keep], atol=1e-5, rtol=0)


def test_strength_below_1_starts_from_the_noised_image(tiny_pipe, image, mask):
    calls = []
    paint(tiny_pipe, image, mask, seed=0, steps=10, strength=0.3, callback=lambda *a: calls.append(a))
    assert len(calls) == 3
    assert torch.equal(paint(tiny_pipe, image, mask, strength=0.0, seed=0),
                       mask * tiny_pipe.decode_latents(tiny_pipe.encode_image(image)).cpu() + (1 - mask) * image)


def test_bad_masks_are_errors(tiny_pipe, image, mask):
    with pytest.raises(ValueError, match="mask size 16x32 differs from the image size 32x32; resize the mask"):
        paint(tiny_pipe, image, mask[..., :16])
    with pytest.raises(ValueError, match=r"mask tensor must have shape"):
        paint(tiny_pipe, image, mask.expand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"mask tensor values must be in \[0, 1\]"):
        paint(tiny_pipe, image, mask * 255)
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        paint(tiny_pipe, image, mask, strength=1.2)


def test_generate_on_an_inpainting_model_points_to_inpaint(tiny_inpainting_pipe):
    with pytest.raises(ValueError, match=r"use pipe.inpaint\(image, mask, prompt\) instead of generate"):
        tiny_inpainting_pipe.generate("x", steps=1, progress=False)


def test_inpaint_tool_keeps_unmasked_pixels_and_writes_strength(tmp_path):
    pixels = (torch.rand(32, 32, 3) * 255).to(torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "in.png")
    m = torch.zeros(32, 32, dtype=torch.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m.numpy(), mode="L").save(tmp_path / "mask.png")
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "tools/inpaint.py", "--config", str(TINY), *[a for o in INPAINTING for a in ("--set", o)],
         "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--prompt", "a red circle",
         "--steps", "2", "--seed", "9", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000-9.png", "00000-grid.png"]
    result = Image.open(out / "00000-9.png")
    recorded = read_png_settings(out / "00000-9.png").options
    assert recorded.strength == 1.0 and recorded.seed == 9
    got = torch.from_numpy(np.array(result.convert("RGB")))
    keep = m == 0
    assert torch.equal(got[keep], pixels[keep])
