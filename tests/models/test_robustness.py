"""Library-side robustness of the molecule package (issue 16): bad user files give an
:class:`~qmanifold.errors.InputError` that names the file and gives only advice a command-line user
can follow; a diverging training run stops through the skip-and-stop path with a finite ``last.pt``;
JSON outputs are strict; ``models/data`` has no import cycle.

Each test reproduces a reported failure (the assertion fails on the code before the fix). Small
inputs and a tiny EGNN on the committed QM9 extract: the file runs in a few seconds on one core.
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qmanifold.errors import InputError
from qmanifold.models.data import ELEMENTS, MoleculeDataset, load_dataset, load_npz_ensemble, load_sdf

DATA_DIR = Path(__file__).resolve().parents[2] / "models" / "data"
TINY_TRAIN = ["--data", "qm9-extract", "--hidden", "16", "--layers", "1", "--batch-size", "8", "--val-limit", "16",
              "--threads", "1", "--no-progress", "--model-kwargs", '{"edge_dim": 4, "num_rbf": 8}']


def _strict_json(text: str):
    """``json.loads`` that rejects NaN / Infinity (RFC 8259), as jq and JavaScript do."""
    def reject(token):
        raise AssertionError(f"non-strict JSON constant {token}")

    return json.loads(text, parse_constant=reject)


def _cli(argv, capsys):
    from qmanifold.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def _water_sdf_block(symbol_o: str = "O") -> str:
    """One 3-D water record (heavy atom symbol replaceable, e.g. by U)."""
    return ("water\n  hand made 3D\n\n"
            "  3  2  0  0  0  0  0  0  0  0999 V2000\n"
            f"    0.0000    0.0000    0.1170 {symbol_o:<3} 0  0  0  0  0  0  0  0  0  0  0  0\n"
            "    0.0000    0.7570   -0.4680 H   0  0  0  0  0  0  0  0  0  0  0  0\n"
            "    0.0000   -0.7570   -0.4680 H   0  0  0  0  0  0  0  0  0  0  0  0\n"
            "  1  2  1  0\n  1  3  1  0\nM  END\n$$$$\n")


# ----------------------------------------------------------------------------------------------
# 1. empty SDF files


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["zero-bytes", "blank-lines"])
def test_empty_sdf_is_an_input_error_naming_the_file(tmp_path, content):
    from qmanifold.models.evaluation import read_sdf_records

    path = tmp_path / "empty.sdf"
    path.write_text(content)
    for read in (load_sdf, load_dataset, read_sdf_records):
        with pytest.raises(InputError, match=f"no molecules in {path}"):
            read(str(path))


def test_empty_sdf_on_the_command_line(tmp_path, capsys):
    path = tmp_path / "empty.sdf"
    path.write_text("")
    rc, err = _cli(["evaluate", "--samples", str(path), "--json", str(tmp_path / "eval.json")], capsys)
    assert rc == 2 and f"error: no molecules in {path}" in err and "Traceback" not in err
    rc, err = _cli(["train", *TINY_TRAIN, "--data", str(path), "--steps", "1", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and f"error: no molecules in {path}" in err
    rc, err = _cli(["baseline", "--data", str(path), "--out", str(tmp_path / "b.sdf"), "--n-per-molecule", "1"], capsys)
    assert rc == 2 and f"error: no molecules in {path}" in err and not (tmp_path / "b.sdf").exists()


# ----------------------------------------------------------------------------------------------
# 2. files that are not .npz archives


@pytest.mark.parametrize("kind", ["random-bytes", "npy", "empty", "truncated-zip"])
@pytest.mark.parametrize("reader", ["load_dataset", "load_npz_ensemble", "MoleculeDataset.load"])
def test_invalid_npz_names_the_file_and_never_suggests_pickles(tmp_path, kind, reader):
    path = tmp_path / "data.npz"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((2, 3)))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        good = tmp_path / "good.npz"
        np.savez(good, positions=np.zeros((2, 3, 3)), atomic_numbers=np.array([8, 1, 1]))
        path.write_bytes(good.read_bytes()[:-40])  # cut into the central directory
    fn = {"load_dataset": load_dataset, "load_npz_ensemble": load_npz_ensemble,
          "MoleculeDataset.load": MoleculeDataset.load}[reader]
    with pytest.raises(InputError, match="is not a valid .npz file") as info:
        fn(str(path))
    message = str(info.value)
    assert str(path) in message and "pickle" not in message.lower()


def test_object_array_in_npz_is_refused_without_pickle_advice(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, positions=np.zeros((1, 3, 3)), atomic_numbers=np.array([{"Z": 8}, 1, 1], dtype=object))
    with pytest.raises(InputError, match=r"field 'atomic_numbers' holds Python objects") as info:
        load_npz_ensemble(path)
    assert str(path) in str(info.value) and "allow_pickle" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# 3. unknown elements


def test_unknown_element_in_npz_by_symbol_file_and_supported_list(tmp_path):
    path = tmp_path / "uranyl.npz"
    pos = np.array([[[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [-1.8, 0.0, 0.0]]])
    np.savez(path, positions=pos, atomic_numbers=np.array([92, 8, 8]), bonds=np.array([[0, 1, 2], [0, 2, 2]]))
    with pytest.raises(InputError) as info:
        load_npz_ensemble(path)
    message = str(info.value)
    assert str(path) in message and "U (Z=92)" in message and "at atom(s) [0]" in message
    assert "Z=92 (Z=92)" not in message and "elements=" not in message
    assert "supported elements: H, C, N, O, F" in message


def test_unknown_element_in_sdf_names_symbol_and_record(tmp_path):
    path = tmp_path / "u.sdf"
    path.write_text(_water_sdf_block("U"))
    with pytest.warns(UserWarning, match=r"U \(Z=92\) in record\(s\) \[0\]"), pytest.raises(InputError) as info:
        load_sdf(path)
    message = str(info.value)
    assert str(path) in message and "no usable molecule" in message and "U (Z=92) in record(s) [0]" in message
    assert "supported elements: H, C, N, O, F" in message and "elements=" not in message
    # a file with one usable record loads, and the warning names the skipped one
    path.write_text(_water_sdf_block("O") + _water_sdf_block("U"))
    with pytest.warns(UserWarning, match=r"unknown element\(s\) U \(Z=92\) in record\(s\) \[1\]"):
        assert len(load_sdf(path)) == 1


def test_unknown_element_in_a_dataset_names_molecule_and_source():
    ds = MoleculeDataset.from_molecules([
        {"positions": np.zeros((2, 3)) + np.array([[0.0, 0, 0], [2.0, 0, 0]]), "atomic_numbers": [6, 92],
         "bond_pairs": [[0, 1]], "index": 7}], elements=ELEMENTS + (92,), source="mine.sdf")
    with pytest.raises(InputError) as info:
        ds.with_elements(ELEMENTS)
    message = str(info.value)
    assert "U (Z=92) in molecule(s) [7] of mine.sdf" in message and "supported elements: H, C, N, O, F" in message
    assert "elements=" not in message


def test_element_symbols_cover_the_periodic_table():
    from qmanifold.models.data.io import element_label, element_symbol

    assert [element_symbol(z) for z in (1, 54, 55, 79, 92, 118)] == ["H", "Xe", "Cs", "Au", "U", "Og"]
    assert element_label(92) == "U (Z=92)" and element_label(0) == "Z=0" and element_symbol(119) == "Z=119"


# ----------------------------------------------------------------------------------------------
# 6. no import cycle in models/data


def _module_level_imports(path: Path) -> set[str]:
    """Sibling modules of ``models/data`` imported by statements executed at import time (not
    inside functions or classes; ``if TYPE_CHECKING:`` blocks excluded)."""
    found: set[str] = set()

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qmanifold.models.data."):
                found.add(node.module.split(".")[3])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return found


def test_models_data_modules_import_each_other_without_a_cycle():
    modules = {p.stem: p for p in DATA_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {name: _module_level_imports(path) & set(modules) for name, path in modules.items()}
    assert "dataset" in graph and graph["dataset"] == set()  # the shared pieces sit below everything
    assert "qm9" not in graph["io"] and "io" not in graph["qm9"]
    # no cycle of any length (depth-first search)
    state: dict[str, int] = {}

    def dfs(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*trail, node, nxt])}"
            if nxt not in state:
                dfs(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [])


def test_public_names_stay_importable_from_their_old_homes():
    from qmanifold.models import data
    from qmanifold.models.data import dataset, io

    for name in ("ELEMENTS", "BOND_NONE", "BOND_SINGLE", "BOND_DOUBLE", "BOND_TRIPLE", "BOND_AROMATIC",
                 "NUM_BOND_TYPES", "SPLIT_NAMES", "MoleculeDataset"):
        assert getattr(io, name) is getattr(data, name) is getattr(dataset, name), name
    for name in ("atomic_savez", "bonds_to_pairs", "element_symbol", "perceive_bonds", "load_npz_ensemble",
                 "save_npz_ensemble", "load_sdf", "load_dataset", "_atomic_write_text"):
        assert callable(getattr(io, name)), name


# ----------------------------------------------------------------------------------------------
# 5. diverging training


def test_diverging_training_stops_through_the_skip_path_with_a_finite_last_pt(tmp_path, capsys):
    from qmanifold.models.training import MAX_SKIPPED_UPDATES, diffusion_from_checkpoint, load_checkpoint

    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="non-finite loss or gradient at step"):
        rc, err = _cli(["train", *TINY_TRAIN, "--steps", "60", "--lr", "1e8", "--out", str(out), "--seed", "0"], capsys)
    assert rc == 2, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err
    message = line[0]
    assert "training diverged at step" in message and "--lr" in message and "1e+08" in message
    assert f"{MAX_SKIPPED_UPDATES} updates had a non-finite loss or gradient" in message
    assert "denoiser output contains" not in message and f"{out / 'last.pt'} holds the weights" in message

    ck = load_checkpoint(out / "last.pt")
    for state in (ck["model"]["state_dict"], ck["ema_state_dict"]):
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert ck["step"] < 60
    qd = diffusion_from_checkpoint(ck)  # the stored weights rebuild a model
    assert all(bool(torch.isfinite(p).all()) for p in qd.denoiser.parameters())

    summary = _strict_json((out / "summary.json").read_text())
    assert summary["stopped_by"] == "diverged" and summary["finished"] is False
    assert summary["skipped_updates"] == MAX_SKIPPED_UPDATES and summary["step"] == ck["step"]
    rows = [_strict_json(ln) for ln in (out / "log.jsonl").read_text().splitlines() if ln.strip()]
    skipped = [r for r in rows if r.get("skipped")]
    assert len(skipped) == MAX_SKIPPED_UPDATES and all(r["loss"] is None or math.isfinite(r["loss"]) for r in rows)
    assert any(r["loss"] is None for r in skipped)  # the non-finite losses are null, not NaN


def test_loss_keeps_its_finiteness_check_outside_training():
    import qmanifold
    from qmanifold.groups import SE3

    qd = qmanifold.QuotientDiffusion(qmanifold.Quotient(SE3), lambda x, t, mask=None: x * float("nan"))
    x1 = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="denoiser output contains"):
        qd.loss(x1)
    assert bool(torch.isnan(qd.loss(x1, check_output=False)))  # what the training loop asks for


@pytest.mark.parametrize("value", [float("nan"), -1.0])
def test_grad_clip_nan_is_rejected(tmp_path, value):
    from qmanifold.models.training import TrainConfig

    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(out=str(tmp_path / "x"), grad_clip=value).validate()


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")),
                                          ("min_lr_ratio", float("nan"))])
def test_other_non_finite_options_are_rejected(tmp_path, field, value):
    from qmanifold.models.training import TrainConfig

    with pytest.raises(ValueError, match=field):
        TrainConfig(out=str(tmp_path / "x"), **{field: value}).validate()


def test_summary_without_a_step_is_strict_json(tmp_path):
    """``last_train_loss`` is NaN when no step ran (here: a resume at the final step)."""
    from qmanifold.models.training import TrainConfig, train

    base = dict(data="qm9-extract", model="egnn", hidden=16, layers=1, batch_size=8, val_limit=16, progress=False,
                threads=1, model_kwargs={"edge_dim": 4, "num_rbf": 8}, out=str(tmp_path / "run"), val_every=2,
                ckpt_every=2)
    train(TrainConfig(steps=2, **base))
    summary = train(TrainConfig(steps=2, resume=True, **base))
    assert math.isnan(summary["last_train_loss"])
    written = _strict_json((tmp_path / "run" / "summary.json").read_text())
    assert written["last_train_loss"] is None and written["step"] == 2


# ----------------------------------------------------------------------------------------------
# 7. evaluation JSON


def test_write_json_is_strict_and_summarize_runs_reads_null(tmp_path):
    from qmanifold.models.evaluation import summarize_runs, write_json

    result = {"coverage": {"COV-R": 0.5, "AMR-R": float("nan"), "COV-P": float("inf")},
              "connectivity_match": 1.0, "_values": {"dropped": True}}
    path = tmp_path / "eval.json"
    write_json(path, result)
    back = _strict_json(path.read_text())
    assert back["coverage"] == {"COV-R": 0.5, "AMR-R": None, "COV-P": None} and "_values" not in back
    table = summarize_runs({"m": [back, {"coverage": {"COV-R": 0.7, "AMR-R": 0.2}}]})
    assert table["m"]["COV-R"]["values"] == [0.5, 0.7] and table["m"]["AMR-R"]["values"] == [0.2]
    assert "COV-P" not in table["m"]


def test_compare_losses_reads_null_validation(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_losses", Path(__file__).resolve().parents[2] / "scripts" / "compare_losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert math.isnan(module._number(None)) and module._number(0.25) == 0.25


def test_npz_dataset_round_trip_still_loads(tmp_path):
    """The read path shared by ``load_dataset`` and ``MoleculeDataset.load`` (one ``read_npz``)."""
    ds = load_dataset("qm9-extract").subset([0, 3])
    path = tmp_path / "two.npz"
    ds.save(path)
    for loaded in (load_dataset(str(path)), MoleculeDataset.load(path), load_dataset(str(path), heavy_atoms_only=True)):
        assert len(loaded) == 2
    assert np.array_equal(load_dataset(str(path)).all_positions, ds.all_positions)
    assert os.listdir(tmp_path) == ["two.npz"]
