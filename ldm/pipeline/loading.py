"""Making and keeping a pipeline: from a config (random weights), our model file, an original single
file or a diffusers folder, and back out to each.

`Loading` is a base class of `LDMPipeline`. Every loader reads a `ModelState` (config + network
states) with the reader of its format and hands it to `from_state`, which builds the networks on the
meta device around the file's tensors (`ldm.build`); every writer takes `pipe.state()`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..build import ModelState, build_from_state
from ..checkpoint import read_model_file, save_model_file
from ..config import Config, load_config
from ..convert.diffusers import read_diffusers, write_diffusers
from ..convert.single_file import read_single_file, write_single_file
from ..errors import CheckpointError
from ..models import build_models

log = logging.getLogger(__name__)

Device = str | torch.device | None
DType = str | torch.dtype | None


class Loading:
    """Constructors from each format, and writers to each."""

    @classmethod
    def from_config(cls, config: str | Path | Config, overrides: Sequence[str] = (), *, seed: int = 0,
                    device: Device = None, dtype: DType = None):
        """Build a model with random weights (initialised from `seed`) from a Config, a YAML path or the
        name of a shipped config ("sd15", "sd_tiny")."""
        cfg = config if isinstance(config, Config) else load_config(config, overrides)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet, vae, text_encoder = build_models(cfg.model)
        pipe = cls(vae, unet, text_encoder, cfg.model.diffusion, defaults=cfg.sample, low_res=cfg.model.low_res)
        return pipe.to(device, dtype)

    @classmethod
    def from_state(cls, state: ModelState, *, device: Device = None, dtype: DType = None):
        """A pipeline whose networks hold exactly `state.parts`' tensors (built on the meta device: no
        random init, no second copy; see `ldm.build.build_from_state` for `device` and `dtype`)."""
        unet, vae, text_encoder = build_from_state(state, device=device, dtype=dtype)
        model = state.config.model
        return cls(vae, unet, text_encoder, model.diffusion, defaults=state.config.sample, low_res=model.low_res)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, config: str | Path | Config | None = None,
                        device: Device = None, dtype: DType = None):
        """Load a model file written by `save` (strictly: every tensor must match the config).

        `config` overrides the config stored in the file (needed for files that carry none)."""
        parts, stored = read_model_file(path)
        cfg = config if isinstance(config, Config) or config is None else load_config(config)
        cfg = cfg or stored
        if cfg is None:
            raise CheckpointError(
                f"{path} carries no config in its metadata; pass the architecture explicitly, e.g. "
                "LDMPipeline.from_checkpoint(path, config='configs/sd15.yaml')"
            )
        return cls.from_state(ModelState(cfg, parts), device=device, dtype=dtype)

    @classmethod
    def from_single_file(cls, path: str | Path, *, prediction_type: str | None = None,
                         config: str | Path | Config | None = None, use_ema: bool = False,
                         device: Device = None, dtype: DType = None, trust_pickle: bool = False):
        """Load an original Stable Diffusion 1.x / 2.x checkpoint (.ckpt or .safetensors).

        The architecture is detected from the tensors (see `pipe.load_report`); pass
        `prediction_type="v"` for the 768-v models, which the tensors cannot reveal. Without `dtype`
        the weights keep the file's dtype. See `ldm.convert.single_file.read_single_file`."""
        path = Path(path)
        state = read_single_file(path, prediction_type=prediction_type, config=config, use_ema=use_ema,
                                 trust_pickle=trust_pickle)
        try:
            pipe = cls.from_state(state, device=device, dtype=dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{path} {e}") from None
        pipe.load_report = f"{state.report}\n  loaded as {pipe.dtype} on {pipe.device}"
        log.info("%s", pipe.load_report)
        return pipe

    @classmethod
    def from_diffusers(cls, folder: str | Path, *, device: Device = None, dtype: DType = None):
        """Load a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, scheduler/); the weights
        are float32 unless `dtype` says otherwise."""
        return cls.from_state(read_diffusers(folder), device=device, dtype=torch.float32 if dtype is None else dtype)

    def state(self) -> ModelState:
        """The config and the networks' state dicts (the tensors themselves, not copies)."""
        return ModelState(self.config, {name: module.state_dict() for name, module in self.modules.items()})

    def save(self, path: str | Path) -> Path:
        """Write one .safetensors file (original SD key layout, config in the metadata), atomically."""
        return save_model_file(path, self.modules, self.config)

    def save_diffusers(self, folder: str | Path) -> Path:
        """Write a folder that diffusers' StableDiffusionPipeline classes open."""
        return write_diffusers(self.state(), folder)

    def save_single_file(self, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write an original-layout single file (`.safetensors` or `.ckpt`), its weights cast to `dtype` if given."""
        return write_single_file(self.state(), path, dtype=dtype)
