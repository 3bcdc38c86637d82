"""diffusers folders in and out: key maps, config conversions, `load_diffusers` and `save_diffusers`.

Our networks use the original Stable Diffusion parameter names; a diffusers folder stores the same
tensors under other names (`unet/`, `vae/`, `text_encoder/`), with its own configs. This module
derives both name maps from our configs (a meta-device model gives the key list, small functions
give each key its diffusers name) and applies them in either direction, strictly: every tensor of
the folder must be mapped and every parameter of our models filled, or the error names the keys.

Three layout differences beyond renaming:

- VAE attention: our 1x1 convs `q`, `k`, `v`, `proj_out` (C, C, 1, 1) are diffusers' Linear layers
  `to_q`, `to_k`, `to_v`, `to_out.0` (C, C).
- OpenCLIP text tower (SD 2.x): the fused `attn.in_proj_weight` (3w, w) is split into diffusers'
  `q_proj`, `k_proj`, `v_proj` (w, w) each; ln_1/ln_2/c_fc/c_proj become layer_norm1/2, fc1/fc2.
- Text encoders read at the penultimate layer (SD 2.x, "clip skip 2"): diffusers represents them as
  a `CLIPTextModel` one layer shorter, whose last hidden state after `final_layer_norm` *is* our
  penultimate output, so diffusers' own classes compute exactly our conditioning. The unused last
  block (and OpenCLIP's `text_projection` and `logit_scale`, which a `CLIPTextModel` has no place
  for) are kept under our own key names in `text_encoder/ldm_extra.safetensors`, which diffusers and
  transformers ignore and `load_diffusers` reads back, so ours -> diffusers -> ours is bit-exact.
  A folder without that file (e.g. one made by diffusers) loads with `layer="last"` over the
  layers it has, which computes the same conditioning; OpenCLIP's unused `text_projection` is then
  set to the identity and `logit_scale` to log(1/0.07), and the loss is stated in the docs.

`model_index.json` also carries our whole config under `_ldm_config` (diffusers ignores keys that
start with "_"); it is used when it describes the same model as the folder's own configs, which
restores the fields diffusers has no place for (dropout, sampling defaults, `trainable`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..config import (
    Config,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    from_dict,
    to_dict,
)
from ..errors import CheckpointError, ConfigError

Tensors = dict[str, torch.Tensor]

EXTRA_FILE = "ldm_extra.safetensors"  # in text_encoder/: tensors a CLIPTextModel has no place for
LDM_CONFIG_KEY = "_ldm_config"  # in model_index.json

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
LAYER_NORM_EPS = 1e-5  # every LayerNorm of both text encoders
UNET_NORM_EPS = 1e-5  # the U-Net's GroupNorms (its transformers' 1e-6 is fixed on both sides)
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021, sec. 2.5)


# ---------------------------------------------------------------------------------------------
# Key rules: one of our tensors <-> one (or, for fused projections, several) diffusers tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRule:
    """`ours` <-> `theirs`. op: "copy"; "linear" (our 1x1 conv weight (C, C, 1, 1) <-> their Linear
    weight (C, C)); "split" (our fused rows <-> their equal chunks along dim 0, in order)."""

    ours: str
    theirs: tuple[str, ...]
    op: str = "copy"


def _rename(key: str, modules: Mapping[str, str]) -> str:
    """Swap the longest module-path prefix of `key` found in `modules` (our path -> theirs)."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:i])
        if head in modules:
            return ".".join([modules[head], *parts[i:]])
    raise KeyError(f"no diffusers name for {key!r}")


