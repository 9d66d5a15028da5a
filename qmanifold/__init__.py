"""qmanifold: diffusion and flow models on quotient spaces M/G.

Core objects (see docs/geometry.md):

* :class:`LieGroup` — a symmetry group declared by Lie-algebra generators or a sympy action;
* :class:`Permutations`, :class:`Lattice`, :class:`ProductGroup` — discrete groups and products;
* :class:`Quotient` — the bundle M -> M/G: projections, mean curvature, orbit volume, alignment,
  distances, canonicalisation;
* :mod:`qmanifold.geometry` — the functional core on plain tensors.

The public names are loaded on first use (PEP 562 module ``__getattr__``): ``import qmanifold``
alone imports neither torch nor sympy, so that the command line parses its arguments (and answers
``--help`` or an argument error) without loading them. ``from qmanifold import Quotient`` and
``qmanifold.Quotient`` work as usual; so does ``qmanifold.<submodule>`` (imported on first access).

Reference: Xu et al., "Quotient-space diffusion models", ICLR 2026 (arXiv 2604.21809).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "check_finite": "_validation",
    "finite_checks": "_validation",
    "QuotientDiffusion": "diffusion",
    "Lattice": "discrete",
    "Permutations": "discrete",
    "ProductElement": "discrete",
    "ProductGroup": "discrete",
    "GroupElement": "lie",
    "LieGroup": "lie",
    "haar_so3": "lie",
    "haar_special_orthogonal": "lie",
    "kabsch_rotation": "lie",
    "Euclidean": "manifolds",
    "center": "masking",
    "Quotient": "quotient",
    "GeneralInterpolant": "schedules",
    "HarmonicPrior": "schedules",
    "Interpolant": "schedules",
    "available_interpolants": "schedules",
    "make_interpolant": "schedules",
    "SDE": "sde",
    "ProjectedSDE": "sde",
    "integrate": "sde",
}

__all__ = [
    "LieGroup",
    "GroupElement",
    "Permutations",
    "Lattice",
    "ProductGroup",
    "ProductElement",
    "Quotient",
    "SDE",
    "ProjectedSDE",
    "integrate",
    "QuotientDiffusion",
    "Interpolant",
    "GeneralInterpolant",
    "HarmonicPrior",
    "make_interpolant",
    "available_interpolants",
    "Euclidean",
    "center",
    "finite_checks",
    "check_finite",
    "haar_so3",
    "haar_special_orthogonal",
    "kabsch_rotation",
]

if TYPE_CHECKING:  # static analysers and IDEs see the names eagerly
    from ._validation import check_finite, finite_checks
    from .diffusion import QuotientDiffusion
    from .discrete import Lattice, Permutations, ProductElement, ProductGroup
    from .lie import GroupElement, LieGroup, haar_so3, haar_special_orthogonal, kabsch_rotation
    from .manifolds import Euclidean
    from .masking import center
    from .quotient import Quotient
    from .schedules import GeneralInterpolant, HarmonicPrior, Interpolant, available_interpolants, make_interpolant
    from .sde import SDE, ProjectedSDE, integrate


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule) on first access and cache it in the module."""
    module_name = _LAZY.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":  # a submodule that exists but fails to import
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
