"""Tests for models.sampling, models.evaluation, models.baselines and the molecule CLI.

Uses the committed QM9 extract and tiny untrained / briefly trained EGNNs; runs in well under a
minute on 2 cores.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")
from rdkit import Chem

from qmanifold.models.baselines import baseline_conformers, etkdg_conformers
from qmanifold.models.data import ELEMENTS, load_dataset
from qmanifold.models.evaluation import (
    best_rmsd,
    bond_geometry,
    connectivity_matches,
    coverage_metrics,
    distribution_distances,
    evaluate_samples,
    plot_evaluation,
    read_sdf_records,
    summarize_runs,
)
from qmanifold.models.sampling import (
    MoleculeInputError,
    graph_from_smiles,
    graphs_from_dataset,
    make_records,
    mol_with_coordinates,
    sample_conformers,
    template_mol,
    write_sdf,
    write_xyz,
)


@pytest.fixture(scope="module")
def test_graphs():
    ds = load_dataset("qm9-extract").split("test")
    return graphs_from_dataset(ds, "qm9-extract", range(6))


def random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                     [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                     [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


# ----------------------------------------------------------------------------------------------
# graphs and SDF I/O


def test_graph_from_smiles_and_errors():
    g = graph_from_smiles("CCO", ELEMENTS)
    assert g.num_atoms == 9 and sorted(g.atomic_numbers.tolist()) == [1] * 6 + [6, 6, 8]
    assert g.bond_types.sum() == 2 * 8 and g.source == "smiles:CCO" and g.index == -1
    assert np.array_equal(g.atom_types, [ELEMENTS.index(z) for z in g.atomic_numbers])
    heavy = graph_from_smiles("c1ccccc1", ELEMENTS, heavy_atoms_only=True)
    assert heavy.num_atoms == 6 and set(heavy.bond_types[heavy.bond_types > 0].tolist()) == {4}
    zw = graph_from_smiles("[NH3+]CC([O-])=O", ELEMENTS)
    assert template_mol(zw).GetIntProp("_qm_sanitized") == 1
    assert sorted(a.GetFormalCharge() for a in template_mol(zw).GetAtoms() if a.GetFormalCharge()) == [-1, 1]
    with pytest.raises(MoleculeInputError, match="malformed SMILES"):
        graph_from_smiles("C1CC(", ELEMENTS)
    with pytest.raises(MoleculeInputError, match="cannot sanitise"):
        graph_from_smiles("c1cccc1", ELEMENTS)
    with pytest.raises(MoleculeInputError, match="cannot sanitise"):
        graph_from_smiles("C(C)(C)(C)(C)C", ELEMENTS)  # pentavalent carbon
    with pytest.raises(MoleculeInputError, match="Cl outside the model's element list"):
        graph_from_smiles("CCCl", ELEMENTS)
    with pytest.raises(MoleculeInputError, match="empty"):
        graph_from_smiles("  ", ELEMENTS)


def test_templates_of_the_extract_sanitise_and_match_smiles():
    ds = load_dataset("qm9-extract")
    for heavy in (False, True):
        d = ds.without_hydrogens() if heavy else ds
        for g in graphs_from_dataset(d, "qm9-extract", range(0, len(d), 5)):
            m = template_mol(g)
            assert m.GetIntProp("_qm_sanitized") == 1, g.source
            assert Chem.MolToSmiles(Chem.RemoveHs(m)) == Chem.MolToSmiles(Chem.MolFromSmiles(g.smiles)), g.source


def test_sdf_round_trip(test_graphs, tmp_path):
    rng = np.random.default_rng(0)
    confs = [np.stack([g.positions + rng.normal(scale=0.1, size=g.positions.shape) for _ in range(2)])
             for g in test_graphs]
    records = make_records(test_graphs, confs, {"qm_method": "test", "qm_model": "egnn"})
    path = tmp_path / "s.sdf"
    write_sdf(path, records)
    write_xyz(tmp_path / "s.xyz", records)
    mols = [m for m in Chem.SDMolSupplier(str(path), removeHs=False)]
    assert len(mols) == 2 * len(test_graphs) and all(m is not None for m in mols)
    for rec, mol in zip(records, mols):
        g = rec["graph"]
        assert [a.GetAtomicNum() for a in mol.GetAtoms()] == g.atomic_numbers.tolist()
        bonds = np.zeros_like(g.bond_types)
        for b in mol.GetBonds():
            code = 4 if b.GetIsAromatic() else int(b.GetBondTypeAsDouble())
            bonds[b.GetBeginAtomIdx(), b.GetEndAtomIdx()] = bonds[b.GetEndAtomIdx(), b.GetBeginAtomIdx()] = code
        assert np.array_equal(bonds, g.bond_types)
        np.testing.assert_allclose(mol.GetConformer().GetPositions(), rec["positions"], atol=1e-4)
        assert mol.GetProp("qm_source") == g.source and mol.GetIntProp("qm_index") == g.index
        assert mol.GetIntProp("qm_sample") == rec["sample"] and mol.GetProp("qm_method") == "test"
        assert mol.GetProp("qm_smiles") == g.smiles
    xyz = (tmp_path / "s.xyz").read_text().splitlines()
    assert int(xyz[0]) == test_graphs[0].num_atoms and test_graphs[0].source in xyz[1]


def test_bad_coordinates_write_nothing(test_graphs, tmp_path):
    g = test_graphs[0]
    path = tmp_path / "bad.sdf"
    path.write_text("previous content")
    short = make_records([g], [g.positions[None, :-1]])
    with pytest.raises(MoleculeInputError, match="atom-count mismatch"):
        write_sdf(path, short)
    nan = g.positions.copy()
    nan[2, 1] = np.nan
    good_then_bad = make_records(test_graphs[1:3], [x.positions[None] for x in test_graphs[1:3]]) + \
        make_records([g], [nan[None]])
    with pytest.raises(MoleculeInputError, match="NaN"):
        write_sdf(path, good_then_bad)
    assert path.read_text() == "previous content"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


# ----------------------------------------------------------------------------------------------
# metrics


def test_rmsd_zero_for_self_rigid_motion_and_automorphism(test_graphs):
    rng = np.random.default_rng(1)
    for g in test_graphs[:4]:
        ref = mol_with_coordinates(g, g.positions)
        assert best_rmsd(ref, ref) == pytest.approx(0.0, abs=1e-6)
        moved = g.positions @ random_rotation(rng).T + np.array([3.0, -7.0, 1.5])
        assert best_rmsd(mol_with_coordinates(g, moved), ref) == pytest.approx(0.0, abs=1e-5)
        noisy = g.positions + rng.normal(scale=0.2, size=g.positions.shape)
        assert best_rmsd(mol_with_coordinates(g, noisy), ref) > 0.05
    # relabelling symmetric atoms (a graph automorphism) does not change the symmetry-aware RMSD
    g = graph_from_smiles("CC(C)(C)O", ELEMENTS, heavy_atoms_only=True)
    pos = np.array([[1.5, 0.0, 0.0], [0.0, 0.0, 0.0], [-0.5, 1.4, 0.0], [-0.5, -0.7, 1.2], [-0.4, -0.7, -1.2]])
    swapped = pos[[2, 1, 0, 3, 4]]  # exchange two methyl carbons
    assert np.sqrt(((swapped - pos) ** 2).sum(1).mean()) > 0.5
    assert best_rmsd(mol_with_coordinates(g, swapped), mol_with_coordinates(g, pos)) < 0.1


def test_coverage_metrics_hand_made():
    # molecule A: generated RMSDs 0.2, 0.9 -> covered (min 0.2), precision 1/2
    # molecule B: 0.7, 0.6, 1.1 -> not covered (min 0.6), precision 0/3
    res = coverage_metrics([np.array([0.2, 0.9]), np.array([0.7, 0.6, 1.1])], threshold=0.5)
    assert res["COV-R"] == pytest.approx(0.5)
    assert res["AMR-R"] == pytest.approx((0.2 + 0.6) / 2)
    assert res["COV-P"] == pytest.approx((0.5 + 0.0) / 2)
    assert res["AMR-P"] == pytest.approx((0.55 + 0.8) / 2)
    # several references: matrix (G, R)
    m = np.array([[0.1, 0.8], [0.9, 0.3], [1.0, 1.2]])
    r2 = coverage_metrics([m], threshold=0.5)
    assert r2["COV-R"] == pytest.approx(1.0) and r2["AMR-R"] == pytest.approx(0.2)
    assert r2["COV-P"] == pytest.approx(2 / 3) and r2["AMR-P"] == pytest.approx((0.1 + 0.3 + 1.0) / 3)
    with pytest.raises(ValueError):
        coverage_metrics([])
    with pytest.raises(ValueError, match="NaN"):
        coverage_metrics([np.array([np.nan])])


def test_bond_geometry_and_distances():
    z = np.array([8, 1, 1])
    bonds = np.array([[0, 1, 1], [1, 0, 0], [1, 0, 0]])
    pos = np.array([[0.0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]])
    lengths, angles = bond_geometry(pos, z, bonds)
    assert lengths == {"O-H": [pytest.approx(0.96), pytest.approx(0.96)]}
    assert angles == {"H-O-H": [pytest.approx(90.0)]}
    d = distribution_distances({"O-H": [1.0, 1.0]}, {"O-H": [1.1, 1.1], "C-H": [1.09]})
    assert d["per_type"]["O-H"]["w1"] == pytest.approx(0.1) and d["per_type"]["C-H"]["w1"] is None
    assert d["mean"] == pytest.approx(0.1)


def test_connectivity_check(test_graphs):
    g = test_graphs[0]
    assert connectivity_matches(g.positions, g.atomic_numbers, g.bond_types)
    broken = g.positions.copy()
    broken[0] += 5.0
    assert not connectivity_matches(broken, g.atomic_numbers, g.bond_types)


def test_evaluate_known_inputs(test_graphs, tmp_path):
    rng = np.random.default_rng(2)
    confs = []
    for g in test_graphs:
        moved = g.positions @ random_rotation(rng).T + 2.0
        noisy = g.positions + rng.normal(scale=0.5, size=g.positions.shape)
        confs.append(np.stack([moved, noisy]))
    path = tmp_path / "known.sdf"
    write_sdf(path, make_records(test_graphs, confs, {"qm_method": "known"}))
    res = evaluate_samples(path, progress=False, keep_values=True)
    cov = res["coverage"]
    assert res["num_molecules"] == len(test_graphs) and res["num_records"] == 2 * len(test_graphs)
    assert cov["COV-R"] == 1.0 and cov["AMR-R"] < 1e-3
    for m in res["per_molecule"]:
        assert m["rmsd"][0] < 1e-3 and m["rmsd"][1] > 0.2
    expect_p = np.mean([np.mean([r < 0.5 for r in m["rmsd"]]) for m in res["per_molecule"]])
    assert cov["COV-P"] == pytest.approx(expect_p)
    assert res["reference_connectivity_match"] == 1.0 and 0.4 <= res["connectivity_match"] <= 0.6
    assert res["bond_length_w1"]["mean"] > 0 and res["method"] == {
        "qm_method": "known", "qm_hydrogens": "in the conformer (all-atom graph)", "qm_refine": "none"}
    files = plot_evaluation(res, tmp_path / "plots")
    assert {os.path.basename(f) for f in files} == {"rmsd_hist.png", "bond_lengths.png", "bond_angles.png"}
    assert all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in files)
    table = summarize_runs({"known": [res, res]})
    assert table["known"]["COV-R"]["mean"] == 1.0 and table["known"]["COV-R"]["std"] == 0.0


def test_evaluate_rejects_mismatched_reference(test_graphs, tmp_path):
    g = test_graphs[0]
    recs = make_records([g], [g.positions[None]])
    recs[0]["props"]["qm_index"] = int(test_graphs[1].index)  # points at another molecule
    path = tmp_path / "mismatch.sdf"
    write_sdf(path, recs)
    with pytest.raises(ValueError, match="mismatch|do not match"):
        evaluate_samples(path, progress=False)
    recs[0]["props"]["qm_index"] = 10 ** 9
    write_sdf(path, recs)
    with pytest.raises(ValueError, match="not in the reference"):
        evaluate_samples(path, progress=False)


# ----------------------------------------------------------------------------------------------
# sampling and the ETKDG baseline


def test_sample_conformers_shapes_and_determinism(test_graphs):
    from qmanifold.models.networks import build_denoiser
    from qmanifold.models.training import build_diffusion

    torch.manual_seed(0)
    net = build_denoiser("egnn", hidden=16, layers=1, edge_dim=4, num_rbf=8)
    qd = build_diffusion(net, "quotient")
    graphs = test_graphs[:3]
    a = sample_conformers(qd, graphs, 2, steps=4, seed=7, batch_size=4, progress=False)
    b = sample_conformers(qd, graphs, 2, steps=4, seed=7, batch_size=4, progress=False)
    c = sample_conformers(qd, graphs, 2, steps=4, seed=8, batch_size=4, progress=False)
    for g, x, y, w in zip(graphs, a, b, c):
        assert x.shape == (2, g.num_atoms, 3) and np.all(np.isfinite(x))
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, w)
        np.testing.assert_allclose(x.mean(1), 0.0, atol=1e-5)  # centred
    too_many = graph_from_smiles("CO", (1, 6, 7, 8, 9, 16))
    too_many.atom_types = too_many.atom_types.copy()
    too_many.atom_types[0] = 7
    with pytest.raises(MoleculeInputError, match="atom type"):
        sample_conformers(qd, [too_many], 1, steps=2, progress=False)


def test_etkdg_baseline_scored_by_evaluate(test_graphs, tmp_path):
    graphs = test_graphs[:3]
    confs, _ = baseline_conformers(graphs, 2, mmff=True, seed=0, progress=False)
    assert [c.shape for c in confs] == [(2, g.num_atoms, 3) for g in graphs]
    again, _ = baseline_conformers(graphs, 2, mmff=True, seed=0, progress=False)
    assert all(np.allclose(x, y) for x, y in zip(confs, again))
    path = tmp_path / "etkdg.sdf"
    write_sdf(path, make_records(graphs, confs, {"qm_method": "etkdg+mmff", "qm_seed": 0}))
    recs = read_sdf_records(path)
    assert len(recs) == 6 and recs[0]["props"]["qm_method"] == "etkdg+mmff"
    res = evaluate_samples(path, progress=False)
    assert res["num_molecules_with_reference"] == 3
    assert 0.0 <= res["coverage"]["COV-R"] <= 1.0 and res["coverage"]["AMR-R"] < 2.0
    assert res["connectivity_match"] >= 0.8  # force-field geometries keep their bonds
    heavy = graph_from_smiles("CC(=O)O", ELEMENTS, heavy_atoms_only=True)
    hc, _ = etkdg_conformers(heavy, 1, seed=1)
    assert hc.shape == (1, 4, 3)
    # a strained cage without stereo (QM9 id 68244): plain ETKDG fails, explicit stereoisomers work
    cage = graph_from_smiles("CC12CC(O1)C1CCC21", ELEMENTS, heavy_atoms_only=True)
    cc, st = etkdg_conformers(cage, 3, seed=0)
    assert cc.shape == (3, 9, 3) and st["stereo_enumerated"] > 0 and np.all(np.isfinite(cc))


# ----------------------------------------------------------------------------------------------
# CLI end to end


def test_cli_end_to_end(tmp_path, capsys):
    from qmanifold.models.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "qm9-extract", "--steps", "5", "--out", str(run), "--hidden", "32",
                 "--layers", "2", "--batch-size", "8", "--val-every", "5", "--ckpt-every", "5",
                 "--val-limit", "16", "--threads", "1", "--no-progress"]) == 0
    ckpt = str(run / "best.pt")
    sdf = tmp_path / "samples.sdf"
    assert main(["sample", "--checkpoint", ckpt, "--data", "qm9-extract", "--split", "test", "--limit", "2",
                 "--n-per-molecule", "2", "--out", str(sdf), "--xyz", str(tmp_path / "s.xyz"), "--steps", "5",
                 "--no-progress"]) == 0
    mols = [m for m in Chem.SDMolSupplier(str(sdf), removeHs=False)]
    assert len(mols) == 4 and all(m is not None for m in mols)
    assert {m.GetProp("qm_loss") for m in mols} == {"quotient"} and {m.GetProp("qm_geometry") for m in mols} == {"quotient"}
    assert len({m.GetProp("qm_source") for m in mols}) == 2
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", "--samples", str(sdf), "--json", str(out_json), "--plots", str(tmp_path / "plots"),
                 "--no-progress"]) == 0
    res = json.loads(out_json.read_text())
    assert res["num_molecules"] == 2 and set(res["coverage"]) >= {"COV-R", "AMR-R", "COV-P", "AMR-P"}
    assert os.path.exists(tmp_path / "plots" / "rmsd_hist.png")
    # SMILES input; the same molecules with the baseline
    smi = tmp_path / "smiles.sdf"
    assert main(["sample", "--checkpoint", ckpt, "--smiles", "CCO", "C#N", "--n-per-molecule", "2",
                 "--out", str(smi), "--steps", "3", "--no-progress"]) == 0
    assert len([m for m in Chem.SDMolSupplier(str(smi), removeHs=False)]) == 4
    assert main(["sample", "--checkpoint", ckpt, "--smiles", "CO", "--geometry", "conventional", "--out",
                 str(smi), "--steps", "2", "--no-progress", "--overwrite"]) == 0
    assert {m.GetProp("qm_geometry") for m in Chem.SDMolSupplier(str(smi), removeHs=False)} == {"conventional"}
    base = tmp_path / "etkdg.sdf"
    assert main(["baseline", "--method", "etkdg", "--data", "qm9-extract", "--split", "test", "--limit", "2",
                 "--n-per-molecule", "2", "--out", str(base), "--no-progress"]) == 0
    assert {m.GetProp("qm_source") for m in Chem.SDMolSupplier(str(base), removeHs=False)} == \
        {m.GetProp("qm_source") for m in mols}
    capsys.readouterr()
    # bad input: clear errors, exit code 2, nothing written
    bad = tmp_path / "bad.sdf"
    assert main(["sample", "--checkpoint", ckpt, "--smiles", "C1CC(", "--out", str(bad), "--no-progress"]) == 2
    assert "malformed SMILES" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", ckpt, "--smiles", "CC[Si]", "--out", str(bad), "--no-progress"]) == 2
    assert "outside the model's element list" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(Path(ckpt).read_bytes()[:500])
    assert main(["sample", "--checkpoint", str(junk), "--smiles", "CC", "--out", str(bad), "--no-progress"]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err
    assert not bad.exists()
    assert main(["evaluate", "--samples", str(tmp_path / "none.sdf"), "--json", str(tmp_path / "e.json")]) == 2
    assert "not found" in capsys.readouterr().err
