"""Input validation shared by the geometry, the engine and the command-line tools.

Two kinds of checks live here:

* **Structural checks** (shape, dtype, mask layout). They read only tensor metadata, never the
  data, so they cost nothing on a GPU and are always on.
* **Value checks** (NaN / inf). They need a device-to-host synchronisation, so the low-level
  functional ops skip them unless the user asks for them with :func:`finite_checks`; the
  high-level API (``QuotientDiffusion``, datasets, the CLI) always checks the data it takes from a
  user.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "check_points",
    "check_mask",
    "check_same_shape",
    "check_finite",
    "finite_checks",
    "finite_checks_enabled",
    "maybe_check_finite",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64)

_state = threading.local()


def finite_checks_enabled() -> bool:
    """Whether :func:`maybe_check_finite` currently checks values (see :func:`finite_checks`)."""
    return getattr(_state, "enabled", False)


@contextlib.contextmanager
def finite_checks(enabled: bool = True):
    """Context manager that switches NaN/inf checks on (or off) for the low-level ops.

    The checks synchronise with the device, so they are off by default in the functional core.
    Use them while debugging::

        with qmanifold.finite_checks():
            quotient.horizontal_projection(v, x)   # raises ValueError on NaN/inf input
    """
    previous = finite_checks_enabled()
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def check_points(x: torch.Tensor, point_dim: int | None = None, name: str = "x") -> None:
    """Check that ``x`` is a float32/float64 tensor of shape ``(..., N, d)``.

    Raises:
        TypeError: not a tensor, or an unsupported dtype.
        ValueError: fewer than two dimensions, zero points, or ``d != point_dim``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; qmanifold's geometry supports float32 and float64 "
            f"(convert with {name}.float() or {name}.double())"
        )
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., N, d), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"{name} has no points (shape {tuple(x.shape)})")
    if point_dim is not None and x.shape[-1] != point_dim:
        raise ValueError(
            f"{name} has points of dimension {x.shape[-1]} (shape {tuple(x.shape)}), "
            f"but the group acts on points of dimension {point_dim}"
        )


def check_same_shape(v: torch.Tensor, x: torch.Tensor, v_name: str = "v", x_name: str = "x") -> None:
    """Check that a tangent vector ``v`` has the same shape, dtype and device as ``x``."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{v_name} must be a torch.Tensor, got {type(v).__name__}")
    if v.shape != x.shape:
        raise ValueError(f"{v_name} has shape {tuple(v.shape)} but {x_name} has shape {tuple(x.shape)}")
    if v.dtype != x.dtype:
        raise TypeError(f"{v_name} has dtype {v.dtype} but {x_name} has dtype {x.dtype}")
    if v.device != x.device:
        raise ValueError(f"{v_name} is on {v.device} but {x_name} is on {x.device}")


def check_mask(mask: torch.Tensor | None, x: torch.Tensor, name: str = "mask") -> None:
    """Check that ``mask`` is None or a bool tensor of shape ``x.shape[:-1]`` on x's device."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype bool, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = real point), got {mask.dtype}")
    if mask.shape != x.shape[:-1]:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}, expected {tuple(x.shape[:-1])} "
            f"(the points' shape (..., N) of a configuration of shape {tuple(x.shape)})"
        )
    if mask.device != x.device:
        raise ValueError(f"{name} is on {mask.device} but the configuration is on {x.device}")


def check_finite(t: torch.Tensor, name: str = "x") -> None:
    """Raise ValueError if ``t`` holds NaN or inf. Synchronises with the device."""
    if not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).sum().item()
        nan = torch.isnan(t).sum().item()
        raise ValueError(f"{name} contains {bad} non-finite value(s) ({nan} NaN, {bad - nan} inf)")


def maybe_check_finite(t: torch.Tensor, name: str = "x") -> None:
    """:func:`check_finite` when enabled by :func:`finite_checks`, otherwise nothing."""
    if finite_checks_enabled():
        check_finite(t, name)
