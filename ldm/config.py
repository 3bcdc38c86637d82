"""Typed configs: the dataclasses of a config file (model, sampling defaults, data, training) and `load_config`.

A config file is data only. It may name a `base:` file (relative to itself) whose values it
overrides key by key; mappings merge recursively, everything else replaces. Unknown keys are
errors that suggest the nearest valid key, so a typo never silently falls back to a default.
The generic machinery (YAML, overrides, dataclasses from plain data) is `ldm.config_io`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config_io import apply_overrides, from_dict, load_yaml, resolve_config, to_dict  # noqa: F401 (to_dict: re-exported)
from .config_upscaler import RESAMPLE_MODES, DegradeConfig, LowResConfig  # noqa: F401 (re-exported)
from .config_train import (  # noqa: F401 (re-exported: the training sections live there)
    COMPILE_MODES,
    CROPS,
    DATA_SOURCES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    OPTIMIZERS,
    DataConfig,
    LoRATrainConfig,
    TrainConfig,
    VAELossConfig,
    multiple_hint,
)
from .errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Model configs
# ---------------------------------------------------------------------------------------------

PREDICTION_TYPES = ("eps", "v", "x0")
SD_SCALING_FACTOR = 0.18215  # the latent scale of the Stable Diffusion 1.x / 2.x VAE (about 1 / std of its latents)
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
TEXT_ENCODER_KINDS = ("hf_clip", "open_clip")
TEXT_LAYERS = ("last", "penultimate")
# torch.compile modes; "reduce-overhead" and "max-autotune" also capture CUDA graphs.


@dataclass
class UNetConfig:
    """The Stable Diffusion U-Net (`openaimodel.UNetModel` layout), any size."""

    in_channels: int = 4  # 9 for inpainting U-Nets (latents + masked-image latents + mask)
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Downsampling factors (1 = full latent resolution) whose levels carry a SpatialTransformer.
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    # Heads by count (SD 1.x: 8) or by head dim (SD 2.x: 64); set exactly one, the other None.
    num_heads: int | None = 8
    num_head_channels: int | None = None
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False  # SD 2.x: linear proj_in/proj_out; SD 1.x: 1x1 conv
    norm_groups: int = 32
    dropout: float = 0.0
    gradient_checkpointing: bool = False
    # Class conditioning (`label_emb`, an embedding added to the timestep embedding): the number of
    # labels, or None. The SD x4 upscaler has 1000, one per noise level of its low-resolution input.
    num_classes: int | None = None
    # One flag per level: True turns the first attention of that level's transformers into a second
    # attention to the text (the original `disable_self_attentions`; the x4 upscaler drops
    # self-attention at its three high-resolution levels). Empty: self-attention everywhere.
    disable_self_attentions: tuple[bool, ...] = ()
    # > 0: every SpatialTransformer adds a learned projection of this many Fourier frequencies of
    # each pixel's (y, x) to its tokens (ldm.models.attention.FourierPositions), so that words like
    # "top left" can reach the right pixels. 0: none, the original SD layout (its checkpoints need 0).
    position_embedding_freqs: int = 0
    # > 0: a learned linear map from the mean text state to a text_layout_grid x text_layout_grid map
    # of model_channels, resized to the latent and added after the input conv (UNet.layout): a direct
    # path from words like "top left" to places. 0: none, the original SD layout (its checkpoints need 0).
    text_layout_grid: int = 0

    def parts_outside_sd_layout(self) -> list[str]:
        """The optional parts turned on here that neither the original SD U-Net nor diffusers' has,
        each as "key=value (what it adds)"; empty for a U-Net every format can hold."""
        parts = []
        if self.position_embedding_freqs:
            parts.append(f"unet.position_embedding_freqs={self.position_embedding_freqs} "
                         "(a position embedding in its transformers)")
        if self.text_layout_grid:
            parts.append(f"unet.text_layout_grid={self.text_layout_grid} (a text layout map)")
        return parts

    def validate(self) -> None:
        if self.text_layout_grid < 0:
            raise ConfigError(f"unet: text_layout_grid must be >= 0 (got {self.text_layout_grid}); 0 turns it off")
        if self.position_embedding_freqs < 0:
            raise ConfigError(f"unet: position_embedding_freqs must be >= 0 (got {self.position_embedding_freqs}); 0 turns it off")
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"unet.num_classes must be >= 1, or null for no class embedding (got {self.num_classes})")
        if self.disable_self_attentions and len(self.disable_self_attentions) != len(self.channel_mult):
            raise ConfigError(
                f"unet.disable_self_attentions needs one flag per level ({len(self.channel_mult)}, like "
                f"channel_mult) or none (got {list(self.disable_self_attentions)})"
            )
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ConfigError(
                "unet: set exactly one of num_heads (heads by count, SD 1.x uses 8) and "
                f"num_head_channels (heads by dim, SD 2.x uses 64); got num_heads={self.num_heads}, "
                f"num_head_channels={self.num_head_channels}"
            )
        for mult in self.channel_mult:
            ch = self.model_channels * mult
            if ch % self.norm_groups:
                raise ConfigError(
                    f"unet: channels {ch} (model_channels {self.model_channels} x mult {mult}) must be "
                    f"a multiple of norm_groups={self.norm_groups}"
                )
            if self.num_head_channels is not None and ch % self.num_head_channels:
                raise ConfigError(
                    f"unet: channels {ch} must be a multiple of num_head_channels={self.num_head_channels}"
                )
            if self.num_heads is not None and ch % self.num_heads:
                raise ConfigError(f"unet: channels {ch} must be a multiple of num_heads={self.num_heads}")
        levels = [2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in levels]
        if bad:
            raise ConfigError(
                f"unet: attention_resolutions {bad} are not downsampling factors of this U-Net; "
                f"valid factors for {len(self.channel_mult)} levels are {levels}"
            )

    @property
    def downsample_factor(self) -> int:
        """Total downsampling from the latent to the lowest U-Net level."""
        return 2 ** (len(self.channel_mult) - 1)

    def self_attention_disabled(self, level: int) -> bool:
        return bool(self.disable_self_attentions) and self.disable_self_attentions[level]


@dataclass
class VAEConfig:
    """The KL autoencoder (`AutoencoderKL` of the original code)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    attn_resolutions: tuple[int, ...] = ()  # extra attention levels besides the mid block (SD: none)
    norm_groups: int = 32
    dropout: float = 0.0
    scaling_factor: float = SD_SCALING_FACTOR  # latents are multiplied by this before diffusion (1/std)

    def validate(self) -> None:
        for mult in (1, *self.ch_mult):
            if (self.ch * mult) % self.norm_groups:
                raise ConfigError(
                    f"vae: channels {self.ch * mult} must be a multiple of norm_groups={self.norm_groups}"
                )
        if not self.scaling_factor > 0:
            raise ConfigError(f"vae: scaling_factor must be > 0 (got {self.scaling_factor})")

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextEncoderConfig:
    """A CLIP text transformer: HF `CLIPTextModel` (SD 1.x) or an open_clip text tower (SD 2.x)."""

    kind: str = "hf_clip"  # "hf_clip" | "open_clip"
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int | None = None  # MLP hidden size; None means 4 * width
    projection_dim: int = 768  # open_clip text_projection output (unused for conditioning)
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1.x) | "gelu" (OpenCLIP ViT-H, SD 2.x)
    context_length: int = 77
    vocab_size: int = 49408
    layer: str = "last"  # which hidden states condition the U-Net: "last" | "penultimate"
    trainable: bool = False

    def validate(self) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ConfigError(f"text_encoder.kind must be one of {TEXT_ENCODER_KINDS} (got {self.kind!r})")
        if self.layer not in TEXT_LAYERS:
            raise ConfigError(f"text_encoder.layer must be one of {TEXT_LAYERS} (got {self.layer!r})")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ConfigError(
                f"text_encoder.activation must be 'quick_gelu' or 'gelu' (got {self.activation!r})"
            )
        if self.width % self.heads:
            raise ConfigError(f"text_encoder: width {self.width} must be a multiple of heads {self.heads}")
        if self.layer == "penultimate" and self.layers < 2:
            raise ConfigError("text_encoder.layer='penultimate' needs at least 2 layers")

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.width


