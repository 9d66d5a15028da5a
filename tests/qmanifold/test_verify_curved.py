"""Curved targets of `qmanifold verify` (issue 15, part 4): (S^2)^4 / SO(3) and SE(3)^4 / SE(3) frames.

* The exact draws follow the target: the angle law of the contraction against its density by
  quadrature (an independent derivation: the map and the density), the frames' translations in frame 1
  against their Gaussian law.
* The score is the Riemannian gradient of the log density (autograd), field and score are tangent and
  equivariant, the log density is invariant.
* The exact field transports the draws pathwise: the lifted ODE (fine Heun) started from the t = 0
  draws lands on the orbits of the t = 1 draws made from the same random numbers.
* Through the verify API: the correct lifted samplers pass, and the paper's curvature sign, no
  curvature and vertical garbage with the conventional sampler fail, on both targets; the CLI selects
  the curved cases and the suites hold them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import kstest

from qmanifold import QuotientDiffusion
from qmanifold.cli import main
from qmanifold.verify.curved_targets import FrameStar, SphereStar, VerticalGarbage, contract_sphere
from qmanifold.verify.runner import (
    DEFAULT_CONFIG,
    QUICK_CONFIG,
    VARIANTS,
    builtin_case,
    estimated_cost,
    run_case,
)

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
SPHERE, FRAMES = SphereStar(), FrameStar()


def _contraction_moments(lam: float, kind: str) -> tuple[float, float]:
    """``E[cos theta]`` and ``E[cos^2 theta]`` of the contraction law by quadrature of its density
    ``(1 + (lam^2 - 1) cos^2(theta/2))^-2`` times the uniform angle law (``sin/2`` on S^2,
    ``(1 - cos)/pi`` on SO(3))."""
    base = (lambda a: math.sin(a) / 2) if kind == "sphere" else (lambda a: (1 - math.cos(a)) / math.pi)

    def dens(a):
        return base(a) * (1 + (lam**2 - 1) * math.cos(a / 2) ** 2) ** -2

    z = quad(dens, 0, math.pi)[0]
    return (quad(lambda a: math.cos(a) * dens(a), 0, math.pi)[0] / z,
            quad(lambda a: math.cos(a) ** 2 * dens(a), 0, math.pi)[0] / z)


@pytest.mark.parametrize("t", [0.5, 1.0])
def test_exact_draws_follow_the_contraction_law(t):
    """Means of cos(angle to x_1) (S^2) and of the relative rotation angle's cosine (frames) against
    quadrature of the density the score is built from (z-scores below 4), and a KS test of one angle."""
    n = 40000
    gen = torch.Generator().manual_seed(0)
    x = SPHERE.sample_marginal(n, t, gen)
    for k, lam in enumerate(SPHERE.lambdas):
        c = (x[:, 0] * x[:, k + 1]).sum(-1).numpy()
        m1, m2 = _contraction_moments(lam**t, "sphere")
        assert abs(c.mean() - m1) < 4 * math.sqrt((m2 - m1**2) / n), (k, c.mean(), m1)
    y = FRAMES.sample_marginal(n, t, gen)
    r, _ = FRAMES.manifold.to_matrices(y)
    for k, lam in enumerate(FRAMES.lambdas):
        cos = (((r[:, 0] * r[:, k + 1]).sum((-2, -1)) - 1) / 2).numpy()
        m1, m2 = _contraction_moments(lam**t, "rotation")
        assert abs(cos.mean() - m1) < 4 * math.sqrt((m2 - m1**2) / n), (k, cos.mean(), m1)
    # the whole angle law of the most contracted rotation: CDF by quadrature
    lam = FRAMES.lambdas[0] ** t
    angle = np.arccos(np.clip((r[:5000, 0] * r[:5000, 1]).sum((-2, -1)).numpy() * 0.5 - 0.5, -1, 1))

    def dens(a):
        return (1 - math.cos(a)) * (1 + (lam**2 - 1) * math.cos(a / 2) ** 2) ** -2

    z = quad(dens, 0, math.pi)[0]
    assert kstest(angle, np.vectorize(lambda a: quad(dens, 0, a)[0] / z)).pvalue > 1e-3


def test_frame_translations_are_gaussian_in_frame_one():
    """``delta = R_1^T (t_n - tbar)`` has mean ``t mu`` and covariance ``s_t^2 (I - 11^T/N)`` per coordinate."""
    n, t = 40000, 0.5
    gen = torch.Generator().manual_seed(1)
    x = FRAMES.sample_marginal(n, t, gen)
    assert FRAMES.manifold.residual(x).max() < 1e-12 and x[..., 9:].mean(1).abs().max() < 1e-12
    r, tr = FRAMES.manifold.to_matrices(x)
    delta = tr @ r[:, 0]
    s2 = (1 - t) ** 2 + (t * FRAMES.sigma) ** 2
    se = math.sqrt(s2 / n)
    assert (delta.mean(0) - t * FRAMES.means).abs().max() < 4.5 * se
    cov = torch.einsum("bni,bmi->nm", delta - delta.mean(0), delta - delta.mean(0)) / (3 * n)
    nf = FRAMES.point_shape[0]
    torch.testing.assert_close(cov, s2 * (torch.eye(nf, dtype=F64) - 1.0 / nf), atol=0.02 * s2, rtol=0)


@pytest.mark.parametrize("target", [SPHERE, FRAMES], ids=["sphere", "frames"])
def test_score_field_and_density_are_exact_equivariant_and_invariant(target):
    gen = torch.Generator().manual_seed(2)
    x = target.sample_marginal(16, 0.4, gen)
    t = torch.rand(16, generator=gen, dtype=F64)
    manifold, q = target.manifold, target.quotient
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(target.log_density(xr, t).sum(), xr)
    torch.testing.assert_close(target.score(x, t), manifold.to_tangent(grad, x), atol=1e-12, rtol=1e-10)
    for field in (target.score(x, t), target.velocity(x, t)):
        torch.testing.assert_close(manifold.to_tangent(field, x), field, atol=1e-12, rtol=0)
    g = q.random_element((16,), generator=gen, dtype=F64)
    gx = q.act(g, x)
    torch.testing.assert_close(target.log_density(gx, t), target.log_density(x, t))
    torch.testing.assert_close(target.score(gx, t), q.act_on_vectors(g, target.score(x, t)))
    torch.testing.assert_close(target.velocity(gx, t), q.act_on_vectors(g, target.velocity(x, t)))
    feats, gfeats = target.features(x), target.features(gx)
    for key in feats:
        torch.testing.assert_close(gfeats[key], feats[key], atol=1e-10, rtol=1e-10)


class _Velocity(torch.nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, t, mask=None):
        return self.target.velocity(x, t)


@pytest.mark.parametrize("target", [SPHERE, FRAMES], ids=["sphere", "frames"])
def test_lifted_flow_of_the_exact_field_is_the_exact_transport_pathwise(target):
    """Draws at t = 0 and t = 1 from the same random numbers are related by the field's flow: the
    lifted ODE (Heun) from the first lands on the orbits of the second, up to Heun's error (second
    order: halving the step divides the largest feature error by 4); vertical garbage added to the
    field changes nothing (the quotient sampler projects it away)."""
    n = 64
    x0 = target.sample_marginal(n, 0.0, torch.Generator().manual_seed(3))
    x1 = target.sample_marginal(n, 1.0, torch.Generator().manual_seed(3))
    want = target.features(x1)
    exact = _Velocity(target)

    def run(field, steps):
        model = QuotientDiffusion(target.quotient, field, interpolant="geodesic", prediction="v")
        x = model.sample(x0=x0, steps=steps, sampler="heun")
        assert target.manifold.residual(x).max() < 1e-10
        return x

    x200, x400 = run(exact, 200), run(exact, 400)
    errors = [max(float((target.features(x)[k] - want[k]).abs().max()) for k in want) for x in (x200, x400)]
    assert errors[1] < 2e-4 and 3.5 < errors[0] / errors[1] < 4.5, errors
    garbage = run(VerticalGarbage(exact, target.quotient, 3.0, seed=4), 200)
    for key, value in target.features(garbage).items():
        torch.testing.assert_close(value, target.features(x200)[key], atol=1e-9, rtol=0)
    # the same transport holds on M itself for the field u (it fixes x_1): sphere only, where u is simple
    if target is SPHERE:
        lam = torch.tensor(SPHERE.lambdas, dtype=F64)
        moved = contract_sphere(x0[:, :1].expand(-1, 3, -1), x0[:, 1:], lam.expand(n, 3))
        torch.testing.assert_close(moved, x1[:, 1:])


# ---------------------------------------------------------------------------------------------
# through the verify API


def _suite_run(name: str, variant: str, seed: int = 0):
    sizes = DEFAULT_CONFIG.sizes(name, VARIANTS[variant])
    return run_case(builtin_case(name), variant, seed=seed, checkpoints=DEFAULT_CONFIG.checkpoints,
                    exact_factor=DEFAULT_CONFIG.exact_factor, grid_power=DEFAULT_CONFIG.grid_power, **sizes)


@pytest.mark.parametrize("name", ["sphere_points", "se3_frames"])
def test_correct_variants_pass_and_negative_controls_fail(name):
    """At the default suite's sizes (seed 0): the lifted ODE, Heun and SDE and the quotient ODE with
    vertical garbage pass; the paper's sign, no curvature and garbage with the conventional ODE fail."""
    for variant in ("quotient_ode", "quotient_heun", "quotient_sde", "garbage_vertical_quotient"):
        rec = _suite_run(name, variant)
        assert rec.passed and rec.ok, (name, variant, rec.p_value, rec.checkpoints)
        assert [c["t"] for c in rec.checkpoints][-1] == 1.0 and len(rec.checkpoints) == 2
    for variant in ("sde_paper_sign", "sde_no_curvature", "garbage_vertical_conventional"):
        rec = _suite_run(name, variant)
        assert not rec.passed and rec.ok and rec.p_value < 1e-4, (name, variant, rec.p_value, rec.checkpoints)


