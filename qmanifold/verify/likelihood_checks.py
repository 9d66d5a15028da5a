r"""Likelihood checks of ``qmanifold verify``: ``log_prob`` with the exact denoiser against the exact density.

For a toy target with an exact denoiser and a closed-form density (``target.has_density``: the
SO(2), SE(3), torus and permutation targets of :mod:`qmanifold.verify.targets`), draw
``n_samples`` exact samples (fixed seed), compute :meth:`qmanifold.QuotientDiffusion.log_prob`
with the exact denoiser (probability-flow ODE of the lifted sampler, RK4, exact divergence) and
compare it with the closed forms

.. math::  \log q_M(x) \quad\text{and}\quad \log q_Q(\pi x) = \log q_M(x) + \log\mathrm{vol}(G x),

written out per target (:meth:`~qmanifold.verify.targets.ToyTarget.log_density`,
:meth:`~qmanifold.verify.targets.ToyTarget.log_orbit_volume`; e.g. for SE(3)
:math:`\log q_M` is a Gaussian term plus the log matrix Fisher normaliser, and
:math:`\mathrm{vol}(G x) = 8\pi^2\sqrt{\det K(x)}`), independently of
:mod:`qmanifold.likelihood`. The conventions are those of docs/diffusion.md, "Likelihoods on Q
and on M" (M: the centre-of-mass-free subspace when the group has translations).

A check *passes* when, for every quantity it compares, the largest absolute error over the
samples is at most ``tolerance`` nats (:data:`TOLERANCE`: 1e-3 in float64, 1e-2 in float32).
The error is deterministic (the ODE solver's and the quadratures'), not a sampling error, so
this is a tolerance test, not a statistical one: records carry no p-value. The basis of the
tolerance (docs/verify.md has the table; benchmarks/runs/verify_likelihood): in float64 with 40
RK4 steps the largest error over 32 samples is 6.5e-5 (SO(2)), 6.8e-5 (SE(3)), 4.1e-5 (torus)
and 3.4e-6 (permutations) nats, and routes M and Q differ by at most 3.1e-5; with 20 steps the
SO(2) and SE(3) errors reach 1.0e-3 and 2.2e-3, so the checks take 40 steps, a margin of 15 below
the tolerance. In float32 (40 steps) the largest error is 1.0e-3 (torus; 1.4e-4 for SE(3)), a
margin of 10 below its tolerance. Every negative control is off by at least 1.8 nats on every
sample (``log vol(G x)`` or ``log vol(K)``), three orders of magnitude above the tolerance.

Variants (``expected``):

* ``likelihood_route_m`` (pass): route M, ``log q_M = log p_0(x_0) - int div_M u dt``, then
  ``+ log vol(G x)`` on Q; both densities are compared with the closed forms.
* ``likelihood_route_q`` (pass; continuous fibres): route Q, the divergence on Q as the trace over
  the horizontal space from the prior's density on Q, ``log p_0(x_0) + log vol(G x_0)``; compared
  with the closed forms on Q and on M, and with route M (route through Q == route through M).
* ``likelihood_no_orbit_volume`` (fail): the density on M reported as the density on Q (the
  orbit-volume term dropped; what ``curvature_factor=0`` gives on route M).
* ``likelihood_route_q_no_orbit_volume`` (fail; continuous fibres): route Q started from the
  prior's density on M instead of on Q (``log vol(G x_0)`` dropped; what ``curvature_factor=0``
  gives on route Q).
* ``likelihood_wrong_group_volume`` (fail; continuous fibres): the orbit volume
  ``sqrt(det Gram)`` without the volume of the group (``2 pi``, ``8 pi^2``, ``(2 pi)^3``): the
  error of a wrong normalisation of the Haar measure, a constant ``log vol(K)``.

The negative controls are assembled from the same two solves as the positive ones (the ODE and
its divergence do not depend on these terms; tests/qmanifold/test_verify_likelihood.py checks
that the assembly equals ``log_prob(..., curvature_factor=0)``), so a suite solves at most two
ODEs per target: route M and route Q.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from .. import likelihood as L
from ..diffusion import QuotientDiffusion
from ..schedules import make_interpolant
from .denoisers import ExactDenoiser

__all__ = [
    "LikelihoodVariant",
    "LIKELIHOOD_VARIANTS",
    "LIKELIHOOD_SIZES",
    "TOLERANCE",
    "LikelihoodRecord",
    "likelihood_applicable",
    "likelihood_variants_for",
    "likelihood_sizes",
    "likelihood_cost",
    "run_likelihood_checks",
    "format_likelihood_table",
    "write_likelihood_plot",
]


@dataclass(frozen=True)
class LikelihoodVariant:
    """A likelihood check. ``expected`` is ``"pass"`` or ``"fail"`` (negative control); ``routes``
    are the ``log_prob`` solves it needs; ``sampler`` is the key of its size overrides in a
    :class:`~qmanifold.verify.runner.SuiteConfig` (``"target/likelihood"``)."""

    name: str
    description: str
    expected: str
    routes: tuple[str, ...] = ("M",)
    needs_fibres: bool = False
    sampler: str = "likelihood"


LIKELIHOOD_VARIANTS: dict[str, LikelihoodVariant] = {
    v.name: v
    for v in [
        LikelihoodVariant("likelihood_route_m", "log_prob via div_M (+ log vol(G x) on Q) vs the exact density on M and Q", "pass"),
        LikelihoodVariant("likelihood_route_q", "log_prob via div_Q (horizontal trace) vs the exact density and vs route M", "pass",
                          routes=("M", "Q"), needs_fibres=True),
        LikelihoodVariant("likelihood_no_orbit_volume", "density on M reported on Q (orbit volume dropped)", "fail"),
        LikelihoodVariant("likelihood_route_q_no_orbit_volume", "route Q from the prior's density on M (log vol(G x_0) dropped)",
                          "fail", routes=("Q",), needs_fibres=True),
        LikelihoodVariant("likelihood_wrong_group_volume", "orbit volume sqrt(det Gram) without vol(K)", "fail",
                          needs_fibres=True),
    ]
}

#: pass when the largest absolute error (nats) is at most this, by dtype (module docstring)
TOLERANCE = {torch.float64: 1e-3, torch.float32: 1e-2}

#: sizes of a likelihood check when the suite's config has no ``"target/likelihood"`` override:
#: exact samples and RK4 steps
LIKELIHOOD_SIZES = {"n_samples": 16, "steps": 40}

# Cost of a log_prob solve in the runner's cost units (one SO(2) sampler step of one sample, about
# 2.5 us of CPU): per RK4 step an overhead of 2500 + 700 r units (small batches are dominated by the
# per-call work: 4 field evaluations and their backward passes) plus 6 N d r units per sample (the
# N d VJPs of the exact divergence), r = target.relative_cost. Fitted to CPU times of one solve with
# 40 steps and 4 / 16 / 64 samples on one thread (SO(2): 0.32 / 0.46 / 0.52 s; SE(3): 1.1 / 1.9 /
# 5.3 s; torus: 0.27 / 0.34 / 0.53 s; permutations: 0.10-0.12 s).
_COST_OVERHEAD = (2500.0, 700.0)
_COST_PER_COORDINATE = 6.0


def likelihood_applicable(case) -> bool:
    """Whether a :class:`~qmanifold.verify.runner.VerificationCase` can be checked: its target has a
    closed-form density and the Gaussian-prior interpolant (``log_prob`` follows that sampler)."""
    target = case.target
    return bool(getattr(target, "has_density", False)) and getattr(target, "interpolant", "gaussian") == "gaussian"


def likelihood_variants_for(case, names: Sequence[str]) -> list[LikelihoodVariant]:
    """The likelihood variants among ``names`` that apply to ``case`` (none if it has no density;
    those needing continuous fibres only on groups with a Lie factor)."""
    if not likelihood_applicable(case):
        return []
    return [LIKELIHOOD_VARIANTS[n] for n in names if n in LIKELIHOOD_VARIANTS
            and (case.has_fibres or not LIKELIHOOD_VARIANTS[n].needs_fibres)]


def likelihood_sizes(config, target: str, n_samples: int | None = None, steps: int | None = None) -> dict:
    """``{"n_samples", "steps"}`` of a target's likelihood checks: :data:`LIKELIHOOD_SIZES`, then
    the config's ``"target/likelihood"`` override (its ``n_samples`` / ``steps``), then the given
    values. The sampler sizes of the config (and ``--n-samples``/``--steps``) do not apply."""
    out = dict(LIKELIHOOD_SIZES)
    if config is not None:
        over = config.overrides.get(f"{target}/likelihood", {})
        out.update({k: v for k, v in over.items() if k in out})
    out.update({k: v for k, v in {"n_samples": n_samples, "steps": steps}.items() if v is not None})
    return out


def likelihood_cost(case, variants: Sequence[LikelihoodVariant], n_samples: int, steps: int) -> float:
    """Estimated cost of the checks of one case in the runner's progress-bar units: per distinct
    ``log_prob`` solve (route), ``(steps + 1) (2500 + 700 r + 6 N d r n_samples)`` with
    ``r = target.relative_cost`` (RK4 with a node at ``t_max``: steps + 1 steps; the per-step
    overhead and the N d VJPs per sample of the exact divergence, measured)."""
    routes = {r for v in variants for r in v.routes}
    rel = getattr(case.target, "relative_cost", 1.0)
    n_points, dim = case.target.point_shape
    per_step = _COST_OVERHEAD[0] + _COST_OVERHEAD[1] * rel + _COST_PER_COORDINATE * n_points * dim * rel * n_samples
    return float(len(routes) * (steps + 1) * per_step)


# ---------------------------------------------------------------------------------------------
# Records


@dataclass
class LikelihoodRecord:
    """One (target, likelihood check) result; ``ok`` is True when the verdict matches the expectation.

    The fields shared with :class:`~qmanifold.verify.runner.VerificationRecord` mean: ``statistic``
    the largest absolute error (nats) over the samples and compared quantities, ``effect_size``
    that error divided by ``tolerance`` (> 1 fails), ``p_value`` NaN (``null`` in JSON: a
    deterministic tolerance test), ``n_samples`` = ``final_samples`` the exact samples, ``steps``
    the RK4 steps. ``features`` holds per compared quantity (``quotient``, ``total``,
    ``route_gap``) the ``max_abs_error``, ``mean_abs_error`` and ``mean_error`` (signed).
    """

    target: str
    variant: str
    expected: str
    passed: bool
    statistic: float
    p_value: float
    effect_size: float
    n_samples: int
    steps: int
    seconds: float
    description: str = ""
    group: str = ""
    features: dict = field(default_factory=dict)
    n_exact: int = 0
    checkpoints: list = field(default_factory=list)
    final_samples: int = 0
    kind: str = "likelihood"
    tolerance: float = 0.0
    method: str = "rk4"

    @property
    def ok(self) -> bool:
        return self.passed == (self.expected == "pass")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


# ---------------------------------------------------------------------------------------------
# Running


def _comparisons(variant: LikelihoodVariant, solved: dict, exact_m: torch.Tensor, exact_q: torch.Tensor,
                 quotient) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (computed, reference)`` of the quantities a variant compares (float64, (B,))."""
    name = variant.name
    if name == "likelihood_route_m":
        m = solved["M"]
        return {"quotient": (m["log_prob_quotient"], exact_q), "total": (m["log_prob_total"], exact_m)}
    if name == "likelihood_route_q":
        m, q = solved["M"], solved["Q"]
        return {"quotient": (q["log_prob_quotient"], exact_q), "total": (q["log_prob_total"], exact_m),
                "route_gap": (q["log_prob_quotient"], m["log_prob_quotient"])}
    if name == "likelihood_no_orbit_volume":
        return {"quotient": (solved["M"]["log_prob_total"], exact_q)}
    if name == "likelihood_route_q_no_orbit_volume":
        q = solved["Q"]
        x0 = q["prior_point"]
        return {"quotient": (q["log_prob_quotient"] - L.log_orbit_volume(quotient, x0).double(), exact_q)}
    if name == "likelihood_wrong_group_volume":
        return {"quotient": (solved["M"]["log_prob_quotient"] - L.log_group_volume(quotient.lie)[0], exact_q)}
    raise ValueError(f"unknown likelihood variant {name!r}; available: {', '.join(LIKELIHOOD_VARIANTS)}")


