"""Ahead-of-time compilation of the fused kernels for a GPU architecture, on any machine.

Triton's Linux wheel carries the whole NVIDIA tool chain it needs (LLVM, ``ptxas``,
``cuobjdump``), and :func:`triton.compile` only needs a target, not a device. So the exact
specialisations that :meth:`FusedGeometry._launch` would launch can be compiled to a cubin for,
say, sm_90 (H100 / H200) on a laptop, and the cubin's resource usage read back:

* that every mode / dtype / layout compiles at all (Triton's typing and lowering, which the CPU
  emulator and Triton's interpreter do not exercise);
* registers per thread and bytes of stack (register spills to local memory, fatal for a
  memory-bound kernel), and from them the number of warps that fit on one SM (occupancy);
* the SASS instructions, and among them the warp shuffles (:func:`sass_counts`): for a kernel
  that should be memory-bound, whether its instruction issue fits in the time of its memory
  traffic.

The argument list and specialisation come from :meth:`FusedGeometry.plan` on ``meta`` tensors of
the real shapes, so what is compiled is what would run. No runtime argument is specialised (no
pointer is assumed 16-byte aligned, no integer divisible by 16), as at launch
(:mod:`qmanifold.kernels.launch`).

Command line: ``qmanifold kernels [--arch 90] [--groups SE3 SE2 Torus2 ...]`` prints the table.
This module compiles declarations (:class:`~qmanifold.lie.LieGroup` objects) and never knows group
names: the command-line layer (:mod:`qmanifold.cli`) resolves the names given to ``--groups`` and
hands :func:`register` the resolver.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable

import torch

from ..errors import InputError
from ..lie import LieGroup
from . import FusedGeometry, _triton, triton_available, triton_error
from .launch import LAUNCH_OPTIONS

__all__ = ["CompileReport", "compile_plan", "compile_op", "representative_ops", "occupancy", "format_reports",
           "sass_counts", "MODES"]

MODES = {0: "center", 1: "projection", 2: "curvature", 3: "projection+curvature", 4: "lifted update", 5: "euler update"}

#: Per-SM limits used for the occupancy estimate (sm_80 and sm_90 alike): 64 K 32-bit registers,
#: 64 resident warps, registers allocated per warp in units of 256.
SM_REGISTERS, SM_MAX_WARPS, REGISTER_UNIT = 65536, 64, 256


@dataclasses.dataclass
class CompileReport:
    """Resource usage of one compiled specialisation."""

    kernel: str
    mode: int
    dtype: str
    layout: str
    points: int
    block_b: int
    block_n: int
    num_warps: int
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    seconds: float
    chunks: int = 1
    instructions: int = 0  # SASS instructions of the kernel (straight-line for one tile: ~ per thread)
    shuffles: int = 0  # of which warp shuffles (SHFL: the cross-lane part of per-configuration sums)

    @property
    def spills(self) -> bool:
        """Whether the compiler put values on the stack / in local memory (register spills)."""
        return self.stack_bytes > 0 or self.local_bytes > 0

    @property
    def occupancy(self) -> float:
        return occupancy(self.registers, self.num_warps)


def occupancy(registers: int, num_warps: int) -> float:
    """Fraction of an SM's 64 warps resident at once, as limited by registers (and warps)."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(SM_REGISTERS // max(per_warp * num_warps, 1), SM_MAX_WARPS // num_warps)
    return blocks * num_warps / SM_MAX_WARPS


def _type_of(arg) -> str:
    if isinstance(arg, torch.Tensor):
        return "*" + {torch.float32: "fp32", torch.float64: "fp64", torch.uint8: "u8", torch.int64: "i64",
                      torch.int32: "i32"}[arg.dtype]
    if isinstance(arg, bool):
        return "i1"
    if isinstance(arg, int):
        return "i32" if -(2**31) <= arg < 2**31 else "i64"
    return "fp32"


def _tool(name: str) -> str:
    triton = _triton()[0]
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"Triton's NVIDIA tool chain has no {name} at {path}")
    return path


