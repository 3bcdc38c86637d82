"""Noise schedules: betas, cumulative alphas, VE sigmas, and the sigma grids samplers step through.

Notation (variance preserving, "VP"): x_t = alpha_t * x0 + sigma_t * eps with
alpha_t = sqrt(alphas_cumprod[t]) and sigma_t = sqrt(1 - alphas_cumprod[t]).
Samplers work in the variance-exploding ("VE") form x = x_t / alpha_t = x0 + sigma * eps with
sigma = sigma_t / alpha_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).

Everything here is computed in float64 on the CPU: schedules are small and their precision matters
(alphas_cumprod of SD ends near 4.7e-3, and sigma spans 0.03 .. 15).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import BETA_SCHEDULES, DiffusionConfig

SPACINGS = ("leading", "trailing", "linspace", "karras", "exponential", "simple", "sgm_uniform")

# With a zero-terminal-SNR schedule alphas_cumprod[-1] == 0 and the VE sigma of the last step is
# infinite. For everything that needs a finite VE sigma (`Schedule.sigmas`, sampling) the final
# alphas_cumprod is raised to this value, which gives sigma_max = sqrt(2**24 - 1) ~= 4096: initial
# noise of std 4096 carries a signal 4096 times weaker than itself, i.e. pure noise in practice.
# Training (`alpha_sigma`) keeps the exact zero.
MIN_ALPHA_CUMPROD = 2.0**-24


def make_betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Per-step betas, float64 of shape (T,).

    `linear`: betas evenly spaced from beta_start to beta_end (Ho et al. 2020).
    `scaled_linear`: sqrt(betas) evenly spaced, then squared (Stable Diffusion's schedule).
    `cosine`: Nichol & Dhariwal 2021 eq. 17 with s = 0.008, betas clipped at 0.999 (beta_start and
    beta_end are ignored).
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1 (got {num_timesteps})")
    T = num_timesteps
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=torch.float64) ** 2
    if kind == "cosine":
        s = 0.008
        # Nichol & Dhariwal eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        alpha_bar = f / f[0]
        # beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), clipped to avoid a singular last step
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; valid kinds: {', '.join(BETA_SCHEDULES)}")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so the last step has zero SNR (Lin et al. 2024, Algorithm 1).

    sqrt(alphas_cumprod) is shifted so its last value is 0 and scaled so its first value is kept;
    betas are then recovered from the ratios of consecutive alphas_cumprod.
    """
    betas = betas.to(torch.float64)
    sqrt_ac = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)  # Alg. 1: last -> 0, first unchanged
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


