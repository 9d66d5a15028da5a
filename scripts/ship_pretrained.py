#!/usr/bin/env python
"""Export a trained conformer model into the package (models/pretrained/) with its provenance.

    python scripts/ship_pretrained.py --run runs/chiral64q_edm --parent runs/chiral64_edm \
        --benchmark benchmarks/runs/shipped/benchmark_1000.json

writes ``models/pretrained/qm9_heavy_chiral_egnn.pt`` (inference-only: EMA weights of ``best.pt``,
no optimizer; :func:`qmanifold.models.training.export_checkpoint`) and
``models/pretrained/PROVENANCE.md`` / ``provenance.json``: the training commands of the run and of
the run it was initialised from (``--init-from``), data, steps, validation losses, wall time,
hardware, and the benchmark table when given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_info(run: str) -> dict:
    from qmanifold.models.training import read_log

    with open(os.path.join(run, "config.json")) as fh:
        cfg = json.load(fh)
    with open(os.path.join(run, "summary.json")) as fh:
        summary = json.load(fh)
    vals = read_log(os.path.join(run, "log.jsonl"), "val")
    best = min((v for v in vals if v.get("val_loss") is not None), key=lambda v: v["val_loss"], default=None)
    return {"config": cfg, "steps_done": summary.get("step"), "wall_time_s": summary.get("wall_time_s"),
            "parameters": summary.get("parameters"), "best_val": best,
            "val_curve": [[v["step"], round(v["val_quotient"], 5)] for v in vals if v.get("val_quotient") is not None]}


def _command(cfg: dict) -> str:
    parts = ["qmanifold train", f"--data {cfg['data']}", f"--model {cfg['model']}"]
    if cfg.get("heavy_atoms_only"):
        parts.append("--heavy-atoms-only")
    for key in ("loss", "interpolant", "prediction", "steps", "batch_size", "hidden", "layers", "lr", "warmup",
                "val_every", "ckpt_every", "seed", "threads"):
        if cfg.get(key) is not None:
            parts.append(f"--{key.replace('_', '-')} {cfg[key]}")
    if cfg.get("init_from"):
        parts.append(f"--init-from {cfg['init_from']}")
    parts.append(f"--out {cfg['out']}")
    return " ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run directory (its best.pt is shipped)")
    p.add_argument("--parent", default=None, help="the run it was initialised from (--init-from), if any")
    p.add_argument("--benchmark", default=None, help="benchmark conformers --json output to quote")
    p.add_argument("--dest", default=os.path.join(REPO, "models", "pretrained"))
    p.add_argument("--name", default="qm9_heavy_chiral_egnn.pt")
    args = p.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch

    from qmanifold.models.training import export_checkpoint

    runs = [("parent", args.parent)] if args.parent else []
    runs.append(("final", args.run))
    info = {label: _run_info(path) for label, path in runs}
    hardware = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
    bench = None
    if args.benchmark:
        with open(args.benchmark) as fh:
            bench = json.load(fh)
    provenance = {
        "runs": {k: {**v, "command": _command(v["config"])} for k, v in info.items()},
        "data": "QM9 from the qm9pack registry package, EDM split (qm9-edm: np.random.seed(0) permutation of the "
                "130,831 sorted ids; train = first 100,000 positions; the benchmark's test molecules are never seen)",
        "hardware": hardware,
        "benchmark": None if bench is None else {
            "num_molecules": bench["num_molecules"], "split": bench["config"]["split"],
            "methods": {n: {"COV-R@0.5": m["rmsd"]["all"]["0.5"]["COV-R"], "AMR-R": m["rmsd"]["all"]["0.5"]["AMR-R"],
                            "AMR-R-median": m["rmsd"]["all"]["0.5"]["AMR-R-median"], "stereo": m["stereo"]["correct"]}
                        for n, m in bench["methods"].items()}},
    }
    dest = os.path.join(args.dest, args.name)
    slim = export_checkpoint(os.path.join(args.run, "best.pt"), dest, provenance)
    with open(os.path.join(args.dest, "provenance.json"), "w") as fh:
        json.dump(provenance, fh, indent=2, sort_keys=True)
        fh.write("\n")
    total_steps = sum(v["steps_done"] or 0 for v in info.values())
    total_time = sum(v["wall_time_s"] or 0 for v in info.values())
    lines = [
        f"# Provenance of `{args.name}`", "",
        (f"Shipped conformer model: `{slim['model']['name']}` ({info['final']['parameters']} parameters), heavy atoms "
        f"of QM9 with stereo labels, {slim['diffusion']['loss']} loss, {slim['diffusion'].get('interpolant', 'linear')} "
        f"interpolant, EMA weights of the best validation checkpoint (step {slim['step']} of the final run)."),
        "", f"Data: {provenance['data']}.", "",
        (f"Training: {total_steps} optimisation steps in {total_time / 3600:.2f} h of wall time on {hardware} "
        "(one thread; other work ran on the second core)."), "", "Commands, in order:", "", "```sh",
    ]
    for label, v in provenance["runs"].items():
        lines.append(f"# {label} run: ran {v['steps_done']} of its --steps {v['config']['steps']} "
                     f"({(v['wall_time_s'] or 0) / 3600:.2f} h)")
        lines.append(v["command"])
    lines += ["```", "", "Validation loss (quotient objective, 200 validation molecules, fixed noise):", "",
              "| run | step | val quotient |", "|---|---|---|"]
    for label, v in info.items():
        curve = v["val_curve"]
        for step, val in curve[:: max(1, len(curve) // 8)] + curve[-1:]:
            lines.append(f"| {label} | {step} | {val} |")
    if bench is not None:
        lines += ["", (f"Benchmark ({bench['num_molecules']} molecules of the {bench['config']['split']} split, "
                  "`qmanifold benchmark conformers`, all-molecules column): see docs/molecules.md for the full table."),
                  "", "| method | COV-R@0.5 | AMR-R mean | AMR-R median | stereo ok |", "|---|---|---|---|---|"]
        for n, m in provenance["benchmark"]["methods"].items():
            amr = "inf" if m["AMR-R"] is None else f"{m['AMR-R']:.3f}"
            stereo = "-" if m["stereo"] is None else f"{100 * m['stereo']:.1f} %"
            lines.append(f"| {n} | {100 * m['COV-R@0.5']:.1f} % | {amr} | {m['AMR-R-median']:.3f} | {stereo} |")
    with open(os.path.join(args.dest, "PROVENANCE.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {dest} ({os.path.getsize(dest)} bytes) and PROVENANCE.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
