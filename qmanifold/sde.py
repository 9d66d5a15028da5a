r"""Stochastic differential equations on configurations, their quotient lift, and solvers.

An :class:`SDE` is ``dx = f(x, t) dt + sigma(t) dW`` on configurations ``x`` of shape
``(..., N, d)``. For an equivariant drift and an invariant initial law it induces a diffusion on the
quotient M/G. :meth:`qmanifold.Quotient.lift` realises that diffusion on M with no vertical motion
(Theorems 2 and 4 of Xu et al., ICLR 2026; docs/geometry.md, "Conventions")::

    dx = [ P_x f(x, t) - (sigma(t)^2 / 2) h(x) ] dt + sigma(t) P_x dW      (Ito)

with ``P_x`` the horizontal projection and ``h = -1/2 grad log det Gram`` the lifted mean
curvature. SIGN: the paper's Algorithm 3 prints ``+ eta h`` (with ``sigma^2 = 2 eta``); the correct
term is ``- eta h``. ``curvature_factor`` exposes both wrong variants for negative controls:
``1`` is correct, ``0`` drops the term, ``-1`` is the printed sign.

:func:`integrate` runs Euler-Maruyama (strong order 1/2, weak order 1; consistent for the Ito form
above) or Heun's method (order 2, for ODEs, i.e. ``sigma = 0``).

Drifts and diffusions can be written symbolically: ``SDE(drift="-x/2", diffusion="sqrt(t)")`` with
sympy expressions in ``x`` and ``t`` (drifts must be linear in ``x``, i.e. ``c(t) x``, which is
equivariant for every linear group), lowered to torch by :mod:`qmanifold.symbolic`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import sympy
import torch

from .masking import apply_mask
from .symbolic import T, as_sympy, lower

__all__ = ["SDE", "ProjectedSDE", "integrate", "tame", "time_grid", "X"]

#: The configuration symbol for symbolic drifts, e.g. ``-X / 2`` or ``"-x/2"``.
X = sympy.Symbol("x", real=True)


def _accepts_mask(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _symbolic_drift(expr) -> tuple[Callable, sympy.Expr]:
    if isinstance(expr, str):
        expr = sympy.sympify(expr, locals={"x": X, "t": T})
    expr = sympy.sympify(expr).xreplace({s: X for s in expr.free_symbols if s.name == "x" and s != X})
    expr = expr.xreplace({s: T for s in expr.free_symbols if s.name == "t" and s != T})
    extra = expr.free_symbols - {X, T}
    if extra:
        raise ValueError(f"drift {expr}: only the symbols x and t are allowed, got {sorted(map(str, extra))}")
    if sympy.simplify(sympy.diff(expr, X, 2)) != 0 or sympy.simplify(expr.subs(X, 0)) != 0:
        raise ValueError(
            f"drift {expr} is not of the form c(t) * x: a symbolic drift is applied to every coordinate, "
            "and only linear ones are equivariant; pass a callable f(x, t) for other drifts"
        )
    coefficient = lower(sympy.simplify(sympy.diff(expr, X)), T)

    def drift(x, t, mask=None):
        return apply_mask(coefficient(t).reshape(*t.shape, 1, 1).to(x.dtype) * x, mask)

    return drift, expr


class SDE:
    """``dx = f(x, t) dt + sigma(t) dW`` on configurations ``(..., N, d)``.

    Args:
        drift: ``None`` (zero), a callable ``f(x, t)`` or ``f(x, t, mask=None)`` returning a tensor
            shaped like ``x`` (``t`` has shape ``x.shape[:-2]``), or a sympy expression / string in
            ``x`` and ``t`` of the form ``c(t) * x``.
        diffusion: ``sigma(t)``: a number, a sympy expression / string in ``t``, or a callable of
            the time tensor.
    """

    def __init__(self, drift=None, diffusion=0.0, *, name: str | None = None):
        self.name = name or "sde"
        self.drift_expr = None
        if drift is None:
            self._drift = lambda x, t, mask=None: torch.zeros_like(x)
        elif callable(drift) and not isinstance(drift, (sympy.Basic, str)):
            self._drift = drift if _accepts_mask(drift) else (lambda x, t, mask=None, _f=drift: apply_mask(_f(x, t), mask))
        else:
            self._drift, self.drift_expr = _symbolic_drift(drift)
        self.diffusion_expr = None
        if callable(diffusion) and not isinstance(diffusion, (sympy.Basic, str)):
            self._sigma = diffusion
            self.is_ode = False
        else:
            self.diffusion_expr = as_sympy(diffusion, T, name="diffusion")
            self._sigma = lower(self.diffusion_expr, T)
            self.is_ode = self.diffusion_expr == 0

    def drift(self, x: torch.Tensor, t: torch.Tensor, mask=None) -> torch.Tensor:
        """``f(x, t)``: ``(..., N, d)``; ``t`` has shape ``x.shape[:-2]``."""
        return self._drift(x, t, mask=mask)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma(t)``, same shape as ``t``."""
        out = self._sigma(t)
        return out if isinstance(out, torch.Tensor) else torch.full_like(t, float(out))

    def noise(self, x: torch.Tensor, z: torch.Tensor, mask=None) -> torch.Tensor:
        """The noise direction for a standard Gaussian ``z`` (identity here)."""
        return apply_mask(z, mask)

    def __repr__(self) -> str:
        drift = self.drift_expr if self.drift_expr is not None else "callable"
        sigma = self.diffusion_expr if self.diffusion_expr is not None else "callable"
        return f"SDE(drift={drift}, diffusion={sigma})"


