"""Ready-made symmetry groups, each a short declarative definition on top of :mod:`qmanifold`.

========================  ==========================================================  ==========
name                      acts on                                                     kind
========================  ==========================================================  ==========
``SO3``, ``SE3``          N points in R^3 (molecules), rotations (+ translations)     Lie
``SO2``, ``SE2``          N points in R^2                                             Lie
``Torus(k)``              N points in C^k = R^{2k}, one phase per complex coordinate   Lie
``Permutations()``        reorderings of the N points                                 discrete
``Lattice(k)``            integer shifts of each point: N points on R^k / Z^k          discrete
``SE3xS_N``               identical particles: rigid motions and reorderings          product
========================  ==========================================================  ==========
"""

from .definitions import SE2, SE3, SO2, SO3, Lattice, Permutations, SE3xS_N, Torus, so3_generators

__all__ = ["SO3", "SE3", "SO2", "SE2", "Torus", "Permutations", "Lattice", "SE3xS_N", "so3_generators"]
