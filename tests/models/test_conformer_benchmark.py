"""``qmanifold benchmark conformers`` (models/conformer_benchmark.py; issue 13, item 4)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("rdkit")

from qmanifold.models.cli import main
from qmanifold.models.conformer_benchmark import aggregate_rmsd, benchmark_graphs, rmsd_to_reference, stereo_summary


def test_aggregate_counts_a_failed_molecule_as_a_miss():
    """Hand-made RMSDs: molecule 0 covered at every threshold, molecule 1 only at 1.0 Å, molecule 2
    failed (no conformer), molecule 3 lost one of its two conformers."""
    rmsd = [np.array([0.1, 0.6]), np.array([0.7, 0.9]), np.zeros(0), np.array([0.3, np.inf])]
    res = aggregate_rmsd(rmsd, n_expected=2, thresholds=(0.25, 0.5, 1.0))
    assert res["num_molecules"] == 4 and res["failed_molecules"] == 1 and res["failed_conformers"] == 3
    a = res["all"]
    assert a["0.25"]["COV-R"] == pytest.approx(1 / 4)
    assert a["0.5"]["COV-R"] == pytest.approx(2 / 4)
    assert a["1.0"]["COV-R"] == pytest.approx(3 / 4)
    # precision: per molecule fraction of conformers under delta, averaged over molecules
    assert a["0.5"]["COV-P"] == pytest.approx((0.5 + 0 + 0 + 0.5) / 4)
    assert math.isinf(a["0.5"]["AMR-R"]) and math.isinf(a["0.5"]["AMR-P"])
    assert a["0.5"]["AMR-R-median"] == pytest.approx((0.3 + 0.7) / 2)
    s = res["succeeded"]["0.5"]  # the failed molecule and the failed conformer left out
    assert s["num_molecules"] == 3
    assert s["AMR-R"] == pytest.approx((0.1 + 0.7 + 0.3) / 3)
    assert s["AMR-P"] == pytest.approx((0.35 + 0.8 + 0.3) / 3)
    assert s["COV-R"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="NaN"):
        aggregate_rmsd([np.array([np.nan])], 1)
    with pytest.raises(ValueError, match="no molecules"):
        aggregate_rmsd([], 1)
    none_ok = aggregate_rmsd([np.zeros(0)], 2)
    assert none_ok["succeeded"] is None and none_ok["all"]["0.5"]["COV-R"] == 0.0


def test_reference_geometry_scores_perfectly():
    """Sanity of the scoring path: the reference itself has RMSD 0 and correct stereo; a NaN conformer
    and a missing molecule count as failures / wrong stereo."""
    graphs, order = benchmark_graphs("qm9-extract", "test", limit=3, heavy_atoms_only=True, progress=False)
    assert len(graphs) == 3 and order == "dataset"
    ref = [np.stack([g.positions, np.full_like(g.positions, np.nan)]) for g in graphs]
    d = rmsd_to_reference(graphs[0], ref[0])
    assert d[0] == pytest.approx(0.0, abs=1e-6) and math.isinf(d[1])
    st = stereo_summary(graphs, [r[:1] for r in ref], 1)
    if st["molecules"]:
        assert st["correct"] == 1.0 and st["label_agreement"] == 1.0
        half = stereo_summary(graphs, ref, 2)
        assert half["correct"] == pytest.approx(0.5)
        assert stereo_summary(graphs, [None] * 3, 1)["correct"] == 0.0


@pytest.fixture(scope="module")
def tiny_chiral_checkpoint(tmp_path_factory):
    from qmanifold.models.training import TrainConfig, train

    out = tmp_path_factory.mktemp("bench") / "run"
    train(TrainConfig(data="qm9-extract", model="chiral_egnn", heavy_atoms_only=True, steps=3, batch_size=8,
                      hidden=16, layers=1, val_every=3, ckpt_every=3, val_limit=8, out=str(out), progress=False,
                      device="cpu", seed=0))
    return out / "last.pt"


def test_benchmark_command_end_to_end(tiny_chiral_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["benchmark", "conformers", "--checkpoint", str(tiny_chiral_checkpoint), "--data", "qm9-extract",
            "--split", "test", "--limit", "3", "--n-per-molecule", "2", "--etkdg-counts", "2", "3", "--steps", "4",
            "--seed", "0", "--threads", "1", "--no-progress", "--json", str(out), "--device", "cpu"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    res = json.loads(out.read_text())
    names = {"model", "model+mmff", "etkdg-k2", "etkdg+mmff-k2", "etkdg-k3", "etkdg+mmff-k3"}
    assert set(res["methods"]) == names
    assert res["num_molecules"] == 3 and len(res["molecules"]) == 3 and res["config"]["heavy_atoms_only"] is True
    for name in names:
        assert f"| {name} |" in table
        m = res["methods"][name]
        r = m["rmsd"]
        assert r["num_molecules"] == 3
        for t in ("0.25", "0.5", "1.0"):
            for key in ("COV-R", "COV-P"):
                assert 0.0 <= r["all"][t][key] <= 1.0
        assert r["all"]["0.25"]["COV-R"] <= r["all"]["0.5"]["COV-R"] <= r["all"]["1.0"]["COV-R"]
        assert m["time_per_molecule_s"] > 0
        assert m["geometry"]["bond_length_w1"] is not None
    mmff = res["methods"]["etkdg+mmff-k3"]
    # QM9 molecules are small: ETKDG+MMFF with the reference's stereo lands within 1 Å of the DFT geometry
    # (these three are acyclic and flexible, so not much closer), with near-DFT bond lengths
    assert mmff["rmsd"]["failed_molecules"] == 0
    assert mmff["rmsd"]["all"]["0.5"]["AMR-R"] < 1.0 and mmff["rmsd"]["all"]["1.0"]["COV-R"] == 1.0
    assert mmff["geometry"]["bond_length_w1"] < 0.05
    if mmff["stereo"]["molecules"]:
        assert mmff["stereo"]["correct"] == 1.0
    # an untrained 3-step model is far worse than ETKDG+MMFF
    assert res["methods"]["model"]["geometry"]["bond_length_w1"] > mmff["geometry"]["bond_length_w1"]
    # MMFF94 on the (untrained, 3-step) model's samples improves their local geometry
    refined = res["methods"]["model+mmff"]
    assert refined["geometry"]["bond_length_w1"] < res["methods"]["model"]["geometry"]["bond_length_w1"]
    assert refined["stats"]["mmff_missing_params"] == 0 and "stereo_redrawn" in refined["stats"]
    # the JSON output is refused when it exists (no --overwrite), exit 2 with one error line
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err
    # two worker processes for the baselines give the same conformers (seeded per molecule)
    out2 = tmp_path / "bench2.json"
    argv2 = [a if a != str(out) else str(out2) for a in argv] + ["--workers", "2", "--no-refine"]
    assert main(argv2) == 0
    res2 = json.loads(out2.read_text())
    assert set(res2["methods"]) == names - {"model+mmff"} and res2["config"]["workers"] == 2
    for name in names - {"model", "model+mmff"}:
        assert res2["methods"][name]["rmsd"] == res["methods"][name]["rmsd"]


def test_etkdg_embeds_the_reference_stereoisomer():
    """baselines.etkdg_conformers(stereo_from_reference=True) assigns the stereo of the reference geometry
    before embedding: every conformer reproduces the labels; without it ETKDG picks stereoisomers at
    random (seeded, so the control is deterministic)."""
    from qmanifold.models.baselines import etkdg_conformers

    graphs, _ = benchmark_graphs("qm9-extract", "test", limit=8, heavy_atoms_only=True, progress=False)
    with_ref, without = [], []
    for i, g in enumerate(graphs):
        with_ref.append(etkdg_conformers(g, 4, seed=i, stereo_from_reference=True)[0])
        without.append(etkdg_conformers(g, 4, seed=i)[0])
    on, off = stereo_summary(graphs, with_ref, 4), stereo_summary(graphs, without, 4)
    assert on["molecules"] >= 2
    assert on["correct"] == 1.0 and off["correct"] < 0.9
