"""Per-seed values, means and paired (same seed, same molecules) differences of the 3-seed loss comparison.

Usage:
    python benchmarks/runs/loss_sweep/paired.py [SWEEP_DIR]                 (default runs/sweep; 200 molecules)
    python benchmarks/runs/loss_sweep/paired.py runs/sweep1000 bench1000.json  (rerun1000.sh; 1000 molecules)
The first form reads SWEEP_DIR/loss/<loss>_seed<s>/bench.json, the second SWEEP_DIR/<loss>_seed<s>/FILE.
"""

import json
import math
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/sweep"
name = sys.argv[2] if len(sys.argv) > 2 else None
T2 = 4.303  # 95 % Student t, 2 degrees of freedom


def record(loss: str, seed: int) -> dict:
    path = (os.path.join(root, f"{loss}_seed{seed}", name) if name
            else os.path.join(root, "loss", f"{loss}_seed{seed}", "bench.json"))
    with open(path) as fh:
        return json.load(fh)


def value(loss: str, seed: int, method: str, key: str) -> float:
    return record(loss, seed)["methods"][method]["rmsd"]["all"]["0.5"][key]


def mean_ci(values: list[float]) -> str:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    return f"{mean:.3f} ± {T2 * sd / math.sqrt(len(values)):.3f}"


print(f"molecules per run: {record('quotient', 0).get('num_molecules')}")
for method in ("model", "model+mmff"):
    for key in ("COV-R", "AMR-R", "AMR-R-median"):
        try:
            q = [value("quotient", s, method, key) for s in range(3)]
        except KeyError:
            continue
        print(f"{method:11s} {key}: quotient per seed {[round(v, 3) for v in q]}, mean {mean_ci(q)}")
        for other in ("conventional", "af3_align"):
            o = [value(other, s, method, key) for s in range(3)]
            diff = [a - b for a, b in zip(q, o)]
            print(f"    {other:12s} per seed {[round(v, 3) for v in o]}, mean {mean_ci(o)}; quotient - {other} = "
                  f"{mean_ci(diff)} (95 % CI, paired by seed)")
