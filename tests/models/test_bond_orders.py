"""Bond orders and formal charges of ``.npz`` ensembles (issue 13, section 3).

An ensemble given as coordinates plus connectivity (an MD trajectory) must reach the SDF writer with
the right bond orders and formal charges: explicit orders > a SMILES template > RDKit's perception
of frame 0; charges are never guessed. The reference in every comparison is RDKit's own perception
of the input's first frame (``rdDetermineBonds.DetermineBonds``), independent of the loader.
"""

from __future__ import annotations

import numpy as np
import pytest

Chem = pytest.importorskip("rdkit.Chem")
from rdkit.Chem import AllChem, rdDetermineBonds

from qmanifold.errors import InputError
from qmanifold.models import sampling
from qmanifold.models.data import load_dataset, load_npz_ensemble, save_npz_ensemble
from qmanifold.models.sampling import MolGraph, graphs_from_dataset, make_records, write_sdf

ALA_DIPEPTIDE = "CC(=O)NC(C)C(=O)NC"
N_FRAMES = 5


def _embed(smiles: str, seed: int = 7):
    """ETKDG conformer with hydrogens: positions (N, 3), atomic numbers (N,), pairs (M, 2), orders (M,)."""
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    assert AllChem.EmbedMolecule(mol, params) == 0
    pos = mol.GetConformer().GetPositions()
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    Chem.Kekulize(mol, clearAromaticFlags=True)
    pairs = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], dtype=np.int64)
    orders = np.array([int(b.GetBondTypeAsDouble()) for b in mol.GetBonds()], dtype=np.int64)
    return pos, z, pairs, orders


