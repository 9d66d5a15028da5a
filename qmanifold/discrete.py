"""Discrete symmetry groups: permutations of the points, integer lattice translations, products.

For a discrete group the quotient map is a local isometry: there is no vertical space, no
projection and no curvature term. What the quotient brings is canonicalisation (sorting,
wrapping), alignment (the closest orbit point) and the quotient distance.

* :class:`Permutations` — S_N acting by reordering the (real) points of a configuration.
* :class:`Lattice` — ``(Z^k)^N`` acting by integer shifts (times ``period``) of each point: the
  configuration space becomes N points on the flat torus ``R^k / (period Z)^k``.
* :class:`ProductGroup` — a :class:`~qmanifold.lie.LieGroup` times a discrete group acting on the
  same configurations (e.g. SE(3) x S_N for identical particles).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import numpy as np
import torch

from .masking import apply_mask

__all__ = ["DiscreteGroup", "Permutations", "Lattice", "ProductGroup", "ProductElement", "lexsort_points"]


class DiscreteGroup:
    """Base class of discrete groups acting on configurations ``(..., N, d)``."""

    name = "discrete"
    point_dim: int | None = None
    translations = False
    generators = ()

    def canonicalize(self, x, mask=None):  # pragma: no cover - interface
        raise NotImplementedError

    def align(self, x, ref, mask=None):  # pragma: no cover - interface
        raise NotImplementedError

    def random_element(self, batch_shape=(), **kwargs):  # pragma: no cover - interface
        raise NotImplementedError

    def act(self, g, x, mask=None):  # pragma: no cover - interface
        raise NotImplementedError

    def act_on_vectors(self, g, v, mask=None):
        return self.act(g, v, mask)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


# ---------------------------------------------------------------------------------------------
# Permutations


def _padded_keys(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.full_like(x, math.inf))


def lexsort_points(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Indices ``(..., N)`` that sort the points lexicographically (padded points last).

    Stable sorts from the last coordinate to the first (the classic LSD radix order).
    """
    keys = _padded_keys(x, mask)
    order = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1]).contiguous()
    for c in reversed(range(x.shape[-1])):
        key = keys[..., c].gather(-1, order)
        order = order.gather(-1, torch.sort(key, dim=-1, stable=True).indices)
    return order