class ProjectedSDE:
    """An SDE whose drift and noise are projected, with an optional curvature drift:

        dx = [ project_x(f) - c * (sigma^2 / 2) * curvature(x) ] dt + sigma project_x(dW)

    Built by :meth:`qmanifold.Quotient.lift` (``project = P_x``, ``curvature = h``, ``c = 1``) and by
    :meth:`qmanifold.Quotient.conventional` (``project`` = centring only, no curvature), which is how
    a conventional diffusion in the centre-of-mass-free subspace is run.

    ``fused`` (set by :meth:`~qmanifold.Quotient.lift` for the ``"fused"`` backend) is a
    :class:`qmanifold.kernels.FusedGeometry`; :func:`integrate` then does each Euler(-Maruyama)
    step -- both projections, the curvature, the tame factor and the update -- in one kernel
    (:meth:`fused_step`) whenever the kernel runs for the state's device.
    """

    def __init__(self, sde: SDE, project: Callable, curvature: Callable | None = None, curvature_factor: float = 1.0, name: str = "lifted", fused=None):
        self.sde = sde
        self._project = project
        self._curvature = curvature
        self.curvature_factor = float(curvature_factor)
        self.name = name
        self.is_ode = sde.is_ode
        self.fused = fused

    def fused_applies(self, x) -> bool:
        """Whether :meth:`fused_step` runs a fused kernel for states like ``x``."""
        return self.fused is not None and self.fused.accepts(x) and not (torch.is_grad_enabled() and x.requires_grad)

    def fused_step(self, x, f, t, dt, z, noise_scale, mask=None, tame_curvature: bool = True, sigma=None):
        """One lifted Euler(-Maruyama) step in one kernel, for the raw drift ``f = sde.drift(x, t)``:
        the same arithmetic as :func:`integrate`,
        ``x + dt P_x(f) + s P_x(z) + tame(-c (sigma^2/2) dt h(x), s)`` (ODE: ``x + dt P_x(f)``).
        ``sigma``: ``sigma(t)`` in ``x``'s dtype when the caller has it (else evaluated here)."""
        if self.is_ode:
            return self.fused.euler_update(x, f, dt, mask)
        coeff = 0.0
        if self._curvature is not None and self.curvature_factor != 0.0:
            sigma = self.sde.sigma(t).to(x.dtype) if sigma is None else sigma
            coeff = -self.curvature_factor * 0.5 * sigma.square() * dt
        return self.fused.lifted_update(x, f, z, dt, noise_scale, coeff, mask,
                                        tame_limit=noise_scale if tame_curvature else None)

    def projected_drift(self, x, t, mask=None):
        """``project_x(f(x, t))``."""
        return self._project(self.sde.drift(x, t, mask), x, mask)

    def curvature_drift(self, x, t, mask=None):
        """``-c (sigma(t)^2 / 2) curvature(x)`` (zeros for an ODE or without curvature)."""
        if self._curvature is None or self.curvature_factor == 0.0 or self.is_ode:
            return torch.zeros_like(x)
        sigma = self.sde.sigma(t).to(x.dtype)
        coeff = (self.curvature_factor * 0.5 * sigma.square()).reshape(*t.shape, 1, 1)
        return -coeff * self._curvature(x, mask)

    def drift(self, x, t, mask=None):
        """The full lifted drift ``project_x(f) - c (sigma^2/2) curvature(x)``."""
        return self.projected_drift(x, t, mask) + self.curvature_drift(x, t, mask)

    def sigma(self, t):
        return self.sde.sigma(t)

    def noise(self, x, z, mask=None):
        return self._project(z, x, mask)

    def __repr__(self) -> str:
        return f"ProjectedSDE({self.name}, {self.sde!r}, curvature_factor={self.curvature_factor})"


