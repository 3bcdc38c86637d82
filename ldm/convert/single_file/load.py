"""Original single files into a `ModelState`: every tensor sorted into network weights, schedule
buffers, EMA copies and training leftovers, and each kind handled explicitly.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ...build import ModelState
from ...checkpoint import PREFIXES
from ...config import Config, DiffusionConfig, ModelConfig, SampleConfig, load_config
from ...diffusion.schedule import Schedule
from ...errors import CheckpointError
from . import upscaler
from .detect import check_prediction_type, detect_config
from .layouts import standard_layout
from .reader import read_checkpoint

log = logging.getLogger(__name__)

# Buffers of the original `LatentDiffusion` that describe the noise schedule (all derived from
# `betas`: the forward process's, which an upscaler's low_scale_model.* repeats, and the
# posterior's), and its per-timestep log-variance. None of them is a network weight.
SCHEDULE_BUFFERS = frozenset(
    {
        *upscaler.LOW_SCALE_BUFFERS,
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
EMA_PREFIX = "model_ema."
EMA_META = frozenset({"model_ema.decay", "model_ema.num_updates"})
VAE_LOSS_PREFIX = "first_stage_model.loss."  # training-time discriminator / LPIPS
HF_POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@dataclass
class _Sorted:
    """The tensors of an original checkpoint, sorted by what they are."""

    parts: dict[str, dict[str, Tensor]] = field(default_factory=lambda: {name: {} for name in PREFIXES})
    schedule: dict[str, Tensor] = field(default_factory=dict)
    ema: dict[str, Tensor] = field(default_factory=dict)
    ema_meta: dict[str, Tensor] = field(default_factory=dict)
    vae_loss: list[str] = field(default_factory=list)
    position_ids: Tensor | None = None
    unknown: list[str] = field(default_factory=list)


def _sort_tensors(state: Mapping[str, Tensor]) -> _Sorted:
    s = _Sorted()
    for key, value in state.items():
        if key == HF_POSITION_IDS:
            s.position_ids = value
        elif key.startswith(VAE_LOSS_PREFIX):
            s.vae_loss.append(key)
        elif key in EMA_META:
            s.ema_meta[key] = value
        elif key.startswith(EMA_PREFIX):
            s.ema[key] = value
        elif key in SCHEDULE_BUFFERS:
            s.schedule[key] = value
        else:
            for name, prefix in PREFIXES.items():
                if key.startswith(prefix):
                    s.parts[name][key[len(prefix):]] = value
                    break
            else:
                s.unknown.append(key)
    return s


def ema_key(unet_key: str) -> str:
    """The name the original code's EMA (`LitEma`) gives the copy of U-Net weight `unet_key`:
    `input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight`."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _match_ema(sorted_: _Sorted) -> tuple[dict[str, str], list[str]]:
    """EMA key -> U-Net key for every EMA tensor, and the EMA keys that match no U-Net weight."""
    names: dict[str, str] = {}
    for k in sorted_.parts["unet"]:
        e = ema_key(k)
        if e in names:
            raise CheckpointError(f"U-Net keys {names[e]!r} and {k!r} share the EMA name {e!r}")
        names[e] = k
    matched = {e: names[e] for e in sorted_.ema if e in names}
    return matched, [e for e in sorted_.ema if e not in names]


def _check_schedule(found: Mapping[str, Tensor], cfg: DiffusionConfig, path: Path) -> str | None:
    """Compare the file's schedule buffers (when present) with the schedule `cfg` builds."""
    schedule = Schedule.from_config(cfg)
    checked = []
    for name, ours in (("alphas_cumprod", schedule.alphas_cumprod), ("betas", schedule.betas)):
        if name not in found:
            continue
        theirs = found[name].detach().to("cpu", torch.float64)
        ours_desc = (
            f"{cfg.beta_schedule} {cfg.beta_start}..{cfg.beta_end}, {cfg.num_timesteps} steps"
            f"{', zero terminal SNR' if cfg.zero_terminal_snr else ''}"
        )
        if theirs.shape != ours.shape:
            raise CheckpointError(
                f"{path}: its {name} has {theirs.numel()} steps but the schedule built for it ({ours_desc}) has "
                f"{ours.numel()}; pass config=... (the tools: --config) with the right diffusion section"
            )
        tol = 8 * torch.finfo(found[name].dtype).eps if found[name].is_floating_point() else 1e-6
        err = ((theirs - ours).abs() / ours.abs().clamp(min=1e-12)).max().item()
        if not err <= tol:
            raise CheckpointError(
                f"{path}: the file's {name} (first {theirs[0].item():.6g}, last {theirs[-1].item():.6g}) "
                f"does not match the schedule built for it ({ours_desc}: first {ours[0].item():.6g}, "
                f"last {ours[-1].item():.6g}); max relative difference {err:.3g}. The model was trained "
                "with another noise schedule: pass config=... (the tools: --config) with the right diffusion section"
            )
        checked.append(name)
    return f"file's {' and '.join(checked)} match the schedule" if checked else None


def _check_low_scale(buffers: Mapping[str, Tensor], cfg: ModelConfig, path: Path) -> str:
    """The upscaler's `low_scale_model.*` buffers: known names, and the schedule of `cfg.low_res`."""
    if cfg.low_res is None:
        raise CheckpointError(
            f"{path} holds an upscaler's low-resolution buffers ({upscaler.LOW_SCALE_PREFIX}*) but the config "
            "describes no upscaler; add a model.low_res section, or load it without config=... to detect it"
        )
    unknown = sorted(k for k in buffers if k not in upscaler.LOW_SCALE_BUFFERS)
    if unknown:
        names = ", ".join(upscaler.LOW_SCALE_PREFIX + k for k in unknown)
        raise CheckpointError(f"{path}: unknown low-resolution buffers {names}")
    try:
        checked = _check_schedule(buffers, upscaler.low_res_as_diffusion(cfg.low_res), path)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (this is the schedule of the low-resolution input: model.low_res)") from None
    return f"  low-resolution input: {checked or 'schedule buffers present'} ({len(buffers)} buffers, not loaded)"


