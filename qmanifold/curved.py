"""A Lie group acting on a curved total space M: the bundle M -> M/G, derived and lowered.

The group acts on every point of a configuration ``x`` of shape ``(..., N, n)`` (N points of a
manifold M_1 with n ambient coordinates, :mod:`qmanifold.manifolds`) by ambient affine isometries
``y -> A(g) y + b(g)`` that preserve M_1: SO(3) rotating each point of (S^2)^N, SE(3) multiplying
every frame of SE(3)^N on the left (``(R, t) -> (Q R, Q t + b)``, linear on the 9 rotation
coordinates, affine on the 3 translation ones), a global phase shift on a torus of angles. The
action is declared by an :class:`~qmanifold.manifold_symbolic.AffineRepresentation`: one affine
field ``xi_a(y) = A_a y + b_a`` per Lie-algebra basis element of the group (the ready-made manifolds
derive it from the group's generators: :meth:`group_representation`).

Checked exactly (sympy) at declaration: every ``A_a`` is skew (the action is an isometry of the
ambient metric, hence of the induced metric of M), the fields are linearly independent (the
infinitesimal action is faithful), and ``a -> [[A_a, b_a], [0, 0]]`` is a Lie-algebra homomorphism
from the group's own algebra (same structure constants); numerically, at random points of M, that
the fields are tangent to M (the action preserves M).

Derived once (exact sympy arithmetic on the declared matrices), with the moments
``S = sum_n x_n x_n^T``, ``m = sum_n x_n`` and the number of real points ``N``:

* Gram matrix in M's metric (the fields are tangent, so it is the ambient one)
  ``Gram_ab = sum_n <xi_a(x_n), xi_b(x_n)> = Q_ab : S + l_ab . m + N e_ab`` with
  ``Q_ab = (A_a^T A_b + A_b^T A_a)/2``, ``l_ab = A_a^T b_b + A_b^T b_a``, ``e_ab = <b_a, b_b>``;
* momentum ``J_a(x, v) = sum_n <xi_a(x_n), v_n> = A_a : V + <b_a, sum_n v_n>``, ``V = sum_n v_n x_n^T``;

and lowered to batched torch:

* horizontal projection ``P_x(v) = v_T - sum_a omega_a xi_a(x)``, ``omega = Gram^-1 J(x, v_T)``, with
  ``v_T`` the projection of v onto ``T_x M`` (the quotient's horizontal space is inside T_x M);
* vertical projection ``v_T - P_x(v)``;
* log orbit volume ``1/2 log det Gram`` (+ a constant), and the lifted mean curvature of the orbits
  ``h = -grad_M 1/2 log det Gram = -P^M_x(sum_ab W_ab (Q_ab x_n + l_ab / 2))``, ``W = Gram^-1``
  (the Riemannian gradient on an embedded M is the tangent projection of the ambient gradient of
  the polynomial extension). Same sign conventions as the flat case (DESIGN.md, section 1).

The Gram matrix is regularised exactly as in the flat core (:func:`qmanifold.geometry.regularized_gram`)
and h is the exact gradient of the regularised log-determinant. No normalisation by scale is done
here (points of compact factors are O(1); translations of frames enter ``Gram`` quadratically).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from .geometry import regularization, regularized_gram
from .lie import GroupElement
from .manifold_symbolic import AffineRepresentation
from .masking import apply_mask, count_points
from .symbolic_geometry import as_sympy_matrix

__all__ = ["ManifoldAction", "LoweredAction"]


@dataclass(frozen=True)
class LoweredAction:
    """Torch coefficients of an affine action on n ambient coordinates, one dtype and device.

    Attributes:
        linear: (k, n, n) ``A_a``; offset: (k, n) ``b_a``;
        gram_quadratic: (k, k, n, n) ``Q``; gram_linear: (k, k, n) ``l``; gram_constant: (k, k) ``e``.
    """

    linear: torch.Tensor
    offset: torch.Tensor
    gram_quadratic: torch.Tensor
    gram_linear: torch.Tensor
    gram_constant: torch.Tensor


def _augmented(a: sympy.Matrix, b: sympy.Matrix) -> sympy.Matrix:
    n = a.shape[0]
    top = sympy.Matrix.hstack(a, b)
    return sympy.Matrix.vstack(top, sympy.zeros(1, n + 1))


def _group_augmented(group) -> list[sympy.Matrix]:
    """The group's own Lie algebra as (d+1) x (d+1) affine matrices: generators, then translations."""
    d = group.point_dim
    mats = [_augmented(sympy.Matrix(a), sympy.zeros(d, 1)) for a in group.generators]
    if getattr(group, "translations", False):
        for k in range(d):
            e = sympy.zeros(d, 1)
            e[k] = 1
            mats.append(_augmented(sympy.zeros(d, d), e))
    return mats


