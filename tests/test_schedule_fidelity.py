"""Our samplers against diffusers' schedulers on Stable Diffusion's schedule.

The same deterministic eps model (a small fixed random conv net with a timestep input) drives both
diffusers' loop (scale_model_input, model, step) and our sampler from the same starting point; the
final samples and the per-step x0 estimates must agree to 1e-4 relative.

State spaces differ: our samplers and diffusers' Euler schedulers hold the VE x = x0 + sigma * eps;
DDIM and DPM-Solver hold the VP x_t = alpha_t * x, alpha_t = 1 / sqrt(sigma^2 + 1). The tests convert
the starting point and the result between the two.
"""

import math

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from ldm.diffusion import Denoiser, Schedule, make_betas, sample_ddim, sample_dpmpp_2m, sample_euler  # noqa: E402
from ldm.diffusion import sample_dpmpp_2m_sde, sample_dpmpp_sde, sample_euler_a, sample_lms  # noqa: E402
from ldm.diffusion import sample_uni_pc, sample_uni_pc_bh2, sigmas_from_schedule  # noqa: E402

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
SCHEDULE = Schedule.from_betas(make_betas("scaled_linear", 1000, 0.00085, 0.012))
SHAPE = (2, 4, 8, 8)


class EpsNet(nn.Module):
    """A fixed random eps predictor eps(x_t, t): two convolutions and a smooth timestep embedding."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
            self.time = nn.Linear(4, 16)
            self.conv_out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x_t.shape[0])
        freqs = torch.tensor([1 / 100, 1 / 250, 1 / 500, 1 / 1000])
        emb = torch.cat([torch.sin(t[:, None] * freqs[:2]), torch.cos(t[:, None] * freqs[2:])], dim=1)  # (B, 4)
        h = torch.tanh(self.conv_in(x_t) + self.time(emb)[:, :, None, None])
        return 0.5 * x_t + 0.5 * self.conv_out(h)


MODEL = EpsNet().eval()

# diffusers' schedulers build numpy arrays from tensors in a way numpy 2 warns about; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def ours(sampler, x, sigmas, **kwargs):
    """Run one of our samplers with the eps model; returns (final x, list of x0 estimates)."""
    x0s = []
    denoiser = Denoiser(MODEL, SCHEDULE, "eps")
    with torch.no_grad():
        out = sampler(denoiser, x, sigmas, callback=lambda i, x_i, d: x0s.append(d), **kwargs)
    return out, x0s


def theirs(scheduler, x, **step_kwargs):
    """diffusers' sampling loop; returns (final sample, list of pred_original_sample or None)."""
    x0s = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = MODEL(scheduler.scale_model_input(x, t), t)
            out = scheduler.step(eps, t, x, **step_kwargs)
            x0s.append(getattr(out, "pred_original_sample", None))
            x = out.prev_sample
    return x, x0s


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def alpha(sigma) -> float:
    """VP alpha_t of a VE sigma."""
    return 1 / math.sqrt(float(sigma) ** 2 + 1)


def assert_rel(actual, expected, tol=1e-4):
    err = float((actual - expected).abs().max() / expected.abs().max())
    assert err < tol, f"relative error {err:.2e} > {tol:.0e}"


def assert_x0s(ours_x0s, their_x0s, tol=1e-4):
    assert len(ours_x0s) == len(their_x0s)
    for a, b in zip(ours_x0s, their_x0s):
        assert_rel(a, b, tol)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers_ddim_with_set_alpha_to_one(spacing, steps):
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                    timestep_spacing=spacing)
    sched.set_timesteps(steps)
    sigmas = sigmas_from_schedule(SCHEDULE, steps, spacing)
    torch.testing.assert_close(sigmas[:-1], SCHEDULE.sigmas[sched.timesteps], rtol=1e-12, atol=0)
    z = noise()  # diffusers starts from x_T = z in VP space; ours from its VE form z / alpha
    expected, their_x0s = theirs(sched, z, eta=0.0)
    result, our_x0s = ours(sample_ddim, z / alpha(sigmas[0]), sigmas)
    assert_rel(result, expected)  # set_alpha_to_one: the last VP sample is x0, our VE x at sigma 0
    assert_x0s(our_x0s, their_x0s)