def _frames(pos: np.ndarray, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """``N_FRAMES`` small random perturbations of one geometry (float32, as the file stores them)."""
    rng = np.random.default_rng(seed)
    return (pos[None] + scale * rng.standard_normal((N_FRAMES, *pos.shape))).astype(np.float32)


def _reference(positions: np.ndarray, z: np.ndarray, charge: int = 0):
    """RDKit's perception of one geometry (connectivity + orders + charges): (SMILES, per-atom charges)."""
    block = f"{len(z)}\n\n" + "".join(
        f"{Chem.GetPeriodicTable().GetElementSymbol(int(v))} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}\n"
        for v, p in zip(z, np.asarray(positions, dtype=np.float64)))
    mol = Chem.MolFromXYZBlock(block)
    rdDetermineBonds.DetermineBonds(mol, charge=charge)
    Chem.AssignStereochemistryFrom3D(mol)
    return Chem.MolToSmiles(Chem.RemoveHs(mol)), [a.GetFormalCharge() for a in mol.GetAtoms()]


def _write_and_reread(graphs, positions, path):
    """Write one SDF record per graph, re-read it with RDKit: list of (SMILES, per-atom charges)."""
    write_sdf(path, make_records(graphs, positions))
    out = []
    for mol in Chem.SDMolSupplier(str(path), removeHs=False):
        assert mol is not None
        Chem.AssignStereochemistryFrom3D(mol)
        out.append((Chem.MolToSmiles(Chem.RemoveHs(mol)), [a.GetFormalCharge() for a in mol.GetAtoms()]))
    return out


@pytest.fixture
def no_guessing(monkeypatch):
    """Fail if the SDF writer ever falls back to guessing charges from valences."""
    def refuse(mol):
        raise AssertionError("_guess_charges reached: the dataset's SMILES did not transfer onto the graph")

    monkeypatch.setattr(sampling, "_guess_charges", refuse)


# ----------------------------------------------------------------------------------------------
# perception (bonds given as connectivity only)
# ----------------------------------------------------------------------------------------------


def test_alanine_dipeptide_pairs_only_round_trip_matches_rdkit_perception(tmp_path, monkeypatch, no_guessing):
    pos, z, pairs, _ = _embed(ALA_DIPEPTIDE)
    frames = _frames(pos)
    path = tmp_path / "ala2.npz"
    save_npz_ensemble(path, frames, z, bonds=pairs)  # connectivity only: no orders, no SMILES
    ds = load_npz_ensemble(path)
    assert ds.metadata["bond_orders"] == "perceived"
    assert "DetermineBondOrders" in ds.metadata["bonds"] and "frame 0" in ds.metadata["bonds"]
    assert ds.metadata["charge"] == 0 and ds.metadata["formal_charges"] == [0] * len(z)
    bt = ds.get_numpy(0)["bond_types"]
    assert int((bt == 2).sum()) // 2 == 2  # the two carbonyls

    graphs = graphs_from_dataset(ds, str(path))
    got = _write_and_reread(graphs, [ds.get_numpy(k)["positions"] for k in range(N_FRAMES)], tmp_path / "a.sdf")
    ref_smiles, ref_charges = _reference(frames[0], z, charge=0)
    assert Chem.CanonSmiles(ref_smiles, useChiral=0) == Chem.CanonSmiles(ALA_DIPEPTIDE)
    assert len(got) == N_FRAMES
    for smi, charges in got:
        assert smi == ref_smiles
        assert charges == ref_charges == [0] * len(z)

    # the test has power: the old reading (all bonds single, charges guessed from valences by the
    # writer) is a different molecule with -1 charges on the carbonyl carbons and oxygens, and fails
    # the same comparison
    monkeypatch.undo()  # let the writer guess, as it did for these graphs before
    single = (bt > 0).astype(np.int64)
    it = ds.get_numpy(0)
    old = MolGraph(atomic_numbers=it["atomic_numbers"], atom_types=it["atom_types"], bond_types=single,
                   source="old", smiles="", positions=it["positions"].astype(np.float64))
    [(old_smiles, old_charges)] = _write_and_reread([old], [it["positions"]], tmp_path / "old.sdf")
    assert old_smiles != ref_smiles
    assert sorted(c for c in old_charges if c) == [-1, -1, -1, -1]
    assert old_charges != ref_charges


def test_zwitterion_charges_are_perceived_not_invented(tmp_path, no_guessing):
    pos, z, pairs, _ = _embed("[NH3+]CC(=O)[O-]")
    frames = _frames(pos, seed=1)
    path = tmp_path / "gly.npz"
    save_npz_ensemble(path, frames, z, bonds=pairs)  # total charge 0 (the default)
    ds = load_npz_ensemble(path)
    assert ds.metadata["bond_orders"] == "perceived" and ds.metadata["charges"] == "the perception"
    q = np.array(ds.metadata["formal_charges"])
    assert q[z == 7].tolist() == [1] and sorted(q[z == 8].tolist()) == [-1, 0] and q.sum() == 0
    got = _write_and_reread(graphs_from_dataset(ds, str(path))[:1], [ds.get_numpy(0)["positions"]], tmp_path / "g.sdf")
    ref_smiles, ref_charges = _reference(frames[0], z, charge=0)
    assert Chem.CanonSmiles(ref_smiles) == Chem.CanonSmiles("[NH3+]CC(=O)[O-]")
    assert got == [(ref_smiles, ref_charges)]


def test_anion_needs_its_total_charge(tmp_path, no_guessing):
    pos, z, pairs, _ = _embed("CC(=O)[O-]")
    frames = _frames(pos, seed=2)
    good = tmp_path / "acetate.npz"
    save_npz_ensemble(good, frames, z, bonds=pairs, charge=-1)
    ds = load_npz_ensemble(good)
    assert ds.metadata["charge"] == -1 and "total charge -1" in ds.metadata["bonds"]
    got = _write_and_reread(graphs_from_dataset(ds, str(good))[:1], [ds.get_numpy(0)["positions"]],
                            tmp_path / "ac.sdf")
    assert got == [_reference(frames[0], z, charge=-1)]
    assert Chem.CanonSmiles(got[0][0]) == Chem.CanonSmiles("CC(=O)[O-]")

    # the wrong total charge (0, the default) makes a closed-shell assignment impossible: a clear
    # error, not single bonds with made-up charges
    bad = tmp_path / "acetate_no_charge.npz"
    save_npz_ensemble(bad, frames, z, bonds=pairs)
    with pytest.raises(InputError, match=r"bond-order perception failed on frame 0.*total charge 0") as info:
        load_npz_ensemble(bad)
    msg = str(info.value)
    assert str(bad) in msg and "'bond_orders'" in msg and "'smiles'" in msg and "'charge'" in msg


def test_odd_electron_count_fails_perception(tmp_path):
    pos, z, pairs, _ = _embed("C[CH2]")  # ethyl radical: 17 electrons
    path = tmp_path / "ethyl.npz"
    save_npz_ensemble(path, _frames(pos, seed=3), z, bonds=pairs)
    with pytest.raises(InputError, match="bond-order perception failed on frame 0"):
        load_npz_ensemble(path)
    # with the charge of the cation the same geometry is a valid closed-shell molecule
    save_npz_ensemble(path, _frames(pos, seed=3), z, bonds=pairs, charge=1)
    ds = load_npz_ensemble(path)
    assert ds.metadata["charge"] == 1 and max(ds.metadata["formal_charges"]) == 1


def test_connectivity_perceived_when_bonds_absent(tmp_path, no_guessing):
    pos, z, _, _ = _embed(ALA_DIPEPTIDE, seed=11)
    frames = _frames(pos, seed=4)
    path = tmp_path / "ala2_nobonds.npz"
    save_npz_ensemble(path, frames, z)
    ds = load_dataset(str(path))
    assert ds.metadata["bond_orders"] == "perceived" and "DetermineConnectivity" in ds.metadata["bonds"]
    got = _write_and_reread(graphs_from_dataset(ds, str(path))[:1], [ds.get_numpy(0)["positions"]], tmp_path / "n.sdf")
    assert got == [_reference(frames[0], z)]


# ----------------------------------------------------------------------------------------------
# explicit orders and the SMILES template
# ----------------------------------------------------------------------------------------------


def test_bond_orders_field(tmp_path, no_guessing):
    pos, z, pairs, orders = _embed(ALA_DIPEPTIDE)
    frames = _frames(pos)
    path = tmp_path / "ala2_orders.npz"
    save_npz_ensemble(path, frames, z, bonds=pairs, bond_orders=orders)
    ds = load_npz_ensemble(path)
    assert ds.metadata["bond_orders"] == "explicit" and "bond orders from the file" in ds.metadata["bonds"]
    bt = ds.get_numpy(0)["bond_types"]
    assert np.array_equal(bt[pairs[:, 0], pairs[:, 1]], orders)
    got = _write_and_reread(graphs_from_dataset(ds, str(path))[:2], [ds.get_numpy(k)["positions"] for k in range(2)],
                            tmp_path / "o.sdf")
    assert got[0] == _reference(frames[0], z)

    # explicit orders of a zwitterion: the charges come from 'formal_charges' ...
    pos, z, pairs, orders = _embed("[NH3+]CC(=O)[O-]")
    ref = Chem.AddHs(Chem.MolFromSmiles("[NH3+]CC(=O)[O-]"))
    fc = np.array([a.GetFormalCharge() for a in ref.GetAtoms()])
    path = tmp_path / "gly_orders.npz"
    save_npz_ensemble(path, pos[None], z, bonds=pairs, bond_orders=orders, formal_charges=fc)
    ds = load_npz_ensemble(path)
    assert ds.metadata["charges"] == "file 'formal_charges'" and ds.metadata["formal_charges"] == fc.tolist()
    got = _write_and_reread(graphs_from_dataset(ds, str(path)), [ds.get_numpy(0)["positions"]], tmp_path / "z.sdf")
    assert got[0][1] == fc.tolist()
    # ... or, without them, from the perception when it fits the given orders (never a valence guess)
    save_npz_ensemble(path, pos[None], z, bonds=pairs, bond_orders=orders)
    ds = load_npz_ensemble(path)
    assert ds.metadata["charges"].startswith("perceived") and ds.metadata["formal_charges"] == fc.tolist()
    # formal charges that contradict the orders are refused
    save_npz_ensemble(path, pos[None], z, bonds=pairs, bond_orders=orders, formal_charges=np.zeros_like(fc))
    with pytest.raises(InputError, match="not a valid molecule for RDKit"):
        load_npz_ensemble(path)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"bond_orders": np.ones(3)}, r"'bond_orders' must be a numeric \(21,\) array"),
        ({"bond_orders": np.full(21, 5)}, "'bond_orders' orders must be 1, 2, 3, 4"),
        ({"formal_charges": np.zeros(5)}, r"'formal_charges' must hold \(22,\) integers"),
        ({"charge": np.array(0.5)}, "'charge' must be one integer"),
        ({"formal_charges": np.eye(22, dtype=np.int64)[0], "charge": np.array(0)}, "sum to 1 but 'charge' is 0"),
    ],
)
def test_malformed_fields(tmp_path, fields, match):
    pos, z, pairs, _ = _embed(ALA_DIPEPTIDE)
    path = tmp_path / "bad.npz"
    np.savez(path, positions=pos[None], atomic_numbers=z, bonds=pairs, **fields)
    with pytest.raises(InputError, match=match):
        load_npz_ensemble(path)


