"""Standalone VAEs in: the files users swap into a model (`vae-ft-mse-840000-ema-pruned.safetensors`,
`.ckpt`, a diffusers `vae/` folder or its weights file), read into a config and our VAE's tensors.

`read_vae(path, like)` takes any of:

- an original-layout file (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`), as the
  fine-tuned SD VAEs are published; its training leftovers (`loss.*`, `model_ema.decay`,
  `model_ema.num_updates`) are dropped, as the other tools drop them;
- the VAE of a whole checkpoint (its `first_stage_model.*`; an ldm model file or an original file);
- a diffusers `AutoencoderKL` folder (`config.json` + weights), a whole diffusers model folder (its
  `vae/`), or a diffusers-layout weights file without its config.

`like` is the VAE of the model it goes into: the new VAE must make latents of the same shape, and the
latent scale stays the model's (the U-Net was trained on latents scaled by it). Loading is strict:
a tensor that maps nowhere, or a weight left unfilled, is an error naming it.

`read_vae(path, like, standalone=True)` (and `vae_from_file`) read a VAE for its own sake, as the
trainers and latent caching take one: the file's own architecture and its own latent scale where it
records one (our files, a diffusers `config.json`); `like` only fills in what the file cannot say
(the scale of an original-layout file, the architecture of diffusers weights without a config).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..build import ModelState, build_vae
from ..checkpoint import CONFIG_KEY, PREFIXES, file_kind, read_model_file
from ..config import VAEConfig
from ..models.vae import AutoencoderKL
from ..errors import CheckpointError, ConfigError
from .diffusers.configs import vae_config_from_diffusers
from .diffusers.folder import WEIGHT_STEMS, read_component_weights
from .diffusers.keys import current_vae_names, from_diffusers_state, vae_rules
from .single_file.detect import detect_vae_config
from .single_file.layouts import conv_vae_attention
from .single_file.reader import read_checkpoint

VAE_PREFIX = PREFIXES["vae"]
# What VAE files carry beside the weights, and the other tools ignore.
VAE_LEFTOVERS = ("loss.",)
VAE_IGNORED_KEYS = frozenset({"model_ema.decay", "model_ema.num_updates"})


@dataclass
class VAEState:
    """A VAE as read: its config (the model's latent scale), our VAE's tensors, and what was done."""

    config: VAEConfig
    tensors: dict[str, Tensor]
    report: str


def read_vae(path: str | Path, like: VAEConfig, *, standalone: bool = False, trust_pickle: bool = False) -> VAEState:
    """The VAE at `path` (a file or a folder, see the module docstring) for a model whose VAE is
    `like`; with `standalone`, the VAE as the file describes it (`like` fills in what it cannot say)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VAE not found: {path}")
    if path.is_dir():
        cfg, tensors, notes, scaled = _read_folder(path)
    else:
        cfg, tensors, notes, scaled = _read_file(path, like, trust_pickle)
    if standalone:
        if not scaled:
            cfg = dataclasses.replace(cfg, scaling_factor=like.scaling_factor)
            notes.append(f"  latent scale {like.scaling_factor} from the config (the file records none)")
    else:
        cfg = _fit(cfg, like, path, notes)
    return VAEState(cfg, tensors, "\n".join([f"VAE from {path.name}", *notes]))


def vae_from_file(path: str | Path, like: VAEConfig | None = None, *, trust_pickle: bool = False) -> AutoencoderKL:
    """The VAE at `path` in any format (`read_vae(..., standalone=True)`), built with its tensors, in
    float32. Without `like`, the SD VAE's conventions fill in what the file cannot say."""
    found = read_vae(path, like or VAEConfig(), standalone=True, trust_pickle=trust_pickle)
    return build_vae(found.config, found.tensors, dtype=torch.float32)


def _read_folder(path: Path) -> tuple[VAEConfig, dict[str, Tensor], list[str], bool]:
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{path} is a folder without config.json (nor vae/config.json): not a diffusers VAE "
                              "folder; pass the folder that holds the VAE's config.json and weights, or a VAE file")
    try:
        cfg = vae_config_from_diffusers(json.loads((folder / "config.json").read_text()), f"{folder}/config.json")
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{folder}/config.json does not describe a VAE this library loads: {e}") from None
    state, renamed = current_vae_names(read_component_weights(folder, WEIGHT_STEMS["vae"]))
    notes = [f"  diffusers folder {folder}"]
    if renamed:
        notes.append(f"  {renamed} attention tensors renamed from diffusers' older names (query, key, value, "
                     "proj_attn)")
    return cfg, from_diffusers_state(state, vae_rules(cfg), str(folder)), notes, True


