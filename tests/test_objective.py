import itertools

import pytest
import torch

from ldm.config import DiffusionConfig
from ldm.diffusion import (
    PREDICTION_TYPES,
    Denoiser,
    Schedule,
    convert_prediction,
    diffusion_loss,
    min_snr_weight,
    pred_to_eps,
    pred_to_x0,
    q_sample,
    sample_timesteps,
    snr,
    target_for,
)


@pytest.fixture(scope="module")
def sd() -> Schedule:
    return Schedule.from_config(DiffusionConfig())


def _batch(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 3, 4, 5, generator=g, dtype=dtype)
    eps = torch.randn(6, 3, 4, 5, generator=g, dtype=dtype)
    alpha = torch.linspace(0.1, 0.999, 6, dtype=dtype)
    sigma = (1 - alpha**2).sqrt()
    return x0, eps, alpha, sigma


@pytest.mark.parametrize("vp", [True, False])
@pytest.mark.parametrize("src,dst", list(itertools.product(PREDICTION_TYPES, PREDICTION_TYPES)))
def test_conversions_are_exact(src, dst, vp):
    x0, eps, alpha, sigma = _batch()
    if not vp:  # the algebra holds for any (alpha, sigma), not only alpha^2 + sigma^2 = 1
        sigma = torch.linspace(0.2, 3.0, 6, dtype=torch.float64)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    truth = {"x0": x0, "eps": eps, "v": a * eps - s * x0}
    got = convert_prediction(truth[src], x_t, alpha, sigma, src, dst)
    assert (got - truth[dst]).abs().max().item() < 1e-12
    back = convert_prediction(got, x_t, alpha, sigma, dst, src)
    assert (back - truth[src]).abs().max().item() < 1e-12


def test_pred_to_x0_and_eps_helpers():
    x0, eps, alpha, sigma = _batch(1)
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    x_t = a * x0 + s * eps
    v = a * eps - s * x0
    assert (pred_to_x0(v, x_t, alpha, sigma, "v") - x0).abs().max() < 1e-12
    assert (pred_to_eps(v, x_t, alpha, sigma, "v") - eps).abs().max() < 1e-12
    # scalar coefficients broadcast too
    assert (pred_to_x0(eps[:1], x_t[:1], alpha[0].item(), sigma[0].item(), "eps") - x0[:1]).abs().max() < 1e-12
    with pytest.raises(ValueError, match="eps, v, x0"):
        pred_to_x0(v, x_t, alpha, sigma, "score")


def test_q_sample_and_targets(sd):
    x0, eps, _, _ = _batch(2)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    a, s = sd.alpha_sigma(t, dtype=torch.float64)
    x_t = q_sample(x0, t, eps, sd)
    torch.testing.assert_close(x_t, a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps)
    for ptype in PREDICTION_TYPES:
        target = target_for(ptype, x0, eps, a, s)
        # the target is what a perfect model predicts: converting it back recovers x0 ...
        assert (pred_to_x0(target, x_t, a, s, ptype) - x0).abs().max() < 1e-10
        # ... and scores zero loss, with or without min-SNR weighting
        assert diffusion_loss(target, x0, eps, t, sd, ptype).item() == 0
        assert diffusion_loss(target, x0, eps, t, sd, ptype, min_snr_gamma=5.0).item() == 0
        assert diffusion_loss(target + 1, x0, eps, t, sd, ptype).item() == pytest.approx(1.0)


def test_loss_per_sample_and_min_snr_weights(sd):
    x0, eps, _, _ = _batch(3)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    snr_t = snr(t, sd, dtype=torch.float64)
    ac = sd.alphas_cumprod[t]
    torch.testing.assert_close(snr_t, ac / (1 - ac))
    gamma = 5.0
    for ptype in PREDICTION_TYPES:
        a, s = sd.alpha_sigma(t, dtype=torch.float64)
        mse = (out - target_for(ptype, x0, eps, a, s)).square().mean(dim=(1, 2, 3))
        plain = diffusion_loss(out, x0, eps, t, sd, ptype, reduction="none")
        torch.testing.assert_close(plain, mse)
        assert diffusion_loss(out, x0, eps, t, sd, ptype).item() == pytest.approx(mse.mean().item())
        weighted = diffusion_loss(out, x0, eps, t, sd, ptype, min_snr_gamma=gamma, reduction="none")
        clipped = torch.minimum(snr_t, torch.tensor(gamma, dtype=torch.float64))
        expect = {"eps": clipped / snr_t, "v": clipped / (snr_t + 1), "x0": clipped}[ptype]
        torch.testing.assert_close(weighted, mse * expect)
    # high-noise steps (snr < gamma) keep weight 1 for eps; low-noise ones are down-weighted
    w = min_snr_weight(snr_t, gamma, "eps")
    assert w[-1].item() == 1.0 and w[0].item() == pytest.approx(gamma / snr_t[0].item())


