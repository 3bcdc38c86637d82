"""Samplers checked against data whose exact denoiser is known in closed form.

For x0 ~ N(mu, s^2 I) the VE denoiser is E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu), and the
probability-flow ODE dx/dsigma = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2) is solved by
x(sigma) - mu proportional to sqrt(s^2 + sigma^2).
"""

import inspect
import math

import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion import (
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    CFGDenoiser,
    Denoiser,
    Schedule,
    ancestral_step,
    randn_like,
    sample_dpmpp_2m,
    sample_euler,
    sigmas_from_schedule,
)

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = 0.5
DETERMINISTIC = ["euler", "ddim", "heun", "dpmpp_2m", "lms", "uni_pc", "uni_pc_bh2", "dpmpp_sde", "dpmpp_2m_sde"]
ODE_KW = {"dpmpp_sde": {"eta": 0.0}, "dpmpp_2m_sde": {"eta": 0.0}}  # the SDE solvers without noise


@pytest.fixture(scope="module")
def sd() -> Schedule:
    return Schedule.from_config(DiffusionConfig())


def gaussian_denoiser(x, sigma):
    """Exact E[x0 | x] for x0 ~ N(MU, S^2 I), x = x0 + sigma * eps; x (N, 2), sigma (N,)."""
    k = S**2 / (S**2 + sigma.reshape(-1, 1) ** 2)
    return MU.to(x) + k * (x - MU.to(x))


def prior_sample(n, sigma_max, seed):
    """Exact samples of the noised data at sigma_max: N(MU, (S^2 + sigma_max^2) I)."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MU + math.sqrt(S**2 + sigma_max**2) * z


def exact_x0(x_T, sigma_max):
    """The exact probability-flow ODE solution at sigma = 0 from x_T at sigma_max."""
    return MU + (x_T - MU) * S / math.sqrt(S**2 + sigma_max**2)


def ode_then_denoise(x_T, sigmas):
    """The exact ODE solution from sigmas[0] to sigmas[-2], then the exact denoiser: what a sampler
    converges to, since every sampler's last step (to sigma = 0) returns D."""
    s0, s_last = float(sigmas[0]), float(sigmas[-2])
    x = MU + (x_T - MU) * math.sqrt(S**2 + s_last**2) / math.sqrt(S**2 + s0**2)
    return gaussian_denoiser(x, torch.tensor([s_last], dtype=torch.float64))


def run(name, x, sigmas, seed=1, **kw):
    return SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed), **kw)


# ---------------------------------------------------------------------------------------------
# Convergence and distribution on Gaussian data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_converge_to_the_exact_ode_solution(sd, name):
    # LMS's last step extrapolates to sigma = 0 instead of returning D: it converges to the exact x0
    def target(x_T, sig):
        return exact_x0(x_T, float(sig[0])) if name == "lms" else ode_then_denoise(x_T, sig)

    errors = []
    for n in (5, 10, 20, 40):
        sig = sigmas_from_schedule(sd, n, "karras")
        x_T = prior_sample(200, float(sig[0]), seed=0)
        errors.append((run(name, x_T, sig, **ODE_KW.get(name, {})) - target(x_T, sig)).abs().max().item())
    assert errors[1] > errors[2] > errors[3], errors
    order = math.log2(errors[2] / errors[3])  # error ~ C / n^order
    if name in ("euler", "ddim"):
        assert 0.8 < order < 1.3, errors
    else:  # measured: 2.1 (heun, dpmpp_2m, SDE solvers at eta 0), 3.5 (lms), 4.2-4.4 (uni_pc)
        assert order > {"lms": 3.0, "uni_pc": 3.5, "uni_pc_bh2": 3.5}.get(name, 1.8), errors
        # higher order beats Euler by a wide margin at the same number of steps
        euler_40 = (run("euler", x_T, sig) - ode_then_denoise(x_T, sig)).abs().max().item()
        assert errors[3] < euler_40 / 10
    # and the result is close to the exact x0 of the ODE all the way to sigma = 0
    err_x0 = (run(name, x_T, sig, **ODE_KW.get(name, {})) - exact_x0(x_T, float(sig[0]))).abs().mean().item()
    assert err_x0 < (0.1 if name in ("euler", "ddim") else 0.01)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_reproduces_the_gaussian(sd, name):
    n_samples = 20000
    sig = sigmas_from_schedule(sd, 200, "karras")
    x = run(name, prior_sample(n_samples, float(sig[0]), seed=2), sig)
    se_mean = S / math.sqrt(n_samples)
    assert (x.mean(0) - MU).abs().max().item() < 4 * se_mean
    # first-order samplers keep an O(1/steps) bias (about 1% for Euler, 2% for ancestral at 200)
    assert (x.std(0) / S - 1).abs().max().item() < 0.035


