"""Symbolic derivation of the quotient geometry of a linear group action, and its lowering.

A Lie group acts on each point of a configuration by ``x_n -> A(g) x_n`` with Lie-algebra
generators ``A_1, ..., A_k`` (d x d). Everything the quotient needs is a polynomial in two small
moment matrices of the configuration, and sympy derives those polynomials once per group:

* fundamental fields ``xi_a(x)_n = A_a x_n``;
* Gram matrix ``Gram_ab(x) = sum_n <A_a x_n, A_b x_n> = sum_ij Q[a,b,i,j] S_ij`` with the second
  moment ``S = sum_n x_n x_n^T``; ``Q[a,b] = 1/2 Hessian_x <A_a x, A_b x>`` is obtained by
  differentiating the symbolic quadratic form on a generic point;
* momentum ``J_a(x, v) = sum_n <A_a x_n, v_n> = sum_ij L[a,i,j] V_ij`` with the cross moment
  ``V = sum_n v_n x_n^T``; ``L[a] = Jacobian_v Jacobian_x <A_a x, v>`` (which is ``A_a``);
* the lifted mean curvature ``h = -1/2 grad log det Gram``: by the chain rule through S,
  ``h_n = -M x_n`` with ``M = sum_ab W_ab Q[a,b]`` and ``W = d log det Gram / d Gram``.

"Lowering" turns the exact coefficient arrays Q and L into torch tensors (cached per dtype and
device), so that the batched ops are two small einsums and one k x k solve per configuration:
O(N d^2 + k^2 d^2 + k^3) work, no (N, k, d) intermediates.

Reference: Xu et al., "Quotient-space diffusion models", ICLR 2026 (arXiv 2604.21809), Sec. 3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import sympy
import torch

__all__ = ["SymbolicLinearGeometry", "LoweredGeometry", "as_sympy_matrix", "independent_basis"]


def as_sympy_matrix(a, d: int | None = None, name: str = "generator") -> sympy.Matrix:
    """Convert a d x d matrix (sympy, nested lists, numpy or torch) to an exact sympy Matrix.

    Floats are converted with ``sympy.nsimplify`` so that e.g. 1.0 and -0.5 become exact rationals.
    A NaN or infinite entry raises ``ValueError`` naming the matrix and the entry.
    """
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    if isinstance(a, np.ndarray):
        a = a.tolist()
    try:
        m = sympy.Matrix(a)
    except Exception as exc:  # sympy raises many different errors for bad input
        raise TypeError(f"{name} could not be converted to a matrix: {exc}") from exc
    bad = [(i, j, m[i, j]) for i in range(m.rows) for j in range(m.cols) if _is_nonfinite(m[i, j])]
    if bad:
        entries = ", ".join(f"({i}, {j}) = {_nonfinite_label(e)}" for i, j, e in bad)
        raise ValueError(f"{name} contains NaN or inf entries: {entries}; generators must be finite")
    m = m.applyfunc(lambda e: sympy.nsimplify(e, rational=True) if isinstance(e, sympy.Float) else e)
    if d is not None and m.shape != (d, d):
        raise ValueError(f"{name} has shape {m.shape}, expected ({d}, {d}) for points in R^{d}")
    if m.free_symbols:
        raise ValueError(f"{name} must be a constant matrix, it contains symbols {sorted(map(str, m.free_symbols))}")
    return m


def _is_nonfinite(e) -> bool:
    """True for sympy's NaN and (complex) infinities, also inside an expression."""
    return bool(e.has(sympy.nan, sympy.oo, -sympy.oo, sympy.zoo)) if isinstance(e, sympy.Basic) else False


def _nonfinite_label(e) -> str:
    return "NaN" if e.has(sympy.nan) else "-inf" if e == -sympy.oo else "inf"


def independent_basis(matrices: Sequence[sympy.Matrix]) -> list[sympy.Matrix]:
    """A maximal linearly independent subset of ``matrices`` (exact arithmetic), in order."""
    basis: list[sympy.Matrix] = []
    rows: list[list] = []
    for m in matrices:
        candidate = rows + [list(m)]
        if sympy.Matrix(candidate).rank() > len(rows):
            rows = candidate
            basis.append(m)
    return basis


