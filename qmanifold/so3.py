"""Hand-written SO(3) / SE(3) fast path, equal to the generic lowering (tested against it).

For the cross-product generators ``(L_a)_{ij} = -epsilon_{aij}`` (``L_a x = e_a x x``) the Gram
matrix is the inertia tensor ``K(x) = sum_n (|x_n|^2 I - x_n x_n^T) = tr(S) I - S``, the momentum
is the angular momentum ``J = sum_n x_n x v_n``, and

    P_x(v)_n = v_n - omega x x_n,   omega = K^-1 J,
    h(x)_n   = (W - tr(W) I) x_n,    W = d log det K_reg / dK.

Same arithmetic as :mod:`qmanifold.geometry`: the configuration is first normalised per sample
(``y = x / s``, :func:`qmanifold.geometry.normalize`; ``P_x = P_y``, ``h(x) = h(y) / s``), the
same regularised matrix ``K_reg = K + (c tr(K)/3 + floor) I`` is used, and it is factorised by
Cholesky like the generic path -- written out for 3 x 3 (six elementwise formulas, no LAPACK
call), so that both paths agree to rounding on every input, singular ones included. (An
adjugate / determinant inverse is *not* accurate enough there: on a collinear configuration
``K_reg`` has condition number ~1/(64 eps) and the adjugate loses all digits of the
well-conditioned block, which made P non-idempotent to 1e-3.)
"""

from __future__ import annotations

import torch

from .geometry import normalize, prepare, regularization
from .masking import apply_mask

__all__ = [
    "inertia_tensor",
    "cholesky_3x3",
    "symmetric_inverse_3x3",
    "symmetric_solve_3x3",
    "angular_momentum",
    "skew",
    "horizontal_projection",
    "vertical_projection",
    "mean_curvature",
]


def inertia_tensor(x: torch.Tensor) -> torch.Tensor:
    """``K = sum_n (|x_n|^2 I - x_n x_n^T)``: ``(..., N, 3) -> (..., 3, 3)`` (x prepared)."""
    s = x.transpose(-1, -2) @ x
    trace = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)
    return trace[..., None, None] * torch.eye(3, dtype=x.dtype, device=x.device) - s


def _regularized(k: torch.Tensor) -> torch.Tensor:
    """``K + (c tr(K)/3 + floor) I`` (:func:`qmanifold.geometry.regularized_gram` for k = 3)."""
    c, floor = regularization(k.dtype)
    shift = c * torch.diagonal(k, dim1=-2, dim2=-1).sum(-1) / 3.0 + floor
    return k + shift[..., None, None] * torch.eye(3, dtype=k.dtype, device=k.device)


