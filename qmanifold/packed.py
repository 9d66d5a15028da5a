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
plain-torch segment implementation (``index_add_`` reductions, per-segment k x k algebra, gathers).

Host synchronisation: none in the ops themselves. ``max_size`` (an int >= the largest segment, if
known) selects the one-pass kernel variant (each segment held in registers); without it the kernel
streams each segment in chunks (three reads, mostly from L2) -- the results are the same.
:func:`pack`, :func:`unpack` and ``num_segments=None`` need the sizes on the host and synchronise.
"""

from __future__ import annotations

import torch

from . import geometry as G
from . import so3

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
# layout conversions


def offsets_from_sizes(sizes) -> torch.Tensor:
    """``(B,)`` sizes -> ``(B+1,)`` int64 offsets (``[0, cumsum(sizes)]``)."""
    sizes = torch.as_tensor(sizes, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=sizes.device), torch.cumsum(sizes, 0)])


def sizes_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """``(B+1,)`` offsets -> ``(B,)`` sizes."""
    return offsets[1:] - offsets[:-1]


def segment_ids_from_offsets(offsets: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """``(P,)`` segment id of each point. ``total`` (= P) avoids a host synchronisation."""
    offsets = offsets.to(torch.int64)
    count = offsets.shape[0] - 1
    ids = torch.arange(count, device=offsets.device)
    return torch.repeat_interleave(ids, sizes_from_offsets(offsets), output_size=total)


def offsets_from_segment_ids(segment_ids: torch.Tensor, num_segments: int | None = None) -> torch.Tensor:
    """Offsets of sorted ``segment_ids``. Give ``num_segments`` to avoid a host synchronisation."""
    segment_ids = segment_ids.to(torch.int64)
    if num_segments is None:
        num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    sizes = torch.zeros(num_segments, dtype=torch.int64, device=segment_ids.device)
    sizes.index_add_(0, segment_ids, torch.ones_like(segment_ids))
    return offsets_from_sizes(sizes)


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
# plain-torch segment implementation (CPU path and reference)


def _ids(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return segment_ids_from_offsets(offsets.to(device=x.device), total=x.shape[0])


def _segment_sum(values: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    out = values.new_zeros((count, *values.shape[1:]))
    return out.index_add_(0, ids, values)


def _counts(offsets: torch.Tensor, dtype) -> torch.Tensor:
    return sizes_from_offsets(offsets).to(dtype).clamp_min(1.0)


def _torch_center_packed(x: torch.Tensor, offsets: torch.Tensor, translations: bool = True) -> torch.Tensor:
    if not translations:
        return x
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    ids = _ids(x, offsets)
    count = offsets.shape[0] - 1
    mean = _segment_sum(x, ids, count) / _counts(offsets, x.dtype)[:, None]
    return x - mean[ids]


def _broadcast_segments(value, offsets):
    """A per-segment scalar (number, 0-d or ``(B,)`` tensor) as a per-point ``(P, 1)`` factor."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return value if not isinstance(value, torch.Tensor) else value.reshape(())
    offsets = offsets.to(device=value.device, dtype=torch.int64)
    ids = torch.repeat_interleave(torch.arange(offsets.shape[0] - 1, device=value.device), sizes_from_offsets(offsets))
    return value.reshape(-1)[ids][:, None]


def _tame_packed(incr: torch.Tensor, limit, offsets: torch.Tensor) -> torch.Tensor:
    offsets = offsets.to(device=incr.device, dtype=torch.int64)
    ids = _ids(incr, offsets)
    count = offsets.shape[0] - 1
    norm = _segment_sum(incr.square().sum(-1), ids, count).sqrt()
    limit = limit if isinstance(limit, torch.Tensor) else torch.tensor(float(limit), dtype=incr.dtype, device=incr.device)
    scale = torch.clamp(limit.to(incr.dtype).reshape(-1) / norm.clamp_min(torch.finfo(incr.dtype).tiny), max=1.0)
    return incr * scale[ids][:, None]


def _second_moment(xc, ids, count):
    """Per-segment second moment ``S = sum_n x_n x_n^T``: ``(B, d, d)``."""
    d = xc.shape[-1]
    s = _segment_sum((xc[:, :, None] * xc[:, None, :]).reshape(-1, d * d), ids, count).reshape(count, d, d)
    return s


def _torch_projection_packed(geom, v, x, offsets):
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    ids = _ids(x, offsets)
    count = offsets.shape[0] - 1
    xc = _torch_center_packed(x, offsets, geom.translations)
    vc = _torch_center_packed(v, offsets, geom.translations)
    s = _second_moment(xc, ids, count)
    if geom.is_so3:
        k = so3._regularized(torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)[:, None, None]
                             * torch.eye(3, dtype=x.dtype, device=x.device) - s)
        inverse = so3.symmetric_inverse_3x3(k)
        j = _segment_sum(torch.linalg.cross(xc, vc, dim=-1), ids, count)
        omega = (inverse @ j.unsqueeze(-1)).squeeze(-1)
        return vc - torch.linalg.cross(omega[ids], xc, dim=-1)
    lowered = geom.group.lowered(x.dtype, x.device)
    d = x.shape[-1]
    gram = torch.einsum("abij,...ij->...ab", lowered.gram_coeff, s)
    cross = _segment_sum((vc[:, :, None] * xc[:, None, :]).reshape(-1, d * d), ids, count).reshape(count, d, d)
    mom = torch.einsum("aij,...ij->...a", lowered.momentum_coeff, cross)
    chol = G._cholesky(G.regularized_gram(gram))
    omega = torch.cholesky_solve(mom.unsqueeze(-1), chol).squeeze(-1)
    field = torch.einsum("...a,aij->...ij", omega, lowered.generators)
    return vc - torch.einsum("pij,pj->pi", field[ids], xc)


def _torch_curvature_packed(geom, x, offsets):
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    ids = _ids(x, offsets)
    count = offsets.shape[0] - 1
    xc = _torch_center_packed(x, offsets, geom.translations)
    s = _second_moment(xc, ids, count)
    if geom.is_so3:
        c, _ = G.regularization(x.dtype)
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        k = so3._regularized(torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)[:, None, None] * eye - s)
        inverse = so3.symmetric_inverse_3x3(k)
        trace = torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
        weight = inverse + (c / 3.0) * trace[:, None, None] * eye
        m = weight - torch.diagonal(weight, dim1=-2, dim2=-1).sum(-1)[:, None, None] * eye
        return torch.einsum("pij,pj->pi", m[ids], xc)
    lowered = geom.group.lowered(x.dtype, x.device)
    gram = torch.einsum("abij,...ij->...ab", lowered.gram_coeff, s)
    m = G._curvature_matrix(lowered, gram)
    return -torch.einsum("pij,pj->pi", m[ids], xc)


# ----------------------------------------------------------------------------------------------
# public functional ops


_GEOMS: dict = {}


def _geometry(group):
    """The :class:`~qmanifold.kernels.FusedGeometry` of a LieGroup / Quotient (cached)."""
    from .kernels import FusedGeometry

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
    return _torch_center_packed(x, offsets, True)


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
