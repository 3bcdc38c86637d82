"""Original Stable Diffusion single-file checkpoints (`.safetensors`, `.ckpt`) in.

Three steps, each usable on its own:

- `read_checkpoint(path)`: the file's tensors, memory-mapped (no copy in RAM). Pickles are opened
  with `weights_only=True` only, unless the caller says it trusts the file.
- `detect_config(state_dict)`: the architecture, read from tensor shapes (SD 1.x, SD 2.x,
  inpainting, and smaller models saved in the same layout), with the family conventions for what
  shapes cannot tell (head counts, noise schedule, latent scale).
- `load_single_file(path)`: sorts every tensor of the file into network weights, noise-schedule
  buffers, EMA copies and training leftovers, handles each kind explicitly, and builds the
  pipeline with `build_pipeline_from_state`, which assigns the tensors into networks built on the
  `meta` device: no random initialisation, no second copy of the weights.
"""

from __future__ import annotations

import copy
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from ..checkpoint import PREFIXES, load_state_strict
from ..config import (
    PREDICTION_TYPES,
    Config,
    DiffusionConfig,
    ModelConfig,
    SampleConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
    load_config,
)
from ..errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONVERT_HINT = "python tools/convert.py --trust-pickle {path} {out}"

# Family conventions for what tensors cannot tell.
SD1_NUM_HEADS = 8  # SD 1.x U-Net: 8 heads at every level
SD2_HEAD_DIM = 64  # SD 2.x U-Net: heads of 64 channels
CLIP_HEAD_DIM = 64  # CLIP ViT-L/14 (12 x 64) and OpenCLIP ViT-H/14 (16 x 64) text towers
SD_SCALING_FACTOR = 0.18215  # the SD VAE's latent scale
NORM_GROUPS = 32

# Buffers of the original `LatentDiffusion` that describe the noise schedule (all derived from
# `betas`), and its per-timestep log-variance. None of them is a network weight.
SCHEDULE_BUFFERS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
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


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Tensor]:
    """All tensors of a `.safetensors` or PyTorch pickle (`.ckpt`, `.pt`, `.pth`, `.bin`) file.

    Tensors are memory-mapped from the file, not copied. A `{"state_dict": ...}` wrapper (as
    written by training frameworks, beside `global_step`, `epoch`, ...) is unwrapped. Pickles are
    read with `weights_only=True`, which refuses anything but tensors and plain containers; pass
    `trust_pickle=True` only for files from a source you trust, since unpickling can run code.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory; pass a single .safetensors or .ckpt file "
            "(a diffusers folder loads with LDMPipeline.from_diffusers)"
        )
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    kind = _sniff(head, size)
    if kind == "safetensors":
        tensors = _read_safetensors(path)
    elif kind in ("zip", "pickle"):
        obj = _read_pickle(path, legacy=kind == "pickle", trust=trust_pickle)
        tensors = _unwrap_state_dict(obj, path)
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint: {size} bytes starting with {head[:8]!r} match neither a "
            ".safetensors header nor a PyTorch pickle (zip or legacy); it may be truncated, "
            "an HTML error page saved by a failed download, or another format"
        )
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def _sniff(head: bytes, size: int) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"  # protocol marker of a legacy (pre-zip) torch.save
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 0 < header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        # safe_open maps the file: get_tensor returns copy-on-write views of it, not copies.
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({e}); it may be truncated or corrupt: "
            "download or export it again"
        ) from None


def _read_pickle(path: Path, *, legacy: bool, trust: bool) -> object:
    if trust:
        return _read_trusted_pickle(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # old non-zip pickles cannot be memory-mapped; read them into memory
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be corrupt"
            ) from None
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))
        what = f" (it holds an object of type {found.group(1)})" if found else ""
        out = path.with_suffix(".safetensors")
        raise CheckpointError(
            f"{path} is a pickle that holds more than tensors{what}, so it was not opened: "
            "unpickling such a file can run arbitrary code on this machine. Only if you trust "
            "its source, convert it once to a safe .safetensors file:\n"
            f"  {CONVERT_HINT.format(path=path, out=out)}\n"
            "and load the .safetensors file from then on."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated "
            "or corrupt: download or export it again"
        ) from None


class _Placeholder:
    """Stands in for a class a trusted pickle names but this environment lacks (e.g. a PyTorch
    Lightning callback stored beside the weights); it keeps whatever state it is given."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: object) -> None:
        self.state = state


class _LenientUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            log.info("trusted pickle: %s.%s is not importable here; kept as a placeholder", module, name)
            return _Placeholder