def _our_keys(build: Callable[[], torch.nn.Module]) -> list[str]:
    """The state-dict keys of a model, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return list(build().state_dict())


_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_module_map(cfg: UNetConfig) -> dict[str, str]:
    """Our U-Net module paths -> diffusers' `UNet2DConditionModel` paths. Spatial transformers keep
    their inner names (norm, proj_in, transformer_blocks.*, proj_out) on both sides."""
    n, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    m = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }

    def resnet(ours: str, theirs: str) -> None:
        m.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _UNET_RESNET.items()})

    def has_attn(level: int) -> bool:
        return 2**level in cfg.attention_resolutions

    k = 1  # input_blocks[0] is conv_in
    for level in range(n):
        for j in range(nrb):
            resnet(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}")
            if has_attn(level):
                m[f"input_blocks.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if level != n - 1:
            m[f"input_blocks.{k}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            k += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    m["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    # diffusers' up_blocks[b] is our decoder level n-1-b; each has nrb + 1 resnets
    for i in range(n * (nrb + 1)):
        b, j = divmod(i, nrb + 1)
        attn = has_attn(n - 1 - b)
        resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}")
        if attn:
            m[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
        if b != n - 1 and j == nrb:
            m[f"output_blocks.{i}.{2 if attn else 1}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
    return m


def unet_rules(cfg: UNetConfig) -> list[KeyRule]:
    from ..models.unet import UNet

    modules = unet_module_map(cfg)
    return [KeyRule(k, (_rename(k, modules),)) for k in _our_keys(lambda: UNet(cfg))]


_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_module_map(cfg: VAEConfig) -> dict[str, str]:
    """Our VAE module paths -> diffusers' `AutoencoderKL` paths. The decoder's levels run in the
    opposite order: our `decoder.up[l]` (l = 0 at full resolution) is their `up_blocks[n-1-l]`."""
    if cfg.attn_resolutions:
        raise CheckpointError(
            f"vae.attn_resolutions={list(cfg.attn_resolutions)}: diffusers' AutoencoderKL has attention only "
            "in its mid blocks, so this VAE has no diffusers layout; export it as a model file instead"
        )
    n, nrb = len(cfg.ch_mult), cfg.num_res_blocks
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}

    def resnet(ours: str, theirs: str) -> None:
        m[ours] = theirs
        m[f"{ours}.nin_shortcut"] = f"{theirs}.conv_shortcut"

    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = f"{part}.conv_in"
        m[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        m[f"{part}.conv_out"] = f"{part}.conv_out"
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        m.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in _VAE_ATTN.items()})
    for level in range(n):
        for j in range(nrb):
            resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        if level != n - 1:
            m[f"encoder.down.{level}.downsample.conv"] = f"encoder.down_blocks.{level}.downsamplers.0.conv"
        b = n - 1 - level
        for j in range(nrb + 1):
            resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{b}.resnets.{j}")
        if level != 0:
            m[f"decoder.up.{level}.upsample.conv"] = f"decoder.up_blocks.{b}.upsamplers.0.conv"
    return m


def vae_rules(cfg: VAEConfig) -> list[KeyRule]:
    from ..models.vae import AutoencoderKL

    modules = vae_module_map(cfg)
    rules = []
    for key in _our_keys(lambda: AutoencoderKL(cfg)):
        theirs = _rename(key, modules)
        is_attn_weight = re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", theirs) is not None
        rules.append(KeyRule(key, (theirs,), "linear" if is_attn_weight else "copy"))
    return rules


def exported_text_layers(cfg: TextEncoderConfig) -> int:
    """Layers of the diffusers `CLIPTextModel`: one fewer when we read the penultimate layer."""
    return cfg.layers - (1 if cfg.layer == "penultimate" else 0)


_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def text_rules(cfg: TextEncoderConfig) -> tuple[list[KeyRule], list[str]]:
    """(rules for the tensors of the diffusers `CLIPTextModel`, our keys kept in the extra file).

    Their names carry the `text_model.` level of transformers 4 and of published folders (which
    transformers 5 reads too)."""
    from ..models.text import TextEncoder

    keys = _our_keys(lambda: TextEncoder(dataclasses.replace(cfg, trainable=False)))
    n = exported_text_layers(cfg)
    rules: list[KeyRule] = []
    extra: list[str] = []
    if cfg.kind == "hf_clip":
        layer_re = re.compile(r"^transformer\.text_model\.encoder\.layers\.(\d+)\.")
        for key in keys:
            hit = layer_re.match(key)
            if hit and int(hit.group(1)) >= n:
                extra.append(key)
            else:
                rules.append(KeyRule(key, (key.removeprefix("transformer."),)))
        return rules, extra

    modules = {
        "model.token_embedding": "text_model.embeddings.token_embedding",
        "model.ln_final": "text_model.final_layer_norm",
    }
    for i in range(n):
        ours, theirs = f"model.transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        modules.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _OPEN_CLIP_BLOCK.items()})
    block_re = re.compile(r"^model\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
    for key in keys:
        fused = block_re.match(key)
        if key == "model.positional_embedding":
            rules.append(KeyRule(key, ("text_model.embeddings.position_embedding.weight",)))
        elif key in ("model.text_projection", "model.logit_scale"):
            extra.append(key)
        elif key.startswith("model.transformer.resblocks.") and int(key.split(".")[3]) >= n:
            extra.append(key)
        elif fused:
            i, kind = fused.groups()
            attn = f"text_model.encoder.layers.{i}.self_attn"
            rules.append(KeyRule(key, tuple(f"{attn}.{p}_proj.{kind}" for p in "qkv"), "split"))
        else:
            rules.append(KeyRule(key, (_rename(key, modules),)))
    return rules, extra


def to_diffusers_state(state: Mapping[str, torch.Tensor], rules: list[KeyRule]) -> Tensors:
    """Our state dict -> diffusers names (new contiguous tensors; values bit-identical)."""
    out: Tensors = {}
    for rule in rules:
        t = state[rule.ours]
        if rule.op == "split":
            parts = t.chunk(len(rule.theirs), dim=0)
        elif rule.op == "linear":
            parts = (t.flatten(1) if t.ndim == 4 else t,)  # (C, C, 1, 1) -> (C, C)
        else:
            parts = (t,)
        for name, part in zip(rule.theirs, parts):
            out[name] = part.detach().contiguous().clone()
    return out


def from_diffusers_state(state: Mapping[str, torch.Tensor], rules: list[KeyRule], what: str) -> Tensors:
    """Diffusers names -> our state dict. Every tensor of `state` must be consumed and every rule
    filled: the error names the strays and the missing."""
    missing = [name for rule in rules for name in rule.theirs if name not in state]
    used = {name for rule in rules for name in rule.theirs}
    stray = [k for k in state if k not in used]
    if missing or stray:
        lines = [f"{what}: the weights do not match the architecture in its config.json"]
        for label, names in (("missing", missing), ("unexpected", stray)):
            if names:
                more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
                lines.append(f"  {label} ({len(names)}): {'; '.join(names[:5])}{more}")
        lines.append("  check that the folder's config.json describes the same model as its weights")
        raise CheckpointError("\n".join(lines))
    out: Tensors = {}
    for rule in rules:
        parts = [state[name] for name in rule.theirs]
        if rule.op == "split":
            out[rule.ours] = torch.cat(parts, dim=0)
        elif rule.op == "linear":
            out[rule.ours] = parts[0][:, :, None, None] if parts[0].ndim == 2 else parts[0]
        else:
            out[rule.ours] = parts[0]
    return out


# ---------------------------------------------------------------------------------------------
# Configs: ours <-> diffusers' config.json files
# ---------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int = 64) -> dict:
    """`UNet2DConditionModel` config. Heads: diffusers' `attention_head_dim` is the head *count*
    (per level when a list): SD 1.x's num_heads=8 gives 8, SD 2.x's 64-channel heads give
    [5, 10, 20, 20]."""
    n = len(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**level in cfg.attention_resolutions for level in range(n)]
    heads: int | list[int] = (
        cfg.num_heads if cfg.num_heads is not None else [c // cfg.num_head_channels for c in channels]
    )
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": _version("diffusers"),
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # our timestep embedding is [cos, sin]
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": UNET_NORM_EPS,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": heads,
        "num_attention_heads": None,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "class_embed_type": None,
        "addition_embed_type": None,
        "num_class_embeds": None,
        "time_embedding_type": "positional",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
    }


def _require(d: Mapping, where: str, expected: Mapping[str, object]) -> None:
    """Each key of `expected` must be absent (diffusers' default is `expected`'s value) or equal it."""
    for key, value in expected.items():
        got = d.get(key, value)
        ok = got == value or (isinstance(got, (list, tuple)) and all(g == value for g in got))
        if not ok:
            raise ConfigError(f"{where}: {key}={got!r} is not supported by ldm (it needs {value!r})")


def _one(d: Mapping, key: str, where: str, default: object = None) -> object:
    """A value diffusers allows per block: a list must hold one repeated value."""
    value = d.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}: per-block {key}={list(value)} is not supported (ldm uses one value)")
        value = value[0]
    return value


def unet_config_from_diffusers(d: Mapping, where: str = "unet/config.json") -> UNetConfig:
    _require(d, where, {
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": UNET_NORM_EPS,
        "resnet_time_scale_shift": "default", "class_embed_type": None, "addition_embed_type": None,
        "num_class_embeds": None, "time_embedding_type": "positional", "conv_in_kernel": 3,
        "conv_out_kernel": 3, "encoder_hid_dim": None, "time_cond_proj_dim": None,
        "dual_cross_attention": False, "attention_type": "default", "time_embedding_dim": None,
        "reverse_transformer_layers_per_block": None,
    })
    channels = list(d["block_out_channels"])
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ConfigError(f"{where}: block_out_channels {channels} must be multiples of the first")
    down = list(d["down_block_types"])
    up = list(d["up_block_types"])
    allowed = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in allowed for t in down) or len(up) != len(down):
        raise ConfigError(f"{where}: down_block_types {down} must be CrossAttnDownBlock2D / DownBlock2D")
    attn = [allowed[t] for t in down]
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != mirrored:
        raise ConfigError(f"{where}: up_block_types {up} must mirror down_block_types (expected {mirrored})")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    num_heads, head_channels = None, None
    if isinstance(heads, int):
        num_heads = heads
    else:
        heads = list(heads)
        dims = {c // h for c, h in zip(channels, heads)}
        if len(heads) == len(channels) and all(c % h == 0 for c, h in zip(channels, heads)) and len(dims) == 1:
            head_channels = dims.pop()
        elif len(set(heads)) == 1:
            num_heads = heads[0]
        else:
            raise ConfigError(
                f"{where}: attention heads {heads} over channels {channels} are neither one head count "
                "nor one head size"
            )
    cfg = UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=_one(d, "layers_per_block", where, 2),
        attention_resolutions=tuple(2**level for level, a in reversed(list(enumerate(attn))) if a),
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=_one(d, "transformer_layers_per_block", where, 1),
        context_dim=_one(d, "cross_attention_dim", where, 1280),
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        norm_groups=d.get("norm_num_groups", 32),
        dropout=float(d.get("dropout", 0.0)),
    )
    cfg.validate()
    return cfg


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int = 512) -> dict:
    if cfg.embed_dim != cfg.z_channels:
        raise CheckpointError(
            f"vae.embed_dim ({cfg.embed_dim}) != vae.z_channels ({cfg.z_channels}): diffusers' AutoencoderKL "
            "has one latent_channels for both, so this VAE has no diffusers layout"
        )
    vae_module_map(cfg)  # raises for attention outside the mid blocks
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": _version("diffusers"),
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def vae_config_from_diffusers(d: Mapping, where: str = "vae/config.json") -> VAEConfig:
    _require(d, where, {
        "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        "latents_mean": None, "latents_std": None, "shift_factor": None,
    })
    channels = list(d.get("block_out_channels", [64]))
    n = len(channels)
    if list(d.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n or list(
        d.get("up_block_types", ["UpDecoderBlock2D"] * n)
    ) != ["UpDecoderBlock2D"] * n:
        raise ConfigError(f"{where}: only DownEncoderBlock2D / UpDecoderBlock2D blocks are supported")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConfigError(f"{where}: block_out_channels {channels} must be multiples of the first")
    latent = d.get("latent_channels", 4)
    cfg = VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=d.get("layers_per_block", 1),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
    )
    cfg.validate()
    return cfg


def text_config_to_diffusers(cfg: TextEncoderConfig) -> dict:
    """A transformers `CLIPTextConfig` (as config.json) for the exported `CLIPTextModel`."""
    from ..models.text import PAD_IDS
    from ..models.tokenizer import BOS_ID, EOS_ID

    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_size,
        "num_hidden_layers": exported_text_layers(cfg),
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": cfg.activation,
        "layer_norm_eps": LAYER_NORM_EPS,
        "projection_dim": cfg.projection_dim,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_IDS[cfg.kind],
        "transformers_version": _version("transformers"),
    }


def text_config_from_diffusers(
    d: Mapping, *, kind: str, extra_layers: int, where: str = "text_encoder/config.json"
) -> TextEncoderConfig:
    """`extra_layers`: blocks kept in the extra file (1 for a penultimate-layer encoder, else 0)."""
    _require(d, where, {"layer_norm_eps": LAYER_NORM_EPS})
    width = d.get("hidden_size", 512)
    cfg = TextEncoderConfig(
        kind=kind,
        width=width,
        layers=d.get("num_hidden_layers", 12) + extra_layers,
        heads=d.get("num_attention_heads", 8),
        intermediate_size=d.get("intermediate_size", 2048),
        projection_dim=d.get("projection_dim", 512),
        activation=d.get("hidden_act", "quick_gelu"),
        context_length=d.get("max_position_embeddings", 77),
        vocab_size=d.get("vocab_size", 49408),
        layer="penultimate" if extra_layers else "last",
    )
    cfg.validate()
    return cfg


def scheduler_config_to_diffusers(cfg: DiffusionConfig) -> dict:
    """A `DDIMScheduler` config holding our schedule (every diffusers scheduler reads these fields)."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": _version("diffusers"),
        "num_train_timesteps": cfg.num_timesteps,
        "beta_schedule": SCHEDULE_TO_DIFFUSERS[cfg.beta_schedule],
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "trained_betas": None,
        "prediction_type": PREDICTION_TO_DIFFUSERS[cfg.prediction_type],
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        # zero-terminal-SNR models must start sampling at the last timestep (Lin et al. 2024, sec. 3.3)
        "timestep_spacing": "trailing" if cfg.zero_terminal_snr else "leading",
        "steps_offset": 0 if cfg.zero_terminal_snr else 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def scheduler_config_from_diffusers(d: Mapping, where: str = "scheduler/scheduler_config.json") -> DiffusionConfig:
    if d.get("trained_betas") is not None:
        raise ConfigError(f"{where}: explicit trained_betas are not supported; use a named beta_schedule")
    schedules = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
    predictions = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
    schedule = d.get("beta_schedule", "linear")
    prediction = d.get("prediction_type", "epsilon")
    if schedule not in schedules:
        raise ConfigError(f"{where}: beta_schedule {schedule!r} is not supported (use one of {sorted(schedules)})")
    if prediction not in predictions:
        raise ConfigError(
            f"{where}: prediction_type {prediction!r} is not supported (use one of {sorted(predictions)})"
        )
    cfg = DiffusionConfig(
        beta_schedule=schedules[schedule],
        beta_start=float(d.get("beta_start", 0.0001)),
        beta_end=float(d.get("beta_end", 0.02)),
        num_timesteps=d.get("num_train_timesteps", 1000),
        prediction_type=predictions[prediction],
        zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)),
    )
    cfg.validate()
    return cfg


