"""The wheel installs one top-level package, ``qmanifold`` (groups/ and models/ go in as
``qmanifold.groups`` and ``qmanifold.models``), with the package data it needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_is_recent() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except Exception:  # noqa: BLE001 - not installed: build in an isolated environment instead
        return False


def test_wheel_has_a_single_top_level_package(tmp_path):
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)]
    if _setuptools_is_recent():
        cmd.append("--no-build-isolation")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    wheels = list(tmp_path.glob("qmanifold-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"qmanifold"}
    for needed in ("qmanifold/groups/__init__.py", "qmanifold/groups/definitions.py", "qmanifold/models/cli.py",
                   "qmanifold/models/data/qm9_extract.npz", "qmanifold/models/stereo.py", "qmanifold/verify/runner.py",
                   "qmanifold/kernels/aot.py"):
        assert needed in names, needed
    assert not any(n.startswith(("groups/", "models/", "tests/", "benchmarks/", "scripts/")) for n in names)


def test_old_top_level_names_are_not_importable_outside_the_repository(tmp_path):
    code = ("import importlib.util as u; import qmanifold.groups, qmanifold.models.cli; "
            "print(u.find_spec('groups'), u.find_spec('models'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         check=True)
    assert out.stdout.split() == ["None", "None"]
