"""Triton's host launch path on a machine without a GPU: a fake CUDA driver that records launches.

Inside :func:`fake_cuda_driver`, Triton believes an sm_90 device is present. Its real dispatch
runs -- binding, specialisation, cache keys -- but instead of compiling, each new specialisation
gets a :class:`RecordedKernel` stand-in whose launcher records the call (grid, stream and the
argument tuple) rather than running it. Two uses:

* tests: that :class:`qmanifold.kernels.launch.DirectLauncher`'s key is complete (each of its keys
  meets exactly one of Triton's specialisations) and that a direct launch passes the launcher the
  same arguments as Triton's own dispatch (``tests/qmanifold/test_kernels_launch.py``);
* timing the host side of a launch on a CPU (``benchmarks/launch_overhead.py``): Triton's dispatch
  against the direct launch, and our argument preparation.

CPU tensors stand in for CUDA ones (nothing reads their memory). Only for tools and tests: the
driver is process-global state, so use it in a process of its own.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools

from . import _triton

__all__ = ["RecordedKernel", "Recorder", "fake_cuda_driver"]


@dataclasses.dataclass
class Recorder:
    """What happened inside :func:`fake_cuda_driver`."""

    record_arguments: bool = True  # keep each launch's arguments (off for timing: they hold the outputs)
    kernels: list = dataclasses.field(default_factory=list)  # RecordedKernel, in order of "compilation"
    launches: list = dataclasses.field(default_factory=list)  # (kernel, grid, stream, args, enter_hook)
    launch_count: int = 0


class RecordedKernel:
    """Stands in for a compiled kernel: Triton's dispatch calls ``run`` on it as on the real one."""

    _ids = itertools.count(1)

    def __init__(self, recorder: Recorder, key: str, signature: dict, constexprs: dict, attrs, options):
        self.recorder = recorder
        self.key, self.signature, self.constexprs, self.attrs, self.options = key, signature, constexprs, attrs, options
        self.function = next(self._ids)  # a distinct "CUfunction handle" per specialisation
        self.packed_metadata = ("packed-metadata", self.function)

    def launch_metadata(self, grid, stream, *args):
        return None

    @property
    def run(self):
        return self._run

    def _run(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
             exit_hook, *args):
        if function != self.function or packed_metadata != self.packed_metadata:
            raise AssertionError("launched with another kernel's handle or metadata")
        self.recorder.launch_count += 1
        if self.recorder.record_arguments:
            self.recorder.launches.append((self, (grid_x, grid_y, grid_z), stream, args, enter_hook))


class _FakeDriver:
    """The part of Triton's ``DriverBase`` that its dispatch uses."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0xCAFE

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def fake_cuda_driver(arch: int = 90, *, record_arguments: bool = True):
    """Run Triton's dispatch against a fake sm_``arch`` device; yields a :class:`Recorder`
    (``record_arguments=False``: count the launches only, e.g. for timing).

    On exit the real driver and compiler are restored, the stand-ins are dropped from the caches of
    every jit function that saw them, and the fused kernels' own caches and direct launchers are
    back as they were on entry (on a machine with a GPU: its real compiled kernels).
    """
    if not _triton():
        raise RuntimeError("the fake CUDA driver needs Triton")
    from triton.runtime import driver as driver_config
    from triton.runtime.jit import JITFunction

    from .launch import unsupported_reason

    reason = unsupported_reason(_triton()[0])
    if reason is not None:
        raise RuntimeError(f"the fake CUDA driver needs Triton >= 3.5 ({reason})")

    from . import _GENERIC, _SE3

    recorder = Recorder(record_arguments=record_arguments)
    touched = []

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = RecordedKernel(recorder, key, dict(signature), dict(constexprs), attrs, options)
        self.device_caches[device][0][key] = kernel
        recorder.kernels.append(kernel)
        touched.append(self)
        return kernel

    # our kernels' real compiled specialisations (on a machine with a GPU) are set aside, so that
    # nothing compiled for the device is launched with the stand-ins' host pointers, and come back
    kernel_sets = [_SE3, *_GENERIC.values()]
    saved = [(ks, ks._launcher, ks._jit.device_caches if ks._jit is not None else None) for ks in kernel_sets]
    for ks, _, caches in saved:
        ks._launcher = None
        if caches is not None:
            ks._jit.device_caches = collections.defaultdict(ks._jit.create_binder)
    previous_driver = driver_config._active
    previous_compile = JITFunction._do_compile
    driver_config.set_active(_FakeDriver(arch))
    JITFunction._do_compile = do_compile
    try:
        yield recorder
    finally:
        JITFunction._do_compile = previous_compile
        driver_config._active = previous_driver
        for fn in touched:
            fn.device_caches = collections.defaultdict(fn.create_binder)
        for ks, launcher, caches in saved:
            ks._launcher = launcher
            if caches is not None:
                ks._jit.device_caches = caches
        for ks in _GENERIC.values():  # kernel sets first made inside: drop what they compiled
            if all(ks is not other for other, _, _ in saved):
                ks._launcher = None