def test_suites_hold_the_curved_cases_and_their_costs():
    for name in ("sphere_points", "se3_frames"):
        assert name in DEFAULT_CONFIG.targets and name in QUICK_CONFIG.targets
        case = builtin_case(name)
        assert case.has_fibres and case.quotient.total_space.name in ("S^2", "SE(3) frames")
        assert "sde_curvature_075" not in case.target.default_variants and "sde_paper_sign" in case.target.default_variants
    sphere, frames, so2 = builtin_case("sphere_points"), builtin_case("se3_frames"), builtin_case("so2")
    ode, sde = VARIANTS["quotient_ode"], VARIANTS["quotient_sde"]
    # the progress bar's weights: per configuration and step, frames cost more than points of S^2,
    # which cost more than the flat SO(2) toy; the SDE's score and curvature add to the ODE's cost
    costs = [estimated_cost(c, ode, 1000, 100, 20, checkpoints=(0.5,)) for c in (so2, sphere, frames)]
    assert costs[0] < costs[1] < costs[2]
    assert estimated_cost(sphere, sde, 1000, 100, 20, checkpoints=(0.5,)) > costs[1]
    assert estimated_cost(sphere, ode, 1000, 100, 20, final_samples=200, checkpoints=(0.5,)) < costs[1]


def test_cli_selects_the_curved_cases(tmp_path, capsys):
    out = tmp_path / "curved.json"
    code = main(["verify", "--targets", "sphere_points", "se3_frames", "--variants", "quotient_ode", "sde_paper_sign",
                 "--n-samples", "600", "--steps", "40", "--json", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = json.loads(out.read_text())
    assert [(r["target"], r["variant"], r["ok"]) for r in records] == [
        ("sphere_points", "quotient_ode", True), ("sphere_points", "sde_paper_sign", True),
        ("se3_frames", "quotient_ode", True), ("se3_frames", "sde_paper_sign", True)]
    assert all(r["group"] == "SO(3)" or r["group"] == "SE(3)" for r in records)
