"""Stereochemistry as model input (models/stereo.py) and the SE(3)-only denoiser (models/chiral_egnn.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("rdkit")

from qmanifold.models import stereo
from qmanifold.models.data import load_qm9_extract
from qmanifold.models.networks import build_denoiser
from qmanifold.models.sampling import graph_from_smiles, graph_stereo, graphs_from_dataset, stereo_properties

ELEMENTS = (1, 6, 7, 8, 9)


def _random_rotation(gen, proper=True):
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=gen))[0]
    if (torch.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return q


def _toy_inputs(gen):
    b, n = 3, 7
    x = torch.randn(b, n, 3, dtype=torch.float64, generator=gen)
    t = torch.rand(b, dtype=torch.float64, generator=gen)
    bonds = torch.zeros(b, n, n, dtype=torch.long)
    for i, j in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5), (2, 6)]:
        bonds[:, i, j] = bonds[:, j, i] = 1
    types = torch.randint(0, 5, (b, n), generator=gen)
    types[:, 0] += 5  # chi = +1 on the centre
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[2, 6] = False
    return x, t, mask, types, bonds


def _randomised(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised heads would hide the chiral path
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def test_chiral_denoiser_is_se3_but_not_e3_equivariant():
    gen = torch.Generator().manual_seed(0)
    model = _randomised(build_denoiser("chiral_egnn", hidden=32, layers=2).double())
    x, t, mask, types, bonds = _toy_inputs(gen)

    def f(y):
        return model(y, t, mask=mask, atom_types=types, bond_types=bonds)

    out = f(x)
    rot, shift = _random_rotation(gen), torch.randn(3, dtype=torch.float64, generator=gen)
    assert torch.allclose(f(x @ rot.T + shift)[mask], (out @ rot.T)[mask], atol=1e-10)
    refl = _random_rotation(gen, proper=False)
    gap = (f(x @ refl.T) - out @ refl.T)[mask].abs().max()
    assert gap > 1e-2 * out.abs().max()


def test_e3_egnn_maps_mirror_images_to_mirror_images():
    """Why the E(3) EGNN cannot honour a stereocentre, whatever labels it is given."""
    gen = torch.Generator().manual_seed(0)
    model = _randomised(build_denoiser("egnn", hidden=32, layers=2, num_atom_types=15, num_bond_types=7).double())
    x, t, mask, types, bonds = _toy_inputs(gen)
    refl = _random_rotation(gen, proper=False)
    out = model(x, t, mask=mask, atom_types=types, bond_types=bonds)
    mirrored = model(x @ refl.T, t, mask=mask, atom_types=types, bond_types=bonds)
    assert torch.allclose(mirrored[mask], (out @ refl.T)[mask], atol=1e-10)


def test_chiral_frame_volume_flips_under_reflection():
    from qmanifold.models.chiral_egnn import chiral_frame, lowest_three_neighbours

    gen = torch.Generator().manual_seed(3)
    x, _, mask, _, bonds = _toy_inputs(gen)
    nb, valid = lowest_three_neighbours(bonds, mask)
    assert valid[:, 0].all() and not valid[:, 5].any()
    assert nb[0, 0].tolist() == [1, 2, 3]
    v, _ = chiral_frame(x, nb, valid)
    v_mirror, _ = chiral_frame(-x, nb, valid)
    assert torch.allclose(v_mirror, -v)
    assert (v.abs() <= 1).all()


def test_labels_flip_under_reflection_and_survive_rotation():
    ds = load_qm9_extract()
    graphs = graphs_from_dataset(ds, "qm9-extract", range(60))
    rng = np.random.default_rng(0)
    labelled = 0
    for g in graphs:
        el = stereo.potential_stereo(g.atomic_numbers, g.bond_types)
        lab = stereo.stereo_labels(g.positions, g.bond_types, el)
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        q *= np.sign(np.linalg.det(q))
        rotated = stereo.stereo_labels(g.positions @ q.T + 1.5, g.bond_types, el)
        mirrored = stereo.stereo_labels(-g.positions, g.bond_types, el)
        assert np.array_equal(rotated.chirality, lab.chirality)
        assert np.array_equal(mirrored.chirality, -lab.chirality)
        assert mirrored.pairs == lab.pairs  # E/Z is not chiral
        assert stereo.stereo_agreement(g.positions, g.bond_types, lab) == (lab.num_labelled, lab.num_labelled)
        labelled += int(np.count_nonzero(lab.chirality))
    assert labelled > 30  # QM9 is full of stereocentres


def test_smiles_route_agrees_with_the_reference_geometry():
    """Stereo perceived from the DFT geometry (RDKit CIP, isomeric SMILES) and read back through an
    ETKDG embedding gives the same labels as reading the DFT geometry directly."""
    from rdkit import Chem

    from qmanifold.models.sampling import mol_with_coordinates

    ds = load_qm9_extract()
    checked = 0
    for g in graphs_from_dataset(ds, "qm9-extract", range(80)):
        lab = stereo.stereo_labels(g.positions, g.bond_types, stereo.potential_stereo(g.atomic_numbers, g.bond_types))
        if not lab.num_labelled:
            continue
        mol = mol_with_coordinates(g, g.positions)
        Chem.AssignStereochemistryFrom3D(mol)
        try:
            via_smiles = stereo.smiles_stereo_labels(mol, g.num_atoms, g.bond_types, seed=0)
        except ValueError:  # a strained QM9 cage ETKDG cannot embed
            continue
        if via_smiles is None:  # RDKit's CIP perception found no specified element (e.g. para-centres)
            continue
        centres = np.nonzero(via_smiles.chirality)[0]
        assert np.array_equal(via_smiles.chirality[centres], lab.chirality[centres])
        assert set(via_smiles.pairs) <= set(lab.pairs)
        checked += centres.size + len(via_smiles.pairs)
    assert checked > 50


def test_enantiomers_from_smiles_get_opposite_labels():
    left = graph_from_smiles("C[C@H](O)C(=O)O", ELEMENTS)
    right = graph_from_smiles("C[C@@H](O)C(=O)O", ELEMENTS)
    assert left.stereo is not None and right.stereo is not None
    assert left.stereo.chirality[1] == -right.stereo.chirality[1] != 0
    assert graph_from_smiles("CC(O)C(=O)O", ELEMENTS).stereo is None  # unspecified: the model chooses


def test_encode_decode_roundtrip():
    types = np.array([1, 1, 3, 0])
    labels = stereo.StereoLabels(np.array([1, -1, 0, 0], dtype=np.int8), ((2, 3, stereo.CIS),))
    bonds = np.zeros((4, 4), dtype=np.int64)
    enc_types, enc_bonds = stereo.encode_stereo(types, bonds, labels, 5)
    assert enc_types.tolist() == [6, 11, 3, 0]
    assert enc_bonds[2, 3] == enc_bonds[3, 2] == stereo.CIS
    element, chirality = stereo.decode_atom_types(torch.from_numpy(enc_types), 5)
    assert element.tolist() == types.tolist() and chirality.tolist() == [1, -1, 0, 0]


def test_stereo_dataset_items_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QMANIFOLD_CACHE", str(tmp_path))
    ds = load_qm9_extract().without_hydrogens().subset(np.arange(40))
    wrapped = stereo.StereoDataset(ds)
    assert len(list(tmp_path.glob("stereo-*.npz"))) == 1
    again = stereo.StereoDataset(ds)  # from the cache
    assert all(np.array_equal(a.centres, b.centres) for a, b in zip(wrapped.stereo, again.stereo))
    n_labelled = 0
    for k in range(len(ds)):
        item, plain = wrapped[k], ds[k]
        element, chirality = stereo.decode_atom_types(item["atom_types"], 5)
        assert torch.equal(element, plain["atom_types"])
        assert item["bond_types"].max() < stereo.NUM_STEREO_BOND_TYPES
        n_labelled += int(chirality.abs().sum())
    assert n_labelled > 0
    assert len(wrapped.subset([0, 2])) == 2


def test_sdf_properties_name_the_stereoisomer():
    g = graph_from_smiles("C[C@H](O)C(=O)O", ELEMENTS)
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles("C[C@H](O)C(=O)O"))
    AllChem.EmbedMolecule(mol, randomSeed=0)
    pos = mol.GetConformer().GetPositions()
    good = stereo_properties(g, pos)
    bad = stereo_properties(g, -pos)
    assert good["qm_stereo_ok"] == good["qm_stereo_requested"] == 1 and bad["qm_stereo_ok"] == 0
    assert good["qm_stereo_smiles"] != bad["qm_stereo_smiles"]
    ds_graph = graphs_from_dataset(load_qm9_extract(), "qm9-extract", [0])[0]
    graph_stereo(ds_graph)  # dataset graphs take their labels from the reference geometry
    assert stereo_properties(ds_graph, ds_graph.positions).get("qm_stereo_ok", 0) == \
        stereo_properties(ds_graph, ds_graph.positions).get("qm_stereo_requested", 0)


def test_chiral_model_trains_and_samples_from_smiles(tmp_path):
    from qmanifold.models.sampling import sample_conformers
    from qmanifold.models.training import TrainConfig, diffusion_from_checkpoint, load_checkpoint, train

    out = tmp_path / "run"
    train(TrainConfig(data="qm9-extract", model="chiral_egnn", heavy_atoms_only=True, steps=3, batch_size=8,
                      hidden=16, layers=1, val_every=3, ckpt_every=3, val_limit=8, out=str(out), progress=False,
                      device="cpu"))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["data"]["stereo"] is True
    qd = diffusion_from_checkpoint(ckpt)
    assert qd.denoiser.num_atom_types == 15 and qd.denoiser.num_bond_types == 7
    graphs = [graph_from_smiles("C[C@H](O)C(=O)O", ckpt["data"]["elements"], heavy_atoms_only=True)]
    confs = sample_conformers(qd, graphs, 2, steps=4, progress=False)
    assert confs[0].shape == (2, 6, 3) and np.isfinite(confs[0]).all()


def _quaternary_centre(gen):
    """One neopentane-like heavy-atom graph: centre 0 bonded to 1..4, a tetrahedron around it."""
    tet = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]], dtype=torch.float64)
    x = torch.cat([torch.zeros(1, 3, dtype=torch.float64), 0.9 * tet])[None]
    x = x + 0.05 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
    bonds = torch.zeros(1, 5, 5, dtype=torch.int64)
    bonds[0, 0, 1:] = bonds[0, 1:, 0] = 1
    mask = torch.ones(1, 5, dtype=torch.bool)
    types = torch.tensor([[1 + 5, 1, 1, 1, 1]])  # carbon centre labelled chi = +1
    return x - x.mean(1, keepdim=True), torch.full((1,), 0.4, dtype=torch.float64), mask, types, bonds


def test_fourth_neighbour_push_moves_the_fourth_substituent_only_along_the_normal():
    """A quaternary centre can only be inverted by moving the centre and its fourth neighbour across
    the plane of the first three: the layer's second push does that (and nothing else)."""
    from qmanifold.models.chiral_egnn import ChiralLayer, chiral_frame, lowest_neighbours_of_atoms

    gen = torch.Generator().manual_seed(5)
    x, _, mask, _, bonds = _quaternary_centre(gen)
    layer = ChiralLayer(8).double()
    with torch.no_grad():
        layer.coord_out.weight.zero_()
        layer.fourth_out.bias.fill_(0.3)  # only the fourth push is active
    order, count = lowest_neighbours_of_atoms(bonds, mask, 4)
    assert order[0, 0].tolist() == [1, 2, 3, 4] and count[0].tolist() == [4, 1, 1, 1, 1]
    h = torch.randn(1, 5, 8, generator=gen, dtype=torch.float64)
    chi = torch.tensor([[1, 0, 0, 0, 0]])
    node_w = torch.ones(1, 5, 1, dtype=torch.float64)
    _, y = layer(h, x, chi, order[..., :3], count >= 3, node_w, order[..., 3], count >= 4)
    moved = (y - x).norm(dim=-1)[0]
    assert moved[4] > 1e-3 and torch.all(moved[:4] < 1e-12)
    _, u = chiral_frame(x, order[..., :3], count >= 3)
    d = (y - x)[0, 4]
    assert torch.allclose(torch.linalg.cross(d, u[0, 0], dim=-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # without the fourth-neighbour arguments (or with zero weights) nothing moves
    _, y0 = layer(h, x, chi, order[..., :3], count >= 3, node_w)
    assert torch.equal(y0, x)


def test_checkpoint_without_fourth_neighbour_weights_loads_as_the_old_function():
    """State dicts written before the fourth-neighbour push load strictly, with zeros there."""
    gen = torch.Generator().manual_seed(6)
    model = _randomised(build_denoiser("chiral_egnn", hidden=16, layers=2).double())
    old_state = {k: v for k, v in model.state_dict().items() if "fourth_out" not in k}
    assert len(old_state) < len(model.state_dict())
    fresh = build_denoiser("chiral_egnn", hidden=16, layers=2).double()
    fresh.load_state_dict(old_state)  # strict
    for layer in fresh.chiral_layers:
        assert not layer.fourth_out.weight.any() and not layer.fourth_out.bias.any()
    with torch.no_grad():
        for layer in model.chiral_layers:
            layer.fourth_out.weight.zero_()
            layer.fourth_out.bias.zero_()
    x, t, mask, types, bonds = _quaternary_centre(gen)
    assert torch.equal(fresh(x, t, mask=mask, atom_types=types, bond_types=bonds),
                       model(x, t, mask=mask, atom_types=types, bond_types=bonds))
    # a genuinely wrong state dict still fails loudly
    broken = dict(old_state)
    broken.pop("chiral_layers.0.coord_out.weight")
    with pytest.raises(RuntimeError, match="coord_out.weight"):
        build_denoiser("chiral_egnn", hidden=16, layers=2).double().load_state_dict(broken)


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path):
    from qmanifold.models.training import CheckpointError, TrainConfig, load_checkpoint, train

    base = dict(data="qm9-extract", model="chiral_egnn", heavy_atoms_only=True, batch_size=8, hidden=16, layers=1,
                val_limit=8, progress=False, device="cpu")
    train(TrainConfig(steps=3, lr=1e-2, warmup=0, val_every=3, ckpt_every=3, out=str(tmp_path / "a"), **base))
    src = load_checkpoint(tmp_path / "a" / "last.pt")
    # a zero-step-like check: one step at a tiny learning rate stays next to the source weights,
    # while a run from scratch with the same seed does not
    train(TrainConfig(steps=1, lr=1e-12, warmup=0, val_every=1, ckpt_every=1, out=str(tmp_path / "b"),
                      init_from=str(tmp_path / "a" / "last.pt"), **base))
    train(TrainConfig(steps=1, lr=1e-12, warmup=0, val_every=1, ckpt_every=1, out=str(tmp_path / "c"), **base))
    b = load_checkpoint(tmp_path / "b" / "last.pt")
    c = load_checkpoint(tmp_path / "c" / "last.pt")
    def gap(run):
        return max((run["model"]["state_dict"][k] - v).abs().max().item() for k, v in src["model"]["state_dict"].items())

    assert gap(b) < 1e-9 and gap(c) > 1e-3
    assert b["config"]["init_from"] == str(tmp_path / "a" / "last.pt") and b["step"] == 1
    with pytest.raises(CheckpointError, match="do not fit"):
        train(TrainConfig(steps=1, val_every=1, ckpt_every=1, out=str(tmp_path / "d"),
                          init_from=str(tmp_path / "a" / "last.pt"), **{**base, "hidden": 32}))
    with pytest.raises(CheckpointError, match="'egnn'"):
        train(TrainConfig(steps=1, val_every=1, ckpt_every=1, out=str(tmp_path / "e"),
                          init_from=str(tmp_path / "a" / "last.pt"), **{**base, "model": "egnn"}))
