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

    def align(self, x, ref, mask=None, *, max_enumerate: int = 720, iterations: int = 20):
        """Closest point of x's orbit under both factors.

        For permutations with ``N! <= max_enumerate`` every reordering is tried (exact); otherwise
        the two alignments alternate ``iterations`` times from the Lie-aligned start (a local
        optimum, never worse than aligning the Lie factor alone).
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
        y = self.lie.align(x, ref, mask)
        for _ in range(iterations):
            y = self.lie.align(self.discrete.align(y, ref, mask), ref, mask)
        return y
