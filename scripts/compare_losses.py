#!/usr/bin/env python
"""Reproduce the loss comparison on QM9: quotient vs conventional vs aligned losses (+ ETKDG).

Same network, data, steps and seeds for every loss; each model is sampled with its matching
sampler (quotient geometry for the quotient loss, conventional for the baselines: the default of
``QuotientDiffusion``) on the same test molecules, and scored with ``evaluate``. The RDKit
ETKDG + MMFF baseline runs on the same molecules with the same number of conformers.

Every step is an ordinary CLI call (``python -m qmanifold.models.cli ...`` = ``qmanifold ...``); the exact
commands are written to ``OUT/commands.sh`` and the results to ``OUT/results.json`` and
``OUT/table.md``. Re-running continues where it stopped (training resumes from ``last.pt``;
finished samples / evaluations are kept unless ``--force``).

CPU default (about 15-25 minutes on 2 cores)::

    python scripts/compare_losses.py --out runs/compare

GPU-sized run (see docs/molecules.md)::

    python scripts/compare_losses.py --out runs/compare_gpu --device cuda --jobs 1 --threads 8 \
        --all-atoms --steps 200000 --batch-size 128 --hidden 256 --layers 8 --lr 5e-4 \
        --test-limit 1000 --n-per-molecule 10 --losses quotient conventional af3_align geodiff_align
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _read_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def _number(value) -> float:
    """A JSON number, with null (a missing or non-finite value) as NaN."""
    return float("nan") if value is None else float(value)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--data", default="qm9")
    p.add_argument("--losses", nargs="+", default=["quotient", "conventional", "af3_align"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--model", default="egnn")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--all-atoms", action="store_true", help="keep hydrogens (default: heavy atoms only)")
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--test-limit", type=int, default=30, help="test molecules")
    p.add_argument("--n-per-molecule", type=int, default=5)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--sampler", default="ode")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--no-etkdg", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=2, help="trainings run in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--force", action="store_true", help="redo samples and evaluations")
    return p.parse_args(argv)


class Runner:
    """Runs CLI commands (optionally in parallel), logging each to commands.sh and a log file."""

    def __init__(self, out: str, threads: int):
        self.out = out
        self.commands_path = os.path.join(out, "commands.sh")
        self.env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                        OMP_NUM_THREADS=str(threads))
        if not os.path.exists(self.commands_path):
            with open(self.commands_path, "w") as fh:
                fh.write("#!/bin/sh\n# commands run by scripts/compare_losses.py (qmanifold X == python -m qmanifold.models.cli X)\nset -e\n")

    def record(self, cmd: list[str]) -> None:
        with open(self.commands_path, "a") as fh:
            fh.write(" ".join(shlex.quote(c) for c in cmd) + "\n")

    def start(self, cmd: list[str], log: str) -> subprocess.Popen:
        self.record(cmd)
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
        with open(log, "a") as fh:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT)

    def run_all(self, jobs: list[tuple[list[str], str]], parallel: int) -> None:
        pending = list(jobs)
        running: list[tuple[subprocess.Popen, str]] = []
        while pending or running:
            while pending and len(running) < parallel:
                cmd, log = pending.pop(0)
                running.append((self.start(cmd, log), log))
            time.sleep(1.0)
            still = []
            for proc, log in running:
                rc = proc.poll()
                if rc is None:
                    still.append((proc, log))
                elif rc != 0:
                    for p, _ in still + [r for r in running if r[0] is not proc]:
                        if p.poll() is None:
                            p.terminate()
                    raise SystemExit(f"command failed (exit {rc}); see {log}")
            running = still


def main(argv=None) -> int:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    runner = Runner(out, args.threads)
    py = [sys.executable, "-m", "qmanifold.models.cli"]
    heavy = [] if args.all_atoms else ["--heavy-atoms-only"]
    t_all = time.time()

    # 0. make sure the dataset is parsed and cached once (not by 2 jobs at the same time)
    from qmanifold.models.training import load_molecules

    load_molecules(args.data, progress=True)

    # 1. training
    train_jobs = []
    for seed in args.seeds:
        for loss in args.losses:
            run = os.path.join(out, f"{loss}_seed{seed}")
            cmd = py + ["train", "--data", args.data, "--model", args.model, "--loss", loss, "--steps", str(args.steps),
                        "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--layers", str(args.layers),
                        "--lr", str(args.lr), "--seed", str(seed), "--out", run, "--val-every", str(args.val_every),
                        "--ckpt-every", str(args.val_every), "--device", args.device, "--threads", str(args.threads),
                        "--no-progress", "--resume"] + heavy
            if args.train_limit:
                cmd += ["--train-limit", str(args.train_limit)]
            summary = os.path.join(run, "summary.json")
            if os.path.exists(summary) and _read_json(summary).get("finished"):
                continue
            os.makedirs(run, exist_ok=True)
            train_jobs.append((cmd, os.path.join(run, "train.log")))
    t0 = time.time()
    runner.run_all(train_jobs, args.jobs)
    train_wall = time.time() - t0

    # 2. sampling, baseline and evaluation (cheap; also in parallel)
    mol_args = ["--data", args.data, "--split", "test", "--limit", str(args.test_limit)]
    jobs2, evals = [], {}
    for seed in args.seeds:
        for loss in args.losses:
            run = os.path.join(out, f"{loss}_seed{seed}")
            sdf = os.path.join(run, "samples.sdf")
            evals.setdefault(loss, []).append((run, sdf))
            if args.force or not os.path.exists(sdf):
                jobs2.append((py + ["sample", "--checkpoint", os.path.join(run, "best.pt")] + mol_args +
                              ["--n-per-molecule", str(args.n_per_molecule), "--out", sdf, "--steps",
                               str(args.sample_steps), "--sampler", args.sampler, "--seed", str(seed), "--device",
                               args.device, "--threads", str(args.threads), "--no-progress", "--overwrite"],
                              os.path.join(run, "sample.log")))
        if not args.no_etkdg:
            run = os.path.join(out, f"etkdg_mmff_seed{seed}")
            os.makedirs(run, exist_ok=True)
            sdf = os.path.join(run, "samples.sdf")
            evals.setdefault("ETKDG+MMFF", []).append((run, sdf))
            if args.force or not os.path.exists(sdf):
                jobs2.append((py + ["baseline", "--method", "etkdg", "--mmff"] + mol_args + heavy +
                              ["--n-per-molecule", str(args.n_per_molecule), "--out", sdf, "--seed", str(seed),
                               "--no-progress", "--overwrite"], os.path.join(run, "baseline.log")))
    t0 = time.time()
    runner.run_all(jobs2, args.jobs)
    jobs3 = []
    for method, items in evals.items():
        for run, sdf in items:
            ej = os.path.join(run, "eval.json")
            if args.force or not os.path.exists(ej):
                jobs3.append((py + ["evaluate", "--samples", sdf, "--json", ej, "--threshold", str(args.threshold),
                                    "--plots", os.path.join(run, "plots"), "--no-progress", "--overwrite"],
                              os.path.join(run, "evaluate.log")))
    runner.run_all(jobs3, args.jobs)
    eval_wall = time.time() - t0

    # 3. table
    from qmanifold.models.evaluation import summarize_runs

    results = {m: [_read_json(os.path.join(run, "eval.json")) for run, _ in items] for m, items in evals.items()}
    table = summarize_runs(results)
    train_info = {}
    for loss in args.losses:
        sums = [_read_json(os.path.join(out, f"{loss}_seed{s}", "summary.json")) for s in args.seeds]
        # summary.json is strict JSON: a run without validation has "last_val": null and a
        # non-finite loss is null; both read as NaN here
        train_info[loss] = {
            "wall_time_s": [s["wall_time_s"] for s in sums],
            "val_quotient": [_number((s.get("last_val") or {}).get("val_quotient")) for s in sums],
            "val_conventional": [_number((s.get("last_val") or {}).get("val_conventional")) for s in sums],
            "parameters": sums[0]["parameters"],
        }
    per_run_train_s = sum(sum(v["wall_time_s"]) for v in train_info.values())
    import torch

    meta = {
        "args": vars(args), "train_wall_s_this_invocation": round(train_wall, 1),
        "train_s_sum_over_runs": round(per_run_train_s, 1), "sample_eval_wall_s_this_invocation": round(eval_wall, 1),
        "total_wall_s_this_invocation": round(time.time() - t_all, 1), "hardware": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {platform.python_version()}",
        "device": args.device,
    }
    from qmanifold.atomic import atomic_write_json

    atomic_write_json(os.path.join(out, "results.json"), {"table": table, "training": train_info, "meta": meta})

    def fmt(row, key, scale=1.0, digits=3):
        if key not in row:
            return "-"
        m, s = row[key]["mean"] * scale, row[key]["std"] * scale
        return f"{m:.{digits}f} ± {s:.{digits}f}"

    lines = [("| method | COV-R (%) | AMR-R (Å) | COV-P (%) | AMR-P (Å) | connectivity ok (%) | bond-length W1 (Å) | "
              "bond-angle W1 (°) | val quotient loss | seeds |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in table.items():
        vq = "-"
        if method in train_info:
            import numpy as np

            v = np.asarray(train_info[method]["val_quotient"], dtype=float)
            v = v[np.isfinite(v)]
            if v.size:
                vq = f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.3f}"
        lines.append(f"| {method} | {fmt(row, 'COV-R', 100, 1)} | {fmt(row, 'AMR-R')} | {fmt(row, 'COV-P', 100, 1)} | "
                     f"{fmt(row, 'AMR-P')} | {fmt(row, 'connectivity_match', 100, 1)} | {fmt(row, 'bond_length_w1', 1, 4)} | "
                     f"{fmt(row, 'bond_angle_w1', 1, 2)} | {vq} | {row['seeds']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(text)
    print(text)
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
