"""Packed (segment-offset) layout: variable-size configurations without padding.

A packed batch of B configurations is one tensor of points ``x`` of shape ``(P, d)`` (the points
of configuration 0, then of configuration 1, ...) with

* ``offsets`` ``(B+1,)`` int64: configuration b is ``x[offsets[b]:offsets[b+1]]``
  (``offsets[0] = 0``, ``offsets[B] = P``, non-decreasing), or
* ``segment_ids`` ``(P,)`` int64: the configuration of each point, sorted (non-decreasing), with
  the number of configurations ``num_segments`` given.

Compared with a padded ``(B, N_max, d)`` batch and a mask, nothing is stored, read or computed for
padding; this is the natural layout for molecules of very different sizes (QM9 + drugs + proteins
in one batch) and for graph networks that already use segment ids.

The functional ops mirror :class:`~qmanifold.Quotient` (same conventions, docs/geometry.md, "Conventions"):
:func:`center`, :func:`horizontal_projection`, :func:`mean_curvature`,
:func:`projection_and_curvature` and :func:`lifted_update`. ``group`` is a
:class:`~qmanifold.lie.LieGroup` or a :class:`~qmanifold.Quotient`. On CUDA with Triton they run
the fused kernels of :mod:`qmanifold.kernels` (one program per block of segments); otherwise a
plain-torch segment implementation (``index_add_`` reductions, per-segment k x k algebra, gathers;
:mod:`qmanifold._segments`, shared with the kernels' fallback).

Host synchronisation: none in the ops themselves. ``max_size`` (an int >= the largest segment, if
known) selects the one-pass kernel variant (each segment held in registers); without it the kernel
streams each segment in chunks (three reads, mostly from L2) -- the results are the same.
:func:`pack`, :func:`unpack` and ``num_segments=None`` need the sizes on the host and synchronise.
"""

from __future__ import annotations

import torch

from ._segments import (
    center_segments,
    offsets_from_segment_ids,
    offsets_from_sizes,
    segment_ids_from_offsets,
    sizes_from_offsets,
)
from .kernels import FusedGeometry

__all__ = [
    "offsets_from_sizes",
    "sizes_from_offsets",
    "segment_ids_from_offsets",
    "offsets_from_segment_ids",
    "pack",
    "unpack",
    "center",
    "horizontal_projection",
    "mean_curvature",
    "projection_and_curvature",
    "lifted_update",
]


# ----------------------------------------------------------------------------------------------
# layout conversions (offsets_from_sizes, sizes_from_offsets, segment_ids_from_offsets and
# offsets_from_segment_ids live in qmanifold._segments, which qmanifold.kernels shares)


def pack(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ``(B, N, d)`` (+ mask ``(B, N)``) -> ``(points (P, d), offsets (B+1,))``.

    Real points must come in order within each configuration (any mask pattern works: the real
    points are kept in order). Synchronises (the number of real points).
    """
    b, n, d = x.shape
    if mask is None:
        return x.reshape(b * n, d), offsets_from_sizes(torch.full((b,), n, dtype=torch.int64, device=x.device))
    return x[mask], offsets_from_sizes(mask.sum(-1))


def unpack(points: torch.Tensor, offsets: torch.Tensor, max_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(points (P, d), offsets)`` -> ``(x (B, N, d), mask (B, N))`` with ``N = max_size`` (or the
    largest segment, which synchronises). Padded points are zero."""
    sizes = sizes_from_offsets(offsets.to(torch.int64))
    count = sizes.shape[0]
    n = int(max_size) if max_size is not None else (int(sizes.max()) if count else 0)
    mask = torch.arange(n, device=points.device)[None, :] < sizes[:, None]
    x = points.new_zeros(count, n, points.shape[-1])
    x[mask] = points
    return x, mask


# ----------------------------------------------------------------------------------------------
# public functional ops


_GEOMS: dict = {}


def _geometry(group):
    """The :class:`~qmanifold.kernels.FusedGeometry` of a LieGroup / Quotient (cached)."""
    lie = getattr(group, "lie", group)
    if lie is None or not getattr(lie, "generators", None):
        raise ValueError(f"{getattr(group, 'name', group)!r} has no continuous rotation-like factor; use center()")
    geom = _GEOMS.get(id(lie))
    if geom is None or geom.group is not lie:
        geom = FusedGeometry(lie)
        _GEOMS[id(lie)] = geom
    return geom


def _resolve(x, offsets, segment_ids, num_segments):
    if (offsets is None) == (segment_ids is None):
        raise ValueError("give exactly one of offsets (B+1,) and segment_ids (P,)")
    if x.dim() != 2:
        raise ValueError(f"packed points must have shape (P, d), got {tuple(x.shape)}")
    if offsets is None:
        if segment_ids.shape != x.shape[:1]:
            raise ValueError(f"segment_ids has shape {tuple(segment_ids.shape)}, expected ({x.shape[0]},)")
        offsets = offsets_from_segment_ids(segment_ids.to(x.device), num_segments)
    if offsets.dim() != 1 or offsets.shape[0] < 1:
        raise ValueError(f"offsets must have shape (B+1,), got {tuple(offsets.shape)}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    return offsets.to(device=x.device, dtype=torch.int64)


def center(x: torch.Tensor, offsets=None, *, segment_ids=None, num_segments=None, max_size=None, group=None):
    """Remove each segment's centre of mass (``group`` without translations: identity)."""
    offsets = _resolve(x, offsets, segment_ids, num_segments)
    if group is not None:
        geom = _geometry(group)
        return geom.center(x, offsets=offsets, max_size=max_size)
    return center_segments(x, offsets, True)


def horizontal_projection(group, v, x, offsets=None, *, segment_ids=None, num_segments=None, max_size=None):
    """``P_x(v)`` per segment: ``(P, d)``."""
    offsets = _resolve(x, offsets, segment_ids, num_segments)
    if v.shape != x.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but x has shape {tuple(x.shape)}")
    return _geometry(group).horizontal_projection(v, x, offsets=offsets, max_size=max_size)


def mean_curvature(group, x, offsets=None, *, segment_ids=None, num_segments=None, max_size=None):
    """Lifted mean curvature ``h(x)`` per segment: ``(P, d)``."""
    offsets = _resolve(x, offsets, segment_ids, num_segments)
    return _geometry(group).mean_curvature(x, offsets=offsets, max_size=max_size)


def projection_and_curvature(group, v, x, offsets=None, *, segment_ids=None, num_segments=None, max_size=None):
    """``(P_x(v), h(x))`` per segment in one pass."""
    offsets = _resolve(x, offsets, segment_ids, num_segments)
    return _geometry(group).projection_and_curvature(v, x, offsets=offsets, max_size=max_size)


def lifted_update(group, x, drift, noise, dt, noise_scale, curvature_coeff, offsets=None, *, tame_limit=None,
                  segment_ids=None, num_segments=None, max_size=None):
    """``x + dt P_x(drift) + noise_scale P_x(noise) + tame(curvature_coeff h(x), tame_limit)`` per
    segment; the scalars are numbers or ``(B,)`` tensors (see
    :meth:`qmanifold.kernels.FusedGeometry.lifted_update`)."""
    offsets = _resolve(x, offsets, segment_ids, num_segments)
    return _geometry(group).lifted_update(x, drift, noise, dt, noise_scale, curvature_coeff, tame_limit=tame_limit,
                                          offsets=offsets, max_size=max_size)
