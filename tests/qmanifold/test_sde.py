"""Tests of the SDE objects, the quotient lift and the solvers (qmanifold.sde, Quotient.lift).

* The exact law of the lifted Brownian motion on SE(3): invariants of the lifted process follow the
  noncentral chi-square laws of the unconstrained Brownian motion; both known-wrong curvature
  variants (no term, the paper's printed sign) are rejected with overwhelming power.
* Horizontality: every Euler-Maruyama increment of the lifted SDE is horizontal and the centre of
  mass never moves (the conventional SDE, as a negative control, has vertical increments).
* Solver order: log-log slope of the error against the step size is 1 (Euler) and 2 (Heun), on a
  linear drift with a closed-form solution and on a nonlinear equivariant drift whose vertical part
  the projection must remove (reference: an independent fine-step RK4 of ``dx/dt = P_x f(x)``).
* The SDE objects: symbolic drifts, validation, trajectories and callbacks.

All random draws use fixed seeds; the statistical tests state their resolution and power.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy
import torch
from scipy import stats

from qmanifold import SDE, ProjectedSDE, Quotient, groups, integrate
from qmanifold.sde import X, time_grid

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


pytestmark = pytest.mark.usefixtures("one_thread")

# A fixed, chiral, non-degenerate tetrahedron (no three points collinear), centred.
X0_SE3 = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.4, 1.2, 0.0], [0.3, 0.5, 1.0]], dtype=F64)
X0_SE3 = X0_SE3 - X0_SE3.mean(0)

SE3 = Quotient(groups.SE3)

# ----------------------------------------------------------------------------------------------
# 1. The exact law of the lifted Brownian motion
#
# Why the law is known. Brownian motion B_t on the centre-of-mass-free subspace V (dimension
# 3(N-1)) has a generator (1/2 Laplacian) that commutes with every rigid motion, so its image in the
# quotient V/SO(3) is itself a Markov diffusion whose law depends on the starting point only
# through its orbit. Theorems 2 and 4 of Xu et al. (docs/geometry.md, "Conventions") say that the lifted SDE
#     dx = -(1/2) h(x) dt + P_x dW          (sigma = 1, zero drift)
# started anywhere on that orbit projects to the *same* quotient diffusion. Every rigid-motion
# invariant (pairwise distances, |x|) is a function on the quotient, so its law under the lifted
# process equals its law under B_t, which is elementary: with x = x0 + centred(W_T),
#     x_i - x_j = x0_i - x0_j + (W_i - W_j),  W_i - W_j ~ N(0, 2T I_3)
#         => |x_i - x_j|^2 / (2T) ~ ncx2(3, |x0_i - x0_j|^2 / (2T)),
#     centred(W_T) is a standard Brownian motion on V at time T
#         => |x|^2 / T ~ ncx2(3(N-1), |x0|^2 / T).
# The lifted process never leaves the horizontal directions (no rotation, no translation), which is
# why the naive "no correction" lift is wrong: the missing Ito drift -(1/2) h pushes towards larger
# orbits. For SO(3) one checks <x, h(x)> = -3, hence E d|x|^2 = (6 + 3) dt for the correct lift
# (6 = horizontal dimension for N = 4, 3 = curvature contribution), 6 dt without the term and
# 3 dt with the printed sign: the |x|^2 statistic is biased by ~0.5 standard deviation, which a KS
# test on 4000 paths rejects with p << 1e-10.
#
# Resolution: with 4000 paths the KS test resolves CDF differences of about 1.6/sqrt(4000) ~ 0.026
# (alpha = 0.01). The Euler-Maruyama weak error at 200 steps is far below this: run with 40 000
# paths the KS distance of |x|^2 to ncx2 was 0.0045 at 25 steps and 0.0023 at 200 steps, i.e.
# at the Monte-Carlo noise floor (checked when writing this test).

BM_PATHS = 4000
BM_STEPS = 200
BM_T = 1.0
PAIRS = [(i, j) for i in range(4) for j in range(i + 1, 4)]


def _lifted_bm_pvalues(curvature_factor: float) -> dict[str, float]:
    sde = SE3.lift(SDE(diffusion=1.0), curvature_factor=curvature_factor)
    x0 = X0_SE3.expand(BM_PATHS, 4, 3).clone()
    x = integrate(sde, x0, 0.0, BM_T, BM_STEPS, generator=gen(20260101))
    assert torch.isfinite(x).all()
    pvals = {}
    r2 = (x.square().sum((-2, -1)) / BM_T).numpy()
    pvals["|x|^2"] = stats.kstest(r2, stats.ncx2(3 * (4 - 1), float(X0_SE3.square().sum()) / BM_T).cdf).pvalue
    for i, j in PAIRS:
        d2 = ((x[:, i] - x[:, j]).square().sum(-1) / (2 * BM_T)).numpy()
        lam = float((X0_SE3[i] - X0_SE3[j]).square().sum()) / (2 * BM_T)
        pvals[f"|x{i}-x{j}|^2"] = stats.kstest(d2, stats.ncx2(3, lam).cdf).pvalue
    return pvals


@pytest.mark.slow
def test_lifted_brownian_motion_has_the_law_of_brownian_invariants():
    pvals = _lifted_bm_pvalues(1.0)
    alpha = 0.01 / len(pvals)  # Bonferroni over the 7 statistics
    assert min(pvals.values()) > alpha, pvals


@pytest.mark.slow
@pytest.mark.parametrize("curvature_factor", [0.0, -1.0], ids=["no-curvature", "paper-sign"])
def test_wrong_curvature_lifts_are_rejected(curvature_factor):
    pvals = _lifted_bm_pvalues(curvature_factor)
    assert pvals["|x|^2"] < 1e-10, pvals
    # the pairwise distances are biased as well
    assert max(p for k, p in pvals.items() if k != "|x|^2") < 1e-4, pvals


def _vertical_fraction(q: Quotient, traj: torch.Tensor, mask=None) -> torch.Tensor:
    """max over steps and paths of |vertical part of the increment at x_k| / |increment|."""
    inc = traj[1:] - traj[:-1]
    vert = q.vertical_projection(inc, traj[:-1], None if mask is None else mask.expand(inc.shape[:-1]))
    return (vert.flatten(-2).norm(dim=-1) / inc.flatten(-2).norm(dim=-1)).max()


@pytest.mark.parametrize("curvature_factor", [1.0, 0.0, -1.0])
def test_lifted_increments_are_horizontal_and_com_fixed(curvature_factor):
    sde = SE3.lift(SDE(drift=lambda x, t: -x + x.roll(1, -2) ** 2, diffusion=0.7), curvature_factor=curvature_factor)
    x0 = X0_SE3 + 0.3 * torch.randn(8, 4, 3, generator=gen(1), dtype=F64)
    x0 = x0 - x0.mean(-2, keepdim=True)
    _, traj = integrate(sde, x0, 0.0, 1.0, 50, generator=gen(2), return_trajectory=True)
    assert traj.shape == (51, 8, 4, 3)
    assert traj.mean(-2).abs().max() < 1e-13  # centre of mass never moves
    assert _vertical_fraction(SE3, traj) < 1e-10
    # negative control: the conventional (centred only) SDE rotates the configurations
    _, traj_conv = integrate(SE3.conventional(sde.sde), x0, 0.0, 1.0, 50, generator=gen(2), return_trajectory=True)
    assert traj_conv.mean(-2).abs().max() < 1e-13
    assert _vertical_fraction(SE3, traj_conv) > 0.05


def test_lifted_increments_with_mask():
    mask = torch.tensor([[True, True, True, True, False], [True, False, True, True, True]])
    x0 = torch.randn(2, 5, 3, generator=gen(3), dtype=F64)
    x0 = SE3.center(x0, mask)
    sde = SE3.lift(SDE(drift="-x/2", diffusion=1.0))
    _, traj = integrate(sde, x0, 0.0, 1.0, 40, mask=mask, generator=gen(4), return_trajectory=True)
    assert (traj[:, ~mask] == 0).all()  # padded points exactly zero
    com = (traj * mask[..., None]).sum(-2) / mask.sum(-1)[:, None]
    assert com.abs().max() < 1e-13
    assert _vertical_fraction(SE3, traj, mask) < 1e-10


# ----------------------------------------------------------------------------------------------
# 2. Solver order


def _slope(steps: list[int], errors: list[float]) -> float:
    dt = 1.0 / np.asarray(steps, dtype=float)
    return float(np.polyfit(np.log(dt), np.log(np.asarray(errors)), 1)[0])


def _twisted_drift(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear SE(3)-equivariant drift with a large vertical (rotational) part.

    ``f_n = -x_n + 0.5 sum_m tanh(|r_nm|^2) r_nm / N + 0.8 (1 + |x_n|^2) (a x x_n)`` with
    ``r_nm = x_n - x_m`` and the pseudo-vector ``a = x_0 x x_1`` (equivariant for proper rotations),
    all on centred coordinates. The last term is a differential rotation: part of it is vertical.
    """
    xc = x - x.mean(-2, keepdim=True)
    r = xc[..., :, None, :] - xc[..., None, :, :]
    pair = 0.5 * (torch.tanh(r.square().sum(-1, keepdim=True)) * r).mean(-2)
    a = torch.linalg.cross(xc[..., 0, :], xc[..., 1, :])[..., None, :].expand_as(xc)
    twist = 0.8 * (1.0 + xc.square().sum(-1, keepdim=True)) * torch.linalg.cross(a, xc, dim=-1)
    return -xc + pair + twist