def cholesky_3x3(m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cholesky factor ``L`` (``m = L L^T``) of a batch of SPD 3 x 3 matrices, elementwise.

    Returns the six entries ``(l00, l10, l20, l11, l21, l22)``, each ``(...,)``. Pivots are clamped
    to ``tiny`` before the square root (like ``cholesky_ex`` never raising), so the result is finite
    on every finite input. Backward stable: the computed ``L L^T`` equals ``m`` up to rounding of
    the order of ``eps |m|``.
    """
    tiny = torch.finfo(m.dtype).tiny
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 1], m[..., 1, 2], m[..., 2, 2]
    l00 = a.clamp_min(tiny).sqrt()
    l10 = b / l00
    l20 = c / l00
    l11 = (d - l10 * l10).clamp_min(tiny).sqrt()
    l21 = (e - l20 * l10) / l11
    l22 = (f - l20 * l20 - l21 * l21).clamp_min(tiny).sqrt()
    return l00, l10, l20, l11, l21, l22


def symmetric_solve_3x3(m: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``m^-1 rhs`` for SPD 3 x 3 ``m`` ``(..., 3, 3)`` and ``rhs`` ``(..., 3)``: Cholesky, then
    forward and back substitution (as ``torch.cholesky_solve``), elementwise over the batch."""
    l00, l10, l20, l11, l21, l22 = cholesky_3x3(m)
    r0, r1, r2 = rhs.unbind(-1)
    z0 = r0 / l00
    z1 = (r1 - l10 * z0) / l11
    z2 = (r2 - l20 * z0 - l21 * z1) / l22
    w2 = z2 / l22
    w1 = (z1 - l21 * w2) / l11
    w0 = (z0 - l10 * w1 - l20 * w2) / l00
    return torch.stack([w0, w1, w2], -1)


def symmetric_inverse_3x3(m: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of symmetric positive-definite 3 x 3 matrices: ``(..., 3, 3)``.

    ``m^-1 = L^-T L^-1`` from :func:`cholesky_3x3` (as ``torch.cholesky_inverse``), the inverse of
    the triangular factor written out. Accurate on nearly singular (regularised) matrices, where
    an adjugate / determinant formula loses the well-conditioned block.
    """
    l00, l10, l20, l11, l21, l22 = cholesky_3x3(m)
    # L^-1 = [[i00, 0, 0], [i10, i11, 0], [i20, i21, i22]]
    i00, i11, i22 = l00.reciprocal(), l11.reciprocal(), l22.reciprocal()
    i10 = -l10 * i00 * i11
    i21 = -l21 * i11 * i22
    i20 = -(l20 * i00 + l21 * i10) * i22
    # (L^-T L^-1)_ij = sum_k (L^-1)_ki (L^-1)_kj
    m00 = i00 * i00 + i10 * i10 + i20 * i20
    m01 = i10 * i11 + i20 * i21
    m02 = i20 * i22
    m11 = i11 * i11 + i21 * i21
    m12 = i21 * i22
    m22 = i22 * i22
    return torch.stack([m00, m01, m02, m01, m11, m12, m02, m12, m22], -1).unflatten(-1, (3, 3))


def angular_momentum(xc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
    """``J = sum_n x_n x v_n``: ``(..., 3)``, from the 3 x 3 moment ``C = sum_n x_n v_n^T`` (one
    batched matmul instead of N cross products): ``J_a = epsilon_abc C_bc``."""
    c = xc.transpose(-1, -2) @ vc
    return torch.stack([c[..., 1, 2] - c[..., 2, 1], c[..., 2, 0] - c[..., 0, 2], c[..., 0, 1] - c[..., 1, 0]], -1)


def skew(omega: torch.Tensor) -> torch.Tensor:
    """``[omega]_x``, the matrix with ``[omega]_x y = omega x y``: ``(..., 3) -> (..., 3, 3)``."""
    zero = torch.zeros_like(omega[..., 0])
    wx, wy, wz = omega.unbind(-1)
    return torch.stack(
        [torch.stack([zero, -wz, wy], -1), torch.stack([wz, zero, -wx], -1), torch.stack([-wy, wx, zero], -1)], -2
    )


def _omega(vc: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``omega_y = K_reg(y)^-1 J(y, v)`` for a normalised ``y``: ``(..., 3)``."""
    return symmetric_solve_3x3(_regularized(inertia_tensor(y)), angular_momentum(y, vc))


def horizontal_projection(v, x, mask=None, translations: bool = True) -> torch.Tensor:
    """SO(3) (``translations=False``) or SE(3) horizontal projection; see module docstring.

    ``v, x: (..., N, 3)``, ``mask: (..., N)`` -> ``(..., N, 3)``; ``P_{cx} = P_x`` (normalised frame).
    """
    y, _ = normalize(prepare(x, mask, translations))
    vc = prepare(v, mask, translations)
    omega = _omega(vc, y)
    return vc - y @ skew(omega).transpose(-1, -2)  # omega x y_n for every point


def vertical_projection(v, x, mask=None, translations: bool = True) -> torch.Tensor:
    """``v - P_x(v)`` on the real points."""
    return apply_mask(v, mask) - horizontal_projection(v, x, mask, translations)


def mean_curvature(x, mask=None, translations: bool = True) -> torch.Tensor:
    """``h_n = (W - tr(W) I) x_n`` with ``W = K_reg^-1 + (c/3) tr(K_reg^-1) I``: ``(..., N, 3)``.

    Evaluated as ``h(y) / s`` in the normalised frame (``h(cx) = h(x) / c``).
    """
    y, scale = normalize(prepare(x, mask, translations))
    c, _ = regularization(x.dtype)
    inverse = symmetric_inverse_3x3(_regularized(inertia_tensor(y)))
    trace = torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    weight = inverse + (c / 3.0) * trace[..., None, None] * eye
    w_trace = torch.diagonal(weight, dim1=-2, dim2=-1).sum(-1)
    m = weight - w_trace[..., None, None] * eye
    # divide the result, not m: at x = 0 m ~ 1/floor and 1/s = 1/tiny would overflow (0 * inf)
    return (y @ m.transpose(-1, -2)) / scale[..., None, None]
