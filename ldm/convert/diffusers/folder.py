"""diffusers folders in and out: `read_diffusers` (folder -> ModelState) and `write_diffusers` (ModelState -> folder).

A folder holds our networks' tensors under diffusers' names (`keys`) with diffusers' configs
(`configs`), a tokenizer and `model_index.json`. Reading is strict: every tensor of the folder must
be mapped and every parameter of our models filled, or the error names the keys.

Text encoders read at the penultimate layer (SD 2.x, "clip skip 2"): diffusers represents them as a
`CLIPTextModel` one layer shorter, whose last hidden state after `final_layer_norm` *is* our
penultimate output, so diffusers' own classes compute exactly our conditioning. The unused last
block (and OpenCLIP's `text_projection` and `logit_scale`, which a `CLIPTextModel` has no place
for) are kept under our own key names in `text_encoder/ldm_extra.safetensors`, which diffusers and
transformers ignore and `read_diffusers` reads back, so ours -> diffusers -> ours is bit-exact.
A folder without that file (e.g. one made by diffusers) loads with `layer="last"` over the
layers it has, which computes the same conditioning; OpenCLIP's unused `text_projection` is then
set to the identity and `logit_scale` to log(1/0.07), and the loss is stated in the docs.

`model_index.json` also carries our whole config under `_ldm_config` (diffusers ignores keys that
start with "_"); it is used when it describes the same model as the folder's own configs, which
restores the fields diffusers has no place for (dropout, sampling defaults, `trainable`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from ...atomic import atomic_dir
from ...build import ModelState
from ...config import Config, ModelConfig, SampleConfig, TextEncoderConfig, from_dict, to_dict
from ...errors import CheckpointError, ConfigError
from ...models.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer
from .configs import (
    UPSCALE_MAX_NOISE_LEVEL,
    diffusers_configs,
    low_res_config_from_diffusers,
    scheduler_config_from_diffusers,
    text_config_from_diffusers,
    unet_config_from_diffusers,
    vae_config_from_diffusers,
    version_of,
)
from .keys import (
    Tensors,
    current_vae_names,
    from_diffusers_state,
    text_rules,
    to_diffusers_state,
    unet_rules,
    vae_rules,
)

EXTRA_FILE = "ldm_extra.safetensors"  # in text_encoder/: tensors a CLIPTextModel has no place for
LDM_CONFIG_KEY = "_ldm_config"  # in model_index.json

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature (Radford et al. 2021, sec. 2.5)


# ---------------------------------------------------------------------------------------------
# Tokenizer files (CLIP BPE, as transformers' CLIPTokenizer reads them)
# ---------------------------------------------------------------------------------------------


def write_tokenizer(folder: Path, kind: str) -> None:
    """vocab.json + merges.txt from our vendored BPE table, and the special tokens of each kind:
    SD 1.x pads with <|endoftext|>, SD 2.x (OpenCLIP) with "!" (id 0)."""
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
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a config; the file is damaged") from None


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
    low_res = None
    if "low_res_scheduler" in index:  # StableDiffusionUpscalePipeline
        low_res = low_res_config_from_diffusers(
            _read_json(folder / "low_res_scheduler" / "scheduler_config.json"),
            index.get("max_noise_level", UPSCALE_MAX_NOISE_LEVEL),
            stored.model.low_res if stored is not None else None,
        )
    image = int(vae_json.get("sample_size", unet.downsample_factor * 64) or 512)
    derived = Config(
        model=ModelConfig(unet=unet, vae=vae, text_encoder=text, diffusion=diffusion, low_res=low_res),
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


def read_diffusers(folder: str | Path) -> ModelState:
    """A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, scheduler/) as our config and
    network states, strictly: every tensor must map onto our models and every parameter be filled,
    or the error names them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; a diffusers model is a folder holding model_index.json")
    config = read_diffusers_config(folder)
    m = config.model
    text_rule_list, extra_keys = text_rules(m.text_encoder)
    components = {
        "unet": unet_rules(m.unet),
        "vae": vae_rules(m.vae),
        "text_encoder": text_rule_list,
    }
    parts = {}
    for name, rules in components.items():
        state = read_component_weights(folder / name, WEIGHT_STEMS[name])
        if name == "text_encoder":
            state = _normalise_text_names(state, folder)
        elif name == "vae":
            state, _ = current_vae_names(state)
        parts[name] = from_diffusers_state(state, rules, f"{folder / name}")
        if name == "text_encoder":
            parts[name].update(_read_extra(folder, m.text_encoder, extra_keys))
    return ModelState(config, parts)


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
    """model_index.json: StableDiffusionUpscalePipeline's components for an upscaler, else those of the
    (inpainting) text-to-image pipeline."""
    if config.model.low_res is not None:
        own = {
            "_class_name": "StableDiffusionUpscalePipeline",
            "low_res_scheduler": ["diffusers", "DDPMScheduler"],
            "max_noise_level": config.model.low_res.max_noise_level,
            "watermarker": [None, None],
        }
    else:
        own = {
            "_class_name": "StableDiffusionInpaintPipeline" if config.model.inpainting else "StableDiffusionPipeline",
            "image_encoder": [None, None],
            "requires_safety_checker": False,
        }
    return {
        **own,
        "_diffusers_version": version_of("diffusers"),
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        LDM_CONFIG_KEY: to_dict(config),
    }


