"""The architecture of an original Stable Diffusion state dict, read from its tensor shapes.

Sizes come from shapes (SD 1.x, SD 2.x, inpainting, the x4 upscaler, and smaller models saved in the
same layout); what shapes cannot tell (head counts, noise schedule, latent scale) follows the family
conventions (the x4 upscaler's are in `upscaler.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from ...checkpoint import PREFIXES
from ...config import (
    PREDICTION_TYPES,
    SD_SCALING_FACTOR,
    DiffusionConfig,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from ...errors import CheckpointError, ConfigError
from . import upscaler

# Family conventions for what tensors cannot tell.
SD1_NUM_HEADS = 8  # SD 1.x U-Net: 8 heads at every level
SD2_HEAD_DIM = 64  # SD 2.x U-Net: heads of 64 channels
CLIP_HEAD_DIM = 64  # CLIP ViT-L/14 (12 x 64) and OpenCLIP ViT-H/14 (16 x 64) text towers
NORM_GROUPS = 32


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
        return ("; this looks like a standalone VAE, not a whole Stable Diffusion checkpoint: give it beside "
                "a model (--vae FILE; LDMPipeline.load(model, vae=FILE))")
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
    levels: list[dict] = [{"blocks": 0, "ch": None, "attn": False, "attn1_in": None}]
    depth, proj_in, context_dim = None, None, None
    for i in _indices(keys, p + "input_blocks.")[1:]:
        b = f"{p}input_blocks.{i}."
        if b + "0.op.weight" in sd:
            levels.append({"blocks": 0, "ch": None, "attn": False, "attn1_in": None})
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
            level["attn1_in"] = sd[b + "1.transformer_blocks.0.attn1.to_k.weight"].shape[1]
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
    # A first attention whose keys come from the context, not the level's features, is the
    # original's disable_self_attentions (the x4 upscaler). Where the level is as wide as the
    # context the shapes cannot tell, and self-attention (the common layout) is assumed.
    disabled = tuple(lv["attn1_in"] is not None and lv["attn1_in"] != lv["ch"] for lv in levels)
    label_emb = sd.get(p + "label_emb.weight")
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
        num_classes=None if label_emb is None else label_emb.shape[0],
        disable_self_attentions=disabled if any(disabled) else (),
        **heads,
    )


def detect_vae_config(sd: Mapping[str, Tensor], prefix: str = PREFIXES["vae"]) -> VAEConfig:
    """The VAE of an original-layout state dict, its keys under `prefix` ("" for a standalone VAE file)."""
    p = prefix
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


@dataclass(frozen=True)
class _TextLayout:
    """Where a family's text tower keeps what detection reads (under `cond_stage_model.`)."""

    kind: str
    root: str
    tokens: str
    blocks: str
    mlp: str
    positions: str
    activation: str
    layer: str


_TEXT_LAYOUTS = {
    "sd1": _TextLayout("hf_clip", "transformer.text_model.", "embeddings.token_embedding.weight", "encoder.layers.",
                       "encoder.layers.0.mlp.fc1.weight", "embeddings.position_embedding.weight", "quick_gelu", "last"),
    "sd2": _TextLayout("open_clip", "model.", "token_embedding.weight", "transformer.resblocks.",
                       "transformer.resblocks.0.mlp.c_fc.weight", "positional_embedding", "gelu", "penultimate"),
}


def _detect_text(sd: Mapping[str, Tensor], family: str) -> TextEncoderConfig:
    t = _TEXT_LAYOUTS[family]
    p = PREFIXES["text_encoder"] + t.root
    tok = _need(sd, p + t.tokens, "text encoder")
    width = tok.shape[1]
    return TextEncoderConfig(
        kind=t.kind,
        width=width,
        layers=len(_indices(list(sd), p + t.blocks)),
        heads=max(1, width // CLIP_HEAD_DIM),
        intermediate_size=_need(sd, p + t.mlp, "text MLP").shape[0],
        # CLIPTextModel (SD 1.x) has no projection: kept equal to the width
        projection_dim=width if family == "sd1" else _need(sd, p + "text_projection", "text projection").shape[1],
        activation=t.activation,
        context_length=_need(sd, p + t.positions, "text context").shape[0],
        vocab_size=tok.shape[0],
        layer=t.layer,
    )


def check_prediction_type(prediction_type: str | None) -> None:
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
            else ". Pass the architecture explicitly with config=... (the tools: --config beside --ckpt)"
        )
        raise CheckpointError(
            f"cannot tell the text encoder: no {text_p}transformer.* (SD 1.x, CLIP ViT-L) or "
            f"{text_p}model.* (SD 2.x, OpenCLIP) tensors; found {_describe_keys(keys)}{hint}"
        )
    check_prediction_type(prediction_type)
    assumed = prediction_type is None
    cfg = ModelConfig(
        unet=_detect_unet(state_dict, family),
        vae=detect_vae_config(state_dict),
        text_encoder=_detect_text(state_dict, family),
        diffusion=DiffusionConfig(prediction_type=prediction_type or "eps"),
    )
    if upscaler.is_upscaler_state(state_dict):  # the SD x4 upscaler: its own conventions (v prediction)
        cfg, family = upscaler.x4_conventions(cfg, prediction_type), "x4"
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(
            f"the detected architecture is not valid ({e}); it may be a model that does not follow the "
            "SD 1.x / 2.x conventions: pass its config explicitly with config=... (the tools: --config beside --ckpt)"
        ) from None
    return cfg, _report(cfg, family, assumed)


def _report(cfg: ModelConfig, family: str, assumed: bool) -> str:
    u, v, t, d = cfg.unet, cfg.vae, cfg.text_encoder, cfg.diffusion
    name = {
        "sd1": "Stable Diffusion 1.x layout (CLIP text model)",
        "sd2": "Stable Diffusion 2.x layout (OpenCLIP text tower)",
        "x4": "Stable Diffusion x4 upscaler layout (OpenCLIP text tower)",
    }[family]
    kind = "inpainting (latents + masked-image latents + mask)" if cfg.inpainting else "text-to-image"
    if cfg.low_res is not None:
        kind = "upscaler (latents + noise-augmented low-resolution image)"
    heads = f"{u.num_heads} heads" if u.num_heads else f"heads of {u.num_head_channels} channels"
    how = "assumed: the weights cannot tell; pass prediction_type='v' for 768-v models" if assumed else "as given"
    if assumed and cfg.low_res is not None:
        how = "family convention"
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
            *(upscaler.describe_upscaler(cfg) if cfg.low_res is not None else []),
        ]
    )