def test_ddim_ending_at_sigma_min_matches_sd_config_set_alpha_to_one_false():
    # SD ships DDIM with set_alpha_to_one=False: the last step goes to alphas_cumprod[0] (VE sigma
    # 0.029), not to 0. Our samplers take any decreasing sigmas, so ending the list at sigma_min
    # reproduces it; the pipeline ends at 0 (see docs/sampling.md).
    sched = diffusers.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading")
    sched.set_timesteps(20)
    sigmas = sigmas_from_schedule(SCHEDULE, 20, "leading")
    sigmas[-1] = SCHEDULE.sigma_min
    z = noise(1)
    expected, their_x0s = theirs(sched, z, eta=0.0)
    result, our_x0s = ours(sample_ddim, z / alpha(sigmas[0]), sigmas)
    assert_rel(result * alpha(SCHEDULE.sigma_min), expected)  # diffusers returns the VP sample
    assert_x0s(our_x0s, their_x0s)
    # and with the pipeline's final sigma 0 the difference is the leftover noise of std ~0.03
    to_zero, _ = ours(sample_ddim, z / alpha(sigmas[0]), sigmas_from_schedule(SCHEDULE, 20, "leading"))
    assert 1e-3 < float((to_zero - expected).abs().max() / expected.abs().max()) < 0.2


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_matches_diffusers_euler_discrete(spacing):
    steps = 10  # with linspace, (T - 1) / (n - 1) = 111: integer timesteps, where sigma interpolation agrees
    sched = diffusers.EulerDiscreteScheduler(**SD, steps_offset=1, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    sigmas = sigmas_from_schedule(SCHEDULE, steps, spacing)
    torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=5e-5, atol=0)  # theirs: float32 alphas_cumprod
    x = noise(2) * sched.init_noise_sigma  # sigma_max, or sqrt(sigma_max^2 + 1) for leading
    expected, their_x0s = theirs(sched, x)
    result, our_x0s = ours(sample_euler, x, sigmas)
    assert_rel(result, expected)
    assert_x0s(our_x0s, their_x0s)


def test_euler_linspace_with_fractional_timesteps_differs_only_by_sigma_interpolation():
    # 25 steps: timesteps 999, 957.375, ... are fractional. diffusers interpolates sigma linearly
    # between grid points, we interpolate log-sigma: the sigmas differ by ~2e-5 relative (sigma
    # changes by under 1% per timestep, so the two interpolations nearly agree), the samples by less.
    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    sched.set_timesteps(25)
    sigmas = sigmas_from_schedule(SCHEDULE, 25, "linspace")
    sigma_err = float(((sigmas[:-1] - sched.sigmas[:-1].double()) / sched.sigmas[:-1].double()).abs().max())
    assert 1e-6 < sigma_err < 1e-4
    x = noise(3) * sched.init_noise_sigma
    expected, their_x0s = theirs(sched, x)
    result, our_x0s = ours(sample_euler, x, sigmas)
    assert_rel(result, expected)
    assert_x0s(our_x0s, their_x0s)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_euler_ancestral_matches_diffusers_with_the_same_generator(spacing):
    sched = diffusers.EulerAncestralDiscreteScheduler(**SD, steps_offset=1, timestep_spacing=spacing)
    sched.set_timesteps(15)
    sigmas = sigmas_from_schedule(SCHEDULE, 15, spacing)
    x = noise(4) * sched.init_noise_sigma
    expected, their_x0s = theirs(sched, x, generator=torch.Generator().manual_seed(7))
    result, our_x0s = ours(sample_euler_a, x, sigmas, generator=torch.Generator().manual_seed(7))
    assert_rel(result, expected)
    assert_x0s(our_x0s, their_x0s)


@pytest.mark.parametrize("sampler,algorithm", [(sample_dpmpp_2m, "dpmsolver++"), (sample_dpmpp_2m_sde, "sde-dpmsolver++")])
@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_and_2m_sde_match_diffusers_dpm_solver_multistep(sampler, algorithm, steps):
    # The SDE form: diffusers draws one randn of the latents' shape per step from the generator, as
    # we do (it also draws one on the last step, to sigma = 0, where the noise is multiplied by 0).
    sched = diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type=algorithm, solver_order=2,
                                                  timestep_spacing="trailing")
    sched.set_timesteps(steps)
    sigmas = sigmas_from_schedule(SCHEDULE, steps, "trailing")
    torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=5e-5, atol=0)  # theirs: float32 alphas_cumprod
    z = noise(5)  # VP state, init_noise_sigma 1
    expected, _ = theirs(sched, z, generator=torch.Generator().manual_seed(5))
    result, _ = ours(sampler, z / alpha(sigmas[0]), sigmas, generator=torch.Generator().manual_seed(5))
    assert_rel(result, expected)
    if algorithm == "sde-dpmsolver++":  # the noise is really used
        other, _ = ours(sampler, z / alpha(sigmas[0]), sigmas, generator=torch.Generator().manual_seed(6))
        assert float((other - expected).abs().max() / expected.abs().max()) > 0.1


def test_euler_karras_matches_diffusers_euler_with_karras_sigmas():
    sched = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)  # default linspace: full sigma range
    sched.set_timesteps(12)
    sigmas = sigmas_from_schedule(SCHEDULE, 12, "karras")
    torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=5e-5, atol=0)
    x = noise(6) * sched.init_noise_sigma
    expected, their_x0s = theirs(sched, x)
    result, our_x0s = ours(sample_euler, x, sigmas)
    assert_rel(result, expected)
    assert_x0s(our_x0s, their_x0s)


