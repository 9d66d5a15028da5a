"""Atomic file writes: a reader never sees a half-written file, and a crash never destroys the
previous version.

Data go to a temporary file in the destination directory (same file system), are flushed and
fsync'ed, then the temporary file replaces the destination with :func:`os.replace`. On any error
the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any

__all__ = ["atomic_open", "atomic_write_text", "atomic_write_json", "strict_json_value"]


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w"):
    """Context manager yielding a file object whose content replaces ``path`` on success.

    ``mode`` is ``"w"`` (text, UTF-8) or ``"wb"``. The parent directory is created if needed;
    the final file has mode 0644.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports mode 'w' or 'wb', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1] or ".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def strict_json_value(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by ``None``, in nested dicts, lists and
    tuples: Python's ``json`` would write them as ``NaN`` / ``Infinity``, which strict JSON parsers
    (RFC 8259: ``jq``, JavaScript, most other languages) reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> None:
    """Write ``obj`` to ``path`` atomically as strict JSON: NaN and inf become ``null``
    (:func:`strict_json_value`); other floats that are not Python floats (numpy scalars) are
    converted with ``float``."""
    text = json.dumps(strict_json_value(obj), indent=indent, default=_plain_number, allow_nan=False)
    atomic_write_text(path, text + "\n")


def _plain_number(value: Any) -> Any:
    number = float(value)  # numpy / torch scalars; anything else raises TypeError as json would
    return number if math.isfinite(number) else None
