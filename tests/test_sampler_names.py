"""Sampler and schedule names from AUTOMATIC1111 and ComfyUI mapped to ours, and back."""

import pytest

from ldm.config import DiffusionConfig
from ldm.diffusion import SAMPLERS, SPACINGS, Schedule, a1111_name, parse_sampler, parse_schedule, sigmas_from_schedule
from ldm.diffusion.names import A1111_AUTOMATIC, A1111_SAMPLERS

# The names as the tools list them (A1111 1.10: samplers_k_diffusion, samplers_timesteps, LCM and
# sd_schedulers.schedulers labels; ComfyUI: KSAMPLER_NAMES + the three extra SAMPLER_NAMES, and
# SCHEDULER_HANDLERS). Every one must be known: mapped, or refused with the nearest sampler we have.
A1111_SAMPLER_LABELS = [
    "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "Euler",
    "LMS", "Heun", "DPM2", "DPM2 a", "DPM fast", "DPM adaptive", "Restart", "DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM",
]
A1111_SCHEDULE_LABELS = [
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Align Your Steps",
    "Simple", "Normal", "DDIM", "Beta",
]
COMFY_SAMPLER_NAMES = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm",
    "lcm", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2",
]
COMFY_SCHEDULER_NAMES = [
    "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal",
]


@pytest.mark.parametrize(
    "name, schedule, expected",
    [
        # A1111 display names, alone (no schedule implied), with a separate schedule type, and combined
        ("Euler a", None, ("euler_a", None)),
        ("Euler", None, ("euler", None)),
        ("Heun", None, ("heun", None)),
        ("DDIM", None, ("ddim", None)),
        ("LMS", None, ("lms", None)),
        ("LMS Karras", None, ("lms", "karras")),
        ("DPM++ 2M", None, ("dpmpp_2m", None)),
        ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
        ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M SDE", None, ("dpmpp_2m_sde", None)),
        ("DPM++ 2M SDE Karras", None, ("dpmpp_2m_sde", "karras")),
        ("DPM++ 2M SDE", "Exponential", ("dpmpp_2m_sde", "exponential")),
        ("DPM++ SDE", None, ("dpmpp_sde", None)),
        ("DPM++ SDE Karras", None, ("dpmpp_sde", "karras")),
        ("UniPC", None, ("uni_pc", None)),
        ("Euler a", "SGM Uniform", ("euler_a", "sgm_uniform")),
        ("Euler a", "Uniform", ("euler_a", "linspace")),
        ("Heun", "Normal", ("heun", "linspace")),
        ("DDIM", "DDIM", ("ddim", "leading")),
        ("k_dpmpp_2m_ka", None, ("dpmpp_2m", "karras")),
        ("k_euler_a", None, ("euler_a", None)),
        # A1111's "Automatic": the name's own schedule, else what A1111 picks for the method
        ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras")),
        ("DPM++ SDE", "Automatic", ("dpmpp_sde", "karras")),
        ("DPM++ 2M SDE", "Automatic", ("dpmpp_2m_sde", "exponential")),
        ("Euler a", "Automatic", ("euler_a", "linspace")),
        ("LMS", "Automatic", ("lms", "linspace")),
        ("UniPC", "Automatic", ("uni_pc", "sgm_uniform")),
        ("DDIM", "Automatic", ("ddim", "leading")),
        ("Euler Karras", "Automatic", ("euler", "karras")),
        # ComfyUI samplers and schedulers
        ("euler_ancestral", "normal", ("euler_a", "linspace")),
        ("euler", "simple", ("euler", "simple")),
        ("dpmpp_2m", "karras", ("dpmpp_2m", "karras")),
        ("dpmpp_2m_sde_gpu", "exponential", ("dpmpp_2m_sde", "exponential")),
        ("dpmpp_sde_gpu", "karras", ("dpmpp_sde", "karras")),
        ("lms", "sgm_uniform", ("lms", "sgm_uniform")),
        ("ddim", "ddim_uniform", ("ddim", "leading")),
        ("uni_pc_bh2", "normal", ("uni_pc_bh2", "linspace")),
        ("ddpm", "simple", ("ddpm", "simple")),
        # ours, with the explicit spacing winning over the name's
        ("dpmpp_2m_karras", None, ("dpmpp_2m", "karras")),
        ("dpmpp_2m_karras", "trailing", ("dpmpp_2m", "trailing")),
        ("heun", None, ("heun", None)),
        # case and spacing do not matter
        ("dpm++ 2m karras", None, ("dpmpp_2m", "karras")),
        ("  EULER   A ", "KARRAS", ("euler_a", "karras")),
        ("Euler_A", "sgm uniform", ("euler_a", "sgm_uniform")),
    ],
)
def test_names_people_type_map_to_ours(name, schedule, expected):
    assert parse_sampler(name, schedule) == expected


