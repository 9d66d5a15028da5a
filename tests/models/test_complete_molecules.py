"""Complete molecules from heavy-atom conformers (models/refine.py, make_records), stereo redraws in
sample_conformers, heavy-atom scoring of SDFs that carry hydrogens, and inference-only checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from rdkit import Chem
from rdkit.Chem import AllChem

from qmanifold.models.data import ELEMENTS, load_qm9_extract
from qmanifold.models.evaluation import evaluate_samples, read_sdf_records
from qmanifold.models.networks import build_denoiser
from qmanifold.models.refine import complete_conformer, refine_conformers
from qmanifold.models.sampling import (
    graph_from_smiles,
    graphs_from_dataset,
    make_records,
    sample_conformers,
    write_sdf,
    write_xyz,
)
from qmanifold.models.stereo import stereo_agreement


def _etkdg_heavy(smiles: str, seed: int = 0) -> tuple[object, np.ndarray]:
    g = graph_from_smiles(smiles, ELEMENTS, heavy_atoms_only=True)
    m = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(m, randomSeed=seed)
    AllChem.MMFFOptimizeMolecule(m)
    heavy = np.array([a.GetIdx() for a in m.GetAtoms() if a.GetAtomicNum() > 1])
    return g, np.asarray(m.GetConformer().GetPositions())[heavy]


def test_sdf_of_a_heavy_atom_graph_holds_every_atom(tmp_path):
    """Hydrogens placed from the heavy atoms: the molecular formula is complete, the heavy atoms are
    exactly the sampled ones, and the record says how the hydrogens came about."""
    g, heavy = _etkdg_heavy("C[C@H](O)C(=O)O")
    records = make_records([g], [heavy[None]], {"qm_method": "test"})
    write_sdf(tmp_path / "a.sdf", records)
    write_xyz(tmp_path / "a.xyz", records)
    mol = Chem.MolFromMolFile(str(tmp_path / "a.sdf"), removeHs=False)
    assert mol.GetNumAtoms() == 12 and Chem.rdMolDescriptors.CalcMolFormula(mol) == "C3H6O3"
    assert np.allclose(mol.GetConformer().GetPositions()[:6], heavy, atol=1e-4)
    assert records[0]["props"]["qm_hydrogens"].startswith("placed from the heavy atoms")
    assert (tmp_path / "a.xyz").read_text().splitlines()[0] == "12"
    # every C-H / O-H bond has a sensible length (no hydrogen left at the origin)
    pos = mol.GetConformer().GetPositions()
    for b in mol.GetBonds():
        if 1 in (b.GetBeginAtom().GetAtomicNum(), b.GetEndAtom().GetAtomicNum()):
            assert 0.9 < np.linalg.norm(pos[b.GetBeginAtomIdx()] - pos[b.GetEndAtomIdx()]) < 1.2
    # opting out writes the heavy atoms only
    bare = make_records([g], [heavy[None]], hydrogens=False)
    assert bare[0]["complete"] is None and bare[0]["props"]["qm_hydrogens"] == "none (heavy atoms only)"


def test_mmff_refinement_cleans_local_geometry_and_keeps_the_conformer():
    g, heavy = _etkdg_heavy("CC(C)C(=O)NC1CC1", seed=3)
    noisy = heavy + np.random.default_rng(0).normal(scale=0.08, size=heavy.shape)
    refined = complete_conformer(g, noisy, "mmff")
    assert refined.refine.startswith("MMFF94, all atoms") and refined.stats["mmff_missing_params"] == 0

    def bond_error(x):
        return np.mean([abs(np.linalg.norm(x[i] - x[j]) - np.linalg.norm(heavy[i] - heavy[j]))
                        for i, j in zip(*np.nonzero(np.triu(g.bond_types)))])

    assert bond_error(refined.heavy) < 0.3 * bond_error(noisy)
    def aligned_rmsd(x, y):  # Kabsch
        x, y = x - x.mean(0), y - y.mean(0)
        u, _, vt = np.linalg.svd(x.T @ y)
        d = np.sign(np.linalg.det(u @ vt))
        r = u @ np.diag([1.0, 1.0, d]) @ vt
        return float(np.sqrt(np.mean(np.sum((x @ r - y) ** 2, -1))))

    # the refined conformer is the one the noise was added to (same basin), only cleaner
    assert aligned_rmsd(refined.heavy, heavy) < aligned_rmsd(noisy, heavy) < 0.2
    fixed = complete_conformer(g, noisy, "mmff", hydrogens_only=True)
    assert np.array_equal(fixed.heavy, noisy) and fixed.refine.startswith("MMFF94, hydrogens only")
    with pytest.raises(ValueError, match="unknown refinement 'uff'"):
        complete_conformer(g, noisy, "uff")


def test_refinement_never_changes_the_stereo_of_a_sample():
    """A strained, nearly planar centre that MMFF94 would invert keeps the sampled geometry."""
    g, heavy = _etkdg_heavy("C[C@H](O)C(=O)O")
    centre, nbrs = 1, [0, 2, 3]
    flat = heavy.copy()
    plane_mid = heavy[nbrs].mean(0)
    normal = np.cross(heavy[2] - heavy[0], heavy[3] - heavy[0])
    normal /= np.linalg.norm(normal)
    side = np.sign((heavy[centre] - plane_mid) @ normal)
    flat[centre] = plane_mid + side * 0.02 * normal  # 0.02 A on the requested side
    # (nearly flat on purpose: only the sign counts here, not the strict pyramidality of generated centres)
    assert stereo_agreement(flat, g.bond_types, g.stereo, min_volume=1e-3) == (1, 1)
    seen_revert = False
    for shift in np.linspace(-0.3, 0.3, 7):
        x = flat.copy()
        x[0] += shift * normal  # push a substituent so that relaxing may go either way
        out = complete_conformer(g, x, "mmff")
        assert (stereo_agreement(out.heavy, g.bond_types, g.stereo, min_volume=1e-3)
                == stereo_agreement(x, g.bond_types, g.stereo, min_volume=1e-3))
        if out.stats["mmff_changed_stereo"]:
            seen_revert = True
            assert np.array_equal(out.heavy, x) and out.refine.startswith("none (MMFF94 would have changed")
    _, stats = refine_conformers([g], [flat[None]], "mmff")
    assert set(stats) == {"mmff_missing_params", "mmff_not_converged", "mmff_changed_stereo"}
    assert seen_revert  # the case occurs (MMFF94 inverts this centre from some of these starts)


def test_stereo_redraws_fix_the_conformers_an_untrained_model_gets_wrong():
    """An untrained stereo-aware model picks each configuration about half the time; redraws
    (rejection sampling) leave no conformer with the wrong configuration, and say how many they took."""
    torch.manual_seed(0)
    model = build_denoiser("chiral_egnn", hidden=16, layers=1)
    from qmanifold.models.training import build_diffusion

    qd = build_diffusion(model, "quotient")
    g = graph_from_smiles("C[C@H](O)C(=O)O", ELEMENTS, heavy_atoms_only=True)
    plain: dict = {}
    first = sample_conformers(qd, [g], 12, steps=8, progress=False, stats=plain)[0]
    wrong = sum(stereo_agreement(x, g.bond_types, g.stereo)[0] != 1 for x in first)
    assert plain == {"stereo_redrawn": 0, "stereo_repaired": 0, "stereo_wrong": wrong} and wrong >= 2
    fixed: dict = {}
    again = sample_conformers(qd, [g], 12, steps=8, progress=False, stats=fixed, stereo_retries=12)[0]
    assert all(stereo_agreement(x, g.bond_types, g.stereo) == (1, 1) for x in again)
    assert fixed["stereo_wrong"] == 0 and fixed["stereo_redrawn"] >= wrong


def test_evaluate_scores_heavy_atoms_of_records_with_hydrogens(tmp_path):
    ds = load_qm9_extract(heavy_atoms_only=True)
    graphs = graphs_from_dataset(ds, "qm9-extract", range(6))
    confs = [g.positions[None] for g in graphs]
    write_sdf(tmp_path / "h.sdf", make_records(graphs, confs))
    recs = read_sdf_records(tmp_path / "h.sdf")
    assert any(r["atomic_numbers"].shape[0] > g.num_atoms for r, g in zip(recs, graphs))
    res = evaluate_samples(tmp_path / "h.sdf", progress=False)
    assert res["num_molecules_with_reference"] == 6 and res["coverage"]["AMR-R"] < 1e-3


def test_export_checkpoint_is_inference_only(tmp_path):
    from qmanifold.models.training import (
        TrainConfig,
        diffusion_from_checkpoint,
        export_checkpoint,
        load_checkpoint,
        train,
    )

    train(TrainConfig(data="qm9-extract", model="chiral_egnn", heavy_atoms_only=True, steps=2, batch_size=8, hidden=16,
                      layers=1, val_every=2, ckpt_every=2, val_limit=8, out=str(tmp_path / "run"), progress=False,
                      device="cpu"))
    src = load_checkpoint(tmp_path / "run" / "last.pt")
    slim = export_checkpoint(tmp_path / "run" / "last.pt", tmp_path / "slim.pt", {"command": "test"})
    back = load_checkpoint(tmp_path / "slim.pt")
    assert back["provenance"] == {"command": "test"} and "optimizer" not in back and back["ema_state_dict"] is None
    for k, v in src["ema_state_dict"].items():
        assert torch.equal(back["model"]["state_dict"][k], v)
    assert (tmp_path / "slim.pt").stat().st_size < 0.6 * (tmp_path / "run" / "last.pt").stat().st_size
    a = diffusion_from_checkpoint(src).denoiser
    b = diffusion_from_checkpoint(slim).denoiser
    x = torch.randn(1, 4, 3)
    kw = dict(mask=torch.ones(1, 4, dtype=torch.bool), atom_types=torch.tensor([[1, 1, 3, 2]]),
              bond_types=torch.zeros(1, 4, 4, dtype=torch.long))
    assert torch.equal(a(x, torch.full((1,), 0.5), **kw), b(x, torch.full((1,), 0.5), **kw))


def test_repair_moves_a_wrong_centre_to_its_side_and_leaves_quaternary_centres():
    from qmanifold.models.stereo import chirality_from_geometry, repair_centres

    g, heavy = _etkdg_heavy("C[C@H](O)C(=O)O")
    nb = [0, 2, 3]
    normal = np.cross(heavy[2] - heavy[0], heavy[3] - heavy[0])
    normal /= np.linalg.norm(normal)
    wrong = heavy.copy()
    wrong[1] -= 2.0 * ((heavy[1] - heavy[0]) @ normal) * normal  # mirrored through the neighbours' plane
    assert stereo_agreement(wrong, g.bond_types, g.stereo) == (0, 1)
    fixed, moved = repair_centres(wrong, g.bond_types, g.stereo)
    assert moved == 1 and stereo_agreement(fixed, g.bond_types, g.stereo) == (1, 1)
    assert np.array_equal(np.delete(fixed, 1, 0), np.delete(wrong, 1, 0))  # only the centre moves
    bonds = [np.linalg.norm(fixed[1] - fixed[j]) for j in nb]
    assert all(1.2 < b < 1.8 for b in bonds)
    flat = heavy.copy()
    flat[1] -= ((heavy[1] - heavy[0]) @ normal) * normal  # in the plane: no configuration
    assert chirality_from_geometry(flat, g.bond_types, [1])[1] == 0
    assert stereo_agreement(repair_centres(flat, g.bond_types, g.stereo)[0], g.bond_types, g.stereo) == (1, 1)
    right, none = repair_centres(heavy, g.bond_types, g.stereo)
    assert none == 0 and np.array_equal(right, heavy)
    # a quaternary centre (four bonded neighbours) cannot be inverted by moving one atom: left alone
    q, qheavy = _etkdg_heavy("C[C@](O)(N)CC")
    centre = int(np.nonzero(q.stereo.chirality)[0][0])
    mirrored = -qheavy
    out, moved = repair_centres(mirrored, q.bond_types, q.stereo)
    assert moved == 0 and np.array_equal(out, mirrored)
    assert stereo_agreement(out, q.bond_types, q.stereo)[0] == 0 and centre >= 0
