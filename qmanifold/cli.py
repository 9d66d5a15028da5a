"""The ``qmanifold`` command line.

Subcommands:

* ``qmanifold verify``   statistical check that each sampler recovers exact toy targets
* ``qmanifold train | sample | evaluate | baseline``   molecular conformer generation (``qmanifold.models``)
* ``qmanifold bench``    side-by-side benchmarks on the current device
* ``qmanifold kernels``  ahead-of-time compile report of the fused kernels
* ``qmanifold info``     the geometry of a built-in group, derived symbolically

Parse first, import later: building the parser imports the standard library only (no torch,
numpy, sympy, RDKit or Triton), so ``--help`` and argument errors answer at once; each handler
imports what it needs. Expected errors (bad files, bad options, unwritable outputs) print one line
``error: ...`` and exit with status 2; ``--debug`` (or ``QMANIFOLD_DEBUG=1``) shows the traceback.
No command writes over one of its inputs, and an existing output is replaced only with
``--overwrite`` (see :mod:`qmanifold._clitools`).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from ._clitools import (
    add_debug_flag,
    bounded_float,
    check_outputs,
    nonnegative_int,
    positive_int,
    run_handler,
)

__all__ = ["main", "build_parser"]

# Names and sizes shown in ``verify --help``; they are constants here so that the help needs no
# import of the runner (torch, sympy). tests/qmanifold/test_cli.py checks them against
# qmanifold.verify.runner (available_cases, available_variants, DEFAULT_CONFIG, QUICK_CONFIG).
VERIFY_CASES = ("so2", "se3", "torus", "permutations", "lattice", "so2_user_group", "sphere_points", "se3_frames")
VERIFY_DEFAULT_TARGETS = ("so2", "se3", "torus", "permutations", "lattice", "so2_user_group", "sphere_points", "se3_frames")
VERIFY_QUICK_SIZES = (2000, 150)  # QUICK_CONFIG.n_samples, QUICK_CONFIG.steps
VERIFY_VARIANTS = (
    "quotient_ode", "quotient_sde", "quotient_heun", "conventional_ode", "conventional_sde", "sde_paper_sign",
    "sde_no_curvature", "sde_curvature_075", "sde_curvature_125", "garbage_vertical_conventional",
    "garbage_vertical_quotient",
    # likelihood checks (qmanifold.verify.likelihood_checks.LIKELIHOOD_VARIANTS)
    "likelihood_route_m", "likelihood_route_q", "likelihood_no_orbit_volume", "likelihood_route_q_no_orbit_volume",
    "likelihood_wrong_group_volume",
)
VERIFY_LIKELIHOOD_SIZES = (16, 40)  # LIKELIHOOD_SIZES["n_samples"], LIKELIHOOD_SIZES["steps"]
# ``qmanifold bench --sections`` (qmanifold.bench.SECTIONS) and ``qmanifold kernels --groups`` defaults.
BENCH_SECTIONS = ("copy", "projection", "loss", "sampler")
KERNEL_GROUPS = ("SE3", "SE2", "Torus2")


# ----------------------------------------------------------------------------------------------
# verify


def _add_verify(subparsers) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check statistically that each sampler recovers the exact target on toy quotients",
        description=(
            "Sample each toy quotient target with each sampler variant, compare invariant features with exact "
            "draws at t = 1/2 and t = 1 (a joint test of feature means and per-feature KS, Bonferroni) and report "
            "whether positives pass and negative controls fail; on the targets with a closed-form density, check "
            "log_prob with the exact denoiser against it on Q and on M (the likelihood_* checks). Exit code 1 if any "
            "verdict is unexpected."
        ),
    )
    n_quick, steps_quick = VERIFY_QUICK_SIZES
    p.add_argument("--quick", action="store_true", help=f"smaller suite for CI ({n_quick} samples, {steps_quick} steps)")
    p.add_argument("--targets", nargs="+", metavar="NAME", help=f"targets to run (default: all of {', '.join(VERIFY_DEFAULT_TARGETS)}); available: {', '.join(VERIFY_CASES)}")
    p.add_argument("--variants", nargs="+", metavar="NAME", help=f"sampler variants and likelihood checks (default: all applicable); available: {', '.join(VERIFY_VARIANTS)}")
    p.add_argument("--n-samples", type=positive_int, help="samples per sampler variant, compared at t = 1/2 (and at t = 1 unless --final-samples)")
    p.add_argument("--final-samples", type=positive_int, help="how many of them continue to t = 1 and are compared there")
    p.add_argument("--steps", type=positive_int, help="Euler(-Maruyama) steps")
    p.add_argument("--heun-steps", type=positive_int, help="steps of the Heun sampler")
    n_lik, steps_lik = VERIFY_LIKELIHOOD_SIZES
    p.add_argument("--likelihood-samples", type=positive_int, help=f"exact samples per target of the likelihood checks (default {n_lik}; SE(3): 8)")
    p.add_argument("--likelihood-steps", type=positive_int, help=f"RK4 steps of log_prob in the likelihood checks (default {steps_lik})")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--alpha", type=bounded_float(gt=0, lt=1), default=0.001, help="family-wise test level of each run over checkpoints, tests and features (default 0.001)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--float32", action="store_true", help="sample in float32 (default float64)")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--plots", metavar="DIR", help="write PNG histograms of generated vs exact features")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file or --plots PNGs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trained", action="store_true",
        help="run the trained-model check instead: train a non-equivariant MLP with the quotient, conventional "
        "and aligned losses on the SO(2)/SE(3) toys and compare their samples (about 10 min; --quick is a smoke test of the pipeline on SO(2) only, ~15 s, whose numbers mean nothing)",
    )
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=_run_verify)


def _run_trained(args) -> int:
    from .atomic import atomic_write_json
    from .verify.trained import TRAINED_DEFAULTS, TRAINED_QUICK, format_trained_table, run_trained_check

    check_outputs({}, {"--json": args.json}, overwrite=args.overwrite)
    config = dict(TRAINED_QUICK if args.quick else TRAINED_DEFAULTS)
    if args.targets:
        config["targets"] = tuple(args.targets)
    config.update(device=args.device, progress=not args.no_progress)
    records = run_trained_check(**config)
    print(format_trained_table(records))
    if args.json:
        atomic_write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


def _run_verify(args) -> int:
    if args.trained:
        return _run_trained(args)
    check_outputs({}, {"--json": args.json}, {"--plots": args.plots}, overwrite=args.overwrite)

    import torch

    from .verify.runner import DEFAULT_CONFIG, QUICK_CONFIG, format_table, run_suite, write_json

    config = QUICK_CONFIG if args.quick else DEFAULT_CONFIG
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested but CUDA is not available", file=sys.stderr)
        return 2
    records = run_suite(
        tuple(args.targets or config.targets),
        args.variants,
        config=config,
        n_samples=args.n_samples,
        steps=args.steps,
        heun_steps=args.heun_steps,
        final_samples=args.final_samples,
        seed=args.seed,
        alpha=args.alpha,
        device=args.device,
        dtype=torch.float32 if args.float32 else torch.float64,
        progress=not args.no_progress,
        plots_dir=args.plots,
        likelihood_samples=args.likelihood_samples,
        likelihood_steps=args.likelihood_steps,
    )
    print(format_table(records))
    if args.json:
        write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")
    if args.plots:
        print(f"wrote plots to {args.plots}")
    wrong = [r for r in records if not r.ok]
    if wrong:
        print("UNEXPECTED: " + ", ".join(f"{r.target}/{r.variant} (expected {r.expected})" for r in wrong), file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------------
# info


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="show the symbolically derived geometry of a built-in group")
    p.add_argument("group", nargs="?", default="SE3", help="SE3, SO3, SO2, SE2 or TorusK (e.g. Torus2)")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=_run_info)


def _builtin_group(name: str):
    """The built-in group called ``name`` (``SE3``, ``SO3``, ``SE2``, ``SO2``, ``TorusK``, ...):
    the resolver the command line hands the core (``info``, ``kernels --groups``)."""
    from qmanifold import groups

    from .errors import InputError

    if name.startswith("Torus") and name[5:].isdigit() and int(name[5:]) >= 1:
        return groups.Torus(int(name[5:]))
    group = getattr(groups, name) if name in groups.__all__ else None
    if group is None or callable(group):  # classes and factories (Torus, Lattice, ...) need parameters
        raise InputError(f"unknown group {name!r}; try SE3, SO3, SE2, SO2, Torus2")
    return group


def _run_info(args) -> int:
    import sympy
    import torch

    from .quotient import Quotient

    group = _builtin_group(args.group)
    q = Quotient(group)
    print(f"{group!r}\nkind: {group.kind}, isometric: {group.is_isometric}, translations: {group.translations}")
    print("Gram matrix in the second moments S_ij = sum_n x_ni x_nj:")
    sympy.pprint(group.symbolic.gram)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, group.point_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(5, group.point_dim, generator=gen, dtype=torch.float64)
    p_v = q.horizontal_projection(v, x)
    print(f"random 5-point configuration: |P v| / |v| = {float(p_v.norm() / v.norm()):.4f}, "
          f"|P(P v) - P v| = {float((q.horizontal_projection(p_v, x) - p_v).norm()):.2e}, "
          f"log orbit volume = {float(q.log_orbit_volume(x)):.4f}, conditioning = {float(q.conditioning(x)):.4f}")
    return 0


# ----------------------------------------------------------------------------------------------
# bench and kernels: the options mirror qmanifold.bench.add_arguments and qmanifold.kernels.aot.register
# (those modules import torch at the top, so they are imported by the handlers only; a test checks
# that the options agree)


def _add_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="side-by-side benchmarks of the quotient machinery on this device",
        description="``qmanifold bench``: side-by-side timings of the quotient machinery on the current device.",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:K)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and a small EGNN (about a minute on a CPU)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=positive_int, default=None, help="alternating timing blocks (default 5 quick, else 7)")
    p.add_argument("--batch", type=positive_int, default=64, help="molecules per batch for the loss / sampler comparisons")
    p.add_argument("--sections", nargs="+", choices=BENCH_SECTIONS, default=list(BENCH_SECTIONS), help="what to run")
    p.add_argument("--threads", type=nonnegative_int, default=1, help="torch CPU threads (default 1: on a shared machine "
                   "more threads mostly add contention noise; 0 keeps torch's default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    check_outputs({}, {"--json": args.json}, overwrite=args.overwrite)
    from .bench import handler

    return handler(args)


def _add_kernels(subparsers) -> None:
    p = subparsers.add_parser(
        "kernels", help="compile the fused kernels for a GPU architecture (no GPU needed) and report registers",
        description="Compile the fused quotient kernels ahead of time for sm_<arch> with Triton's tool chain and "
                    "report registers per thread, stack (spills) and occupancy of each specialisation.")
    p.add_argument("--arch", type=positive_int, nargs="+", default=[90], help="compute capabilities (90: H100/H200, 80: A100)")
    p.add_argument("--groups", nargs="+", default=list(KERNEL_GROUPS), help="built-in groups to compile for")
    p.add_argument("--full", action="store_true", help="every mode, not only the hot ones")
    p.add_argument("--json", metavar="PATH", help="write the reports as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=_run_kernels)


def _run_kernels(args) -> int:
    check_outputs({}, {"--json": args.json}, overwrite=args.overwrite)
    from .kernels.aot import _run

    return _run(args, resolve_group=_builtin_group)


# ----------------------------------------------------------------------------------------------
# wiring


def build_parser() -> argparse.ArgumentParser:
    """The ``qmanifold`` argument parser. Imports the standard library only."""
    parser = argparse.ArgumentParser(prog="qmanifold", description="Diffusion and flow models on quotient spaces M/G.")
    parser.add_argument("--version", action="version", version=f"qmanifold {__version__}")
    add_debug_flag(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_verify(subparsers)
    _add_info(subparsers)
    try:
        from qmanifold.models.cli import register as register_models
    except ModuleNotFoundError as exc:  # the molecular plug-ins are optional
        if exc.name not in ("qmanifold.models", "qmanifold.models.cli"):
            raise
        register_models = None
    if register_models is not None:
        register_models(subparsers)
    _add_bench(subparsers)
    _add_kernels(subparsers)
    return parser


def main(argv=None) -> int:
    """Entry point of ``qmanifold``: the exit status (0 ok, 1 a check failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_handler(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
