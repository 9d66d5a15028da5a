"""Fused quotient kernels (qmanifold.kernels) against the plain-torch oracle.

Every kernel is run two ways:

* ``emulate`` (always): the kernel source executed on CPU tensors by
  :mod:`qmanifold.kernels.emulate` -- this checks the kernels' logic (indexing, masks, the
  unrolled algebra, the streaming variant) on any machine;
* ``interpret`` (a process started with ``TRITON_INTERPRET=1``): the same source through Triton's
  own interpreter on CPU tensors -- Triton's semantics rather than ours. These cases exist only in
  such a process; ``test_kernels_interpreted.py`` starts one for the ``interpret`` cases here and in
  ``test_packed.py``;
* ``triton`` (needs a CUDA device and Triton): the compiled kernel on the GPU. Without one these
  tests are skipped, and the skip reason says so.

The oracle is the torch path: :mod:`qmanifold.so3` for SO(3)/SE(3), :mod:`qmanifold.geometry`
for every other group. float32 and float64, masks, batch shapes, degenerate configurations and
gradients are covered.
"""

from __future__ import annotations

import os

import pytest
import sympy
import torch
import torch.utils._python_dispatch

import qmanifold.kernels as K
from qmanifold import SDE, LieGroup, Quotient, groups, integrate
from qmanifold.kernels import FusedGeometry

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = K.triton_available()
INTERPRETING = K.interpreting()
#: The kernel paths that run on CPU tensors in this process (the interpreter only under TRITON_INTERPRET=1).
CPU_KERNEL_PATHS = ("emulate", "interpret") if INTERPRETING else ("emulate",)
GPU_REASON = (
    "fused Triton path not tested here: "
    + ("no CUDA device" if not HAS_CUDA else "")
    + ("" if HAS_TRITON else ("; " if not HAS_CUDA else "") + f"Triton unavailable ({K.triton_error()})")
)

GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason=GPU_REASON)]
PATHS = [pytest.param((p, "cpu"), id=f"{p}-cpu") for p in CPU_KERNEL_PATHS] + [
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=GPU_MARKS),
]
F32, F64 = torch.float32, torch.float64


def cases(emulated, compiled):
    """Parameters ``(path_device, dtype, name)``: every case emulated (and interpreted) on CPU, and a
    subset compiled on the GPU (each distinct kernel specialisation costs a Triton compilation of ~1 s)."""
    out = [pytest.param((p, "cpu"), dt, n, id=f"{p}-{n}-{str(dt)[-7:]}") for p in CPU_KERNEL_PATHS for n, dt in emulated]
    out += [pytest.param(("triton", "cuda"), dt, n, id=f"triton-{n}-{str(dt)[-7:]}", marks=GPU_MARKS) for n, dt in compiled]
    return out

th, a_, b_, x_, y_ = sympy.symbols("theta a b x y", real=True)
USER_GROUPS = {
    "SE2-from-action": LieGroup.from_action(
        "SE(2) by action", [th, a_, b_], [x_, y_],
        [sympy.cos(th) * x_ - sympy.sin(th) * y_ + a_, sympy.sin(th) * x_ + sympy.cos(th) * y_ + b_],
    ),
    "SO2-about-z": LieGroup("SO(2) about z in R^3", 3, generators=[[[0, -1, 0], [1, 0, 0], [0, 0, 0]]]),
    "SO4": LieGroup("SO(4)", 4, generators=[
        sympy.Matrix(4, 4, lambda r, c: (1 if (r, c) == (j, i) else -1 if (r, c) == (i, j) else 0))
        for i in range(4) for j in range(i + 1, 4)
    ]),
}
GROUPS = {"SE3": groups.SE3, "SO3": groups.SO3, "SE2": groups.SE2, "SO2": groups.SO2, "T2": groups.Torus(2), **USER_GROUPS}


def fused(group, path, generic=False):
    # generic: force the generated kernel for an SO(3) group (compared with the so3 oracle)
    return FusedGeometry(group, path=path, generated=generic)


def oracle(group):
    return FusedGeometry(group, path="torch")


