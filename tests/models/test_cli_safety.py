"""The molecular commands never destroy a user's file, check their outputs before the work, and
report expected failures as one line ``error: ...`` with exit status 2 (issue 16, items 1 and 2).

Each test reproduces a reported case; the tiny checkpoint (2 steps, hidden 16, 1 layer) is shared.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qmanifold._clitools import DEBUG_ENV
from qmanifold.errors import InputError
from qmanifold.models.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "qm9-extract", "--steps", "2", "--hidden", "16", "--layers", "1", "--batch-size", "4",
        "--val-limit", "8", "--val-every", "2", "--ckpt-every", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli_safety") / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    return run


def one_error_line(capsys) -> str:
    """The captured stderr, checked to be exactly one line ``error: ...``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ----------------------------------------------------------------------------------------------
# 1. never destroy a user's file


def test_sample_never_writes_over_its_checkpoint(run_dir, tmp_path, capsys):
    """Reported: ``sample --checkpoint runs/c/best.pt --out runs/c/best.pt`` exited 0 and the checkpoint
    became SDF text."""
    ckpt = run_dir / "best.pt"
    before = ckpt.read_bytes()
    link = tmp_path / "link.pt"
    link.symlink_to(ckpt)
    hard = tmp_path / "hard.pt"
    os.link(ckpt, hard)
    spelled = str(run_dir / ".." / run_dir.name / "best.pt")
    for option, path, checkpoint in [("--out", ckpt, ckpt), ("--out", spelled, ckpt), ("--out", link, ckpt),
                                     ("--out", hard, ckpt), ("--xyz", ckpt, ckpt), ("--out", ckpt, link)]:
        outs = {"--out": str(tmp_path / "s.sdf"), option: str(path)}
        argv = ["sample", "--checkpoint", str(checkpoint), "--smiles", "CC", "--steps", "2", "--no-progress",
                "--overwrite"]
        for opt, p in outs.items():
            argv += [opt, p]
        assert main(argv) == 2, (option, path)
        err = one_error_line(capsys)
        assert f"{option} {path} is the --checkpoint input" in err, err
        assert ckpt.read_bytes() == before


def test_an_existing_output_is_replaced_only_with_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "samples.sdf"
    out.write_text("my precious results\n")
    argv = ["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--steps", "2", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 2
    assert one_error_line(capsys) == f"error: --out {out} already exists; pass --overwrite to replace it"
    assert out.read_text() == "my precious results\n"
    assert main([*argv, "--overwrite"]) == 0
    assert out.read_text().rstrip().endswith("$$$$")


def test_outputs_must_differ_from_each_other(run_dir, tmp_path, capsys):
    out = tmp_path / "s.sdf"
    assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--out", str(out),
                 "--xyz", str(out), "--no-progress"]) == 2
    assert "--out and --xyz are the same file" in one_error_line(capsys)
    assert not out.exists()


def test_baseline_never_writes_over_its_data(tmp_path, capsys):
    data = tmp_path / "mols.sdf"
    data.write_text("not parsed: the check comes first\n")
    assert main(["baseline", "--data", str(data), "--out", str(data), "--overwrite", "--no-progress"]) == 2
    assert f"--out {data} is the --data input" in one_error_line(capsys)
    assert data.read_text() == "not parsed: the check comes first\n"


def test_evaluate_never_writes_over_its_samples(run_dir, tmp_path, capsys):
    sdf = tmp_path / "s.sdf"
    assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--steps", "2",
                 "--out", str(sdf), "--no-progress"]) == 0
    before = sdf.read_bytes()
    assert main(["evaluate", "--samples", str(sdf), "--json", str(sdf), "--overwrite", "--no-progress"]) == 2
    assert f"--json {sdf} is the --samples input" in one_error_line(capsys)
    assert main(["evaluate", "--samples", str(sdf), "--json", str(tmp_path / "e.json"), "--plots", str(sdf),
                 "--no-progress"]) == 2
    assert "--plots" in one_error_line(capsys)
    assert sdf.read_bytes() == before


def test_train_refuses_a_non_empty_run_directory(tmp_path, capsys):
    """Reported: a directory with best.pt, log.jsonl, config.json but no last.pt was silently overwritten."""
    run = tmp_path / "run"
    run.mkdir()
    old = {"best.pt": b"old best", "log.jsonl": b'{"old": 1}\n', "config.json": b"{}\n", "notes.txt": b"mine"}
    for name, data in old.items():
        (run / name).write_bytes(data)
    assert main(["train", *TINY, "--out", str(run)]) == 2
    err = one_error_line(capsys)
    assert f"--out {run} is not empty (best.pt, config.json, log.jsonl, notes.txt)" in err and "--resume" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == old
    assert main(["train", *TINY, "--out", str(run), "--resume", "--overwrite"]) == 2
    assert "contradict" in one_error_line(capsys)
    # --overwrite: a new run; the previous run's files are replaced, other files kept
    assert main(["train", *TINY, "--out", str(run), "--overwrite"]) == 0
    assert (run / "best.pt").read_bytes() != old["best.pt"] and (run / "last.pt").exists()
    assert (run / "notes.txt").read_bytes() == b"mine"
    capsys.readouterr()
    file_out = tmp_path / "a_file"
    file_out.write_text("x")
    assert main(["train", *TINY, "--out", str(file_out)]) == 2
    assert "is not a directory" in one_error_line(capsys)