def test_bond_orders_field_needs_pairs(tmp_path):
    pos, z, pairs, orders = _embed(ALA_DIPEPTIDE)
    path = tmp_path / "bad.npz"
    np.savez(path, positions=pos[None], atomic_numbers=z, bond_orders=orders)
    with pytest.raises(InputError, match="'bond_orders' needs 'bonds'"):
        load_npz_ensemble(path)
    np.savez(path, positions=pos[None], atomic_numbers=z, bonds=np.c_[pairs, orders], bond_orders=orders)
    with pytest.raises(InputError, match="already hold the orders"):
        load_npz_ensemble(path)
    with pytest.raises(ValueError, match="bond_orders needs bonds"):
        save_npz_ensemble(path, pos[None], z, bond_orders=orders)


def test_smiles_template_matches_atoms_in_any_order(tmp_path, no_guessing):
    pos, z, pairs, _ = _embed(ALA_DIPEPTIDE)
    perm = np.random.default_rng(5).permutation(len(z))  # file atom k = embedded atom perm[k]
    inv = np.argsort(perm)
    frames = _frames(pos[perm], seed=6)
    path = tmp_path / "ala2_smiles.npz"
    save_npz_ensemble(path, frames, z[perm], bonds=inv[pairs], smiles=ALA_DIPEPTIDE)
    ds = load_npz_ensemble(path)
    assert ds.metadata["bond_orders"] == "smiles" and "AssignBondOrdersFromTemplate" in ds.metadata["bonds"]
    assert ds.smiles[0] == ALA_DIPEPTIDE  # the given SMILES describes the molecule: kept verbatim
    got = _write_and_reread(graphs_from_dataset(ds, str(path))[:1], [ds.get_numpy(0)["positions"]], tmp_path / "s.sdf")
    assert got == [_reference(frames[0], z[perm])]


