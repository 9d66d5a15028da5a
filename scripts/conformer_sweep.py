#!/usr/bin/env python
"""Equal-budget comparisons of conformer models on QM9 (EDM split): architecture, prior, loss.

Each run is an ordinary ``qmanifold train`` (same data, steps, batch, learning-rate schedule) followed
by ``qmanifold benchmark conformers --no-etkdg`` on the first ``--limit`` molecules of a split
(``valid`` for choices, ``test`` for the loss comparison reported once). Runs are named
``NAME`` = ``<group>/<label>_seed<k>`` under ``--out``; re-running skips finished steps.

Groups (``--groups``):

* ``arch``: chiral_egnn widths/depths (quotient loss, Gaussian prior), scored on ``valid``;
* ``prior``: Gaussian (linear interpolant, x1 prediction) vs harmonic prior (velocity prediction),
  scored on ``valid``;
* ``loss``: quotient vs conventional vs af3_align with the chosen architecture, scored on ``test``.

Usage (about 40 minutes on 2 cores with the defaults)::

    python scripts/conformer_sweep.py --out runs/sweep --jobs 2
    python scripts/conformer_sweep.py --out runs/sweep --report   # the Markdown tables
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHS = {"h32_l4": (32, 4), "h64_l4": (64, 4), "h64_l6": (64, 6), "h128_l4": (128, 4)}
CHOSEN_ARCH = "h64_l4"  # the shipped model's; --arch to change


def _gaussian_source(seed: int, args) -> str:
    """The training run of the Gaussian-prior, quotient-loss model of the chosen architecture."""
    return f"arch/{args.arch}_seed0" if seed == 0 and "arch" in args.groups else f"prior/gaussian_seed{seed}"


def plan(args) -> list[dict]:
    runs = []
    base = {"model": "chiral_egnn", "loss": "quotient", "interpolant": "linear", "prediction": "x1"}
    if "arch" in args.groups:
        for label, (h, layers) in ARCHS.items():
            runs.append({**base, "name": f"arch/{label}_seed0", "hidden": h, "layers": layers, "seed": 0, "split": "valid"})
    if "prior" in args.groups:
        h, layers = ARCHS[args.arch]
        for seed in args.prior_seeds:
            runs.append({**base, "name": f"prior/gaussian_seed{seed}", "hidden": h, "layers": layers, "seed": seed,
                         "split": "valid", **({"from": _gaussian_source(0, args)} if seed == 0 and "arch" in args.groups
                                              else {})})
            runs.append({**base, "name": f"prior/harmonic_seed{seed}", "hidden": h, "layers": layers, "seed": seed,
                         "split": "valid", "interpolant": "harmonic", "prediction": "v"})
    if "loss" in args.groups:
        h, layers = ARCHS[args.arch]
        for seed in args.seeds:
            for loss in args.losses:
                runs.append({**base, "name": f"loss/{loss}_seed{seed}", "hidden": h, "layers": layers, "seed": seed,
                             "split": "test", "loss": loss,
                             **({"from": _gaussian_source(seed, args)} if loss == "quotient" and "prior" in args.groups
                                and seed in args.prior_seeds else {})})
    # runs that reuse another run's training go last (they wait for it)
    return [r for r in runs if "from" not in r] + [r for r in runs if "from" in r]


def _train_dir(run: dict, args) -> str:
    """The directory of the training a run uses (its own, or the one it reuses: same settings)."""
    return os.path.join(args.out, run.get("from", run["name"]))


def commands(run: dict, args) -> list[list[str]]:
    d = _train_dir(run, args)
    qm = [sys.executable, "-m", "qmanifold.models.cli"]
    train = qm + ["train", "--data", "qm9-edm", "--heavy-atoms-only", "--model", run["model"], "--loss", run["loss"],
                  "--interpolant", run["interpolant"], "--prediction", run["prediction"], "--hidden", str(run["hidden"]),
                  "--layers", str(run["layers"]), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--lr", str(args.lr), "--warmup", "200", "--val-every", str(args.steps), "--ckpt-every", "500",
                  "--seed", str(run["seed"]), "--threads", "1", "--no-progress", "--out", d]
    if os.path.exists(os.path.join(d, "last.pt")):
        train.append("--resume")
    bench = qm + ["benchmark", "conformers", "--checkpoint", os.path.join(d, "best.pt"), "--data", "qm9-edm",
                  "--split", run["split"], "--limit", str(args.limit), "--no-etkdg", "--threads", "1", "--no-progress",
                  "--seed", str(run["seed"]), "--json", os.path.join(args.out, run["name"], "bench.json"), "--overwrite"]
    return [bench] if "from" in run else [train, bench]


def run_all(runs: list[dict], args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pending = [r for r in runs if not os.path.exists(os.path.join(args.out, r["name"], "bench.json"))]
    running: list[tuple[subprocess.Popen, list, dict]] = []
    log_all = open(os.path.join(args.out, "commands.sh"), "a")  # noqa: SIM115 - closed at the end
    while pending or running:
        while pending and len(running) < args.jobs:
            busy = {r["name"] for _, _, r in running}
            ready = [r for r in pending if "from" not in r or (
                r["from"] not in busy and r["from"] not in {q["name"] for q in pending}
                and os.path.exists(os.path.join(args.out, r["from"], "best.pt")))]
            if not ready:
                break
            run = ready[0]
            pending.remove(run)
            os.makedirs(os.path.dirname(os.path.join(args.out, run["name"])), exist_ok=True)
            if "from" in run:  # its own folder holds only its benchmark
                os.makedirs(os.path.join(args.out, run["name"]), exist_ok=True)
            cmds = commands(run, args)
            script = " && ".join(" ".join(shlex.quote(c) for c in c_) for c_ in cmds)
            log_all.write(script + "\n")
            log_all.flush()
            log = open(os.path.join(args.out, run["name"] + ".log"), "a")  # noqa: SIM115
            running.append((subprocess.Popen(["sh", "-c", script], cwd=REPO, env=env, stdout=log,
                                             stderr=subprocess.STDOUT), cmds, run))
            print(f"[sweep] start {run['name']}", flush=True)
        time.sleep(2.0)
        still = []
        for proc, cmds, run in running:
            rc = proc.poll()
            if rc is None:
                still.append((proc, cmds, run))
            else:
                print(f"[sweep] {run['name']}: exit {rc}", flush=True)
        running = still
    log_all.close()


def _row(bench: dict, method: str) -> dict:
    m = bench["methods"][method]
    r = m["rmsd"]["all"]
    return {"cov": r["0.5"]["COV-R"], "amr": r["0.5"]["AMR-R"], "amr_med": r["0.5"]["AMR-R-median"],
            "covp": r["0.5"]["COV-P"], "stereo": m["stereo"]["correct"], "bond": m["geometry"]["bond_length_w1"],
            "angle": m["geometry"]["bond_angle_w1"]}


def _mean_ci(values: list[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return f"{mean:.3f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78}.get(len(vals), 2.0)  # 95 % Student t, n - 1 dof
    return f"{mean:.3f} ± {t * sd / math.sqrt(len(vals)):.3f}"


def report(args) -> str:
    out = []
    groups: dict[str, dict[str, list]] = {}
    for run in plan(args):
        path = os.path.join(args.out, run["name"], "bench.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            bench = json.load(fh)
        summary_path = os.path.join(_train_dir(run, args), "summary.json")
        val = None
        if os.path.exists(summary_path):
            with open(summary_path) as fh:
                val = (json.load(fh).get("last_val") or {}).get("val_quotient")
        group, label = run["name"].split("/")
        label = label.rsplit("_seed", 1)[0]
        for method in ("model", "model+mmff"):
            if method in bench["methods"]:
                row = _row(bench, method)
                row["val_quotient"] = val
                groups.setdefault(group, {}).setdefault(f"{label} ({method})", []).append(row)
    keys = ["cov", "amr", "amr_med", "covp", "stereo", "bond", "angle", "val_quotient"]
    head = "| run | n | COV-R@0.5 | AMR-R mean | AMR-R median | COV-P@0.5 | stereo ok | bond W1 Å | angle W1 ° | val quotient |"
    for group, rows in groups.items():
        out.append(f"\n### {group}\n\n{head}\n|" + "---|" * 10)
        for label, vals in rows.items():
            cells = [_mean_ci([v[k] for v in vals]) for k in keys]
            out.append(f"| {label} | {len(vals)} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--groups", nargs="+", default=["arch", "prior", "loss"], choices=("arch", "prior", "loss"))
    p.add_argument("--arch", default=CHOSEN_ARCH, choices=sorted(ARCHS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=200, help="molecules scored per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prior-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--losses", nargs="+", default=["quotient", "conventional", "af3_align"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report", action="store_true", help="print the tables of finished runs and exit")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if not args.report:
        run_all(plan(args), args)
    text = report(args)
    with open(os.path.join(args.out, "report.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
