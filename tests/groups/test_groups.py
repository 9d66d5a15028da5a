"""Tests of the ready-made groups: Haar sampling, alignment / distances, discrete groups, products,
and cross-checks against scipy and geomstats."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmanifold import Lattice, LieGroup, Permutations, ProductGroup, Quotient, groups, haar_special_orthogonal
from qmanifold.masking import center

# ----------------------------------------------------------------------------------------------
# Haar sampling


def trace_moments(rotations: torch.Tensor):
    tr = rotations.diagonal(dim1=-2, dim2=-1).sum(-1)
    return tr.mean().item(), tr.square().mean().item(), tr.square().std().item() / math.sqrt(len(tr))


@pytest.mark.parametrize("d", [3, 4, 5])
def test_haar_trace_moments(d):
    """Haar on SO(d), d >= 3: E tr R = 0 and E (tr R)^2 = 1 (tr R^2 has a single trivial
    component in V (x) V). 200k draws: standard error of the second moment ~ 0.003."""
    gen = torch.Generator().manual_seed(d)
    r = haar_special_orthogonal(d, (200_000,), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(r @ r.transpose(-1, -2), torch.eye(d, dtype=torch.float64).expand_as(r), atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(r), torch.ones(1, dtype=torch.float64))
    m1, m2, se = trace_moments(r)
    assert abs(m1) < 5 * math.sqrt(1 / 200_000) * 1.5
    assert abs(m2 - 1) < 5 * se


def test_haar_so2_and_group_sampler():
    gen = torch.Generator().manual_seed(0)
    g = groups.SO2.random_element((200_000,), generator=gen, dtype=torch.float64)
    m1, m2, se = trace_moments(g.matrix)
    assert abs(m1) < 0.02 and abs(m2 - 2) < 5 * se  # tr = 2 cos(theta): E = 0, E tr^2 = 2
    g3 = groups.SE3.random_element((10,), generator=gen, dtype=torch.float64)
    assert g3.translation.shape == (10, 3)


def test_naive_euler_angle_rotations_fail_the_haar_moment_test():
    """The moment test has power: uniform Euler angles (a common non-Haar 'random rotation')
    give E (tr R)^2 far from 1."""
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    angles = 2 * math.pi * torch.rand(n, 3, generator=gen, dtype=torch.float64)
    rz1 = groups.SO3.exp(torch.stack([0 * angles[:, 0], 0 * angles[:, 0], angles[:, 0]], -1))
    ry = groups.SO3.exp(torch.stack([0 * angles[:, 1], angles[:, 1] / 2, 0 * angles[:, 1]], -1))
    rz2 = groups.SO3.exp(torch.stack([0 * angles[:, 2], 0 * angles[:, 2], angles[:, 2]], -1))
    _, m2, se = trace_moments(rz1 @ ry @ rz2)
    assert abs(m2 - 1) > 20 * se


def test_torus_haar_is_uniform_phases():
    gen = torch.Generator().manual_seed(2)
    g = groups.Torus(3).random_element((100_000,), generator=gen, dtype=torch.float64)
    blocks = [g.matrix[:, 2 * j : 2 * j + 2, 2 * j : 2 * j + 2] for j in range(3)]
    for b in blocks:
        phase = torch.atan2(b[:, 1, 0], b[:, 0, 0])
        # uniform on the circle: E cos = E sin = 0, E cos^2 = 1/2
        assert abs(torch.cos(phase).mean()) < 0.015 and abs(torch.sin(phase).mean()) < 0.015
        assert abs(torch.cos(phase).square().mean() - 0.5) < 0.01


# ----------------------------------------------------------------------------------------------
# Alignment and distances


@settings(max_examples=20, deadline=None)
@given(n=st.integers(3, 8), seed=st.integers(0, 2**31 - 1))
def test_so3_align_and_dist_agree_with_scipy(n, seed):
    from scipy.spatial.transform import Rotation

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    ref = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    q = Quotient(groups.SO3)
    rot, rssd = Rotation.align_vectors(ref.numpy(), x.numpy())  # rot maps x onto ref
    expected = torch.as_tensor(rot.apply(x.numpy()))
    torch.testing.assert_close(q.align(x, ref), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(q.dist(x, ref), torch.tensor(rssd, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    # SE(3): the same after centring both
    q3 = Quotient(groups.SE3)
    _, rssd_c = Rotation.align_vectors(center(ref).numpy(), center(x).numpy())
    torch.testing.assert_close(q3.dist(x, ref), torch.tensor(rssd_c, dtype=torch.float64), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "group",
    [groups.SE3, groups.SO2, groups.SE2, groups.Torus(2),
     LieGroup("SO(2) about z", 3, generators=[[[0, -1, 0], [1, 0, 0], [0, 0, 0]]])],
    ids=lambda g: g.name,
)
def test_dist_is_invariant_symmetric_and_zero_on_the_orbit(group):
    q = Quotient(group)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, group.point_dim, generator=gen, dtype=torch.float64)
    y = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    g = q.random_element((32,), generator=gen, dtype=torch.float64)
    assert q.dist(q.act(g, x), x).max() < 1e-8
    torch.testing.assert_close(q.dist(q.act(g, x), y), q.dist(x, y), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(q.dist(x, y), q.dist(y, x), atol=1e-8, rtol=1e-8)
    # the aligned point lies on x's orbit and is at least as close as any sampled orbit point
    aligned = q.align(x, y)
    assert q.dist(aligned, x).max() < 1e-8
    others = q.act(q.random_element((64, 32), generator=gen, dtype=torch.float64), x.expand(64, *x.shape))
    best_sampled = (others - y).square().sum((-2, -1)).sqrt().min(0).values
    assert (q.dist(x, y) <= best_sampled + 1e-9).all()


def test_generic_newton_align_matches_grid_search():
    group = LieGroup("SO(2) about z", 3, generators=[[[0, -1, 0], [1, 0, 0], [0, 0, 0]]])
    assert group.kind == "torus"  # no closed-form aligner declared: uses Newton on the group
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(16, 5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    angles = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    rots = group.exp(angles[:, None])
    grid = ((x[None] @ rots[:, None].transpose(-1, -2)) - y[None]).square().sum((-2, -1)).sqrt().min(0).values
    dist = Quotient(group).dist(x, y)
    assert (dist <= grid + 1e-12).all() and (grid - dist).max() < 1e-6


# ----------------------------------------------------------------------------------------------
# Cross-check against geomstats' pre-shape (Kendall) bundle


def test_projection_and_alignment_agree_with_geomstats_preshape_bundle():
    pytest.importorskip("geomstats", reason="geomstats is the optional cross-check extra: pip install .[geomstats]")
    from geomstats.geometry.pre_shape import PreShapeBundle, PreShapeSpace

    n = 6
    space = PreShapeSpace(k_landmarks=n, ambient_dim=3, equip=True)
    bundle = PreShapeBundle(space)
    q = Quotient(groups.SE3)
    rng = np.random.default_rng(0)
    for _ in range(10):
        x = space.projection(rng.standard_normal((n, 3)))  # centred, unit norm
        v = space.to_tangent(rng.standard_normal((n, 3)), x)
        ours = q.horizontal_projection(torch.as_tensor(v), torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(ours, bundle.horizontal_projection(v, x), atol=1e-10)
        y = space.projection(rng.standard_normal((n, 3)))
        np.testing.assert_allclose(q.align(torch.as_tensor(y), torch.as_tensor(x)).numpy(), bundle.align(y, x), atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Discrete groups and products


def test_permutation_canonicalize_align_dist():
    perm = Permutations()
    q = Quotient(perm)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5, 2, generator=gen, dtype=torch.float64)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[:4, 3] = False
    g = perm.random_element((8,), num_points=5, mask=mask, generator=gen)
    assert (mask.gather(-1, g) == mask).all()  # only real slots are permuted
    px = perm.act(g, x, mask)
    torch.testing.assert_close(q.canonicalize(px, mask), q.canonicalize(x, mask))
    assert (q.canonicalize(x, mask)[~mask] == 0).all()
    y = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    # brute force over all permutations of the real points
    for b in range(8):
        real = mask[b].nonzero().squeeze(-1)
        best = min(
            float((x[b, real[list(p)]] - y[b, real]).square().sum().sqrt())
            for p in itertools.permutations(range(len(real)))
        )
        assert abs(q.dist(x, y, mask)[b].item() - best) < 1e-10
    # 1-D: the sorting algorithm agrees with brute force too
    x1, y1 = x[..., :1], y[..., :1]
    for b in range(8):
        real = mask[b].nonzero().squeeze(-1)
        best = min(
            float((x1[b, real[list(p)]] - y1[b, real]).square().sum().sqrt())
            for p in itertools.permutations(range(len(real)))
        )
        assert abs(q.dist(x1, y1, mask)[b].item() - best) < 1e-10


def test_lattice_canonicalize_align_dist():
    lat = Lattice(2)
    q = Quotient(lat)
    gen = torch.Generator().manual_seed(6)
    x = 4 * torch.randn(16, 3, 2, generator=gen, dtype=torch.float64)
    shifts = lat.random_element((16,), num_points=3, generator=gen, dtype=torch.float64)
    c = q.canonicalize(x)
    assert (c >= 0).all() and (c < 1).all()
    torch.testing.assert_close(q.canonicalize(lat.act(shifts, x)), c)
    y = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    d = q.dist(x, y)
    wrapped = x - y - torch.round(x - y)
    torch.testing.assert_close(d, wrapped.square().sum((-2, -1)).sqrt())
    assert (d <= math.sqrt(3 * 2) / 2 + 1e-12).all()
    torch.testing.assert_close(q.dist(lat.act(shifts, x), y), d)
    # no continuous fibres: projection is the identity, curvature zero
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(q.horizontal_projection(v, x), v)
    assert (q.mean_curvature(x) == 0).all()


def test_product_se3_permutations_dist_is_invariant_under_both_factors():
    group = groups.SE3xS_N
    q = Quotient(group)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    g = group.random_element((4,), num_points=5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(q.dist(group.act(g, x), y), q.dist(x, y), atol=1e-9, rtol=1e-9)
    assert q.dist(group.act(g, x), x).max() < 1e-9
    assert (q.dist(x, y) <= Quotient(groups.SE3).dist(x, y) + 1e-12).all()
    # the continuous geometry is SE(3)'s
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    torch.testing.assert_close(q.horizontal_projection(v, x), Quotient(groups.SE3).horizontal_projection(v, x))
    # masks: padded atoms never move onto real slots
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[:, -1] = False
    assert (q.align(x, y, mask)[..., -1, :] == 0).all()
    with pytest.raises(ValueError, match="no discrete factor"):
        Quotient(groups.SE3).canonicalize(x)


def test_product_requires_matching_factors():
    with pytest.raises(TypeError):
        ProductGroup(Permutations(), Permutations())
    with pytest.raises(ValueError, match="dimension"):
        ProductGroup(groups.SE3, Lattice(2))
    with pytest.raises(ValueError, match="positive integer"):
        groups.Torus(0)
