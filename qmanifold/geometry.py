"""Functional core: batched quotient geometry of a linear (plus translation) group action.

Every function takes plain tensors: a configuration ``x`` of shape ``(..., N, d)``, an optional
bool ``mask`` of shape ``(..., N)`` and the lowered coefficients of a group (see
:mod:`qmanifold.symbolic_geometry`). Padded points are ignored and come out as zeros. Dtype and
device follow ``x``; nothing synchronises with the host and nothing branches on data, so the ops
work under autograd, ``torch.compile`` and ``vmap``.

Conventions (docs/geometry.md, "Conventions"):

* translations are removed by centring: with ``translations=True`` every vector that is projected
  is first made mean-free over the real points, and the rotation-like fields are evaluated at the
  centred configuration (they are then orthogonal to the translation fields);
* ``Gram_ab = sum_n <A_a x_n, A_b x_n>``; the horizontal projection is
  ``P_x(v) = v - sum_ab xi_a Gram^-1_ab <xi_b, v>``;
* the lifted mean curvature is ``h(x) = -1/2 grad_x log det Gram(x)``.

Numerical range. Everything is computed in a normalised frame: the prepared configuration is
divided by its per-sample scale ``s = max_{n,i} |x_n,i|`` (:func:`normalize`; overflow-free, one
reduction, no host sync; ``s`` is clamped to ``tiny`` so that x = 0 stays 0). The geometry is
homogeneous in x -- ``P_{cx} = P_x``, ``h(cx) = h(x) / c``, ``Gram(cx) = c^2 Gram(x)`` -- so the
normalised frame gives ``P_x = P_y``, ``h(x) = h(y) / s`` and
``log det Gram(x) = log det Gram(y) + 2 k log s`` with ``y = x / s``: no moment ever under- or
overflows, and results are correct for coordinates from ~1e-30 to ~1e30 in float32 (and the whole
float64 range). ``s`` is detached from autograd: gradients are those of the unnormalised formulas.

Degenerate configurations (non-trivial stabiliser: collinear points for SO(3), x = 0) make the
Gram matrix singular. We always solve with the regularised matrix (in the normalised frame)

    Gram_reg(y) = Gram(y) + (c * tr(Gram(y)) / k + floor) I,   c = 64 * machine epsilon, floor = sqrt(tiny)

i.e. ``Gram(x) + (c tr(Gram(x)) / k + floor s^2) I`` in the units of x, for the whole batch (same
arithmetic for every sample, no data-dependent branch), and the mean curvature is the exact
gradient of ``-1/2 log det Gram_reg`` (the regulariser's trace term is differentiated too), so
``h`` and autograd agree to rounding even on degenerate inputs. The hand-written SO(3) fast path
(:mod:`qmanifold.so3`) uses the same frame, the same regularised matrix and a Cholesky
factorisation as well. :func:`conditioning` reports ``lambda_min / lambda_max`` of Gram per sample.
"""

from __future__ import annotations

import torch

from .masking import apply_mask, center, count_points
from .symbolic_geometry import LoweredGeometry

__all__ = [
    "regularization",
    "normalize",
    "second_moment",
    "cross_moment",
    "gram_matrix",
    "regularized_gram",
    "momentum",
    "prepare",
    "angular_velocity",
    "infinitesimal_action",
    "vertical_projection",
    "horizontal_projection",
    "mean_curvature",
    "log_det_gram",
    "log_orbit_volume",
    "conditioning",
]


def regularization(dtype: torch.dtype) -> tuple[float, float]:
    """``(c, floor)`` of the Gram regulariser for ``dtype`` (see module docstring)."""
    info = torch.finfo(dtype)
    return 64.0 * info.eps, info.tiny ** 0.5


