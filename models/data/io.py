"""User-data readers and the dataset dispatcher.

The container every loader returns, :class:`MoleculeDataset`, and the shared conventions (element
list, bond codes, split names, storage layout) live in :mod:`qmanifold.models.data.dataset`; they
are re-exported here, so ``from qmanifold.models.data.io import MoleculeDataset, ELEMENTS`` keeps
working. This module holds the readers for user-supplied data:

* :func:`load_npz_ensemble` -- an ``.npz`` with an ensemble of conformations of one molecule;
* :func:`load_sdf` -- a multi-molecule SDF file (needs RDKit);
* :func:`load_dataset` -- a dispatcher on a short spec string ("qm9", "qm9-extract", a path).

Errors caused by the user's file (unreadable, empty, malformed fields, unsupported elements) are
:class:`~qmanifold.errors.InputError` with a message that names the file.

Nothing here imports RDKit at module import time; only :func:`load_sdf` and the bond perception
fallback of :func:`load_npz_ensemble` need it. The QM9 loaders (:mod:`qmanifold.models.data.qm9`)
are imported only when :func:`load_dataset` is asked for QM9, so neither module imports the other
at import time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from qmanifold.errors import InputError

from .dataset import (
    _MAX_Z,  # noqa: F401 - re-exported (it lived here before models/data/dataset.py)
    _SYMBOLS,  # noqa: F401 - re-exported
    BOND_AROMATIC,
    BOND_DOUBLE,
    BOND_NONE,
    BOND_SINGLE,
    BOND_TRIPLE,
    ELEMENTS,
    FORMAT_VERSION,
    NUM_BOND_TYPES,
    SPLIT_NAMES,
    MoleculeDataset,
    _atomic_write_text,  # noqa: F401 - re-exported (models/data/extract.py imports it from here)
    _check_elements,
    _element_list_text,
    _ragged_gather,  # noqa: F401 - re-exported
    atomic_savez,
    bonds_to_pairs,
    element_label,
    element_symbol,
    read_npz,
)

__all__ = [
    "ELEMENTS",
    "BOND_NONE",
    "BOND_SINGLE",
    "BOND_DOUBLE",
    "BOND_TRIPLE",
    "BOND_AROMATIC",
    "NUM_BOND_TYPES",
    "SPLIT_NAMES",
    "FORMAT_VERSION",
    "MoleculeDataset",
    "atomic_savez",
    "bonds_to_pairs",
    "element_symbol",
    "element_label",
    "read_npz",
    "perceive_bonds",
    "load_npz_ensemble",
    "save_npz_ensemble",
    "load_sdf",
    "sdf_supplier",
    "load_dataset",
]

# ----------------------------------------------------------------------------------------------
# Bond perception (RDKit)
# ----------------------------------------------------------------------------------------------


def _require_rdkit(what: str):
    try:
        from rdkit import Chem
    except ImportError as exc:  # pragma: no cover - exercised only without rdkit
        raise ImportError(f"{what} needs RDKit; install it with `pip install rdkit` "
                          f"(or the 'molecules' extra)") from exc
    return Chem


def perceive_bonds(positions: np.ndarray, atomic_numbers: np.ndarray) -> np.ndarray:
    """Connectivity from one geometry with RDKit's ``rdDetermineBonds.DetermineConnectivity``.

    Only connectivity is perceived (covalent-radius criterion), so every bond found is reported
    as single; bond orders need a SMILES or explicit data.

    Args:
        positions: ``(N, 3)`` coordinates, Å.
        atomic_numbers: ``(N,)`` atomic numbers.

    Returns:
        ``(B, 2)`` int64 atom pairs with ``i < j``.
    """
    Chem = _require_rdkit("bond perception")
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    pos = np.asarray(positions, dtype=np.float64)
    z = np.asarray(atomic_numbers)
    mol = Chem.RWMol()
    for zi in z:
        mol.AddAtom(Chem.Atom(int(zi)))
    conf = Chem.Conformer(len(z))
    for k, p in enumerate(pos):
        conf.SetAtomPosition(k, Point3D(float(p[0]), float(p[1]), float(p[2])))
    mol.AddConformer(conf, assignId=True)
    rdDetermineBonds.DetermineConnectivity(mol)
    pairs = sorted((min(b.GetBeginAtomIdx(), b.GetEndAtomIdx()), max(b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
                   for b in mol.GetBonds())
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# User data: .npz conformer ensembles
# ----------------------------------------------------------------------------------------------


def _bonds_from_field(bonds: np.ndarray, n: int, origin: str) -> np.ndarray:
    """Dense ``(N, N)`` bond matrix from the ``bonds`` field of an ensemble file.

    Accepted layouts: ``(N, N)`` symmetric matrix with a zero diagonal (entries 0..4);
    ``(M, 2)`` integer pairs (all single); ``(M, 3)`` rows ``(i, j, order)`` with order in
    1, 2, 3, 4 (or 1.5 for aromatic). A square array that is symmetric with a zero diagonal is
    read as a matrix, which is unambiguous because a ``(3, 3)`` pair list of that form would
    contain a bond of order 0.
    """
    b = np.asarray(bonds)
    if b.dtype == object or not (np.issubdtype(b.dtype, np.integer) or np.issubdtype(b.dtype, np.floating)
                                  or b.dtype == bool):
        raise InputError(f"{origin}: field 'bonds' must be numeric, got dtype {b.dtype}")
    if b.ndim != 2:
        raise InputError(f"{origin}: field 'bonds' must be 2-D ((M, 2), (M, 3) or (N, N)), got shape {b.shape}")
    if not np.all(np.isfinite(b)):
        raise InputError(f"{origin}: field 'bonds' contains NaN or infinite values")
    bf = b.astype(np.float64)
    if b.shape == (n, n) and np.array_equal(bf, bf.T) and np.all(np.diag(bf) == 0):
        if np.any((bf != np.round(bf)) | (bf < 0) | (bf >= NUM_BOND_TYPES)):
            raise InputError(f"{origin}: field 'bonds' as an (N, N) matrix must hold integers 0..4 "
                             f"(0 none, 1 single, 2 double, 3 triple, 4 aromatic)")
        return bf.astype(np.int64)
    if b.shape[1] not in (2, 3):
        raise InputError(f"{origin}: field 'bonds' has shape {b.shape}; expected (M, 2) pairs, (M, 3) "
                         f"(i, j, order) rows or an ({n}, {n}) symmetric matrix with zero diagonal")
    ij = bf[:, :2]
    if np.any(ij != np.round(ij)):
        raise InputError(f"{origin}: field 'bonds' atom indices must be integers")
    ij = ij.astype(np.int64)
    if ij.size and (ij.min() < 0 or ij.max() >= n):
        raise InputError(f"{origin}: field 'bonds' refers to atom {int(ij.max()) if ij.max() >= n else int(ij.min())}"
                         f" but the molecule has {n} atoms (atom count mismatch)")
    if np.any(ij[:, 0] == ij[:, 1]):
        raise InputError(f"{origin}: field 'bonds' contains a self bond (i == j)")
    if b.shape[1] == 3:
        order = bf[:, 2].copy()
        order[order == 1.5] = BOND_AROMATIC
        if np.any((order != np.round(order)) | (order < 1) | (order > BOND_AROMATIC)):
            raise InputError(f"{origin}: field 'bonds' orders must be 1, 2, 3, 4 (aromatic) or 1.5 "
                             f"(aromatic), got {sorted(set(bf[:, 2].tolist()))}")
        order = order.astype(np.int64)
    else:
        order = np.ones(len(ij), dtype=np.int64)
    mat = np.zeros((n, n), dtype=np.int64)
    lo, hi = np.minimum(ij[:, 0], ij[:, 1]), np.maximum(ij[:, 0], ij[:, 1])
    if len(np.unique(lo * n + hi)) != len(lo):
        raise InputError(f"{origin}: field 'bonds' lists the same atom pair twice")
    mat[lo, hi] = order
    mat[hi, lo] = order
    return mat


def load_npz_ensemble(
    path: str | os.PathLike,
    *,
    elements: Sequence[int] = ELEMENTS,
    heavy_atoms_only: bool = False,
) -> MoleculeDataset:
    """Load an ensemble of conformations of one molecule from an ``.npz`` file.

    Fields:

    * ``positions`` (required): ``(F, N, 3)`` float, Å (a single ``(N, 3)`` frame is accepted);
    * ``atomic_numbers`` (required): ``(N,)`` integers;
    * ``bonds`` (optional): ``(M, 2)`` int pairs (single bonds), ``(M, 3)`` rows
      ``(i, j, order)`` or an ``(N, N)`` symmetric matrix (bond codes as in
      :mod:`qmanifold.models.data.dataset`). Absent: connectivity is perceived from the first frame with RDKit
      (:func:`perceive_bonds`, all bonds single);
    * ``smiles`` (optional): a string stored with every frame.

    Returns:
        A :class:`MoleculeDataset` with ``F`` items, one per frame, ``index`` = frame number,
        no split labels.

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: not a valid ``.npz`` (:func:`~qmanifold.models.data.dataset.read_npz`), a
            missing or malformed field (named in the message),
            NaN/infinite coordinates, atom count mismatch, or an element not in ``elements``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"ensemble file not found: {path}")
    data = read_npz(path)
    for key in ("positions", "atomic_numbers"):
        if key not in data:
            raise InputError(f"{path}: missing required field '{key}' (found {sorted(data)})")
    pos = np.asarray(data["positions"])
    if not (np.issubdtype(pos.dtype, np.floating) or np.issubdtype(pos.dtype, np.integer)):
        raise InputError(f"{path}: field 'positions' must be numeric, got dtype {pos.dtype}")
    if pos.ndim == 2:
        pos = pos[None]
    if pos.ndim != 3 or pos.shape[2] != 3:
        raise InputError(f"{path}: field 'positions' must have shape (F, N, 3), got {np.asarray(data['positions']).shape}")
    if pos.shape[0] == 0 or pos.shape[1] == 0:
        raise InputError(f"{path}: field 'positions' is empty, shape {pos.shape}")
    pos = pos.astype(np.float64)
    finite = np.isfinite(pos).all(axis=(1, 2))
    if not finite.all():
        bad = np.nonzero(~finite)[0]
        raise InputError(f"{path}: field 'positions' contains NaN or infinite coordinates in "
                         f"{bad.size} frame(s), e.g. frames {bad[:10].tolist()}")
    z = np.asarray(data["atomic_numbers"])
    if z.ndim != 1:
        raise InputError(f"{path}: field 'atomic_numbers' must have shape (N,), got {z.shape}")
    if not np.issubdtype(z.dtype, np.integer):
        zf = z.astype(np.float64) if np.issubdtype(z.dtype, np.floating) else None
        if zf is None or not np.all(np.isfinite(zf)) or np.any(zf != np.round(zf)):
            raise InputError(f"{path}: field 'atomic_numbers' must hold integers, got dtype {z.dtype}")
        z = zf.astype(np.int64)
    z = z.astype(np.int64)
    n = pos.shape[1]
    if z.shape[0] != n:
        raise InputError(f"{path}: atom count mismatch: 'positions' has {n} atoms per frame but "
                         f"'atomic_numbers' has {z.shape[0]}")
    els = _check_elements(elements)
    unknown = sorted(set(z.tolist()) - set(els))
    if unknown:
        names = ", ".join(element_label(u) for u in unknown)
        atoms = np.nonzero(np.isin(z, unknown))[0]
        raise InputError(f"{path}: field 'atomic_numbers' has unknown element(s) {names} at atom(s) "
                         f"{atoms[:10].tolist()}; supported elements: {_element_list_text(els)}")
    if "bonds" in data:
        bonds = _bonds_from_field(data["bonds"], n, f"{path}")
        bond_source = "file"
    else:
        pairs = perceive_bonds(pos[0], z)
        bonds = np.zeros((n, n), dtype=np.int64)
        bonds[pairs[:, 0], pairs[:, 1]] = BOND_SINGLE
        bonds[pairs[:, 1], pairs[:, 0]] = BOND_SINGLE
        bond_source = "rdkit DetermineConnectivity (frame 0, single bonds)"
    smiles = ""
    if "smiles" in data:
        s = np.asarray(data["smiles"])
        if s.ndim != 0 or s.dtype.kind not in "US":
            raise InputError(f"{path}: field 'smiles' must be a single string, got dtype {s.dtype} shape {s.shape}")
        smiles = str(s.item().decode() if isinstance(s.item(), bytes) else s.item())
    pairs, orders = bonds_to_pairs(bonds)
    f_count = pos.shape[0]
    return MoleculeDataset(
        positions=pos.reshape(-1, 3),
        atomic_numbers=np.tile(z, f_count),
        atom_offsets=np.arange(f_count + 1, dtype=np.int64) * n,
        bond_pairs=np.tile(pairs, (f_count, 1)),
        bond_orders=np.tile(orders, f_count),
        bond_offsets=np.arange(f_count + 1, dtype=np.int64) * len(pairs),
        indices=np.arange(f_count, dtype=np.int64),
        smiles=[smiles] * f_count,
        elements=els, heavy_atoms_only=heavy_atoms_only,
        source=path, metadata={"kind": "npz-ensemble", "bonds": bond_source},
    )


