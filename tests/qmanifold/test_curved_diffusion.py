"""Diffusion and flow on a curved total space (issue 15, part 3): qmanifold.curved_diffusion.

* The geodesic interpolant: ``x_t`` on M, ``u_t = log_{x_t}(x1)/(1-t)`` is its time derivative.
* The quotient loss on M: zero for an exact prediction, blind to the vertical (and normal) part of the
  prediction, equal to the horizontal residual in M's metric; the conventional loss is not blind.
* The lifted SDE on (S^2)^3 / SO(3) (``Quotient.lift`` + geodesic Euler-Maruyama), against exact
  laws on Q, with the two wrong curvature variants failing:
  - horizontal Brownian motion with the curvature drift vs Brownian motion on M (the same law on Q);
  - the SDE sampler of ``QuotientDiffusion`` as a Langevin sampler of ``exp(kappa sum <x_i, x_j>)``,
    against exact draws (rejection from the uniform law).
* The samplers of ``QuotientDiffusion(..., interpolant="geodesic")`` with exact fields:
  - (S^2)^2 / SO(3), Q = [0, pi] (the angle): the exact flow-matching field and score on Q (1-D
    Gauss-Legendre quadrature), lifted; ODE, Heun and SDE reproduce the target's angle law; the SDE
    with the paper's curvature sign and the ODE with vertical garbage without projection fail;
  - SE(3)^5 frames / SE(3), a single template: the aligned geodesic field lands on the template's
    orbit, with Haar orientations; vertical garbage without projection does not.
* Every state stays on M; errors for what the curved branch does not support.

Statistical tests use fixed seeds; a correct variant must give KS p > 1e-3, a wrong one p < 1e-5
(margins measured over seeds 0-2 while writing these tests: correct p >= 0.006, wrong p <= 2e-6).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp, kstest

from qmanifold import SDE, Quotient, QuotientDiffusion, groups, integrate
from qmanifold.curved_diffusion import GeodesicInterpolant, ManifoldSDE, brownian_motion, geodesic_align
from qmanifold.lie import GroupElement
from qmanifold.manifolds import SE3Frames, Sphere, so3_exp

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
S2 = Sphere(2)
FRAMES = SE3Frames()
Q_S2 = Quotient(groups.SO3, manifold=S2)
Q_FRAMES = Quotient(groups.SE3, manifold=FRAMES)
PASS, FAIL = 1e-3, 1e-5


def pair_angles(x: torch.Tensor) -> torch.Tensor:
    """Pairwise geodesic distances of points on S^2: ``(B, N, 3) -> (B, N(N-1)/2)``."""
    i, j = torch.triu_indices(x.shape[-2], x.shape[-2], 1)
    return torch.arccos((x[:, i] * x[:, j]).sum(-1).clamp(-1, 1))


def min_ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest two-sample KS p-value over the columns (each column an iid sample)."""
    return min(ks_2samp(a[:, k].numpy(), b[:, k].numpy()).pvalue for k in range(a.shape[1]))


class Zero(torch.nn.Module):
    def forward(self, x, t, mask=None):
        return torch.zeros_like(x)


class VerticalGarbage(torch.nn.Module):
    """Adds ``sum_a omega_a xi_a(x)`` with ``omega ~ N(0, scale^2)`` fresh at every call."""

    def __init__(self, inner, quotient, scale):
        super().__init__()
        self.inner, self.quotient, self.scale = inner, quotient, scale
        self.gen = torch.Generator().manual_seed(5)

    def forward(self, x, t, mask=None):
        action = self.quotient._curved
        omega = self.scale * torch.randn(x.shape[0], action.algebra_dim, generator=self.gen, dtype=x.dtype)
        return self.inner(x, t, mask=mask) + action.infinitesimal_action(omega, x, mask)


# ---------------------------------------------------------------------------------------------
# the geodesic interpolant and the loss


