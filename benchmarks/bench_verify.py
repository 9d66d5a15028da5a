"""Wall time of the default ``qmanifold verify`` suite, now against before (issue 16), side by side.

"Before" is the verification package as committed at ``--old-ref`` (default: the last commit before
the half-wrong curvature controls, the checkpoint tests and the scaled matrix Fisher quadrature):
its ``runner.py``, ``targets.py``, ``matrix_fisher.py`` and ``__init__.py`` are taken with
``git show`` into a temporary package (relative imports of the rest of ``qmanifold`` made absolute)
and its ``run_suite()`` is run with its own default sizes. "Now" is ``qmanifold.verify.runner.run_suite()``
with the current ``DEFAULT_CONFIG``. Each suite runs in a fresh process with the same number of
torch threads (``--threads``, default 1), one after the other, ``--rounds`` times alternating
(old, new, old, new, ...), so that load that drifts hits both. The table gives each suite's wall
time (import excluded) and per-target seconds, its verdicts, and the ratio old / new per round
and of the medians.

Run from the repository root (needs git and the repository's history)::

    python -m benchmarks.bench_verify                       # one round, about 8 minutes on 1 thread
    python -m benchmarks.bench_verify --rounds 2 --json results/bench_verify.json
    python -m benchmarks.bench_verify --targets se3          # one target only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

from qmanifold._clitools import check_outputs, positive_int
from qmanifold.atomic import atomic_write_json

# the verification package as committed before issue 16's work on it
OLD_REF = "65da4421b12cd6da480d434acf61752d7cec1273"
FILES = ("__init__.py", "runner.py", "targets.py", "matrix_fisher.py")
PACKAGE = "_qmanifold_verify_old"


def extract_old(ref: str, root: str) -> str:
    """Write the package at ``ref`` under ``root/PACKAGE`` and return ``root``."""
    pkg = os.path.join(root, PACKAGE)
    os.makedirs(pkg, exist_ok=True)
    for name in FILES:
        try:
            text = subprocess.run(["git", "show", f"{ref}:qmanifold/verify/{name}"], check=True, capture_output=True,
                                  text=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise SystemExit(f"error: cannot read qmanifold/verify/{name} at {ref} with git: {detail.strip()}") from None
        text = re.sub(r"^from \.\.(\w+) import", r"from qmanifold.\1 import", text, flags=re.MULTILINE)
        with open(os.path.join(pkg, name), "w") as fh:
            fh.write(text)
    return root


# Runs in the child process: argv = [which, threads, seed, targets (comma-separated or "")].
WORKER = r"""
import json, sys, time
which, threads, seed, targets = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
import torch
torch.set_num_threads(threads)
if which == "old":
    from _qmanifold_verify_old import runner
else:
    from qmanifold.verify import runner
kwargs = {"seed": seed, "progress": False}
if targets:
    kwargs["targets"] = tuple(targets.split(","))
start = time.perf_counter()
records = runner.run_suite(**kwargs)
wall = time.perf_counter() - start
per_target = {}
for r in records:
    per_target[r.target] = per_target.get(r.target, 0.0) + r.seconds
print("RESULT " + json.dumps({"which": which, "wall": wall, "per_target": per_target, "runs": len(records),
                              "ok": sum(r.ok for r in records)}))
"""


def run_one(which: str, old_root: str, threads: int, seed: int, targets: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if which == "old":
        env["PYTHONPATH"] = old_root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", WORKER, which, str(threads), str(seed), targets], check=False,
                          env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"error: the {which} suite failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def format_report(rounds: list[tuple[dict, dict]]) -> str:
    targets = list(dict.fromkeys(t for old, new in rounds for t in (*old["per_target"], *new["per_target"])))
    lines = [f"{'round':<7}{'suite':<6}{'wall s':>9}{'verdicts':>10}  " + "".join(f"{t:>15}" for t in targets)]
    for i, pair in enumerate(rounds):
        for res in pair:
            cells = "".join(f"{res['per_target'].get(t, float('nan')):>15.1f}" for t in targets)
            lines.append(f"{i + 1:<7}{res['which']:<6}{res['wall']:>9.1f}{res['ok']:>5}/{res['runs']:<4}  {cells}")
        lines.append(f"{'':<7}{'old/new':<7}{pair[0]['wall'] / pair[1]['wall']:>8.2f}x")
    old_med = statistics.median(o["wall"] for o, _ in rounds)
    new_med = statistics.median(n["wall"] for _, n in rounds)
    lines.append(f"median wall: old {old_med:.1f} s, new {new_med:.1f} s, ratio old/new {old_med / new_med:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-ref", default=OLD_REF, help="git revision of the 'old' verification package")
    parser.add_argument("--rounds", type=positive_int, default=1, help="old/new pairs, alternating (default 1)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads of each suite (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--targets", nargs="+", help="targets to run in both suites (default: each suite's default)")
    parser.add_argument("--json", help="write the per-round results as JSON")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    check_outputs({}, {"--json": args.json}, overwrite=args.overwrite)
    targets = ",".join(args.targets or ())
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        old_root = extract_old(args.old_ref, tmp)
        for i in range(args.rounds):
            old = run_one("old", old_root, args.threads, args.seed, targets)
            print(f"round {i + 1}: old {old['wall']:.1f} s ({old['ok']}/{old['runs']} verdicts as expected)", flush=True)
            new = run_one("new", old_root, args.threads, args.seed, targets)
            print(f"round {i + 1}: new {new['wall']:.1f} s ({new['ok']}/{new['runs']} verdicts as expected)", flush=True)
            rounds.append((old, new))
    print(format_report(rounds))
    if args.json:
        atomic_write_json(args.json, {"old_ref": args.old_ref, "threads": args.threads, "seed": args.seed,
                                      "rounds": [{"old": o, "new": n} for o, n in rounds]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
