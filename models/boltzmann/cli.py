"""Command-line subcommands of the Boltzmann generators: ``data``, ``train-boltzmann``,
``evaluate-boltzmann`` (registered by :func:`qmanifold.models.cli.register`).

::

    qmanifold data dw4 --n 20000 --out dw4.npz            # MCMC ground truth (cached)
    qmanifold train-boltzmann --data dw4.npz --out runs/dw4 --steps 10000
    qmanifold evaluate-boltzmann --system dw4 --checkpoint runs/dw4/last.pt --data dw4.npz \\
        --n 2000 --json dw4.json --plots plots/

Building these parsers imports the standard library only; the handlers import torch.
"""

from __future__ import annotations

import argparse
import os

from qmanifold._clitools import (
    add_debug_flag,
    bounded_float,
    check_outputs,
    check_run_dir,
    nonnegative_int,
    positive_int,
    remove_run_files,
    require_file,
    run_handler,
)

__all__ = ["register", "SYSTEM_NAMES"]

#: the systems of :mod:`qmanifold.models.boltzmann.systems` (a test checks they agree)
SYSTEM_NAMES = ("dw4", "lj13")
#: default sample counts of ``qmanifold data`` (System.default_n; checked by a test)
DEFAULT_N = {"dw4": 20000, "lj13": 10000}
#: what ``qmanifold data`` makes: the particle systems (MCMC) and alanine dipeptide (OpenMM MD, models/boltzmann/aldp.py)
DATA_SYSTEMS = SYSTEM_NAMES + ("aldp",)


def _guard(fn):
    def wrapper(args: argparse.Namespace) -> int:
        return run_handler(fn, args)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _threads(n: int | None) -> None:
    import torch

    torch.set_num_threads(int(n or 1))


# ----------------------------------------------------------------------------------------------
# data


