"""Command-line subcommands for molecules: ``train``, ``sample``, ``evaluate``, ``baseline``.

The main ``qmanifold`` program adds them with :func:`register`; standalone::

    python -m qmanifold.models.cli train --data qm9-extract --steps 200 --out runs/demo --hidden 64 --layers 4
    python -m qmanifold.models.cli sample --checkpoint runs/demo/best.pt --data qm9-extract --split test \\
        --limit 10 --n-per-molecule 4 --out runs/demo/samples.sdf
    python -m qmanifold.models.cli evaluate --samples runs/demo/samples.sdf --json runs/demo/eval.json --plots runs/demo/plots
    python -m qmanifold.models.cli baseline --method etkdg --mmff --data qm9-extract --split test --limit 10 \\
        --n-per-molecule 4 --out runs/etkdg.sdf

Every handler returns an exit code: 0 on success, 2 for bad input (one line starting with
``error:`` on stderr, no traceback; ``--debug`` or ``QMANIFOLD_DEBUG=1`` shows it), 130 when
training was interrupted (the checkpoint is written).

Files are safe: no command writes over one of its inputs (``sample --out`` is never the
``--checkpoint``), outputs must differ from each other, an existing output file is replaced only
with ``--overwrite``, and ``train`` refuses a non-empty ``--out`` without ``--resume`` (or
``--overwrite``, which starts a new run there). Every output location is checked (created and
test-written) before the work starts. Building these parsers imports no torch, numpy or RDKit;
the handlers import them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

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
from qmanifold.errors import InputError

__all__ = ["register", "main", "cmd_train", "cmd_sample", "cmd_evaluate", "cmd_baseline",
           "cmd_benchmark_conformers"]


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn expected errors into ``error: ...`` on stderr and exit code 2 (unless ``--debug``)."""

    @functools.wraps(fn)
    def wrapper(args: argparse.Namespace) -> int:
        return run_handler(fn, args)

    return wrapper


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch

        torch.set_num_threads(int(n))