def _cuobjdump(cubin: bytes, option: str) -> str:
    """``cuobjdump <option>`` of a cubin (Triton's copy of the tool), as text."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([_tool("cuobjdump"), option, path], capture_output=True, text=True, check=True).stdout


def _resource_usage(cubin: bytes) -> dict:
    text = _cuobjdump(cubin, "-res-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"could not read the resource usage from cuobjdump's output:\n{text}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {"registers": reg, "stack_bytes": stack, "shared_bytes": shared, "local_bytes": local}


def sass_counts(cubin: bytes) -> dict:
    """SASS instructions of a cubin, in total and by kind (``cuobjdump -sass``): ``instructions``,
    ``shuffles`` (SHFL), ``barriers`` (BAR), ``global_loads`` (LDG), ``global_stores`` (STG)."""
    opcodes = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            opcodes.append(m.group(1))
    return {"instructions": len(opcodes), "shuffles": opcodes.count("SHFL"), "barriers": opcodes.count("BAR"),
            "global_loads": opcodes.count("LDG"), "global_stores": opcodes.count("STG")}


def compile_plan(geom: FusedGeometry, plan, *, arch: int = 90, specialised: bool = False) -> tuple[object, dict]:
    """Compile ``plan`` (from :meth:`FusedGeometry.plan`) for ``sm_<arch>``; returns the compiled
    kernel and its resource usage (with :func:`sass_counts`).

    ``specialised``: compile with the alignment / divisibility assumptions Triton's dispatch would
    make for torch allocations and sizes (every pointer and every integer divisible by 16 marked
    so), which launches no longer make; for comparison only."""
    if not triton_available():
        raise RuntimeError(f"compiling ahead of time needs Triton ({triton_error()})")
    triton, tl = _triton()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = geom.kernels.jit()
    names = jit.arg_names
    constexprs = dict(plan.constexprs, DTYPE=tl.float32 if plan.dtype == torch.float32 else tl.float64)
    signature = {name: _type_of(arg) for name, arg in zip(names, plan.args)}
    for name in constexprs:
        signature[name] = "constexpr"
    # by default no attributes: a launch specialises no runtime argument (no alignment or
    # divisibility assumptions; see qmanifold.kernels.launch)
    attrs = {}
    if specialised:
        for i, arg in enumerate(plan.args):
            if isinstance(arg, torch.Tensor) or (type(arg) is int and arg and arg % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(jit, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": plan.num_warps, **LAUNCH_OPTIONS}  # as at launch
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    usage = _resource_usage(kernel.asm["cubin"])
    counts = sass_counts(kernel.asm["cubin"])
    usage.update(instructions=counts["instructions"], shuffles=counts["shuffles"])
    return kernel, usage


def compile_op(geom: FusedGeometry, mode: int, *, points: int = 29, batch: int = 65536, dtype=torch.float32,
               masked: bool = True, packed: bool = False, arch: int = 90) -> CompileReport:
    """Compile the specialisation that ``mode`` would launch for ``batch`` configurations of
    ``points`` points (padded with a mask, or packed with offsets), and report its resources."""
    d = geom.point_dim
    meta = dict(device="meta", dtype=dtype)
    scalar = torch.empty(batch, **meta)
    if packed:
        x = torch.empty(batch * points, d, **meta)
        offsets, mask = torch.empty(batch + 1, device="meta", dtype=torch.int64), None
        extra = dict(offsets=offsets, max_size=points)
    else:
        x = torch.empty(batch, points, d, **meta)
        mask = torch.empty(batch, points, device="meta", dtype=torch.bool) if masked else None
        extra = dict(mask=mask)
    # the operands each mode reads: centring only u, the curvature only x, the lifted update also z
    x_arg = None if mode == 0 else x
    u_arg = None if mode == 2 else x
    z_arg = x if mode == 4 else None
    kwargs = {}
    if mode in (4, 5):
        kwargs.update(a=scalar)
    if mode == 4:
        kwargs.update(s=scalar, c=scalar, lim=scalar)
    plan = geom.plan(mode, x_arg, u_arg, z_arg, **extra, **kwargs)
    start = time.perf_counter()
    _, usage = compile_plan(geom, plan, arch=arch)
    layout = "packed" if packed else ("masked" if masked else "dense")
    return CompileReport(kernel=geom.kernels.name, mode=mode, dtype=str(dtype).replace("torch.", ""), layout=layout,
                         points=points, block_b=plan.constexprs["BLOCK_B"], block_n=plan.constexprs["BLOCK_N"],
                         chunks=plan.constexprs["CHUNKS"],
                         num_warps=plan.num_warps, arch=arch, seconds=time.perf_counter() - start, **usage)


def representative_ops(full: bool = False) -> list[dict]:
    """The specialisations worth compiling: the hot modes at QM9 size (29 points), a protein-like
    size (256), the streaming variant (5000) and the packed layout; ``full`` adds every mode."""
    modes = range(6) if full else (1, 3, 4)
    ops = [dict(mode=m, points=29, dtype=dt) for m in modes for dt in (torch.float32, torch.float64)]
    ops += [dict(mode=m, points=256, dtype=torch.float32, batch=4096) for m in (3, 4)]
    ops += [dict(mode=4, points=5000, dtype=torch.float32, batch=64)]
    ops += [dict(mode=3, points=29, dtype=torch.float32, packed=True)]
    return ops


def format_reports(reports: list[CompileReport]) -> str:
    lines = [(f"{'kernel':<22} {'op':<21} {'dtype':<8} {'layout':<7} {'N':>5} {'tile':>9} {'chunks':>6} {'warps':>5} "
              f"{'regs':>5} {'stack B':>8} {'occupancy':>9} {'SASS':>6} {'SHFL':>5} {'compile':>8}")]
    for r in reports:
        lines.append(f"{r.kernel[:22]:<22} {MODES[r.mode]:<21} {r.dtype:<8} {r.layout:<7} {r.points:>5} "
                     f"{f'{r.block_b}x{r.block_n}':>9} {r.chunks:>6} {r.num_warps:>5} {r.registers:>5} "
                     f"{r.stack_bytes + r.local_bytes:>8} {100 * r.occupancy:>8.0f}% {r.instructions:>6} {r.shuffles:>5} "
                     f"{r.seconds:>7.1f}s" + ("  SPILLS" if r.spills else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line: qmanifold kernels


#: ``name -> LieGroup`` for ``--groups``; raises ValueError (InputError) naming an unknown name.
GroupResolver = Callable[[str], LieGroup]


def _declaration(name: str, resolve_group: GroupResolver) -> LieGroup:
    """The LieGroup that the command line's ``name`` stands for, checked to be one the fused kernels
    take (a linear group with rotation-like generators)."""
    group = resolve_group(name)
    if not isinstance(group, LieGroup) or not group.generators:
        raise InputError(f"--groups {name}: {group!r} is not a continuous group with rotation-like generators "
                         "(a LieGroup); the fused kernels exist only for those")
    return group


def _run(args, resolve_group: GroupResolver) -> int:
    import json

    from . import status

    try:  # the arguments first: a wrong name is reported with or without Triton
        geoms = [FusedGeometry(_declaration(name, resolve_group)) for name in args.groups]
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    st = status()
    print(f"triton: {'yes' if st['triton'] else 'no'}  cuda: {'yes' if st['cuda'] else 'no'}  "
          f"interpreter: {'yes' if st['interpreting'] else 'no'}")
    if not st["triton"]:
        print(f"error: compiling the kernels needs Triton ({st['triton_error']}); pip install triton", flush=True)
        return 2
    reports, failures = [], []
    for arch in args.arch:
        print(f"\ncompiling for sm_{arch} (on this machine, no GPU needed):")
        for geom in geoms:
            for op in representative_ops(args.full):
                try:
                    reports.append(compile_op(geom, arch=arch, **op))
                except Exception as exc:  # noqa: BLE001 - report every failure, not only the first
                    failures.append(f"{geom.kernels.name} {MODES[op['mode']]} {op}: {type(exc).__name__}: {exc}")
        print(format_reports([r for r in reports if r.arch == arch]))
    spills = [r for r in reports if r.spills]
    print(f"\n{len(reports)} specialisations compiled, {len(failures)} failed, {len(spills)} with register spills")
    for line in failures:
        print("FAILED:", line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(dataclasses.asdict(r), occupancy=r.occupancy) for r in reports], fh, indent=2)
        print(f"wrote {args.json}")
    return 1 if failures else 0


def register(subparsers, resolve_group: GroupResolver) -> None:
    """Add ``qmanifold kernels`` (ahead-of-time compile report) to the command line.

    ``resolve_group`` maps each name given to ``--groups`` to its LieGroup declaration and raises
    ``ValueError`` (:class:`~qmanifold.errors.InputError`) for an unknown name; the command-line
    layer supplies it (the built-in groups of :mod:`qmanifold.groups`), so that this module, part of
    the core, compiles declarations and knows no group by name."""
    p = subparsers.add_parser(
        "kernels", help="compile the fused kernels for a GPU architecture (no GPU needed) and report registers",
        description="Compile the fused quotient kernels ahead of time for sm_<arch> with Triton's tool chain and "
                    "report registers per thread, stack (spills) and occupancy of each specialisation.")
    p.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90: H100/H200, 80: A100)")
    p.add_argument("--groups", nargs="+", default=["SE3", "SE2", "Torus2"],
                   help="built-in groups to compile for (SE3, SO3, SE2, SO2, TorusK)")
    p.add_argument("--full", action="store_true", help="every mode, not only the hot ones")
    p.add_argument("--json", metavar="PATH", help="write the reports as JSON")
    p.set_defaults(func=functools.partial(_run, resolve_group=resolve_group))
