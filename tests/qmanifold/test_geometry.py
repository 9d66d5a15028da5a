"""Property and comparison tests of the bundle geometry (projection, curvature, orbit volume).

Every group is tested through the same properties (one shared property suite): P idempotent, P kills
vertical fields, P v orthogonal to the orbit (zero linear and angular momentum), equivariance,
h horizontal and equal to -1/2 grad log det Gram (autograd), batched = per item, masked = unpadded.
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmanifold import LieGroup, Quotient, groups
from qmanifold import geometry as G
from qmanifold.masking import center

# ----------------------------------------------------------------------------------------------
# Groups under test: the ready-made ones, the generic lowering of SE(3), and user declarations.

th, a_, b_, x_, y_, z_ = sympy.symbols("theta a b x y z", real=True)
SE2_FROM_ACTION = LieGroup.from_action(
    "SE(2) by action",
    [th, a_, b_],
    [x_, y_],
    [sympy.cos(th) * x_ - sympy.sin(th) * y_ + a_, sympy.sin(th) * x_ + sympy.cos(th) * y_ + b_],
)
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
    "SE3-fast": Quotient(groups.SE3),
    "SE3-generic": Quotient(groups.SE3, backend="generic"),
    "SO3-fast": Quotient(groups.SO3),
    "SO3-generic": Quotient(groups.SO3, backend="generic"),
    "SO2": Quotient(groups.SO2),
    "SE2": Quotient(groups.SE2),
    "SE2-from-action": Quotient(SE2_FROM_ACTION),
    "T2": Quotient(groups.Torus(2)),
    "SO2-about-z": Quotient(SO2_ABOUT_Z),
    "SO4": Quotient(SO4),
}
NAMES = sorted(QUOTIENTS)

configs = st.tuples(st.integers(3, 7), st.integers(0, 2**31 - 1))


def random_config(q: Quotient, n: int, seed: int, batch=(), dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, q.point_dim, generator=gen, dtype=dtype)
    v = torch.randn(*batch, n, q.point_dim, generator=gen, dtype=dtype)
    return x, v


def vertical_fields(q: Quotient, x: torch.Tensor) -> list[torch.Tensor]:
    """Fundamental fields at x (rotation-like fields at the centred x, then translations)."""
    xc = center(x) if q.translations else x
    fields = [xc @ a.T for a in q.lie.generator_tensor(x.dtype)]
    if q.translations:
        for k in range(q.point_dim):
            e = torch.zeros(q.point_dim, dtype=x.dtype)
            e[k] = 1
            fields.append(e.expand_as(x).clone())
    return fields


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(cfg=configs)
def test_projection_properties(name, cfg):
    q = QUOTIENTS[name]
    x, v = random_config(q, *cfg)
    p = q.horizontal_projection(v, x)
    torch.testing.assert_close(q.horizontal_projection(p, x), p, atol=1e-10, rtol=1e-10)  # idempotent
    for field in vertical_fields(q, x):
        assert q.horizontal_projection(field, x).abs().max() < 1e-10  # kills rigid motions
        assert abs(float((p * field).sum())) < 1e-10  # orthogonal to the orbit: zero momenta
    torch.testing.assert_close(p + q.vertical_projection(v, x), v, atol=1e-12, rtol=0)
    if q.translations:
        assert p.sum(-2).abs().max() < 1e-10  # zero linear momentum


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None)
@given(cfg=configs)
def test_equivariance(name, cfg):
    q = QUOTIENTS[name]
    x, v = random_config(q, *cfg)
    g = q.random_element((), generator=torch.Generator().manual_seed(cfg[1]), dtype=torch.float64)
    gx, gv = q.act(g, x), q.act_on_vectors(g, v)
    torch.testing.assert_close(q.horizontal_projection(gv, gx), q.act_on_vectors(g, q.horizontal_projection(v, x)))
    torch.testing.assert_close(q.mean_curvature(gx), q.act_on_vectors(g, q.mean_curvature(x)))
    torch.testing.assert_close(q.log_orbit_volume(gx), q.log_orbit_volume(x))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None)
@given(cfg=configs)
def test_mean_curvature_is_horizontal_gradient(name, cfg):
    q = QUOTIENTS[name]
    x, _ = random_config(q, *cfg)
    h = q.mean_curvature(x)
    torch.testing.assert_close(q.horizontal_projection(h, x), h, atol=1e-10, rtol=1e-9)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(q.log_orbit_volume(xg).sum(), xg)
    torch.testing.assert_close(h, -grad, atol=1e-10, rtol=1e-8)  # h = -1/2 grad log det Gram


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_per_item_and_masked_equals_unpadded(name):
    q = QUOTIENTS[name]
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 5, 4]
    nmax = 7
    x = torch.randn(len(sizes), nmax, q.point_dim, generator=gen, dtype=torch.float64) * 3
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    mask = torch.zeros(len(sizes), nmax, dtype=torch.bool)
    for i, n in enumerate(sizes):
        mask[i, torch.randperm(nmax, generator=gen)[:n]] = True  # padding anywhere, not only at the end
    outs = {
        "P": q.horizontal_projection(v, x, mask),
        "V": q.vertical_projection(v, x, mask),
        "h": q.mean_curvature(x, mask),
        "c": q.center(x, mask),
    }
    vol = q.log_orbit_volume(x, mask)
    for out in outs.values():
        assert (out[~mask] == 0).all()
    for i in range(len(sizes)):
        xi, vi = x[i][mask[i]], v[i][mask[i]]
        torch.testing.assert_close(outs["P"][i][mask[i]], q.horizontal_projection(vi, xi))
        torch.testing.assert_close(outs["V"][i][mask[i]], q.vertical_projection(vi, xi))
        torch.testing.assert_close(outs["h"][i][mask[i]], q.mean_curvature(xi))
        torch.testing.assert_close(outs["c"][i][mask[i]], q.center(xi))
        torch.testing.assert_close(vol[i], q.log_orbit_volume(xi))
    # changing padded values changes nothing
    x2 = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(q.horizontal_projection(v, x2, mask), outs["P"])


def test_so3_closed_forms_and_fast_path_equals_generic():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 9, 3, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    xc = center(x)
    k = (xc.square().sum(-1).sum(-1))[:, None, None] * torch.eye(3, dtype=x.dtype) - xc.transpose(-1, -2) @ xc
    kinv = torch.linalg.inv(k)
    expected_h = xc @ (kinv - kinv.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None] * torch.eye(3, dtype=x.dtype)).transpose(-1, -2)
    omega = (kinv @ torch.linalg.cross(xc, center(v)).sum(-2).unsqueeze(-1)).squeeze(-1)
    expected_p = center(v) - torch.linalg.cross(omega[:, None].expand_as(xc), xc)
    for q in (QUOTIENTS["SE3-fast"], QUOTIENTS["SE3-generic"]):
        torch.testing.assert_close(q.mean_curvature(x), expected_h, atol=1e-11, rtol=1e-9)
        torch.testing.assert_close(q.horizontal_projection(v, x), expected_p, atol=1e-11, rtol=1e-9)
    # the symbolic derivation of the Gram matrix is the inertia tensor
    torch.testing.assert_close(G.gram_matrix(groups.SE3.lowered(torch.float64, "cpu"), xc), k)
    for dtype in (torch.float32, torch.float64):
        xd, vd = x.to(dtype), v.to(dtype)
        tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-10)
        fast, generic = QUOTIENTS["SE3-fast"], QUOTIENTS["SE3-generic"]
        torch.testing.assert_close(fast.horizontal_projection(vd, xd), generic.horizontal_projection(vd, xd), **tol)
        torch.testing.assert_close(fast.mean_curvature(xd), generic.mean_curvature(xd), **tol)


def test_so2_closed_forms():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 5, 2, generator=gen, dtype=torch.float64)
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    r2 = x.square().sum((-2, -1))
    jx = torch.stack([-x[..., 1], x[..., 0]], -1)
    omega = (x[..., 0] * v[..., 1] - x[..., 1] * v[..., 0]).sum(-1) / r2
    q = QUOTIENTS["SO2"]
    torch.testing.assert_close(q.horizontal_projection(v, x), v - omega[:, None, None] * jx)
    torch.testing.assert_close(q.mean_curvature(x), -x / r2[:, None, None])
    torch.testing.assert_close(q.log_orbit_volume(x), 0.5 * torch.log(r2))


def test_generator_and_symbolic_declarations_agree():
    # SE(2): from the action vs from the generator
    assert SE2_FROM_ACTION.translations and len(SE2_FROM_ACTION.generators) == 1
    x, v = random_config(QUOTIENTS["SE2"], 6, 11, batch=(4,))
    torch.testing.assert_close(QUOTIENTS["SE2-from-action"].horizontal_projection(v, x), QUOTIENTS["SE2"].horizontal_projection(v, x))
    torch.testing.assert_close(QUOTIENTS["SE2-from-action"].mean_curvature(x), QUOTIENTS["SE2"].mean_curvature(x))
    # SO(3) from Euler-angle composition R_z(a) R_y(b) R_x(c) plus translations
    a, b, c, t1, t2, t3 = sympy.symbols("a b c t1 t2 t3", real=True)
    rz = sympy.rot_axis3(-a)
    ry = sympy.rot_axis2(-b)
    rx = sympy.rot_axis1(-c)
    pt = sympy.Matrix([x_, y_, z_])
    action = list(rz * ry * rx * pt + sympy.Matrix([t1, t2, t3]))
    se3 = LieGroup.from_action("SE(3) by Euler angles", [a, b, c, t1, t2, t3], [x_, y_, z_], action)
    assert se3.translations and se3.kind == "special_orthogonal"
    q = Quotient(se3, backend="generic")
    x, v = random_config(q, 5, 12, batch=(3,))
    torch.testing.assert_close(q.horizontal_projection(v, x), QUOTIENTS["SE3-fast"].horizontal_projection(v, x))
    torch.testing.assert_close(q.mean_curvature(x), QUOTIENTS["SE3-fast"].mean_curvature(x))


def test_declaration_errors():
    p, x, y = sympy.symbols("p x y", real=True)
    with pytest.raises(ValueError, match="not affine"):
        LieGroup.from_action("bad", [p], [x, y], [x + p * x**2, y])
    with pytest.raises(ValueError, match="not the identity"):
        LieGroup.from_action("bad", [p], [x, y], [x + 1 + p, y])
    with pytest.raises(ValueError, match="translations span"):
        LieGroup.from_action("bad", [p], [x, y], [x + p, y])
    with pytest.raises(ValueError, match="Lie algebra"):
        LieGroup("bad", 3, generators=[[[0, -1, 0], [1, 0, 0], [0, 0, 0]], [[0, 0, -1], [0, 0, 0], [1, 0, 0]]])
    with pytest.raises(ValueError, match="shape"):
        LieGroup("bad", 3, generators=[[[0, -1], [1, 0]]])
    with pytest.raises(ValueError, match="at least one"):
        LieGroup("bad", 2, generators=[])
    scaling = LieGroup("scaling", 2, generators=[[[1, 0], [0, 1]]])
    with pytest.raises(ValueError, match="non-orthogonal"):
        Quotient(scaling)
    with pytest.raises(NotImplementedError, match="Haar"):
        LieGroup("heisenberg-like", 3, generators=[[[0, 1, 0], [0, 0, 0], [0, 0, 0]]]).random_element(())
    with pytest.raises(ValueError, match="backend"):
        Quotient(groups.SO2, backend="fast")


def test_bad_inputs_raise_named_errors():
    q = QUOTIENTS["SE3-fast"]
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="dimension 2"):
        q.horizontal_projection(torch.randn(2, 5, 2), torch.randn(2, 5, 2))
    with pytest.raises(TypeError, match="dtype"):
        q.mean_curvature(x.to(torch.int64))
    with pytest.raises(TypeError, match="dtype"):
        q.mean_curvature(x.half())
    with pytest.raises(ValueError, match="mask has shape"):
        q.mean_curvature(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        q.mean_curvature(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="v has shape"):
        q.horizontal_projection(torch.randn(2, 4, 3), x)
    with pytest.raises(TypeError, match="dtype"):
        q.horizontal_projection(x.double(), x)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., N, d\)"):
        q.mean_curvature(torch.randn(3))
    bad = x.clone()
    bad[0, 1, 2] = float("nan")
    assert torch.isnan(q.mean_curvature(bad)).any()  # low-level ops do not sync by default
    import qmanifold

    with qmanifold.finite_checks(), pytest.raises(ValueError, match="non-finite"):
        q.mean_curvature(bad)


@pytest.mark.parametrize("name", ["SE3-fast", "SE3-generic", "SO2", "T2"])
def test_degenerate_configurations_are_finite_and_diagnosed(name):
    q = QUOTIENTS[name]
    d = q.point_dim
    gen = torch.Generator().manual_seed(5)
    line = torch.linspace(-1, 1, 5, dtype=torch.float64)[:, None] * torch.randn(d, generator=gen, dtype=torch.float64)
    coincident = torch.ones(5, d, dtype=torch.float64)
    zero = torch.zeros(5, d, dtype=torch.float64)
    single = torch.zeros(5, d, dtype=torch.float64)
    single[0] = 1.0
    generic = torch.randn(5, d, generator=gen, dtype=torch.float64)
    x = torch.stack([line, coincident, zero, single, generic])
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[3, 1:] = False  # a configuration with a single real point
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        xd, vd = x.to(dtype), v.to(dtype)
        for out in (q.horizontal_projection(vd, xd, mask), q.mean_curvature(xd, mask), q.log_orbit_volume(xd, mask)):
            assert torch.isfinite(out).all() and out.dtype == dtype
        cond = q.conditioning(xd, mask)
        assert cond.shape == (5,) and cond[-1] > 1e-3
        # the generic sample's result does not depend on its batch neighbours
        torch.testing.assert_close(
            q.horizontal_projection(vd, xd, mask)[-1], q.horizontal_projection(vd[-1], xd[-1]), atol=1e-5, rtol=1e-5
        )
    cond = q.conditioning(x, mask)
    if name.startswith("SE3"):
        assert (cond[:4] < 1e-12).all()  # collinear, coincident, zero, single point: stabiliser
    # projection still kills the rigid motions that exist on the collinear configuration
    p = q.horizontal_projection(v, x)
    assert (p.sum(-2)[0].abs() < 1e-9).all() if q.translations else True


def test_float32_accuracy_and_dtype_device_kept():
    for name in NAMES:
        q = QUOTIENTS[name]
        x, v = random_config(q, 6, 7, batch=(8,))
        ref_p, ref_h = q.horizontal_projection(v, x), q.mean_curvature(x)
        p32 = q.horizontal_projection(v.float(), x.float())
        h32 = q.mean_curvature(x.float())
        assert p32.dtype == torch.float32 and p32.device == x.device
        torch.testing.assert_close(p32.double(), ref_p, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h32.double(), ref_h, atol=1e-4, rtol=1e-3)


def test_log_orbit_volume_translation_term_counts_real_points():
    q = QUOTIENTS["SE3-fast"]
    x, _ = random_config(q, 5, 2)
    padded = torch.cat([x, torch.zeros(3, 3, dtype=x.dtype)])
    mask = torch.tensor([True] * 5 + [False] * 3)
    torch.testing.assert_close(q.log_orbit_volume(padded, mask), q.log_orbit_volume(x))
    expected = 0.5 * G.log_det_gram(groups.SE3.lowered(x.dtype, "cpu"), x, None, True) + 1.5 * math.log(5)
    torch.testing.assert_close(q.log_orbit_volume(x), expected)
