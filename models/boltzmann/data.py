r"""Ground-truth samples of the Boltzmann systems by the project's own MCMC, cached as ``.npz``.

Procedure (:func:`generate`; every number it measures goes into the file's metadata):

1. ``C`` parallel chains start from :attr:`System.init` (seeded) and run ``burn_in`` MALA steps on
   the centre-of-mass-free subspace (noise centred; the energies are translation invariant), the
   step size adapted towards an acceptance of 0.6 during burn-in only, then frozen. The drift is
   tamed to a norm of at most ``0.5 sqrt((N - 1) d)`` step sizes (MALTA; exact, see
   :func:`qmanifold.boltzmann.mcmc`), so that no chain sticks at a steep wall. Every chain's
   acceptance must be at least half the mean (else an error: a stuck chain).
2. A pilot run of ``pilot`` steps records the energy and the mean pair distance of every chain at
   every step. Their integrated autocorrelation times ``tau`` (Sokal's window, pooled over chains)
   set the thinning, ``thin = ceil(2 max tau)``; the burn-in must be at least ``20 max tau``
   (otherwise the pilot run is repeated as further burn-in, at most 5 times, then an error). A
   Geweke-style check compares the mean energy of the first and last fifths of the pilot run.
3. The production run continues the chains and keeps every ``thin``-th state until ``n`` samples
   are collected (``ceil(n / C)`` per chain, chain-major, the surplus dropped from the last chains).
4. Held-out split by chain: the last ``test_fraction`` of the chains are the test set, so no test
   sample is correlated with a training sample.

File format (``np.savez``): ``x`` ``(n, N, d)`` float64 (centred), ``energy`` ``(n,)``, ``chain``
``(n,)`` int, ``test`` ``(n,)`` bool, ``meta`` (a JSON string: system, convention, seed, MCMC
settings and diagnostics, format version).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from qmanifold.atomic import atomic_open
from qmanifold.boltzmann import integrated_autocorrelation_time, mcmc

from .systems import System, get_system, pair_distances

__all__ = ["FORMAT_VERSION", "BoltzmannData", "generate", "save", "load", "default_path", "load_or_generate"]

FORMAT_VERSION = 1


@dataclass
class BoltzmannData:
    """A ground-truth data set: ``x`` ``(n, N, d)``, ``energy`` ``(n,)``, ``chain`` ``(n,)``, ``test``
    ``(n,)`` bool, ``meta`` (dict)."""

    x: np.ndarray
    energy: np.ndarray
    chain: np.ndarray
    test: np.ndarray
    meta: dict

    @property
    def system(self) -> System:
        return get_system(self.meta["system"])

    def split(self, name: str) -> np.ndarray:
        """Configurations of ``"train"``, ``"test"`` or ``"all"``."""
        if name == "all":
            return self.x
        if name not in ("train", "test"):
            raise ValueError(f"unknown split {name!r}; choose 'train', 'test' or 'all'")
        return self.x[self.test] if name == "test" else self.x[~self.test]


def _center(v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(-2, keepdim=True)


def _mean_pair_distance(x: torch.Tensor) -> torch.Tensor:
    return pair_distances(x).mean(-1)


def generate(
    system: System | str,
    n: int,
    *,
    seed: int = 0,
    chains: int | None = None,
    burn_in: int | None = None,
    pilot: int | None = None,
    test_fraction: float = 0.2,
    max_extra_burn_in: int = 5,
    progress: bool = False,
    log=print,
) -> BoltzmannData:
    """Run the MCMC of the module docstring and return the data set (float64 throughout)."""
    system = get_system(system) if isinstance(system, str) else system
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    cfg = dict(system.mcmc)
    chains = int(chains or cfg["chains"])
    burn_in = int(cfg["burn_in"] if burn_in is None else burn_in)
    pilot = int(cfg["pilot"] if pilot is None else pilot)
    if chains < 2 or pilot < 100:
        raise ValueError(f"need at least 2 chains and a pilot run of at least 100 steps, got {chains}, {pilot}")
    t0 = time.time()
    gen = torch.Generator().manual_seed(int(seed))
    x = system.init(chains, gen, torch.float64)
    max_drift = float(cfg.get("max_drift", 0.5 * math.sqrt((system.n_particles - 1) * system.dim)))
    common = dict(method=cfg["method"], kT=system.kT, project=_center, generator=gen, progress=progress,
                  max_drift=max_drift)
    step = float(cfg["step_size"])
    run = mcmc(system.energy, x, n_samples=1, thin=pilot, burn_in=burn_in, step_size=step,
               target_acceptance=cfg["target_acceptance"], trace=True, observable=_mean_pair_distance, **common)
    total_burn = burn_in
    for attempt in range(max_extra_burn_in + 1):
        tau_e = integrated_autocorrelation_time(run.trace)
        tau_d = integrated_autocorrelation_time(run.observables["trace"])
        tau = max(tau_e, tau_d)
        if total_burn >= 20.0 * tau:
            break
        if attempt == max_extra_burn_in:
            raise ValueError(f"{system.name}: burn-in {total_burn} steps is still below 20 tau = {20 * tau:.0f} "
                               "after the extra pilot runs; raise --burn-in / --pilot")
        log(f"[data] {system.name}: tau = {tau:.0f} steps > burn-in / 20; pilot run {attempt + 2} (more burn-in)")
        total_burn += pilot
        run = mcmc(system.energy, run.final, n_samples=1, thin=pilot, burn_in=0, step_size=run.step_size,
                   trace=True, observable=_mean_pair_distance, **common)
    worst = float(run.chain_acceptance.min())
    if worst < 0.5 * run.acceptance:
        raise ValueError(f"{system.name}: a chain accepts only {worst:.2f} of its moves (mean {run.acceptance:.2f}): "
                           "it is stuck; change --seed or the initial states")
    # Geweke: first fifth vs last fifth of the pilot, chain means, z-score with the tau-corrected error
    fifth = run.trace.shape[0] // 5
    first, last = run.trace[:fifth], run.trace[-fifth:]
    se = math.sqrt(float(first.var()) * tau_e / first.numel() + float(last.var()) * tau_e / last.numel())
    geweke_z = float(last.mean() - first.mean()) / se if se > 0 else 0.0
    thin = max(1, math.ceil(2.0 * tau))
    per_chain = math.ceil(n / chains)
    log(f"[data] {system.name}: step {run.step_size:.4g}, acceptance {run.acceptance:.2f}, tau(energy) {tau_e:.1f}, "
        f"tau(mean distance) {tau_d:.1f} steps -> thin {thin}; {per_chain} samples x {chains} chains")
    prod = mcmc(system.energy, run.final, n_samples=per_chain, thin=thin, burn_in=0, step_size=run.step_size, **common)
    samples = prod.samples.transpose(0, 1)  # (C, S, N, d): chain-major
    energies = prod.energies.transpose(0, 1)
    chain_ids = torch.arange(chains)[:, None].expand(-1, per_chain)
    xs = _center(samples.reshape(-1, system.n_particles, system.dim))[:n]
    us = energies.reshape(-1)[:n]
    cid = chain_ids.reshape(-1)[:n]
    used_chains = int(cid.max()) + 1
    first_test = round(used_chains * (1.0 - test_fraction))
    test = cid >= first_test
    tau_thinned = integrated_autocorrelation_time(prod.energies) if per_chain >= 4 else float("nan")
    meta = dict(
        format_version=FORMAT_VERSION, system=system.name, convention=system.convention, kT=system.kT,
        n=int(n), seed=int(seed), chains=chains, method=cfg["method"], step_size=run.step_size, max_drift=max_drift,
        acceptance_pilot=run.acceptance, acceptance_production=prod.acceptance,
        min_chain_acceptance=float(torch.minimum(run.chain_acceptance, prod.chain_acceptance).min()),
        burn_in=total_burn, burn_in_requested=burn_in, pilot=pilot, tau_energy=tau_e, tau_mean_distance=tau_d, thin=thin,
        samples_per_chain=per_chain, tau_energy_after_thinning=tau_thinned, geweke_z_energy=geweke_z,
        test_fraction=test_fraction, n_test=int(test.sum()), n_train=int((~test).sum()),
        mean_energy=float(us.mean()), std_energy=float(us.std()),
        mcmc_steps_per_chain=total_burn + pilot + per_chain * thin, seconds=time.time() - t0,
    )
    return BoltzmannData(x=xs.numpy(), energy=us.numpy(), chain=cid.numpy(), test=test.numpy(), meta=meta)


def save(path: str | os.PathLike, data: BoltzmannData) -> None:
    """Write ``data`` to ``path`` (``.npz``, atomically)."""
    with atomic_open(path, "wb") as fh:
        np.savez(fh, x=data.x, energy=data.energy, chain=data.chain, test=data.test,
                 meta=np.array(json.dumps(data.meta)))


def load(path: str | os.PathLike) -> BoltzmannData:
    """Read a file written by :func:`save`; ValueError if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x", "energy", "chain", "test", "meta") if k not in z.files]
            if missing:
                raise ValueError(f"{path} is not a Boltzmann data file (missing {', '.join(missing)}); "
                                 "make one with `qmanifold data dw4|lj13`")
            meta = json.loads(str(z["meta"]))
            data = BoltzmannData(x=z["x"], energy=z["energy"], chain=z["chain"], test=z["test"].astype(bool), meta=meta)
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}; "
                         "regenerate it")
    get_system(meta["system"]).check(torch.from_numpy(data.x[:1]), "x")
    return data


