"""Atomic writes (``qmanifold.atomic``): all or nothing, and strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qmanifold.atomic import atomic_open, atomic_write_json, atomic_write_text, strict_json_value


def _strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as RFC 8259 parsers do."""
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=reject)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "first")
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(path) as fh:
        fh.write("half of the sec")
        raise RuntimeError("disk full (simulated)")
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    atomic_write_text(path, "second")
    assert path.read_text() == "second"


def test_json_is_strict_non_finite_numbers_become_null(tmp_path):
    record = {"ratio": float("nan"), "b": float("inf"), "a": 1.5, "nested": [float("-inf"), (2.0, "x")],
              "numpy": np.float32(0.25), "numpy_nan": np.float64("nan"), "torch": torch.tensor(3.0).item(),
              "count": 7, "flag": True, "none": None}
    path = tmp_path / "r.json"
    atomic_write_json(path, [record])
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    (back,) = _strict_loads(text)
    assert back == {"ratio": None, "b": None, "a": 1.5, "nested": [None, [2.0, "x"]], "numpy": 0.25,
                    "numpy_nan": None, "torch": 3.0, "count": 7, "flag": True, "none": None}
    # Python's json module alone would have written NaN: the helper is what makes it strict
    with pytest.raises(ValueError, match="NaN"):
        _strict_loads(json.dumps(record, default=float))
    assert strict_json_value({"x": math.nan}) == {"x": None}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
