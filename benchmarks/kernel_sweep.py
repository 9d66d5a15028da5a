"""Launch-configuration sweep of the fused kernels on a GPU: device time per ``num_warps``.

``qmanifold kernels`` predicts registers, spills and occupancy of each specialisation from an
ahead-of-time compile; this measures what they cost on the device. For the hot operations
(``P_x``, ``(P_x, h)``, the lifted update) at 65536 x 29 and 16384 x 256 points, for SE(3) and the
generated 2-torus kernel, it times the default launch
configuration, fixed ``num_warps`` of 4 and 16, and the previous tile layout (``chunks=1``: a
thread holds one point of each of several configurations) by CUDA-graph replay
(:func:`qmanifold.bench.device_time`: no host launch path), and prints the device time, the
fraction of the copy bandwidth it implies, and the registers per thread of that specialisation.

Run (GPU only)::

    python -m benchmarks.kernel_sweep                 # float32, SE(3)
    python -m benchmarks.kernel_sweep --json sweep.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from qmanifold.bench import copy_bandwidth, device_time, write_json

#: (num_warps, chunks) of each launch configuration timed: the default, fixed warps, and the
#: previous tile layout (one point of each of several configurations per thread)
VARIANTS = ((None, None), (4, None), (16, None), (None, 1))


def sweep(device: torch.device, sizes, variants=VARIANTS, group_names=("SE3",)) -> list[dict]:
    from qmanifold import groups
    from qmanifold.kernels import FusedGeometry
    from qmanifold.kernels.aot import compile_op

    records = []
    for group_name in group_names:
        group = groups.Torus(int(group_name[5:])) if group_name.startswith("Torus") else getattr(groups, group_name)
        records += _sweep_group(device, group, group_name, sizes, variants, FusedGeometry, compile_op)
    return records


def _sweep_group(device, group, group_name, sizes, variants, FusedGeometry, compile_op) -> list[dict]:
    copy_bps = copy_bandwidth(device, 256 << 20)
    print(f"{group_name}: copy bandwidth {copy_bps / 1e9:.0f} GB/s on {torch.cuda.get_device_name(device)}")
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    print(f"{'op':<22} {'size':<14} {'warps':>7} {'chunks':>16} {'regs':>5} {'device time':>12} {'% of copy':>10}")
    for batch, points in sizes:
        x = torch.randn(batch, points, group.point_dim, generator=gen, device=device)
        v = torch.randn_like(x)
        z = torch.randn_like(x)
        s = torch.full((batch,), 0.1, device=device)
        floats = batch * points * group.point_dim * 4
        for w, chunks in variants:
            geom = FusedGeometry(group, path="triton", num_warps=w, chunks=chunks)
            ops = {
                "projection": (1, lambda: geom.horizontal_projection(v, x), 3 * floats),
                "projection+curvature": (3, lambda: geom.projection_and_curvature(v, x), 4 * floats),
                "lifted update": (4, lambda: geom.lifted_update(x, v, z, 0.01, s, -0.005, tame_limit=s), 4 * floats),
            }
            for name, (mode, fn, nbytes) in ops.items():
                t = device_time(fn, device)
                try:
                    regs = compile_op(geom, mode, points=points, batch=batch, masked=False, arch=90).registers
                except Exception:  # noqa: BLE001 - the register report is a convenience
                    regs = -1
                plan = geom.plan(mode, x, v if mode != 2 else None, z if mode == 4 else None,
                                 a=s if mode == 4 else None)
                used, used_chunks = plan.num_warps, plan.constexprs["CHUNKS"]
                default = w is None and chunks is None
                rec = {"group": group_name, "op": name, "batch": batch, "points": points, "num_warps": used,
                       "chunks": used_chunks, "default": default, "registers": regs, "device_s": t,
                       "copy_fraction": nbytes / t / copy_bps if t else None}
                records.append(rec)
                label = f"{used}{' (default)' if default else ''}"
                chunk_label = f"{used_chunks}{' (previous)' if chunks == 1 else ''}"
                frac = f"{100 * rec['copy_fraction']:.1f}%" if t else "n/a"
                dev = f"{t * 1e6:.1f} us" if t else "n/a"
                print(f"{name:<22} {f'{batch}x{points}':<14} {label:>7} {chunk_label:>16} {regs:>5} {dev:>12} {frac:>10}",
                      flush=True)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--groups", nargs="+", default=["SE3", "Torus2"], help="built-in groups (SE3, SE2, TorusK)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("error: the kernel sweep needs a CUDA device (the kernels' CPU paths are tested, not timed, here)",
              file=sys.stderr)
        return 2
    # every (size, warps, op) is a Triton compilation on first use (~1-2 s): two sizes keep it short
    records = sweep(device, [(65536, 29), (16384, 256)], group_names=args.groups)
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
