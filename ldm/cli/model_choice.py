"""Which model a tool loads, and loading it: `--ckpt` in any format (with the `--config` and
`--prediction-type` hints and `--vae`), `--config` alone for random weights, and, when neither is
given, the model a PNG records (`--from-png`), the path in $LDM_CHECKPOINT, or the model the
README's training writes (runs/sd_tiny/model.safetensors), saying which on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..config import load_config
from ..devices import pick_device, pick_dtype
from ..pipeline import LDMPipeline, check_model_kind, load_model
from .adapters import apply_adapters

CHECKPOINT_ENV = "LDM_CHECKPOINT"
# What `python tools/train_ldm.py configs/sd_tiny.yaml` writes (the README's quickstart).
DEFAULT_CHECKPOINT = Path("runs") / "sd_tiny" / "model.safetensors"


@dataclass
class ModelChoice:
    """A model to load: a file or folder (`path`, with its hints), or random weights from `config`."""

    path: str | None = None
    config: str | None = None  # random weights (without path), or the architecture hint (with path)
    overrides: tuple[str, ...] = ()
    prediction_type: str | None = None
    vae: str | None = None
    seed: int = 0  # of random weights
    why: str | None = None  # said on stderr when the user did not name the model


def choose_model(args: argparse.Namespace, recorded: Mapping[str, Any] | None = None,
                 recorded_by: str | None = None) -> ModelChoice:
    """The model the flags name; without --ckpt and --config, the one `recorded` (the `model` of a PNG's
    settings, from `recorded_by`) names if it is here, else $LDM_CHECKPOINT, else DEFAULT_CHECKPOINT."""
    hints = {"prediction_type": args.prediction_type, "vae": args.vae}
    if args.overrides and not args.config:
        raise ValueError("--set overrides apply to a --config (random weights, or the architecture given with --ckpt); "
                         "a model file carries its own config")
    if args.ckpt:
        return ModelChoice(path=args.ckpt, config=args.config, overrides=tuple(args.overrides), **hints)
    if args.config:
        return ModelChoice(config=args.config, overrides=tuple(args.overrides), **hints)
    if recorded:
        choice = _recorded_choice(recorded, recorded_by, hints)
        if choice is not None:
            return choice
    path, why = default_model()
    return ModelChoice(path=path, why=why, **hints)


def default_model() -> tuple[str, str]:
    """The model a tool uses when none is named: $LDM_CHECKPOINT, else DEFAULT_CHECKPOINT when it
    exists; and why, to say on stderr. Without either, the error names both ways to give one."""
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        if not Path(env).exists():
            raise ValueError(f"${CHECKPOINT_ENV} names {env}, which does not exist; set it to a model file or "
                             "folder, or pass --ckpt MODEL")
        return env, f"model {env} (from ${CHECKPOINT_ENV}; --ckpt chooses another)"
    if DEFAULT_CHECKPOINT.exists():
        return str(DEFAULT_CHECKPOINT), (f"model {DEFAULT_CHECKPOINT} (what the README's training writes; --ckpt "
                                         f"or ${CHECKPOINT_ENV} choose another)")
    raise ValueError(
        f"no model given: pass --ckpt MODEL (an ldm .safetensors, an original Stable Diffusion .safetensors or "
        f".ckpt, or a diffusers folder) or set {CHECKPOINT_ENV}=MODEL; without either the tools use "
        f"{DEFAULT_CHECKPOINT}, which the README's training writes, and it does not exist here "
        "(--config sd_tiny builds random weights, for testing)"
    )


def _recorded_choice(recorded: Mapping[str, Any], by: str | None, hints: dict[str, Any]) -> ModelChoice | None:
    """The model a PNG records, when it can be had here (its file exists, or it was built from a config)."""
    by = by or "the image"
    vae = hints["vae"] or recorded.get("vae")
    prediction_type = hints["prediction_type"] or recorded.get("prediction_type")
    if recorded.get("format") == "config" and recorded.get("config"):
        return ModelChoice(config=recorded["config"], overrides=tuple(recorded.get("overrides", ())),
                           seed=int(recorded.get("seed") or 0), prediction_type=prediction_type, vae=vae,
                           why=f"random weights of {recorded['config']} (seed {recorded.get('seed') or 0}), "
                               f"as {by} records")
    path = recorded.get("path")
    if path and Path(path).exists():
        return ModelChoice(path=path, config=recorded.get("config"), overrides=tuple(recorded.get("overrides", ())),
                           prediction_type=prediction_type, vae=vae,
                           why=f"model {path}, which {by} records (--ckpt chooses another)")
    if path:
        print(f"note: {by} was made with {path}, which is not here; pass --ckpt with that model", file=sys.stderr)
    return None


def load_pipeline(args: argparse.Namespace, recorded: Mapping[str, Any] | None = None,
                  recorded_by: str | None = None, *, kind: str | None = "text-to-image") -> LDMPipeline:
    """Build the pipeline the model flags (--ckpt, --config, --set, --prediction-type, --vae, --device,
    --dtype, --attention) describe; see `choose_model` for what is used without --ckpt and --config.
    A model that is not of `kind` ("text-to-image", "upscaler"; None: either) is refused, before its
    weights load where the file or config tells (`ldm.pipeline.check_model_kind`)."""
    choice = choose_model(args, recorded, recorded_by)
    if choice.why:
        print(f"note: using {choice.why}", file=sys.stderr)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if choice.path:
        config = load_config(choice.config, choice.overrides) if choice.overrides else choice.config
        pipe = load_model(choice.path, config=config, prediction_type=choice.prediction_type, vae=choice.vae,
                          kind=kind, device=device, dtype=dtype)
        pipe.source = dataclasses.replace(pipe.source, config=choice.config, overrides=choice.overrides)
    else:
        if not choice.why:
            print(f"note: {choice.config} is built with random weights; expect noise-like images until it is "
                  "trained", file=sys.stderr)
        if choice.prediction_type:
            raise ValueError("--prediction-type is a hint for model files that cannot tell; a config says it "
                             "(--set model.diffusion.prediction_type=v)")
        cfg = load_config(choice.config, choice.overrides)
        check_model_kind(cfg, kind, choice.config)
        pipe = LDMPipeline.from_config(cfg, seed=choice.seed, device=device, dtype=dtype)
        pipe.source = dataclasses.replace(pipe.source, config=choice.config, overrides=choice.overrides)
        if choice.vae:
            pipe.load_vae(choice.vae)
    pipe.allow_nan = getattr(args, "allow_nan", False)
    apply_adapters(pipe, args)  # --lora, --embedding
    return pipe.set_attention_backend(args.attention)
