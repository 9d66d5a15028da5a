"""Masked reductions over the points of a configuration.

A configuration is a tensor ``x`` of shape ``(..., N, d)``; a mask is a bool tensor of shape
``(..., N)`` with True on real points. Padded points never contribute to a sum, mean or norm, and
every function here returns zeros at padded points. ``mask=None`` means all points are real.
"""

from __future__ import annotations

import torch

__all__ = ["apply_mask", "count_points", "masked_sum", "masked_mean", "center", "masked_sq_norm"]


def apply_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the padded points of ``x`` (shape ``(..., N, d)``): exactly zero, even where ``x`` holds
    NaN or inf at a padded point (a selection, not a multiplication by the mask)."""
    if mask is None:
        return x
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def count_points(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Number of real points per configuration, shape ``(...,)``, in x's dtype."""
    if mask is None:
        return torch.full(x.shape[:-2], x.shape[-2], dtype=x.dtype, device=x.device)
    return mask.sum(-1).to(x.dtype)


def masked_sum(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum over real points: ``(..., N, d) -> (..., d)``."""
    return apply_mask(x, mask).sum(-2)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real points: ``(..., N, d) -> (..., d)``.

    A configuration with no real point has mean zero (the count is clamped to 1, no NaN).
    """
    n = count_points(x, mask).clamp_min(1.0)
    return masked_sum(x, mask) / n.unsqueeze(-1)


def center(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Remove the centre of mass of the real points; padded points come out as zeros.

    ``center(x)_n = x_n - (1/|real|) sum_{m real} x_m``. This is the orthogonal projection onto the
    centre-of-mass-free subspace, i.e. the horizontal projection for pure translations.
    """
    return apply_mask(x - masked_mean(x, mask).unsqueeze(-2), mask)


def masked_sq_norm(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean norm of the real part of a configuration: ``(..., N, d) -> (...,)``."""
    return apply_mask(x, mask).square().sum((-2, -1))
