"""Typed training configs: the `data`, `train` and `vae_loss` sections of a config file, with their
checks (`ldm.config` assembles them into `Config` and re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_upscaler import DegradeConfig
from .errors import ConfigError

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")

DATA_SOURCES = ("shapes", "folder", "shards", "latents")
CROPS = ("center", "random")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
MIXED_PRECISION = ("no", "bf16", "fp16", "auto")


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
    # "seen": training never shows the attribute pairs of ldm.data.shapes.HELDOUT_PAIRS, so that
    # ldm-eval's "unseen" captions test composition; "all": every combination.
    shapes_combinations: str = "all"
    # > 1: scenes rendered shapes_scale times larger, each image a random resolution-sized window of
    # one, with an empty caption (for stage 1 and upscalers: objects as large as an upscale makes them)
    shapes_scale: int = 1
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
        if self.shapes_combinations not in ("all", "seen"):
            raise ConfigError(f"data.shapes_combinations must be 'all' or 'seen' (got {self.shapes_combinations!r})")
        if self.shapes_scale < 1:
            raise ConfigError(f"data.shapes_scale must be >= 1, 1 for whole scenes (got {self.shapes_scale})")
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
class LoRATrainConfig:
    """`train.lora`: train LoRA adapters on a frozen base model (`train.init_from`) instead of the
    model itself, and export them as a kohya-layout LoRA file (ldm/train/lora_trainer.py). rank 0: off."""

    rank: int = 0  # the adapters' rank; 4-32 is typical
    alpha: float | None = None  # the update is scaled by alpha / rank; None: alpha = rank (scale 1)
    # U-Net layers to adapt: "transformer" (attention blocks: projections, attention, feed-forward;
    # kohya's default), "attention" (to_q, to_k, to_v, to_out), "resnet" (LoCon: convolutions of the
    # residual blocks and resamplers), "all", or a regular expression searched in diffusers-style
    # names (e.g. attn2\.to_[kv] for the cross-attention keys and values).
    targets: tuple[str, ...] = ("transformer",)
    text_encoder: bool = False  # also adapt the text encoder's attention and MLP layers (at train.text_encoder_lr)
    output_dir: str = ""  # where the run and its LoRA file go; empty: <train.output_dir>/lora

    def validate(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"train.lora.rank must be an integer >= 1, or 0 for no LoRA (got {self.rank!r})")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"train.lora.alpha must be > 0, or null for alpha = rank (got {self.alpha})")
        if self.rank and not self.targets:
            raise ConfigError("train.lora.targets is empty; name at least one group (transformer, attention, "
                              "resnet, all) or pattern")


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
    # "adamw" (fused into one kernel where possible) or "adamw8bit": bitsandbytes' 8-bit AdamW, whose
    # two moments take 2 bytes per trained parameter instead of 8 (CUDA and `pip install bitsandbytes`;
    # elsewhere the run says so and uses "adamw").
    optimizer: str = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # "cosine" (to 0 at `steps`) | "constant" (after warm-up)
    max_grad_norm: float = 1.0  # 0 disables clipping
    # "no" | "bf16" | "fp16" | "auto": bf16 where the device computes it natively (a CUDA GPU with
    # bfloat16, a CPU with AVX512-BF16 or AMX), else "no". (`bool`: YAML reads a bare `no` as false.)
    mixed_precision: str | bool = "no"
    ema_decay: float = 0.999  # 0 disables EMA
    seed: int = 0
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (5 is typical)
    # The x0 loss weight is max(min(SNR, gamma), floor): > 0 keeps the high-noise steps, where the layout
    # is decided from the text, from weighing ~0 (ldm.diffusion.min_snr_weight). v and x0 prediction only.
    min_snr_floor: float = 0.0
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
    # Fine-tuning: the model the run starts from, in any format (our file, an original SD .safetensors
    # or .ckpt, a diffusers folder); its architecture, VAE and latent scale are used (docs/training.md,
    # "Fine-tuning Stable Diffusion"). The VAE trainer: a VAE (any format, or a model's) to fine-tune.
    init_from: str = ""
    # LDM training: the VAE (a stage-1 file, any SD VAE file or folder); trained first from `vae_config`
    # if missing. With init_from: empty uses that model's VAE; a file replaces it (same latents).
    vae_checkpoint: str = ""
    vae_config: str = ""
    log_with: str = "tensorboard"  # "tensorboard" | "wandb" | "none"
    channels_last: bool = False  # LDM training: U-Net weights and activations in torch.channels_last (faster on GPUs)
    compile: str | None = None  # LDM training: torch.compile mode for the U-Net (one of COMPILE_MODES); None: eager
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)  # LDM training: LoRA adapters instead

    def __post_init__(self) -> None:
        if self.mixed_precision is False:  # `train.mixed_precision=no`, read by YAML as a boolean
            self.mixed_precision = "no"

    def validate(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(
                f"train.compile must be one of {', '.join(COMPILE_MODES)} or null for eager (got {self.compile!r})"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"train.lr_schedule must be one of {LR_SCHEDULES} (got {self.lr_schedule!r})")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"train.mixed_precision must be one of {MIXED_PRECISION} (got {self.mixed_precision!r})")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_states"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        if self.save_every < 1:
            raise ConfigError(f"train.save_every must be >= 1 (got {self.save_every}): training states are what "
                              f"--resume continues from; to save rarely, set it to train.steps ({self.steps})")
        if self.sample_every < 0:
            raise ConfigError(f"train.sample_every must be >= 0, 0 for no sample grids (got {self.sample_every})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.text_encoder_lr is not None and not self.text_encoder_lr > 0:
            raise ConfigError(
                f"train.text_encoder_lr must be > 0, or null to use train.lr (got {self.text_encoder_lr})"
            )
        if self.min_snr_floor and self.min_snr_gamma is None:
            raise ConfigError(f"train.min_snr_floor={self.min_snr_floor} needs train.min_snr_gamma (e.g. 5): "
                              f"the floor bounds the Min-SNR weights from below")
        if self.min_snr_gamma is not None and not 0 <= self.min_snr_floor <= self.min_snr_gamma:
            raise ConfigError(f"train.min_snr_floor must be in [0, min_snr_gamma={self.min_snr_gamma}] "
                              f"(got {self.min_snr_floor}); 0 is plain Min-SNR")
        if not self.timestep_shift > 0:
            raise ConfigError(f"train.timestep_shift must be > 0, 1 for uniform timesteps (got {self.timestep_shift})")
        if self.log_with not in ("tensorboard", "wandb", "none"):
            raise ConfigError(f"train.log_with must be tensorboard, wandb or none (got {self.log_with!r})")
        self.lora.validate()


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