def _input_path(spec: str | None) -> str | None:
    """``spec`` if it names an existing file or directory (a dataset file), else None (``qm9``)."""
    return spec if spec and os.path.exists(spec) else None


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
    g.add_argument("--stereo", action=argparse.BooleanOptionalAction, default=None,
                   help="stereo-annotated inputs: chirality and E/Z labels read from each reference geometry "
                        "(default: on for stereo-aware models such as chiral_egnn)")
    g.add_argument("--max-atoms", type=positive_int, default=None, help="drop molecules with more atoms")
    g.add_argument("--train-limit", type=positive_int, default=None,
                   help="train on a fixed random subset of this many training molecules (same for every seed)")
    g.add_argument("--val-limit", type=positive_int, default=200, help="validation molecules (default 200)")
    g = p.add_argument_group("model and objective")
    g.add_argument("--model", default="egnn", help="egnn | chiral_egnn (SE(3) only, stereo-aware) | transformer (default egnn)")
    g.add_argument("--hidden", type=positive_int, default=None, help="hidden width (default: the model's)")
    g.add_argument("--layers", type=positive_int, default=None, help="number of layers (default: the model's)")
    g.add_argument("--heads", type=positive_int, default=None, help="attention heads (transformer)")
    g.add_argument("--model-kwargs", default=None, help="JSON dict of further model constructor arguments")
    g.add_argument("--loss", default="quotient", help="quotient | conventional | af3_align | geodiff_align (default quotient)")
    g.add_argument("--interpolant", default="linear", help="linear | vp_cosine | vp_linear | edm | harmonic (ET-Flow's harmonic prior on the bond "
                        "graph; needs --prediction v) (default linear)")
    g.add_argument("--prediction", default="x1", help="x1 | v (default x1)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random-rotation augmentation (default: on for the transformer, off for the EGNN)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=1000, help="total optimisation steps (default 1000)")
    g.add_argument("--batch-size", type=positive_int, default=32, help="molecules per step and process (default 32)")
    g.add_argument("--lr", type=bounded_float(gt=0), default=1e-3, help="peak learning rate (default 1e-3)")
    g.add_argument("--weight-decay", type=bounded_float(ge=0), default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup", type=nonnegative_int, default=100, help="linear warm-up steps (default 100)")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "constant"), help="learning-rate schedule")
    g.add_argument("--grad-clip", type=bounded_float(ge=0), default=1.0, help="max gradient norm, 0 = off (default 1)")
    g.add_argument("--ema", type=bounded_float(ge=0, lt=1), default=0.999,
                   help="EMA decay of the weights in [0, 1), 0 = off (default 0.999)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    g = p.add_argument_group("run control")
    g.add_argument("--out", required=True,
                   help="run directory: new or empty (or an existing run with --resume, or --overwrite)")
    g.add_argument("--seed", type=nonnegative_int, default=0)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (default auto)")
    g.add_argument("--val-every", type=positive_int, default=500, help="validate every K steps (default 500)")
    g.add_argument("--ckpt-every", type=positive_int, default=500, help="write last.pt every K steps (default 500)")
    g.add_argument("--log-every", type=positive_int, default=1, help="log the train loss every K steps (default 1)")
    g.add_argument("--stop-after", type=positive_int, default=None,
                   help="stop this invocation at this step (schedule still planned for --steps); continue with --resume")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    g.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new run from the weights (and EMA weights) of CKPT, same model and data, fresh "
                        "optimizer and schedule (fine-tuning; weights the checkpoint lacks load as zeros where the "
                        "model allows it)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a non-empty --out: first delete the files of a previous run there "
                        "(last.pt, best.pt, log.jsonl, config.json, summary.json; other files are kept)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_train)


def _parse_model_kwargs(args: argparse.Namespace) -> dict:
    """``--model-kwargs`` as a dict (JSON object); syntax only, the keys are checked by
    :func:`_check_model_kwargs` once the network classes are imported."""
    if not args.model_kwargs:
        return {}
    try:
        kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as exc:
        raise InputError(f"--model-kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise InputError(f"--model-kwargs must be a JSON object such as '{{\"name\": value}}', got {args.model_kwargs!r}")
    return kwargs


def _check_model_kwargs(model: str, kwargs: dict, args: argparse.Namespace) -> None:
    """Every key of ``--model-kwargs`` is a constructor argument of the network ``model``; the
    message names the bad key and lists the valid ones. An unknown ``model`` is left to the
    library's own check (which lists the models)."""
    import inspect

    from qmanifold.models.networks import DENOISERS

    cls = DENOISERS.get(str(model).lower())
    if cls is None or not kwargs:
        return
    params = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    managed = {"num_atom_types": "it is set from the data's element list",
               "num_elements": "it is set from the data's element list"}
    for name in ("hidden", "layers", "heads"):
        if getattr(args, name, None) is not None:
            managed[name] = f"--{name} is given as well"
    valid = sorted(n for n, p in params.items()
                   if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                   and n not in managed)
    for key in kwargs:
        if key in managed and key in params:
            raise InputError(f"--model-kwargs: {key!r} cannot be given here ({managed[key]})")
        if key not in params:
            raise InputError(f"--model-kwargs: {key!r} is not an argument of the {cls.__name__} ({model}) "
                             f"model; valid keys: {', '.join(valid)}")


@_guard
def cmd_train(args: argparse.Namespace) -> int:
    """Handler of ``train``."""
    model_kwargs = _parse_model_kwargs(args)
    stale = check_run_dir(args.out, {"--data": _input_path(args.data), "--init-from": args.init_from},
                          resume=args.resume,
                          overwrite=getattr(args, "overwrite", False))

    from qmanifold.models.training import TrainConfig, train

    _check_model_kwargs(args.model, model_kwargs, args)
    cfg = TrainConfig(
        data=args.data, model=args.model, loss=args.loss, steps=args.steps, out=args.out,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, warmup=args.warmup,
        schedule=args.schedule, grad_clip=args.grad_clip, ema=args.ema, seed=args.seed, device=args.device,
        dtype=args.dtype, interpolant=args.interpolant, prediction=args.prediction, augment=args.augment,
        hidden=args.hidden, layers=args.layers, heads=args.heads, model_kwargs=model_kwargs,
        heavy_atoms_only=args.heavy_atoms_only, stereo=args.stereo, max_atoms=args.max_atoms,
        train_limit=args.train_limit,
        val_limit=args.val_limit, val_every=args.val_every, ckpt_every=args.ckpt_every, log_every=args.log_every,
        stop_after=args.stop_after, resume=args.resume, threads=args.threads, progress=not args.no_progress,
        init_from=args.init_from,
    )
    cfg.validate()
    if stale and int(os.environ.get("RANK", "0")) == 0:  # --overwrite: only rank 0 deletes (before DDP starts)
        remove_run_files(stale)
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
    g.add_argument("--limit", type=positive_int, default=None,
                   help="this many molecules of the split, drawn with --select-seed (default: all)")
    g.add_argument("--select-seed", type=nonnegative_int, default=0, help="seed of the --limit selection (default 0)")
    g.add_argument("--max-atoms", type=positive_int, default=None, help="skip molecules with more atoms")
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


def _ensemble_graphs(args, elements, heavy_atoms_only: bool):
    """``sample -n``: the one graph of the ensemble in ``--data`` (file atom order), as a list."""
    from qmanifold.models.sampling import ensemble_graph
    from qmanifold.models.training import load_molecules

    if args.smiles:
        raise ValueError("-n/--n samples the ensemble of one molecule in --data; with --smiles use --n-per-molecule")
    if args.limit is not None or args.n_per_molecule != 1:
        raise ValueError("-n/--n replaces --limit / --n-per-molecule (it samples N conformers of the one molecule "
                         "of --data); drop those options")
    ds = load_molecules(args.data, heavy_atoms_only=heavy_atoms_only, max_atoms=args.max_atoms,
                        elements=elements, progress=True)
    return [ensemble_graph(ds, args.data)]


# ----------------------------------------------------------------------------------------------
# sample
# ----------------------------------------------------------------------------------------------


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="sample conformers from a checkpoint into an SDF file",
                       description="Sample M conformers per molecule with a trained checkpoint (sampler geometry "
                                   "from the training loss: quotient samplers for quotient-trained models) and "
                                   "write them to an SDF file (and optionally XYZ).")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint file (best.pt / last.pt); default: the shipped QM9 model (heavy atoms, "
                        "stereo-aware; see qmanifold/models/pretrained/PROVENANCE.md)")
    _add_molecule_args(p, need_checkpoint=True)
    p.add_argument("--n-per-molecule", type=positive_int, default=1, help="conformers per molecule M (default 1)")
    p.add_argument("-n", "--n", dest="n_ensemble", type=positive_int, default=None, metavar="N",
                   help="ensemble mode: --data holds conformations of ONE molecule (an ensemble .npz, e.g. MD); "
                        "sample N conformers of that molecule, atoms in the file's order, every record labelled "
                        "by the molecule (qm_source <data>:molecule, qm_ensemble 1), not by a frame. Use "
                        "--refine none for Boltzmann sampling (MMFF minimisation removes the thermal spread)")
    p.add_argument("--refine", default="mmff", choices=("none", "mmff"),
                   help="after sampling: MMFF94 minimisation of the complete molecule, hydrogens included, which "
                        "keeps the sampled conformer and cleans up its local geometry (default mmff; none: the raw "
                        "samples)")
    p.add_argument("--stereo-retries", type=nonnegative_int, default=4,
                   help="redraw conformers that miss a requested stereocentre or E/Z bond up to K times "
                        "(stereo-aware models; default 4, 0 = off)")
    p.add_argument("--no-stereo-repair", action="store_true",
                   help="do not move stereocentres that are still wrong or flat after the redraws to their requested "
                        "side (centres with three bonded neighbours; default: repair, counted in qm_stereo_repaired)")
    p.add_argument("--no-hydrogens", action="store_true",
                   help="write heavy-atom graphs without hydrogens (default: hydrogens placed from the heavy atoms, "
                        "RDKit AddHs addCoords; with --refine mmff they are relaxed too)")
    p.add_argument("--out", required=True, help="output SDF file (never one of the inputs)")
    p.add_argument("--xyz", default=None, help="also write a multi-frame XYZ file")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --xyz files")
    p.add_argument("--steps", type=positive_int, default=50, help="integration steps (default 50)")
    p.add_argument("--sampler", default="ode", choices=("ode", "sde", "heun", "edm"), help="(default ode)")
    p.add_argument("--geometry", default=None, choices=("quotient", "conventional"),
                   help="sampler geometry (default: the one matching the training loss)")
    p.add_argument("--time-grid", default="uniform", choices=("uniform", "edm"),
                   help="time steps: uniform, or edm (Karras' rho = 7 noise-level spacing: small steps near the "
                        "data, for finer local geometry at the same step count) (default uniform)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--batch-size", type=positive_int, default=64, help="configurations integrated together (default 64)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar; a status line on stderr every minute instead (for logs)")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_sample)


@_guard
def cmd_sample(args: argparse.Namespace) -> int:
    """Handler of ``sample``."""
    if args.checkpoint is not None:
        require_file("--checkpoint", args.checkpoint)
    check_outputs({"--checkpoint": args.checkpoint, "--data": _input_path(args.data)},
                  {"--out": args.out, "--xyz": args.xyz}, overwrite=args.overwrite)

    from qmanifold.models.sampling import make_records, sample_conformers, write_sdf, write_xyz
    from qmanifold.models.training import diffusion_from_checkpoint, load_checkpoint, resolve_device

    _set_threads(args.threads)
    device = resolve_device(args.device)
    checkpoint, shipped = args.checkpoint, args.checkpoint is None
    if shipped:
        from qmanifold.models.pretrained import DEFAULT, pretrained_path

        checkpoint = pretrained_path(DEFAULT)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    qd = diffusion_from_checkpoint(ckpt, device=device, use_ema=not args.no_ema)
    data = ckpt["data"]
    trained_on = str(data.get("data", ""))
    if args.data and trained_on and args.data.strip().lower() != trained_on.lower() and args.split != "all" \
            and {args.data.strip().lower(), trained_on.lower()} <= {"qm9", "qm9-edm", "qm9_edm"}:
        print(f"[qmanifold] note: the checkpoint was trained on the {trained_on} splits; the {args.split} split of "
              f"{args.data} overlaps its training molecules (use --data {trained_on} for held-out ones)")
    n_per_molecule = args.n_per_molecule
    if args.n_ensemble is not None:
        graphs = _ensemble_graphs(args, data["elements"], bool(data.get("heavy_atoms_only", False)))
        n_per_molecule = args.n_ensemble
    else:
        graphs = _select_graphs(args, data["elements"], bool(data.get("heavy_atoms_only", False)))
    t0 = time.time()
    stats: dict = {}
    confs = sample_conformers(qd, graphs, n_per_molecule, steps=args.steps, sampler=args.sampler,
                              seed=args.seed, batch_size=args.batch_size, device=device,
                              progress="lines" if args.no_progress else True, geometry=args.geometry,
                              time_grid=args.time_grid,
                              stereo_retries=args.stereo_retries, stereo_repair=not args.no_stereo_repair, stats=stats)
    complete = None
    if args.refine != "none":
        from qmanifold.models.refine import refine_conformers

        complete, refine_stats = refine_conformers(graphs, confs, args.refine, progress=not args.no_progress)
        stats.update(refine_stats)
        if args.no_hydrogens:  # keep the refined heavy atoms, drop the hydrogens
            import numpy as np

            confs = [np.stack([c.heavy for c in row]) for row in complete]
            complete = None
    geometry = args.geometry or ("quotient" if qd.loss_type == "quotient" else "conventional")
    props = {"qm_method": "qmanifold", "qm_model": ckpt["model"]["name"], "qm_loss": ckpt["diffusion"]["loss"],
             "qm_checkpoint": "shipped:" + DEFAULT if shipped else os.path.abspath(checkpoint),
             "qm_step": int(ckpt["step"]),
             "qm_sampler": args.sampler, "qm_geometry": geometry, "qm_steps": args.steps, "qm_seed": args.seed,
             "qm_ema": int(not args.no_ema and ckpt.get("ema_state_dict") is not None) or
             int(bool(ckpt.get("exported_from", {}).get("ema"))),
             "qm_stereo_retries": args.stereo_retries, "qm_stereo_repair": int(not args.no_stereo_repair)}
    if args.no_hydrogens and args.refine != "none":
        props["qm_refine"] = f"{args.refine} (with hydrogens placed; hydrogens not written)"
    if args.n_ensemble is not None:
        props["qm_ensemble"] = 1
    records = make_records(graphs, confs, props, complete=complete, hydrogens=not args.no_hydrogens)
    write_sdf(args.out, records)
    if args.xyz:
        write_xyz(args.xyz, records)
    extra = ""
    if stats.get("stereo_redrawn"):
        extra += (f", {stats['stereo_redrawn']} stereo redraw(s), {stats['stereo_repaired']} centre(s) repaired, "
                  f"{stats['stereo_wrong']} conformer(s) still off")
    if stats.get("mmff_missing_params"):
        extra += f", {stats['mmff_missing_params']} without MMFF94 parameters (not refined)"
    print(f"[qmanifold] {len(records)} conformers of {len(graphs)} molecule(s) ({args.sampler}, {geometry} geometry, "
          f"{args.steps} steps, refine {args.refine}{extra}) in {time.time() - t0:.1f} s -> {args.out}")
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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file and --plots PNGs")
    p.add_argument("--threshold", type=bounded_float(gt=0), default=0.5, help="coverage threshold in Å (default 0.5)")
    g = p.add_argument_group("ensemble mode (one molecule, many conformations)")
    g.add_argument("--ensemble", action="store_true",
                   help="score the samples (one molecule) against all frames of --reference, an ensemble .npz such as "
                        "an independent MD run, atoms matched by index; automatic for records of `sample -n`")
    g.add_argument("--reference-split", default="all", choices=("train", "valid", "test", "all"),
                   help="frames of --reference used in ensemble mode (default all)")
    g.add_argument("--max-reference", type=positive_int, default=5000,
                   help="ensemble mode: at most this many reference frames, drawn with --seed (default 5000)")
    g.add_argument("--max-rmsd", type=positive_int, default=500,
                   help="ensemble mode: COV/AMR on at most this many generated x reference conformers (default 500)")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the ensemble-mode subsets (default 0)")
    p.add_argument("--no-progress", action="store_true")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_evaluate)


@_guard
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``evaluate``."""
    require_file("--samples", args.samples)
    check_outputs({"--samples": args.samples, "--reference": _input_path(args.reference)},
                  {"--json": args.json}, {"--plots": args.plots}, overwrite=args.overwrite)

    from qmanifold.models.evaluation import (
        evaluate_ensemble,
        evaluate_samples,
        plot_evaluation,
        read_sdf_records,
        write_json,
    )

    records = read_sdf_records(args.samples)
    ensemble = args.ensemble or all(r["props"].get("qm_ensemble") == "1" for r in records)
    if ensemble:
        res = evaluate_ensemble(records, reference=args.reference, split=args.reference_split,
                                threshold=args.threshold, max_reference=args.max_reference, max_rmsd=args.max_rmsd,
                                seed=args.seed, progress=not args.no_progress, keep_values=bool(args.plots))
        res["samples"] = args.samples
    else:
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
    if ensemble:
        line += (f"; ensemble vs {res['num_reference_frames_used']} reference frames: bond W1 "
                 f"{res['bond_length_w1_pooled']:.4f} Å (pooled), stereo match {100 * res['stereo_match']:.1f}%")
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
    p.add_argument("--n-per-molecule", type=positive_int, default=1)
    p.add_argument("--out", required=True, help="output SDF file (never one of the inputs)")
    p.add_argument("--xyz", default=None, help="also write a multi-frame XYZ file")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --xyz files")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_debug_flag(p, subcommand=True)
    p.set_defaults(func=cmd_baseline)


@_guard
def cmd_baseline(args: argparse.Namespace) -> int:
    """Handler of ``baseline``."""
    check_outputs({"--data": _input_path(args.data)}, {"--out": args.out, "--xyz": args.xyz}, overwrite=args.overwrite)

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
# benchmark conformers
# ----------------------------------------------------------------------------------------------


def _add_benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="benchmarks of trained models (conformers: model vs RDKit ETKDG)",
                       description="Benchmarks of trained models against classical baselines.")
    bsub = p.add_subparsers(dest="benchmark", required=True)
    c = bsub.add_parser("conformers", help="a checkpoint vs ETKDG / ETKDG+MMFF on the same molecules",
                        description="Sample conformers with a checkpoint and with RDKit ETKDGv3 (with and without "
                                    "MMFF94, stereo assigned from the reference geometry) for the same molecules and "
                                    "print one Markdown table: COV-R/AMR-R/COV-P/AMR-P at 0.25/0.5/1.0 Å (failures "
                                    "count as misses), stereo correctness, bond-length/angle W1, time per molecule.")
    c.add_argument("--checkpoint", default=None,
                   help="checkpoint file (best.pt / last.pt); default: the shipped QM9 model")
    c.add_argument("--data", default="qm9-edm", help="qm9-edm | qm9 | qm9-extract | FILE (default qm9-edm)")
    c.add_argument("--split", default="test", choices=("train", "valid", "test", "all"), help="(default test)")
    c.add_argument("--limit", type=positive_int, default=1000,
                   help="the first N molecules of the split in permutation order (default 1000)")
    c.add_argument("--max-atoms", type=positive_int, default=None, help="skip molecules with more atoms")
    c.add_argument("--n-per-molecule", type=positive_int, default=2, help="model conformers per molecule (default 2)")
    c.add_argument("--etkdg-counts", type=positive_int, nargs="+", default=None,
                   help="ETKDG conformers per molecule, one run each (default: --n-per-molecule and 10)")
    c.add_argument("--no-etkdg", action="store_true", help="the model rows only (model selection on validation data)")
    c.add_argument("--steps", type=positive_int, default=50, help="ODE steps of the model sampler (default 50)")
    c.add_argument("--stereo-retries", type=nonnegative_int, default=4,
                   help="redraws of model conformers that miss a requested stereo label (default 4, as in sample)")
    c.add_argument("--no-stereo-repair", action="store_true",
                   help="leave stereocentres that are still wrong after the redraws as sampled (as in sample)")
    c.add_argument("--no-refine", action="store_true", help="skip the model+mmff row")
    c.add_argument("--workers", type=positive_int, default=1,
                   help="processes for the ETKDG baselines (default 1; times stay per molecule and core)")
    c.add_argument("--batch-size", type=positive_int, default=64, help="configurations integrated together")
    c.add_argument("--json", default=None, help="also write the full results as JSON")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    c.add_argument("--seed", type=nonnegative_int, default=0)
    c.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    c.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    c.add_argument("--threads", type=positive_int, default=None, help="CPU threads")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_debug_flag(c, subcommand=True)
    c.set_defaults(func=cmd_benchmark_conformers)


@_guard
def cmd_benchmark_conformers(args: argparse.Namespace) -> int:
    """Handler of ``benchmark conformers``."""
    if args.checkpoint is None:
        from qmanifold.models.pretrained import DEFAULT, pretrained_path

        args.checkpoint = pretrained_path(DEFAULT)
    require_file("--checkpoint", args.checkpoint)
    check_outputs({"--checkpoint": args.checkpoint, "--data": _input_path(args.data)}, {"--json": args.json},
                  overwrite=args.overwrite)

    from qmanifold.models.conformer_benchmark import format_table, run_benchmark
    from qmanifold.models.evaluation import write_json

    _set_threads(args.threads)
    res = run_benchmark(args.checkpoint, data=args.data, split=args.split, limit=args.limit,
                        n_per_molecule=args.n_per_molecule, etkdg_counts=() if args.no_etkdg else args.etkdg_counts,
                        steps=args.steps,
                        seed=args.seed, batch_size=args.batch_size, device=args.device, use_ema=not args.no_ema,
                        max_atoms=args.max_atoms, progress=not args.no_progress, stereo_retries=args.stereo_retries,
                        refine=not args.no_refine, workers=args.workers, stereo_repair=not args.no_stereo_repair)
    print(format_table(res), end="")
    if args.json:
        write_json(args.json, res)
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
    _add_benchmark(subparsers)
    from qmanifold.models.boltzmann.cli import register as register_boltzmann  # stdlib-only parsers

    register_boltzmann(subparsers)  # data, train-boltzmann, evaluate-boltzmann


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m qmanifold.models.cli {train,sample,evaluate,baseline} ...``."""
    parser = argparse.ArgumentParser(prog="python -m qmanifold.models.cli", description="qmanifold molecule commands")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return run_handler(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
