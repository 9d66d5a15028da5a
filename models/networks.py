"""Registry of molecular denoiser networks.

Every registered class follows the call convention::

    out = model(x_t, t, mask=mask, atom_types=atom_types, bond_types=bond_types)
    # x_t (B, N, 3) float32/float64, t (B,), mask (B, N) bool | None,
    # atom_types (B, N) int64 | None, bond_types (B, N, N) int64 | None
    # -> (B, N, 3), centred over real atoms, zero at padded atoms

and exposes ``model.config`` (constructor kwargs; ``type(model)(**model.config)``
rebuilds the architecture), ``model.name`` (its registry key) and
``model.count_parameters()``.

>>> m = build_denoiser("egnn", hidden=32, layers=2)
>>> m2 = build_denoiser(m.name, **m.config)
"""

from __future__ import annotations

from typing import Any

from qmanifold.models.chiral_egnn import ChiralEGNNDenoiser
from qmanifold.models.egnn import EGNNDenoiser
from qmanifold.models.embeddings import DenoiserBase
from qmanifold.models.transformer import TransformerDenoiser

__all__ = ["DENOISERS", "available_denoisers", "build_denoiser", "EGNNDenoiser", "ChiralEGNNDenoiser",
           "TransformerDenoiser"]

#: name -> denoiser class
DENOISERS: dict[str, type[DenoiserBase]] = {
    EGNNDenoiser.name: EGNNDenoiser,
    ChiralEGNNDenoiser.name: ChiralEGNNDenoiser,
    TransformerDenoiser.name: TransformerDenoiser,
}


def available_denoisers() -> list[str]:
    """Sorted registry names."""
    return sorted(DENOISERS)


def build_denoiser(name: str, **kwargs: Any) -> DenoiserBase:
    """Instantiate the denoiser registered as ``name`` with constructor ``kwargs``.

    Raises:
        TypeError: ``name`` is not a string, or an unknown constructor kwarg.
        ValueError: unknown ``name`` (the message lists the available ones).
    """
    if not isinstance(name, str):
        raise TypeError(f"denoiser name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in DENOISERS:
        raise ValueError(f"unknown denoiser {name!r}; available: {available_denoisers()}")
    return DENOISERS[key](**kwargs)
