"""Sampler and schedule names as people type them (ours, AUTOMATIC1111's, ComfyUI's) mapped to ours, and back.

`parse_sampler("DPM++ 2M Karras")`, `parse_sampler("DPM++ 2M", "Karras")` and
`parse_sampler("dpmpp_2m", "karras")` all give `SamplerChoice("dpmpp_2m", "karras")`: one of our
`SAMPLERS` and one of our `SPACINGS` (or None: the caller's default). `a1111_name` goes back to the
display name and schedule type an A1111 `parameters` text says (`Sampler: DPM++ 2M, Schedule type:
Karras`). Names are matched case-insensitively, with runs of spaces collapsed.

A name maps only where we run the same method on the same noise levels. The tools' own last-step
conventions stay ours (every sampler here ends at sigma = 0; A1111's DDIM and UniPC stop at the
smallest training noise level); docs/sampling.md lists each difference. Names of methods we do not
implement raise a ValueError that says so and names the nearest sampler we have.

A1111 read from `modules/sd_samplers_kdiffusion.py`, `sd_samplers_timesteps.py` and
`sd_schedulers.py` (1.10); ComfyUI from `comfy/samplers.py` (KSAMPLER_NAMES, SCHEDULER_HANDLERS).
"""

from __future__ import annotations

from typing import NamedTuple

from .samplers import KARRAS_SUFFIX, SAMPLER_NAMES, SAMPLERS
from .schedule import SPACINGS

__all__ = [
    "SamplerChoice",
    "parse_sampler",
    "parse_schedule",
    "a1111_name",
    "A1111_SAMPLERS",
    "A1111_AUTOMATIC",
    "A1111_SCHEDULES",
    "COMFY_SAMPLERS",
    "COMFY_SCHEDULERS",
]


class SamplerChoice(NamedTuple):
    sampler: str  # a key of SAMPLERS
    spacing: str | None  # one of SPACINGS, or None: the caller's default ("trailing" in the pipeline)


# A1111 display name -> our sampler. A name alone implies no schedule (A1111 >= 1.9 keeps the
# schedule type apart; before, a bare name meant uniform sigmas): the caller's default applies.
A1111_SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DDIM": "ddim",
    "UniPC": "uni_pc",
}
# What A1111's schedule type "Automatic" means for each sampler, as our spacing: the sampler's own
# `scheduler` option where it has one (Karras for DPM++ 2M and DPM++ SDE, Exponential for DPM++ 2M
# SDE), else the model's uniform sigmas, timesteps linspace(999, 0, n): our "linspace". DDIM and
# UniPC are A1111's timestep samplers, which ignore the schedule type: DDIM steps through timesteps
# 1, 1 + 1000 // n, ... (our "leading"); UniPC through a time-uniform grid of n + 1 points from 999
# to 0, of which our "sgm_uniform" is the first n.
A1111_AUTOMATIC: dict[str, str] = {
    "euler_a": "linspace",
    "euler": "linspace",
    "lms": "linspace",
    "heun": "linspace",
    "dpmpp_2m": "karras",
    "dpmpp_sde": "karras",
    "dpmpp_2m_sde": "exponential",
    "ddim": "leading",
    "uni_pc": "sgm_uniform",
    "uni_pc_bh2": "sgm_uniform",
}
# A1111's API aliases (`k_*`; `_ka` ones carry Karras), as (display name, schedule or None).
_A1111_ALIASES: dict[str, tuple[str, str | None]] = {
    "k_euler_a": ("Euler a", None),
    "k_euler_ancestral": ("Euler a", None),
    "k_euler": ("Euler", None),
    "k_lms": ("LMS", None),
    "k_lms_ka": ("LMS", "karras"),
    "k_heun": ("Heun", None),
    "k_dpmpp_2m": ("DPM++ 2M", None),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde": ("DPM++ SDE", None),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde": ("DPM++ 2M SDE", None),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "unipc": ("UniPC", None),
}
# A1111 schedule type label -> our spacing (None: Automatic, the sampler's own). Its internal names
# (`karras`, `sgm_uniform`, ...) are accepted too.
A1111_SCHEDULES: dict[str, str | None] = {
    "Automatic": None,
    "Uniform": "linspace",
    "Karras": "karras",
    "Exponential": "exponential",
    "SGM Uniform": "sgm_uniform",
    "Simple": "simple",
    "Normal": "linspace",  # linspace(t(sigma_max), t(sigma_min), n): the same timesteps as Uniform
    "DDIM": "leading",
}
_A1111_SCHEDULE_NAMES = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                         "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "sgmuniform": "SGM Uniform",
                         "simple": "Simple", "normal": "Normal", "ddim": "DDIM"}

