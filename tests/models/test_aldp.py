"""Alanine dipeptide at toy size: the generated topology against amber99sb-ildn's templates, energies
against OpenMM called directly, a short seeded MD through ``qmanifold data aldp`` (cached, readable
as an ensemble), the backbone dihedrals / Ramachandran KL / L-fraction / bond W1 against hand-made
cases, ``sample -n`` keeping the file's atom order, and ``evaluate`` in ensemble mode.

Needs the ``md`` extra (``openmm>=8.2``) and RDKit; the MD is a few hundred femtoseconds to 20 ps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

openmm = pytest.importorskip("openmm", reason="install the md extra: pip install 'qmanifold[md]'")
pytest.importorskip("rdkit")

from openmm import app, unit

from qmanifold.models.boltzmann import aldp
from qmanifold.models.cli import main
from qmanifold.models.data.io import load_npz_ensemble


@pytest.fixture(scope="module")
def md_file(tmp_path_factory):
    """20 ps of MD (1 ps equilibration) through the command line: 20 frames."""
    out = tmp_path_factory.mktemp("aldp") / "md.npz"
    assert main(["data", "aldp", "--ns", "0.02", "--equilibration-ps", "1", "--seed", "3", "--out", str(out),
                 "--no-progress"]) == 0
    return out


def reflect(x: np.ndarray) -> np.ndarray:
    return x * np.array([-1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------------------
# topology, force field, energies


def test_topology_matches_the_amber_templates_and_is_l_alanine():
    top = aldp.topology()
    assert top.getNumAtoms() == 22 and top.getNumBonds() == 21
    assert [r.name for r in top.residues()] == ["ACE", "ALA", "NME"]
    ff = app.ForceField(*aldp.FORCE_FIELD)
    templates = ff.getMatchingTemplates(top)
    assert [t.name for t in templates] == ["ACE", "ALA", "NME"]
    # the template atoms that OpenMM matched carry the same names as our PDB names (up to the
    # capping-group hydrogens / NME carbon, which amber names HH3x / CH3)
    alias = {"H1": "HH31", "H2": "HH32", "H3": "HH33"}
    for res, tmpl in zip(top.residues(), templates):
        names = {a.name for a in tmpl.atoms}
        for atom in res.atoms():
            name = alias.get(atom.name, atom.name) if res.name in ("ACE", "NME") else atom.name
            name = "CH3" if (res.name == "NME" and atom.name == "C") else name
            assert name in names, (res.name, atom.name)
    system = aldp.openmm_system()
    assert system.getNumParticles() == 22 and system.getNumConstraints() == 0  # flexible bonds
    bonds = next(f for f in system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    assert bonds.getNumBonds() == 21
    assert any(isinstance(f, openmm.GBSAOBCForce) for f in system.getForces())
    x = aldp.reference_structure()
    assert aldp.cip_labels(x) == ["S"] and aldp.signed_volume(x) > 0  # L-alanine is S
    assert aldp.cip_labels(reflect(x)) == ["R"] and aldp.signed_volume(reflect(x)) < 0
    pdb = app.PDBFile(__import__("io").StringIO(aldp.pdb_text(x)))
    assert [a.name for a in pdb.topology.atoms()] == [a[0] for a in aldp.ATOMS]


def test_energy_equals_openmm_directly_in_kt():
    x = aldp.reference_structure(1)
    frames = np.stack([x, x + np.random.default_rng(0).normal(scale=0.02, size=x.shape), reflect(x)])
    ctx = openmm.Context(aldp.openmm_system(), openmm.VerletIntegrator(0.001),
                         openmm.Platform.getPlatformByName("Reference"))
    direct = []
    for f in frames:
        ctx.setPositions(f * unit.angstrom)
        direct.append(ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole))
    kt = unit.MOLAR_GAS_CONSTANT_R.value_in_unit(unit.kilojoule_per_mole / unit.kelvin) * 300.0
    ours = aldp.energy(frames)
    np.testing.assert_allclose(ours, np.array(direct) / kt, rtol=1e-6, atol=1e-5)
    assert not np.allclose(ours, np.array(direct))  # kJ/mol would be the known-wrong unit
    assert abs(ours[2] - ours[0]) < 1e-4  # the force field cannot tell mirror images apart
    bad = frames.copy()
    bad[1, 3] = np.nan
    e = aldp.energy(bad)
    assert np.isinf(e[1]) and e[1] > 0 and np.isfinite(e[[0, 2]]).all()
    assert aldp.energy(frames[:2].reshape(1, 2, 22, 3)).shape == (1, 2)
    with pytest.raises(ValueError, match="22, 3"):
        aldp.energy(np.zeros((4, 21, 3)))


def test_data_command_writes_a_cached_readable_ensemble(md_file, capsys):
    ds = load_npz_ensemble(md_file)
    assert len(ds) == 20
    first = ds.get_numpy(0)
    np.testing.assert_array_equal(first["atomic_numbers"], aldp.ATOMIC_NUMBERS)  # the PDB atom order
    pairs = {(min(i, j), max(i, j)): o for i, j, o in aldp.BONDS}
    bt = first["bond_types"]
    assert {(i, j): int(bt[i, j]) for i, j in zip(*np.nonzero(np.triu(bt)))} == pairs
    md = aldp.load_ensemble(md_file)
    assert md["positions"].shape == (20, 22, 3) and md["meta"]["ns"] == 0.02 and md["meta"]["seed"] == 3
    assert md["meta"]["constraints"].startswith("none")
    np.testing.assert_allclose(aldp.energy(md["positions"]), md["energy"], atol=2e-3)  # float32 positions
    assert (aldp.signed_volume(md["positions"]) > 0).all() and set(aldp.cip_labels(md["positions"][:5])) == {"S"}
    lengths = aldp.bond_lengths(md["positions"])
    assert 0.9 < lengths.min() and lengths.max() < 1.65  # flexible but physical bonds (Å)
    capsys.readouterr()
    assert main(["data", "aldp", "--ns", "0.02", "--equilibration-ps", "1", "--seed", "3", "--out", str(md_file)]) == 0
    assert "cached" in capsys.readouterr().out
    assert main(["data", "aldp", "--ns", "0.03", "--seed", "3", "--out", str(md_file)]) == 2  # a different run
    assert "different data set" in capsys.readouterr().err
    assert main(["data", "aldp", "--ns", "0.02", "--seed", "3", "--out", str(md_file)]) == 2  # default 100 ps eq.
    assert "different data set" in capsys.readouterr().err
    assert main(["data", "aldp", "--n", "10", "--out", str(md_file)]) == 2  # MCMC options are refused


def test_the_md_is_seeded():
    a = aldp.run_md(0.002, seed=4, equilibration_ps=0.2, log=lambda s: None)
    b = aldp.run_md(0.002, seed=4, equilibration_ps=0.2, log=lambda s: None)
    c = aldp.run_md(0.002, seed=5, equilibration_ps=0.2, log=lambda s: None)
    np.testing.assert_array_equal(a["positions"], b["positions"])
    assert np.abs(a["positions"] - c["positions"]).max() > 1e-3


# ----------------------------------------------------------------------------------------------
# metrics against hand-made cases


def test_dihedral_by_hand_and_against_rdkit():
    for deg in (-150.0, -60.0, 0.0, 45.0, 120.0, 180.0):
        t = math.radians(deg)
        p = np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.5], [2 * math.cos(t), 2 * math.sin(t), 1.5]])
        got = math.degrees(aldp.dihedral(p, 0, 1, 2, 3))
        assert abs((got - deg + 180.0) % 360.0 - 180.0) < 1e-9, (deg, got)
    from rdkit import Chem
    from rdkit.Chem import rdMolTransforms

    x = aldp.reference_structure(2)
    mol = Chem.MolFromPDBBlock(aldp.pdb_text(x), removeHs=False)
    conf = mol.GetConformer()
    pos = np.asarray(conf.GetPositions())
    phi, psi = aldp.backbone_dihedrals(pos)
    assert abs(math.degrees(phi) - rdMolTransforms.GetDihedralDeg(conf, *aldp.PHI_ATOMS)) < 1e-6
    assert abs(math.degrees(psi) - rdMolTransforms.GetDihedralDeg(conf, *aldp.PSI_ATOMS)) < 1e-6
    rphi, rpsi = aldp.backbone_dihedrals(reflect(pos))  # a mirror image flips both signs
    assert abs(rphi + phi) < 1e-9 and abs(rpsi + psi) < 1e-9


def test_ramachandran_histogram_and_kl():
    rng = np.random.default_rng(0)
    phi = rng.uniform(-np.pi, np.pi, 5000)
    psi = rng.uniform(-np.pi, np.pi, 5000)
    h = aldp.ramachandran_histogram(phi, psi)
    assert h.shape == (36, 36) and abs(h.sum() - 1) < 1e-12
    assert aldp.ramachandran_kl(h, h) == 0.0
    # periodic: pi and -pi are the same bin, and 3 pi wraps to it too
    a = aldp.ramachandran_histogram(np.array([np.pi]), np.array([0.0]))
    b = aldp.ramachandran_histogram(np.array([-np.pi]), np.array([2 * np.pi]))
    c = aldp.ramachandran_histogram(np.array([3 * np.pi]), np.array([0.0]))
    assert np.array_equal(a, b) and np.array_equal(a, c) and a[0, 18] == 1.0
    # KL of two point masses in different bins: the eps convention, by hand
    p = np.zeros((36, 36))
    q = np.zeros((36, 36))
    p[3, 4] = q[5, 6] = 1.0
    eps, m = 1e-10, 36 * 36
    z = 1 + m * eps
    top, low = (1 + eps) / z, eps / z
    expect = top * math.log(top / low) + low * math.log(low / top) + (m - 2) * 0.0
    assert abs(aldp.ramachandran_kl(p, q) - expect) < 1e-9
    # weights: a weighted histogram equals the one of repeated samples
    w = aldp.ramachandran_histogram(np.array([0.1, 1.0]), np.array([0.1, 1.0]), weights=np.array([1.0, 3.0]))
    r = aldp.ramachandran_histogram(np.array([0.1, 1.0, 1.0, 1.0]), np.array([0.1, 1.0, 1.0, 1.0]))
    np.testing.assert_allclose(w, r)
    # a shifted distribution is far; the same law sampled again is near
    big = aldp.ramachandran_histogram(rng.uniform(-np.pi, np.pi, 50000), rng.uniform(-np.pi, np.pi, 50000))
    h2 = aldp.ramachandran_histogram(rng.uniform(-np.pi, np.pi, 50000), rng.uniform(-np.pi, np.pi, 50000))
    h3 = aldp.ramachandran_histogram(rng.normal(0, 0.3, 50000), rng.normal(0, 0.3, 50000))
    assert aldp.ramachandran_kl(big, h2) < 0.05
    assert aldp.ramachandran_kl(big, h3) > 2.0
    with pytest.raises(ValueError, match="no finite"):
        aldp.ramachandran_histogram(np.array([np.nan]), np.array([0.0]))


def test_l_fraction_and_bond_w1(md_file):
    x = aldp.load_ensemble(md_file)["positions"]
    assert aldp.l_fraction(x) == 1.0
    assert aldp.l_fraction(reflect(x)) == 0.0  # the D enantiomer
    mixed = np.concatenate([x[:15], reflect(x[15:])])
    assert aldp.l_fraction(mixed) == 0.75
    w = np.r_[np.ones(15), 3 * np.ones(5)]
    assert abs(aldp.l_fraction(mixed, w) - 0.5) < 1e-12
    assert aldp.bond_length_w1(x, x) == 0.0
    assert aldp.bond_length_w1(reflect(x), x) < 1e-12  # bond lengths do not see chirality
    stretched = x.copy()
    stretched[:, 5] = x[:, 4] + 1.1 * (x[:, 5] - x[:, 4])  # C=O 10 % longer: 0.12 Å on 1 of 21 bonds
    co = np.linalg.norm(x[:, 5] - x[:, 4], axis=-1).mean()
    assert abs(aldp.bond_length_w1(stretched, x) - 0.1 * co / 21) < 0.2 * 0.1 * co / 21


def test_evaluate_samples_and_the_command(md_file, tmp_path, capsys):
    x = aldp.load_ensemble(md_file)["positions"]
    res, _arrays = aldp.evaluate_samples(x, x, log_q=np.zeros(len(x)))
    assert res["ramachandran_kl"] == 0.0 and res["l_fraction"] == 1.0 and res["bond_length_w1"] == 0.0
    assert 0 < res["ess"] <= 1 and "ramachandran_kl_reweighted" in res
    # log q = -U/kT (up to a constant): the exact density of the samples, all weights equal, ESS 100 %
    res2, _ = aldp.evaluate_samples(x, x, log_q=-aldp.energy(x) + 7.0)
    assert abs(res2["ess"] - 1.0) < 1e-9
    bad, _ = aldp.evaluate_samples(reflect(x), x)
    assert bad["l_fraction"] == 0.0 and bad["ramachandran_kl"] > 1.0
    np.savez(tmp_path / "samples.npz", positions=reflect(x), log_q=np.zeros(len(x)))
    out = tmp_path / "eval.json"
    assert main(["evaluate-boltzmann", "--system", "aldp", "--samples", str(tmp_path / "samples.npz"),
                 "--reference", str(md_file), "--json", str(out), "--plots", str(tmp_path / "plots")]) == 0
    got = json.loads(out.read_text())
    assert got["l_fraction"] == 0.0 and "ess_percent" in got
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "aldp_energy.png", "aldp_log_weights.png", "aldp_ramachandran.png"]
    capsys.readouterr()
    assert main(["evaluate-boltzmann", "--system", "aldp", "--reference", str(md_file)]) == 2
    assert "--samples" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the ensemble workflow: sample -n keeps the atom order, evaluate ensemble mode


@pytest.fixture(scope="module")
def tiny_run(md_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("aldp_run") / "run"
    assert main(["train", "--data", str(md_file), "--model", "chiral_egnn", "--steps", "2", "--hidden", "16",
                 "--layers", "1", "--batch-size", "4", "--val-limit", "4", "--val-every", "2", "--ckpt-every", "2",
                 "--threads", "1", "--no-progress", "--out", str(run)]) == 0
    return run


def test_sample_n_keeps_the_atom_order_and_labels_by_molecule(md_file, tiny_run, tmp_path, capsys):
    from qmanifold.models.evaluation import read_sdf_records

    sdf = tmp_path / "s.sdf"
    assert main(["sample", "--checkpoint", str(tiny_run / "last.pt"), "--data", str(md_file), "-n", "5",
                 "--refine", "none", "--steps", "3", "--out", str(sdf), "--no-progress"]) == 0
    recs = read_sdf_records(sdf)
    assert len(recs) == 5
    for k, r in enumerate(recs):
        np.testing.assert_array_equal(r["atomic_numbers"], aldp.ATOMIC_NUMBERS)
        bt = r["bond_types"]
        assert {(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(bt)))} == {(i, j) for i, j, _ in aldp.BONDS}
        assert r["props"]["qm_source"] == f"{md_file}:molecule" and r["props"]["qm_index"] == "-1"
        assert r["props"]["qm_ensemble"] == "1" and r["props"]["qm_sample"] == str(k)
    x, _ = aldp.read_samples(sdf)
    assert x.shape == (5, 22, 3)
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(tiny_run / "last.pt"), "--data", str(md_file), "-n", "5",
                 "--limit", "1", "--out", str(tmp_path / "t.sdf")]) == 2
    assert "-n/--n replaces --limit" in capsys.readouterr().err


def test_ensemble_graph_refuses_several_molecules():
    from qmanifold.models.data import load_dataset
    from qmanifold.models.sampling import MoleculeInputError, ensemble_graph

    with pytest.raises(MoleculeInputError, match="not one molecule"):
        ensemble_graph(load_dataset("qm9-extract").split("test"), "qm9-extract")


def test_evaluate_ensemble_mode(md_file, tmp_path, capsys):
    from qmanifold.models.data.dataset import MoleculeDataset  # noqa: F401 - the graph type the records need
    from qmanifold.models.evaluation import evaluate_ensemble, kabsch_rmsd_matrix
    from qmanifold.models.sampling import ensemble_graph, make_records, write_sdf
    from qmanifold.models.training import load_molecules

    x = aldp.load_ensemble(md_file)["positions"]
    # Kabsch RMSD: a rotated copy is at 0, the mirror image is not (proper rotations only)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.linalg.det(q))
    m = kabsch_rmsd_matrix(x[:3], np.stack([x[0] @ q.T + 1.0, reflect(x[0])]))
    assert m[0, 0] < 1e-6 and m[0, 1] > 0.1 and m[1, 0] > 1e-3
    graph = ensemble_graph(load_molecules(str(md_file), progress=False), str(md_file))
    # the MD frames themselves as "samples": bond W1 0, stereo 100 %, full coverage at 0 RMSD
    sdf = tmp_path / "md.sdf"
    write_sdf(sdf, make_records([graph], [x], {"qm_ensemble": 1}))
    res = evaluate_ensemble(str(sdf), str(md_file), progress=False)
    assert res["mode"] == "ensemble" and res["num_records"] == 20 and res["num_reference_frames"] == 20
    assert res["bond_length_w1_pooled"] < 1e-4 and res["stereo_match"] == 1.0
    assert res["coverage"]["COV-R"] == 1.0 and res["coverage"]["AMR-R"] < 1e-4
    # mirror images: same bond lengths, every stereo label wrong
    sdf_d = tmp_path / "d.sdf"
    write_sdf(sdf_d, make_records([graph], [reflect(x)], {"qm_ensemble": 1}))
    out = tmp_path / "d.json"
    capsys.readouterr()
    assert main(["evaluate", "--samples", str(sdf_d), "--reference", str(md_file), "--json", str(out),
                 "--no-progress"]) == 0  # ensemble mode chosen from the records' qm_ensemble
    got = json.loads(out.read_text())
    assert got["mode"] == "ensemble" and got["stereo_match"] == 0.0 and got["bond_length_w1_pooled"] < 1e-4
    assert "ensemble vs 20 reference frames" in capsys.readouterr().out
    # a different atom order is refused (atoms are matched by index)
    perm = np.r_[1, 0, np.arange(2, 22)]
    g2 = type(graph)(atomic_numbers=graph.atomic_numbers[perm], atom_types=graph.atom_types[perm],
                     bond_types=graph.bond_types[perm][:, perm], source="perm", dataset=str(md_file))
    sdf_p = tmp_path / "p.sdf"
    write_sdf(sdf_p, make_records([g2], [x[:, perm]], {"qm_ensemble": 1}))
    with pytest.raises(ValueError, match="atom order"):
        evaluate_ensemble(str(sdf_p), str(md_file), progress=False)


def test_evaluate_boltzmann_samples_a_checkpoint_with_log_densities(md_file, tiny_run, tmp_path, capsys):
    out = tmp_path / "ck.json"
    assert main(["evaluate-boltzmann", "--system", "aldp", "--checkpoint", str(tiny_run / "last.pt"), "--reference",
                 str(md_file), "--n", "4", "--steps", "2", "--nll-estimator", "hutchinson", "--batch-size", "2",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["n_samples"] == 4 and 0.25 - 1e-9 <= got["ess"] <= 1.0 and got["ode"]["estimator"] == "hutchinson"
    capsys.readouterr()
    assert main(["evaluate-boltzmann", "--system", "aldp", "--checkpoint", str(tiny_run / "last.pt"), "--reference",
                 str(md_file), "--log-q", str(out)]) == 2
    assert "--log-q goes with --samples" in capsys.readouterr().err


def test_hutchinson_probes_reach_the_log_densities(md_file, tiny_run, tmp_path):
    """``--probes K`` is passed on: same samples (the probes are drawn after the initial noise), other
    log q; the JSON records K."""
    from qmanifold.models.boltzmann.aldp import sample_with_log_prob

    quiet = lambda *_: None
    kw = dict(steps=2, method="euler", estimator="hutchinson", seed=3, batch_size=3, log=quiet)
    x1, lq1 = sample_with_log_prob(tiny_run / "last.pt", md_file, 3, probes=1, **kw)
    x3, lq3 = sample_with_log_prob(tiny_run / "last.pt", md_file, 3, probes=3, **kw)
    # same draws up to float32 rounding (the replicated batch differs in size)
    assert np.allclose(x1, x3, atol=1e-4) and np.all(np.isfinite(lq3)) and np.abs(lq1 - lq3).max() > 1e-3
    out = tmp_path / "p.json"
    assert main(["evaluate-boltzmann", "--system", "aldp", "--checkpoint", str(tiny_run / "last.pt"), "--reference",
                 str(md_file), "--n", "2", "--steps", "2", "--nll-estimator", "hutchinson", "--probes", "3",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ode"]["probes"] == 3