def tol(dtype):
    return dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


def data(group, batch, n, dtype, device, seed=0, masked=True):
    gen = torch.Generator().manual_seed(seed)
    d = group.point_dim
    x = (1.5 * torch.randn(*batch, n, d, generator=gen, dtype=torch.float64) + 0.7).to(dtype)
    v = torch.randn(*batch, n, d, generator=gen, dtype=torch.float64).to(dtype)
    z = torch.randn(*batch, n, d, generator=gen, dtype=torch.float64).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(*batch, n, generator=gen) < 0.75
        mask[..., : min(3, n)] = True
        mask = mask.to(device)
    return x.to(device), v.to(device), z.to(device), mask


def sizes_for(path):
    # the emulator is a Python loop over programs: keep it small; the GPU gets a real batch (one
    # shape: every shape is a new kernel specialisation to compile)
    return [((5,), 7), ((2, 3), 12)] if path in CPU_KERNEL_PATHS else [((2, 300), 29)]


ALL_NAMES = sorted(GROUPS) + ["SE3-generic"]


@pytest.mark.parametrize(
    "path_device, dtype, name",
    cases([(n, dt) for n in ALL_NAMES for dt in (F32, F64)],
          [("SE3", F32), ("SE3", F64), ("SE3-generic", F32), ("SO4", F32), ("SE2", F64)]),
)
def test_ops_match_oracle(path_device, dtype, name):
    path, device = path_device
    group = GROUPS[name.replace("-generic", "")]
    geom, ref = fused(group, path, generic=name.endswith("generic")), oracle(group)
    for batch, n in sizes_for(path):
        for masked in (False, True):
            x, v, z, mask = data(group, batch, n, dtype, device, masked=masked)
            t = tol(dtype)
            torch.testing.assert_close(geom.horizontal_projection(v, x, mask), ref.horizontal_projection(v, x, mask), **t)
            if path == "triton" and not masked:  # the unmasked specialisations: two are enough
                torch.testing.assert_close(geom.lifted_update(x, v, z, 0.05, 0.1, -0.2, mask, tame_limit=0.1),
                                           ref.lifted_update(x, v, z, 0.05, 0.1, -0.2, mask, tame_limit=0.1), **t)
                continue
            torch.testing.assert_close(geom.mean_curvature(x, mask), ref.mean_curvature(x, mask), **t)
            torch.testing.assert_close(geom.center(v, mask), ref.center(v, mask), **t)
            p, h = geom.projection_and_curvature(v, x, mask)
            torch.testing.assert_close(p, ref.horizontal_projection(v, x, mask), **t)
            torch.testing.assert_close(h, ref.mean_curvature(x, mask), **t)
            gen = torch.Generator().manual_seed(1)
            s = (0.2 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
            c = (-0.3 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
            dt = torch.tensor(0.05, dtype=dtype, device=device)
            for lim in (None, s, 0.01 * s):  # no taming / taming inactive / taming binding
                torch.testing.assert_close(geom.lifted_update(x, v, z, dt, s, c, mask, tame_limit=lim),
                                           ref.lifted_update(x, v, z, dt, s, c, mask, tame_limit=lim), **t)
            torch.testing.assert_close(geom.euler_update(x, v, 0.1, mask), ref.euler_update(x, v, 0.1, mask), **t)
            if mask is not None:  # padded points are exactly zero
                assert (geom.horizontal_projection(v, x, mask)[~mask] == 0).all()
                assert (geom.lifted_update(x, v, z, dt, s, c, mask)[~mask] == 0).all()


@pytest.mark.parametrize(
    "path_device, dtype, name",
    cases([(n, dt) for n in ("SE3", "SO3", "SE2", "SO4") for dt in (F32, F64)], [("SE3", F32), ("SO4", F64)]),
)
def test_streaming_variant_matches_one_tile(path_device, dtype, name, monkeypatch):
    """Configurations larger than one register tile are streamed in chunks: same results."""
    path, device = path_device
    group = GROUPS[name]
    geom, ref = fused(group, path), oracle(group)
    n = 11 if path in CPU_KERNEL_PATHS else 5000
    if path in CPU_KERNEL_PATHS:
        monkeypatch.setattr(K, "MAX_TILE_POINTS", 4)
        monkeypatch.setattr(K, "STREAM_CHUNK_POINTS", 4)
    x, v, z, mask = data(group, (3,), n, dtype, device)
    t = tol(dtype)
    if dtype == torch.float32 and path == "triton":
        t = dict(rtol=1e-3, atol=1e-4)  # 5000-point sums in a different order
    torch.testing.assert_close(geom.horizontal_projection(v, x, mask), ref.horizontal_projection(v, x, mask), **t)
    torch.testing.assert_close(geom.mean_curvature(x, mask), ref.mean_curvature(x, mask), **t)
    s = torch.full((3,), 0.1, dtype=dtype, device=device)
    torch.testing.assert_close(geom.lifted_update(x, v, z, 0.05, s, -0.2, mask, tame_limit=0.05 * s),
                               ref.lifted_update(x, v, z, 0.05, s, -0.2, mask, tame_limit=0.05 * s), **t)
    if path == "triton":  # the streaming variant is used above MAX_TILE_POINTS
        assert n > K.MAX_TILE_POINTS


@pytest.mark.parametrize(
    "path_device, dtype, name",
    cases([(n, dt) for n in ("SE3", "SE3-generic", "SO4", "T2") for dt in (F32, F64)], [("SE3", F32)]),
)
def test_every_tile_layout_matches_oracle(path_device, dtype, name, monkeypatch):
    """The tile (lane axis, configurations, in-thread axis of ``CHUNKS`` points), in either order of
    its axes: each thread's points belong to one configuration (the default ``CHUNKS``), or one
    point of several (``CHUNKS = 1``), or anything between -- padded with a mask, packed, and
    streamed: same results.
    (The small batches of the other tests give ``CHUNKS = 1``; 40 configurations of 7 points give
    a default ``CHUNKS`` > 1 in float32: 4 for SE(3).)"""
    path, device = path_device
    group = GROUPS[name.replace("-generic", "")]
    ref = oracle(group)
    x, v, z, mask = data(group, (40,), 7, dtype, device)
    t = tol(dtype)
    sizes = torch.tensor([7, 3, 5, 7] * 10)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)]).to(device)
    keep = torch.arange(7)[None, :] < sizes[:, None]
    xp, vp = x[keep.to(device)], v[keep.to(device)]
    s = torch.full((40,), 0.1, dtype=dtype, device=device)
    expected = {
        "projection": ref.horizontal_projection(v, x, mask),
        "projection+curvature": torch.cat(ref.projection_and_curvature(v, x, mask), -1),
        "update": ref.lifted_update(x, v, z, 0.05, s, -0.2, mask, tame_limit=0.05 * s),
        "packed": ref.horizontal_projection(vp, xp, offsets=offsets),
    }
    for chunks, lane_axis_first in ((None, False), (None, True), (1, False), (2, True), (8, False)):
        # both arrangements of the tile's axes (which one runs depends on the Triton version)
        monkeypatch.setattr(K, "_lane_axis_first", lambda flag=lane_axis_first: flag)
        geom = FusedGeometry(group, path=path, generated=name.endswith("generic"), chunks=chunks)
        assert geom.plan(1, x, v, mask=mask).constexprs["LANE_AXIS_FIRST"] is lane_axis_first
        if chunks is None and dtype == F32:  # several points of one configuration per thread (SE(3): 4)
            default = geom.plan(3, x, v, mask=mask).constexprs["CHUNKS"]
            assert default > 1 and (default == 4 or name != "SE3"), default
        got = {
            "projection": geom.horizontal_projection(v, x, mask),
            "projection+curvature": torch.cat(geom.projection_and_curvature(v, x, mask), -1),
            "update": geom.lifted_update(x, v, z, 0.05, s, -0.2, mask, tame_limit=0.05 * s),
            "packed": geom.horizontal_projection(vp, xp, offsets=offsets, max_size=7),
        }
        for key, value in got.items():
            torch.testing.assert_close(value, expected[key], **t,
                                       msg=lambda m, key=key: f"chunks={chunks} lane axis first={lane_axis_first} {key}: {m}")
    # streaming (configurations above the tile), chunked
    monkeypatch.setattr(K, "MAX_TILE_POINTS", 4)
    monkeypatch.setattr(K, "STREAM_CHUNK_POINTS", 4)
    geom = FusedGeometry(group, path=path, generated=name.endswith("generic"), chunks=2)
    assert geom.plan(1, x, v, mask=mask).constexprs["CHUNKS"] == 2
    torch.testing.assert_close(geom.horizontal_projection(v, x, mask), expected["projection"], **t)
    torch.testing.assert_close(geom.lifted_update(x, v, z, 0.05, s, -0.2, mask, tame_limit=0.05 * s),
                               expected["update"], **t)
    with pytest.raises(ValueError, match="chunks"):
        FusedGeometry(group, chunks=3)


