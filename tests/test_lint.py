"""The code passes the project's ruff configuration (``[tool.ruff]`` in pyproject.toml).

The test extra pins the ruff version, so a newer ruff's new rules cannot turn this test red on its
own; raising the pin is a deliberate change that comes with its fixes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["qmanifold", "groups", "models", "tests", "benchmarks", "scripts"]  # not a virtual env in the root


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *SOURCES],
                          cwd=ROOT, check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ruff check (rc {proc.returncode}):\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    assert "All checks passed" in proc.stdout, proc.stdout
