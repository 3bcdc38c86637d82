"""Stage-1 objective: L1 (+ L2) reconstruction + KL + a patch discriminator, with LPIPS when its weights exist.

Generator (the autoencoder) loss of one batch:

    rec   = l1_weight * mean |x - x_hat| + l2_weight * mean (x - x_hat)^2
            (+ lpips_weight * mean LPIPS(x, x_hat))                            per-pixel means
    kl    = mean over the batch of KL(q(z|x) || N(0, I)) summed over the latent
    adv   = -mean D(x_hat)                                                     (from disc_start on)
    loss  = rec + kl_weight * kl + disc_weight * lambda * adv

where lambda is the adaptive weight of Esser et al. 2021 (eq. 7): the ratio of the gradient norms
of `rec` and `adv` with respect to the decoder's last layer, clamped to [0, 1e4] and detached.
The discriminator is trained with the hinge loss. Before `disc_start` it is neither evaluated nor
updated.

Normalisation differs from the original code, which sums the reconstruction over pixels: here it
is a per-pixel mean, so the learning rate and gradient clipping do not depend on the image size.
An original `kl_weight` w therefore corresponds to w / (3 * H * W) here.

LPIPS (Zhang et al. 2018) is a VGG16 feature distance with learned per-channel weights. Nothing is
downloaded: the weights come only from the local file named by `vae_loss.lpips_weights`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAELossConfig
from ..errors import CheckpointError
from ..models.vae import DiagonalGaussian

ADAPTIVE_WEIGHT_MAX = 1e4

# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def l1_loss(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every pixel and channel."""
    return (images.float() - recon.float()).abs().mean()


