"""LoRA files in and out: kohya/A1111 and diffusers/peft layouts <-> adapters for our weights.

Layouts read (`read_lora`), for SD 1.x- and 2.x-like models of any size:

- kohya / A1111 (`.safetensors`, `.pt`): `lora_unet_<module>` and `lora_te_<module>` (or `lora_te1_`),
  each with `.lora_down.weight`, `.lora_up.weight` and `.alpha`; `<module>` is the diffusers module
  path with `_` for `.` (or the original SD path: `lora_unet_input_blocks_1_1_...`). LoCon files add
  the U-Net's convolutions (3x3 included) the same way.
- diffusers / peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<module>...`
  (also peft's `base_model.model.` prefix and adapter names, and diffusers' older
  `.lora.down.weight`, `.lora_linear_layer.down.weight` and `processor.to_q_lora.down.weight`
  keys). Alpha comes from `.alpha` keys, else from the `lora_adapter_metadata` diffusers writes,
  else it equals the rank (scale 1), as diffusers assumes.

Module names map onto our weights through the key maps of `ldm.convert.diffusers` (the same ones
diffusers folders use); OpenCLIP's fused `in_proj_weight` receives the q/k/v LoRAs of SD 2.x
text encoders in its row blocks. Everything is checked before anything is returned: a key no
layout explains, a layer this model lacks, another size (an SD 2.x LoRA for an SD 1.x model), a
LyCORIS kind we do not implement: one error naming the file, the keys and the fix.

`save_lora` writes the kohya layout (which A1111, ComfyUI and diffusers read) with `ss_*` metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..checkpoint import atomic_save_safetensors
from ..config import ModelConfig, TextEncoderConfig, UNetConfig
from ..errors import CheckpointError
from ..models.lora import LoRAWeights, Target
from ..models.text import FAMILY_WIDTHS
from .diffusers.keys import _rename, text_rules, unet_module_map
from .single_file import read_weights_file

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
DIFFUSERS_ADAPTER_METADATA = "lora_adapter_metadata"

# Parts of kohya-layout names we read, and those of LyCORIS kinds we do not implement.
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_UNSUPPORTED = {  # the start of the part after the module name -> what it is
    "hada_": "LoHa (LyCORIS)", "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a CP/Tucker core (lora_mid)",
    "dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "a full weight difference",
    "w_norm": "a LyCORIS norm-layer update", "b_norm": "a LyCORIS norm-layer update", "oft_": "OFT (LyCORIS)",
}
_DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<down>lora_A(?:\.[\w-]+)?\.weight|lora\.down\.weight|lora_linear_layer\.down\.weight)"
    r"|(?P<up>lora_B(?:\.[\w-]+)?\.weight|lora\.up\.weight|lora_linear_layer\.up\.weight)|(?P<alpha>alpha))$"
)
# diffusers' old attention-processor names -> module paths
_PROCESSOR_NAMES = [
    (".processor.to_out_lora.", ".to_out.0.lora."), (".processor.to_q_lora.", ".to_q.lora."),
    (".processor.to_k_lora.", ".to_k.lora."), (".processor.to_v_lora.", ".to_v.lora."),
    (".self_attn.to_out_lora.", ".self_attn.out_proj.lora."), (".self_attn.to_q_lora.", ".self_attn.q_proj.lora."),
    (".self_attn.to_k_lora.", ".self_attn.k_proj.lora."), (".self_attn.to_v_lora.", ".self_attn.v_proj.lora."),
]


@dataclass(frozen=True)
class Layer:
    """A weight a LoRA can change: its target, shape (of its rows), and names in the files."""

    target: Target
    shape: tuple[int, ...]  # (out, in) or (out, in, kh, kw)
    kohya: str  # lora_unet_down_blocks_0_attentions_0_proj_in
    diffusers: str  # unet.down_blocks.0.attentions.0.proj_in


# ---------------------------------------------------------------------------------------------
# Which weights there are, and their names
# ---------------------------------------------------------------------------------------------


_LAYER_CACHE: dict[tuple[str, str], dict[str, Layer]] = {}


def layers(unet: UNetConfig, text: TextEncoderConfig) -> dict[str, Layer]:
    """Every name a LoRA file may use for a weight of this model -> the layer (cached per config)."""
    key = (repr(unet), repr(text))
    if key not in _LAYER_CACHE:
        if len(_LAYER_CACHE) >= 8:
            _LAYER_CACHE.clear()
        _LAYER_CACHE[key] = _build_layers(unet, text)
    return _LAYER_CACHE[key]


def _build_layers(unet: UNetConfig, text: TextEncoderConfig) -> dict[str, Layer]:
    from ..models.text import TextEncoder
    from ..models.unet import UNet

    index: dict[str, Layer] = {}

    def add(layer: Layer, *aliases: str) -> None:
        for name in (layer.kohya, layer.diffusers, *aliases):
            index[name] = layer

    with torch.device("meta"):
        unet_model = UNet(unet)
        text_model = TextEncoder(dataclasses.replace(text, trainable=False))
    modules = unet_module_map(unet)
    for path, m in unet_model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if path == "layout" or path.endswith(".pos_embed.proj"):  # not in the SD layout: no LoRA file names them
                continue
            theirs = _rename(path + ".weight", modules).removesuffix(".weight")
            layer = Layer(Target("unet", path + ".weight"), tuple(m.weight.shape),
                          "lora_unet_" + theirs.replace(".", "_"), "unet." + theirs)
            add(layer, "lora_unet_" + path.replace(".", "_"))  # original SD names (sgm layout)

    linear = {path + ".weight" for path, m in text_model.named_modules() if isinstance(m, nn.Linear)}
    rules, _ = text_rules(dataclasses.replace(text, layer="last"))  # every layer, not only the exported
    for rule in rules:
        if rule.op == "split" and rule.ours.endswith("in_proj_weight"):  # OpenCLIP: q, k, v row blocks
            n = text.width
            targets = [Target("text_encoder", rule.ours, (i * n, (i + 1) * n)) for i in range(len(rule.theirs))]
        elif rule.ours in linear:
            targets = [Target("text_encoder", rule.ours)]
        else:
            continue
        for target, theirs in zip(targets, rule.theirs):
            theirs = theirs.removesuffix(".weight")
            layer = Layer(target, (text.width, text.width) if target.rows else _shape(text_model, rule.ours),
                          "lora_te_" + theirs.replace(".", "_"), "text_encoder." + theirs)
            add(layer, "lora_te1_" + theirs.replace(".", "_"),
                "text_encoder." + theirs.removeprefix("text_model."))  # transformers 5 has no text_model level
    return index


def _shape(model: nn.Module, key: str) -> tuple[int, ...]:
    return tuple(model.get_parameter(key).shape)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_lora(
    path: str | Path, config: ModelConfig, *, trust_pickle: bool = False
) -> tuple[dict[Target, LoRAWeights], dict[str, str]]:
    """(adapters by target, the file's metadata), checked in full against `config`."""
    path = Path(path)
    fix = "load it with trust_pickle=True (pipe.load_lora(path, trust_pickle=True)), then keep a .safetensors copy."
    data, metadata = read_weights_file(path, what="LoRA", trust_pickle=trust_pickle, fix=fix)
    if not isinstance(data, Mapping) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} is not a LoRA file: it holds no state dict of tensors")
    index = layers(config.unet, config.text_encoder)
    groups, unknown, unsupported = _group(data)
    alphas = _metadata_alphas(metadata, path)
    problems = _Problems(path, config)
    problems.unknown.extend(unknown)
    problems.unsupported.update(unsupported)

    out: dict[Target, LoRAWeights] = {}
    for name, parts in groups.items():
        layer = index.get(name)
        if layer is None:
            problems.unknown.append(name)
            continue
        if "down" not in parts or "up" not in parts:
            problems.incomplete.append(name)
            continue
        weights = _fit(parts, layer, alphas.get(name), problems, name)
        if weights is not None:
            if layer.target in out:
                problems.incomplete.append(f"{name} (a second LoRA for {layer.target})")
            out[layer.target] = weights
    problems.raise_if_any(data, out)
    return out, metadata