def run_likelihood_checks(
    case,
    variants: Sequence[LikelihoodVariant | str],
    *,
    n_samples: int = LIKELIHOOD_SIZES["n_samples"],
    steps: int = LIKELIHOOD_SIZES["steps"],
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    interpolant: str = "linear",
    tolerance: float | None = None,
    return_values: bool = False,
):
    r"""Run likelihood checks on one case; returns a list of :class:`LikelihoodRecord` (and, with
    ``return_values``, a dict ``variant -> (computed, reference)`` of the main compared quantity,
    float64 tensors (B,), for plots).

    The exact samples are drawn once (seed ``seed + 20000``, float64) and shared by the variants;
    ``log_prob`` runs in ``dtype`` on ``device`` with ``steps`` RK4 steps and the exact
    divergence, once per route the variants need (M and/or Q); the closed forms are evaluated in
    float64. ``tolerance`` defaults to :data:`TOLERANCE` for ``dtype``.
    """
    variants = [LIKELIHOOD_VARIANTS[v] if isinstance(v, str) and v in LIKELIHOOD_VARIANTS else v for v in variants]
    bad = [v for v in variants if not isinstance(v, LikelihoodVariant)]
    if bad:
        raise ValueError(f"unknown likelihood variant(s) {bad}; available: {', '.join(LIKELIHOOD_VARIANTS)}")
    if not likelihood_applicable(case):
        raise ValueError(f"case {case.name!r}: its target has no closed-form density with the Gaussian-prior "
                         "interpolant, so there is nothing to check log_prob against")
    for v in variants:
        if v.needs_fibres and not case.has_fibres:
            raise ValueError(f"likelihood variant {v.name!r} needs a group with continuous fibres; "
                             f"{case.quotient.name} is discrete")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if tolerance is None:
        if dtype not in TOLERANCE:
            raise ValueError(f"no default tolerance for dtype {dtype}; pass tolerance= (defaults exist for "
                             f"{', '.join(str(k) for k in TOLERANCE)})")
        tolerance = TOLERANCE[dtype]
    device = torch.device(device)
    interp = make_interpolant(interpolant)
    model = QuotientDiffusion(case.quotient, ExactDenoiser(case, interp), interp, validate=False)

    gen = torch.Generator(device=device).manual_seed(seed + 20_000)
    x1 = case.target.sample(n_samples, gen, dtype=torch.float64, device=device)
    exact_m = case.target.log_density(x1, "total")
    exact_q = case.target.log_density(x1, "quotient")
    x = case.to_group(x1).to(dtype)

    solved, seconds = {}, {}
    for route in sorted({r for v in variants for r in v.routes}):
        start = time.perf_counter()
        out = model.log_prob(x, steps=steps, route=route, method="rk4", return_details=True)
        solved[route] = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "prior_point" else v)
                         for k, v in out.items()}
        seconds[route] = time.perf_counter() - start

    records, values = [], {}
    charged: set[str] = set()
    for v in variants:
        comps = _comparisons(v, solved, exact_m, exact_q, case.quotient)
        stats = {}
        for key, (computed, reference) in comps.items():
            err = computed.double() - reference.double()
            stats[key] = {"max_abs_error": float(err.abs().max()), "mean_abs_error": float(err.abs().mean()),
                          "mean_error": float(err.mean())}
        worst = max(s["max_abs_error"] for s in stats.values())
        if not math.isfinite(worst):
            worst = math.inf
        own = sum(seconds[r] for r in v.routes if r not in charged)  # a shared solve is charged once
        charged.update(v.routes)
        records.append(LikelihoodRecord(
            target=case.name, variant=v.name, expected=v.expected, passed=worst <= tolerance, statistic=worst,
            p_value=math.nan, effect_size=worst / tolerance, n_samples=n_samples, steps=steps, seconds=own,
            description=v.description, group=case.quotient.name, features=stats, n_exact=n_samples,
            final_samples=n_samples, tolerance=float(tolerance),
        ))
        first = next(iter(comps.values()))
        values[v.name] = (first[0].double().cpu(), first[1].double().cpu())
    if return_values:
        return records, values
    return records


