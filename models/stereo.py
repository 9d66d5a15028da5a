r"""Stereochemistry as model input: tetrahedral centres and double-bond E/Z, perceived and encoded.

Conformer generation is posed, as in GEOM and every published conformer benchmark, for a molecular
graph *with its stereochemistry*. This module turns stereochemistry into labels a network can read
and checks it on generated geometries.

**Which atoms and bonds can carry stereo** is a property of the graph alone: RDKit's
``FindPotentialStereo`` (canonical ranking of the substituents; includes para-stereocentres such as
1,3-disubstituted rings). :func:`potential_stereo` returns them for one graph.

**Labels from a geometry.** For a stereocentre ``c`` let ``n1 < n2 < n3`` be its three bonded
neighbours of lowest index *in the graph the network sees* (heavy-atom graphs: heavy neighbours
only). Its label is the sign of the signed volume

.. math:: \chi_c = \operatorname{sign}\det[x_{n_1} - x_c,\; x_{n_2} - x_c,\; x_{n_3} - x_c] \in \{+1, -1\}.

It is invariant under rotations and translations and flips under a reflection, so it names the
enantiomer. A tetrahedral centre with three or four substituents is fully determined by it (the
fourth substituent, explicit or implicit H, sits opposite). For a stereo double bond ``i=j`` every
pair of substituents ``(a, b)``, ``a`` on ``i`` and ``b`` on ``j``, is labelled *cis* when the
dihedral ``a-i-j-b`` has a positive cosine and *trans* otherwise (a reflection-invariant property).

**Encoding for the denoiser** (the call convention of :mod:`qmanifold.models.networks` is unchanged):
with ``E`` elements, the stereo-annotated atom type is ``element + E * k`` with ``k = 0`` no label,
``k = 1`` for ``chi = +1`` and ``k = 2`` for ``chi = -1`` (``3E`` atom types), and the pairs of
substituents across a stereo double bond get the pair codes :data:`CIS` = 5 and :data:`TRANS` = 6 in
``bond_types`` (7 bond types; bonded pairs keep their bond code). :func:`encode_stereo` builds both.

**Where labels come from.** For a dataset molecule (QM9), from its reference (DFT) geometry: every
potential stereo element is specified. For SMILES input, from the stereo written in the SMILES:
one ETKDG conformer, which honours RDKit's chiral tags and bond stereo, is embedded and read as
above, for the specified elements only; unspecified ones get no label and the model chooses.

**Checking generated conformers.** :func:`stereo_agreement` compares the labels of a generated
geometry with the requested ones (every labelled centre and bond must agree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CIS",
    "TRANS",
    "NUM_STEREO_BOND_TYPES",
    "StereoElements",
    "potential_stereo",
    "lowest_neighbours",
    "chirality_from_geometry",
    "cis_trans_from_geometry",
    "StereoLabels",
    "stereo_labels",
    "encode_stereo",
    "decode_atom_types",
    "stereo_agreement",
    "MIN_GENERATED_VOLUME",
    "repair_centres",
    "smiles_stereo_labels",
]

#: pair codes for substituents across a stereo double bond (after the bond codes 0..4)
CIS = 5
TRANS = 6
#: bond-type vocabulary of stereo-aware models: none, single, double, triple, aromatic, cis, trans
NUM_STEREO_BOND_TYPES = 7

#: relative signed volumes below this count as planar (no label) when labels are *read* (references)
_PLANAR = 1e-3
#: a *generated* centre with three bonded neighbours honours its label only when clearly pyramidal:
#: relative volume at least this (ideal sp3: 0.77; 99.9 % of the labelled QM9 reference centres lie
#: above 0.17, the few below are quaternary centres of strained cages). Flatter samples are ambiguous:
#: RDKit perceives no configuration, and hydrogens placed on them may land on either side.
MIN_GENERATED_VOLUME = 0.15


@dataclass(frozen=True)
class StereoElements:
    """Potential stereo elements of one graph.

    Attributes:
        centres: ``(K,)`` int64 atom indices of potential tetrahedral stereocentres.
        double_bonds: ``(L, 2)`` int64 atom pairs of potential stereo double bonds.
    """

    centres: np.ndarray
    double_bonds: np.ndarray


def _bond_code_to_rdkit(Chem, code: int):
    return {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE,
            4: Chem.BondType.AROMATIC}[int(code)]


def _graph_mol(atomic_numbers: np.ndarray, bond_types: np.ndarray, heavy_atoms_only: bool):
    """An RDKit molecule of the graph (hydrogens implicit in heavy-atom graphs), sanitised leniently."""
    from rdkit import Chem, RDLogger

    rw = Chem.RWMol()
    for z in np.asarray(atomic_numbers).tolist():
        atom = Chem.Atom(int(z))
        if not heavy_atoms_only:
            atom.SetNoImplicit(True)
        rw.AddAtom(atom)
    bt = np.asarray(bond_types)
    ii, jj = np.nonzero(np.triu((bt >= 1) & (bt <= 4), 1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        rw.AddBond(i, j, _bond_code_to_rdkit(Chem, bt[i, j]))
        if bt[i, j] == 4:
            rw.GetBondBetweenAtoms(i, j).SetIsAromatic(True)
            rw.GetAtomWithIdx(i).SetIsAromatic(True)
            rw.GetAtomWithIdx(j).SetIsAromatic(True)
    mol = rw.GetMol()
    RDLogger.DisableLog("rdApp.*")
    try:
        mol.UpdatePropertyCache(strict=False)
        Chem.SanitizeMol(mol, Chem.SanitizeFlags.SANITIZE_ALL ^ Chem.SanitizeFlags.SANITIZE_PROPERTIES
                         ^ Chem.SanitizeFlags.SANITIZE_KEKULIZE ^ Chem.SanitizeFlags.SANITIZE_SETAROMATICITY,
                         catchErrors=True)
    finally:
        RDLogger.EnableLog("rdApp.*")
    return mol


def _elements_of(mol) -> StereoElements:
    from rdkit import Chem

    centres, bonds = [], []
    for info in Chem.FindPotentialStereo(mol, cleanIt=True):
        if info.type == Chem.StereoType.Atom_Tetrahedral:
            centres.append(int(info.centeredOn))
        elif info.type == Chem.StereoType.Bond_Double:
            bond = mol.GetBondWithIdx(int(info.centeredOn))
            bonds.append((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
    return StereoElements(np.asarray(sorted(centres), dtype=np.int64),
                          np.asarray(sorted(bonds), dtype=np.int64).reshape(-1, 2))


def potential_stereo(atomic_numbers: np.ndarray, bond_types: np.ndarray,
                     heavy_atoms_only: bool = False) -> StereoElements:
    """The atoms and double bonds of a graph that can carry stereo (graph only; needs RDKit).

    Args:
        atomic_numbers: ``(N,)`` ints.
        bond_types: ``(N, N)`` bond codes 0..4 (codes above 4 are ignored).
        heavy_atoms_only: the graph has implicit hydrogens.
    """
    return _elements_of(_graph_mol(atomic_numbers, bond_types, heavy_atoms_only))


def lowest_neighbours(bond_types: np.ndarray, atom: int) -> np.ndarray:
    """The bonded neighbours of ``atom`` (bond codes 1..4) in increasing index order."""
    row = np.asarray(bond_types)[atom]
    return np.nonzero((row >= 1) & (row <= 4))[0]


def chirality_from_geometry(positions: np.ndarray, bond_types: np.ndarray, centres: Sequence[int],
                            min_volume: float = _PLANAR) -> np.ndarray:
    r"""``chi_c = sign det[x_{n1} - x_c, x_{n2} - x_c, x_{n3} - x_c]`` for each centre (module docstring).

    Returns ``(N,)`` int8 in {-1, 0, +1}: 0 for atoms not in ``centres``, with fewer than three
    neighbours, or (nearly) planar (relative volume ``det / (|r1||r2||r3|)`` below ``min_volume``).
    """
    pos = np.asarray(positions, dtype=np.float64)
    out = np.zeros(pos.shape[0], dtype=np.int8)
    for c in np.asarray(centres, dtype=np.int64).tolist():
        nb = lowest_neighbours(bond_types, c)
        if nb.size < 3:
            continue
        r = pos[nb[:3]] - pos[c]
        vol = float(np.linalg.det(r))
        scale = float(np.prod(np.linalg.norm(r, axis=1))) + 1e-12
        if abs(vol) / scale > min_volume:
            out[c] = 1 if vol > 0 else -1
    return out


def cis_trans_from_geometry(positions: np.ndarray, bond_types: np.ndarray,
                            double_bonds: np.ndarray) -> list[tuple[int, int, int]]:
    """``(a, b, CIS|TRANS)`` for every substituent pair across each double bond ``(i, j)``.

    ``a`` is bonded to ``i``, ``b`` to ``j``; *cis* when the dihedral ``a-i-j-b`` has a positive cosine.
    """
    pos = np.asarray(positions, dtype=np.float64)
    out = []
    for i, j in np.asarray(double_bonds, dtype=np.int64).reshape(-1, 2).tolist():
        axis = pos[j] - pos[i]
        axis = axis / (np.linalg.norm(axis) + 1e-12)
        for a in lowest_neighbours(bond_types, i).tolist():
            if a == j:
                continue
            for b in lowest_neighbours(bond_types, j).tolist():
                if b == i or b == a:
                    continue
                ua = pos[a] - pos[i]
                ub = pos[b] - pos[j]
                ua = ua - axis * (ua @ axis)
                ub = ub - axis * (ub @ axis)
                out.append((a, b, CIS if float(ua @ ub) > 0 else TRANS))
    return out


@dataclass(frozen=True)
class StereoLabels:
    """Stereo labels of one graph: ``chirality (N,)`` int8 in {-1, 0, 1} and ``pairs`` ``[(a, b, code)]``."""

    chirality: np.ndarray
    pairs: tuple[tuple[int, int, int], ...]

    @property
    def num_labelled(self) -> int:
        return int(np.count_nonzero(self.chirality)) + len(self.pairs)


def stereo_labels(positions: np.ndarray, bond_types: np.ndarray, elements: StereoElements) -> StereoLabels:
    """Labels of every potential stereo element of a graph, read from a geometry."""
    chi = chirality_from_geometry(positions, bond_types, elements.centres)
    pairs = cis_trans_from_geometry(positions, bond_types, elements.double_bonds)
    return StereoLabels(chi, tuple(pairs))


def encode_stereo(atom_types: np.ndarray, bond_types: np.ndarray, labels: StereoLabels,
                  num_elements: int) -> tuple[np.ndarray, np.ndarray]:
    """Stereo-annotated ``(atom_types, bond_types)`` (module docstring): ``(N,)`` and ``(N, N)`` int64."""
    chi = np.asarray(labels.chirality)
    kind = np.where(chi > 0, 1, np.where(chi < 0, 2, 0))
    types = np.asarray(atom_types, dtype=np.int64) + int(num_elements) * kind
    bonds = np.array(bond_types, dtype=np.int64, copy=True)
    for a, b, code in labels.pairs:
        if bonds[a, b] == 0:
            bonds[a, b] = bonds[b, a] = code
    return types, bonds


def decode_atom_types(atom_types, num_elements: int):
    """``(element_type, chirality)`` of stereo-annotated atom types (numpy or torch; chirality in {-1, 0, 1})."""
    element = atom_types % num_elements
    kind = atom_types // num_elements
    chirality = (kind == 1).long() - (kind == 2).long() if hasattr(kind, "long") else \
        (kind == 1).astype(np.int64) - (kind == 2).astype(np.int64)
    return element, chirality


def stereo_agreement(positions: np.ndarray, bond_types: np.ndarray, requested: StereoLabels,
                     min_volume: float = MIN_GENERATED_VOLUME) -> tuple[int, int]:
    """``(agreeing, labelled)``: how many of the requested stereo labels a geometry reproduces.

    Every centre with a non-zero requested label and every labelled substituent pair is counted. A
    centre agrees when it has the requested sign; a centre with three bonded neighbours (the fourth
    substituent an implicit hydrogen) must also be clearly pyramidal (relative volume at least
    ``min_volume``, :data:`MIN_GENERATED_VOLUME` by default: such a nearly planar centre has no definite
    configuration). Centres with four bonded neighbours only need the sign.
    """
    centres = np.nonzero(requested.chirality)[0]
    chi = chirality_from_geometry(positions, bond_types, centres, min_volume)
    # four bonded neighbours: the three lowest can be nearly coplanar with the centre in a strained
    # ring or cage (reference volumes down to 0.003) while the configuration is perfectly definite
    full = [c for c in centres.tolist() if lowest_neighbours(bond_types, c).size >= 4]
    if full:
        chi[full] = chirality_from_geometry(positions, bond_types, full)[full]
    agree = int(np.sum(chi[centres] == requested.chirality[centres]))
    pos = np.asarray(positions, dtype=np.float64)
    for a, b, code in requested.pairs:
        # the double bond between a's and b's attachment points
        found = None
        for i in lowest_neighbours(bond_types, a).tolist():
            for j in lowest_neighbours(bond_types, b).tolist():
                if bond_types[i, j] in (2, 4):
                    found = (i, j)
        if found is None:
            continue
        got = cis_trans_from_geometry(pos, bond_types, np.asarray([found]))
        agree += int(any(x == a and y == b and c == code for x, y, c in got))
    return agree, int(centres.size) + len(requested.pairs)


#: distance (Å) of a repaired centre from the plane of its three neighbours (ideal sp3 carbon: ~0.5 Å)
REPAIR_HEIGHT = 0.5


def repair_centres(positions: np.ndarray, bond_types: np.ndarray, requested: StereoLabels,
                   min_volume: float = MIN_GENERATED_VOLUME) -> tuple[np.ndarray, int]:
    r"""Put wrong or flat stereocentres with exactly three bonded neighbours on their requested side.

    For such a centre ``c`` (heavy-atom graphs: the fourth substituent is an implicit hydrogen) the
    configuration is which side of the plane of its neighbours ``n1, n2, n3`` the centre lies on. A
    centre that disagrees with its label, or is flatter than ``min_volume``, is moved to
    ``p + REPAIR_HEIGHT * s * u``: ``p`` its foot on that plane, ``u`` the plane's unit normal and
    ``s`` the sign that gives the requested label; its three bonds change length only by the height
    change. Centres with four bonded neighbours cannot be inverted by moving one atom and are left
    alone (as are stereo double bonds). Returns ``(positions, number of centres moved)``.
    """
    pos = np.array(positions, dtype=np.float64, copy=True)
    moved = 0
    for c in np.nonzero(requested.chirality)[0].tolist():
        nb = lowest_neighbours(bond_types, c)
        if nb.size != 3:
            continue
        want = int(requested.chirality[c])
        got = int(chirality_from_geometry(pos, bond_types, [c], min_volume)[c])
        if got == want:
            continue
        a, b, d = pos[nb]
        normal = np.cross(b - a, d - a)
        norm = np.linalg.norm(normal)
        if norm < 1e-8:  # collinear neighbours: no plane to be on one side of
            continue
        normal /= norm
        foot = pos[c] - normal * float((pos[c] - a) @ normal)
        for sign in (1.0, -1.0):
            trial = pos.copy()
            trial[c] = foot + sign * REPAIR_HEIGHT * normal
            if int(chirality_from_geometry(trial, bond_types, [c], min_volume)[c]) == want:
                pos = trial
                moved += 1
                break
    return pos, moved


def smiles_stereo_labels(mol, atom_count: int, bond_types: np.ndarray, seed: int = 0) -> StereoLabels | None:
    """Labels of the stereo *specified* in an RDKit molecule from SMILES (None when nothing is specified).

    ``mol`` is the molecule the graph was built from, atom ``k`` = graph atom ``k`` (with explicit
    hydrogens if the graph has them). One ETKDG conformer that honours the chiral tags and bond
    stereo is embedded (on a copy with explicit hydrogens) and read with :func:`stereo_labels`,
    keeping only the specified elements.

    Raises:
        ValueError: stereo is specified but no conformer could be embedded.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    specified_centres, specified_bonds = [], []
    for info in Chem.FindPotentialStereo(mol, cleanIt=True):
        if info.specified != Chem.StereoSpecified.Specified:
            continue
        if info.type == Chem.StereoType.Atom_Tetrahedral:
            specified_centres.append(int(info.centeredOn))
        elif info.type == Chem.StereoType.Bond_Double:
            bond = mol.GetBondWithIdx(int(info.centeredOn))
            specified_bonds.append((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
    if not specified_centres and not specified_bonds:
        return None
    with_h = Chem.AddHs(mol)
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    params.enforceChirality = True
    if AllChem.EmbedMolecule(with_h, params) != 0:
        params.useRandomCoords = True
        if AllChem.EmbedMolecule(with_h, params) != 0:
            raise ValueError(f"could not embed a conformer of {Chem.MolToSmiles(mol)} to read its stereo")
    pos = with_h.GetConformer().GetPositions()[:atom_count]
    elements = StereoElements(np.asarray(sorted(specified_centres), dtype=np.int64),
                              np.asarray(sorted(specified_bonds), dtype=np.int64).reshape(-1, 2))
    return stereo_labels(pos, bond_types, elements)


# ----------------------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------------------


def _cache_dir() -> str:
    import os

    return os.environ.get("QMANIFOLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qmanifold")


def _dataset_key(ds) -> str:
    """A digest of the graphs of a dataset (ids, atoms and bonds), naming its stereo cache."""
    import hashlib

    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(ds.indices, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(ds.num_atoms, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(ds.all_atomic_numbers, dtype=np.int64).tobytes())
    for arr in ds.bond_table():
        digest.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    digest.update(str(bool(ds.heavy_atoms_only)).encode())
    return digest.hexdigest()[:20]


def dataset_stereo_elements(ds, cache: bool = True, progress: bool = False) -> list[StereoElements]:
    """:func:`potential_stereo` of every molecule of a ``MoleculeDataset`` (cached on disk by content).

    The cache lives in ``$QMANIFOLD_CACHE`` (default ``~/.cache/qmanifold``), named by a digest of
    the dataset's graphs, and is written atomically; about 1 ms per molecule to build.
    """
    import os

    from qmanifold.atomic import atomic_open

    path = os.path.join(_cache_dir(), f"stereo-{_dataset_key(ds)}.npz")
    if cache and os.path.exists(path):
        with np.load(path) as z:
            c_off, centres, b_off, bonds = z["centre_offsets"], z["centres"], z["bond_offsets"], z["bonds"]
        if c_off.shape == (len(ds) + 1,):
            return [StereoElements(centres[c_off[k]:c_off[k + 1]], bonds[b_off[k]:b_off[k + 1]])
                    for k in range(len(ds))]
    rows = range(len(ds))
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc="stereo perception", unit="mol", dynamic_ncols=True)
    out = []
    for k in rows:
        item = ds.get_numpy(int(k))
        out.append(potential_stereo(item["atomic_numbers"], item["bond_types"], bool(ds.heavy_atoms_only)))
    if cache:
        c_off = np.cumsum([0] + [e.centres.size for e in out]).astype(np.int64)
        b_off = np.cumsum([0] + [e.double_bonds.shape[0] for e in out]).astype(np.int64)
        with atomic_open(path, "wb") as fh:
            np.savez(fh, centre_offsets=c_off, bond_offsets=b_off,
                     centres=np.concatenate([e.centres for e in out] + [np.zeros(0, np.int64)]),
                     bonds=np.concatenate([e.double_bonds for e in out] + [np.zeros((0, 2), np.int64)]))
    return out


class StereoDataset:
    """A ``MoleculeDataset`` whose items carry stereo-annotated ``atom_types`` and ``bond_types``.

    Labels are read from each molecule's own (reference) geometry for every potential stereo
    element (:func:`stereo_labels`) and encoded with :func:`encode_stereo`; everything else of the
    item is unchanged. ``len``, ``num_atoms`` and the other attributes are those of the wrapped
    dataset.
    """

    def __init__(self, ds, elements: Sequence[StereoElements] | None = None, progress: bool = False) -> None:
        self.dataset = ds
        self.stereo = list(elements) if elements is not None else dataset_stereo_elements(ds, progress=progress)
        if len(self.stereo) != len(ds):
            raise ValueError(f"StereoDataset: {len(self.stereo)} stereo records for {len(ds)} molecules")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name in ("dataset", "stereo"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def labels(self, k: int) -> StereoLabels:
        item = self.dataset.get_numpy(int(k))
        return stereo_labels(item["positions"], item["bond_types"], self.stereo[int(k)])

    def __getitem__(self, k: int) -> dict:
        import torch

        item = dict(self.dataset[int(k)])
        labels = stereo_labels(item["positions"].numpy(), item["bond_types"].numpy(), self.stereo[int(k)])
        types, bonds = encode_stereo(item["atom_types"].numpy(), item["bond_types"].numpy(), labels,
                                     len(self.dataset.elements))
        item["atom_types"] = torch.from_numpy(types)
        item["bond_types"] = torch.from_numpy(bonds)
        return item

    def subset(self, rows) -> StereoDataset:
        rows = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64)
        return StereoDataset(self.dataset.subset(rows), [self.stereo[int(r)] for r in rows])