def _group(data: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str], dict[str, str]]:
    """Keys -> {module name: {"down"|"up"|"alpha": tensor}}, plus unexplained keys and unsupported kinds."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    unsupported: dict[str, str] = {}
    for key, value in data.items():
        kohya = key.startswith(tuple(KOHYA_PREFIXES)) or key.startswith("lora_te2_")
        parts = [key.partition(".")[2]] if kohya else key.split(".")
        kind = next((what for mark, what in _UNSUPPORTED.items() if any(p.startswith(mark) for p in parts)), None)
        if kind:
            unsupported.setdefault(kind, key)
            continue
        if kohya:
            name, _, part = key.partition(".")
            role = _KOHYA_PARTS.get(part)
        else:
            name, role = _diffusers_name(key)
        if role is None:
            unknown.append(key)
        else:
            groups.setdefault(name, {})[role] = value
    return groups, unknown, unsupported


def _diffusers_name(key: str) -> tuple[str, str | None]:
    key = key.removeprefix("base_model.model.")
    for old, new in _PROCESSOR_NAMES:
        key = key.replace(old, new)
    m = _DIFFUSERS_KEY.match(key)
    if m is None:
        return key, None
    module = m.group("module")
    if not module.startswith(("unet.", "text_encoder.")):  # files from before the prefixes
        module = ("text_encoder." if module.startswith("text_model.") else "unet.") + module
    return module, "down" if m.group("down") else "up" if m.group("up") else "alpha"


def _metadata_alphas(metadata: Mapping[str, str], path: Path) -> _AlphaLookup:
    raw = metadata.get(DIFFUSERS_ADAPTER_METADATA)
    if not raw:
        return _AlphaLookup({})
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: its {DIFFUSERS_ADAPTER_METADATA} metadata is not JSON; the file is broken") from None
    if any(k.endswith(".use_dora") and v for k, v in packed.items()):
        raise CheckpointError(f"{path} is a DoRA adapter (use_dora in its metadata), which ldm does not apply; "
                              "only LoRA and LoCon layers load")
    return _AlphaLookup(packed)


class _AlphaLookup:
    """Per-module alpha from diffusers' packed peft configs ("unet.lora_alpha", "unet.alpha_pattern", ...)."""

    def __init__(self, packed: Mapping[str, object]):
        self.packed = packed

    def get(self, name: str) -> float | None:
        network, _, module = name.partition(".")
        if f"{network}.lora_alpha" not in self.packed:
            return None
        alpha = _pattern(self.packed.get(f"{network}.alpha_pattern") or {}, module, self.packed[f"{network}.lora_alpha"])
        rank = _pattern(self.packed.get(f"{network}.rank_pattern") or {}, module, self.packed.get(f"{network}.r"))
        if self.packed.get(f"{network}.use_rslora") and rank:
            return float(alpha) * math.sqrt(float(rank))  # rsLoRA scales by alpha / sqrt(r)
        return float(alpha)


