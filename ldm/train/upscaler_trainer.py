"""Stage 2 for an upscaler model (`model.low_res` set): train the U-Net to redraw each training image
from its own low-resolution version.

The run is `LDMTrainer`'s (models, optimizer, EMA, resume, export), on any image source the data
entry point reads (shapes, a folder, shards); only the step differs. Each image is encoded to
latents, its low-resolution input is made from its pixels on the fly (`data.degrade`: the
downscale by the VAE factor, optional blur and JPEG), captions are dropped out (`data.caption_dropout`)
so that the empty prompt works, and `upscaler_loss` noises both and regresses the prediction. The
held-out loss sees the bicubic downscales at the default noise level; the export also measures
PSNR and sharpness against bicubic on the held-out images (`ldm.eval.superres`), and the sample
grids show low-res / bicubic / the model / the truth.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.degrade import make_low_res
from ..diffusion import low_res_schedule, upscaler_loss
from ..eval.superres import comparison_grid, superres_scores, upscale_comparison
from .ldm_trainer import LDMTrainer
from .loop import caption_keep_mask, step_generator

SAMPLE_IMAGES = 4  # held-out images in each sample grid
SCORED_IMAGES = 64  # held-out images the export scores against bicubic (at most data.heldout_size)


class UpscalerTrainer(LDMTrainer):
    """One upscaler run: an `LDMTrainer` whose step trains on (image, its low-resolution input) pairs."""

    NAME = "upscaler"

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 resume_with_changes: bool = False):
        if cfg.model.low_res is None:
            raise ValueError("UpscalerTrainer trains upscalers: the config needs a model.low_res section "
                             "(see configs/sr_tiny.yaml); text-to-image models train with LDMTrainer")
        if cfg.data.source == "latents":
            raise ValueError("an upscaler trains on images, since its low-resolution inputs are made from their pixels: "
                             "cached latents (data.source=latents) cannot train it; use data.source=shapes, folder "
                             "or shards")
        super().__init__(cfg, resume=resume, overwrite=overwrite, resume_with_changes=resume_with_changes)
        self.low_res_schedule = low_res_schedule(cfg.model.low_res)

    def loss(self, batch: dict, step: int, micro: int) -> torch.Tensor:
        """Denoising loss of one micro-batch; all randomness from the (seed, step, rank) generator, drawn
        in this order: the latent posterior sample, the degradation, caption dropout, then `upscaler_loss`'s."""
        cfg, acc = self.cfg, self.accelerator
        g = step_generator(cfg.train.seed, step, acc.process_index, stream=micro)
        images = batch["image"].to(acc.device)  # (B, 3, H, W) in [-1, 1]
        with torch.no_grad():
            posterior = self.vae.encode(images)
            eps = torch.randn(posterior.mean.shape, generator=g).to(acc.device)
            z = (posterior.mean + posterior.std * eps) * self.vae.scaling_factor  # (B, C, H/f, W/f)
        low = make_low_res(images, self.vae.downsample_factor, cfg.data.degrade, g)  # (B, 3, H/f, W/f)
        keep = caption_keep_mask(len(images), cfg.data.caption_dropout, g)
        captions = [c if k else "" for c, k in zip(batch["caption"], keep.tolist())]
        with torch.set_grad_enabled(self.train_text):
            context = self.text_encoder(captions)
        t, low_res = cfg.train, cfg.model.low_res
        return upscaler_loss(
            self.unet, z, low, context, schedule=self.schedule, low_res_schedule=self.low_res_schedule,
            max_noise_level=low_res.max_noise_level, prediction_type=cfg.model.diffusion.prediction_type,
            generator=g, timestep_shift=t.timestep_shift, offset_noise=t.offset_noise, min_snr_gamma=t.min_snr_gamma,
            min_snr_floor=t.min_snr_floor,
        )

    def comparison(self, n: int) -> dict[str, torch.Tensor]:
        """The first `n` held-out images upscaled by bicubic and by the EMA model (empty prompt, seed 0)."""
        images = torch.stack([item["image"] for item in self.heldout()[:n]])
        with torch.random.fork_rng(devices=[]):  # building the copy draws initial weights
            pipe = self.inference_pipeline()
        return upscale_comparison(pipe, images, steps=self.cfg.train.sample_steps, seed=0)

    def sample_grid(self) -> Path | None:
        """Held-out images as rows of low-res input / bicubic / the model / the truth."""
        if not self.accelerator.is_main_process:
            return None
        path = self.out / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        comparison_grid(self.comparison(SAMPLE_IMAGES), SAMPLE_IMAGES).save(path)
        self.unet.train()
        return path

    def export(self) -> Path:
        """The model file (as `LDMTrainer.export`), then PSNR and sharpness against bicubic on up to
        SCORED_IMAGES held-out images, into metrics.json and the log."""
        path = super().export()
        acc = self.accelerator
        if acc.is_main_process:
            scores = superres_scores(self.comparison(SCORED_IMAGES))
            self._write_metrics(**{f"heldout_{k}": v for k, v in scores.items()})
            acc.print(f"held-out 4x upscaling of {scores['n']} images, PSNR: bicubic {scores['psnr_bicubic']:.2f} dB, "
                      f"model {scores['psnr_model']:.2f} dB; high-frequency energy / truth's: bicubic "
                      f"{scores['hf_ratio_bicubic']:.2f}, model {scores['hf_ratio_model']:.2f}")
        acc.wait_for_everyone()
        return path