def default_path(system: str, n: int, seed: int) -> str:
    """``$QMANIFOLD_CACHE/boltzmann/<system>_n<n>_seed<seed>.npz`` (default ``~/.cache/qmanifold``)."""
    root = os.environ.get("QMANIFOLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qmanifold")
    return os.path.join(root, "boltzmann", f"{system}_n{n}_seed{seed}.npz")


def load_or_generate(system: str, n: int, path: str | None = None, *, seed: int = 0, overwrite: bool = False,
                     log=print, **options) -> tuple[BoltzmannData, str, bool]:
    """The cached data set at ``path`` if it was made with the same system, n and seed (and
    ``options``), else generate and save it. Returns ``(data, path, cached)``.

    Raises ValueError if ``path`` holds a different data set and ``overwrite`` is not set.
    """
    system_obj = get_system(system)
    path = path or default_path(system_obj.name, n, seed)
    if os.path.exists(path) and not overwrite:
        data = load(path)
        keys = dict(chains="chains", burn_in="burn_in_requested", pilot="pilot", test_fraction="test_fraction")
        want = dict(system=system_obj.name, n=int(n), seed=int(seed),
                    **{keys[k]: v for k, v in options.items() if k in keys and v is not None})
        got = {k: data.meta.get(k) for k in want}
        if got != want:
            raise ValueError(f"{path} holds a different data set ({got}, wanted {want}); pass --overwrite to "
                             "replace it or choose another --out")
        return data, path, True
    data = generate(system_obj, n, seed=seed, log=log, **options)
    save(path, data)
    return data, path, False
