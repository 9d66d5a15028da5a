r"""The benchmark systems of equivariant Boltzmann generators: energies (batched torch) and symmetries.

Conventions (all sums over unordered pairs ``i < j``; nothing is halved again):

* **DW4**: 4 particles in 2D, ``U(x) = sum_{i<j} a (d_ij - d0)^4 + b (d_ij - d0)^2 + c`` with
  ``a = 0.9``, ``b = -4``, ``c = 0``, ``d0 = 4``, ``kT = 1``. This is the a/b/c/d0 parameterisation
  of bgflow's ``MultiDoubleWellPotential`` used by Köhler et al. (2020) and Klein et al. (2023);
  each pair has two wells at ``d = 4 +- sqrt(-b / (2 a)) = 4 +- 1.491`` separated by a barrier of
  ``b^2 / (4 a) = 4.44 kT``.
* **LJ13**: 13 particles in 3D, ``U(x) = eps sum_{i<j} [(r_m/d_ij)^12 - 2 (r_m/d_ij)^6]
  + (k/2) sum_i |x_i - xbar|^2`` with ``eps = 1``, ``r_m = 1`` (pair minimum ``-eps`` at
  ``d = r_m``), ``k = 1`` and ``kT = 1``. The pair sum runs over ``i < j`` and is *not* halved
  (bgflow's ``LennardJonesPotential`` sums the ``N (N - 1)`` ordered pairs and divides by 2: the
  same number). Check: the Lennard-Jones part of the Mackay icosahedron, the LJ13 global minimum,
  is ``-44.326801 eps`` (Wales & Doye 1997); a halved sum would give ``-22.16``.

Both energies are invariant under translations, rotations, reflections and permutations of the
particles; the model's quotient is ``R^{N d} / (SE(d) x S_N)`` (reflections are a symmetry of these
targets too, and the EGNN respects them; they are not part of the quotient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qmanifold.discrete import Permutations, ProductGroup
from qmanifold.groups import SE2, SE3

__all__ = [
    "DW4_PARAMS",
    "LJ13_PARAMS",
    "LJ13_GLOBAL_MINIMUM",
    "pair_distances",
    "double_well_energy",
    "lennard_jones_energy",
    "harmonic_energy",
    "dw4_energy",
    "lj13_energy",
    "System",
    "SYSTEMS",
    "MOLECULAR_SYSTEMS",
    "get_system",
]

#: DW4: a (d - d0)^4 + b (d - d0)^2 + c per pair (bgflow's MultiDoubleWellPotential convention)
DW4_PARAMS = dict(a=0.9, b=-4.0, c=0.0, d0=4.0)
#: LJ13: eps [(r_m/d)^12 - 2 (r_m/d)^6] per pair plus (k/2) sum |x_i - xbar|^2
LJ13_PARAMS = dict(eps=1.0, rm=1.0, k=1.0)
#: Lennard-Jones energy (pair part only) of the LJ13 global minimum, eps = r_m = 1 (Wales & Doye 1997)
LJ13_GLOBAL_MINIMUM = -44.326801


def pair_distances(x: torch.Tensor) -> torch.Tensor:
    """Distances of the unordered pairs ``i < j``: ``(..., N, d) -> (..., N (N - 1) / 2)``."""
    n = x.shape[-2]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    diff = x[..., i, :] - x[..., j, :]
    return diff.square().sum(-1).sqrt()


def double_well_energy(x: torch.Tensor, a: float, b: float, c: float, d0: float) -> torch.Tensor:
    """``sum_{i<j} a (d_ij - d0)^4 + b (d_ij - d0)^2 + c``: ``(..., N, d) -> (...)``."""
    s = pair_distances(x) - d0
    return (a * s**4 + b * s**2 + c).sum(-1)


def lennard_jones_energy(x: torch.Tensor, eps: float = 1.0, rm: float = 1.0) -> torch.Tensor:
    """``eps sum_{i<j} [(r_m/d_ij)^12 - 2 (r_m/d_ij)^6]``: ``(..., N, d) -> (...)`` (not halved)."""
    inv6 = (rm / pair_distances(x)) ** 6
    return (eps * (inv6 * inv6 - 2.0 * inv6)).sum(-1)


def harmonic_energy(x: torch.Tensor, k: float = 1.0) -> torch.Tensor:
    """``(k/2) sum_i |x_i - xbar|^2``: ``(..., N, d) -> (...)``."""
    xc = x - x.mean(-2, keepdim=True)
    return 0.5 * k * xc.square().sum((-2, -1))


def dw4_energy(x: torch.Tensor) -> torch.Tensor:
    """DW4 energy (module docstring): ``(..., 4, 2) -> (...)``."""
    return double_well_energy(x, **DW4_PARAMS)


def lj13_energy(x: torch.Tensor) -> torch.Tensor:
    """LJ13 energy, Lennard-Jones plus harmonic confinement (module docstring): ``(..., 13, 3) -> (...)``."""
    p = LJ13_PARAMS
    return lennard_jones_energy(x, p["eps"], p["rm"]) + harmonic_energy(x, p["k"])


@dataclass(frozen=True)
class System:
    """A Boltzmann target ``p(x) ∝ exp(-U(x)/kT)`` of N identical particles in R^d.

    Attributes:
        name, n_particles, dim, kT: as named.
        energy: ``U``: ``(..., N, d) -> (...)``; invariant under E(d) and permutations.
        group: the symmetry group of the quotient, ``SE(d) x S_N``.
        convention: one line stating the energy's convention (written into data and results).
        init: ``(C, generator, dtype) -> (C, N, d)`` starting states of MCMC chains (finite energy).
        mcmc: default MCMC settings (method, step size, target acceptance, chains, burn-in).
        default_n: default ground-truth sample count of ``qmanifold data`` (modest for a CPU).
        model: default network width / depth.
    """

    name: str
    n_particles: int
    dim: int
    kT: float
    energy: Callable[[torch.Tensor], torch.Tensor]
    group: ProductGroup
    convention: str
    init: Callable[..., torch.Tensor]
    mcmc: dict
    default_n: int
    model: dict

    def check(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise ValueError unless ``x`` has shape ``(B, N, d)`` of this system."""
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.n_particles, self.dim):
            raise ValueError(f"{name} must have shape (B, {self.n_particles}, {self.dim}) for {self.name}, "
                             f"got {tuple(x.shape)}")