# ComfyUI sampler -> ours. Its `ddim` runs k-diffusion's Euler, which is our ddim at eta 0; the
# `_gpu` variants only move the Brownian tree to the GPU.
COMFY_SAMPLERS: dict[str, str] = {
    "euler": "euler",
    "euler_ancestral": "euler_a",
    "heun": "heun",
    "lms": "lms",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_sde": "dpmpp_sde",
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "ddim": "ddim",
    "ddpm": "ddpm",
    "uni_pc": "uni_pc",
    "uni_pc_bh2": "uni_pc_bh2",
}
COMFY_SCHEDULERS: dict[str, str] = {
    "normal": "linspace",
    "karras": "karras",
    "exponential": "exponential",
    "sgm_uniform": "sgm_uniform",
    "simple": "simple",
    "ddim_uniform": "leading",
}

# Names of methods we do not implement -> the nearest sampler or spacing we have.
_REFUSED_SAMPLERS: dict[str, str] = {
    "dpm++ 2m sde heun": "dpmpp_2m_sde", "dpmpp_2m_sde_heun": "dpmpp_2m_sde", "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_2m_sde", "dpmpp_3m_sde": "dpmpp_2m_sde", "dpmpp_3m_sde_gpu": "dpmpp_2m_sde",
    "dpm++ 2s a": "dpmpp_sde", "dpmpp_2s_ancestral": "dpmpp_sde", "dpmpp_2s_ancestral_cfg_pp": "dpmpp_sde",
    "dpm2": "heun", "dpm_2": "heun", "dpm2 a": "euler_a", "dpm_2_ancestral": "euler_a",
    "dpm fast": "dpmpp_2m", "dpm_fast": "dpmpp_2m", "dpm adaptive": "dpmpp_2m", "dpm_adaptive": "dpmpp_2m",
    "restart": "heun", "plms": "lms", "ipndm": "lms", "ipndm_v": "lms", "deis": "uni_pc",
    "ddim cfg++": "ddim", "euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_a", "dpmpp_2m_cfg_pp": "dpmpp_2m",
    "heunpp2": "heun", "exp_heun_2_x0": "heun", "exp_heun_2_x0_sde": "dpmpp_sde", "lcm": "euler_a",
    "res_multistep": "dpmpp_2m", "res_multistep_cfg_pp": "dpmpp_2m", "res_multistep_ancestral": "euler_a",
    "res_multistep_ancestral_cfg_pp": "euler_a", "gradient_estimation": "euler", "gradient_estimation_cfg_pp": "euler",
    "er_sde": "dpmpp_2m_sde", "seeds_2": "dpmpp_sde", "seeds_3": "dpmpp_sde", "sa_solver": "dpmpp_2m_sde",
    "sa_solver_pece": "dpmpp_2m_sde",
}
_REFUSED_SCHEDULES: dict[str, str] = {
    "polyexponential": "exponential", "kl optimal": "karras", "kl_optimal": "karras", "beta": "karras",
    "align your steps": "karras", "align_your_steps": "karras", "linear_quadratic": "linspace", "turbo": "trailing",
}

# Ours -> A1111: display names, and the schedule type for each spacing. "trailing" and "leading"
# have no A1111 schedule of their own: Simple and DDIM visit the same timesteps whenever steps
# divides 1000 (they round k * 1000 / n down, and DDIM keeps every (1000 // n)-th timestep).
_TO_A1111 = {ours: label for label, ours in A1111_SAMPLERS.items()} | {"uni_pc_bh2": "UniPC"}
_SPACING_TO_A1111 = {"linspace": "Uniform", "karras": "Karras", "exponential": "Exponential",
                     "sgm_uniform": "SGM Uniform", "simple": "Simple", "trailing": "Simple", "leading": "DDIM"}


def _key(name: str) -> str:
    return " ".join(str(name).split()).lower()


_A1111_BY_KEY = {_key(label): label for label in A1111_SAMPLERS}
_SCHEDULE_BY_KEY: dict[str, str | None] = {
    **{s: s for s in SPACINGS},
    **{_key(label): spacing for label, spacing in A1111_SCHEDULES.items()},
    **{name: A1111_SCHEDULES[label] for name, label in _A1111_SCHEDULE_NAMES.items()},
    **COMFY_SCHEDULERS,
}


def _valid_names() -> str:
    return (
        f"ours: {', '.join(SAMPLER_NAMES)}; A1111: {', '.join(A1111_SAMPLERS)} (optionally with a schedule type, "
        f"e.g. 'DPM++ 2M Karras'); ComfyUI: {', '.join(COMFY_SAMPLERS)}"
    )


def _valid_schedules() -> str:
    return (
        f"ours: {', '.join(SPACINGS)}; A1111: {', '.join(A1111_SCHEDULES)}; ComfyUI: {', '.join(COMFY_SCHEDULERS)}"
    )


