r"""Diffusion and flow on a curved total space M: geodesic interpolants and the lifted samplers on M.

The bundle geometry of a group acting on a curved M (horizontal projection ``P_x``, lifted mean
curvature ``h = -grad_M log vol(G x)``) is :class:`qmanifold.curved.ManifoldAction`; this module
moves points of M with it. Configurations are ``x`` of shape ``(B, N, n)`` (N points of a manifold
with n ambient coordinates, :mod:`qmanifold.manifolds`), optional bool ``mask`` ``(B, N)``.

* :class:`GeodesicInterpolant` -- Riemannian flow matching (Chen & Lipman 2024): ``x0`` from the
  prior on M (uniform on the compact factors), ``x_t = exp_{x0}(t log_{x0}(x1))``, target velocity
  ``u_t = log_{x_t}(x1) / (1 - t)`` (the geodesic's velocity at ``x_t``).
* :class:`ManifoldSDE` -- ``dx = [proj_x f - c (sigma^2/2) h] dt + sigma proj_x dW`` on M, returned by
  :meth:`qmanifold.Quotient.lift` (``proj = P_x``, ``c = 1``) and
  :meth:`~qmanifold.Quotient.conventional` (``proj`` = tangent projection and centring, no h) for a
  curved quotient. Same sign conventions as the flat case (DESIGN.md sections 1 and 5;
  ``curvature_factor`` 0 / -1 are the known-wrong variants).
* :func:`integrate` -- geodesic Euler(-Maruyama) on M:
  ``x <- exp_x(dt proj_x f + sigma sqrt(dt) proj_x z + tame(-c (sigma^2/2) h dt))`` (the retraction
  where M has no closed-form exp), or Heun for ODEs. Every iterate is a point of M. The Itô drift of
  the embedding needs no term of its own: the second-order part of ``exp_x`` supplies
  ``(sigma^2/2) tr_H II`` (docs/diffusion.md, "The lifted SDE on a curved total space").
* :func:`geodesic_align` -- the point of an orbit closest to a reference in M's metric (Gauss-Newton
  on the group from a given start).
* the curved branch of :class:`qmanifold.QuotientDiffusion` (``loss`` and ``sample`` with
  ``interpolant="geodesic"``): :func:`setup`, :func:`loss`, :func:`sample`.

Reference for the lift: Xu et al., "Quotient-space diffusion models", ICLR 2026 (arXiv 2604.21809),
Theorems 2 and 4, with the sign correction of DESIGN.md.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import sympy
import torch

from ._validation import check_finite
from .masking import apply_mask, count_points
from .progress import make_progress
from .sde import SDE, tame
from .symbolic import T, as_sympy, lower

__all__ = [
    "GeodesicInterpolant",
    "ManifoldSDE",
    "integrate",
    "geodesic_align",
    "brownian_motion",
    "SAMPLERS",
]

#: Samplers of the curved branch of :meth:`qmanifold.QuotientDiffusion.sample`.
SAMPLERS = ("ode", "heun", "sde")


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B,)`` (or a scalar) as ``(B, 1, 1)`` in x's dtype."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(*t.shape, 1, 1) if t.dim() else t


def _positive_int(value, name: str) -> int:
    """``value`` as an int if it is a positive integer (not a bool), else ValueError."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_mask_rows(mask) -> None:
    """ValueError if a configuration of ``mask`` ``(B, N)`` has no real point (one host synchronisation)."""
    if mask is not None and not bool(mask.any(-1).all()):
        rows = torch.nonzero(~mask.any(-1)).reshape(-1)[:10].tolist()
        raise ValueError(f"mask has a configuration with no real point (batch row(s) {rows}); every "
                         "configuration needs at least one real point")


def _manifold_of(quotient):
    curved = getattr(quotient, "_curved", None)
    if curved is None:
        raise ValueError(f"{quotient!r} has the flat total space; the curved samplers need Quotient(group, manifold=M)")
    return curved.manifold


