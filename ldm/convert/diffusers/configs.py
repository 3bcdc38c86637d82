"""diffusers configs: ours <-> the `config.json` files of a diffusers folder's unet, vae, text encoder and scheduler.

A diffusers setting our networks cannot honour is an error naming it, never silently dropped.
"""

from __future__ import annotations

from importlib import metadata
from typing import Mapping

from ...config import (
    SD_SCALING_FACTOR,
    Config,
    DiffusionConfig,
    LowResConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)
from ...errors import CheckpointError, ConfigError
from ...models.text import PAD_IDS
from ...models.tokenizer import BOS_ID, EOS_ID
from .keys import exported_text_layers, vae_module_map

PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SCHEDULE_TO_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
LAYER_NORM_EPS = 1e-5  # every LayerNorm of both text encoders
UNET_NORM_EPS = 1e-5  # the U-Net's GroupNorms (its transformers' 1e-6 is fixed on both sides)
UPSCALE_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default when model_index.json has none


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int = 64) -> dict:
    """`UNet2DConditionModel` config. Heads: diffusers' `attention_head_dim` is the head *count*
    (per level when a list): SD 1.x's num_heads=8 gives 8, SD 2.x's 64-channel heads give
    [5, 10, 20, 20]."""
    extra = cfg.parts_outside_sd_layout()
    if extra:
        raise ConfigError(
            f"{'; '.join(extra)}: diffusers' UNet2DConditionModel has no such part, so this U-Net has no diffusers "
            "form; keep it in our .safetensors file (LDMPipeline.save)"
        )
    n = len(cfg.channel_mult)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2**level in cfg.attention_resolutions for level in range(n)]
    heads: int | list[int] = (
        cfg.num_heads if cfg.num_heads is not None else [c // cfg.num_head_channels for c in channels]
    )
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": version_of("diffusers"),
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,  # our timestep embedding is [cos, sin]
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "only_cross_attention": list(cfg.disable_self_attentions) if cfg.disable_self_attentions else False,
        "mid_block_only_cross_attention": False,
        "block_out_channels": channels,
        "layers_per_block": cfg.num_res_blocks,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": UNET_NORM_EPS,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": heads,
        "num_attention_heads": None,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "upcast_attention": False,
        "resnet_time_scale_shift": "default",
        "class_embed_type": None,
        "addition_embed_type": None,
        "num_class_embeds": cfg.num_classes,
        "time_embedding_type": "positional",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
    }


def _require(d: Mapping, where: str, expected: Mapping[str, object]) -> None:
    """Each key of `expected` must be absent (diffusers' default is `expected`'s value) or equal it."""
    for key, value in expected.items():
        got = d.get(key, value)
        ok = got == value or (isinstance(got, (list, tuple)) and all(g == value for g in got))
        if not ok:
            raise ConfigError(f"{where}: {key}={got!r} is not supported by ldm (it needs {value!r})")


def _one(d: Mapping, key: str, where: str, default: object = None) -> object:
    """A value diffusers allows per block: a list must hold one repeated value."""
    value = d.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}: per-block {key}={list(value)} is not supported (ldm uses one value)")
        value = value[0]
    return value


def unet_config_from_diffusers(d: Mapping, where: str = "unet/config.json") -> UNetConfig:
    _require(d, where, {
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
        "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": UNET_NORM_EPS,
        "resnet_time_scale_shift": "default", "class_embed_type": None, "addition_embed_type": None,
        "time_embedding_type": "positional", "conv_in_kernel": 3,
        "conv_out_kernel": 3, "encoder_hid_dim": None, "time_cond_proj_dim": None,
        "dual_cross_attention": False, "attention_type": "default", "time_embedding_dim": None,
        "reverse_transformer_layers_per_block": None,
    })
    channels = list(d["block_out_channels"])
    mc = channels[0]
    if any(c % mc for c in channels):
        raise ConfigError(f"{where}: block_out_channels {channels} must be multiples of the first")
    down = list(d["down_block_types"])
    up = list(d["up_block_types"])
    allowed = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if any(t not in allowed for t in down) or len(up) != len(down):
        raise ConfigError(f"{where}: down_block_types {down} must be CrossAttnDownBlock2D / DownBlock2D")
    attn = [allowed[t] for t in down]
    disabled = _only_cross_attention(d, len(down), where)
    mirrored = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != mirrored:
        raise ConfigError(f"{where}: up_block_types {up} must mirror down_block_types (expected {mirrored})")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    num_heads, head_channels = None, None
    if isinstance(heads, int):
        num_heads = heads
    else:
        heads = list(heads)
        dims = {c // h for c, h in zip(channels, heads)}
        if len(heads) == len(channels) and all(c % h == 0 for c, h in zip(channels, heads)) and len(dims) == 1:
            head_channels = dims.pop()
        elif len(set(heads)) == 1:
            num_heads = heads[0]
        else:
            raise ConfigError(
                f"{where}: attention heads {heads} over channels {channels} are neither one head count "
                "nor one head size"
            )
    cfg = UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in channels),
        num_res_blocks=_one(d, "layers_per_block", where, 2),
        attention_resolutions=tuple(2**level for level, a in reversed(list(enumerate(attn))) if a),
        num_heads=num_heads,
        num_head_channels=head_channels,
        transformer_depth=_one(d, "transformer_layers_per_block", where, 1),
        context_dim=_one(d, "cross_attention_dim", where, 1280),
        use_linear_in_transformer=bool(d.get("use_linear_projection", False)),
        norm_groups=d.get("norm_num_groups", 32),
        dropout=float(d.get("dropout", 0.0)),
        num_classes=d.get("num_class_embeds"),
        disable_self_attentions=disabled,
    )
    cfg.validate()
    return cfg