@dataclass
class DiffusionConfig:
    """Noise schedule and what the U-Net predicts."""

    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000
    prediction_type: str = "eps"  # "eps" | "v" | "x0"
    zero_terminal_snr: bool = False

    def validate(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"diffusion.beta_schedule must be one of {BETA_SCHEDULES} (got {self.beta_schedule!r})"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"diffusion.prediction_type must be one of {PREDICTION_TYPES} (got {self.prediction_type!r})"
            )
        if self.num_timesteps < 2:
            raise ConfigError(f"diffusion.num_timesteps must be >= 2 (got {self.num_timesteps})")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model: stored in every checkpoint's metadata."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    low_res: LowResConfig | None = None  # set for upscalers (e.g. the SD x4 upscaler); None otherwise

    def validate(self) -> None:
        for part in (self.unet, self.vae, self.text_encoder, self.diffusion):
            part.validate()
        if self.unet.context_dim != self.text_encoder.width:
            raise ConfigError(
                f"unet.context_dim ({self.unet.context_dim}) must equal text_encoder.width "
                f"({self.text_encoder.width}): the U-Net cross-attends to the text hidden states"
            )
        latent = self.vae.embed_dim
        if self.low_res is not None:
            if self.low_res.beta_schedule not in BETA_SCHEDULES:
                raise ConfigError(f"low_res.beta_schedule must be one of {BETA_SCHEDULES} "
                                  f"(got {self.low_res.beta_schedule!r})")
            self.low_res.check_unet(self.unet.in_channels, self.unet.num_classes, latent, self.vae.in_channels)
        elif self.unet.in_channels not in (latent, 2 * latent + 1):
            upscaler = self.unet.in_channels == latent + self.vae.in_channels
            raise ConfigError(
                f"unet.in_channels ({self.unet.in_channels}) must be vae.embed_dim ({latent}) or, for an "
                f"inpainting U-Net, 2 * embed_dim + 1 ({2 * latent + 1})"
                + ("; an upscaler (latents + low-resolution image) also needs a model.low_res section" if upscaler else "")
            )
        elif self.unet.num_classes is not None:
            raise ConfigError(
                f"unet.num_classes ({self.unet.num_classes}) conditions the U-Net on a label that only "
                "upscalers receive (their noise level); add a model.low_res section or set unet.num_classes: null"
            )
        if self.unet.out_channels != latent:
            raise ConfigError(
                f"unet.out_channels ({self.unet.out_channels}) must equal vae.embed_dim ({latent})"
            )

    @property
    def is_upscaler(self) -> bool:
        return self.low_res is not None

    @property
    def inpainting(self) -> bool:
        """An inpainting U-Net: it takes the latent mask and the masked image's latents beside the
        noisy latents (in_channels = 2 * vae.embed_dim + 1)."""
        return self.low_res is None and self.unet.in_channels == 2 * self.vae.embed_dim + 1

    @property
    def latent_factor(self) -> int:
        """Image sides must be multiples of this (the VAE's downsampling). The U-Net takes any latent
        size: its upsamplers resize to the matching skip connection, so odd latent sides work."""
        return self.vae.downsample_factor


@dataclass
class SampleConfig:
    """Defaults for generation; every one can be overridden per call."""

    steps: int = 30
    cfg: float = 7.5
    sampler: str = "dpmpp_2m_karras"
    height: int = 512
    width: int = 512
    negative_prompt: str = ""


@dataclass
class Config:
    """A whole config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vae_loss: VAELossConfig = field(default_factory=VAELossConfig)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.data.check_factor(self.model.vae.downsample_factor)
        self.train.validate()
        self.vae_loss.validate()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_config(path_or_data: str | Path | dict, overrides: Sequence[str] = ()) -> Config:
    """Load and validate a config from a YAML path, the name of a shipped config ("sd15", "sd_tiny"),
    or an already-parsed dict."""
    if isinstance(path_or_data, (str, Path)):
        data = load_yaml(resolve_config(path_or_data))
    else:
        data = dict(path_or_data)
    data = apply_overrides(data, overrides)
    cfg = from_dict(Config, data)
    cfg.validate()
    return cfg