def _add_data(sub) -> None:
    p = sub.add_parser(
        "data", help="ground-truth Boltzmann samples of DW4 / LJ13 by MCMC (cached .npz)",
        description="Sample a Boltzmann target with the project's own MCMC (MALA on the centre-of-mass-free "
                    "subspace, seeded; burn-in and thinning from the measured autocorrelation time) and cache "
                    "the samples. An existing --out made with the same system, --n and --seed is reused.")
    p.add_argument("system", choices=DATA_SYSTEMS)
    p.add_argument("--ns", type=bounded_float(gt=0), default=None,
                   help="aldp only: nanoseconds of Langevin MD after equilibration, one frame per ps (default 20)")
    p.add_argument("--equilibration-ps", type=bounded_float(ge=0), default=None,
                   help="aldp only: equilibration before the first frame (default 100 ps)")
    p.add_argument("--n", type=positive_int, default=None,
                   help="samples (default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()) + ")")
    p.add_argument("--out", default=None,
                   help="output .npz (default $QMANIFOLD_CACHE/boltzmann/<system>_n<N>_seed<S>.npz, "
                        "QMANIFOLD_CACHE defaulting to ~/.cache/qmanifold)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--chains", type=positive_int, default=None, help="parallel chains (default 500)")
    p.add_argument("--burn-in", type=nonnegative_int, default=None, help="burn-in steps (default: the system's; "
                   "extended automatically to at least 20 autocorrelation times)")
    p.add_argument("--pilot", type=positive_int, default=None, help="steps of the pilot run that measures the "
                   "autocorrelation time (default 20000)")
    p.add_argument("--test-fraction", type=bounded_float(gt=0, lt=1), default=None,
                   help="fraction of the chains held out as the test split (default 0.2)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--overwrite", action="store_true", help="regenerate and replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_data)


@_guard
def cmd_data(args: argparse.Namespace) -> int:
    """Handler of ``data``."""
    if args.system == "aldp":
        return _data_aldp(args)
    if args.ns is not None or args.equilibration_ps is not None:
        raise ValueError("--ns and --equilibration-ps are for `qmanifold data aldp` only; use --n")
    from .data import default_path, load_or_generate

    n = args.n or DEFAULT_N[args.system]
    out = args.out or default_path(args.system, n, args.seed)
    if os.path.isdir(out):
        raise ValueError(f"cannot write --out {out}: it is a directory; give a file name")
    _threads(args.threads)
    options = dict(chains=args.chains, burn_in=args.burn_in, pilot=args.pilot, test_fraction=args.test_fraction)
    options = {k: v for k, v in options.items() if v is not None}
    data, path, cached = load_or_generate(args.system, n, out, seed=args.seed, overwrite=args.overwrite,
                                          progress=not args.no_progress, **options)
    m = data.meta
    print(f"[qmanifold] {args.system}: {m['n']} samples ({m['n_train']} train / {m['n_test']} test) "
          f"{'cached' if cached else 'written'} -> {path}")
    print(f"  MCMC: {m['method']} step {m['step_size']:.4g}, acceptance {m['acceptance_production']:.2f}, "
          f"{m['chains']} chains, burn-in {m['burn_in']}, tau(energy) {m['tau_energy']:.1f}, "
          f"tau(mean distance) {m['tau_mean_distance']:.1f}, thin {m['thin']}, Geweke z {m['geweke_z_energy']:.2f}; "
          f"mean energy {m['mean_energy']:.3f} +- {m['std_energy']:.3f} (std)")
    return 0


def _data_aldp(args: argparse.Namespace) -> int:
    """``qmanifold data aldp``: OpenMM Langevin MD of alanine dipeptide (models/boltzmann/aldp.py), cached."""
    for flag, val in (("--n", args.n), ("--chains", args.chains), ("--burn-in", args.burn_in), ("--pilot", args.pilot),
                      ("--test-fraction", args.test_fraction)):
        if val is not None:
            raise ValueError(f"{flag} is an MCMC option of dw4/lj13; aldp takes --ns (and --equilibration-ps)")
    from .aldp import default_path, load_or_generate

    ns = 20.0 if args.ns is None else float(args.ns)
    out = args.out or default_path(ns, args.seed)
    if os.path.isdir(out):
        raise ValueError(f"cannot write --out {out}: it is a directory; give a file name")
    _threads(1)
    md, path, cached = load_or_generate(ns, out, seed=args.seed, overwrite=args.overwrite, threads=args.threads,
                                        equilibration_ps=args.equilibration_ps,
                                        log=(lambda s: None) if args.no_progress else print)
    m = md["meta"]
    print(f"[qmanifold] aldp: {len(md['positions'])} frames ({m['ns']:g} ns, one per {m['frame_ps']:g} ps) "
          f"{'cached' if cached else 'written'} -> {path}")
    print(f"  MD: {m['integrator']} {m['timestep_fs']:g} fs, friction {m['friction_per_ps']:g}/ps, {m['temperature_K']:g} K, "
          f"{' + '.join(m['force_field'])}, constraints {m['constraints']}; {m['ns_per_day']:.0f} ns/day on "
          f"{m['threads']} thread(s); mean energy {m['mean_energy']:.2f} +- {m['std_energy']:.2f} kT (std)")
    return 0


# ----------------------------------------------------------------------------------------------
# train


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train-boltzmann", help="train an equivariant flow-matching Boltzmann generator (quotient loss)",
        description="Flow matching with the quotient loss on R^{Nd}/(SE(d) x S_N) and an E(n)- and "
                    "permutation-equivariant EGNN velocity field. Writes last.pt (resumable), log.jsonl, "
                    "config.json and summary.json into --out.")
    p.add_argument("--data", required=True, help="a .npz from `qmanifold data` (its training split is used)")
    p.add_argument("--out", required=True, help="run directory (new or empty, or an existing run with --resume)")
    p.add_argument("--steps", type=positive_int, default=5000, help="optimisation steps (default 5000)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=bounded_float(gt=0), default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--warmup", type=nonnegative_int, default=100)
    p.add_argument("--ema", type=bounded_float(ge=0, lt=1), default=0.999, help="EMA decay (default 0.999)")
    p.add_argument("--grad-clip", type=bounded_float(ge=0), default=1.0, help="0 = off (default 1)")
    p.add_argument("--hidden", type=positive_int, default=None, help="EGNN width (default: dw4 32, lj13 64)")
    p.add_argument("--layers", type=positive_int, default=None, help="EGNN layers (default: dw4 3, lj13 5)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--ckpt-every", type=positive_int, default=500)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop this invocation at this step (the schedule is planned for --steps); continue with --resume")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --out")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_train_boltzmann)