def l2_loss(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every pixel and channel."""
    return (images.float() - recon.float()).pow(2).mean()


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """Mean over the batch of the per-sample KL(q || N(0, I)) summed over C, H, W."""
    return posterior.kl().float().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss: -mean D(x_hat)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||grad rec|| / (||grad adv|| + 1e-4) w.r.t. `last_layer`, clamped to [0, 1e4] and detached
    (Esser et al. 2021, eq. 7). Both losses must still have their graphs."""
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    adv_grad, = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (adv_grad.float().norm() + 1e-4)
    # fp16 gradients can overflow: a non-finite ratio turns the adversarial term off for this step.
    weight = torch.nan_to_num(weight, nan=0.0, posinf=0.0)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


# ---------------------------------------------------------------------------------------------
# Patch discriminator
# ---------------------------------------------------------------------------------------------


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class PatchDiscriminator(nn.Module):
    """Image (B, C, H, W) -> logit map (B, 1, h, w), one logit per overlapping patch.

    `layers` stride-2 4x4 convs (channels doubling up to 8x) then a stride-1 conv and a 1-channel
    stride-1 conv, as in the pix2pix PatchGAN. GroupNorm instead of BatchNorm: no running statistics
    to synchronise across processes, and real and fake batches do not leak into each other's
    normalisation. Image sides must be at least 3 * 2**layers pixels (24 for 3 layers).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"PatchDiscriminator needs layers >= 1 (got {layers})")
        self.layers = layers
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(_groups(out), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*blocks)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) convolutions and N(1, 0.02) norm scales, the usual GAN initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def min_size(self) -> int:
        """The smallest image side that still gives a non-empty logit map."""
        return 3 * 2**self.layers  # `layers` halvings, then two 4x4 stride-1 convs take 2 off each side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_size():
            raise ValueError(
                f"images of {tuple(x.shape[-2:])} are too small for a {self.layers}-layer patch discriminator "
                f"(min side {self.min_size()}); lower vae_loss.disc_layers"
            )
        return self.main(x)


# ---------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------

# torchvision's vgg16().features up to relu5_3: (out_channels or "M" for a 2x2 max-pool).
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input normalisation for images in [-1, 1] (ImageNet statistics mapped to that range).
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class _Linear(nn.Module):
    """One LPIPS head: a non-negative 1x1 conv from C channels to 1, at `model.1` like the original."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))  # 0: dropout slot


class LPIPS(nn.Module):
    """Perceptual distance d(x, y) -> (B,) for images in [-1, 1] (Zhang et al. 2018, eq. 1).

    State dict keys: `features.N.weight|bias` (torchvision VGG16 layout) and `lin{0..4}.model.1.weight`.
    Built with random weights; use `load_lpips` for the real ones. Frozen: it only scores.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
                ch = v
        self.features = nn.Sequential(*layers)  # indices 0..29, ending at relu5_3
        for k, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{k}", _Linear(c))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always in inference mode

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        feats = self._taps(torch.cat([x, y]))
        total = torch.zeros(n, device=x.device, dtype=torch.float32)
        for k, f in enumerate(feats):
            f = f.float()
            f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length per position
            diff = (f[:n] - f[n:]).pow(2)  # (B, C, h, w)
            head = getattr(self, f"lin{k}").model[1]
            total = total + F.conv2d(diff, head.weight.float()).mean(dim=(1, 2, 3))
        return total  # (B,)


# Keys that may sit beside the LPIPS weights in a file and are not needed: the VGG classifier,
# LPIPS's own copy of the input normalisation.
_IGNORED = re.compile(r"^(classifier\.|scaling_layer\.)")
# The original LPIPS/taming module names VGG slices `net.sliceK.N.*` with torchvision's indices N.
_SLICE = re.compile(r"^net\.slice\d+\.(\d+)\.")


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS with the weights of a local `.safetensors` or `.pth`/`.pt` file (never downloads).

    The file holds torchvision-style `features.N.*` VGG16 weights (or the `net.sliceK.N.*` names
    of the original LPIPS code) and the heads `lin{0..4}.model.1.weight`."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # unreadable in any way: say which file and what it should hold
        raise CheckpointError(f"LPIPS weights {path} cannot be read ({e}); expected a .safetensors or .pth state dict") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"LPIPS weights {path} must hold a state dict (got {type(state).__name__})")
    renamed = {}
    for key, value in state.items():
        if _IGNORED.match(key):
            continue
        renamed[_SLICE.sub(r"features.\1.", key)] = value
    model = LPIPS()
    own = model.state_dict()
    missing = [k for k in own if k not in renamed]
    unexpected = [k for k in renamed if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"LPIPS weights {path} do not match: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}; expected torchvision VGG16 "
            "`features.N.*` and LPIPS `lin0..lin4.model.1.weight`"
        )
    model.load_state_dict({k: v.float() for k, v in renamed.items()})
    return model


def lpips_from_config(cfg: VAELossConfig) -> tuple[LPIPS | None, str]:
    """(LPIPS or None, a one-line status to print)."""
    how = (
        "to enable it, set vae_loss.lpips_weights to a local .safetensors/.pth holding torchvision VGG16 "
        "`features.N.*` and LPIPS `lin0..lin4.model.1.weight` weights"
    )
    if cfg.lpips_weight <= 0:
        return None, "LPIPS off: vae_loss.lpips_weight is 0"
    if not cfg.lpips_weights:
        return None, f"LPIPS off: vae_loss.lpips_weights is empty (the loss is L1 + KL + GAN); {how}"
    if not Path(cfg.lpips_weights).is_file():
        return None, f"LPIPS off: vae_loss.lpips_weights={cfg.lpips_weights} does not exist; {how}"
    return load_lpips(cfg.lpips_weights), f"LPIPS on: weights from {cfg.lpips_weights} (weight {cfg.lpips_weight})"


# ---------------------------------------------------------------------------------------------
# The whole objective
# ---------------------------------------------------------------------------------------------


class VAELoss:
    """Combines the terms above for the autoencoder and for the discriminator."""

    def __init__(self, cfg: VAELossConfig, lpips: LPIPS | None = None) -> None:
        self.cfg = cfg
        self.lpips = lpips

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator is evaluated and trained at optimizer step `step` (0-based)."""
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def reconstruction(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Weighted L1, L2 (and LPIPS): the `rec` term, and its parts for logging."""
        cfg = self.cfg
        rec = torch.zeros((), device=images.device)
        logs = {}
        for name, weight, fn in (("l1", cfg.l1_weight, l1_loss), ("l2", cfg.l2_weight, l2_loss)):
            if weight > 0:
                value = fn(images, recon)
                logs[name] = value.detach()
                rec = rec + weight * value
        if self.lpips is not None:
            p = self.lpips(images, recon).mean()
            logs["lpips"] = p.detach()
            rec = rec + cfg.lpips_weight * p
        return rec, logs

    def generator(
        self,
        images: torch.Tensor,
        recon: torch.Tensor,
        posterior: DiagonalGaussian,
        logits_fake: torch.Tensor | None,
        last_layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict]:
        """The autoencoder's loss. `logits_fake` is D(recon) (None before `disc_start`), computed so
        that gradients reach `recon` but not the discriminator; `last_layer` is the decoder's output
        conv weight, for the adaptive weight."""
        rec, logs = self.reconstruction(images, recon)
        kl = kl_loss(posterior)
        loss = rec + self.cfg.kl_weight * kl
        logs.update(rec=rec.detach(), kl=kl.detach())
        if logits_fake is not None:
            adv = generator_adv_loss(logits_fake)
            weight = adaptive_weight(rec, adv, last_layer) if torch.is_grad_enabled() else torch.ones(())
            loss = loss + self.cfg.disc_weight * weight * adv
            logs.update(g_loss=adv.detach(), d_weight=weight)
        return loss, logs

    def discriminator(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Hinge loss of D on real images and detached reconstructions."""
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {
            "d_loss": loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