def _pattern(patterns: Mapping[str, object], module: str, default: object) -> object:
    """peft's rule: a pattern applies to a module whose dotted name ends with it."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def _fit(parts: Mapping[str, torch.Tensor], layer: Layer, alpha: float | None, problems: _Problems,
         name: str) -> LoRAWeights | None:
    """The adapter in the layout of `layer`'s weight, or None (the problem recorded)."""
    down, up = parts["down"], parts["up"]
    out_dim, in_dim, *kernel = layer.shape
    kernel = tuple(kernel)
    ok_down = down.ndim in (2, 4) and down.shape[1] == in_dim and (
        tuple(down.shape[2:]) == kernel or (down.ndim == 2 and kernel in ((), (1, 1)))
        or (not kernel and tuple(down.shape[2:]) == (1, 1)))
    ok_up = up.ndim in (2, 4) and up.shape[0] == out_dim and tuple(up.shape[2:]) in ((), (1, 1))
    if not (ok_down and ok_up and down.shape[0] == up.shape[1]):
        problems.mismatched.append((name, tuple(down.shape), tuple(up.shape), layer.shape))
        return None
    if "alpha" in parts:
        if parts["alpha"].numel() != 1:
            problems.incomplete.append(f"{name}.alpha (not a single number)")
            return None
        alpha = float(parts["alpha"].float().item())
    rank = down.shape[0]
    down = down.reshape(rank, in_dim, *kernel) if kernel else down.reshape(rank, in_dim)
    up = up.reshape(out_dim, rank, 1, 1) if kernel else up.reshape(out_dim, rank)
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        problems.incomplete.append(f"{name} (NaN or infinite values)")
        return None
    return LoRAWeights(down, up, float(rank) if alpha is None else alpha)


