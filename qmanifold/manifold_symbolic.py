"""Manifolds declared by sympy constraints: the geometry of an embedded submanifold, derived and lowered.

A point of the total space is a configuration ``x`` of shape ``(..., N, n)``: N points, each on the
same submanifold ``M_1 = {y in R^n : c(y) = 0}`` of R^n given by m constraints
``c = (c_1, ..., c_m)`` (sympy expressions in the n ambient coordinates), with the metric induced
by the Euclidean one (``<u, v>_x = sum_n <u_n, v_n>``, padded points excluded). The Jacobian
``Jc`` (m x n) must have full rank m on ``M_1``; the intrinsic dimension per point is ``n - m``.

Derived once, exactly (sympy), then lowered to batched torch (:func:`qmanifold.symbolic.lower`):

* the constraint values ``c(y)``, their Jacobian ``Jc(y)`` and Hessians ``Hc_beta(y)`` (n x n);

and, from these, in batched torch with ``G = Jc Jc^T`` (m x m, solved by Cholesky):

* tangent projection ``P_y(v) = v - Jc^T G^-1 Jc v`` (orthogonal for the induced metric);
* retraction ``R_y(v) = pi(y + v)`` with ``pi`` a fixed number of Gauss-Newton steps onto the
  constraint set, ``z <- z - Jc(z)^T G(z)^-1 c(z)`` (the minimum-norm correction, along the normal
  space), unless a closed-form ``projection`` is given;
* the mean-curvature vector of the embedding (trace of the second fundamental form)
  ``H(y) = -Jc^T G^-1 t``, ``t_beta = tr(P_y Hc_beta(y))``: for a curve on M_1 with velocity u,
  ``Jc gamma'' = -(u^T Hc_beta u)_beta``, so ``II(u, u) = -Jc^T G^-1 (u^T Hc_beta u)_beta``, summed
  over an orthonormal tangent basis;
* the Itô drift of Brownian motion on M_1 seen in R^n: ``dX = P_X o dW`` (Stratonovich) is
  ``dX = P_X dW + 1/2 H(X) dt`` (Itô) -- for the unit sphere S^{n-1}, ``H = -(n-1) y``, the drift
  ``-(n-1)/2 y dt``;
* the log volume density of the exponential map / retraction (log of the Jacobian determinant of
  ``v -> exp_y(v)`` between ``T_y M_1`` and ``M_1``, both with their Riemannian volumes), by
  forward-mode autograd on an orthonormal tangent basis.

Subclasses (:class:`qmanifold.manifolds.Sphere`, :class:`qmanifold.manifolds.SO3Frames`) replace
what has a closed form (exp, log, projection, drift, density) and are tested against the derived
versions. The group side (fundamental fields, Gram matrix, projections, orbit volume, curvature) is
in :mod:`qmanifold.curved`.

Numerics: the Cholesky factorisations never raise (``cholesky_ex``) and ``G`` carries a floor
``sqrt(tiny)``, so padded points (zeros, off the manifold) give finite values that are then zeroed.
Nothing synchronises with the host or branches on data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sympy
import torch

from .masking import apply_mask
from .symbolic import lower

__all__ = ["Manifold", "EmbeddedManifold", "AffineRepresentation", "LoweredArray", "linear_representation", "coordinates"]


def coordinates(n: int, prefix: str = "x") -> tuple[sympy.Symbol, ...]:
    """The default ambient coordinate symbols ``x0, ..., x{n-1}`` (real)."""
    return tuple(sympy.symbols(f"{prefix}0:{n}", real=True))


class LoweredArray:
    """A fixed array of sympy expressions in n coordinates, lowered to one batched torch function.

    ``f(y)`` with ``y: (..., n)`` returns ``(..., *shape)``. Constant entries (e.g. the Hessians of
    quadratic constraints) are folded into one cached tensor per dtype/device; only the entries that
    depend on the coordinates are evaluated, each by its lowered function (:func:`lower`).
    """

    def __init__(self, exprs: sympy.Array | sympy.Matrix | Sequence, coords: Sequence[sympy.Symbol]):
        arr = sympy.Array(exprs)
        self.shape = tuple(arr.shape)
        self.coords = tuple(coords)
        flat = list(sympy.flatten(arr.tolist())) if arr.rank() else [arr[()]]
        self.constants = [float(e) if not (sympy.sympify(e).free_symbols & set(self.coords)) else 0.0 for e in flat]
        self.variable = [
            (i, lower(sympy.sympify(e), *self.coords))
            for i, e in enumerate(flat)
            if sympy.sympify(e).free_symbols & set(self.coords)
        ]
        extra = set().union(*(sympy.sympify(e).free_symbols for e in flat)) - set(self.coords)
        if extra:
            raise ValueError(f"expressions depend on {sorted(map(str, extra))}, not among the coordinates")
        self.size = len(flat)
        self._cache: dict = {}

    def _tensors(self, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The constant entries and the indices of the variable ones (built once per dtype/device)."""
        key = (dtype, torch.device(device))
        cached = self._cache.get(key)
        if cached is None:
            cached = (torch.tensor(self.constants, dtype=dtype, device=device),
                      torch.tensor([i for i, _ in self.variable], dtype=torch.long, device=device))
            self._cache[key] = cached
        return cached

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        batch = y.shape[:-1]
        const, index = self._tensors(y.dtype, y.device)
        out = const.expand(*batch, self.size)
        if self.variable:
            parts = y.unbind(-1)
            vals = torch.stack([f(*parts) for _, f in self.variable], -1)
            out = out + torch.zeros_like(out).index_copy(-1, index, vals)
        return out.reshape(*batch, *self.shape)


