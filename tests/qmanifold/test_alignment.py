"""Alignment over a Lie group times permutations (identical particles, issue 16 item 4).

``ProductGroup.align`` must find the obvious answer: a permuted, rotated and translated copy is at
quotient distance zero (random clouds for N up to 100, symmetric clusters with degenerate inertia and
tied point descriptors), a noisy copy is at most as far as under the true permutation, masks and
batches are honoured, and the output is ``g . x`` for a group element ``g``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qmanifold import Permutations, ProductGroup, Quotient, groups, kabsch_rotation
from qmanifold.masking import center

F64 = torch.float64
SE3xS = groups.SE3xS_N
SO3xS = ProductGroup(groups.SO3, Permutations(), name="SO(3) x S_N")
SE2xS = ProductGroup(groups.SE2, Permutations(), name="SE(2) x S_N")
SO2xS = ProductGroup(groups.SO2, Permutations(), name="SO(2) x S_N")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny tensors: one torch thread (see conftest)."""


def legacy_align(group: ProductGroup, x, ref, mask=None, iterations: int = 20):
    """The method before the fix: Lie-align, then alternate Hungarian and Lie alignment."""
    y = group.lie.align(x, ref, mask)
    for _ in range(iterations):
        y = group.lie.align(group.discrete.align(y, ref, mask), ref, mask)
    return y


def rel_dist(q: Quotient, x, ref, mask=None):
    """Quotient distance relative to the size of the configurations: ``(...,)``."""
    size = (center(x, mask).square().sum((-2, -1)) + center(ref, mask).square().sum((-2, -1))).sqrt()
    return q.dist(x, ref, mask) / size


def copies(group: ProductGroup, x: torch.Tensor, batch: int, seed: int):
    """``batch`` random group images of the single configuration ``x`` ``(N, d)``: ``(batch, N, d)``."""
    gen = torch.Generator().manual_seed(seed)
    g = group.random_element((batch,), num_points=x.shape[-2], generator=gen, dtype=x.dtype)
    return group.act(g, x.expand(batch, *x.shape))


# -- configurations ----------------------------------------------------------------------------


def icosahedral_cluster(shells: int = 1) -> torch.Tensor:
    """LJ13-like: a centre and ``shells`` concentric icosahedra (13, 25, ... points)."""
    phi = (1 + math.sqrt(5)) / 2
    vertices = []
    for a, b in itertools.product((1.0, -1.0), repeat=2):
        vertices += [(0.0, a, b * phi), (a, b * phi, 0.0), (b * phi, 0.0, a)]
    shell = torch.tensor(vertices, dtype=F64)
    return torch.cat([torch.zeros(1, 3, dtype=F64)] + [(k + 1) * shell for k in range(shells)])


def cube(side: int = 2) -> torch.Tensor:
    """The ``side^3`` points of a cubic grid (``side = 2``: the vertices of a cube)."""
    return torch.tensor(list(itertools.product(range(side), repeat=3)), dtype=F64)


def regular_polygon(k: int, d: int) -> torch.Tensor:
    """k vertices of a regular polygon in the first coordinate plane of R^d."""
    t = torch.arange(k, dtype=F64) * (2 * math.pi / k)
    return torch.cat([torch.stack([t.cos(), t.sin()], -1), torch.zeros(k, d - 2, dtype=F64)], -1)


def descriptors(x: torch.Tensor) -> torch.Tensor:
    """Sorted distances from each point to all points: ``(N, N)`` (independent of the library)."""
    return torch.cdist(x, x).sort(-1).values


