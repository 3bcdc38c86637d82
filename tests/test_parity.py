"""Numerical parity with diffusers and transformers on random weights.

An original-layout state dict of our SD 1.5 / 2.1 / x4 upscaler architectures (channel-reduced, otherwise
faithful: same channel multipliers, head convention, conv vs linear projections, attention at
[4, 2, 1]) is converted by diffusers' OWN single-file converters into diffusers models built from
configs that diffusers itself derives from the original-style config; both must compute the same
outputs. The full-size models are checked for keys and shapes on the meta device, and our own key
maps must agree with diffusers' converters tensor for tensor.
"""

from __future__ import annotations


import pytest
import torch

from helpers import CONFIGS
from ldm.bench import randomize_weights_
from ldm.config import TextEncoderConfig, UNetConfig, VAEConfig, load_config
from ldm.convert.diffusers import (
    text_config_to_diffusers,
    text_rules,
    to_diffusers_state,
    unet_config_to_diffusers,
    unet_rules,
    vae_rules,
)
from ldm.models.text import TextEncoder
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
transformers = pytest.importorskip("transformers")

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
TOL = 1e-4  # max abs error on outputs scaled to unit std


def full(name: str):
    return load_config(CONFIGS / f"{name}.yaml").model


def small_unet(name: str) -> UNetConfig:
    """The U-Net of `name` with 64 base channels and a 64-wide context; everything else as published."""
    cfg = full(name).unet
    cfg.model_channels, cfg.context_dim = 64, 64
    return cfg


def small_vae() -> VAEConfig:
    cfg = full("sd15").vae
    cfg.ch = 32
    return cfg


def perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values of unit-ish scale for every float tensor, zero-initialised layers included."""
    randomize_weights_(module, seed)
    return module.eval()


def original_config(unet: UNetConfig, vae: VAEConfig) -> dict:
    """The parts of an original `v1-inference.yaml` / `v2-inference.yaml` that diffusers reads."""
    unet_params = {
        "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "model_channels": unet.model_channels, "channel_mult": list(unet.channel_mult),
        "num_res_blocks": unet.num_res_blocks, "attention_resolutions": list(unet.attention_resolutions),
        "transformer_depth": unet.transformer_depth, "context_dim": unet.context_dim,
        "use_linear_in_transformer": unet.use_linear_in_transformer,
    }
    if unet.num_heads is not None:
        unet_params["num_heads"] = unet.num_heads
    else:
        unet_params["num_head_channels"] = unet.num_head_channels
    if unet.num_classes is not None:  # x4-upscaling.yaml
        unet_params["num_classes"] = unet.num_classes
    if unet.disable_self_attentions:
        unet_params["disable_self_attentions"] = list(unet.disable_self_attentions)
    ddconfig = {
        "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae.ch, "ch_mult": list(vae.ch_mult),
        "num_res_blocks": vae.num_res_blocks, "z_channels": vae.z_channels, "attn_resolutions": [],
    }
    return {"model": {"params": {
        "scale_factor": vae.scaling_factor,
        "unet_config": {"params": unet_params},
        "first_stage_config": {"params": {"embed_dim": vae.embed_dim, "ddconfig": ddconfig}},
    }}}


def prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def diffusers_unet(unet: UNet, vae_cfg: VAEConfig):
    """diffusers' own config and conversion of our U-Net's original-layout weights."""
    from diffusers import UNet2DConditionModel

    checkpoint = prefixed(unet, UNET_PREFIX)
    config = sfu.create_unet_diffusers_config_from_ldm(original_config(unet.cfg, vae_cfg), checkpoint)
    converted = sfu.convert_ldm_unet_checkpoint(checkpoint, config)
    model = UNet2DConditionModel(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval(), converted, config


def diffusers_vae(vae: AutoencoderKL):
    from diffusers import AutoencoderKL as DiffusersVAE

    checkpoint = prefixed(vae, VAE_PREFIX)
    config = sfu.create_vae_diffusers_config_from_ldm(original_config(small_unet("sd15"), vae.cfg), checkpoint)
    converted = sfu.convert_ldm_vae_checkpoint(checkpoint, config)
    model = DiffusersVAE(**config)
    model.load_state_dict(converted, strict=True)
    return model.eval(), converted


def scaled_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    scale = theirs.std().item()
    assert scale > 1e-2, "outputs are (nearly) constant: the weights were not perturbed"
    return ((ours - theirs).abs().max() / scale).item()


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))[:10]
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_unet_matches_diffusers(name):
    torch.manual_seed(0)
    unet = perturb(UNet(small_unet(name)), seed=1)
    theirs, converted, config = diffusers_unet(unet, small_vae())
    # our key map gives exactly diffusers' conversion, and our config its config
    assert_same_tensors(to_diffusers_state(unet.state_dict(), unet_rules(unet.cfg)), converted)
    ours_config = unet_config_to_diffusers(unet.cfg)
    for key in ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block",
                "cross_attention_dim", "attention_head_dim", "use_linear_projection", "transformer_layers_per_block"):
        assert ours_config[key] == config[key], key

    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([1.0, 981.0])
    ctx = torch.randn(2, 77, 64)
    with torch.no_grad():
        err = scaled_error(unet(x, t, ctx), theirs(x, t, ctx).sample)
    print(f"{name} U-Net max abs error (unit scale): {err:.2e}")
    assert err <= TOL


def test_upscaler_unet_matches_diffusers():
    """The x4 upscaler's U-Net (class embedding of the noise level, cross-only attention at levels
    0-2) at a quarter of its width, converted by diffusers' own converter."""
    torch.manual_seed(0)
    cfg = full("sd-x4-upscaler").unet
    cfg.model_channels, cfg.context_dim = 64, 64
    unet = perturb(UNet(cfg), seed=5)
    vae_cfg = full("sd-x4-upscaler").vae
    theirs, converted, config = diffusers_unet(unet, vae_cfg)
    assert config["num_class_embeds"] == 1000 and config["only_cross_attention"] == [True, True, True, False]
    assert_same_tensors(to_diffusers_state(unet.state_dict(), unet_rules(unet.cfg)), converted)
    ours_config = unet_config_to_diffusers(unet.cfg)
    for key in ("down_block_types", "block_out_channels", "attention_head_dim", "only_cross_attention", "num_class_embeds"):
        assert ours_config[key] == config[key], key

    x = torch.randn(2, 7, 16, 16)
    t, levels = torch.tensor([1.0, 981.0]), torch.tensor([0, 350])
    ctx = torch.randn(2, 77, 64)
    with torch.no_grad():
        err = scaled_error(unet(x, t, ctx, levels), theirs(x, t, ctx, class_labels=levels).sample)
    print(f"x4 upscaler U-Net max abs error (unit scale): {err:.2e}")
    assert err <= TOL