def _ancestral_std(sigmas, eta):
    """Exact output std of the DDIM/ancestral recursion with the Gaussian denoiser: every step is
    x' = m (x - MU) + MU + up z, so Var' = m^2 Var + up^2."""
    sig = [float(s) for s in sigmas]
    var = S**2 + sig[0] ** 2
    for s, s_next in zip(sig, sig[1:]):
        k = S**2 / (S**2 + s**2)
        up = 0.0 if s_next == 0 else min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2))
        down = math.sqrt(s_next**2 - up**2)
        m = k + down / s * (1 - k)
        var = m * m * var + up * up
    return math.sqrt(var)


@pytest.mark.parametrize("name,eta", [("ddpm", 1.0), ("euler_a", 1.0), ("ddim", 0.5), ("ddim", 0.0)])
def test_stochastic_samplers_have_the_exact_discrete_variance(sd, name, eta):
    """At few steps the ancestral bias is large (~13% at 25 steps), so this pins the noise scale."""
    n_samples = 20000
    sig = sigmas_from_schedule(sd, 25, "karras")
    kw = {} if name == "ddpm" else {"eta": eta}
    x = run(name, prior_sample(n_samples, float(sig[0]), seed=3), sig, **kw)
    expect = _ancestral_std(sig, eta)
    assert abs(expect / S - 1) > 0.05 or eta == 0  # the check below is sensitive
    se = expect / math.sqrt(2 * 2 * n_samples)  # std error of a std over 2 * n_samples values
    assert ((x - MU).std() - expect).abs().item() < 4 * se


def _k(sigma):
    """The Gaussian denoiser's gain: D(x, sigma) - MU = k (x - MU)."""
    return S**2 / (S**2 + sigma**2)


def _dpmpp_2m_sde_std(sigmas, eta=1.0):
    """Exact output std of DPM-Solver++(2M) SDE with the Gaussian denoiser. With y = x - MU each step
    is y' = A y - B y_prev + q z, so the covariance of (y, y_prev) follows in closed form."""
    sig = [float(s) for s in sigmas]
    var, var_prev, cov = S**2 + sig[0] ** 2, 0.0, 0.0
    h_prev, k_prev = None, 0.0
    for s, s_next in zip(sig, sig[1:]):
        if s_next == 0:
            return _k(s) * math.sqrt(var)
        h = math.log(s / s_next)
        w = -math.expm1(-(1 + eta) * h)
        c = 0.0 if h_prev is None else w * h / h_prev / 2
        A, B = s_next / s * math.exp(-eta * h) + (w + c) * _k(s), c * k_prev
        q2 = s_next**2 * -math.expm1(-2 * eta * h)
        var, var_prev, cov = A * A * var + B * B * var_prev - 2 * A * B * cov + q2, var, A * var - B * cov
        h_prev, k_prev = h, _k(s)
    return math.sqrt(var)


