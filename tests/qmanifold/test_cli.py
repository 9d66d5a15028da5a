"""The ``qmanifold`` command line: fast startup (parse first, import later), one-line errors, outputs
that never clobber anything (issue 16, items 1, 2 and 7a). The molecular commands are covered in
tests/models/test_cli_safety.py."""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from qmanifold import cli
from qmanifold._clitools import DEBUG_ENV, bounded_float, check_outputs, error_message
from qmanifold.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "sympy", "numpy", "rdkit", "triton", "scipy")


def _run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    env.pop(DEBUG_ENV, None)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


# ----------------------------------------------------------------------------------------------
# startup: building the parser, --help and argument errors load no heavy module


PROBE = """
import sys
from {module} import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize(("module", "argv", "code"), [
    ("qmanifold.cli", ["--help"], 0),
    ("qmanifold.cli", ["train", "--help"], 0),
    ("qmanifold.cli", ["verify", "--help"], 0),
    ("qmanifold.cli", ["bench", "--help"], 0),
    ("qmanifold.cli", ["kernels", "--help"], 0),
    ("qmanifold.cli", ["train", "--out", "x", "--grad-clip", "nan"], 2),
    ("qmanifold.cli", ["no-such-command"], 2),
    ("qmanifold.cli", ["sample", "--checkpoint", "c.pt"], 2),  # missing --out and --data/--smiles
    ("qmanifold.models.cli", ["--help"], 0),
    ("qmanifold.models.cli", ["evaluate", "--json", "e.json"], 2),
])
def test_parsing_imports_no_heavy_module(module, argv, code):
    """Before the fix, ``import qmanifold.cli`` loaded torch and sympy (8-17 s per --help)."""
    proc = _run_python(PROBE.format(module=module, heavy=HEAVY), *argv)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "HEAVY=\n" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_build_parser_imports_no_heavy_module_and_has_every_command():
    proc = _run_python(
        "import sys\nfrom qmanifold.cli import build_parser\np = build_parser()\n"
        "sub = next(a for a in p._actions if a.dest == 'command')\n"
        "print(sorted(sub.choices))\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n")
    assert proc.returncode == 0, proc.stderr
    commands, heavy = proc.stdout.strip().splitlines()
    assert heavy == "[]"
    assert commands == str(sorted(["verify", "info", "train", "sample", "evaluate", "baseline", "benchmark", "bench",
                                      "kernels", "data", "train-boltzmann", "evaluate-boltzmann"]))


def test_import_qmanifold_is_lazy_and_complete():
    proc = _run_python(
        "import sys, qmanifold\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "from qmanifold import Quotient, LieGroup, groups\n"
        "assert qmanifold.Quotient is Quotient and Quotient.__module__ == 'qmanifold.quotient'\n"
        "assert all(getattr(qmanifold, n) is not None for n in qmanifold.__all__)\n"
        "assert set(qmanifold.__all__) <= set(dir(qmanifold))\n"
        "assert qmanifold.geometry.__name__ == 'qmanifold.geometry'\n"
        "ns = {}\nexec('from qmanifold import *', ns)\nassert set(qmanifold.__all__) <= set(ns)\n"
        "try:\n    qmanifold.no_such_name\nexcept AttributeError as exc:\n    print(exc)\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines == ["[]", "module 'qmanifold' has no attribute 'no_such_name'"]


def test_the_optional_models_import_guard_uses_the_installed_name(monkeypatch):
    """build_parser skips the molecular commands when ``qmanifold.models.cli`` is missing (the guard
    compared against the pre-namespace name ``models.cli`` and re-raised)."""
    monkeypatch.setitem(sys.modules, "qmanifold.models.cli", None)  # makes the import fail like a missing module
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert "verify" in commands and "train" not in commands


# ----------------------------------------------------------------------------------------------
# constants shown in --help agree with the modules they stand for


def test_verify_help_constants_match_the_runner():
    from qmanifold.verify.runner import DEFAULT_CONFIG, QUICK_CONFIG, available_cases, available_variants

    assert cli.VERIFY_CASES == available_cases()
    assert cli.VERIFY_VARIANTS == available_variants()
    assert cli.VERIFY_DEFAULT_TARGETS == DEFAULT_CONFIG.targets
    assert cli.VERIFY_QUICK_SIZES == (QUICK_CONFIG.n_samples, QUICK_CONFIG.steps)


def _options(parser: argparse.ArgumentParser) -> dict:
    return {a.option_strings[0]: (a.default, tuple(a.choices) if a.choices else None, a.nargs)
            for a in parser._actions if a.option_strings and a.dest not in ("help", "overwrite", "debug")}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def test_bench_and_kernels_options_match_their_modules():
    """``qmanifold bench`` / ``kernels`` declare their options here (the modules import torch); they must
    be those of qmanifold.bench.add_arguments and qmanifold.kernels.aot.register."""
    from qmanifold import bench
    from qmanifold.kernels import aot

    ref = argparse.ArgumentParser()
    bench.add_arguments(ref)
    assert _options(_subparser("bench")) == _options(ref)
    assert cli.BENCH_SECTIONS == bench.SECTIONS
    sub = argparse.ArgumentParser().add_subparsers()
    aot.register(sub, resolve_group=cli._builtin_group)
    assert _options(_subparser("kernels")) == _options(sub.choices["kernels"])


# ----------------------------------------------------------------------------------------------
# argument types


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-1", "0", "abc"])
def test_bounded_float_rejects_non_finite_and_out_of_range(text):
    with pytest.raises(argparse.ArgumentTypeError, match="finite number > 0"):
        bounded_float(gt=0)(text)
    assert bounded_float(ge=0)("0") == 0.0 and bounded_float(gt=0, lt=1)("0.5") == 0.5


@pytest.mark.parametrize("argv", [["verify", "--alpha", "nan"], ["verify", "--alpha", "1.5"],
                                  ["verify", "--seed", "-1"], ["bench", "--repeats", "0"],
                                  ["kernels", "--arch", "-90"]])
def test_bad_numbers_are_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error: argument" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# outputs of the core commands


def test_verify_refuses_an_existing_json_before_any_work(tmp_path, capsys, monkeypatch):
    from qmanifold.verify import runner

    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    out = tmp_path / "v.json"
    out.write_text("keep me")
    assert cli.main(["verify", "--json", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --json {out} already exists; pass --overwrite to replace it"
    assert out.read_text() == "keep me"


def test_verify_output_collisions_and_directories(tmp_path, capsys, monkeypatch):
    from qmanifold.verify import runner

    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    assert cli.main(["verify", "--json", str(tmp_path), "--no-progress"]) == 2
    assert "it is a directory" in capsys.readouterr().err
    plots = tmp_path / "plots"
    assert cli.main(["verify", "--json", str(plots), "--plots", str(plots), "--no-progress"]) == 2
    assert "would be overwritten by the plots" in capsys.readouterr().err
    plots.mkdir()
    (plots / "so2__quotient_ode.png").write_bytes(b"old")
    assert cli.main(["verify", "--plots", str(plots), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already holds plots (so2__quotient_ode.png)" in err and "--overwrite" in err


def test_a_json_path_that_is_a_directory_fails_at_once(tmp_path, capsys):
    for argv in (["verify"], ["bench"], ["kernels"], ["verify", "--trained"]):
        assert cli.main([*argv, "--json", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: cannot write --json {tmp_path}: it is a directory; give a file name\n", argv


def test_bench_refuses_to_overwrite_without_the_flag(tmp_path, capsys, monkeypatch):
    from qmanifold import bench

    out = tmp_path / "b.json"
    out.write_text("[]")
    monkeypatch.setattr(bench, "handler", lambda args: 0)
    assert cli.main(["bench", "--json", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["bench", "--json", str(out), "--overwrite"]) == 0


def test_read_only_and_full_file_systems_fail_before_the_work(tmp_path, capsys, monkeypatch):
    from qmanifold.verify import runner

    monkeypatch.setattr(runner, "run_suite", lambda *a, **k: pytest.fail("the suite ran"))
    out = tmp_path / "sub" / "v.json"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert cli.main(["verify", "--json", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: cannot write --json {out}: {os.strerror(errno.EROFS)}\n"

    def full(*args, **kwargs):  # a probe file on a full disk: writing to /dev/full fails with ENOSPC
        return os.open("/dev/full", os.O_WRONLY), str(tmp_path / "never-created")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    assert cli.main(["verify", "--json", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: cannot write --json {out}: {os.strerror(errno.ENOSPC)}\n"
    assert not out.exists()


def test_an_output_is_never_a_special_file(tmp_path):
    with pytest.raises(InputError, match="not a regular file"):
        check_outputs({}, {"--json": "/dev/null"}, overwrite=True)
    target = tmp_path / "in.sdf"
    target.write_text("x")
    link = tmp_path / "link.sdf"
    link.symlink_to(target)
    with pytest.raises(InputError, match="is the --samples input"):
        check_outputs({"--samples": str(target)}, {"--json": str(link)}, overwrite=True)


# ----------------------------------------------------------------------------------------------
# errors: one line, or the traceback with --debug / QMANIFOLD_DEBUG


def test_unknown_group_is_one_line(capsys):
    assert cli.main(["info", "Nope"]) == 2
    assert capsys.readouterr().err == "error: unknown group 'Nope'; try SE3, SO3, SE2, SO2, Torus2\n"


def test_debug_flag_and_environment_show_the_traceback(monkeypatch, capsys):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(InputError, match="unknown group"):
        cli.main(["--debug", "info", "Nope"])
    with pytest.raises(InputError, match="unknown group"):
        cli.main(["info", "Nope", "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(InputError, match="unknown group"):
        cli.main(["info", "Nope"])
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert cli.main(["info", "Nope"]) == 2


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    """Only expected errors become one line: a bug (here a TypeError) is not hidden."""
    def bug(args):
        raise TypeError("a bug")

    monkeypatch.setattr(cli, "_run_info", bug)
    with pytest.raises(TypeError, match="a bug"):
        cli.main(["info"])


def test_error_messages_are_one_line():
    assert error_message(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/y.json")) == \
        f"/x/y.json: {os.strerror(errno.ENOSPC)}"
    assert error_message(ValueError("first line\n  second line\n")) == "first line second line"
    assert error_message(KeyError("missing key 'x'")) == "missing key 'x'"
    missing = ModuleNotFoundError("No module named 'rdkit'", name="rdkit")
    assert "qmanifold[molecules]" in error_message(missing)


def test_subprocess_error_is_one_line_without_traceback(tmp_path):
    out = tmp_path / "v.json"
    out.write_text("{}")
    proc = _run_python("import sys\nfrom qmanifold.cli import main\nsys.exit(main(sys.argv[1:]))",
                       "verify", "--json", str(out))
    assert proc.returncode == 2
    assert proc.stderr == f"error: --json {out} already exists; pass --overwrite to replace it\n"
    assert json.loads(out.read_text()) == {}


def test_a_closed_pipe_ends_quietly():
    """``qmanifold info SO2 | head -1``: the reader closes the pipe early; no 'error: Broken pipe'."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(DEBUG_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "qmanifold.cli", "info", "SO2"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the command prints anything (it first imports torch and sympy)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err
