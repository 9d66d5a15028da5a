"""Numerical range of the bundle geometry (issue 16): scale invariance over the float range,
degenerate configurations, and the fast SO(3)/SE(3) path against the generic lowering.

The geometry is homogeneous in the configuration: ``P_{cx} = P_x``, ``h(cx) = h(x) / c``,
``log det Gram(cx) = log det Gram(x) + 2 k log c`` (k rotation-like generators), the conditioning
and the optimal alignment rotation do not depend on c, and ``dist(cx, cy) = c dist(x, y)``. These
tests check that over c in 1e-30 .. 1e30 in float32 and float64, with tolerances derived from the
rounding of the inputs: ``eps / cond`` where ``cond`` is the Gram conditioning (capped at the
regulariser's 64 eps), because the scaled and the unscaled input differ by one rounding.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmanifold import LieGroup, Quotient, groups, so3
from qmanifold import geometry as G
from qmanifold.masking import center

SO2_ABOUT_Z = LieGroup("SO(2) about z in R^3", 3, generators=[[[0, -1, 0], [1, 0, 0], [0, 0, 0]]])
SO4 = LieGroup(
    "SO(4)",
    4,
    generators=[
        sympy.Matrix(4, 4, lambda r, c: (1 if (r, c) == (j, i) else -1 if (r, c) == (i, j) else 0))
        for i in range(4)
        for j in range(i + 1, 4)
    ],
)
QUOTIENTS = {
    "SE3-fast": Quotient(groups.SE3, backend="fast"),
    "SE3-generic": Quotient(groups.SE3, backend="generic"),
    "SO3-fast": Quotient(groups.SO3, backend="fast"),
    "SO3-generic": Quotient(groups.SO3, backend="generic"),
    "SE2": Quotient(groups.SE2),
    "T2": Quotient(groups.Torus(2)),
    "SO2-about-z": Quotient(SO2_ABOUT_Z),
    "SO4": Quotient(SO4),
}
NAMES = sorted(QUOTIENTS)
SCALES = (1e-30, 1e-10, 1.0, 1e10, 1e19, 1e30)
DTYPES = (torch.float32, torch.float64)


def draw(q: Quotient, n: int, seed: int, dtype, batch=(2,)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, q.point_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(*batch, n, q.point_dim, generator=gen, dtype=torch.float64)
    return x.to(dtype), v.to(dtype)


def rounding_bound(q: Quotient, x: torch.Tensor) -> torch.Tensor:
    """``eps / max(cond, 64 eps)`` per sample: the relative sensitivity to one rounding of x."""
    eps = torch.finfo(x.dtype).eps
    cond = q.conditioning(x.double()).clamp_min(64 * eps)
    return (eps / cond).to(torch.float64)


def per_sample_max(t: torch.Tensor) -> torch.Tensor:
    return t.double().abs().flatten(-2).amax(-1)


# ----------------------------------------------------------------------------------------------
# Scale invariance of the projection, curvature, orbit volume and conditioning


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(3, 7), seed=st.integers(0, 2**31 - 1), scale=st.sampled_from(SCALES))
def test_geometry_is_scale_invariant_over_the_float_range(name, dtype, n, seed, scale):
    q = QUOTIENTS[name]
    x, v = draw(q, n, seed, dtype)
    xs = x * scale
    assert torch.isfinite(xs).all() and (xs != 0).all()  # representable: no overflow, no flush to zero
    bound = rounding_bound(q, x)
    p1, ps = q.horizontal_projection(v, x), q.horizontal_projection(v, xs)
    vert = q.vertical_projection(v, xs)
    h1, hs = q.mean_curvature(x), q.mean_curvature(xs)
    lov1, lovs = q.log_orbit_volume(x), q.log_orbit_volume(xs)
    c1, cs = q.conditioning(x), q.conditioning(xs)
    for out in (ps, vert, hs, lovs, cs):
        assert torch.isfinite(out).all() and out.dtype == dtype
    vmax = per_sample_max(v)
    # P_{cx}(v) = P_x(v), and P + V = v
    assert (per_sample_max(ps - p1) <= 200 * bound * vmax).all()
    assert (per_sample_max(ps + vert - v) <= 50 * bound * vmax).all()
    # h(cx) = h(x) / c
    assert (per_sample_max(hs.double() * scale - h1.double()) <= 200 * bound * per_sample_max(h1)).all()
    # log vol(cx) = log vol(x) + k log c (1/2 log det of a k x k Gram matrix that scales as c^2)
    k = len(q.lie.generators)
    shift = k * math.log(scale)
    err = (lovs.double() - shift - lov1.double()).abs()
    assert (err <= 200 * k * bound + 20 * torch.finfo(dtype).eps * (abs(shift) + lov1.double().abs())).all()
    # the conditioning diagnostic is scale-free
    assert ((cs - c1).abs() <= 1e3 * torch.finfo(dtype).eps).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_log_det_gram_keeps_the_exact_log_scale_term(dtype):
    """``log det Gram(cx) = log det Gram(x) + 2 k log c`` down to 1e-30 and up to 1e30, where the
    Gram entries themselves (c^2 ~ 1e-60 .. 1e60) are not representable in float32."""
    for group, translations in ((groups.SE3, True), (SO4, False), (groups.SO2, False)):
        geom = group.lowered(dtype, "cpu")
        k = len(group.generators)
        x = torch.randn(4, 6, group.point_dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
        ref = G.log_det_gram(geom, x, None, translations).double()
        for scale in SCALES:
            got = G.log_det_gram(geom, x * scale, None, translations).double()
            expected = ref + 2 * k * math.log(scale)
            torch.testing.assert_close(got, expected, rtol=0, atol=50 * torch.finfo(dtype).eps * (1 + expected.abs().max()))


@pytest.mark.parametrize("name", ["SE3-fast", "SE3-generic", "SO4"])
def test_padding_never_sets_the_scale(name):
    """The per-sample scale comes from the real points only: huge, inf or NaN padding changes nothing,
    and a configuration with no real point stays zero."""
    q = QUOTIENTS[name]
    x, v = draw(q, 5, 3, torch.float32, batch=())
    x = x * 1e19
    padded_x = torch.cat([x, torch.tensor([[3e38] * q.point_dim, [float("inf")] * q.point_dim], dtype=x.dtype)])
    padded_v = torch.cat([v, torch.full((2, q.point_dim), float("nan"), dtype=v.dtype)])
    mask = torch.tensor([True] * 5 + [False] * 2)
    torch.testing.assert_close(q.horizontal_projection(padded_v, padded_x, mask)[:5], q.horizontal_projection(v, x))
    torch.testing.assert_close(q.mean_curvature(padded_x, mask)[:5], q.mean_curvature(x))
    torch.testing.assert_close(q.log_orbit_volume(padded_x, mask), q.log_orbit_volume(x))
    torch.testing.assert_close(q.conditioning(padded_x, mask), q.conditioning(x))
    nothing = torch.zeros(7, dtype=torch.bool)
    for out in (q.horizontal_projection(padded_v, padded_x, nothing), q.mean_curvature(padded_x, nothing)):
        assert (out == 0).all()


# ----------------------------------------------------------------------------------------------
# Degenerate configurations: idempotence, and the fast path equal to the generic one


def degenerate_configs(dtype):
    gen = torch.Generator().manual_seed(11)
    t = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64)[:, None]
    d = torch.randn(3, generator=gen, dtype=torch.float64)
    exact = {
        "collinear": t * d,
        "coincident": torch.ones(6, 1, dtype=torch.float64) * d,
        "zero": torch.zeros(6, 3, dtype=torch.float64),
    }
    near = {f"near-collinear {delta:g}": t * d + delta * torch.randn(6, 3, generator=gen, dtype=torch.float64)
            for delta in (1e-2, 1e-3, 1e-4)}
    v = torch.randn(6, 3, generator=gen, dtype=torch.float64).to(dtype)
    return {k: x.to(dtype) for k, x in exact.items()}, {k: x.to(dtype) for k, x in near.items()}, v


@pytest.mark.parametrize("group", ["SE3", "SO3"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_fast_path_is_idempotent_and_equals_generic_on_degenerate_configurations(group, dtype):
    """Regression: the adjugate inverse of the fast path lost the well-conditioned block of the
    regularised inertia tensor on collinear configurations (P not idempotent to 1e-3 in float64,
    against 6e-15 for the generic Cholesky path)."""
    fast, generic = QUOTIENTS[f"{group}-fast"], QUOTIENTS[f"{group}-generic"]
    exact, near, v = degenerate_configs(dtype)
    tight = 1e-12 if dtype == torch.float64 else 2e-5
    vmax = v.abs().max()
    for scale in (1e-30, 1.0, 1e30):
        for label, x in exact.items():  # on the singular set: regularised, J has no regularised component
            xs = x * scale
            pf, pg = fast.horizontal_projection(v, xs), generic.horizontal_projection(v, xs)
            hf, hg = fast.mean_curvature(xs), generic.mean_curvature(xs)
            assert all(torch.isfinite(t).all() for t in (pf, pg, hf, hg)), label
            assert (fast.horizontal_projection(pf, xs) - pf).abs().max() <= tight * vmax, (label, scale)
            assert (generic.horizontal_projection(pg, xs) - pg).abs().max() <= tight * vmax, (label, scale)
            assert (pf - pg).abs().max() <= tight * vmax, (label, scale)
            # the regularised curvature: its large inverse eigenvalue (1 / (64 eps tr)) cancels in h,
            # so one ulp there moves h by ~1/64 of its size in either path
            assert (hf - hg).abs().max() <= 0.05 * hg.abs().max(), (label, scale)
            # the rigid motions that exist on the configuration are removed
            xc = center(xs) if fast.translations else xs
            for a in fast.lie.generator_tensor(dtype):
                field = xc @ a.T
                assert (fast.horizontal_projection(field, xs)).abs().max() <= tight * field.abs().max(), label
        for label, x in near.items():  # off the singular set: the perturbation bound eps / cond
            xs = x * scale
            b = float(rounding_bound(generic, x))
            pf, pg = fast.horizontal_projection(v, xs), generic.horizontal_projection(v, xs)
            hf, hg = fast.mean_curvature(xs), generic.mean_curvature(xs)
            assert (fast.horizontal_projection(pf, xs) - pf).abs().max() <= 100 * b * vmax, (label, scale)
            assert (pf - pg).abs().max() <= 10 * b * vmax, (label, scale)
            assert (hf - hg).abs().max() <= 10 * b * hg.abs().max(), (label, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_zero_configuration_gives_zeros_at_every_scale(dtype):
    for name in NAMES:
        q = QUOTIENTS[name]
        x = torch.zeros(2, 4, q.point_dim, dtype=dtype)
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
        p, h = q.horizontal_projection(v, x), q.mean_curvature(x)
        assert (h == 0).all() and torch.isfinite(p).all(), name
        torch.testing.assert_close(p, center(v) if q.translations else v)  # no orbit to remove
        assert torch.isfinite(q.log_orbit_volume(x)).all() and (q.conditioning(x) == 0).all(), name


def test_symmetric_inverse_and_solve_3x3_are_accurate_on_regularised_singular_matrices():
    """The 3 x 3 Cholesky helpers on the regularised inertia tensor of a line (condition number
    ~1/(64 eps)). The angular momentum J of any v is orthogonal to the line, where K_reg is well
    conditioned: the vertical field of K_reg^-1 J must be accurate to rounding (the adjugate formula
    lost ~2 % of it). An explicit inverse cannot do this (its rounding, ~eps |K_reg^-1|, mixes the
    huge eigenvalue into the rest), which is why the projection solves instead of inverting."""
    gen = torch.Generator().manual_seed(2)
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None] * torch.randn(4, 1, 3, generator=gen, dtype=torch.float64)
    xc = center(x)
    k = so3._regularized(so3.inertia_tensor(xc))
    j = so3.angular_momentum(xc, torch.randn(x.shape, generator=gen, dtype=torch.float64))
    chol = torch.linalg.cholesky(k)

    def field(omega):  # omega x x_n: the component of omega along the line moves nothing
        return xc @ so3.skew(omega).transpose(-1, -2)

    expected = field(torch.cholesky_solve(j[..., None], chol)[..., 0])
    torch.testing.assert_close(field(so3.symmetric_solve_3x3(k, j)), expected, rtol=1e-9, atol=1e-12)
    # the explicit inverse (used for the curvature only) against LAPACK's, on generic configurations
    y = center(torch.randn(8, 6, 3, generator=gen, dtype=torch.float64))
    k_generic = so3._regularized(so3.inertia_tensor(y))
    torch.testing.assert_close(so3.symmetric_inverse_3x3(k_generic),
                               torch.cholesky_inverse(torch.linalg.cholesky(k_generic)), rtol=1e-10, atol=1e-13)
    # any right-hand side: backward stable, the residual is at rounding level relative to |K| |omega|
    rhs = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    omega = so3.symmetric_solve_3x3(k, rhs)
    residual = (k @ omega[..., None])[..., 0] - rhs
    assert (residual.abs().amax(-1) <= 1e-13 * k.abs().amax((-2, -1)) * omega.abs().amax(-1)).all()


# ----------------------------------------------------------------------------------------------
# Curvature against autograd, and the functional core under vmap, at extreme scales


@pytest.mark.parametrize("name", ["SE3-fast", "SE3-generic", "SO4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_curvature_is_minus_grad_log_orbit_volume_at_every_scale(name, dtype):
    q = QUOTIENTS[name]
    x, _ = draw(q, 6, 4, dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for scale in SCALES:
        xs = (x * scale).requires_grad_(True)
        (grad,) = torch.autograd.grad(q.log_orbit_volume(xs).sum(), xs)
        h = q.mean_curvature(xs.detach())
        assert torch.isfinite(grad).all(), scale
        assert (per_sample_max(h + grad) <= tol * per_sample_max(h)).all(), scale


def test_functional_core_runs_under_vmap():
    """No data-dependent Python branch or host sync in the normalised frame: vmap = batched."""
    geom = groups.SE3.lowered(torch.float64, "cpu")
    x, v = draw(QUOTIENTS["SE3-generic"], 5, 6, torch.float64, batch=(3,))
    x = x * torch.tensor([1e-30, 1.0, 1e30], dtype=x.dtype)[:, None, None]
    torch.testing.assert_close(torch.func.vmap(lambda a, b: so3.horizontal_projection(b, a))(x, v),
                               so3.horizontal_projection(v, x))
    torch.testing.assert_close(torch.func.vmap(lambda a: G.mean_curvature(geom, a, None, True))(x),
                               G.mean_curvature(geom, x, None, True))


# ----------------------------------------------------------------------------------------------
# Alignment and quotient distance


@pytest.mark.parametrize("name", ["SE3-fast", "SO3-fast", "SE2", "T2", "SO2-about-z"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_align_and_dist_are_scale_covariant(name, dtype):
    """Kabsch (SO(d)), the torus closed form and the Newton aligner (SO(2) about z) at 1e-30 .. 1e30:
    float32 coordinates of 1e19 used to overflow the cross-covariance (raw LinAlgError from the SVD)
    and the squared distance."""
    q = QUOTIENTS[name]
    x, noise = draw(q, 6, 8, dtype, batch=(3,))
    g = q.random_element((3,), generator=torch.Generator().manual_seed(9), dtype=dtype)
    y = q.act(g, x) + 0.1 * noise
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    d1, a1 = q.dist(x, y), q.align(x, y)
    assert (d1 > 0).all()
    for scale in SCALES:
        ds, as_ = q.dist(x * scale, y * scale), q.align(x * scale, y * scale)
        assert torch.isfinite(ds).all() and torch.isfinite(as_).all(), scale
        torch.testing.assert_close(ds.double() / scale, d1.double(), **tol)
        torch.testing.assert_close(as_.double() / scale, a1.double(), **tol)


@pytest.mark.parametrize("name", ["SE3-fast", "SO2-about-z"])
def test_non_finite_sample_gives_nan_not_a_linalg_error(name):
    q = QUOTIENTS[name]
    x, y = draw(q, 5, 10, torch.float64, batch=(3,))
    x[1, 2, 0] = float("nan")
    x[2, 0, 1] = float("inf")
    d = q.dist(x, y)
    assert torch.isfinite(d[0]) and torch.isnan(d[1:]).all()
    cond = q.conditioning(x)
    assert torch.isfinite(cond[0]) and torch.isnan(cond[1:]).all()
    torch.testing.assert_close(d[0], q.dist(x[0], y[0]))


# ----------------------------------------------------------------------------------------------
# Declarations


@pytest.mark.parametrize(
    "bad, label",
    [(float("nan"), "NaN"), (float("inf"), "inf"), (-float("inf"), "-inf"), (sympy.nan, "NaN"), (sympy.zoo, "inf")],
)
def test_non_finite_generator_is_named_not_called_non_orthogonal(bad, label):
    rot = [[0, -1, 0], [1, 0, 0], [0, 0, 0]]
    broken = [[0, 0, 1], [0, 0, 0], [bad, 0, 0]]
    with pytest.raises(ValueError, match=rf"generator 1 of user group contains NaN or inf entries: \(2, 0\) = {label}\b"):
        LieGroup("user group", 3, generators=[rot, broken])
    with pytest.raises(ValueError, match=r"generator 0 of T contains NaN or inf entries: \(0, 1\) = NaN"):
        LieGroup("T", 2, generators=[torch.tensor([[0.0, float("nan")], [1.0, 0.0]])])
