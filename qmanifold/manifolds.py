"""Total spaces M on which the groups act.

The bundle and the samplers only use this interface (inner product, tangent projection,
retraction, random point), so that a curved total space (spheres, SE(3)^N frames, Stiefel
manifolds) is an addition, not a rewrite. For now: :class:`Euclidean` configuration space.
"""

from __future__ import annotations

import torch

from .masking import apply_mask

__all__ = ["Euclidean"]


class Euclidean:
    """Configurations of N points in R^d, shape ``(..., N, d)``, with the flat metric.

    Padded points (``mask`` False) carry no mass: they are excluded from inner products and stay
    at zero under every operation.
    """

    def __init__(self, point_dim: int):
        self.point_dim = point_dim

    def inner(self, u: torch.Tensor, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        """``<u, v>_x = sum_n <u_n, v_n>`` over real points: ``(...,)``."""
        return (apply_mask(u, mask) * v).sum((-2, -1))

    def norm(self, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        return self.inner(v, v, x, mask).clamp_min(0).sqrt()

    def to_tangent(self, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        """Projection onto ``T_x M``: the identity (padding zeroed)."""
        return apply_mask(v, mask)

    def retract(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Exponential map ``x + v`` (padding zeroed)."""
        return apply_mask(x + v, mask)

    exp = retract

    def random_normal(self, shape, *, generator=None, dtype=torch.float32, device="cpu", mask=None) -> torch.Tensor:
        """Standard Gaussian tangent vectors / points of shape ``shape`` (padding zeroed)."""
        return apply_mask(torch.randn(shape, generator=generator, dtype=dtype, device=device), mask)

    def __repr__(self) -> str:
        return f"Euclidean(point_dim={self.point_dim})"
