r"""Conformers from a trained checkpoint (or any coordinates) to SDF / XYZ files.

Pieces (functional core; the ``sample`` command in :mod:`qmanifold.models.cli` strings them together):

* :class:`MolGraph` -- one molecular graph to sample: atomic numbers ``(N,)``, atom types ``(N,)``
  (index into the model's element list), bond types ``(N, N)`` (0 none / 1 single / 2 double /
  3 triple / 4 aromatic), an identifier, the SMILES and, for dataset molecules, the reference
  geometry ``(N, 3)`` in Å;
* :func:`graph_from_smiles` / :func:`graphs_from_dataset` -- build them (RDKit for SMILES);
  :func:`ensemble_graph` -- the one graph of an ensemble of one molecule (file atom order);
* :func:`sample_conformers` -- ``M`` conformers per graph with a :class:`~qmanifold.QuotientDiffusion`
  (the sampler geometry follows the training loss: quotient samplers for ``loss="quotient"``,
  conventional ones for the baselines -- ``QuotientDiffusion`` does this by default);
* :func:`template_mol` -- the RDKit molecule of a graph (bond orders; formal charges and, for
  heavy-atom-only graphs, hydrogen counts taken from the SMILES when there is one);
* :func:`write_sdf` / :func:`write_xyz` -- atomic writers (temporary file + :func:`os.replace`);
  every SDF record carries the graph, the coordinates (Å) and ``qm_*`` properties:

  ==========================  =============================================================
  property                    meaning
  ==========================  =============================================================
  ``qm_source``               identifier: ``<dataset>:<index>`` or ``smiles:<SMILES>``
  ``qm_dataset``              dataset spec the molecule came from ("" for SMILES input)
  ``qm_index``                index of the molecule in that dataset (QM9 id), -1 for SMILES
  ``qm_smiles``               SMILES (as in the dataset / as given)
  ``qm_sample``               sample number within the molecule (0 .. M-1)
  ``qm_heavy_atoms_only``     1 if the graph has no hydrogens
  ``qm_method``               ``qmanifold``, ``etkdg`` or ``etkdg+mmff``
  ``qm_model`` ...            model name / loss / checkpoint / step / sampler / steps / seed
  ==========================  =============================================================

Errors on bad input are :class:`MoleculeInputError` (a ``ValueError``) with the reason: malformed
SMILES, molecules RDKit cannot sanitise, elements outside the model's element list, atom-count
mismatch between a graph and its coordinates, NaN coordinates. Nothing is written in that case.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from qmanifold.atomic import atomic_write_text as _atomic_write_text
from qmanifold.errors import InputError

__all__ = [
    "MoleculeInputError",
    "MolGraph",
    "graph_from_smiles",
    "graphs_from_dataset",
    "ensemble_graph",
    "template_mol",
    "mol_with_coordinates",
    "sample_conformers",
    "make_records",
    "sdf_text",
    "write_sdf",
    "write_xyz",
    "atomic_write_text",
    "CompleteConformer",
    "place_hydrogens",
]

_BOND_NAMES = {1: "SINGLE", 2: "DOUBLE", 3: "TRIPLE", 4: "AROMATIC"}


class MoleculeInputError(InputError):
    """A molecule given by the user cannot be used (the message says why); an
    :class:`~qmanifold.errors.InputError`, hence a ``ValueError``."""


@dataclass
class MolGraph:
    """A molecular graph to sample conformers for.

    Attributes:
        atomic_numbers: ``(N,)`` int64.
        atom_types: ``(N,)`` int64 indices into the model's element list.
        bond_types: ``(N, N)`` int64 symmetric, 0 none / 1 single / 2 double / 3 triple / 4 aromatic.
        source: identifier, ``"<dataset>:<index>"`` or ``"smiles:<SMILES>"``.
        index: the molecule's index in its dataset (QM9 id), -1 for SMILES input.
        smiles: SMILES string ("" if unknown).
        dataset: dataset spec ("" for SMILES input).
        positions: ``(N, 3)`` reference coordinates in Å, or None.
        heavy_atoms_only: the graph has no hydrogens (they are implicit).
        stereo: the requested stereo labels (:class:`~qmanifold.models.stereo.StereoLabels`), or None
            when nothing is specified. Filled by :func:`graph_from_smiles` from the SMILES and, for
            dataset molecules, by :func:`graph_stereo` from the reference geometry.
    """

    atomic_numbers: np.ndarray
    atom_types: np.ndarray
    bond_types: np.ndarray
    source: str
    index: int = -1
    smiles: str = ""
    dataset: str = ""
    positions: np.ndarray | None = None
    heavy_atoms_only: bool = False
    stereo: Any = field(default=None, repr=False, compare=False)
    _template: Any = field(default=None, repr=False, compare=False)

    @property
    def num_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`qmanifold.atomic.atomic_write_text`)."""
    _atomic_write_text(path, text)


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError as exc:  # pragma: no cover
        raise ImportError("molecule I/O needs RDKit: pip install rdkit (or the 'molecules' extra)") from exc
    return Chem, RDLogger