# -- exact recovery ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [7, 13, 20, 50, 100])
def test_permuted_rigid_copy_of_random_cloud_is_at_distance_zero(n):
    """24 random clouds, each against a permuted, rotated and translated copy (one batched call).

    Regression: the former method (alternation from the identity order) fails on most of them."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(24, n, 3, generator=gen, dtype=F64) * n ** (1 / 3)  # roughly constant density
    g = SE3xS.random_element((24,), num_points=n, generator=gen, dtype=F64)
    y = SE3xS.act(g, x)
    q = Quotient(SE3xS)
    assert rel_dist(q, x, y).max() < 1e-9
    assert rel_dist(q, y, x).max() < 1e-9
    old = legacy_align(SE3xS, x, y)
    old_rel = (old - y).square().sum((-2, -1)).sqrt() / y.square().sum((-2, -1)).sqrt()
    assert (old_rel > 1e-6).sum() >= 12  # the failure reported in the issue


@pytest.mark.parametrize(
    "group, name, x",
    [
        (SE3xS, "LJ13 icosahedron", icosahedral_cluster(1)),
        (SE3xS, "two icosahedral shells", icosahedral_cluster(2)),
        (SE3xS, "cube vertices", cube(2)),
        (SE3xS, "3x3x3 grid", cube(3)),
        (SE3xS, "planar octagon", regular_polygon(8, 3)),
        (SE3xS, "planar 12-gon", regular_polygon(12, 3)),
        (SO3xS, "LJ13 icosahedron", icosahedral_cluster(1)),
        (SO3xS, "cube vertices, off-centre", cube(2) + 0.5),
        (SE2xS, "octagon", regular_polygon(8, 2)),
        (SE2xS, "two hexagons", torch.cat([regular_polygon(6, 2), 2 * regular_polygon(6, 2)])),
        (SO2xS, "heptagon", regular_polygon(7, 2)),
        (SO2xS, "3x3 grid", torch.tensor(list(itertools.product(range(3), repeat=2)), dtype=F64)),
    ],
)
def test_permuted_rigid_copy_of_symmetric_configuration_is_at_distance_zero(group, name, x):
    """Degenerate inertia and tied descriptors: several rotations are equally good; the distance
    must still be zero (the former method gets stuck in local optima here)."""
    y = copies(group, x, 16, seed=len(x))
    q = Quotient(group)
    xb = x.expand_as(y)
    assert rel_dist(q, xb, y).max() < 1e-9, name
    assert rel_dist(q, y, xb).max() < 1e-9, name


def test_slightly_distorted_icosahedron():
    """Near-degenerate inertia and nearly tied descriptors (an LJ13 minimum with thermal noise)."""
    base = icosahedral_cluster(1)
    for seed, eps in enumerate([1e-9, 1e-6, 1e-3, 1e-2]):
        gen = torch.Generator().manual_seed(seed)
        x = base + eps * torch.randn(base.shape, generator=gen, dtype=F64)
        y = copies(SE3xS, x, 16, seed=100 + seed)
        assert rel_dist(Quotient(SE3xS), x.expand_as(y), y).max() < 1e-9, eps


def test_other_lie_factor_torus_times_permutations():
    """A Lie factor without a Kabsch fast path (the torus T^2 on C^2 = R^4): descriptor start."""
    group = ProductGroup(groups.Torus(2), Permutations())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 12, 4, generator=gen, dtype=F64)
    g = group.random_element((8,), num_points=12, generator=gen, dtype=F64)
    assert rel_dist(Quotient(group), x, group.act(g, x)).max() < 1e-9


# -- noisy copies, never worse than before ------------------------------------------------------


@pytest.mark.parametrize("cloud, n", [("random", 13), ("random", 50), ("icosahedral", 13), ("icosahedral", 49)])
def test_noisy_copy_at_most_the_distance_under_the_true_element(cloud, n):
    """``dist(x, g (x + noise)) <= min_R |R x_sigma + t - g (x + noise)|`` with sigma the true order."""
    gen = torch.Generator().manual_seed(n)
    if cloud == "random":
        x = torch.randn(16, n, 3, generator=gen, dtype=F64) * n ** (1 / 3)
    else:
        x = icosahedral_cluster((n - 1) // 12).expand(16, -1, -1)
    g = SE3xS.random_element((16,), num_points=n, generator=gen, dtype=F64)
    y = SE3xS.act(g, x + 0.1 * torch.randn(x.shape, generator=gen, dtype=F64))
    true_order = SE3xS.discrete.act(g.discrete, x)
    d_true = Quotient(groups.SE3).dist(true_order, y)
    d = Quotient(SE3xS).dist(x, y)
    assert (d <= d_true * (1 + 1e-9)).all()


def test_never_worse_than_the_former_alternation():
    """Unrelated configurations (no exact answer): the identity start is one of the starts."""
    gen = torch.Generator().manual_seed(11)
    for n in (8, 20):
        x = torch.randn(16, n, 3, generator=gen, dtype=F64)
        y = torch.randn(16, n, 3, generator=gen, dtype=F64)
        new = Quotient(SE3xS).dist(x, y)
        old = (legacy_align(SE3xS, x, y) - y).square().sum((-2, -1)).sqrt()
        assert (new <= old + 1e-12).all()
        assert (new < old - 1e-6).any()  # and the extra starts do find better optima


# -- masks, batches, dtype, the result is a group image ------------------------------------------


def test_masked_batch_equals_unpadded_items_and_is_a_group_image():
    """Padding anywhere with garbage values; batch of different sizes; float32 kept."""
    gen = torch.Generator().manual_seed(5)
    sizes, n_max = [9, 15, 12], 18
    x = 100 * torch.randn(3, n_max, 3, generator=gen)  # garbage at the padded slots
    ref = 100 * torch.randn(3, n_max, 3, generator=gen)
    mask = torch.zeros(3, n_max, dtype=torch.bool)
    items = []
    for b, n in enumerate(sizes):
        slots = torch.randperm(n_max, generator=gen)[:n].sort().values
        mask[b, slots] = True
        xb = 2 * torch.randn(n, 3, generator=gen)
        g = SE3xS.random_element((), num_points=n, generator=gen)
        yb = SE3xS.act(g, xb) + 0.05 * torch.randn(n, 3, generator=gen)
        x[b, slots], ref[b, slots] = xb, yb
        items.append((slots, xb, yb))
    q = Quotient(SE3xS)
    out = q.align(x, ref, mask)
    assert out.dtype == torch.float32 and out.device == x.device
    assert (out[~mask] == 0).all()
    for b, (slots, xb, yb) in enumerate(items):
        alone = q.align(xb, yb)
        torch.testing.assert_close(out[b, slots], alone, atol=1e-5, rtol=1e-5)
        # out = R x_sigma + t: match points by invariant descriptors, then a proper rigid fit is exact
        xd, od = descriptors(xb.double()), descriptors(alone.double())
        sigma = torch.cdist(od, xd).argmin(-1)
        assert sorted(sigma.tolist()) == list(range(len(xb)))
        xs, oc = center(xb.double()[sigma]), center(alone.double())
        rot = kabsch_rotation(xs, oc)
        torch.testing.assert_close(torch.linalg.det(rot), torch.tensor(1.0, dtype=F64))
        torch.testing.assert_close(xs @ rot.T, oc, atol=1e-5, rtol=0)
        # and it is the alignment: at least as close as the true order
        assert (alone - yb).norm() <= Quotient(groups.SE3).dist(xb, yb) + 1e-4


def test_gradient_flows_through_the_aligned_configuration():
    """The element is chosen without gradient, then applied with differentiable torch ops."""
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 10, 3, generator=gen, dtype=F64, requires_grad=True)
    y = torch.randn(2, 10, 3, generator=gen, dtype=F64)
    Quotient(SE3xS).dist(x, y).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_search_settings_are_named():
    x = torch.zeros(9, 3, dtype=F64)
    with pytest.raises(ValueError, match="iterations >= 1"):
        SE3xS.align(x, x, iterations=0)
    with pytest.raises(ValueError, match="anchor_matches >= 1"):
        SE3xS.align(x, x, anchor_matches=0)
