"""The model file: one `.safetensors` in the original Stable Diffusion key layout, config in its metadata.

Tensors are stored under the prefixes of the original single-file checkpoints
(`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`), so our files open in
the tools people already use; the metadata holds the resolved config as JSON, so nothing about
a model is guessed when it is loaded back. Files are written to a temporary name and renamed,
so an interrupted save never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path
from .build import load_state_strict
from .config import Config, from_dict, to_dict
from .errors import CheckpointError, ConfigError
from .models.vae import AutoencoderKL

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.",
}
CONFIG_KEY = "ldm_config"
FORMAT_KEY = "ldm_format"
FORMAT_VERSION = "1"


def file_kind(path: str | Path) -> str:
    """What a weights file is, from its first bytes (not its name): "safetensors", "zip" (a PyTorch
    pickle as `torch.save` writes it), "pickle" (a legacy, pre-zip `torch.save`) or "unknown"."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"  # protocol marker of a legacy (pre-zip) torch.save
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write `tensors` to `path` via a temporary file in the same directory, fsync, then rename."""
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)
    return Path(path)


def save_model_file(path: str | Path, parts: Mapping[str, nn.Module], config: Config) -> Path:
    """Save the named parts (`unet`, `vae`, `text_encoder`) with `config` in the metadata."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"model files are .safetensors; got {path.name!r} (try {path.with_suffix('.safetensors').name!r})")
    tensors: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        prefix = PREFIXES[name]
        for key, value in module.state_dict().items():
            tensors[prefix + key] = value.detach().contiguous().cpu()
    metadata = {CONFIG_KEY: json.dumps(to_dict(config), sort_keys=True), FORMAT_KEY: FORMAT_VERSION}
    return atomic_save_safetensors(tensors, path, metadata)


def read_model_config(path: str | Path) -> Config | None:
    """The config in a model file's metadata (None when it carries none, as original Stable
    Diffusion files do), read from the header alone: no tensor is loaded."""
    path = _existing_file(path)
    if file_kind(path) in ("zip", "pickle"):
        raise CheckpointError(
            f"{path} is a PyTorch pickle checkpoint (.ckpt), not an ldm model file; load it with "
            "LDMPipeline.load(path), which reads every format (the tools: --ckpt PATH)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    if CONFIG_KEY not in metadata:
        return None
    try:
        config = from_dict(Config, json.loads(metadata[CONFIG_KEY]))
        config.validate()
    except (ConfigError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the config stored in its metadata is invalid: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the config stored in its metadata is nested too deeply to be a "
                              "config; the file is damaged or not a model file") from None
    return config


def read_model_file(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], Config | None]:
    """Read a model file into per-part state dicts (prefixes stripped) and its config (None when the
    file carries none, as original Stable Diffusion files do)."""
    config = read_model_config(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(Path(path), e) from None
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PREFIXES}
    stray = []
    for key, value in tensors.items():
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"{path} holds {len(stray)} tensors outside the model parts ({', '.join(stray[:5])}); "
            f"expected only keys under {', '.join(PREFIXES.values())}"
        )
    return parts, config


def load_vae_file(path: str | Path) -> AutoencoderKL:
    """The autoencoder of a model file (a stage-1 VAE file or a whole model), with its config."""
    parts, config = read_model_file(path)
    if config is None or not parts["vae"]:
        raise CheckpointError(f"{path} holds no VAE (no first_stage_model.* tensors with a config)")
    vae = AutoencoderKL(config.model.vae)
    load_state_strict(vae, parts["vae"], f"{path} [vae]")
    return vae


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass the .safetensors model file inside it")
    return path


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable .safetensors file ({error}); it may be truncated or corrupt: "
        "re-export or re-download it"
    )
