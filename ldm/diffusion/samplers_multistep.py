"""Multistep samplers: DPM-Solver++(2M), linear multistep (LMS) and UniPC, one denoiser call per step.

Each reuses the x0 estimates of earlier steps to reach a higher order without extra calls. The
contract is `sampler_core`'s; `generator` is accepted for the common signature and never used.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .sampler_core import Denoise, GeneratorArg, StepCallback, call_denoiser, check_args, randn_like

__all__ = ["sample_dpmpp_2m", "sample_lms", "sample_uni_pc", "sample_uni_pc_bh2", "lms_coefficients"]

LMS_ORDER = 4  # k-diffusion's and diffusers' default
UNI_PC_ORDER = 3  # the UniPC paper's choice for guided sampling, and A1111's and ComfyUI's


def dpmpp_2m(
    denoiser: Denoise, x: Tensor, sigmas: Tensor, extra_args: dict | None, generator: GeneratorArg,
    callback: StepCallback | None, eta: float,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), and with eta > 0 its SDE form (sec. 4.3 / eq. 18,
    k-diffusion's midpoint variant). With h = log(sigma / sigma') and r = h_{i-1} / h_i:

    x' = (sigma' / sigma) e^{-eta h} x + (1 - e^{-(1 + eta) h}) (D_i + (D_i - D_{i-1}) / (2 r))
         + sigma' sqrt(1 - e^{-2 eta h}) z

    eta = 0 is Alg. 2 (line 8 rewritten: (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} = D_i + (D_i - D_{i-1}) / (2r));
    the first-order part is exact for a constant D. The first step is first order, the step to
    sigma = 0 returns D.
    """
    sig, extra = check_args(x, sigmas, extra_args)
    prev_denoised: Tensor | None = None
    h_prev = 0.0
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        denoised = call_denoiser(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        if s_next == 0:
            return denoised
        h = math.log(s / s_next)
        weight = -math.expm1(-(1 + eta) * h)  # 1 - e^{-(1 + eta) h}
        d = denoised
        if prev_denoised is not None:
            d = denoised + (h / h_prev / 2) * (denoised - prev_denoised)  # multistep (midpoint) correction
        x = (s_next / s) * math.exp(-eta * h) * x + weight * d
        if eta > 0:
            x = x + s_next * math.sqrt(-math.expm1(-2 * eta * h)) * randn_like(x, generator)
        prev_denoised, h_prev = denoised, h
    return x


def sample_dpmpp_2m(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second order at one denoiser call per step."""
    return dpmpp_2m(denoiser, x, sigmas, extra_args, generator, callback, eta=0.0)


# ---------------------------------------------------------------------------------------------
# Linear multistep (LMS)
# ---------------------------------------------------------------------------------------------


def lms_coefficients(sig: list[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights in sigma for the step sig[i] -> sig[i + 1] from the derivatives at
    sig[i], sig[i - 1], ..., sig[i - order + 1] (newest first).

    Weight j is the integral over [sig[i], sig[i + 1]] of the Lagrange basis polynomial that is 1 at
    sig[i - j] and 0 at the other nodes. The polynomial has degree order - 1 <= 3, so two-point
    Gauss-Legendre quadrature integrates it exactly (k-diffusion and diffusers integrate the same
    polynomial adaptively to 1e-4 relative).
    """
    nodes = [sig[i - k] for k in range(order)]
    a, b = sig[i], sig[i + 1]
    mid, half = (a + b) / 2, (b - a) / 2
    taus = (mid - half / math.sqrt(3), mid + half / math.sqrt(3))

    def basis(j: int, tau: float) -> float:
        out = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                out *= (tau - node) / (nodes[j] - node)
        return out

    return [half * sum(basis(j, tau) for tau in taus) for j in range(order)]


def sample_lms(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Linear multistep (Adams-Bashforth) on the probability-flow ODE in sigma, order 4 once four
    derivatives are known (orders 1, 2, 3 before): x' = x + sum_j c_j d_{i-j}.

    Unlike the other samplers, its last step to sigma = 0 extrapolates the derivative polynomial
    instead of returning D, as in k-diffusion and diffusers.
    """
    sig, extra = check_args(x, sigmas, extra_args)
    ds: list[Tensor] = []  # derivatives, newest last
    for i in range(len(sig) - 1):
        denoised = call_denoiser(denoiser, x, sig[i], extra)
        if callback is not None:
            callback(i, x, denoised)
        ds = [*ds[-(LMS_ORDER - 1):], (x - denoised) / sig[i]]
        coeffs = lms_coefficients(sig, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


# ---------------------------------------------------------------------------------------------
# UniPC
# ---------------------------------------------------------------------------------------------


def _unipc_terms(rks: list[float], h: float, variant: str) -> tuple[float, float, Tensor, Tensor]:
    """The coefficients of one UniPC update in data prediction (Zhao et al. 2023, Alg. 2 and 3).

    rks are the history's step ratios (lambda_k - lambda_0) / h, with 1 appended for the new point.
    Returns h phi_1(-h) = e^{-h} - 1, B(h) (bh1: -h, bh2: e^{-h} - 1), and the matrix R with
    R[j, k] = rks[k]^j and vector b with b_j = (j+1)! h phi_{j+2}(-h) / B(h) of the order conditions.
    """
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for j in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= j + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor(rks, dtype=torch.float64)
    R = torch.stack([r**j for j in range(len(rks))])  # (order, order)
    return h_phi_1, b_h, R, torch.tensor(b, dtype=torch.float64)


def _unipc_step(
    x: Tensor, s: float, s_next: float, lams: list[float], ms: list[Tensor], variant: str, new: Tensor | None
) -> Tensor:
    """One UniP predictor step (new=None) or UniC corrector step (new = D at the predicted point)
    from sigma s to s_next, of order len(ms) (+ the new point for UniC), in VE form.

    ms are the x0 estimates at the noise levels whose lambdas are lams, newest (at s) last.
    """
    h = math.log(s / s_next)
    m0 = ms[-1]
    history = list(zip(lams[-2::-1], ms[-2::-1]))  # (lambda_k, m_k) for older points, newest first
    rks = [(lam_k - lams[-1]) / h for lam_k, _ in history] + [1.0]
    d1s = [(m_k - m0) / rk for (_, m_k), rk in zip(history, rks)]
    h_phi_1, b_h, R, b = _unipc_terms(rks, h, variant)
    x_next = (s_next / s) * x - h_phi_1 * m0  # first-order part; VP x_t_ of diffusers divided by alpha_t
    if new is None:  # predictor of order p = len(ms): fit the p - 1 history differences
        if not d1s:
            return x_next
        rhos = [0.5] if len(d1s) == 1 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_next - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rhos = [0.5] if not d1s else torch.linalg.solve(R, b).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(m0))
    return x_next - b_h * (correction + rhos[-1] * (new - m0))


def _uni_pc(denoiser, x, sigmas, extra_args, callback, variant: str, order: int = UNI_PC_ORDER) -> Tensor:
    """UniPC (Zhao et al. 2023): a multistep predictor (UniP) whose result is corrected (UniC) with
    the denoiser's output at the predicted point, the same output the next predictor step uses, so
    the corrector costs no extra call. The predictor's order ramps up to `order` over the first
    steps and down to 1 over the last ones (diffusers' lower_order_final); the step to sigma = 0
    returns D. The last result is not corrected.
    """
    sig, extra = check_args(x, sigmas, extra_args)
    n = len(sig) - 1
    ms: list[Tensor] = []  # x0 estimates, newest last (at most `order`)
    lams: list[float] = []  # their lambdas = -log(sigma)
    x_start, p_prev = x, 0  # the corrected point the last predictor started from, and its order
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        denoised = call_denoiser(denoiser, x, s, extra)
        if callback is not None:
            callback(i, x, denoised)
        if i > 0:  # UniC: correct the predicted x with the output at x (Alg. 3)
            x = _unipc_step(x_start, sig[i - 1], s, lams[-p_prev:], ms[-p_prev:], variant, denoised)
        ms, lams = [*ms, denoised][-order:], [*lams, -math.log(s)][-order:]
        if s_next == 0:
            return denoised  # the first-order step to sigma = 0
        p = min(order, n - i, i + 1)
        x_start, p_prev = x, p
        x = _unipc_step(x, s, s_next, lams[-p:], ms[-p:], variant, None)  # UniP (Alg. 2)
    return x


def sample_uni_pc(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC, variant B(h) = h ("bh1"), order 3: the variant A1111 and ComfyUI call UniPC / uni_pc."""
    return _uni_pc(denoiser, x, sigmas, extra_args, callback, "bh1")


def sample_uni_pc_bh2(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict | None = None,
    generator: GeneratorArg = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC, variant B(h) = e^h - 1 ("bh2", diffusers' default variant), order 3."""
    return _uni_pc(denoiser, x, sigmas, extra_args, callback, "bh2")