@pytest.mark.parametrize(
    "path_device, dtype, name",
    cases([(n, dt) for n in ("SE3", "SO3", "SE3-generic") for dt in (F32, F64)],
          [("SE3", F32), ("SE3", F64), ("SE3-generic", F32)]),
)
def test_degenerate_configurations(path_device, dtype, name):
    """x = 0, a single real point, no real point, points on a line: finite, and equal to the oracle.

    On the singular set the curvature is that of the regularised Gram matrix, whose smallest
    eigenvalue is ~64 eps tr(Gram): a rounding error of one ulp in the large inverse eigenvalue
    moves h by ~1/64 of its size in *either* path (dtype-independent), so h is compared to 5 %.
    """
    path, device = path_device
    group = GROUPS[name.replace("-generic", "")]
    geom, ref = fused(group, path, generic=name.endswith("generic")), oracle(group)
    n = 6
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(5, n, 3, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    x = torch.zeros(5, n, 3, dtype=dtype, device=device)
    x[1, :, 0] = torch.arange(n, dtype=dtype)  # collinear on an axis (exactly)
    x[2, :, 0] = torch.arange(n, dtype=dtype)
    x[2, :, 1] = 2.0 * torch.arange(n, dtype=dtype)  # collinear, off-axis
    x[3] = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dtype)
    x[4] = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.ones(5, n, dtype=torch.bool, device=device)
    mask[3, 1:] = False  # one real point
    mask[4] = False  # no real point
    p, h = geom.horizontal_projection(v, x, mask), geom.mean_curvature(x, mask)
    assert torch.isfinite(p).all() and torch.isfinite(h).all()
    p_ref, h_ref = ref.horizontal_projection(v, x, mask), ref.mean_curvature(x, mask)
    t = tol(dtype)
    # x = 0, the axis-aligned line (exact zeros in K and J), no real point; with translations a
    # single point centres to x = 0 as well
    exact = [0, 1, 3, 4] if group.translations else [0, 1, 4]
    torch.testing.assert_close(p[exact], p_ref[exact], **t)
    assert (p[4] == 0).all() and (h[4] == 0).all() and (h[0] == 0).all()
    loose = 0.05
    for i in range(5):
        assert (h[i] - h_ref[i]).abs().max() <= loose * h_ref[i].abs().max(), i
        assert (p[i] - p_ref[i]).abs().max() <= loose * (1 + p_ref[i].abs().max()), i