@dataclass(frozen=True)
class AffineRepresentation:
    """How a Lie group acts on the ambient coordinates of one point: ``y -> A(g) y + b(g)``.

    Attributes:
        linear: one n x n sympy matrix ``A_a`` per Lie-algebra basis element of the group, in the
            group's order (its rotation-like generators, then its d translations if it has them).
        offset: one n x 1 sympy matrix ``b_a`` per basis element. The fundamental field of basis
            element a at a point y is ``xi_a(y) = A_a y + b_a``.
        represent: ``represent(g) -> (A (..., n, n), b (..., n))``: the ambient affine map of a group
            element (a :class:`qmanifold.lie.GroupElement`), or None when only Lie-algebra
            coefficients can be acted with.
        wrap: optional canonicalisation applied after acting (e.g. wrapping angles to [-pi, pi)).
    """

    linear: tuple[sympy.Matrix, ...]
    offset: tuple[sympy.Matrix, ...]
    represent: Callable | None = None
    wrap: Callable | None = None


def _group_translations(group) -> bool:
    return bool(getattr(group, "translations", False))


def linear_representation(group, n: int, *, translations: str = "shift", name: str = "M") -> AffineRepresentation:
    """The group's own action on R^n (``point_dim == n``): ``A_a`` = its generators.

    ``translations``: ``"shift"`` -- the d translations move the point (``b_k = e_k``); ``"trivial"``
    -- they act trivially (``b_k = 0``), e.g. on directions (unit vectors) or frames' rotations.
    """
    d = group.point_dim
    if d != n:
        raise ValueError(
            f"{group.name} acts on points of dimension {d}, but the points of {name} have {n} ambient "
            f"coordinates; declare how it acts (an AffineRepresentation) or pick a matching manifold"
        )
    gens = [sympy.Matrix(a) for a in group.generators]
    linear = list(gens)
    offset = [sympy.zeros(n, 1) for _ in gens]
    if _group_translations(group):
        for k in range(d):
            linear.append(sympy.zeros(n, n))
            e = sympy.zeros(n, 1)
            if translations == "shift":
                e[k] = 1
            offset.append(e)

    def represent(g):
        a = g.matrix
        b = g.translation
        if b is None or translations != "shift":
            b = torch.zeros(*a.shape[:-2], n, dtype=a.dtype, device=a.device)
        return a, b

    return AffineRepresentation(tuple(linear), tuple(offset), represent)


def _cholesky(m: torch.Tensor) -> torch.Tensor:
    chol, _ = torch.linalg.cholesky_ex(m)
    return chol


