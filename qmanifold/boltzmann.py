r"""Boltzmann-generator tools on plain tensors: MCMC ground truth, importance weights, Kish ESS,
autocorrelation times, and 1-D Wasserstein distances with weights.

Nothing here knows a named group or energy (those live in :mod:`qmanifold.models.boltzmann`); an
energy is any batched callable ``U(x) -> (B,)`` and a constraint (the centre-of-mass-free subspace,
for a translation-invariant energy) is a linear projector ``project(v) -> v`` onto the subspace the
chain moves in.

Conventions (docs/boltzmann.md):

* Target: ``p(x) = exp(-U(x)/kT) / Z`` on the subspace ``M`` the projector defines, with respect to
  its Lebesgue measure (for the centre-of-mass-free subspace of N points in R^d: dimension
  ``(N - 1) d``).
* Importance weights of model samples ``x_i ~ q``: ``log w_i = -U(x_i)/kT - log q(x_i)``, with
  ``log q`` the model's log-density on the same ``M`` (``QuotientDiffusion.log_prob(space="total")``).
  Then ``mean_i w_i`` estimates ``Z`` (:func:`log_partition_estimate`) and the self-normalised
  weights ``w_i / sum_j w_j`` reweight model samples to ``p``.
* Kish's effective sample size, as a fraction of the sample count:
  ``ESS = (sum w)^2 / (n sum w^2)`` in ``(0, 1]``; 1 exactly when all weights are equal (the model
  is the target).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "importance_log_weights",
    "kish_ess",
    "self_normalized_weights",
    "log_partition_estimate",
    "wasserstein_1d",
    "autocorrelation",
    "integrated_autocorrelation_time",
    "MCMCResult",
    "mcmc",
    "MCMC_METHODS",
]

MCMC_METHODS = ("mala", "metropolis")

Energy = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# importance weights


def importance_log_weights(energy: torch.Tensor, log_q: torch.Tensor, kT: float = 1.0) -> torch.Tensor:
    r"""``log w = -U/kT - log q``: ``(n,)``. Non-finite energies or densities (a sample the energy or
    the model cannot evaluate, an overlap of two particles) get ``log w = -inf`` (weight 0)."""
    if energy.shape != log_q.shape:
        raise ValueError(f"energy {tuple(energy.shape)} and log_q {tuple(log_q.shape)} must have the same shape")
    if not kT > 0:
        raise ValueError(f"kT must be positive, got {kT}")
    log_w = -energy / kT - log_q
    return torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))


def kish_ess(log_w: torch.Tensor) -> torch.Tensor:
    r"""Kish's effective sample size as a fraction of ``n``: ``(sum w)^2 / (n sum w^2)``, computed from
    log-weights ``(n,)`` without overflow. 1 for equal weights; ``1/n`` when one weight dominates;
    0 if every weight is 0."""
    if log_w.dim() != 1 or log_w.shape[0] == 0:
        raise ValueError(f"log_w must be a non-empty 1-D tensor, got shape {tuple(log_w.shape)}")
    top = log_w.max()
    if not torch.isfinite(top):
        return torch.zeros((), dtype=log_w.dtype, device=log_w.device)
    w = torch.exp(log_w - top)
    return w.sum().square() / (log_w.shape[0] * w.square().sum())


def self_normalized_weights(log_w: torch.Tensor) -> torch.Tensor:
    """``w_i / sum_j w_j`` from log-weights ``(n,)`` (all zero if every weight is 0)."""
    top = log_w.max()
    if not torch.isfinite(top):
        return torch.zeros_like(log_w)
    w = torch.exp(log_w - top)
    return w / w.sum()


def log_partition_estimate(log_w: torch.Tensor) -> torch.Tensor:
    r"""``log (1/n sum_i w_i)``: the importance-sampling estimate of ``log Z`` (``Z`` the normaliser of
    ``exp(-U/kT)`` on M). Unbiased for ``Z`` (biased low for ``log Z`` by about ``Var(w)/(2 n E[w]^2)``),
    trustworthy only when the ESS is not tiny."""
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor, a_weights: torch.Tensor | None = None,
                   b_weights: torch.Tensor | None = None) -> torch.Tensor:
    r"""Exact ``W_1`` between two weighted empirical laws on the line: ``int |F_a(s) - F_b(s)| ds``.

    Args:
        a: ``(n,)`` values; b: ``(m,)`` values.
        a_weights, b_weights: non-negative weights (normalised here); None = uniform. With
            weights, a non-finite value must carry zero weight; without, non-finite values are
            dropped (count them yourself if they matter).
    """
    def prepare(v, w):
        v = v.reshape(-1).to(torch.float64)
        finite = torch.isfinite(v)
        if w is None:
            w = finite.to(torch.float64)
        else:
            w = w.reshape(-1).to(torch.float64)
            if w.shape != v.shape:
                raise ValueError(f"weights {tuple(w.shape)} do not match values {tuple(v.shape)}")
            if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
                raise ValueError("weights must be finite and non-negative")
            if bool((~finite & (w > 0)).any()):
                raise ValueError("a non-finite value has a positive weight")
        keep = finite & (w > 0)
        v, w = v[keep], w[keep]
        if v.numel() == 0:
            raise ValueError("an empirical law with no finite value of positive weight")
        return v, w / w.sum()

    va, wa = prepare(a, a_weights)
    vb, wb = prepare(b, b_weights)
    values = torch.cat([va, vb])
    signed = torch.cat([wa, -wb])
    order = torch.argsort(values)
    values, signed = values[order], signed[order]
    cdf_diff = torch.cumsum(signed, 0)[:-1]
    return (cdf_diff.abs() * values.diff()).sum()


# ----------------------------------------------------------------------------------------------
# autocorrelation


def autocorrelation(series: torch.Tensor) -> torch.Tensor:
    r"""Normalised autocorrelation ``rho(k)``, ``k = 0..T-1``, of ``series`` ``(T, C)`` (C chains of a
    stationary scalar), averaged over chains (FFT, each chain centred by its own mean): ``(T,)``,
    ``rho(0) = 1``."""
    if series.dim() == 1:
        series = series[:, None]
    T = series.shape[0]
    if T < 2:
        raise ValueError("need at least two time points")
    x = (series - series.mean(0, keepdim=True)).to(torch.float64)
    n = 1 << (2 * T - 1).bit_length()
    f = torch.fft.rfft(x, n=n, dim=0)
    acov = torch.fft.irfft(f * f.conj(), n=n, dim=0)[:T].mean(1) / T
    if not float(acov[0]) > 0:
        raise ValueError("the series is constant: its autocorrelation is undefined")
    return acov / acov[0]


def integrated_autocorrelation_time(series: torch.Tensor, c: float = 5.0) -> float:
    r"""Integrated autocorrelation time ``tau = 1 + 2 sum_{k>=1} rho(k)`` in steps, with Sokal's
    automatic window: the smallest ``W`` with ``W >= c tau(W)``. Samples ``tau`` steps apart count
    as about one independent draw; a chain of length T holds about ``T / tau`` of them.

    Args:
        series: ``(T, C)`` (C parallel chains) or ``(T,)``.
        c: window constant (5 for roughly exponential decay).
    """
    rho = autocorrelation(series)
    taus = 2.0 * torch.cumsum(rho, 0) - 1.0
    window = torch.arange(rho.shape[0], dtype=taus.dtype)
    ok = torch.nonzero(window >= c * taus).reshape(-1)
    idx = int(ok[0]) if ok.numel() else rho.shape[0] - 1
    return max(1.0, float(taus[idx]))


# ----------------------------------------------------------------------------------------------
# MCMC


@dataclass
class MCMCResult:
    """Output of :func:`mcmc`.

    Attributes:
        samples: ``(S, C, ...)``: the state of the C chains at every ``thin``-th step after burn-in.
        energies: ``(S, C)``: their energies.
        final: ``(C, ...)``: the last state (to continue the chains).
        step_size: the step size used after burn-in (adapted during burn-in).
        acceptance: mean acceptance rate after burn-in.
        chain_acceptance: ``(C,)`` acceptance rate of each chain after burn-in (a chain near 0 is
            stuck: check it before trusting the samples).
        trace: ``(T, C)`` energies at every step of the recorded phase if ``trace=True`` (for
            autocorrelation times), else None.
    """

    samples: torch.Tensor
    energies: torch.Tensor
    final: torch.Tensor
    step_size: float
    acceptance: float
    trace: torch.Tensor | None = None
    observables: dict = field(default_factory=dict)
    chain_acceptance: torch.Tensor | None = None


def _energy_and_grad(energy: Energy, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        u = energy(xr)
        (g,) = torch.autograd.grad(u.sum(), xr)
    return u.detach(), g.detach()


def mcmc(
    energy: Energy,
    x0: torch.Tensor,
    *,
    n_samples: int,
    thin: int = 1,
    burn_in: int = 0,
    method: str = "mala",
    step_size: float = 0.01,
    kT: float = 1.0,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_acceptance: float | None = None,
    max_drift: float | None = None,
    generator: torch.Generator | None = None,
    trace: bool = False,
    observable: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
) -> MCMCResult:
    r"""Run C parallel Markov chains that leave ``p(x) ∝ exp(-U(x)/kT)`` invariant on the subspace of
    ``project``.

    * ``"metropolis"``: random-walk Metropolis, proposal ``y = x + s P xi`` (``xi`` standard normal,
      P the projector), accepted with ``min(1, exp(-(U(y) - U(x))/kT))``.
    * ``"mala"``: Metropolis-adjusted Langevin, ``y = x + mu(x) + s P xi`` with the drift
      ``mu(x) = -(s^2 / (2 kT)) grad U(x)``, and the Hastings correction of the Gaussian proposal
      densities. The gradient of an energy that is invariant along the complement of the subspace
      (translations for a centred chain) already lies in it; it is projected anyway.
      With ``max_drift`` the drift is tamed (MALTA, Roberts & Tweedie 1996):
      ``mu(x) = -c g / max(1, c |g| / (max_drift s))``, ``c = s^2/(2 kT)``, so its norm is at most
      ``max_drift * s``; the same ``mu`` enters the Hastings correction, so the kernel stays exact. Without it a
      chain that meets a steep wall (two Lennard-Jones particles at 0.7 r_m, a DW4 particle far
      out on the quartic) overshoots on every proposal and never moves again.

    Burn-in: ``burn_in`` steps, discarded. With ``target_acceptance`` the step size is adapted
    during burn-in only (Robbins-Monro on ``log s`` with gain ``1/sqrt(k)``, one size for all
    chains) and then frozen, so the recorded chain is a fixed Markov kernel. Then
    ``n_samples * thin`` steps, keeping every ``thin``-th state.

    Args:
        energy: ``U(x) -> (C,)`` for ``x`` ``(C, ...)``; differentiable for MALA.
        x0: ``(C, ...)`` initial states (projected first).
        project: linear orthogonal projector onto the subspace (e.g. centring); None = identity.
        generator: a ``torch.Generator`` (same seed, same chains).
        trace: also keep the energy at every recorded step (``(n_samples * thin, C)``).
        observable: a scalar per chain ``(C, ...) -> (C,)`` traced like the energy (in
            ``observables["trace"]``) when ``trace`` is set.
    """
    if method not in MCMC_METHODS:
        raise ValueError(f"unknown MCMC method {method!r}; choose one of {MCMC_METHODS}")
    if n_samples < 1 or thin < 1 or burn_in < 0:
        raise ValueError(f"need n_samples >= 1, thin >= 1, burn_in >= 0; got {n_samples}, {thin}, {burn_in}")
    if not step_size > 0 or not kT > 0 or (max_drift is not None and not max_drift > 0):
        raise ValueError(f"step_size, kT and max_drift must be positive, got {step_size}, {kT}, {max_drift}")
    proj = project if project is not None else (lambda v: v)
    x = proj(x0.detach().clone())
    dims = tuple(range(1, x.dim()))
    gradient = method == "mala"

    def drift_of(grad: torch.Tensor, s: float) -> torch.Tensor:
        mu = -(s * s / (2.0 * kT)) * grad
        if max_drift is None:
            return mu
        norm = mu.square().sum(dims, keepdim=True).sqrt()
        return mu / torch.clamp(norm / (max_drift * s), min=1.0)

    if gradient:
        u, g = _energy_and_grad(energy, x)
        g = proj(g)
    else:
        with torch.no_grad():
            u = energy(x)
        g = None
    if not bool(torch.isfinite(u).all()):
        raise ValueError("the energy is not finite at an initial state; start the chains elsewhere")
    log_s = math.log(step_size)
    total = burn_in + n_samples * thin
    kept, kept_u, tr, obs_tr = [], [], [], []
    accepted = torch.zeros(x.shape[0], dtype=torch.float64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"mcmc ({method})", leave=False)
    for step in range(total):
        s = math.exp(log_s)
        noise = proj(torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
        if gradient:
            drift = drift_of(g, s)
            y = x + drift + s * noise
            uy, gy = _energy_and_grad(energy, y)
            gy = proj(gy)
            back = y + drift_of(gy, s)
            log_fwd = -(y - x - drift).square().sum(dims) / (2 * s * s)
            log_bwd = -(x - back).square().sum(dims) / (2 * s * s)
            log_acc = -(uy - u) / kT + log_bwd - log_fwd
        else:
            y = x + s * noise
            with torch.no_grad():
                uy = energy(y)
            log_acc = -(uy - u) / kT
        log_acc = torch.where(torch.isfinite(log_acc), log_acc, torch.full_like(log_acc, -math.inf))
        accept = torch.log(torch.rand(u.shape, generator=generator, dtype=u.dtype, device=u.device)) < log_acc
        shape = (-1,) + (1,) * (x.dim() - 1)
        x = torch.where(accept.reshape(shape), y, x)
        u = torch.where(accept, uy, u)
        if gradient:
            g = torch.where(accept.reshape(shape), gy, g)
        if step < burn_in:
            if target_acceptance is not None:
                rate = float(accept.to(torch.float64).mean())
                log_s += (rate - target_acceptance) / math.sqrt(step + 1.0)
        else:
            accepted += accept.to(torch.float64).cpu()
            k = step - burn_in
            if trace:
                tr.append(u.clone())
                if observable is not None:
                    with torch.no_grad():
                        obs_tr.append(observable(x).detach())
            if (k + 1) % thin == 0:
                kept.append(x.clone())
                kept_u.append(u.clone())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    observables = {"trace": torch.stack(obs_tr)} if obs_tr else {}
    per_chain = accepted / max(1, n_samples * thin)
    return MCMCResult(samples=torch.stack(kept), energies=torch.stack(kept_u), final=x, step_size=math.exp(log_s),
                      acceptance=float(per_chain.mean()), trace=torch.stack(tr) if tr else None,
                      observables=observables, chain_acceptance=per_chain)
