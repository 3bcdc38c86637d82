"""Model formats and conversion between them: our model file, original single files, diffusers folders.

- `ours`: one `.safetensors` in the original key layout with our config in its metadata
  (`LDMPipeline.save` / `from_checkpoint`).
- `single`: an original Stable Diffusion single file (`.safetensors` or `.ckpt`): the same keys, no
  config, plus the schedule buffers (`betas`, `alphas_cumprod`, ...) that the original code and the
  tools built on it expect. Read with `ldm.convert.single_file.load_single_file`.
- `diffusers`: a diffusers folder (`ldm.convert.diffusers`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import CONFIG_KEY, PREFIXES, atomic_save_safetensors
from ..config import Config, DiffusionConfig
from ..diffusion.schedule import make_betas, rescale_zero_terminal_snr
from ..errors import CheckpointError

FORMATS = ("ours", "single", "diffusers")
SINGLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PREDICTION_NAMES = {
    "eps": "eps", "epsilon": "eps",
    "v": "v", "v_prediction": "v",
    "x0": "x0", "sample": "x0",
}


def normalise_prediction_type(name: str) -> str:
    """Our name for a prediction type given in our or diffusers' spelling ("v_prediction" -> "v")."""
    if name not in PREDICTION_NAMES:
        raise ValueError(f"unknown prediction type {name!r}; use one of eps, v, x0 (or epsilon, v_prediction, sample)")
    return PREDICTION_NAMES[name]


def detect_input_format(path: str | Path) -> str:
    """A folder is a diffusers model; `.ckpt`/`.pt`/`.pth` an original single file; a `.safetensors`
    is ours when its metadata holds our config, else an original single file."""
    path = Path(path)
    if path.is_dir():
        return "diffusers"
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    if path.suffix in SINGLE_SUFFIXES:
        return "single"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # a corrupt header raises several kinds of errors
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
        return "ours" if CONFIG_KEY in metadata else "single"
    raise CheckpointError(
        f"cannot tell the format of {path}: expected a diffusers folder, .safetensors or .ckpt (or pass --from)"
    )


def infer_output_format(path: str | Path) -> str:
    """`.safetensors` -> ours, `.ckpt` -> single, anything without a suffix (or a folder) -> diffusers."""
    path = Path(path)
    if path.is_dir() or path.suffix == "" or str(path).endswith(os.sep):
        return "diffusers"
    if path.suffix in SINGLE_SUFFIXES:
        return "single"
    if path.suffix == ".safetensors":
        return "ours"
    raise CheckpointError(f"cannot tell which format to write for {path}; pass --to ours|single|diffusers")


def _with_prediction_type(pipe, prediction_type: str):
    from ..pipeline import LDMPipeline

    diffusion = dataclasses.replace(pipe.diffusion, prediction_type=normalise_prediction_type(prediction_type))
    return LDMPipeline(pipe.vae, pipe.unet, pipe.text_encoder, diffusion, defaults=pipe.defaults)


def load_model(
    path: str | Path,
    fmt: str | None = None,
    *,
    config: str | Path | Config | None = None,
    prediction_type: str | None = None,
    use_ema: bool = False,
    trust_pickle: bool = False,
):
    """Load an LDMPipeline from any supported format (detected from `path` when `fmt` is None)."""
    from ..pipeline import LDMPipeline
    from .diffusers import load_diffusers

    fmt = fmt or detect_input_format(path)
    if fmt == "single":
        from .single_file import load_single_file

        pred = normalise_prediction_type(prediction_type) if prediction_type else None
        return load_single_file(path, prediction_type=pred, config=config, use_ema=use_ema, trust_pickle=trust_pickle)
    if use_ema:
        raise CheckpointError(f"--ema applies to original single files only; {path} is a {fmt} model")
    if fmt == "ours":
        pipe = LDMPipeline.from_checkpoint(path, config=config)
    elif fmt == "diffusers":
        if config is not None:
            raise CheckpointError(f"{path} is a diffusers folder, whose configs describe it; drop --config")
        pipe = load_diffusers(path)
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _with_prediction_type(pipe, prediction_type) if prediction_type else pipe


def schedule_buffers(cfg: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The noise-schedule buffers of the original `LatentDiffusion` (ddpm.py `register_schedule`),
    computed in float64 and stored as float32 as there (v_posterior = 0)."""
    betas = make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
    if cfg.zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    posterior_variance = betas * (1 - ac_prev) / (1 - ac)  # DDPM eq. 7, beta tilde
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": ac.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),  # DDPM eq. 7, mu tilde
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def single_file_tensors(pipe, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of an original single file: model weights under the original prefixes (cast to
    `dtype` when given), the schedule buffers in float32, and SD 1.x's CLIP `position_ids`."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in pipe.modules.items():
        for key, value in module.state_dict().items():
            value = value.detach().cpu()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[PREFIXES[name] + key] = value.contiguous()
    tensors.update(schedule_buffers(pipe.diffusion))
    te = pipe.text_encoder.cfg
    if te.kind == "hf_clip":
        ids = torch.arange(te.context_length, dtype=torch.long)[None]
        tensors[PREFIXES["text_encoder"] + "transformer.text_model.embeddings.position_ids"] = ids
    return tensors


def save_single_file(pipe, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write an original-layout single file: `.safetensors`, or a `.ckpt` pickle of {"state_dict"}."""
    path = Path(path)
    tensors = single_file_tensors(pipe, dtype)
    if path.suffix == ".safetensors":
        return atomic_save_safetensors(tensors, path, {"format": "pt"})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"state_dict": tensors}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_model(pipe, path: str | Path, fmt: str | None = None, *, dtype: torch.dtype | None = None) -> Path:
    """Write `pipe` in `fmt` (inferred from `path` when None), its weights cast to `dtype` if given."""
    from .diffusers import save_diffusers

    fmt = fmt or infer_output_format(path)
    if fmt == "single":
        return save_single_file(pipe, path, dtype=dtype)
    if dtype is not None:
        pipe.to(dtype=dtype)
    if fmt == "ours":
        return pipe.save(path)
    if fmt == "diffusers":
        return save_diffusers(pipe, path)
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def describe(path: Path, fmt: str) -> str:
    """One line on what was written: format, size and (for folders) the files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in files)
        return f"wrote {fmt} folder {path} ({len(files)} files, {size / 2**20:.1f} MiB)"
    return f"wrote {fmt} file {path} ({path.stat().st_size / 2**20:.1f} MiB)"


__all__ = [
    "FORMATS", "detect_input_format", "infer_output_format", "load_model", "save_model",
    "save_single_file", "schedule_buffers", "single_file_tensors", "normalise_prediction_type", "describe",
]