def _dpmpp_sde_std(sigmas, eta=1.0, correlated=True):
    """Exact output std of DPM-Solver++ SDE with the Gaussian denoiser: the midpoint stage gives
    y_m = a1 y + up1 n1, the full step y' = G y + beta up1 n1 + up2 n2, where the Brownian noises
    n1 (over [sigma_m, sigma]) and n2 (over [sigma', sigma]) have correlation sqrt((sigma - sigma_m) / (sigma - sigma'))."""
    sig = [float(s) for s in sigmas]
    var = S**2 + sig[0] ** 2
    for s, s_next in zip(sig, sig[1:]):
        if s_next == 0:
            return _k(s) * math.sqrt(var)
        m = math.sqrt(s * s_next)
        (down1, up1), (down2, up2) = ancestral_step(s, m, eta), ancestral_step(s, s_next, eta)
        a1 = _k(s) + down1 / s * (1 - _k(s))
        beta = _k(m) * (1 - down2 / s)
        rho = math.sqrt((s - m) / (s - s_next)) if correlated else 0.0
        var = (down2 / s + beta * a1) ** 2 * var + (beta * up1) ** 2 + up2**2 + 2 * beta * up1 * up2 * rho
    return math.sqrt(var)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_sde"])
def test_sde_samplers_have_the_exact_discrete_variance_and_converge(sd, name):
    exact_std = {"dpmpp_2m_sde": _dpmpp_2m_sde_std, "dpmpp_sde": _dpmpp_sde_std}[name]
    n_samples = 20000
    sig = sigmas_from_schedule(sd, 10, "karras")
    x = run(name, prior_sample(n_samples, float(sig[0]), seed=3), sig)
    expect = exact_std(sig)
    assert abs(expect / S - 1) > 0.05  # at 10 steps the discrete bias is large (+8% and -6%), so this pins the noise
    se = expect / math.sqrt(2 * 2 * n_samples)
    assert ((x - MU).std() - expect).abs().item() < 4 * se
    assert (x.mean(0) - MU).abs().max().item() < 4 * expect / math.sqrt(n_samples)
    if name == "dpmpp_sde":  # the overlapping Brownian noises matter: independent ones would give 0.78 S
        assert abs(_dpmpp_sde_std(sig, correlated=False) - expect) > 30 * se
    # and the distribution converges to the data's as steps grow: |std / S - 1| under 0.3% at 100 steps
    bias = [abs(exact_std(sigmas_from_schedule(sd, n, "karras")) / S - 1) for n in (25, 50, 100)]
    assert bias[0] > bias[2] and bias[1] > bias[2] and bias[2] < 0.003, bias


def _mixture_denoiser(means, weights, s):
    def den(x, sigma):
        var = s**2 + sigma.reshape(-1, 1) ** 2  # (N, 1)
        logp = weights.log() - 0.5 * (x - means) ** 2 / var  # (N, 2) log responsibilities + const
        r1 = torch.sigmoid((logp[:, 1:] - logp[:, :1]).clamp(-30, 30))  # clamped: no subnormals
        r = torch.cat([1 - r1, r1], dim=1)
        return (r * (means + s**2 / var * (x - means))).sum(1, keepdim=True)

    return den


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_mixture_mode_weights(sd, name):
    means = torch.tensor([-2.0, 2.0], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.7], dtype=torch.float64)
    s, n_samples = 0.3, 10000
    sig = sigmas_from_schedule(sd, 50, "karras")
    g = torch.Generator().manual_seed(4)
    comp = (torch.rand(n_samples, generator=g, dtype=torch.float64) < weights[1]).long()
    z = torch.randn(n_samples, generator=g, dtype=torch.float64)
    x_T = (means[comp] + math.sqrt(s**2 + float(sig[0]) ** 2) * z).reshape(-1, 1)
    x = SAMPLERS[name](_mixture_denoiser(means, weights, s), x_T, sig, generator=torch.Generator().manual_seed(5))
    right = x[:, 0] > 0
    assert abs(right.double().mean().item() - 0.7) < 0.02
    assert abs(x[right].mean().item() - 2) < 0.05 and abs(x[~right].mean().item() + 2) < 0.05


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "euler_a", "lms", "uni_pc", "dpmpp_2m_sde", "dpmpp_sde"])
def test_zero_terminal_snr_schedule_samples_correctly(name):
    z = Schedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    sig = sigmas_from_schedule(z, 100, "trailing")
    assert float(sig[0]) == pytest.approx(z.sigma_max)  # ~4096: starts from (almost) pure noise
    x = run(name, prior_sample(20000, float(sig[0]), seed=6), sig)
    assert (x.mean(0) - MU).abs().max().item() < 4 * S / math.sqrt(20000)
    # first-order samplers keep an O(1/steps) bias: about 4% (Euler) and 6% (ancestral) at 100 steps
    assert (x.std(0) / S - 1).abs().max().item() < {"euler": 0.05, "euler_a": 0.08}.get(name, 0.02)