def write_diffusers(state: ModelState, folder: str | Path) -> Path:
    """Write a diffusers folder (model_index.json, configs, safetensors weights, tokenizer), built
    under a temporary name beside `folder` and renamed into place at the end. Into an existing
    diffusers folder, only the model's own entries (unet/, vae/, text_encoder/, scheduler/,
    tokenizer/, model_index.json) are replaced; everything else in it (a README, other components,
    .git) is kept."""
    folder = Path(folder)
    replaceable = folder.is_dir() and (not any(folder.iterdir()) or (folder / "model_index.json").exists())
    if folder.exists() and not replaceable:
        raise CheckpointError(
            f"{folder} exists and is not a diffusers folder; refusing to replace it (choose a new path)"
        )
    config = state.config
    m = config.model
    configs = diffusers_configs(config)  # raises early for layouts diffusers cannot hold
    text_rule_list, extra_keys = text_rules(m.text_encoder)
    components = {"unet": unet_rules(m.unet), "vae": vae_rules(m.vae), "text_encoder": text_rule_list}

    with atomic_dir(folder, keep_others=True) as tmp:
        for name, rules in components.items():
            sub = tmp / name
            sub.mkdir(parents=True)
            part = {k: v.detach().cpu() for k, v in state.parts[name].items()}
            weights = to_diffusers_state(part, rules)
            file_meta = {"format": "pt"}
            save_file(weights, str(sub / f"{WEIGHT_STEMS[name]}.safetensors"), metadata=file_meta)
            (sub / "config.json").write_text(json.dumps(configs[name], indent=2, sort_keys=True))
            if name == "text_encoder":
                extra = {k: part[k].contiguous().clone() for k in extra_keys}
                about = (
                    "ldm: tensors of this text encoder that diffusers' CLIPTextModel has no place for "
                    "(the unused last block of a penultimate-layer encoder, OpenCLIP's text_projection "
                    "and logit_scale), under ldm's own key names; diffusers and transformers ignore this file"
                )
                save_file(extra, str(sub / EXTRA_FILE), metadata={"format": "pt", "about": about})
        for name in ("scheduler", "low_res_scheduler"):
            if name in configs:
                (tmp / name).mkdir()
                (tmp / name / "scheduler_config.json").write_text(json.dumps(configs[name], indent=2))
        write_tokenizer(tmp / "tokenizer", m.text_encoder.kind)
        (tmp / "model_index.json").write_text(json.dumps(_model_index(config), indent=2))
    return folder
