"""Start-up time of the command line: ``qmanifold --help`` and an argument error, next to
``python -c "import torch"``, in one run.

The ``qmanifold`` parser is built and the arguments are parsed before torch, numpy, sympy or RDKit
are imported (they load in the command handlers), so ``--help`` and an argument error should cost
about as much as starting the interpreter, a small fraction of importing torch. Every command is a
fresh process; the commands run round-robin (one of each per round, ``--rounds`` rounds, after one
warm-up round that fills the file-system cache), and the table gives the median wall time of each
and its ratio to the median of ``import torch``, measured in the same run.

Run from the repository root::

    python -m benchmarks.bench_startup                  # 7 rounds
    python -m benchmarks.bench_startup --rounds 3 --json results/startup.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from qmanifold._clitools import check_outputs, positive_int
from qmanifold.atomic import atomic_write_json

PY = sys.executable


def commands() -> list[tuple[str, list[str], int]]:
    """(label, argv, expected exit status) of each timed command."""
    cmds = [
        ("python -c pass (interpreter floor)", [PY, "-c", "pass"], 0),
        ("qmanifold --help", [PY, "-m", "qmanifold.cli", "--help"], 0),
        ("qmanifold train --help", [PY, "-m", "qmanifold.cli", "train", "--help"], 0),
        ("qmanifold train --grad-clip nan (argument error)",
         [PY, "-m", "qmanifold.cli", "train", "--out", "unused", "--grad-clip", "nan"], 2),
        ("python -c 'import torch'", [PY, "-c", "import torch"], 0),
    ]
    script = shutil.which("qmanifold")
    if script:  # the installed console script, as users run it
        cmds.insert(2, ("qmanifold --help (console script)", [script, "--help"], 0))
    return cmds


def time_once(argv: list[str], expected: int, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != expected:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode} (expected {expected}): {proc.stderr[-500:]!r}")
    return elapsed


def run(rounds: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("QMANIFOLD_DEBUG", None)
    cmds = commands()
    times: dict[str, list[float]] = {label: [] for label, _, _ in cmds}
    for r in range(rounds + 1):
        for label, argv, expected in cmds:
            t = time_once(argv, expected, env)
            if r > 0:  # round 0 warms the file-system cache
                times[label].append(t)
    torch_median = statistics.median(times["python -c 'import torch'"])
    return [{"command": label, "argv": argv[1:] if argv[0] == PY else argv, "median_s": statistics.median(times[label]),
             "min_s": min(times[label]), "ratio_to_import_torch": statistics.median(times[label]) / torch_median,
             "rounds": rounds} for label, argv, _ in cmds]


def format_table(records: list[dict]) -> str:
    header = f"{'command':<52}{'median':>10}{'min':>10}{'/ import torch':>16}"
    lines = [header, "-" * len(header)]
    for rec in records:
        lines.append(f"{rec['command']:<52}{rec['median_s'] * 1e3:>8.0f}ms{rec['min_s'] * 1e3:>8.0f}ms"
                     f"{rec['ratio_to_import_torch']:>16.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    check_outputs({}, {"--json": args.json}, overwrite=args.overwrite)
    records = run(args.rounds)
    print(format_table(records))
    if args.json:
        atomic_write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