def save_npz_ensemble(
    path: str | os.PathLike,
    positions: np.ndarray,
    atomic_numbers: np.ndarray,
    bonds: np.ndarray | None = None,
    smiles: str | None = None,
) -> None:
    """Write an ensemble file readable by :func:`load_npz_ensemble` (atomically).

    Args:
        path: destination ``.npz``.
        positions: ``(F, N, 3)`` coordinates, Å.
        atomic_numbers: ``(N,)``.
        bonds: optional ``(M, 2)``, ``(M, 3)`` or ``(N, N)`` bond description.
        smiles: optional SMILES string.
    """
    arrays = {"positions": np.asarray(positions, dtype=np.float32),
              "atomic_numbers": np.asarray(atomic_numbers, dtype=np.int64)}
    if bonds is not None:
        arrays["bonds"] = np.asarray(bonds)
    if smiles is not None:
        arrays["smiles"] = np.asarray(str(smiles))
    atomic_savez(path, arrays, compressed=True)


# ----------------------------------------------------------------------------------------------
# User data: SDF
# ----------------------------------------------------------------------------------------------


def _rdkit_bond_code(bond) -> int:
    """Bond code (1..4) of an RDKit bond; 0 for bond types outside single/double/triple/aromatic."""
    from rdkit import Chem

    if bond.GetIsAromatic():
        return BOND_AROMATIC
    return {Chem.BondType.SINGLE: BOND_SINGLE, Chem.BondType.DOUBLE: BOND_DOUBLE,
            Chem.BondType.TRIPLE: BOND_TRIPLE, Chem.BondType.AROMATIC: BOND_AROMATIC}.get(bond.GetBondType(), 0)


