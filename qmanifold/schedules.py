r"""Interpolants (noise schedules) for diffusion and flow matching, defined symbolically.

Conventions (binding across qmanifold)
--------------------------------------
Time ``t`` lies in ``[0, 1]``; ``t = 0`` is noise, ``t = 1`` is data.

*Gaussian-prior interpolant* (:class:`Interpolant`)::

    x_t = ahat(t) * eps + beta(t) * x1,        eps ~ N(0, I),  x1 ~ data,

with ``ahat(0) > 0``, ``beta(1) = 1`` and ``ahat(1) = 0`` (or small, e.g.
EDM's ``sigma_min``).  ``D(x_t, t) ~ E[x1 | x_t]`` is the denoiser.  Writing
``eps_hat = E[eps | x_t] = (x_t - beta D) / ahat`` and differentiating the
interpolant (``v = ahat' eps + beta' x1``), the marginal velocity and score are

.. math::

    v(x_t, t) &= \hat a'\,\hat\epsilon + \beta' D
               = \frac{\hat a'}{\hat a} x_t - \Big(\frac{\hat a'\beta}{\hat a} - \beta'\Big) D
               = \frac{\hat a' x_t + W D}{\hat a},\\
    s(x_t, t) &= -\frac{x_t - \beta D}{\hat a^2}, \qquad
    D = \frac{\hat a\, v - \hat a' x_t}{W},

where ``W = ahat * beta' - ahat' * beta = -beta^2 d/dt (ahat/beta)`` (the
Wronskian) is positive iff the noise-to-signal ratio ``sigma = ahat/beta``
decreases strictly; this is checked at construction on ``(0, t_max]``
(``W(0) = 0`` is tolerated, e.g. ``beta = t^2``; ``denoiser_from_velocity``
is then infinite at ``t = 0``, where the velocity does not depend on ``D``).

*General interpolant* (:class:`GeneralInterpolant`), e.g. for a harmonic
prior (ET-Flow, EigenFold)::

    x_t = alpha(t) * x0 + beta(t) * x1 + gamma(t) * eps,   (x0, x1) ~ coupling,
    target velocity  alpha' x0 + beta' x1 + gamma' eps.

Near ``t = 1``: the ``t_max`` policy
------------------------------------
``ahat(1) = 0`` for most schedules, so ``v``, ``s`` and ``D(v)`` contain a
``0/0`` at ``t = 1`` (and, e.g. for ``vp_linear``, ``ahat'`` diverges there).
The coefficient accessors ``ahat, beta, dahat, dbeta`` and ``sample_xt`` /
``target_velocity`` are *exact* on all of ``[0, 1]``.  The conversions
``velocity_from_denoiser``, ``score_from_denoiser``, ``eps_from_denoiser``,
``denoiser_from_velocity`` and the loss ``weight`` evaluate their
coefficients at ``t_eff = min(t, t_max)``: they are exact for ``t <= t_max``
and finite for every ``t`` in ``[0, 1]``; for ``t`` in ``(t_max, 1]`` they
use the frozen coefficients of ``t_max``.  ``t_max`` defaults to ``1`` when
``ahat(1) > 0`` (EDM) and to ``1 - 1e-4`` otherwise.  Samplers should not
integrate up to ``ahat = 0``: finish at ``t_max`` (or earlier) and, if
wanted, take a final denoising step ``x <- D(x, t_last)`` (this is EDM's last
Euler step to ``sigma = 0``).  At exactly ``t = 1`` the velocity is ill-posed
(it depends on the limit of ``(x_t - beta D)/ahat``), hence the clamp.

All methods are element-wise torch code lowered from sympy
(:mod:`qmanifold.symbolic`): they keep the dtype and device of their tensor
inputs, are differentiable, have no host syncs and no data-dependent Python
branches (except :func:`check_time`, meant for user-facing entry points).

References
----------
* Lipman et al. (2023), "Flow Matching for Generative Modeling";
  Liu et al. (2023), "Flow Straight and Fast" (rectified flow, ``linear``).
* Albergo, Boffi & Vanden-Eijnden (2023), "Stochastic Interpolants"
  (general interpolant, trigonometric ``vp_cosine``).
* Song et al. (2021), "Score-Based Generative Modeling through SDEs"
  (VP SDE with linear ``beta(s)``, ``vp_linear``); Nichol & Dhariwal (2021)
  (cosine schedule with offset).
* Karras et al. (2022), "Elucidating the Design Space of Diffusion-Based
  Generative Models" (``edm``: sigma schedule, rho-grid, preconditioning, loss
  weight).
* Hang et al. (2023), "Efficient Diffusion Training via Min-SNR Weighting".
* Jing et al. (2023), "EigenFold"; Hassan et al. (2024), "ET-Flow"
  (harmonic prior).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import sympy
import torch
from sympy.codegen.cfunctions import expm1

from .symbolic import LoweredFunction, T, as_sympy, lower

__all__ = [
    "Schedule",
    "Interpolant",
    "GeneralInterpolant",
    "HarmonicPrior",
    "IndependentCoupling",
    "check_time",
    "make_interpolant",
    "register_interpolant",
    "available_interpolants",
    "linear_interpolant",
    "vp_cosine_interpolant",
    "vp_linear_interpolant",
    "edm_interpolant",
    "edm_sigma",
    "edm_sigma_grid",
    "edm_time_grid",
    "edm_preconditioning",
    "WEIGHT_PRESETS",
    "DEFAULT_T_MAX",
]

#: Default ``t_max`` for schedules with ``ahat(1) = 0``.
DEFAULT_T_MAX = 1.0 - 1e-4

_GRID = 513  # validation grid size


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _exact(expr: sympy.Expr, value: float) -> float:
    """Evaluate ``expr`` at ``t = value`` with sympy (exact, then 30 digits)."""
    v = sympy.N(expr.xreplace({T: sympy.nsimplify(value)}), 30)
    try:
        return float(v)
    except TypeError:
        return float("nan")


def _time_for(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Return ``t`` in ``x``'s dtype/device, reshaped to broadcast over ``x``'s trailing dims.

    ``t`` of shape ``S`` (e.g. ``(B,)``) is viewed as ``S + (1,) * (x.ndim - len(S))``
    so that ``t`` indexes the *leading* dimensions of ``x`` (e.g. ``(B, N, d)``).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor for the state, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point state tensor, got dtype {x.dtype}")
    if isinstance(t, torch.Tensor):
        if t.dtype != x.dtype or t.device != x.device:
            t = t.to(device=x.device, dtype=x.dtype)
    elif isinstance(t, numbers.Real) and not isinstance(t, bool):
        t = torch.full((), float(t), dtype=x.dtype, device=x.device)
    else:
        raise TypeError(f"t must be a tensor or a real number, got {type(t).__name__}")
    if t.ndim > x.ndim:
        raise ValueError(f"t has shape {tuple(t.shape)}, more dims than the state {tuple(x.shape)}; "
                         "t must index the leading dimensions of the state, e.g. (B,) for (B, N, d)")
    if t.ndim and t.ndim < x.ndim:
        t = t.reshape(t.shape + (1,) * (x.ndim - t.ndim))
    return t


def check_time(t: Any, name: str = "t") -> Any:
    """Raise ``ValueError`` unless every entry of ``t`` is finite and in ``[0, 1]``.

    For user-facing entry points only: on a tensor this performs a host sync
    (one ``bool`` of a reduction).  Returns ``t`` unchanged.
    """
    if isinstance(t, bool):
        raise TypeError(f"{name} must be a number or tensor, got a bool")
    if isinstance(t, numbers.Real):
        tf = float(t)
        if not math.isfinite(tf) or not 0.0 <= tf <= 1.0:
            raise ValueError(f"{name} must be finite and in [0, 1] (0 = noise, 1 = data), got {tf}")
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a number or tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        return t
    tt = t.detach()
    ok = torch.isfinite(tt).all() & (tt >= 0).all() & (tt <= 1).all()
    if not bool(ok):  # host sync (documented)
        finite = tt[torch.isfinite(tt)]
        lo = float(finite.min()) if finite.numel() else float("nan")
        hi = float(finite.max()) if finite.numel() else float("nan")
        n_bad = int((~torch.isfinite(tt)).sum())
        raise ValueError(f"{name} must be finite and in [0, 1] (0 = noise, 1 = data); got min {lo}, max {hi}"
                         + (f", {n_bad} non-finite entries" if n_bad else ""))
    return t


def _rational(x: float | sympy.Expr, name: str) -> sympy.Expr:
    """Exact sympy number for a user parameter (``0.1`` -> ``1/10``)."""
    if isinstance(x, sympy.Basic):
        if x.free_symbols:
            raise ValueError(f"{name} must be a number, got {x}")
        return x
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    if not math.isfinite(float(x)):
        raise ValueError(f"{name} must be finite, got {x}")
    if isinstance(x, numbers.Integral):
        return sympy.Integer(int(x))
    return sympy.Rational(repr(float(x)))


# ---------------------------------------------------------------------------
# Schedule: one scalar function of t
# ---------------------------------------------------------------------------


class Schedule:
    """A scalar function of time ``f(t)`` given symbolically, lowered to torch.

    Args:
        expr: number, sympy expression in :data:`~qmanifold.symbolic.T` or a
            string such as ``"cos(pi*t/2)"``.
        name: used in error messages and ``repr``.

    Calling ``s(t)`` evaluates element-wise on a tensor ``t`` of any shape
    (same shape, dtype and device back).  ``s.derivative`` is the exact
    derivative as another :class:`Schedule` (cached).
    """

    def __init__(self, expr: Any, name: str = "f"):
        self.name = name
        self.expr: sympy.Expr = as_sympy(expr, T, name=name)
        self.fn: LoweredFunction = lower(self.expr, T)
        self._derivative: Schedule | None = None

    def __call__(self, t: torch.Tensor | float) -> torch.Tensor:
        return self.fn(t)

    @property
    def derivative(self) -> Schedule:
        if self._derivative is None:
            self._derivative = Schedule(sympy.diff(self.expr, T), name=f"d{self.name}")
        return self._derivative

    def at(self, value: float) -> float:
        """Exact value at a Python number ``t = value`` (sympy evaluation)."""
        return _exact(self.expr, value)

    def __repr__(self) -> str:
        return f"Schedule({self.name}(t) = {self.expr})"


# ---------------------------------------------------------------------------
# loss weights
# ---------------------------------------------------------------------------

#: Named loss weights ``w(t)`` for the denoiser (x1-prediction) loss
#: ``w(t) * |D(x_t, t) - x1|^2``.  Each maps the schedule expressions to a
#: sympy expression:
#:
#: * ``"velocity"`` -- ``(W / ahat)^2``: makes the loss *equal* to the
#:   velocity MSE ``|v(D) - v(x1)|^2`` of :meth:`Interpolant.velocity_from_denoiser`
#:   (for ``t <= t_max``); ``linear``: ``1/(1-t)^2``; VP: ``beta'^2/ahat^4``.
#: * ``"uniform"`` -- ``1`` (plain x1-MSE).
#: * ``"snr"`` -- ``beta^2/ahat^2``, equivalent to the eps-prediction MSE.
#: * ``"min_snr"`` -- ``Min(snr, 5)`` (Hang et al. 2023, gamma = 5).
#: * ``"edm"`` -- ``1/sigma^2 + 1/sigma_data^2`` with ``sigma = ahat/beta`` and
#:   ``sigma_data = 1/2`` (Karras et al. 2022, eq. 8 / Table 1).
WEIGHT_PRESETS: dict[str, Callable[[dict[str, sympy.Expr]], sympy.Expr]] = {
    "velocity": lambda e: (e["W"] / e["ahat"]) ** 2,
    "uniform": lambda e: sympy.Integer(1),
    "snr": lambda e: e["snr"],
    "min_snr": lambda e: sympy.Min(e["snr"], 5),
    "edm": lambda e: 1 / e["sigma"] ** 2 + 4,
}


# ---------------------------------------------------------------------------
# Gaussian-prior interpolant
# ---------------------------------------------------------------------------


class Interpolant:
    r"""Gaussian-prior interpolant ``x_t = ahat(t) eps + beta(t) x1`` (t = 0 noise, t = 1 data).

    Args:
        ahat: noise coefficient (number, sympy expression in ``t`` or string,
            e.g. ``"1 - t"``).  Must satisfy ``ahat(0) > 0`` and
            ``|ahat(1)| <= end_tol``, and ``ahat > 0`` on ``[0, t_max]``.
        beta: data coefficient; must satisfy ``beta(1) = 1`` (to 1e-6).
        weight: loss weight: a key of :data:`WEIGHT_PRESETS` (default
            ``"velocity"``), or an expression in ``t`` which may also use the
            names ``ahat, beta, dahat, dbeta, sigma (= ahat/beta),
            snr (= beta^2/ahat^2)``, e.g. ``"Min(snr, 5)"``.
        weight_max: clamp applied to the weight (``None``: no clamp).  Default
            ``1e3`` keeps e.g. the ``linear`` velocity weight ``1/(1-t)^2``
            bounded (it clamps for ``t > 0.968``).
        t_max: coefficients of the D/v/score conversions and of the weight are
            evaluated at ``min(t, t_max)`` (see module docstring).  Default:
            ``1`` if ``ahat(1) > 0`` else :data:`DEFAULT_T_MAX`.
        name: label.
        end_tol: tolerance for ``ahat(1) = 0``.
        validate: run the symbolic/numeric checks (raise ``ValueError``).

    Attributes:
        ahat_expr, beta_expr, dahat_expr, dbeta_expr, wronskian_expr,
        weight_expr: sympy expressions in :data:`~qmanifold.symbolic.T`.

    Shapes: coefficient methods map ``t`` of any shape to the same shape.
    State methods take ``x`` of shape ``(B, *S)`` (e.g. ``(B, N, d)``) and
    ``t`` of shape ``(B,)`` (or any prefix of ``x.shape``, or a scalar); ``t`` is
    broadcast over the trailing dims and cast to ``x``'s dtype/device.
    """

    def __init__(
        self,
        ahat: Any,
        beta: Any,
        *,
        weight: Any = "velocity",
        weight_max: float | None = 1e3,
        t_max: float | None = None,
        name: str | None = None,
        end_tol: float = 1e-2,
        validate: bool = True,
    ):
        self.name = name or "custom"
        self.ahat_schedule = Schedule(ahat, "ahat")
        self.beta_schedule = Schedule(beta, "beta")
        self.dahat_schedule = self.ahat_schedule.derivative
        self.dbeta_schedule = self.beta_schedule.derivative
        a, b = self.ahat_schedule.expr, self.beta_schedule.expr
        da, db = self.dahat_schedule.expr, self.dbeta_schedule.expr
        self.ahat_expr, self.beta_expr, self.dahat_expr, self.dbeta_expr = a, b, da, db
        self.wronskian_expr: sympy.Expr = a * db - da * b
        self._W = lower(self.wronskian_expr, T)
        env = {"ahat": a, "beta": b, "dahat": da, "dbeta": db, "sigma": a / b, "snr": b**2 / a**2,
               "W": self.wronskian_expr}
        if isinstance(weight, str) and weight in WEIGHT_PRESETS:
            self.weight_name = weight
            self.weight_expr = WEIGHT_PRESETS[weight](env)
        else:
            self.weight_name = "custom"
            local = {k: v for k, v in env.items() if k != "W"}
            self.weight_expr = as_sympy(weight, T, name="weight", extra_locals=local)
        self._weight = lower(self.weight_expr, T)
        if weight_max is not None:
            weight_max = float(weight_max)
            if not weight_max > 0:
                raise ValueError(f"weight_max must be positive or None, got {weight_max}")
        self.weight_max = weight_max

        a1 = self.ahat_schedule.at(1)
        if t_max is None:
            t_max = 1.0 if (math.isfinite(a1) and a1 > 0) else DEFAULT_T_MAX
        t_max = float(t_max)
        if not 0.0 < t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {t_max}")
        self.t_max = t_max
        if validate:
            self._validate(end_tol)

    # -- validation --------------------------------------------------------
    def _validate(self, end_tol: float) -> None:
        n = self.name
        a0 = self.ahat_schedule.at(0)
        a1 = self.ahat_schedule.at(1)
        b1 = self.beta_schedule.at(1)
        if not (math.isfinite(a0) and a0 > 0):
            raise ValueError(f"interpolant {n!r}: ahat(0) = {a0} (ahat = {self.ahat_expr}) must be > 0: "
                             "t = 0 is pure noise")
        if not (math.isfinite(b1) and abs(b1 - 1.0) <= 1e-6):
            raise ValueError(f"interpolant {n!r}: beta(1) = {b1} (beta = {self.beta_expr}) must equal 1: "
                             "t = 1 is data")
        if not (math.isfinite(a1) and abs(a1) <= end_tol):
            raise ValueError(f"interpolant {n!r}: ahat(1) = {a1} (ahat = {self.ahat_expr}) must be 0 "
                             f"(|ahat(1)| <= end_tol = {end_tol}): t = 1 is data")
        tg = torch.linspace(0.0, self.t_max, _GRID, dtype=torch.float64)
        vals = {
            "ahat": self.ahat(tg), "beta": self.beta(tg), "dahat": self.dahat(tg), "dbeta": self.dbeta(tg),
            "ahat*dbeta - dahat*beta": self.wronskian(tg), "weight": self.weight(tg),
        }
        for k, v in vals.items():
            if not bool(torch.isfinite(v).all()):
                bad = tg[~torch.isfinite(v)][0].item()
                raise ValueError(f"interpolant {n!r}: {k} is not finite at t = {bad:.6g} "
                                 f"(checked on [0, t_max = {self.t_max}])")
        if not bool((vals["ahat"] > 0).all()):
            bad = tg[vals["ahat"] <= 0][0].item()
            raise ValueError(f"interpolant {n!r}: ahat must be > 0 on [0, t_max = {self.t_max}], "
                             f"but ahat({bad:.6g}) <= 0")
        W = vals["ahat*dbeta - dahat*beta"]
        bad_w = (W < 0) | ((W <= 0) & (tg > 0))  # W = 0 tolerated at t = 0 only (e.g. beta = t^2)
        if bool(bad_w.any()):
            bad = tg[bad_w][0].item()
            raise ValueError(f"interpolant {n!r}: the noise-to-signal ratio ahat/beta must be strictly "
                             f"decreasing (W = ahat*beta' - ahat'*beta > 0 on (0, t_max]), "
                             f"violated at t = {bad:.6g}")
        if not bool((vals["weight"] >= 0).all()):
            raise ValueError(f"interpolant {n!r}: weight {self.weight_expr} must be >= 0 on [0, 1]")

    # -- coefficients (exact, any shape) -----------------------------------
    def ahat(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise coefficient ``ahat(t)``; same shape as ``t``."""
        return self.ahat_schedule.fn(t)

    def beta(self, t: torch.Tensor | float) -> torch.Tensor:
        """Data coefficient ``beta(t)``; same shape as ``t``."""
        return self.beta_schedule.fn(t)

    def dahat(self, t: torch.Tensor | float) -> torch.Tensor:
        """``d ahat / dt`` (symbolic derivative); same shape as ``t``."""
        return self.dahat_schedule.fn(t)

    def dbeta(self, t: torch.Tensor | float) -> torch.Tensor:
        """``d beta / dt`` (symbolic derivative); same shape as ``t``."""
        return self.dbeta_schedule.fn(t)

    def wronskian(self, t: torch.Tensor | float) -> torch.Tensor:
        """``W(t) = ahat beta' - ahat' beta`` (> 0); same shape as ``t``."""
        return self._W(t)

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise-to-signal ratio ``sigma(t) = ahat/beta`` (EDM's sigma; ``inf`` where ``beta = 0``)."""
        return self.ahat(t) / self.beta(t)

    def snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal-to-noise ratio ``beta^2 / ahat^2``."""
        return torch.square(self.beta(t) / self.ahat(t))

    def _t_eff(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(max=self.t_max) if self.t_max < 1.0 else t

    def weight(self, t: torch.Tensor | float) -> torch.Tensor:
        """Loss weight ``min(w(min(t, t_max)), weight_max)`` for ``w(t) |D - x1|^2``; shape of ``t``."""
        if not isinstance(t, torch.Tensor):
            t = torch.full((), float(t), dtype=torch.get_default_dtype())
        w = self._weight(self._t_eff(t))
        return w.clamp(max=self.weight_max) if self.weight_max is not None else w

    # -- states ---------------------------------------------------------------
    def sample_xt(self, x1: torch.Tensor, t: torch.Tensor | float, eps: torch.Tensor) -> torch.Tensor:
        """``x_t = ahat(t) eps + beta(t) x1``.  ``x1, eps: (B, *S)``, ``t: (B,)`` -> ``(B, *S)``."""
        tt = _time_for(t, x1)
        return self.ahat(tt) * eps + self.beta(tt) * x1

    def target_velocity(self, x1: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Conditional velocity ``d x_t / dt = ahat'(t) eps + beta'(t) x1``; shape of ``x1``."""
        tt = _time_for(t, x1)
        return self.dahat(tt) * eps + self.dbeta(tt) * x1

    def velocity_from_denoiser(self, x_t: torch.Tensor, D: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        r"""Marginal velocity from the denoiser: ``v = (ahat' x_t + W D) / ahat``.

        Equal to ``(ahat'/ahat) x_t - (ahat' beta/ahat - beta') D``.  Finite on
        ``[0, 1]``; exact for ``t <= t_max`` (coefficients frozen at ``t_max``
        beyond).  ``x_t, D: (B, *S)``, ``t: (B,)`` -> ``(B, *S)``.
        """
        tt = self._t_eff(_time_for(t, x_t))
        return (self.dahat(tt) * x_t + self.wronskian(tt) * D) / self.ahat(tt)

    def eps_from_denoiser(self, x_t: torch.Tensor, D: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Noise estimate ``E[eps | x_t] = (x_t - beta D) / ahat`` (``t`` clamped to ``t_max``)."""
        tt = self._t_eff(_time_for(t, x_t))
        return (x_t - self.beta(tt) * D) / self.ahat(tt)

    def score_from_denoiser(self, x_t: torch.Tensor, D: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Score ``grad log p_t(x_t) = -(x_t - beta D) / ahat^2`` (Tweedie; ``t`` clamped to ``t_max``)."""
        tt = self._t_eff(_time_for(t, x_t))
        return -(x_t - self.beta(tt) * D) / torch.square(self.ahat(tt))

    def denoiser_from_velocity(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`velocity_from_denoiser`: ``D = (ahat v - ahat' x_t) / W`` (``t`` clamped)."""
        tt = self._t_eff(_time_for(t, x_t))
        return (self.ahat(tt) * v - self.dahat(tt) * x_t) / self.wronskian(tt)

    # -- misc -----------------------------------------------------------------
    def time_from_sigma(self, sigma: torch.Tensor, iters: int = 64) -> torch.Tensor:
        """Invert ``sigma(t) = ahat/beta`` by vectorised bisection on ``[0, 1]``.

        ``sigma`` of any shape (values outside ``[sigma(1), sigma(0)]`` map to
        the nearest end).  Returns ``t`` with ``sigma``'s shape/dtype/device.
        No host syncs (fixed ``iters``).
        """
        if not isinstance(sigma, torch.Tensor) or not sigma.is_floating_point():
            raise TypeError("time_from_sigma(): sigma must be a floating-point tensor")
        lo = torch.zeros_like(sigma)
        hi = torch.ones_like(sigma)
        for _ in range(int(iters)):
            mid = 0.5 * (lo + hi)
            above = self.ahat(mid) > sigma * self.beta(mid)  # sigma(mid) > target -> go right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def as_general(self) -> GeneralInterpolant:
        """The same interpolant as a :class:`GeneralInterpolant` with ``x0 = eps``, ``gamma = 0``."""
        return GeneralInterpolant(self.ahat_expr, self.beta_expr, 0, name=self.name, validate=False)

    def __repr__(self) -> str:
        return (f"Interpolant({self.name!r}: ahat = {self.ahat_expr}, beta = {self.beta_expr}, "
                f"weight = {self.weight_name}, t_max = {self.t_max})")


# ---------------------------------------------------------------------------
# named interpolants
# ---------------------------------------------------------------------------


def linear_interpolant(**kwargs: Any) -> Interpolant:
    """Rectified flow / conditional OT: ``ahat = 1 - t``, ``beta = t`` (``W = 1``)."""
    return Interpolant(1 - T, T, name=kwargs.pop("name", "linear"), **kwargs)


def vp_cosine_interpolant(offset: float = 0.0, **kwargs: Any) -> Interpolant:
    r"""Variance-preserving cosine schedule (``ahat^2 + beta^2 = 1``).

    ``offset = 0`` (default; trigonometric interpolant of Albergo et al.)::

        beta = sin(pi t / 2),   ahat = cos(pi t / 2),   W = pi / 2.

    ``offset = s > 0`` (Nichol & Dhariwal 2021, ``alpha_bar(u) = f(u)/f(0)``,
    ``f(u) = cos(pi/2 (u + s)/(1 + s))^2`` with diffusion time ``u = 1 - t``)::

        theta = pi/2 (1 - t + s)/(1 + s),   theta0 = pi/2 s/(1 + s),
        beta = cos(theta) / cos(theta0),
        ahat = sqrt(1 - beta^2) = sqrt(max(sin(theta + theta0) sin(theta - theta0), 0)) / cos(theta0).
    """
    s = _rational(offset, "offset")
    if s < 0:
        raise ValueError(f"vp_cosine: offset must be >= 0, got {offset}")
    if s == 0:
        ahat, beta = sympy.cos(sympy.pi * T / 2), sympy.sin(sympy.pi * T / 2)
    else:
        th, th0 = sympy.pi / 2 * (1 - T + s) / (1 + s), sympy.pi / 2 * s / (1 + s)
        beta = sympy.cos(th) / sympy.cos(th0)
        # 1 - beta^2 = sin(th + th0) sin(th - th0) / cos(th0)^2 (no cancellation near t = 1); the
        # Max(., 0) absorbs the +-1e-17 rounding of the factor that vanishes at t = 1.
        ahat = sympy.sqrt(sympy.Max(sympy.sin(th + th0) * sympy.sin(th - th0), 0)) / sympy.cos(th0)
    return Interpolant(ahat, beta, name=kwargs.pop("name", "vp_cosine"), **kwargs)


def vp_linear_interpolant(beta_min: float = 0.1, beta_max: float = 20.0, **kwargs: Any) -> Interpolant:
    r"""VP SDE with linear noise rate ``b(u) = beta_min + u (beta_max - beta_min)`` (Song et al. 2021).

    With diffusion time ``u = 1 - t`` the VP-SDE mean coefficient is
    ``exp(-int_0^u b / 2)``, so with
    ``g(t) = beta_min (1 - t) / 2 + (beta_max - beta_min) (1 - t)^2 / 4``::

        beta(t) = exp(-g(t)),    ahat(t) = sqrt(1 - exp(-2 g(t))) = sqrt(-expm1(-2 g(t))),

    (``expm1`` for accuracy near ``t = 1``).  ``beta(0) = exp(-5.025) ~ 6.6e-3``
    for the defaults; ``ahat ~ sqrt(beta_min (1 - t))`` near ``t = 1``, so
    ``ahat'`` diverges there (handled by ``t_max``).
    """
    bmin, bmax = _rational(beta_min, "beta_min"), _rational(beta_max, "beta_max")
    if not (bmin > 0 and bmax >= bmin):
        raise ValueError(f"vp_linear: need 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
    u = 1 - T
    g = bmin * u / 2 + (bmax - bmin) * u**2 / 4
    return Interpolant(sympy.sqrt(-expm1(-2 * g)), sympy.exp(-g), name=kwargs.pop("name", "vp_linear"), **kwargs)


def edm_sigma(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> sympy.Expr:
    r"""EDM noise level as a sympy expression in ``t`` (Karras et al. 2022, eq. 5, continuous):

    ``sigma(t) = (sigma_max^(1/rho) + t (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    so ``sigma(0) = sigma_max`` (noise) and ``sigma(1) = sigma_min`` (data).
    """
    smin, smax, r = _rational(sigma_min, "sigma_min"), _rational(sigma_max, "sigma_max"), _rational(rho, "rho")
    if not (0 < smin < smax):
        raise ValueError(f"edm: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not r > 0:
        raise ValueError(f"edm: rho must be > 0, got {rho}")
    return (smax ** (1 / r) + T * (smin ** (1 / r) - smax ** (1 / r))) ** r


def edm_interpolant(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                    sigma_data: float = 0.5, **kwargs: Any) -> Interpolant:
    r"""EDM (Karras et al. 2022) as an interpolant: ``ahat = sigma(t)``, ``beta = 1``.

    ``x_t = x1 + sigma(t) eps`` is EDM's (variance-exploding, ``s(t) = 1``)
    perturbation with ``sigma(t)`` from :func:`edm_sigma` (rho-warped time, so
    a uniform grid in ``t`` *is* Karras' step grid).  The velocity
    ``v = (sigma'/sigma)(x_t - D)`` is exactly EDM's probability-flow ODE
    ``dx/dsigma = (x - D)/sigma`` in the time ``t``.  ``ahat(1) = sigma_min > 0``
    so ``t_max = 1``.  Networks should use :func:`edm_preconditioning`.

    Default weight: EDM's ``lambda(sigma) = 1/sigma^2 + 1/sigma_data^2``
    (``weight_max = None``).
    """
    sig = edm_sigma(sigma_min, sigma_max, rho)
    sd = _rational(sigma_data, "sigma_data")
    if not sd > 0:
        raise ValueError(f"edm: sigma_data must be > 0, got {sigma_data}")
    kwargs.setdefault("weight", 1 / sig**2 + 1 / sd**2)
    kwargs.setdefault("weight_max", None)
    interp = Interpolant(sig, sympy.Integer(1), name=kwargs.pop("name", "edm"), **kwargs)
    if interp.weight_name == "custom" and interp.weight_expr == 1 / sig**2 + 1 / sd**2:
        interp.weight_name = "edm"
    interp.edm_params = {"sigma_min": float(sigma_min), "sigma_max": float(sigma_max), "rho": float(rho),
                         "sigma_data": float(sigma_data)}
    return interp


def edm_sigma_grid(steps: int, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0, *,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 noise levels ``sigma_i``, ``i = 0..steps-1`` (decreasing).

    ``sigma_i = (sigma_max^(1/rho) + i/(steps-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``.
    EDM's sampler appends ``sigma_N = 0`` (i.e. a final step ``x <- D(x)``),
    which is not included here.  Shape ``(steps,)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if not (0 < sigma_min < sigma_max) or not rho > 0:
        raise ValueError(f"need 0 < sigma_min < sigma_max and rho > 0, got {sigma_min}, {sigma_max}, {rho}")
    dtype = dtype or torch.get_default_dtype()
    i = torch.linspace(0.0, 1.0, int(steps), dtype=torch.float64, device=device)
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    return ((a + i * (b - a)) ** rho).to(dtype)


def edm_time_grid(steps: int, rho: float = 7.0, sigma_min: float = 0.002, sigma_max: float = 80.0, *,
                  interpolant: Interpolant | None = None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """EDM step grid as increasing times ``t_i`` in ``[0, 1]`` (shape ``(steps,)``).

    ``t_i`` solves ``interpolant.sigma(t_i) = sigma_i`` of :func:`edm_sigma_grid`
    (bisection; sigmas out of the interpolant's range map to ``0`` / ``1``).
    With ``interpolant=None`` the target is the ``edm`` interpolant with the
    same ``(sigma_min, sigma_max, rho)``, for which the grid is exactly
    ``linspace(0, 1, steps)``.  Works for any interpolant (e.g. EDM spacing
    for ``vp_cosine`` via its ``sigma = ahat/beta``).

    Heun in ``t`` on this grid integrates the same ODE as Karras' Algorithm 1
    but is not bit-identical to it (Karras steps in ``sigma``); to reproduce
    it exactly use ``sigma_i = interpolant.sigma(t_i)`` and ``d = (x - D)/sigma``.
    The last point has ``sigma = sigma_min``; finish with ``x <- D(x, t_last)``.
    """
    sig = edm_sigma_grid(steps, rho, sigma_min, sigma_max, dtype=torch.float64, device=device)
    dtype = dtype or torch.get_default_dtype()
    if interpolant is None:
        return torch.linspace(0.0, 1.0, int(steps), dtype=dtype, device=device)
    if not isinstance(interpolant, Interpolant):
        raise TypeError(f"interpolant must be an Interpolant, got {type(interpolant).__name__}")
    return interpolant.time_from_sigma(sig).to(dtype)


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float = 0.5
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM network preconditioning (Karras et al. 2022, Table 1).

    ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with
    ``c_skip = sd^2/(sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1/sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma)/4``.
    Returns the four tensors with ``sigma``'s shape/dtype/device.
    """
    sd2 = float(sigma_data) ** 2
    s2 = torch.square(sigma)
    rs = torch.rsqrt(s2 + sd2)
    return sd2 / (s2 + sd2), sigma * float(sigma_data) * rs, rs, 0.25 * torch.log(sigma)


_REGISTRY: dict[str, Callable[..., Interpolant]] = {
    "linear": linear_interpolant,
    "vp_cosine": vp_cosine_interpolant,
    "vp_linear": vp_linear_interpolant,
    "edm": edm_interpolant,
}


def available_interpolants() -> tuple[str, ...]:
    """Names accepted by :func:`make_interpolant` (sorted)."""
    return tuple(sorted(_REGISTRY))


def register_interpolant(name: str, factory: Callable[..., Interpolant], *, overwrite: bool = False) -> None:
    """Register ``factory(**kwargs) -> Interpolant`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError("register_interpolant(): name must be a non-empty string")
    if not callable(factory):
        raise TypeError("register_interpolant(): factory must be callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"interpolant {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def make_interpolant(name: str, **kwargs: Any) -> Interpolant:
    """Build a named interpolant: ``"linear"``, ``"vp_cosine"``, ``"vp_linear"``, ``"edm"`` (+ registered).

    ``kwargs`` go to the factory (schedule parameters and :class:`Interpolant`
    options such as ``weight``, ``weight_max``, ``t_max``).
    """
    if not isinstance(name, str):
        raise TypeError(f"interpolant name must be a string, got {type(name).__name__}")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown interpolant {name!r}; available: {', '.join(available_interpolants())}") from None
    return factory(**kwargs)


# ---------------------------------------------------------------------------
# general interpolant, priors, couplings
# ---------------------------------------------------------------------------


class IndependentCoupling:
    """Independent coupling ``(x0, x1) ~ p0 x p1``: returns the pair unchanged.

    A coupling is any callable ``(x0, x1, mask) -> (x0, x1)``.  Note: a
    Kabsch/OT-aligned coupling (rotating ``x0`` onto ``x1`` before
    interpolating, as in ET-Flow) belongs with the group/quotient code and is
    deliberately not implemented here.
    """

    def __call__(self, x0: torch.Tensor, x1: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return x0, x1

    def __repr__(self) -> str:
        return "IndependentCoupling()"


class GeneralInterpolant:
    r"""``x_t = alpha(t) x0 + beta(t) x1 + gamma(t) eps`` with ``x0`` from a prior (velocity-parameterised).

    Args:
        alpha, beta, gamma: expressions in ``t`` (numbers, sympy or strings).
            Checks: ``beta(1) = 1``; ``|alpha(1)|, |gamma(1)| <= end_tol``;
            ``alpha(0) > 0`` or ``gamma(0) > 0``; all three finite on ``[0, 1]``
            and their derivatives finite on the open interval (``gamma`` may be
            e.g. ``sigma*sqrt(t*(1-t))``, whose derivative diverges at the ends).
        prior: optional object with ``sample(...)`` (e.g. :class:`HarmonicPrior`).
        coupling: callable ``(x0, x1, mask) -> (x0, x1)``; default
            :class:`IndependentCoupling`.

    State methods take ``x0, x1, eps: (B, *S)`` and ``t: (B,)`` (broadcast
    over trailing dims, cast to ``x1``'s dtype/device).
    """

    def __init__(self, alpha: Any, beta: Any, gamma: Any = 0, *, prior: Any = None,
                 coupling: Callable | None = None, name: str | None = None, end_tol: float = 1e-2,
                 validate: bool = True):
        self.name = name or "general"
        self.alpha_schedule = Schedule(alpha, "alpha")
        self.beta_schedule = Schedule(beta, "beta")
        self.gamma_schedule = Schedule(gamma, "gamma")
        self.dalpha_schedule = self.alpha_schedule.derivative
        self.dbeta_schedule = self.beta_schedule.derivative
        self.dgamma_schedule = self.gamma_schedule.derivative
        self.alpha_expr, self.beta_expr, self.gamma_expr = (
            self.alpha_schedule.expr, self.beta_schedule.expr, self.gamma_schedule.expr)
        self.has_noise = self.gamma_expr != 0
        self.prior = prior
        self.coupling = coupling if coupling is not None else IndependentCoupling()
        if not callable(self.coupling):
            raise TypeError("coupling must be callable (x0, x1, mask) -> (x0, x1)")
        if validate:
            self._validate(end_tol)

    def _validate(self, end_tol: float) -> None:
        n = self.name
        b1 = self.beta_schedule.at(1)
        if not (math.isfinite(b1) and abs(b1 - 1.0) <= 1e-6):
            raise ValueError(f"interpolant {n!r}: beta(1) = {b1} (beta = {self.beta_expr}) must equal 1")
        for sch in (self.alpha_schedule, self.gamma_schedule):
            v1 = sch.at(1)
            if not (math.isfinite(v1) and abs(v1) <= end_tol):
                raise ValueError(f"interpolant {n!r}: {sch.name}(1) = {v1} ({sch.name} = {sch.expr}) must be 0 "
                                 f"(|.| <= end_tol = {end_tol}): t = 1 is data")
        a0, g0 = self.alpha_schedule.at(0), self.gamma_schedule.at(0)
        if not ((math.isfinite(a0) and a0 > 0) or (math.isfinite(g0) and g0 > 0)):
            raise ValueError(f"interpolant {n!r}: need alpha(0) > 0 or gamma(0) > 0 (t = 0 is the prior/noise), "
                             f"got alpha(0) = {a0}, gamma(0) = {g0}")
        tg = torch.linspace(0.0, 1.0, _GRID, dtype=torch.float64)
        ti = tg[1:-1]
        for sch in (self.alpha_schedule, self.beta_schedule, self.gamma_schedule):
            if not bool(torch.isfinite(sch(tg)).all()):
                raise ValueError(f"interpolant {n!r}: {sch.name} = {sch.expr} is not finite on [0, 1]")
            if not bool(torch.isfinite(sch.derivative(ti)).all()):
                raise ValueError(f"interpolant {n!r}: d{sch.name}/dt is not finite on (0, 1)")

    # coefficients
    def alpha(self, t):
        """``alpha(t)``, shape of ``t``."""
        return self.alpha_schedule.fn(t)

    def beta(self, t):
        """``beta(t)``, shape of ``t``."""
        return self.beta_schedule.fn(t)

    def gamma(self, t):
        """``gamma(t)``, shape of ``t``."""
        return self.gamma_schedule.fn(t)

    def dalpha(self, t):
        """``alpha'(t)``, shape of ``t``."""
        return self.dalpha_schedule.fn(t)

    def dbeta(self, t):
        """``beta'(t)``, shape of ``t``."""
        return self.dbeta_schedule.fn(t)

    def dgamma(self, t):
        """``gamma'(t)``, shape of ``t``."""
        return self.dgamma_schedule.fn(t)

    def _check_eps(self, eps):
        if eps is None and self.has_noise:
            raise ValueError(f"interpolant {self.name!r} has gamma = {self.gamma_expr} != 0: eps is required")

    def sample_xt(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor | float,
                  eps: torch.Tensor | None = None) -> torch.Tensor:
        """``x_t = alpha x0 + beta x1 + gamma eps`` (``eps`` may be None iff ``gamma == 0``); shape of ``x1``."""
        self._check_eps(eps)
        tt = _time_for(t, x1)
        out = self.alpha(tt) * x0 + self.beta(tt) * x1
        return out + self.gamma(tt) * eps if eps is not None and self.has_noise else out

    def target_velocity(self, x0: torch.Tensor, x1: torch.Tensor, eps: torch.Tensor | None,
                        t: torch.Tensor | float) -> torch.Tensor:
        """``alpha' x0 + beta' x1 + gamma' eps`` (``eps`` may be None iff ``gamma == 0``); shape of ``x1``."""
        self._check_eps(eps)
        tt = _time_for(t, x1)
        out = self.dalpha(tt) * x0 + self.dbeta(tt) * x1
        return out + self.dgamma(tt) * eps if eps is not None and self.has_noise else out

    def sample_prior(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``self.prior.sample(*args, **kwargs)``."""
        if self.prior is None:
            raise ValueError(f"interpolant {self.name!r} has no prior; pass prior=... or supply x0 yourself")
        return self.prior.sample(*args, **kwargs)

    def couple(self, x0: torch.Tensor, x1: torch.Tensor, mask: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the coupling to a batch of prior/data pairs."""
        return self.coupling(x0, x1, mask)

    def __repr__(self) -> str:
        return (f"GeneralInterpolant({self.name!r}: alpha = {self.alpha_expr}, beta = {self.beta_expr}, "
                f"gamma = {self.gamma_expr}, prior = {self.prior!r}, coupling = {self.coupling!r})")


class HarmonicPrior:
    r"""Harmonic (bond-graph) Gaussian prior on point clouds (EigenFold; ET-Flow).

    For one molecule with valid atoms ``V`` (``n = |V|``), adjacency ``A`` and
    graph Laplacian ``L = diag(A 1) - A``, the per-coordinate precision is
    ``Q = stiffness * L + reg * I``.  A sample is ``x = P Q^{-1/2} z`` with
    ``z ~ N(0, I)`` of shape ``(N, dim)``, ``Q^{-1/2} = U diag(lambda^{-1/2}) U^T``
    from the eigendecomposition ``Q = U diag(lambda) U^T`` and
    ``P = I - 1 1^T / n`` the centre-of-mass projector, so that each of the
    ``dim`` coordinates is ``N(0, C)`` with

    .. math:: C = P\,(k L + r I)^{-1} P = \sum_{i:\,u_i \perp 1} \frac{u_i u_i^T}{k\lambda_i(L) + r},

    i.e. the regularised pseudo-inverse of ``k L``.  ``reg`` keeps ``Q``
    invertible and sets the spread ``1/sqrt(reg)`` of disconnected fragments.
    Padded atoms get zeros.  The symmetric square root makes each batch
    element depend only on its own valid entries of ``z`` (batched =
    per-item).  Energy: ``E(x) = k/2 sum_{ij in bonds} |x_i - x_j|^2 + r/2 |x|^2``;
    for an isolated bond ``E|x_i - x_j|^2 = 2 dim / (2k + r) ~ dim / k``, so
    choose ``k`` from the desired bond length in your coordinate units.

    Args:
        stiffness: ``k`` (> 0).
        reg: ``r`` (> 0).
        dim: number of spatial coordinates (3).
    """

    def __init__(self, stiffness: float = 1.0, reg: float = 1e-2, dim: int = 3):
        if not stiffness > 0 or not reg > 0:
            raise ValueError(f"HarmonicPrior: stiffness and reg must be > 0, got {stiffness}, {reg}")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(f"HarmonicPrior: dim must be a positive integer, got {dim!r}")
        self.stiffness, self.reg, self.dim = float(stiffness), float(reg), int(dim)

    def _inputs(self, bonds: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype | None):
        if not isinstance(bonds, torch.Tensor):
            raise TypeError(f"bonds must be a tensor (B, N, N), got {type(bonds).__name__}")
        if bonds.ndim != 3 or bonds.shape[-1] != bonds.shape[-2]:
            raise ValueError(f"bonds must have shape (B, N, N), got {tuple(bonds.shape)}")
        B, N, _ = bonds.shape
        if dtype is None:
            dtype = bonds.dtype if bonds.is_floating_point() else torch.get_default_dtype()
        if bonds.is_floating_point():
            A = bonds.to(dtype)
        else:
            A = (bonds > 0).to(dtype)
        A = torch.maximum(A, A.transpose(-1, -2))
        if mask is None:
            m = torch.ones(B, N, dtype=dtype, device=bonds.device)
        else:
            if mask.shape != (B, N):
                raise ValueError(f"mask must have shape (B, N) = {(B, N)}, got {tuple(mask.shape)}")
            m = mask.to(device=bonds.device, dtype=dtype)
        eye = torch.eye(N, dtype=dtype, device=bonds.device)
        A = A * (m[:, :, None] * m[:, None, :]) * (1 - eye)
        return A, m, eye, dtype

    def laplacian(self, bonds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Masked graph Laplacian ``L = diag(A 1) - A``, ``(B, N, N)`` (bonds: int types > 0 or float weights)."""
        A, _, _, _ = self._inputs(bonds, mask, None)
        return torch.diag_embed(A.sum(-1)) - A

    def precision(self, bonds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``Q = k L + r I`` on valid atoms, identity on padded atoms; ``(B, N, N)``."""
        A, m, eye, _ = self._inputs(bonds, mask, None)
        L = torch.diag_embed(A.sum(-1)) - A
        return self.stiffness * L + self.reg * eye * m[:, :, None] + torch.diag_embed(1 - m)

    def _projector(self, m: torch.Tensor) -> torch.Tensor:
        n = m.sum(-1).clamp(min=1)[:, None, None]
        return torch.diag_embed(m) - m[:, :, None] * m[:, None, :] / n

    def covariance(self, bonds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-coordinate covariance ``C = P Q^{-1} P`` of a sample, ``(B, N, N)`` (zero on padding)."""
        _, m, _, _ = self._inputs(bonds, mask, None)
        Q = self.precision(bonds, mask)
        P = self._projector(m)
        return P @ torch.linalg.inv(Q) @ P

    def sample(self, bonds: torch.Tensor, mask: torch.Tensor | None = None,
               generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Draw CoM-free samples ``(B, N, dim)``; padded atoms are exactly zero.

        Args:
            bonds: ``(B, N, N)`` bond types (integer/bool; ``> 0`` means bonded)
                or float edge weights; symmetrised with ``max(A, A^T)``, diagonal
                ignored.
            mask: ``(B, N)`` valid-atom mask (default: all valid).
            generator: for ``torch.randn``.
            noise: optional standard-normal ``z`` of shape ``(B, N, dim)``
                (then ``generator`` is unused).
            dtype: output dtype (default: ``noise``'s dtype if given, else
                ``bonds``' dtype if floating, else the default dtype).  Device:
                that of ``bonds``.

        Uses a batched ``torch.linalg.eigh`` (which may synchronise on CUDA).
        """
        if dtype is None and noise is not None:
            dtype = noise.dtype
        A, m, eye, dtype = self._inputs(bonds, mask, dtype)
        B, N, _ = A.shape
        L = torch.diag_embed(A.sum(-1)) - A
        Q = self.stiffness * L + self.reg * eye * m[:, :, None] + torch.diag_embed(1 - m)
        lam, U = torch.linalg.eigh(Q)
        Q_inv_sqrt = (U * torch.rsqrt(lam)[:, None, :]) @ U.transpose(-1, -2)
        if noise is None:
            noise = torch.randn(B, N, self.dim, generator=generator, dtype=dtype, device=A.device)
        elif noise.shape != (B, N, self.dim):
            raise ValueError(f"noise must have shape {(B, N, self.dim)}, got {tuple(noise.shape)}")
        else:
            noise = noise.to(device=A.device, dtype=dtype)
        y = (Q_inv_sqrt @ noise) * m[:, :, None]
        n = m.sum(-1).clamp(min=1)[:, None, None]
        com = y.sum(-2, keepdim=True) / n
        return (y - com) * m[:, :, None]

    def __repr__(self) -> str:
        return f"HarmonicPrior(stiffness={self.stiffness}, reg={self.reg}, dim={self.dim})"