def _read_file(path: Path, like: VAEConfig, trust_pickle: bool) -> tuple[VAEConfig, dict[str, Tensor], list[str], bool]:
    """(config, tensors, notes, whether the file records its latent scale)."""
    if file_kind(path) == "safetensors" and _has_our_config(path):
        parts, config = read_model_file(path)
        if not parts["vae"]:
            raise CheckpointError(f"{path} is an ldm model file without a VAE (no {VAE_PREFIX}* tensors)")
        return config.model.vae, parts["vae"], ["  the VAE of an ldm model file"], True
    state = read_checkpoint(path, trust_pickle=trust_pickle)
    notes = []
    if any(k.startswith(VAE_PREFIX) for k in state):
        others = sum(not k.startswith(VAE_PREFIX) for k in state)
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
        notes.append(f"  the VAE ({VAE_PREFIX}*) of a whole checkpoint; its other {others} tensors are not used")
    dropped = [k for k in state if k.startswith(VAE_LEFTOVERS) or k in VAE_IGNORED_KEYS]
    if dropped:
        state = {k: v for k, v in state.items() if k not in set(dropped)}
        notes.append(f"  {len(dropped)} training leftovers (loss.*, model_ema counters) dropped")
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        state, renamed = current_vae_names(state)
        notes.append("  diffusers layout, read with the model's VAE architecture")
        if renamed:
            notes.append(f"  {renamed} attention tensors renamed from diffusers' older names")
        return like, from_diffusers_state(state, vae_rules(like), str(path)), notes, False
    if "encoder.conv_in.weight" in state:
        state, reshaped = conv_vae_attention(state, "")
        if reshaped:
            notes.append(f"  attention stored as Linear weights: {reshaped} reshaped to 1x1 convolutions")
        notes.insert(0, "  original layout")
        return detect_vae_config(state, prefix=""), state, notes, False
    top = sorted({k.split(".")[0] for k in state})
    raise CheckpointError(
        f"{path} is not a VAE: its {len(state)} tensors sit under {', '.join(top[:6])}; expected the original "
        "layout (encoder.*, decoder.*, quant_conv.*), a whole checkpoint's first_stage_model.*, or diffusers' "
        "(encoder.down_blocks.*, decoder.up_blocks.*)"
    )


def _has_our_config(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            return CONFIG_KEY in (f.metadata() or {})
    except Exception:  # unreadable headers are reported by the full read
        return False


def _fit(cfg: VAEConfig, like: VAEConfig, path: Path, notes: list[str]) -> VAEConfig:
    """Check the VAE makes the model's latents; give it the model's latent scale."""
    if cfg.embed_dim != like.embed_dim or cfg.downsample_factor != like.downsample_factor:
        raise CheckpointError(
            f"{path}: this VAE makes latents of {cfg.embed_dim} channels at 1/{cfg.downsample_factor} of the image "
            f"size, but the model's U-Net works on {like.embed_dim} channels at 1/{like.downsample_factor}; use a "
            "VAE made for this model family"
        )
    if cfg.scaling_factor != like.scaling_factor:
        notes.append(f"  latent scale {like.scaling_factor} kept from the model (the VAE's own says "
                     f"{cfg.scaling_factor}; the U-Net was trained on the model's)")
    return dataclasses.replace(cfg, scaling_factor=like.scaling_factor)


def with_vae(state: ModelState, vae: VAEState) -> ModelState:
    """`state` with its VAE (config and tensors) replaced by `vae`."""
    model = dataclasses.replace(state.config.model, vae=vae.config)
    config = dataclasses.replace(state.config, model=model)
    report = "\n".join(line for line in (state.report, vae.report) if line)
    return ModelState(config, {**state.parts, "vae": vae.tensors}, report)