@dataclass(frozen=True)
class LoweredGeometry:
    """Torch coefficient tensors of a linear action, for one dtype and device.

    Attributes:
        generators: (k, d, d) the matrices ``A_a``.
        gram_coeff: (k, k, d, d) ``Q`` with ``Gram = einsum('abij,...ij->...ab', Q, S)``.
        momentum_coeff: (k, d, d) ``L`` with ``J = einsum('aij,...ij->...a', L, V)``.
    """

    generators: torch.Tensor
    gram_coeff: torch.Tensor
    momentum_coeff: torch.Tensor


@dataclass
class SymbolicLinearGeometry:
    """The symbolic geometry of ``x_n -> exp(sum_a theta_a A_a) x_n`` acting on N points in R^d.

    Build it with :meth:`derive`; read the exact expressions from ``gram`` (a k x k sympy Matrix in
    the symbols ``S_ij``) and ``momentum`` (a length-k sympy Matrix in ``V_ij``), and get batched
    torch coefficients from :meth:`lower`.
    """

    point_dim: int
    generators: tuple[sympy.Matrix, ...]
    second_moment_symbols: sympy.Matrix
    cross_moment_symbols: sympy.Matrix
    gram: sympy.Matrix
    momentum: sympy.Matrix
    gram_coeff: np.ndarray
    momentum_coeff: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def derive(cls, generators: Sequence[sympy.Matrix], point_dim: int) -> SymbolicLinearGeometry:
        d = point_dim
        k = len(generators)
        xs = sympy.Matrix(sympy.symbols(f"x0:{d}", real=True))
        vs = sympy.Matrix(sympy.symbols(f"v0:{d}", real=True))
        s_sym = sympy.Matrix(d, d, lambda i, j: sympy.Symbol(f"S_{min(i, j)}{max(i, j)}", real=True))
        v_sym = sympy.Matrix(d, d, lambda i, j: sympy.Symbol(f"V_{i}{j}", real=True))
        fields = [a * xs for a in generators]  # fundamental fields at a generic point

        gram_coeff = np.zeros((k, k, d, d))
        gram = sympy.zeros(k, k)
        for a in range(k):
            for b in range(k):
                form = sympy.expand(fields[a].dot(fields[b]))
                hess = sympy.hessian(form, list(xs)) / 2  # Q[a,b], symmetric in (i, j)
                gram_coeff[a, b] = np.array(hess.tolist(), dtype=np.float64)
                gram[a, b] = sympy.expand(sum(hess[i, j] * s_sym[i, j] for i in range(d) for j in range(d)))

        momentum_coeff = np.zeros((k, d, d))
        momentum = sympy.zeros(k, 1)
        for a in range(k):
            form = sympy.expand(fields[a].dot(vs))
            # coefficient of v_i x_j in <A_a x, v>
            jac = sympy.Matrix(d, d, lambda i, j, form=form: sympy.diff(form, vs[i], xs[j]))
            momentum_coeff[a] = np.array(jac.tolist(), dtype=np.float64)
            momentum[a] = sympy.expand(sum(jac[i, j] * v_sym[i, j] for i in range(d) for j in range(d)))

        return cls(
            point_dim=d,
            generators=tuple(generators),
            second_moment_symbols=s_sym,
            cross_moment_symbols=v_sym,
            gram=gram,
            momentum=momentum,
            gram_coeff=gram_coeff,
            momentum_coeff=momentum_coeff,
        )

    @property
    def algebra_dim(self) -> int:
        return len(self.generators)

    def lower(self, dtype: torch.dtype, device: torch.device | str) -> LoweredGeometry:
        """Coefficient tensors in ``dtype`` on ``device`` (built once, then cached)."""
        key = (dtype, torch.device(device))
        lowered = self._cache.get(key)
        if lowered is None:
            gens = np.stack([np.array(a.tolist(), dtype=np.float64) for a in self.generators]) if self.generators else np.zeros((0, self.point_dim, self.point_dim))
            lowered = LoweredGeometry(
                generators=torch.as_tensor(gens, dtype=dtype, device=device),
                gram_coeff=torch.as_tensor(self.gram_coeff, dtype=dtype, device=device),
                momentum_coeff=torch.as_tensor(self.momentum_coeff, dtype=dtype, device=device),
            )
            self._cache[key] = lowered
        return lowered