def test_smiles_template_beats_perception_and_must_match(tmp_path):
    pos, z, pairs, _ = _embed("CC(=O)[O-]")
    path = tmp_path / "acetate_smiles.npz"
    # perception with the default charge 0 fails (see above); the template gives orders and charges
    save_npz_ensemble(path, pos[None], z, bonds=pairs, smiles="CC([O-])=O")
    ds = load_npz_ensemble(path)
    assert ds.metadata["bond_orders"] == "smiles" and ds.metadata["charge"] == -1
    assert ds.metadata["charges"] == "the SMILES"

    pos, z, pairs, _ = _embed(ALA_DIPEPTIDE)
    for smiles, match in [("CC(=O)NC(C)C(=O)OC", "does not match the atoms"),       # another formula
                          ("CC(=O)NCC(C)C(=O)N", "does not match the connectivity"),  # isomer C6H12N2O2
                          ("CC(=O)NC(C", "cannot be parsed")]:
        save_npz_ensemble(path, pos[None], z, bonds=pairs, smiles=smiles)
        with pytest.raises(InputError, match=match):
            load_npz_ensemble(path)


def test_explicit_orders_take_precedence_and_keep_charges_from_smiles(tmp_path):
    pos, z, pairs, orders = _embed("[NH3+]CC(=O)[O-]")
    path = tmp_path / "gly_both.npz"
    save_npz_ensemble(path, pos[None], z, bonds=np.c_[pairs, orders], smiles="[NH3+]CC(=O)[O-]")
    ds = load_npz_ensemble(path)
    assert ds.metadata["bond_orders"] == "explicit" and ds.metadata["charges"] == "the SMILES"
    assert sum(ds.metadata["formal_charges"]) == 0 and sorted(ds.metadata["formal_charges"])[::len(z) - 1] == [-1, 1]


