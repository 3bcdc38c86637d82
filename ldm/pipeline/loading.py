"""Making and keeping a pipeline: from a config (random weights), our model file, an original single
file or a diffusers folder, and back out to each.

`Loading` is a base class of `LDMPipeline`. Every loader reads a `ModelState` (config + network
states) with the reader of its format and hands it to `from_state`, which builds the networks on the
meta device around the file's tensors (`ldm.build`); every writer takes `pipe.state()`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from ..build import ModelState, build_from_state, build_vae
from ..checkpoint import read_model_file, save_model_file
from ..config import Config, load_config
from ..convert.diffusers import read_diffusers, write_diffusers
from ..convert.formats import FORMATS, detect_input_format, normalise_prediction_type, with_prediction_type
from ..convert.single_file import read_single_file, write_single_file
from ..convert.vae_file import read_vae, with_vae
from ..errors import CheckpointError
from ..models import build_models
from ..models.attention import AttentionLayer, set_attention_backend
from ..speed import optimize_vae
from .source import ModelSource

log = logging.getLogger(__name__)

Device = str | torch.device | None
DType = str | torch.dtype | None


class Loading:
    """Constructors from each format, and writers to each."""

    source: ModelSource | None = None  # where the weights came from (set by `load` and `from_config`)
    load_report: str = ""  # what loading found and did, one line per fact

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
        pipe.source = ModelSource(format="config", config=None if isinstance(config, Config) else str(config),
                                  overrides=tuple(overrides), seed=seed)
        return pipe.to(device, dtype)

    @classmethod
    def from_state(cls, state: ModelState, *, device: Device = None, dtype: DType = None):
        """A pipeline whose networks hold exactly `state.parts`' tensors (built on the meta device: no
        random init, no second copy; see `ldm.build.build_from_state` for `device` and `dtype`)."""
        unet, vae, text_encoder = build_from_state(state, device=device, dtype=dtype)
        model = state.config.model
        return cls(vae, unet, text_encoder, model.diffusion, defaults=state.config.sample, low_res=model.low_res)

    @classmethod
    def load(cls, path: str | Path, fmt: str | None = None, *, config: str | Path | Config | None = None,
             prediction_type: str | None = None, vae: str | Path | None = None, use_ema: bool = False,
             trust_pickle: bool = False, device: Device = None, dtype: DType = None):
        """Load any model by path: an ldm model file, an original Stable Diffusion single file
        (`.safetensors` or `.ckpt`) or a diffusers folder, told apart by the file itself (`fmt`:
        "ours", "single" or "diffusers" to say it instead).

        Hints for what a file cannot tell: `config` (a Config, YAML path or shipped config's name) is
        the architecture of an original single file, replacing detection (for an ldm file it
        replaces the stored config); `prediction_type` ("eps", "v", "x0", or diffusers' "epsilon",
        "v_prediction") is what the U-Net predicts: "v" for the SD 2.x 768-v models. `vae`: a
        standalone VAE (file or diffusers folder, see `ldm.convert.vae_file`) used instead of the
        model's. `use_ema`: the EMA weights of an original training checkpoint. Without `dtype` the
        weights keep the file's dtype (diffusers folders: float32). `pipe.load_report` says what was
        found and done; `pipe.source` records where the weights came from.
        """
        path = Path(path)
        fmt = fmt or detect_input_format(path)
        pred = normalise_prediction_type(prediction_type) if prediction_type else None
        if use_ema and fmt != "single":
            raise CheckpointError(f"use_ema (--ema) applies to original single files only; {path} is a {fmt} model")
        if fmt == "single":
            state = read_single_file(path, prediction_type=pred, config=config, use_ema=use_ema,
                                     trust_pickle=trust_pickle)
        elif fmt == "ours":
            state = _read_ours(path, config)
        elif fmt == "diffusers":
            if config is not None:
                raise CheckpointError(f"{path} is a diffusers folder, whose configs describe it; drop --config")
            state = read_diffusers(path)
            dtype = torch.float32 if dtype is None else dtype
        else:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        if pred and fmt != "single":
            state.config = with_prediction_type(state.config, pred)
        if vae is not None:
            state = with_vae(state, read_vae(vae, state.config.model.vae, trust_pickle=trust_pickle))
        try:
            pipe = cls.from_state(state, device=device, dtype=dtype)
        except CheckpointError as e:
            raise CheckpointError(f"{path} {e}") from None
        pipe.load_report = "\n".join(line for line in (state.report, f"  loaded as {pipe.dtype} on {pipe.device}")
                                      if line)
        log.info("%s", pipe.load_report)
        pipe.source = ModelSource(path=str(path), format=fmt, config=None if isinstance(config, Config) else
                                  (str(config) if config is not None else None), prediction_type=pred,
                                  vae=str(vae) if vae is not None else None)
        return pipe

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, config: str | Path | Config | None = None,
                        device: Device = None, dtype: DType = None):
        """Load a model file written by `save` (strictly: every tensor must match the config).

        `config` overrides the config stored in the file. `load(path)` reads every format."""
        return cls.load(path, "ours", config=config, device=device, dtype=dtype)

    @classmethod
    def from_single_file(cls, path: str | Path, *, prediction_type: str | None = None,
                         config: str | Path | Config | None = None, use_ema: bool = False,
                         device: Device = None, dtype: DType = None, trust_pickle: bool = False):
        """Load an original Stable Diffusion 1.x / 2.x checkpoint (.ckpt or .safetensors).

        The architecture is detected from the tensors (see `pipe.load_report`); pass
        `prediction_type="v"` for the 768-v models, which the tensors cannot reveal. Without `dtype`
        the weights keep the file's dtype. See `ldm.convert.single_file.read_single_file`."""
        return cls.load(path, "single", prediction_type=prediction_type, config=config, use_ema=use_ema,
                        trust_pickle=trust_pickle, device=device, dtype=dtype)

    @classmethod
    def from_diffusers(cls, folder: str | Path, *, device: Device = None, dtype: DType = None):
        """Load a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, scheduler/); the weights
        are float32 unless `dtype` says otherwise."""
        return cls.load(folder, "diffusers", device=device, dtype=dtype)

    def load_vae(self, path: str | Path, *, trust_pickle: bool = False):
        """Use the standalone VAE at `path` instead of this model's (e.g. vae-ft-mse-840000-ema-pruned;
        a file in the original or diffusers layout, or a diffusers folder). It must make latents of
        the model's shape; the model's latent scale is kept. Returns the pipeline."""
        found = read_vae(path, self.vae.cfg, trust_pickle=trust_pickle)
        vae = build_vae(found.config, found.tensors, device=self.device, dtype=next(self.vae.parameters()).dtype)
        backend = next((m.backend for m in self.vae.modules() if isinstance(m, AttentionLayer)), None)
        if backend is not None:
            set_attention_backend(vae, backend)  # the backend the pipeline was set to
        self.vae = vae.eval()
        self.model_config = dataclasses.replace(self.model_config, vae=vae.cfg)
        self.fast_vae = optimize_vae(vae, self.speed)
        self.load_report = "\n".join(line for line in (self.load_report, found.report) if line)
        self.source = dataclasses.replace(self.source or ModelSource(), vae=str(path))
        return self

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


def _read_ours(path: Path, config: str | Path | Config | None) -> ModelState:
    """An ldm model file as a ModelState; `config` replaces the stored one (needed for files without one)."""
    parts, stored = read_model_file(path)
    cfg = config if isinstance(config, Config) or config is None else load_config(config)
    cfg = cfg or stored
    if cfg is None:
        raise CheckpointError(
            f"{path} carries no config in its metadata: it is an original single file, whose architecture "
            "LDMPipeline.load(path) detects from its tensors; or pass the architecture, e.g. config='sd15'"
        )
    return ModelState(cfg, parts)
