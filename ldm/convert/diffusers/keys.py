"""diffusers key maps: each of our tensors <-> one (or, for fused projections, several) diffusers tensors.

The maps are derived from our configs: a meta-device model gives the key list, small functions give
each key its diffusers name. They apply in either direction, strictly: every tensor of the folder must
be mapped and every parameter of our models filled, or the error names the keys. Beyond renaming,
our VAE attention's 1x1 convs are diffusers' Linear layers, and the OpenCLIP tower's fused
`in_proj` is split into q, k, v projections.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ...config import TextEncoderConfig, UNetConfig, VAEConfig
from ...errors import CheckpointError
from ...models.text import TextEncoder
from ...models.unet import UNet
from ...models.vae import AutoencoderKL

Tensors = dict[str, torch.Tensor]


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
    if cfg.num_classes is not None:
        m["label_emb"] = "class_embedding"

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


# diffusers before 0.14 named the VAE attention's projections differently (its loader still renames them)
_OLD_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_VAE_ATTN_KEY = re.compile(r"^(.*\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def current_vae_names(state: Mapping[str, torch.Tensor]) -> tuple[Tensors, int]:
    """A diffusers VAE state dict with the attention names of diffusers < 0.14 (`query`, `key`,
    `value`, `proj_attn`, as in many published `vae/` folders) renamed to today's, and how many."""
    out: Tensors = {}
    renamed = 0
    for key, value in state.items():
        old = _OLD_VAE_ATTN_KEY.match(key)
        if old:
            key = f"{old.group(1)}{_OLD_VAE_ATTN[old.group(2)]}{old.group(3)}"
            renamed += 1
        out[key] = value
    return out, renamed


def vae_rules(cfg: VAEConfig) -> list[KeyRule]:
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