# ----------------------------------------------------------------------------------------------
# heavy-atom-only data
# ----------------------------------------------------------------------------------------------


def test_heavy_atoms_only_after_all_atom_resolution(tmp_path, no_guessing):
    pos, z, pairs, _ = _embed(ALA_DIPEPTIDE)
    frames = _frames(pos)
    path = tmp_path / "ala2.npz"
    save_npz_ensemble(path, frames, z, bonds=pairs)
    ds = load_npz_ensemble(path, heavy_atoms_only=True)  # perceived with H, then H dropped
    assert ds.heavy_atoms_only and ds.metadata["bond_orders"] == "perceived"
    heavy = z != 1
    write_sdf(tmp_path / "h.sdf", make_records(graphs_from_dataset(ds, str(path))[:1], [ds.get_numpy(0)["positions"]]))
    [mol] = list(Chem.SDMolSupplier(str(tmp_path / "h.sdf")))
    Chem.AssignStereochemistryFrom3D(mol)
    assert mol.GetNumAtoms() == int(heavy.sum())
    assert Chem.MolToSmiles(mol) == _reference(frames[0], z)[0]


def test_file_without_hydrogens(tmp_path, no_guessing):
    pos, z, pairs, orders = _embed(ALA_DIPEPTIDE)
    heavy = np.nonzero(z != 1)[0]
    keep = np.isin(pairs, heavy).all(axis=1)
    new = np.full(len(z), -1)
    new[heavy] = np.arange(heavy.size)
    hpairs, horders = new[pairs[keep]], orders[keep]
    path = tmp_path / "heavy.npz"
    save_npz_ensemble(path, pos[heavy][None], z[heavy], bonds=hpairs)
    with pytest.raises(InputError, match="no hydrogen atoms.*'bond_orders'.*'smiles'"):
        load_npz_ensemble(path, heavy_atoms_only=True)
    ref = Chem.CanonSmiles(ALA_DIPEPTIDE)
    for extra in ({"bond_orders": horders}, {"smiles": ALA_DIPEPTIDE}):
        save_npz_ensemble(path, pos[heavy][None], z[heavy], bonds=hpairs, **extra)
        ds = load_npz_ensemble(path, heavy_atoms_only=True)
        assert ds.metadata["bond_orders"] == ("explicit" if "bond_orders" in extra else "smiles")
        assert Chem.CanonSmiles(ds.smiles[0], useChiral=0) == ref
        write_sdf(tmp_path / "hh.sdf", make_records(graphs_from_dataset(ds, str(path)), [ds.get_numpy(0)["positions"]]))
        [mol] = list(Chem.SDMolSupplier(str(tmp_path / "hh.sdf")))
        assert Chem.MolToSmiles(mol, isomericSmiles=False) == ref
        assert all(a.GetFormalCharge() == 0 for a in mol.GetAtoms())
