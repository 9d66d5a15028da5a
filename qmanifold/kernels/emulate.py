"""A tiny CPU emulator of the subset of ``triton.language`` that the qmanifold kernels use.

Triton is not a dependency and is usually absent on CPU machines, yet the kernels' logic (index
arithmetic, masks, the reductions, the unrolled 3x3 / k x k algebra) should be tested everywhere.
This module runs a kernel written as a plain Python function against torch tensors, one program
at a time, with the same semantics for the operations the kernels use:

* pointers: a tensor argument becomes a :class:`Pointer` (flat storage + element offsets);
  ``ptr + offsets`` shifts it, :func:`load` / :func:`store` gather / scatter with a mask;
* ``arange``, ``program_id``, ``zeros``, ``full``, ``sum``, ``max``, ``where``, ``maximum``,
  ``minimum``, ``sqrt``, ``abs``, ``static_range``, ``constexpr`` and the dtypes.

It is an executable specification, not a performance path: the numbers it produces are the
kernel's, so the tests compare it with the plain-torch oracle on CPU, and the same tests compare
the compiled Triton kernel with the oracle on a GPU. What it cannot check is Triton's typing and
compilation; that needs a GPU run (``tests/qmanifold/test_kernels.py`` runs both when it can).
"""

from __future__ import annotations

import types

import torch

__all__ = ["Pointer", "launch", "rebind"]

# -- dtypes and constexpr ----------------------------------------------------------------------

float32 = torch.float32
float64 = torch.float64
int32 = torch.int32
int64 = torch.int64
uint8 = torch.uint8


class constexpr:  # mirrors triton.language.constexpr (used as an annotation only)
    pass


static_range = range

_state = types.SimpleNamespace(pid=(0, 0, 0))


def program_id(axis: int):
    return _state.pid[axis]


# -- pointers ----------------------------------------------------------------------------------


class Pointer:
    """Element offsets (an int64 tensor or int) into the flat storage of a tensor."""

    __slots__ = ("offs", "storage")

    def __init__(self, storage: torch.Tensor, offs):
        self.storage = storage
        self.offs = offs

    def __add__(self, other):
        if isinstance(other, torch.Tensor):
            other = other.to(torch.int64)
        return Pointer(self.storage, self.offs + other)

    __radd__ = __add__


def _broadcast(*tensors):
    tensors = [t if isinstance(t, torch.Tensor) else torch.as_tensor(t) for t in tensors]
    return torch.broadcast_tensors(*tensors)


def load(ptr: Pointer, mask=None, other=0):
    offs = ptr.offs if isinstance(ptr.offs, torch.Tensor) else torch.as_tensor(ptr.offs, dtype=torch.int64)
    n = ptr.storage.numel()
    if mask is None:
        if bool(((offs < 0) | (offs >= n)).any()):
            raise IndexError("unmasked out-of-bounds load")
        return ptr.storage[offs]
    offs, mask = _broadcast(offs, mask)
    safe = torch.where(mask, offs, torch.zeros_like(offs))
    if bool(((safe < 0) | (safe >= n)).any()):
        raise IndexError("masked-in out-of-bounds load")
    values = ptr.storage[safe]
    return torch.where(mask, values, torch.as_tensor(other, dtype=values.dtype))


def store(ptr: Pointer, value, mask=None):
    offs = ptr.offs if isinstance(ptr.offs, torch.Tensor) else torch.as_tensor(ptr.offs, dtype=torch.int64)
    value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if mask is None:
        mask = torch.ones((), dtype=torch.bool)
    offs, value, mask = _broadcast(offs, value, mask)
    n = ptr.storage.numel()
    sel = offs[mask]
    if bool(((sel < 0) | (sel >= n)).any()):
        raise IndexError("out-of-bounds store")
    ptr.storage[sel] = value[mask].to(ptr.storage.dtype)


# -- tensor ops --------------------------------------------------------------------------------


def arange(start: int, end: int):
    return torch.arange(start, end, dtype=torch.int32)


def zeros(shape, dtype):
    return torch.zeros(tuple(shape), dtype=dtype)


def full(shape, value, dtype):
    return torch.full(tuple(shape), value, dtype=dtype)


def sum(x, axis=None):  # mirrors tl.sum
    return x.sum() if axis is None else x.sum(axis)


def max(x, axis=None):  # mirrors tl.max
    return x.max() if axis is None else x.max(axis).values


def where(cond, a, b):
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        raise TypeError("emulated tl.where needs at least one tensor branch")
    ref = a if isinstance(a, torch.Tensor) else b
    a = a if isinstance(a, torch.Tensor) else torch.as_tensor(a, dtype=ref.dtype)
    b = b if isinstance(b, torch.Tensor) else torch.as_tensor(b, dtype=ref.dtype)
    return torch.where(cond, a, b)


def maximum(a, b):
    return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))


def minimum(a, b):
    return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))


def sqrt(x):
    return torch.sqrt(x)


def abs(x):  # mirrors tl.abs
    return torch.abs(x)


# -- running kernels ---------------------------------------------------------------------------


def rebind(functions: dict, namespace: dict) -> dict:
    """Copies of the plain-Python kernel functions whose globals are ``namespace`` (with ``tl`` =
    this module and every kernel helper resolved to its emulated copy)."""
    ns = dict(namespace)
    ns["tl"] = __import__(__name__, fromlist=["_"])
    out = {}
    for name, fn in functions.items():
        out[name] = types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)
    ns.update(out)
    return out


def _as_arg(a):
    if isinstance(a, torch.Tensor):
        if not a.is_contiguous():
            raise ValueError("kernel tensor arguments must be contiguous")
        return Pointer(a.reshape(-1), 0)
    return a


def launch(kernel, grid, *args, **kwargs) -> None:
    """Run ``kernel`` (an emulated copy from :func:`rebind`) on every program of ``grid``."""
    grid = tuple(grid) + (1,) * (3 - len(grid))
    args = [_as_arg(a) for a in args]
    kwargs = {k: _as_arg(v) for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    previous = _state.pid
    try:
        for p0 in range(grid[0]):
            for p1 in range(grid[1]):
                for p2 in range(grid[2]):
                    _state.pid = (p0, p1, p2)
                    kernel(*args, **kwargs)
    finally:
        _state.pid = previous
