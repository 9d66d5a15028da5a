"""Packed (segment-offset) layout: conversions, torch segment ops and fused kernels.

The oracle for every packed op is the padded op of :class:`qmanifold.Quotient` on the unpacked
batch (torch path), packed again. The fused kernels run emulated on CPU always and compiled on a
GPU when one is available (skipped otherwise, with the reason).
"""

from __future__ import annotations

import pytest
import torch

import qmanifold.kernels as K
from qmanifold import Quotient, groups
from qmanifold import packed as P
from qmanifold.kernels import FusedGeometry

HAS_GPU = torch.cuda.is_available() and K.triton_available()
GPU_REASON = "fused Triton path not tested here: " + ("no CUDA device" if not torch.cuda.is_available() else f"Triton unavailable ({K.triton_error()})")

#: Kernel paths on CPU tensors here: the emulator, and Triton's interpreter in a process started with
#: TRITON_INTERPRET=1 (test_kernels_interpreted.py starts one).
CPU_KERNEL_PATHS = ("emulate", "interpret") if K.interpreting() else ("emulate",)
PATHS = [pytest.param((p, "cpu"), id=f"{p}-cpu") for p in CPU_KERNEL_PATHS] + [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=GPU_REASON)]),
]
GROUPS = {"SE3": groups.SE3, "SO3": groups.SO3, "SE2": groups.SE2, "T2": groups.Torus(2)}


def batch(group, sizes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = int(sum(sizes))
    d = group.point_dim
    x = (1.3 * torch.randn(total, d, generator=gen, dtype=torch.float64) + 0.5).to(dtype).to(device)
    v = torch.randn(total, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    z = torch.randn(total, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return x, v, z, P.offsets_from_sizes(torch.tensor(sizes)).to(device)


def tol(dtype):
    return dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)


def test_layout_conversions_roundtrip():
    sizes = [3, 1, 5, 2]
    offsets = P.offsets_from_sizes(sizes)
    assert offsets.tolist() == [0, 3, 4, 9, 11]
    assert P.sizes_from_offsets(offsets).tolist() == sizes
    ids = P.segment_ids_from_offsets(offsets, total=11)
    assert ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]
    assert torch.equal(P.offsets_from_segment_ids(ids, 4), offsets)
    assert torch.equal(P.offsets_from_segment_ids(ids), offsets)
    pts = torch.randn(11, 3)
    x, mask = P.unpack(pts, offsets)
    assert x.shape == (4, 5, 3) and mask.sum(-1).tolist() == sizes
    assert (x[~mask] == 0).all()
    back, offs = P.pack(x, mask)
    assert torch.equal(back, pts) and torch.equal(offs, offsets)
    full, offs = P.pack(x)
    assert full.shape == (20, 3) and offs.tolist() == [0, 5, 10, 15, 20]
    x8, mask8 = P.unpack(pts, offsets, max_size=8)
    assert x8.shape == (4, 8, 3) and torch.equal(x8[:, :5], x) and not x8[:, 5:].any()
    assert torch.equal(mask8[:, :5], mask) and not mask8[:, 5:].any()


F32, F64 = torch.float32, torch.float64
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason=GPU_REASON)]


def cases(on_cpu, compiled):
    """``(path_device, dtype, name)``: emulated and torch paths on CPU for every case, the compiled
    kernel for a subset (each kernel specialisation is a ~1 s Triton compilation)."""
    out = [pytest.param((p, "cpu"), dt, n, id=f"{p}-{n}-{str(dt)[-7:]}") for p in (*CPU_KERNEL_PATHS, "torch") for n, dt in on_cpu]
    out += [pytest.param(("triton", "cuda"), dt, n, id=f"triton-{n}-{str(dt)[-7:]}", marks=GPU_MARKS) for n, dt in compiled]
    return out