def test_denoiser_wrapped_network_samples_the_gaussian(sd):
    """End to end in float32: an exact v-prediction network behind Denoiser and CFGDenoiser(scale=1)."""

    def v_net(x_t, t, context):
        sigma = sd.t_to_sigma(t.double())  # (B,) VE sigma of the timestep
        alpha = (sigma**2 + 1).rsqrt().reshape(-1, 1)
        sigma_t = sigma.reshape(-1, 1) * alpha
        x = x_t.double() / alpha
        x0 = gaussian_denoiser(x, sigma)
        eps = (x - x0) / sigma.reshape(-1, 1)
        return (alpha * eps - sigma_t * x0).to(x_t.dtype) + context

    den = CFGDenoiser(Denoiser(v_net, sd, "v"), scale=1.0)
    sig = sigmas_from_schedule(sd, 30, "karras")
    x_T = prior_sample(10000, float(sig[0]), seed=7).float()
    zeros = torch.zeros(10000, 1)
    x = sample_dpmpp_2m(den, x_T, sig, extra_args={"cond": {"context": zeros}, "uncond": {"context": zeros}})
    assert x.dtype == torch.float32
    ref = ode_then_denoise(x_T.double(), sig)
    assert (x.double() - ref).abs().max().item() < 0.02


# ---------------------------------------------------------------------------------------------
# Equivalences, generators, call pattern, errors
# ---------------------------------------------------------------------------------------------


def test_ddim_with_eta_zero_is_euler(sd):
    sig = sigmas_from_schedule(sd, 12, "leading")
    x_T = prior_sample(100, float(sig[0]), seed=8)
    torch.testing.assert_close(run("ddim", x_T, sig, eta=0.0), run("euler", x_T, sig), atol=1e-12, rtol=0)
    torch.testing.assert_close(run("euler_a", x_T, sig, eta=0.0), run("euler", x_T, sig), atol=1e-12, rtol=0)


def test_ddpm_is_ddim_with_eta_one_path_for_path(sd):
    sig = sigmas_from_schedule(sd, 12, "trailing")
    x_T = prior_sample(100, float(sig[0]), seed=9)
    ddpm, ddim = run("ddpm", x_T, sig, seed=3), run("ddim", x_T, sig, seed=3, eta=1.0)
    torch.testing.assert_close(ddpm, ddim, atol=1e-12, rtol=0)
    # and with a different seed the paths differ (the noise is really used)
    assert not torch.allclose(run("ddpm", x_T, sig, seed=3), run("ddpm", x_T, sig, seed=4))


