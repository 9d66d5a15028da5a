"""Tests of the molecular dataset layer (models.data).

Fast: the full QM9 parse is never run here; CSV parsing is exercised with ``limit=``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from qmanifold.models.data import (
    ELEMENTS,
    QM9_SPLIT_SIZES,
    MoleculeDataset,
    SizeBucketBatchSampler,
    collate_molecules,
    load_dataset,
    load_npz_ensemble,
    load_qm9_extract,
    make_dataloader,
    padding_fraction,
    save_npz_ensemble,
    standard_split,
)
from qmanifold.models.data.qm9 import EXTRACT_PATH

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rdkit():
    return pytest.importorskip("rdkit", reason="RDKit is needed for SMILES/SDF parsing and bond perception")


def _qm9_source():
    _rdkit()
    from qmanifold.models.data.qm9 import qm9_data_dir

    try:
        qm9_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"qm9pack data not installed: {exc}")


@pytest.fixture(scope="module")
def extract() -> MoleculeDataset:
    return load_qm9_extract()


@pytest.fixture(scope="module")
def qm9_head(tmp_path_factory):
    """The first 120 rows of the QM9 CSVs, parsed end to end (cached in a temp folder)."""
    _qm9_source()
    from qmanifold.models.data import load_qm9

    cache = tmp_path_factory.mktemp("qm9cache")
    return load_qm9(cache_dir=str(cache), limit=120, progress=False), str(cache)


# ----------------------------------------------------------------------------------------------
# The committed extract
# ----------------------------------------------------------------------------------------------


def test_extract_loads_without_rdkit_or_qm9pack():
    code = (
        "import sys\n"
        "sys.modules['rdkit'] = None\n"
        "sys.modules['qm9pack'] = None\n"
        "from qmanifold.models.data import load_qm9_extract, collate_molecules\n"
        "ds = load_qm9_extract()\n"
        "b = collate_molecules([ds[i] for i in range(4)])\n"
        "print(len(ds), *[len(ds.split(s)) for s in ('train', 'valid', 'test')])\n"
        "assert 'rdkit' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["500", "300", "100", "100"]


def test_extract_file_is_small_and_traceable(extract):
    assert os.path.getsize(EXTRACT_PATH) < 1_000_000
    assert len(extract) == 500
    assert extract.source == "qm9-extract"
    assert extract.elements == ELEMENTS
    assert np.all(np.diff(extract.indices) > 0)  # sorted by QM9 id, unique
    sizes = {s: len(extract.split(s)) for s in ("train", "valid", "test")}
    assert sizes == {"train": 300, "valid": 100, "test": 100}
    info_path = os.path.splitext(EXTRACT_PATH)[0] + ".json"
    if os.path.exists(info_path):
        with open(info_path) as fh:
            info = json.load(fh)
        for k, s in enumerate(("train", "valid", "test")):
            assert sorted(info["indices"][s]) == extract.indices[extract.split_labels == k].tolist()


def test_extract_split_labels_agree_with_standard_split(extract):
    _qm9_source()
    from qmanifold.models.data.qm9 import scan_qm9_indices

    universe = scan_qm9_indices()
    assert universe.size == 130_831
    parts = standard_split(universe)
    for k, name in enumerate(("train", "valid", "test")):
        ids = extract.indices[extract.split_labels == k]
        assert np.isin(ids, parts[name]).all()
        # the extract takes the first molecules of each split in permutation order
        assert set(ids.tolist()) <= set(parts[name][: len(ids) + 50].tolist())


def test_extract_items_and_units(extract):
    item = extract[0]
    n = item["num_atoms"]
    assert item["positions"].dtype == torch.float32 and item["positions"].shape == (n, 3)
    assert item["atomic_numbers"].dtype == torch.int64 and item["atom_types"].dtype == torch.int64
    assert item["bond_types"].dtype == torch.int64 and item["bond_types"].shape == (n, n)
    assert isinstance(item["index"], int) and isinstance(item["smiles"], str) and item["smiles"]
    # atom types index into ELEMENTS
    z = item["atomic_numbers"].numpy()
    assert np.array_equal(np.asarray(ELEMENTS)[item["atom_types"].numpy()], z)
    # bond lengths from the bond graph, in Angstrom
    mol, pairs, orders = extract.bond_table()
    off = extract.atom_offsets
    zz = extract.all_atomic_numbers
    gi, gj = off[mol] + pairs[:, 0], off[mol] + pairs[:, 1]
    d = np.linalg.norm(extract.all_positions[gi] - extract.all_positions[gj], axis=1)
    zi, zj = np.minimum(zz[gi], zz[gj]), np.maximum(zz[gi], zz[gj])
    ch = d[(zi == 1) & (zj == 6)]
    assert ch.size > 1000
    assert abs(ch.mean() - 1.09) < 0.01 and ch.min() > 1.05 and ch.max() < 1.13
    cc = (zi == 6) & (zj == 6)
    assert cc.sum() > 500
    assert d[cc].min() > 1.15 and d[cc].max() < 1.70
    assert 1.50 < np.median(d[cc & (orders == 1)]) < 1.56
    if np.any(cc & (orders == 3)):
        # C#C ~1.20 A; a few zwitterion SMILES (e.g. QM9 22054) put a formal triple bond on a
        # conjugated 1.245 A bond
        assert np.all(np.abs(d[cc & (orders == 3)] - 1.20) < 0.05)
        assert abs(np.median(d[cc & (orders == 3)]) - 1.20) < 0.01
    if np.any(cc & (orders == 4)):
        assert 1.36 < np.median(d[cc & (orders == 4)]) < 1.42
    # every hydrogen has exactly one bond
    deg = np.bincount(np.concatenate([gi, gj]), minlength=zz.size)
    assert np.all(deg[zz == 1] == 1)
    # molecule sizes of QM9 (up to 9 heavy atoms, 29 atoms in total)
    assert extract.num_atoms.max() <= 29
    heavy = np.add.reduceat((zz > 1).astype(np.int64), off[:-1])
    assert heavy.max() <= 9


def test_bond_matrix_symmetric_and_consistent_with_rdkit(extract):
    _rdkit()
    from rdkit import Chem

    codes = {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}
    rows = list(range(0, len(extract), 25))
    rows += [k for k in range(len(extract)) if "c" in extract.smiles[k] or "n" in extract.smiles[k]][:5]
    for k in rows:
        it = extract.get_numpy(k)
        b, z = it["bond_types"], it["atomic_numbers"]
        assert np.array_equal(b, b.T) and np.all(np.diag(b) == 0)
        ref = Chem.AddHs(Chem.MolFromSmiles(it["smiles"]))
        assert ref.GetNumAtoms() == len(z)
        ref_bonds = sorted(
            (min(a.GetBeginAtom().GetAtomicNum(), a.GetEndAtom().GetAtomicNum()),
             max(a.GetBeginAtom().GetAtomicNum(), a.GetEndAtom().GetAtomicNum()),
             4 if a.GetIsAromatic() else codes[a.GetBondType()])
            for a in ref.GetBonds())
        i, j = np.nonzero(np.triu(b))
        ours = sorted((int(min(z[p], z[q])), int(max(z[p], z[q])), int(b[p, q])) for p, q in zip(i, j))
        assert ours == ref_bonds, it["smiles"]
        ref_atoms = sorted((a.GetAtomicNum(), a.GetDegree()) for a in ref.GetAtoms())
        ours_atoms = sorted((int(z[p]), int((b[p] > 0).sum())) for p in range(len(z)))
        assert ours_atoms == ref_atoms


def test_aromatic_molecules_present(extract):
    _, _, orders = extract.bond_table()
    assert np.any(orders == 4) and np.any(orders == 2) and np.any(orders == 3)


def test_heavy_atoms_only(extract):
    heavy = load_qm9_extract(heavy_atoms_only=True)
    assert heavy.heavy_atoms_only and len(heavy) == len(extract)
    assert np.all(heavy.all_atomic_numbers != 1)
    for k in (0, 7, 123, 499):
        full, h = extract.get_numpy(k), heavy.get_numpy(k)
        keep = full["atomic_numbers"] != 1
        assert np.array_equal(h["positions"], full["positions"][keep])
        assert np.array_equal(h["bond_types"], full["bond_types"][np.ix_(keep, keep)])
        assert h["index"] == full["index"] and h["smiles"] == full["smiles"]
    assert np.array_equal(extract.without_hydrogens().all_positions, heavy.all_positions)
    assert len(heavy.split("valid")) == 100


def test_with_elements_and_unknown_element(extract):
    ext = extract.with_elements((6, 1, 7, 8, 9, 16))
    it = ext.get_numpy(3)
    assert np.array_equal(np.asarray((6, 1, 7, 8, 9, 16))[it["atom_types"]], it["atomic_numbers"])
    with pytest.raises(ValueError, match=r"unknown element\(s\) H"):
        extract.with_elements((6, 7, 8, 9))
    # without hydrogens the H-free element list is fine
    assert len(extract.without_hydrogens().with_elements((6, 7, 8, 9))) == 500


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------


def test_standard_split_sizes_and_determinism():
    ids = np.arange(1, 130_832)
    a = standard_split(ids)
    assert [len(a[s]) for s in ("train", "valid", "test")] == [100_000, 17_748, 13_083]
    assert sum(QM9_SPLIT_SIZES) == 130_831
    allids = np.concatenate([a["train"], a["valid"], a["test"]])
    assert np.array_equal(np.sort(allids), ids)  # disjoint and complete
    perm = np.random.default_rng(0).permutation(130_831)
    assert np.array_equal(a["train"][:10], ids[perm[:10]])
    assert np.array_equal(a["test"], ids[perm[-13_083:]])
    b = standard_split(np.random.default_rng(5).permutation(ids))  # input order does not matter
    for s in ("train", "valid", "test"):
        assert np.array_equal(a[s], b[s])
    c = standard_split(ids, seed=1)
    assert not np.array_equal(a["train"], c["train"])
    with pytest.raises(ValueError, match="sum to"):
        standard_split(np.arange(100))
    with pytest.raises(ValueError, match="duplicates"):
        standard_split(np.r_[ids[:-1], 1])


def test_split_errors(extract, tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        extract.split("validation")
    p = tmp_path / "ens.npz"
    it = extract.get_numpy(0)
    save_npz_ensemble(p, it["positions"][None], it["atomic_numbers"], bonds=it["bond_types"])
    with pytest.raises(ValueError, match="no train/valid/test split"):
        load_npz_ensemble(p).split("train")


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def test_collate_shapes_masks_and_padding(extract):
    rows = [0, 1, 250, 499]
    items = [extract[k] for k in rows]
    batch = collate_molecules(items)
    n = np.array([it["num_atoms"] for it in items])
    nmax = n.max()
    assert set(batch) == {"positions", "mask", "atomic_numbers", "atom_types", "bond_types", "num_atoms",
                          "index", "smiles"}
    assert batch["positions"].shape == (4, nmax, 3) and batch["positions"].dtype == torch.float32
    assert batch["mask"].shape == (4, nmax) and batch["mask"].dtype == torch.bool
    for key in ("atomic_numbers", "atom_types"):
        assert batch[key].shape == (4, nmax) and batch[key].dtype == torch.int64
    assert batch["bond_types"].shape == (4, nmax, nmax) and batch["bond_types"].dtype == torch.int64
    assert batch["index"].dtype == torch.int64 and batch["index"].tolist() == [it["index"] for it in items]
    assert batch["smiles"] == [it["smiles"] for it in items]
    assert batch["mask"].sum(1).tolist() == n.tolist() == batch["num_atoms"].tolist()
    pad = ~batch["mask"]
    assert pad.any()
    assert torch.all(batch["positions"][pad] == 0)
    assert torch.all(batch["atomic_numbers"][pad] == 0) and torch.all(batch["atom_types"][pad] == 0)
    pair_pad = pad[:, :, None] | pad[:, None, :]
    assert torch.all(batch["bond_types"][pair_pad] == 0)
    assert torch.equal(batch["bond_types"], batch["bond_types"].transpose(1, 2))
    for b, it in enumerate(items):
        k = it["num_atoms"]
        assert torch.equal(batch["positions"][b, :k], it["positions"])
        assert torch.equal(batch["bond_types"][b, :k, :k], it["bond_types"])
    # numpy items collate the same way
    np_batch = collate_molecules([extract.get_numpy(k) for k in rows])
    assert torch.equal(np_batch["positions"], batch["positions"])
    assert torch.equal(np_batch["bond_types"], batch["bond_types"])


def test_collate_errors(extract):
    with pytest.raises(ValueError, match="empty batch"):
        collate_molecules([])
    it = extract.get_numpy(0)
    bad = dict(it)
    del bad["bond_types"]
    with pytest.raises(ValueError, match="lacks key"):
        collate_molecules([bad])
    bad = dict(it, atom_types=it["atom_types"][:-1])
    with pytest.raises(ValueError, match="atom_types"):
        collate_molecules([bad])


def test_size_bucket_sampler(extract):
    n = extract.num_atoms
    s = SizeBucketBatchSampler(n, batch_size=16, shuffle=True, seed=3, pool_batches=8)
    batches = list(s)
    assert len(batches) == len(s)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(len(extract)))  # every molecule exactly once
    assert [list(b) for b in s] == [list(b) for b in batches]  # deterministic per epoch
    s.set_epoch(1)
    assert [list(b) for b in s] != [list(b) for b in batches]
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(extract))
    random_batches = [perm[i:i + 16] for i in range(0, len(perm), 16)]
    assert padding_fraction(batches, n) < 0.5 * padding_fraction(random_batches, n)
    s2 = SizeBucketBatchSampler(n, batch_size=16, shuffle=False, drop_last=True)
    assert all(len(b) == 16 for b in s2) and len(list(s2)) == len(s2) == len(extract) // 16
    with pytest.raises(ValueError, match="batch_size"):
        SizeBucketBatchSampler(n, batch_size=0)
    loader = make_dataloader(extract.split("train"), batch_size=32, seed=0)
    total = 0
    for batch in loader:
        assert batch["positions"].shape[0] == batch["mask"].shape[0] <= 32
        total += batch["positions"].shape[0]
    assert total == 300


# ----------------------------------------------------------------------------------------------
# MoleculeDataset container
# ----------------------------------------------------------------------------------------------


def _toy(**over):
    kw = dict(
        positions=np.array([[0, 0, 0], [1.1, 0, 0], [0, 0, 0], [1.2, 0, 0], [2.4, 0, 0]], float),
        atomic_numbers=np.array([6, 1, 8, 6, 8]),
        atom_offsets=np.array([0, 2, 5]),
        bond_pairs=np.array([[0, 1], [0, 1], [2, 1]]),
        bond_orders=np.array([1, 2, 2]),
        bond_offsets=np.array([0, 1, 3]),
        indices=np.array([10, 11]),
        smiles=["C", "O=C=O"],
    )
    kw.update(over)
    return MoleculeDataset(**kw)


def test_dataset_validation_errors():
    ds = _toy()
    assert len(ds) == 2 and ds[1]["bond_types"].tolist() == [[0, 2, 0], [2, 0, 2], [0, 2, 0]]
    assert ds[-1]["index"] == 11
    with pytest.raises(IndexError):
        ds[2]
    pos = _toy().all_positions.copy()
    pos[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite .*\[11\]"):
        _toy(positions=pos)
    with pytest.raises(ValueError, match="atom count mismatch"):
        _toy(bond_pairs=np.array([[0, 2], [0, 1], [2, 1]]))
    with pytest.raises(ValueError, match="atomic_numbers must have shape"):
        _toy(atomic_numbers=np.array([6, 1, 8, 6]))
    with pytest.raises(ValueError, match="atom_offsets ends at"):
        _toy(atom_offsets=np.array([0, 2, 4]))
    with pytest.raises(ValueError, match="bond_orders must lie in 1..4"):
        _toy(bond_orders=np.array([1, 5, 2]))
    with pytest.raises(ValueError, match="duplicate bonds"):
        _toy(bond_pairs=np.array([[0, 1], [0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="self bonds"):
        _toy(bond_pairs=np.array([[0, 1], [1, 1], [2, 1]]))
    with pytest.raises(ValueError, match=r"unknown element\(s\) S \(Z=16\)"):
        _toy(atomic_numbers=np.array([6, 1, 16, 6, 8]))


def test_dataset_save_load_roundtrip_and_corrupt_file(extract, tmp_path):
    sub = extract.subset([5, 1, 400])
    assert sub.indices.tolist() == extract.indices[[5, 1, 400]].tolist()
    p = tmp_path / "sub.npz"
    sub.save(p)
    assert sorted(os.listdir(tmp_path)) == ["sub.npz"]  # no temp file left behind
    back = MoleculeDataset.load(p)
    for k in range(3):
        a, b = sub.get_numpy(k), back.get_numpy(k)
        for key in a:
            if isinstance(a[key], np.ndarray):
                assert np.array_equal(a[key], b[key]) and a[key].dtype == b[key].dtype
            else:
                assert a[key] == b[key]
    assert np.array_equal(back.split_labels, sub.split_labels) and back.source == "qm9-extract"
    assert isinstance(load_dataset(str(p)), MoleculeDataset)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip file")
    with pytest.raises(ValueError, match="not a valid .npz file"):
        MoleculeDataset.load(bad)
    np.savez(tmp_path / "other.npz", positions=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="missing field"):
        MoleculeDataset.load(tmp_path / "other.npz")


# ----------------------------------------------------------------------------------------------
# QM9 CSV parsing (limit=, fast)
# ----------------------------------------------------------------------------------------------


def test_parse_qm9_rows_end_to_end(qm9_head, extract):
    ds, _ = qm9_head
    assert len(ds) + sum(ds.skipped.values()) == 120
    assert ds.skipped == {}
    assert ds.indices[0] == 1 and np.all(np.diff(ds.indices) > 0)
    first = ds.get_numpy(0)  # methane, QM9 id 1
    assert first["smiles"] == "C" and first["atomic_numbers"].tolist() == [6, 1, 1, 1, 1]
    assert first["bond_types"][0, 1:].tolist() == [1, 1, 1, 1]
    assert np.allclose(first["positions"][0], [-0.0126981359, 1.0858041578, 0.0080009958], atol=1e-6)
    # split labels are those of the full standard split
    from qmanifold.models.data.qm9 import scan_qm9_indices

    parts = standard_split(scan_qm9_indices())
    for k, name in enumerate(("train", "valid", "test")):
        assert np.isin(ds.indices[ds.split_labels == k], parts[name]).all()
    # molecules also in the extract are identical
    common = np.intersect1d(ds.indices, extract.indices)
    for idx in common[:5]:
        a, b = ds.get_numpy(ds.find(idx)), extract.get_numpy(extract.find(idx))
        assert np.array_equal(a["bond_types"], b["bond_types"]) and np.array_equal(a["positions"], b["positions"])


def test_strained_cage_bonds_not_overcounted(qm9_head):
    """Bicyclo[1.1.1]pentane (QM9 id 105): the 1.88 Å bridgehead contact is not a bond."""
    ds, _ = qm9_head
    it = ds.get_numpy(ds.find(105))
    assert it["smiles"] == "C1C2CC1C2"
    assert int((np.triu(it["bond_types"]) > 0).sum()) == 14  # 6 C-C + 8 C-H
    z, b, x = it["atomic_numbers"], it["bond_types"], it["positions"]
    c = np.nonzero(z == 6)[0]
    d = np.linalg.norm(x[c][:, None] - x[c][None], axis=-1)
    bonded = b[np.ix_(c, c)] > 0
    assert d[bonded].max() < 1.6 and d[~bonded & ~np.eye(len(c), dtype=bool)].min() > 1.8


def test_qm9_cache_reload_and_corrupt_cache(qm9_head):
    from qmanifold.models.data import load_qm9
    from qmanifold.models.data.qm9 import _cache_path

    ds, cache = qm9_head
    path = _cache_path(cache, 120)
    assert os.path.exists(path)
    again = load_qm9(cache_dir=cache, limit=120, progress=False)
    assert np.array_equal(again.all_positions, ds.all_positions) and again.smiles == ds.smiles
    with open(path, "wb") as fh:
        fh.write(b"garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = load_qm9(cache_dir=cache, limit=120, progress=False)
    assert np.array_equal(rebuilt.all_positions, ds.all_positions)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_qm9(cache_dir=cache, limit=120, progress=False)  # the rebuilt cache is fine


def test_qm9_cache_dir_env_var(monkeypatch, tmp_path):
    from qmanifold.models.data import default_cache_dir

    monkeypatch.setenv("QMANIFOLD_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("QMANIFOLD_CACHE")
    assert default_cache_dir().endswith(os.path.join(".cache", "qmanifold"))


def test_process_row_skip_reasons():
    _rdkit()
    from qmanifold.models.data.qm9 import _process_row

    xyz = "[[0.,0.,0.],[0.,0.,1.09],[1.03,0.,-0.36],[-0.51,0.89,-0.36],[-0.51,-0.89,-0.36]]"
    els = "['C','H','H','H','H']"
    assert _process_row((1, "C", "5", els, xyz))[0] == "ok"
    assert _process_row((1, "C", "4", els, xyz)) == ("skip", (1, "atom_count_mismatch"))
    assert _process_row((1, "[NH4+]", "5", els, xyz)) == ("skip", (1, "formula_mismatch"))
    assert _process_row((1, "CC", "5", els, xyz)) == ("skip", (1, "atom_count_mismatch"))
    assert _process_row((1, "C(C)(C)(C)(C)C", "5", els, xyz)) == ("skip", (1, "smiles_parse_failure"))
    assert _process_row((1, "C", "5", "['C','H','H','H','Xx']", xyz)) == ("skip", (1, "unknown_element"))
    assert _process_row((1, "C", "5", els, xyz.replace("1.09", "nan"))) == ("skip", (1, "malformed_row"))
    assert _process_row((1, "C", "5", els, xyz.replace("1.09", "1e999"))) == ("skip", (1, "nonfinite_coordinates"))
    assert _process_row((1, "C", "5", els, xyz.replace("1.09", "3.5"))) == ("skip", (1, "graph_mismatch"))
    assert _process_row((1, None, None, None, None)) == ("skip", (1, "malformed_row"))


def test_match_smiles_to_geometry_is_order_invariant(extract):
    _rdkit()
    from qmanifold.models.data import GraphMatchError, match_smiles_to_geometry

    rng = np.random.default_rng(0)
    for k in (3, 150, 321, 444):
        it = extract.get_numpy(k)
        perm = rng.permutation(it["num_atoms"])
        pairs, orders = match_smiles_to_geometry(it["smiles"], it["atomic_numbers"][perm], it["positions"][perm])
        b = np.zeros_like(it["bond_types"])
        b[pairs[:, 0], pairs[:, 1]] = orders
        b[pairs[:, 1], pairs[:, 0]] = orders
        # the same labelled graph (up to automorphisms): same bonded element pairs with the same
        # orders, same (element, degree) atoms
        ref = it["bond_types"][np.ix_(perm, perm)]
        z = it["atomic_numbers"][perm]

        def bond_multiset(m):
            i, j = np.nonzero(np.triu(m))
            return sorted((int(min(z[p], z[q])), int(max(z[p], z[q])), int(m[p, q])) for p, q in zip(i, j))

        assert bond_multiset(b) == bond_multiset(ref)
        assert sorted(zip(z.tolist(), (b > 0).sum(1).tolist())) == sorted(zip(z.tolist(), (ref > 0).sum(1).tolist()))
    it = extract.get_numpy(3)
    with pytest.raises(GraphMatchError) as err:
        match_smiles_to_geometry("C", it["atomic_numbers"], it["positions"])
    assert err.value.reason in ("atom_count_mismatch", "formula_mismatch")


# ----------------------------------------------------------------------------------------------
# User data: npz ensembles
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def ensemble(extract):
    it = extract.get_numpy(extract.find(int(extract.indices[10])))
    rng = np.random.default_rng(1)
    frames = it["positions"][None] + 0.01 * rng.standard_normal((3, it["num_atoms"], 3))
    return it, frames.astype(np.float32)


@pytest.mark.parametrize("layout", ["matrix", "pairs_with_order", "pairs", "perceived"])
def test_npz_ensemble_roundtrip(ensemble, tmp_path, layout):
    it, frames = ensemble
    b = it["bond_types"]
    i, j = np.nonzero(np.triu(b))
    bonds = {"matrix": b, "pairs_with_order": np.stack([i, j, b[i, j]], 1), "pairs": np.stack([j, i], 1),
             "perceived": None}[layout]
    if layout == "perceived":
        _rdkit()
    p = tmp_path / "ens.npz"
    save_npz_ensemble(p, frames, it["atomic_numbers"], bonds=bonds, smiles=it["smiles"])
    ds = load_dataset(str(p))
    assert len(ds) == 3 and ds.indices.tolist() == [0, 1, 2]
    for f in range(3):
        got = ds.get_numpy(f)
        assert np.array_equal(got["positions"], frames[f])
        assert np.array_equal(got["atomic_numbers"], it["atomic_numbers"])
        assert got["smiles"] == it["smiles"]
        if layout in ("matrix", "pairs_with_order"):
            assert np.array_equal(got["bond_types"], b)
        else:
            assert np.array_equal(got["bond_types"], (b > 0).astype(np.int64))
    heavy = load_npz_ensemble(p, heavy_atoms_only=True)
    assert np.all(heavy.all_atomic_numbers != 1)


def _write(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_positions", "missing required field 'positions'"),
        ("missing_atomic_numbers", "missing required field 'atomic_numbers'"),
        ("bad_positions_shape", "field 'positions' must have shape"),
        ("nan_positions", r"field 'positions' contains NaN .* frames \[1\]"),
        ("inf_positions", "field 'positions' contains NaN or infinite"),
        ("count_mismatch", "atom count mismatch"),
        ("unknown_element", r"unknown element\(s\) Cl \(Z=17\)"),
        ("float_atomic_numbers", "'atomic_numbers' must hold integers"),
        ("bonds_bad_shape", "field 'bonds' has shape"),
        ("bonds_out_of_range", "field 'bonds' refers to atom 7"),
        ("bonds_bad_order", "field 'bonds' orders must be"),
        ("bonds_self", "self bond"),
        ("bonds_duplicate", "same atom pair twice"),
        ("not_npz", "not a valid .npz file"),
    ],
)
def test_npz_ensemble_errors(tmp_path, case, match):
    pos = np.zeros((2, 3, 3))
    pos[:, 1, 0] = 0.96
    pos[:, 2, 1] = 0.96
    z = np.array([8, 1, 1])
    p = tmp_path / f"{case}.npz"
    if case == "missing_positions":
        _write(p, atomic_numbers=z)
    elif case == "missing_atomic_numbers":
        _write(p, positions=pos)
    elif case == "bad_positions_shape":
        _write(p, positions=pos[..., :2], atomic_numbers=z)
    elif case == "nan_positions":
        bad = pos.copy()
        bad[1, 0, 2] = np.nan
        _write(p, positions=bad, atomic_numbers=z)
    elif case == "inf_positions":
        bad = pos.copy()
        bad[0, 0, 2] = np.inf
        _write(p, positions=bad, atomic_numbers=z)
    elif case == "count_mismatch":
        _write(p, positions=pos, atomic_numbers=np.array([8, 1]))
    elif case == "unknown_element":
        _write(p, positions=pos, atomic_numbers=np.array([17, 1, 1]))
    elif case == "float_atomic_numbers":
        _write(p, positions=pos, atomic_numbers=np.array([8.0, 1.5, 1.0]))
    elif case == "bonds_bad_shape":
        _write(p, positions=pos, atomic_numbers=z, bonds=np.zeros((2, 4)))
    elif case == "bonds_out_of_range":
        _write(p, positions=pos, atomic_numbers=z, bonds=np.array([[0, 1], [0, 7]]))
    elif case == "bonds_bad_order":
        _write(p, positions=pos, atomic_numbers=z, bonds=np.array([[0, 1, 1], [0, 2, 7]]))
    elif case == "bonds_self":
        _write(p, positions=pos, atomic_numbers=z, bonds=np.array([[0, 1], [2, 2]]))
    elif case == "bonds_duplicate":
        _write(p, positions=pos, atomic_numbers=z, bonds=np.array([[0, 1], [1, 0]]))
    elif case == "not_npz":
        p.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=match):
        load_npz_ensemble(p)


def test_npz_ensemble_extended_elements(tmp_path):
    pos = np.array([[[0, 0, 0], [1.3, 0, 0]]], float)
    p = _write(tmp_path / "hcl.npz", positions=pos, atomic_numbers=np.array([17, 1]), bonds=np.array([[0, 1]]))
    ds = load_npz_ensemble(p, elements=ELEMENTS + (17,))
    assert ds[0]["atom_types"].tolist() == [5, 0]


def test_npz_ensemble_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_npz_ensemble(tmp_path / "nope.npz")


# ----------------------------------------------------------------------------------------------
# User data: SDF
# ----------------------------------------------------------------------------------------------

_BROKEN_RECORD = """broken
  made by hand

  2  1  0  0  0  0  0  0  0  0999 V2000
    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0
    1.5000    0.0000    0.0000 Qq  0  0  0  0  0  0  0  0  0  0  0  0
  1  2  1  0
