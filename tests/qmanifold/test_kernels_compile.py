"""The fused kernels compile for the GPUs they target, without a GPU (qmanifold.kernels.aot).

Triton's wheel carries LLVM, ptxas and cuobjdump, so each specialisation that
``FusedGeometry._launch`` would launch is compiled here to an sm_90 (H100 / H200) or sm_80 (A100)
cubin, and its resource usage is read back. This checks what neither the CPU emulator nor Triton's
interpreter can: that the kernels type-check and lower through Triton's compiler, and that the
launch configuration (``num_warps`` per tile, chosen by a register budget) does not make the
compiler spill registers to local memory, which would add memory traffic to a memory-bound kernel.
"""

from __future__ import annotations

import pytest
import sympy
import torch

import qmanifold.kernels as K
from qmanifold import LieGroup, groups
from qmanifold.cli import main as cli_main
from qmanifold.kernels import FusedGeometry

pytestmark = pytest.mark.skipif(not K.triton_available(), reason=f"Triton is not installed here ({K.triton_error()}); "
                                "it is in the 'test' extra on Linux x86-64")

#: Bytes of stack a specialisation may use: a few registers' worth. Triton 3.6 and 3.7 keep 8 B
#: on the stack in some specialisations, with this tile layout and the one before it alike; the
#: configuration before the register budget spilled kilobytes (SO(4): 650-1700 B per thread).
STACK_ALLOWANCE_F32 = 16
STACK_ALLOWANCE_F64 = 64

SO4 = LieGroup("SO(4)", 4, generators=[
    sympy.Matrix(4, 4, lambda r, c: (1 if (r, c) == (j, i) else -1 if (r, c) == (i, j) else 0))
    for i in range(4) for j in range(i + 1, 4)
])


def aot():
    from qmanifold.kernels import aot as module

    return module


@pytest.mark.parametrize("op", aot().representative_ops() if K.triton_available() else [],
                         ids=lambda op: f"{aot().MODES[op['mode']]}-N{op['points']}-{str(op['dtype'])[6:]}"
                         + ("-packed" if op.get("packed") else ""))
def test_se3_kernel_compiles_for_sm90_without_spills(op):
    report = aot().compile_op(FusedGeometry(groups.SE3), arch=90, **op)
    assert report.kernel == "se3"
    assert report.stack_bytes + report.local_bytes <= STACK_ALLOWANCE_F32, report
    # the register budget of _config: every SE(3) specialisation keeps at least 8 of 64 warps resident
    assert report.registers <= 168 and report.occupancy >= 0.125, report


@pytest.mark.parametrize("name, group, generated", [
    ("SE3-generated", groups.SE3, True), ("SO4", SO4, False), ("T2", groups.Torus(2), False), ("SE2", groups.SE2, False),
])
@pytest.mark.parametrize("mode", [3, 4])
def test_generated_kernels_compile_for_sm90(name, group, generated, mode):
    geom = FusedGeometry(group, generated=generated)
    for dtype in (torch.float32, torch.float64):
        report = aot().compile_op(geom, mode, points=29, dtype=dtype, arch=90)
        assert report.kernel.startswith("generic:")
        # at most a few registers on the stack (float64 on the 4-dimensional SO(4), 6 generators:
        # Triton 3.6 keeps 64 B), never the kilobytes that 4 warps per tile used to spill
        limit = STACK_ALLOWANCE_F32 if dtype == torch.float32 else STACK_ALLOWANCE_F64
        assert report.stack_bytes + report.local_bytes <= limit, report


def test_compiles_for_a100_and_plan_matches_launch():
    geom = FusedGeometry(groups.SE3)
    report = aot().compile_op(geom, 4, points=29, batch=1000, arch=80)
    assert report.arch == 80 and report.stack_bytes + report.local_bytes <= STACK_ALLOWANCE_F32
    # the plan compiled is the launch's plan: same tile and warps as _config chooses
    block_b, block_n, warps = K._config(29, 1000, torch.float32, True, geom._register_weight)
    assert (report.block_b, report.block_n, report.num_warps) == (block_b, block_n, warps)
    assert report.chunks == K._chunks(block_b, block_n, warps)
    fixed = FusedGeometry(groups.SE3, num_warps=4)
    assert aot().compile_op(fixed, 1, points=29, arch=90).num_warps == 4
    with pytest.raises(ValueError, match="num_warps"):
        FusedGeometry(groups.SE3, num_warps=3)


@pytest.mark.parametrize("name, group, points, batch", [
    ("SE3", groups.SE3, 29, 65536), ("SE3", groups.SE3, 256, 4096), ("T2", groups.Torus(2), 29, 65536),
])
def test_per_configuration_layout_needs_fewer_instructions_than_the_previous_one(name, group, points, batch):
    """The tile layout that gives each thread points of one configuration (``CHUNKS`` > 1, the
    default) against the previous one (``CHUNKS = 1``: a thread holds one point of each of several
    configurations). Counted in the compiled sm_90 code, for ``(P_x, h)``: the cross-lane shuffles
    of the per-configuration sums drop by at least 2x and all instructions by at least 30 %, with
    no more registers (measured with Triton 3.9: SE(3) at 29 points 1480 -> 616 instructions and
    320 -> 48 shuffles; T^2, 2 points per thread, 424 -> 272 and 80 -> 32). ``chunks=1`` puts the
    lanes along all the points in either Triton, see ``qmanifold.kernels._lane_axis_first``."""
    default = aot().compile_op(FusedGeometry(group), 3, points=points, batch=batch, arch=90)
    previous = aot().compile_op(FusedGeometry(group, chunks=1), 3, points=points, batch=batch, arch=90)
    assert default.chunks > 1 and previous.chunks == 1
    assert (default.block_b, default.block_n, default.num_warps) == (previous.block_b, previous.block_n, previous.num_warps)
    assert 2 * default.shuffles <= previous.shuffles, (default, previous)
    assert 10 * default.instructions <= 7 * previous.instructions, (default, previous)
    assert default.registers <= previous.registers, (default, previous)
    assert default.stack_bytes + default.local_bytes <= STACK_ALLOWANCE_F32, default


def test_occupancy_arithmetic():
    occ = aot().occupancy
    assert occ(32, 4) == 1.0          # 16 blocks of 4 warps
    assert occ(255, 4) == 0.125       # 255 -> 256 regs: 8192 per warp, 2 blocks of 4 warps
    assert occ(136, 8) == 0.125       # 136 -> 4352 per warp, 34816 per block: 1 block
    assert occ(78, 8) == 0.375        # 80 regs: 2560 per warp, 3 blocks of 8 warps


def test_kernels_command(capsys, tmp_path):
    path = tmp_path / "kernels.json"
    assert cli_main(["kernels", "--groups", "SE3", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compiling for sm_90" in out and "0 failed" in out and "se3" in out
    assert path.exists() and '"registers"' in path.read_text()
    assert cli_main(["kernels", "--groups", "Nope"]) == 2
