"""Tests for models.training: loss decrease, exact resume, checkpoints, DDP (2 CPU processes).

Tiny EGNNs (hidden 32, 2 layers) on the committed QM9 extract; the file runs in well under a
minute on 2 cores.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qmanifold.models.training import (
    CheckpointError,
    TrainConfig,
    diffusion_from_checkpoint,
    epoch_batches,
    learning_rate,
    load_checkpoint,
    read_log,
    save_checkpoint,
    train,
    validation_losses,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(data="qm9-extract", model="egnn", hidden=32, layers=2, batch_size=16, progress=False, threads=1,
            val_limit=48, model_kwargs={"edge_dim": 8, "num_rbf": 16})


def cfg(tmp_path, name, **kw):
    base = dict(TINY)
    base.update(kw)
    return TrainConfig(out=str(tmp_path / name), **base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by several tests (12 steps, validation and checkpoints every 6)."""
    tmp = tmp_path_factory.mktemp("trained")
    c = TrainConfig(out=str(tmp / "run"), steps=12, val_every=6, ckpt_every=6, seed=3, **TINY)
    summary = train(c)
    return c, summary


# ----------------------------------------------------------------------------------------------
# pure functions


def test_learning_rate_schedule():
    assert learning_rate(0, 1.0, 100, warmup=10) == pytest.approx(0.1)
    assert learning_rate(9, 1.0, 100, warmup=10, schedule="constant") == pytest.approx(1.0)
    lrs = [learning_rate(s, 1.0, 100, warmup=0, min_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_epoch_batches_shard_disjointly_and_deterministically():
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 30, size=203)
    full = epoch_batches(sizes, 8, seed=1, epoch=2)
    r0 = epoch_batches(sizes, 8, seed=1, epoch=2, rank=0, world_size=2)
    r1 = epoch_batches(sizes, 8, seed=1, epoch=2, rank=1, world_size=2)
    assert r0 == epoch_batches(sizes, 8, seed=1, epoch=2, rank=0, world_size=2)
    assert len(r0) == len(r1) == len(full) // 2
    assert r0 + r1 != [] and not set(map(tuple, r0)) & set(map(tuple, r1))
    assert sorted(map(tuple, r0 + r1)) == sorted(map(tuple, full[: 2 * len(r0)]))
    assert epoch_batches(sizes, 8, seed=1, epoch=3) != full  # reshuffled per epoch
    with pytest.raises(ValueError, match="cannot be shared"):
        epoch_batches(sizes[:4], 8, seed=0, epoch=0, world_size=2)


def test_config_validation_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        train(cfg(tmp_path, "x", model="nope", steps=1))
    with pytest.raises(ValueError, match="unknown loss"):
        train(cfg(tmp_path, "x", loss="nope", steps=1))
    with pytest.raises(ValueError, match="ema"):
        train(cfg(tmp_path, "x", ema=1.5, steps=1))
    assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------------------------
# training


def test_training_reduces_validation_loss(tmp_path):
    c = cfg(tmp_path, "dec", steps=60, lr=3e-3, warmup=5, val_every=60, ckpt_every=60, ema=0.0, seed=0)
    from qmanifold.models.data import collate_molecules
    from qmanifold.models.networks import build_denoiser
    from qmanifold.models.training import _to_device, dataset_split, load_molecules, select_rows

    ds = load_molecules("qm9-extract")
    val = dataset_split(ds, "valid")
    val = val.subset(select_rows(len(val), c.val_limit, seed=1))
    order = np.argsort(val.num_atoms, kind="stable")
    batches = [_to_device(collate_molecules([val[int(i)] for i in order[s:s + 64]]), torch.device("cpu"), torch.float32)
               for s in range(0, len(order), 64)]
    torch.manual_seed(c.seed)
    init = build_denoiser("egnn", **c.model_config(5))
    before = validation_losses(init, batches, "quotient", "linear", "x1", False, torch.device("cpu"), torch.float32)
    summary = train(c)
    after = summary["last_val"]
    assert after["val_quotient"] < 0.9 * before["val_quotient"], (before, after)
    logged = read_log(tmp_path / "dec" / "log.jsonl", "val")
    assert logged[-1]["val_quotient"] == pytest.approx(after["val_quotient"])
    losses = [r["loss"] for r in read_log(tmp_path / "dec" / "log.jsonl", "train")]
    assert len(losses) == 60 and np.mean(losses[-20:]) < np.mean(losses[:10])


def test_run_files_and_checkpoint_contents(trained):
    c, _ = trained
    out = c.out
    for name in ("last.pt", "best.pt", "log.jsonl", "config.json", "summary.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    ck = load_checkpoint(os.path.join(out, "last.pt"))
    assert ck["step"] == 12 and ck["model"]["name"] == "egnn" and ck["model"]["config"]["hidden"] == 32
    assert ck["diffusion"]["loss"] == "quotient" and ck["data"]["data"] == "qm9-extract"
    assert ck["data"]["elements"] == [1, 6, 7, 8, 9] and ck["ema_state_dict"] is not None
    assert ck["config"]["seed"] == 3 and "optimizer" in ck and len(ck["rng"]["generators"]) == 1
    vals = read_log(os.path.join(out, "log.jsonl"), "val")
    assert [v["step"] for v in vals] == [6, 12]
    assert {"val_loss", "val_quotient", "val_conventional", "time"} <= set(vals[0])
    best = load_checkpoint(os.path.join(out, "best.pt"))
    assert best["best_val"] == pytest.approx(min(v["val_loss"] for v in vals))
    qd = diffusion_from_checkpoint(ck)
    assert qd.loss_type == "quotient" and not qd.denoiser.training


def test_resume_continues_identically(tmp_path):
    common = dict(steps=12, val_every=6, ckpt_every=4, seed=5)
    full = train(cfg(tmp_path, "full", **common))
    assert full["step"] == 12 and full["finished"]
    part = train(cfg(tmp_path, "part", stop_after=5, **common))
    assert part["step"] == 5 and not part["finished"]
    ck = load_checkpoint(tmp_path / "part" / "last.pt")
    assert ck["step"] == 5
    resumed = train(cfg(tmp_path, "part", resume=True, **common))
    assert resumed["step"] == 12 and resumed["finished"]
    a = [r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl", "train")]
    b = [r["loss"] for r in read_log(tmp_path / "part" / "log.jsonl", "train")]
    assert len(a) == len(b) == 12
    assert a == b  # bit-identical loss sequence
    va = [r["val_loss"] for r in read_log(tmp_path / "full" / "log.jsonl", "val")]
    vb = [r["val_loss"] for r in read_log(tmp_path / "part" / "log.jsonl", "val")]
    assert va == vb
    wa = load_checkpoint(tmp_path / "full" / "last.pt")["model"]["state_dict"]
    wb = load_checkpoint(tmp_path / "part" / "last.pt")["model"]["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_run_needs_resume(trained, tmp_path):
    c, _ = trained
    with pytest.raises(FileExistsError, match="--resume"):
        train(TrainConfig(**{**c.to_dict(), "steps": 13}))


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    s = train(cfg(tmp_path, "fresh", steps=2, resume=True, val_every=2, ckpt_every=2))
    assert s["step"] == 2


# ----------------------------------------------------------------------------------------------
# bad checkpoints


def test_truncated_checkpoint_clear_error(trained, tmp_path):
    c, _ = trained
    data = Path(c.out, "last.pt").read_bytes()
    bad = tmp_path / "trunc.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_checkpoint(bad)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(junk)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_foreign_checkpoint_clear_error(trained, tmp_path):
    c, _ = trained
    sd = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(3, 3).state_dict(), sd)
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_checkpoint(sd)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "model": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a qmanifold checkpoint"):
        load_checkpoint(other)
    ck = load_checkpoint(os.path.join(c.out, "last.pt"))
    ck["model"]["config"] = {**ck["model"]["config"], "hidden": 48}  # weights from another model
    with pytest.raises(CheckpointError, match="do not fit"):
        diffusion_from_checkpoint(ck)
    ck2 = load_checkpoint(os.path.join(c.out, "last.pt"))
    ck2["model"]["name"] = "resnet"
    with pytest.raises(CheckpointError, match="not a registered denoiser"):
        diffusion_from_checkpoint(ck2)


def test_resume_from_corrupted_last_is_an_error(tmp_path):
    c = cfg(tmp_path, "corrupt", steps=3, val_every=3, ckpt_every=3)
    train(c)
    path = tmp_path / "corrupt" / "last.pt"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        train(cfg(tmp_path, "corrupt", steps=6, resume=True, val_every=3, ckpt_every=3))


def test_checkpoint_write_is_atomic(trained, tmp_path, monkeypatch):
    c, _ = trained
    ck = load_checkpoint(os.path.join(c.out, "last.pt"))
    target = tmp_path / "ck.pt"
    save_checkpoint(target, ck)
    before = target.read_bytes()

    def broken_save(obj, fh, *a, **k):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, ck)
    monkeypatch.undo()
    assert target.read_bytes() == before  # old file intact
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    load_checkpoint(target)


# ----------------------------------------------------------------------------------------------
# DDP


def test_ddp_two_cpu_processes_agree(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "qmanifold.models.cli", "train", "--data", "qm9-extract", "--steps", "4", "--out", str(out),
           "--hidden", "32", "--layers", "2", "--batch-size", "8", "--val-every", "2", "--ckpt-every", "2",
           "--val-limit", "32", "--device", "cpu", "--no-progress", "--seed", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    assert summary["ranks_agree"] is True
    ck = load_checkpoint(out / "last.pt")
    assert ck["rng"]["world_size"] == 2 and len(ck["rng"]["generators"]) == 2
    assert not torch.equal(ck["rng"]["generators"][0], ck["rng"]["generators"][1])
    assert len(read_log(out / "log.jsonl", "train")) == 4  # only rank 0 logs
    # resuming with another world size is refused with a clear message
    with pytest.raises(CheckpointError, match="same number"):
        train(TrainConfig(data="qm9-extract", out=str(out), steps=6, resume=True, progress=False, threads=1))


def test_resume_warns_about_ignored_options(tmp_path):
    train(cfg(tmp_path, "w", steps=2, val_every=2, ckpt_every=2))
    with pytest.warns(UserWarning, match="lr"):
        s = train(cfg(tmp_path, "w", steps=3, resume=True, lr=0.5, val_every=2, ckpt_every=2))
    assert s["step"] == 3


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_train_errors_exit_code_2(tmp_path, capsys):
    from qmanifold.models.cli import main

    assert main(["train", "--data", "qm9-extract", "--model", "nope", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["train", "--data", "missing.npz", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err