def sdf_supplier(path: str | os.PathLike, *, sanitize: bool = True, remove_hs: bool = False):
    """RDKit's ``SDMolSupplier`` over ``path``, after checking that the file holds SDF records.

    RDKit raises a bare ``OSError("File error: Invalid input file")`` for an empty file and yields
    nothing for a file of blank lines; both are reported here as "no molecules in FILE".

    Returns:
        The supplier (``len(supplier) >= 1``; records are read lazily, ``supplier[k]`` is None for
        a record RDKit cannot parse).

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: ``path`` is a directory, the file is empty or holds no SDF record, or RDKit
            cannot open it (the message names the file).
        ImportError: RDKit is not installed.
    """
    Chem = _require_rdkit("reading SDF files")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"SDF file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not an SDF file")
    if os.path.getsize(path) == 0:
        raise InputError(f"no molecules in {path} (the file is empty)")
    try:
        supplier = Chem.SDMolSupplier(path, removeHs=remove_hs, sanitize=sanitize)
    except OSError as exc:
        raise InputError(f"{path}: RDKit cannot open it as an SDF file ({exc})") from exc
    if len(supplier) == 0:
        raise InputError(f"no molecules in {path} (no SDF record in the file)")
    return supplier


def load_sdf(
    path: str | os.PathLike,
    *,
    elements: Sequence[int] = ELEMENTS,
    heavy_atoms_only: bool = False,
    sanitize: bool = True,
) -> MoleculeDataset:
    """Load a (multi-molecule) SDF file with RDKit, keeping explicit hydrogens.

    Records are read with ``SDMolSupplier(path, removeHs=False, sanitize=sanitize)``. Bond types
    come from the file after RDKit sanitisation (aromatic bonds -> 4). Records that cannot be
    used are skipped, counted by reason in ``dataset.skipped`` and reported in one warning:

    * ``unparseable``: RDKit returned no molecule (syntax or sanitisation failure);
    * ``no_conformer``: the record has no coordinates;
    * ``not_3d``: the coordinates are flagged 2-D (all z = 0);
    * ``nonfinite_coordinates``: NaN/infinite coordinates;
    * ``unknown_element``: an element not in ``elements``;
    * ``unsupported_bond``: a bond that is not single/double/triple/aromatic (e.g. dative).

    ``index`` is the 0-based record number in the file; ``smiles`` is RDKit's canonical SMILES
    (hydrogens implicit).

    The warning, and the error when no record is usable, name the unsupported elements (symbol
    and atomic number), the records that hold them and the supported elements.

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: the file is empty or holds no SDF record ("no molecules in FILE"), or no
            record is usable ("no usable molecule", with the reasons).
        ImportError: RDKit is not installed.
    """
    Chem = _require_rdkit("load_sdf")
    path = os.fspath(path)
    els = _check_elements(elements)
    allowed = set(els)
    skipped: dict[str, int] = {}
    unknown_records: dict[int, list[int]] = {}  # atomic number -> records holding it

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    mols: list[dict[str, Any]] = []
    supplier = sdf_supplier(path, sanitize=sanitize)
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        for rec in range(len(supplier)):
            mol = supplier[rec]
            if mol is None:
                skip("unparseable")
                continue
            if mol.GetNumConformers() == 0:
                skip("no_conformer")
                continue
            conf = mol.GetConformer()
            pos = np.asarray(conf.GetPositions(), dtype=np.float64).reshape(-1, 3)
            if not conf.Is3D():
                skip("not_3d")
                continue
            if not np.all(np.isfinite(pos)):
                skip("nonfinite_coordinates")
                continue
            z = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
            if not set(z.tolist()) <= allowed:
                for u in sorted(set(z.tolist()) - allowed):
                    unknown_records.setdefault(u, []).append(rec)
                skip("unknown_element")
                continue
            n = len(z)
            bt = np.zeros((n, n), dtype=np.int64)
            ok = True
            for b in mol.GetBonds():
                code = _rdkit_bond_code(b)
                if code == 0:
                    ok = False
                    break
                i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
                bt[i, j] = bt[j, i] = code
            if not ok:
                skip("unsupported_bond")
                continue
            try:
                smi = Chem.MolToSmiles(Chem.RemoveHs(mol, sanitize=False))
            except Exception:  # noqa: BLE001 - RDKit raises assorted types; the SMILES is optional
                smi = ""
            mols.append({"positions": pos, "atomic_numbers": z, "bond_types": bt, "index": rec, "smiles": smi})
    finally:
        RDLogger.EnableLog("rdApp.*")
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    if unknown_records:
        reasons += ("; unknown element(s) " + ", ".join(
            f"{element_label(u)} in record(s) {recs[:10]}" for u, recs in sorted(unknown_records.items()))
            + f"; supported elements: {_element_list_text(els)}")
    if skipped:
        warnings.warn(f"{path}: skipped {sum(skipped.values())} SDF record(s): {reasons}", stacklevel=2)
    if not mols:
        raise InputError(f"{path}: no usable molecule in the SDF file ({len(supplier)} record(s) skipped: "
                         f"{reasons})")
    return MoleculeDataset.from_molecules(mols, elements=els, heavy_atoms_only=heavy_atoms_only,
                                          skipped=skipped, source=path, metadata={"kind": "sdf"})