def time_grid(t0: float, t1: float, steps: int, *, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Uniform grid of ``steps + 1`` times from ``t0`` to ``t1``."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(float(t0), float(t1), steps + 1, dtype=dtype, device=device)


_METHODS = ("euler_maruyama", "heun")


def tame(increment: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Scale each configuration's ``increment`` ``(..., N, d)`` down to norm at most ``limit``
    (broadcastable to ``(..., 1, 1)``); no host synchronisation."""
    norm = increment.square().sum((-2, -1), keepdim=True).sqrt()
    scale = torch.clamp(limit / norm.clamp_min(torch.finfo(increment.dtype).tiny), max=1.0)
    return increment * scale


def integrate(
    sde,
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
    """Integrate ``sde`` (an :class:`SDE` or a lifted :class:`ProjectedSDE`) from ``x0``.

    Args:
        x0: ``(..., N, d)`` initial configurations (float32/float64, any device).
        t0, t1, steps: a uniform time grid (ignored when ``times`` is given).
        method: ``"euler_maruyama"`` or ``"heun"`` (ODEs only: raises for a non-zero diffusion).
        mask: ``(..., N)`` bool; padded points stay zero.
        generator: a ``torch.Generator`` on x0's device for reproducible noise.
        times: a 1-D tensor of times (monotone) to use instead of the uniform grid.
        return_trajectory: also return the states at every grid time, ``(len(times), ..., N, d)``.
        callback: called as ``callback(step, t, x)`` after each step (e.g. a progress bar).
        tame_curvature: limit the norm of each step's curvature increment ``-c (sigma^2/2) h dt``
            to the noise scale ``sigma sqrt(dt)`` (see :func:`tame`). Near the singular set |h|
            grows like 1/distance and an explicit Euler step overshoots; the limit binds only
            within O(sigma sqrt(dt)) of that set, so the scheme stays consistent as dt -> 0.

    Returns:
        ``x`` at the final time, or ``(x, trajectory)``.

    A lifted SDE keeps every increment horizontal, so the centre of mass never moves.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {_METHODS}")
    if method == "heun" and not sde.is_ode:
        raise ValueError(
            "method='heun' is for ODEs (zero diffusion); use 'euler_maruyama' for SDEs, or the EDM-style "
            "stochastic sampler of QuotientDiffusion.sample(sampler='edm')"
        )
    if times is None:
        times = time_grid(t0, t1, steps, dtype=x0.dtype, device=x0.device)
    times = times.to(dtype=x0.dtype, device=x0.device)
    batch_shape = x0.shape[:-2]
    x = apply_mask(x0, mask)
    trajectory = [x] if return_trajectory else None
    n_steps = times.shape[0] - 1
    # Split the lifted drift so that its curvature part can be tamed (Euler-Maruyama only).
    split = tame_curvature and method == "euler_maruyama" and not sde.is_ode and hasattr(sde, "curvature_drift")
    # One fused kernel per step (projections, curvature, tame, update) when the lifted SDE has one.
    fused = method == "euler_maruyama" and hasattr(sde, "fused_applies") and sde.fused_applies(x)
    for i in range(n_steps):
        t = times[i].expand(batch_shape)
        dt = times[i + 1] - times[i]
        if fused:
            f = sde.sde.drift(x, t, mask)  # the network call comes before the noise draw, as below
            z = noise_scale = sigma = None
            if not sde.is_ode:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                sigma = sde.sigma(t).to(x.dtype)  # once per step: the noise scale and the curvature
                noise_scale = sigma * dt.abs().sqrt()
            x = sde.fused_step(x, f, t, dt, z, noise_scale, mask, tame_curvature, sigma=sigma)
            if trajectory is not None:
                trajectory.append(x)
            if callback is not None:
                callback(i, times[i + 1], x)
            continue
        drift = sde.projected_drift(x, t, mask) if split else sde.drift(x, t, mask)
        if method == "heun":
            x_pred = x + dt * drift
            drift_next = sde.drift(x_pred, times[i + 1].expand(batch_shape), mask)
            x = x + 0.5 * dt * (drift + drift_next)
        elif sde.is_ode:
            x = x + dt * drift
        else:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            noise_scale = sde.sigma(t).to(x.dtype).reshape(*batch_shape, 1, 1) * dt.abs().sqrt()
            step = dt * drift + noise_scale * sde.noise(x, z, mask)
            if split:
                step = step + tame(dt * sde.curvature_drift(x, t, mask), noise_scale)
            x = x + step
        x = apply_mask(x, mask)
        if trajectory is not None:
            trajectory.append(x)
        if callback is not None:
            callback(i, times[i + 1], x)
    if trajectory is not None:
        return x, torch.stack(trajectory)
    return x
