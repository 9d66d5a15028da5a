"""Tests of the log-likelihoods (``QuotientDiffusion.log_prob``, ``sample(..., return_log_prob=True)``,
:mod:`qmanifold.likelihood`) against closed forms.

* Orbit volumes and the prior on Q: ``log vol(G x)`` against hand-written closed forms (SO(2),
  SO(3), T^2), and the density of the prior on Q against the law of explicit invariants (the
  Rayleigh law; Jacobi coordinates of a triangle, with the quotient metric computed numerically
  from horizontal projections), which checks the group volumes 2 pi and 8 pi^2.
* Gaussian targets with exact linear denoisers: isotropic ``N(0, s^2 I)`` on M, and
  ``N(0, C (x) I_d)`` with a covariance C over the points (rotation invariant, not radial: the
  horizontal projection of the velocity is not the velocity, so the lifted ODE is a different map
  with the same density). ``log_prob`` on M and on Q equals the closed form; the three routes
  (through M, through Q with the horizontal trace, through Q with the curvature term) agree;
  dropping the orbit-volume / curvature terms is far off.
* The SO(2) toy of ``qmanifold.verify`` with its exact denoiser: its density on M is closed form
  (a Bessel function of the invariants), on Q times ``2 pi |x|``.
* Hutchinson: unbiased, with the documented variance (per evaluation, and along a path).
* ``sample(..., return_log_prob=True)`` agrees with ``log_prob`` at the samples; masks, chunks,
  the harmonic prior, the equivariance check and bad options.

All tests are deterministic (fixed seeds) and run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qmanifold import GeneralInterpolant, HarmonicPrior, Quotient, QuotientDiffusion, groups, make_interpolant
from qmanifold import likelihood as L
from qmanifold.masking import apply_mask, center
from qmanifold.verify.targets import make_target

F64 = torch.float64
LINEAR = make_interpolant("linear")
SE2, SE3, SO2 = Quotient(groups.SE2), Quotient(groups.SE3), Quotient(groups.SO2)

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# closed forms written independently of the library


def log_vol_closed_form(x: torch.Tensor, d: int) -> torch.Tensor:
    """log vol of the SO(d) orbit of centred x: 2 pi sqrt(sum |x_n|^2) (d = 2), 8 pi^2 sqrt(det K) (d = 3)."""
    if d == 2:
        return math.log(2 * math.pi) + 0.5 * torch.log(x.square().sum((-2, -1)))
    eye = torch.eye(3, dtype=x.dtype)
    K = (x.square().sum(-1)[..., None, None] * eye - x[..., :, None] * x[..., None, :]).sum(-3)
    return math.log(8 * math.pi**2) + 0.5 * torch.logdet(K)


def com_free_basis(n: int) -> torch.Tensor:
    """An orthonormal basis (n, n-1) of the vectors over n points with zero sum."""
    q, _ = torch.linalg.qr((torch.eye(n, dtype=F64) - 1.0 / n)[:, : n - 1])
    return q


class PointGaussian(nn.Module):
    """Target ``x1 = U diag(sqrt(lam)) xi`` per spatial coordinate (covariance ``U diag(lam) U^T (x) I_d``
    over the points), with its exact denoiser ``E[x1 | x_t] = U diag(beta lam / (ahat^2 + beta^2 lam)) U^T x_t``
    (linear, rotation-equivariant, supported on span U)."""

    def __init__(self, U: torch.Tensor, lam, interp=LINEAR):
        super().__init__()
        self.U, self.lam, self.interp = U, torch.as_tensor(lam, dtype=F64), interp

    def forward(self, x, t, mask=None):
        a, b = self.interp.ahat(t)[:, None], self.interp.beta(t)[:, None]
        gain = b * self.lam / (a * a + b * b * self.lam)
        return torch.einsum("nk,bk,bkd->bnd", self.U, gain, torch.einsum("nk,bnd->bkd", self.U, x))

    def sample(self, n: int, d: int, seed: int) -> torch.Tensor:
        xi = torch.randn(n, self.U.shape[1], d, generator=gen(seed), dtype=F64)
        return torch.einsum("nk,bkd->bnd", self.U, self.lam.sqrt()[:, None] * xi)

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("nk,bnd->bkd", self.U, x)
        return (-0.5 * y.square() / self.lam[:, None] - 0.5 * torch.log(2 * math.pi * self.lam[:, None])).sum((-2, -1))


class IsotropicGaussian(nn.Module):
    """``x1 ~ N(0, s^2 I)`` on M (CoM-free with translations): ``E[x1 | x_t] = beta s^2 / (beta^2 s^2 + ahat^2) Pi x_t``
    (mask-aware)."""

    def __init__(self, s: float, translations: bool = True):
        super().__init__()
        self.s, self.translations = s, translations

    def forward(self, x, t, mask=None):
        a, b = LINEAR.ahat(t)[:, None, None], LINEAR.beta(t)[:, None, None]
        xc = center(x, mask) if self.translations else apply_mask(x, mask)
        return b * self.s**2 / (b * b * self.s**2 + a * a) * xc

    def log_density(self, x, n_real: torch.Tensor, d: int) -> torch.Tensor:
        n = (n_real - (1 if self.translations else 0)) * d
        return -x.square().sum((-2, -1)) / (2 * self.s**2) - 0.5 * n * math.log(2 * math.pi * self.s**2)


class ExactToy(nn.Module):
    """The exact denoiser of a toy target of qmanifold.verify."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, t, mask=None):
        return self.target.denoise(x, LINEAR.ahat(t), LINEAR.beta(t))