M  END
$$$$
"""


def test_sdf_roundtrip_with_broken_record(tmp_path):
    _rdkit()
    from rdkit import Chem
    from rdkit.Chem import AllChem

    from qmanifold.models.data import load_sdf

    path = tmp_path / "mols.sdf"
    written, blocks = [], []
    for k, smi in enumerate(["CCO", "c1ccccc1", "C#N", "CC(=O)N"]):
        m = Chem.AddHs(Chem.MolFromSmiles(smi))
        assert AllChem.EmbedMolecule(m, randomSeed=k) == 0
        written.append(m)
        blocks.append(Chem.MolToMolBlock(m) + "$$$$\n")
        if k == 1:
            blocks.append(_BROKEN_RECORD)  # record 2: unknown element symbol, RDKit returns None
    flat = Chem.AddHs(Chem.MolFromSmiles("CO"))
    AllChem.Compute2DCoords(flat)  # record 5: a 2-D depiction
    blocks.append(Chem.MolToMolBlock(flat) + "$$$$\n")
    path.write_text("".join(blocks))
    with pytest.warns(UserWarning, match=r"skipped 2 SDF record\(s\)"):
        ds = load_sdf(path)
    assert ds.skipped == {"unparseable": 1, "not_3d": 1}
    assert len(ds) == 4 and ds.indices.tolist() == [0, 1, 3, 4]
    for k, m in enumerate(written):
        it = ds.get_numpy(k)
        assert np.allclose(it["positions"], m.GetConformer().GetPositions(), atol=1e-3)
        assert it["atomic_numbers"].tolist() == [a.GetAtomicNum() for a in m.GetAtoms()]
        assert np.array_equal(it["bond_types"], it["bond_types"].T)
    benzene = ds.get_numpy(1)
    c = benzene["atomic_numbers"] == 6
    assert np.all(benzene["bond_types"][np.ix_(c, c)][benzene["bond_types"][np.ix_(c, c)] > 0] == 4)
    assert int((ds.get_numpy(2)["bond_types"] == 3).sum()) == 2  # C#N
    assert ds.get_numpy(1)["smiles"] == "c1ccccc1"
    with pytest.warns(UserWarning):
        via_spec = load_dataset(str(path), heavy_atoms_only=True)
    assert np.all(via_spec.all_atomic_numbers != 1)


def test_sdf_all_broken_raises(tmp_path):
    _rdkit()
    from qmanifold.models.data import load_sdf

    path = tmp_path / "bad.sdf"
    path.write_text(_BROKEN_RECORD)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable molecule"):
        load_sdf(path)


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path):
    ds = load_dataset("qm9-extract")
    assert len(ds) == 500
    assert len(load_dataset("qm9-extract", heavy_atoms_only=True)) == 500
    with pytest.raises(ValueError, match="qm9-extract") as err:
        load_dataset("zinc")
    assert "qm9" in str(err.value) and ".sdf" in str(err.value) and ".npz" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(TypeError):
        load_dataset(3)


def test_load_dataset_qm9_spec_uses_cache(qm9_head):
    ds, cache = qm9_head
    again = load_dataset("qm9", cache_dir=cache, limit=120, progress=False, heavy_atoms_only=True)
    assert len(again) == len(ds) and np.all(again.all_atomic_numbers != 1)
    assert again.skipped == ds.skipped and len(again.split("train")) == len(ds.split("train"))
