"""Total spaces M on which the groups act.

The bundle and the samplers only use this interface (inner product, tangent projection,
retraction, random point), so that a curved total space (spheres, SE(3)^N frames, Stiefel
manifolds) is an addition, not a rewrite. A configuration is ``x`` of shape ``(..., N, n)``: N
points, each with n ambient coordinates, optional bool ``mask`` ``(..., N)``; outputs are zero at
padded points.

* :class:`Euclidean` -- N points in R^d, the flat configuration space (the flat case of every
  group; its original methods are unchanged).
* :class:`qmanifold.manifold_symbolic.EmbeddedManifold` -- declared by sympy constraints; its
  tangent projection, retraction, embedding curvature (Itô drift) and volume density are derived.
* Ready-made, with closed forms (tested against the derived geometry and against geomstats):
  :class:`Sphere` (S^dim per point, in R^{dim+1}), :class:`Torus` (k angles per point, flat),
  :class:`SO3Frames` (a rotation matrix per point, row-major in R^9), :class:`SE3Frames`
  (rotation + translation per residue, R^12 = R^9 x R^3), and :class:`ProductManifold` of factors.

Metric: every manifold here carries the metric induced by the Euclidean one of its ambient
coordinates (``<u, v> = sum_n <u_n, v_n>``): the round metric on spheres, the Frobenius metric
``tr(U^T V)`` on rotation matrices (twice the metric with ``|omega|^2`` for an angular velocity
``omega``), the flat metric on angles. Each ready-made manifold knows how the natural groups act on
it (:meth:`group_representation`); :mod:`qmanifold.curved` derives the bundle geometry from that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sympy
import torch

from .lie import haar_so3
from .manifold_symbolic import (
    AffineRepresentation,
    EmbeddedManifold,
    Manifold,
    coordinates,
    linear_representation,
)
from .masking import apply_mask

__all__ = [
    "Euclidean",
    "Manifold",
    "EmbeddedManifold",
    "Sphere",
    "Torus",
    "SO3Frames",
    "SE3Frames",
    "ProductManifold",
    "hat",
    "vee",
    "so3_exp",
    "so3_log",
]


def _zeros_like_points(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)


def _masked_point_sum(values: torch.Tensor, mask) -> torch.Tensor:
    """Sum of per-point values ``(..., N) -> (...,)`` over real points."""
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.sum(-1)


class Euclidean:
    """Configurations of N points in R^d, shape ``(..., N, d)``, with the flat metric.

    Padded points (``mask`` False) carry no mass: they are excluded from inner products and stay
    at zero under every operation.
    """

    has_exact_exp = True
    has_log = True

    def __init__(self, point_dim: int):
        self.point_dim = point_dim

    def inner(self, u: torch.Tensor, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        """``<u, v>_x = sum_n <u_n, v_n>`` over real points: ``(...,)``."""
        return (apply_mask(u, mask) * v).sum((-2, -1))

    def norm(self, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        return self.inner(v, v, x, mask).clamp_min(0).sqrt()

    def to_tangent(self, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        """Projection onto ``T_x M``: the identity (padding zeroed)."""
        return apply_mask(v, mask)

    def retract(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """Exponential map ``x + v`` (padding zeroed)."""
        return apply_mask(x + v, mask)

    exp = retract

    def random_normal(self, shape, *, generator=None, dtype=torch.float32, device="cpu", mask=None) -> torch.Tensor:
        """Standard Gaussian tangent vectors / points of shape ``shape`` (padding zeroed)."""
        return apply_mask(torch.randn(shape, generator=generator, dtype=dtype, device=device), mask)

    def __repr__(self) -> str:
        return f"Euclidean(point_dim={self.point_dim})"

    # -- the manifold interface shared with the curved total spaces (additions) ----------------

    @property
    def name(self) -> str:
        return f"R^{self.point_dim}"

    @property
    def ambient_dim(self) -> int:
        return self.point_dim

    @property
    def dim(self) -> int:
        return self.point_dim

    def log(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        """``y - x`` (padding zeroed)."""
        return apply_mask(y - x, mask)

    def project(self, y: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(y, mask)

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def residual(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.point_dim, dtype=x.dtype, device=x.device)
        return eye.expand(*x.shape[:-1], self.point_dim, self.point_dim)

    tangent_basis = tangent_projector

    def random_point(self, shape, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Standard Gaussian points ``(*shape, d)`` (R^d has no uniform law)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return torch.randn((*shape, self.point_dim), generator=generator, dtype=dtype, device=device)

    def random_tangent(self, x: torch.Tensor, *, generator=None, mask=None) -> torch.Tensor:
        return self.random_normal(x.shape, generator=generator, dtype=x.dtype, device=x.device, mask=mask)

    def mean_curvature_vector(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """0: R^d is flat and not curved inside its ambient space."""
        return torch.zeros_like(x)

    ito_drift = mean_curvature_vector

    def brownian_increment(self, x: torch.Tensor, dt, noise=None, *, generator=None, mask=None):
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return apply_mask(noise, mask) * dt ** 0.5

    def brownian_step(self, x: torch.Tensor, dt, noise=None, *, generator=None, mask=None):
        return self.retract(x, self.brownian_increment(x, dt, noise, generator=generator, mask=mask), mask)

    def log_volume_density(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        """0: ``v -> x + v`` preserves volume."""
        return _zeros_like_points(x)

    def group_representation(self, group) -> AffineRepresentation:
        """The group's own action ``x_n -> A x_n + b`` (translations included)."""
        return linear_representation(group, self.point_dim, translations="shift", name=self.name)


