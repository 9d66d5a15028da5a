"""Where a training step's time goes: quotient vs conventional vs AF3-aligned loss, profiled.

``qmanifold bench`` times whole training steps; when two of them differ more than the quotient
machinery can explain (one H200 run measured the quotient step at +19 % over the conventional
one while ``P_x`` forward + backward alone costs < 3 % of it), this script says where: it runs
``steps`` training steps (forward + backward of ``QuotientDiffusion.loss`` with the molecular
EGNN on a fixed QM9-like batch) per loss under :mod:`torch.profiler` and prints, per loss,

* the wall time per step (median of timed blocks, the losses interleaved as in ``qmanifold bench``),
* the number of kernels launched per step (CUDA) and the device time per step,
* the operators that differ most between the losses (self device time on CUDA, self CPU time on a
  CPU), so that an extra synchronisation, a fallback to the torch path or an unexpected copy shows
  up by name.

Run::

    python -m benchmarks.profile_train_step --device cuda
    python -m benchmarks.profile_train_step --quick            # CPU, small EGNN, ~30 s
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch

from qmanifold.bench import (
    build_denoiser,
    make_batch,
    time_group,
    training_step,
    write_json,
)

LOSSES = ("quotient", "conventional", "af3_align")


def _self_time(event, cuda: bool) -> float:
    """Self time of a profiler aggregate in microseconds (device time on CUDA, CPU time otherwise)."""
    if cuda:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0
    return float(event.self_cpu_time_total)


def profile_losses(device: torch.device, *, quick: bool, steps: int, batch: int, top: int = 12) -> dict:
    from qmanifold import Quotient, groups

    dtype = torch.float32
    data = make_batch(batch, 29, device=device, dtype=dtype)
    x1, mask = data["x1"], data["mask"]
    cond = {"atom_types": data["atom_types"], "bond_types": data["bond_types"]}
    torch.manual_seed(0)
    net = build_denoiser("egnn", device, dtype, **({"hidden": 64, "layers": 3} if quick else {}))
    quotient = Quotient(groups.SE3)
    gen = torch.Generator(device=device).manual_seed(0)

    fns = {kind: training_step(quotient, net, kind, x1, mask, cond, gen) for kind in LOSSES}
    wall = time_group(fns, device, repeats=5, warmup=2, block_s=0.05 if quick else 0.2)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    per_op: dict[str, dict[str, float]] = defaultdict(dict)
    summary = {}
    for kind, fn in fns.items():
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            if cuda:
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        kernels = [e for e in events if cuda and _self_time(e, True) > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
        summary[kind] = {
            "wall_s": wall[kind],
            "kernels_per_step": sum(e.count for e in kernels) / steps if cuda else None,
            "device_s_per_step": sum(_self_time(e, True) for e in kernels) / steps / 1e6 if cuda else None,
        }
        for e in events:
            t = _self_time(e, cuda)
            if t > 0:
                per_op[e.key][kind] = t / steps
    print(f"training step (forward + backward), {device}, EGNN {'64x3' if quick else 'default'}, B={batch}, {steps} profiled steps")
    print(f"{'loss':<14} {'wall / step':>12} {'kernels / step':>15} {'device / step':>14}")
    for kind, row in summary.items():
        kern = f"{row['kernels_per_step']:.0f}" if row["kernels_per_step"] is not None else "-"
        dev = f"{row['device_s_per_step'] * 1e3:.3f} ms" if row["device_s_per_step"] is not None else "-"
        print(f"{kind:<14} {row['wall_s'] * 1e3:>9.3f} ms {kern:>15} {dev:>14}")
    what = "self device time" if cuda else "self CPU time"
    print(f"\noperators whose {what} per step differs most from the conventional loss (us):")
    diffs = sorted(per_op.items(), key=lambda kv: -max(abs(kv[1].get(k, 0.0) - kv[1].get("conventional", 0.0)) for k in LOSSES))
    print(f"{'operator':<60} " + " ".join(f"{k:>13}" for k in LOSSES))
    for name, times in diffs[:top]:
        print(f"{name[:60]:<60} " + " ".join(f"{times.get(k, 0.0):>13.1f}" for k in LOSSES))
    from qmanifold.kernels import status

    broken = status()["broken_kernels"]
    if broken:  # then the quotient loss's projection ran the torch path: ~100 small ops instead of 2 launches
        print(f"\nWARNING: fused kernels fell back to the torch path: {broken}")
    return {"summary": summary, "top_differences": [{"op": n, **t} for n, t in diffs[:top]],
            "fused_fallback": broken}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small EGNN (hidden 64, 3 layers)")
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per loss")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    result = profile_losses(device, quick=args.quick, steps=args.steps, batch=args.batch)
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
