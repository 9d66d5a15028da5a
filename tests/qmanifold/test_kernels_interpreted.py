"""The fused kernels under Triton's own interpreter, on CPU.

``qmanifold.kernels.emulate`` is our executable model of ``triton.language``; Triton's interpreter
(``TRITON_INTERPRET=1``) is Triton's. Running the kernel source through it checks the kernels
against Triton's semantics (typing and promotion of scalars and blocks, masked loads with
``other``, reductions, ``static_range``, constexpr specialisation) on a machine without a GPU; only
the compilation to GPU code is left to ``benchmarks/gpu_check.sh``.

The interpreter has to be chosen before Triton is imported, so the ``interpret`` cases of
``test_kernels.py`` and ``test_packed.py`` (which exist only in such a process) run in a child
pytest process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qmanifold.kernels as K

ROOT = Path(__file__).resolve().parents[2]
#: interpret cases in test_kernels.py + test_packed.py (+ test_paths_and_status); a drop means cases went missing
MIN_CASES = 50


@pytest.mark.skipif(not K.triton_available(), reason=f"Triton is not installed here ({K.triton_error()}); "
                    "it is in the 'test' extra on Linux x86-64")
def test_kernels_match_oracle_under_tritons_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "-k", "interpret or paths_and_status",
           "tests/qmanifold/test_kernels.py", "tests/qmanifold/test_packed.py"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=1200)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= MIN_CASES, report
    assert "skipped" not in summary and "deselected" in summary, report
