"""Command-line subcommands for molecules: ``train``, ``sample``, ``evaluate``, ``baseline``.

The main ``qmanifold`` program adds them with :func:`register`; standalone::

    python -m qmanifold.models.cli train --data qm9-extract --steps 200 --out runs/demo --hidden 64 --layers 4
    python -m qmanifold.models.cli sample --checkpoint runs/demo/best.pt --data qm9-extract --split test \\
        --limit 10 --n-per-molecule 4 --out runs/demo/samples.sdf
    python -m qmanifold.models.cli evaluate --samples runs/demo/samples.sdf --json runs/demo/eval.json --plots runs/demo/plots
    python -m qmanifold.models.cli baseline --method etkdg --mmff --data qm9-extract --split test --limit 10 \\
        --n-per-molecule 4 --out runs/etkdg.sdf

Every handler returns an exit code: 0 on success, 2 for bad input (the message, starting with
``error:``, goes to stderr), 130 when training was interrupted (the checkpoint is written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["register", "main", "cmd_train", "cmd_sample", "cmd_evaluate", "cmd_baseline"]

_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError, FloatingPointError, KeyError)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected errors into ``error: ...`` on stderr and exit code 2."""

    def wrapper(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except _USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"error: {msg}", file=sys.stderr)
            return 2

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(int(n))


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a molecular denoiser (quotient or baseline losses)",
                       description="Train a denoiser with QuotientDiffusion on molecules. Writes last.pt, "
                                   "best.pt, log.jsonl, config.json and summary.json into --out. "
                                   "Under torchrun it trains data-parallel (DDP).")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="qm9-extract", help="qm9 | qm9-extract | FILE.npz | FILE.sdf (default qm9-extract)")
    g.add_argument("--heavy-atoms-only", action="store_true", help="drop hydrogens")
    g.add_argument("--max-atoms", type=_positive_int, default=None, help="drop molecules with more atoms")
    g.add_argument("--train-limit", type=_positive_int, default=None,
                   help="train on a fixed random subset of this many training molecules (same for every seed)")
    g.add_argument("--val-limit", type=_positive_int, default=200, help="validation molecules (default 200)")
    g = p.add_argument_group("model and objective")
    g.add_argument("--model", default="egnn", help="egnn | transformer (default egnn)")
    g.add_argument("--hidden", type=_positive_int, default=None, help="hidden width (default: the model's)")
    g.add_argument("--layers", type=_positive_int, default=None, help="number of layers (default: the model's)")
    g.add_argument("--heads", type=_positive_int, default=None, help="attention heads (transformer)")
    g.add_argument("--model-kwargs", default=None, help="JSON dict of further model constructor arguments")
    g.add_argument("--loss", default="quotient", help="quotient | conventional | af3_align | geodiff_align (default quotient)")
    g.add_argument("--interpolant", default="linear", help="linear | vp_cosine | vp_linear | edm (default linear)")
    g.add_argument("--prediction", default="x1", help="x1 | v (default x1)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random-rotation augmentation (default: on for the transformer, off for the EGNN)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_positive_int, default=1000, help="total optimisation steps (default 1000)")
    g.add_argument("--batch-size", type=_positive_int, default=32, help="molecules per step and process (default 32)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "constant"), help="learning-rate schedule")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    g.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights, 0 = off (default 0.999)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    g = p.add_argument_group("run control")
    g.add_argument("--out", required=True, help="run directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (default auto)")
    g.add_argument("--val-every", type=_positive_int, default=500, help="validate every K steps (default 500)")
    g.add_argument("--ckpt-every", type=_positive_int, default=500, help="write last.pt every K steps (default 500)")
    g.add_argument("--log-every", type=_positive_int, default=1, help="log the train loss every K steps (default 1)")
    g.add_argument("--stop-after", type=_positive_int, default=None,
                   help="stop this invocation at this step (schedule still planned for --steps); continue with --resume")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    g.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


@_guard
def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``train``."""
    from qmanifold.models.training import TrainConfig, train

    model_kwargs = {}
    if args.model_kwargs:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(model_kwargs, dict):
            raise ValueError("--model-kwargs must be a JSON object")
    cfg = TrainConfig(
        data=args.data, model=args.model, loss=args.loss, steps=args.steps, out=args.out,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        schedule=args.schedule, grad_clip=args.grad_clip, ema=args.ema, seed=args.seed, device=args.device,
        dtype=args.dtype, interpolant=args.interpolant, prediction=args.prediction, augment=args.augment,
        hidden=args.hidden, layers=args.layers, heads=args.heads, model_kwargs=model_kwargs,
        heavy_atoms_only=args.heavy_atoms_only, max_atoms=args.max_atoms, train_limit=args.train_limit,
        val_limit=args.val_limit, val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
        stop_after=args.stop_after, resume=args.resume, threads=args.threads, progress=not args.no_progress,
    )
    summary = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        val = summary.get("last_val") or {}
        print(f"[qmanifold] {summary['model']}/{summary['loss']}: step {summary['step']}/{summary['steps']}, "
              f"train loss {summary['last_train_loss']:.4f}, val loss {val.get('val_loss', float('nan')):.4f}, "
              f"{summary['parameters']} parameters, {summary['wall_time_s']:.1f} s; files in {summary['out']}")
    return 130 if summary.get("stopped_by") else 0


# ----------------------------------------------------------------------------------------------
# molecule selection shared by sample / baseline
# ----------------------------------------------------------------------------------------------


def _add_molecule_args(p, need_checkpoint: bool) -> None:
    g = p.add_argument_group("molecules (give --smiles or --data)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--smiles", nargs="+", default=None, help="one or more SMILES strings")
    src.add_argument("--data", default=None, help="qm9 | qm9-extract | FILE.npz | FILE.sdf")
    g.add_argument("--split", default="test", choices=("train", "valid", "test", "all"), help="split of --data (default test)")
    g.add_argument("--limit", type=_positive_int, default=None,
                   help="this many molecules of the split, drawn with --select-seed (default: all)")
    g.add_argument("--select-seed", type=int, default=0, help="seed of the --limit selection (default 0)")
    g.add_argument("--max-atoms", type=_positive_int, default=None, help="skip molecules with more atoms")
    if not need_checkpoint:
        g.add_argument("--heavy-atoms-only", action="store_true", help="molecules without hydrogens")


def _select_graphs(args, elements, heavy_atoms_only: bool):
    """Graphs of the requested molecules; ``elements`` None: the data's own list (H, C, N, O, F
    for SMILES)."""
    from qmanifold.models.data import ELEMENTS
    from qmanifold.models.sampling import graph_from_smiles, graphs_from_dataset
    from qmanifold.models.training import dataset_split, load_molecules, select_rows

    if args.smiles:
        graphs = [graph_from_smiles(s, ELEMENTS if elements is None else elements, heavy_atoms_only) for s in args.smiles]
        if args.max_atoms is not None:
            big = [g.source for g in graphs if g.num_atoms > args.max_atoms]
            if big:
                raise ValueError(f"molecule(s) with more than --max-atoms {args.max_atoms} atoms: {big}")
        return graphs
    ds = load_molecules(args.data, heavy_atoms_only=heavy_atoms_only, max_atoms=args.max_atoms,
                        elements=elements, progress=True)
    part = dataset_split(ds, args.split)
    rows = select_rows(len(part), args.limit, seed=args.select_seed)
    return graphs_from_dataset(part, args.data, rows)


# ----------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample conformers from a checkpoint into an SDF file",
                       description="Sample M conformers per molecule with a trained checkpoint (sampler geometry "
                                   "from the training loss: quotient samplers for quotient-trained models) and "
                                   "write them to an SDF file (and optionally XYZ).")
    p.add_argument("--checkpoint", required=True, help="checkpoint file (best.pt / last.pt)")
    _add_molecule_args(p, need_checkpoint=True)
    p.add_argument("--n-per-molecule", type=_positive_int, default=1, help="conformers per molecule M (default 1)")
    p.add_argument("--out", required=True, help="output SDF file")
    p.add_argument("--xyz", default=None, help="also write a multi-frame XYZ file")
    p.add_argument("--steps", type=_positive_int, default=50, help="integration steps (default 50)")
    p.add_argument("--sampler", default="ode", choices=("ode", "sde", "heun", "edm"), help="(default ode)")
    p.add_argument("--geometry", default=None, choices=("quotient", "conventional"),
                   help="sampler geometry (default: the one matching the training loss)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="configurations integrated together (default 64)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)


@_guard
def cmd_sample(args: argparse.Namespace) -> int:
    """Handler of ``sample``."""
    from qmanifold.models.sampling import make_records, sample_conformers, write_sdf, write_xyz
    from qmanifold.models.training import diffusion_from_checkpoint, load_checkpoint, resolve_device

    _set_threads(args.threads)
    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, map_location="cpu")
    qd = diffusion_from_checkpoint(ckpt, device=device, use_ema=not args.no_ema)
    data = ckpt["data"]
    graphs = _select_graphs(args, data["elements"], bool(data.get("heavy_atoms_only", False)))
    t0 = time.time()
    confs = sample_conformers(qd, graphs, args.n_per_molecule, steps=args.steps, sampler=args.sampler,
                              seed=args.seed, batch_size=args.batch_size, device=device,
                              progress=not args.no_progress, geometry=args.geometry)
    geometry = args.geometry or ("quotient" if qd.loss_type == "quotient" else "conventional")
    props = {"qm_method": "qmanifold", "qm_model": ckpt["model"]["name"], "qm_loss": ckpt["diffusion"]["loss"],
             "qm_checkpoint": os.path.abspath(args.checkpoint), "qm_step": int(ckpt["step"]),
             "qm_sampler": args.sampler, "qm_geometry": geometry, "qm_steps": args.steps, "qm_seed": args.seed,
             "qm_ema": int(not args.no_ema and ckpt.get("ema_state_dict") is not None)}
    records = make_records(graphs, confs, props)
    write_sdf(args.out, records)
    if args.xyz:
        write_xyz(args.xyz, records)
    print(f"[qmanifold] {len(records)} conformers of {len(graphs)} molecule(s) ({args.sampler}, {geometry} geometry, "
          f"{args.steps} steps) in {time.time() - t0:.1f} s -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score conformers (RMSD coverage/AMR, geometry, connectivity)",
                       description="Score an SDF of conformers written by `sample` or `baseline` against the "
                                   "reference geometries: COV-R/AMR-R/COV-P/AMR-P on symmetry-aware heavy-atom "
                                   "RMSD, bond-length/angle Wasserstein distances, connectivity validity.")
    p.add_argument("--samples", required=True, help="SDF file from `sample` or `baseline`")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--reference", default=None,
                   help="reference data (qm9 | qm9-extract | FILE); default: each record's qm_dataset")
    p.add_argument("--plots", default=None, help="directory for PNG plots")
    p.add_argument("--threshold", type=float, default=0.5, help="coverage threshold in Å (default 0.5)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_evaluate)


@_guard
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``evaluate``."""
    from qmanifold.models.evaluation import evaluate_samples, plot_evaluation, write_json

    if not args.threshold > 0:
        raise ValueError(f"--threshold must be positive, got {args.threshold}")
    res = evaluate_samples(args.samples, reference=args.reference, threshold=args.threshold,
                           progress=not args.no_progress, keep_values=bool(args.plots))
    write_json(args.json, res)
    if args.plots:
        title = " ".join(str(v) for k, v in res["method"].items() if k in ("qm_method", "qm_model", "qm_loss"))
        plot_evaluation(res, args.plots, title=title)
    cov = res.get("coverage")
    line = f"[qmanifold] {res['num_records']} conformers of {res['num_molecules']} molecule(s)"
    if cov:
        line += (f": COV-R {100 * cov['COV-R']:.1f}%  AMR-R {cov['AMR-R']:.3f} Å  COV-P {100 * cov['COV-P']:.1f}%  "
                 f"AMR-P {cov['AMR-P']:.3f} Å (threshold {args.threshold} Å)")
    if res.get("connectivity_match") is not None:
        line += f"; connectivity ok {100 * res['connectivity_match']:.1f}%"
    print(line + f" -> {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------
# baseline
# ----------------------------------------------------------------------------------------------


def _add_baseline(sub) -> None:
    p = sub.add_parser("baseline", help="RDKit ETKDG (+MMFF) conformers in the same SDF format",
                       description="Generate RDKit ETKDG conformers (optionally MMFF-optimised) for the same "
                                   "molecules as `sample`, written in the same SDF format for `evaluate`.")
    p.add_argument("--method", default="etkdg", choices=("etkdg",))
    p.add_argument("--mmff", action="store_true", help="optimise with MMFF94")
    _add_molecule_args(p, need_checkpoint=False)
    p.add_argument("--n-per-molecule", type=_positive_int, default=1)
    p.add_argument("--out", required=True, help="output SDF file")
    p.add_argument("--xyz", default=None, help="also write a multi-frame XYZ file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_baseline)


@_guard
def cmd_baseline(args: argparse.Namespace) -> int:
    """Handler of ``baseline``."""
    from qmanifold.models.baselines import baseline_conformers
    from qmanifold.models.sampling import make_records, write_sdf, write_xyz

    graphs = _select_graphs(args, None, args.heavy_atoms_only)
    t0 = time.time()
    confs, stats = baseline_conformers(graphs, args.n_per_molecule, method=args.method, mmff=args.mmff,
                                       seed=args.seed, progress=not args.no_progress)
    name = args.method + ("+mmff" if args.mmff else "")
    records = make_records(graphs, confs, {"qm_method": name, "qm_seed": args.seed})
    write_sdf(args.out, records)
    if args.xyz:
        write_xyz(args.xyz, records)
    print(f"[qmanifold] {name}: {len(records)} conformers of {len(graphs)} molecule(s) in {time.time() - t0:.1f} s "
          f"({stats}) -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------
# wiring
# ----------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    """Add ``train``, ``sample``, ``evaluate`` and ``baseline`` to an argparse subparsers object.

    Each parser gets ``func=handler``; call ``args.func(args)`` for the exit code.
    """
    _add_train(subparsers)
    _add_sample(subparsers)
    _add_evaluate(subparsers)
    _add_baseline(subparsers)


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m qmanifold.models.cli {train,sample,evaluate,baseline} ...``."""
    parser = argparse.ArgumentParser(prog="python -m qmanifold.models.cli", description="qmanifold molecule commands")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