class NotEquivariant(nn.Module):
    """A smooth per-configuration map that is not rotation-equivariant."""

    def forward(self, x, t, mask=None):
        return apply_mask(torch.tanh(1.3 * x + 0.2) * (1.0 + t)[:, None, None] + 0.3 * x.roll(1, -2), mask)


def so2_toy_log_density(target, x: torch.Tensor) -> torch.Tensor:
    """Density on M of ``x1 = R_theta (c + sigma xi)``: the average over theta of a Gaussian on M,
    ``(2 pi s^2)^{-n/2} exp(-(|x|^2 + |c|^2)/(2 s^2)) I_0(|(a, b)| / s^2)`` with
    ``a = sum x_n . c_n``, ``b = sum x_n x c_n`` (``n = 2 (N - 1)``)."""
    c, s = target.template.to(F64), target.sigma_data
    n = 2 * (x.shape[1] - 1)
    a = (x * c).sum((-2, -1))
    b = (x[..., 0] * c[:, 1] - x[..., 1] * c[:, 0]).sum(-1)
    kappa = torch.hypot(a, b) / s**2
    return (-0.5 * n * math.log(2 * math.pi * s**2) - (x.square().sum((-2, -1)) + c.square().sum()) / (2 * s**2)
            + torch.log(torch.special.i0e(kappa)) + kappa)


# ----------------------------------------------------------------------------------------------
# orbit volumes and the prior on Q


