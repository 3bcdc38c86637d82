"""Low-resolution inputs for upscaler training: downscale, blur, JPEG, and the config-driven mix."""

import math

import pytest
import torch

from ldm.config import DegradeConfig, load_config
from ldm.data.degrade import downscale, gaussian_blur, jpeg_round_trip, make_low_res
from ldm.errors import ConfigError


def smooth(b=2, size=32, seed=0):
    """Images in [-1, 1] without detail finer than ~8 pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size // 8, size // 8, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def high_frequency_share(x: torch.Tensor) -> float:
    """Share of the spectrum's energy above a quarter of the sampling rate."""
    spec = torch.fft.fft2(x - x.mean(dim=(-2, -1), keepdim=True)).abs().square()
    f = torch.fft.fftfreq(x.shape[-1]).abs()
    high = (f[:, None] > 0.25) | (f[None, :] > 0.25)
    return float(spec[..., high].sum() / spec.sum())


@pytest.mark.parametrize("resample", ["bicubic", "bilinear", "area"])
def test_downscale_keeps_constants_and_sizes(resample):
    x = torch.full((2, 3, 16, 24), 0.3)
    y = downscale(x, 4, resample)
    assert y.shape == (2, 3, 4, 6)
    torch.testing.assert_close(y, torch.full_like(y, 0.3))


def test_area_downscale_is_the_block_mean():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16
    expected = torch.tensor([[(0 + 1 + 4 + 5) / 64, (2 + 3 + 6 + 7) / 64], [(8 + 9 + 12 + 13) / 64, (10 + 11 + 14 + 15) / 64]])
    torch.testing.assert_close(downscale(x, 2, "area")[0, 0], expected)


def test_antialiased_bicubic_is_close_to_area_on_smooth_images_and_stays_in_range():
    x = smooth()
    bic, area = downscale(x, 4, "bicubic"), downscale(x, 4, "area")
    assert float((bic - area).abs().mean()) < 0.03
    sharp = torch.where(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    out = downscale(sharp, 4, "bicubic")
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize(("size", "message"), [((30, 32), r"height must be a multiple of the upscaling factor 4 \(got 30\); crop or resize it to 28 or 32"),
                                               ((32, 2), r"width must be a multiple of the upscaling factor 4 \(got 2\); crop or resize it to 4")])
def test_downscale_names_the_sizes_that_work(size, message):
    with pytest.raises(ValueError, match=message):
        downscale(torch.zeros(1, 3, *size), 4)


def test_blur_is_a_normalised_gaussian_of_the_given_std():
    impulse = torch.zeros(2, 1, 41, 41)
    impulse[:, :, 20, 20] = 1
    out = gaussian_blur(impulse, torch.tensor([1.0, 2.5]))
    torch.testing.assert_close(out.sum(dim=(-2, -1)), torch.ones(2, 1))
    r2 = (torch.arange(41.0) - 20)[:, None] ** 2 + (torch.arange(41.0) - 20)[None, :] ** 2
    variance = (out * r2).sum(dim=(-2, -1)) / 2  # per axis
    torch.testing.assert_close(variance.flatten(), torch.tensor([1.0, 2.5**2]), rtol=0.01, atol=0)


def test_blur_with_zero_sigma_changes_nothing_and_keeps_constants():
    x = smooth()
    torch.testing.assert_close(gaussian_blur(x, torch.tensor([0.0, 0.0])), x)
    out = gaussian_blur(x, torch.tensor([0.0, 1.5]))
    torch.testing.assert_close(out[0], x[0])
    c = torch.full((1, 3, 8, 8), -0.25)
    torch.testing.assert_close(gaussian_blur(c, torch.tensor([2.0])), c)


def test_blur_removes_high_frequencies():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    assert high_frequency_share(gaussian_blur(x, torch.tensor([1.5]))) < 0.05 < high_frequency_share(x)


def test_jpeg_round_trip_loses_more_at_lower_quality():
    x = smooth(2, seed=3)
    hi, lo = jpeg_round_trip(x, [95, 95]), jpeg_round_trip(x, [10, 10])
    err_hi, err_lo = float((hi - x).abs().mean()), float((lo - x).abs().mean())
    assert err_hi < 0.025 and err_lo > 3 * err_hi  # measured 0.015 and 0.081
    with pytest.raises(ValueError, match="quality must hold one value in 1..100 per image"):
        jpeg_round_trip(x, [0, 50])


def test_default_config_is_a_plain_bicubic_downscale():
    x = smooth(4)
    out = make_low_res(x, 4, DegradeConfig(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, downscale(x, 4, "bicubic"))


def test_make_low_res_is_reproducible_and_applies_each_option():
    x = smooth(8, seed=5)
    cfg = DegradeConfig(blur_prob=0.5, jpeg_prob=0.5)
    a = make_low_res(x, 4, cfg, torch.Generator().manual_seed(9))
    b = make_low_res(x, 4, cfg, torch.Generator().manual_seed(9))
    assert torch.equal(a, b) and a.shape == (8, 3, 8, 8)
    changed = (a - downscale(x, 4)).abs().flatten(1).amax(1) > 1e-4
    assert 0 < int(changed.sum()) < 8  # some images degraded, some not
    # the draws do not depend on the options: the same generator state follows either way
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    make_low_res(x, 4, DegradeConfig(), g1)
    make_low_res(x, 4, cfg, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))


def test_config_checks_the_degradation_options(tmp_path):
    cfg = load_config({"data": {"degrade": {"blur_prob": 0.3, "jpeg_quality": [50, 90]}}})
    assert cfg.data.degrade.blur_prob == 0.3 and cfg.data.degrade.jpeg_quality == (50, 90)
    for bad, message in ((["data.degrade.resample=nearest"], "resample must be one of"),
                         (["data.degrade.jpeg_prob=1.5"], r"jpeg_prob must be in \[0, 1\]"),
                         (["data.degrade.blur_sigma=[2, 1]"], "blur_sigma must be"),
                         (["data.degrade.jpeg_quality=[0, 90]"], "jpeg_quality must be")):
        with pytest.raises(ConfigError, match=message):
            load_config({}, bad)
    assert math.isclose(DegradeConfig().blur_sigma[0], 0.4)