def test_every_a1111_and_comfyui_name_is_mapped_or_refused_with_the_nearest():
    for name in [*A1111_SAMPLER_LABELS, *COMFY_SAMPLER_NAMES]:
        try:
            assert parse_sampler(name).sampler in SAMPLERS
        except ValueError as e:
            assert f"sampler {name!r} is not implemented here; the nearest is '" in str(e), name
    for name in [*A1111_SCHEDULE_LABELS, *COMFY_SCHEDULER_NAMES]:
        try:
            assert parse_schedule(name) in (*SPACINGS, None)
        except ValueError as e:
            assert f"schedule {name!r} is not implemented here; the nearest is '" in str(e), name
    mapped = {n for n in A1111_SAMPLER_LABELS if n in A1111_SAMPLERS}
    assert mapped == {"Euler a", "Euler", "LMS", "Heun", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DDIM", "UniPC"}


def test_unknown_names_list_ours_a1111s_and_comfyuis():
    with pytest.raises(ValueError) as err:
        parse_sampler("dpm_fastest")
    message = str(err.value)
    assert message.startswith("unknown sampler 'dpm_fastest'; valid names:")
    for name in ["dpmpp_2m_karras", "uni_pc", "Euler a", "DPM++ 2M SDE", "'DPM++ 2M Karras'", "euler_ancestral",
                 "dpmpp_sde_gpu"]:
        assert name in message
    with pytest.raises(ValueError, match="nearest is 'dpmpp_2m_sde'"):
        parse_sampler("DPM++ 3M SDE Karras")
    with pytest.raises(ValueError, match="'DPM2 a Karras' is not implemented here; the nearest is 'euler_a'"):
        parse_sampler("DPM2 a Karras")
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'; valid schedules: ours: leading, .*Karras.*ddim_uniform"):
        parse_sampler("euler", "cosine")
    with pytest.raises(ValueError, match="nearest is 'karras'"):
        parse_schedule("Align Your Steps")
    for bad in ("", "   ", None):
        with pytest.raises(ValueError, match="sampler must be a non-empty name"):
            parse_sampler(bad)
    with pytest.raises(ValueError, match="unknown sampler"):
        parse_sampler("Karras")


# The spacings A1111 has a schedule type for, exactly
EXACT_SPACINGS = ["linspace", "karras", "exponential", "sgm_uniform", "simple"]


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"ddpm", "uni_pc_bh2"}))
def test_a1111_names_round_trip(sampler):
    for spacing in EXACT_SPACINGS:
        label, schedule_type = a1111_name(sampler, spacing)
        assert label in A1111_SAMPLERS and schedule_type in A1111_SCHEDULE_LABELS
        assert parse_sampler(label, schedule_type) == (sampler, spacing)
        # the older one-string form (A1111 strips a known schedule suffix) reads the same
        assert parse_sampler(f"{label} {schedule_type}") == (sampler, spacing)


def test_a1111_name_writes_what_a_png_parameters_chunk_says():
    assert a1111_name("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert a1111_name("dpmpp_2m_karras", "karras") == ("DPM++ 2M", "Karras")
    assert a1111_name("euler_a", "linspace") == ("Euler a", "Uniform")
    assert a1111_name("dpmpp_2m_sde", "exponential") == ("DPM++ 2M SDE", "Exponential")
    assert a1111_name("uni_pc_bh2", "sgm_uniform") == ("UniPC", "SGM Uniform")  # the variant is an A1111 setting
    with pytest.raises(ValueError, match="'ddpm' has no A1111 equivalent"):
        a1111_name("ddpm", "trailing")
    assert a1111_name("euler", "Automatic") == ("Euler", "Uniform")  # what A1111 runs for Automatic
    with pytest.raises(ValueError, match="needs the spacing"):
        a1111_name("euler", None)
    with pytest.raises(ValueError, match="unknown schedule"):
        a1111_name("euler", "nonsense")


def test_trailing_and_leading_are_written_as_the_a1111_schedules_with_the_same_timesteps():
    sd = Schedule.from_config(DiffusionConfig())
    assert a1111_name("euler", "trailing") == ("Euler", "Simple")
    assert a1111_name("ddim", "leading") == ("DDIM", "DDIM")
    for ours, spacing in [("trailing", "Simple"), ("leading", "DDIM")]:
        back = parse_sampler("Euler", spacing).spacing
        for steps in (10, 20, 25, 50):  # steps dividing 1000: the same timesteps
            a, b = sigmas_from_schedule(sd, steps, ours), sigmas_from_schedule(sd, steps, back)
            assert (sd.sigma_to_t(a[:-1]) == sd.sigma_to_t(b[:-1])).all()
    assert not (sigmas_from_schedule(sd, 30, "trailing") == sigmas_from_schedule(sd, 30, "simple")).all()


def test_automatic_covers_every_a1111_sampler():
    assert set(A1111_AUTOMATIC) >= set(A1111_SAMPLERS.values())
    assert set(A1111_AUTOMATIC.values()) <= set(SPACINGS)