def _element_symbol(z: int) -> str:
    from qmanifold.models.data.io import element_symbol

    return element_symbol(int(z))


# ----------------------------------------------------------------------------------------------
# graphs
# ----------------------------------------------------------------------------------------------


def _bond_code(bond) -> int:
    Chem, _ = _rdkit()
    if bond.GetIsAromatic():
        return 4
    return {Chem.BondType.SINGLE: 1, Chem.BondType.DOUBLE: 2, Chem.BondType.TRIPLE: 3}.get(bond.GetBondType(), 0)


def graph_from_smiles(smiles: str, elements: Sequence[int], heavy_atoms_only: bool = False) -> MolGraph:
    """The molecular graph of ``smiles`` (hydrogens added unless ``heavy_atoms_only``).

    Args:
        smiles: a SMILES string.
        elements: the model's element list (atomic numbers; ``atom_types`` index into it).
        heavy_atoms_only: keep hydrogens implicit (for models trained without them).

    Raises:
        MoleculeInputError: empty or malformed SMILES, a molecule RDKit cannot sanitise, an element
            not in ``elements``, or an unsupported bond type (dative, ...).
    """
    Chem, RDLogger = _rdkit()
    if not isinstance(smiles, str) or not smiles.strip():
        raise MoleculeInputError(f"empty SMILES {smiles!r}")
    smiles = smiles.strip()
    RDLogger.DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
        if mol is None:
            raise MoleculeInputError(f"malformed SMILES {smiles!r}: RDKit cannot parse it")
        try:
            Chem.SanitizeMol(mol)
        except Exception as exc:  # noqa: BLE001 - RDKit's sanitisation errors have no common base
            raise MoleculeInputError(f"RDKit cannot sanitise the molecule {smiles!r}: {exc}") from None
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol.GetNumAtoms() == 0:
        raise MoleculeInputError(f"SMILES {smiles!r} has no atoms")
    if not heavy_atoms_only:
        mol = Chem.AddHs(mol)
    z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    lookup = {int(e): k for k, e in enumerate(elements)}
    bad = sorted({int(v) for v in z if int(v) not in lookup})
    if bad:
        names = ", ".join(_element_symbol(v) for v in bad)
        allowed = ", ".join(_element_symbol(v) for v in elements)
        raise MoleculeInputError(f"SMILES {smiles!r} contains element(s) {names} outside the model's element "
                                 f"list ({allowed})")
    n = len(z)
    bonds = np.zeros((n, n), dtype=np.int64)
    for b in mol.GetBonds():
        code = _bond_code(b)
        if code == 0:
            raise MoleculeInputError(f"SMILES {smiles!r} has an unsupported bond type {b.GetBondType()}")
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        bonds[i, j] = bonds[j, i] = code
    from qmanifold.models.stereo import smiles_stereo_labels

    try:
        labels = smiles_stereo_labels(mol, n, bonds)
    except ValueError as exc:
        raise MoleculeInputError(f"SMILES {smiles!r}: {exc}") from None
    g = MolGraph(atomic_numbers=z, atom_types=np.array([lookup[int(v)] for v in z], dtype=np.int64),
                 bond_types=bonds, source=f"smiles:{smiles}", index=-1, smiles=smiles, dataset="",
                 positions=None, heavy_atoms_only=bool(heavy_atoms_only), stereo=labels)
    return g


def graph_stereo(graph: MolGraph):
    """The stereo labels a conformer of ``graph`` must reproduce (None: nothing specified).

    SMILES graphs carry the stereo written in the SMILES. Dataset graphs take every potential
    stereo element of their reference geometry, as in training (:mod:`qmanifold.models.stereo`);
    the result is cached on the graph.
    """
    from qmanifold.models.stereo import potential_stereo, stereo_labels

    if graph.stereo is None and graph.positions is not None:
        elements = potential_stereo(graph.atomic_numbers, graph.bond_types, graph.heavy_atoms_only)
        labels = stereo_labels(graph.positions, graph.bond_types, elements)
        graph.stereo = labels if labels.num_labelled else None
    return graph.stereo


