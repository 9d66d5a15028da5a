r"""The verification runner: does a sampler recover the exact target on a toy quotient?

For a toy target with an exact denoiser (:mod:`qmanifold.verify.targets`) and a sampler variant,
draw ``n_samples`` configurations with the variant, draw ``exact_factor`` times as many exact
samples from the target, and compare their invariant features (pairwise distances, radii, sorted
values, angles, the log orbit volume) at every *checkpoint*: the end of sampling (t = 1) and,
for the Gaussian-prior targets, intermediate times t (by default t = 1/2), where the sampler's
state must follow the forward marginal :math:`x_t = \hat\alpha_t \varepsilon + \beta_t x_1` (the
lifted samplers reproduce every marginal, not only the last; a wrong curvature drift acts early
and is partly contracted away by t = 1, while Euler's discretisation bias builds up late). Only
``final_samples`` of the ``n_samples`` configurations continue past the last intermediate
checkpoint to t = 1: the final test's resolution is set to what the correct Euler samplers'
O(dt) bias at the suite's step counts allows, the intermediate one's to what the power against
a half-wrong drift needs (docs/verify.md gives the measurements).

Two tests per checkpoint, each given half of the checkpoint's share of ``alpha`` (weighted
Bonferroni, so the family-wise false-alarm rate is at most ``alpha``):

* a joint test of the feature means, :math:`T^2 = d^\top (C_g/n_g + C_e/n_e)^{+} d` on the
  features standardised by the exact sample (d: difference of means, C: covariances, ``+``: the
  pseudo-inverse on the eigenvectors above :math:`10^{-10}` of the largest eigenvalue, r of them),
  with the asymptotic :math:`\chi^2_r` p-value. A sampler error shifts all features together
  (a wrong curvature drift moves the orbit volume and with it every distance), which this test
  accumulates and per-feature tests spread thin;
* a two-sample Kolmogorov-Smirnov test per feature, Bonferroni over the features: any change of
  shape.

A variant *passes* when the combined p-value, ``min(1, K min_k min(2 p_joint, 2 m p_KS))`` over K
checkpoints and m features, is at least ``alpha``. Each record reports the largest KS statistic,
that p-value, an effect size (the largest 1-D Wasserstein distance between generated and exact
feature samples, divided by the exact feature's standard deviation, over all checkpoints) and a
verdict against the expectation.

Variants (``expected``):

* ``quotient_ode`` / ``quotient_sde`` / ``quotient_heun`` (pass): the lifted samplers
  ``dx = P_x v dt`` and ``dx = [P_x(v + eta s) - eta h] dt + sqrt(2 eta) P_x dW``.
* ``conventional_ode`` / ``conventional_sde`` (pass): the exact denoiser is equivariant, so the
  conventional samplers are right too.
* ``sde_paper_sign`` (fail): the ``+ eta h`` printed in the paper's Algorithm 3.
* ``sde_no_curvature`` (fail): the lifted SDE without the mean-curvature drift.
* ``sde_curvature_075`` / ``sde_curvature_125`` (fail): the curvature drift scaled by 0.75 / 1.25,
  a half-wrong drift; they measure the power of the suite against subtle errors.
* ``garbage_vertical_conventional`` (fail) / ``garbage_vertical_quotient`` (pass): the denoiser's
  vertical part replaced by garbage (a random fundamental field, fresh at every call). The
  quotient sampler projects it away; the conventional one integrates it.

Curved total spaces (``sphere_points``: (S^2)^4 / SO(3); ``se3_frames``: SE(3)^4 frames / SE(3);
:mod:`qmanifold.verify.curved_targets`) have no exact denoiser for the geodesic interpolant; they give
a path of laws with exact draws, an exact field and an exact score instead, and run the same variants
(:func:`qmanifold.verify.curved_targets.sample_variant`) except the half-wrong drifts, which they do
not resolve at the suite's sizes (``target.default_variants``).

Negative controls exist only where the group has continuous fibres (a mean curvature and a
vertical space); for discrete groups (permutations, lattices) the quotient map is a local
isometry and there is nothing for them to get wrong, so only the positive variants run.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from qmanifold import groups as _groups

from ..atomic import atomic_write_json
from ..diffusion import QuotientDiffusion
from ..lie import LieGroup
from ..quotient import Quotient
from ..schedules import make_interpolant
from ..sde import SDE, integrate
from . import curved_targets as _curved
from .denoisers import ExactDenoiser, GarbageVertical
from .likelihood_checks import (
    LIKELIHOOD_VARIANTS,
    format_likelihood_table,
    likelihood_cost,
    likelihood_sizes,
    likelihood_variants_for,
    run_likelihood_checks,
    write_likelihood_plot,
)
from .targets import ToyTarget, make_target

__all__ = [
    "Variant",
    "VARIANTS",
    "VerificationCase",
    "VerificationRecord",
    "SuiteConfig",
    "DEFAULT_CONFIG",
    "QUICK_CONFIG",
    "builtin_case",
    "available_cases",
    "available_variants",
    "compare_features",
    "mean_shift_test",
    "run_case",
    "run_suite",
    "estimated_cost",
    "time_grid",
    "format_table",
    "write_json",
    "write_plots",
]


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """A sampler variant. ``expected`` is ``"pass"`` or ``"fail"`` (negative control)."""

    name: str
    description: str
    expected: str
    sampler: str = "ode"  # "ode" | "sde" | "heun"
    geometry: str = "quotient"  # "quotient" | "conventional"
    curvature_factor: float = 1.0
    garbage_vertical: bool = False
    needs_fibres: bool = False  # only meaningful for groups with a continuous factor


#: family-wise level of a run. 0.001, not 0.01: a suite holds 30 runs that should pass, and at 0.01 one
#: seed in six shows a false alarm somewhere (docs/verify.md); every negative control has p < 1e-5.
DEFAULT_ALPHA = 0.001

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("quotient_ode", "lifted probability-flow ODE dx = P_x v dt (Euler)", "pass", "ode"),
        Variant("quotient_sde", "lifted SDE with the correct -eta h drift (Euler-Maruyama)", "pass", "sde"),
        Variant("quotient_heun", "lifted ODE, Heun (2nd order), fewer steps", "pass", "heun"),
        Variant("conventional_ode", "conventional ODE dx = v dt", "pass", "ode", "conventional", needs_fibres=True),
        Variant("conventional_sde", "conventional SDE (v + eta s) dt + sqrt(2 eta) dW", "pass", "sde", "conventional", needs_fibres=True),
        Variant("sde_paper_sign", "lifted SDE with +eta h (the sign printed in the paper's Alg. 3)", "fail", "sde", curvature_factor=-1.0, needs_fibres=True),
        Variant("sde_no_curvature", "lifted SDE without the mean-curvature drift", "fail", "sde", curvature_factor=0.0, needs_fibres=True),
        Variant("sde_curvature_075", "lifted SDE, curvature drift scaled by 0.75", "fail", "sde", curvature_factor=0.75, needs_fibres=True),
        Variant("sde_curvature_125", "lifted SDE, curvature drift scaled by 1.25", "fail", "sde", curvature_factor=1.25, needs_fibres=True),
        Variant("garbage_vertical_conventional", "vertical part of D replaced by garbage, conventional ODE", "fail", "ode", "conventional", garbage_vertical=True, needs_fibres=True),
        Variant("garbage_vertical_quotient", "vertical part of D replaced by garbage, quotient ODE", "pass", "ode", garbage_vertical=True, needs_fibres=True),
    ]
}


def available_variants() -> tuple[str, ...]:
    """Sampler variants, then the likelihood checks (:mod:`qmanifold.verify.likelihood_checks`)."""
    return tuple(VARIANTS) + tuple(LIKELIHOOD_VARIANTS)


# ---------------------------------------------------------------------------------------------
# Cases: a target bound to a quotient


@dataclass
class VerificationCase:
    """A toy target on a quotient.

    Args:
        name: label in reports.
        target: a :class:`~qmanifold.verify.targets.ToyTarget` (exact samples, denoiser, features).
        quotient: the quotient the samplers run on; its points must have the target's layout after
            ``to_group``.
        to_group / from_group: reshape between the target's ``(n, N, d)`` layout and the group's
            (e.g. the k-torus acts on one point of C^k = R^{2k}: ``(n, k, 2) <-> (n, 1, 2k)``).
    """

    name: str
    target: ToyTarget
    quotient: Quotient
    to_group: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    from_group: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def __post_init__(self):
        n, d = self.target.point_shape
        probe = self.to_group(torch.zeros(1, n, d, dtype=torch.float64))
        if self.quotient.point_dim is not None and probe.shape[-1] != self.quotient.point_dim:
            raise ValueError(
                f"case {self.name!r}: the target's points have dimension {probe.shape[-1]} (point shape "
                f"{self.target.point_shape}) but {self.quotient.name} acts on points of dimension "
                f"{self.quotient.point_dim}"
            )
        if self.quotient.lie is not None and not self.quotient.orbit_dimension_ok(probe.shape[-2]):
            raise ValueError(f"case {self.name!r}: {self.quotient.name} has no free orbits on {probe.shape[-2]} points")
        if getattr(self.target, "com_free", False) != self.quotient.translations:
            raise ValueError(
                f"case {self.name!r}: the target is {'centred' if self.target.com_free else 'not centred'} but "
                f"{self.quotient.name} {'has' if self.quotient.translations else 'has no'} translations"
            )

    @property
    def has_fibres(self) -> bool:
        return self.quotient.lie is not None


def _torus_case(**kwargs) -> VerificationCase:
    target = make_target("torus", **kwargs)
    k = target.point_shape[0]
    return VerificationCase(
        "torus", target, Quotient(_groups.Torus(k)),
        to_group=lambda x: x.reshape(x.shape[0], 1, 2 * k),
        from_group=lambda x: x.reshape(x.shape[0], k, 2),
    )


def _so2_user_case(**kwargs) -> VerificationCase:
    """The SO(2) toy on a group declared by the user from its sympy action (SE(2))."""
    import sympy

    th, a, b, x, y = sympy.symbols("theta a b x y", real=True)
    group = LieGroup.from_action(
        "SE(2) declared by its action", [th, a, b], [x, y],
        [sympy.cos(th) * x - sympy.sin(th) * y + a, sympy.sin(th) * x + sympy.cos(th) * y + b],
    )
    return VerificationCase("so2_user_group", make_target("so2", **kwargs), Quotient(group))


def _curved_case(name: str, **kwargs) -> VerificationCase:
    """A target of :mod:`qmanifold.verify.curved_targets` on its own curved quotient."""
    target = _curved.make_curved_target(name, **kwargs)
    return VerificationCase(name, target, target.quotient)


_CASES: dict[str, Callable[..., VerificationCase]] = {
    "so2": lambda **kw: VerificationCase("so2", make_target("so2", **kw), Quotient(_groups.SE2)),
    # the scaled quadrature (6 Gauss-Legendre nodes on 2 x 4 panels graded at each matrix's own
    # boundary layers, 48 nodes): E[R] within 5e-8 of the 736-node fixed rule along the sampling
    # paths (matrix_fisher's docstring), orders of magnitude below what 10^4 samples can resolve
    "se3": lambda **kw: VerificationCase("se3", make_target("se3", **{"rule": "scaled", "n_nodes": 6, "levels": 3, **kw}), Quotient(_groups.SE3)),
    "torus": _torus_case,
    "permutations": lambda **kw: VerificationCase("permutations", make_target("permutations", **kw), Quotient(_groups.Permutations())),
    "lattice": lambda **kw: VerificationCase("lattice", make_target("lattice", **kw), Quotient(_groups.Lattice(make_target("lattice", **kw).point_shape[1]))),
    "so2_user_group": _so2_user_case,
    # curved total spaces (qmanifold/verify/curved_targets.py): exact fields and scores of a path of laws on M
    "sphere_points": lambda **kw: _curved_case("sphere_points", **kw),
    "se3_frames": lambda **kw: _curved_case("se3_frames", **kw),
}


def available_cases() -> tuple[str, ...]:
    return tuple(_CASES)


def builtin_case(name: str, **kwargs) -> VerificationCase:
    """A built-in case by name; see :func:`available_cases`."""
    if name not in _CASES:
        raise ValueError(f"unknown target {name!r}; available: {', '.join(_CASES)}")
    return _CASES[name](**kwargs)


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_shift_test(generated: np.ndarray, exact: np.ndarray, rel_tol: float = 1e-10) -> dict:
    r"""Joint two-sample test of feature means (a Hotelling-type :math:`T^2` with unequal covariances).

    Args:
        generated: (n_g, m) and exact: (n_e, m) feature samples (finite).
        rel_tol: eigenvalues of the covariance of the mean difference below ``rel_tol`` times the
            largest are dropped (features that are linear functions of others, e.g. the three equal
            cross products of a centred triangle).

    Both samples are standardised by the exact sample's means and standard deviations; with
    :math:`d = \bar g - \bar e` and :math:`C = C_g/n_g + C_e/n_e`,
    :math:`T^2 = \sum_{k \le r} (v_k^\top d)^2/\lambda_k` over the r kept eigenpairs of C, and the
    p-value is the :math:`\chi^2_r` tail (asymptotic in n by the central limit theorem; the
    samples here have thousands of draws and r <= 20). Returns ``{"t2", "dof", "p", "d"}`` with
    ``d`` the Mahalanobis effect :math:`\sqrt{d^\top C_e^{+} d}` in units of one draw.
    """
    from scipy.stats import chi2

    mu = exact.mean(0)
    sd = exact.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    g = (generated - mu) / sd
    e = (exact - mu) / sd
    n_g, n_e = g.shape[0], e.shape[0]
    diff = g.mean(0) - e.mean(0)
    cov_e = np.atleast_2d(np.cov(e, rowvar=False))
    cov = np.atleast_2d(np.cov(g, rowvar=False)) / n_g + cov_e / n_e
    lam, vec = np.linalg.eigh(cov)
    keep = lam > rel_tol * max(lam.max(), np.finfo(float).tiny)
    proj = vec[:, keep].T @ diff
    t2 = float(np.sum(proj**2 / lam[keep]))
    dof = int(keep.sum())
    lam_e, vec_e = np.linalg.eigh(cov_e)
    keep_e = lam_e > rel_tol * max(lam_e.max(), np.finfo(float).tiny)
    maha = float(np.sqrt(np.sum((vec_e[:, keep_e].T @ diff) ** 2 / lam_e[keep_e])))
    return {"t2": t2, "dof": dof, "p": float(chi2.sf(t2, dof)) if dof else 1.0, "d": maha}


def compare_features(generated: dict[str, torch.Tensor], exact: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA,
                     *, joint: bool = True) -> dict:
    """Two-sample tests of invariant features: per-feature KS (Bonferroni) and, with ``joint``,
    the joint mean test :func:`mean_shift_test`, each given half of ``alpha``.

    Args:
        generated, exact: feature name -> (n_g,) and (n_e,) samples (the sizes may differ).
        alpha: family-wise level.  joint: add the joint mean test (else KS only, as before).

    Returns a dict with ``statistic`` (largest KS D), ``p_value`` (``min(1, 2 min(p_joint, m p_KS))``
    with ``joint``, else ``min(1, m p_KS)``; m features), ``effect_size`` (largest W1 / std of the
    exact feature), ``passed`` (``p_value >= alpha``), ``joint`` (the mean test's ``t2``, ``dof``,
    ``p`` and Mahalanobis effect ``d``, or None) and per-feature ``features`` (``ks``, ``p``, ``w1``).
    A non-finite generated value fails every test of its feature (p = 0).
    """
    from scipy.stats import ks_2samp, wasserstein_distance

    if set(generated) != set(exact):
        raise ValueError(f"feature names differ: {sorted(generated)} vs {sorted(exact)}")
    per_feature = {}
    columns_g, columns_e = [], []
    finite = True
    for key, exact_values in exact.items():
        g = generated[key].detach().double().cpu().numpy()
        e = exact_values.detach().double().cpu().numpy()
        columns_g.append(g)
        columns_e.append(e)
        if not np.isfinite(g).all():
            finite = False
            per_feature[key] = {"ks": 1.0, "p": 0.0, "w1": math.inf}
            continue
        ks = ks_2samp(g, e)
        scale = float(np.std(e)) or 1.0
        per_feature[key] = {"ks": float(ks.statistic), "p": float(ks.pvalue), "w1": float(wasserstein_distance(g, e) / scale)}
    m = len(per_feature)
    p_ks = min(1.0, min(f["p"] for f in per_feature.values()) * m)
    joint_result = None
    if joint:
        if finite:
            joint_result = mean_shift_test(np.stack(columns_g, -1), np.stack(columns_e, -1))
        else:
            joint_result = {"t2": math.inf, "dof": m, "p": 0.0, "d": math.inf}
        p_adj = min(1.0, 2.0 * min(joint_result["p"], p_ks))
    else:
        p_adj = p_ks
    return {
        "statistic": max(f["ks"] for f in per_feature.values()),
        "p_value": p_adj,
        "effect_size": max(f["w1"] for f in per_feature.values()),
        "passed": p_adj >= alpha,
        "joint": joint_result,
        "features": per_feature,
    }


# ---------------------------------------------------------------------------------------------
# Running one case


@dataclass
class VerificationRecord:
    """One (target, variant) result; ``ok`` is True when the verdict matches the expectation.

    ``n_samples`` configurations are sampled and compared at the intermediate checkpoints;
    ``final_samples`` of them continue to t = 1 and are compared there.  ``features`` holds the
    per-feature KS results at t = 1; ``checkpoints`` one dict per tested time (``t``, ``n``,
    ``n_exact``, ``p_value``, ``ks_p``, ``joint_p``, ``joint_dof``, ``joint_d``, ``statistic``,
    ``effect_size``), the last one t = 1; ``n_exact`` the number of exact draws at an intermediate
    checkpoint (``exact_factor * n_samples``; ``exact_factor * final_samples`` at t = 1).
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
    kind: str = "sampler"  # "likelihood" for the LikelihoodRecord of qmanifold.verify.likelihood_checks

    @property
    def ok(self) -> bool:
        return self.passed == (self.expected == "pass")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _steps_for(variant: Variant, steps: int, heun_steps: int | None) -> int:
    return (heun_steps or max(steps // 5, 10)) if variant.sampler == "heun" else steps


def _sample_lattice(case: VerificationCase, variant: Variant, n: int, steps: int, generator, dtype, device,
                    sigma_max: float = 1.0, sigma_min: float = 0.01) -> torch.Tensor:
    """Reverse-time VE diffusion on the flat torus with the exact (periodised) displacement.

    ``x_t = x1 + sigma(t) eps`` with ``sigma(t) = sigma_max (1 - t) + sigma_min t``; the velocity is
    ``v = -(sigma'/sigma) E[x1 - x_t | x_t]`` and the score ``E[x1 - x_t | x_t] / sigma^2``; the SDE
    uses ``eta = sigma |sigma'|`` and ``dx = (v + eta s) dt + sqrt(2 eta) dW``. The prior at
    sigma_max = 1 is uniform on the torus to within 6e-9 in total variation. A last denoising step
    ``x <- x + E[x1 - x | x]`` removes the sigma_min blur. The result is wrapped (canonicalised).
    """
    target = case.target
    rate = sigma_max - sigma_min

    def sigma(t):
        return sigma_max * (1 - t) + sigma_min * t

    def velocity(x, t, mask=None):
        s = sigma(t)
        disp = target.denoise_displacement(x, s)
        return (rate / s).reshape(-1, 1, 1) * disp

    if variant.sampler == "sde":
        def drift(x, t, mask=None):
            s = sigma(t)
            disp = target.denoise_displacement(x, s)
            eta = s * rate
            return (rate / s).reshape(-1, 1, 1) * disp + (eta / s.square()).reshape(-1, 1, 1) * disp

        sde = SDE(drift=drift, diffusion=lambda t: torch.sqrt(2 * sigma(t) * rate))
        method = "euler_maruyama"
    else:
        sde = SDE(drift=velocity, diffusion=0)
        method = "heun" if variant.sampler == "heun" else "euler_maruyama"
    x0 = target.sample_prior(n, generator, dtype=dtype, device=device)
    x = integrate(sde, x0, 0.0, 1.0, steps, method=method, generator=generator)
    x = x + target.denoise_displacement(x, torch.full(x.shape[:1], sigma_min, dtype=dtype, device=device))
    return case.quotient.canonicalize(x)


DEFAULT_CHECKPOINTS = (0.5,)
DEFAULT_EXACT_FACTOR = 8


def time_grid(steps: int, grid_power: float = 1.0) -> torch.Tensor:
    r"""The sampling grid :math:`t_i = 1 - (1 - i/\text{steps})^{p}`, i = 0..steps (float64, host).

    ``grid_power`` p = 1 is the uniform grid; p > 1 takes smaller steps near t = 1, where the
    drift of the linear interpolant is stiff (rate ~ 1/(1 - t)) and Euler's bias builds up."""
    if not (isinstance(grid_power, (int, float)) and math.isfinite(grid_power) and grid_power >= 1.0):
        raise ValueError(f"grid_power must be a finite number >= 1, got {grid_power!r}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return u if grid_power == 1.0 else 1.0 - (1.0 - u) ** grid_power


def _checkpoint_indices(times: torch.Tensor, checkpoints: Sequence[float]) -> list[int]:
    """Grid indices (strictly inside the grid) of the intermediate checkpoint times."""
    bad = [t for t in checkpoints if not (isinstance(t, (int, float)) and 0.0 < t < 1.0)]
    if bad:
        raise ValueError(f"checkpoints are intermediate times in (0, 1) (t = 1 is always tested), got {bad}")
    last = times.shape[0] - 1
    idx = {int(torch.argmin((times - t).abs())) for t in checkpoints}
    return sorted(i for i in idx if 0 < i < last)


def _sample_gaussian(case: VerificationCase, variant: Variant, n: int, times: torch.Tensor, stops: list[int],
                     interp, generator, seed: int, dtype, device, n_final: int | None = None):
    """Sample with the variant along ``times``; returns the final samples and the states at the
    grid indices ``stops``, all in the target's layout. The run is split at the stops (the same
    arithmetic as one run over the whole grid); after the last stop only the first ``n_final``
    (default n) configurations continue to t = 1."""
    denoiser: nn.Module = ExactDenoiser(case, interp)
    if variant.garbage_vertical:
        denoiser = GarbageVertical(denoiser, case.quotient, seed=seed + 1)
    model = QuotientDiffusion(case.quotient, denoiser, interp, validate=False)
    x = case.to_group(case.target.sample_noise(n, generator, dtype=dtype, device=device))
    states = []
    bounds = [0, *stops, times.shape[0] - 1]
    for k, (i0, i1) in enumerate(itertools.pairwise(bounds)):
        if k == len(stops) and n_final is not None:
            x = x[:n_final]
        x = model.sample(
            tuple(x.shape), steps=i1 - i0, sampler=variant.sampler, geometry=variant.geometry, generator=generator,
            curvature_factor=variant.curvature_factor, x0=x, dtype=dtype, device=device, time_grid=times[i0:i1 + 1],
        )
        states.append(case.from_group(x))
    return states[-1], states[:-1]


def _checkpoint_summary(t: float, n: int, n_exact: int, stats: dict) -> dict:
    joint = stats["joint"] or {}
    ks_p = min(1.0, min(f["p"] for f in stats["features"].values()) * len(stats["features"]))
    return {"t": t, "n": n, "n_exact": n_exact, "p_value": stats["p_value"], "ks_p": ks_p, "joint_p": joint.get("p"), "joint_dof": joint.get("dof"),
            "joint_d": joint.get("d"), "statistic": stats["statistic"], "effect_size": stats["effect_size"]}


def run_case(
    case: VerificationCase,
    variant: Variant | str,
    *,
    n_samples: int = 4000,
    steps: int = 200,
    heun_steps: int | None = None,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
    interpolant: str = "linear",
    return_samples: bool = False,
    checkpoints: Sequence[float] = DEFAULT_CHECKPOINTS,
    exact_factor: int = DEFAULT_EXACT_FACTOR,
    grid_power: float = 1.0,
    final_samples: int | None = None,
):
    r"""Run one variant on one case; returns a :class:`VerificationRecord` (and the generated and
    exact samples at t = 1 in the target's layout when ``return_samples``).

    Args:
        n_samples: generated samples, compared at the intermediate checkpoints; ``exact_factor``
            times as many exact draws per checkpoint (exact draws are cheap, and more of them
            shrink the two-sample noise towards the generated sample's own: the effective size is
            ``n / (1 + 1/exact_factor)``).
        final_samples: how many of them continue past the last intermediate checkpoint to t = 1
            and are compared there (default ``n_samples``; at most ``n_samples``; without
            intermediate checkpoints, e.g. the lattice, only ``final_samples`` are drawn).  Euler's
            O(dt) bias builds up late, so a correct Euler sampler's final samples are resolvable
            from the target at a smaller size than its intermediate states (docs/verify.md).
        steps / heun_steps: Euler(-Maruyama) steps, Heun steps (default ``max(steps // 5, 10)``).
        checkpoints: intermediate times in (0, 1) at which the sampler's state is compared with the
            forward marginal :math:`\hat\alpha_t\varepsilon + \beta_t x_1` as well (snapped to the
            nearest grid time; Gaussian-prior targets only, the lattice's VE sampler is tested at
            t = 1 only). ``()`` tests t = 1 only.
        grid_power: the time grid :func:`time_grid` (1: uniform).
        alpha: family-wise level over checkpoints, tests and features (:func:`compare_features`).
    """
    if isinstance(variant, str):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; available: {', '.join(VARIANTS)}")
        variant = VARIANTS[variant]
    if not isinstance(n_samples, int) or n_samples < 50:
        raise ValueError(f"n_samples must be an integer >= 50 for a meaningful two-sample test, got {n_samples!r}")
    if final_samples is None:
        final_samples = n_samples
    if not isinstance(final_samples, int) or not 50 <= final_samples <= n_samples:
        raise ValueError(f"final_samples must be an integer in [50, n_samples = {n_samples}], got {final_samples!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(exact_factor, int) or exact_factor < 1:
        raise ValueError(f"exact_factor must be a positive integer, got {exact_factor!r}")
    if variant.needs_fibres and not case.has_fibres:
        raise ValueError(f"variant {variant.name!r} needs a group with continuous fibres; {case.quotient.name} is discrete")
    device = torch.device(device)
    n_steps = _steps_for(variant, steps, heun_steps)
    times = time_grid(n_steps, grid_power)
    start = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(seed)
    n_exact = exact_factor * n_samples
    ref_gen = torch.Generator(device=device).manual_seed(seed + 10_000)
    tested = []  # (t, generated, exact)
    if getattr(case.target, "interpolant", "gaussian") == "ve_torus":
        samples = _sample_lattice(case, variant, final_samples, n_steps, gen, dtype, device)
    elif getattr(case.target, "interpolant", "gaussian") == "geodesic":  # curved M: exact draws of p_t at every checkpoint
        stops = _checkpoint_indices(times, checkpoints)
        samples, states = _curved.sample_variant(case, variant, n_samples, times.to(dtype), stops, gen, seed, dtype, device,
                                                 n_final=final_samples)
        for i, state in zip(stops, states):
            tested.append((float(times[i]), state, case.target.sample_marginal(n_exact, float(times[i]), ref_gen, dtype=dtype, device=device)))
    else:
        interp = make_interpolant(interpolant)
        stops = _checkpoint_indices(times, checkpoints)
        samples, states = _sample_gaussian(case, variant, n_samples, times.to(dtype), stops, interp, gen, seed, dtype, device,
                                           n_final=final_samples)
        for i, state in zip(stops, states):
            t = times[i].to(dtype=dtype, device=device)
            x1 = case.target.sample(n_exact, ref_gen, dtype=dtype, device=device)
            eps = case.target.sample_noise(n_exact, ref_gen, dtype=dtype, device=device)
            tested.append((float(times[i]), state, case.target.forward(x1, eps, interp.ahat(t), interp.beta(t))))
    exact = case.target.sample(exact_factor * samples.shape[0], ref_gen, dtype=dtype, device=device)
    tested.append((1.0, samples, exact))
    k = len(tested)
    results = [compare_features(case.target.features(g), case.target.features(e), alpha / k) for _, g, e in tested]
    summaries = [_checkpoint_summary(t, g.shape[0], e.shape[0], r) for (t, g, e), r in zip(tested, results)]
    p_value = min(1.0, k * min(r["p_value"] for r in results))
    if k == 1:  # no intermediate checkpoint: only the final samples were drawn
        n_samples, n_exact = final_samples, exact_factor * final_samples
    record = VerificationRecord(
        target=case.name, variant=variant.name, expected=variant.expected, passed=p_value >= alpha,
        statistic=max(r["statistic"] for r in results), p_value=p_value,
        effect_size=max(r["effect_size"] for r in results),
        n_samples=n_samples, steps=n_steps, seconds=time.perf_counter() - start,
        description=variant.description, group=case.quotient.name, features=results[-1]["features"],
        n_exact=n_exact, checkpoints=summaries, final_samples=int(samples.shape[0]),
    )
    if return_samples:
        return record, samples, exact
    return record


# ---------------------------------------------------------------------------------------------
# Suites


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes and settings of a suite run.

    Every run starts from ``n_samples``, ``final_samples`` (None: ``n_samples``), ``steps`` and
    ``heun_steps``; ``overrides`` updates them, from the least to the most specific key:
    ``"target"``, ``"target/sampler"`` (sampler ``"ode"``, ``"sde"`` or ``"heun"``) and
    ``"target/variant"``, each mapping to a dict with any of those four keys.  ``variants`` (None:
    all applicable) is the variant list when the caller gives none; ``checkpoints``,
    ``exact_factor`` and ``grid_power`` go to :func:`run_case`.
    """

    targets: tuple[str, ...]
    n_samples: int
    steps: int
    heun_steps: int
    final_samples: int | None = None
    overrides: dict = field(default_factory=dict)
    variants: tuple[str, ...] | None = None
    checkpoints: tuple[float, ...] = DEFAULT_CHECKPOINTS
    exact_factor: int = DEFAULT_EXACT_FACTOR
    grid_power: float = 1.0

    def __post_init__(self):
        allowed = {"n_samples", "final_samples", "steps", "heun_steps"}
        for key, value in self.overrides.items():
            if not isinstance(value, dict) or not set(value) <= allowed:
                raise ValueError(f"override {key!r} must be a dict with keys among {sorted(allowed)}, got {value!r}")

    def sizes(self, target: str, variant: Variant | None = None) -> dict:
        """``{"n_samples", "final_samples", "steps", "heun_steps"}`` for a target name (and variant)."""
        out = {"n_samples": self.n_samples, "final_samples": self.final_samples, "steps": self.steps,
               "heun_steps": self.heun_steps}
        keys = [target] + ([f"{target}/{variant.sampler}", f"{target}/{variant.name}"] if variant is not None else [])
        for key in keys:
            out.update(self.overrides.get(key, {}))
        if out["final_samples"] is None or out["final_samples"] > out["n_samples"]:
            out["final_samples"] = out["n_samples"]
        return out


_ORIGINAL_VARIANTS = (
    "quotient_ode", "quotient_sde", "quotient_heun", "conventional_ode", "conventional_sde", "sde_paper_sign",
    "sde_no_curvature", "garbage_vertical_conventional", "garbage_vertical_quotient",
)
# Sizes (docs/verify.md, "Sizes, resolution, false alarms and power", has the measurements behind
# them).  A half-wrong curvature drift shows most at t ~ 1/2 (SO(2): 0.07 standard deviations of the
# invariants in the joint mean test; SE(3): 0.12; torus: 0.2), where the correct Euler samplers have
# no resolvable bias (the torus: 0.02): the SDE variants draw 16,000 (SO(2)), 3,000 (SE(3), whose
# exact denoiser is 8x dearer) and 2,000 (torus) samples for the t = 1/2 test.  Euler's O(dt) bias builds up late (at t = 1 and 200 steps, in the same units:
# ODE 0.03 / 0.05 / 0.04 on SO(2) / SE(3) / torus, SDE 0.02 / 0.05 / 0.01), so only as many of
# them continue to t = 1 as keep that bias below the test's resolution (noncentrality
# n_eff bias^2 <= 1); SE(3)'s SDE variants take 300 steps for a larger final sample.  Heun's bias
# is unresolvable at these sizes.  grid_power 1.5 takes smaller steps near t = 1.
# Curved total spaces (docs/verify.md, "Curved total spaces"), the same in both suites: the exact fields
# are smooth, so 100 Euler steps for the ODEs; the SDE's Euler-Maruyama bias (about 0.03 sd on S^2 at
# 100 steps, 0.05 on frames at t = 1) sets its steps and final sizes, the no-curvature control's signal
# at t = 1/2 (about 0.15 sd) its n_samples.
_CURVED_SIZES = {
    "sphere_points": {"n_samples": 2000, "final_samples": 1000, "steps": 100, "heun_steps": 20},
    "sphere_points/sde": {"n_samples": 6000, "final_samples": 1200, "steps": 200},
    "sphere_points/heun": {"final_samples": 2000},
    "se3_frames": {"n_samples": 1500, "final_samples": 600, "steps": 100, "heun_steps": 20},
    "se3_frames/sde": {"n_samples": 3000, "final_samples": 600, "steps": 150},
    "se3_frames/heun": {"final_samples": 1500},
}
DEFAULT_CONFIG = SuiteConfig(
    targets=("so2", "se3", "torus", "permutations", "lattice", "so2_user_group", "sphere_points", "se3_frames"),
    n_samples=4000, steps=200, heun_steps=40,
    overrides={
        **{f"{t}/ode": {"final_samples": 1200} for t in ("so2", "so2_user_group")},
        **{f"{t}/sde": {"n_samples": 16000, "final_samples": 3000} for t in ("so2", "so2_user_group")},
        "se3": {"n_samples": 1500, "final_samples": 400},
        "se3/sde": {"n_samples": 3000, "final_samples": 1000, "steps": 300},
        "se3/heun": {"n_samples": 3000, "final_samples": 3000},
        "torus": {"n_samples": 2500, "final_samples": 800},
        "torus/sde": {"n_samples": 2000, "final_samples": 2000},
        "torus/heun": {"final_samples": 2500},
        **_CURVED_SIZES,
        # likelihood checks (likelihood_checks.LIKELIHOOD_SIZES: 16 samples, 40 RK4 steps): SE(3)'s exact
        # divergence costs 4x SO(2)'s per sample, and the error is deterministic, not a sampling error
        "se3/likelihood": {"n_samples": 8},
    },
    grid_power=1.5,
)
# CI: the nine variants that existed before the half-wrong curvature controls (those need the
# default suite's sample sizes), at smaller sizes; same verdict structure; and the likelihood checks.
QUICK_CONFIG = SuiteConfig(targets=("so2", "se3", "torus", "permutations", "lattice", "sphere_points", "se3_frames"),
                           n_samples=2000, steps=150, heun_steps=30,
                           variants=_ORIGINAL_VARIANTS + tuple(LIKELIHOOD_VARIANTS), grid_power=1.5,
                           overrides={"se3/likelihood": {"n_samples": 8}, **_CURVED_SIZES})


def _variants_for(case: VerificationCase, variants: Sequence[str] | None) -> list[Variant]:
    """The sampler variants among ``variants`` (None: all) that apply to ``case``; likelihood check
    names are accepted and skipped here (:func:`likelihood_variants_for` picks them)."""
    # a target may name its default variants (the curved ones leave out the half-wrong drifts, which
    # they cannot resolve at the suite's sizes: docs/verify.md)
    names = list(variants) if variants else list(getattr(case.target, "default_variants", None) or VARIANTS)
    unknown = [v for v in names if v not in VARIANTS and v not in LIKELIHOOD_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; available: {', '.join(available_variants())}")
    return [VARIANTS[v] for v in names if v in VARIANTS and (case.has_fibres or not VARIANTS[v].needs_fibres)]


def estimated_cost(case: VerificationCase, variant: Variant, n_samples: int, steps: int, heun_steps: int | None,
                   final_samples: int | None = None, checkpoints: Sequence[float] = (), grid_power: float = 1.0) -> float:
    """Relative cost of a run: the sum over denoiser evaluations of the configurations evaluated,
    times ``target.relative_cost`` (the measured cost of one configuration and evaluation relative
    to the SO(2) toy's) and ``target.sde_cost`` for the SDE samplers; Heun evaluates twice per
    step, and after the last intermediate checkpoint only ``final_samples`` configurations go on.
    The progress bar's weights, so that its ETA does not jump when a cheap run follows a dear one."""
    n_steps = _steps_for(variant, steps, heun_steps)
    final = n_samples if final_samples is None else final_samples
    if getattr(case.target, "interpolant", "gaussian") in ("gaussian", "geodesic") and checkpoints:
        stops = _checkpoint_indices(time_grid(n_steps, grid_power), checkpoints)
        before = stops[-1] if stops else 0
    else:
        before, n_samples = 0, final
    sample_evals = n_samples * before + final * (n_steps - before)
    factor = getattr(case.target, "relative_cost", 1.0)
    if variant.sampler == "heun":
        factor *= 2.0
    elif variant.sampler == "sde":
        factor *= getattr(case.target, "sde_cost", 1.0)
    return float(sample_evals * factor)


def run_suite(
    targets: Sequence[str | VerificationCase] = DEFAULT_CONFIG.targets,
    variants: Sequence[str] | None = None,
    *,
    config: SuiteConfig = DEFAULT_CONFIG,
    n_samples: int | None = None,
    steps: int | None = None,
    heun_steps: int | None = None,
    final_samples: int | None = None,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    device: str = "cpu",
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    plots_dir: str | None = None,
    likelihood_samples: int | None = None,
    likelihood_steps: int | None = None,
) -> list[VerificationRecord]:
    """Run every applicable variant on every target; optionally write PNG histograms.

    Sizes: ``n_samples`` / ``steps`` / ``heun_steps`` / ``final_samples`` when given apply to
    every sampler run (a given ``n_samples`` is also the final sample size unless ``final_samples`` is
    given), else ``config.sizes(target, variant)`` (a user's :class:`VerificationCase` gets the
    config's base sizes unless its name is in the config).
    ``variants`` None means ``config.variants`` (None: all applicable sampler variants and
    likelihood checks). The likelihood checks of a target (:mod:`qmanifold.verify.likelihood_checks`,
    targets with a closed-form density) run together, after its sampler variants, sharing their
    ``log_prob`` solves; their sizes are ``likelihood_samples`` / ``likelihood_steps`` when given,
    else :func:`likelihood_sizes` (the config's ``"target/likelihood"`` override); they return
    :class:`~qmanifold.verify.likelihood_checks.LikelihoodRecord` s. The progress bar is
    weighted by :func:`estimated_cost` (:func:`likelihood_cost`), so that its ETA (remaining cost /
    cost per second so far) stays put from one run to the next.
    """
    cases = [t if isinstance(t, VerificationCase) else builtin_case(t) for t in targets]
    chosen = variants if variants else config.variants
    lik_names = list(chosen) if chosen else list(LIKELIHOOD_VARIANTS)
    jobs = []
    for case in cases:
        for variant in _variants_for(case, chosen):
            sizes = config.sizes(case.name, variant)
            given = {"n_samples": n_samples, "steps": steps, "heun_steps": heun_steps,
                     "final_samples": final_samples if final_samples is not None else n_samples}
            sizes.update({key: value for key, value in given.items() if value is not None})
            cost = estimated_cost(case, variant, **sizes, checkpoints=config.checkpoints, grid_power=config.grid_power)
            jobs.append((case, variant, sizes, cost))
        checks = tuple(likelihood_variants_for(case, lik_names))
        if checks:
            sizes = likelihood_sizes(config, case.name, likelihood_samples, likelihood_steps)
            jobs.append((case, checks, sizes, likelihood_cost(case, checks, **sizes)))
    if not jobs:
        raise ValueError("nothing to run: no variant applies to the selected targets")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(job[3] for job in jobs)
        # smoothing=0: the rate is the average over the whole run so far (cost units per second),
        # which the cost weights make steady; the default moving average follows the last run
        bar = tqdm(total=total, desc="qmanifold verify", smoothing=0,
                   bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}")
    records = []
    try:
        for i, (case, variant, sizes, cost) in enumerate(jobs):
            if isinstance(variant, tuple):  # the likelihood checks of one case
                if bar is not None:
                    bar.set_postfix_str(f"run {i + 1}/{len(jobs)}: {case.name}/likelihood")
                checked, values = run_likelihood_checks(case, variant, **sizes, seed=seed, device=device, dtype=dtype,
                                                        return_values=True)
                records.extend(checked)
                for rec in checked if plots_dir is not None else ():
                    write_likelihood_plot(plots_dir, rec, *values[rec.variant])
                if bar is not None:
                    bar.update(cost)
                continue
            if bar is not None:
                bar.set_postfix_str(f"run {i + 1}/{len(jobs)}: {case.name}/{variant.name}")
            record, samples, exact = run_case(
                case, variant, **sizes, seed=seed, alpha=alpha, device=device, dtype=dtype, return_samples=True,
                checkpoints=config.checkpoints, exact_factor=config.exact_factor, grid_power=config.grid_power,
            )
            records.append(record)
            if plots_dir is not None:
                write_plots(plots_dir, case, record, samples, exact)
            if bar is not None:
                bar.update(cost)
    finally:
        if bar is not None:
            bar.close()
    return records


# ---------------------------------------------------------------------------------------------
# Reporting


def _fmt_effect(value: float) -> str:
    """The effect size with 3 decimals, or 4 significant digits when it is large (a failing variant)."""
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def format_table(records: Sequence[VerificationRecord]) -> str:
    """A plain-text table of the records: the sampler runs, then the likelihood checks (their own
    columns, :func:`~qmanifold.verify.likelihood_checks.format_likelihood_table`)."""
    checks = [r for r in records if getattr(r, "kind", "sampler") == "likelihood"]
    runs = [r for r in records if getattr(r, "kind", "sampler") != "likelihood"]
    header = (f"{'target':<16}{'variant':<32}{'expect':<8}{'result':<8}{'KS D':>8}{'p-value':>11}{'W1/sd':>10}{'n':>7}"
              f"{'n@t=1':>7}{'steps':>7}  verdict")
    lines = [header, "-" * len(header)] if runs or not checks else []
    for r in runs:
        verdict = "ok" if r.ok else "WRONG"
        lines.append(
            f"{r.target:<16}{r.variant:<32}{r.expected:<8}{'pass' if r.passed else 'fail':<8}"
            f"{r.statistic:>8.3f}{r.p_value:>11.2e}{_fmt_effect(r.effect_size):>10}{r.n_samples:>7d}"
            f"{r.final_samples or r.n_samples:>7d}{r.steps:>7d}  {verdict}"
        )
    if checks:
        lines.extend([""] if lines else [])
        lines.extend(format_likelihood_table(checks).splitlines())
    n_ok = sum(r.ok for r in records)
    lines.append("-" * len(header))
    lines.append(f"{n_ok}/{len(records)} verdicts as expected")
    return "\n".join(lines)


def write_json(path: str, records: Sequence[VerificationRecord]) -> None:
    """Write the records as a strict JSON list (atomically; a non-finite number is ``null``)."""
    atomic_write_json(path, [r.to_dict() for r in records])


def write_plots(directory: str, case: VerificationCase, record: VerificationRecord, samples, exact) -> str:
    """PNG histograms of generated vs exact invariant features for one record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    gen_f, ex_f = case.target.features(samples), case.target.features(exact)
    keys = list(ex_f)[:8]
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        e = ex_f[key].double().cpu().numpy()
        g = gen_f[key].double().cpu().numpy()
        g = g[np.isfinite(g)]
        lo, hi = np.quantile(e, [0.001, 0.999])
        span = hi - lo or 1.0
        bins = np.linspace(lo - 0.1 * span, hi + 0.1 * span, 50)
        ax.hist(e, bins=bins, density=True, alpha=0.5, label="exact")
        ax.hist(np.clip(g, bins[0], bins[-1]), bins=bins, density=True, histtype="step", linewidth=1.5, label="generated")
        ax.set_title(f"{key}  p={record.features[key]['p']:.1e}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    verdict = "ok" if record.ok else "WRONG"
    fig.suptitle(f"{record.target} / {record.variant}: expected {record.expected}, {'passed' if record.passed else 'failed'} ({verdict})", fontsize=9)
    fig.tight_layout()
    path = os.path.join(directory, f"{record.target}__{record.variant}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