def _into_real_slots(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Place ``values`` (real points first, in order) into the real slots of ``mask``."""
    if mask is None:
        return values
    slots = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # real slots first
    out = torch.zeros_like(values).scatter(-2, slots.unsqueeze(-1).expand_as(values), values)
    return apply_mask(out, mask)


class Permutations(DiscreteGroup):
    """The symmetric group S_N permuting the real points of a configuration.

    A group element is a tensor of indices ``(..., N)``: ``act(g, x)_n = x_{g_n}``.
    """

    name = "S_N"

    def canonicalize(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Real points in lexicographic order, written into the real slots; padding stays zero."""
        order = lexsort_points(x, mask)
        return _into_real_slots(apply_mask(x, mask).gather(-2, order.unsqueeze(-1).expand_as(x)), mask)

    def random_element(self, batch_shape=(), *, num_points: int, mask=None, generator=None, device="cpu", **_):
        """Uniform random permutations of the real slots: indices ``(*batch, N)``."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        if mask is not None:
            device = mask.device
        keys = torch.rand((*batch_shape, num_points), generator=generator, device=device)
        if mask is None:
            return keys.argsort(-1)
        keys = torch.where(mask, keys, keys + 2.0)  # padded slots sort after the real ones
        shuffled = keys.argsort(-1)  # real indices in random order, then padded ones
        slots = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
        return torch.empty_like(shuffled).scatter(-1, slots, shuffled)

    def act(self, g: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(x.gather(-2, g.unsqueeze(-1).expand_as(x)), mask)

    def align(self, x: torch.Tensor, ref: torch.Tensor, mask=None) -> torch.Tensor:
        """The reordering of x closest to ``ref`` (optimal assignment of real points).

        d = 1: matching sorted values (exact, on device). d > 1: the Hungarian algorithm
        (``scipy.optimize.linear_sum_assignment``), which runs on the host.
        """
        if x.shape[-1] == 1:
            # the k-th smallest value of x goes where ref has its k-th smallest value
            ranks = lexsort_points(ref, mask)
            xs = apply_mask(x, mask).gather(-2, lexsort_points(x, mask).unsqueeze(-1).expand_as(x))
            out = torch.zeros_like(x).scatter(-2, ranks.unsqueeze(-1).expand_as(x), xs)
            return apply_mask(out, mask)
        from scipy.optimize import linear_sum_assignment

        xm, rm = apply_mask(x, mask), apply_mask(ref, mask)
        flat_x = xm.reshape(-1, *x.shape[-2:]).detach().cpu().double().numpy()
        flat_r = rm.reshape(-1, *x.shape[-2:]).detach().cpu().double().numpy()
        flat_m = (mask.reshape(-1, x.shape[-2]).cpu().numpy() if mask is not None else np.ones(flat_x.shape[:2], bool))
        index = np.tile(np.arange(x.shape[-2]), (flat_x.shape[0], 1))
        for b in range(flat_x.shape[0]):
            real = np.flatnonzero(flat_m[b])
            cost = ((flat_r[b][real][:, None, :] - flat_x[b][real][None, :, :]) ** 2).sum(-1)
            rows, cols = linear_sum_assignment(cost)
            index[b, real[rows]] = real[cols]
        g = torch.as_tensor(index, device=x.device).reshape(x.shape[:-1])
        return self.act(g, x, mask)


# ---------------------------------------------------------------------------------------------
# Lattice


class Lattice(DiscreteGroup):
    """Integer translations of each point: ``x_n -> x_n + period * m_n``, ``m_n in Z^k``.

    The quotient is N points on the flat torus ``R^k / (period Z)^k``. A group element is a tensor
    of integer-valued shifts ``(..., N, k)`` (any dtype).
    """

    def __init__(self, k: int, period: float = 1.0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Lattice dimension k must be a positive integer, got {k!r}")
        if not period > 0:
            raise ValueError(f"Lattice period must be positive, got {period!r}")
        self.point_dim = k
        self.period = float(period)
        self.name = f"Z^{k}"

    def canonicalize(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Wrap every coordinate into ``[0, period)``."""
        return apply_mask(torch.remainder(x, self.period), mask)

    def wrap_difference(self, dx: torch.Tensor) -> torch.Tensor:
        """The shortest representative of a displacement, in ``[-period/2, period/2)``."""
        return dx - self.period * torch.round(dx / self.period)

    def align(self, x: torch.Tensor, ref: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(ref - self.wrap_difference(ref - x), mask)

    def random_element(self, batch_shape=(), *, num_points: int = 1, generator=None, dtype=torch.float32, device="cpu", max_shift: int = 3, **_):
        """Uniform integer shifts in ``[-max_shift, max_shift]``: ``(*batch, N, k)`` (Z^k has no Haar probability)."""
        batch_shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
        shape = (*batch_shape, num_points, self.point_dim)
        return torch.randint(-max_shift, max_shift + 1, shape, generator=generator, device=device).to(dtype)

    def act(self, g: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(x + self.period * g.to(x.dtype), mask)

    def act_on_vectors(self, g, v, mask=None):
        return apply_mask(v, mask)


# ---------------------------------------------------------------------------------------------
# Products


class ProductElement(NamedTuple):
    """An element of a :class:`ProductGroup`: ``(lie, discrete)``."""

    lie: object
    discrete: object


class ProductGroup:
    """A Lie group times a discrete group acting on the same configurations.

    The two actions must commute (true for a group acting on every point the same way and S_N
    permuting points). The continuous geometry (projection, curvature) is the Lie factor's; the
    quotient distance minimises over both factors.
    """

    def __init__(self, lie, discrete: DiscreteGroup, name: str | None = None):
        from .lie import LieGroup

        if not isinstance(lie, LieGroup):
            raise TypeError(f"the first factor must be a LieGroup, got {type(lie).__name__}")
        if not isinstance(discrete, DiscreteGroup):
            raise TypeError(f"the second factor must be a discrete group, got {type(discrete).__name__}")
        if discrete.point_dim is not None and discrete.point_dim != lie.point_dim:
            raise ValueError(f"factors act on points of dimension {lie.point_dim} and {discrete.point_dim}")
        self.lie = lie
        self.discrete = discrete
        self.name = name or f"{lie.name} x {discrete.name}"
        self.point_dim = lie.point_dim

    def random_element(self, batch_shape=(), *, num_points: int | None = None, mask=None, generator=None, dtype=torch.float32, device="cpu", **kwargs):
        lie = self.lie.random_element(batch_shape, generator=generator, dtype=dtype, device=device, **kwargs)
        discrete = self.discrete.random_element(batch_shape, num_points=num_points, mask=mask, generator=generator, dtype=dtype, device=device)
        return ProductElement(lie, discrete)

    def act(self, g: ProductElement, x, mask=None):
        return self.discrete.act(g.discrete, self.lie.act(g.lie, x, mask), mask)

    def act_on_vectors(self, g: ProductElement, v, mask=None):
        return self.discrete.act_on_vectors(g.discrete, self.lie.act_on_vectors(g.lie, v, mask), mask)

    def canonicalize(self, x, mask=None):
        """Canonical form for the discrete factor only (documented limitation: no canonical
        representative is chosen along the continuous orbit)."""
        return self.discrete.canonicalize(x, mask)

    def align(
        self,
        x,
        ref,
        mask=None,
        *,
        max_enumerate: int = 720,
        iterations: int = 50,
        anchor_matches: int = 4,
    ):
        """Closest point of x's orbit under both factors: ``g x`` with ``g = argmin |g x - ref|``.

        Shapes: ``x``, ``ref`` ``(..., N, d)``, ``mask`` ``(..., N)``; returns ``(..., N, d)`` in x's
        dtype and device, zero at padded points, differentiable in ``x`` and ``ref`` (the group
        element is chosen without gradient, then applied with torch ops).

        Permutations as the discrete factor (identical particles, e.g. SE(3) x S_N):

        * ``N! <= max_enumerate``: every reordering is tried (exact; on device, batched).
        * otherwise a multi-start search on the host (float64 NumPy, one Python loop over the
          batch and over the starts; Hungarian assignment runs on the CPU anyway, and alignment is
          not a sampler hot path). Each start alternates, until the permutation no longer changes
          (at most ``iterations`` times), an optimal assignment
          ``sigma = argmin_sigma sum_n |A x_{sigma(n)} + b - ref_n|^2``
          (``scipy.optimize.linear_sum_assignment``) with the optimal Lie element for that order
          (``LieGroup.align_matrix``: Kabsch for SO(d)); the cost never increases along a run. The
          best run wins; a run that reaches a permutation already visited stops (its remaining path
          is known), and the search stops early once a run reaches distance zero to rounding
          (relative distance ``<= 1e3 eps(dtype)``). The starts come from invariant information,
          so that the obvious answer is found:

          1. descriptor matching: every point gets the rotation- and permutation-invariant
             descriptor ``(sqrt(N) |x_n - c|, sorted_m |x_n - x_m|)`` (``c`` the centroid for groups
             with translations, else the origin); the Hungarian assignment of the descriptors of x
             to those of ref is the first order. For a generic configuration it is the true one.
          2. SO(d) factors: principal axes. With ``x^T x = U_x L U_x^T`` and ``ref^T ref = U_r L'
             U_r^T`` (centred), ``A = U_r S U_x^T`` for every sign matrix ``S`` with ``det A = 1``
             (``2^(d-1)`` rotations).
          3. SO(2) / SO(3) factors: anchor frames, for symmetric or degenerate configurations (equal
             inertia eigenvalues, tied descriptors: icosahedral clusters, cubes, regular polygons).
             An anchor point ``a`` of x (far enough from the centre, the most distinctive
             descriptor) is sent to each of its ``anchor_matches`` best descriptor matches ``a'`` in
             ref; in 3-d a second point ``b`` (largest ``|a x b|``) goes to the ``anchor_matches``
             points ``b'`` of ref that best match its descriptor and its distance to ``a``; the
             rotation maps the orthonormal frame of ``(a, b)`` to that of ``(a', b')`` (in 2-d the
             direction of ``a`` to that of ``a'``, ``anchor_matches^2`` of them). When several
             rotations are equally good (a symmetric configuration), any of them is exact.
          4. the identity order (the former method), so the result is never worse than alternating
             from the Lie-aligned start.

          Starts 2 and 3 are skipped when the nearest-neighbour lower bound of their assignment
          cost, ``sum_n min_m |A x_m - ref_n|^2``, is already no better than the best run so far.

          The result is a local optimum of the alternation in general, but a permuted, rotated and
          translated copy is recovered exactly (tested for N up to 100, random and symmetric
          configurations; ``benchmarks/bench_alignment.py`` measures the runtime).

        Other discrete factors alternate the two alignments ``iterations`` times from the
        Lie-aligned start (a local optimum).
        """
        n = x.shape[-2]
        if isinstance(self.discrete, Permutations) and math.factorial(n) <= max_enumerate:
            perms = torch.tensor(list(itertools.permutations(range(n))), device=x.device)
            shape = (perms.shape[0],) + (1,) * (x.dim() - 2) + (n,)
            g = perms.reshape(shape).expand(perms.shape[0], *x.shape[:-1])
            xp = self.discrete.act(g, x.expand(perms.shape[0], *x.shape))
            if mask is not None:
                # permutations that move a padded point onto a real slot are not group elements
                valid = mask.expand_as(g).gather(-1, g).eq(mask.expand_as(g)).all(-1)
            candidates = self.lie.align(xp, ref.expand_as(xp), mask)
            cost = apply_mask(candidates - ref, mask).square().sum((-2, -1))
            if mask is not None:
                cost = torch.where(valid, cost, torch.full_like(cost, math.inf))
            best = cost.argmin(0)
            index = best[None, ..., None, None].expand(1, *x.shape)
            return candidates.gather(0, index).squeeze(0)
        if isinstance(self.discrete, Permutations):
            if iterations < 1 or anchor_matches < 1:
                raise ValueError(
                    f"align needs iterations >= 1 and anchor_matches >= 1, got {iterations} and {anchor_matches}"
                )
            g = self._search_permutation(x, ref, mask, iterations, anchor_matches)
            return self.lie.align(self.discrete.act(g, x, mask), ref, mask)
        y = self.lie.align(x, ref, mask)
        for _ in range(iterations):
            y = self.lie.align(self.discrete.align(y, ref, mask), ref, mask)
        return y

    # -- permutation search (host side) ---------------------------------------------------------

    def _search_permutation(self, x, ref, mask, iterations: int, anchor_matches: int) -> torch.Tensor:
        """Indices ``(..., N)`` of the best reordering found by the multi-start search (see align)."""
        n, d = x.shape[-2:]
        flat_x = x.detach().reshape(-1, n, d).cpu().double().numpy()
        flat_r = ref.detach().reshape(-1, n, d).cpu().double().numpy()
        flat_m = mask.reshape(-1, n).cpu().numpy() if mask is not None else np.ones(flat_x.shape[:2], bool)
        tol = (1e3 * torch.finfo(x.dtype).eps) ** 2
        index = np.tile(np.arange(n), (flat_x.shape[0], 1))
        for b in range(flat_x.shape[0]):
            real = np.flatnonzero(flat_m[b])
            if real.size < 2:
                continue
            p, r = flat_x[b][real], flat_r[b][real]
            if self.lie.translations:
                p, r = p - p.mean(0), r - r.mean(0)
            order = _multistart_assignment(p, r, self._fit, self.lie.kind == "special_orthogonal",
                                           iterations, anchor_matches, tol)
            index[b, real] = real[order]
        return torch.as_tensor(index, device=x.device).reshape(x.shape[:-1])

    def _fit(self, y: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Linear part ``A`` of the Lie element minimising ``|y A^T - r|`` for matched, prepared points."""
        a = self.lie.align_matrix(torch.from_numpy(y), torch.from_numpy(r))
        return a.numpy()


def _assignment(y: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Optimal order ``sigma`` ``(n,)``: ``sum_n |y_{sigma(n)} - r_n|^2`` minimal (Hungarian)."""
    return _assignment_from_cost((r * r).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * r @ y.T)


def _point_descriptors(p: np.ndarray) -> np.ndarray:
    """Invariant descriptors ``(n, n)``: ``sqrt(n) |p_i|`` then the sorted distances to the others."""
    n = len(p)
    sq = (p * p).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * p @ p.T, 0.0))
    np.fill_diagonal(dist, 0.0)
    profile = np.sort(dist, axis=1)[:, 1:]
    return np.concatenate([math.sqrt(n) * np.sqrt(sq)[:, None], profile], 1)


def _principal_axes_rotations(p: np.ndarray, r: np.ndarray) -> list[np.ndarray]:
    """``U_r S U_x^T`` for every sign matrix S with determinant making a proper rotation."""
    d = p.shape[1]
    ux = np.linalg.eigh(p.T @ p)[1]
    ur = np.linalg.eigh(r.T @ r)[1]
    target = np.sign(np.linalg.det(ur) * np.linalg.det(ux))
    out = []
    for signs in itertools.product((1.0, -1.0), repeat=d):
        if np.prod(signs) == target:
            out.append((ur * np.asarray(signs)) @ ux.T)
    return out


def _frame(u: np.ndarray, v: np.ndarray | None) -> np.ndarray | None:
    """Columns: an orthonormal, positively oriented frame built from ``u`` (and ``v`` in 3-d)."""
    e1 = u / np.linalg.norm(u)
    if v is None:
        return np.stack([e1, np.array([-e1[1], e1[0]])], 1)
    w = v - (v @ e1) * e1
    nw = np.linalg.norm(w)
    if not nw > 1e-9 * np.linalg.norm(v):
        return None
    e2 = w / nw
    return np.stack([e1, e2, np.cross(e1, e2)], 1)


def _anchor_rotations(p: np.ndarray, r: np.ndarray, desc_cost: np.ndarray, k: int) -> list[np.ndarray]:
    """Rotations sending an anchor frame of ``p`` to candidate frames of ``r`` (d = 2 or 3).

    ``desc_cost[j, i]``: descriptor mismatch of ref point j and x point i.
    """
    n, d = p.shape
    rad_p = np.linalg.norm(p, axis=1)
    eligible = rad_p > 0.1 * rad_p.max()
    if not eligible.any():
        return []
    srt = np.sort(desc_cost, axis=0)
    gap = srt[1] - srt[0]  # how distinctive each x point's best match is
    a = int(np.where(eligible, gap, -np.inf).argmax())
    if d == 2:
        frame_p = _frame(p[a], None)
        out = []
        for a2 in np.argsort(desc_cost[:, a], kind="stable")[: k * k]:
            if np.linalg.norm(r[a2]) > 0:
                out.append(_frame(r[a2], None) @ frame_p.T)
        return out
    area = np.linalg.norm(np.cross(p[a], p), axis=1)
    b = int(area.argmax())
    frame_p = _frame(p[a], p[b])
    if frame_p is None:
        return []  # collinear configuration: the principal axes fix everything that matters
    dab = np.linalg.norm(p[a] - p[b])
    out = []
    for a2 in np.argsort(desc_cost[:, a], kind="stable")[:k]:
        pair = desc_cost[:, b] + n * (np.linalg.norm(r - r[a2], axis=1) - dab) ** 2
        pair[a2] = np.inf
        for b2 in np.argsort(pair, kind="stable")[:k]:
            frame_r = _frame(r[a2], r[b2]) if np.linalg.norm(r[a2]) > 0 else None
            if frame_r is not None:
                out.append(frame_r @ frame_p.T)
    return out


def _multistart_assignment(p, r, fit, rotations: bool, iterations: int, anchor_matches: int, tol: float) -> np.ndarray:
    """Best order ``sigma`` (``p[sigma]`` matches ``r``) over the starts described in ProductGroup.align.

    ``p``, ``r``: ``(n, d)`` float64 prepared (centred when the group has translations) real points;
    ``fit(y, r)``: the Lie factor's optimal linear part for matched points.
    """
    n, d = p.shape
    scale = (p * p).sum() + (r * r).sum()
    desc_x, desc_r = _point_descriptors(p), _point_descriptors(r)
    desc_cost = (desc_r * desc_r).sum(1)[:, None] + (desc_x * desc_x).sum(1)[None, :] - 2.0 * desc_r @ desc_x.T
    best_cost, best = math.inf, np.arange(n)
    visited: set[bytes] = set()

    def run(order: np.ndarray) -> bool:
        """Alternate from ``order``; record the best; True when distance zero is reached."""
        nonlocal best_cost, best
        for _ in range(iterations):
            key = order.tobytes()
            if key in visited:
                return False
            visited.add(key)
            y = p[order]
            a = fit(y, r)
            cost = float(((y @ a.T - r) ** 2).sum())
            if cost < best_cost:
                best_cost, best = cost, order
            if cost <= tol * scale:
                return True
            order = _assignment(p @ a.T, r)
        return False

    def rotation_starts():
        if rotations:
            yield from _principal_axes_rotations(p, r)
            if d in (2, 3):
                yield from _anchor_rotations(p, r, desc_cost, anchor_matches)

    if run(_assignment_from_cost(desc_cost)):
        return best
    for a in rotation_starts():
        moved = p @ a.T
        cost = (r * r).sum(1)[:, None] + (moved * moved).sum(1)[None, :] - 2.0 * r @ moved.T
        # each ref point's nearest neighbour bounds the assignment cost at this start from below:
        # a start that cannot beat the best run even before alternating is skipped (pruning)
        if cost.min(1).sum() >= best_cost:
            continue
        if run(_assignment_from_cost(cost)):
            return best
    run(np.arange(n))
    return best


def _assignment_from_cost(cost: np.ndarray) -> np.ndarray:
    """Order from a cost matrix ``cost[j, i]`` (ref point j, x point i) by the Hungarian algorithm."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    order = np.empty(cost.shape[0], dtype=np.int64)
    order[rows] = cols
    return order