def test_an_empty_run_directory_is_accepted(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    assert main(["train", *TINY, "--out", str(run)]) == 0
    assert (run / "last.pt").exists()


# ----------------------------------------------------------------------------------------------
# outputs are checked before the expensive work


def _forbid(monkeypatch, module: str, name: str) -> None:
    import importlib

    monkeypatch.setattr(importlib.import_module(module), name,
                        lambda *a, **k: pytest.fail(f"{name} ran although the output cannot be written"))


def test_evaluate_checks_its_json_before_the_work(run_dir, tmp_path, capsys, monkeypatch):
    """Reported: ``evaluate`` did all its work and then failed to write the JSON."""
    sdf = tmp_path / "s.sdf"
    assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--steps", "2",
                 "--out", str(sdf), "--no-progress"]) == 0
    _forbid(monkeypatch, "qmanifold.models.evaluation", "evaluate_samples")
    assert main(["evaluate", "--samples", str(sdf), "--json", str(tmp_path), "--no-progress"]) == 2
    assert one_error_line(capsys) == f"error: cannot write --json {tmp_path}: it is a directory; give a file name"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "ro" / "e.json"
    assert main(["evaluate", "--samples", str(sdf), "--json", str(out), "--no-progress"]) == 2
    assert one_error_line(capsys) == f"error: cannot write --json {out}: {os.strerror(errno.EROFS)}"


@pytest.mark.parametrize("command", ["sample", "baseline", "train"])
def test_full_disk_fails_before_the_work(run_dir, tmp_path, capsys, monkeypatch, command):
    def full(*args, **kwargs):  # the probe file lands on a "full disk": /dev/full fails writes with ENOSPC
        return os.open("/dev/full", os.O_WRONLY), str(tmp_path / "never-created")

    _forbid(monkeypatch, "qmanifold.models.training", "load_molecules")
    _forbid(monkeypatch, "qmanifold.models.training", "load_checkpoint")
    monkeypatch.setattr(tempfile, "mkstemp", full)
    out = tmp_path / ("run" if command == "train" else "out.sdf")
    argv = {"sample": ["sample", "--checkpoint", str(run_dir / "best.pt"), "--data", "qm9-extract"],
            "baseline": ["baseline", "--data", "qm9-extract"], "train": ["train", *TINY]}[command]
    assert main([*argv, "--out", str(out)]) == 2
    assert one_error_line(capsys) == f"error: cannot write --out {out}: {os.strerror(errno.ENOSPC)}"


def test_a_write_that_fails_at_the_end_is_one_line(run_dir, tmp_path, capsys, monkeypatch):
    """The disk can still fill up during the work: the OSError of the final write is reported cleanly."""
    from qmanifold.models import sampling

    def disk_full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(sampling, "atomic_write_text", disk_full)
    out = tmp_path / "s.sdf"
    assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--steps", "2",
                 "--out", str(out), "--no-progress"]) == 2
    assert one_error_line(capsys) == f"error: {out}: {os.strerror(errno.ENOSPC)}"


# ----------------------------------------------------------------------------------------------
# 2. one clean error for expected failures


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    noise = tmp_path / "noise.npz"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    return {"empty": empty, "noise": noise}


@pytest.mark.parametrize("case", ["train-empty", "evaluate-empty", "baseline-empty", "train-noise", "sample-noise"])
def test_bad_data_files_give_one_line_naming_the_file(case, run_dir, bad_files, tmp_path, capsys):
    command, which = case.split("-")
    path = bad_files[which]
    argv = {
        "train": ["train", *TINY[2:], "--data", str(path), "--out", str(tmp_path / "r")],
        "evaluate": ["evaluate", "--samples", str(path), "--json", str(tmp_path / "e.json"), "--no-progress"],
        "baseline": ["baseline", "--data", str(path), "--out", str(tmp_path / "b.sdf"), "--no-progress"],
        "sample": ["sample", "--checkpoint", str(run_dir / "best.pt"), "--data", str(path),
                   "--out", str(tmp_path / "s.sdf"), "--no-progress"],
    }[command]
    assert main(argv) == 2
    assert str(path.name) in one_error_line(capsys)
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "b.sdf").exists()