def _rk4_reference(q: Quotient, f, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """Independent classical RK4 for dx/dt = P_x f(x, t) on [0, 1]."""

    def rhs(x, t):
        return q.horizontal_projection(f(x, torch.full(x.shape[:-2], t, dtype=x.dtype)), x)

    x, h = x0, 1.0 / steps
    for i in range(steps):
        t = i * h
        k1 = rhs(x, t)
        k2 = rhs(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = rhs(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = rhs(x + h * k3, t + h)
        x = x + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


ORDER_STEPS = [8, 16, 32, 64, 128]


@pytest.mark.parametrize("method,order", [("euler_maruyama", 1.0), ("heun", 2.0)])
def test_solver_order_linear_time_dependent_drift(method, order):
    # dx/dt = -(1 + t) x  =>  x(1) = x0 exp(-3/2); -x is horizontal, so the lift is exact.
    sde = SE3.lift(SDE(drift="-(1 + t) * x"))
    x0 = torch.randn(4, 5, 3, generator=gen(5), dtype=F64)
    x0 = x0 - x0.mean(-2, keepdim=True)
    exact = x0 * math.exp(-1.5)
    errors = [float((integrate(sde, x0, 0.0, 1.0, n, method=method) - exact).abs().max()) for n in ORDER_STEPS]
    assert abs(_slope(ORDER_STEPS, errors) - order) < 0.25, errors


@pytest.fixture(scope="module")
def twisted_problem():
    """Initial configurations and an RK4 reference solution of dx/dt = P_x f(x) at t = 1.

    RK4 with 1000 steps has an error ~1e-13 here (1000, 2000 and 4000 steps agree to < 1e-14),
    far below the smallest Heun error fitted (~5e-7)."""
    x0 = X0_SE3 + 0.2 * torch.randn(4, 4, 3, generator=gen(6), dtype=F64)
    x0 = x0 - x0.mean(-2, keepdim=True)
    return x0, _rk4_reference(SE3, _twisted_drift, x0, 1000)


@pytest.mark.parametrize("method,order", [("euler_maruyama", 1.0), ("heun", 2.0)])
def test_solver_order_nonlinear_equivariant_drift(twisted_problem, method, order):
    q = SE3
    x0, ref = twisted_problem
    # the projection matters here: f has a large vertical part, and the lifted flow differs from
    # the unprojected one by O(1)
    f0 = _twisted_drift(x0, torch.zeros(4, dtype=F64))
    assert (q.vertical_projection(f0, x0).norm() / f0.norm()) > 0.2
    unprojected = integrate(SDE(drift=_twisted_drift), x0, 0.0, 1.0, 100, method="heun")
    assert (unprojected - ref).abs().max() > 0.1
    sde = q.lift(SDE(drift=_twisted_drift))
    errors = [float((integrate(sde, x0, 0.0, 1.0, n, method=method) - ref).abs().max()) for n in ORDER_STEPS]
    assert abs(_slope(ORDER_STEPS, errors) - order) < 0.25, errors
    assert errors[-1] < errors[0] / (2 ** (order * 4) / 3)  # the error really falls by 2^(4 order)


def test_solver_order_generic_backend_agrees_with_fast_path():
    x0 = X0_SE3 + 0.2 * torch.randn(3, 4, 3, generator=gen(7), dtype=F64)
    x0 = x0 - x0.mean(-2, keepdim=True)
    fast = integrate(SE3.lift(SDE(drift=_twisted_drift)), x0, 0.0, 1.0, 32, method="heun")
    generic = integrate(Quotient(groups.SE3, backend="generic").lift(SDE(drift=_twisted_drift)), x0, 0.0, 1.0, 32, method="heun")
    assert torch.allclose(fast, generic, atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------------
# 3. The SDE objects


def test_symbolic_drift_equals_callable():
    x = torch.randn(3, 4, 3, generator=gen(8), dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.9], dtype=F64)
    sym = SDE(drift="-x/2")
    call = SDE(drift=lambda x, t: -x / 2)
    assert torch.equal(sym.drift(x, t), call.drift(x, t))
    assert sym.drift_expr == -X / 2
    # time-dependent coefficients and sympy input
    tt = sympy.Symbol("t", real=True)
    sym_t = SDE(drift=-(1 + tt**2) * sympy.Symbol("x", real=True))
    expected = -(1 + t**2)[:, None, None] * x
    assert torch.allclose(sym_t.drift(x, t), expected, atol=1e-15, rtol=0)
    # masks zero the padded points
    mask = torch.tensor([[True, True, False, True]] * 3)
    assert (sym.drift(x, t, mask)[~mask] == 0).all()


@pytest.mark.parametrize("expr", ["sin(x)", "x**2", "-x/2 + 1", "exp(t)", "x*y"])
def test_nonlinear_or_affine_symbolic_drift_raises(expr):
    with pytest.raises(ValueError):
        SDE(drift=expr)


def test_diffusion_and_is_ode():
    assert SDE(drift="-x").is_ode
    sde = SDE(diffusion="sqrt(2*t)")
    assert not sde.is_ode
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    assert torch.allclose(sde.sigma(t), torch.sqrt(2 * t))
    assert torch.equal(SDE(diffusion=0.5).sigma(t), torch.full_like(t, 0.5))
    assert not SDE(diffusion=lambda t: torch.ones_like(t)).is_ode


def test_heun_with_noise_raises():
    x0 = torch.zeros(2, 4, 3, dtype=F64)
    with pytest.raises(ValueError, match="heun"):
        integrate(SDE(diffusion=1.0), x0, method="heun")
    with pytest.raises(ValueError, match="heun"):
        integrate(SE3.lift(SDE(diffusion=1.0)), x0 + X0_SE3, method="heun")
    with pytest.raises(ValueError, match="unknown method"):
        integrate(SDE(), x0, method="rk4")
    with pytest.raises(ValueError):
        integrate(SDE(), x0, steps=0)


def test_trajectory_shape_and_callback():
    x0 = (X0_SE3 + 0.1 * torch.randn(6, 4, 3, generator=gen(9), dtype=F64))
    x0 = x0 - x0.mean(-2, keepdim=True)
    calls = []
    sde = SE3.lift(SDE(drift="-x", diffusion=0.3))
    x, traj = integrate(sde, x0, 0.0, 1.0, 17, generator=gen(10), return_trajectory=True,
                        callback=lambda i, t, x: calls.append((i, float(t), x.shape)))
    assert traj.shape == (18, 6, 4, 3)
    assert torch.equal(traj[0], x0) and torch.equal(traj[-1], x)
    assert [c[0] for c in calls] == list(range(17))
    assert calls[-1][1] == pytest.approx(1.0) and calls[0][1] == pytest.approx(1 / 17)
    assert all(c[2] == (6, 4, 3) for c in calls)
    # a custom time grid
    times = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=F64)
    _, traj2 = integrate(sde, x0, times=times, generator=gen(10), return_trajectory=True)
    assert traj2.shape == (4, 6, 4, 3)


def test_same_generator_same_path_and_dtype_kept():
    sde = SE3.lift(SDE(drift="-x/2", diffusion=1.0))
    for dtype in (torch.float32, F64):
        x0 = X0_SE3.to(dtype).expand(5, 4, 3).clone()
        a = integrate(sde, x0, 0.0, 1.0, 20, generator=gen(11))
        b = integrate(sde, x0, 0.0, 1.0, 20, generator=gen(11))
        c = integrate(sde, x0, 0.0, 1.0, 20, generator=gen(12))
        assert a.dtype == dtype and torch.equal(a, b) and not torch.equal(a, c)


def test_projected_sde_curvature_term_is_minus_half_sigma_squared_h():
    # the drift of the lift is P_x f - c (sigma^2 / 2) h exactly, for the three curvature factors
    x = X0_SE3 + 0.3 * torch.randn(4, 4, 3, generator=gen(13), dtype=F64)
    x = x - x.mean(-2, keepdim=True)
    t = torch.full((4,), 0.25, dtype=F64)
    base = SDE(drift=_twisted_drift, diffusion="1 + t")  # sigma(0.25) = 1.25
    h = SE3.mean_curvature(x)
    pf = SE3.horizontal_projection(_twisted_drift(x, t), x)
    for c in (1.0, 0.0, -1.0):
        lifted = SE3.lift(base, curvature_factor=c)
        assert isinstance(lifted, ProjectedSDE)
        assert torch.allclose(lifted.drift(x, t), pf - c * 0.5 * 1.25**2 * h, atol=1e-12, rtol=0)
    # the ODE lift has no curvature term
    assert torch.allclose(SE3.lift(SDE(drift=_twisted_drift)).drift(x, t), pf, atol=1e-12, rtol=0)


def test_time_grid():
    g = time_grid(0.0, 1.0, 4, dtype=F64)
    assert torch.equal(g, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=F64))
    with pytest.raises(ValueError):
        time_grid(0.0, 1.0, 0)
