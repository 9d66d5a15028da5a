"""The direct launch of the fused kernels (qmanifold.kernels.launch), against Triton's own dispatch.

A direct launch skips Triton's per-call binding and specialisation and calls the compiled
kernel's launcher with a kernel it remembered under its own key. That is right only if

1. its key is complete: two launches with the same key always have the same Triton
   specialisation (else a kernel compiled for other dtypes or constexprs would run), and
2. it passes the launcher exactly the arguments Triton's dispatch passes.

Both are checked here on a CPU against Triton's real dispatch, with the fake CUDA driver of
:mod:`qmanifold.kernels.dryrun` (the launcher records instead of running), over every mode, both
dtypes, dense / masked / packed layouts, misaligned views, single configurations and every form of
per-configuration coefficient. What the GPU does with those arguments is checked by the ``triton``
cases of ``test_kernels.py`` on a machine with one.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

import qmanifold.kernels as K
from qmanifold import groups
from qmanifold.kernels import FusedGeometry

pytestmark = [
    pytest.mark.skipif(not K.triton_available(), reason=f"Triton is not installed here ({K.triton_error()}); "
                       "it is in the 'test' extra on Linux x86-64"),
    pytest.mark.skipif(K.interpreting(), reason="TRITON_INTERPRET=1: Triton's interpreter has no compiled-kernel dispatch "
                       "to compare with"),
]
if K.triton_available() and not K.interpreting():
    from qmanifold.kernels.launch import unsupported_reason

    _UNSUPPORTED = unsupported_reason(K._triton()[0])
    pytestmark.append(pytest.mark.skipif(_UNSUPPORTED is not None, reason=str(_UNSUPPORTED)))
if K.triton_available() and not K.interpreting():
    from qmanifold.kernels.dryrun import fake_cuda_driver
    from qmanifold.kernels.launch import LAUNCH_OPTIONS


def _misaligned(shape, dtype):
    """A tensor whose data pointer is not 16-byte aligned (a view one element into its storage)."""
    flat = torch.randn(1 + int(torch.tensor(shape).prod()), dtype=dtype)[1:]
    return flat.view(shape)


def _calls(geom: FusedGeometry):
    """(description, plan arguments) over modes, dtypes, layouts, sizes, alignment, coefficients."""
    d = geom.point_dim
    for dtype, count, n, layout, aligned, coeff in itertools.product(
            (torch.float32, torch.float64), (1, 16, 17), (5, 16), ("dense", "masked", "packed", "packed-max"),
            (True, False), ("float", "0-dim", "per-config")):
        make = ((lambda shape, dtype=dtype: torch.randn(shape, dtype=dtype)) if aligned
                else (lambda shape, dtype=dtype: _misaligned(shape, dtype)))
        if layout.startswith("packed"):
            x, u, z = make((count * n, d)), make((count * n, d)), make((count * n, d))
            extra = dict(offsets=torch.arange(count + 1) * n, max_size=n if layout == "packed-max" else None)
        else:
            x, u, z = make((count, n, d)), make((count, n, d)), make((count, n, d))
            extra = dict(mask=torch.rand(count, n) < 0.8 if layout == "masked" else None)
        if coeff == "float":
            scalars = dict(a=0.01, s=0.1, c=-0.002, lim=0.1)
        elif coeff == "0-dim":
            scalars = {k: torch.tensor(v, dtype=dtype) for k, v in dict(a=0.01, s=0.1, c=-0.002, lim=0.1).items()}
        else:
            scalars = {k: torch.rand(count, dtype=dtype) for k in ("a", "s", "c", "lim")}
        for mode in range(6):
            operands = {0: (None, u, None), 1: (x, u, None), 2: (x, None, None), 3: (x, u, None), 4: (x, u, z),
                        5: (x, u, None)}[mode]
            kwargs = {4: scalars, 5: dict(a=scalars["a"])}.get(mode, {})
            if mode == 4 and coeff == "float":
                kwargs = dict(kwargs, lim=None)  # untamed update: TAME=False
            yield (f"mode {mode} {dtype} B={count} N={n} {layout} aligned={aligned} {coeff}",
                   (mode, *operands), dict(extra, **kwargs))


def _same_arguments(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all((x is y) if isinstance(x, torch.Tensor) else (x == y and type(x) is type(y))
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("group", ["SE3", "T2"])
def test_direct_launch_matches_tritons_dispatch(group):
    geom = FusedGeometry(groups.SE3 if group == "SE3" else groups.Torus(2))
    tl = K._triton()[1]
    with fake_cuda_driver() as recorder:
        kernels = geom.kernels
        launcher = kernels.launcher
        assert launcher.usable, "the direct launch is off for the fused kernel"
        checked = 0
        for description, args, kwargs in _calls(geom):
            plan = geom.plan(*args, **kwargs)
            dtype_tl = tl.float32 if plan.dtype == torch.float32 else tl.float64
            # Triton's own dispatch: binding, specialisation, cache key
            kernels.jit()[plan.grid](*plan.args, DTYPE=dtype_tl, num_warps=plan.num_warps, **plan.constexprs,
                                     **LAUNCH_OPTIONS)
            by_triton = recorder.launches[-1]
            # ours: the first launch of a key goes through Triton, later ones are direct
            launcher.launch(plan, dtype_tl)
            before = launcher.direct_launches
            launcher.launch(plan, dtype_tl)
            assert launcher.direct_launches == before + 1, description
            direct = recorder.launches[-1]
            assert direct[0] is by_triton[0], f"{description}: the direct launch ran another specialisation"
            assert direct[1:3] == by_triton[1:3], f"{description}: grid or stream differ"
            assert _same_arguments(direct[3], by_triton[3]), f"{description}: the arguments differ"
            assert direct[4] is None, description  # no profiler hook registered: none passed
            checked += 1
    # every specialisation Triton made is one the direct launcher keeps, and no more: the key is
    # no finer than Triton's (beyond the device) -- one compilation per specialisation on a GPU
    assert len(launcher.compiled) == len({k.key for k in recorder.kernels}), (len(launcher.compiled), len(recorder.kernels))
    assert checked == 2 * 3 * 2 * 4 * 2 * 3 * 6


def test_no_runtime_argument_is_specialised():
    """Alignment and integer values must not change the compiled kernel (else the key would have to
    contain them): Triton sees the same specialisation for aligned and misaligned pointers, for
    1, 16 and 17 configurations and for 1000 and 1024 points (all with the same constexprs: one
    configuration of <= 1024 points per program)."""
    geom = FusedGeometry(groups.SE3)
    with fake_cuda_driver() as recorder:
        for count, n in itertools.product((1, 16, 17), (1000, 1024)):
            for make in (torch.randn, lambda *shape: _misaligned(shape, torch.float32)):
                x, v = make(count, n, 3), make(count, n, 3)
                geom._launch(1, x, v, path="triton")
        assert len(recorder.kernels) == 1, [k.key for k in recorder.kernels]
        kernel = recorder.kernels[0]
        runtime = [name for name, ty in kernel.signature.items() if ty != "constexpr"]
        assert len(runtime) == 18
        assert all(not attrs for attrs in kernel.attrs.values()), kernel.attrs
        assert kernel.signature["B"] == kernel.signature["N"] == "i32"


def test_a_registered_launch_hook_sends_every_launch_through_triton():
    """Profilers (e.g. Triton's proton) hook launches; they must see the fused kernels' too."""
    import triton

    hooks = triton.knobs.runtime.launch_enter_hook
    if not hasattr(hooks, "add"):
        pytest.skip(f"Triton {triton.__version__} keeps launch hooks as a plain attribute (before 3.5): "
                    "the direct launch is then off whenever a hook is set, which this test cannot register")
    geom = FusedGeometry(groups.SE3)
    x, v = torch.randn(4, 7, 3), torch.randn(4, 7, 3)
    seen = []

    def hook(metadata):
        seen.append(metadata)

    with fake_cuda_driver() as recorder:
        geom._launch(1, x, v, path="triton")
        geom._launch(1, x, v, path="triton")
        assert geom.kernels.launcher.direct_launches == 1
        hooks.add(hook)
        try:
            geom._launch(1, x, v, path="triton")
        finally:
            hooks.remove(hook)
        assert geom.kernels.launcher.direct_launches == 1
        assert recorder.launches[-1][4] is hooks  # Triton's dispatch passed the hook to the launcher
        geom._launch(1, x, v, path="triton")
        assert geom.kernels.launcher.direct_launches == 2


def test_direct_launch_can_be_switched_off():
    code = ("import torch; from qmanifold import groups; from qmanifold.kernels import FusedGeometry; "
            "from qmanifold.kernels.dryrun import fake_cuda_driver\n"
            "g = FusedGeometry(groups.SE3)\n"
            "with fake_cuda_driver() as rec:\n"
            "    x = torch.randn(4, 7, 3)\n"
            "    for _ in range(3): g._launch(1, x, x, path='triton')\n"
            "    print(g.kernels.launcher.usable, g.kernels.launcher.direct_launches, rec.launch_count)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for value, expected in (("0", "False 0 3"), ("1", "True 2 3")):
        env = dict(os.environ, QMANIFOLD_DIRECT_LAUNCH=value, TRITON_DEFAULT_FP_FUSION="1")
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == expected, proc.stdout


def test_fake_driver_restores_the_kernels_caches():
    """On a machine with a GPU the fused kernels hold real compiled specialisations: the fake driver
    must neither launch those with host pointers nor lose them."""
    geom = FusedGeometry(groups.SE3)
    jit = geom.kernels.jit()
    launcher, caches = geom.kernels.launcher, jit.device_caches
    with fake_cuda_driver() as recorder:
        assert geom.kernels.launcher is not launcher and jit.device_caches is not caches
        geom._launch(1, torch.randn(2, 5, 3), torch.randn(2, 5, 3), path="triton")
        assert recorder.launch_count == 1
    assert geom.kernels.launcher is launcher and jit.device_caches is caches


GPU_REASON = "the direct launch on a GPU is not tested here: no CUDA device"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=GPU_REASON)
@pytest.mark.parametrize("group", ["SE3", "T2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_direct_launch_equals_tritons_dispatch_and_the_oracle(group, dtype):
    """On the device: every op launched through Triton's dispatch, then directly (the second launch
    of a specialisation), gives bit-identical results, and both match the torch oracle."""
    g = groups.SE3 if group == "SE3" else groups.Torus(2)
    geom, ref = FusedGeometry(g, path="triton"), FusedGeometry(g, path="torch")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 29, g.point_dim, generator=gen, device="cuda", dtype=dtype)
    v, z = torch.randn_like(x), torch.randn_like(x)
    mask = torch.rand(37, 29, generator=gen, device="cuda") < 0.8
    mask[:, :4] = True
    s = torch.full((37,), 0.1, device="cuda", dtype=dtype)
    dt = torch.tensor(0.01, device="cuda", dtype=dtype)
    ops = {
        "center": lambda f: f.center(v, mask),
        "projection": lambda f: f.horizontal_projection(v, x, mask),
        "curvature": lambda f: f.mean_curvature(x, mask),
        "projection+curvature": lambda f: torch.cat(f.projection_and_curvature(v, x, mask), -1),
        "lifted update": lambda f: f.lifted_update(x, v, z, dt, s, -0.002, mask, tame_limit=s),
        "euler update": lambda f: f.euler_update(x, v, dt, mask),
    }
    launcher = geom.kernels.launcher
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    try:
        for name, op in ops.items():
            launcher.usable = False
            by_triton = op(geom)
            launcher.usable = True
            op(geom)  # the first launch of this specialisation with the direct path on: remembered
            before = launcher.direct_launches
            direct = op(geom)
            torch.cuda.synchronize()
            assert launcher.direct_launches == before + 1, name
            assert torch.equal(direct, by_triton), name
            expected = op(ref)
            assert (direct - expected).abs().max().item() <= tol * (1 + expected.abs().max().item()), name
    finally:
        launcher.usable = True


def test_launch_overhead_benchmark_records_both_paths(tmp_path):
    """``benchmarks/launch_overhead.py`` (stage 7 of gpu_check.sh) on the fake driver: a record per
    op with both medians, their ratio, and direct launches actually taken."""
    import json

    from benchmarks import launch_overhead

    path = tmp_path / "launch.json"
    assert launch_overhead.main(["--quick", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    assert [r["comparison"] for r in records] == ["launch_projection", "launch_lifted_update"]
    for r in records:
        assert r["a"] == "direct launch" and r["b"] == "triton dispatch" and r["size"] == "64x29"
        assert 0 < r["plan_median_s"] and 0 < r["a_median_s"] and 0 < r["b_median_s"]
        assert r["ratio"] == pytest.approx(r["a_median_s"] / r["b_median_s"])
        assert r["direct_launches"] > 0


def test_jit_without_alignment_option(monkeypatch):
    """Triton 3.0 / 3.1 have no ``do_not_specialize_on_alignment``: the kernels must still jit (then
    with alignment specialisation, and no direct launch: those versions predate 3.5)."""
    import triton

    real_jit = triton.jit
    seen = []

    def old_jit(fn=None, *, do_not_specialize=None, debug=None, noinline=None):
        seen.append(do_not_specialize)
        return real_jit(fn, do_not_specialize=do_not_specialize)

    monkeypatch.setattr(triton, "jit", old_jit)
    from qmanifold.kernels import se3_triton

    kernels = K._KernelSet("se3-test", se3_triton.KERNEL_FUNCTIONS, dict(vars(se3_triton)), "_se3_kernel")
    entry = kernels.jit()
    assert seen and seen[-1] is not None and "B" in seen[-1]  # the entry's runtime arguments
    assert [p.name for p in entry.params if p.do_not_specialize][:2] == ["x_ptr", "u_ptr"]