def graphs_from_dataset(ds, spec: str, rows: Iterable[int] | None = None) -> list[MolGraph]:
    """:class:`MolGraph` s of the molecules of a :class:`~qmanifold.models.data.MoleculeDataset`.

    Args:
        ds: the dataset (its element list defines ``atom_types``).
        spec: the dataset spec (``"qm9"``, ``"qm9-extract"``, a path), recorded in the identifiers.
        rows: rows to take (default: all).
    """
    out = []
    rows = range(len(ds)) if rows is None else rows
    for r in rows:
        it = ds.get_numpy(int(r))
        out.append(MolGraph(
            atomic_numbers=it["atomic_numbers"].astype(np.int64), atom_types=it["atom_types"].astype(np.int64),
            bond_types=it["bond_types"].astype(np.int64), source=f"{spec}:{int(it['index'])}",
            index=int(it["index"]), smiles=it["smiles"], dataset=str(spec),
            positions=it["positions"].astype(np.float64), heavy_atoms_only=bool(ds.heavy_atoms_only),
        ))
    return out


def ensemble_graph(ds, spec: str) -> MolGraph:
    """The one :class:`MolGraph` of an ensemble of conformations of one molecule (``qmanifold sample
    --data ens.npz -n N``): the atoms in the file's order (hydrogens too unless the data set is
    heavy-atom only), the graph and SMILES of the first item, its geometry as the reference that the
    stereo labels are read from. ``source`` is ``"<spec>:molecule"`` and ``index`` -1, so records
    are labelled by the molecule and not by an arbitrary frame.

    Raises:
        MoleculeInputError: the items are not all the same molecule (atom count, elements in order,
            or bond graph differ), or ``ds`` is empty.
    """
    if len(ds) == 0:
        raise MoleculeInputError(f"{spec}: no conformations to take the molecule from")
    first = ds.get_numpy(0)
    z0, b0 = first["atomic_numbers"].astype(np.int64), first["bond_types"].astype(np.int64)
    counts = np.diff(np.asarray(ds.atom_offsets))
    if np.any(counts != z0.shape[0]):
        raise MoleculeInputError(f"{spec}: not one molecule: items have {sorted(set(counts.tolist()))[:5]} atoms; "
                                 "-n samples one molecule's ensemble (use --n-per-molecule for a set of molecules)")
    if not np.array_equal(np.asarray(ds.all_atomic_numbers).reshape(len(ds), -1), np.tile(z0, (len(ds), 1))):
        raise MoleculeInputError(f"{spec}: not one molecule: the elements (in atom order) differ between items")
    for k in np.unique(np.linspace(0, len(ds) - 1, min(len(ds), 64)).astype(np.int64))[1:]:
        if not np.array_equal(ds.get_numpy(int(k))["bond_types"], b0):
            raise MoleculeInputError(f"{spec}: not one molecule: item {int(k)} has a different bond graph than item 0")
    return MolGraph(atomic_numbers=z0, atom_types=first["atom_types"].astype(np.int64), bond_types=b0,
                    source=f"{spec}:molecule", index=-1, smiles=first["smiles"], dataset=str(spec),
                    positions=first["positions"].astype(np.float64), heavy_atoms_only=bool(ds.heavy_atoms_only))


def _transfer_from_smiles(mol, smiles: str, heavy_atoms_only: bool) -> bool:
    """Copy formal charges (and H counts for heavy-atom graphs) from ``smiles`` onto ``mol``."""
    Chem, RDLogger = _rdkit()
    RDLogger.DisableLog("rdApp.*")
    try:
        ref = Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if ref is None:
        return False
    if not heavy_atoms_only:
        ref = Chem.AddHs(ref)
    if ref.GetNumAtoms() != mol.GetNumAtoms():
        return False
    query = Chem.RWMol(ref)
    for a in query.GetAtoms():
        a.SetFormalCharge(0)
        a.SetNumRadicalElectrons(0)
        a.SetIsotope(0)
    query = query.GetMol()
    match = mol.GetSubstructMatch(query)
    if len(match) != mol.GetNumAtoms():
        return False
    for k, t in enumerate(match):
        src = ref.GetAtomWithIdx(k)
        dst = mol.GetAtomWithIdx(t)
        dst.SetFormalCharge(src.GetFormalCharge())
        if heavy_atoms_only:
            dst.SetNoImplicit(True)
            dst.SetNumExplicitHs(src.GetTotalNumHs())
    return True