@_guard
def cmd_train_boltzmann(args: argparse.Namespace) -> int:
    """Handler of ``train-boltzmann``."""
    require_file("--data", args.data)
    stale = check_run_dir(args.out, {"--data": args.data}, resume=args.resume, overwrite=args.overwrite)
    from .train import TrainConfig, train

    remove_run_files(stale)
    _threads(args.threads)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema=args.ema,
                      grad_clip=args.grad_clip, hidden=args.hidden, layers=args.layers, seed=args.seed,
                      ckpt_every=args.ckpt_every, log_every=args.log_every)
    train(args.data, args.out, cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress)
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate-boltzmann", help="NLL, ESS and energy W1 of a Boltzmann generator against its MCMC data",
        description="NLL of held-out MCMC samples (density on the centre-of-mass-free subspace), Kish ESS of the "
                    "importance weights exp(-U/kT)/q of model samples, energy and pair-distance W1 to the ground "
                    "truth before and after reweighting; JSON and PNG plots.")
    p.add_argument("--system", choices=DATA_SYSTEMS, required=True)
    p.add_argument("--checkpoint", default=None, help="last.pt of `qmanifold train-boltzmann` (dw4 / lj13)")
    g = p.add_argument_group("aldp (alanine dipeptide: scores given samples against an independent MD run)")
    g.add_argument("--samples", default=None,
                   help="aldp: generated configurations, an SDF of `qmanifold sample --data <aldp .npz> -n N` (atom "
                        "order kept) or an .npz with positions (S, 22, 3) in Å and optionally log_q (S,)")
    g.add_argument("--reference", default=None, help="aldp: the reference MD, a .npz of `qmanifold data aldp` "
                   "(an independent run, not the training data)")
    g.add_argument("--log-q", default=None,
                   help="aldp: the model's log-densities of the samples (.npy, or .npz field log_q): enables the ESS "
                        "and the reweighted Ramachandran plot / KL / energy W1")
    g.add_argument("--bins", type=positive_int, default=36, help="aldp: Ramachandran bins per angle (default 36)")
    p.add_argument("--data", default=None, help="the .npz of `qmanifold data` (default: the checkpoint's training data)")
    p.add_argument("--n", type=positive_int, default=2000, help="model samples for the ESS and W1 (default 2000)")
    p.add_argument("--n-nll", type=positive_int, default=None, help="held-out samples for the NLL (default --n)")
    p.add_argument("--steps", type=positive_int, default=20, help="RK4 steps of the ODE (default 20)")
    p.add_argument("--method", choices=("rk4", "heun", "euler"), default="rk4")
    p.add_argument("--nll-estimator", choices=("exact", "hutchinson"), default="exact",
                   help="trace estimator for the NLL (dw4/lj13: their ESS always uses the exact trace; aldp "
                        "--checkpoint: the estimator of the samples' log q, hence of the ESS: exact costs 66 "
                        "vector-Jacobian products per network call, hutchinson --probes)")
    p.add_argument("--probes", type=positive_int, default=1, help="Hutchinson probes (default 1)")
    p.add_argument("--steps-table", type=positive_int, nargs="+", default=None,
                   help="also tabulate the NLL (exact trace) of --steps-table-n held-out samples for these step counts")
    p.add_argument("--steps-table-n", type=positive_int, default=200, help="samples of the --steps-table (default 200)")
    p.add_argument("--float64", action="store_true", help="integrate in float64 (default float32)")
    p.add_argument("--batch-size", type=positive_int, default=500, help="configurations integrated together")
    p.add_argument("--divergence-chunk", type=positive_int, default=None,
                   help="trace directions per network call (default: about 4096 configurations per call)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA weights")
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file / plots")
    p.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_evaluate_boltzmann)