def _coefficients(basis: list[sympy.Matrix], target: sympy.Matrix):
    """Exact coefficients of ``target`` in ``basis`` (None if outside the span)."""
    columns = sympy.Matrix.hstack(*[sympy.Matrix(list(m)) for m in basis])
    try:
        sol, params = columns.gauss_jordan_solve(sympy.Matrix(list(target)))
    except ValueError:
        return None
    return list(sol.subs({p: 0 for p in params}))


class ManifoldAction:
    """``group`` acting on ``manifold`` (every point the same way) by ambient affine isometries.

    Args:
        group: a :class:`~qmanifold.lie.LieGroup` (its Lie-algebra basis: its generators, then its d
            translations when it has them).
        manifold: a total space from :mod:`qmanifold.manifolds` (anything with ``ambient_dim``,
            ``to_tangent``, ``random_point``, ``canonical``).
        representation: the affine fields of the basis (default: ``manifold.group_representation(group)``).

    Raises:
        ValueError: a field is not skew (not an isometry), the fields are dependent, they do not
            represent the group's Lie algebra, or they are not tangent to M -- with the offending
            generator named.
    """

    def __init__(self, group, manifold, representation: AffineRepresentation | None = None):
        if representation is None:
            if not hasattr(manifold, "group_representation"):
                raise TypeError(
                    f"{manifold!r} does not say how {group.name} acts on it; pass representation=AffineRepresentation(...)"
                )
            representation = manifold.group_representation(group)
        n = manifold.ambient_dim
        what = f"{group.name} on {manifold.name}"
        linear = [as_sympy_matrix(a, n, f"linear part {i} of {what}") for i, a in enumerate(representation.linear)]
        offset = []
        for i, b in enumerate(representation.offset):
            b = sympy.Matrix(b)
            if b.shape not in ((n, 1), (1, n)):
                raise ValueError(f"offset {i} of {what} has shape {b.shape}, expected ({n}, 1)")
            offset.append(b.reshape(n, 1))
        k = group.algebra_dim
        if len(linear) != k or len(offset) != k:
            raise ValueError(
                f"{what}: {len(linear)} linear parts and {len(offset)} offsets for a group of dimension {k} "
                "(one per generator, then one per translation)"
            )
        for i, a in enumerate(linear):
            if a + a.T != sympy.zeros(n, n):
                raise ValueError(f"{what}: field {i} has a non-skew linear part: the action is not an isometry")
        aug = [_augmented(a, b) for a, b in zip(linear, offset)]
        if sympy.Matrix([list(m) for m in aug]).rank() < k:
            raise ValueError(
                f"{what}: the fundamental fields are linearly dependent (some direction of the group acts "
                "trivially on M); use a ProductManifold on which the whole group acts, or a smaller group"
            )
        self._check_homomorphism(group, aug, what)
        self.group = group
        self.manifold = manifold
        self.name = what
        self.ambient_dim = n
        self.algebra_dim = k
        self.linear = tuple(linear)
        self.offset = tuple(offset)
        self.represent = representation.represent
        self.wrap = representation.wrap
        # exact coefficients of the Gram matrix as a polynomial in the moments
        self.gram_quadratic = [[(la.T * lb + lb.T * la) / 2 for lb in linear] for la in linear]
        self.gram_linear = [[la.T * ob + lb.T * oa for lb, ob in zip(linear, offset)] for la, oa in zip(linear, offset)]
        self.gram_constant = sympy.Matrix(k, k, lambda a, b: (offset[a].T * offset[b])[0, 0])
        self._cache: dict = {}
        self._check_tangent(what)

    # -- declaration checks ---------------------------------------------------------------------

    @staticmethod
    def _check_homomorphism(group, aug, what):
        own = _group_augmented(group)
        for a in range(len(own)):
            for b in range(a + 1, len(own)):
                coef = _coefficients(own, own[a] * own[b] - own[b] * own[a])
                if coef is None:  # pragma: no cover - LieGroup checks closure already
                    raise ValueError(f"{group.name}: generators {a} and {b} do not close")
                expected = sum((c * m for c, m in zip(coef, aug)), sympy.zeros(*aug[0].shape))
                if aug[a] * aug[b] - aug[b] * aug[a] != expected:
                    raise ValueError(
                        f"{what}: the fields of basis elements {a} and {b} do not have the group's commutator "
                        f"(structure constants {coef}); the declared action does not represent {group.name}"
                    )

    def _check_tangent(self, what):
        gen = torch.Generator().manual_seed(0)
        x = self.manifold.random_point((1, 16), generator=gen, dtype=torch.float64)
        on = self.manifold.residual(x) < 1e-8  # points the (generic) projection did bring onto M
        if not bool(on.any()):
            raise ValueError(
                f"{what}: could not draw points of {self.manifold.name} to check the action (the projection of "
                "Gaussian points did not converge); declare the manifold with random_point=..."
            )
        x = x[on].unsqueeze(0)
        fields = self.fundamental_fields(x)  # (1, k, N, n)
        tangent = self.manifold.to_tangent(fields, x.unsqueeze(-3).expand_as(fields))
        err = (fields - tangent).abs().amax((0, 2, 3))
        bad = [i for i, e in enumerate(err.tolist()) if e > 1e-8 * (1 + float(fields.abs().max()))]
        if bad:
            raise ValueError(
                f"{what}: the fundamental field(s) {bad} are not tangent to {self.manifold.name} (normal part up to "
                f"{float(err.max()):.3g}): the declared action does not preserve the manifold"
            )

    # -- symbolic and lowered forms ---------------------------------------------------------------

    def gram_expression(self) -> sympy.Matrix:
        """The Gram matrix as exact polynomials in the moments ``S_ij``, ``m_i`` and ``N`` (k x k)."""
        n, k = self.ambient_dim, self.algebra_dim
        s = sympy.Matrix(n, n, lambda i, j: sympy.Symbol(f"S_{min(i, j)}{max(i, j)}", real=True))
        m = sympy.Matrix(sympy.symbols(f"m0:{n}", real=True))
        count = sympy.Symbol("N", positive=True)
        return sympy.Matrix(k, k, lambda a, b: sympy.expand(
            sum(self.gram_quadratic[a][b][i, j] * s[i, j] for i in range(n) for j in range(n))
            + (self.gram_linear[a][b].T * m)[0, 0] + count * self.gram_constant[a, b]))

    def lowered(self, dtype: torch.dtype, device) -> LoweredAction:
        """Coefficient tensors in ``dtype`` on ``device`` (built once, then cached)."""
        key = (dtype, torch.device(device))
        low = self._cache.get(key)
        if low is None:
            def t(x):
                return torch.tensor(x, dtype=dtype, device=device)

            n, k = self.ambient_dim, self.algebra_dim
            low = LoweredAction(
                linear=t([[[float(e) for e in row] for row in a.tolist()] for a in self.linear]).reshape(k, n, n),
                offset=t([[float(e) for e in b] for b in self.offset]).reshape(k, n),
                gram_quadratic=t([[[[float(e) for e in row] for row in q.tolist()] for q in qa]
                                  for qa in self.gram_quadratic]).reshape(k, k, n, n),
                gram_linear=t([[[float(e) for e in lab] for lab in la] for la in self.gram_linear]).reshape(k, k, n),
                gram_constant=t([[float(e) for e in row] for row in self.gram_constant.tolist()]).reshape(k, k),
            )
            self._cache[key] = low
        return low

    # -- fields, Gram matrix, momentum --------------------------------------------------------------

    def fundamental_fields(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``xi_a(x)_n = A_a x_n + b_a``: ``(..., N, n) -> (..., k, N, n)`` (zero at padding)."""
        low = self.lowered(x.dtype, x.device)
        fields = torch.einsum("aij,...nj->...ani", low.linear, x) + low.offset[:, None, :]
        if mask is not None:
            fields = torch.where(mask[..., None, :, None], fields, torch.zeros((), dtype=x.dtype, device=x.device))
        return fields

    def infinitesimal_action(self, omega: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``sum_a omega_a xi_a(x)``: ``(..., k), (..., N, n) -> (..., N, n)``."""
        low = self.lowered(x.dtype, x.device)
        a = torch.einsum("...a,aij->...ij", omega, low.linear)
        b = torch.einsum("...a,ai->...i", omega, low.offset)
        return apply_mask(x @ a.transpose(-1, -2) + b.unsqueeze(-2), mask)

    def gram_matrix(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Unregularised ``Gram_ab = sum_n <xi_a(x_n), xi_b(x_n)>`` over real points: ``(..., k, k)``."""
        low = self.lowered(x.dtype, x.device)
        xm = apply_mask(x, mask)
        s = xm.transpose(-1, -2) @ xm
        m = xm.sum(-2)
        count = count_points(x, mask)
        return (torch.einsum("abij,...ij->...ab", low.gram_quadratic, s)
                + torch.einsum("abi,...i->...ab", low.gram_linear, m)
                + count[..., None, None] * low.gram_constant)

    def momentum(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``J_a = sum_n <xi_a(x_n), v_n>`` over real points: ``(..., k)``."""
        low = self.lowered(x.dtype, x.device)
        vm = apply_mask(v, mask)
        cross = vm.transpose(-1, -2) @ apply_mask(x, mask)  # V_ij = sum_n v_ni x_nj
        return torch.einsum("aij,...ij->...a", low.linear, cross) + torch.einsum("ai,...i->...a", low.offset, vm.sum(-2))

    def _chol(self, x, mask):
        chol, _ = torch.linalg.cholesky_ex(regularized_gram(self.gram_matrix(x, mask)))
        return chol

    # -- bundle geometry ------------------------------------------------------------------------------

    def vertical_coefficients(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``omega = Gram_reg^-1 J(x, P^M_x v)``: the vertical part of v is ``sum_a omega_a xi_a(x)``."""
        vt = self.manifold.to_tangent(v, x, mask)
        return torch.cholesky_solve(self.momentum(vt, x, mask).unsqueeze(-1), self._chol(x, mask)).squeeze(-1)

    def horizontal_projection(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``P_x(v) = v_T - sum_a omega_a xi_a(x)`` (``v_T``: v projected onto ``T_x M``): ``(..., N, n)``."""
        vt = self.manifold.to_tangent(v, x, mask)
        omega = torch.cholesky_solve(self.momentum(vt, x, mask).unsqueeze(-1), self._chol(x, mask)).squeeze(-1)
        return apply_mask(vt - self.infinitesimal_action(omega, x), mask)

    def vertical_projection(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``sum_a omega_a xi_a(x)``: the part of ``P^M_x v`` tangent to the orbit: ``(..., N, n)``."""
        return self.infinitesimal_action(self.vertical_coefficients(v, x, mask), x, mask)

    def log_det_gram(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``log det Gram_reg(x)``: ``(...,)``."""
        chol = self._chol(x, mask)
        return 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)

    def log_orbit_volume(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``log vol(G x) = 1/2 log det Gram(x)`` up to an additive constant: ``(...,)``."""
        return 0.5 * self.log_det_gram(x, mask)

    def mean_curvature(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Lifted mean curvature of the orbits ``h = -grad_M log vol(G x)``: ``(..., N, n)``, horizontal.

        ``h_n = -P^M_{x_n}(Mq x_n + u)`` with ``Mq = sum_ab W_ab Q_ab``, ``u = 1/2 sum_ab W_ab l_ab`` and
        ``W = d log det Gram_reg / d Gram`` (regulariser included, as in the flat core).
        """
        low = self.lowered(x.dtype, x.device)
        k = self.algebra_dim
        c, _ = regularization(x.dtype)
        inverse = torch.cholesky_inverse(self._chol(x, mask))
        trace = torch.diagonal(inverse, dim1=-2, dim2=-1).sum(-1)
        eye = torch.eye(k, dtype=x.dtype, device=x.device)
        weight = inverse + (c / k) * trace[..., None, None] * eye
        mq = torch.einsum("...ab,abij->...ij", weight, low.gram_quadratic)
        u = 0.5 * torch.einsum("...ab,abi->...i", weight, low.gram_linear)
        grad = x @ mq.transpose(-1, -2) + u.unsqueeze(-2)
        return -self.manifold.to_tangent(apply_mask(grad, mask), x, mask)

    def conditioning(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Per-sample ``lambda_min / lambda_max`` of Gram (0 where the orbit is degenerate): ``(...,)``."""
        gram = self.gram_matrix(x, mask)
        finite = torch.isfinite(gram).all(-1).all(-1)
        gram = torch.where(finite[..., None, None], gram, torch.zeros((), dtype=gram.dtype, device=gram.device))
        eig = torch.linalg.eigvalsh(gram)
        _, floor = regularization(x.dtype)
        ratio = eig[..., 0].clamp_min(0.0) / eig[..., -1].clamp_min(floor)
        return torch.where(finite, ratio, torch.full((), float("nan"), dtype=ratio.dtype, device=ratio.device))

    # -- translations ---------------------------------------------------------------------------------

    def translation_projector(self, dtype: torch.dtype, device) -> torch.Tensor | None:
        """``Pi = B^T (B B^T)^-1 B`` (n x n) with B the offsets ``b_a`` of the pure translations (fields
        with ``A_a = 0``), or None when the group has none. Exact (sympy), lowered and cached."""
        key = ("translations", dtype, torch.device(device))
        if key not in self._cache:
            rows = [b.T for a, b in zip(self.linear, self.offset) if a == sympy.zeros(*a.shape) and b != sympy.zeros(*b.shape)]
            proj = None
            if rows:
                b = sympy.Matrix.vstack(*rows)
                exact = b.T * (b * b.T).inv() * b
                proj = torch.tensor([[float(e) for e in row] for row in exact.tolist()], dtype=dtype, device=device)
            self._cache[key] = proj
        return self._cache[key]

    def center(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Remove the mean over real points of the translated coordinates: ``x_n - Pi mean_m(x_m)``
        (:meth:`translation_projector`; the identity, masked, without translations): ``(..., N, n)``.

        On points of M (e.g. the translations of SE(3) frames) this picks the representative with its
        centre at the origin; on tangent vectors it removes their translational (vertical) part.
        """
        proj = self.translation_projector(x.dtype, x.device)
        if proj is None:
            return apply_mask(x, mask)
        xm = apply_mask(x, mask)
        mean = xm.sum(-2) / count_points(x, mask).clamp_min(1.0).unsqueeze(-1)
        return apply_mask(x - (mean @ proj.T).unsqueeze(-2), mask)

    # -- group elements ---------------------------------------------------------------------------

    def _finish(self, y, mask):
        if self.wrap is not None:
            y = self.wrap(y)
        return apply_mask(y, mask)

    def ambient_map(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        """The ambient affine map ``(A(g) (..., n, n), b(g) (..., n))`` of a group element."""
        if self.represent is None:
            raise NotImplementedError(f"{self.name}: no representation of group elements declared; use act_exp")
        if isinstance(g, torch.Tensor):
            g = GroupElement(g, None)
        return self.represent(g)

    def act(self, g, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``x_n -> A(g) x_n + b(g)`` for a group element ``g`` (a GroupElement or a matrix)."""
        a, b = self.ambient_map(g)
        return self._finish(x @ a.transpose(-1, -2) + b.unsqueeze(-2), mask)

    def act_on_vectors(self, g, v: torch.Tensor, mask=None) -> torch.Tensor:
        """The differential of the action on tangent vectors: ``v_n -> A(g) v_n``."""
        a, _ = self.ambient_map(g)
        return apply_mask(v @ a.transpose(-1, -2), mask)

    def exp_ambient(self, coefficients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ambient affine map of ``exp(sum_a c_a X_a)``: matrix exponential of the augmented fields."""
        low = self.lowered(coefficients.dtype, coefficients.device)
        n = self.ambient_dim
        top = torch.cat([torch.einsum("...a,aij->...ij", coefficients, low.linear),
                         torch.einsum("...a,ai->...i", coefficients, low.offset).unsqueeze(-1)], -1)
        aug = torch.cat([top, torch.zeros(*coefficients.shape[:-1], 1, n + 1, dtype=top.dtype, device=top.device)], -2)
        e = torch.linalg.matrix_exp(aug)
        return e[..., :n, :n], e[..., :n, n]

    def act_exp(self, coefficients: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Act with ``exp(sum_a c_a X_a)`` (Lie-algebra coefficients ``(..., k)``): needs no declared
        representation of group elements."""
        a, b = self.exp_ambient(coefficients)
        return self._finish(x @ a.transpose(-1, -2) + b.unsqueeze(-2), mask)

    def group_element(self, coefficients: torch.Tensor) -> GroupElement:
        """The group element ``exp(sum_a c_a X_a)`` in the group's own form (matrix, translation)."""
        mats = [torch.tensor([[float(e) for e in row] for row in m.tolist()], dtype=coefficients.dtype,
                             device=coefficients.device) for m in _group_augmented(self.group)]
        aug = torch.einsum("...a,aij->...ij", coefficients, torch.stack(mats))
        e = torch.linalg.matrix_exp(aug)
        d = self.group.point_dim
        return GroupElement(e[..., :d, :d], e[..., :d, d] if getattr(self.group, "translations", False) else None)

    def random_element(self, batch_shape=(), **kwargs) -> GroupElement:
        return self.group.random_element(batch_shape, **kwargs)

    def __repr__(self) -> str:
        return f"ManifoldAction({self.group.name!r}, {self.manifold!r})"
