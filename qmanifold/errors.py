"""Exceptions that mean "the input was wrong", as opposed to a bug.

The command-line layer turns an :class:`InputError` (and ``OSError`` from the file system) into one
line, ``error: <message>``, and exit status 2; every other exception is a bug and keeps its
traceback. Library code raises :class:`InputError` (or a subclass) with a message that names the
offending file, option or argument. It subclasses ``ValueError`` so that callers who catch
``ValueError`` keep working.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad user input: a file, option or argument that cannot be used, with a message naming it."""