# (atomic number, total bond order) -> formal charge, for the cases _guess_charges recognises
_VALENCE_CHARGES = {(7, 4.0): 1, (8, 3.0): 1, (8, 1.0): -1, (6, 3.0): -1}


def _guess_charges(mol) -> None:
    """Formal charges from valences for all-explicit-H graphs without SMILES (non-aromatic atoms)."""
    for a in mol.GetAtoms():
        if a.GetIsAromatic():
            continue
        val = sum(b.GetBondTypeAsDouble() for b in a.GetBonds())
        z = a.GetAtomicNum()
        charge = _VALENCE_CHARGES.get((z, val))
        if charge is not None:
            a.SetFormalCharge(charge)


def template_mol(graph: MolGraph):
    """RDKit molecule (no conformer) of ``graph``; atom ``k`` is graph atom ``k``.

    Sanitised when possible (the property ``_qm_sanitized`` says whether it was). Hydrogens are
    explicit atoms unless ``graph.heavy_atoms_only``. The result is cached on the graph.
    """
    if graph._template is not None:
        return graph._template
    Chem, RDLogger = _rdkit()
    z = np.asarray(graph.atomic_numbers)
    bt = np.asarray(graph.bond_types)
    n = z.shape[0]
    if bt.shape != (n, n):
        raise MoleculeInputError(f"{graph.source}: bond_types shape {bt.shape} does not match {n} atoms")
    rw = Chem.RWMol()
    for v in z:
        a = Chem.Atom(int(v))
        if not graph.heavy_atoms_only:
            a.SetNoImplicit(True)
        rw.AddAtom(a)
    ii, jj = np.nonzero(np.triu(bt, 1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        code = int(bt[i, j])
        if code not in _BOND_NAMES:
            raise MoleculeInputError(f"{graph.source}: unsupported bond code {code} between atoms {i} and {j}")
        rw.AddBond(i, j, getattr(Chem.BondType, _BOND_NAMES[code]))
        if code == 4:
            b = rw.GetBondBetweenAtoms(i, j)
            b.SetIsAromatic(True)
            rw.GetAtomWithIdx(i).SetIsAromatic(True)
            rw.GetAtomWithIdx(j).SetIsAromatic(True)
    mol = rw.GetMol()
    mol.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(mol)
    if (not (graph.smiles and _transfer_from_smiles(mol, graph.smiles, graph.heavy_atoms_only))
            and not graph.heavy_atoms_only):
        _guess_charges(mol)
    RDLogger.DisableLog("rdApp.*")
    try:
        Chem.SanitizeMol(mol)
        sanitized = True
    except Exception:  # noqa: BLE001 - RDKit's sanitisation errors have no common base
        mol.UpdatePropertyCache(strict=False)
        Chem.FastFindRings(mol)
        sanitized = False
    finally:
        RDLogger.EnableLog("rdApp.*")
    mol.SetIntProp("_qm_sanitized", int(sanitized))
    graph._template = mol
    return mol


def _check_coordinates(graph: MolGraph, positions: np.ndarray, what: str) -> np.ndarray:
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise MoleculeInputError(f"{what}: coordinates must have shape (N, 3), got {pos.shape}")
    if pos.shape[0] != graph.num_atoms:
        raise MoleculeInputError(f"{what}: atom-count mismatch, the graph of {graph.source} has "
                                 f"{graph.num_atoms} atoms but the coordinates {pos.shape[0]}")
    if not np.all(np.isfinite(pos)):
        bad = np.nonzero(~np.all(np.isfinite(pos), axis=1))[0]
        raise MoleculeInputError(f"{what}: NaN/infinite coordinates for {graph.source} (atoms {bad[:10].tolist()})")
    return pos


def mol_with_coordinates(graph: MolGraph, positions: np.ndarray, name: str = "", props: Mapping[str, Any] | None = None):
    """A copy of :func:`template_mol` with one 3-D conformer (Å) and string properties."""
    Chem, _ = _rdkit()
    from rdkit.Geometry import Point3D

    pos = _check_coordinates(graph, positions, name or graph.source)
    mol = Chem.Mol(template_mol(graph))
    conf = Chem.Conformer(graph.num_atoms)
    for k in range(graph.num_atoms):
        conf.SetAtomPosition(k, Point3D(*map(float, pos[k])))
    conf.Set3D(True)
    mol.RemoveAllConformers()
    mol.AddConformer(conf, assignId=True)
    if name:
        mol.SetProp("_Name", name)
    for k, v in (props or {}).items():
        mol.SetProp(str(k), str(v))
    return mol


# ----------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------


def _collate_graphs(graphs: Sequence[MolGraph], device, dtype, stereo_elements: int | None = None) -> dict:
    """Padded model inputs; with ``stereo_elements = E`` the stereo-annotated types of
    :func:`qmanifold.models.stereo.encode_stereo` (labels from :func:`graph_stereo`)."""
    from qmanifold.models.stereo import encode_stereo

    n_max = max(g.num_atoms for g in graphs)
    b = len(graphs)
    mask = torch.zeros(b, n_max, dtype=torch.bool)
    types = torch.zeros(b, n_max, dtype=torch.int64)
    bonds = torch.zeros(b, n_max, n_max, dtype=torch.int64)
    for k, g in enumerate(graphs):
        n = g.num_atoms
        mask[k, :n] = True
        atom_types, bond_types = np.asarray(g.atom_types, dtype=np.int64), np.asarray(g.bond_types, dtype=np.int64)
        labels = graph_stereo(g) if stereo_elements is not None else None
        if labels is not None:
            atom_types, bond_types = encode_stereo(atom_types, bond_types, labels, stereo_elements)
        types[k, :n] = torch.from_numpy(atom_types)
        bonds[k, :n, :n] = torch.from_numpy(bond_types)
    return {"mask": mask.to(device), "atom_types": types.to(device), "bond_types": bonds.to(device)}


def sample_conformers(qd, graphs: Sequence[MolGraph], n_per_molecule: int, *, steps: int = 50,
                      sampler: str = "ode", seed: int = 0, batch_size: int = 64,
                      device: str | torch.device | None = None, progress: bool | str = True,
                      stereo: bool | None = None, num_elements: int | None = None,
                      stereo_retries: int = 0, stereo_repair: bool = False, stats: dict | None = None,
                      **sample_kwargs: Any) -> list[np.ndarray]:
    """``n_per_molecule`` conformers for each graph.

    Args:
        qd: a :class:`~qmanifold.QuotientDiffusion` (e.g. from
            :func:`qmanifold.models.training.diffusion_from_checkpoint`).
        graphs: the molecules.
        n_per_molecule: conformers per molecule ``M``.
        steps / sampler: passed to ``qd.sample`` (geometry from the training loss).
        seed: seed of the sampling generator (same seed and batch size, same conformers).
        batch_size: configurations integrated together (molecules of similar size are grouped).
        device: default: the model's device.
        progress: ``True`` a progress bar, ``"lines"`` a status line on stderr every minute (for
            logs), ``False`` nothing (:func:`qmanifold.progress.make_progress`).
        stereo: feed stereo-annotated types (:mod:`qmanifold.models.stereo`); default: whether the
            denoiser is stereo-aware (``chiral_egnn``). ``num_elements`` = the model's element count.
        stereo_retries: with stereo labels, redraw each conformer that does not reproduce every
            requested label (:func:`~qmanifold.models.stereo.stereo_agreement`) up to this many times
            (rejection sampling, as ETKDG retries embeddings that violate chiral constraints); a
            redraw replaces the conformer when it agrees with at least as many labels.
        stereo_repair: after the redraws, move each remaining wrong or flat stereocentre with three
            bonded neighbours to its requested side (:func:`~qmanifold.models.stereo.repair_centres`).
        stats: a dict to receive counters: ``stereo_redrawn`` (conformers redrawn, all rounds),
            ``stereo_repaired`` (centres moved by the repair) and ``stereo_wrong`` (conformers still
            wrong at the end, 0 without labels).
        **sample_kwargs: more options for ``qd.sample`` (``eta``, ``time_grid``, ``churn``).

    Returns:
        One ``(M, N_i, 3)`` float64 array (Å) per graph.

    Raises:
        MoleculeInputError: a model atom type out of range for a graph.
        FloatingPointError: the sampler produced NaN/inf coordinates (names the molecules).
    """
    if n_per_molecule < 1:
        raise ValueError(f"n_per_molecule must be >= 1, got {n_per_molecule}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    params = list(qd.denoiser.parameters())
    dtype = params[0].dtype if params else torch.float32
    device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
    n_types = getattr(qd.denoiser, "num_atom_types", None)
    if stereo is None:
        stereo = bool(getattr(qd.denoiser, "stereo_aware", False))
    stereo_elements = None
    if stereo:
        stereo_elements = int(num_elements or getattr(qd.denoiser, "num_elements", 0) or (n_types or 0) // 3)
        n_types = stereo_elements
    for g in graphs:
        if n_types is not None and g.num_atoms and int(np.max(g.atom_types)) >= n_types:
            raise MoleculeInputError(f"{g.source}: atom type {int(np.max(g.atom_types))} is outside the model's "
                                     f"{n_types} atom types")
    jobs = [(gi, k) for gi in range(len(graphs)) for k in range(n_per_molecule)]
    jobs.sort(key=lambda j: graphs[j[0]].num_atoms)  # stable: little padding per batch
    results = [np.zeros((n_per_molecule, g.num_atoms, 3)) for g in graphs]
    gen = torch.Generator(device=device).manual_seed(int(seed))

    def draw(todo: list[tuple[int, int]], bar) -> list[np.ndarray]:
        out = []
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            batch = _collate_graphs([graphs[gi] for gi, _ in chunk], device, dtype, stereo_elements)
            x = qd.sample(mask=batch["mask"], steps=steps, sampler=sampler, generator=gen, device=device,
                          dtype=dtype, atom_types=batch["atom_types"], bond_types=batch["bond_types"],
                          **sample_kwargs)
            x = x.detach().to("cpu", torch.float64).numpy()
            out.extend(x[row, :graphs[gi].num_atoms] for row, (gi, _) in enumerate(chunk))
            if bar is not None:
                bar.update(len(chunk))
        return out

    def agreement(gi: int, x: np.ndarray) -> tuple[int, int]:
        from qmanifold.models.stereo import stereo_agreement

        labels = graph_stereo(graphs[gi]) if stereo_elements is not None else None
        if labels is None or labels.num_labelled == 0:
            return 0, 0
        if not np.all(np.isfinite(x)):
            return -1, labels.num_labelled
        return stereo_agreement(x, graphs[gi].bond_types, labels)

    from qmanifold.progress import make_progress

    bar = make_progress(len(jobs), progress, f"sampling ({sampler}, {steps} steps)", unit="conf", leave=True)
    redrawn = 0
    try:
        for (gi, k), x in zip(jobs, draw(jobs, bar)):
            results[gi][k] = x
        for _ in range(int(stereo_retries) if stereo_elements is not None else 0):
            score = {(gi, k): agreement(gi, results[gi][k]) for gi, k in jobs}
            todo = [j for j in jobs if score[j][0] != score[j][1]]
            if not todo:
                break
            redrawn += len(todo)
            if bar is not None:
                bar.total += len(todo)
                bar.set_description(f"sampling ({sampler}, {steps} steps; stereo redraws)")
            for (gi, k), x in zip(todo, draw(todo, bar)):
                if agreement(gi, x)[0] >= score[(gi, k)][0]:
                    results[gi][k] = x
    finally:
        if bar is not None:
            bar.close()
    repaired = 0
    if stereo_repair and stereo_elements is not None:
        from qmanifold.models.stereo import repair_centres

        for gi, k in jobs:
            labels = graph_stereo(graphs[gi])
            if labels is not None and labels.num_labelled and np.all(np.isfinite(results[gi][k])):
                results[gi][k], moved = repair_centres(results[gi][k], graphs[gi].bond_types, labels)
                repaired += moved
    if stats is not None:
        stats["stereo_redrawn"] = redrawn
        stats["stereo_repaired"] = repaired
        stats["stereo_wrong"] = sum(int(a != n) for a, n in (agreement(gi, results[gi][k]) for gi, k in jobs))
    bad = [graphs[i].source for i, r in enumerate(results) if not np.all(np.isfinite(r))]
    if bad:
        raise FloatingPointError(f"the sampler produced NaN/inf coordinates for {len(bad)} molecule(s): {bad[:5]}")
    return results


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


HYDROGENS_PLACED = "placed from the heavy atoms (RDKit AddHs addCoords)"
HYDROGENS_GENERATED = "in the conformer (all-atom graph)"


@dataclass
class CompleteConformer:
    """One complete conformer (every atom; :mod:`qmanifold.models.refine` builds them).

    Attributes:
        atomic_numbers: ``(N_all,)`` graph atoms first, then added hydrogens.
        positions: ``(N_all, 3)`` Å.
        heavy: ``(N, 3)`` the graph atoms' coordinates (``positions[:N]``).
        hydrogens: how the hydrogens came about (for the record's ``qm_hydrogens``).
        refine: ``"none"`` or a description of the refinement (``qm_refine``).
        stats: counters (``mmff_missing_params``, ``mmff_not_converged``, ``mmff_changed_stereo``).
    """

    atomic_numbers: np.ndarray
    positions: np.ndarray
    heavy: np.ndarray
    hydrogens: str
    refine: str = "none"
    stats: dict = field(default_factory=dict)


def place_hydrogens(graph: MolGraph, positions: np.ndarray) -> CompleteConformer:
    """The complete molecule of a heavy-atom conformer: hydrogens at their ideal positions given the
    heavy atoms (RDKit ``AddHs(addCoords=True)``; heavy atoms unchanged, hydrogens appended). An
    all-atom graph is returned as it is."""
    Chem, _ = _rdkit()
    mol = mol_with_coordinates(graph, positions)
    hydrogens = HYDROGENS_GENERATED
    if graph.heavy_atoms_only:
        mol = Chem.AddHs(mol, addCoords=True)
        hydrogens = HYDROGENS_PLACED
    pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return CompleteConformer(z, pos, pos[:graph.num_atoms].copy(), hydrogens)


def make_records(graphs: Sequence[MolGraph], conformers: Sequence[np.ndarray],
                 props: Mapping[str, Any] | None = None, complete: Sequence[Sequence[Any]] | None = None,
                 hydrogens: bool = True) -> list[dict]:
    """Flatten per-graph conformer arrays ``(M, N, 3)`` into SDF records (``graph``, ``positions``,
    ``sample``, ``props``, ``complete``), adding the identifier properties and the shared ``props``.

    Complete molecules: ``complete[i][k]`` (a :class:`~qmanifold.models.refine.CompleteConformer`,
    e.g. from :func:`~qmanifold.models.refine.refine_conformers`) is written with all its atoms; without
    it, heavy-atom graphs get their hydrogens placed from the heavy atoms (RDKit ``AddHs(addCoords=True)``)
    unless ``hydrogens`` is False. ``qm_hydrogens`` and ``qm_refine`` say which. Stereo properties are
    read from the written heavy atoms.
    """
    if len(graphs) != len(conformers):
        raise ValueError(f"{len(graphs)} graphs but {len(conformers)} conformer arrays")
    if complete is not None and len(complete) != len(graphs):
        raise ValueError(f"{len(graphs)} graphs but {len(complete)} lists of complete conformers")
    records = []
    for i, (g, confs) in enumerate(zip(graphs, conformers)):
        confs = np.asarray(confs, dtype=np.float64)
        if confs.ndim == 2:
            confs = confs[None]
        for k in range(confs.shape[0]):
            full = complete[i][k] if complete is not None else None
            if full is None and hydrogens and g.heavy_atoms_only:
                full = place_hydrogens(g, _check_coordinates(g, confs[k], f"{g.source} sample {k}"))
            heavy = full.heavy if full is not None else confs[k]
            p = {"qm_source": g.source, "qm_dataset": g.dataset, "qm_index": int(g.index), "qm_smiles": g.smiles,
                 "qm_sample": k, "qm_heavy_atoms_only": int(g.heavy_atoms_only),
                 "qm_hydrogens": full.hydrogens if full is not None else
                 ("none (heavy atoms only)" if g.heavy_atoms_only else HYDROGENS_GENERATED),
                 "qm_refine": full.refine if full is not None else "none"}
            p.update(stereo_properties(g, heavy, full))
            p.update(props or {})
            records.append({"graph": g, "positions": heavy, "sample": k, "props": p, "complete": full})
    return records


def _record_mol(rec: Mapping[str, Any], name: str):
    """The RDKit molecule of a record: the graph atoms, plus the hydrogens of ``rec["complete"]``."""
    Chem, _ = _rdkit()
    g = rec["graph"]
    mol = mol_with_coordinates(g, rec["positions"], name=name)
    full = rec.get("complete")
    if full is None or full.positions.shape[0] == g.num_atoms:
        return mol
    mol = Chem.AddHs(mol, addCoords=True)
    if mol.GetNumAtoms() != full.positions.shape[0]:
        raise MoleculeInputError(f"{g.source}: {full.positions.shape[0]} atoms in the complete conformer but "
                                 f"{mol.GetNumAtoms()} with hydrogens added")
    conf = mol.GetConformer()
    for k, p in enumerate(full.positions.tolist()):
        conf.SetAtomPosition(k, p)
    return mol


def stereo_properties(graph: MolGraph, positions: np.ndarray, complete: Any = None) -> dict:
    """SDF properties naming the stereoisomer of a conformer.

    ``qm_stereo_smiles``: the isomeric SMILES with the stereo perceived from the coordinates (RDKit
    ``AssignStereochemistryFrom3D``; of the complete molecule with its hydrogens when ``complete`` is
    given, i.e. of what the record holds), so a conformer of a molecule with unspecified centres says
    which stereoisomer it is; ``qm_stereo_requested`` / ``qm_stereo_ok``: how many stereo labels were
    requested (SMILES stereo; for dataset molecules the reference's) and how many the conformer has
    (:func:`~qmanifold.models.stereo.stereo_agreement`: right side and clearly pyramidal).
    """
    from qmanifold.models.stereo import stereo_agreement

    Chem, RDLogger = _rdkit()
    out: dict[str, Any] = {}
    try:
        if complete is not None:
            mol = _record_mol({"graph": graph, "positions": positions, "complete": complete}, "")
        else:
            mol = mol_with_coordinates(graph, positions)
        RDLogger.DisableLog("rdApp.*")
        try:
            Chem.AssignStereochemistryFrom3D(mol)
            out["qm_stereo_smiles"] = Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
        finally:
            RDLogger.EnableLog("rdApp.*")
    except Exception:  # noqa: BLE001 - an unsanitisable graph has no stereo SMILES; the record is still written
        out["qm_stereo_smiles"] = ""
    labels = graph.stereo
    if labels is not None:
        ok, total = stereo_agreement(positions, graph.bond_types, labels)
        out["qm_stereo_requested"] = total
        out["qm_stereo_ok"] = ok
    return out


def _clean_value(v: Any) -> str:
    s = str(v)
    return " ".join(s.splitlines())


def sdf_text(records: Sequence[Mapping[str, Any]]) -> str:
    """The SDF text of ``records`` (dicts with ``graph``, ``positions``, ``props``, optional
    ``name``). All records are checked (atom counts, finiteness) before anything is built."""
    Chem, _ = _rdkit()
    for r, rec in enumerate(records):
        _check_coordinates(rec["graph"], rec["positions"], f"record {r}")
    parts = []
    for r, rec in enumerate(records):
        g = rec["graph"]
        name = rec.get("name") or f"{g.source} sample {rec.get('sample', 0)}"
        mol = _record_mol(rec, _clean_value(name))
        sanitized = bool(template_mol(g).GetIntProp("_qm_sanitized"))
        block = Chem.MolToMolBlock(mol, kekulize=sanitized)
        lines = [block.rstrip("\n")]
        for k, v in rec.get("props", {}).items():
            lines.append(f">  <{k}>")
            lines.append(_clean_value(v))
            lines.append("")
        lines.append("$$$$")
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def write_sdf(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Write ``records`` (see :func:`make_records`) to an SDF file atomically.

    Raises:
        MoleculeInputError: atom-count mismatch or NaN coordinates in any record (nothing written).
    """
    if not records:
        raise ValueError("no records to write")
    atomic_write_text(path, sdf_text(records))


def write_xyz(path: str | os.PathLike, records: Sequence[Mapping[str, Any]]) -> None:
    """Write ``records`` as a multi-frame XYZ file (Å) atomically; the comment line holds the
    identifier and sample number."""
    chunks = []
    for r, rec in enumerate(records):
        g = rec["graph"]
        pos = _check_coordinates(g, rec["positions"], f"record {r}")
        z = g.atomic_numbers.tolist()
        full = rec.get("complete")
        if full is not None:
            pos, z = full.positions, full.atomic_numbers.tolist()
        chunks.append(f"{len(z)}\n{_clean_value(g.source)} sample={rec.get('sample', 0)}\n")
        chunks.append("".join(f"{_element_symbol(a):<2s} {p[0]:14.8f} {p[1]:14.8f} {p[2]:14.8f}\n"
                              for a, p in zip(z, pos)))
    atomic_write_text(path, "".join(chunks))