@pytest.mark.parametrize("quotient", [Q_S2, Q_FRAMES], ids=["S2", "frames"])
def test_geodesic_interpolant_stays_on_M_and_its_velocity_is_the_time_derivative(quotient):
    manifold = quotient.total_space
    interp = GeodesicInterpolant()
    gen = torch.Generator().manual_seed(0)
    x0 = interp.sample_prior(quotient, (6, 4, manifold.ambient_dim), generator=gen, dtype=F64)
    x1 = quotient.center(manifold.random_point((6, 4), generator=gen, dtype=F64))
    t = torch.rand(6, generator=gen, dtype=F64) * 0.9
    xt = interp.sample_xt(manifold, x0, x1, t)
    assert manifold.residual(xt).max() < 1e-12
    torch.testing.assert_close(interp.sample_xt(manifold, x0, x1, torch.zeros(6, dtype=F64)), x0)
    torch.testing.assert_close(interp.sample_xt(manifold, x0, x1, torch.ones(6, dtype=F64)), x1)
    h = 1e-6
    fd = (interp.sample_xt(manifold, x0, x1, t + h) - interp.sample_xt(manifold, x0, x1, t - h)) / (2 * h)
    u = interp.target_velocity(manifold, xt, x1, t)
    torch.testing.assert_close(u, fd, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(manifold.to_tangent(u, xt), u)
    if quotient.translations:  # the prior is centred like the data
        assert x0[..., 9:].mean(-2).abs().max() < 1e-12


class ExactPoint(torch.nn.Module):
    """Predicts the one data configuration ``c`` (x1-prediction) or the velocity towards it."""

    def __init__(self, c, manifold, prediction):
        super().__init__()
        self.c, self.manifold, self.prediction = c, manifold, prediction

    def forward(self, x, t, mask=None):
        c = self.c.expand_as(x)
        if self.prediction == "x1":
            return c
        return self.manifold.log(x, c) / (1 - t)[:, None, None]


@pytest.mark.parametrize("prediction", ["x1", "v"])
@pytest.mark.parametrize("quotient", [Q_S2, Q_FRAMES], ids=["S2", "frames"])
def test_quotient_loss_is_zero_when_exact_and_blind_to_the_vertical_part(quotient, prediction):
    manifold, action = quotient.total_space, quotient._curved
    gen = torch.Generator().manual_seed(1)
    c = quotient.center(manifold.random_point((1, 5), generator=gen, dtype=F64))
    x1 = c.expand(8, 5, manifold.ambient_dim).clone()
    exact = ExactPoint(c, manifold, prediction)
    model = QuotientDiffusion(quotient, exact, interpolant="geodesic", prediction=prediction)
    t = torch.linspace(0.05, 0.95, 8, dtype=F64)
    assert model.loss(x1, t=t, generator=torch.Generator().manual_seed(2), reduction="none").abs().max() < 1e-20

    class Perturbed(torch.nn.Module):
        """The prediction moved along the orbit of x_t (and, for velocities, by a normal vector)."""

        def __init__(self, inner, scale):
            super().__init__()
            self.inner, self.scale = inner, scale
            self.gen = torch.Generator().manual_seed(3)

        def forward(self, x, t, mask=None):
            out = self.inner(x, t, mask=mask)
            omega = self.scale * torch.randn(x.shape[0], action.algebra_dim, generator=self.gen, dtype=x.dtype)
            vertical = action.infinitesimal_action(omega, x)
            if prediction == "v":
                normal = torch.randn(x.shape, generator=self.gen, dtype=x.dtype)
                return out + vertical + (normal - manifold.to_tangent(normal, x))
            return manifold.exp(x, manifold.log(x, out) + vertical)  # the clean point moved vertically

    def losses(denoiser, kind="quotient"):
        m = QuotientDiffusion(quotient, denoiser, interpolant="geodesic", prediction=prediction, loss=kind)
        return m.loss(x1, t=t, generator=torch.Generator().manual_seed(2), reduction="none")

    # a velocity's vertical part is free; a clean point moves freely along exp_{x_t}(log_{x_t} D + vertical)
    # as long as that stays inside the injectivity radius (|log| < pi on S^2), where log inverts exp
    for scale in ((0.3, 3.0) if prediction == "v" else (0.1, 0.3)):
        assert losses(Perturbed(exact, scale)).abs().max() < 1e-18
        assert losses(Perturbed(exact, scale), "conventional").min() > 1e-4  # the conventional loss sees it
    assert losses(Perturbed(Zero(), 1.0)).min() > 1e-3  # and the quotient loss is not blind to the rest


def test_quotient_loss_is_the_horizontal_residual_in_the_metric_of_M():
    manifold = S2
    gen = torch.Generator().manual_seed(4)
    x1 = manifold.random_point((5, 4), generator=gen, dtype=F64)
    lin = torch.nn.Linear(3, 3).double()
    model = QuotientDiffusion(Q_S2, lambda x, t, mask=None: lin(x), interpolant="geodesic", prediction="v")
    t = torch.rand(5, generator=gen, dtype=F64)
    got = model.loss(x1, t=t, generator=torch.Generator().manual_seed(9), reduction="none")
    interp = model.interpolant
    x0 = interp.sample_prior(Q_S2, x1.shape, generator=torch.Generator().manual_seed(9), dtype=F64)
    xt = interp.sample_xt(manifold, x0, x1, t)
    r = Q_S2.horizontal_projection(lin(xt) - manifold.log(xt, x1) / (1 - t)[:, None, None], xt)
    torch.testing.assert_close(got, r.square().sum((-2, -1)) / (4 * manifold.dim))
    got.sum().backward()  # differentiable through the projection
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


# ---------------------------------------------------------------------------------------------
# the lifted SDE on (S^2)^3 / SO(3)


def test_horizontal_brownian_motion_has_the_law_of_brownian_motion_on_M_on_the_quotient():
    """Noising by Brownian motion on M and by its horizontal lift (with -h/2) agree on Q; without the
    curvature drift, or with the paper's sign, they do not."""
    gen = torch.Generator().manual_seed(0)
    template = torch.tensor([[0.0, 0.0, 1.0], [math.sin(0.4), 0.0, math.cos(0.4)], [0.0, math.sin(0.3), -math.cos(0.3)]],
                            dtype=F64)  # close to the singular set (all points on one axis)
    n = 3000
    x = Q_S2.act(Q_S2.random_element((n,), generator=gen, dtype=F64), template.expand(n, 3, 3))
    reference = pair_angles(brownian_motion(Q_S2, x, 0.5, 100, generator=gen))
    p = {}
    for c in (1.0, 0.0, -1.0):
        y = brownian_motion(Q_S2, x, 0.5, 100, horizontal=True, curvature_factor=c, generator=gen)
        assert S2.residual(y).max() < 1e-6
        p[c] = min_ks(pair_angles(y), reference)
    assert p[1.0] > PASS, p
    assert p[0.0] < FAIL and p[-1.0] < FAIL, p


def _exact_langevin_target(n: int, kappa: float, gen) -> torch.Tensor:
    """Exact draws of ``p(x) ∝ exp(kappa sum_{i<j} <x_i, x_j>)`` on (S^2)^3: rejection from the uniform law
    with acceptance ``exp(kappa (s - 3))`` (s <= 3)."""
    out, got = [], 0
    while got < n:
        x = S2.random_point((20000, 3), generator=gen, dtype=F64)
        s = (x.sum(-2).square().sum(-1) - 3) / 2
        keep = torch.rand(20000, generator=gen, dtype=F64) < torch.exp(kappa * (s - 3))
        out.append(x[keep])
        got += int(keep.sum())
    return torch.cat(out)[:n]


def test_sde_sampler_on_three_points_of_the_sphere_has_the_exact_law_and_wrong_curvature_fails():
    """The lifted SDE sampler ``dx = [P(v + eta s) - c eta h] dt + sqrt(2 eta) P dW`` with v = 0 and the
    exact score of an invariant density is a Langevin sampler of it: from the uniform prior with
    ``int eta dt = 3`` it reaches the density's law on Q (exact draws by rejection)."""
    kappa, n = 2.0, 3000
    gen = torch.Generator().manual_seed(0)
    reference = pair_angles(_exact_langevin_target(n, kappa, gen))

    def score(x, t, mask=None):  # grad_M log p, p ∝ exp(kappa sum_{i<j} <x_i, x_j>)
        return S2.to_tangent(kappa * (x.sum(-2, keepdim=True) - x), x)

    model = QuotientDiffusion(Q_S2, Zero(), interpolant="geodesic", prediction="v")
    x0 = S2.random_point((n, 3), generator=gen, dtype=F64)
    p = {}
    for c in (1.0, 0.0, -1.0):
        x = model.sample(x0=x0, steps=200, sampler="sde", eta=3.0, score=score, curvature_factor=c, generator=gen)
        assert S2.residual(x).max() < 1e-6
        p[c] = min_ks(pair_angles(x), reference)
    assert p[1.0] > PASS, p
    assert p[0.0] < FAIL and p[-1.0] < FAIL, p


# ---------------------------------------------------------------------------------------------
# (S^2)^2 / SO(3): the exact flow-matching field on Q = [0, pi], lifted

WEIGHTS, MEANS, SDS = (0.5, 0.5), (1.0, 2.2), (0.15, 0.2)
NODES, QWEIGHTS = (torch.tensor(v, dtype=F64) for v in np.polynomial.legendre.leggauss(64))


def _target_density(a):
    return sum(w * torch.exp(-0.5 * ((a - m) / s) ** 2) / s for w, m, s in zip(WEIGHTS, MEANS, SDS))


def _target_pairs(n: int, gen) -> torch.Tensor:
    """Exact draws: x_1 uniform, x_2 at the angle alpha ~ the target mixture, in a uniform direction."""
    first = torch.rand(n, generator=gen, dtype=F64) < WEIGHTS[0]
    alpha = torch.where(first, MEANS[0] + SDS[0] * torch.randn(n, generator=gen, dtype=F64),
                        MEANS[1] + SDS[1] * torch.randn(n, generator=gen, dtype=F64))
    x1 = S2.random_point((n,), generator=gen, dtype=F64)
    e = S2.to_tangent(torch.randn(n, 3, generator=gen, dtype=F64), x1)
    e = e / e.norm(dim=-1, keepdim=True)
    return torch.stack([x1, torch.cos(alpha)[:, None] * x1 + torch.sin(alpha)[:, None] * e], 1)


def _posterior(alpha, t):
    """``(E[alpha_1 | alpha_t], d/dalpha log p_t(alpha))`` for ``alpha_t = (1-t) alpha_0 + t alpha_1``,
    ``alpha_0 ~ sin/2`` on [0, pi] (the uniform law of M seen on Q), ``alpha_1`` ~ the target: Gauss-Legendre
    over the support of the integrand in ``alpha_1`` (smooth there: near machine precision)."""
    t = t.clamp(1e-12, 1 - 1e-9)
    lo = ((alpha - (1 - t) * math.pi) / t).clamp(0, math.pi)
    hi = (alpha / t).clamp(0, math.pi)
    a = lo[:, None] + (hi - lo)[:, None] * (NODES + 1) / 2
    u = ((alpha[:, None] - t[:, None] * a) / (1 - t[:, None])).clamp(0, math.pi)
    base = QWEIGHTS * (hi - lo)[:, None] / 2 * _target_density(a)
    z = (base * torch.sin(u)).sum(-1)
    return (base * torch.sin(u) * a).sum(-1) / z, (base * torch.cos(u)).sum(-1) / z / (1 - t)


def _angle_and_lift(x):
    """``alpha`` and the horizontal lift Y of d/dalpha: each point moves away from the other at speed 1/2."""
    c = (x[:, 0] * x[:, 1]).sum(-1).clamp(-1, 1)
    away = []
    for p, o in ((0, 1), (1, 0)):
        e = x[:, o] - c[:, None] * x[:, p]
        away.append(-0.5 * e / e.norm(dim=-1, keepdim=True).clamp_min(1e-300))
    return torch.arccos(c), torch.stack(away, 1)


class PairField(torch.nn.Module):
    """The exact velocity ``(E[alpha_1 | alpha] - alpha)/(1-t) Y``."""

    def forward(self, x, t, mask=None):
        alpha, lift = _angle_and_lift(x)
        mean, _ = _posterior(alpha, t)
        return ((mean - alpha) / (1 - t))[:, None, None] * lift


def pair_score(x, t, mask=None):
    """``grad_M log p_t`` of the invariant density with the angle law p_t: ``2 dlog p_t Y + h`` (Q's metric is
    dalpha^2/2, and the density on M is the one on Q divided by the orbit volume, -grad log vol = h)."""
    alpha, lift = _angle_and_lift(x)
    _, dlog = _posterior(alpha, t)
    return 2 * dlog[:, None, None] * lift + Q_S2.mean_curvature(x)


def test_flow_and_sde_samplers_reproduce_an_exact_law_on_the_sphere_and_the_paper_sign_fails():
    n = 3000
    gen = torch.Generator().manual_seed(0)
    reference = pair_angles(_target_pairs(n, gen))
    model = QuotientDiffusion(Q_S2, PairField(), interpolant="geodesic", prediction="v")
    runs = {
        "ode": dict(sampler="ode", steps=100),
        "heun": dict(sampler="heun", steps=40),
        "sde": dict(sampler="sde", steps=100, eta="4*t*(1-t)", score=pair_score),
        "sde_paper_sign": dict(sampler="sde", steps=100, eta="4*t*(1-t)", score=pair_score, curvature_factor=-1.0),
    }
    p = {}
    for name, kwargs in runs.items():
        x = model.sample((n, 2, 3), generator=gen, dtype=F64, **kwargs)
        assert S2.residual(x).max() < 1e-6
        p[name] = min_ks(pair_angles(x), reference)
    garbage = QuotientDiffusion(Q_S2, VerticalGarbage(PairField(), Q_S2, 30.0), interpolant="geodesic", prediction="v")
    for geometry in ("quotient", "conventional"):
        x = garbage.sample((n, 2, 3), steps=100, geometry=geometry, generator=gen, dtype=F64)
        p[f"garbage_{geometry}"] = min_ks(pair_angles(x), reference)
    assert min(p["ode"], p["heun"], p["sde"], p["garbage_quotient"]) > PASS, p
    assert p["sde_paper_sign"] < FAIL and p["garbage_conventional"] < FAIL, p


# ---------------------------------------------------------------------------------------------
# SE(3)^5 frames / SE(3): a single template


def _kabsch(h):
    u, _, vh = torch.linalg.svd(h)
    d = torch.linalg.det(u @ vh)
    fix = torch.ones(*d.shape, 3, dtype=h.dtype)
    fix[..., 2] = torch.where(d < 0, -1.0, 1.0)
    return (u * fix.unsqueeze(-2)) @ vh


def _chordal_alignment(c, x):
    """The rigid motion (Q, b) minimising the chordal distance ``sum |Q C_n - X_n|_F^2 + |Q c_n + b - x_n|^2``."""
    r, t = FRAMES.to_matrices(x)
    rc, tc = FRAMES.to_matrices(c)
    h = (r @ rc.transpose(-1, -2)).sum(-3) + ((t - t.mean(-2, keepdim=True)).unsqueeze(-1)
                                             * (tc - tc.mean(-2, keepdim=True)).unsqueeze(-2)).sum(-3)
    q = _kabsch(h)
    return q, t.mean(-2) - (q @ tc.mean(-2).unsqueeze(-1)).squeeze(-1)


_k = torch.arange(5, dtype=F64)
_TRANSLATIONS = torch.stack([2.3 * torch.cos(1.7 * _k), 2.3 * torch.sin(1.7 * _k), 1.5 * _k], -1)
TEMPLATE = FRAMES.from_matrices(so3_exp(torch.stack([0.3 * _k, 0.5 + 0 * _k, 1.7 * _k], -1)),
                                _TRANSLATIONS - _TRANSLATIONS.mean(0))  # a helical chain of 5 frames


class AlignedTemplateField(torch.nn.Module):
    """``log_x(y)/(1-t)`` with y the point of the template's orbit closest to x in M's metric: the horizontal
    geodesic towards the orbit (exact for the template under uniform rotations; Haar by equivariance)."""

    def forward(self, x, t, mask=None):
        rot, shift = _chordal_alignment(TEMPLATE, x)
        y = Q_FRAMES.act(GroupElement(rot, shift), TEMPLATE.expand_as(x))
        y = geodesic_align(Q_FRAMES, y, x, iterations=10)
        return FRAMES.log(x, y) / (1 - t)[:, None, None]


def _frame_features(x):
    r, t = FRAMES.to_matrices(x)
    i, j = torch.triu_indices(5, 5, 1)
    rel = r[:, i].transpose(-1, -2) @ r[:, j]
    angle = torch.arccos(((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))
    return torch.cat([angle, (t[:, i] - t[:, j]).norm(dim=-1)], -1)


def test_flow_on_frames_lands_on_the_template_orbit_with_haar_orientations():
    n = 400
    gen = torch.Generator().manual_seed(0)
    target = _frame_features(TEMPLATE[None])
    results = {}
    for name, denoiser, geometry in (("exact", AlignedTemplateField(), "quotient"),
                                     ("garbage_quotient", VerticalGarbage(AlignedTemplateField(), Q_FRAMES, 30.0), "quotient"),
                                     ("garbage_conventional", VerticalGarbage(AlignedTemplateField(), Q_FRAMES, 30.0),
                                      "conventional")):
        model = QuotientDiffusion(Q_FRAMES, denoiser, interpolant="geodesic", prediction="v")
        x, traj = model.sample((n, 5, 12), steps=20, geometry=geometry, generator=gen, dtype=F64, return_trajectory=True)
        assert FRAMES.residual(traj).max() < 1e-6  # every state on M
        results[name] = (x, float((_frame_features(x) - target).abs().max()))
    assert results["exact"][1] < 1e-8 and results["garbage_quotient"][1] < 1e-8, results
    assert results["garbage_conventional"][1] > 1e-2
    x = results["exact"][0]
    assert x[..., 9:].mean(-2).abs().max() < 1e-10  # centred
    rot, _ = _chordal_alignment(TEMPLATE, x)
    angle = torch.arccos(((rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)).numpy()
    assert kstest(angle, lambda a: (a - np.sin(a)) / math.pi).pvalue > PASS  # Haar: density (1 - cos a)/pi


def test_geodesic_align_finds_the_orbit_point_and_leaves_a_horizontal_residual():
    gen = torch.Generator().manual_seed(7)
    x = FRAMES.random_point((6, 5), generator=gen, dtype=F64)
    g = Q_FRAMES.random_element((6,), generator=gen, dtype=F64)
    ref = Q_FRAMES.act(g, x)
    small = Q_FRAMES._curved.act_exp(0.3 * torch.randn(6, 6, generator=gen, dtype=F64), ref)  # near ref, same orbit
    y = geodesic_align(Q_FRAMES, small, ref)
    torch.testing.assert_close(y, ref)
    # off the orbit: the residual log_y(ref) is horizontal at the optimum
    noisy = FRAMES.exp(ref, 0.2 * FRAMES.to_tangent(torch.randn(ref.shape, generator=gen, dtype=F64), ref))
    y = geodesic_align(Q_FRAMES, small, noisy)
    residual = FRAMES.log(y, noisy)
    assert Q_FRAMES.vertical_projection(residual, y).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------
# masks, errors


def test_masked_sampling_keeps_padding_zero_and_real_points_on_M():
    gen = torch.Generator().manual_seed(3)
    mask = torch.arange(4) < torch.tensor([[4], [2], [3]])
    model = QuotientDiffusion(Q_S2, lambda x, t, mask=None: x.flip(-1), interpolant="geodesic")
    x = model.sample(mask=mask, steps=5, generator=gen, dtype=F64)
    assert (x[~mask] == 0).all() and S2.residual(x, mask).max() < 1e-12
    assert (S2.residual(x[mask][None]) < 1e-12).all()
    x1 = S2.random_point((3, 4), generator=gen, dtype=F64)
    loss = model.loss(x1, mask, generator=gen, reduction="none")
    assert loss.shape == (3,) and torch.isfinite(loss).all()


def test_curved_errors_name_the_problem():
    model = QuotientDiffusion(Q_S2, Zero(), interpolant="geodesic")
    with pytest.raises(ValueError, match="geodesic"):
        QuotientDiffusion(Q_S2, Zero(), interpolant="linear")
    with pytest.raises(ValueError, match="alignment"):
        QuotientDiffusion(Q_S2, Zero(), interpolant="geodesic", loss="geodiff_align")
    with pytest.raises(ValueError, match="not available"):
        model.sample((2, 3, 3), sampler="edm")
    with pytest.raises(ValueError, match="score"):
        model.sample((2, 3, 3), sampler="sde")
    with pytest.raises(NotImplementedError, match="curved"):
        model.log_prob(S2.random_point((2, 3), dtype=F64))
    with pytest.raises(ValueError, match="not on S"):
        model.loss(torch.ones(2, 3, 3, dtype=F64))
    lifted = Q_S2.lift(SDE(drift=None, diffusion=1.0))
    assert isinstance(lifted, ManifoldSDE)
    with pytest.raises(TypeError, match="integrated on M"):
        integrate(lifted, S2.random_point((2, 3), dtype=F64), steps=2)
    with pytest.raises(NotImplementedError, match="curved total space"):
        Q_S2.align(S2.random_point((2, 3), dtype=F64), S2.random_point((2, 3), dtype=F64))
