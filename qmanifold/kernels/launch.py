"""Launching a compiled fused kernel without Triton's per-call dispatch.

Why: at ~10^6 points a fused kernel moves ~50 MB, which an H200 does in ~15 us; the host path of
one launch through ``kernel[grid](...)`` is of the same order. Per call, Triton's dispatch binds
all 27 arguments, specialises each (dtype, 16-byte alignment of every pointer, integers equal to
1 or divisible by 16), builds a cache key string, looks it up and checks the kernel's globals,
before its C launcher runs. With a fake driver on a CPU (``benchmarks/launch_overhead.py``) that
dispatch costs ~13 us per call of the SE(3) kernel, more than our own argument preparation.

How: the entry kernels are jit-compiled with ``do_not_specialize`` for every runtime argument
(integers and pointers), so Triton's specialisation of a launch depends only on the tensors'
dtypes, whether the integers fit in 32 bits, the constexprs and ``num_warps``, all of which
:class:`DirectLauncher` reads off a :class:`~qmanifold.kernels.LaunchPlan` in a tuple key. The
first launch of a key goes through Triton (which compiles, caches and launches); it returns the
compiled kernel, which is kept; later launches of that key call its C launcher directly
(``compiled.run(grid, stream, function, metadata, ..., *args)``, the same call Triton's dispatch
ends in).

Giving up the specialisation costs nothing here: compiled for sm_90, the SE(3) and T^2 kernels
have no vector loads or stores either way (points are interleaved, ``d`` floats apart), and the
registers per thread are the same (``benchmarks/launch_overhead.py --compare-specialization``).

That the key is complete -- one key never stands for two of Triton's specialisations -- and that
the direct call passes exactly the arguments Triton's dispatch passes is tested on a CPU against
Triton's real binder with a fake driver (``tests/qmanifold/test_kernels_launch.py``).

Direct launches are made with Triton 3.5 and later (:func:`unsupported_reason`); the test above
was run against 3.5, 3.6, 3.7, 3.8 and 3.9. Profilers that hook Triton's launches (a call in ``knobs.runtime.launch_enter_hook`` or
``launch_exit_hook``) keep seeing every launch: with a hook registered, every launch goes through
Triton. ``QMANIFOLD_DIRECT_LAUNCH=0`` turns the
direct path off.
"""

from __future__ import annotations

import os

__all__ = ["INT32_MAX", "LAUNCH_OPTIONS", "DirectLauncher", "direct_launch_available", "direct_launch_enabled", "runtime_names", "unsupported_reason"]

INT32_MAX = 2**31 - 1

#: Compiler options of every launch, stated rather than left to Triton's default: FMA contraction
#: on (Triton's default up to 3.9, which warns that 3.10 turns it off; ``qmanifold.kernels.aot``
#: compiles with the same).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def direct_launch_enabled() -> bool:
    """Whether launches may bypass Triton's dispatch (``QMANIFOLD_DIRECT_LAUNCH``, default on)."""
    return os.environ.get("QMANIFOLD_DIRECT_LAUNCH", "1").lower() not in ("0", "false", "off", "no")


def runtime_names(fn) -> list[str]:
    """The non-constexpr parameters of a plain kernel function, in order (the ones to leave
    unspecialised)."""
    import inspect

    names = []
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation
        if "constexpr" in (annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))):
            continue
        names.append(name)
    return names


def unsupported_reason(triton) -> str | None:
    """Why this Triton gets no direct launches, or None. Direct launches are made only with the
    Triton versions whose dispatch ``tests/qmanifold/test_kernels_launch.py`` can check them against
    (3.5 on: ``knobs.runtime`` for the launch hooks, ``JITFunction._do_compile`` for the fake
    driver); with older ones every launch goes through Triton."""
    from triton.runtime.jit import JITFunction

    if getattr(getattr(triton, "knobs", None), "runtime", None) is None or not hasattr(JITFunction, "_do_compile"):
        return (f"Triton {getattr(triton, '__version__', '?')} predates the dispatch the direct launch is tested "
                "against (3.5): every launch goes through Triton")
    return None


def direct_launch_available(triton) -> bool:
    """Whether launches may skip Triton's dispatch with this Triton: wanted
    (:func:`direct_launch_enabled`) and possible (:func:`unsupported_reason`)."""
    return direct_launch_enabled() and unsupported_reason(triton) is None