@pytest.mark.parametrize(
    "path_device, dtype, name",
    cases([(n, F64) for n in ("SE3", "SE2", "SO4")], [("SE3", F64), ("SO4", F64)]),
)
def test_gradients_match(path_device, dtype, name):
    """d/dv through the fused projection (backward = the fused projection of the gradient), and the
    torch fallback when x requires grad, equal the oracle's gradients."""
    path, device = path_device
    group = GROUPS[name]
    geom, ref = fused(group, path), oracle(group)
    x, v, _, mask = data(group, (4,), 9, torch.float64, device)
    w = torch.randn(v.shape, dtype=torch.float64).to(device)

    def grads(g, wrt_x):
        vv = v.clone().requires_grad_(True)
        xx = x.clone().requires_grad_(wrt_x)
        out = (g.horizontal_projection(vv, xx, mask) * w).sum() + g.center(vv, mask).square().sum()
        inputs = (vv, xx) if wrt_x else (vv,)
        return torch.autograd.grad(out, inputs)

    for wrt_x in (False, True):
        for a, b in zip(grads(geom, wrt_x), grads(ref, wrt_x)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # second order: the backward is itself differentiable
    vv = v.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad((geom.horizontal_projection(vv, x, mask) * w).square().sum(), vv, create_graph=True)
    (g2,) = torch.autograd.grad(g1.square().sum(), vv)
    vv = v.clone().requires_grad_(True)
    (r1,) = torch.autograd.grad((ref.horizontal_projection(vv, x, mask) * w).square().sum(), vv, create_graph=True)
    (r2,) = torch.autograd.grad(r1.square().sum(), vv)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path_device", PATHS)
def test_quotient_loss_gradient_through_fused_backend(path_device):
    """The quotient loss backward (projection of the residual at x_t) through the fused backend."""
    path, device = path_device
    from qmanifold import QuotientDiffusion

    q_ref = Quotient(groups.SE3, backend="fast")
    q_fused = Quotient(groups.SE3, backend="fused")
    q_fused._fused.path = path
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 3).to(device=device, dtype=torch.float64)
    x1, _, _, mask = data(groups.SE3, (6,), 8, torch.float64, device)

    def loss_grads(q):
        model = QuotientDiffusion(q, lambda x, t, mask=None: net(x) * mask[..., None], "linear", validate=False)
        net.zero_grad()
        model.loss(x1, mask, generator=torch.Generator(device=device).manual_seed(0)).backward()
        return [p.grad.clone() for p in net.parameters()]

    for a, b in zip(loss_grads(q_fused), loss_grads(q_ref)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("path_device", PATHS)
@pytest.mark.parametrize("factor", [1.0, 0.0, -1.0])
def test_integrate_fused_step_matches_classic(path_device, factor):
    """integrate() with the fused backend (one kernel per step) equals the classic composition."""
    path, device = path_device
    x0, _, _, mask = data(groups.SE3, (6,), 9, torch.float64, device)
    q = Quotient(groups.SE3, backend="fast")
    x0 = q.center(x0, mask)
    qf = Quotient(groups.SE3, backend="fused")
    qf._fused.path = path
    sde = SDE(drift=lambda x, t, mask=None: -0.5 * x + 0.3 * torch.roll(x, 1, -1), diffusion=0.7)
    ode = SDE(drift=lambda x, t, mask=None: -0.5 * x + 0.3 * torch.roll(x, 1, -1), diffusion=0)
    for s in (sde, ode):
        a = integrate(q.lift(s, curvature_factor=factor), x0, 0, 1, 12, mask=mask,
                      generator=torch.Generator(device=device).manual_seed(0))
        b = integrate(qf.lift(s, curvature_factor=factor), x0, 0, 1, 12, mask=mask,
                      generator=torch.Generator(device=device).manual_seed(0))
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)


