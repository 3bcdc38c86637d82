"""Networks from a config and given tensors: built on the meta device, every key and shape checked, no random init.

Every way of loading a model ends here: our model file, original single files and diffusers folders
are read into a `ModelState` (the config and one state dict per network), and `build_from_state`
turns that into the U-Net, VAE and text encoder. Building on the `meta` device costs no memory and
no initialisation; the tensors are then assigned in place, so the weights are never copied twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from .config import Config, VAEConfig
from .devices import parse_dtype
from .errors import CheckpointError
from .models import build_models
from .models.text import TextEncoder
from .models.unet import UNet
from .models.vae import AutoencoderKL

PARTS = ("unet", "vae", "text_encoder")


@dataclass
class ModelState:
    """A model as every reader returns it and every writer takes it: the config, and a state dict per
    network ("unet", "vae", "text_encoder") with the original checkpoint prefixes stripped."""

    config: Config
    parts: dict[str, dict[str, Tensor]]
    report: str = ""  # what the reader found and did, one line per fact (empty when there is nothing to say)


def load_state_strict(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with an error that names missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{what}: the checkpoint does not match the model built from its config"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                lines.append(f"  {label} ({len(keys)}): {'; '.join(keys[:5])}{more}")
        lines.append("  check that the config describes the same architecture as the weights")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=True)


class _AssignLoader:
    """Presents a meta-device module to `load_state_strict` (which checks keys and shapes and
    names what differs) so that its final `load_state_dict` assigns the given tensors instead of
    copying into the meta placeholders."""

    def __init__(self, module: nn.Module):
        self.module = module

    def state_dict(self) -> dict[str, Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor], strict: bool = True):
        return self.module.load_state_dict(state, strict=strict, assign=True)


def _materialise_meta(module: nn.Module, device: torch.device, what: str) -> None:
    """Re-create the tensors that no state dict carries (non-persistent buffers) and that building
    on the meta device left as placeholders. HF CLIP's `position_ids` is 0..L-1."""
    for name, buf in list(module.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf == "position_ids":
            value = torch.arange(buf.shape[-1], dtype=buf.dtype, device=device).expand(buf.shape).contiguous()
        else:
            raise CheckpointError(
                f"{what}: buffer {name!r} is not stored in checkpoints and there is no rule to "
                "re-create it after loading; add one to ldm.build._materialise_meta"
            )
        owner._buffers[leaf] = value
    left = [n for n, t in module.named_parameters() if t.is_meta]
    if left:
        raise CheckpointError(f"{what}: parameters were not loaded: {', '.join(left[:5])}")


def _dominant_float_dtype(parts: Mapping[str, Mapping[str, Tensor]]) -> torch.dtype | None:
    sizes: dict[torch.dtype, int] = {}
    for state in parts.values():
        for t in state.values():
            if t.is_floating_point():
                sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    return max(sizes, key=sizes.get) if sizes else None


def build_from_state(
    state: ModelState,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[UNet, AutoencoderKL, TextEncoder]:
    """The U-Net, VAE and text encoder of `state.config`, holding exactly `state.parts`' tensors.

    The networks are built on the `meta` device (no memory, no random init), every key and shape
    is checked strictly, then each tensor is moved to `device` / cast to `dtype` as it is assigned
    (tensors already on the device in that dtype, e.g. memory-mapped from a file, are used as they
    are: no copy; without `device` they stay where they are). Without `dtype` the weights keep the
    dtype they have (the most common floating dtype of the state, when parts differ).
    """
    parts = state.parts
    missing = [name for name in PARTS if name not in parts]
    if missing:
        raise CheckpointError(f"no state for {', '.join(missing)}; parts must hold unet, vae and text_encoder")
    device = torch.device(device) if device is not None else None  # None: where the tensors are
    target = parse_dtype(dtype) if dtype is not None else _dominant_float_dtype(parts)
    state.config.validate()
    with torch.device("meta"):
        unet, vae, text_encoder = build_models(state.config.model)
    for name, module in zip(PARTS, (unet, vae, text_encoder)):
        _fill(module, parts[name], device, target, f"[{name}]")
    return unet, vae, text_encoder


def build_vae(
    cfg: VAEConfig,
    state: Mapping[str, Tensor],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> AutoencoderKL:
    """One VAE of config `cfg` holding exactly `state`'s tensors, built as `build_from_state` builds
    the whole model (a VAE swapped into a loaded pipeline)."""
    device = torch.device(device) if device is not None else None
    target = parse_dtype(dtype) if dtype is not None else _dominant_float_dtype({"vae": state})
    cfg.validate()
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    _fill(vae, state, device, target, "[vae]")
    return vae


def _fill(module: nn.Module, state: Mapping[str, Tensor], device: torch.device | None, target: torch.dtype | None,
          what: str) -> None:
    """Assign `state` into the meta-device `module` strictly, each tensor moved to `device` and its
    floating ones cast to `target` (None: as they are) on the way."""
    tensors = {
        k: t.to(device=device or t.device, dtype=target if t.is_floating_point() and target is not None else t.dtype)
        for k, t in state.items()
    }
    load_state_strict(_AssignLoader(module), tensors, what)  # type: ignore[arg-type]
    del tensors
    params = [p for p in module.parameters() if not p.is_meta]
    _materialise_meta(module, device or (params[0].device if params else torch.device("cpu")), what)