def _hooks_clear(runtime) -> bool:
    """Whether no launch hook is registered in Triton's ``knobs.runtime``."""
    if runtime is None:  # Triton < 3.4 keeps the hooks elsewhere: let Triton launch
        return False
    # each hook is None, or (Triton >= 3.5) a HookChain, empty unless a profiler registered a call
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return getattr(enter, "calls", enter) in (None, []) and getattr(leave, "calls", leave) in (None, [])


class DirectLauncher:
    """Compiled specialisations of one jit kernel, and their direct launch.

    Args:
        jit_fn: the ``triton.jit`` entry kernel, created with every runtime argument in
            ``do_not_specialize`` / ``do_not_specialize_on_alignment``.
        triton: the ``triton`` module.
    """

    def __init__(self, jit_fn, triton):
        self.jit_fn = jit_fn
        self.triton = triton
        params = list(getattr(jit_fn, "params", []))
        self.constexpr_names = [p.name for p in params if p.is_constexpr]
        self.runtime_count = len(params) - len(self.constexpr_names)
        # the launcher takes every parameter in order, constexpr slots included (it skips them)
        self.ordered = all(not p.is_constexpr for p in params[: self.runtime_count])
        self.unspecialised = all(p.do_not_specialize and (not hasattr(p, "do_not_specialize_on_alignment")
                                                          or p.do_not_specialize_on_alignment)
                                 for p in params[: self.runtime_count])
        #: whether direct launches are possible with this kernel and Triton, and wanted
        #: (``QMANIFOLD_DIRECT_LAUNCH`` is read once, when the kernel is first launched)
        self.usable = self.ordered and self.unspecialised and direct_launch_available(triton)
        self.compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, its constexpr values in order)
        self.direct_launches = 0
        self._driver = self._runtime = None

    def key(self, plan, device_index: int) -> tuple:
        """What Triton's specialisation of ``plan`` depends on once no runtime argument is specialised:
        the dtypes of the operand pointers (the other pointers share the data's dtype), whether the
        sizes need 64-bit integers, the constexprs, ``num_warps`` and the device."""
        a = plan.args
        c = plan.constexprs
        wide = a[16] > INT32_MAX or a[17] > INT32_MAX
        return (a[0].dtype, a[1].dtype, a[2].dtype, a[3].dtype, a[4].dtype, a[7].dtype, a[15].dtype, wide,
                c["MODE"], c["CENTER"], c["HAS_MASK"], c["PACKED"], c["ONE_TILE"], c["TAME"], c["BLOCK_B"],
                c["BLOCK_N"], c["CHUNKS"], c["LANE_AXIS_FIRST"], plan.num_warps, device_index)

    def launch(self, plan, dtype_tl) -> None:
        """Launch ``plan`` on its tensors' CUDA device (made current for the launch if it is not):
        directly when its specialisation was compiled before, through Triton otherwise (which
        compiles it, and is remembered)."""
        if self._driver is None:
            self._driver = self.triton.runtime.driver.active
            self._runtime = getattr(getattr(self.triton, "knobs", None), "runtime", None)
        device = self._driver.get_current_device()
        target = plan.out.device.index
        if target is not None and target != device:
            import torch

            with torch.cuda.device(target):  # Triton and its launcher use the current device
                return self.launch(plan, dtype_tl)
        key = self.key(plan, device) if self.usable and _hooks_clear(self._runtime) else None
        entry = self.compiled.get(key) if key is not None else None
        if entry is not None:
            compiled, constexpr_values = entry
            compiled.run(plan.grid[0], 1, 1, self._driver.get_current_stream(device), compiled.function,
                         compiled.packed_metadata, None, None, None, *plan.args, *constexpr_values)
            self.direct_launches += 1
            return
        compiled = self.jit_fn[plan.grid](*plan.args, DTYPE=dtype_tl, num_warps=plan.num_warps, **plan.constexprs,
                                          **LAUNCH_OPTIONS)
        if key is not None and compiled is not None and hasattr(compiled, "packed_metadata"):
            values = dict(plan.constexprs, DTYPE=dtype_tl)
            self.compiled[key] = (compiled, tuple(values[name] for name in self.constexpr_names))
