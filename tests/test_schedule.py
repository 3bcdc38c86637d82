import math

import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion import (
    MIN_ALPHA_CUMPROD,
    SPACINGS,
    Schedule,
    make_betas,
    rescale_zero_terminal_snr,
    sigmas_from_schedule,
)


@pytest.fixture(scope="module")
def sd() -> Schedule:
    return Schedule.from_config(DiffusionConfig())  # scaled_linear 0.00085 .. 0.012, T = 1000


def test_linear_betas_are_evenly_spaced():
    b = make_betas("linear", 1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15) and b[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64), atol=1e-15)


def test_scaled_linear_betas_are_squares_of_a_linear_ramp():
    b = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12) and b[-1].item() == pytest.approx(0.012, rel=1e-12)
    root = b.sqrt()
    step = (math.sqrt(0.012) - math.sqrt(0.00085)) / 999
    assert torch.allclose(root.diff(), torch.full((999,), step, dtype=torch.float64), atol=1e-14)
    # ... and so not linear in beta itself
    assert not torch.allclose(b.diff(), b.diff()[0].expand(999), rtol=1e-3)


def test_stable_diffusion_alphas_cumprod(sd):
    # SD's schedule: alphas_cumprod[-1] = prod(1 - betas) ~= 0.0046600
    assert sd.alphas_cumprod[-1].item() == pytest.approx(0.0046600, rel=1e-4)
    assert sd.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    assert sd.sigma_max == pytest.approx(math.sqrt((1 - 0.0046601) / 0.0046601), rel=1e-4)  # ~14.6146
    assert sd.sigma_min == pytest.approx(math.sqrt(0.00085 / (1 - 0.00085)), rel=1e-12)


def test_cosine_betas_follow_nichol_dhariwal_eq17():
    T, s = 1000, 0.008
    b = make_betas("cosine", T, 0.0, 0.0)
    ac = torch.cumprod(1 - b, 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 10, 250, 500, 900):
        assert ac[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert b.max().item() == pytest.approx(0.999)  # the final betas are clipped
    assert (b <= 0.999).all() and (b > 0).all()


def test_unknown_beta_kind_lists_the_valid_ones():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine"):
        make_betas("quadratic", 10, 0.1, 0.2)


def test_zero_terminal_snr_rescale():
    betas = make_betas("scaled_linear", 1000, 0.00085, 0.012)
    zb = rescale_zero_terminal_snr(betas)
    ac, zac = torch.cumprod(1 - betas, 0), torch.cumprod(1 - zb, 0)
    assert zac[-1].item() == pytest.approx(0.0, abs=1e-20)
    assert zac[0].sqrt().item() == pytest.approx(ac[0].sqrt().item(), rel=1e-12)
    # Algorithm 1 is an affine map of sqrt(alphas_cumprod): check it in the middle too
    a0, aT = ac[0].sqrt(), ac[-1].sqrt()
    expect = (ac[500].sqrt() - aT) * a0 / (a0 - aT)
    assert zac[500].sqrt().item() == pytest.approx(expect.item(), rel=1e-12)


def test_zero_terminal_snr_schedule_is_finite_for_sampling():
    z = Schedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    assert z.alphas_cumprod[-1].item() == 0  # training keeps the exact zero ...
    a, s = z.alpha_sigma(torch.tensor([999]), dtype=torch.float64)
    assert a.item() == 0 and s.item() == 1
    # ... sampling uses alphas_cumprod clamped to 2**-24
    assert z.sigma_max == pytest.approx(math.sqrt((1 - MIN_ALPHA_CUMPROD) / MIN_ALPHA_CUMPROD))
    assert torch.isfinite(z.sigmas).all()
    sig = sigmas_from_schedule(z, 10, "trailing")
    assert sig[0].item() == pytest.approx(z.sigma_max) and z.sigma_to_t(sig[:1]).item() == 999


def test_sigma_t_round_trip(sd):
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sd.sigma_to_t(sd.t_to_sigma(t)), t, atol=1e-9, rtol=0)
    # exact on the grid, also after rounding to float32
    grid = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(sd.sigma_to_t(sd.sigmas), grid)
    assert torch.equal(sd.sigma_to_t(sd.sigmas.float()), grid.float())
    torch.testing.assert_close(sd.t_to_sigma(grid), sd.sigmas, atol=0, rtol=1e-14)
    # interpolation is linear in log-sigma
    mid = sd.t_to_sigma(torch.tensor(10.5, dtype=torch.float64))
    assert mid.item() == pytest.approx(math.sqrt(sd.sigmas[10].item() * sd.sigmas[11].item()), rel=1e-12)
    # out-of-range sigmas clamp
    assert sd.sigma_to_t(torch.tensor([0.0, 1e6])).tolist() == [0.0, 999.0]


