"""qmanifold.progress: a bar, periodic status lines for logs, or nothing (issue 14: ``sample
--no-progress`` was silent for minutes)."""

from __future__ import annotations

import io

import pytest

from qmanifold.progress import LineProgress, make_progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_come_once_per_interval_and_once_at_the_end():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(10, "sampling (ode, 50 steps)", every_s=60, unit="conf", stream=out, clock=clock)
    for _ in range(3):  # 3 updates inside the first minute: no line
        clock.now += 10
        bar.update(1)
    assert out.getvalue() == ""
    clock.now += 40  # 70 s: one line, with the remaining-time estimate 70 s * 6/4
    bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines == ["[qmanifold] sampling (ode, 50 steps): 4/10 conf (40 %), 70 s, about 1.8 min left"]
    clock.now += 30  # 30 s after the last line: none
    bar.update(2)
    assert len(out.getvalue().splitlines()) == 1
    bar.total += 5  # redraws extend the total, as with tqdm
    bar.set_description("sampling (ode, 50 steps; stereo redraws)")
    clock.now += 200
    bar.update(9)
    bar.close()
    bar.close()  # idempotent
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("[qmanifold] sampling (ode, 50 steps; stereo redraws): 15/15 conf (100 %), 5.0 min")
    assert lines[2] == "[qmanifold] sampling (ode, 50 steps; stereo redraws): 15/15 conf (100 %), 5.0 min (done)"


def test_a_short_loop_stays_quiet():
    clock, out = FakeClock(), io.StringIO()
    bar = LineProgress(3, "x", every_s=60, stream=out, clock=clock)
    clock.now += 59
    bar.update(3)
    bar.close()
    assert out.getvalue() == "" and bar.lines_printed == 0


def test_make_progress_modes():
    assert make_progress(5, False, "x") is None
    assert make_progress(5, None, "x") is None
    assert isinstance(make_progress(5, "lines", "x"), LineProgress)
    bar = make_progress(5, True, "x")
    assert hasattr(bar, "update") and not isinstance(bar, LineProgress)
    bar.close()
    with pytest.raises(ValueError, match="progress must be True, False or 'lines', got 'verbose'"):
        make_progress(5, "verbose", "x")
    with pytest.raises(ValueError, match="every_s"):
        LineProgress(5, "x", every_s=-1)