@pytest.mark.parametrize(
    "path_device, dtype, name",
    cases([(n, dt) for n in sorted(GROUPS) for dt in (F32, F64)], [("SE3", F32), ("SE2", F64)]),
)
def test_packed_ops_match_padded_oracle(path_device, dtype, name):
    path, device = path_device
    group = GROUPS[name]
    geom = FusedGeometry(group, path=path)
    q = Quotient(group, backend="fast" if (group.kind == "special_orthogonal" and group.point_dim == 3) else "generic")
    sizes = [3, 7, 4, 12, 5, 9] if path != "triton" else [int(s) for s in torch.randint(3, 60, (500,), generator=torch.Generator().manual_seed(1))]
    x, v, z, offsets = batch(group, sizes, dtype, device)
    xp, mask = P.unpack(x, offsets)
    vp, _ = P.unpack(v, offsets)
    zp, _ = P.unpack(z, offsets)
    t = tol(dtype)
    ref_p = P.pack(q.horizontal_projection(vp, xp, mask), mask)[0]
    ref_h = P.pack(q.mean_curvature(xp, mask), mask)[0]
    ref_c = P.pack(q.center(vp, mask), mask)[0]
    for max_size in (None, max(sizes)):  # streaming and one-tile kernel variants
        torch.testing.assert_close(geom.horizontal_projection(v, x, offsets=offsets, max_size=max_size), ref_p, **t)
        torch.testing.assert_close(geom.mean_curvature(x, offsets=offsets, max_size=max_size), ref_h, **t)
        torch.testing.assert_close(geom.center(v, offsets=offsets, max_size=max_size), ref_c, **t)
        p, h = geom.projection_and_curvature(v, x, offsets=offsets, max_size=max_size)
        torch.testing.assert_close(p, ref_p, **t)
        torch.testing.assert_close(h, ref_h, **t)
    count = len(sizes)
    s = (0.2 * torch.rand(count, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).to(device=device, dtype=dtype)
    ref = FusedGeometry(group, path="torch")
    for lim in (None, 0.01 * s):
        ref_u = P.pack(ref.lifted_update(xp, vp, zp, 0.05, s, -0.3, mask, tame_limit=lim), mask)[0]
        got = geom.lifted_update(x, v, z, 0.05, s, -0.3, tame_limit=lim, offsets=offsets)
        torch.testing.assert_close(got, ref_u, **t)


@pytest.mark.parametrize("path_device", PATHS)
def test_functional_api_and_segment_ids(path_device):
    path, device = path_device
    sizes = [4, 1, 6]
    x, v, z, offsets = batch(groups.SE3, sizes, torch.float64, device)
    ids = P.segment_ids_from_offsets(offsets, total=x.shape[0])
    q = Quotient(groups.SE3, backend="fused")
    q._fused.path = path
    P._GEOMS.clear()
    a = P.horizontal_projection(groups.SE3, v, x, offsets)
    b = P.horizontal_projection(q, v, x, segment_ids=ids, num_segments=3)
    torch.testing.assert_close(a, b)
    xp, mask = P.unpack(x, offsets)
    vp, _ = P.unpack(v, offsets)
    torch.testing.assert_close(a, P.pack(Quotient(groups.SE3, backend="fast").horizontal_projection(vp, xp, mask), mask)[0])
    torch.testing.assert_close(P.center(x, offsets), P.center(x, segment_ids=ids, num_segments=3, group=groups.SE3))
    h = P.mean_curvature(groups.SE3, x, offsets, max_size=6)
    p2, h2 = P.projection_and_curvature(groups.SE3, v, x, offsets)
    torch.testing.assert_close(h, h2)
    torch.testing.assert_close(p2, a)
    u = P.lifted_update(groups.SE3, x, v, z, 0.1, 0.2, -0.1, offsets, tame_limit=0.2)
    assert u.shape == x.shape and torch.isfinite(u).all()
    # the segment of one point is x = 0 after centring: P v = 0 there, h = 0
    assert torch.allclose(a[4], torch.zeros(3, dtype=a.dtype, device=a.device))
    with pytest.raises(ValueError, match="exactly one"):
        P.horizontal_projection(groups.SE3, v, x)
    with pytest.raises(ValueError, match="continuous"):
        P.horizontal_projection(groups.Permutations(), v, x, offsets)


@pytest.mark.parametrize("path_device", PATHS)
def test_packed_projection_gradient(path_device):
    path, device = path_device
    x, v, _, offsets = batch(groups.SE3, [5, 3, 8], torch.float64, device)
    geom, ref = FusedGeometry(groups.SE3, path=path), FusedGeometry(groups.SE3, path="torch")
    w = torch.randn_like(v)
    grads = []
    for g in (geom, ref):
        vv = v.clone().requires_grad_(True)
        (g.horizontal_projection(vv, x, offsets=offsets) * w).sum().backward()
        grads.append(vv.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-11)