# ---------------------------------------------------------------------------------------------
# Spheres


class Sphere(EmbeddedManifold):
    """The unit sphere ``S^dim = {y in R^{dim+1} : |y|^2 = 1}`` per point: shape ``(..., N, dim+1)``.

    Declared by its constraint (so the derived geometry of :class:`EmbeddedManifold` is available and
    tested against) with closed forms for the round metric:

    * ``P_x(v) = v - <x, v> x``; projection ``y / |y|``;
    * ``exp_x(v) = cos|v| x + sin|v| v / |v|``; ``log_x(y) = theta u / sin theta`` with
      ``u = y - <x, y> x``, ``theta = atan2(|u|, <x, y>)`` (undefined only at the antipode);
    * embedding mean curvature ``H = -dim x``, Itô drift of Brownian motion ``-(dim/2) x``;
    * ``log |det d exp_x(v)| = (dim - 1) log(sin r / r)``, ``r = |v|``; total volume
      ``2 pi^{(dim+1)/2} / Gamma((dim+1)/2)``.

    SO(d+1) (``point_dim == dim + 1``) acts by rotating every point; translations, when the group
    has them, act trivially (directions do not move under translations).
    """

    has_exact_exp = True
    has_log = True

    def __init__(self, dim: int):
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Sphere(dim) needs a positive integer dim, got {dim!r}")
        xs = coordinates(dim + 1)
        super().__init__(f"S^{dim}", dim + 1, [sum(c * c for c in xs) - 1], coords=xs)

    def __repr__(self) -> str:
        return f"Sphere({self.dim})"

    def to_tangent(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        """``v - <x, v> x / |x|^2``: on the sphere ``v - <x, v> x``; off it still an orthogonal
        projection (so an ambient Euler-Maruyama scheme drifting off S^dim stays stable)."""
        xx = x.square().sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return apply_mask(v - (x * v).sum(-1, keepdim=True) / xx * x, mask)

    def project(self, y: torch.Tensor, mask=None) -> torch.Tensor:
        r = y.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
        return apply_mask(y / r, mask)

    def exp(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        r = _safe_norm(v)
        return apply_mask(torch.cos(r) * x + torch.sinc(r / math.pi) * v, mask)

    def log(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        c = (x * y).sum(-1, keepdim=True)
        u = y - c * x
        theta = torch.atan2(_safe_norm(u), c)
        return apply_mask(u / torch.sinc(theta / math.pi), mask)

    def dist(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        """Geodesic distance ``sqrt(sum_n theta_n^2)``: ``(...,)``."""
        return self.norm(self.log(x, y, mask), x, mask)

    def mean_curvature_vector(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(-self.dim * x, mask)

    def random_point(self, shape, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Uniform points (normalised standard Gaussians)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.project(torch.randn((*shape, self.ambient_dim), generator=generator, dtype=dtype, device=device))

    def log_volume_density(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        r = _safe_norm(v).squeeze(-1)
        return _masked_point_sum((self.dim - 1) * torch.log(torch.sinc(r / math.pi)), mask)

    @property
    def log_volume(self) -> float:
        """``log vol(S^dim)`` of one point's sphere (the uniform law has density ``exp(-log_volume)``)."""
        k = self.dim + 1
        return math.log(2.0) + 0.5 * k * math.log(math.pi) - math.lgamma(0.5 * k)

    def group_representation(self, group) -> AffineRepresentation:
        return linear_representation(group, self.ambient_dim, translations="trivial", name=self.name)


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    """``|v|`` over the last axis, keepdim, with a finite gradient at 0 (``sqrt(max(|v|^2, tiny))``)."""
    return v.square().sum(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny).sqrt()


# ---------------------------------------------------------------------------------------------
# Tori of angles


def _wrap(a: torch.Tensor) -> torch.Tensor:
    """Angles to ``[-pi, pi)``."""
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


class Torus(Manifold):
    """The flat torus of k angles per point, ``(R / 2 pi Z)^k``: shape ``(..., N, k)``, angles in [-pi, pi).

    Flat: the tangent projection is the identity, ``exp_x(v) = wrap(x + v)``,
    ``log_x(y) = wrap(y - x)`` (the shortest representative), Brownian motion has no drift, the exp
    map preserves volume, and the total volume is ``(2 pi)^k`` per point.

    Groups acting (:meth:`group_representation`): a one-parameter group of phases on R^2 (SO(2), or
    a torus of one phase) shifts every angle by its phase -- the global phase shift; a torus of k
    phases on C^k = R^{2k} (``qmanifold.groups.Torus(k)``) shifts angle j by the phase of plane j.
    """

    has_exact_exp = True
    has_log = True

    def __init__(self, k: int):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"Torus(k) needs a positive integer k, got {k!r}")
        self.k = k
        self.ambient_dim = k
        self.dim = k
        self.name = f"T^{k}"

    def __repr__(self) -> str:
        return f"Torus({self.k})"

    def to_tangent(self, v: torch.Tensor, x=None, mask=None) -> torch.Tensor:
        return apply_mask(v, mask)

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        return _wrap(x)

    def project(self, y: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(_wrap(y), mask)

    def exp(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(_wrap(x + v), mask)

    retract = exp

    def log(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(_wrap(y - x), mask)

    def residual(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)

    def tangent_projector(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(self.k, dtype=x.dtype, device=x.device)
        return eye.expand(*x.shape[:-1], self.k, self.k)

    tangent_basis = tangent_projector

    def random_point(self, shape, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Uniform angles in [-pi, pi)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        u = torch.rand((*shape, self.k), generator=generator, dtype=dtype, device=device)
        return (2 * u - 1) * math.pi

    def mean_curvature_vector(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return torch.zeros_like(x)

    def log_volume_density(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return _zeros_like_points(x)

    @property
    def log_volume(self) -> float:
        return self.k * math.log(2 * math.pi)

    def group_representation(self, group) -> AffineRepresentation:
        if getattr(group, "translations", False):
            raise ValueError(f"{group.name} has translations; a torus of angles is acted on by phases only")
        gens = [sympy.Matrix(a) for a in group.generators]
        d, k = group.point_dim, self.k
        if d == 2 and len(gens) == 1:
            weight = gens[0][1, 0]
            if gens[0] != weight * sympy.Matrix([[0, -1], [1, 0]]) or abs(weight) != 1:
                raise ValueError(f"{group.name}: a global phase needs the generator +-[[0, -1], [1, 0]]")
            offsets = [sympy.Matrix([weight] * k)]
            planes = [0] * k
        elif d == 2 * k:
            offsets = []
            for a, g in enumerate(gens):
                w = [g[2 * p + 1, 2 * p] for p in range(k)]
                expected = sympy.diag(*[w[p] * sympy.Matrix([[0, -1], [1, 0]]) for p in range(k)])
                if g != expected or any(abs(e) > 1 for e in w):
                    raise ValueError(
                        f"{group.name}: generator {a} is not a rotation of the coordinate planes (2j, 2j+1) with "
                        "weights in {-1, 0, 1}; it does not act on the angles as phase shifts"
                    )
                offsets.append(sympy.Matrix(w))
            planes = list(range(k))
        else:
            raise ValueError(
                f"{group.name} (on R^{d}, {len(gens)} generators) does not act on {self.name}: use a one-phase "
                f"group on R^2 (global phase shift) or a torus of {k} phases on R^{2 * k}"
            )

        def represent(g):
            a = g.matrix if not isinstance(g, torch.Tensor) else g
            angles = torch.stack([torch.atan2(a[..., 2 * p + 1, 2 * p], a[..., 2 * p, 2 * p]) for p in planes], -1)
            eye = torch.eye(k, dtype=a.dtype, device=a.device).expand(*a.shape[:-2], k, k)
            return eye, angles

        return AffineRepresentation(
            tuple(sympy.zeros(k, k) for _ in gens), tuple(offsets), represent, wrap=_wrap
        )


# ---------------------------------------------------------------------------------------------
# Rotation frames


def hat(omega: torch.Tensor) -> torch.Tensor:
    """``(..., 3) -> (..., 3, 3)``, ``hat(omega) u = omega x u`` (= sum_a omega_a L_a)."""
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack(
        [torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1), torch.stack([-y, x, zero], -1)], -2
    )


def vee(m: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hat` on the skew part: ``(..., 3, 3) -> (..., 3)``."""
    return 0.5 * torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues: ``exp(hat(omega)) = I + sin t / t W + (1 - cos t) / t^2 W^2``, ``t = |omega|``: ``(..., 3, 3)``."""
    t = _safe_norm(omega)[..., None]  # (..., 1, 1)
    w = hat(omega)
    a = torch.sinc(t / math.pi)
    b = 0.5 * torch.sinc(t / (2 * math.pi)) ** 2
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device)
    return eye + a * w + b * (w @ w)


def _matrix_to_quaternion(r: torch.Tensor) -> torch.Tensor:
    """Unit quaternion ``(w, x, y, z)`` with ``w >= 0`` of a rotation matrix (Shepperd's method, branch-free)."""
    r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    t = torch.stack([1 + r00 + r11 + r22, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22], -1)
    cands = torch.stack(
        [
            torch.stack([t[..., 0], r21 - r12, r02 - r20, r10 - r01], -1),
            torch.stack([r21 - r12, t[..., 1], r10 + r01, r02 + r20], -1),
            torch.stack([r02 - r20, r10 + r01, t[..., 2], r21 + r12], -1),
            torch.stack([r10 - r01, r02 + r20, r21 + r12, t[..., 3]], -1),
        ],
        -2,
    )  # (..., 4 candidates, 4)
    cands = cands / (2 * t.clamp_min(torch.finfo(r.dtype).tiny).sqrt()).unsqueeze(-1)
    best = t.argmax(-1)
    q = cands.gather(-2, best[..., None, None].expand(*best.shape, 1, 4)).squeeze(-2)
    sign = torch.where(q[..., :1] < 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def so3_log(r: torch.Tensor) -> torch.Tensor:
    """Rotation vector ``omega`` with ``so3_exp(omega) = r`` and ``|omega| <= pi``: ``(..., 3, 3) -> (..., 3)``.

    Through the quaternion (stable near 0 and near pi): ``theta = 2 atan2(|q_v|, w)``,
    ``omega = theta q_v / |q_v|`` (``-> 2 q_v / w`` as ``q_v -> 0``; ``|q_v|`` is floored at
    ``sqrt(tiny)``, so the identity gives 0).
    """
    q = _matrix_to_quaternion(r)
    w, qv = q[..., :1], q[..., 1:]
    s = _safe_norm(qv)
    theta = 2 * torch.atan2(s, w)  # atan2 is accurate for tiny s, so theta / s -> 2 / w without cancellation
    return (theta / s) * qv


def _kron_identity(a: torch.Tensor) -> torch.Tensor:
    """``kron(A, I_3)`` of ``(..., 3, 3)``: the action ``R -> A R`` on row-major ``vec(R)``: ``(..., 9, 9)``."""
    eye = torch.eye(3, dtype=a.dtype, device=a.device)
    return torch.einsum("...ik,jl->...ijkl", a, eye).reshape(*a.shape[:-2], 9, 9)


class SO3Frames(EmbeddedManifold):
    """A rotation matrix per point, row-major in R^9: shape ``(..., N, 9)`` (``x.unflatten(-1, (3, 3))``).

    Declared by the constraints ``R^T R = I`` (6 of them; the generic derivation is tested against
    the closed forms); metric: Frobenius ``tr(U^T V)``, bi-invariant. Closed forms:

    * ``P_R(V) = R skew(R^T V)``; projection: the closest rotation (SVD, det fixed to +1);
    * ``exp_R(V) = R Exp(R^T V)`` (Rodrigues), ``log_R(S) = R Log(R^T S)`` (via quaternions);
    * embedding mean curvature ``H = -R`` (SO(3) is minimal in the sphere of radius sqrt 3 in R^9), so
      the Itô drift of Brownian motion is ``-R/2`` and ``E[R_t] = e^{-t/2} R_0``;
    * ``log |det d exp_R(V)| = log(2 (1 - cos t) / t^2)`` with t the rotation angle of ``R^T V``; total
      volume ``16 sqrt 2 pi^2`` (``8 pi^2`` for the metric ``|omega|^2``, times ``2^{3/2}``).

    Rotation groups on R^3 act by left multiplication ``R -> Q R`` (``vec -> kron(Q, I) vec``);
    translations, when the group has them, act trivially on the rotations.
    """

    has_exact_exp = True
    has_log = True

    def __init__(self):
        r = coordinates(9, "r")
        mat = sympy.Matrix(3, 3, r)
        gram = mat.T * mat - sympy.eye(3)
        constraints = [gram[i, j] for i in range(3) for j in range(i, 3)]
        super().__init__("SO(3) frames", 9, constraints, coords=r)

    def __repr__(self) -> str:
        return "SO3Frames()"

    @staticmethod
    def matrices(x: torch.Tensor) -> torch.Tensor:
        """``(..., 9) -> (..., 3, 3)``."""
        return x.unflatten(-1, (3, 3))

    @staticmethod
    def flatten(r: torch.Tensor) -> torch.Tensor:
        """``(..., 3, 3) -> (..., 9)``."""
        return r.flatten(-2)

    def to_tangent(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        r, u = self.matrices(x), self.matrices(v)
        a = r.transpose(-1, -2) @ u
        return apply_mask(self.flatten(r @ (0.5 * (a - a.transpose(-1, -2)))), mask)

    def project(self, y: torch.Tensor, mask=None) -> torch.Tensor:
        m = self.matrices(y)
        u, _, vh = torch.linalg.svd(m)
        det = torch.linalg.det(u @ vh)
        fix = torch.ones(*det.shape, 3, dtype=y.dtype, device=y.device)
        fix = torch.cat([fix[..., :2], torch.where(det < 0, -1.0, 1.0).to(y.dtype).unsqueeze(-1)], -1)
        return apply_mask(self.flatten((u * fix.unsqueeze(-2)) @ vh), mask)

    def exp(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        r = self.matrices(x)
        omega = vee(r.transpose(-1, -2) @ self.matrices(v))
        return apply_mask(self.flatten(r @ so3_exp(omega)), mask)

    def log(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        r = self.matrices(x)
        omega = so3_log(r.transpose(-1, -2) @ self.matrices(y))
        return apply_mask(self.flatten(r @ hat(omega)), mask)

    def mean_curvature_vector(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return apply_mask(-x, mask)

    def random_point(self, shape, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Haar-uniform rotations (normalised Gaussian quaternions)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self.flatten(haar_so3(shape, generator, dtype, device))

    def log_volume_density(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        omega = vee(self.matrices(x).transpose(-1, -2) @ self.matrices(v))
        t = _safe_norm(omega).squeeze(-1)
        return _masked_point_sum(2 * torch.log(torch.sinc(t / (2 * math.pi))), mask)

    @property
    def log_volume(self) -> float:
        return math.log(16 * math.sqrt(2) * math.pi**2)

    def group_representation(self, group) -> AffineRepresentation:
        if group.point_dim != 3:
            raise ValueError(f"{group.name} acts on R^{group.point_dim}; rotation frames are rotated by groups on R^3")
        linear = [sympy.kronecker_product(sympy.Matrix(a), sympy.eye(3)) for a in group.generators]
        offset = [sympy.zeros(9, 1) for _ in linear]
        if getattr(group, "translations", False):
            linear += [sympy.zeros(9, 9)] * 3
            offset += [sympy.zeros(9, 1)] * 3

        def represent(g):
            a = g.matrix if not isinstance(g, torch.Tensor) else g
            return _kron_identity(a), torch.zeros(*a.shape[:-2], 9, dtype=a.dtype, device=a.device)

        return AffineRepresentation(tuple(linear), tuple(offset), represent)


# ---------------------------------------------------------------------------------------------
# Products


def _block_diag(blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Batched block-diagonal matrix of ``(..., n_i, n_i)`` blocks (broadcast batch shapes)."""
    batch = torch.broadcast_shapes(*(b.shape[:-2] for b in blocks))
    sizes = [b.shape[-1] for b in blocks]
    rows = []
    for i, b in enumerate(blocks):
        parts = [
            b.expand(*batch, *b.shape[-2:]) if j == i
            else torch.zeros(*batch, b.shape[-2], sizes[j], dtype=b.dtype, device=b.device)
            for j in range(len(blocks))
        ]
        rows.append(torch.cat(parts, -1))
    return torch.cat(rows, -2)


class ProductManifold(Manifold):
    """A product of manifolds per point: coordinates concatenated, shape ``(..., N, sum n_i)``.

    The metric is the sum of the factors' metrics; tangent projection, exp, log, projection, Itô
    drift and log volume density act factor by factor (densities add). A group acts on the product
    through each factor's :meth:`group_representation` (block-diagonal fields): e.g. SE(3) on
    ``ProductManifold(SO3Frames(), Euclidean(3))`` rotates the frame and moves its origin.
    """

    def __init__(self, *factors, name: str | None = None):
        if len(factors) == 1 and isinstance(factors[0], (list, tuple)):
            factors = tuple(factors[0])
        if not factors:
            raise ValueError("ProductManifold needs at least one factor")
        self.factors = tuple(factors)
        self.sizes = [f.ambient_dim for f in factors]
        self.ambient_dim = sum(self.sizes)
        self.dim = sum(f.dim for f in factors)
        self.name = name or " x ".join(f.name for f in factors)
        self.has_exact_exp = all(getattr(f, "has_exact_exp", False) for f in factors)
        self.has_log = all(getattr(f, "has_log", False) for f in factors)

    def __repr__(self) -> str:
        return f"ProductManifold({', '.join(map(repr, self.factors))})"

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The factors' coordinates ``(..., N, n_i)``."""
        return torch.split(x, self.sizes, -1)

    def _map(self, method: str, *tensors, mask=None) -> torch.Tensor:
        parts = zip(*(self.split(t) for t in tensors))
        return apply_mask(torch.cat([getattr(f, method)(*p) for f, p in zip(self.factors, parts)], -1), mask)

    def to_tangent(self, v: torch.Tensor, x: torch.Tensor, mask=None) -> torch.Tensor:
        return self._map("to_tangent", v, x, mask=mask)

    def project(self, y: torch.Tensor, mask=None) -> torch.Tensor:
        return self._map("project", y, mask=mask)

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        return self._map("canonical", x)

    def exp(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return self._map("exp", x, v, mask=mask)

    def retract(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return self._map("retract", x, v, mask=mask)

    def log(self, x: torch.Tensor, y: torch.Tensor, mask=None) -> torch.Tensor:
        return self._map("log", x, y, mask=mask)

    def mean_curvature_vector(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        return self._map("mean_curvature_vector", x, mask=mask)

    def residual(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        res = torch.stack([f.residual(p) for f, p in zip(self.factors, self.split(x))], -1).amax(-1)
        return res if mask is None else torch.where(mask, res, torch.zeros((), dtype=res.dtype, device=res.device))

    def tangent_basis(self, x: torch.Tensor) -> torch.Tensor:
        """Block-diagonal orthonormal bases of the factors: ``(..., N, n, dim)``."""
        bases = [f.tangent_basis(p) for f, p in zip(self.factors, self.split(x))]
        rows = []
        for i, b in enumerate(bases):
            parts = [b if j == i else torch.zeros(*b.shape[:-1], o.shape[-1], dtype=b.dtype, device=b.device)
                     for j, o in enumerate(bases)]
            rows.append(torch.cat(parts, -1))
        return torch.cat(rows, -2)

    def random_point(self, shape, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        return torch.cat(
            [f.random_point(shape, generator=generator, dtype=dtype, device=device) for f in self.factors], -1
        )

    def log_volume_density(self, x: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
        return sum(f.log_volume_density(a, b, mask) for f, a, b in zip(self.factors, self.split(x), self.split(v)))

    @property
    def log_volume(self) -> float:
        """Sum of the factors' log volumes (raises if a factor is not compact)."""
        total = 0.0
        for f in self.factors:
            if not hasattr(f, "log_volume"):
                raise AttributeError(f"{f.name} has infinite volume")
            total += f.log_volume
        return total

    def group_representation(self, group) -> AffineRepresentation:
        reps = [f.group_representation(group) for f in self.factors]
        linear = tuple(sympy.diag(*[r.linear[a] for r in reps]) for a in range(len(reps[0].linear)))
        offset = tuple(sympy.Matrix.vstack(*[r.offset[a] for r in reps]) for a in range(len(reps[0].offset)))
        represent = None
        if all(r.represent is not None for r in reps):

            def represent(g):
                maps = [r.represent(g) for r in reps]
                return _block_diag([m for m, _ in maps]), torch.cat([torch.broadcast_to(b, (*m.shape[:-2], b.shape[-1]))
                                                                     for m, b in maps], -1)

        wrap = None
        if any(r.wrap is not None for r in reps):

            def wrap(x):
                return torch.cat([r.wrap(p) if r.wrap is not None else p for r, p in zip(reps, self.split(x))], -1)

        return AffineRepresentation(linear, offset, represent, wrap)


class SE3Frames(ProductManifold):
    """Rigid frames (rotation + translation of each residue): ``SO3Frames() x Euclidean(3)``,
    shape ``(..., N, 12)`` = row-major rotation (9) then translation (3).

    The product metric ``|dR|_F^2 + |dt|^2`` equals geomstats' canonical left-invariant metric of
    SE(3) (Frobenius on the 4 x 4 Lie algebra); ``exp_(R, t)(dR, dt) = (R Exp(R^T dR), t + dt)``.
    SE(3) acts on every frame by left multiplication ``(R, t) -> (Q R, Q t + b)``; SO(3) by ``Q``.
    """

    def __init__(self):
        super().__init__(SO3Frames(), Euclidean(3), name="SE(3) frames")

    def __repr__(self) -> str:
        return "SE3Frames()"

    @staticmethod
    def from_matrices(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
        """``(..., 3, 3), (..., 3) -> (..., 12)``."""
        return torch.cat([rotation.flatten(-2), translation], -1)

    @staticmethod
    def to_matrices(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., 12) -> ((..., 3, 3), (..., 3))``."""
        return x[..., :9].unflatten(-1, (3, 3)), x[..., 9:]

    @classmethod
    def to_homogeneous(cls, x: torch.Tensor, tangent: bool = False) -> torch.Tensor:
        """4 x 4 homogeneous matrices ``[[R, t], [0, 1]]`` (``[[dR, dt], [0, 0]]`` for tangent vectors)."""
        r, t = cls.to_matrices(x)
        top = torch.cat([r, t.unsqueeze(-1)], -1)
        bottom = torch.zeros(*x.shape[:-1], 1, 4, dtype=x.dtype, device=x.device)
        if not tangent:
            bottom[..., 0, 3] = 1
        return torch.cat([top, bottom], -2)

    @classmethod
    def from_homogeneous(cls, h: torch.Tensor) -> torch.Tensor:
        return cls.from_matrices(h[..., :3, :3], h[..., :3, 3])
