#!/usr/bin/env bash
# Device check for the fused kernels (issue 6): run on the GPU machine from the repository root.
#   bash benchmarks/gpu_check.sh            # writes logs and JSON under $OUT (default ./gpu_out)
# Stages (each with its own time limit, so that one slow stage cannot starve the others; the
# most important first):
#   1. nvidia-smi and versions; 2. smoke: compile + check every kernel mode, twice (the second
#   launch is a direct launch); 3. qmanifold bench --device cuda (wall and device time, copy
#   fraction); 4. the kernel / packed / launch / geometry / network tests (the emulated-kernel tests
#   are skipped here: they run on every CPU); 5. sweep of the launch configuration (tile layout,
#   num_warps; device time by CUDA graph); 6. host path per launch, direct launch against Triton's
#   dispatch; 7. the training step of each loss under torch.profiler (kernels per step, device
#   time, the operators that differ); 8. the engine benchmark.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
DEVICE="${QM_DEVICE:-cuda}"   # QM_DEVICE=cpu: a dry run of this script on a CPU (emulated kernels, quick bench)
BENCH_FLAGS=""; [ "$DEVICE" = cpu ] && BENCH_FLAGS="--quick"

echo "=== 1. device"
nvidia-smi 2>&1 | tee "$OUT/nvidia_smi.txt" | head -15
$PY - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
import qmanifold.kernels as K; print("kernels status:", K.status())
PY

echo "=== 2. smoke"
QM_DEVICE=$DEVICE timeout 40 $PY - <<'PY' 2>&1 | tee "$OUT/smoke.txt"
import os, time, traceback, torch, groups, sympy
from qmanifold import LieGroup
from qmanifold.kernels import FusedGeometry
SO4 = LieGroup("SO(4)", 4, generators=[sympy.Matrix(4, 4, lambda r, c: (1 if (r, c) == (j, i) else -1 if (r, c) == (i, j) else 0)) for i in range(4) for j in range(i + 1, 4)])
dev = os.environ["QM_DEVICE"]; path = "triton" if dev == "cuda" else "emulate"; nb = 300 if dev == "cuda" else 8
for name, group, gen in (("SE3 hand", groups.SE3, False), ("SE3 generated", groups.SE3, True), ("SO4 generated", SO4, False)):
    fg, ref = FusedGeometry(group, path=path, generated=gen), FusedGeometry(group, path="torch", generated=gen)
    d = group.point_dim
    x = torch.randn(nb, 29, d, device=dev); v = torch.randn_like(x); z = torch.randn_like(x)
    mask = torch.rand(nb, 29, device=dev) < 0.8; mask[:, :3] = True
    s = torch.full((nb,), 0.1, device=dev)
    ops = {
        "center": lambda g: g.center(v, mask), "projection": lambda g: g.horizontal_projection(v, x, mask),
        "curvature": lambda g: g.mean_curvature(x, mask), "proj+curv": lambda g: g.projection_and_curvature(v, x, mask)[0],
        "update": lambda g: g.lifted_update(x, v, z, 0.05, s, -0.1, mask, tame_limit=s), "euler": lambda g: g.euler_update(x, v, 0.1, mask),
    }
    for op, f in ops.items():
        t0 = time.time()
        try:
            a, b = f(fg), f(ref)
            err = ((a - b).abs().max() / (1 + b.abs().max())).item()
            again = f(fg)  # the second launch of a specialisation is a direct launch on a GPU
            same = bool(torch.equal(again, a))
            print(f"{name:14s} {op:11s} {'ok  ' if same else 'DIFF'} rel err {err:.2e}  second call identical: {same}"
                  f"  ({time.time() - t0:.1f}s incl. compile)", flush=True)
        except Exception:
            print(f"{name:14s} {op:11s} FAILED", flush=True); traceback.print_exc(limit=3)
    if dev == "cuda":
        print(f"{name}: direct launches {fg.kernels.launcher.direct_launches}", flush=True)
PY

echo "=== 3. qmanifold bench"
timeout 90 $PY -m qmanifold.cli bench --device $DEVICE $BENCH_FLAGS ${BENCH_SECTIONS:-} --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"

echo "=== 4. tests (CUDA paths)"
timeout 70 $PY -m pytest tests/qmanifold/test_kernels.py tests/qmanifold/test_packed.py tests/qmanifold/test_kernels_launch.py \
    -q -p no:cacheprovider -k "not emulate and not torch- and (not launch or gpu)" --maxfail=25 -rs \
    > "$OUT/pytest_kernels.txt" 2>&1; tail -30 "$OUT/pytest_kernels.txt"
timeout 30 $PY -m pytest tests/qmanifold/test_geometry.py tests/models/test_networks.py -q -x -p no:cacheprovider \
    > "$OUT/pytest_geometry_networks.txt" 2>&1; tail -8 "$OUT/pytest_geometry_networks.txt"

echo "=== 5. kernel launch-configuration sweep (tile layout, warps)"
[ "$DEVICE" = cuda ] && timeout 140 $PY -m benchmarks.kernel_sweep --json "$OUT/kernel_sweep.json" 2>&1 | grep -v "warn" | tee "$OUT/kernel_sweep.txt"
echo "=== 6. host path per launch: direct launch vs Triton's dispatch"
timeout 40 $PY -m benchmarks.launch_overhead $([ "$DEVICE" = cpu ] && echo --quick) --json "$OUT/launch_overhead.json" \
    2>&1 | grep -v "warn" | tee "$OUT/launch_overhead.txt"
echo "=== 7. training-step profile"
timeout 60 $PY -m benchmarks.profile_train_step --device $DEVICE $([ "$DEVICE" = cpu ] && echo --quick) \
    --json "$OUT/profile_train_step.json" 2>&1 | grep -v "^USDT" | tee "$OUT/profile_train_step.txt"
echo "=== 8. engine benchmark"
timeout 30 $PY -m benchmarks.bench_engine --device $DEVICE --quick --json "$OUT/engine_gpu.json" 2>&1 | tee "$OUT/engine_gpu.txt"
echo "=== done"