def test_log_orbit_volume_matches_closed_forms():
    x2 = center(torch.randn(7, 5, 2, generator=gen(0), dtype=F64))
    x3 = center(torch.randn(7, 5, 3, generator=gen(1), dtype=F64))
    torch.testing.assert_close(L.log_orbit_volume(SE2, x2), log_vol_closed_form(x2, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(L.log_orbit_volume(SE3, x3), log_vol_closed_form(x3, 3), rtol=0, atol=1e-12)
    # no translations: the same formula on all of R^{N d} (x not centred)
    y2 = torch.randn(7, 5, 2, generator=gen(2), dtype=F64)
    torch.testing.assert_close(L.log_orbit_volume(SO2, y2), log_vol_closed_form(y2, 2), rtol=0, atol=1e-12)
    # T^2 on one point of C^2: a torus of radii |z_1|, |z_2|, volume (2 pi)^2 |z_1| |z_2|
    z = torch.randn(7, 1, 4, generator=gen(3), dtype=F64)
    expected = 2 * math.log(2 * math.pi) + torch.log(z[:, 0, :2].norm(dim=-1) * z[:, 0, 2:].norm(dim=-1))
    torch.testing.assert_close(L.log_orbit_volume(Quotient(groups.Torus(2)), z), expected, rtol=0, atol=1e-12)
    # permutations add log N_real!
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    lv = L.log_orbit_volume(Quotient(groups.SE3xS_N), center(x3[:2], mask), mask)
    torch.testing.assert_close(lv - L.log_orbit_volume(SE3, center(x3[:2], mask), mask),
                               torch.tensor([math.lgamma(6), math.lgamma(4)], dtype=F64))


def test_prior_density_on_q_is_the_rayleigh_law_for_two_points():
    """SE(2), N = 2: M = R^2, Q = [0, inf) with coordinate r = |x|; the standard Gaussian on M pushed
    to Q has density r exp(-r^2/2) (Rayleigh). The wrong variant without the orbit volume is not a
    density on Q."""
    x = center(torch.randn(50, 2, 2, generator=gen(4), dtype=F64))
    r = x.square().sum((-2, -1)).sqrt()
    log_q = L.gaussian_log_density(x) + L.log_orbit_volume(SE2, x)
    torch.testing.assert_close(log_q, torch.log(r) - 0.5 * r * r, rtol=0, atol=1e-12)
    assert (L.gaussian_log_density(x) - (torch.log(r) - 0.5 * r * r)).abs().min() > 0.1


def _jacobi(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Three points with orthonormal Jacobi coordinates u = (x2 - x1)/sqrt2, w = (2 x3 - x1 - x2)/sqrt6."""
    return torch.stack([-u / math.sqrt(2) - w / math.sqrt(6), u / math.sqrt(2) - w / math.sqrt(6), 2 * w / math.sqrt(6)])


@pytest.mark.parametrize("d", [2, 3])
def test_prior_density_on_q_matches_the_law_of_triangle_invariants(d):
    """Triangles (N = 3) under SE(d) with the standard Gaussian prior on M. The invariants
    (a, b, phi) = (|u|, |w|, angle(u, w)) of the Jacobi coordinates have a closed-form law
    (d = 2: a e^{-a^2/2} b e^{-b^2/2} / (2 pi); d = 3: chi_3(a) chi_3(b) sin(phi)/2). It must equal
    q_Q(x) sqrt(det g_Q) with g_Q the quotient metric in these coordinates, computed numerically as
    the Gram matrix of the horizontal projections of the coordinate tangents."""
    quotient = SE2 if d == 2 else SE3
    g = gen(5 + d)
    for _ in range(5):
        a, b = 0.3 + 2 * torch.rand(2, generator=g, dtype=F64)
        phi = (0.2 + 2.6 * torch.rand((), generator=g, dtype=F64))

        def chart(theta):
            u = torch.zeros(d, dtype=F64).index_put((torch.tensor(0),), theta[0])
            w = torch.zeros(d, dtype=F64)
            w = w.index_put((torch.tensor(0),), theta[1] * torch.cos(theta[2]))
            w = w.index_put((torch.tensor(1),), theta[1] * torch.sin(theta[2]))
            return _jacobi(u, w)

        theta = torch.stack([a, b, phi])
        x = chart(theta)[None]
        tangents = torch.autograd.functional.jacobian(chart, theta).permute(2, 0, 1)  # (3, N, d)
        horizontal = quotient.horizontal_projection(tangents, x.expand(3, 3, d))
        g_q = torch.einsum("ind,jnd->ij", horizontal, horizontal)
        log_q = L.gaussian_log_density(x) + L.log_orbit_volume(quotient, x)
        if d == 2:
            expected = torch.log(a * b) - 0.5 * (a * a + b * b) - math.log(2 * math.pi)
        else:
            expected = math.log(2 / math.pi) + 2 * torch.log(a * b) - 0.5 * (a * a + b * b) + torch.log(torch.sin(phi) / 2)
        torch.testing.assert_close(log_q[0] + 0.5 * torch.logdet(g_q), expected, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Gaussian targets: closed-form log-densities


@pytest.mark.parametrize("quotient,d,N", [(SE2, 2, 3), (SO2, 2, 3), (SE3, 3, 4)], ids=["SE2", "SO2", "SE3"])
def test_isotropic_gaussian_log_prob_closed_form(quotient, d, N):
    s = 1.7
    target = IsotropicGaussian(s, quotient.translations)
    model = QuotientDiffusion(quotient, target, LINEAR)
    x = torch.randn(6, N, d, generator=gen(10), dtype=F64) * s
    x = center(x) if quotient.translations else x
    exact_m = target.log_density(x, torch.full((6,), N, dtype=F64), d)
    exact_q = exact_m + log_vol_closed_form(x, d)
    total = model.log_prob(x, space="total", steps=40)
    quot = model.log_prob(x, space="quotient", steps=40)
    torch.testing.assert_close(total, exact_m, rtol=0, atol=1e-6)
    torch.testing.assert_close(quot, exact_q, rtol=0, atol=1e-6)
    dropped = model.log_prob(x, space="quotient", steps=40, curvature_factor=0.0)
    assert (dropped - exact_q).abs().min() > 1.0  # wrong by log vol(G x)


class PlusVertical(nn.Module):
    """``base(x) + ahat(t) w(x)`` with ``w`` an equivariant vertical field: ``|x|^2 J x_n`` (2-D) or
    ``(x_1 x x_2) x x_n`` (3-D). The lifted ODE never sees it (``ahat`` keeps the velocity's vertical
    part ``W w`` bounded as t -> 1)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x, t, mask=None):
        if x.shape[-1] == 2:
            w = x.square().sum((-2, -1))[:, None, None] * torch.stack([-x[..., 1], x[..., 0]], -1)
        else:
            axis = torch.linalg.cross(x[:, 0], x[:, 1])[:, None, :].expand_as(x)
            w = torch.linalg.cross(axis, x, dim=-1)
        return self.base(x, t, mask) + LINEAR.ahat(t)[:, None, None] * w


@pytest.mark.parametrize("quotient,d", [(SE2, 2), (SE3, 3)], ids=["SE2", "SE3"])
def test_point_covariance_gaussian_all_routes_agree_with_closed_form(quotient, d):
    """N(0, C (x) I_d) with C anisotropic over the 4 points (rotation invariant, not isotropic: J is
    not a multiple of the identity, so the horizontal and vertical traces are not proportional).
    On M and on Q, by all three routes, log_prob equals the closed form to 1e-6; with a vertical
    field added to the denoiser (ignored by the lifted ODE) too; dropping the orbit-volume /
    curvature terms is off by far more."""
    target = PointGaussian(com_free_basis(4), [0.3, 1.1, 2.5])
    x = target.sample(5, d, seed=11)
    exact_m = target.log_density(x)
    exact_q = exact_m + log_vol_closed_form(x, d)
    for denoiser in (target, PlusVertical(target)):
        model = QuotientDiffusion(quotient, denoiser, LINEAR)
        for route in L.ROUTES:
            out = model.log_prob(x, steps=40, route=route, return_details=True)
            torch.testing.assert_close(out["log_prob_total"], exact_m, rtol=0, atol=1e-6, msg=route)
            torch.testing.assert_close(out["log_prob_quotient"], exact_q, rtol=0, atol=1e-6, msg=route)
    for route in L.ROUTES:
        wrong = model.log_prob(x, steps=40, route=route, curvature_factor=0.0)
        assert (wrong - exact_q).abs().min() > 0.1, route
    conventional = QuotientDiffusion(quotient, target, LINEAR).log_prob(x, steps=40, space="total", geometry="conventional")
    torch.testing.assert_close(conventional, exact_m, rtol=0, atol=1e-6)


def test_gaussian_log_prob_with_masks_equals_per_item():
    target = IsotropicGaussian(1.3)
    model = QuotientDiffusion(SE3, target, LINEAR)
    mask = torch.tensor([[True] * 5, [True] * 4 + [False], [True] * 3 + [False] * 2])
    x = center(torch.randn(3, 5, 3, generator=gen(12), dtype=F64), mask)
    padded = model.log_prob(x, mask, steps=30, space="total")
    exact = target.log_density(x, mask.sum(-1).to(F64), 3)
    torch.testing.assert_close(padded, exact, rtol=0, atol=1e-6)
    quot = model.log_prob(x, mask, steps=30)
    for i, n in enumerate(mask.sum(-1).tolist()):
        one = model.log_prob(x[i:i + 1, :n], steps=30)
        torch.testing.assert_close(quot[i:i + 1], one, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# the SO(2) toy of qmanifold.verify


def test_so2_toy_log_prob_matches_bessel_closed_form():
    target = make_target("so2")
    model = QuotientDiffusion(SE2, ExactToy(target), LINEAR)
    x = target.sample(6, gen(13), dtype=F64)
    exact_m = so2_toy_log_density(target, x)
    exact_q = exact_m + log_vol_closed_form(x, 2)
    out = model.log_prob(x, steps=60, return_details=True)
    torch.testing.assert_close(out["log_prob_total"], exact_m, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["log_prob_quotient"], exact_q, rtol=0, atol=1e-5)
    via_q = model.log_prob(x, steps=60, route="Q")
    torch.testing.assert_close(via_q, exact_q, rtol=0, atol=1e-5)
    adaptive = model.log_prob(x, method="dopri5", rtol=1e-7, atol=1e-7, steps=10)
    torch.testing.assert_close(adaptive, exact_q, rtol=0, atol=1e-5)
    # with a vertical field added to the denoiser output, the lifted ODE (dx = P_x v dt) is unchanged
    # and the conventional one (dx = v dt) is another map with the same density on M (the vertical
    # part is divergence-free and rotates each orbit into itself)
    shifted = QuotientDiffusion(SE2, PlusVertical(ExactToy(target)), LINEAR)
    v = shifted.velocity(x, torch.full((6,), 0.7, dtype=F64))
    assert (v - SE2.horizontal_projection(v, x)).norm() > 0.1
    torch.testing.assert_close(shifted.log_prob(x, steps=60), exact_q, rtol=0, atol=1e-5)
    conventional = shifted.log_prob(x, steps=60, space="total", geometry="conventional")
    torch.testing.assert_close(conventional, exact_m, rtol=0, atol=5e-5)  # a stiffer (rotating) path
    for route in L.ROUTES:
        assert (model.log_prob(x, steps=60, route=route, curvature_factor=0.0) - exact_q).abs().min() > 0.1


def test_divergence_on_m_and_on_q_differ_by_the_curvature_term_for_horizontal_fields():
    """Pointwise: tr(Pi J Pi) = tr(P J P) - <u, h> for a horizontal field u (the vertical trace of J
    is <u, grad log vol>: differentiate <xi_a(x), u(x)> = 0 along the orbit), equivariant or not;
    not for a field with a (non-invariant) vertical part."""
    target = make_target("so2")
    x = target.sample(4, gen(14), dtype=F64)
    t = torch.full((4,), 0.8, dtype=F64)
    cases = ((ExactToy(target), True, True), (NotEquivariant(), True, True), (NotEquivariant(), False, False))
    for denoiser, project, holds in cases:
        model = QuotientDiffusion(SE2, denoiser, LINEAR)

        def field(y, tt, mask=None):
            v = model.velocity(y, tt, mask)
            return SE2.horizontal_projection(v, y, mask) if project else center(v, mask)

        u, div_m = L.divergence(field, x, t, L.centring_projector(SE2))
        _, div_q = L.divergence(field, x, t, L.horizontal_projector(SE2, x))
        curvature = (u * SE2.mean_curvature(x)).sum((-2, -1))
        gap = (div_m - (div_q - curvature)).abs()
        assert (gap.max() < 1e-9) if holds else (gap.min() > 1e-2)
        assert curvature.abs().min() > 1e-2  # the term is not negligible


# ----------------------------------------------------------------------------------------------
# Hutchinson


@pytest.mark.parametrize("probe", L.PROBES)
def test_hutchinson_single_evaluation_is_unbiased_with_the_documented_variance(probe):
    model = QuotientDiffusion(SE2, NotEquivariant(), LINEAR)  # a field whose Jacobian is not symmetric
    x = make_target("so2").sample(1, gen(15), dtype=F64)
    t = torch.full((1,), 0.7, dtype=F64)

    def field(y, tt, mask=None):
        return SE2.horizontal_projection(model.velocity(y, tt, mask), y, mask)

    jac = torch.autograd.functional.jacobian(lambda y: field(y.reshape(1, 3, 2), t).reshape(-1), x.reshape(-1))
    pi = torch.kron(torch.eye(3, dtype=F64) - 1.0 / 3, torch.eye(2, dtype=F64))
    A = pi @ jac @ pi
    assert (A - A.T).abs().max() > 1e-2  # a non-symmetric Jacobian
    S = 4000
    z = L.probe_directions(x, S, probe, generator=gen(16))
    _, q = L.jacobian_quadratic_forms(field, x, t, L.centring_projector(SE2)(z))
    q = q[:, 0]
    exact = torch.trace(A)
    assert abs(q.mean() - exact) < 3 * q.std() / math.sqrt(S)
    var = L.hutchinson_variance(A, probe)
    assert 0.9 < float(q.var() / var) < 1.1
    if probe == "rademacher":  # the Gaussian formula is wrong for Rademacher probes
        assert float(L.hutchinson_variance(A, "gaussian") / q.var()) > 1.3


@pytest.mark.parametrize("probe", L.PROBES)
def test_hutchinson_log_prob_is_unbiased_and_its_path_variance_matches(probe):
    """Isotropic Gaussian on M (N = 3 points in 2-D, SE(2)): J = c(t) Pi along the path, so the
    fixed-probe estimate of log q is exact + (z^T Pi z - n) log s, with variance 2 n (log s)^2
    (Gaussian) or 2 (log s)^2 (N - 1) d / N (Rademacher)."""
    s, N, d, B = 3.0, 3, 2, 1500
    target = IsotropicGaussian(s)
    model = QuotientDiffusion(SE2, target, LINEAR)
    x = (center(torch.randn(1, N, d, generator=gen(17), dtype=F64)) * s).expand(B, N, d)
    exact = model.log_prob(x[:1], space="total", steps=20)
    est = model.log_prob(x, space="total", steps=20, estimator="hutchinson", probe=probe, generator=gen(18))
    assert abs(est.mean() - exact) < 3 * est.std() / math.sqrt(B)
    n = (N - 1) * d
    var = 2 * math.log(s) ** 2 * (n if probe == "gaussian" else n / N)
    assert 0.85 < float(est.var()) / var < 1.15
    two = model.log_prob(x[:400], space="total", steps=20, estimator="hutchinson", probe=probe, probes=4,
                         generator=gen(19))
    assert 0.7 < float(two.var()) / (var / 4) < 1.3


# ----------------------------------------------------------------------------------------------
# sampling with log-densities


def test_sample_with_log_prob_matches_log_prob_at_the_samples():
    target = make_target("so2")
    model = QuotientDiffusion(SE2, ExactToy(target), LINEAR)
    x, lq = model.sample((6, 3, 2), steps=60, generator=gen(20), dtype=F64, return_log_prob=True, method="rk4")
    torch.testing.assert_close(lq, model.log_prob(x, steps=60), rtol=0, atol=1e-5)
    torch.testing.assert_close(lq - L.log_orbit_volume(SE2, x), so2_toy_log_density(target, x), rtol=0, atol=1e-5)
    # default scheme: the sampler's own steps (the same samples), first / second order log-densities
    plain = model.sample((6, 3, 2), steps=50, generator=gen(21), dtype=F64)
    same, lq_euler = model.sample((6, 3, 2), steps=50, generator=gen(21), dtype=F64, return_log_prob=True)
    torch.testing.assert_close(same, plain, rtol=0, atol=1e-10)
    heun = model.sample((6, 3, 2), steps=50, sampler="heun", generator=gen(21), dtype=F64)
    same_h, lq_heun = model.sample((6, 3, 2), steps=50, sampler="heun", generator=gen(21), dtype=F64,
                                   return_log_prob=True, space="total")
    torch.testing.assert_close(same_h, heun, rtol=0, atol=1e-10)
    err_heun = (lq_heun - model.log_prob(same_h, steps=60, space="total")).abs().max()
    err_euler = (lq_euler - model.log_prob(same, steps=60)).abs().max()
    assert err_heun < 0.1 and err_heun < err_euler


def test_sample_with_log_prob_trajectory_and_chunks():
    model = QuotientDiffusion(SE3, IsotropicGaussian(1.5), LINEAR)
    x0 = center(torch.randn(5, 4, 3, generator=gen(22), dtype=F64))
    x, traj, lq = model.sample(x0=x0, steps=20, return_log_prob=True, return_trajectory=True, method="rk4",
                               space="total")
    assert traj.shape == (22, 5, 4, 3) and torch.equal(traj[-1], x)  # 20 steps and the node at t_max
    torch.testing.assert_close(traj[0], x0, rtol=0, atol=1e-15)
    xc, lqc = model.sample(x0=x0, steps=20, return_log_prob=True, method="rk4", space="total", chunk_size=2)
    torch.testing.assert_close(xc, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(lqc, lq, rtol=0, atol=1e-12)
    torch.testing.assert_close(lq, IsotropicGaussian(1.5).log_density(x, torch.full((5,), 4.0, dtype=F64), 3),
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# harmonic prior, options, errors


def test_harmonic_prior_log_density_and_general_interpolant_log_prob():
    """The harmonic prior's density on M against a direct Gaussian in a basis of the CoM-free
    subspace; then a flow from it to N(0, C1 (x) I) with the exact velocity
    ``E[x1 - x0 | x_t] = (t C1 - (1 - t) C0) Sigma_t^+ x_t``: log_prob equals the target density."""
    prior = HarmonicPrior(stiffness=1.0, reg=0.05)
    N = 4
    bonds = torch.zeros(1, N, N, dtype=torch.long)
    for i in range(N - 1):
        bonds[0, i, i + 1] = bonds[0, i + 1, i] = 1
    U = com_free_basis(N)
    C0 = prior.covariance(bonds.to(F64))[0]
    x = prior.sample(bonds.expand(3, N, N), generator=gen(23), dtype=F64)
    y = torch.einsum("nk,bnd->bkd", U, x)
    cov = U.T @ C0 @ U
    direct = torch.distributions.MultivariateNormal(torch.zeros(N - 1, dtype=F64), cov).log_prob(y.transpose(1, 2)).sum(-1)
    torch.testing.assert_close(L.harmonic_log_density(prior, x, bonds.expand(3, N, N)), direct, rtol=0, atol=1e-10)

    target = PointGaussian(U, [0.5, 1.5, 3.0])
    C1 = U @ torch.diag(target.lam) @ U.T

    class ExactVelocity(nn.Module):
        def forward(self, xt, t, mask=None, bond_types=None):
            tt = t[:, None, None]
            sigma = (1 - tt) ** 2 * C0 + tt**2 * C1
            m = (tt * C1 - (1 - tt) * C0) @ torch.linalg.pinv(sigma, hermitian=True)
            return m @ xt

    interp = GeneralInterpolant("1 - t", "t", prior=prior)
    model = QuotientDiffusion(SE3, ExactVelocity(), interp, prediction="v")
    x1 = target.sample(3, 3, seed=24)
    lp = model.log_prob(x1, space="total", steps=40, bond_types=bonds.expand(3, N, N))
    torch.testing.assert_close(lp, target.log_density(x1), rtol=0, atol=1e-6)


def test_exact_divergence_chunking_and_batch_chunking_agree():
    model = QuotientDiffusion(SE2, ExactToy(make_target("so2")), LINEAR)
    x = make_target("so2").sample(5, gen(25), dtype=F64)
    ref = model.log_prob(x, steps=10)
    torch.testing.assert_close(model.log_prob(x, steps=10, divergence_chunk=2), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.log_prob(x, steps=10, chunk_size=2), ref, rtol=0, atol=1e-12)
    details = model.log_prob(x, steps=10, chunk_size=2, return_details=True)
    assert details["prior_point"].shape == x.shape and details["nfev"] == 3 * 4 * 11  # 3 chunks, 11 RK4 steps


def test_not_equivariant_field_raises_for_the_quotient_and_is_allowed_on_m():
    model = QuotientDiffusion(SE2, NotEquivariant(), LINEAR)
    x = center(torch.randn(3, 3, 2, generator=gen(26), dtype=F64))
    with pytest.raises(ValueError, match="not SE\\(2\\)-equivariant"):
        model.log_prob(x, steps=5)
    with pytest.raises(ValueError, match="not SE\\(2\\)-equivariant"):
        model.log_prob(x, steps=5, space="total", route="Q")
    total = model.log_prob(x, steps=5, space="total")
    assert torch.isfinite(total).all()
    # opting in gives a number, but not a function on Q: it changes when x is rotated
    rot = SE2.random_element((3,), generator=gen(28), dtype=F64).matrix
    at_x = model.log_prob(x, steps=20, assume_equivariant=True)
    at_rx = model.log_prob(x @ rot.transpose(-1, -2), steps=20, assume_equivariant=True)
    assert (at_x - at_rx).abs().max() > 1e-2
    exact = QuotientDiffusion(SE2, ExactToy(make_target("so2")), LINEAR)
    torch.testing.assert_close(exact.log_prob(x @ rot.transpose(-1, -2), steps=20), exact.log_prob(x, steps=20),
                               rtol=0, atol=1e-10)


def test_bad_log_prob_options_raise():
    model = QuotientDiffusion(SE2, IsotropicGaussian(1.0), LINEAR)
    x = center(torch.randn(2, 3, 2, generator=gen(27), dtype=F64))
    cases = {
        "space": dict(space="both"), "estimator": dict(estimator="sketch"), "route": dict(route="R"),
        "method": dict(method="rk45"), "probe": dict(probe="sphere"), "probes": dict(probes=0),
        "steps": dict(steps=0), "geometry": dict(route="Q", geometry="conventional"),
        "grid": dict(time_grid=torch.tensor([0.0, 0.5])),
    }
    for name, kwargs in cases.items():
        with pytest.raises(ValueError):
            model.log_prob(x, **kwargs)
            pytest.fail(f"no error for bad {name}")
    with pytest.raises(ValueError, match="deterministic"):
        model.sample((2, 3, 2), steps=3, sampler="sde", return_log_prob=True)
    with pytest.raises(ValueError, match="lattice"):
        L.log_orbit_volume(Quotient(groups.Lattice(2)), torch.zeros(1, 3, 2))
