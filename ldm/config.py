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
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


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

    def validate(self) -> None:
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


DATA_SOURCES = ("shapes", "folder", "shards", "latents")
CROPS = ("center", "random")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("no", "bf16", "fp16")


def multiple_hint(value: int, factor: int) -> str:
    """"try 28 or 32": the nearest multiples of `factor` around `value` (positive ones only)."""
    lo, hi = value - value % factor, value - value % factor + factor
    return f"try {lo} or {hi}" if lo > 0 else f"try {hi}"


@dataclass
class DataConfig:
    """Where training images come from, for both stages. `shapes` (the built-in rendered dataset)
    needs no files; `folder` reads images with captions directly; `shards` reads webdataset shards."""

    source: str = "shapes"  # "shapes" | "folder" | "shards" (image+caption webdataset) | "latents" (cached latents)
    # folder: a folder of images with sidecar .txt captions, or a .jsonl/.csv/.tsv caption table;
    # shards/latents: a directory, a file, a brace pattern, an index .json or a `pipe:` command
    urls: str = ""
    resolution: int = 64
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so the model learns p(x) for CFG
    shapes_max_objects: int = 1
    shuffle_buffer: int = 1000
    num_workers: int = 2
    epoch_length: int = 1000  # folder/shards/latents: batches per rank per pass (equal on every rank)
    crop: str = "center"  # "center" | "random": which square (or bucket) of a resized image trains
    # Aspect-ratio buckets: each image trains at the (width, height) nearest its aspect ratio, from
    # sizes of about resolution^2 pixels with sides multiples of bucket_step, ratios up to
    # max_aspect_ratio; a batch holds one size. Off: every image is a resolution x resolution crop.
    buckets: bool = False
    bucket_step: int = 64
    max_aspect_ratio: float = 2.0
    # Images with a shorter side below min_size are skipped (counted "too_small"); smaller than the
    # training size but not below it, upscaled (counted "upscaled"). None: resolution // 2; 0: keep all.
    min_size: int | None = None
    allow_empty_captions: bool = False  # folder: train images without a caption with "" instead of skipping them
    image_column: str = "image"  # folder with a caption table: the image path column
    caption_column: str = "caption"  # ... and the caption column
    heldout_size: int = 256  # held-out images evaluated (stage-1 PSNR and scaling factor, stage-2 loss)
    # folder/shards/latents: the share of samples held out of training (chosen by a hash of the
    # sample key, so the same on every run, rank and stage), unless heldout_urls names other data.
    heldout_fraction: float = 0.02
    heldout_urls: str = ""
    degrade: DegradeConfig = field(default_factory=DegradeConfig)  # upscaler training: how low-res inputs are made

    def validate(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source must be one of {DATA_SOURCES} (got {self.source!r})")
        if self.source != "shapes" and not self.urls:
            what = "a folder of images or a caption table" if self.source == "folder" else "a shard directory, file or pattern"
            raise ConfigError(f"data.source={self.source!r} needs data.urls ({what})")
        if self.crop not in CROPS:
            raise ConfigError(f"data.crop must be one of {CROPS} (got {self.crop!r})")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError(f"data.caption_dropout must be in [0, 1) (got {self.caption_dropout})")
        if self.resolution < 8:
            raise ConfigError(f"data.resolution must be >= 8 (got {self.resolution})")
        if self.min_size is not None and self.min_size < 0:
            raise ConfigError(f"data.min_size must be >= 0, or null for half the resolution (got {self.min_size})")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"data.heldout_fraction must be in [0, 1) (got {self.heldout_fraction})")
        if self.buckets:
            if self.bucket_step < 1 or self.resolution % self.bucket_step:
                raise ConfigError(f"data.resolution {self.resolution} must be a multiple of data.bucket_step "
                                  f"{self.bucket_step}; {multiple_hint(self.resolution, self.bucket_step)}")
            if not self.max_aspect_ratio >= 1:
                raise ConfigError(f"data.max_aspect_ratio must be >= 1 (got {self.max_aspect_ratio})")

        self.degrade.validate()

    def check_factor(self, factor: int) -> None:
        """Training sizes must be multiples of the VAE's downsampling `factor`."""
        if self.resolution % factor:
            raise ConfigError(f"data.resolution {self.resolution} is not a multiple of the VAE's downsampling "
                              f"factor {factor}; {multiple_hint(self.resolution, factor)}")
        if self.buckets and self.bucket_step % factor:
            raise ConfigError(f"data.bucket_step {self.bucket_step} is not a multiple of the VAE's downsampling "
                              f"factor {factor}; {multiple_hint(self.bucket_step, factor)}")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping, shared by the VAE (stage 1) and LDM (stage 2) trainers."""

    output_dir: str = "runs/model"
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # per device, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    # Learning rate of a trainable text encoder (model.text_encoder.trainable); None: `lr`. A text
    # encoder trained from scratch at a small U-Net's high rate can collapse (every caption encoded
    # alike, the prompt ignored); see docs/training.md, "The tiny run".
    text_encoder_lr: float | None = None
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # "cosine" (to 0 at `steps`) | "constant" (after warm-up)
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    ema_decay: float = 0.999  # 0 disables EMA
    seed: int = 0
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (5 is typical)
    offset_noise: float = 0.0  # std of per-channel offset noise (0.05-0.1 helps very dark/bright images)
    timestep_shift: float = 1.0  # > 1 draws more training timesteps at high noise (ldm.diffusion.sample_timesteps)
    max_bad_steps: int = 20  # stop after this many consecutive non-finite losses
    log_every: int = 10
    sample_every: int = 500  # 0 disables sample grids
    save_every: int = 500  # training-state checkpoints
    keep_states: int = 2
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_cfg: float = 7.5
    init_from: str = ""  # a model file whose U-Net and text encoder weights start the run (fine-tuning)
    vae_checkpoint: str = ""  # LDM training: the stage-1 VAE file; trained first from `vae_config` if missing
    vae_config: str = ""
    log_with: str = "tensorboard"  # "tensorboard" | "wandb" | "none"
    channels_last: bool = False  # LDM training: U-Net weights and activations in torch.channels_last (faster on GPUs)
    compile: str | None = None  # LDM training: torch.compile mode for the U-Net (one of COMPILE_MODES); None: eager

    def validate(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(
                f"train.compile must be one of {', '.join(COMPILE_MODES)} or null for eager (got {self.compile!r})"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES} (got {self.lr_schedule!r})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISION} (got {self.mixed_precision!r})")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_states"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise ConfigError(
                f"train.text_encoder_lr must be > 0, or null to use train.lr (got {self.text_encoder_lr})"
            )
        if not self.timestep_shift > 0:
            raise ConfigError(f"train.timestep_shift must be > 0, 1 for uniform timesteps (got {self.timestep_shift})")
        if self.log_with not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"train.log_with must be tensorboard, wandb or none (got {self.log_with!r})")


@dataclass
class VAELossConfig:
    """Stage-1 losses: L1 (+ L2) + KL + patch-GAN (+ LPIPS when its weights are available locally)."""

    l1_weight: float = 1.0
    # Squared error weighs a pixel by how wrong it is: on images that are mostly flat background it
    # pulls the few object pixels into place far sooner than L1 alone (see configs/vae_tiny.yaml).
    l2_weight: float = 0.0
    # The reconstruction term is a per-pixel mean, so the original code's 1e-6 (on a per-image sum)
    # corresponds to 1e-6 / (3 H W) here; 1e-8 keeps the KL a small regulariser at 32-256 px.
    kl_weight: float = 1e-8
    disc_start: int = 2000  # the discriminator joins after this many steps
    disc_weight: float = 0.5
    disc_lr: float = 1e-4
    disc_layers: int = 3
    disc_channels: int = 64
    lpips_weight: float = 1.0
    lpips_weights: str = ""  # a local file with VGG16 + LPIPS weights; empty: LPIPS off (reported)
    # A fresh run starts the posterior's log-variance near this value (the bias of the log-variance
    # half of `quant_conv`, its weights scaled by 0.1). Null keeps the default init, where the
    # posterior std starts near 1 and its noise drowns small details until the encoder shrinks it.
    init_logvar: float | None = None

    def validate(self) -> None:
        for name in ("l1_weight", "l2_weight", "kl_weight", "disc_weight", "lpips_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"vae_loss.{name} must be >= 0 (got {getattr(self, name)})")
        if self.l1_weight == 0 and self.l2_weight == 0 and not self.lpips_weights:
            raise ConfigError("vae_loss needs a reconstruction term: set l1_weight or l2_weight > 0")


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