def test_ancestral_step_split():
    down, up = ancestral_step(2.0, 1.0, 1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    assert up == pytest.approx(math.sqrt(1.0 * (4 - 1) / 4))  # DDPM posterior std in VE form
    assert ancestral_step(2.0, 1.0, 0.0) == (1.0, 0.0)
    assert ancestral_step(2.0, 0.0, 1.0) == (0.0, 0.0)
    assert ancestral_step(2.0, 1.0, 5.0) == (0.0, 1.0)  # capped at sigma_next


@pytest.mark.parametrize(
    "name,kw", [("ddpm", {}), ("euler_a", {}), ("ddim", {"eta": 0.7}), ("dpmpp_2m_sde", {}), ("dpmpp_sde", {"eta": 0.5})]
)
def test_per_image_generators_match_single_image_runs(sd, name, kw):
    sig = sigmas_from_schedule(sd, 8, "karras")
    seeds = [100, 101, 102]

    def denoiser(x, sigma):  # elementwise per row, like a network with per-sample outputs
        return 0.5 * x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    def sample(batch_seeds):
        gens = [torch.Generator().manual_seed(s) for s in batch_seeds]
        x = randn_like(torch.empty(len(batch_seeds), 4, 6, 5), gens) * sig[0]
        return SAMPLERS[name](denoiser, x, sig, generator=gens, **kw)

    batch = sample(seeds)
    singles = torch.cat([sample([s]) for s in seeds])
    torch.testing.assert_close(batch, singles, atol=1e-6, rtol=0)
    assert not torch.allclose(batch[0], batch[1])


def test_randn_like():
    x = torch.empty(2, 3, dtype=torch.float16)
    a = randn_like(x, torch.Generator().manual_seed(0))
    b = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).half()
    assert a.dtype == torch.float16 and torch.equal(a, b)  # drawn in float32, then cast
    rows = randn_like(x, [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)])
    assert torch.equal(rows[0], rows[1])
    with pytest.raises(ValueError, match="one per batch row"):
        randn_like(x, [torch.Generator()])
    assert randn_like(x).shape == x.shape


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_calls_and_final_step(sd, name):
    n = 6
    sig = sigmas_from_schedule(sd, n, "trailing")
    calls, steps = [], []

    def denoiser(x, sigma):
        assert sigma.shape == (x.shape[0],) and (sigma > 0).all()  # never called at sigma = 0
        calls.append(x.shape[0])
        return gaussian_denoiser(x, sigma)

    def callback(i, x, denoised):
        steps.append((i, denoised.clone()))

    x = SAMPLERS[name](denoiser, prior_sample(10, float(sig[0]), 0), sig, callback=callback,
                       generator=torch.Generator().manual_seed(0))
    assert [i for i, _ in steps] == list(range(n))
    assert len(calls) == (2 * n - 1 if name in ("heun", "dpmpp_sde") else n)  # their last step is Euler
    assert torch.isfinite(x).all()
    if name != "lms":  # LMS extrapolates its derivative polynomial to 0
        torch.testing.assert_close(x, steps[-1][1], atol=1e-12, rtol=0)  # the step to 0 returns D


def test_only_stochastic_samplers_take_eta(sd):
    assert STOCHASTIC_SAMPLERS == {"ddim", "euler_a", "dpmpp_2m_sde", "dpmpp_sde"}
    for name, fn in SAMPLERS.items():
        assert ("eta" in inspect.signature(fn).parameters) == (name in STOCHASTIC_SAMPLERS)
        if name in STOCHASTIC_SAMPLERS:
            assert inspect.signature(fn).parameters["eta"].default == (0.0 if name == "ddim" else 1.0)
    sig = sigmas_from_schedule(sd, 3)
    x = prior_sample(4, float(sig[0]), 0)
    with pytest.raises(TypeError):
        sample_euler(gaussian_denoiser, x, sig, eta=0.5)
    for name in STOCHASTIC_SAMPLERS:
        with pytest.raises(ValueError, match="eta"):
            SAMPLERS[name](gaussian_denoiser, x, sig, eta=-1.0)


def test_bad_sigmas_are_rejected():
    x = torch.zeros(2, 2, dtype=torch.float64)
    for bad in ([1.0], [1.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0], [float("inf"), 0.0]):
        with pytest.raises(ValueError, match="sigmas"):
            sample_euler(gaussian_denoiser, x, torch.tensor(bad))