class _LenientPickleModule:
    """A `pickle_module` for `torch.load` whose unpickler tolerates missing classes."""

    Unpickler = _LenientUnpickler
    load = pickle.load
    __name__ = "ldm_lenient_pickle"


def _read_trusted_pickle(path: Path) -> object:
    try:
        try:
            return torch.load(
                path, map_location="cpu", weights_only=False, mmap=True, pickle_module=_LenientPickleModule
            )
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_LenientPickleModule)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, pickle.UnpicklingError) as e:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated "
            "or corrupt: download or export it again"
        ) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        extra = [k for k in obj if k != "state_dict"]
        if extra:
            log.info("%s: ignored top-level entries beside state_dict: %s", path, ", ".join(map(str, extra)))
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if not_tensors:
        more = f" (+{len(not_tensors) - 5} more)" if len(not_tensors) > 5 else ""
        raise CheckpointError(
            f"{path}: the state dict holds {len(not_tensors)} entries that are not tensors: "
            f"{', '.join(not_tensors[:5])}{more}"
        )
    return dict(obj)


# ---------------------------------------------------------------------------------------------
# Detecting the architecture
# ---------------------------------------------------------------------------------------------


def _describe_keys(keys: list[str]) -> str:
    prefixes: dict[str, int] = {}
    for k in keys:
        p = k.split(".")[0]
        prefixes[p] = prefixes.get(p, 0) + 1
    top = ", ".join(f"{p}.* ({n})" for p, n in sorted(prefixes.items(), key=lambda x: -x[1])[:5])
    return f"{len(keys)} tensors under {top}"


