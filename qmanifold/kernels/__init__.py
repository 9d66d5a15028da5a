"""Fused quotient kernels: one pass over the data for the hot operations of a quotient M/G.

The operations that a quotient model runs at every sampler step and every training step are all
of the form "reduce a few moments per configuration, solve a tiny system, apply a per-configuration
linear map to every point". Done with separate torch ops they are launch-bound on a GPU (the plain
SE(3) projection is ~70 kernels); here each is one Triton kernel that reads ``x`` (and ``v``) once
and writes the result once:

* :meth:`FusedGeometry.center` -- masked centring;
* :meth:`FusedGeometry.horizontal_projection` -- ``P_x(v)``;
* :meth:`FusedGeometry.mean_curvature` -- ``h(x) = -1/2 grad log det Gram``;
* :meth:`FusedGeometry.projection_and_curvature` -- both, sharing the factorisation;
* :meth:`FusedGeometry.lifted_update` -- the lifted Euler-Maruyama update
  ``x + dt P_x(f) + s P_x(z) + tame(c h(x), lim)`` (one kernel per sampler step);
* :meth:`FusedGeometry.euler_update` -- ``x + dt P_x(f)`` (the ODE step).

Layouts: padded ``(..., N, d)`` with an optional bool ``mask`` ``(..., N)``, and packed ``(P, d)``
with segment ``offsets`` ``(B+1,)`` (see :mod:`qmanifold.packed`).

Kernels: SO(3)/SE(3) use the hand-written :mod:`qmanifold.kernels.se3_triton`; any other declared
linear group gets a kernel generated from its symbolic geometry
(:mod:`qmanifold.kernels.generic_triton`). The plain torch path (:mod:`qmanifold.so3`,
:mod:`qmanifold.geometry`) is the CPU fallback and the test oracle.

Paths (``FusedGeometry(group, path=...)``): ``"auto"`` runs the Triton kernel for CUDA tensors when
Triton imports and the torch path otherwise; ``"triton"`` requires it; ``"torch"`` never uses it;
``"emulate"`` runs the kernel source through :mod:`qmanifold.kernels.emulate` on CPU, and
``"interpret"`` runs it through Triton's own interpreter on CPU tensors (a process started with
``TRITON_INTERPRET=1``; both for tests only: slow). Nothing here synchronises with the host
(packed batches: pass ``max_size`` to pick the one-pass variant; see :mod:`qmanifold.packed`).
:meth:`FusedGeometry.plan` prepares a launch without running it; :mod:`qmanifold.kernels.aot`
compiles such plans for a GPU architecture on any machine (``qmanifold kernels``).

Autograd: the projection and the centring are symmetric linear maps of ``v``, so their backward
with respect to ``v`` is the same fused kernel applied to the incoming gradient (a
``torch.autograd.Function``; double backward works the same way). When ``x`` itself requires a
gradient (rare: ``x_t`` in the quotient loss is built from data and noise), and for the curvature
and the lifted update under autograd, the op falls back to the torch path, which autograd
differentiates exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import re
import threading
import types
import warnings
from collections.abc import Mapping

import torch

from .. import _segments as S
from .. import geometry as G
from .. import so3
from ..masking import apply_mask
from ..masking import center as _torch_center
from ..sde import tame as _tame
from . import emulate, generic_triton, se3_triton
from .launch import LAUNCH_OPTIONS, DirectLauncher, direct_launch_available, runtime_names

__all__ = ["FusedGeometry", "LaunchPlan", "triton_available", "triton_error", "interpreting", "status", "PATHS",
           "MAX_TILE_POINTS"]

PATHS = ("auto", "triton", "torch", "emulate", "interpret")

#: Largest configuration (points) that is processed in one register tile (one pass over memory);
#: larger ones are streamed in chunks (three reads, mostly from L2).
MAX_TILE_POINTS = 4096
#: Chunk of points per program iteration when streaming (configurations above MAX_TILE_POINTS).
STREAM_CHUNK_POINTS = 1024

_lock = threading.Lock()
_TRITON = None  # (triton, triton.language) once imported, False if unavailable
_TRITON_ERROR: str | None = None


def _triton():
    global _TRITON, _TRITON_ERROR
    if _TRITON is None:
        try:
            import triton
            import triton.language as tl

            _TRITON = (triton, tl)
        except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
            _TRITON = False
            _TRITON_ERROR = f"{type(exc).__name__}: {exc}"
    return _TRITON


def triton_available() -> bool:
    """Whether Triton imports (the fused kernels still need a CUDA tensor to run)."""
    return bool(_triton())


def triton_error() -> str | None:
    """Why Triton is unavailable (the import error), if it is."""
    _triton()
    return _TRITON_ERROR


_BROKEN: dict[str, str] = {}  # kernel name -> compilation error (auto path falls back to torch)


def interpreting() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1`` when it was imported): then
    ``triton.jit`` kernels execute on CPU tensors through Triton's own semantics."""
    tt = _triton()
    if not tt:
        return False
    knobs = getattr(tt[0], "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def status() -> dict:
    """What the fused path can do here: Triton import and version, CUDA, whether launches skip
    Triton's dispatch (:mod:`qmanifold.kernels.launch`), the tile's lane axis, kernels that failed
    to compile."""
    tt = _triton()
    direct = direct_launch_available(tt[0]) if tt and not interpreting() else None
    return {
        "triton": triton_available(),
        "triton_version": getattr(tt[0], "__version__", None) if tt else None,
        "triton_error": triton_error(),
        "cuda": torch.cuda.is_available(),
        "interpreting": interpreting(),
        "direct_launch": direct,
        "lane_axis_first": _lane_axis_first() if tt else None,
        "broken_kernels": dict(_BROKEN),
    }


# ----------------------------------------------------------------------------------------------
# compiled / emulated kernel functions


class _KernelSet:
    """The plain functions of one kernel and their jit-compiled / emulated versions."""

    def __init__(self, name: str, functions: dict, namespace: dict, entry: str):
        self.name = name
        self.functions = dict(functions)
        self.namespace = namespace
        self.entry = entry
        self._jit = None
        self._emulated = None
        self._launcher = None

    def jit(self):
        """The ``triton.jit`` entry kernel. No runtime argument is specialised (see
        :mod:`qmanifold.kernels.launch`): a launch's specialisation is then a function of its
        constexprs and dtypes alone, which lets :attr:`launcher` skip Triton's dispatch."""
        if self._jit is None:
            with _lock:
                if self._jit is None:
                    triton, tl = _triton()
                    jitted = {}
                    for name, fn in self.functions.items():
                        if name == self.entry:
                            runtime = runtime_names(fn)
                            options = {"do_not_specialize": runtime}
                            if "do_not_specialize_on_alignment" in inspect.signature(triton.jit).parameters:
                                options["do_not_specialize_on_alignment"] = runtime  # Triton >= 3.2
                            jitted[name] = triton.jit(fn, **options)
                        else:
                            jitted[name] = triton.jit(fn)
                    self.namespace.update(jitted)  # helpers resolve to their jit versions
                    self.namespace["tl"] = tl
                    self._jit = jitted[self.entry]
        return self._jit

    @property
    def launcher(self) -> DirectLauncher:
        """The compiled specialisations of :meth:`jit` and their direct launch."""
        if self._launcher is None:
            self._launcher = DirectLauncher(self.jit(), _triton()[0])
        return self._launcher

    def emulated(self):
        if self._emulated is None:
            self._emulated = emulate.rebind(self.functions, self.namespace)[self.entry]
        return self._emulated


_SE3 = _KernelSet("se3", se3_triton.KERNEL_FUNCTIONS, vars(se3_triton), "_se3_kernel")
_GENERIC: dict[str, _KernelSet] = {}


def _generic_kernel_set(group) -> _KernelSet:
    lowered = group.symbolic
    gens = torch.stack([torch.tensor([[float(e) for e in row] for row in a.tolist()], dtype=torch.float64)
                        for a in group.generators]).numpy()
    source = generic_triton.generate_source(gens, lowered.gram_coeff, lowered.momentum_coeff, name=group.name)
    key = source
    ks = _GENERIC.get(key)
    if ks is None:
        tl = _triton()[1] if triton_available() else emulate
        fn = generic_triton.load_kernel(source, tl)
        functions = {"_rsum": fn.__globals__["_rsum"], "_generic_kernel": fn}
        ks = _KernelSet(f"generic:{group.name}", functions, fn.__globals__, "_generic_kernel")
        ks.source = source
        _GENERIC[key] = ks
    return ks


# ----------------------------------------------------------------------------------------------
# launching


_CONSTS: dict = {}


def _consts(dtype, device) -> torch.Tensor:
    key = (dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        c, floor = G.regularization(dtype)
        t = torch.tensor([c, floor, torch.finfo(dtype).tiny], dtype=dtype, device=device)
        _CONSTS[key] = t
    return t


def _dense(t: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """``t`` itself when contiguous (a kernel reads it as flat storage), else a contiguous copy;
    ``t`` must have the launch's ``shape`` (a kernel does not broadcast)."""
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} (the fused kernels do not broadcast)")
    return t if t.is_contiguous() else t.contiguous()


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _per_config(value, batch_shape, count: int, like: torch.Tensor):
    """A per-configuration scalar as ``(tensor, stride)``: stride 0 for a broadcast scalar."""
    if value is None:
        return like, 0
    if not isinstance(value, torch.Tensor):
        return torch.full((1,), float(value), dtype=like.dtype, device=like.device), 0
    if value.dim() == 0 and value.dtype == like.dtype and value.device == like.device:
        return value, 0  # the common case (a sampler's per-step scalar): passed as it is
    value = value.to(dtype=like.dtype, device=like.device)
    if value.numel() == 1:
        return value.reshape(1), 0
    return value.expand(batch_shape).reshape(count).contiguous(), 1


def _config(n: int, count: int, dtype, one_tile: bool, register_weight: float = 1.0):
    """``(BLOCK_B, BLOCK_N, num_warps)`` for configurations of ``n`` points.

    A program holds a tile of ~1024 (float32) / 512 (float64) points. ``num_warps`` is chosen so
    that each thread holds at most ~4 float32 (2 float64) points times ``register_weight`` (the
    group's per-point register cost relative to SE(3): larger for higher ``d`` and more generators).
    The budget comes from compiling every mode for sm_90 on a CPU (``qmanifold kernels``): with 8
    points per thread the SE(3) lifted update needed 232 registers per thread (float32; 12 of 64
    warps per SM resident) and SO(4) spilled 1-1.7 KB of registers to the stack; with the budget
    above no float32 configuration spills and SE(3) needs 73-154 registers.
    """
    tile = 1024 if dtype == torch.float32 else 512
    if one_tile:
        block_n = max(4, _next_pow2(n))
        block_b = max(1, tile // block_n)
    else:
        block_n = min(max(4, _next_pow2(n)), tile, STREAM_CHUNK_POINTS)
        block_b = max(1, tile // block_n)
    block_b = max(1, min(block_b, _next_pow2(max(count, 1))))
    elements = block_b * block_n
    per_thread = 4 if dtype == torch.float32 else 2
    threads = elements * register_weight / per_thread
    num_warps = min(16, max(4, _next_pow2(math.ceil(threads / 32))))
    return block_b, block_n, num_warps


@functools.lru_cache(maxsize=1)
def _lane_axis_first() -> bool:
    """Which end of a tile Triton fills with a warp's lanes, for the kernels' strided loads (where
    no axis is contiguous): the first axis up to Triton 3.6, the last from 3.7 on. Found by
    compiling a probe kernel for sm_90 with Triton 3.2, 3.3, 3.4, 3.5 and 3.6 (first) and 3.7, 3.8
    and 3.9 (last); ``test_per_configuration_layout_needs_fewer_instructions_than_the_previous_one``
    checks it for the installed Triton. The kernels put their lane axis there (see
    :func:`qmanifold.kernels.se3_triton._tile`); put on the other end, the lanes would cover the
    in-thread axis and the sums would need shuffles and shared memory."""
    tt = _triton()
    if not tt:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", tt[0].__version__)[:2])
    return version < (3, 7)


def _chunks(block_b: int, block_n: int, num_warps: int) -> int:
    """``CHUNKS``: the points of one configuration each thread holds (a power of two, between 1 and
    ``block_n``): all the points of the tile that fall to a thread, ``block_b block_n / threads``.

    The tile has a lane axis of ``block_n / CHUNKS`` points and an in-thread axis of ``CHUNKS``
    points (see :func:`qmanifold.kernels.se3_triton._tile`), so a per-configuration sum shuffles
    across ``block_n / CHUNKS`` lanes: for 29-point molecules (tile 32 x 32, 8 warps) 3 shuffle
    rounds for the one configuration of a thread, where a tile with the lanes along all 32 points
    (``CHUNKS = 1``) needs 5 rounds for each of the 4 configurations a thread then holds; and the
    per-configuration algebra runs once per thread instead of 4 times.
    """
    return max(1, min(block_n, (block_b * block_n) // (32 * num_warps)))


@dataclasses.dataclass
class LaunchPlan:
    """One kernel launch, prepared by :meth:`FusedGeometry.plan` (see there).

    The tensor arguments are the caller's tensors when they are contiguous (the kernels address
    them as flat ``(count, n, d)`` / ``(count, n)`` storage, which any contiguous tensor of the
    batch shape already is), and ``out`` / ``out2`` have the shape of the input, so neither side
    of a launch reshapes or copies. ``constexprs`` is shared between the plans of one call
    signature: read-only.
    """

    mode: int
    out: torch.Tensor
    out2: torch.Tensor | None
    empty: bool
    args: list = dataclasses.field(default_factory=list)
    constexprs: Mapping = dataclasses.field(default_factory=dict)
    grid: tuple = (0,)
    num_warps: int = 4

    @property
    def dtype(self) -> torch.dtype:
        return self.out.dtype

    def outputs(self):
        return (self.out, self.out2) if self.mode == 3 else self.out


class FusedGeometry:
    """Fused quotient operations of a linear group (see the module docstring).

    Args:
        group: a :class:`~qmanifold.lie.LieGroup` with at least one generator.
        path: ``"auto"``, ``"triton"``, ``"torch"`` or ``"emulate"``.
        generated: use the kernel generated from the group's symbolic geometry even for SO(3)
            groups (which otherwise get the hand-written kernel); the torch path is then the
            generic lowering as well. For comparisons and tests.
        num_warps: fix the warps per program of every launch (for tuning sweeps); by default they
            follow the register budget of :func:`_config`.
        chunks: fix the points of one configuration per thread (a power of two; clipped to the
            tile), for tuning sweeps; ``1`` puts the lanes along all the points (the layout before
            :func:`_chunks` with Triton >= 3.7). By default all of a thread's points belong to one
            configuration.
    """

    def __init__(self, group, path: str = "auto", *, generated: bool = False, num_warps: int | None = None,
                 chunks: int | None = None):
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
        if not getattr(group, "generators", None):
            raise ValueError(f"{getattr(group, 'name', group)!r} has no rotation-like generator: nothing to fuse")
        self.group = group
        self.path = path
        self.point_dim = group.point_dim
        self.translations = bool(group.translations)
        self.is_so3 = group.kind == "special_orthogonal" and group.point_dim == 3 and not generated
        self._kernels = _SE3 if self.is_so3 else None
        # per-point register cost relative to SE(3): coordinates held per point (d) and the
        # k-dimensional momenta / solves grow it (see _config)
        k = len(group.generators)
        self._register_weight = max(1.0, (self.point_dim / 3) * max(1.0, k / 3) ** 0.5)
        if num_warps is not None and num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps must be a power of two between 1 and 32, got {num_warps!r}")
        self.num_warps = num_warps
        if chunks is not None and (not isinstance(chunks, int) or chunks < 1 or chunks & (chunks - 1)):
            raise ValueError(f"chunks must be a positive power of two, got {chunks!r}")
        self.chunks = chunks
        self._static_plans: dict = {}  # call signature -> (grid, num_warps, constexprs); see plan()
        if path in ("triton", "interpret") and not triton_available():
            raise RuntimeError(f"path={path!r} but Triton is unavailable ({triton_error()})")
        if path == "interpret" and not interpreting():
            raise RuntimeError("path='interpret' needs Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
                               "before Triton is imported (e.g. `TRITON_INTERPRET=1 python -m pytest ...`)")

    def __repr__(self) -> str:
        kind = "SE(3) hand-written" if self.is_so3 else "generated"
        return f"FusedGeometry({self.group.name!r}, path={self.path!r}, kernel={kind})"

    @property
    def kernels(self) -> _KernelSet:
        if self._kernels is None:
            self._kernels = _generic_kernel_set(self.group)
        return self._kernels

    @property
    def source(self) -> str:
        """The kernel's Python/Triton source (generated for non-SO(3) groups)."""
        if self.is_so3:
            return inspect.getsource(se3_triton)
        return self.kernels.source

    # -- which path runs ------------------------------------------------------------------------

    def runs(self, x: torch.Tensor) -> str:
        """``"triton"``, ``"emulate"``, ``"interpret"`` or ``"torch"``: the path an op on ``x`` takes."""
        if self.path in ("torch", "emulate"):
            return self.path
        if self.path == "interpret":
            if x.device.type != "cpu":
                raise ValueError(f"path='interpret' runs Triton's interpreter on CPU tensors, got a tensor on {x.device}")
            return "interpret"
        if self.path == "triton":
            if not x.is_cuda:
                raise ValueError("path='triton' needs CUDA tensors")
            return "triton"
        if x.is_cuda and triton_available() and self.kernels.name not in _BROKEN:
            return "triton"
        return "torch"

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether an op on ``x`` runs a kernel (Triton or emulated) rather than the torch path."""
        return self.runs(x) != "torch"

    # -- torch oracle ---------------------------------------------------------------------------

    def _torch_projection(self, v, x, mask):
        if self.is_so3:
            return so3.horizontal_projection(v, x, mask, self.translations)
        return G.horizontal_projection(self.group.lowered(x.dtype, x.device), v, x, mask, self.translations)

    def _torch_curvature(self, x, mask):
        if self.is_so3:
            return so3.mean_curvature(x, mask, self.translations)
        return G.mean_curvature(self.group.lowered(x.dtype, x.device), x, mask, self.translations)

    def _torch_center(self, v, mask):
        return _torch_center(v, mask) if self.translations else apply_mask(v, mask)

    # -- the launch -----------------------------------------------------------------------------

    def plan(self, mode: int, x, u=None, z=None, mask=None, offsets=None, *, a=None, s=None, c=None,
             lim=None, max_size=None) -> LaunchPlan:
        """The kernel launch for ``mode`` on these inputs, without running it: the flattened argument
        list, the constexpr specialisation, the grid and ``num_warps``, and the output buffers.

        Modes: 0 centring, 1 ``P_x``, 2 ``h``, 3 ``(P_x, h)``, 4 lifted update, 5 Euler update. Works
        on any device, including ``meta`` tensors (:mod:`qmanifold.kernels.aot` compiles plans
        ahead of time on a machine without a GPU).
        """
        ref = x if x is not None else u
        packed = offsets is not None
        if packed:
            count = offsets.shape[0] - 1
            n = int(max_size) if max_size is not None else -(-ref.shape[0] // max(count, 1))
            one_tile = max_size is not None and n <= MAX_TILE_POINTS
            offs = offsets.to(device=ref.device, dtype=torch.int64).contiguous()
            batch_shape = (count,)
        else:
            batch_shape = ref.shape[:-2]
            n = ref.shape[-2]
            count = math.prod(batch_shape)
            one_tile = n <= MAX_TILE_POINTS
            offs = None
        # the kernels read flat storage: a contiguous tensor of any batch shape is passed as it is
        shape = ref.shape
        xf = _dense(x, shape, "x") if x is not None else None
        uf = _dense(u, shape, "the tangent vector") if u is not None else None
        zf = _dense(z, shape, "the noise") if z is not None else None
        anyf = xf if xf is not None else uf
        out = torch.empty_like(anyf, memory_format=torch.contiguous_format)
        out2 = torch.empty_like(out) if mode == 3 else None
        plan = LaunchPlan(mode=mode, out=out, out2=out2, empty=count == 0 or anyf.numel() == 0)
        if plan.empty:
            return plan
        has_mask = mask is not None and not packed
        maskf = _dense(mask, shape[:-1], "mask").view(torch.uint8) if has_mask else anyf
        coefficients = [*_per_config(a, batch_shape, count, anyf), *_per_config(s, batch_shape, count, anyf),
                        *_per_config(c, batch_shape, count, anyf), *_per_config(lim, batch_shape, count, anyf)]
        key = (mode, n, count, anyf.dtype, one_tile, has_mask, packed, lim is not None, _lane_axis_first())
        static = self._static_plans.get(key)
        if static is None:
            if len(self._static_plans) >= 4096:
                self._static_plans.clear()
            static = self._static_plans[key] = self._static_plan(*key)
        plan.grid, plan.num_warps, plan.constexprs = static
        plan.args = [
            xf if xf is not None else anyf, uf if uf is not None else anyf, zf if zf is not None else anyf,
            maskf, offs if offs is not None else anyf, out, out2 if out2 is not None else out,
            *coefficients, _consts(anyf.dtype, anyf.device), count, 0 if packed else n,
        ]
        return plan

    def _static_plan(self, mode, n, count, dtype, one_tile, has_mask, packed, tame, lane_axis_first):
        """``(grid, num_warps, constexprs)`` of a launch: everything of a plan that depends only on
        the call's signature (cached per signature in :meth:`plan`)."""
        block_b, block_n, num_warps = _config(n, count, dtype, one_tile, self._register_weight)
        num_warps = self.num_warps or num_warps
        chunks = min(self.chunks, block_n) if self.chunks else _chunks(block_b, block_n, num_warps)
        constexprs = dict(MODE=mode, CENTER=self.translations, HAS_MASK=has_mask, PACKED=packed,
                          ONE_TILE=one_tile, TAME=tame, BLOCK_B=block_b, BLOCK_N=block_n, CHUNKS=chunks,
                          LANE_AXIS_FIRST=lane_axis_first)
        return (-(-count // block_b),), num_warps, types.MappingProxyType(constexprs)

    def _launch(self, mode: int, x, u=None, z=None, mask=None, offsets=None, *, a=None, s=None, c=None,
                lim=None, max_size=None, path=None):
        """Run the kernel in ``mode``; returns ``out`` (and ``out2`` for mode 3), or None when the
        kernel failed to compile on the ``auto`` path (the caller then uses the torch path)."""
        path = path or self.runs(x if x is not None else u)
        plan = self.plan(mode, x, u, z, mask, offsets, a=a, s=s, c=c, lim=lim, max_size=max_size)
        if plan.empty:
            plan.out.zero_()
            if plan.out2 is not None:
                plan.out2.zero_()
            return plan.outputs()
        ks = self.kernels
        if path == "emulate":
            emulate.launch(ks.emulated(), plan.grid, *plan.args, DTYPE=plan.dtype, **plan.constexprs)
            return plan.outputs()
        tl = _triton()[1]
        dtype_tl = tl.float32 if plan.dtype == torch.float32 else tl.float64
        try:
            if path == "interpret":
                ks.jit()[plan.grid](*plan.args, DTYPE=dtype_tl, num_warps=plan.num_warps, **plan.constexprs,
                                    **LAUNCH_OPTIONS)
            else:
                ks.launcher.launch(plan, dtype_tl)
        except Exception as exc:
            if self.path == "triton" or type(exc).__name__ not in ("CompilationError", "CompileTimeAssertionFailure"):
                raise
            _BROKEN[ks.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"qmanifold: the fused {ks.name} kernel failed to compile; using the torch path "
                          f"({type(exc).__name__})", RuntimeWarning, stacklevel=3)
            return None
        return plan.outputs()

    @staticmethod
    def _needs_grad(*tensors) -> bool:
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    # -- public ops (padded: mask; packed: offsets) ---------------------------------------------

    def center(self, v, mask=None, *, offsets=None, max_size=None):
        """Masked centring (translations) or masking, via the kernel when it runs."""
        if self.runs(v) == "torch":
            if offsets is not None:
                return S.center_segments(v, offsets, self.translations)
            return self._torch_center(v, mask)
        if self._needs_grad(v):
            return _Linear.apply(v, None, mask, offsets, self, 0, max_size)
        out = self._launch(0, None, v, mask=mask, offsets=offsets, max_size=max_size)
        return out if out is not None else self.center(v, mask, offsets=offsets, max_size=max_size)

    def horizontal_projection(self, v, x, mask=None, *, offsets=None, max_size=None):
        """``P_x(v)``: ``(..., N, d)`` (zeros at padding), or ``(P, d)`` for packed input."""
        if self.runs(x) == "torch" or self._needs_grad(x):
            return self._torch_or_packed("projection", v, x, mask, offsets)
        if self._needs_grad(v):
            return _Linear.apply(v, x, mask, offsets, self, 1, max_size)
        out = self._launch(1, x, v, mask=mask, offsets=offsets, max_size=max_size)
        return out if out is not None else self._torch_or_packed("projection", v, x, mask, offsets)

    def mean_curvature(self, x, mask=None, *, offsets=None, max_size=None):
        """``h(x) = -1/2 grad log det Gram(x)``."""
        if self.runs(x) == "torch" or self._needs_grad(x):
            return self._torch_or_packed("curvature", None, x, mask, offsets)
        out = self._launch(2, x, mask=mask, offsets=offsets, max_size=max_size)
        return out if out is not None else self._torch_or_packed("curvature", None, x, mask, offsets)

    def projection_and_curvature(self, v, x, mask=None, *, offsets=None, max_size=None):
        """``(P_x(v), h(x))`` in one pass (the factorisation is shared)."""
        if self.runs(x) == "torch" or self._needs_grad(x, v):
            return (self.horizontal_projection(v, x, mask, offsets=offsets, max_size=max_size),
                    self.mean_curvature(x, mask, offsets=offsets, max_size=max_size))
        out = self._launch(3, x, v, mask=mask, offsets=offsets, max_size=max_size)
        if out is None:
            return (self._torch_or_packed("projection", v, x, mask, offsets),
                    self._torch_or_packed("curvature", None, x, mask, offsets))
        return out

    def lifted_update(self, x, drift, noise, dt, noise_scale, curvature_coeff, mask=None, *, tame_limit=None,
                      offsets=None, max_size=None):
        """``x + dt P_x(drift) + noise_scale P_x(noise) + tame(curvature_coeff h(x), tame_limit)``.

        ``dt``, ``noise_scale``, ``curvature_coeff`` and ``tame_limit`` are numbers or tensors
        broadcastable to the batch shape ``x.shape[:-2]`` (packed: ``(B,)``); ``tame_limit=None``
        means no taming (:func:`qmanifold.sde.tame`). For the lifted SDE of
        :func:`qmanifold.sde.integrate`: ``curvature_coeff = -c sigma^2 dt / 2`` and
        ``tame_limit = noise_scale = sigma sqrt(dt)``. Padded points come out as zeros.
        """
        if self.runs(x) == "torch" or self._needs_grad(x, drift, noise):
            return self._torch_update(x, drift, noise, dt, noise_scale, curvature_coeff, mask, tame_limit, offsets)
        out = self._launch(4, x, drift, noise, mask=mask, offsets=offsets, a=dt, s=noise_scale, c=curvature_coeff,
                           lim=tame_limit, max_size=max_size)
        if out is None:
            return self._torch_update(x, drift, noise, dt, noise_scale, curvature_coeff, mask, tame_limit, offsets)
        return out

    def euler_update(self, x, drift, dt, mask=None, *, offsets=None, max_size=None):
        """``x + dt P_x(drift)`` (the lifted Euler step of an ODE)."""
        if self.runs(x) == "torch" or self._needs_grad(x, drift):
            return self._torch_update(x, drift, None, dt, None, None, mask, None, offsets)
        out = self._launch(5, x, drift, mask=mask, offsets=offsets, a=dt, max_size=max_size)
        if out is None:
            return self._torch_update(x, drift, None, dt, None, None, mask, None, offsets)
        return out

    # -- torch compositions ---------------------------------------------------------------------

    def _torch_or_packed(self, what, v, x, mask, offsets):
        if offsets is not None:
            if what == "projection":
                return S.projection_segments(self, v, x, offsets)
            return S.curvature_segments(self, x, offsets)
        if what == "projection":
            return self._torch_projection(v, x, mask)
        return self._torch_curvature(x, mask)

    def _torch_update(self, x, drift, noise, dt, noise_scale, curvature_coeff, mask, tame_limit, offsets):
        if offsets is not None:
            expand = S.per_point
        else:
            def expand(value, _offsets=None, _x=x):
                if not isinstance(value, torch.Tensor):
                    return value
                return value.to(_x.dtype).reshape(*value.shape, 1, 1) if value.dim() else value.to(_x.dtype)

        def proj(v):
            return self._torch_or_packed("projection", v, x, mask, offsets)

        step = expand(dt, offsets) * proj(drift)
        if noise is not None:
            step = step + expand(noise_scale, offsets) * proj(noise)
        if curvature_coeff is not None:
            incr = expand(curvature_coeff, offsets) * self._torch_or_packed("curvature", None, x, mask, offsets)
            if tame_limit is not None:
                if offsets is not None:
                    incr = S.tame_segments(incr, tame_limit, offsets)
                else:
                    incr = _tame(incr, expand(tame_limit))
            step = step + incr
        out = x + step
        if offsets is not None:
            return out
        return apply_mask(out, mask)


class _Linear(torch.autograd.Function):
    """A symmetric linear map of ``v`` (mode 0: centring, mode 1: ``P_x``) with a fused backward."""

    @staticmethod
    def forward(ctx, v, x, mask, offsets, geom, mode, max_size):
        ctx.save_for_backward(x, mask, offsets)
        ctx.geom, ctx.mode, ctx.max_size = geom, mode, max_size
        with torch.no_grad():
            if mode == 0:
                return geom.center(v, mask, offsets=offsets, max_size=max_size)
            return geom.horizontal_projection(v, x, mask, offsets=offsets, max_size=max_size)

    @staticmethod
    def backward(ctx, grad):
        x, mask, offsets = ctx.saved_tensors
        geom = ctx.geom
        grad = grad.contiguous()
        if ctx.mode == 0:
            g = geom.center(grad, mask, offsets=offsets, max_size=ctx.max_size)
        else:
            g = geom.horizontal_projection(grad, x, mask, offsets=offsets, max_size=ctx.max_size)
        return g, None, None, None, None, None, None