def test_vae_matches_diffusers():
    vae = perturb(AutoencoderKL(small_vae()), seed=2)
    theirs, converted = diffusers_vae(vae)
    assert_same_tensors(to_diffusers_state(vae.state_dict(), vae_rules(vae.cfg)), converted)
    x = torch.randn(1, 3, 32, 32)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        post, dist = vae.encode(x), theirs.encode(x).latent_dist
        errs = {
            "mean": scaled_error(post.mean, dist.mean),
            "logvar": scaled_error(post.logvar, dist.logvar),
            "decode": scaled_error(vae.decode(z), theirs.decode(z).sample),
        }
    print("VAE max abs errors (unit scale):", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) <= TOL


def _clip_text_model(cfg: TextEncoderConfig, state: dict[str, torch.Tensor]):
    """A transformers CLIPTextModel from our exported config, loaded strictly with `state`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**text_config_to_diffusers(cfg)))
    if not hasattr(model, "text_model"):  # transformers 5 has no `text_model` level
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


PROMPTS = ["a photograph of an astronaut riding a horse", "two red circles above a blue square", ""]


def test_sd1_text_encoder_matches_transformers():
    cfg = TextEncoderConfig(kind="hf_clip", width=64, layers=3, heads=4, projection_dim=64)
    ours = perturb(TextEncoder(cfg), seed=3)
    rules, extra = text_rules(cfg)
    state = to_diffusers_state(ours.state_dict(), rules)
    assert not extra
    # diffusers' converter strips the prefix and nothing else
    assert_same_tensors(state, sfu.convert_ldm_clip_checkpoint(prefixed(ours, TEXT_PREFIX)))
    theirs = _clip_text_model(cfg, state)
    ids = ours.tokenize(PROMPTS)
    with torch.no_grad():
        err = scaled_error(ours(ids), theirs(input_ids=ids).last_hidden_state)
    print(f"SD 1.x text encoder max abs error (unit scale): {err:.2e}")
    assert err <= TOL


def test_sd2_text_encoder_matches_shorter_clip_text_model():
    """Ours (OpenCLIP tower read at the penultimate layer) == the one-layer-shorter CLIPTextModel
    we export, which is what diffusers' SD 2.x pipelines run."""
    cfg = TextEncoderConfig(kind="open_clip", width=64, layers=4, heads=4, projection_dim=64,
                            activation="gelu", layer="penultimate")
    ours = perturb(TextEncoder(cfg), seed=4)
    rules, extra = text_rules(cfg)
    state = to_diffusers_state(ours.state_dict(), rules)
    # diffusers' converter: the same tensors, plus the last block, which it drops only for the
    # full-size model (by the names of block 23)
    converter = sfu.convert_open_clip_checkpoint(None, prefixed(ours, TEXT_PREFIX))
    dropped = {k for k in converter if k.startswith("text_model.encoder.layers.3.")}
    assert_same_tensors(state, {k: v for k, v in converter.items() if k not in dropped})
    assert sorted(extra) == sorted(["model.text_projection", "model.logit_scale"]
                                   + [k for k in ours.state_dict() if k.startswith("model.transformer.resblocks.3.")])
    theirs = _clip_text_model(cfg, state)
    assert theirs.config.num_hidden_layers == 3
    ids = ours.tokenize(PROMPTS)
    assert (ids[:, -1] == 0).all()  # OpenCLIP pads with 0
    with torch.no_grad():
        err = scaled_error(ours(ids), theirs(input_ids=ids).last_hidden_state)
    print(f"SD 2.x text encoder max abs error (unit scale): {err:.2e}")
    assert err <= TOL


