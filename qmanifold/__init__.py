"""qmanifold: diffusion and flow models on quotient spaces M/G.

Core objects (see docs/geometry.md):

* :class:`LieGroup` — a symmetry group declared by Lie-algebra generators or a sympy action;
* :class:`Permutations`, :class:`Lattice`, :class:`ProductGroup` — discrete groups and products;
* :class:`Quotient` — the bundle M -> M/G: projections, mean curvature, orbit volume, alignment,
  distances, canonicalisation;
* :mod:`qmanifold.geometry` — the functional core on plain tensors.

Reference: Xu et al., "Quotient-space diffusion models", ICLR 2026 (arXiv 2604.21809).
"""

from ._validation import check_finite, finite_checks
from .diffusion import QuotientDiffusion
from .discrete import Lattice, Permutations, ProductElement, ProductGroup
from .lie import GroupElement, LieGroup, haar_so3, haar_special_orthogonal, kabsch_rotation
from .manifolds import Euclidean
from .masking import center
from .quotient import Quotient
from .schedules import GeneralInterpolant, HarmonicPrior, Interpolant, available_interpolants, make_interpolant
from .sde import SDE, ProjectedSDE, integrate

__version__ = "0.1.0"

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