@dataclass
class _Problems:
    """What is wrong with a LoRA file, gathered so that one error reports it all."""

    path: Path
    config: ModelConfig
    unknown: list[str] = dataclasses.field(default_factory=list)
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)  # kind -> an example key
    incomplete: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple, tuple]] = dataclasses.field(default_factory=list)

    def raise_if_any(self, data: Mapping[str, torch.Tensor], found: Mapping[Target, LoRAWeights]) -> None:
        lines = []
        for kind, key in self.unsupported.items():
            lines.append(f"it is {kind} (e.g. {key}), which ldm does not apply; only LoRA and LoCon layers load")
        if self.unknown:
            lines.append(f"{len(self.unknown)} keys name no layer of this model: {_some(self.unknown)}")
        if self.mismatched:
            name, down, up, shape = self.mismatched[0]
            lines.append(
                f"{len(self.mismatched)} layers do not fit this model's weights, e.g. {name}: down {down}, up {up} "
                f"for a weight of shape {shape}"
            )
        if self.incomplete:
            lines.append(f"{len(self.incomplete)} layers are incomplete or broken: {_some(self.incomplete)}")
        if not lines and not found:
            lines.append("it holds no LoRA layers")
        if lines:
            raise CheckpointError(f"{self.path} does not fit this model; nothing was applied:\n  - "
                                  + "\n  - ".join(lines) + "\n  " + self._advice(data))

    def _advice(self, data: Mapping[str, torch.Tensor]) -> str:
        ours = self.config.unet.context_dim
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in data):
            return "it is a model checkpoint, not a LoRA: load it as the model (--ckpt, LDMPipeline.from_single_file)"
        if any(k.startswith("lora_te2_") or ".text_encoder_2." in k or "label_emb" in k or "add_embedding" in k
               for k in data):
            return f"it is an SDXL LoRA; this model is {_family(ours)}: use a LoRA trained for this model's family"
        theirs = _conditioning_width(data)
        if theirs and theirs != ours:
            return (f"it was made for {_family(theirs)} ({theirs}-wide text conditioning); this model is "
                    f"{_family(ours)} ({ours}): use a LoRA trained for this model's family")
        if self.unsupported and not (self.unknown or self.mismatched or self.incomplete):
            return "convert it to plain LoRA in the tool that made it, or use another file"
        return "check that the LoRA was trained for this model's architecture"


def _conditioning_width(data: Mapping[str, torch.Tensor]) -> int | None:
    """The text width a LoRA was made for: the input size of its cross-attention k/v layers."""
    for key, value in data.items():
        if re.search(r"attn2[._]to[._][kv].*(lora_down|lora_A|lora[._]down)", key) and value.ndim >= 2:
            return int(value.shape[1])
    for key, value in data.items():
        if re.search(r"self_attn[._](q|k|v)[._]proj.*(lora_down|lora_A|lora[._]down)", key) and value.ndim >= 2:
            return int(value.shape[1])
    return None


def _family(width: int) -> str:
    return FAMILY_WIDTHS.get(width, f"a {width}-wide model")


def _some(items: list[str], n: int = 4) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_lora(
    path: str | Path,
    weights: Mapping[Target, LoRAWeights],
    config: ModelConfig,
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `weights` as a kohya-layout `.safetensors` LoRA (read by A1111, ComfyUI, diffusers, and
    `read_lora`). `metadata` (e.g. a trainer's `ss_learning_rate`, `ss_max_train_steps`) joins the
    `ss_*` keys describing the network; values must be strings."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors; got {path.name!r}")
    names = {layer.target: layer.kohya for layer in layers(config.unet, config.text_encoder).values()}
    tensors: dict[str, torch.Tensor] = {}
    for target, w in weights.items():
        if target not in names:
            raise ValueError(f"{target} is not a weight of this model; no LoRA name for it")
        name = names[target]
        cast = dtype or w.down.dtype
        tensors[f"{name}.lora_down.weight"] = w.down.detach().to("cpu", cast).contiguous()
        tensors[f"{name}.lora_up.weight"] = w.up.detach().to("cpu", cast).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(w.alpha), dtype=torch.float32)
    bad = [k for k, v in (metadata or {}).items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"LoRA metadata keys and values must be strings (not: {', '.join(map(str, bad))})")
    info = _network_metadata(weights, config)
    info.update(metadata or {})
    return atomic_save_safetensors(tensors, path, info)


def _network_metadata(weights: Mapping[Target, LoRAWeights], config: ModelConfig) -> dict[str, str]:
    """kohya's `ss_*` description of the network: module, ranks and alphas, base model."""
    linear = [w for w in weights.values() if w.down.ndim == 2 or w.down.shape[2:] == (1, 1)]
    conv = [w for w in weights.values() if w.down.ndim == 4 and w.down.shape[2:] != (1, 1)]

    def common(values: list[float]) -> float | None:
        return max(set(values), key=values.count) if values else None

    v2 = config.text_encoder.kind == "open_clip"
    info = {
        "ss_network_module": "networks.lora",
        "ss_v2": str(v2),
        "ss_base_model_version": "sd_v2" if v2 else "sd_v1",
        "ss_v_parameterization": str(config.diffusion.prediction_type == "v"),
        "ss_training_comment": "written by ldm",
    }
    dim, alpha = common([w.rank for w in linear]), common([w.alpha for w in linear])
    if dim is not None:
        info["ss_network_dim"], info["ss_network_alpha"] = str(dim), f"{alpha:g}"
    if conv:
        args = {"conv_dim": str(common([w.rank for w in conv])), "conv_alpha": f"{common([w.alpha for w in conv]):g}"}
        info["ss_network_args"] = json.dumps(args)
    return info