# ---------------------------------------------------------------------------------------------
# Reporting


def format_likelihood_table(records: Sequence[LikelihoodRecord]) -> str:
    """The likelihood records as a plain-text table (errors in nats)."""
    header = (f"{'target':<16}{'likelihood check':<36}{'expect':<8}{'result':<8}{'max|err|':>10}{'mean|err|':>11}"
              f"{'route gap':>11}{'tol':>9}{'n':>5}{'steps':>7}  verdict")
    lines = [header, "-" * len(header)]
    for r in records:
        gap = r.features.get("route_gap", {}).get("max_abs_error")
        mean = max(s["mean_abs_error"] for s in r.features.values()) if r.features else math.nan
        lines.append(
            f"{r.target:<16}{r.variant:<36}{r.expected:<8}{'pass' if r.passed else 'fail':<8}{r.statistic:>10.2e}"
            f"{mean:>11.2e}{(f'{gap:.2e}' if gap is not None else '-'):>11}{r.tolerance:>9.0e}{r.n_samples:>5d}"
            f"{r.steps:>7d}  {'ok' if r.ok else 'WRONG'}"
        )
    return "\n".join(lines)


def write_likelihood_plot(directory: str, record: LikelihoodRecord, computed: torch.Tensor, reference: torch.Tensor) -> str:
    """PNG of one likelihood check: computed against exact log-density, and the error per sample
    with the tolerance band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    c, e = computed.numpy(), reference.numpy()
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.8))
    lo, hi = min(c.min(), e.min()), max(c.max(), e.max())
    axes[0].plot([lo, hi], [lo, hi], color="0.6", linewidth=1)
    axes[0].scatter(e, c, s=12)
    axes[0].set_xlabel("exact log-density", fontsize=8)
    axes[0].set_ylabel("log_prob", fontsize=8)
    axes[1].axhspan(-record.tolerance, record.tolerance, color="0.85", label="tolerance")
    axes[1].scatter(range(len(c)), c - e, s=12)
    axes[1].set_xlabel("sample", fontsize=8)
    axes[1].set_ylabel("error (nats)", fontsize=8)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.tick_params(labelsize=7)
    verdict = "ok" if record.ok else "WRONG"
    fig.suptitle(f"{record.target} / {record.variant}: expected {record.expected}, "
                 f"{'passed' if record.passed else 'failed'} ({verdict})", fontsize=9)
    fig.tight_layout()
    path = os.path.join(directory, f"{record.target}__{record.variant}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