def _only_cross_attention(d: Mapping, levels: int, where: str) -> tuple[bool, ...]:
    """diffusers' `only_cross_attention` (a bool, or one per down block) as our per-level
    disable_self_attentions; the middle block keeps self-attention in our U-Net."""
    flags = d.get("only_cross_attention", False)
    mid = d.get("mid_block_only_cross_attention")
    if mid is None:
        mid = flags if isinstance(flags, bool) else False  # diffusers' own default
    if mid:
        raise ConfigError(f"{where}: mid_block_only_cross_attention=True is not supported (ldm's middle block "
                          "always has self-attention)")
    flags = [flags] * levels if isinstance(flags, bool) else list(flags)
    if len(flags) != levels:
        raise ConfigError(f"{where}: only_cross_attention {flags} needs one flag per down block ({levels})")
    return tuple(bool(f) for f in flags) if any(flags) else ()


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int = 512) -> dict:
    if cfg.embed_dim != cfg.z_channels:
        raise CheckpointError(
            f"vae.embed_dim ({cfg.embed_dim}) != vae.z_channels ({cfg.z_channels}): diffusers' AutoencoderKL "
            "has one latent_channels for both, so this VAE has no diffusers layout"
        )
    vae_module_map(cfg)  # raises for attention outside the mid blocks
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": version_of("diffusers"),
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scaling_factor,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def vae_config_from_diffusers(d: Mapping, where: str = "vae/config.json") -> VAEConfig:
    _require(d, where, {
        "act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
        "latents_mean": None, "latents_std": None, "shift_factor": None,
    })
    channels = list(d.get("block_out_channels", [64]))
    n = len(channels)
    if list(d.get("down_block_types", ["DownEncoderBlock2D"] * n)) != ["DownEncoderBlock2D"] * n or list(
        d.get("up_block_types", ["UpDecoderBlock2D"] * n)
    ) != ["UpDecoderBlock2D"] * n:
        raise ConfigError(f"{where}: only DownEncoderBlock2D / UpDecoderBlock2D blocks are supported")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ConfigError(f"{where}: block_out_channels {channels} must be multiples of the first")
    latent = d.get("latent_channels", 4)
    cfg = VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(c // ch for c in channels),
        num_res_blocks=d.get("layers_per_block", 1),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=float(d.get("scaling_factor", SD_SCALING_FACTOR)),
    )
    cfg.validate()
    return cfg


