import math

import pytest
import torch

from ldm.diffusion import CFGDenoiser

B, C, H, W, L, D = 3, 4, 5, 6, 7, 8


class FakeDenoiser:
    """x0 depends on x, sigma and the context, differently per channel; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, *, context):
        self.calls.append({"batch": x.shape[0], "sigma": sigma, "context": context})
        sigma = torch.as_tensor(sigma).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        w = torch.arange(1, C + 1, dtype=x.dtype).reshape(1, C, 1, 1)
        ctx = context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return x / (1 + sigma**2) + w * ctx * torch.linspace(-1, 1, W, dtype=x.dtype)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * 3
    sigma = torch.tensor([3.0, 1.0, 0.2], dtype=torch.float64)
    cond = {"context": torch.randn(B, L, D, generator=g, dtype=torch.float64)}
    uncond = {"context": torch.randn(B, L, D, generator=g, dtype=torch.float64)}
    return x, sigma, cond, uncond


def test_scale_one_makes_one_conditional_call(inputs):
    x, sigma, cond, uncond = inputs
    den = FakeDenoiser()
    out = CFGDenoiser(den, 1.0)(x, sigma, cond=cond, uncond=uncond)
    assert len(den.calls) == 1 and den.calls[0]["batch"] == B
    assert den.calls[0]["context"] is cond["context"]
    torch.testing.assert_close(out, FakeDenoiser()(x, sigma, **cond))


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guided_x0_in_one_batched_call(inputs, scale):
    x, sigma, cond, uncond = inputs
    den = FakeDenoiser()
    out = CFGDenoiser(den, scale)(x, sigma, cond=cond, uncond=uncond)
    assert len(den.calls) == 1 and den.calls[0]["batch"] == 2 * B
    # order [uncond, cond] along the batch, sigma repeated
    torch.testing.assert_close(den.calls[0]["context"], torch.cat([uncond["context"], cond["context"]]))
    torch.testing.assert_close(den.calls[0]["sigma"], torch.cat([sigma, sigma]))
    ref = FakeDenoiser()
    u, c = ref(x, sigma, **uncond), ref(x, sigma, **cond)
    torch.testing.assert_close(out, u + scale * (c - u), atol=1e-12, rtol=1e-12)  # every channel


def test_scalar_sigma_is_passed_through(inputs):
    x, _, cond, uncond = inputs
    den = FakeDenoiser()
    out = CFGDenoiser(den, 2.0)(x, torch.tensor(0.7, dtype=torch.float64), cond=cond, uncond=uncond)
    assert den.calls[0]["sigma"].ndim == 0
    ref = FakeDenoiser()
    u, c = ref(x, 0.7, **uncond), ref(x, 0.7, **cond)
    torch.testing.assert_close(out, u + 2.0 * (c - u))


def _v(x0, x, sigma):
    """v prediction from a VE x0 estimate: x_t = alpha x, v = (alpha x_t - x0) / sigma_t."""
    s = sigma.reshape(-1, 1, 1, 1)
    alpha, sigma_t = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    return (alpha * (alpha * x) - x0) / sigma_t


def test_guidance_rescale(inputs):
    x, sigma, cond, uncond = inputs
    scale = 7.5
    plain = CFGDenoiser(FakeDenoiser(), scale)(x, sigma, cond=cond, uncond=uncond)
    zero = CFGDenoiser(FakeDenoiser(), scale, rescale=0.0)(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(zero, plain)

    full = CFGDenoiser(FakeDenoiser(), scale, rescale=1.0)(x, sigma, cond=cond, uncond=uncond)
    v_cond = _v(FakeDenoiser()(x, sigma, **cond), x, sigma)
    v_full, v_plain = _v(full, x, sigma), _v(plain, x, sigma)
    std = lambda t: t.flatten(1).std(1)  # noqa: E731
    torch.testing.assert_close(std(v_full), std(v_cond))  # per sample
    assert not torch.allclose(std(v_plain), std(v_cond))  # so the rescale really changed something
    # v_full is v_plain scaled per sample (direction kept)
    ratio = (v_full / v_plain).flatten(1)
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))

    half = CFGDenoiser(FakeDenoiser(), scale, rescale=0.5)(x, sigma, cond=cond, uncond=uncond)
    torch.testing.assert_close(_v(half, x, sigma), 0.5 * v_full + 0.5 * v_plain)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, "7.5", True, None])
def test_bad_scale_raises(bad):
    with pytest.raises(ValueError, match="guidance scale"):
        CFGDenoiser(FakeDenoiser(), bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan])
def test_bad_rescale_raises(bad):
    with pytest.raises(ValueError, match="rescale"):
        CFGDenoiser(FakeDenoiser(), 7.5, rescale=bad)


def test_mismatched_cond_and_uncond(inputs):
    x, sigma, cond, uncond = inputs
    cfg = CFGDenoiser(FakeDenoiser(), 7.5)
    with pytest.raises(ValueError, match="same keys"):
        cfg(x, sigma, cond=cond, uncond={})
    with pytest.raises(ValueError, match="pad"):
        cfg(x, sigma, cond=cond, uncond={"context": torch.zeros(B, 2 * L, D, dtype=torch.float64)})