@_guard
def cmd_evaluate_boltzmann(args: argparse.Namespace) -> int:
    """Handler of ``evaluate-boltzmann``."""
    if args.system == "aldp":
        return _evaluate_aldp(args)
    if args.checkpoint is None:
        raise ValueError(f"--checkpoint is required for --system {args.system}")
    for flag, val in (("--samples", args.samples), ("--reference", args.reference), ("--log-q", args.log_q)):
        if val is not None:
            raise ValueError(f"{flag} is for --system aldp; dw4/lj13 sample from --checkpoint")
    require_file("--checkpoint", args.checkpoint)
    if args.data is not None:
        require_file("--data", args.data)
    check_outputs({"--checkpoint": args.checkpoint, "--data": args.data}, {"--json": args.json},
                  {"--plots": args.plots}, overwrite=args.overwrite)
    import torch

    from qmanifold.atomic import atomic_write_json

    from .evaluate import evaluate, write_plots
    from .train import load_checkpoint

    _threads(args.threads)
    _, system, ck = load_checkpoint(args.checkpoint)
    if system.name != args.system:
        raise ValueError(f"--checkpoint {args.checkpoint} is a {system.name} model, not {args.system}")
    data = args.data
    if data is None:
        config = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "config.json")
        import json

        data = None
        if os.path.exists(config):
            with open(config, encoding="utf-8") as fh:
                data = json.load(fh).get("data")
        if not data or not os.path.exists(data):
            raise ValueError("give --data: the checkpoint's training data file is not known or no longer exists")
    results, arrays = evaluate(args.checkpoint, data, n_samples=args.n, n_nll=args.n_nll, steps=args.steps,
                               method=args.method, nll_estimator=args.nll_estimator, probes=args.probes,
                               seed=args.seed, dtype=torch.float64 if args.float64 else torch.float32,
                               chunk_size=args.batch_size, divergence_chunk=args.divergence_chunk,
                               steps_table=tuple(args.steps_table or ()), steps_table_n=args.steps_table_n,
                               use_ema=not args.no_ema)
    results["data"] = os.path.abspath(data)
    pub = results.get("published") or {}
    print(f"{'metric':<28}{'this model':>14}{'published':>12}")
    print(f"{'NLL (M, with constant)':<28}{results['nll']:>14.3f}{'':>12}")
    print(f"{'NLL (M, without constant)':<28}{results['nll_without_gaussian_constant']:>14.3f}{pub.get('nll', float('nan')):>12.2f}")
    print(f"{'ESS %':<28}{results['ess_percent']:>14.2f}{100 * pub.get('ess', float('nan')):>12.1f}")
    print(f"{'energy W1':<28}{results['energy_w1']:>14.3f}")
    print(f"{'energy W1 (clipped)':<28}{results['energy_w1_clipped']:>14.3f}")
    print(f"{'energy W1 reweighted':<28}{results['energy_w1_reweighted']:>14.3f}")
    print(f"{'target NLL estimate (M)':<28}{results['target_nll_estimate']:>14.3f}")
    if pub.get("note"):
        print(f"published: {pub['source']}; {pub['note']}")
    if "nll_steps_table" in results:
        for row in results["nll_steps_table"]["rows"]:
            print(f"  steps {row['steps']:>4}: NLL {row['nll']:.4f} ({row['seconds']:.0f} s)")
    if args.plots:
        paths = write_plots(args.plots, system, results, arrays)
        print(f"wrote {len(paths)} plots to {args.plots}")
    if args.json:
        atomic_write_json(args.json, results)
        print(f"wrote {args.json}")
    del ck
    return 0


