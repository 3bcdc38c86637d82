"""Attention backends: sdpa and math agree on random inputs and on a whole U-Net; backend switching;
xformers is optional and asking for it without the package says how to install it."""

import sys

import pytest
import torch

from ldm.config import UNetConfig
from ldm.models.attention import (
    ATTENTION_BACKENDS,
    AttentionLayer,
    CrossAttention,
    SpatialTransformer,
    attention,
    set_attention_backend,
)
from ldm.models.unet import UNet


def qkv(lq: int, lk: int, seed: int = 0, b: int = 2, heads: int = 3, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, lq, d, generator=g)
    k = torch.randn(b, heads, lk, d, generator=g)
    v = torch.randn(b, heads, lk, d, generator=g)
    return q, k, v


def test_math_backend_is_the_textbook_formula():
    q, k, v = qkv(5, 7)
    out = attention(q, k, v, "math")
    q64, k64, v64 = q.double(), k.double(), v.double()
    weights = torch.exp(q64 @ k64.transpose(-1, -2) / 4.0)  # sqrt(d) = 4
    expected = (weights / weights.sum(-1, keepdim=True)) @ v64
    assert out.shape == (2, 3, 5, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lq, lk", [(64, 64), (37, 11), (1, 77)])
def test_sdpa_matches_math(lq, lk):
    q, k, v = qkv(lq, lk)
    err = (attention(q, k, v, "sdpa") - attention(q, k, v, "math")).abs().max()
    assert err < 1e-5


def test_math_backend_keeps_input_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in qkv(9, 4))
    out = attention(q, k, v, "math")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), attention(q.float(), k.float(), v.float(), "math"), rtol=0, atol=0.02)


def test_unknown_backend_lists_valid_names():
    q, k, v = qkv(2, 2)
    with pytest.raises(ValueError, match="sdpa, xformers, math"):
        attention(q, k, v, "flash")
    with pytest.raises(ValueError, match="valid backends"):
        set_attention_backend(torch.nn.Linear(1, 1), "flash")


def test_cross_attention_layer_with_different_lengths():
    layer = CrossAttention(query_dim=32, context_dim=20, heads=4, dim_head=8)
    x, ctx = torch.randn(2, 30, 32), torch.randn(2, 9, 20)
    expected = layer(x, ctx)
    assert expected.shape == (2, 30, 32)
    layer.backend = "math"
    assert (layer(x, ctx) - expected).abs().max() < 1e-5


def _random_unet() -> UNet:
    cfg = UNetConfig(
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_heads=2,
        num_head_channels=None,
        transformer_depth=2,
        context_dim=24,
        norm_groups=8,
    )
    unet = UNet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():  # zero-initialised outputs would hide the attention layers
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return unet


def test_whole_unet_sdpa_matches_math():
    unet = _random_unet()
    x, ctx = torch.randn(2, 4, 8, 6), torch.randn(2, 13, 24)
    expected = unet(x, torch.tensor([10.0, 900.0]), ctx)
    set_attention_backend(unet, "math")
    layers = [m for m in unet.modules() if isinstance(m, AttentionLayer)]
    assert len(layers) == 7 * 2 * 2  # 7 transformers (2 in, 1 mid, 4 out) x depth 2 x (self, cross)
    assert all(m.backend == "math" for m in layers)
    out = unet(x, torch.tensor([10.0, 900.0]), ctx)
    assert expected.abs().max() > 0.1
    assert (out - expected).abs().max() < 1e-5
    # the attention path matters: dropping the context changes the output
    assert (unet(x, torch.tensor([10.0, 900.0]), torch.zeros_like(ctx)) - out).abs().max() > 1e-3


def test_spatial_transformer_conv_and_linear_projections_agree():
    conv = SpatialTransformer(16, 2, 8, 1, 24, 8, use_linear=False)
    lin = SpatialTransformer(16, 2, 8, 1, 24, 8, use_linear=True)
    state = {k: v.reshape(lin.state_dict()[k].shape) for k, v in conv.state_dict().items()}
    state["proj_out.weight"] = torch.randn(16, 16)
    lin.load_state_dict(state)
    conv.load_state_dict({k: v.reshape(conv.state_dict()[k].shape) for k, v in state.items()})
    x, ctx = torch.randn(2, 16, 5, 3), torch.randn(2, 4, 24)
    torch.testing.assert_close(conv(x, ctx), lin(x, ctx), rtol=1e-5, atol=1e-5)
    assert (conv(x, ctx) - x).abs().max() > 1e-3


def _hide_xformers(monkeypatch):
    # a None entry in sys.modules makes `import` raise ImportError
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)


def test_xformers_missing_says_how_to_install(monkeypatch):
    _hide_xformers(monkeypatch)
    q, k, v = qkv(4, 4)
    with pytest.raises(ImportError, match=r"pip install xformers.*pip install ldm\[xformers\]"):
        attention(q, k, v, "xformers")
    unet = _random_unet()
    with pytest.raises(ImportError, match="pip install xformers"):
        set_attention_backend(unet, "xformers")
    assert all(m.backend == "sdpa" for m in unet.modules() if isinstance(m, AttentionLayer))


def test_backend_names():
    assert ATTENTION_BACKENDS == ("sdpa", "xformers", "math")


def test_xformers_matches_sdpa():
    pytest.importorskip("xformers.ops")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (t.to(device) for t in qkv(37, 11))
    err = (attention(q, k, v, "xformers") - attention(q, k, v, "sdpa")).abs().max()
    assert err < 1e-4