class Manifold:
    """Base class of the total spaces: N points, each with n ambient coordinates, shape ``(..., N, n)``.

    The metric is the ambient Euclidean one restricted to the tangent spaces (embedded manifolds) or
    the flat one (angles). Subclasses provide ``to_tangent``, ``exp``, ``project``,
    ``mean_curvature_vector`` (and ``log`` where it exists); the Brownian increments, tangent
    bases and the generic log volume density are built on those here.
    """

    name = "M"
    has_exact_exp = False
    has_log = False
    ambient_dim: int
    dim: int

    @property
    def point_dim(self) -> int:
        """The last axis of a configuration (``ambient_dim``), as for :class:`qmanifold.manifolds.Euclidean`."""
        return self.ambient_dim

    def inner(self, u: torch.Tensor, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        """Induced metric ``<u, v>_x = sum_n <u_n, v_n>`` over real points: ``(...,)``."""
        return (apply_mask(u, mask) * v).sum((-2, -1))

    def norm(self, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        return self.inner(v, v, x, mask).clamp_min(0).sqrt()

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical coordinates of a point (the identity, except angles wrapped on a torus)."""
        return x

    def retract(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Retraction ``pi(x + v)`` (``v`` tangent at ``x``): ``(..., N, n)``."""
        return self.project(x + v, mask)

    def exp(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """The exponential map where it has a closed form, else the retraction (``has_exact_exp``)."""
        return self.retract(x, v, mask)

    def log(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        raise NotImplementedError(
            f"{self.name}: no closed-form logarithm for a manifold declared only by constraints; "
            "use a ready-made manifold (Sphere, SO3Frames, SE3Frames, Torus) or subclass and add one"
        )

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        """The matrix of :meth:`to_tangent` per point: ``(..., N, n, n)`` (column i = ``P e_i``)."""
        eye = torch.eye(self.ambient_dim, dtype=x.dtype, device=x.device)
        return torch.stack([self.to_tangent(eye[i].expand_as(x), x) for i in range(self.ambient_dim)], -1)

    def tangent_basis(self, x: torch.Tensor) -> torch.Tensor:
        """An orthonormal basis of ``T_{x_n} M`` per point: ``(..., N, n, dim)`` (eigenvectors of P)."""
        proj = self.tangent_projector(x)
        proj = 0.5 * (proj + proj.transpose(-1, -2))
        _, vecs = torch.linalg.eigh(proj)
        return vecs[..., self.ambient_dim - self.dim:]

    def random_tangent(self, x: torch.Tensor, *, generator=None, mask=None) -> torch.Tensor:
        """A standard Gaussian on ``T_x M`` (covariance = the tangent projector): ``(..., N, n)``."""
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.to_tangent(noise, x, mask)

    def ito_drift(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Drift of Brownian motion on M (generator ``1/2 Laplace-Beltrami``) written as an Itô SDE in
        the ambient coordinates, ``dX = P_X dW + (1/2) H(X) dt``: returns ``H(x)/2`` (H: the
        mean-curvature vector of the embedding, :meth:`mean_curvature_vector`)."""
        return 0.5 * self.mean_curvature_vector(x, mask)

    def brownian_increment(self, x: torch.Tensor, dt, noise: torch.Tensor | None = None, *, generator=None, mask=None):
        """Euler-Maruyama increment of Brownian motion on M in ambient Itô form:
        ``sqrt(dt) P_x(noise) + (1/2) H(x) dt`` (``noise`` standard normal in R^n per point)."""
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.to_tangent(noise, x, mask) * dt ** 0.5 + self.ito_drift(x, mask) * dt

    def brownian_step(self, x: torch.Tensor, dt, noise: torch.Tensor | None = None, *, generator=None, mask=None):
        """One step of the geodesic random walk ``exp_x(sqrt(dt) P_x noise)`` (retraction if no exp):
        a point of M. Its mean displacement is ``(1/2) H(x) dt + O(dt^2)``: the normal part of the
        Itô drift comes from the curvature of the step, not from an added term."""
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return self.exp(x, self.to_tangent(noise, x, mask) * dt ** 0.5, mask)

    def log_volume_density(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """``log |det d(exp_x)_v|`` summed over real points: ``(...,)``.

        The Jacobian determinant of ``v -> exp_x(v)`` (the retraction when ``has_exact_exp`` is False)
        from ``T_x M`` to M, both with their Riemannian volumes: the density of the pushforward of a
        law on the tangent space is the tangent density divided by ``exp(log_volume_density)``.
        Generic path: forward-mode autograd along an orthonormal tangent basis B,
        ``1/2 log det (W^T W)`` with ``W = d exp_x(v)[B]`` (ambient vectors tangent at exp_x(v)).
        """
        return generic_log_volume_density(self, x, v, mask)

    def group_representation(self, group) -> AffineRepresentation:
        """How ``group`` acts on the ambient coordinates of a point. Default: its own action on R^n
        (``point_dim == n``), translations shifting the point; whether that preserves M is checked by
        :class:`qmanifold.curved.ManifoldAction`. Ready-made manifolds override this."""
        return linear_representation(group, self.ambient_dim, translations="shift", name=self.name)


class EmbeddedManifold(Manifold):
    """N points, each on ``{y in R^n : c(y) = 0}``, with the induced metric; shape ``(..., N, n)``.

    Build it with :meth:`from_constraints`. Methods take a configuration ``x`` of shape
    ``(..., N, n)``, tangent vectors of the same shape and an optional bool ``mask`` ``(..., N)``;
    outputs are zero at padded points; dtype and device follow ``x``.

    Attributes:
        name, ambient_dim (n), dim (n - m, per point), constraints, coords.
        point_dim: ``ambient_dim`` (the last axis of a configuration, as for :class:`Euclidean`).
        has_exact_exp: whether :meth:`exp` is the Riemannian exponential (else a retraction).
        has_log: whether :meth:`log` exists in closed form.
    """

    def __init__(
        self,
        name: str,
        ambient_dim: int,
        constraints: Sequence,
        *,
        coords: Sequence[sympy.Symbol] | None = None,
        projection: Callable | None = None,
        random_point: Callable | None = None,
        newton_steps: int = 10,
    ):
        if not isinstance(ambient_dim, int) or ambient_dim < 1:
            raise ValueError(f"{name}: ambient_dim must be a positive integer, got {ambient_dim!r}")
        coords = tuple(coords) if coords is not None else coordinates(ambient_dim)
        if len(coords) != ambient_dim:
            raise ValueError(f"{name}: {len(coords)} coordinate symbols for ambient dimension {ambient_dim}")
        by_name = {c.name: c for c in coords}
        exprs = []
        for i, c in enumerate(constraints):
            e = sympy.sympify(c)
            # a symbol named like a coordinate but with other assumptions is that coordinate
            e = e.xreplace({s: by_name[s.name] for s in e.free_symbols if s.name in by_name and s not in coords})
            extra = e.free_symbols - set(coords)
            if extra:
                raise ValueError(
                    f"{name}: constraint {i} ({e}) depends on {sorted(map(str, extra))}, which are not among the "
                    f"ambient coordinates {[c.name for c in coords]}"
                )
            if not e.free_symbols:
                raise ValueError(f"{name}: constraint {i} ({e}) is a constant")
            exprs.append(e)
        if len(exprs) >= ambient_dim:
            raise ValueError(f"{name}: {len(exprs)} constraints in R^{ambient_dim} leave no manifold of positive dimension")
        self.name = name
        self.ambient_dim = ambient_dim
        self.coords = coords
        self.constraints = tuple(exprs)
        self.dim = ambient_dim - len(exprs)
        self.newton_steps = int(newton_steps)
        self._projection = projection
        self._random_point = random_point
        m = len(exprs)
        jac = sympy.Matrix(exprs).jacobian(coords) if m else sympy.zeros(0, ambient_dim)
        hess = [sympy.hessian(e, coords) for e in exprs]
        #: exact derivatives: the Jacobian (m x n) and the m Hessians (n x n)
        self.jacobian_expr = jac
        self.hessian_exprs = tuple(hess)
        self._c = LoweredArray(exprs, coords) if m else None
        self._jac = LoweredArray(jac.tolist(), coords) if m else None
        self._hess = LoweredArray([h.tolist() for h in hess], coords) if m else None

    @classmethod
    def from_constraints(cls, name: str, ambient_dim: int, constraints: Sequence, **kwargs) -> EmbeddedManifold:
        """Declare ``{y in R^n : c(y) = 0}`` per point from sympy constraints in ``x0, ..., x{n-1}``.

        Args:
            name: label for messages.
            ambient_dim: n.
            constraints: m sympy expressions (or strings) whose common zero set is the manifold; their
                Jacobian must have rank m on it.
            coords: optional coordinate symbols (default ``x0 .. x{n-1}``; symbols are matched by name).
            projection: optional closed-form ``projection(y) -> point`` onto the manifold, (..., n) ->
                (..., n), replacing the Gauss-Newton steps.
            random_point: optional ``random_point(shape, generator, dtype, device) -> (*shape, n)``.
            newton_steps: Gauss-Newton steps of the generic projection (fixed: no data-dependent loop).

        Example (the unit sphere S^2)::

            x0, x1, x2 = sympy.symbols("x0:3", real=True)
            S2 = EmbeddedManifold.from_constraints("S^2", 3, [x0**2 + x1**2 + x2**2 - 1])
        """
        return cls(name, ambient_dim, constraints, **kwargs)

    def __repr__(self) -> str:
        return f"EmbeddedManifold({self.name!r}, ambient_dim={self.ambient_dim}, dim={self.dim})"

    # -- constraint derivatives (lowered) -------------------------------------------------------

    def constraint(self, x: torch.Tensor) -> torch.Tensor:
        """``c(x_n)``: ``(..., N, n) -> (..., N, m)``."""
        return self._c(x)

    def constraint_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``Jc(x_n)``: ``(..., N, n) -> (..., N, m, n)``."""
        return self._jac(x)

    def constraint_hessians(self, x: torch.Tensor) -> torch.Tensor:
        """``Hc_beta(x_n)``: ``(..., N, n) -> (..., N, m, n, n)``."""
        return self._hess(x)

    def residual(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``max_beta |c_beta(x_n)|`` per point ``(..., N)``, 0 at padding: how far x is from M."""
        r = self.constraint(x).abs().amax(-1)
        return r if mask is None else torch.where(mask, r, torch.zeros((), dtype=r.dtype, device=r.device))

    def _normal_solve(self, jac: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """``Jc^T (Jc Jc^T + floor I)^-1 rhs``: jac ``(..., m, n)``, rhs ``(..., m)`` -> ``(..., n)``."""
        m = jac.shape[-2]
        floor = torch.finfo(jac.dtype).tiny ** 0.5
        gram = jac @ jac.transpose(-1, -2) + floor * torch.eye(m, dtype=jac.dtype, device=jac.device)
        coef = torch.cholesky_solve(rhs.unsqueeze(-1), _cholesky(gram))
        return (jac.transpose(-1, -2) @ coef).squeeze(-1)

    # -- tangent spaces and moves --------------------------------------------------------------

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        """``I - Jc^T (Jc Jc^T)^-1 Jc`` per point: ``(..., N, n, n)``."""
        jac = self.constraint_jacobian(x)
        m = jac.shape[-2]
        floor = torch.finfo(jac.dtype).tiny ** 0.5
        gram = jac @ jac.transpose(-1, -2) + floor * torch.eye(m, dtype=jac.dtype, device=jac.device)
        normal = jac.transpose(-1, -2) @ torch.cholesky_solve(jac, _cholesky(gram))
        return torch.eye(self.ambient_dim, dtype=x.dtype, device=x.device) - normal

    def to_tangent(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Orthogonal projection onto ``T_x M``: ``v - Jc^T (Jc Jc^T)^-1 Jc v`` per point."""
        jac = self.constraint_jacobian(x)
        return apply_mask(v - self._normal_solve(jac, (jac @ v.unsqueeze(-1)).squeeze(-1)), mask)

    # -- points and moves -----------------------------------------------------------------------

    def project(self, y: torch.Tensor, mask=None) -> torch.Tensor:
        """A point of M near ``y`` (closed form if declared, else Gauss-Newton): ``(..., N, n)``."""
        if self._projection is not None:
            return apply_mask(self._projection(y), mask)
        z = y
        for _ in range(self.newton_steps):
            z = z - self._normal_solve(self.constraint_jacobian(z), self.constraint(z))
        return apply_mask(z, mask)

    def random_point(self, shape, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Points ``(*shape, n)``: the declared sampler, else Gaussian ambient points projected on M
        (not a uniform law in general; ready-made compact manifolds sample their uniform law)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self._random_point is not None:
            return self._random_point(shape, generator, dtype, device)
        y = torch.randn((*shape, self.ambient_dim), generator=generator, dtype=dtype, device=device)
        return self.project(y)

    def mean_curvature_vector(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """Mean-curvature vector of the embedding ``H = -Jc^T G^-1 (tr(P Hc_beta))_beta``: ``(..., N, n)``.

        (The trace of the second fundamental form; for the unit sphere S^{n-1} it is ``-(n-1) x``.)
        """
        jac = self.constraint_jacobian(x)
        hess = self.constraint_hessians(x)
        proj = self.tangent_projector(x)  # (..., N, n, n)
        traces = torch.einsum("...ij,...bji->...b", proj, hess)
        return apply_mask(-self._normal_solve(jac, traces), mask)


def generic_log_volume_density(manifold, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Autograd log Jacobian of ``v -> manifold.exp(x, v)`` (see :meth:`EmbeddedManifold.log_volume_density`).

    Needs ``manifold.tangent_basis``; works for any manifold whose exp acts point by point.
    """
    basis = manifold.tangent_basis(x)  # (..., N, n, dim)
    cols = []
    with warnings.catch_warnings():  # torch's forward-mode decompositions call the deprecated torch.jit.script
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
        for j in range(basis.shape[-1]):
            _, w = torch.func.jvp(lambda u: manifold.exp(x, u), (v,), (basis[..., j],))
            cols.append(w)
    w = torch.stack(cols, -1)  # (..., N, n, dim)
    gram = w.transpose(-1, -2) @ w
    logdet = torch.linalg.slogdet(gram)[1] * 0.5
    if mask is not None:
        logdet = torch.where(mask, logdet, torch.zeros((), dtype=logdet.dtype, device=logdet.device))
    return logdet.sum(-1)