def _evaluate_aldp(args: argparse.Namespace) -> int:
    """``evaluate-boltzmann --system aldp``: Ramachandran KL, L-fraction, bond W1, energies (+ ESS)."""
    if args.reference is None or (args.samples is None) == (args.checkpoint is None):
        raise ValueError("--system aldp needs --reference (an MD .npz) and either --samples (generated configurations) "
                         "or --checkpoint (a `qmanifold train` model of alanine dipeptide, sampled here with --n "
                         "configurations and their log-densities)")
    if args.checkpoint is not None and args.log_q is not None:
        raise ValueError("--log-q goes with --samples; with --checkpoint the log-densities are computed here")
    for flag, path in (("--samples", args.samples), ("--checkpoint", args.checkpoint), ("--log-q", args.log_q)):
        if path is not None:
            require_file(flag, path)
    require_file("--reference", args.reference)
    check_outputs({"--samples": args.samples, "--reference": args.reference, "--log-q": args.log_q,
                   "--checkpoint": args.checkpoint}, {"--json": args.json}, {"--plots": args.plots},
                  overwrite=args.overwrite)
    import time

    from qmanifold.atomic import atomic_write_json

    from . import aldp

    _threads(args.threads)
    t0 = time.time()
    if args.checkpoint is not None:
        x, log_q = aldp.sample_with_log_prob(args.checkpoint, args.reference, args.n, steps=args.steps,
                                             method=args.method, estimator=args.nll_estimator, seed=args.seed,
                                             batch_size=args.batch_size, divergence_chunk=args.divergence_chunk,
                                             use_ema=not args.no_ema, probes=args.probes)
    else:
        x, log_q = aldp.read_samples(args.samples)
        if args.log_q is not None:
            log_q = aldp._log_q_from_file(args.log_q, len(x))
    t_sample = time.time() - t0
    ref = aldp.load_ensemble(args.reference)
    results, arrays = aldp.evaluate_samples(x, ref["positions"], e_ref=ref["energy"], log_q=log_q, bins=args.bins)
    results.update(samples=os.path.abspath(args.samples) if args.samples else None,
                   checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
                   reference=os.path.abspath(args.reference), reference_meta=ref["meta"], seconds_sampling=t_sample)
    if args.checkpoint is not None:
        results["ode"] = dict(method=args.method, steps=args.steps, estimator=args.nll_estimator, seed=args.seed,
                              probes=args.probes if args.nll_estimator == "hutchinson" else None)
    print(f"{'metric':<34}{'model':>12}{'MD reference':>14}")
    print(f"{'Ramachandran KL(MD || model)':<34}{results['ramachandran_kl']:>12.4f}")
    print(f"{'L-fraction':<34}{results['l_fraction']:>12.4f}{results['l_fraction_reference']:>14.4f}")
    print(f"{'bond-length W1 (Å)':<34}{results['bond_length_w1']:>12.4f}")
    print(f"{'phi > 0 fraction':<34}{results['phi_positive_fraction']:>12.4f}{results['phi_positive_fraction_reference']:>14.4f}")
    print(f"{'energy W1 (kT, clipped)':<34}{results['energy_w1_clipped']:>12.3f}")
    print(f"{'mean energy (kT)':<34}{results['mean_energy_model']:>12.3f}{results['mean_energy_reference']:>14.3f}")
    if "ess" in results:
        print(f"{'ESS %':<34}{results['ess_percent']:>12.2f}")
        if "ramachandran_kl_reweighted" in results:
            print(f"{'Ramachandran KL reweighted':<34}{results['ramachandran_kl_reweighted']:>12.4f}")
            print(f"{'energy W1 reweighted (kT)':<34}{results['energy_w1_reweighted']:>12.3f}")
    if args.plots:
        paths = aldp.write_plots(args.plots, results, arrays)
        print(f"wrote {len(paths)} plots to {args.plots}")
    if args.json:
        atomic_write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    """Add ``data``, ``train-boltzmann`` and ``evaluate-boltzmann`` to an argparse subparsers object."""
    _add_data(subparsers)
    _add_train(subparsers)
    _add_evaluate(subparsers)