def _not_sd_hint(keys: list[str]) -> str:
    ks = set(keys)
    if any(k.startswith(("down_blocks.", "conv_in.", "time_embedding.")) for k in ks):
        return (
            "; this looks like a diffusers UNet2DConditionModel state dict: load the whole diffusers "
            "folder (model_index.json, unet/, vae/, text_encoder/) with LDMPipeline.from_diffusers"
        )
    if any(k.startswith(("input_blocks.", "middle_block.", "time_embed.")) for k in ks):
        return (
            "; this looks like a bare U-Net state dict (original layout without the "
            "'model.diffusion_model.' prefix): a single-file checkpoint also holds the VAE "
            "(first_stage_model.*) and text encoder (cond_stage_model.*)"
        )
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in ks):
        return "; this looks like a standalone VAE, not a whole Stable Diffusion checkpoint"
    if any(k.startswith(("text_model.", "transformer.resblocks.")) for k in ks):
        return "; this looks like a standalone text encoder, not a whole Stable Diffusion checkpoint"
    return ""


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers i of keys `prefix + "i." + ...`."""
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _need(sd: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"cannot detect the {what}: the checkpoint has no tensor {key!r}")
    return sd[key]


def _detect_unet(sd: Mapping[str, Tensor], family: str) -> UNetConfig:
    p = PREFIXES["unet"]
    keys = [k for k in sd if k.startswith(p)]
    conv_in = _need(sd, p + "input_blocks.0.0.weight", "U-Net input channels")
    mc, in_ch = conv_in.shape[0], conv_in.shape[1]
    out_ch = _need(sd, p + "out.2.weight", "U-Net output channels").shape[0]

    # input_blocks 1..: per level, ResBlocks (optionally with a SpatialTransformer), then a
    # Downsample (`op`) except at the last level.
    levels: list[dict] = [{"blocks": 0, "ch": None, "attn": False}]
    depth, proj_in, context_dim = None, None, None
    for i in _indices(keys, p + "input_blocks.")[1:]:
        b = f"{p}input_blocks.{i}."
        if b + "0.op.weight" in sd:
            levels.append({"blocks": 0, "ch": None, "attn": False})
            continue
        out = _need(sd, b + "0.out_layers.3.weight", f"U-Net block input_blocks.{i}").shape[0]
        level = levels[-1]
        level["blocks"] += 1
        level["ch"] = out
        if b + "1.norm.weight" in sd:
            level["attn"] = True
            depth = len(_indices(keys, b + "1.transformer_blocks."))
            proj_in = sd[b + "1.proj_in.weight"]
            context_dim = sd[b + "1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    mid = p + "middle_block.1."
    if depth is None:  # no attention outside the middle block
        depth = len(_indices(keys, mid + "transformer_blocks."))
        proj_in = _need(sd, mid + "proj_in.weight", "U-Net middle-block transformer")
        context_dim = _need(sd, mid + "transformer_blocks.0.attn2.to_k.weight", "context dim").shape[1]
    counts = {lv["blocks"] for lv in levels}
    if len(counts) != 1 or any(lv["ch"] is None for lv in levels):
        raise CheckpointError(
            f"U-Net levels hold different numbers of ResBlocks ({[lv['blocks'] for lv in levels]}); "
            "this layout is not supported"
        )
    mults = []
    for lv in levels:
        if lv["ch"] % mc:
            raise CheckpointError(f"U-Net level width {lv['ch']} is not a multiple of model_channels {mc}")
        mults.append(lv["ch"] // mc)
    attention = tuple(sorted((2**i for i, lv in enumerate(levels) if lv["attn"]), reverse=True))
    heads = {"num_heads": SD1_NUM_HEADS, "num_head_channels": None}
    if family == "sd2":
        heads = {"num_heads": None, "num_head_channels": SD2_HEAD_DIM}
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=counts.pop(),
        attention_resolutions=attention,
        transformer_depth=depth,
        context_dim=context_dim,
        use_linear_in_transformer=proj_in.ndim == 2,
        norm_groups=NORM_GROUPS,
        **heads,
    )


def _detect_vae(sd: Mapping[str, Tensor]) -> VAEConfig:
    p = PREFIXES["vae"]
    keys = [k for k in sd if k.startswith(p)]
    conv_in = _need(sd, p + "encoder.conv_in.weight", "VAE")
    ch, in_ch = conv_in.shape[0], conv_in.shape[1]
    levels = _indices(keys, p + "encoder.down.")
    mults, attn = [], []
    for i in levels:
        w = _need(sd, f"{p}encoder.down.{i}.block.0.conv1.weight", f"VAE level {i}").shape[0]
        mults.append(w // ch)
        if f"{p}encoder.down.{i}.attn.0.norm.weight" in sd:
            attn.append(2**i)
    return VAEConfig(
        in_channels=in_ch,
        out_channels=_need(sd, p + "decoder.conv_out.weight", "VAE output channels").shape[0],
        ch=ch,
        ch_mult=tuple(mults),
        num_res_blocks=len(_indices(keys, p + "encoder.down.0.block.")),
        z_channels=_need(sd, p + "encoder.conv_out.weight", "VAE latent channels").shape[0] // 2,
        embed_dim=_need(sd, p + "quant_conv.weight", "VAE embedding channels").shape[0] // 2,
        attn_resolutions=tuple(attn),
        norm_groups=NORM_GROUPS,
        scaling_factor=SD_SCALING_FACTOR,
    )


def _detect_text(sd: Mapping[str, Tensor], family: str) -> TextEncoderConfig:
    keys = list(sd)
    if family == "sd1":
        p = PREFIXES["text_encoder"] + "transformer.text_model."
        tok = _need(sd, p + "embeddings.token_embedding.weight", "text encoder")
        width = tok.shape[1]
        return TextEncoderConfig(
            kind="hf_clip",
            width=width,
            layers=len(_indices(keys, p + "encoder.layers.")),
            heads=max(1, width // CLIP_HEAD_DIM),
            intermediate_size=_need(sd, p + "encoder.layers.0.mlp.fc1.weight", "text MLP").shape[0],
            projection_dim=width,  # CLIPTextModel has no projection; kept equal to the width
            activation="quick_gelu",
            context_length=_need(sd, p + "embeddings.position_embedding.weight", "text context").shape[0],
            vocab_size=tok.shape[0],
            layer="last",
        )
    p = PREFIXES["text_encoder"] + "model."
    tok = _need(sd, p + "token_embedding.weight", "text encoder")
    width = tok.shape[1]
    return TextEncoderConfig(
        kind="open_clip",
        width=width,
        layers=len(_indices(keys, p + "transformer.resblocks.")),
        heads=max(1, width // CLIP_HEAD_DIM),
        intermediate_size=_need(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", "text MLP").shape[0],
        projection_dim=_need(sd, p + "text_projection", "text projection").shape[1],
        activation="gelu",
        context_length=_need(sd, p + "positional_embedding", "text context").shape[0],
        vocab_size=tok.shape[0],
        layer="penultimate",
    )


def _check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"prediction_type must be one of {', '.join(PREDICTION_TYPES)} (got {prediction_type!r}); "
            "SD 2.x 768-v models use 'v', the others 'eps'"
        )


def detect_config(
    state_dict: Mapping[str, Tensor], *, prediction_type: str | None = None
) -> tuple[ModelConfig, str]:
    """The architecture of an original-layout Stable Diffusion state dict, and a report of it.

    Sizes come from tensor shapes; what shapes cannot tell follows the family: SD 1.x (HF CLIP
    text model under `cond_stage_model.transformer.*`) has 8 attention heads per U-Net level, SD
    2.x (OpenCLIP tower under `cond_stage_model.model.*`) heads of 64 channels and the text
    tower's penultimate layer; both use the scaled-linear schedule 0.00085..0.012 over 1000 steps
    and latent scale 0.18215. `prediction_type` ("eps" or "v") cannot be seen in the weights:
    "eps" unless given ("v" for the 768-v SD 2.x models).
    """
    keys = list(state_dict)
    unet_p = PREFIXES["unet"]
    if not any(k.startswith(unet_p) for k in keys):
        raise CheckpointError(
            f"not a Stable Diffusion checkpoint: no {unet_p}* tensors; found {_describe_keys(keys)}"
            + _not_sd_hint(keys)
        )
    text_p = PREFIXES["text_encoder"]
    if any(k.startswith(text_p + "transformer.") for k in keys):
        family = "sd1"
    elif any(k.startswith(text_p + "model.") for k in keys):
        family = "sd2"
    else:
        sdxl = any(k.startswith("conditioner.embedders.") for k in keys)
        hint = (
            "; its conditioner.embedders.* look like SDXL, which this library does not load"
            if sdxl
            else ". Pass the architecture explicitly with config=..."
        )
        raise CheckpointError(
            f"cannot tell the text encoder: no {text_p}transformer.* (SD 1.x, CLIP ViT-L) or "
            f"{text_p}model.* (SD 2.x, OpenCLIP) tensors; found {_describe_keys(keys)}{hint}"
        )
    _check_prediction_type(prediction_type)
    assumed = prediction_type is None
    prediction_type = prediction_type or "eps"
    cfg = ModelConfig(
        unet=_detect_unet(state_dict, family),
        vae=_detect_vae(state_dict),
        text_encoder=_detect_text(state_dict, family),
        diffusion=DiffusionConfig(prediction_type=prediction_type),
    )
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(
            f"the detected architecture is not valid ({e}); it may be a model that does not follow the "
            "SD 1.x / 2.x conventions: pass its config explicitly with config=..."
        ) from None
    return cfg, _report(cfg, family, assumed)


def _report(cfg: ModelConfig, family: str, assumed: bool) -> str:
    u, v, t, d = cfg.unet, cfg.vae, cfg.text_encoder, cfg.diffusion
    name = {
        "sd1": "Stable Diffusion 1.x layout (CLIP text model)",
        "sd2": "Stable Diffusion 2.x layout (OpenCLIP text tower)",
    }[family]
    inpainting = u.in_channels == 2 * v.embed_dim + 1
    kind = "inpainting (latents + masked-image latents + mask)" if inpainting else "text-to-image"
    heads = f"{u.num_heads} heads" if u.num_heads else f"heads of {u.num_head_channels} channels"
    how = "assumed: the weights cannot tell; pass prediction_type='v' for 768-v models" if assumed else "as given"
    pred = f"{d.prediction_type} ({how})"
    return "\n".join(
        [
            f"detected: {name}",
            f"  U-Net: {u.in_channels} input channels, {kind}; model_channels {u.model_channels}, "
            f"channel_mult {list(u.channel_mult)}, {u.num_res_blocks} res blocks per level, attention at "
            f"{list(u.attention_resolutions)}, transformer depth {u.transformer_depth}, context {u.context_dim}, "
            f"{'linear' if u.use_linear_in_transformer else 'conv'} proj, {heads} (family convention)",
            f"  VAE: ch {v.ch}, ch_mult {list(v.ch_mult)}, {v.num_res_blocks} res blocks, z {v.z_channels}, "
            f"scaling factor {v.scaling_factor} (family convention)",
            f"  text: {t.kind}, width {t.width}, {t.layers} layers, {t.heads} heads, MLP {t.intermediate_size}, "
            f"{t.layer} layer",
            f"  diffusion: {d.beta_schedule} {d.beta_start}..{d.beta_end} over {d.num_timesteps} steps (family "
            f"convention), prediction type {pred}",
        ]
    )


# ---------------------------------------------------------------------------------------------
# Building a pipeline from state dicts, without random init or a second copy
# ---------------------------------------------------------------------------------------------


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
                "re-create it after loading; add one to ldm.convert.single_file._materialise_meta"
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


def build_pipeline_from_state(
    config: Config,
    parts: Mapping[str, Mapping[str, Tensor]],
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """An `LDMPipeline` whose networks hold exactly the given tensors.

    `parts` maps "unet", "vae" and "text_encoder" to state dicts with the part prefix stripped.
    The networks are built on the `meta` device (no memory, no random init), every key and shape
    is checked strictly, then each tensor is moved to `device` / cast to `dtype` as it is assigned
    (tensors already on the device in that dtype, e.g. memory-mapped from a file, are used as they
    are: no copy; without `device` they stay where they are). Without `dtype` the weights keep the dtype they have (the most common floating
    dtype of the state, when parts differ).
    """
    from ..models import build_models
    from ..pipeline import LDMPipeline, parse_dtype

    missing = [name for name in PREFIXES if name not in parts]
    if missing:
        raise CheckpointError(f"no state for {', '.join(missing)}; parts must hold unet, vae and text_encoder")
    device = torch.device(device) if device is not None else None  # None: where the tensors are
    target = parse_dtype(dtype) if dtype is not None else _dominant_float_dtype(parts)
    config.validate()
    with torch.device("meta"):
        unet, vae, text_encoder = build_models(config.model)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for name, module in modules.items():
        state = {
            k: t.to(
                device=device or t.device,
                dtype=target if t.is_floating_point() and target is not None else t.dtype,
            )
            for k, t in parts[name].items()
        }
        load_state_strict(_AssignLoader(module), state, f"[{name}]")  # type: ignore[arg-type]
        del state
        params = [p for p in module.parameters() if not p.is_meta]
        _materialise_meta(module, device or (params[0].device if params else torch.device("cpu")), f"[{name}]")
    return LDMPipeline(vae, unet, text_encoder, config.model.diffusion, defaults=config.sample)


# ---------------------------------------------------------------------------------------------
# Loading a single-file checkpoint
# ---------------------------------------------------------------------------------------------


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
    from ..diffusion.schedule import Schedule

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
                f"{path}: its {name} has {theirs.numel()} steps but the schedule built for it "
                f"({ours_desc}) has {ours.numel()}; pass config=... with the right diffusion section"
            )
        tol = 8 * torch.finfo(found[name].dtype).eps if found[name].is_floating_point() else 1e-6
        err = ((theirs - ours).abs() / ours.abs().clamp(min=1e-12)).max().item()
        if not err <= tol:
            raise CheckpointError(
                f"{path}: the file's {name} (first {theirs[0].item():.6g}, last {theirs[-1].item():.6g}) "
                f"does not match the schedule built for it ({ours_desc}: first {ours[0].item():.6g}, "
                f"last {ours[-1].item():.6g}); max relative difference {err:.3g}. The model was trained "
                "with another noise schedule: pass config=... with the right diffusion section"
            )
        checked.append(name)
    return f"file's {' and '.join(checked)} match the schedule" if checked else None


def load_single_file(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    config: str | Path | Config | None = None,
    use_ema: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_pickle: bool = False,
):
    """Load an original Stable Diffusion checkpoint (SD 1.x, 2.x, inpainting) as an `LDMPipeline`.

    Every tensor of the file is accounted for: network weights load strictly; noise-schedule
    buffers are checked against the schedule we build; EMA copies of the U-Net (`model_ema.*`)
    replace its weights with `use_ema=True` and are otherwise left unread; the HF CLIP
    `position_ids` and training-only VAE loss weights (`first_stage_model.loss.*`) are dropped;
    anything else is an error naming it. `config` (a Config or YAML path) replaces detection.
    The detection report is logged and kept as `pipe.load_report`.
    """
    path = Path(path)
    state = read_checkpoint(path, trust_pickle=trust_pickle)
    if config is not None:
        cfg = copy.deepcopy(config) if isinstance(config, Config) else load_config(config)
        if prediction_type is not None:
            _check_prediction_type(prediction_type)
            cfg.model.diffusion.prediction_type = prediction_type
        report = f"config: given ({config if not isinstance(config, Config) else 'Config object'}), not detected"
    else:
        model_cfg, report = detect_config(state, prediction_type=prediction_type)
        size = 768 if model_cfg.diffusion.prediction_type == "v" else 512
        cfg = Config(model=model_cfg, sample=SampleConfig(height=size, width=size))
    lines = [f"{path.name}: {len(state)} tensors", report]

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

    checked = _check_schedule(s.schedule, cfg.model.diffusion, path)
    if checked:
        lines.append(f"  {checked}")
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
    try:
        pipe = build_pipeline_from_state(cfg, parts, device=device, dtype=dtype)
    except CheckpointError as e:
        raise CheckpointError(f"{path} {e}") from None
    lines.append(f"  loaded as {pipe.dtype} on {pipe.device}")
    pipe.load_report = "\n".join(lines)
    log.info("%s", pipe.load_report)
    return pipe


__all__ = [
    "read_checkpoint",
    "detect_config",
    "load_single_file",
    "build_pipeline_from_state",
    "ema_key",
]
