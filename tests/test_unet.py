"""U-Net: SD parameter layout and counts (on the meta device), shapes at odd sizes, zero-init,
timestep embedding, timestep broadcasting, gradient checkpointing."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ldm.config import ConfigError, UNetConfig, load_config
from ldm.models import layers
from ldm.models.attention import BasicTransformerBlock, SpatialTransformer
from ldm.models.layers import ResBlock, timestep_embedding
from ldm.models.unet import UNet

META = torch.device("meta")


def tiny_config(**overrides) -> UNetConfig:
    cfg = dict(
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        num_heads=None,
        num_head_channels=8,
        context_dim=12,
        norm_groups=8,
        use_linear_in_transformer=True,
    )
    cfg.update(overrides)
    return UNetConfig(**cfg)


def randomize_zeroed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised parameters random values so every path affects the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def sd_unet(name: str) -> UNet:
    with META:
        return UNet(load_config(f"configs/{name}.yaml").model.unet)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- layout of the original checkpoints -------------------------------------------------------


@pytest.mark.parametrize("name, expected", [("sd15", 859_520_964), ("sd21", 865_910_724)])
def test_parameter_count_matches_stable_diffusion(name, expected):
    unet = sd_unet(name)
    assert n_params(unet) == expected
    assert len(unet.state_dict()) == 686  # tensors in an original checkpoint's model.diffusion_model


def test_sd_small_parameter_count():
    n = n_params(sd_unet("sd_small"))
    assert n == 224_156_740  # the count stated in configs/sd_small.yaml
    assert 100e6 < n < 300e6


def test_sd15_state_dict_keys():
    sd = sd_unet("sd15").state_dict()
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd["input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"].shape == (320, 320)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in sd
    assert sd["input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias"].shape == (320,)
    assert sd["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert sd["input_blocks.1.1.transformer_blocks.0.ff.net.2.weight"].shape == (320, 1280)
    assert sd["middle_block.1.proj_in.weight"].shape == (1280, 1280, 1, 1)
    assert sd["input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert sd["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)  # Downsample
    assert sd["input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert not any(k.startswith("input_blocks.2.0.skip_connection") for k in sd)  # Identity
    assert sd["input_blocks.1.0.out_layers.3.weight"].shape == (320, 320, 3, 3)
    assert sd["input_blocks.1.0.emb_layers.1.weight"].shape == (320, 1280)
    assert sd["time_embed.0.weight"].shape == (1280, 320)
    assert sd["time_embed.2.weight"].shape == (1280, 1280)
    # lowest level has no attention, so its Upsample sits at index 1; others at index 2
    assert sd["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd["output_blocks.0.0.in_layers.2.weight"].shape == (1280, 2560, 3, 3)
    assert sd["output_blocks.11.1.proj_out.weight"].shape == (320, 320, 1, 1)
    assert "output_blocks.11.2.conv.weight" not in sd
    assert sd["out.0.weight"].shape == (320,)
    assert sd["out.2.weight"].shape == (4, 320, 3, 3)


def test_sd21_uses_linear_projections_and_head_dim_64():
    unet = sd_unet("sd21")
    sd = unet.state_dict()
    assert sd["middle_block.1.proj_in.weight"].shape == (1280, 1280)
    assert sd["middle_block.1.proj_out.weight"].shape == (1280, 1280)
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 1024)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.heads == 5
    assert unet.middle_block[1].transformer_blocks[0].attn1.heads == 20
    assert sd_unet("sd15").middle_block[1].transformer_blocks[0].attn1.heads == 8


def test_state_dict_loads_strictly_into_a_fresh_model():
    a, b = UNet(tiny_config()), UNet(tiny_config())
    randomize_zeroed(a)
    b.load_state_dict(a.state_dict(), strict=True)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 12)
    torch.testing.assert_close(a(x, 10, ctx), b(x, 10, ctx), rtol=0, atol=0)


# --- behaviour --------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 8), (9, 13), (16, 6), (5, 21), (1, 1)])
def test_any_latent_size(hw):
    unet = randomize_zeroed(UNet(tiny_config()))
    x = torch.randn(2, 4, *hw)
    out = unet(x, torch.tensor([1.0, 500.0]), torch.randn(2, 7, 12))
    assert out.shape == (2, 4, *hw)
    assert torch.isfinite(out).all()


def test_conv_projections_and_heads_by_count():
    cfg = tiny_config(use_linear_in_transformer=False, num_heads=2, num_head_channels=None, in_channels=9)
    unet = randomize_zeroed(UNet(cfg))
    assert unet.middle_block[1].proj_in.weight.ndim == 4
    assert unet.middle_block[1].transformer_blocks[0].attn1.heads == 2
    assert unet(torch.randn(1, 9, 7, 10), 3.0, torch.randn(1, 5, 12)).shape == (1, 4, 7, 10)


def test_untrained_output_is_zero_until_out_conv_changes():
    unet = UNet(tiny_config())
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    assert torch.count_nonzero(unet(x, 10, ctx)) == 0
    with torch.no_grad():
        unet.out[2].bias.fill_(0.5)
    out = unet(x, 10, ctx)
    torch.testing.assert_close(out, torch.full_like(out, 0.5))
    with torch.no_grad():
        unet.out[2].weight.normal_()
    assert unet(x, 10, ctx).std() > 1e-3


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    dim = 6
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, 6) and emb.dtype == torch.float32
    for row, tv in enumerate(t.tolist()):
        for i in range(3):
            freq = math.exp(-math.log(10000.0) * i / 3)
            assert emb[row, i].item() == pytest.approx(math.cos(tv * freq), abs=1e-5)
            assert emb[row, 3 + i].item() == pytest.approx(math.sin(tv * freq), abs=1e-5)
    odd = timestep_embedding(t, 7)
    torch.testing.assert_close(odd[:, :6], emb)
    assert torch.count_nonzero(odd[:, 6]) == 0


def test_scalar_and_per_sample_timesteps_agree():
    unet = randomize_zeroed(UNet(tiny_config()))
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 5, 12)
    expected = unet(x, torch.full((3,), 250.5), ctx)
    torch.testing.assert_close(unet(x, 250.5, ctx), expected, rtol=0, atol=0)
    torch.testing.assert_close(unet(x, torch.tensor(250.5), ctx), expected, rtol=0, atol=0)
    # per-sample timesteps: each row equals that sample run alone
    t = torch.tensor([3.0, 400.25, 999.0])
    out = unet(x, t, ctx)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], unet(x[i : i + 1], t[i], ctx[i : i + 1]), rtol=1e-4, atol=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="timesteps"):
        unet(x, torch.ones(2), ctx)


def test_follows_parameter_dtype():
    unet = randomize_zeroed(UNet(tiny_config())).to(torch.bfloat16)
    x = torch.randn(1, 4, 6, 6)
    out = unet(x, 10.0, torch.randn(1, 3, 12))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gradient_checkpointing_gives_same_gradients(monkeypatch):
    calls = []

    def counting_checkpoint(fn, *args, use_reentrant):
        calls.append(fn)
        return checkpoint(fn, *args, use_reentrant=use_reentrant)

    monkeypatch.setattr(layers, "checkpoint", counting_checkpoint)
    plain = randomize_zeroed(UNet(tiny_config()))
    ckpt = UNet(tiny_config(gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.middle_block[0].gradient_checkpointing
    assert ckpt.middle_block[1].transformer_blocks[0].gradient_checkpointing
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12, requires_grad=True)
    grads = []
    for model in (plain, ckpt):
        model.train()
        ctx.grad = None
        model(x, torch.tensor([5.0, 700.0]), ctx).square().mean().backward()
        grads.append([p.grad for p in model.parameters()] + [ctx.grad.clone()])
    n_blocks = sum(isinstance(m, (ResBlock, BasicTransformerBlock)) for m in ckpt.modules())
    assert len(calls) == n_blocks  # every block of the second model, none of the first
    assert all(g is not None for g in grads[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert grads[0][-1].abs().max() > 0


# --- position embedding (off by default) ------------------------------------------------------


def test_position_embedding_adds_only_its_projections_and_starts_as_a_no_op():
    plain = randomize_zeroed(UNet(tiny_config()))
    posed = UNet(tiny_config(position_embedding_freqs=3))
    extra = set(posed.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(posed.state_dict())
    # one (dim, 4 * freqs) projection per SpatialTransformer, none in the default layout
    assert sorted(extra) == sorted(k for k in posed.state_dict() if k.endswith("pos_embed.proj.weight"))
    assert len(extra) == sum(1 for k in plain.state_dict() if k.endswith("proj_in.weight")) == 7
    assert posed.state_dict()["middle_block.1.pos_embed.proj.weight"].shape == (32, 12)
    missing = posed.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(extra)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    torch.testing.assert_close(posed(x, 10, ctx), plain(x, 10, ctx), rtol=0, atol=0)  # zero-initialised
    randomize_zeroed(posed)
    assert (posed(x, 10, ctx) - plain(x, 10, ctx)).abs().max() > 1e-3


def test_position_embedding_tells_places_apart_at_any_feature_map_size():
    from ldm.models.attention import FourierPositions

    pe = FourierPositions(2, 8)
    with torch.no_grad():
        pe.proj.weight.copy_(torch.eye(8))  # read the 8 Fourier features themselves
    f = pe(2, 4, torch.device("cpu"), torch.float32).reshape(2, 4, 8)
    ys, xs = torch.tensor([0.25, 0.75]), torch.tensor([0.125, 0.375, 0.625, 0.875])  # pixel centres in [0, 1]
    k = torch.tensor([1.0, 2.0]) * math.pi
    torch.testing.assert_close(f[:, 0, :2], torch.sin(ys[:, None] * k))
    torch.testing.assert_close(f[:, 0, 2:4], torch.cos(ys[:, None] * k))
    torch.testing.assert_close(f[0, :, 4:6], torch.sin(xs[:, None] * k))
    torch.testing.assert_close(f[0, :, 6:], torch.cos(xs[:, None] * k))
    # The same place at two sizes: the centre pixel of a 3x3 map is the middle of a 9x9 one.
    torch.testing.assert_close(pe(3, 3, torch.device("cpu"), torch.float32)[4],
                               pe(9, 9, torch.device("cpu"), torch.float32)[40])
    # A transformer block has no convolution: on a constant feature map every pixel gets the same
    # output, unless it is told where the pixel is.
    x, ctx = torch.ones(1, 16, 6, 6), torch.randn(1, 3, 24)
    for freqs, varies in ((0, False), (2, True)):
        block = randomize_zeroed(SpatialTransformer(16, 2, 8, 1, 24, 8, use_linear=True, position_freqs=freqs))
        spread = block(x, ctx).flatten(2).std(-1).max()  # over the pixels, per channel
        assert (spread > 1e-2) if varies else (spread < 1e-5), freqs


def test_position_embedding_is_validated_and_has_no_diffusers_form():
    from ldm.config import ConfigError
    from ldm.convert.diffusers import unet_config_to_diffusers

    with pytest.raises(ConfigError, match="position_embedding_freqs must be >= 0"):
        UNet(tiny_config(position_embedding_freqs=-1))
    with pytest.raises(ConfigError, match="no diffusers form"):
        unet_config_to_diffusers(tiny_config(position_embedding_freqs=4))


# --- text layout map (off by default) ---------------------------------------------------------


def test_text_layout_adds_one_projection_and_starts_as_a_no_op():
    plain = randomize_zeroed(UNet(tiny_config()))
    laid = UNet(tiny_config(text_layout_grid=3))
    extra = set(laid.state_dict()) - set(plain.state_dict())
    assert extra == {"layout.weight", "layout.bias"}
    assert laid.state_dict()["layout.weight"].shape == (16 * 3 * 3, 12)  # model_channels x grid^2 from context_dim
    laid.load_state_dict(plain.state_dict(), strict=False)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 12)
    torch.testing.assert_close(laid(x, 10, ctx), plain(x, 10, ctx), rtol=0, atol=0)  # zero-initialised


def test_text_layout_puts_a_text_direction_at_its_place():
    # A map that reads context feature 0 into the top-left cell of a 2x2 grid (channel 0) adds,
    # after the input conv, exactly that cell's bilinear resize: the text decides where.
    unet = UNet(tiny_config(text_layout_grid=2))
    with torch.no_grad():
        unet.layout.weight.zero_()
        unet.layout.weight[0, 0] = 1.0  # output (channel 0, row 0, col 0) <- mean context feature 0
    ctx = torch.zeros(1, 5, 12)
    ctx[0, :, 0] = 2.0
    added = unet._layout(ctx, (8, 8))
    expect = torch.nn.functional.interpolate(torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]]), size=(8, 8), mode="bilinear",
                                             align_corners=False)
    torch.testing.assert_close(added[:, :1], expect)
    assert added[:, 1:].abs().max() == 0
    assert added[0, 0, 0, 0] == 2.0 and added[0, 0, -1, -1] == 0.0  # top left lit, bottom right not
    # any latent size: the same map resized
    assert unet._layout(ctx, (6, 10)).shape == (1, 16, 6, 10)
    with pytest.raises(ConfigError, match="text_layout_grid must be >= 0"):
        UNet(tiny_config(text_layout_grid=-1))


# --- both optional parts ------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, weight_name, shape", [
    ("position_embedding_freqs", 2, "input_blocks.1.1.pos_embed.proj.weight", (32, 8)),
    ("text_layout_grid", 4, "layout.weight", (32 * 4 * 4, 64)),
])
def test_optional_parts_round_trip_in_our_file_and_have_no_sd_or_diffusers_form(tmp_path, key, value, weight_name, shape):
    from ldm import LDMPipeline
    from ldm.convert.diffusers import unet_config_to_diffusers
    from tests.helpers import FAST, SD_TINY, randomize

    pipe = randomize(LDMPipeline.from_config(SD_TINY, [*FAST, f"model.unet.{key}={value}"]))
    weight = pipe.unet.state_dict()[weight_name]
    assert weight.shape == shape and weight.abs().max() > 0
    back = LDMPipeline.from_checkpoint(pipe.save(tmp_path / "m.safetensors"))
    assert getattr(back.config.model.unet, key) == value
    torch.testing.assert_close(back.unet.state_dict()[weight_name], weight)
    with pytest.raises(ConfigError, match=f"unet.{key}={value} .*no single-file form"):
        pipe.save_single_file(tmp_path / "sd.safetensors")
    assert not (tmp_path / "sd.safetensors").exists()
    with pytest.raises(ConfigError, match=f"unet.{key}={value} .*no diffusers form"):
        unet_config_to_diffusers(pipe.config.model.unet)
