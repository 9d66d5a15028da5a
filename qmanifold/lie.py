"""Lie groups acting on configurations, declared by their Lie-algebra generators or symbolically.

A :class:`LieGroup` acts on every point of a configuration ``x`` of shape ``(..., N, d)`` in the
same way, ``x_n -> A(g) x_n + b(g)``. It is declared by

* its Lie-algebra generators, d x d matrices ``A_a`` (``LieGroup(name, d, generators=[...])``),
  optionally with the d translations (``translations=True``); or
* a sympy expression of its action on one point (:meth:`LieGroup.from_action`), from which the
  generators are derived by differentiating at the identity.

The declaration is checked exactly (sympy): the generators are reduced to a basis, their span must
be closed under the matrix commutator (a Lie algebra), and the action is recorded as isometric when
every generator is skew-symmetric. Its quotient geometry is derived symbolically once
(:mod:`qmanifold.symbolic_geometry`) and lowered to batched torch ops (:mod:`qmanifold.geometry`).

Group elements are :class:`GroupElement` pairs ``(matrix (..., d, d), translation (..., d) | None)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import sympy
import torch

from . import geometry as G
from .masking import apply_mask, center, masked_mean
from .symbolic_geometry import SymbolicLinearGeometry, as_sympy_matrix, independent_basis

__all__ = [
    "GroupElement",
    "LieGroup",
    "haar_so3",
    "haar_special_orthogonal",
    "kabsch_rotation",
    "align_per_plane_phases",
]


class GroupElement(NamedTuple):
    """An element ``x -> x A^T + b`` of a linear group with optional translations.

    Attributes:
        matrix: (..., d, d) the linear part ``A(g)``.
        translation: (..., d) the translation ``b(g)``, or None for a group without translations.
    """

    matrix: torch.Tensor
    translation: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------
# Haar sampling of compact groups


def _normal(shape, generator, dtype, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of a unit quaternion ``q = (w, x, y, z)``: ``(..., 4) -> (..., 3, 3)``."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
            torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
            torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def haar_so3(batch_shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Exactly Haar-distributed rotations from normalised Gaussian quaternions: ``(*batch, 3, 3)``.

    A standard Gaussian in R^4 is rotation invariant, so its direction is uniform on S^3, and the
    double cover S^3 -> SO(3) pushes the uniform measure to the Haar measure. (Three uniform Euler
    angles are *not* Haar.)
    """
    q = _normal((*batch_shape, 4), generator, dtype, device)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return quaternion_to_matrix(q)