def parse_schedule(schedule: str) -> str | None:
    """A spacing or schedule name (ours, an A1111 schedule type, a ComfyUI scheduler) -> our spacing;
    None for A1111's "Automatic" (the sampler's own). Case-insensitive."""
    key = _key(schedule)
    if key in _SCHEDULE_BY_KEY:
        return _SCHEDULE_BY_KEY[key]
    if key in _REFUSED_SCHEDULES:
        raise ValueError(
            f"schedule {schedule!r} is not implemented here; the nearest is {_REFUSED_SCHEDULES[key]!r}. "
            f"Valid schedules: {_valid_schedules()}"
        )
    raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {_valid_schedules()}")


def _parse_name(name: str) -> SamplerChoice:
    key = _key(name)
    if key in SAMPLERS:
        return SamplerChoice(key, None)
    if key.endswith(KARRAS_SUFFIX) and key[: -len(KARRAS_SUFFIX)] in SAMPLERS:
        return SamplerChoice(key[: -len(KARRAS_SUFFIX)], "karras")
    if key in _A1111_BY_KEY:
        return SamplerChoice(A1111_SAMPLERS[_A1111_BY_KEY[key]], None)
    if key in _A1111_ALIASES:
        label, spacing = _A1111_ALIASES[key]
        return SamplerChoice(A1111_SAMPLERS[label], spacing)
    if key in COMFY_SAMPLERS:
        return SamplerChoice(COMFY_SAMPLERS[key], None)
    # A1111's older single names ("DPM++ 2M Karras", "LMS Karras") and any "<sampler> <schedule type>"
    for label_key, label in _A1111_BY_KEY.items():
        suffix = key[len(label_key) + 1 :]
        if key.startswith(label_key + " ") and suffix in _SCHEDULE_BY_KEY:
            spacing = parse_schedule(suffix)
            return SamplerChoice(A1111_SAMPLERS[label], spacing or A1111_AUTOMATIC[A1111_SAMPLERS[label]])
    refused = [r for r in _REFUSED_SAMPLERS if key == r or key.startswith(r + " ")]  # "DPM2 a Karras"
    if refused:
        base = max(refused, key=len)  # "dpm2 a", not "dpm2"
        raise ValueError(
            f"sampler {name!r} is not implemented here; the nearest is {_REFUSED_SAMPLERS[base]!r}. "
            f"Valid names: {_valid_names()}"
        )
    raise ValueError(f"unknown sampler {name!r}; valid names: {_valid_names()}")


def parse_sampler(name: str, schedule: str | None = None) -> SamplerChoice:
    """Any sampler name people type, and optionally a schedule, -> (our sampler, our spacing or None).

    `name`: ours (`dpmpp_2m`, `dpmpp_2m_karras`), an A1111 display name or API alias (`DPM++ 2M`,
    `DPM++ 2M Karras`, `k_dpmpp_2m_ka`), or a ComfyUI sampler (`dpmpp_2m`, `euler_ancestral`).
    `schedule`: ours (`karras`, `trailing`, ...), an A1111 schedule type (`Karras`, `Automatic`) or
    a ComfyUI scheduler (`normal`, `simple`); it overrides the spacing the name implies. A name
    implies a spacing only with a schedule in it (`_karras`, `DPM++ 2M Karras`, `k_lms_ka`); else
    the spacing is None (the caller's default). `Automatic` keeps the name's spacing, or picks what
    A1111 would for that method (`A1111_AUTOMATIC`). Unknown names raise a ValueError listing the
    valid ones (ours, A1111's, ComfyUI's).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"sampler must be a non-empty name (got {name!r}); valid names: {_valid_names()}")
    choice = _parse_name(name)
    if schedule is None:
        return choice
    spacing = parse_schedule(schedule)
    if spacing is None:  # Automatic: what the name implies, else what A1111 picks for the method
        spacing = choice.spacing or A1111_AUTOMATIC.get(choice.sampler)
    return SamplerChoice(choice.sampler, spacing)


def a1111_name(sampler: str, spacing: str) -> tuple[str, str]:
    """Our sampler and spacing -> A1111's (Sampler, Schedule type), as its `parameters` text writes them.

    `parse_sampler` of the result gives back (sampler, spacing) for every sampler A1111 has and the
    spacings linspace, karras, exponential, sgm_uniform and simple. "trailing" and "leading" are
    written as Simple and DDIM, the same timesteps when steps divides 1000. `uni_pc_bh2` is written
    as UniPC (A1111 picks the UniPC variant in its settings); `ddpm`, which A1111 lacks, raises.
    """
    choice = parse_sampler(sampler, spacing)
    if choice.spacing is None:
        raise ValueError(f"a1111_name needs the spacing that was used (got {spacing!r}); e.g. 'trailing' or 'karras'")
    if choice.sampler not in _TO_A1111:
        raise ValueError(f"sampler {choice.sampler!r} has no A1111 equivalent; A1111 has {', '.join(A1111_SAMPLERS)}")
    return _TO_A1111[choice.sampler], _SPACING_TO_A1111[choice.spacing]