# ---------------------------------------------------------------------------------------------
# Full size, keys and shapes only (meta device)
# ---------------------------------------------------------------------------------------------


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", ["sd15", "sd21", "sd-x4-upscaler"])
def test_full_size_unet_and_vae_keys_and_shapes(name):
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import UNet2DConditionModel

    cfg = full(name)
    with torch.device("meta"):
        unet, vae = UNet(cfg.unet), AutoencoderKL(cfg.vae)
    original = original_config(cfg.unet, cfg.vae)
    unet_ckpt, vae_ckpt = prefixed(unet, UNET_PREFIX), prefixed(vae, VAE_PREFIX)
    unet_config = sfu.create_unet_diffusers_config_from_ldm(original, unet_ckpt)
    vae_config = sfu.create_vae_diffusers_config_from_ldm(original, vae_ckpt)
    with torch.device("meta"):
        their_unet, their_vae = UNet2DConditionModel(**unet_config), DiffusersVAE(**vae_config)
    for ours, converted, theirs, rules in (
        (unet, sfu.convert_ldm_unet_checkpoint(unet_ckpt, unet_config), their_unet, unet_rules(cfg.unet)),
        (vae, sfu.convert_ldm_vae_checkpoint(vae_ckpt, vae_config), their_vae, vae_rules(cfg.vae)),
    ):
        assert shapes(converted) == shapes(theirs.state_dict())
        assert shapes(to_diffusers_state(ours.state_dict(), rules)) == shapes(converted)
    assert unet_config["attention_head_dim"] == unet_config_to_diffusers(cfg.unet)["attention_head_dim"]
    assert unet_config["attention_head_dim"] == {"sd15": 8, "sd21": [5, 10, 20, 20], "sd-x4-upscaler": 8}[name]


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_size_text_encoder_keys_and_shapes(name):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = full(name).text_encoder
    with torch.device("meta"):
        ours = TextEncoder(cfg)
        theirs = CLIPTextModel(CLIPTextConfig(**text_config_to_diffusers(cfg)))
    their_shapes = {f"text_model.{k.removeprefix('text_model.')}": s for k, s in shapes(theirs.state_dict()).items()}
    their_shapes.pop("text_model.embeddings.position_ids", None)
    rules, _ = text_rules(cfg)
    mine = shapes(to_diffusers_state(ours.state_dict(), rules))
    assert mine == their_shapes
    ckpt = prefixed(ours, TEXT_PREFIX)
    if cfg.kind == "hf_clip":
        converted = sfu.convert_ldm_clip_checkpoint(ckpt)
    else:  # diffusers' converter drops block 23 and text_projection of SD 2.x by name, as we do
        assert theirs.config.num_hidden_layers == 23
        converted = sfu.convert_open_clip_checkpoint(None, ckpt)
    assert shapes(converted) == mine