def test_fused_backend_on_cpu_is_the_torch_path():
    """backend='fused' (or 'auto' with Triton) on CPU tensors runs exactly the torch path."""
    q_fast, q_fused = Quotient(groups.SE3, backend="fast"), Quotient(groups.SE3, backend="fused")
    assert q_fused.backend == "fused" and q_fused._fused.runs(torch.zeros(1, 2, 3)) == "torch"
    x, v, _, mask = data(groups.SE3, (4,), 7, torch.float32, "cpu")
    assert torch.equal(q_fused.horizontal_projection(v, x, mask), q_fast.horizontal_projection(v, x, mask))
    assert torch.equal(q_fused.mean_curvature(x, mask), q_fast.mean_curvature(x, mask))
    assert torch.equal(q_fused.vertical_projection(v, x, mask), q_fast.vertical_projection(v, x, mask))
    expected = "fused" if HAS_TRITON else "fast"
    assert Quotient(groups.SE3).backend == expected
    with pytest.raises(ValueError, match="fused"):
        Quotient(groups.Permutations(), backend="fused")


def test_generated_source_is_sparse_and_cached():
    """The generated kernel only accumulates the moments whose coefficients are non-zero."""
    src = FusedGeometry(USER_GROUPS["SO2-about-z"], path="emulate").source
    assert "S_0_0" in src and "S_1_1" in src and "S_2_2" not in src and "S_0_2" not in src
    assert "def _generic_kernel(" in src
    geom = FusedGeometry(groups.SE3, path="emulate")
    assert "_se3_kernel" in geom.source
    assert FusedGeometry(groups.SE2, path="emulate").kernels is FusedGeometry(groups.SE2, path="emulate").kernels


