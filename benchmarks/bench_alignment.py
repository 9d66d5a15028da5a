"""Alignment over SE(3) x S_N (identical particles): runtime and failure rate against N.

Run::

    python -m benchmarks.bench_alignment                  # N = 7..200, 20 cases each (~1 minute)
    python -m benchmarks.bench_alignment --quick          # a few seconds
    python -m benchmarks.bench_alignment --noise 0.1 --json results/align.json

Each case is a configuration ``x`` and a permuted, rotated and translated copy ``y = g (x + noise)``
(``--noise`` in units of the typical nearest-neighbour spacing, default 0: an exact copy). Both
methods align ``x`` onto ``y`` in the same run, interleaved case by case:

* ``new``: ``Quotient(groups.SE3xS_N).align`` (multi-start from invariant information: point
  descriptors, principal axes, anchor frames, the identity order; ``ProductGroup.align``);
* ``old``: the method before issue 16, reproduced here: Kabsch, then Hungarian and Kabsch
  alternated 20 times from the identity order.

A case fails when the distance found exceeds ``max(1e-6 |y|, d_true (1 + 1e-9))``, with
``d_true`` the distance under the true permutation (optimal rigid motion): for an exact copy the
distance must be zero to rounding. Reported per N: the median time per call of each method, the
ratio of medians ``new / old`` and the paired ratio (geometric mean of per-case ratios) with its 95 %
interval (``qmanifold.bench.paired_ratio``), and both failure rates. Random clouds are Gaussian with
``sigma = N^(1/3)`` (roughly constant density); ``--symmetric`` rows (on by default) add clusters
with degenerate inertia and tied point descriptors: concentric icosahedra (LJ13-like) and cubic
grids. Sizes with ``N! <= 720`` are aligned by enumeration instead, so N starts at 7.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import statistics
import sys
import time

import torch

from qmanifold import Quotient, groups
from qmanifold.bench import paired_ratio, write_json

__all__ = ["legacy_align", "make_cases", "run", "main"]

GROUP = groups.SE3xS_N


def legacy_align(x, ref, mask=None, iterations: int = 20):
    """The former ``ProductGroup.align`` beyond enumeration: alternation from the identity order."""
    y = GROUP.lie.align(x, ref, mask)
    for _ in range(iterations):
        y = GROUP.lie.align(GROUP.discrete.align(y, ref, mask), ref, mask)
    return y


def icosahedral_shells(shells: int, dtype) -> torch.Tensor:
    """A centre and ``shells`` concentric icosahedra: ``1 + 12 shells`` points."""
    phi = (1 + math.sqrt(5)) / 2
    vertices = []
    for a, b in itertools.product((1.0, -1.0), repeat=2):
        vertices += [(0.0, a, b * phi), (a, b * phi, 0.0), (b * phi, 0.0, a)]
    shell = torch.tensor(vertices, dtype=dtype) / 2  # edge length 1
    return torch.cat([torch.zeros(1, 3, dtype=dtype)] + [(k + 1) * shell for k in range(shells)])


def cubic_grid(side: int, dtype) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(side), repeat=3)), dtype=dtype)


def make_cases(kind: str, n: int, cases: int, noise: float, dtype, seed: int):
    """``(x, y, x_true_order)``, each ``(cases, n', 3)``: configurations, noisy group images, and x
    in the true order of y (for the distance under the true element)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(cases, n, 3, generator=gen, dtype=dtype) * n ** (1 / 3)
    elif kind == "icosahedral":
        x = icosahedral_shells(n, dtype).expand(cases, -1, -1)
    elif kind == "cubic grid":
        x = cubic_grid(n, dtype).expand(cases, -1, -1)
    else:
        raise ValueError(f"unknown configuration kind {kind!r}")
    m = x.shape[-2]
    g = GROUP.random_element((cases,), num_points=m, generator=gen, dtype=dtype)
    y = GROUP.act(g, x + noise * torch.randn(x.shape, generator=gen, dtype=dtype))
    return x, y, GROUP.discrete.act(g.discrete, x)


def run(args) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    q, q_lie = Quotient(GROUP), Quotient(GROUP.lie)
    rows = [("random", n) for n in args.sizes]
    if args.symmetric:
        rows += [("icosahedral", s) for s in (1, 4, 8)] + [("cubic grid", s) for s in (3, 5)]
    records = []
    legacy_align(*make_cases("random", 8, 1, 0.0, dtype, 0)[:2])  # warm-up (imports, lowering)
    q.align(*make_cases("random", 8, 1, 0.0, dtype, 0)[:2])
    for kind, n in rows:
        x, y, x_true = make_cases(kind, n, args.cases, args.noise, dtype, seed=1000 + n)
        m = x.shape[-2]
        size = y.square().sum((-2, -1)).sqrt()
        d_true = q_lie.dist(x_true, y)
        threshold = torch.maximum(1e-6 * size, d_true * (1 + 1e-9))
        times = {"old": [], "new": []}
        fails = {"old": 0, "new": 0}
        for c in range(args.cases):
            for name, fn in (("old", legacy_align), ("new", q.align)):
                t0 = time.perf_counter()
                out = fn(x[c], y[c])
                times[name].append(time.perf_counter() - t0)
                fails[name] += bool((out - y[c]).square().sum().sqrt() > threshold[c])
        est, low, high = paired_ratio(times["new"], times["old"])
        old_s, new_s = statistics.median(times["old"]), statistics.median(times["new"])
        records.append({
            "kind": kind, "N": m, "cases": args.cases, "noise": args.noise, "dtype": args.dtype,
            "old_median_s": old_s, "new_median_s": new_s, "ratio": new_s / old_s,
            "ratio_paired": est, "ratio_ci95": [low, high],
            "old_fail_rate": fails["old"] / args.cases, "new_fail_rate": fails["new"] / args.cases,
        })
    return records


def format_table(records: list[dict]) -> str:
    head = (f"{'configuration':<14}{'N':>5}{'cases':>7}{'old ms':>9}{'new ms':>9}{'new/old':>9}"
            f"  {'paired [95% CI]':<22}{'old fail':>9}{'new fail':>9}")
    lines = [head, "-" * len(head)]
    for r in records:
        lo, hi = r["ratio_ci95"]
        paired = f"{r['ratio_paired']:.2f} [{lo:.2f}, {hi:.2f}]"
        lines.append(
            f"{r['kind']:<14}{r['N']:>5}{r['cases']:>7}{1e3 * r['old_median_s']:>9.2f}{1e3 * r['new_median_s']:>9.2f}"
            f"{r['ratio']:>9.2f}  {paired:<22}{r['old_fail_rate']:>8.0%}{r['new_fail_rate']:>9.0%}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[7, 10, 13, 20, 50, 100, 200],
                   help="comma-separated N of the random clouds (default 7,10,13,20,50,100,200)")
    p.add_argument("--cases", type=int, default=20, help="cases per row (default 20)")
    p.add_argument("--noise", type=float, default=0.0, help="noise added before the group element (default 0)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--no-symmetric", dest="symmetric", action="store_false", help="skip the symmetric clusters")
    p.add_argument("--quick", action="store_true", help="N = 7,13,50, 5 cases")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 keeps torch's default)")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.cases = [7, 13, 50], 5
    if min(args.sizes) < 7 or args.cases < 2:
        p.error("--sizes must be >= 7 (smaller N are enumerated exactly) and --cases >= 2")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"SE(3) x S_N alignment, {args.dtype}, noise {args.noise}, CPU threads {torch.get_num_threads()}, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    records = run(args)
    print(format_table(records))
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
