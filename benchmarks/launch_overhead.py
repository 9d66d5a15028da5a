"""Host time per fused-kernel launch: Triton's dispatch against the direct launch.

A fused kernel at ~10^6 points moves ~50 MB, ~15 us of an H200's copy bandwidth; the host path of
a launch is of the same order, so it decides the wall time of one call. This measures that path,
side by side in one run (:func:`qmanifold.bench.time_group`, interleaved blocks), for ``P_x`` and
for the lifted update with a sampler's 0-dim coefficients:

* ``direct``: :class:`qmanifold.kernels.launch.DirectLauncher` calls the compiled kernel's
  launcher (the default);
* ``triton``: every launch through ``kernel[grid](...)`` (Triton's binding, specialisation and
  cache lookup per call), as before;
* ``plan``: our own argument preparation alone (:meth:`FusedGeometry.plan`).

On a GPU the calls run for real, back to back: at 64 x 29 points the device work is a few us, so
the wall time per call is the host path; at 1-4 M points it shows whether the host path still
bounds the call. Without a GPU (or with ``--fake``) the host path runs against the fake CUDA driver
of :mod:`qmanifold.kernels.dryrun`: Triton's real dispatch, with the final C launch recorded
instead of run (so the launcher's own few us are missing).

``--compare-specialization`` compiles the hot kernels for sm_90 with and without Triton's
alignment / divisibility specialisation (which the direct launch gives up) and prints registers
and vector memory instructions of each.

Run::

    python -m benchmarks.launch_overhead                       # CUDA if present, else the fake driver
    python -m benchmarks.launch_overhead --compare-specialization
    python -m benchmarks.launch_overhead --json launch.json
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys

import torch

from qmanifold.bench import fmt_seconds, time_group, write_json


def _ops(geom, batch: int, points: int, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, points, geom.point_dim, generator=gen, device=device)
    v, z = torch.randn_like(x), torch.randn_like(x)
    dt, s, c = (torch.tensor(value, device=device) for value in (0.01, 0.1, -0.002))
    if device.type == "cuda":
        return {
            "projection": (lambda: geom.horizontal_projection(v, x), lambda: geom.plan(1, x, v)),
            "lifted update": (lambda: geom.lifted_update(x, v, z, dt, s, c, tame_limit=s),
                              lambda: geom.plan(4, x, v, z, a=dt, s=s, c=c, lim=s)),
        }
    return {  # CPU tensors under the fake driver: call the launch path directly
        "projection": (lambda: geom._launch(1, x, v, path="triton"), lambda: geom.plan(1, x, v)),
        "lifted update": (lambda: geom._launch(4, x, v, z, a=dt, s=s, c=c, lim=s, path="triton"),
                          lambda: geom.plan(4, x, v, z, a=dt, s=s, c=c, lim=s)),
    }


def measure(device: torch.device, sizes, repeats: int) -> list[dict]:
    from qmanifold import groups
    from qmanifold.kernels import FusedGeometry

    fake = device.type != "cuda"
    label = torch.cuda.get_device_name(device) if not fake else "cpu (fake CUDA driver: C launch not run)"
    records = []
    with (_fake_driver() if fake else contextlib.nullcontext()):
        geom = FusedGeometry(groups.SE3)
        launcher = geom.kernels.launcher
        if not launcher.usable:
            print("note: the direct launch is off here (QMANIFOLD_DIRECT_LAUNCH=0, or this Triton cannot)")
        print(f"host path per launch on {label}")
        print(f"{'op':<15} {'size':<12} {'direct':>11} {'triton':>11} {'plan only':>11} {'direct/triton':>14}")
        for batch, points in sizes:
            for name, (call, plan) in _ops(geom, batch, points, device).items():
                def direct(call=call):
                    launcher.usable = True
                    call()

                def dispatch(call=call):
                    launcher.usable = False
                    call()

                times = time_group({"direct": direct, "triton": dispatch, "plan": plan}, device, repeats=repeats)
                launcher.usable = True
                ratio = times["direct"] / times["triton"]
                print(f"{name:<15} {f'{batch}x{points}':<12} {fmt_seconds(times['direct']):>11} "
                      f"{fmt_seconds(times['triton']):>11} {fmt_seconds(times['plan']):>11} {ratio:>14.3f}", flush=True)
                records.append({"comparison": f"launch_{name.replace(' ', '_')}", "a": "direct launch",
                                "b": "triton dispatch", "a_median_s": times["direct"], "b_median_s": times["triton"],
                                "plan_median_s": times["plan"], "ratio": ratio, "device": label,
                                "size": f"{batch}x{points}", "direct_launches": launcher.direct_launches})
    return records


@contextlib.contextmanager
def _fake_driver():
    from qmanifold.kernels.dryrun import fake_cuda_driver

    with fake_cuda_driver(record_arguments=False) as recorder:
        yield recorder


def compare_specialization(arch: int = 90) -> list[dict]:
    """Compile the hot SE(3) and T^2 kernels for sm_``arch`` with and without Triton's alignment /
    divisibility specialisation; registers, spills and vector loads / stores of each."""
    from qmanifold import groups
    from qmanifold.kernels import FusedGeometry
    from qmanifold.kernels.aot import compile_plan

    rows = []
    print(f"{'kernel':<8} {'op':<22} {'size':<10} {'specialised':>11}  {'regs':>5} {'stack':>5} "
          f"{'ld.global':>9} {'vector ld':>9} {'vector st':>9}")
    for name, group in (("SE3", groups.SE3), ("T2", groups.Torus(2))):
        geom = FusedGeometry(group)
        for batch, points in ((65536, 29), (4096, 256)):
            x = torch.empty(batch, points, group.point_dim, device="meta")
            scalar = torch.empty(batch, device="meta")
            for mode, op in ((1, "projection"), (3, "projection+curvature"), (4, "lifted update")):
                extra = dict(a=scalar, s=scalar, c=scalar, lim=scalar) if mode == 4 else {}
                plan = geom.plan(mode, x, x, x if mode == 4 else None, **extra)
                for specialised in (True, False):
                    kernel, usage = compile_plan(geom, plan, arch=arch, specialised=specialised)
                    ptx = kernel.asm["ptx"]
                    row = dict(kernel=name, op=op, size=f"{batch}x{points}", specialised=specialised,
                               registers=usage["registers"], stack_bytes=usage["stack_bytes"],
                               global_loads=len(re.findall(r"\bld\.global", ptx)),
                               vector_loads=len(re.findall(r"\bld\.global[.\w]*\.v[248]\b", ptx)),
                               vector_stores=len(re.findall(r"\bst\.global[.\w]*\.v[248]\b", ptx)))
                    rows.append(row)
                    print(f"{name:<8} {op:<22} {row['size']:<10} {specialised!s:>11}  {row['registers']:>5} "
                          f"{row['stack_bytes']:>5} {row['global_loads']:>9} {row['vector_loads']:>9} "
                          f"{row['vector_stores']:>9}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fake", action="store_true", help="use the fake CUDA driver even if a GPU is present")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="one small size, 3 repeats")
    p.add_argument("--compare-specialization", action="store_true",
                   help="compile for sm_90 with and without Triton's specialisation (no GPU needed)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    from qmanifold.kernels import triton_available, triton_error

    if not triton_available():
        print(f"error: needs Triton ({triton_error()})")
        return 2
    if args.compare_specialization:
        records = compare_specialization()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.fake else "cpu")
        if args.quick:
            sizes, repeats = [(64, 29)], 3
        elif device.type == "cuda":
            sizes, repeats = [(64, 29), (65536, 29), (4096, 256), (16384, 256)], args.repeats
        else:
            sizes, repeats = [(64, 29), (1024, 29)], args.repeats
        records = measure(device, sizes, repeats)
    if args.json:
        write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