def test_min_snr_eps_weight_at_zero_terminal_snr_is_finite():
    z = Schedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    w = min_snr_weight(snr(torch.tensor([999]), z), 5.0, "eps")
    assert w.item() == 1.0


def test_min_snr_floor_keeps_high_noise_weight(sd):
    z = Schedule.from_config(DiffusionConfig(zero_terminal_snr=True))
    t = torch.tensor([0, 300, 800, 999])
    for sched in (sd, z):
        snr_t = snr(t, sched, dtype=torch.float64)
        # x0 weight max(min(snr, 5), 0.3); v = x0 weight / (snr + 1)
        x0_w = snr_t.clamp(max=5.0).clamp(min=0.3)
        torch.testing.assert_close(min_snr_weight(snr_t, 5.0, "x0", floor=0.3), x0_w)
        torch.testing.assert_close(min_snr_weight(snr_t, 5.0, "v", floor=0.3), x0_w / (snr_t + 1))
    # at zero SNR plain Min-SNR gives v nothing to learn from; the floor gives it 0.3 of the x0 loss
    snr_T = snr(torch.tensor([999]), z, dtype=torch.float64)
    assert min_snr_weight(snr_T, 5.0, "v").item() == 0.0
    assert min_snr_weight(snr_T, 5.0, "v", floor=0.3).item() == pytest.approx(0.3)
    # steps above the floor keep their Min-SNR weight exactly
    mid = snr(torch.tensor([300]), sd, dtype=torch.float64)
    assert min_snr_weight(mid, 5.0, "v", floor=0.3).item() == pytest.approx(min_snr_weight(mid, 5.0, "v").item())
    with pytest.raises(ValueError, match="for v or x0 prediction"):
        min_snr_weight(snr_T, 5.0, "eps", floor=0.3)
    with pytest.raises(ValueError, match=r"floor must be in \[0, gamma"):
        min_snr_weight(snr_T, 5.0, "v", floor=6.0)


def test_timestep_sampling_uniform_and_shifted():
    # shift 1 is the plain uniform draw, the same numbers from the same generator
    uniform = sample_timesteps(5000, 1000, 1.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(uniform, torch.randint(0, 1000, (5000,), generator=torch.Generator().manual_seed(3)))
    # shift s maps u to s u / (1 + (s - 1) u): P(t >= 1000 x) = 1 - x / (s - (s - 1) x)
    for shift in (3.0, 0.5):
        t = sample_timesteps(40000, 1000, shift, torch.Generator().manual_seed(0))
        assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
        for x in (0.25, 0.5, 0.75, 0.95):
            expected = 1 - x / (shift - (shift - 1) * x)
            assert (t >= 1000 * x).float().mean().item() == pytest.approx(expected, abs=0.01)
    assert (sample_timesteps(40000, 1000, 3.0, torch.Generator().manual_seed(0)) >= 750).float().mean() == \
        pytest.approx(0.5, abs=0.01)  # the docstring's "half above 3/4"
    with pytest.raises(ValueError, match="shift must be > 0"):
        sample_timesteps(4, 1000, 0.0, torch.Generator())


def test_loss_argument_errors(sd):
    x0, eps, _, _ = _batch()
    t = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        diffusion_loss(x0, x0, eps, t, sd, "eps", reduction="sum")
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion_loss(x0, x0, eps, t, sd, "eps", min_snr_gamma=0)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_denoiser_recovers_x0_from_a_perfect_network(sd, ptype):
    """A network that knows x0 and eps returns the right target; the Denoiser must turn it into x0
    in VE space, calling the network at the schedule timestep with x_t = x / sqrt(sigma^2 + 1)."""
    x0, eps, _, _ = _batch(4, dtype=torch.float32)
    t_int = torch.tensor([0, 3, 100, 500, 998, 999])
    sigma = sd.sigmas[t_int].float()  # (B,) VE sigmas on the grid
    x = x0 + sigma.view(-1, 1, 1, 1) * eps
    seen = {}

    def net(x_t, t):
        seen["t"], seen["x_t"] = t, x_t
        a, s = sd.alpha_sigma(t.round().long())
        n = x_t.shape[0]
        return target_for(ptype, x0[:n], eps[:n], a, s)

    den = Denoiser(net, sd, ptype)
    got = den(x, sigma)
    assert got.dtype == torch.float32
    torch.testing.assert_close(seen["t"], t_int.float())
    a, s = sd.alpha_sigma(t_int)
    torch.testing.assert_close(seen["x_t"], a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, x0, atol=2e-4, rtol=1e-4)
    # a scalar sigma is applied to every sample
    out = den(x[:2], sigma[1])
    assert seen["t"].shape == (2,) and (seen["t"] == 3).all() and out.shape == x[:2].shape
    assert den.sigma_min == sd.sigma_min and den.sigma_max == sd.sigma_max