def diffusers_configs(config: Config) -> dict[str, dict]:
    """Our whole config -> {"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": ...}."""
    m = config.model
    image = config.sample.height
    return {
        "unet": unet_config_to_diffusers(m.unet, image // m.vae.downsample_factor),
        "vae": vae_config_to_diffusers(m.vae, image),
        "text_encoder": text_config_to_diffusers(m.text_encoder),
        "scheduler": scheduler_config_to_diffusers(m.diffusion),
    }


# ---------------------------------------------------------------------------------------------
# Tokenizer files (CLIP BPE, as transformers' CLIPTokenizer reads them)
# ---------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path, kind: str) -> None:
    """vocab.json + merges.txt from our vendored BPE table, and the special tokens of each kind:
    SD 1.x pads with <|endoftext|>, SD 2.x (OpenCLIP) with "!" (id 0)."""
    from ..models.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer

    tok = CLIPTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False))
    merges = sorted(tok.ranks, key=tok.ranks.__getitem__)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    pad = "!" if kind == "open_clip" else EOS_TOKEN
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def _pad_token(folder: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / "tokenizer" / name
        if path.is_file():
            pad = json.loads(path.read_text()).get("pad_token")
            if isinstance(pad, dict):
                pad = pad.get("content")
            if pad is not None:
                return pad
    return None


# ---------------------------------------------------------------------------------------------
# Reading and writing weights
# ---------------------------------------------------------------------------------------------


def _load_weight_file(path: Path) -> Tensors:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many kinds of errors
        raise CheckpointError(
            f"{path} could not be read ({type(e).__name__}: {e}); it may be truncated or corrupt"
        ) from None


def read_component_weights(sub: Path, stem: str) -> Tensors:
    """The weights of one component folder: `{stem}.safetensors` preferred, then sharded
    safetensors, then `.bin` pickles (weights only), then an fp16/other variant."""
    candidates = [
        f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin", f"{stem}.bin.index.json",
    ]
    variants = sorted(p.name for p in sub.glob(f"{stem}.*.safetensors")) + sorted(
        p.name for p in sub.glob(f"{stem}.*.bin")
    )
    for name in [*candidates, *variants]:
        path = sub / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            weight_map = json.loads(path.read_text())["weight_map"]
            state: Tensors = {}
            for shard in sorted(set(weight_map.values())):
                state.update(_load_weight_file(sub / shard))
            return state
        return _load_weight_file(path)
    raise CheckpointError(f"{sub}: no weights found (expected {stem}.safetensors or {stem}.bin)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a diffusers Stable Diffusion folder needs it")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _text_kind(folder: Path, stored: Config | None, extra: Mapping[str, torch.Tensor], text_cfg: Mapping) -> str:
    """OpenCLIP (pads with 0) or HF CLIP (pads with <|endoftext|>): the padding changes the
    conditioning, so it is read from what the folder says, most specific first."""
    if any(k.startswith("model.") for k in extra):
        return "open_clip"
    if any(k.startswith("transformer.") for k in extra):
        return "hf_clip"
    if stored is not None:
        return stored.model.text_encoder.kind
    pad = _pad_token(folder)
    if pad is not None:
        return "open_clip" if pad == "!" else "hf_clip"
    return "open_clip" if text_cfg.get("hidden_act") == "gelu" else "hf_clip"


def _extra_layers(extra: Mapping[str, torch.Tensor]) -> int:
    found = set()
    for key in extra:
        hit = re.match(r"^(?:model\.transformer\.resblocks|transformer\.text_model\.encoder\.layers)\.(\d+)\.", key)
        if hit:
            found.add(int(hit.group(1)))
    return len(found)


def read_diffusers_config(folder: str | Path) -> Config:
    """Our config for a diffusers folder, from its configs (and `_ldm_config` when consistent)."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    stored = None
    if LDM_CONFIG_KEY in index:
        try:
            stored = from_dict(Config, index[LDM_CONFIG_KEY], "model_index.json:_ldm_config")
            stored.validate()
        except ConfigError as e:
            warnings.warn(f"{folder}/model_index.json: ignoring its invalid {LDM_CONFIG_KEY} ({e})", stacklevel=2)
            stored = None
    extra_path = folder / "text_encoder" / EXTRA_FILE
    extra = _load_weight_file(extra_path) if extra_path.is_file() else {}
    text_cfg = _read_json(folder / "text_encoder" / "config.json")
    unet = unet_config_from_diffusers(_read_json(folder / "unet" / "config.json"))
    vae_json = _read_json(folder / "vae" / "config.json")
    vae = vae_config_from_diffusers(vae_json)
    text = text_config_from_diffusers(
        text_cfg, kind=_text_kind(folder, stored, extra, text_cfg), extra_layers=_extra_layers(extra)
    )
    diffusion = scheduler_config_from_diffusers(_read_json(folder / "scheduler" / "scheduler_config.json"))
    image = int(vae_json.get("sample_size", unet.downsample_factor * 64) or 512)
    derived = Config(
        model=ModelConfig(unet=unet, vae=vae, text_encoder=text, diffusion=diffusion),
        sample=SampleConfig(height=image, width=image),
    )
    derived.validate()
    if stored is None:
        return derived
    if diffusers_configs(stored) == diffusers_configs(derived) and stored.model.text_encoder.kind == text.kind:
        return stored
    warnings.warn(
        f"{folder}/model_index.json: its {LDM_CONFIG_KEY} no longer matches the folder's config.json files "
        "(edited after export?); using the config.json files",
        stacklevel=2,
    )
    return derived


# ---------------------------------------------------------------------------------------------
# Whole folders
# ---------------------------------------------------------------------------------------------


def load_diffusers(
    folder: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, scheduler/) strictly:
    every tensor must map onto our models and every parameter be filled, or the error names them."""
    from ..checkpoint import load_state_strict
    from ..pipeline import LDMPipeline

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a diffusers model is a folder holding model_index.json")
    config = read_diffusers_config(folder)
    pipe = LDMPipeline.from_config(config)
    m = config.model
    text_rule_list, extra_keys = text_rules(m.text_encoder)
    components = {
        "unet": unet_rules(m.unet),
        "vae": vae_rules(m.vae),
        "text_encoder": text_rule_list,
    }
    for name, rules in components.items():
        state = read_component_weights(folder / name, WEIGHT_STEMS[name])
        if name == "text_encoder":
            state = _normalise_text_names(state, folder)
        ours = from_diffusers_state(state, rules, f"{folder / name}")
        if name == "text_encoder":
            ours.update(_read_extra(folder, m.text_encoder, extra_keys))
        load_state_strict(pipe.modules[name], ours, f"{folder / name}")
    return pipe.to(device, dtype)


def _normalise_text_names(state: Tensors, folder: Path) -> Tensors:
    """Accept both transformers layouts (with and without the `text_model.` level); drop the
    `position_ids` buffer older files carry, after checking it is the plain 0..n-1 it must be."""
    out: Tensors = {}
    for key, value in state.items():
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        if name == "text_model.embeddings.position_ids":
            if not torch.equal(value.flatten().long(), torch.arange(value.numel())):
                raise CheckpointError(f"{folder}/text_encoder: position_ids is not 0..{value.numel() - 1}")
            continue
        out[name] = value
    return out


def _read_extra(folder: Path, cfg: TextEncoderConfig, keys: list[str]) -> Tensors:
    """Our tensors that a CLIPTextModel has no place for, from the extra file or (for folders made
    elsewhere, which have none) OpenCLIP's two unused ones filled with neutral values."""
    path = folder / "text_encoder" / EXTRA_FILE
    extra = _load_weight_file(path) if path.is_file() else {}
    if not path.is_file() and cfg.kind == "open_clip":
        extra = {
            "model.text_projection": torch.eye(cfg.width, cfg.projection_dim),
            "model.logit_scale": torch.tensor(CLIP_LOGIT_SCALE),
        }
    missing = [k for k in keys if k not in extra]
    stray = [k for k in extra if k not in keys]
    if missing or stray:
        raise CheckpointError(
            f"{path}: holds {sorted(stray)[:5] or 'no unexpected tensors'} and lacks "
            f"{sorted(missing)[:5] or 'nothing'}; "
            "it does not match text_encoder/config.json"
        )
    return extra


def _model_index(config: Config) -> dict:
    inpaint = config.model.unet.in_channels != config.model.unet.out_channels
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
        "_diffusers_version": _version("diffusers"),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        LDM_CONFIG_KEY: to_dict(config),
    }


