"""What does the quotient machinery cost? Side-by-side timings of the engine on a QM9-like batch.

Run::

    python -m benchmarks.bench_engine                    # CPU, full timings
    python -m benchmarks.bench_engine --quick            # < 1 minute on a laptop CPU
    python -m benchmarks.bench_engine --device cuda --json results.json

For each comparison "a vs b" the same denoiser (``models.egnn.EGNNDenoiser``, optionally
``models.transformer.TransformerDenoiser``) and the same batch are used, and a and b are timed in
alternating blocks (so that background load affects both alike); the median time per call is
reported with ``ratio = a / b`` of the medians, and the paired ratio (geometric mean of the
per-round ratios of blocks that timed a and b back to back) with its 95 % confidence interval
(``qmanifold.bench.paired_ratio``; ``ratio_paired`` and ``ratio_ci95`` in the JSON).

Comparisons (see benchmarks/README.md for how to read them):

* sampler step: one quotient step vs one conventional step, for the ODE (denoiser + P_x) and the
  SDE (denoiser + P_x on drift and noise + mean curvature h + noise) samplers; the "overhead"
  column is ``(quotient - conventional) / conventional``;
* geometry: the projection plus curvature vs one denoiser forward; P_x (and P_x + h) alone vs
  centring alone;
* training: loss forward + backward, quotient vs conventional vs af3_align (Kabsch by SVD); and the
  quotient machinery alone (P_{x_t} of the residual, forward and forward + backward) vs Kabsch
  alignment alone (AF3 aligns onto a detached prediction, so it needs no backward).

``--quick`` uses a smaller EGNN (hidden 64, 3 layers) and 5 repeats; the default runs the denoisers
at their default size (EGNN hidden 128, 6 layers) with 7 repeats. On CPU the default is one thread
(``--threads``): on a shared machine extra intra-op threads mostly add contention noise.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from qmanifold import Quotient, QuotientDiffusion, groups
from qmanifold.bench import (
    build_denoiser,
    format_paired,
    make_batch,
    one_step,
    paired_record,
    time_blocks,
    time_group,
    training_step,
    write_json,
)
from qmanifold.bench import fmt_seconds as _fmt

__all__ = ["make_batch", "time_group", "run", "main"]


# ----------------------------------------------------------------------------------------------
# inputs, timing and the one-step sampler: shared with ``qmanifold bench`` (qmanifold/bench.py)

_one_step = one_step


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    data = make_batch(args.batch, args.atoms, device=device, dtype=dtype)
    x1, mask = data["x1"], data["mask"]
    cond = {"atom_types": data["atom_types"], "bond_types": data["bond_types"]}
    size = f"B={args.batch},N={args.atoms},real={int(mask.sum())}"
    repeats = args.repeats or (5 if args.quick else 7)
    timing = dict(repeats=repeats, warmup=1 if args.quick else 2, block_s=0.02 if args.quick else 0.2)
    net_kwargs = {"hidden": 64, "layers": 3} if args.quick else {}
    q = Quotient(groups.SE3)
    gen = torch.Generator(device=device).manual_seed(0)
    records: list[dict] = []

    def emit(comparison, a, b, times_a, times_b, model_size=""):
        rec = paired_record(comparison, a, b, times_a, times_b, device=str(device), size=size + model_size)
        records.append(rec)
        print(_row(rec), flush=True)

    def compare(comparison, fns: dict, pairs, model_size=""):
        blocks = time_blocks(fns, device, **timing)
        for a, b in pairs:
            emit(comparison, a, b, blocks[a], blocks[b], model_size)

    print(_header(device, dtype, size, repeats))
    for name in args.denoisers:
        torch.manual_seed(0)
        net = build_denoiser(name, device, dtype, **net_kwargs)
        model_size = f",{name}:{sum(p.numel() for p in net.parameters())}params"
        quot = QuotientDiffusion(q, net, "linear", loss="quotient")
        x_t = q.center(0.5 * x1 + 0.8 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
        t = torch.full((x1.shape[0],), 0.5, device=device, dtype=dtype)

        with torch.no_grad():
            # --- one sampler step: quotient vs conventional ---------------------------------------
            for sampler in ("ode", "sde"):
                compare(f"{name}: {sampler} sampler step", {
                    "quotient": _one_step(quot, sampler, "quotient", x_t, mask, cond, 0.5, 0.52, gen),
                    "conventional": _one_step(quot, sampler, "conventional", x_t, mask, cond, 0.5, 0.52, gen),
                }, [("quotient", "conventional")], model_size)

            # --- geometry alone vs the network -------------------------------------------------
            v = net(x_t, t, mask=mask, **cond)
            compare(f"{name}: geometry vs network", {
                "P_x + h(x)": lambda: (q.horizontal_projection(v, x_t, mask), q.mean_curvature(x_t, mask)),
                f"{name} forward": lambda: net(x_t, t, mask=mask, **cond),
            }, [("P_x + h(x)", f"{name} forward")], model_size)

        # --- training: loss forward + backward ------------------------------------------------
        compare(f"{name}: loss fwd+bwd",
                {k: training_step(q, net, k, x1, mask, cond, gen) for k in ("quotient", "conventional", "af3_align")},
                [("quotient", "conventional"), ("af3_align", "conventional"), ("quotient", "af3_align")], model_size)

    # --- the machinery alone ------------------------------------------------------------------------
    v = torch.randn(x1.shape, generator=gen, device=device, dtype=dtype)
    x_t = q.center(0.5 * x1 + 0.8 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
    with torch.no_grad():
        compare("geometry alone", {
            "P_x (SE(3))": lambda: q.horizontal_projection(v, x_t, mask),
            "P_x + h(x)": lambda: (q.horizontal_projection(v, x_t, mask), q.mean_curvature(x_t, mask)),
            "centre": lambda: q.center(v, mask),
        }, [("P_x (SE(3))", "centre"), ("P_x + h(x)", "centre")])

    residual = v.clone().requires_grad_(True)
    pred = q.center(x1 + 0.3 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)

    def projection_fwd_bwd():
        residual.grad = None
        q.horizontal_projection(residual, x_t, mask).square().sum().backward()

    def projection_fwd():
        with torch.no_grad():
            return q.horizontal_projection(residual, x_t, mask)

    compare("loss machinery alone", {
        "P_{x_t}(residual) fwd+bwd": projection_fwd_bwd,
        "P_{x_t}(residual) fwd": projection_fwd,
        "Kabsch align (SVD)": lambda: q.align(x1, pred, mask),
    }, [("P_{x_t}(residual) fwd+bwd", "Kabsch align (SVD)"), ("P_{x_t}(residual) fwd", "Kabsch align (SVD)")])
    return records


# ----------------------------------------------------------------------------------------------
# output


def _header(device, dtype, size, repeats) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        (f"qmanifold engine benchmark  |  torch {torch.__version__}  |  device {device} ({name})  |  "
         f"threads {threads}  |  {dtype}  |  {size}  |  {repeats} alternating blocks, median per call, "
         "paired a/b with its 95% CI"),
        (f"{'comparison':<34} {'a':<28} {'b':<22} {'a median':>11} {'b median':>11} {'a/b':>7} "
         f"{'paired a/b [95% CI]':>23} {'overhead':>9}"),
        "-" * 154,
    ]
    return "\n".join(lines)


def _row(rec: dict) -> str:
    over = f"{100 * (rec['ratio'] - 1):+8.1f}%" if rec["b"] == "conventional" else ""
    return (f"{rec['comparison']:<34} {rec['a']:<28} {rec['b']:<22} {_fmt(rec['a_median_s']):>11} "
            f"{_fmt(rec['b_median_s']):>11} {rec['ratio']:7.3f} {format_paired(rec):>23} {over:>9}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:K)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--quick", action="store_true", help="EGNN only, at hidden 64 / 3 layers, 5 repeats "
                        "(< 1 minute on CPU)")
    parser.add_argument("--denoisers", default=None, help="comma list of egnn,transformer (default: egnn; both "
                        "unless --quick)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--atoms", type=int, default=29, help="padded number of atoms N")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing blocks per comparison "
                        "(default 5 with --quick, else 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine "
                        "more threads mostly add contention noise; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.denoisers is None:
        args.denoisers = ["egnn"] if args.quick else ["egnn", "transformer"]
    else:
        args.denoisers = [d.strip() for d in args.denoisers.split(",") if d.strip()]
    start = time.perf_counter()
    records = run(args)
    print(f"\n(total {time.perf_counter() - start:.1f} s)")
    if args.json:
        write_json(args.json, records)
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