@pytest.mark.parametrize("spacing", ["linspace", "karras"])
def test_lms_matches_diffusers_lms_discrete(spacing):
    pytest.importorskip("scipy")  # diffusers integrates the LMS coefficients with scipy
    kw = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": "linspace"}
    sched = diffusers.LMSDiscreteScheduler(**SD, **kw)
    sched.set_timesteps(10)  # linspace: integer timesteps, where sigma interpolation agrees
    sigmas = sigmas_from_schedule(SCHEDULE, 10, spacing)
    torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=5e-5, atol=0)
    x = noise(7) * sched.init_noise_sigma
    expected, their_x0s = theirs(sched, x)
    result, our_x0s = ours(sample_lms, x, sigmas)
    assert_rel(result, expected)
    assert_x0s(our_x0s, their_x0s)


@pytest.mark.parametrize("steps", [5, 12, 20])
def test_uni_pc_bh2_matches_diffusers_unipc_multistep(steps):
    sched = diffusers.UniPCMultistepScheduler(**SD, solver_order=3, solver_type="bh2", timestep_spacing="trailing")
    sched.set_timesteps(steps)
    sigmas = sigmas_from_schedule(SCHEDULE, steps, "trailing")
    torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=5e-5, atol=0)
    z = noise(8)  # VP state
    expected, _ = theirs(sched, z)
    result, _ = ours(sample_uni_pc_bh2, z / alpha(sigmas[0]), sigmas)
    assert_rel(result, expected)


@pytest.mark.parametrize("sampler,variant", [(sample_uni_pc, "bh1"), (sample_uni_pc_bh2, "bh2")])
@pytest.mark.parametrize("steps", [5, 12])
def test_uni_pc_ending_at_sigma_min_matches_diffusers(sampler, variant, steps):
    # diffusers' bh1 variant returns NaN on a final step to sigma = 0 (B(h) = -h is infinite there),
    # so both variants are compared on a schedule ending at sigma_min, where every step, predictor
    # and corrector, is a regular one. (Ours ends at 0 with D, the first-order step's limit.)
    sched = diffusers.UniPCMultistepScheduler(**SD, solver_order=3, solver_type=variant, timestep_spacing="trailing",
                                              final_sigmas_type="sigma_min")
    sched.set_timesteps(steps)
    sigmas = sigmas_from_schedule(SCHEDULE, steps, "trailing")
    sigmas[-1] = SCHEDULE.sigma_min
    z = noise(9)
    expected, _ = theirs(sched, z)
    result, _ = ours(sampler, z / alpha(sigmas[0]), sigmas)
    assert_rel(result * alpha(SCHEDULE.sigma_min), expected)  # diffusers returns the VP sample


class BrownianPath:
    """A Brownian motion W(sigma) sampled exactly at given descending points (W = 0 at the first),
    its increments drawn in order from a generator; called like diffusers' BrownianTreeNoiseSampler:
    (sigma, sigma_next) -> (W(sigma_next) - W(sigma)) / sqrt(|sigma - sigma_next|)."""

    def __init__(self, points: list[float], generator: torch.Generator):
        self.points, self.w = points, [torch.zeros(SHAPE)]
        for a, b in zip(points, points[1:]):
            self.w.append(self.w[-1] + math.sqrt(a - b) * torch.randn(SHAPE, generator=generator))

    def _index(self, sigma) -> int:
        return min(range(len(self.points)), key=lambda k: abs(self.points[k] - float(sigma)))

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        i, j = self._index(sigma), self._index(sigma_next)
        return (self.w[j] - self.w[i]) / math.sqrt(abs(self.points[i] - self.points[j]))


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("steps", [8, 15])
def test_dpmpp_sde_matches_diffusers_dpmsolver_sde_on_the_same_brownian_path(spacing, steps):
    # diffusers draws this sampler's noise from a torchsde Brownian tree. Both sides get the same
    # path instead: W sampled at every noise level a step visits (sigma_i and the midpoint
    # sqrt(sigma_i sigma_i+1)), with increments drawn in that order, which is exactly the order in
    # which our sampler draws its two normals per step from the generator.
    pytest.importorskip("torchsde")
    kw = {"use_karras_sigmas": True} if spacing == "karras" else {"timestep_spacing": spacing}
    sched = diffusers.DPMSolverSDEScheduler(**SD, **kw)
    sched.set_timesteps(steps)
    sigmas = sigmas_from_schedule(SCHEDULE, steps, spacing)
    s = sigmas.tolist()
    points = [p for a, b in zip(s[:-2], s[1:-1]) for p in (a, math.sqrt(a * b))] + [s[-2]]
    sched.noise_sampler = BrownianPath(points, torch.Generator().manual_seed(9))
    x = noise(11) * sched.init_noise_sigma
    expected, their_x0s = theirs(sched, x)  # two steps per sigma: x0 at sigma_i, then at the midpoint
    result, our_x0s = ours(sample_dpmpp_sde, x, sigmas, generator=torch.Generator().manual_seed(9))
    assert_rel(result, expected, tol=1e-5)  # karras: their float32 midpoint timesteps, ~1.5e-6
    assert_x0s(our_x0s, their_x0s[::2], tol=1e-5)
