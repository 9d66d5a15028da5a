"""The ``qmanifold`` command line.

Subcommands:

* ``qmanifold verify``   statistical check that each sampler recovers exact toy targets
* ``qmanifold train | sample | evaluate | baseline``   molecular conformer generation (``models``)
* ``qmanifold bench``    side-by-side benchmarks (when ``benchmarks`` is available)
* ``qmanifold info``     the geometry of a built-in group, derived symbolically
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_verify(subparsers) -> None:
    from .verify.runner import DEFAULT_CONFIG, QUICK_CONFIG, available_cases, available_variants

    p = subparsers.add_parser(
        "verify",
        help="check statistically that each sampler recovers the exact target on toy quotients",
        description=(
            "Sample each toy quotient target with each sampler variant, compare invariant features "
            "with exact draws (two-sample KS, Bonferroni over features) and report whether positives "
            "pass and negative controls fail. Exit code 1 if any verdict is unexpected."
        ),
    )
    p.add_argument("--quick", action="store_true", help=f"smaller suite for CI ({QUICK_CONFIG.n_samples} samples, {QUICK_CONFIG.steps} steps)")
    p.add_argument("--targets", nargs="+", metavar="NAME", help=f"targets to run (default: all of {', '.join(DEFAULT_CONFIG.targets)}); available: {', '.join(available_cases())}")
    p.add_argument("--variants", nargs="+", metavar="NAME", help=f"sampler variants (default: all applicable); available: {', '.join(available_variants())}")
    p.add_argument("--n-samples", type=_positive_int, help="samples per variant (and exact draws)")
    p.add_argument("--steps", type=_positive_int, help="Euler(-Maruyama) steps")
    p.add_argument("--heun-steps", type=_positive_int, help="steps of the Heun sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.01, help="test level after Bonferroni over features (default 0.01)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--float32", action="store_true", help="sample in float32 (default float64)")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    p.add_argument("--plots", metavar="DIR", help="write PNG histograms of generated vs exact features")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--trained", action="store_true",
        help="run the trained-model check instead: train a non-equivariant MLP with the quotient, conventional "
        "and aligned losses on the SO(2)/SE(3) toys and compare their samples (about 10 min; --quick is a smoke test of the pipeline on SO(2) only, ~15 s, whose numbers mean nothing)",
    )
    p.set_defaults(func=_run_verify)


def _run_trained(args) -> int:

    from .atomic import atomic_write_json
    from .verify.trained import TRAINED_DEFAULTS, TRAINED_QUICK, format_trained_table, run_trained_check

    config = dict(TRAINED_QUICK if args.quick else TRAINED_DEFAULTS)
    if args.targets:
        config["targets"] = tuple(args.targets)
    config.update(device=args.device, progress=not args.no_progress)
    try:
        records = run_trained_check(**config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_trained_table(records))
    if args.json:
        atomic_write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


def _run_verify(args) -> int:
    import torch

    if args.trained:
        return _run_trained(args)

    from .verify.runner import DEFAULT_CONFIG, QUICK_CONFIG, format_table, run_suite, write_json

    config = QUICK_CONFIG if args.quick else DEFAULT_CONFIG
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested but CUDA is not available", file=sys.stderr)
        return 2
    try:
        records = run_suite(
            tuple(args.targets or config.targets),
            args.variants,
            n_samples=args.n_samples or config.n_samples,
            steps=args.steps or config.steps,
            heun_steps=args.heun_steps or config.heun_steps,
            seed=args.seed,
            alpha=args.alpha,
            device=args.device,
            dtype=torch.float32 if args.float32 else torch.float64,
            progress=not args.no_progress,
            plots_dir=args.plots,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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


def _add_info(subparsers) -> None:
    p = subparsers.add_parser("info", help="show the symbolically derived geometry of a built-in group")
    p.add_argument("group", nargs="?", default="SE3", help="SE3, SO3, SO2, SE2 or TorusK (e.g. Torus2)")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import sympy
    import torch

    from qmanifold import groups
    from .quotient import Quotient

    name = args.group
    try:
        group = groups.Torus(int(name[5:])) if name.startswith("Torus") else getattr(groups, name)
    except (AttributeError, ValueError):
        print(f"error: unknown group {name!r}; try SE3, SO3, SO2, SE2, Torus2", file=sys.stderr)
        return 2
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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="qmanifold", description="Diffusion and flow models on quotient spaces M/G.")
    parser.add_argument("--version", action="version", version=f"qmanifold {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_verify(subparsers)
    _add_info(subparsers)
    try:
        from qmanifold.models.cli import register as register_models
    except ModuleNotFoundError as exc:  # the molecular plug-ins are optional
        if exc.name not in ("models", "models.cli"):
            raise
        register_models = None
    if register_models is not None:
        register_models(subparsers)
    try:
        from .bench import register as register_bench
    except ModuleNotFoundError as exc:  # qmanifold.bench lands with the performance work
        if exc.name != "qmanifold.bench":
            raise
        register_bench = None
    if register_bench is not None:
        register_bench(subparsers)
    from .kernels.aot import register as register_kernels

    register_kernels(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
