"""Curved total spaces (issue 15): declared manifolds and groups acting on them.

Manifold properties (every declared manifold): tangent projections idempotent, orthogonal and tangent
(constraint Jacobian kills them), exp / retraction stay on M, exp and log inverse to each other,
closed forms equal the geometry derived from the constraints, the Itô drift of Brownian motion
(statistically, with the no-drift variant failing), the log volume density (autograd and total
volume). Bundle properties (every declared pair): Gram matrix = fundamental fields, P idempotent and
horizontal, horizontal orthogonal to vertical, curvature = -grad_M log orbit volume (autograd),
equivariance of every operation. Cross-checks against geomstats' Hypersphere and SpecialEuclidean.
A user-declared sphere and SO(3) in a few declarative lines give the ready-made projections.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import sympy
import torch

from qmanifold import LieGroup, Quotient, groups
from qmanifold.curved import ManifoldAction
from qmanifold.manifold_symbolic import AffineRepresentation, EmbeddedManifold, generic_log_volume_density
from qmanifold.manifolds import Euclidean, ProductManifold, SE3Frames, SO3Frames, Sphere, Torus

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _declared_sphere() -> EmbeddedManifold:
    x0, x1, x2 = sympy.symbols("x0:3", real=True)
    return EmbeddedManifold.from_constraints("S^2 (declared)", 3, [x0**2 + x1**2 + x2**2 - 1])


def _declared_rotations() -> EmbeddedManifold:
    r = sympy.symbols("r0:9", real=True)
    gram = sympy.Matrix(3, 3, r).T * sympy.Matrix(3, 3, r) - sympy.eye(3)
    return EmbeddedManifold.from_constraints("SO(3) (declared)", 9, [gram[i, j] for i in range(3) for j in range(i, 3)],
                                             coords=r)


MANIFOLDS = {
    "sphere2": Sphere(2),
    "sphere3": Sphere(3),
    "torus3": Torus(3),
    "so3": SO3Frames(),
    "se3": SE3Frames(),
    "sphere2xR3": ProductManifold(Sphere(2), Euclidean(3)),
    "declared-sphere": _declared_sphere(),
    "declared-so3": _declared_rotations(),
}
EXACT = [k for k, m in MANIFOLDS.items() if m.has_exact_exp and m.has_log]

PAIRS = {
    "SO3-on-S2": (groups.SO3, Sphere(2), 5),
    "SE3-on-frames": (groups.SE3, SE3Frames(), 4),
    "SO3-on-frames": (groups.SO3, SE3Frames(), 3),
    "SO3-on-rotations": (groups.SO3, SO3Frames(), 3),
    "SO2-phase-on-T4": (groups.SO2, Torus(4), 3),
    "T2-on-T2": (groups.Torus(2), Torus(2), 3),
    "SO3-on-S2xR3": (groups.SO3, ProductManifold(Sphere(2), Euclidean(3)), 3),
    "SO3-on-declared-S2": (groups.SO3, _declared_sphere(), 4),
}
ACTIONS = {name: ManifoldAction(g, m) for name, (g, m, _) in PAIRS.items()}


def points(manifold, shape, seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = manifold.random_point(shape, generator=gen, dtype=dtype)
    v = torch.randn(x.shape, generator=gen, dtype=dtype)
    return x, v, gen


def constraint_jacobians(manifold, x):
    """``[(Jc (..., m, n_i), slice)]`` of the constrained factors of ``manifold`` at ``x``."""
    factors = manifold.factors if isinstance(manifold, ProductManifold) else (manifold,)
    out, start = [], 0
    for f in factors:
        part = x[..., start:start + f.ambient_dim]
        if isinstance(f, EmbeddedManifold):
            out.append((f.constraint_jacobian(part), slice(start, start + f.ambient_dim)))
        start += f.ambient_dim
    return out


# ----------------------------------------------------------------------------------------------
# manifolds


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
def test_tangent_projection_is_an_orthogonal_projection_onto_the_kernel_of_the_constraints(name):
    m = MANIFOLDS[name]
    x, v, gen = points(m, (3, 6), 1)
    w = torch.randn(x.shape, generator=gen, dtype=F64)
    assert m.residual(x).max() < 1e-10  # random points lie on M
    p = m.to_tangent(v, x)
    torch.testing.assert_close(m.to_tangent(p, x), p, atol=1e-12, rtol=1e-12)
    # orthogonal: <v - P v, P w> = 0, and symmetric: <P v, w> = <v, P w>
    assert (m.inner(v - p, m.to_tangent(w, x)).abs() < 1e-11).all()
    torch.testing.assert_close(m.inner(p, w), m.inner(v, m.to_tangent(w, x)))
    for jac, part in constraint_jacobians(m, x):
        assert (jac @ p[..., part].unsqueeze(-1)).abs().max() < 1e-11  # Jc P v = 0
    # the rank of P is the intrinsic dimension
    rank = torch.linalg.matrix_rank(m.tangent_projector(x[0, :2]))
    assert (rank == m.dim).all()
    assert (p != v).any() or m.dim == m.ambient_dim  # not the identity on a curved M


@pytest.mark.parametrize("name", sorted(MANIFOLDS))
def test_exp_and_retraction_stay_on_the_manifold(name):
    m = MANIFOLDS[name]
    x, v, _ = points(m, (4, 5), 2)
    for scale in (1e-3, 0.3, 2.5):
        u = m.to_tangent(v, x) * scale
        for y in (m.exp(x, u), m.retract(x, u)):
            assert m.residual(y).max() < 1e-9, scale
        # first order: exp_x(u) = x + u + O(|u|^2)
    u = m.to_tangent(v, x) * 1e-4
    assert (m.exp(x, u) - x - u).abs().max() < 1e-7


@pytest.mark.parametrize("name", EXACT)
def test_exp_and_log_are_inverse(name):
    m = MANIFOLDS[name]
    x, v, gen = points(m, (4, 5), 3)
    y = m.random_point((4, 5), generator=gen, dtype=F64)
    torch.testing.assert_close(m.exp(x, m.log(x, y)), m.canonical(y), atol=1e-9, rtol=1e-9)
    u = m.to_tangent(v, x)
    # stay inside the injectivity radius: angles below pi (|.|_F = sqrt2 * angle on rotations)
    per_point = m.norm(u.unsqueeze(-2)).clamp_min(1e-12)
    u = u * (1.2 / per_point).clamp(max=1.0).unsqueeze(-1)
    torch.testing.assert_close(m.log(x, m.exp(x, u)), u, atol=1e-9, rtol=1e-9)
    assert (m.log(x, x).abs() < 1e-7).all()


def test_closed_forms_equal_the_geometry_derived_from_the_constraints():
    gen = torch.Generator().manual_seed(4)
    for closed, derived in ((Sphere(2), MANIFOLDS["declared-sphere"]), (SO3Frames(), MANIFOLDS["declared-so3"])):
        x = closed.random_point((7,), generator=gen, dtype=F64)
        v = torch.randn(x.shape, generator=gen, dtype=F64)
        torch.testing.assert_close(derived.to_tangent(v, x), closed.to_tangent(v, x))
        torch.testing.assert_close(EmbeddedManifold.to_tangent(closed, v, x), closed.to_tangent(v, x))
        # mean curvature of the embedding from the constraint Hessians: -2x on S^2, -R on SO(3)
        torch.testing.assert_close(derived.mean_curvature_vector(x), closed.mean_curvature_vector(x))
        torch.testing.assert_close(EmbeddedManifold.mean_curvature_vector(closed, x), closed.mean_curvature_vector(x))
        # Gauss-Newton retraction lands on M, first-order equal to the closed-form exp
        u = closed.to_tangent(v, x) * 1e-3
        torch.testing.assert_close(derived.retract(x, u), closed.exp(x, u), atol=2e-6, rtol=0)
    sphere = Sphere(2)
    x = sphere.random_point((4,), generator=gen, dtype=F64)
    torch.testing.assert_close(MANIFOLDS["declared-sphere"].ito_drift(x), -x)  # -(d-1)/2 x on S^{d-1}, d = 3
    x3 = Sphere(3).random_point((4,), generator=gen, dtype=F64)
    torch.testing.assert_close(EmbeddedManifold.ito_drift(Sphere(3), x3), -1.5 * x3)
    # Gauss-Newton on |y|^2 - 1 moves radially: it is the closed-form projection y / |y|
    y = torch.randn(6, 3, generator=gen, dtype=F64) * 2
    torch.testing.assert_close(MANIFOLDS["declared-sphere"].project(y), sphere.project(y))


def _ball_samples(m, x, radius, count, gen):
    """Uniform tangent vectors in the metric ball of ``radius`` at one point ``x`` (1, n)."""
    u = m.to_tangent(torch.randn(count, 1, m.ambient_dim, generator=gen, dtype=F64), x.expand(count, 1, -1))
    u = u / m.norm(u).reshape(count, 1, 1)
    r = radius * torch.rand(count, 1, 1, generator=gen, dtype=F64) ** (1 / m.dim)
    return u * r


def test_log_volume_density_closed_forms_autograd_and_total_volume():
    gen = torch.Generator().manual_seed(5)
    for name in ("sphere2", "sphere3", "so3", "se3", "torus3", "sphere2xR3"):
        m = MANIFOLDS[name]
        x = m.random_point((3, 4), generator=gen, dtype=F64)
        v = m.to_tangent(torch.randn(x.shape, generator=gen, dtype=F64), x)
        closed = m.log_volume_density(x, v)
        torch.testing.assert_close(generic_log_volume_density(m, x, v), closed, atol=1e-9, rtol=1e-8)
        if name not in ("torus3",):
            assert closed.abs().min() > 1e-3  # not trivially zero
    # the declared sphere's retraction is the gnomonic map: density (1 + r^2)^{-(d+1)/2}
    m = MANIFOLDS["declared-sphere"]
    x = m.random_point((2, 5), generator=gen, dtype=F64)
    v = m.to_tangent(torch.randn(x.shape, generator=gen, dtype=F64), x)
    expected = (-1.5 * torch.log1p(v.square().sum(-1))).sum(-1)
    torch.testing.assert_close(m.log_volume_density(x, v), expected, atol=1e-9, rtol=1e-8)
    # integrating exp(density) over the injectivity ball gives the total volume (Monte Carlo, 0.5 %)
    for m, radius in ((Sphere(2), math.pi), (SO3Frames(), math.sqrt(2) * math.pi)):
        x = m.random_point((1,), generator=gen, dtype=F64)
        u = _ball_samples(m, x, radius, 200_000, gen)
        ball = math.pi ** (m.dim / 2) / math.gamma(m.dim / 2 + 1) * radius**m.dim
        density = m.log_volume_density(x.expand(u.shape[0], 1, -1), u).exp()
        estimate = ball * density.mean()
        assert abs(float(estimate) / math.exp(m.log_volume) - 1) < 5e-3, (m, float(estimate))


@pytest.mark.parametrize("name", ["sphere2", "declared-sphere"])
def test_brownian_motion_on_the_sphere_has_the_ito_drift(name):
    """E<X_t, x0> = exp(-t) on S^2 (generator Laplacian / 2). The geodesic random walk stays on M;
    the ambient Itô Euler-Maruyama scheme needs the drift -x dt (without it E<X_t, x0> = 1)."""
    m = MANIFOLDS[name]
    gen = torch.Generator().manual_seed(6)
    chains, steps, dt = 10_000, 50, 0.02
    x0 = m.project(torch.tensor([[0.3, -0.5, 0.8]], dtype=F64)).expand(chains, 1, 3)
    walk, ito, no_drift = x0, x0, x0
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=gen, dtype=F64)
        walk = m.brownian_step(walk, dt, noise)
        ito = ito + m.brownian_increment(ito, dt, noise)
        no_drift = no_drift + m.to_tangent(noise, no_drift) * dt**0.5
    target, sigma = math.exp(-1.0), 0.5 / math.sqrt(chains)
    assert m.residual(walk).max() < 1e-9  # the random walk stays on the sphere
    for sample in (walk, ito):
        assert abs(float((sample * x0).sum(-1).mean()) - target) < 5 * sigma + 0.003
    assert abs(float((no_drift * x0).sum(-1).mean()) - target) > 50 * sigma  # the known-wrong variant fails
    # the drift also keeps E|X|^2 = 1; without it E|X_t|^2 = 1 + 2t
    assert abs(float(ito.square().sum(-1).mean()) - 1) < 0.02
    assert float(no_drift.square().sum(-1).mean()) > 2.5


def test_brownian_motion_on_rotations_has_the_ito_drift_and_second_moment():
    """E[R_0^T R_t] = e^{-t/2} I for the Frobenius metric; one step has E|dR|^2 = dim dt."""
    m = SO3Frames()
    gen = torch.Generator().manual_seed(7)
    chains, steps, dt = 20_000, 50, 0.02
    r0 = m.random_point((1, 1), generator=gen, dtype=F64).expand(chains, 1, 9)
    walk, ito, no_drift = r0, r0, r0
    for _ in range(steps):
        noise = torch.randn(r0.shape, generator=gen, dtype=F64)
        walk = m.brownian_step(walk, dt, noise)
        ito = ito + m.brownian_increment(ito, dt, noise)
        # (the derived projector: an orthogonal projection also off SO(3), where this chain wanders)
        no_drift = no_drift + MANIFOLDS["declared-so3"].to_tangent(noise, no_drift) * dt**0.5
    assert m.residual(walk).max() < 1e-9
    mats = m.matrices(r0[:1]).transpose(-1, -2)
    target = 3 * math.exp(-0.5)
    traces = [float((mats @ m.matrices(s)).diagonal(dim1=-2, dim2=-1).sum(-1).mean()) for s in (walk, ito, no_drift)]
    assert abs(traces[0] - target) < 0.035 and abs(traces[1] - target) < 0.035, traces  # sd ~ 1: 5 sigma
    assert abs(traces[2] - target) > 0.5, traces  # without the Itô drift -R/2: E tr = 3 (the wrong variant fails)
    # second moment of one step, on every manifold: E|exp_x(sqrt(dt) P xi) - x|^2 = dim * dt (1 + O(dt))
    for name in ("sphere2", "so3", "se3", "torus3", "sphere2xR3"):
        m = MANIFOLDS[name]
        x = m.random_point((4000, 3), generator=gen, dtype=F64)
        y = m.brownian_step(x, 1e-3, generator=gen)
        assert m.residual(y).max() < 1e-9
        for step in (m.log(x, y), y - x if name != "torus3" else m.log(x, y)):  # geodesic and chordal
            second = float(step.square().sum((-2, -1)).mean()) / (3 * m.dim * 1e-3)
            assert abs(second - 1) < 0.03, (name, second)


# ----------------------------------------------------------------------------------------------
# groups acting on curved total spaces


def config(name, seed, batch=(2,)):
    _, m, n = PAIRS[name]
    x, v, gen = points(m, (*batch, n), seed)
    return ACTIONS[name], m, x, v, gen


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_gram_matrix_matches_the_fundamental_fields(name):
    action, m, x, _, _ = config(name, 10)
    fields = action.fundamental_fields(x)  # (..., k, N, n)
    assert fields.shape[-3] == PAIRS[name][0].algebra_dim
    torch.testing.assert_close(m.to_tangent(fields, x.unsqueeze(-3).expand_as(fields)), fields)  # tangent to M
    gram = torch.einsum("...anj,...bnj->...ab", fields, fields)
    torch.testing.assert_close(action.gram_matrix(x), gram)
    # and a field is the derivative of the action: d/ds act_exp(s e_a) at s = 0
    k = fields.shape[-3]
    for a in range(k):
        e = torch.zeros(k, dtype=F64)
        e[a] = 1e-6
        diff = (action.act_exp(e, x) - action.act_exp(-e, x)) / 2e-6
        if isinstance(m, Torus):
            diff = torch.remainder(diff + math.pi / 2e-6, math.pi / 1e-6) - math.pi / 2e-6
        torch.testing.assert_close(diff, fields[..., a, :, :], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_horizontal_and_vertical_projections(name):
    action, m, x, v, gen = config(name, 11)
    p = action.horizontal_projection(v, x)
    vert = action.vertical_projection(v, x)
    torch.testing.assert_close(action.horizontal_projection(p, x), p, atol=1e-11, rtol=1e-11)  # idempotent
    torch.testing.assert_close(m.to_tangent(p, x), p, atol=1e-12, rtol=1e-12)  # tangent to M
    torch.testing.assert_close(p + vert, m.to_tangent(v, x), atol=1e-12, rtol=1e-12)
    fields = action.fundamental_fields(x)
    assert action.momentum(p, x).abs().max() < 1e-11  # horizontal: orthogonal to every field
    assert m.inner(p, vert).abs().max() < 1e-11  # horizontal orthogonal to vertical
    for a in range(fields.shape[-3]):
        assert action.horizontal_projection(fields[..., a, :, :], x).abs().max() < 1e-11  # kills the fields
    w = torch.randn(x.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(m.inner(p, w), m.inner(v, action.horizontal_projection(w, x)))  # self-adjoint on T M


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_mean_curvature_is_minus_the_riemannian_gradient_of_the_log_orbit_volume(name):
    action, m, x, _, _ = config(name, 12)
    h = action.mean_curvature(x)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(action.log_orbit_volume(xg).sum(), xg)
    torch.testing.assert_close(h, -m.to_tangent(grad, x), atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(action.horizontal_projection(h, x), h, atol=1e-11, rtol=1e-9)  # h is horizontal
    # where orbits have different sizes the curvature is not zero (the test has power)
    if name in ("SO3-on-S2", "SE3-on-frames", "SO3-on-frames", "SO3-on-S2xR3", "SO3-on-declared-S2"):
        assert h.abs().max() > 1e-2
    # first variation along a geodesic: d/ds log vol(exp_x(s u)) = -<h, u>
    if m.has_exact_exp:
        u = action.horizontal_projection(torch.randn_like(x), x)
        eps = 1e-5
        fd = (action.log_orbit_volume(m.exp(x, eps * u)) - action.log_orbit_volume(m.exp(x, -eps * u))) / (2 * eps)
        torch.testing.assert_close(fd, -m.inner(h, u), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_every_operation_is_equivariant(name):
    action, m, x, v, gen = config(name, 13)
    group = PAIRS[name][0]
    g = group.random_element((2,), generator=gen, dtype=F64)
    gx, gv = action.act(g, x), action.act_on_vectors(g, v)
    assert m.residual(gx).max() < 1e-10  # the action preserves M

    def g_(t):
        return action.act_on_vectors(g, t)

    torch.testing.assert_close(action.horizontal_projection(gv, gx), g_(action.horizontal_projection(v, x)))
    torch.testing.assert_close(action.vertical_projection(gv, gx), g_(action.vertical_projection(v, x)))
    torch.testing.assert_close(action.mean_curvature(gx), g_(action.mean_curvature(x)))
    torch.testing.assert_close(action.log_orbit_volume(gx), action.log_orbit_volume(x))
    torch.testing.assert_close(m.to_tangent(gv, gx), g_(m.to_tangent(v, x)))
    u = m.to_tangent(v, x)
    torch.testing.assert_close(m.canonical(m.exp(gx, g_(u))), m.canonical(action.act(g, m.exp(x, u))))
    torch.testing.assert_close(m.ito_drift(gx), g_(m.ito_drift(x)))
    torch.testing.assert_close(m.log_volume_density(gx, g_(u)), m.log_volume_density(x, u))
    if m.has_log:
        y = m.random_point(x.shape[:-1], generator=gen, dtype=F64)
        torch.testing.assert_close(m.log(gx, action.act(g, y)), g_(m.log(x, y)))
    # a group element given by Lie-algebra coefficients acts the same through both routes
    coef = 0.7 * torch.randn(2, group.algebra_dim, generator=gen, dtype=F64)
    torch.testing.assert_close(action.act(action.group_element(coef), x), action.act_exp(coef, x))


@pytest.mark.parametrize("name", ["SO3-on-S2", "SE3-on-frames", "SO2-phase-on-T4"])
def test_masked_equals_unpadded_and_dtype_is_kept(name):
    action, m, x, v, gen = config(name, 14, batch=(3,))
    x = torch.cat([x, m.random_point((3, 2), generator=gen, dtype=F64)], -2)
    v = torch.randn(x.shape, generator=gen, dtype=F64)
    mask = torch.ones(x.shape[:-1], dtype=torch.bool)
    mask[0, 1] = mask[1, -1] = mask[2, 0] = False
    outs = {"P": action.horizontal_projection(v, x, mask), "h": action.mean_curvature(x, mask)}
    vol = action.log_orbit_volume(x, mask)
    for out in outs.values():
        assert (out[~mask] == 0).all()
    for i in range(3):
        xi, vi = x[i][mask[i]], v[i][mask[i]]
        torch.testing.assert_close(outs["P"][i][mask[i]], action.horizontal_projection(vi, xi))
        torch.testing.assert_close(outs["h"][i][mask[i]], action.mean_curvature(xi))
        torch.testing.assert_close(vol[i], action.log_orbit_volume(xi))
    x32, v32 = x.float(), v.float()
    p32 = action.horizontal_projection(v32, x32, mask)
    assert p32.dtype == torch.float32 and m.exp(x32, m.to_tangent(v32, x32)).dtype == torch.float32
    torch.testing.assert_close(p32.double(), outs["P"], atol=2e-4, rtol=2e-4)


def test_closed_form_curvature_on_the_sphere_and_frames():
    """(S^2)^N / SO(3): Gram = sum_n (I - x_n x_n^T) (the inertia tensor of unit masses);
    SE(3)^N / SE(3): Gram = [[2N I + K(t), hat(sum t)^T...]] -- checked through its Schur complement."""
    action, _, x, _, _ = config("SO3-on-S2", 15)
    gram = x.shape[-2] * torch.eye(3, dtype=F64) - x.transpose(-1, -2) @ x
    torch.testing.assert_close(action.gram_matrix(x), gram)
    action, _, x, _, _ = config("SE3-on-frames", 15)
    _, t = SE3Frames.to_matrices(x)
    tc = t - t.mean(-2, keepdim=True)
    n = x.shape[-2]
    inertia = tc.square().sum((-2, -1))[..., None, None] * torch.eye(3, dtype=F64) - tc.transpose(-1, -2) @ tc
    # log vol = 1/2 log det(2N I + K(t_c)) + 3/2 log N (translations eliminated by the Schur complement)
    expected = 0.5 * torch.logdet(2 * n * torch.eye(3, dtype=F64) + inertia) + 1.5 * math.log(n)
    torch.testing.assert_close(action.log_orbit_volume(x), expected)


# ----------------------------------------------------------------------------------------------
# geomstats cross-checks (optional extra, installed in the development environment)


def _t(array) -> torch.Tensor:
    return torch.tensor(np.array(array))


def test_sphere_against_geomstats_hypersphere():
    pytest.importorskip("geomstats")
    from geomstats.geometry.hypersphere import Hypersphere

    gen = torch.Generator().manual_seed(20)
    for dim in (2, 3):
        ours, theirs = Sphere(dim), Hypersphere(dim)
        x = ours.random_point((8,), generator=gen, dtype=F64)
        v = torch.randn(x.shape, generator=gen, dtype=F64)
        w = torch.randn(x.shape, generator=gen, dtype=F64)
        y = ours.random_point((8,), generator=gen, dtype=F64)
        xn, vn, yn = x.numpy(), v.numpy(), y.numpy()
        u = ours.to_tangent(v[:, None], x[:, None])[:, 0]
        torch.testing.assert_close(u, _t(theirs.to_tangent(vn, xn)))
        torch.testing.assert_close(ours.exp(x[:, None], u[:, None])[:, 0], _t(theirs.metric.exp(u.numpy(), xn)))
        torch.testing.assert_close(ours.log(x[:, None], y[:, None])[:, 0], _t(theirs.metric.log(yn, xn)))
        ut = ours.to_tangent(w[:, None], x[:, None])[:, 0]
        inner = ours.inner(u[:, None], ut[:, None])
        torch.testing.assert_close(inner, _t(theirs.metric.inner_product(u.numpy(), ut.numpy(), xn)))
        torch.testing.assert_close(ours.dist(x[:, None], y[:, None]), _t(theirs.metric.dist(xn, yn)))


def test_se3_frames_against_geomstats_special_euclidean():
    pytest.importorskip("geomstats")
    from geomstats.geometry.special_euclidean import SpecialEuclidean

    theirs = SpecialEuclidean(3)
    ours = SE3Frames()
    gen = torch.Generator().manual_seed(21)
    x = ours.random_point((8, 1), generator=gen, dtype=F64) * torch.cat([torch.ones(9), 2 * torch.ones(3)]).to(F64)
    v = ours.to_tangent(torch.randn(x.shape, generator=gen, dtype=F64), x)
    w = ours.to_tangent(torch.randn(x.shape, generator=gen, dtype=F64), x)
    xh, vh, wh = (SE3Frames.to_homogeneous(t[:, 0], tangent=k > 0).numpy() for k, t in enumerate((x, v, w)))
    assert theirs.belongs(xh).all()
    torch.testing.assert_close(ours.inner(v, w), _t(theirs.metric.inner_product(vh, wh, xh)))
    exp_theirs = _t(theirs.metric.exp(vh, xh))
    torch.testing.assert_close(SE3Frames.to_homogeneous(ours.exp(x, v)[:, 0]), exp_theirs)
    y = ours.exp(x, v)
    log_theirs = _t(theirs.metric.log(SE3Frames.to_homogeneous(y[:, 0]).numpy(), xh))
    torch.testing.assert_close(SE3Frames.to_homogeneous(ours.log(x, y)[:, 0], tangent=True), log_theirs, atol=1e-7, rtol=1e-7)


# ----------------------------------------------------------------------------------------------
# a user's declaration, the Quotient API, and declaration errors


def _user_declaration():
    # --- declaration begins
    x0, x1, x2 = sympy.symbols("x0:3", real=True)
    sphere = EmbeddedManifold.from_constraints("S^2", 3, [x0**2 + x1**2 + x2**2 - 1])
    rotations = LieGroup("SO(3)", 3, generators=[
        [[0, 0, 0], [0, 0, -1], [0, 1, 0]],
        [[0, 0, 1], [0, 0, 0], [-1, 0, 0]],
        [[0, -1, 0], [1, 0, 0], [0, 0, 0]],
    ])
    return Quotient(rotations, manifold=sphere)
    # --- declaration ends


def test_a_declared_manifold_and_group_give_the_ready_made_projections():
    source = inspect.getsource(_user_declaration)
    body = source.split("# --- declaration begins")[1].split("# --- declaration ends")[0]
    assert len([line for line in body.splitlines() if line.strip()]) <= 15
    user = _user_declaration()
    ready = Quotient(groups.SO3, manifold=Sphere(2))
    gen = torch.Generator().manual_seed(30)
    x = Sphere(2).random_point((4, 6), generator=gen, dtype=F64)
    v = torch.randn(x.shape, generator=gen, dtype=F64)
    for method in ("horizontal_projection", "vertical_projection"):
        torch.testing.assert_close(getattr(user, method)(v, x), getattr(ready, method)(v, x))
    torch.testing.assert_close(user.mean_curvature(x), ready.mean_curvature(x))
    torch.testing.assert_close(user.log_orbit_volume(x), ready.log_orbit_volume(x))
    torch.testing.assert_close(user.total_space.ito_drift(x), ready.total_space.ito_drift(x))
    g = groups.SO3.random_element((4,), generator=gen, dtype=F64)
    torch.testing.assert_close(user.act(g, x), ready.act(g, x))


def test_quotient_with_a_manifold_keeps_its_api_and_the_flat_case():
    q = Quotient(groups.SE3, manifold=SE3Frames())
    assert "SE3Frames" in repr(q) and q.point_dim == 12 and q.fiber_dim() == 6 and q.backend == "generic"
    gen = torch.Generator().manual_seed(31)
    x = SE3Frames().random_point((2, 4), generator=gen, dtype=F64)
    v = torch.randn(x.shape, generator=gen, dtype=F64)
    torch.testing.assert_close(q.horizontal_projection(v, x), ACTIONS["SE3-on-frames"].horizontal_projection(v, x))
    assert q.conditioning(x).min() > 0 and q.orbit_dimension_ok(1)
    assert not Quotient(groups.SO3, manifold=Sphere(2)).orbit_dimension_ok(1)  # one point: stabiliser SO(2)
    g = q.random_element((2,), generator=gen, dtype=F64)
    torch.testing.assert_close(q.log_orbit_volume(q.act(g, x)), q.log_orbit_volume(x))
    for call in (lambda: q.align(x, x), lambda: q.dist(x, x)):
        with pytest.raises(NotImplementedError, match="curved total space"):
            call()
    with pytest.raises(ValueError, match="points of dimension"):
        q.horizontal_projection(v[..., :3], x[..., :3])
    with pytest.raises(ValueError, match="generic backend"):
        Quotient(groups.SO3, backend="fast", manifold=Sphere(2))
    # the flat case: manifold=Euclidean(d) is the default, and nothing else changes
    flat, explicit = Quotient(groups.SE3), Quotient(groups.SE3, manifold=Euclidean(3))
    y = torch.randn(2, 5, 3, generator=gen, dtype=F64)
    w = torch.randn(y.shape, generator=gen, dtype=F64)
    assert torch.equal(flat.horizontal_projection(w, y), explicit.horizontal_projection(w, y))
    assert repr(flat) == repr(explicit) and flat._curved is None
    with pytest.raises(ValueError, match="dimension"):
        Quotient(groups.SE3, manifold=Euclidean(2))


def test_declarations_that_are_not_actions_on_the_manifold_are_rejected():
    # translations do not preserve a sphere declared by its constraint
    with pytest.raises(ValueError, match="not tangent"):
        ManifoldAction(groups.SE3, MANIFOLDS["declared-sphere"])
    # translations act trivially on directions: the fields are dependent
    with pytest.raises(ValueError, match="linearly dependent"):
        ManifoldAction(groups.SE3, Sphere(2))
    # fields with the wrong commutators do not represent SO(3)
    rep = Sphere(2).group_representation(groups.SO3)
    wrong = AffineRepresentation((rep.linear[0], rep.linear[1], -rep.linear[2]), rep.offset, rep.represent)
    with pytest.raises(ValueError, match="commutator"):
        ManifoldAction(groups.SO3, Sphere(2), wrong)
    # a non-isometric linear part
    scale = AffineRepresentation((sympy.eye(3),), (sympy.zeros(3, 1),))
    with pytest.raises(ValueError, match="not an isometry"):
        ManifoldAction(LieGroup("scalings", 3, generators=[sympy.eye(3)]), Sphere(2), scale)
    with pytest.raises(ValueError, match="does not act"):
        Torus(3).group_representation(groups.SO3)
    with pytest.raises(ValueError, match="not among the ambient coordinates"):
        EmbeddedManifold.from_constraints("bad", 2, [sympy.Symbol("y") ** 2 - 1])
