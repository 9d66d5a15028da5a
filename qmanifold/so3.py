"""Hand-written SO(3) / SE(3) fast path, equal to the generic lowering (tested against it).

For the cross-product generators ``(L_a)_{ij} = -epsilon_{aij}`` (``L_a x = e_a x x``) the Gram
matrix is the inertia tensor ``K(x) = sum_n (|x_n|^2 I - x_n x_n^T) = tr(S) I - S``, the momentum
is the angular momentum ``J = sum_n x_n x v_n``, and

    P_x(v)_n = v_n - omega x x_n,   omega = K^-1 J,
    h(x)_n   = (W - tr(W) I) x_n,    W = d log det K_reg / dK.

The 3 x 3 symmetric inverse is written out (adjugate / determinant) instead of a batched
factorisation: no LAPACK call, everything elementwise over the batch. The same regulariser as
:mod:`qmanifold.geometry` is used, so both paths agree to rounding on every input.
"""

from __future__ import annotations

import torch

from .geometry import prepare, regularization
from .masking import apply_mask

__all__ = ["inertia_tensor", "symmetric_inverse_3x3", "angular_momentum", "skew", "horizontal_projection", "vertical_projection", "mean_curvature"]


def inertia_tensor(x: torch.Tensor) -> torch.Tensor:
    """``K = sum_n (|x_n|^2 I - x_n x_n^T)``: ``(..., N, 3) -> (..., 3, 3)`` (x prepared)."""
    s = x.transpose(-1, -2) @ x
    trace = torch.diagonal(s, dim1=-2, dim2=-1).sum(-1)
    return trace[..., None, None] * torch.eye(3, dtype=x.dtype, device=x.device) - s


def _regularized(k: torch.Tensor) -> torch.Tensor:
    c, floor = regularization(k.dtype)
    shift = c * torch.diagonal(k, dim1=-2, dim2=-1).sum(-1) / 3.0 + floor
    return k + shift[..., None, None] * torch.eye(3, dtype=k.dtype, device=k.device)


def symmetric_inverse_3x3(m: torch.Tensor) -> torch.Tensor:
    """Inverse of a batch of symmetric positive-definite 3 x 3 matrices by the adjugate.

    The matrix is first scaled by its mean eigenvalue (``tr/3``) so that the determinant neither
    under- nor overflows (a regularised Gram of x = 0 is ~1e-19 I in float32).
    """
    scale = (torch.diagonal(m, dim1=-2, dim2=-1).sum(-1) / 3.0).clamp_min(torch.finfo(m.dtype).tiny)
    m = m / scale[..., None, None]
    a, b, c = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    d, e, f = m[..., 1, 1], m[..., 1, 2], m[..., 2, 2]
    c00 = d * f - e * e
    c01 = c * e - b * f
    c02 = b * e - c * d
    c11 = a * f - c * c
    c12 = b * c - a * e
    c22 = a * d - b * b
    det = a * c00 + b * c01 + c * c02
    adj = torch.stack(
        [torch.stack([c00, c01, c02], -1), torch.stack([c01, c11, c12], -1), torch.stack([c02, c12, c22], -1)],
        -2,
    )
    return adj / (det * scale)[..., None, None]


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


def _omega(vc: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    inverse = symmetric_inverse_3x3(_regularized(inertia_tensor(xc)))
    return (inverse @ angular_momentum(xc, vc).unsqueeze(-1)).squeeze(-1)


def horizontal_projection(v, x, mask=None, translations: bool = True) -> torch.Tensor:
    """SO(3) (``translations=False``) or SE(3) horizontal projection; see module docstring."""
    xc = prepare(x, mask, translations)
    vc = prepare(v, mask, translations)
    omega = _omega(vc, xc)
    return vc - xc @ skew(omega).transpose(-1, -2)  # omega x x_n for every point


def vertical_projection(v, x, mask=None, translations: bool = True) -> torch.Tensor:
    """``v - P_x(v)`` on the real points."""
    return apply_mask(v, mask) - horizontal_projection(v, x, mask, translations)


def mean_curvature(x, mask=None, translations: bool = True) -> torch.Tensor:
    """``h_n = (W - tr(W) I) x_n`` with ``W = K_reg^-1 + (c/3) tr(K_reg^-1) I``."""
    xc = prepare(x, mask, translations)
    c, _ = regularization(x.dtype)
    inverse = symmetric_inverse_3x3(_regularized(inertia_tensor(xc)))
    trace = torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    weight = inverse + (c / 3.0) * trace[..., None, None] * eye
    w_trace = torch.diagonal(weight, dim1=-2, dim2=-1).sum(-1)
    m = weight - w_trace[..., None, None] * eye
    return xc @ m.transpose(-1, -2)