def read_single_file_config(path: str | Path, *, prediction_type: str | None = None,
                            config: str | Path | Config | None = None, trust_pickle: bool = False) -> Config:
    """The config `read_single_file` would give the file at `path`, from its tensors' names and shapes
    alone: the tensors are memory-mapped, not read (except from an old non-zip pickle)."""
    state, _ = standard_layout(read_checkpoint(path, trust_pickle=trust_pickle))
    return _config_of(state, config, prediction_type)[0]


def _config_of(state: Mapping[str, Tensor], config: str | Path | Config | None,
               prediction_type: str | None) -> tuple[Config, str]:
    """The given config (with `prediction_type` set) or the detected one (512 px, or 768 for v
    models but the x4 upscaler, as the published ones), and a report line."""
    if config is not None:
        cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
        if prediction_type is not None:
            check_prediction_type(prediction_type)
            cfg.model.diffusion.prediction_type = prediction_type
        return cfg, f"config: given ({config if not isinstance(config, Config) else 'Config object'}), not detected"
    model_cfg, report = detect_config(state, prediction_type=prediction_type)
    size = 768 if model_cfg.diffusion.prediction_type == "v" and model_cfg.low_res is None else 512
    return Config(model=model_cfg, sample=SampleConfig(height=size, width=size)), report


def read_single_file(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    config: str | Path | Config | None = None,
    use_ema: bool = False,
    trust_pickle: bool = False,
) -> ModelState:
    """An original Stable Diffusion checkpoint (SD 1.x, 2.x, inpainting, the x4 upscaler) as a config
    and network states.

    Every tensor of the file is accounted for: network weights are kept for a strict load;
    noise-schedule buffers (and an upscaler's `low_scale_model.*` ones) are checked against the
    schedules we build; EMA copies of the U-Net
    (`model_ema.*`) replace its weights with `use_ema=True` and are otherwise left unread; the HF
    CLIP `position_ids` and training-only VAE loss weights (`first_stage_model.loss.*`) are dropped;
    anything else is an error naming it. Older key layouts are renamed first (`layouts`). `config`
    (a Config or YAML path) replaces detection. The returned state's `report` says what was
    detected and done (`LDMPipeline.from_single_file` logs it and keeps it as `pipe.load_report`).
    """
    path = Path(path)
    state, layout_notes = standard_layout(read_checkpoint(path, trust_pickle=trust_pickle))
    cfg, report = _config_of(state, config, prediction_type)
    lines = [f"{path.name}: {len(state)} tensors", report, *layout_notes]
    state, low_scale = upscaler.split_low_scale(state)

    s = _sort_tensors(state)
    del state
    matched, stray_ema = _match_ema(s)
    unknown = s.unknown + stray_ema
    if unknown:
        more = f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
        raise CheckpointError(
            f"{path}: {len(unknown)} tensors are neither weights of the detected networks "
            f"({', '.join(PREFIXES.values())}) nor known training leftovers (schedule buffers, "
            f"model_ema.*, {VAE_LOSS_PREFIX}*): {', '.join(unknown[:10])}{more}"
        )

    low_scale_report = _check_low_scale(low_scale, cfg.model, path) if low_scale else None
    checked = _check_schedule(s.schedule, cfg.model.diffusion, path)
    if checked:
        lines.append(f"  {checked}")
    if low_scale_report:
        lines.append(low_scale_report)
    if s.schedule:
        lines.append(f"  {len(s.schedule)} schedule buffers not loaded (we build the schedule from the config)")

    unet_state = s.parts["unet"]
    if use_ema:
        if not matched:
            raise CheckpointError(
                f"{path} holds no EMA weights (model_ema.*); it may already be an EMA-only export "
                "(e.g. *-emaonly): load it with use_ema=False"
            )
        missing = [k for k in unet_state if ema_key(k) not in matched]
        if missing:
            raise CheckpointError(
                f"{path} holds EMA copies for {len(matched)} of {len(unet_state)} U-Net weights; missing: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        unet_state = {matched[e]: t for e, t in s.ema.items()}
        lines.append(f"  U-Net: EMA weights ({len(matched)} model_ema tensors) loaded in place of the trained ones")
    elif matched:
        lines.append(f"  {len(matched)} EMA tensors (model_ema.*) present, not used (use_ema=True loads them)")
    if s.vae_loss:
        lines.append(f"  {len(s.vae_loss)} training-only VAE loss tensors ({VAE_LOSS_PREFIX}*) dropped")
    if s.position_ids is not None:
        ids = s.position_ids.detach().reshape(-1).to("cpu", torch.float64)
        if not torch.equal(ids, torch.arange(ids.numel(), dtype=torch.float64)):
            log.warning("%s: its text position_ids are not 0..%d (a known defect of some merged "
                        "checkpoints); the correct ones are used", path, ids.numel() - 1)
            lines.append("  text position_ids in the file were damaged; replaced by 0..L-1")
        else:
            lines.append("  text position_ids dropped (re-created as 0..L-1)")

    parts = {"unet": unet_state, "vae": s.parts["vae"], "text_encoder": s.parts["text_encoder"]}
    return ModelState(cfg, parts, "\n".join(lines))
