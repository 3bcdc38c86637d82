"""AutoencoderKL: SD parameter layout and count (on the meta device), shapes, the original's
asymmetric downsampling, image size errors, and the diagonal Gaussian posterior."""

import pytest
import torch

from ldm.config import VAEConfig, load_config
from ldm.models.vae import AutoencoderKL, DiagonalGaussian, Downsample


def tiny_config(**overrides) -> VAEConfig:
    cfg = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, scaling_factor=0.5)
    cfg.update(overrides)
    return VAEConfig(**cfg)


def sd_vae(name: str) -> AutoencoderKL:
    with torch.device("meta"):
        return AutoencoderKL(load_config(f"configs/{name}.yaml").model.vae)


@pytest.mark.parametrize("name, expected", [("sd15", 83_653_863), ("sd21", 83_653_863), ("sd_small", 20_945_575)])
def test_parameter_count(name, expected):
    assert sum(p.numel() for p in sd_vae(name).parameters()) == expected


def test_sd_state_dict_keys():
    sd = sd_vae("sd15").state_dict()
    assert len(sd) == 248  # tensors of first_stage_model in an original checkpoint (without loss.*)
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)  # lowest resolution
    assert sd["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)  # highest resolution
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)  # num_res_blocks + 1
    assert sd["decoder.up.1.upsample.conv.weight"].shape == (256, 256, 3, 3)
    assert not any(k.startswith("decoder.up.0.upsample") for k in sd)
    assert sd["encoder.down.0.downsample.conv.weight"].shape == (128, 128, 3, 3)
    assert not any(k.startswith("encoder.down.3.downsample") for k in sd)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert not any(k.startswith("encoder.down.0.block.0.nin_shortcut") for k in sd)
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert sd["decoder.conv_out.weight"].shape == (3, 128, 3, 3)


def test_extra_attention_levels():
    vae = AutoencoderKL(tiny_config(attn_resolutions=(4,)))
    keys = vae.state_dict().keys()
    assert "encoder.down.2.attn.0.q.weight" in keys and "decoder.up.2.attn.1.q.weight" in keys
    assert not any(".down.0.attn" in k or ".up.0.attn" in k for k in keys)
    assert vae.decode(torch.randn(1, 4, 3, 5)).shape == (1, 3, 12, 20)


@pytest.mark.parametrize("hw", [(16, 16), (8, 24), (32, 4)])
def test_encode_decode_shapes(hw):
    vae = AutoencoderKL(tiny_config())
    assert vae.downsample_factor == 4 and vae.scaling_factor == 0.5
    x = torch.rand(2, 3, *hw) * 2 - 1
    posterior = vae.encode(x)
    assert posterior.mean.shape == (2, 4, hw[0] // 4, hw[1] // 4)
    z = posterior.sample(torch.Generator().manual_seed(0))
    out = vae.decode(z)
    assert out.shape == (2, 3, *hw) and torch.isfinite(out).all()


def test_downsample_pads_right_and_bottom_only():
    down = Downsample(2)
    with torch.no_grad():
        down.conv.weight.zero_()
        down.conv.bias.zero_()
        for c in range(2):
            down.conv.weight[c, c, 0, 0] = 1.0  # top-left tap: output (i, j) reads padded input (2i, 2j)
    x = torch.randn(1, 2, 6, 8)
    out = down(x)
    assert out.shape == (1, 2, 3, 4)
    torch.testing.assert_close(out, x[:, :, ::2, ::2], rtol=0, atol=0)


def test_bad_image_size_names_the_fix():
    vae = AutoencoderKL(tiny_config(ch=8, ch_mult=(1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"image height 100 must be a multiple of 8; try 96 or 104"):
        vae.encode(torch.zeros(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"image width 5 must be a multiple of 8; try 8$"):
        vae.encode(torch.zeros(1, 3, 64, 5))
    assert vae.encode(torch.zeros(1, 3, 8, 16)).mean.shape == (1, 4, 1, 2)


def _posterior(seed: int = 0) -> DiagonalGaussian:
    g = torch.Generator().manual_seed(seed)
    return DiagonalGaussian(torch.randn(3, 8, 5, 6, generator=g))


def test_gaussian_kl_matches_closed_form():
    p = _posterior()
    prior = torch.distributions.Normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(p.mean, p.std), prior).sum((1, 2, 3))
    assert p.kl().shape == (3,)
    torch.testing.assert_close(p.kl(), expected, rtol=1e-5, atol=1e-5)
    zero = DiagonalGaussian(torch.zeros(2, 8, 3, 3))  # N(0, I) itself
    torch.testing.assert_close(zero.kl(), torch.zeros(2))


def test_gaussian_moments_and_clamp():
    moments = torch.zeros(1, 4, 1, 2)
    moments[0, 0] = 1.5  # mean of channel 0
    moments[0, 2, 0, 0], moments[0, 2, 0, 1] = 50.0, -50.0  # logvar of channel 0
    moments[0, 3] = 2.0  # logvar of channel 1
    p = DiagonalGaussian(moments)
    assert p.mean.shape == (1, 2, 1, 2)
    assert p.mode() is p.mean and p.mean[0, 0, 0, 0] == 1.5
    assert p.logvar[0, 0, 0].tolist() == [20.0, -30.0]
    torch.testing.assert_close(p.std[0, 1], torch.full((1, 2), 2.718281828))


def test_gaussian_sample_is_reproducible_with_a_generator():
    p = _posterior()
    a = p.sample(torch.Generator().manual_seed(7))
    b = p.sample(torch.Generator().manual_seed(7))
    c = p.sample(torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 0.1
    noise = torch.randn(p.mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, p.mean + p.std * noise)


def test_mid_block_attention_backends_agree():
    from ldm.models.attention import set_attention_backend

    vae = AutoencoderKL(tiny_config())
    x = torch.rand(1, 3, 16, 12) * 2 - 1
    expected = vae.decode(vae.encode(x).mean)
    set_attention_backend(vae, "math")
    assert vae.encoder.mid.attn_1.backend == "math" and vae.decoder.mid.attn_1.backend == "math"
    torch.testing.assert_close(vae.decode(vae.encode(x).mean), expected, rtol=0, atol=1e-5)