def test_alpha_sigma_is_vp(sd):
    t = torch.tensor([0, 499, 999])
    a, s = sd.alpha_sigma(t, dtype=torch.float64)
    torch.testing.assert_close(a**2 + s**2, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(s / a, sd.sigmas[t])
    with pytest.raises(TypeError, match="integer"):
        sd.alpha_sigma(torch.tensor([1.5]))


def test_leading_and_trailing_spacing_values(sd):
    lead = sd.sigma_to_t(sigmas_from_schedule(sd, 10, "leading")[:-1])
    trail = sd.sigma_to_t(sigmas_from_schedule(sd, 10, "trailing")[:-1])
    assert lead.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert trail.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    lead0 = sd.sigma_to_t(sigmas_from_schedule(sd, 10, "leading", steps_offset=0)[:-1])
    assert lead0.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    lin = sd.sigma_to_t(sigmas_from_schedule(sd, 4, "linspace")[:-1])
    torch.testing.assert_close(lin, torch.tensor([999.0, 666.0, 333.0, 0.0], dtype=torch.float64))


def test_karras_spacing_follows_eq5(sd):
    n, rho = 8, 7.0
    sig = sigmas_from_schedule(sd, n, "karras", rho=rho)
    assert sig.shape == (n + 1,) and sig[-1] == 0
    assert sig[0].item() == pytest.approx(sd.sigma_max, rel=1e-12)
    assert sig[-2].item() == pytest.approx(sd.sigma_min, rel=1e-12)
    # eq. 5: sigma^(1/rho) is linear in the step index
    root = sig[:-1] ** (1 / rho)
    torch.testing.assert_close(root.diff(), root.diff()[:1].expand(n - 1), atol=1e-12, rtol=0)


def test_exponential_spacing_is_even_in_log_sigma(sd):
    sig = sigmas_from_schedule(sd, 8, "exponential")
    assert sig.shape == (9,) and sig[-1] == 0
    assert sig[0].item() == pytest.approx(sd.sigma_max, rel=1e-12)
    assert sig[-2].item() == pytest.approx(sd.sigma_min, rel=1e-12)
    log = sig[:-1].log()
    torch.testing.assert_close(log.diff(), log.diff()[:1].expand(7), atol=1e-12, rtol=0)


def test_simple_and_sgm_uniform_spacing_values(sd):
    # simple (A1111 / ComfyUI): every (T / n)-th timestep from the last, rounded down: 999 - int(k * 33.33)
    simple = sd.sigma_to_t(sigmas_from_schedule(sd, 30, "simple")[:-1])
    assert simple[:5].tolist() == [999, 966, 933, 899, 866] and simple[-1].item() == 33
    trail = sd.sigma_to_t(sigmas_from_schedule(sd, 30, "trailing")[:-1])
    assert trail[:5].tolist() == [999, 966, 932, 899, 866]  # trailing rounds k * T / n to nearest
    torch.testing.assert_close(sigmas_from_schedule(sd, 20, "simple"), sigmas_from_schedule(sd, 20, "trailing"),
                               rtol=1e-14, atol=0)  # the same timesteps when n divides T
    # sgm_uniform: the first n of n + 1 evenly spaced timesteps from T - 1 to 0
    sgm = sd.sigma_to_t(sigmas_from_schedule(sd, 4, "sgm_uniform")[:-1])
    torch.testing.assert_close(sgm, torch.tensor([999.0, 749.25, 499.5, 249.75], dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' numpy 2 warning
def test_exponential_spacing_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             use_exponential_sigmas=True)
    sched.set_timesteps(12)
    sd = Schedule.from_config(DiffusionConfig())
    torch.testing.assert_close(sigmas_from_schedule(sd, 12, "exponential").float(), sched.sigmas, rtol=5e-5, atol=0)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_every_spacing_descends_to_zero(sd, spacing):
    for n in (1, 2, 7, 50):
        sig = sigmas_from_schedule(sd, n, spacing)
        assert sig.shape == (n + 1,) and sig.dtype == torch.float64 and sig[-1] == 0
        assert (sig.diff() < 0).all()


def test_bad_spacing_or_steps_lists_the_options(sd):
    with pytest.raises(ValueError, match="leading, trailing, linspace, karras, exponential, simple, sgm_uniform"):
        sigmas_from_schedule(sd, 10, "uniform")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            sigmas_from_schedule(sd, bad)
    with pytest.raises(ValueError, match="trailing"):
        sigmas_from_schedule(sd, 1000, "leading")  # would reach timestep 1000
    with pytest.raises(ValueError, match="num_timesteps"):
        sigmas_from_schedule(sd, 1001, "simple")  # would repeat timesteps


def test_schedule_rejects_bad_alphas_cumprod():
    with pytest.raises(ValueError, match="decreasing"):
        Schedule(torch.tensor([0.5, 0.9], dtype=torch.float64))
    with pytest.raises(ValueError, match="> 0"):
        Schedule(torch.tensor([0.9, 0.0, 0.0], dtype=torch.float64))
