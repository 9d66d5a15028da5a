"""Declarations of the ready-made groups (see :mod:`groups`)."""

from __future__ import annotations

from functools import cache

import sympy

from qmanifold.discrete import Lattice, Permutations, ProductGroup
from qmanifold.lie import LieGroup, align_per_plane_phases

__all__ = ["SO3", "SE3", "SO2", "SE2", "Torus", "Permutations", "Lattice", "SE3xS_N", "so3_generators"]


def so3_generators() -> list[sympy.Matrix]:
    """Cross-product generators ``(L_a)_ij = -epsilon_aij``, i.e. ``L_a x = e_a x x``."""
    return [sympy.Matrix(3, 3, lambda i, j, a=a: -sympy.LeviCivita(a, i, j)) for a in range(3)]


J2 = sympy.Matrix([[0, -1], [1, 0]])

SO3 = LieGroup("SO(3)", 3, generators=so3_generators())
SE3 = LieGroup("SE(3)", 3, generators=so3_generators(), translations=True)
SO2 = LieGroup("SO(2)", 2, generators=[J2])
SE2 = LieGroup("SE(2)", 2, generators=[J2], translations=True)
SE3xS_N = ProductGroup(SE3, Permutations(), name="SE(3) x S_N")


@cache
def Torus(k: int) -> LieGroup:
    """The k-torus of phases acting on C^k = R^{2k}: ``z_j -> exp(i phi_j) z_j`` on every point.

    Coordinates are ordered ``(Re z_1, Im z_1, Re z_2, Im z_2, ...)``; generator j rotates the
    plane ``(2j, 2j+1)``. Alignment is in closed form (one ``atan2`` per plane).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"Torus(k) needs a positive integer k, got {k!r}")
    gens = [sympy.diag(*[J2 if j == i else sympy.zeros(2) for j in range(k)]) for i in range(k)]
    return LieGroup(f"T^{k}", 2 * k, generators=gens, align=align_per_plane_phases)