# ----------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------

_DATASET_SPECS = ("qm9", "qm9-edm", "qm9-extract", "<path>.npz", "<path>.sdf")


def load_dataset(spec: str | os.PathLike, **kwargs: Any) -> MoleculeDataset:
    """Load a dataset from a short spec.

    * ``"qm9"`` -> :func:`qmanifold.models.data.qm9.load_qm9` (full QM9, cached);
    * ``"qm9-edm"`` -> :func:`qmanifold.models.data.qm9.load_qm9_edm` (full QM9, EDM split);
    * ``"qm9-extract"`` -> :func:`qmanifold.models.data.qm9.load_qm9_extract` (committed, pure numpy);
    * a path ending in ``.npz`` -> a qmanifold dataset file written by
      :meth:`MoleculeDataset.save` if it has that layout, else :func:`load_npz_ensemble`;
    * a path ending in ``.sdf`` -> :func:`load_sdf`.

    Extra keyword arguments go to the loader.

    Raises:
        InputError: unknown spec (the message lists the options), or a file that cannot be used
            (the message names it).
        FileNotFoundError: a path spec that does not exist.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"dataset spec must be a string or path, got {type(spec).__name__}")
    s = os.fspath(spec)
    key = s.strip().lower()
    if key == "qm9":
        from .qm9 import load_qm9

        return load_qm9(**kwargs)
    if key in ("qm9-edm", "qm9_edm"):
        from .qm9 import load_qm9_edm

        return load_qm9_edm(**kwargs)
    if key in ("qm9-extract", "qm9_extract"):
        from .qm9 import load_qm9_extract

        return load_qm9_extract(**kwargs)
    if key.endswith(".npz"):
        if not os.path.exists(s):
            raise FileNotFoundError(f"dataset file not found: {s}")
        arrays = read_npz(s)
        if "format_version" in arrays and "atom_offsets" in arrays:
            return MoleculeDataset.from_arrays(arrays, origin=s, **kwargs)
        return load_npz_ensemble(s, **kwargs)
    if key.endswith(".sdf"):
        return load_sdf(s, **kwargs)
    raise InputError(f"unknown dataset spec {s!r}; options are: " + ", ".join(_DATASET_SPECS))
