"""Per-seed values and paired (same seed, same molecules) differences of the 3-seed loss comparison.

Usage: python benchmarks/runs/loss_sweep/paired.py [SWEEP_DIR]   (default runs/sweep)
"""

import json
import math
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "runs/sweep"
T2 = 4.303  # 95 % Student t, 2 degrees of freedom


def value(loss: str, seed: int, method: str, key: str) -> float:
    with open(os.path.join(root, "loss", f"{loss}_seed{seed}", "bench.json")) as fh:
        return json.load(fh)["methods"][method]["rmsd"]["all"]["0.5"][key]


for method in ("model", "model+mmff"):
    for key in ("COV-R", "AMR-R"):
        q = [value("quotient", s, method, key) for s in range(3)]
        print(f"{method:11s} {key}: quotient per seed {[round(v, 3) for v in q]}")
        for other in ("conventional", "af3_align"):
            o = [value(other, s, method, key) for s in range(3)]
            diff = [a - b for a, b in zip(q, o)]
            mean = sum(diff) / 3
            sd = math.sqrt(sum((x - mean) ** 2 for x in diff) / 2)
            print(f"    {other:12s} per seed {[round(v, 3) for v in o]}; quotient - {other} = "
                  f"{mean:+.3f} ± {T2 * sd / math.sqrt(3):.3f} (95 % CI, paired by seed)")