def save_diffusers(pipe, folder: str | Path) -> Path:
    """Write `pipe` as a diffusers folder (model_index.json, configs, safetensors weights, tokenizer),
    built under a temporary name beside `folder` and renamed into place at the end."""
    folder = Path(folder)
    replaceable = folder.is_dir() and (not any(folder.iterdir()) or (folder / "model_index.json").exists())
    if folder.exists() and not replaceable:
        raise CheckpointError(
            f"{folder} exists and is not a diffusers folder; refusing to replace it (choose a new path)"
        )
    config = Config(model=pipe.model_config, sample=pipe.defaults)
    m = config.model
    configs = diffusers_configs(config)  # raises early for layouts diffusers cannot hold
    text_rule_list, extra_keys = text_rules(m.text_encoder)
    components = {"unet": unet_rules(m.unet), "vae": vae_rules(m.vae), "text_encoder": text_rule_list}

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for name, rules in components.items():
            sub = tmp / name
            sub.mkdir(parents=True)
            state = {k: v.detach().cpu() for k, v in pipe.modules[name].state_dict().items()}
            weights = to_diffusers_state(state, rules)
            file_meta = {"format": "pt"}
            save_file(weights, str(sub / f"{WEIGHT_STEMS[name]}.safetensors"), metadata=file_meta)
            (sub / "config.json").write_text(json.dumps(configs[name], indent=2, sort_keys=True))
            if name == "text_encoder":
                extra = {k: state[k].contiguous().clone() for k in extra_keys}
                about = (
                    "ldm: tensors of this text encoder that diffusers' CLIPTextModel has no place for "
                    "(the unused last block of a penultimate-layer encoder, OpenCLIP's text_projection "
                    "and logit_scale), under ldm's own key names; diffusers and transformers ignore this file"
                )
                save_file(extra, str(sub / EXTRA_FILE), metadata={"format": "pt", "about": about})
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
        write_tokenizer(tmp / "tokenizer", m.text_encoder.kind)
        (tmp / "model_index.json").write_text(json.dumps(_model_index(config), indent=2))
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