def haar_special_orthogonal(d: int, batch_shape, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Exactly Haar rotations of SO(d): ``(*batch, d, d)``.

    d = 2: a uniform angle; d = 3: :func:`haar_so3`; otherwise QR of a Gaussian matrix with the sign
    fix ``Q <- Q diag(sign(diag R))`` (Haar on O(d); without the fix it is not), then the first column
    multiplied by ``det Q`` (Haar on SO(d)).
    """
    if d == 2:
        angle = 2 * math.pi * torch.rand(tuple(batch_shape), generator=generator, dtype=dtype, device=device)
        c, s = torch.cos(angle), torch.sin(angle)
        return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    if d == 3:
        return haar_so3(batch_shape, generator, dtype, device)
    a = _normal((*batch_shape, d, d), generator, dtype, device)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    det = torch.linalg.det(q)
    return torch.cat([q[..., :1] * det[..., None, None], q[..., 1:]], -1)


# ---------------------------------------------------------------------------------------------
# Alignment


def kabsch_rotation(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Proper rotation ``R`` minimising ``sum_n |R x_n - ref_n|^2``: ``(..., d, d)``.

    ``x`` and ``ref`` are masked (and centred if translations are part of the group). Uses the SVD
    of the d x d cross-covariance ``H = sum_n x_n ref_n^T = U S V^T`` and
    ``R = V diag(1, .., 1, det(V U^T)) U^T`` (Kabsch 1976).

    ``R`` does not change when ``x`` or ``ref`` is multiplied by a positive number, so both are
    first normalised per sample (:func:`qmanifold.geometry.normalize`): H never over- or
    underflows, whatever the coordinates' scale. A sample whose H holds NaN/inf gets an all-NaN
    ``R`` instead of an SVD error (no host synchronisation).
    """
    x, _ = G.normalize(x)
    ref, _ = G.normalize(ref)
    h = x.transpose(-1, -2) @ ref
    finite = torch.isfinite(h).all(-1).all(-1)[..., None, None]
    h = torch.where(finite, h, torch.zeros((), dtype=h.dtype, device=h.device))
    u, _, vh = torch.linalg.svd(h)
    v = vh.transpose(-1, -2)
    sign = torch.sign(torch.linalg.det(v @ u.transpose(-1, -2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    d = x.shape[-1]
    fix = torch.ones(*sign.shape, d, dtype=x.dtype, device=x.device)
    fix = torch.cat([fix[..., :-1], sign.unsqueeze(-1)], -1)
    rot = (v * fix.unsqueeze(-2)) @ u.transpose(-1, -2)
    return torch.where(finite, rot, torch.full((), float("nan"), dtype=rot.dtype, device=rot.device))


def align_per_plane_phases(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Matrix of the torus element aligning ``x`` to ``ref`` when the group rotates the coordinate
    planes ``(0,1), (2,3), ...`` independently: ``(..., 2k, 2k)``.

    Each phase is ``phi_j = atan2(sum_n x_n^j x ref_n^j, sum_n x_n^j . ref_n^j)`` (closed form).
    """
    xs = x.unflatten(-1, (-1, 2))
    rs = ref.unflatten(-1, (-1, 2))
    dot = (xs * rs).sum(-1).sum(-2)
    cross = (xs[..., 0] * rs[..., 1] - xs[..., 1] * rs[..., 0]).sum(-2)
    phi = torch.atan2(cross, dot)
    c, s = torch.cos(phi), torch.sin(phi)
    blocks = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (..., k, 2, 2)
    return _block_diag_batched(blocks)


def _block_diag_batched(blocks: torch.Tensor) -> torch.Tensor:
    """``(..., k, 2, 2) -> (..., 2k, 2k)`` block-diagonal matrices."""
    k = blocks.shape[-3]
    eye = torch.eye(k, dtype=blocks.dtype, device=blocks.device)
    out = torch.einsum("jl,...jab->...jalb", eye, blocks)
    return out.reshape(*blocks.shape[:-3], 2 * k, 2 * k)


# ---------------------------------------------------------------------------------------------
# The group object


class LieGroup:
    """A Lie group acting linearly (plus optional translations) on every point of a configuration.

    Args:
        name: a label used in messages and reports.
        point_dim: d, the dimension of one point.
        generators: d x d Lie-algebra generators ``A_a`` (sympy Matrices, nested lists, numpy
            arrays or torch tensors). They are reduced to a linearly independent basis; their span
            must be closed under the commutator.
        translations: whether the d translations are part of the group (removed by centring).
        haar: optional ``haar(batch_shape, generator, dtype, device) -> (*batch, d, d)`` sampler of
            the linear part. Without it one is chosen when the group is recognised (SO(d), or a torus
            whose generators satisfy ``exp(2 pi A_a) = I`` and commute); otherwise
            :meth:`random_element` raises.
        align: optional ``align(x, ref) -> (..., d, d)`` closed-form aligner of prepared (masked /
            centred) configurations. Without it SO(d) uses Kabsch and other groups a multi-start
            Newton iteration on the group.

    Example::

        J = [[0, -1], [1, 0]]
        SE2 = LieGroup("SE(2)", 2, generators=[J], translations=True)
    """

    def __init__(
        self,
        name: str,
        point_dim: int,
        generators: Sequence = (),
        translations: bool = False,
        *,
        haar: Callable | None = None,
        align: Callable | None = None,
    ):
        if not isinstance(point_dim, int) or point_dim < 1:
            raise ValueError(f"point_dim must be a positive integer, got {point_dim!r}")
        mats = [as_sympy_matrix(a, point_dim, f"generator {i} of {name}") for i, a in enumerate(generators)]
        basis = independent_basis([m for m in mats if any(e != 0 for e in m)])
        if not basis and not translations:
            raise ValueError(f"{name}: a Lie group needs at least one non-zero generator or translations=True")
        self.name = name
        self.point_dim = point_dim
        self.translations = bool(translations)
        self.generators = tuple(basis)
        self._check_closed()
        self.is_isometric = all(m + m.T == sympy.zeros(point_dim) for m in basis)
        self.is_abelian = all(
            (a * b - b * a) == sympy.zeros(point_dim) for i, a in enumerate(basis) for b in basis[i + 1:]
        )
        self.symbolic = SymbolicLinearGeometry.derive(self.generators, point_dim)
        self._haar = haar or self._recognise_haar()
        self._align = align
        self.kind = self._recognise_kind()

    # -- declaration helpers --------------------------------------------------------------------

    def _check_closed(self) -> None:
        k = len(self.generators)
        if k < 2:
            return
        span = sympy.Matrix([list(m) for m in self.generators])
        for i in range(k):
            for j in range(i + 1, k):
                a, b = self.generators[i], self.generators[j]
                bracket = a * b - b * a
                if sympy.Matrix.vstack(span, sympy.Matrix([list(bracket)])).rank() > k:
                    raise ValueError(
                        f"{self.name}: the generators do not span a Lie algebra: the commutator of "
                        f"generators {i} and {j} is {bracket.tolist()}, outside their span"
                    )

    def _recognise_kind(self) -> str:
        d, k = self.point_dim, len(self.generators)
        if self.is_isometric and k == d * (d - 1) // 2 and k > 0:
            return "special_orthogonal"
        if self.is_isometric and self.is_abelian and k > 0 and self._is_periodic():
            return "torus"
        return "generic" if k > 0 else "translations"

    def _is_periodic(self) -> bool:
        for a in self.generators:
            e = torch.linalg.matrix_exp(2 * math.pi * torch.tensor(sympy.matrix2numpy(a, dtype=float)))
            if not torch.allclose(e, torch.eye(self.point_dim, dtype=e.dtype), atol=1e-9):
                return False
        return True

    def _recognise_haar(self):
        d, k = self.point_dim, len(self.generators)
        if self.is_isometric and k == d * (d - 1) // 2 and k > 0:
            return lambda batch_shape, generator, dtype, device: haar_special_orthogonal(
                d, batch_shape, generator, dtype, device
            )
        if self.is_isometric and self.is_abelian and k > 0 and self._is_periodic():

            def torus(batch_shape, generator, dtype, device):
                angles = 2 * math.pi * torch.rand((*batch_shape, k), generator=generator, dtype=dtype, device=device)
                return self.exp(angles)

            return torus
        if k == 0:
            return lambda batch_shape, generator, dtype, device: torch.eye(d, dtype=dtype, device=device).expand(
                *batch_shape, d, d
            )
        return None

    @classmethod
    def from_action(
        cls,
        name: str,
        params: Sequence[sympy.Symbol],
        coords: Sequence[sympy.Symbol],
        action: Sequence[sympy.Expr],
        **kwargs,
    ) -> LieGroup:
        """Declare a group from a sympy expression of its action on one point.

        Args:
            params: the group's local coordinates; ``params = 0`` must be the identity.
            coords: the d coordinates of a point.
            action: d expressions, the transformed coordinates, in ``params`` and ``coords``.

        The generators are derived exactly: ``xi_a(x) = d action / d params_a`` at ``params = 0``.
        Each must be affine in ``coords``, ``xi_a(x) = A_a x + b_a``. Pure translations (combinations
        with ``A = 0``) must span all of R^d or nothing; they become ``translations=True``.

        Example (SE(2))::

            th, a, b, x, y = sympy.symbols("theta a b x y")
            SE2 = LieGroup.from_action("SE(2)", [th, a, b], [x, y],
                [sympy.cos(th) * x - sympy.sin(th) * y + a, sympy.sin(th) * x + sympy.cos(th) * y + b])
        """
        params, coords = list(params), list(coords)
        d = len(coords)
        if len(action) != d:
            raise ValueError(f"{name}: the action has {len(action)} components for {d} coordinates")
        at_identity = {p: 0 for p in params}
        for i, (expr, c) in enumerate(zip(action, coords)):
            if sympy.simplify(sympy.sympify(expr).subs(at_identity) - c) != 0:
                raise ValueError(f"{name}: the action at params = 0 is not the identity (component {i})")
        linear, constant = [], []
        for p in params:
            field = sympy.Matrix([sympy.simplify(sympy.diff(sympy.sympify(e), p).subs(at_identity)) for e in action])
            jac = field.jacobian(coords)
            if jac.free_symbols & set(coords) or jac.free_symbols & set(params):
                raise ValueError(
                    f"{name}: the infinitesimal action d/d{p} is not affine in the coordinates "
                    f"({list(field)}); only linear actions plus translations are supported"
                )
            linear.append(jac)
            constant.append(field.subs({c: 0 for c in coords}))
        # Combinations with zero linear part are pure translations.
        lin_rows = sympy.Matrix([list(m) for m in linear]) if linear else sympy.zeros(0, d * d)
        null = lin_rows.T.nullspace() if linear else []
        pure = [sum((w[i] * constant[i] for i in range(len(params))), sympy.zeros(d, 1)) for w in null]
        rank = sympy.Matrix.hstack(*pure).rank() if pure else 0
        has_const = any(any(e != 0 for e in b) for b in constant)
        if rank == d:
            translations = True
        elif rank == 0 and not has_const:
            translations = False
        else:
            raise ValueError(
                f"{name}: affine actions whose translations span a {rank}-dimensional subspace of R^{d} "
                f"are not supported (need no translations or all d of them)"
            )
        return cls(name, d, generators=linear, translations=translations, **kwargs)

    # -- basic properties ---------------------------------------------------------------------

    @property
    def algebra_dim(self) -> int:
        """Dimension of the group (rotation-like generators plus translations)."""
        return len(self.generators) + (self.point_dim if self.translations else 0)

    @property
    def is_compact(self) -> bool:
        return not self.translations and self.kind in ("special_orthogonal", "torus")

    def lowered(self, dtype: torch.dtype, device) -> G.LoweredGeometry:
        """The group's torch coefficient tensors in ``dtype`` on ``device`` (cached)."""
        return self.symbolic.lower(dtype, device)

    def generator_tensor(self, dtype=torch.float64, device="cpu") -> torch.Tensor:
        """The basis generators as a ``(k, d, d)`` tensor."""
        return self.lowered(dtype, device).generators

    def __repr__(self) -> str:
        return (
            f"LieGroup({self.name!r}, point_dim={self.point_dim}, generators={len(self.generators)}, "
            f"translations={self.translations})"
        )

    # -- group operations ----------------------------------------------------------------------

    def exp(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``exp(sum_a c_a A_a)``: ``(..., k) -> (..., d, d)``."""
        gens = self.generator_tensor(coefficients.dtype, coefficients.device)
        return torch.linalg.matrix_exp(torch.einsum("...a,aij->...ij", coefficients, gens))

    def random_element(
        self,
        batch_shape=(),
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        translation_scale: float = 1.0,
    ) -> GroupElement:
        """Random group elements with batch shape ``batch_shape``.

        The linear part is exactly Haar for compact groups. Translations have no Haar probability
        measure: they are drawn from ``N(0, translation_scale^2 I)``.
        """
        batch_shape = tuple(batch_shape) if not isinstance(batch_shape, int) else (batch_shape,)
        if self._haar is None:
            raise NotImplementedError(
                f"{self.name}: no Haar sampler is known for this group; pass haar=... when declaring it"
            )
        matrix = self._haar(batch_shape, generator, dtype, device)
        translation = None
        if self.translations:
            translation = translation_scale * _normal((*batch_shape, self.point_dim), generator, dtype, device)
        return GroupElement(matrix, translation)

    def act(self, g: GroupElement, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x_n -> A(g) x_n + b(g)``; g's batch shape broadcasts against x's; padding stays zero."""
        if isinstance(g, torch.Tensor):
            g = GroupElement(g, None)
        y = x @ g.matrix.transpose(-1, -2)
        if g.translation is not None:
            y = y + g.translation.unsqueeze(-2)
        return apply_mask(y, mask)

    def act_on_vectors(self, g: GroupElement, v: torch.Tensor, mask=None) -> torch.Tensor:
        """The differential of the action on tangent vectors: ``v_n -> A(g) v_n``."""
        if isinstance(g, torch.Tensor):
            g = GroupElement(g, None)
        return apply_mask(v @ g.matrix.transpose(-1, -2), mask)

    # -- alignment ---------------------------------------------------------------------------

    def align_matrix(self, x: torch.Tensor, ref: torch.Tensor, *, iterations: int = 12, starts: int = 8) -> torch.Tensor:
        """Linear part ``A`` of the element minimising ``|x A^T - ref|`` (prepared inputs): ``(..., d, d)``.

        For an isometric action the minimiser maximises ``<g x, ref>``, which does not change when
        ``x`` or ``ref`` is scaled by a positive number: both are normalised per sample first
        (:func:`qmanifold.geometry.normalize`), so no moment over- or underflows.
        """
        if self.is_isometric:
            x, _ = G.normalize(x)
            ref, _ = G.normalize(ref)
        if self._align is not None:
            return self._align(x, ref)
        if self.kind == "special_orthogonal":
            return kabsch_rotation(x, ref)
        if not self.generators:
            return torch.eye(self.point_dim, dtype=x.dtype, device=x.device).expand(*x.shape[:-2], self.point_dim, self.point_dim)
        return self._newton_align(x, ref, iterations, starts)

    def _newton_coefficients(self, dtype, device) -> torch.Tensor:
        """``B[a, b] = (A_a A_b + A_b A_a) / 2``: ``(k, k, d, d)`` (second derivative of the action)."""
        key = ("newton", dtype, torch.device(device))
        cached = self.symbolic._cache.get(key)
        if cached is None:
            a = self.generator_tensor(dtype, device)
            prod = torch.einsum("aij,bjl->abil", a, a)
            cached = 0.5 * (prod + prod.transpose(0, 1))
            self.symbolic._cache[key] = cached
        return cached

    def _newton_align(self, x, ref, iterations, starts):
        """Multi-start saddle-free Newton ascent of ``F(g) = <g x, ref>`` on the group.

        At the current point ``y = R x`` the gradient is ``g_a = <A_a y, ref>`` and the Hessian
        ``H_ab = <(A_a A_b + A_b A_a)/2 y, ref>``; the step is ``omega = |H|^-1 g`` with ``|H|`` the
        eigenvalue-wise absolute value of H (clamped away from 0), and ``R <- exp(omega) R``. Near a
        maximum this is Newton's method (quadratic convergence). Starts: the identity and fixed Haar
        draws (when a sampler is known); the best run wins. Finds a local optimum in general.
        """
        geom = self.lowered(x.dtype, x.device)
        hess_coeff = self._newton_coefficients(x.dtype, x.device)
        d = self.point_dim
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        inits = [eye]
        if self._haar is not None and starts > 1:
            gen = torch.Generator(device=x.device).manual_seed(0)
            inits += list(self._haar((starts - 1,), gen, x.dtype, x.device).unbind(0))
        rot = torch.stack(inits).reshape(len(inits), *([1] * (x.dim() - 2)), d, d)
        rot = rot.expand(len(inits), *x.shape[:-2], d, d)
        scale = G.second_moment(x).diagonal(dim1=-2, dim2=-1).sum(-1) + G.second_moment(ref).diagonal(dim1=-2, dim2=-1).sum(-1)
        floor = (1e-6 * scale + torch.finfo(x.dtype).tiny ** 0.5)[..., None]
        for _ in range(iterations):
            y = x @ rot.transpose(-1, -2)
            cross = G.cross_moment(ref, y)  # sum_n ref_n y_n^T
            grad = torch.einsum("aij,...ij->...a", geom.momentum_coeff, cross)
            hess = torch.einsum("abij,...ij->...ab", hess_coeff, cross)
            # a non-finite sample (NaN/inf input) stays NaN through grad; eigh never sees it (no raise)
            hess = torch.where(torch.isfinite(hess), hess, torch.zeros((), dtype=hess.dtype, device=hess.device))
            evals, evecs = torch.linalg.eigh(hess)
            inv_abs = 1.0 / torch.maximum(evals.abs(), floor)
            omega = torch.einsum("...ab,...b,...cb,...c->...a", evecs, inv_abs, evecs, grad)
            rot = self.exp(omega) @ rot
        residual = (x @ rot.transpose(-1, -2) - ref).square().sum((-2, -1))
        best = residual.argmin(0)
        index = best[None, ..., None, None].expand(1, *rot.shape[1:])
        return rot.gather(0, index).squeeze(0)

    def align(self, x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The point of x's orbit closest to ``ref`` (translations included): ``(..., N, d)``."""
        if self.translations:
            xc, rc = center(x, mask), center(ref, mask)
            a = self.align_matrix(xc, rc)
            return apply_mask(xc @ a.transpose(-1, -2) + masked_mean(ref, mask).unsqueeze(-2), mask)
        xm, rm = apply_mask(x, mask), apply_mask(ref, mask)
        return apply_mask(xm @ self.align_matrix(xm, rm).transpose(-1, -2), mask)