def normalize(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample normalisation ``y = x / s``, ``s = max_{n,i} |x_n,i|``: ``(..., N, d) -> ((..., N, d), (...,))``.

    ``x`` is prepared (centred / masked: padded points are zero and do not affect ``s``). The scale
    is an infinity norm (no squares, so it neither over- nor underflows), clamped to
    ``tiny(dtype)`` so that the all-zero configuration maps to ``y = 0``, and detached from
    autograd (the geometry is homogeneous in x, so only the normalised coordinates carry
    gradients). Cost: one reduction and one elementwise division; no host synchronisation.
    """
    if xc.shape[-2] * xc.shape[-1] == 0:  # static shape, not data: no points to normalise
        return xc, torch.ones(xc.shape[:-2], dtype=xc.dtype, device=xc.device)
    scale = xc.detach().abs().amax((-2, -1)).clamp_min(torch.finfo(xc.dtype).tiny)
    return xc / scale[..., None, None], scale


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """``S = sum_n x_n x_n^T``: ``(..., N, d) -> (..., d, d)`` (mask beforehand)."""
    return x.transpose(-1, -2) @ x


def cross_moment(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``V = sum_n v_n x_n^T``: ``(..., N, d), (..., N, d) -> (..., d, d)`` (mask beforehand)."""
    return v.transpose(-1, -2) @ x


def gram_matrix(geom: LoweredGeometry, x: torch.Tensor) -> torch.Tensor:
    """Unregularised Gram matrix ``(..., k, k)`` of an already centred and masked ``x``."""
    return torch.einsum("abij,...ij->...ab", geom.gram_coeff, second_moment(x))


def regularized_gram(gram: torch.Tensor) -> torch.Tensor:
    """``Gram + (c tr(Gram)/k + floor) I`` for a batch of ``(..., k, k)`` Gram matrices."""
    k = gram.shape[-1]
    c, floor = regularization(gram.dtype)
    shift = c * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / k + floor
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    return gram + shift[..., None, None] * eye


def momentum(geom: LoweredGeometry, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``J_a = sum_n <A_a x_n, v_n>``: ``(..., k)`` for masked ``x``, ``v``."""
    return torch.einsum("aij,...ij->...a", geom.momentum_coeff, cross_moment(v, x))


def prepare(x: torch.Tensor, mask: torch.Tensor | None, translations: bool) -> torch.Tensor:
    """Centre (when the group has translations) and mask a configuration."""
    return center(x, mask) if translations else apply_mask(x, mask)


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    # cholesky_ex never raises nor synchronises; the regularised Gram is SPD by construction.
    chol, _ = torch.linalg.cholesky_ex(matrix)
    return chol


def _solve_normalized(geom: LoweredGeometry, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``omega_y = Gram_reg(y)^-1 J(y, v)`` for a normalised ``y``: ``(..., k)``."""
    chol = _cholesky(regularized_gram(gram_matrix(geom, y)))
    return torch.cholesky_solve(momentum(geom, v, y).unsqueeze(-1), chol).squeeze(-1)


def angular_velocity(geom: LoweredGeometry, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Coefficients ``omega = Gram_reg^-1 J(x, v)`` of the vertical part of ``v``: ``(..., k)``.

    ``x`` and ``v`` must already be prepared (centred / masked). Computed in the normalised frame
    (``omega(x) = omega(y) / s``, see :func:`normalize`), so ``sum_a omega_a A_a x_n`` is the
    vertical part of ``v``.
    """
    y, scale = normalize(x)
    return _solve_normalized(geom, v, y) / scale[..., None]


def infinitesimal_action(geom: LoweredGeometry, omega: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fundamental field ``sum_a omega_a A_a x_n``: ``(..., k), (..., N, d) -> (..., N, d)``."""
    generator = torch.einsum("...a,aij->...ij", omega, geom.generators)
    return x @ generator.transpose(-1, -2)


def vertical_projection(
    geom: LoweredGeometry,
    v: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    translations: bool = False,
) -> torch.Tensor:
    """Orthogonal projection of ``v`` onto the tangent space of the orbit through ``x``.

    With translations this includes the mean of ``v`` (the translation part). Scale-invariant in
    ``x`` (computed in the normalised frame of :func:`normalize`).
    """
    y, _ = normalize(prepare(x, mask, translations))
    vm = apply_mask(v, mask)
    vc = prepare(v, mask, translations)
    rotational = infinitesimal_action(geom, _solve_normalized(geom, vc, y), y)
    return vm - vc + rotational


def horizontal_projection(
    geom: LoweredGeometry,
    v: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    translations: bool = False,
) -> torch.Tensor:
    """``P_x(v) = v - sum_ab xi_a(x) Gram^-1_ab <xi_b(x), v>`` (mean-free first if translations).

    Shapes: ``v, x: (..., N, d)``, ``mask: (..., N)`` -> ``(..., N, d)``, zeros at padding.
    ``P_{cx} = P_x`` for every ``c > 0``: it is evaluated at ``y = x / s`` (:func:`normalize`).
    """
    y, _ = normalize(prepare(x, mask, translations))
    vc = prepare(v, mask, translations)
    return vc - infinitesimal_action(geom, _solve_normalized(geom, vc, y), y)


def _curvature_matrix(geom: LoweredGeometry, gram: torch.Tensor) -> torch.Tensor:
    """``M = sum_ab W_ab Q_ab`` with ``W = d log det Gram_reg / d Gram``: ``(..., d, d)``."""
    k = gram.shape[-1]
    c, _ = regularization(gram.dtype)
    inverse = torch.cholesky_inverse(_cholesky(regularized_gram(gram)))
    trace = torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    weight = inverse + (c / k) * trace[..., None, None] * eye
    return torch.einsum("...ab,abij->...ij", weight, geom.gram_coeff)


def mean_curvature(
    geom: LoweredGeometry,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    translations: bool = False,
) -> torch.Tensor:
    """Lifted mean-curvature vector ``h(x) = -1/2 grad_x log det Gram(x)``: ``(..., N, d)``.

    ``h_n = -M x_n`` (centred ``x``) with ``M`` from :func:`_curvature_matrix`. For SO(3) this is
    ``h_n = (K^-1 - tr(K^-1) I) x_n`` with the inertia tensor K. ``h`` is horizontal. It is
    homogeneous of degree -1, ``h(cx) = h(x) / c``, and evaluated as ``h(y) / s`` (:func:`normalize`).
    """
    y, scale = normalize(prepare(x, mask, translations))
    m = _curvature_matrix(geom, gram_matrix(geom, y))
    # divide the result, not M: at x = 0 M ~ 1/floor and 1/s = 1/tiny would overflow (0 * inf)
    return -(y @ m.transpose(-1, -2)) / scale[..., None, None]


def log_det_gram(geom: LoweredGeometry, x: torch.Tensor, mask=None, translations: bool = False) -> torch.Tensor:
    """``log det Gram_reg(x)`` of the rotation-like generators: ``(...,)``.

    Evaluated as ``log det Gram_reg(y) + 2 k log s`` (:func:`normalize`), the exact identity
    ``log det Gram(cx) = log det Gram(x) + 2 k log c`` for the k x k Gram matrix, so it neither
    over- nor underflows.
    """
    y, scale = normalize(prepare(x, mask, translations))
    chol = _cholesky(regularized_gram(gram_matrix(geom, y)))
    k = geom.gram_coeff.shape[0]
    return 2.0 * (torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) + k * torch.log(scale))


def log_orbit_volume(geom: LoweredGeometry, x: torch.Tensor, mask=None, translations: bool = False) -> torch.Tensor:
    """``1/2 log det Gram(x)`` of the full group (translations included), up to a constant.

    With translations the Gram matrix is block-diagonal (translation block ``N_real I_d`` on a
    centred configuration), which adds ``d/2 log N_real`` per sample.
    """
    value = 0.5 * log_det_gram(geom, x, mask, translations)
    if translations:
        value = value + 0.5 * x.shape[-1] * torch.log(count_points(x, mask).clamp_min(1.0))
    return value


def conditioning(geom: LoweredGeometry, x: torch.Tensor, mask=None, translations: bool = False) -> torch.Tensor:
    """Per-sample ``lambda_min / lambda_max`` of the (unregularised) Gram matrix: ``(...,)``.

    1 for a perfectly isotropic configuration, 0 on the singular set (non-trivial stabiliser,
    e.g. collinear points for SO(3), or x = 0). A diagnostic: nothing branches on it. Scale-free
    (computed on the normalised configuration); a sample holding NaN/inf gets NaN (the
    eigenvalue solver never sees a non-finite matrix, so it does not raise).
    """
    y, _ = normalize(prepare(x, mask, translations))
    gram = gram_matrix(geom, y)
    finite = torch.isfinite(gram).all(-1).all(-1)
    gram = torch.where(finite[..., None, None], gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
    eig = torch.linalg.eigvalsh(gram)
    _, floor = regularization(x.dtype)
    ratio = eig[..., 0].clamp_min(0.0) / eig[..., -1].clamp_min(floor)
    return torch.where(finite, ratio, torch.full((), float("nan"), dtype=ratio.dtype, device=ratio.device))
