"""The segment-offset (packed) layout: index conversions and the plain-torch segment operations.

This is the one home of what :mod:`qmanifold.packed` (the public packed ops) and
:mod:`qmanifold.kernels` (whose :class:`~qmanifold.kernels.FusedGeometry` falls back to these
operations when no kernel runs) share; it sits below both and imports neither.

Layout (see :mod:`qmanifold.packed`): ``x`` ``(P, d)`` holds the points of B configurations one
after the other; ``offsets`` ``(B+1,)`` int64 delimit them (configuration b is
``x[offsets[b]:offsets[b+1]]``), or ``segment_ids`` ``(P,)`` give each point's configuration.

The operations follow the conventions of docs/geometry.md: ``x`` and ``v`` are made mean-free per
segment when the group has translations, ``S_b = sum_{n in b} x_n x_n^T`` ``(B, d, d)`` is the
per-segment second moment from which the Gram matrix is contracted, and the per-segment ``k x k``
algebra is batched over segments; results are gathered back to ``(P, d)``. No host
synchronisation (the number of points is ``x.shape[0]``).
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
    "center_segments",
    "per_point",
    "tame_segments",
    "projection_segments",
    "curvature_segments",
]


# ----------------------------------------------------------------------------------------------
# layout conversions (re-exported by qmanifold.packed)


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


# ----------------------------------------------------------------------------------------------
# plain-torch segment implementation (the CPU path of the packed ops and the kernels' reference)


def _ids(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return segment_ids_from_offsets(offsets.to(device=x.device), total=x.shape[0])


def _segment_sum(values: torch.Tensor, ids: torch.Tensor, count: int) -> torch.Tensor:
    out = values.new_zeros((count, *values.shape[1:]))
    return out.index_add_(0, ids, values)


def _counts(offsets: torch.Tensor, dtype) -> torch.Tensor:
    return sizes_from_offsets(offsets).to(dtype).clamp_min(1.0)


def center_segments(x: torch.Tensor, offsets: torch.Tensor, translations: bool = True) -> torch.Tensor:
    """``x_n - mean_{segment of n} x`` ``(P, d)`` (``translations=False``: ``x`` unchanged)."""
    if not translations:
        return x
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    ids = _ids(x, offsets)
    count = offsets.shape[0] - 1
    mean = _segment_sum(x, ids, count) / _counts(offsets, x.dtype)[:, None]
    return x - mean[ids]


def per_point(value, offsets):
    """A per-segment scalar (number, 0-d or ``(B,)`` tensor) as a per-point ``(P, 1)`` factor
    (numbers and one-element tensors stay scalars)."""
    if not isinstance(value, torch.Tensor) or value.numel() == 1:
        return value if not isinstance(value, torch.Tensor) else value.reshape(())
    offsets = offsets.to(device=value.device, dtype=torch.int64)
    ids = torch.repeat_interleave(torch.arange(offsets.shape[0] - 1, device=value.device), sizes_from_offsets(offsets))
    return value.reshape(-1)[ids][:, None]


def tame_segments(incr: torch.Tensor, limit, offsets: torch.Tensor) -> torch.Tensor:
    """Per segment, ``incr * min(1, limit / |incr|)`` with the norm over the segment's points
    (:func:`qmanifold.sde.tame` for packed batches); ``limit`` a number or ``(B,)`` tensor."""
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


def projection_segments(geom, v, x, offsets):
    """``P_x(v)`` per segment, ``(P, d)``. ``geom`` describes the group: ``translations``,
    ``is_so3`` (the closed-form SO(3) path) and ``group`` (a LieGroup, for its lowered geometry),
    as a :class:`~qmanifold.kernels.FusedGeometry` has them."""
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    ids = _ids(x, offsets)
    count = offsets.shape[0] - 1
    xc = center_segments(x, offsets, geom.translations)
    vc = center_segments(v, offsets, geom.translations)
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


def curvature_segments(geom, x, offsets):
    """Lifted mean curvature ``h(x) = -1/2 grad log det Gram`` per segment, ``(P, d)`` (``geom`` as
    in :func:`projection_segments`)."""
    offsets = offsets.to(device=x.device, dtype=torch.int64)
    ids = _ids(x, offsets)
    count = offsets.shape[0] - 1
    xc = center_segments(x, offsets, geom.translations)
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