def text_config_to_diffusers(cfg: TextEncoderConfig) -> dict:
    """A transformers `CLIPTextConfig` (as config.json) for the exported `CLIPTextModel`."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_size,
        "num_hidden_layers": exported_text_layers(cfg),
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length,
        "hidden_act": cfg.activation,
        "layer_norm_eps": LAYER_NORM_EPS,
        "projection_dim": cfg.projection_dim,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_IDS[cfg.kind],
        "transformers_version": version_of("transformers"),
    }


def text_config_from_diffusers(
    d: Mapping, *, kind: str, extra_layers: int, where: str = "text_encoder/config.json"
) -> TextEncoderConfig:
    """`extra_layers`: blocks kept in the extra file (1 for a penultimate-layer encoder, else 0)."""
    _require(d, where, {"layer_norm_eps": LAYER_NORM_EPS})
    width = d.get("hidden_size", 512)
    cfg = TextEncoderConfig(
        kind=kind,
        width=width,
        layers=d.get("num_hidden_layers", 12) + extra_layers,
        heads=d.get("num_attention_heads", 8),
        intermediate_size=d.get("intermediate_size", 2048),
        projection_dim=d.get("projection_dim", 512),
        activation=d.get("hidden_act", "quick_gelu"),
        context_length=d.get("max_position_embeddings", 77),
        vocab_size=d.get("vocab_size", 49408),
        layer="penultimate" if extra_layers else "last",
    )
    cfg.validate()
    return cfg


def _schedule_fields(cls: str, cfg: DiffusionConfig | LowResConfig) -> dict:
    """What every diffusers scheduler config says about the betas."""
    return {
        "_class_name": cls,
        "_diffusers_version": version_of("diffusers"),
        "num_train_timesteps": cfg.num_timesteps,
        "beta_schedule": SCHEDULE_TO_DIFFUSERS[cfg.beta_schedule],
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "trained_betas": None,
    }


def scheduler_config_to_diffusers(cfg: DiffusionConfig) -> dict:
    """A `DDIMScheduler` config holding our schedule (every diffusers scheduler reads these fields)."""
    return {
        **_schedule_fields("DDIMScheduler", cfg),
        "prediction_type": PREDICTION_TO_DIFFUSERS[cfg.prediction_type],
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        # zero-terminal-SNR models must start sampling at the last timestep (Lin et al. 2024, sec. 3.3)
        "timestep_spacing": "trailing" if cfg.zero_terminal_snr else "leading",
        "steps_offset": 0 if cfg.zero_terminal_snr else 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }


def low_res_scheduler_config_to_diffusers(cfg: LowResConfig) -> dict:
    """The `DDPMScheduler` of StableDiffusionUpscalePipeline, which noises the low-resolution image."""
    return {
        **_schedule_fields("DDPMScheduler", cfg),
        "prediction_type": "epsilon",
        "variance_type": "fixed_small",
        "clip_sample": False,
    }


def low_res_config_from_diffusers(d: Mapping, max_noise_level: int, stored: LowResConfig | None,
                                  where: str = "low_res_scheduler/scheduler_config.json") -> LowResConfig:
    """Our low_res section from an upscale folder's low-res scheduler and its `max_noise_level`
    (in model_index.json); the sampling default noise level from our stored config when present."""
    schedule = scheduler_config_from_diffusers({**d, "prediction_type": "epsilon"}, where)
    cfg = LowResConfig(
        beta_schedule=schedule.beta_schedule, beta_start=schedule.beta_start, beta_end=schedule.beta_end,
        num_timesteps=schedule.num_timesteps, max_noise_level=max_noise_level,
    )
    if stored is not None and stored.noise_level <= max_noise_level:
        cfg.noise_level = stored.noise_level
    cfg.validate()
    return cfg


def scheduler_config_from_diffusers(d: Mapping, where: str = "scheduler/scheduler_config.json") -> DiffusionConfig:
    if d.get("trained_betas") is not None:
        raise ConfigError(f"{where}: explicit trained_betas are not supported; use a named beta_schedule")
    schedules = {v: k for k, v in SCHEDULE_TO_DIFFUSERS.items()}
    predictions = {v: k for k, v in PREDICTION_TO_DIFFUSERS.items()}
    schedule = d.get("beta_schedule", "linear")
    prediction = d.get("prediction_type", "epsilon")
    if schedule not in schedules:
        raise ConfigError(f"{where}: beta_schedule {schedule!r} is not supported (use one of {sorted(schedules)})")
    if prediction not in predictions:
        raise ConfigError(
            f"{where}: prediction_type {prediction!r} is not supported (use one of {sorted(predictions)})"
        )
    cfg = DiffusionConfig(
        beta_schedule=schedules[schedule],
        beta_start=float(d.get("beta_start", 0.0001)),
        beta_end=float(d.get("beta_end", 0.02)),
        num_timesteps=d.get("num_train_timesteps", 1000),
        prediction_type=predictions[prediction],
        zero_terminal_snr=bool(d.get("rescale_betas_zero_snr", False)),
    )
    cfg.validate()
    return cfg


def diffusers_configs(config: Config) -> dict[str, dict]:
    """Our whole config -> {"unet": ..., "vae": ..., "text_encoder": ..., "scheduler": ...}."""
    m = config.model
    image = config.sample.height
    configs = {
        "unet": unet_config_to_diffusers(m.unet, image // m.vae.downsample_factor),
        "vae": vae_config_to_diffusers(m.vae, image),
        "text_encoder": text_config_to_diffusers(m.text_encoder),
        "scheduler": scheduler_config_to_diffusers(m.diffusion),
    }
    if m.low_res is not None:  # StableDiffusionUpscalePipeline: + low_res_scheduler
        configs["low_res_scheduler"] = low_res_scheduler_config_to_diffusers(m.low_res)
    return configs