@pytest.mark.parametrize("path_device", PATHS)
def test_launch_reads_contiguous_operands_in_place_and_copies_the_rest(path_device):
    """A plan passes contiguous operands of any batch shape (and a sampler's 0-dim coefficients) to
    the kernel as they are and returns outputs of the input's shape, so a launch neither reshapes
    nor copies; non-contiguous operands are copied (same results); operands of another shape are
    refused (a kernel does not broadcast). Plans of one call signature share their constexprs."""
    path, device = path_device
    geom, ref = fused(groups.SE3, path), oracle(groups.SE3)
    x, v, z, mask = data(groups.SE3, (2, 3), 7, F64, device)
    dt = torch.tensor(0.05, dtype=F64, device=device)
    plan = geom.plan(4, x, v, z, mask, a=dt, s=dt, c=dt, lim=dt)
    assert plan.args[0] is x and plan.args[1] is v and plan.args[2] is z and plan.args[7] is dt
    assert plan.args[3].data_ptr() == mask.data_ptr() and plan.args[3].dtype == torch.uint8
    assert plan.out.shape == x.shape and plan.out.is_contiguous()
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (x, v, mask)]  # same values
    assert not any(t.is_contiguous() for t in strided)
    xs, vs, ms = strided
    plan = geom.plan(3, xs, vs, mask=ms)
    assert plan.args[0] is not xs and plan.args[0].is_contiguous() and torch.equal(plan.args[0], x)
    p, h = geom.projection_and_curvature(vs, xs, ms)
    torch.testing.assert_close(p, ref.horizontal_projection(v, x, mask), **tol(F64))
    torch.testing.assert_close(h, ref.mean_curvature(x, mask), **tol(F64))
    torch.testing.assert_close(geom.lifted_update(xs, vs, vs, dt, dt, dt, ms),
                               ref.lifted_update(x, v, v, dt, dt, dt, mask), **tol(F64))
    with pytest.raises(ValueError, match=r"tangent vector has shape \(1, 3, 7, 3\), expected \(2, 3, 7, 3\)"):
        geom.plan(1, x, v[:1])
    with pytest.raises(ValueError, match="mask has shape"):
        geom.plan(1, x, v, mask=mask[..., :-1])
    first, second = geom.plan(1, x, v, mask=mask), geom.plan(1, x.clone(), v.clone(), mask=mask.clone())
    assert first.constexprs is second.constexprs and first.grid == second.grid
    assert geom.plan(1, x[:1], v[:1], mask=mask[:1]).constexprs["BLOCK_B"] < first.constexprs["BLOCK_B"]
    with pytest.raises(TypeError):
        first.constexprs["MODE"] = 3  # shared between plans: read-only


