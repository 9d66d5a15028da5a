"""Plumbing shared by the command lines (``qmanifold`` and ``python -m qmanifold.models.cli``).

This module imports the standard library only: the parsers are built, and the arguments parsed and
checked, before torch, numpy, sympy or RDKit load (they load in the command handlers).

* Argument types that reject bad numbers at parse time (:func:`positive_int`,
  :func:`nonnegative_int`, :func:`bounded_float`): ``nan``, ``inf`` and values of the wrong sign
  are an argument error (exit status 2), never a silently different behaviour.
* :func:`run_handler`: an expected failure (:class:`~qmanifold.errors.InputError`, any
  ``ValueError``, ``OSError``: missing, unreadable or unwritable files, a full or read-only file
  system; a missing optional dependency) becomes one line ``error: ...`` on stderr and exit status 2.
  ``--debug`` or the environment variable ``QMANIFOLD_DEBUG=1`` re-raises it with its traceback.
* :func:`check_outputs` and :func:`check_run_dir`: before any expensive work, no output may be one
  of the command's inputs or another output, an existing output is refused unless ``--overwrite``
  is given, and every output location is created and test-written (without touching the output
  itself), so that a directory, a read-only or a full file system fails at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping

from .errors import InputError

__all__ = [
    "DEBUG_ENV", "EXPECTED_ERRORS", "RUN_FILES", "PROBE_PREFIX",
    "positive_int", "nonnegative_int", "bounded_float", "add_debug_flag", "debug_enabled", "error_message",
    "run_handler", "require_file", "check_outputs", "check_run_dir", "remove_run_files",
]

#: environment variable that, set to 1, makes expected errors show their traceback (like ``--debug``)
DEBUG_ENV = "QMANIFOLD_DEBUG"

#: exceptions that mean "the input (a file, an option, the environment) is wrong", not a bug.
#: InputError, CheckpointError and the like are ValueErrors; FileNotFoundError, FileExistsError,
#: PermissionError, IsADirectoryError, a full disk (ENOSPC) and a read-only file system (EROFS)
#: are OSErrors; ImportError is a missing optional dependency (RDKit, matplotlib, Triton).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, ImportError, FloatingPointError, KeyError)

#: the files ``train`` writes into its run directory
RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "config.json", "summary.json")

#: name prefix of the short-lived files written to test that a location is writable
PROBE_PREFIX = ".qmanifold-probe-"

_EXTRAS = {"rdkit": "molecules", "matplotlib": "plots", "triton": "gpu", "geomstats": "geomstats"}


# ----------------------------------------------------------------------------------------------
# argument types


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def bounded_float(*, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                  le: float | None = None) -> Callable[[str], float]:
    """argparse type factory: a finite float in the given bounds.

    ``bounded_float(ge=0)`` accepts ``0``, ``1e-3``; it rejects ``nan``, ``inf`` and ``-1`` with a
    message that states the accepted range (argparse prefixes the option name).
    """
    parts = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
             f"< {lt:g}" if lt is not None else "", f"<= {le:g}" if le is not None else ""]
    wanted = "a finite number" + "".join(f" {p}" if i == 0 else f" and {p}" for i, p in enumerate(q for q in parts if q))

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        ok = (math.isfinite(value) and (gt is None or value > gt) and (ge is None or value >= ge)
              and (lt is None or value < lt) and (le is None or value <= le))
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value

    convert.__name__ = "finite float"
    return convert


# ----------------------------------------------------------------------------------------------
# errors


def add_debug_flag(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """Add ``--debug``. On a subcommand's parser its default is suppressed, so that
    ``qmanifold --debug train ...`` and ``qmanifold train ... --debug`` both work."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if subcommand else False,
                        help=f"show the traceback of an error instead of one line (also: {DEBUG_ENV}=1)")


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` was given or ``QMANIFOLD_DEBUG`` is set to something other than 0/false/no."""
    if args is not None and getattr(args, "debug", False):
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def error_message(exc: BaseException) -> str:
    """One line describing an expected error."""
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    elif isinstance(exc, ModuleNotFoundError) and exc.name:
        root = exc.name.split(".")[0]
        extra = _EXTRAS.get(root)
        hint = f" (pip install 'qmanifold[{extra}]')" if extra else ""
        msg = f"this needs the optional package {root!r}, which is not installed{hint}"
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None and len(exc.args) <= 2:
        # the standard form "[Errno 28] No space left on device: 'x'" -> "x: No space left on device"
        msg = f"{os.fsdecode(exc.filename)}: {exc.strerror}"
    else:
        msg = str(exc)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    return " ".join(lines) if lines else type(exc).__name__


def run_handler(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``func(args)`` as an exit status; an expected error is printed as ``error: ...`` (exit 2)."""
    try:
        code = int(func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe (``qmanifold info | head -1``) is reported below
        return code
    except BrokenPipeError:
        if debug_enabled(args):
            raise
        # the reader went away: stop quietly (and keep Python from complaining when it flushes at exit)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the closed pipe
    except EXPECTED_ERRORS as exc:
        if debug_enabled(args):
            raise
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# inputs and outputs


def require_file(option: str, path: str) -> None:
    """``path`` (the value of ``option``) is an existing file; raises :class:`InputError`."""
    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "not found"
        raise InputError(f"{option} {path}: {what}")


def _same(a: str, b: str) -> bool:
    """The two paths name the same file: equal resolved paths, or (both existing) the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def _inside(path: str, directory: str) -> bool:
    """``path`` resolves to an entry directly in ``directory``."""
    return os.path.dirname(os.path.realpath(path)) == os.path.realpath(directory)


def _listing(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if not n.startswith(PROBE_PREFIX))


def _probe(option: str, path: str, directory: str) -> None:
    """Create ``directory`` and write, sync and delete a small file in it."""
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except OSError as exc:
        raise InputError(f"cannot write {option} {path}: {exc.strerror or exc}") from exc


def check_outputs(inputs: Mapping[str, str | None], files: Mapping[str, str | None],
                  dirs: Mapping[str, str | None] | None = None, *, overwrite: bool = False) -> None:
    """Check the outputs of a command before it does any work; raises :class:`InputError`.

    Args:
        inputs: option -> path of each file the command reads (``None`` or a path that does not
            exist, such as a dataset name, is ignored).
        files: option -> path of each output file (``None``: not requested).
        dirs: option -> directory into which the command writes ``*.png`` files (``--plots``).
        overwrite: allow replacing an existing output file (or PNG files in an output directory).

    Refused: an output that is one of the inputs (resolved paths, or the same file through a link),
    two outputs that are the same, an output file that is a directory or not a regular file, an
    existing output without ``overwrite``, an output directory that is a file. Then each output's
    directory is created and a small file is written to it and deleted, so that a read-only or
    full file system fails here (``cannot write --json PATH: <reason>``), not after the work.
    """
    ins = [(opt, p) for opt, p in inputs.items() if p and os.path.exists(p)]
    outs = [(opt, os.fspath(p)) for opt, p in files.items() if p]
    out_dirs = [(opt, os.fspath(p)) for opt, p in (dirs or {}).items() if p]
    for opt, path in outs:
        if os.path.isdir(path):
            raise InputError(f"cannot write {opt} {path}: it is a directory; give a file name")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise InputError(f"cannot write {opt} {path}: it exists and is not a regular file")
        for in_opt, in_path in ins:
            if _same(path, in_path):
                raise InputError(f"{opt} {path} is the {in_opt} input; refusing to write over an input "
                                 f"(choose another {opt})")
    for opt, path in out_dirs:
        if os.path.exists(path) and not os.path.isdir(path):
            raise InputError(f"cannot write {opt} {path}: it exists and is not a directory")
        for in_opt, in_path in ins:
            if _same(path, in_path) or (_inside(in_path, path) and in_path.lower().endswith(".png")):
                raise InputError(f"{opt} {path} would write over the {in_opt} input {in_path}")
    for i, (opt, path) in enumerate(outs):
        for opt2, path2 in outs[i + 1:]:
            if _same(path, path2):
                raise InputError(f"{opt} and {opt2} are the same file ({path}); give two different files")
        for dopt, dpath in out_dirs:
            if _same(path, dpath) or (_inside(path, dpath) and path.lower().endswith(".png")):
                raise InputError(f"{opt} {path} would be overwritten by the plots in {dopt} {dpath}")
    if not overwrite:
        for opt, path in outs:
            if os.path.lexists(path):
                raise InputError(f"{opt} {path} already exists; pass --overwrite to replace it")
        for opt, path in out_dirs:
            if os.path.isdir(path):
                pngs = [n for n in _listing(path) if n.lower().endswith(".png")]
                if pngs:
                    raise InputError(f"{opt} {path} already holds plots ({', '.join(pngs[:3])}"
                                     f"{', ...' if len(pngs) > 3 else ''}); pass --overwrite to replace them")
    for opt, path in outs:
        _probe(opt, path, os.path.dirname(os.path.abspath(path)))
    for opt, path in out_dirs:
        _probe(opt, path, os.path.abspath(path))


def check_run_dir(path: str, inputs: Mapping[str, str | None], *, resume: bool, overwrite: bool,
                  option: str = "--out") -> list[str]:
    """Check the run directory of ``train`` before any work; raises :class:`InputError`.

    Without ``resume`` the directory must be new or empty, so that no file in it is replaced by
    accident; with ``overwrite`` a non-empty directory is accepted and the files of a previous run
    (:data:`RUN_FILES`) that it holds are returned, for :func:`remove_run_files`. An input (the
    ``--data`` file) may not be one of those files. Then the directory is created and test-written.
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite contradict each other: --resume continues the run in "
                         f"{option}, --overwrite starts a new one there")
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"cannot write {option} {path}: it exists and is not a directory (the run directory)")
    stale: list[str] = []
    if os.path.isdir(path):
        present = _listing(path)
        if present and not resume and not overwrite:
            shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
            raise InputError(f"{option} {path} is not empty ({shown}); pass --resume to continue the run "
                             f"there, --overwrite to start a new run in it, or choose another {option}")
        if overwrite:
            stale = [os.path.join(path, n) for n in RUN_FILES if os.path.lexists(os.path.join(path, n))]
    for in_opt, in_path in inputs.items():
        if in_path and os.path.exists(in_path):
            if _same(path, in_path):
                raise InputError(f"{option} {path} is the {in_opt} input")
            if any(_same(s, in_path) for s in stale):
                raise InputError(f"{in_opt} {in_path} is a file of the previous run that --overwrite would delete")
    _probe(option, path, os.path.abspath(path))
    return stale


def remove_run_files(paths: Iterable[str]) -> None:
    """Delete the files of a previous run (``train --overwrite``)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)