def test_unknown_element_is_one_line(tmp_path, capsys):
    assert main(["baseline", "--smiles", "C[Si](C)(C)C", "--out", str(tmp_path / "b.sdf"), "--no-progress"]) == 2
    err = one_error_line(capsys)
    assert "C[Si](C)(C)C" in err and "Si outside" in err, err
    assert not (tmp_path / "b.sdf").exists()


@pytest.mark.parametrize(("kwargs", "expected"), [
    ('{"bogus": 1}', "'bogus' is not an argument of the EGNNDenoiser (egnn) model; valid keys: "),
    ('{"num_atom_types": 3}', "'num_atom_types' cannot be given here"),
    ('[1, 2]', "--model-kwargs must be a JSON object"),
    ("{bogus: 1}", "--model-kwargs is not valid JSON"),
])
def test_model_kwargs_are_validated(kwargs, expected, tmp_path, capsys, monkeypatch):
    """Reported: ``--model-kwargs '{"bogus": 1}'`` ended in a raw TypeError traceback."""
    _forbid(monkeypatch, "qmanifold.models.training", "train")
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--model-kwargs", kwargs]) == 2
    err = one_error_line(capsys)
    assert expected in err, err
    if "bogus" in expected:
        assert "hidden" not in err.split("valid keys: ")[1].split(", ")  # given by --hidden already
        assert "layers" not in err.split("valid keys: ")[1].split(", ")


@pytest.mark.parametrize("argv", [
    ["train", "--out", "r", "--grad-clip", "nan"], ["train", "--out", "r", "--grad-clip", "-1"],
    ["train", "--out", "r", "--lr", "0"], ["train", "--out", "r", "--lr", "inf"], ["train", "--out", "r", "--lr", "nan"],
    ["train", "--out", "r", "--ema", "1"], ["train", "--out", "r", "--ema", "nan"],
    ["train", "--out", "r", "--weight-decay", "-0.1"], ["train", "--out", "r", "--warmup", "-5"],
    ["train", "--out", "r", "--seed", "-1"],
    ["evaluate", "--samples", "s.sdf", "--json", "e.json", "--threshold", "nan"],
    ["evaluate", "--samples", "s.sdf", "--json", "e.json", "--threshold", "0"],
])
def test_bad_numbers_are_rejected_at_parsing(argv, capsys, tmp_path, monkeypatch):
    """Reported: ``--grad-clip nan`` silently turned clipping off."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert f"argument {argv[-2]}: expected" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["evaluate", "--samples", str(tmp_path / "none.sdf"), "--json", str(tmp_path / "e.json")]
    assert main(argv) == 2
    assert one_error_line(capsys) == f"error: --samples {tmp_path / 'none.sdf'}: not found"
    with pytest.raises(InputError, match="not found"):
        main(["--debug", *argv])
    with pytest.raises(InputError, match="not found"):
        main([*argv, "--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(InputError, match="not found"):
        main(argv)


def test_standalone_module_prints_one_line(bad_files, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(DEBUG_ENV, None)
    cmd = [sys.executable, "-m", "qmanifold.models.cli", "evaluate", "--samples", str(bad_files["empty"]),
           "--json", str(tmp_path / "e.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "empty.sdf" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run([*cmd, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_sample_without_a_bar_still_reports(run_dir, tmp_path, capsys, monkeypatch):
    """Reported (issue 14): ``sample --no-progress`` printed nothing for 4-12 minutes. Without the bar
    it writes status lines to stderr (one per minute, then one at the end; here the minute is
    shortened to 0 s so that a 2-step run shows them)."""
    import qmanifold.progress

    monkeypatch.setattr(qmanifold.progress, "DEFAULT_LINE_INTERVAL", 0.0)
    out = tmp_path / "s.sdf"
    assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--steps", "2",
                 "--n-per-molecule", "3", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "[qmanifold] sampling (ode, 2 steps): 3/3 conf (100 %)" in err and "(done)" in err, err
    monkeypatch.setattr(qmanifold.progress, "DEFAULT_LINE_INTERVAL", 60.0)  # a short run stays quiet
    assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CO", "--steps", "2",
                 "--no-progress", "--out", str(out), "--overwrite"]) == 0
    assert "sampling (ode" not in capsys.readouterr().err


def test_sample_time_grid_reaches_the_sampler(run_dir, tmp_path):
    """``--time-grid edm`` changes the steps (same seed, other conformers); an unknown grid is refused."""
    texts = {}
    for grid in ("uniform", "edm"):
        out = tmp_path / f"{grid}.sdf"
        assert main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CCO", "--steps", "4",
                     "--refine", "none", "--time-grid", grid, "--no-progress", "--out", str(out)]) == 0
        texts[grid] = out.read_text()
    assert texts["uniform"] != texts["edm"]
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(run_dir / "best.pt"), "--smiles", "CCO", "--time-grid", "cosine"])