def _init_dw4(chains: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """A square of side 4 (every side pair at its barrier top, d0 = 4) with noise of scale 0.3: low
    energy (no particle far out, where the quartic's steep gradient can trap a MALA chain), and the
    sides fall into either well."""
    square = torch.tensor([[-2.0, -2.0], [2.0, -2.0], [2.0, 2.0], [-2.0, 2.0]], dtype=dtype)
    x = square + 0.3 * torch.randn(chains, 4, 2, generator=generator, dtype=dtype)
    return x - x.mean(-2, keepdim=True)


def _icosahedron(radius: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """Centre plus the 12 vertices of a regular icosahedron at ``radius``: ``(13, 3)``."""
    phi = (1.0 + math.sqrt(5.0)) / 2.0
    verts = []
    for s1 in (-1.0, 1.0):
        for s2 in (-1.0, 1.0):
            verts += [(0.0, s1, s2 * phi), (s1, s2 * phi, 0.0), (s2 * phi, 0.0, s1)]
    v = torch.tensor(verts, dtype=dtype)
    v = v / v.norm(dim=-1, keepdim=True) * radius
    return torch.cat([torch.zeros(1, 3, dtype=dtype), v])


def _init_lj13(chains: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """The Mackay icosahedron (nearest-neighbour distance about r_m) with small noise, particles
    randomly relabelled per chain."""
    base = _icosahedron(0.96, dtype)
    x = base + 0.05 * torch.randn(chains, 13, 3, generator=generator, dtype=dtype)
    perm = torch.argsort(torch.rand(chains, 13, generator=generator), dim=-1)
    x = torch.gather(x, 1, perm[..., None].expand(-1, -1, 3))
    return x - x.mean(-2, keepdim=True)


SYSTEMS: dict[str, System] = {
    "dw4": System(
        name="dw4", n_particles=4, dim=2, kT=1.0, energy=dw4_energy,
        group=ProductGroup(SE2, Permutations(), name="SE(2) x S_N"),
        convention="U = sum_{i<j} 0.9 (d_ij - 4)^4 - 4 (d_ij - 4)^2 (a = 0.9, b = -4, c = 0, d0 = 4; not halved), kT = 1",
        init=_init_dw4,
        mcmc=dict(method="mala", step_size=0.2, target_acceptance=0.6, chains=500, burn_in=10000, pilot=20000),
        default_n=20000,
        model=dict(hidden=32, layers=3),
    ),
    "lj13": System(
        name="lj13", n_particles=13, dim=3, kT=1.0, energy=lj13_energy,
        group=ProductGroup(SE3, Permutations(), name="SE(3) x S_N"),
        convention=("U = sum_{i<j} [(1/d_ij)^12 - 2 (1/d_ij)^6] + 1/2 sum_i |x_i - xbar|^2 (eps = r_m = 1, k = 1; "
                    "pair sum over i<j, not halved), kT = 1"),
        init=_init_lj13,
        mcmc=dict(method="mala", step_size=0.02, target_acceptance=0.6, chains=500, burn_in=5000, pilot=20000),
        default_n=10000,
        model=dict(hidden=64, layers=5),
    ),
}


#: Boltzmann targets that are molecules with a force field, not identical particles: they have
#: their own module (energy through OpenMM, MD ground truth, metrics) and train with ``qmanifold
#: train --data <ensemble .npz>``. ``aldp``: alanine dipeptide, :mod:`.aldp`.
MOLECULAR_SYSTEMS = {"aldp": "qmanifold.models.boltzmann.aldp"}


def get_system(name: str) -> System:
    """The system called ``name`` (``"dw4"`` or ``"lj13"``); ValueError otherwise (for ``"aldp"`` the
    error names its module, :data:`MOLECULAR_SYSTEMS`)."""
    key = str(name).lower()
    if key in MOLECULAR_SYSTEMS:
        raise ValueError(f"{name!r} is a molecular system, not a particle system: use {MOLECULAR_SYSTEMS[key]} "
                         "(`qmanifold data aldp`, `qmanifold evaluate-boltzmann --system aldp`)")
    if key not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; choose one of {sorted(SYSTEMS)}")
    return SYSTEMS[key]