# ---------------------------------------------------------------------------------------------
# The geodesic interpolant


class GeodesicInterpolant:
    r"""Flow matching along geodesics of M (Riemannian flow matching).

    With ``x0`` from the prior (:meth:`sample_prior`) and ``x1`` from the data:

    * ``x_t = exp_{x0}(t log_{x0}(x1))``, t in [0, 1] (0: prior, 1: data);
    * conditional velocity ``u_t = d x_t / dt = log_{x_t}(x1) / (1 - t)`` (the geodesic keeps its
      speed: ``|u_t| = d(x0, x1)``); the marginal field ``E[u_t | x_t]`` transports the prior to the data;
    * from a prediction ``D`` of the clean point: ``v = log_{x_t}(pi_M(D)) / (1 - t)`` (``pi_M`` the
      projection onto M; the identity for an output already on M).

    On the flat factors (translations of frames, ``Euclidean``) this is the linear interpolant
    ``(1 - t) x0 + t x1`` with a standard Gaussian ``x0``; on a torus it is the wrapped one. M must
    have a closed-form logarithm (``has_log``: Sphere, Torus, SO3Frames, SE3Frames, products).

    Args:
        t_max: the largest time at which a velocity is evaluated (``1 - t`` is floored there), as
            for the flat linear interpolant.
        weight_clamp: the clamp of the loss weight ``1 / (1 - t)^2`` of ``prediction="x1"`` (which
            turns the residual of the clean point into a velocity residual).
    """

    name = "geodesic"

    def __init__(self, t_max: float = 1.0 - 1e-4, weight_clamp: float = 1e3):
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max must lie in (0, 1], got {t_max!r}")
        self.t_max = float(t_max)
        self.weight_clamp = float(weight_clamp)
        #: ``1 - t``: the default SDE noise level ``eta = ahat^2`` reads it, as for the flat linear interpolant
        self.ahat_expr = 1 - T

    def __repr__(self) -> str:
        return f"GeodesicInterpolant(t_max={self.t_max})"

    def sample_prior(self, quotient, shape, mask=None, *, generator=None, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """``(B, N, n)`` points of the prior on M: ``manifold.random_point`` (uniform on the compact
        factors, standard Gaussian on the flat ones), centred when the group has translations."""
        manifold = _manifold_of(quotient)
        x = manifold.random_point(tuple(shape[:-1]), generator=generator, dtype=dtype, device=device)
        return quotient.center(x, mask)

    def sample_xt(self, manifold, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
        """``exp_{x0}(t log_{x0}(x1))``: ``(B, N, n)``; ``t`` ``(B,)``."""
        return manifold.exp(x0, _bcast(t, x0) * manifold.log(x0, x1, mask), mask)

    def _one_minus(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 1.0 - _bcast(t, x).clamp(max=self.t_max)

    def target_velocity(self, manifold, x_t: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
        """``log_{x_t}(x1) / (1 - t)``: ``(B, N, n)``, tangent at ``x_t``."""
        return manifold.log(x_t, x1, mask) / self._one_minus(t, x_t)

    def velocity_from_denoiser(self, manifold, x_t: torch.Tensor, d: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
        """``log_{x_t}(pi_M(D)) / (1 - t)`` for a predicted clean point ``D``."""
        return manifold.log(x_t, manifold.project(d, mask), mask) / self._one_minus(t, x_t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """``min(1 / (1 - t)^2, weight_clamp)``: ``(B,)``."""
        return (1.0 / (1.0 - t).square().clamp_min(1.0 / self.weight_clamp)).clamp(max=self.weight_clamp)


# ---------------------------------------------------------------------------------------------
# SDEs on M and their integration


def _misuse(*_args, **_kwargs):
    raise TypeError(
        "a lifted SDE on a curved total space must be integrated on M, with qmanifold.curved_diffusion.integrate "
        "(or its .integrate method): qmanifold.integrate adds increments in the ambient space and leaves M"
    )


class ManifoldSDE:
    """``dx = [proj_x f(x, t) - c (sigma(t)^2/2) h(x)] dt + sigma(t) proj_x dW`` on a manifold M (Itô,
    realised by geodesic steps, :func:`integrate`).

    Built by :meth:`qmanifold.Quotient.lift` (``project`` = the horizontal projection, ``curvature`` =
    the lifted mean curvature h of the orbits in M, ``c = 1``) and :meth:`~qmanifold.Quotient.conventional`
    (``project`` = tangent projection then centring, no curvature) on a curved quotient.

    Args:
        sde: a :class:`qmanifold.SDE` (ambient drift ``f``; ``proj_x`` makes it tangent).
        manifold: the total space (``exp``, ``to_tangent``).
        project: ``project(v, x, mask) -> (B, N, n)`` onto a subspace of ``T_x M``.
        curvature: ``h(x, mask)`` or None; curvature_factor: c (1 correct; 0 and -1 negative controls).
    """

    def __init__(self, sde: SDE, manifold, project: Callable, curvature: Callable | None = None,
                 curvature_factor: float = 1.0, name: str = "lifted"):
        if not isinstance(sde, SDE):
            raise TypeError(f"expected a qmanifold.SDE, got {type(sde).__name__}")
        self.sde = sde
        self.manifold = manifold
        self._project = project
        self._curvature = curvature
        self.curvature_factor = float(curvature_factor)
        self.name = name
        #: whether the diffusion is identically zero (an ODE)
        self.ode = sde.is_ode

    # qmanifold.integrate would step in the ambient space: make it fail with a clear message
    is_ode = property(_misuse)
    fused_applies = _misuse

    def projected_drift(self, x, t, mask=None):
        """``proj_x f(x, t)``: tangent (horizontal for a lift)."""
        return self._project(self.sde.drift(x, t, mask), x, mask)

    def curvature_drift(self, x, t, mask=None):
        """``-c (sigma(t)^2/2) h(x)`` (zeros for an ODE or without curvature)."""
        if self._curvature is None or self.curvature_factor == 0.0 or self.ode:
            return torch.zeros_like(x)
        sigma = self.sde.sigma(t).to(x.dtype)
        return -_bcast(self.curvature_factor * 0.5 * sigma.square(), x) * self._curvature(x, mask)

    def drift(self, x, t, mask=None):
        return self.projected_drift(x, t, mask) + self.curvature_drift(x, t, mask)

    def sigma(self, t):
        return self.sde.sigma(t)

    def noise(self, x, z, mask=None):
        """``proj_x z`` for a standard Gaussian z in the ambient coordinates."""
        return self._project(z, x, mask)

    def integrate(self, x0, t0: float = 0.0, t1: float = 1.0, steps: int = 100, **kwargs):
        """:func:`integrate` (geodesic Euler-Maruyama on M) of this SDE."""
        return integrate(self, x0, t0, t1, steps, **kwargs)

    def __repr__(self) -> str:
        return f"ManifoldSDE({self.name} on {self.manifold.name}, {self.sde!r}, curvature_factor={self.curvature_factor})"


_METHODS = ("euler_maruyama", "heun")


def integrate(
    sde: ManifoldSDE,
    x0: torch.Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    steps: int = 100,
    *,
    method: str = "euler_maruyama",
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    times: torch.Tensor | None = None,
    return_trajectory: bool = False,
    callback: Callable | None = None,
    tame_curvature: bool = True,
):
    """Integrate a :class:`ManifoldSDE` on M from ``x0`` ``(..., N, n)`` (points of M).

    Euler-Maruyama, geodesic form: with ``s = sigma(t) sqrt(dt)`` and ``z`` standard normal,

        x <- exp_x( dt proj_x f(x, t) + s proj_x z + tame(-c (sigma^2/2) h(x) dt, s) )

    (``manifold.exp``: the Riemannian exponential, or the retraction where M has none in closed form;
    both agree to second order, which is what the Itô drift of the embedding needs). ``method="heun"``
    (ODEs only): ``y = exp_x(dt u(x))``, ``x <- exp_x(dt/2 (u(x) + proj_x u(y)))`` (``proj_x`` carries
    ``u(y)`` back to ``T_x M``; it agrees with parallel transport to second order).

    Args as :func:`qmanifold.integrate` (``times``: a 1-D grid instead of the uniform one;
    ``tame_curvature``: limit the curvature increment to the noise scale, see :func:`qmanifold.sde.tame`).
    Returns ``x`` at the final time, or ``(x, trajectory)``.
    """
    if not isinstance(sde, ManifoldSDE):
        raise TypeError(f"integrate on M needs a ManifoldSDE (Quotient(..., manifold=M).lift(sde)), got {type(sde).__name__}")
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {_METHODS}")
    if method == "heun" and not sde.ode:
        raise ValueError("method='heun' is for ODEs (zero diffusion); use 'euler_maruyama' for SDEs")
    if times is None:
        steps = _positive_int(steps, "steps")
        times = torch.linspace(float(t0), float(t1), steps + 1, dtype=x0.dtype, device=x0.device)
    times = times.to(dtype=x0.dtype, device=x0.device)
    manifold = sde.manifold
    batch_shape = x0.shape[:-2]
    x = apply_mask(x0, mask)
    trajectory = [x] if return_trajectory else None
    for i in range(times.shape[0] - 1):
        t = times[i].expand(batch_shape)
        dt = times[i + 1] - times[i]
        if sde.ode:
            u = sde.projected_drift(x, t, mask)
            if method == "heun":
                y = manifold.exp(x, dt * u, mask)
                u_next = sde.noise(x, sde.projected_drift(y, times[i + 1].expand(batch_shape), mask), mask)
                u = 0.5 * (u + u_next)
            step = dt * u
        else:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            scale = _bcast(sde.sigma(t).to(x.dtype), x) * dt.abs().sqrt()
            step = dt * sde.projected_drift(x, t, mask) + scale * sde.noise(x, z, mask)
            curv = dt * sde.curvature_drift(x, t, mask)
            step = step + (tame(curv, scale) if tame_curvature else curv)
        x = manifold.exp(x, step, mask)
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(i, times[i + 1], x)
    if trajectory is not None:
        return x, torch.stack(trajectory)
    return x


def brownian_motion(quotient, x: torch.Tensor, duration: float, steps: int, *, horizontal: bool = False,
                    curvature_factor: float = 1.0, mask=None, generator=None) -> torch.Tensor:
    """Noise points of M by Brownian motion for time ``duration`` (generator ``Delta_M / 2``).

    ``horizontal=False``: the geodesic random walk on M (``exp_x(sqrt(dt) P^M_x z)``, the manifold's
    Brownian increments). ``horizontal=True``: its lift, the horizontal Brownian motion with the
    mean-curvature drift ``-(1/2) c h`` (``quotient.lift(SDE(0, 1))``): the same law on Q = M/G, with no
    motion along the orbits. Both are Euler schemes of weak order 1 in ``duration / steps``.
    """
    manifold = _manifold_of(quotient)
    if not horizontal:
        dt = float(duration) / steps
        for _ in range(steps):
            x = manifold.brownian_step(x, dt, generator=generator, mask=mask)
        return x
    lifted = quotient.lift(SDE(drift=None, diffusion=1.0), curvature_factor=curvature_factor)
    return integrate(lifted, x, 0.0, float(duration), steps, mask=mask, generator=generator)


def geodesic_align(quotient, x: torch.Tensor, ref: torch.Tensor, mask=None, *, iterations: int = 30) -> torch.Tensor:
    """The point of ``x``'s orbit that is closest to ``ref`` in M's metric, by Gauss-Newton on the group
    started at ``x``: ``(..., N, n)``.

    With ``y`` the current point and ``J`` the momentum map, ``d/ds 1/2 d(exp(s X_a) y, ref)^2 =
    -J_a(y, log_y(ref))``; the step is ``y <- exp(omega) y``, ``omega = Gram(y)^-1 J(y, log_y(ref))``
    (the Hessian replaced by the Gram matrix: exact when ``ref`` is on the orbit, linear convergence
    otherwise). A fixed number of iterations, no data-dependent branch. It finds the minimum of the
    basin ``x`` lies in: start from a good alignment (e.g. a chordal Kabsch one) for the global one.
    """
    action = quotient._curved
    if action is None:
        raise ValueError("geodesic_align is for curved total spaces; use Quotient.align on the flat one")
    manifold = action.manifold
    y = x
    for _ in range(iterations):
        omega = action.vertical_coefficients(manifold.log(y, ref, mask), y, mask)
        y = action.act_exp(omega, y, mask)
    return y


# ---------------------------------------------------------------------------------------------
# The curved branch of QuotientDiffusion


def setup(quotient, interpolant, prediction: str, loss: str, augment: bool) -> GeodesicInterpolant:
    """Check a curved :class:`qmanifold.QuotientDiffusion` configuration; return its interpolant."""
    manifold = _manifold_of(quotient)
    if isinstance(interpolant, str) and interpolant == "geodesic":
        interpolant = GeodesicInterpolant()
    if not isinstance(interpolant, GeodesicInterpolant):
        message = (f"on the curved total space {manifold.name} the interpolant is interpolant='geodesic' (or a "
                   f"GeodesicInterpolant), got {interpolant!r}: the Gaussian interpolants of R^(N d) leave M")
        raise ValueError(message) if isinstance(interpolant, str) else TypeError(message)
    if not getattr(manifold, "has_log", False):
        raise ValueError(f"the geodesic interpolant needs a closed-form logarithm on {manifold.name}; declare a "
                         "manifold with log (Sphere, Torus, SO3Frames, SE3Frames, products of these)")
    if loss not in ("quotient", "conventional"):
        raise ValueError(f"loss={loss!r} needs an alignment on M, which the curved total space {manifold.name} has not "
                         "(yet); use loss='quotient' or 'conventional'")
    if augment and quotient.lie._haar is None:
        raise ValueError(f"augment=True needs a Haar sampler for {quotient.lie.name}")
    return interpolant


def _check_on_manifold(manifold, x: torch.Tensor, mask, name: str) -> None:
    """Raise ValueError if ``x`` is off M (constraint residual above 1e-4 in float32, 1e-8 in float64)."""
    tol = 1e-8 if x.dtype == torch.float64 else 1e-4
    res = manifold.residual(x, mask)
    worst = float(res.max()) if res.numel() else 0.0
    if not worst <= tol:
        raise ValueError(f"{name} is not on {manifold.name}: constraint residual {worst:.3g} > {tol:g}; "
                         "use manifold.project(...) first")


def _velocity(model, x, t, mask, cond):
    manifold = model.quotient.total_space
    out = model._call_denoiser(x, t, mask, cond)
    if model.prediction == "v":
        return out
    return model.interpolant.velocity_from_denoiser(manifold, x, out, t, mask)


def loss(model, x1, mask, t, generator, reduction, check_output, cond):
    """The curved branch of :meth:`qmanifold.QuotientDiffusion.loss`.

    ``x_t = exp_{x0}(t log_{x0}(x1))`` with ``x0`` from the prior; per sample
    ``w(t) |r|^2 / (N_real dim)`` in M's metric (dim: the intrinsic dimension of one point), with
    ``r = P_{x_t}(v_theta - u_t)`` (``prediction="v"``, ``w = 1``) or
    ``r = P_{x_t}(log_{x_t} pi_M(D) - log_{x_t} x1)`` (``"x1"``, ``w = min(1/(1-t)^2, clamp)``) for the
    quotient loss, and the tangent, centred residual for the conventional one. ``P_{x_t}`` projects
    onto the horizontal subspace of ``T_{x_t} M``: the vertical and normal parts of the output are free.
    """
    q = model.quotient
    manifold = q.total_space
    interp = model.interpolant
    model._check_data(x1, mask)
    batch = x1.shape[0]
    model._check_cond(cond, batch)
    if model.validate:
        _check_on_manifold(manifold, x1, mask, "x1")
    dtype, device = x1.dtype, x1.device
    if t is None:
        t = torch.rand(batch, generator=generator, dtype=dtype, device=device) * interp.t_max
    else:
        from .schedules import check_time

        t = check_time(t).to(dtype=dtype, device=device)
        if t.shape != (batch,):
            raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    x1 = q.center(x1, mask)
    if model.augment:
        g = q.random_element((batch,), generator=generator, dtype=dtype, device=device)
        x1 = q.act(g, x1, mask)
    x0 = interp.sample_prior(q, x1.shape, mask, generator=generator, dtype=dtype, device=device)
    x_t = interp.sample_xt(manifold, x0, x1, t, mask)
    out = model._call_denoiser(x_t, t, mask, cond, check_output=check_output)
    if model.prediction == "v":
        residual = out - interp.target_velocity(manifold, x_t, x1, t, mask)
        weight = torch.ones_like(t)
    else:
        residual = manifold.log(x_t, manifold.project(out, mask), mask) - manifold.log(x_t, x1, mask)
        weight = interp.weight(t).to(dtype)
    if model.loss_type == "quotient":
        residual = q.horizontal_projection(residual, x_t, mask)
    else:
        residual = q.center(manifold.to_tangent(residual, x_t, mask), mask)
    dof = count_points(x1, mask) * manifold.dim
    per_sample = weight * manifold.inner(residual, residual, x_t, mask) / dof
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'")


def _eta_function(interp: GeodesicInterpolant, eta) -> Callable:
    if eta is None:
        eta = interp.ahat_expr ** 2
    if callable(eta) and not isinstance(eta, (sympy.Basic, str)):
        return eta
    return lower(as_sympy(eta, T, name="eta"), T)


def _time_grid(steps: int, grid, dtype) -> torch.Tensor:
    if isinstance(grid, torch.Tensor):
        times = grid.to(dtype=dtype, device="cpu")
        if times.dim() != 1 or times.shape[0] < 2:
            raise ValueError("a custom time grid must be a 1-D tensor with at least two times")
        return times
    if grid == "uniform":
        return torch.linspace(0.0, 1.0, steps + 1, dtype=dtype)
    raise ValueError(f"time grid {grid!r} is not available on a curved total space; choose 'uniform' or pass a tensor")


def sample(model, shape, mask, *, steps, sampler, eta, geometry, generator, time_grid, return_trajectory,
           chunk_size, progress, dtype, device, curvature_factor, x0, cond):
    """The curved branch of :meth:`qmanifold.QuotientDiffusion.sample` (see there).

    ``"ode"`` / ``"heun"``: ``dx = P_x v dt`` (quotient) or ``dx = v_T dt`` (conventional) by geodesic
    Euler / Heun steps. ``"sde"``: ``dx = [P_x(v + eta s) - c eta h] dt + sqrt(2 eta) P_x dW`` by geodesic
    Euler-Maruyama; the score ``s(x, t) = grad_M log p_t(x)`` (a tangent field on M) is passed as
    ``score=callable(x, t, mask=None)`` among the keyword arguments -- the geodesic interpolant's
    velocity does not determine it. Conventional SDE: ``dx = (v + eta s)_T dt + sqrt(2 eta) dW_M``.
    """
    q = model.quotient
    manifold = q.total_space
    score = cond.pop("score", None)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not available on the curved total space {manifold.name}; "
                         f"choose one of {SAMPLERS}")
    geometry = geometry or ("quotient" if model.loss_type == "quotient" else "conventional")
    if geometry not in ("quotient", "conventional"):
        raise ValueError(f"unknown geometry {geometry!r}; choose 'quotient' or 'conventional'")
    if sampler == "sde" and not callable(score):
        raise ValueError("sampler='sde' on a curved total space needs the score of the marginals: pass "
                         "score=callable(x, t, mask=None) (the geodesic interpolant's velocity does not determine it)")
    steps = _positive_int(steps, "steps")
    ref_dtype, ref_device = model._reference_tensor(cond)
    dtype = dtype or ref_dtype
    if x0 is not None:
        shape = tuple(x0.shape)
        device = device or x0.device
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError("mask must be a (B, N) bool tensor")
        device = device or mask.device
        shape = shape or (mask.shape[0], mask.shape[1], q.point_dim)
        if tuple(shape[:2]) != tuple(mask.shape):
            raise ValueError(f"shape {tuple(shape)} does not match mask shape {tuple(mask.shape)}")
    if shape is None:
        raise ValueError("give shape=(B, N, n) or a mask (B, N)")
    if len(shape) != 3 or shape[-1] != q.point_dim:
        raise ValueError(f"shape must be (B, N, {q.point_dim}) on {manifold.name}, got {tuple(shape)}")
    device = torch.device(device or ref_device)
    batch = shape[0]
    model._check_cond(cond, batch)
    if model.validate:
        _check_mask_rows(mask)
    if chunk_size is not None:
        chunk_size = _positive_int(chunk_size, "chunk_size")
        if batch > chunk_size:
            outs = []
            for start in range(0, batch, chunk_size):
                sl = slice(start, min(batch, start + chunk_size))
                sub = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
                if score is not None:
                    sub["score"] = score
                outs.append(sample(model, (sl.stop - sl.start, *shape[1:]), mask[sl] if mask is not None else None,
                                   steps=steps, sampler=sampler, eta=eta, geometry=geometry, generator=generator,
                                   time_grid=time_grid, return_trajectory=return_trajectory, chunk_size=None,
                                   progress=progress, dtype=dtype, device=device, curvature_factor=curvature_factor,
                                   x0=x0[sl] if x0 is not None else None, cond=sub))
            if return_trajectory:
                return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs], 1)
            return torch.cat(outs)
    interp = model.interpolant
    if x0 is None:
        x0 = interp.sample_prior(q, tuple(shape), mask, generator=generator, dtype=dtype, device=device)
    else:
        model._check_data(x0, mask, "x0")
        if model.validate:
            _check_on_manifold(manifold, x0, mask, "x0")
    times = _time_grid(steps, time_grid, x0.dtype).to(x0.device)

    def velocity(x, t, mask=None):
        return _velocity(model, x, t.clamp(max=interp.t_max), mask, cond)

    if sampler in ("ode", "heun"):
        sde = SDE(drift=velocity, diffusion=0)
    else:
        eta_of_t = _eta_function(interp, eta)

        def drift(x, t, mask=None):
            te = t.clamp(max=interp.t_max)
            s = score(x, te, mask=mask)
            if model.validate:
                check_finite(apply_mask(s, mask), "score")
            return velocity(x, t, mask) + _bcast(eta_of_t(te), x) * s

        sde = SDE(drift=drift, diffusion=lambda t: torch.sqrt(2.0 * torch.as_tensor(eta_of_t(t.clamp(max=interp.t_max)))))
    lifted = q.lift(sde, curvature_factor=curvature_factor) if geometry == "quotient" else q.conventional(sde)
    bar = make_progress(times.shape[0] - 1, progress, f"sampling ({sampler}, {geometry}, {manifold.name})")
    callback = (lambda i, t, x: bar.update(1)) if bar is not None else None
    try:
        return integrate(lifted, x0, times=times, method="heun" if sampler == "heun" else "euler_maruyama",
                         mask=mask, generator=generator, return_trajectory=return_trajectory, callback=callback)
    finally:
        if bar is not None:
            bar.close()
