"""The quotient Q = M/G of a configuration space by a symmetry group, as a fiber bundle M -> Q.

:class:`Quotient` is a thin object over the functional core (:mod:`qmanifold.geometry`,
:mod:`qmanifold.so3`): it validates shapes, masks and dtypes, picks the lowered coefficients for the
input's dtype and device, and dispatches to the right implementation. All methods take
configurations ``x`` of shape ``(..., N, d)`` with an optional bool ``mask`` ``(..., N)`` and return
zeros at padded points.

Reference: Xu et al., "Quotient-space diffusion models", ICLR 2026 (arXiv 2604.21809).
"""

from __future__ import annotations

import torch

from . import geometry as G
from . import kernels as _kernels
from . import so3
from ._validation import check_mask, check_points, check_same_shape, maybe_check_finite
from .discrete import DiscreteGroup, ProductGroup
from .lie import LieGroup
from .manifolds import Euclidean
from .masking import apply_mask, center

__all__ = ["Quotient"]

_BACKENDS = ("auto", "generic", "fast", "fused")


class Quotient:
    """The quotient of configurations of points in R^d by ``group``.

    Args:
        group: a :class:`~qmanifold.lie.LieGroup`, a discrete group
            (:class:`~qmanifold.discrete.Permutations`, :class:`~qmanifold.discrete.Lattice`) or a
            :class:`~qmanifold.discrete.ProductGroup` of both.
        backend: ``"auto"`` (the fused Triton kernels of :mod:`qmanifold.kernels` when Triton
            imports -- used for CUDA tensors, the torch paths below for CPU tensors --; otherwise a
            hand-written fast path where one exists: SO(3)/SE(3)), ``"generic"`` (always the
            symbolic lowering), ``"fast"`` (require a fast path) or ``"fused"`` (the fused kernels
            for CUDA tensors when Triton is available, the fast / generic torch path otherwise).
        manifold: the total space M (default: ``Euclidean(d)``, the flat configuration space). A curved
            manifold from :mod:`qmanifold.manifolds` (``Sphere``, ``SO3Frames``, ``SE3Frames``,
            ``Torus``, ``ProductManifold``, an ``EmbeddedManifold`` declared by constraints) makes the
            bundle ``M -> M/G`` of :class:`qmanifold.curved.ManifoldAction`: ``x`` is then a point of M,
            shape ``(..., N, n)`` with n the manifold's ambient coordinates per point, and
            ``horizontal_projection``, ``vertical_projection``, ``mean_curvature``,
            ``log_orbit_volume``, ``conditioning``, ``act``, ``act_on_vectors`` and
            ``random_element`` work on it (generic backend only); ``center`` removes the mean of the
            translated coordinates, and ``lift`` / ``conventional`` return a
            :class:`qmanifold.curved_diffusion.ManifoldSDE`, integrated on M by geodesic steps
            (``.integrate``). ``align`` and ``dist`` (a global alignment in M's metric) are not there yet.

    Raises:
        ValueError: the group acts by non-orthogonal matrices (the quotient metric and the lifted
            SDE need an isometric action), or ``backend`` is unknown / unavailable.
    """

    def __init__(self, group, backend: str = "auto", *, manifold=None):
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
        if isinstance(group, ProductGroup):
            lie, discrete = group.lie, group.discrete
        elif isinstance(group, LieGroup):
            lie, discrete = group, None
        elif isinstance(group, DiscreteGroup):
            lie, discrete = None, group
        else:
            raise TypeError(f"Quotient needs a LieGroup, a discrete group or a ProductGroup, got {type(group).__name__}")
        if lie is not None and not lie.is_isometric:
            raise ValueError(
                f"{lie.name} acts by non-orthogonal matrices (a generator is not skew-symmetric): the "
                "quotient metric, the horizontal projection as a Riemannian submersion and the lifted SDE "
                "need an isometric action"
            )
        self.group = group
        self.lie = lie
        self.discrete = discrete
        self._curved = None
        if manifold is not None and not isinstance(manifold, Euclidean):
            self._init_curved(manifold, backend)
            return
        if manifold is not None and lie is not None and manifold.point_dim != lie.point_dim:
            raise ValueError(f"{manifold!r} has points of dimension {manifold.point_dim}, {lie.name} acts on R^{lie.point_dim}")
        self.point_dim = lie.point_dim if lie is not None else discrete.point_dim
        self.translations = bool(lie.translations) if lie is not None else False
        self.total_space = Euclidean(self.point_dim) if self.point_dim is not None else None
        has_fast = lie is not None and lie.kind == "special_orthogonal" and lie.point_dim == 3
        if backend == "fast" and not has_fast:
            raise ValueError(f"no hand-written fast path for {self.name}; use backend='generic' or 'auto'")
        fusable = lie is not None and bool(lie.generators)
        if backend == "fused" and not fusable:
            raise ValueError(f"no fused kernel for {self.name} (no continuous rotation-like factor)")
        self._fused = None
        if fusable and (backend == "fused" or (backend == "auto" and _kernels.triton_available())):
            self.backend = "fused"
            self._fused = _kernels.FusedGeometry(lie)
        else:
            self.backend = "fast" if (has_fast and backend != "generic") else "generic"

    def _init_curved(self, manifold, backend):
        from .curved import ManifoldAction

        if backend not in ("auto", "generic"):
            raise ValueError(f"a curved total space ({manifold.name}) has only the generic backend, not {backend!r}")
        if self.lie is None or self.discrete is not None:
            raise ValueError(f"a curved total space ({manifold.name}) needs a Lie group without a discrete factor")
        self._curved = ManifoldAction(self.lie, manifold)
        self.point_dim = manifold.ambient_dim
        self.translations = bool(self.lie.translations)
        self.total_space = manifold
        self.backend = "generic"
        self._fused = None

    def _flat_only(self, what: str) -> None:
        if self._curved is not None:
            raise NotImplementedError(
                f"{what} is not available yet on the curved total space {self.total_space.name} (issue 15): the "
                "global alignment in M's metric is missing; qmanifold.curved_diffusion.geodesic_align refines a "
                "given alignment, and the bundle geometry, lift and samplers are available"
            )

    # -- descriptive ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def has_continuous_fibers(self) -> bool:
        """True when the group has a Lie factor (a vertical space, projection and curvature)."""
        return self.lie is not None

    def fiber_dim(self) -> int:
        """Dimension of a generic orbit (the group dimension, 0 for discrete groups)."""
        return self.lie.algebra_dim if self.lie is not None else 0

    def __repr__(self) -> str:
        if self._curved is not None:
            return f"Quotient({self.name!r}, manifold={self.total_space!r})"
        return f"Quotient({self.name!r}, backend={self.backend!r})"

    # -- validation ------------------------------------------------------------------------------

    def _check(self, x, mask, v=None, x_name="x"):
        check_points(x, self.point_dim, x_name)
        check_mask(mask, x)
        maybe_check_finite(x, x_name)
        if v is not None:
            check_same_shape(v, x, "v", x_name)
            maybe_check_finite(v, "v")

    def _geom(self, x):
        return self.lie.lowered(x.dtype, x.device)

    # -- bundle geometry -------------------------------------------------------------------------

    def center(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Remove the centre of mass when the group has translations (else only mask)."""
        self._check(x, mask)
        if self._curved is not None:
            return self._curved.center(x, mask)
        if self._fused is not None:
            return self._fused.center(x, mask)
        return center(x, mask) if self.translations else apply_mask(x, mask)

    def horizontal_projection(self, v: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``P_x(v)``: the component of ``v`` orthogonal to the orbit through ``x``: ``(..., N, d)``."""
        self._check(x, mask, v)
        if self._curved is not None:
            return self._curved.horizontal_projection(v, x, mask)
        if self.lie is None:
            return apply_mask(v, mask)
        if self._fused is not None:
            return self._fused.horizontal_projection(v, x, mask)
        if self.backend == "fast":
            return so3.horizontal_projection(v, x, mask, self.translations)
        return G.horizontal_projection(self._geom(x), v, x, mask, self.translations)

    def vertical_projection(self, v: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``v - P_x(v)``: the component of ``v`` tangent to the orbit (rigid motions for SE(3))."""
        self._check(x, mask, v)
        if self._curved is not None:
            return self._curved.vertical_projection(v, x, mask)
        if self.lie is None:
            return torch.zeros_like(v)
        if self._fused is not None:
            return apply_mask(v, mask) - self._fused.horizontal_projection(v, x, mask)
        if self.backend == "fast":
            return so3.vertical_projection(v, x, mask, self.translations)
        return G.vertical_projection(self._geom(x), v, x, mask, self.translations)

    def mean_curvature(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Lifted mean-curvature vector ``h(x) = -1/2 grad log det Gram(x)`` (horizontal)."""
        self._check(x, mask)
        if self._curved is not None:
            return self._curved.mean_curvature(x, mask)
        if self.lie is None:
            return torch.zeros_like(x)
        if self._fused is not None:
            return self._fused.mean_curvature(x, mask)
        if self.backend == "fast":
            return so3.mean_curvature(x, mask, self.translations)
        return G.mean_curvature(self._geom(x), x, mask, self.translations)

    def log_orbit_volume(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``1/2 log det Gram(x)`` up to an additive constant: ``(...,)``."""
        self._check(x, mask)
        if self._curved is not None:
            return self._curved.log_orbit_volume(x, mask)
        if self.lie is None:
            return torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
        return G.log_orbit_volume(self._geom(x), x, mask, self.translations)

    def conditioning(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample ``lambda_min / lambda_max`` of Gram (0 on the singular set): ``(...,)``."""
        self._check(x, mask)
        if self._curved is not None:
            return self._curved.conditioning(x, mask)
        if self.lie is None or not self.lie.generators:
            return torch.ones(x.shape[:-2], dtype=x.dtype, device=x.device)
        return G.conditioning(self._geom(x), x, mask, self.translations)

    # -- SDEs ------------------------------------------------------------------------------------

    def lift(self, sde, *, curvature_factor: float = 1.0):
        """The lifted SDE ``dx = [P_x f - c (sigma^2/2) h] dt + sigma P_x dW`` on M (Ito).

        ``curvature_factor`` c is 1 for the correct lift (Theorems 2 and 4 of Xu et al.); 0 (no
        correction) and -1 (the ``+ eta h`` sign printed in the paper's Algorithm 3) are the known
        wrong variants, exposed for negative controls.

        On a curved total space M the same SDE is returned as a
        :class:`qmanifold.curved_diffusion.ManifoldSDE` (``P_x`` projects onto the horizontal part of
        ``T_x M``, ``h = -grad_M log vol(G x)``), integrated on M with ``.integrate(...)`` (geodesic
        Euler-Maruyama; docs/diffusion.md, "The lifted SDE on a curved total space").
        """
        from .sde import ProjectedSDE

        if self._curved is not None:
            return self._curved_sde(sde, lift=True, curvature_factor=curvature_factor)
        return ProjectedSDE(
            sde,
            project=lambda v, x, mask=None: self.horizontal_projection(v, x, mask),
            curvature=lambda x, mask=None: self.mean_curvature(x, mask),
            curvature_factor=curvature_factor,
            name=f"lifted to {self.name}",
            fused=self._fused,
        )

    def conventional(self, sde):
        """The same SDE run conventionally on M: drift and noise only centred when the group has
        translations (the usual centre-of-mass-free diffusion), no rotational projection or curvature."""
        from .sde import ProjectedSDE

        if self._curved is not None:
            return self._curved_sde(sde, lift=False)
        return ProjectedSDE(
            sde,
            project=lambda v, x, mask=None: self.center(v, mask),
            curvature=None,
            curvature_factor=0.0,
            name="conventional",
        )

    def _curved_sde(self, sde, *, lift: bool, curvature_factor: float = 1.0):
        """The lifted (or conventional) SDE on a curved M: a :class:`qmanifold.curved_diffusion.ManifoldSDE`,
        integrated on M by geodesic steps (:func:`qmanifold.curved_diffusion.integrate`)."""
        from .curved_diffusion import ManifoldSDE

        action, manifold = self._curved, self.total_space
        if lift:
            return ManifoldSDE(sde, manifold, action.horizontal_projection, action.mean_curvature,
                               curvature_factor, name=f"lifted to {self.name}")
        return ManifoldSDE(sde, manifold, lambda v, x, mask=None: action.center(manifold.to_tangent(v, x, mask), mask),
                           None, 0.0, name="conventional")

    # -- orbits ----------------------------------------------------------------------------------

    def align(self, x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The point of x's orbit closest to ``ref`` (Kabsch for rotation groups)."""
        self._check(x, mask)
        check_same_shape(ref, x, "ref", "x")
        self._flat_only("align")
        return self.group.align(x, ref, mask)

    def dist(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Quotient distance ``min_g |g x - y|`` over real points: ``(...,)``.

        The norm is taken as ``m |diff / m|`` with ``m = max |diff_n,i|`` per sample, so it neither
        over- nor underflows (float32 coordinates of 1e19 or 1e-30 give the right distance).
        """
        diff = self.align(x, y, mask) - apply_mask(y, mask)
        diff, scale = G.normalize(diff)
        return diff.square().sum((-2, -1)).clamp_min(0).sqrt() * scale

    def canonicalize(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """A canonical representative of x's orbit under the discrete factor (sort / wrap)."""
        self._check(x, mask)
        if self.discrete is None:
            raise ValueError(
                f"{self.name} has no discrete factor; for continuous groups use align(x, ref) against a "
                "reference configuration"
            )
        return self.discrete.canonicalize(x, mask)

    def random_element(self, batch_shape=(), **kwargs):
        """Random group elements (Haar for the compact factors); see the group's method."""
        return self.group.random_element(batch_shape, **kwargs)

    def act(self, g, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the group element ``g`` to the configuration ``x``."""
        self._check(x, mask)
        if self._curved is not None:
            return self._curved.act(g, x, mask)
        return self.group.act(g, x, mask)

    def act_on_vectors(self, g, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the differential of ``g`` to tangent vectors ``v`` (no translation part)."""
        if self._curved is not None:
            return self._curved.act_on_vectors(g, v, mask)
        return self.group.act_on_vectors(g, v, mask)

    def orbit_dimension_ok(self, num_points: int) -> bool:
        """Whether a generic configuration of ``num_points`` points has a free orbit (full rank Gram)."""
        if self.lie is None or not self.lie.generators:
            return True
        gen = torch.Generator().manual_seed(0)
        if self._curved is not None:
            x = self.total_space.random_point((num_points,), generator=gen, dtype=torch.float64)
            return bool(self.conditioning(x) > 1e-8)
        x = torch.randn(num_points, self.point_dim, generator=gen, dtype=torch.float64)
        return bool(self.conditioning(x) > 1e-8)
