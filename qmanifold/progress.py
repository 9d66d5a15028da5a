"""Progress reporting for long loops: a tqdm bar, periodic log lines, or nothing.

``progress`` arguments across qmanifold accept:

* ``True``: a tqdm progress bar (interactive use);
* ``"lines"``: one plain status line on stderr at most every ``every_s`` seconds (default 60) and,
  if any was printed, a last one when the loop ends, so that a job whose output goes to a log file
  (``nohup``, a batch queue) is never silent for minutes while a short one stays quiet; what the
  command-line tools do with ``--no-progress``;
* ``False`` / ``None``: nothing.

:func:`make_progress` returns an object with tqdm's ``update(n)``, ``close()``, ``total`` and
``set_description(text)`` (or ``None`` for no reporting), so a loop written for tqdm works with
either.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

#: seconds between two status lines in ``"lines"`` mode
DEFAULT_LINE_INTERVAL = 60.0


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LineProgress:
    """tqdm-like counter that prints ``[qmanifold] desc: done/total (pct), elapsed, ETA`` lines.

    A line is printed on the first update after ``every_s`` seconds have passed since the previous
    line (or the start), and once more on :meth:`close` (with the total time) if any was printed
    before; never more than one per ``every_s``.
    """

    def __init__(self, total: int, desc: str, every_s: float = DEFAULT_LINE_INTERVAL, unit: str = "it",
                 stream: TextIO | None = None, clock=time.monotonic) -> None:
        if every_s < 0:
            raise ValueError(f"every_s must be >= 0, got {every_s}")
        self.total = int(total)
        self.desc = desc
        self.every_s = float(every_s)
        self.unit = unit
        self.n = 0
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._last = self._start
        self._closed = False
        self.lines_printed = 0

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def _line(self, final: bool) -> str:
        elapsed = self._clock() - self._start
        pct = f" ({100.0 * self.n / self.total:.0f} %)" if self.total > 0 else ""
        text = f"[qmanifold] {self.desc}: {self.n}/{self.total} {self.unit}{pct}, {_duration(elapsed)}"
        if final:
            return text + " (done)"
        if 0 < self.n < self.total:
            text += f", about {_duration(elapsed * (self.total - self.n) / self.n)} left"
        return text

    def _emit(self, final: bool) -> None:
        self.lines_printed += 1
        print(self._line(final), file=self._stream if self._stream is not None else sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = self._clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(final=False)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.lines_printed:
                self._emit(final=True)


def make_progress(total: int, progress: bool | str | None, desc: str, *, unit: str = "it", leave: bool = False,
                  every_s: float | None = None):
    """A tqdm bar (``progress=True``), a :class:`LineProgress` (``"lines"``, a line every ``every_s``
    seconds, default :data:`DEFAULT_LINE_INTERVAL`) or ``None`` (falsy)."""
    if progress == "lines":
        return LineProgress(total, desc, every_s=DEFAULT_LINE_INTERVAL if every_s is None else every_s, unit=unit)
    if isinstance(progress, str):
        raise ValueError(f"progress must be True, False or 'lines', got {progress!r}")  # noqa: TRY004 (a wrong value)
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