def test_paths_and_status():
    with pytest.raises(ValueError, match="path"):
        FusedGeometry(groups.SE3, path="nope")
    with pytest.raises(ValueError, match="generator"):
        FusedGeometry(LieGroup("translations", 3, generators=[], translations=True))
    st = K.status()
    assert st["triton"] == HAS_TRITON and st["cuda"] == HAS_CUDA and st["interpreting"] == INTERPRETING
    if HAS_TRITON:
        version = tuple(int(p) for p in st["triton_version"].split(".")[:2])
        assert st["lane_axis_first"] == (version < (3, 7))
        if not INTERPRETING:  # direct launches with Triton >= 3.5 unless switched off
            assert st["direct_launch"] == (version >= (3, 5) and os.environ.get("QMANIFOLD_DIRECT_LAUNCH", "1") != "0")
    else:
        assert st["triton_version"] is None and st["direct_launch"] is None
    if not HAS_TRITON:
        with pytest.raises(RuntimeError, match="Triton"):
            FusedGeometry(groups.SE3, path="triton")
        with pytest.raises(RuntimeError, match="Triton"):
            FusedGeometry(groups.SE3, path="interpret")
    elif not INTERPRETING:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            FusedGeometry(groups.SE3, path="interpret")
    else:
        geom = FusedGeometry(groups.SE3, path="interpret")
        assert geom.runs(torch.zeros(1, 3, 3)) == "interpret"
        assert type(geom.kernels.jit()).__name__ == "InterpretedFunction"  # Triton's interpreter, not our emulator
        with pytest.raises(ValueError, match="CPU tensors"):
            geom.runs(torch.zeros(1, 3, 3, device="meta"))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason=GPU_REASON)
def test_auto_backend_runs_triton_on_cuda():
    q = Quotient(groups.SE3)
    x = torch.randn(8, 5, 3, device="cuda")
    assert q.backend == "fused" and q._fused.runs(x) == "triton"
    assert not K.status()["broken_kernels"], K.status()["broken_kernels"]


class _LaunchCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts dispatched torch ops that launch a kernel on a GPU (views and allocations excluded)."""

    METADATA_ONLY = frozenset({"select", "unsqueeze", "view", "expand", "diagonal", "transpose", "_unsafe_view", "squeeze",
                     "unbind", "reshape", "slice", "as_strided", "alias", "t", "permute", "detach", "empty",
                     "empty_like", "empty_strided"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.METADATA_ONLY:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampler", ["ode", "sde", "heun"])
def test_fused_quotient_step_launches_no_more_kernels_than_conventional(sampler, monkeypatch):
    """At molecular batch sizes a GPU sampler step is launch-bound, so the quotient machinery costs
    what it adds in kernel launches. Counted per step, with the Triton launch replaced by a counter
    (this runs on any machine): torch ops that launch a kernel, plus fused-kernel launches. The
    quotient step must launch no more than the conventional one (measured: SDE 33 + 1 against
    46 + 2, ODE 11 + 1 against 17 + 1)."""
    fused_launches = []

    class CountingLauncher:
        def launch(self, plan, dtype_tl):
            fused_launches.append(plan.constexprs["MODE"])

    monkeypatch.setattr(K, "_triton", lambda: (None, type("tl", (), {"float32": "fp32", "float64": "fp64"})))
    monkeypatch.setattr(K, "_lane_axis_first", lambda: False)  # (it would read the stubbed Triton's version)
    q = Quotient(groups.SE3, backend="fused")
    monkeypatch.setattr(q._fused, "runs", lambda x: "triton")
    monkeypatch.setattr(q._fused.kernels, "_launcher", CountingLauncher())
    from qmanifold import QuotientDiffusion

    model = QuotientDiffusion(q, lambda x, t, mask=None: 0.5 * x, "linear", validate=False)
    mask = torch.ones(4, 5, dtype=torch.bool)
    per_step = {}
    for geometry in ("quotient", "conventional"):
        totals = []
        for steps in (3, 13):
            fused_launches.clear()
            with _LaunchCounter() as counter:
                model.sample(mask=mask, steps=steps, sampler=sampler, geometry=geometry)
            totals.append((counter.count, len(fused_launches)))
        per_step[geometry] = [(b - a) / 10 for a, b in zip(*totals)]
    torch_q, fused_q = per_step["quotient"]
    torch_c, fused_c = per_step["conventional"]
    assert torch_q + fused_q <= torch_c + fused_c, per_step
    if sampler == "sde":
        assert fused_q == 1  # drift and noise projections, curvature, tame and update: one kernel