@dataclass(eq=False)
class Schedule:
    """A discrete diffusion schedule, defined by alphas_cumprod (float64, shape (T,), decreasing).

    Integer timesteps index it directly (training); fractional timesteps and arbitrary sigmas are
    mapped by piecewise-linear interpolation in log(VE sigma) between grid points (sampling).
    """

    alphas_cumprod: Tensor
    _sigmas: Tensor = field(init=False, repr=False)
    _log_sigmas: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod).detach().to(device="cpu", dtype=torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 steps (got shape {tuple(ac.shape)})")
        if not (ac > 0).all() and not ((ac[:-1] > 0).all() and ac[-1] == 0):
            raise ValueError("alphas_cumprod must be > 0 (only the last may be 0, for zero terminal SNR)")
        if not (ac < 1).all() or not (ac[1:] < ac[:-1]).all():
            raise ValueError("alphas_cumprod must be < 1 and strictly decreasing")
        self.alphas_cumprod = ac
        ac_ve = ac.clamp(min=MIN_ALPHA_CUMPROD)
        self._sigmas = ((1 - ac_ve) / ac_ve).sqrt()
        self._log_sigmas = self._sigmas.log()

    @classmethod
    def from_betas(cls, betas: Tensor) -> "Schedule":
        return cls(torch.cumprod(1 - betas.to(torch.float64), 0))

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        betas = make_betas(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls.from_betas(betas)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def betas(self) -> Tensor:
        ac = self.alphas_cumprod
        return 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])

    @property
    def sigmas(self) -> Tensor:
        """VE sigma per timestep, float64 (T,), increasing; finite even with zero terminal SNR."""
        return self._sigmas

    @property
    def sigma_min(self) -> float:
        return float(self._sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self._sigmas[-1])

    def alpha_sigma(self, t: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """VP (alpha_t, sigma_t) for integer timesteps `t` (any shape), on t's device, in `dtype`."""
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"alpha_sigma takes integer timesteps (got {t.dtype}); use t_to_sigma for fractional t")
        ac = self.alphas_cumprod
        alpha = ac.sqrt().to(dtype=dtype).to(t.device)
        sigma = (1 - ac).sqrt().to(dtype=dtype).to(t.device)
        return alpha[t], sigma[t]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """VE sigma -> fractional timestep (same shape, device and floating dtype as `sigma`).

        Linear interpolation in log-sigma between neighbouring grid points, exact on the grid;
        sigmas outside [sigma_min, sigma_max] clamp to t = 0 or T - 1 (so sigma = 0 gives 0).
        """
        sigma = torch.as_tensor(sigma)
        if not sigma.dtype.is_floating_point:
            sigma = sigma.to(torch.float32)
        # Grid in sigma's own dtype, so a grid sigma rounded to that dtype still lands exactly.
        grid = self._sigmas.to(device=sigma.device, dtype=sigma.dtype)
        s = sigma.clamp(grid[0], grid[-1])
        hi = torch.searchsorted(grid, s.reshape(-1).contiguous(), right=True).clamp(1, grid.numel() - 1)
        hi = hi.reshape(s.shape)
        lo = hi - 1
        log_lo, log_hi = grid[lo].log(), grid[hi].log()
        w = (s.log() - log_lo) / (log_hi - log_lo)
        return lo.to(sigma.dtype) + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Fractional timestep -> VE sigma, by linear interpolation of log-sigma (float64 on CPU
        for CPU input; otherwise t's device and floating dtype)."""
        t = torch.as_tensor(t)
        dtype = t.dtype if t.dtype.is_floating_point else torch.float64
        log_sigmas = self._log_sigmas.to(device=t.device, dtype=dtype)
        t = t.to(dtype).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo.to(dtype)
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()


def sigmas_from_schedule(
    schedule: Schedule, n: int, spacing: str = "trailing", *, steps_offset: int = 1, rho: float = 7.0
) -> Tensor:
    """The n + 1 VE sigmas an n-step sampler visits, descending, ending with 0 (float64, CPU).

    `leading`:  t = arange(n) * (T // n) + steps_offset (diffusers' "leading"; SD uses offset 1).
    `trailing`: t = round(T - arange(n) * T / n) - 1, so sampling starts at the last timestep
                (Lin et al. 2024 sec. 3.3).
    `linspace`: t = linspace(0, T - 1, n), fractional t kept (interpolated in log-sigma).
    `karras`:   Karras et al. 2022 eq. 5 between the schedule's sigma_min and sigma_max with `rho`.
    `exponential`: sigmas evenly spaced in log-sigma from sigma_max to sigma_min (k-diffusion).
    `simple`:   t = T - 1 - int(k * (T / n)), k = 0 .. n - 1 (A1111's and ComfyUI's "simple"; equals
                `trailing` when n divides T, else some steps are one timestep later).
    `sgm_uniform`: t = linspace(T - 1, 0, n + 1)[:-1], fractional t kept (A1111's and ComfyUI's).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be an integer >= 1 (got {n!r})")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {', '.join(SPACINGS)}")
    T = schedule.num_timesteps
    if spacing in ("leading", "trailing", "simple") and n > T:
        raise ValueError(f"steps ({n}) must be <= num_timesteps ({T}) with {spacing!r} spacing")
    if spacing == "karras":
        # Karras et al. eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        lo, hi = schedule.sigma_min ** (1 / rho), schedule.sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
    elif spacing == "exponential":
        sigmas = torch.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), n, dtype=torch.float64).exp()
    elif spacing == "simple":
        step = T / n  # a Python float, rounded down per step exactly as the tools that define it do
        sigmas = schedule.sigmas[[T - 1 - int(k * step) for k in range(n)]]
    elif spacing == "sgm_uniform":
        sigmas = schedule.t_to_sigma(torch.linspace(T - 1, 0, n + 1, dtype=torch.float64)[:-1])
    else:
        if spacing == "leading":
            t = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
            if not 0 <= steps_offset or t[-1] > T - 1:
                raise ValueError(
                    f"leading spacing with steps={n}, steps_offset={steps_offset} reaches timestep "
                    f"{int(t[-1])} > {T - 1}; use fewer steps or 'trailing' spacing"
                )
        elif spacing == "trailing":
            t = torch.round(T - torch.arange(n, dtype=torch.float64) * (T / n)) - 1
        else:
            t = torch.linspace(0, T - 1, n, dtype=torch.float64)
        sigmas = schedule.t_to_sigma(t.flip(0) if spacing != "trailing" else t)
    return torch.cat([sigmas, sigmas.new_zeros(1)])
