"""The molecule container and the conventions every loader shares.

This module is the single home of :class:`MoleculeDataset` (the ragged storage every loader in
:mod:`qmanifold.models.data` returns), the element and bond-type constants, the split names and the
pickle-free ``.npz`` reading / writing helpers. It imports no other module of the package: the
readers of user data (:mod:`qmanifold.models.data.io`) and of QM9 (:mod:`qmanifold.models.data.qm9`)
both build on it, and neither needs the other at import time.

Conventions:

* coordinates are in Angstrom (Å), float32 in storage and in items;
* ``atomic_numbers`` are int64 nuclear charges (H = 1);
* ``atom_types`` index into an element list (default :data:`ELEMENTS` = H, C, N, O, F);
* ``bond_types`` is an ``(N, N)`` symmetric int64 matrix with 0 = no bond, 1 = single,
  2 = double, 3 = triple, 4 = aromatic and a zero diagonal.

Storage is ragged: all atoms of all molecules are concatenated in one ``(A, 3)`` array with an
``(M + 1,)`` offsets array; bonds are kept as per-molecule lists of local ``(i, j)`` pairs
(``i < j``) with an order each, also concatenated with offsets. The dense ``(N, N)`` matrix is
built only when an item is read. Saving uses a pickle-free ``.npz`` (:meth:`MoleculeDataset.save`)
written atomically (temporary file in the same directory, then :func:`os.replace`).
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from qmanifold.atomic import atomic_open, atomic_write_text
from qmanifold.errors import InputError

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
]

#: Default element list (atomic numbers): H, C, N, O, F. ``atom_types`` index into it.
ELEMENTS: tuple[int, ...] = (1, 6, 7, 8, 9)

BOND_NONE = 0
BOND_SINGLE = 1
BOND_DOUBLE = 2
BOND_TRIPLE = 3
BOND_AROMATIC = 4
#: Size of the bond-type vocabulary (none, single, double, triple, aromatic).
NUM_BOND_TYPES = 5

#: Split names, in the order of the integer labels 0, 1, 2 stored in ``split_labels``.
SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")

FORMAT_VERSION = 1

_SYMBOLS = (  # noqa: SIM905 - the periodic table as text reads better than 119 quoted strings
    "X H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd "
    "Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am "
    "Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og"
).split()

_MAX_Z = 118


def element_symbol(z: int) -> str:
    """Chemical symbol of atomic number ``z`` (1..118; ``"Z=<z>"`` outside that range)."""
    z = int(z)
    return _SYMBOLS[z] if 0 < z <= _MAX_Z else f"Z={z}"


def element_label(z: int) -> str:
    """``"<symbol> (Z=<z>)"``, e.g. ``"U (Z=92)"``; just ``"Z=<z>"`` when ``z`` is no element."""
    z = int(z)
    return f"{_SYMBOLS[z]} (Z={z})" if 0 < z <= _MAX_Z else f"Z={z}"


def _element_list_text(elements: Sequence[int]) -> str:
    """``"H, C, N, O, F"``: the symbols of an element list, for error messages."""
    return ", ".join(element_symbol(z) for z in elements)


def _check_elements(elements: Sequence[int]) -> tuple[int, ...]:
    try:
        els = tuple(int(z) for z in elements)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"elements must be a sequence of atomic numbers, got {elements!r}") from exc
    if not els:
        raise ValueError("elements must not be empty")
    if len(set(els)) != len(els):
        raise ValueError(f"elements contains duplicates: {els}")
    bad = [z for z in els if not 1 <= z <= _MAX_Z]
    if bad:
        raise ValueError(f"elements must be atomic numbers in 1..{_MAX_Z}, got {bad}")
    return els


# ----------------------------------------------------------------------------------------------
# Atomic file writes
# ----------------------------------------------------------------------------------------------


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], compressed: bool = False) -> None:
    """Write ``arrays`` to the ``.npz`` file ``path`` atomically (:mod:`qmanifold.atomic`).

    The exact ``path`` is used (numpy's habit of appending ``.npz`` does not apply).
    """
    with atomic_open(path, "wb") as fh:
        (np.savez_compressed if compressed else np.savez)(fh, **arrays)


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_text(path, text)


# ----------------------------------------------------------------------------------------------
# Pickle-free .npz reading
# ----------------------------------------------------------------------------------------------

_NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All arrays of the ``.npz`` archive ``path``, read with ``allow_pickle=False``.

    A ``.npz`` is a zip archive of ``.npy`` arrays (:func:`numpy.savez`). Anything else -- random
    bytes, a single ``.npy`` array, a damaged archive -- is reported as "not a valid .npz file", and
    an array of Python objects (stored as a pickle) is refused: pickles can run arbitrary code, so
    qmanifold never loads them, and no message suggests it.

    Returns:
        ``{name: array}`` for every member of the archive.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        InputError: ``path`` is a directory, not a valid ``.npz`` archive, or holds an object
            array (the message names the file and, for object arrays, the field).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a directory, not a .npz file")
    with open(path, "rb") as fh:
        head = fh.read(len(_NPY_MAGIC))
    if head == _NPY_MAGIC:
        raise InputError(f"{path} is not a valid .npz file: it holds a single NumPy array (.npy, from "
                         f"numpy.save); write the fields with numpy.savez instead")
    if not zipfile.is_zipfile(path):
        kind = "the file is empty" if not head else "it is not a zip archive of NumPy arrays"
        raise InputError(f"{path} is not a valid .npz file ({kind}; expected the output of numpy.savez)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                try:
                    arrays[key] = f[key]
                except ValueError as exc:
                    if "object" in str(exc).lower() or "pickle" in str(exc).lower():
                        raise InputError(f"{path}: field {key!r} holds Python objects (a pickled array), "
                                         f"which qmanifold never loads; store it as a numeric or string "
                                         f"array") from None
                    raise
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib, EOF and format errors all mean a damaged file
        raise InputError(f"{path} is not a valid .npz file (damaged archive: {type(exc).__name__})") from None
    return arrays


# ----------------------------------------------------------------------------------------------
# Ragged-array helpers (functional core)
# ----------------------------------------------------------------------------------------------


def _ragged_gather(offsets: np.ndarray, select: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat element indices and new offsets for the rows ``select`` of a ragged array.

    Args:
        offsets: ``(M + 1,)`` int64 row offsets.
        select: ``(K,)`` int64 row numbers.

    Returns:
        ``(flat, new_offsets)``: ``flat`` ``(sum of selected lengths,)`` indices into the flat
        array, ``new_offsets`` ``(K + 1,)``.
    """
    starts = offsets[select]
    lengths = offsets[select + 1] - starts
    new_offsets = np.zeros(len(select) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    total = int(new_offsets[-1])
    if total == 0:
        return np.zeros(0, dtype=np.int64), new_offsets
    row_of = np.repeat(np.arange(len(select), dtype=np.int64), lengths)
    flat = starts[row_of] + (np.arange(total, dtype=np.int64) - new_offsets[row_of])
    return flat, new_offsets


def bonds_to_pairs(bond_types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle ``(i, j, order)`` lists of a dense bond matrix.

    Args:
        bond_types: ``(N, N)`` integer matrix (0 = none).

    Returns:
        ``(pairs, orders)``: ``(B, 2)`` int32 with ``i < j`` and ``(B,)`` uint8 in 1..4.

    Raises:
        ValueError: matrix not square, not symmetric, non-zero diagonal or orders outside 0..4.
    """
    b = np.asarray(bond_types)
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"bond_types must be a square (N, N) matrix, got shape {b.shape}")
    if not np.array_equal(b, b.T):
        raise ValueError("bond_types must be symmetric")
    if np.any(np.diag(b) != 0):
        raise ValueError("bond_types must have a zero diagonal (no self bonds)")
    if b.size and (b.min() < 0 or b.max() >= NUM_BOND_TYPES):
        raise ValueError(f"bond_types entries must lie in 0..{NUM_BOND_TYPES - 1}, got range "
                         f"[{b.min()}, {b.max()}]")
    i, j = np.nonzero(np.triu(b, k=1))
    return np.stack([i, j], axis=1).astype(np.int32), b[i, j].astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# The dataset container
# ----------------------------------------------------------------------------------------------


class MoleculeDataset(Dataset):
    """Molecules with 3-D coordinates and a bond graph, stored as concatenated arrays.

    Every item (``dataset[k]``) is a dict:

    * ``positions``: ``(N, 3)`` float32 tensor, Å;
    * ``atomic_numbers``: ``(N,)`` int64 tensor;
    * ``atom_types``: ``(N,)`` int64 tensor, index into :attr:`elements`;
    * ``bond_types``: ``(N, N)`` int64 tensor, symmetric, 0 none / 1 single / 2 double /
      3 triple / 4 aromatic;
    * ``index``: int, the molecule's identifier in its source (QM9 id, frame number, SDF record);
    * ``smiles``: str (may be empty when the source has none);
    * ``num_atoms``: int, ``N``.

    Args:
        positions: ``(A, 3)`` float coordinates of all atoms of all molecules (Å).
        atomic_numbers: ``(A,)`` integer atomic numbers.
        atom_offsets: ``(M + 1,)`` int64, molecule ``k`` owns atoms
            ``atom_offsets[k]:atom_offsets[k + 1]``; starts at 0, non-decreasing.
        bond_pairs: ``(B, 2)`` integer local atom indices of each bond (within its molecule).
        bond_orders: ``(B,)`` integer bond types in 1..4.
        bond_offsets: ``(M + 1,)`` int64 offsets of each molecule's bonds.
        indices: ``(M,)`` int64 source identifiers.
        smiles: ``M`` strings or None (empty strings).
        split_labels: ``(M,)`` int8, 0 train / 1 valid / 2 test / -1 none; None = all -1.
        elements: atomic numbers defining ``atom_types`` (default :data:`ELEMENTS`). Every atomic
            number present must be listed.
        heavy_atoms_only: drop hydrogens (and their bonds) on construction.
        skipped: counts of source records dropped while loading, by reason.
        source: a short description of where the data came from.
        metadata: extra JSON-serialisable information.

    Raises:
        ValueError: inconsistent shapes/offsets, NaN or infinite coordinates, bonds out of range,
            self or duplicate bonds, bond orders outside 1..4, or elements not in ``elements``.
    """

    def __init__(
        self,
        positions: np.ndarray,
        atomic_numbers: np.ndarray,
        atom_offsets: np.ndarray,
        bond_pairs: np.ndarray,
        bond_orders: np.ndarray,
        bond_offsets: np.ndarray,
        indices: np.ndarray,
        smiles: Sequence[str] | None = None,
        split_labels: np.ndarray | None = None,
        elements: Sequence[int] = ELEMENTS,
        heavy_atoms_only: bool = False,
        skipped: Mapping[str, int] | None = None,
        source: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        pos = np.ascontiguousarray(positions, dtype=np.float32)
        atom_offsets = np.asarray(atom_offsets)
        bond_offsets = np.asarray(bond_offsets)
        if atom_offsets.ndim != 1 or atom_offsets.size < 1:
            raise ValueError(f"atom_offsets must be a 1-D array of length M + 1, got shape {atom_offsets.shape}")
        m = atom_offsets.size - 1
        if pos.ndim != 2 or pos.shape[1] != 3:
            raise ValueError(f"positions must have shape (A, 3), got {pos.shape}")
        z = np.asarray(atomic_numbers)
        if z.shape != (pos.shape[0],):
            raise ValueError(f"atomic_numbers must have shape ({pos.shape[0]},) to match positions, got {z.shape}")
        if (z.size and not np.issubdtype(z.dtype, np.integer)
                and (not np.all(np.isfinite(z)) or not np.all(z == np.round(z)))):
            raise ValueError("atomic_numbers must be integers")
        self.elements: tuple[int, ...] = _check_elements(elements)
        self._check_offsets("atom_offsets", atom_offsets, pos.shape[0])
        pairs = np.asarray(bond_pairs)
        orders = np.asarray(bond_orders)
        if pairs.size == 0:
            pairs = pairs.reshape(0, 2)
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"bond_pairs must have shape (B, 2), got {pairs.shape}")
        if orders.shape != (pairs.shape[0],):
            raise ValueError(f"bond_orders must have shape ({pairs.shape[0]},), got {orders.shape}")
        if bond_offsets.shape != (m + 1,):
            raise ValueError(f"bond_offsets must have shape ({m + 1},) (one more than the number of "
                             f"molecules), got {bond_offsets.shape}")
        self._check_offsets("bond_offsets", bond_offsets, pairs.shape[0])
        idx = np.asarray(indices)
        if idx.shape != (m,):
            raise ValueError(f"indices must have shape ({m},), got {idx.shape}")
        if smiles is None:
            smiles = [""] * m
        smiles = [str(s) for s in smiles]
        if len(smiles) != m:
            raise ValueError(f"smiles must have {m} entries, got {len(smiles)}")
        if split_labels is None:
            labels = np.full(m, -1, dtype=np.int8)
        else:
            labels = np.asarray(split_labels).astype(np.int8)
            if labels.shape != (m,):
                raise ValueError(f"split_labels must have shape ({m},), got {labels.shape}")
            if labels.size and (labels.min() < -1 or labels.max() >= len(SPLIT_NAMES)):
                raise ValueError("split_labels must lie in -1..2 (-1 none, 0 train, 1 valid, 2 test)")

        self._pos = pos
        self._z = z.astype(np.int64)
        self._atom_offsets = atom_offsets.astype(np.int64)
        self._pairs = pairs.astype(np.int32)
        if orders.size and np.issubdtype(orders.dtype, np.floating) and np.any(orders != np.round(orders)):
            raise ValueError("bond_orders must be integers 1..4")
        self._orders = orders.astype(np.int64)
        self._bond_offsets = bond_offsets.astype(np.int64)
        self.indices: np.ndarray = idx.astype(np.int64)
        self._smiles: list[str] = smiles
        self.split_labels: np.ndarray = labels
        self.skipped: dict[str, int] = {str(k): int(v) for k, v in (skipped or {}).items()}
        self.source: str = str(source)
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.heavy_atoms_only: bool = False
        self._validate_contents()
        self._set_type_table()
        if heavy_atoms_only:
            self._drop_hydrogens()

    # -- validation ---------------------------------------------------------------------------

    @staticmethod
    def _check_offsets(name: str, offsets: np.ndarray, total: int) -> None:
        if not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"{name} must be integers, got dtype {offsets.dtype}")
        if offsets[0] != 0:
            raise ValueError(f"{name} must start at 0, got {offsets[0]}")
        if np.any(np.diff(offsets) < 0):
            raise ValueError(f"{name} must be non-decreasing")
        if offsets[-1] != total:
            raise ValueError(f"{name} ends at {offsets[-1]} but there are {total} entries")

    def _molecules_of(self, mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """Source indices of the molecules owning the flat entries selected by ``mask``."""
        rows = np.searchsorted(offsets, np.nonzero(mask)[0], side="right") - 1
        return self.indices[np.unique(rows)]

    def _validate_contents(self) -> None:
        bad = ~np.isfinite(self._pos).all(axis=1)
        if bad.any():
            ids = self._molecules_of(bad, self._atom_offsets)
            raise ValueError(f"positions contain NaN or infinite values for {ids.size} molecule(s), "
                             f"indices {ids[:10].tolist()}")
        if self._z.size and (self._z.min() < 1 or self._z.max() > _MAX_Z):
            raise ValueError(f"atomic_numbers must lie in 1..{_MAX_Z}, got range "
                             f"[{self._z.min()}, {self._z.max()}]")
        if self._pairs.shape[0]:
            if self._orders.min() < 1 or self._orders.max() >= NUM_BOND_TYPES:
                raise ValueError(f"bond_orders must lie in 1..{NUM_BOND_TYPES - 1} "
                                 f"(1 single, 2 double, 3 triple, 4 aromatic), got range "
                                 f"[{self._orders.min()}, {self._orders.max()}]")
            counts = np.diff(self._atom_offsets)
            mol_of_bond = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self._bond_offsets))
            n_of_bond = counts[mol_of_bond]
            i, j = self._pairs[:, 0].astype(np.int64), self._pairs[:, 1].astype(np.int64)
            out = (i < 0) | (j < 0) | (i >= n_of_bond) | (j >= n_of_bond)
            if out.any():
                ids = self.indices[np.unique(mol_of_bond[out])]
                raise ValueError(f"bond_pairs refer to atoms outside their molecule (atom count mismatch "
                                 f"between graph and coordinates) for molecule(s) {ids[:10].tolist()}")
            if np.any(i == j):
                ids = self.indices[np.unique(mol_of_bond[i == j])]
                raise ValueError(f"self bonds (i == j) in molecule(s) {ids[:10].tolist()}")
            lo, hi = np.minimum(i, j), np.maximum(i, j)
            key = (mol_of_bond * (int(counts.max()) + 1) + lo) * (int(counts.max()) + 1) + hi
            uniq, first = np.unique(key, return_counts=True)
            if np.any(first > 1):
                dup = np.isin(key, uniq[first > 1])
                ids = self.indices[np.unique(mol_of_bond[dup])]
                raise ValueError(f"duplicate bonds in molecule(s) {ids[:10].tolist()}")
            # canonical orientation i < j
            self._pairs = np.stack([lo, hi], axis=1).astype(np.int32)
        self._orders = self._orders.astype(np.uint8)

    def _set_type_table(self) -> None:
        table = np.full(_MAX_Z + 1, -1, dtype=np.int64)
        table[list(self.elements)] = np.arange(len(self.elements))
        if self._z.size:
            present = np.unique(self._z)
            unknown = [int(z) for z in present if table[z] < 0]
            if unknown:
                names = ", ".join(element_label(z) for z in unknown)
                mol_of_atom = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self._atom_offsets))
                ids = self.indices[np.unique(mol_of_atom[np.isin(self._z, unknown)])]
                where = f" of {self.source}" if self.source else ""
                raise InputError(f"unknown element(s) {names} in molecule(s) {ids[:10].tolist()}{where}; "
                                 f"supported elements: {_element_list_text(self.elements)}")
        self._type_table = table

    def _drop_hydrogens(self) -> None:
        """Remove hydrogen atoms and every bond touching one (vectorised, in place)."""
        keep = self._z != 1
        counts = np.diff(self._atom_offsets)
        mol_of_atom = np.repeat(np.arange(len(self), dtype=np.int64), counts)
        new_counts = np.bincount(mol_of_atom[keep], minlength=len(self)).astype(np.int64)
        new_offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(new_counts, out=new_offsets[1:])
        new_global = np.cumsum(keep) - 1  # valid where keep
        mol_of_bond = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self._bond_offsets))
        gi = self._atom_offsets[mol_of_bond] + self._pairs[:, 0]
        gj = self._atom_offsets[mol_of_bond] + self._pairs[:, 1]
        bkeep = keep[gi] & keep[gj]
        new_pairs = np.stack([new_global[gi[bkeep]] - new_offsets[mol_of_bond[bkeep]],
                              new_global[gj[bkeep]] - new_offsets[mol_of_bond[bkeep]]], axis=1)
        new_bond_offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(np.bincount(mol_of_bond[bkeep], minlength=len(self)), out=new_bond_offsets[1:])
        self._pos = np.ascontiguousarray(self._pos[keep])
        self._z = self._z[keep]
        self._atom_offsets = new_offsets
        self._pairs = new_pairs.astype(np.int32)
        self._orders = self._orders[bkeep]
        self._bond_offsets = new_bond_offsets
        self.heavy_atoms_only = True

    # -- basic protocol -----------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._atom_offsets.size - 1)

    def _row(self, k: int) -> int:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(k).__name__}")
        n = len(self)
        k = int(k)
        if k < -n or k >= n:
            raise IndexError(f"molecule {k} out of range for a dataset of {n}")
        return k + n if k < 0 else k

    def get_numpy(self, k: int) -> dict[str, Any]:
        """Item ``k`` as numpy arrays (same keys and dtypes as :meth:`__getitem__`)."""
        k = self._row(k)
        a0, a1 = self._atom_offsets[k], self._atom_offsets[k + 1]
        b0, b1 = self._bond_offsets[k], self._bond_offsets[k + 1]
        n = int(a1 - a0)
        z = self._z[a0:a1].copy()
        bonds = np.zeros((n, n), dtype=np.int64)
        p = self._pairs[b0:b1]
        o = self._orders[b0:b1]
        bonds[p[:, 0], p[:, 1]] = o
        bonds[p[:, 1], p[:, 0]] = o
        return {
            "positions": self._pos[a0:a1].copy(),
            "atomic_numbers": z,
            "atom_types": self._type_table[z],
            "bond_types": bonds,
            "index": int(self.indices[k]),
            "smiles": self._smiles[k],
            "num_atoms": n,
        }

    def __getitem__(self, k: int) -> dict[str, Any]:
        item = self.get_numpy(k)
        for key in ("positions", "atomic_numbers", "atom_types", "bond_types"):
            item[key] = torch.from_numpy(item[key])
        return item

    def __repr__(self) -> str:
        return (f"MoleculeDataset(n={len(self)}, atoms={self._pos.shape[0]}, source={self.source!r}, "
                f"heavy_atoms_only={self.heavy_atoms_only}, elements={self.elements})")

    # -- vectorised views ---------------------------------------------------------------------

    @property
    def num_atoms(self) -> np.ndarray:
        """``(M,)`` int64 atom count per molecule."""
        return np.diff(self._atom_offsets)

    @property
    def num_bonds(self) -> np.ndarray:
        """``(M,)`` int64 bond count per molecule."""
        return np.diff(self._bond_offsets)

    @property
    def smiles(self) -> list[str]:
        """SMILES strings (a copy of the list)."""
        return list(self._smiles)

    @property
    def all_positions(self) -> np.ndarray:
        """``(A, 3)`` float32 concatenated coordinates (read-only view), Å."""
        v = self._pos.view()
        v.flags.writeable = False
        return v

    @property
    def all_atomic_numbers(self) -> np.ndarray:
        """``(A,)`` int64 concatenated atomic numbers (read-only view)."""
        v = self._z.view()
        v.flags.writeable = False
        return v

    @property
    def atom_offsets(self) -> np.ndarray:
        """``(M + 1,)`` int64 atom offsets (copy)."""
        return self._atom_offsets.copy()

    def bond_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat bond list ``(molecule_row (B,), pairs (B, 2) local, orders (B,))`` (copies)."""
        mol = np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self._bond_offsets))
        return mol, self._pairs.astype(np.int64), self._orders.astype(np.int64)

    def find(self, index: int) -> int:
        """Row of the molecule whose source identifier is ``index``.

        Raises:
            KeyError: no molecule has that identifier.
        """
        hits = np.nonzero(self.indices == int(index))[0]
        if hits.size == 0:
            raise KeyError(f"no molecule with index {index} in this dataset")
        return int(hits[0])

    # -- derived datasets ---------------------------------------------------------------------

    def _arrays(self) -> dict[str, Any]:
        return dict(
            positions=self._pos, atomic_numbers=self._z, atom_offsets=self._atom_offsets,
            bond_pairs=self._pairs, bond_orders=self._orders, bond_offsets=self._bond_offsets,
            indices=self.indices, smiles=self._smiles, split_labels=self.split_labels,
        )

    def _derived(self, **changes: Any) -> MoleculeDataset:
        kw = self._arrays()
        kw.update(elements=self.elements, heavy_atoms_only=False, skipped=self.skipped,
                  source=self.source, metadata=self.metadata)
        kw.update(changes)
        new = MoleculeDataset(**kw)
        new.heavy_atoms_only = new.heavy_atoms_only or self.heavy_atoms_only
        return new

    def subset(self, rows: Iterable[int] | np.ndarray) -> MoleculeDataset:
        """A new compact dataset with the molecules at ``rows`` (positions, in the given order)."""
        sel = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"boolean row mask must have shape ({len(self)},), got {sel.shape}")
            sel = np.nonzero(sel)[0]
        sel = sel.astype(np.int64).reshape(-1)
        if sel.size and (sel.min() < 0 or sel.max() >= len(self)):
            raise IndexError(f"subset rows must lie in 0..{len(self) - 1}")
        flat_a, new_a = _ragged_gather(self._atom_offsets, sel)
        flat_b, new_b = _ragged_gather(self._bond_offsets, sel)
        return self._derived(
            positions=self._pos[flat_a], atomic_numbers=self._z[flat_a], atom_offsets=new_a,
            bond_pairs=self._pairs[flat_b], bond_orders=self._orders[flat_b], bond_offsets=new_b,
            indices=self.indices[sel], smiles=[self._smiles[i] for i in sel],
            split_labels=self.split_labels[sel],
        )

    def split(self, name: str) -> MoleculeDataset:
        """The ``"train"``, ``"valid"`` or ``"test"`` part (a new dataset).

        Raises:
            ValueError: unknown split name, or the dataset has no split labels (user data).
        """
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; choose one of {list(SPLIT_NAMES)}")
        if np.all(self.split_labels < 0):
            raise ValueError(f"dataset {self.source!r} has no train/valid/test split labels; "
                             f"use subset() to split it yourself")
        return self.subset(np.nonzero(self.split_labels == SPLIT_NAMES.index(name))[0])

    def without_hydrogens(self) -> MoleculeDataset:
        """A copy with hydrogens and their bonds removed (``heavy_atoms_only=True``)."""
        return self._derived(heavy_atoms_only=True)

    def with_elements(self, elements: Sequence[int]) -> MoleculeDataset:
        """A copy whose ``atom_types`` index into a different element list."""
        return self._derived(elements=elements)

    # -- persistence --------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Pickle-free arrays describing the dataset (the ``.npz`` layout of :meth:`save`)."""
        enc = [s.encode("utf-8") for s in self._smiles]
        s_off = np.zeros(len(enc) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in enc], out=s_off[1:])
        meta = {"skipped": self.skipped, "source": self.source, "metadata": self.metadata}
        return {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "positions": self._pos,
            "atomic_numbers": self._z.astype(np.uint8),
            "atom_offsets": self._atom_offsets,
            "bond_pairs": self._pairs.astype(np.uint8 if self._pairs.size == 0 or self._pairs.max() < 256 else np.int32),
            "bond_orders": self._orders.astype(np.uint8),
            "bond_offsets": self._bond_offsets,
            "indices": self.indices,
            "smiles_bytes": np.frombuffer(b"".join(enc), dtype=np.uint8),
            "smiles_offsets": s_off,
            "split_labels": self.split_labels,
            "elements": np.asarray(self.elements, dtype=np.int64),
            "heavy_atoms_only": np.array(self.heavy_atoms_only),
            "meta_json": np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8),
        }

    def save(self, path: str | os.PathLike, compressed: bool = True) -> None:
        """Write the dataset to ``path`` (``.npz``, no pickles) atomically."""
        atomic_savez(path, self.to_arrays(), compressed=compressed)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], *, elements: Sequence[int] | None = None,
                    heavy_atoms_only: bool = False, origin: str = "arrays") -> MoleculeDataset:
        """Inverse of :meth:`to_arrays`.

        Args:
            arrays: mapping with the keys written by :meth:`to_arrays`.
            elements: element list for ``atom_types``; None keeps the stored one.
            heavy_atoms_only: additionally drop hydrogens (stored heavy-only data stay heavy-only).
            origin: name used in error messages (e.g. the file path).

        Raises:
            InputError: missing keys, unsupported format version or inconsistent content (the
                message starts with ``origin``).
        """
        required = ("format_version", "positions", "atomic_numbers", "atom_offsets", "bond_pairs",
                    "bond_orders", "bond_offsets", "indices", "smiles_bytes", "smiles_offsets",
                    "split_labels", "elements", "heavy_atoms_only", "meta_json")
        missing = [k for k in required if k not in arrays]
        if missing:
            raise InputError(f"{origin}: not a qmanifold molecule file, missing field(s) {missing}")
        try:
            version = int(np.asarray(arrays["format_version"]))
        except (TypeError, ValueError) as exc:
            raise InputError(f"{origin}: malformed format_version") from exc
        if version != FORMAT_VERSION:
            raise InputError(f"{origin}: unsupported format_version {version} (expected {FORMAT_VERSION})")
        raw = np.asarray(arrays["smiles_bytes"], dtype=np.uint8).tobytes()
        s_off = np.asarray(arrays["smiles_offsets"], dtype=np.int64)
        if s_off.ndim != 1 or s_off.size < 1 or s_off[-1] != len(raw) or np.any(np.diff(s_off) < 0):
            raise InputError(f"{origin}: malformed smiles_offsets")
        try:
            smiles = [raw[s_off[i]:s_off[i + 1]].decode("utf-8") for i in range(s_off.size - 1)]
            meta = json.loads(np.asarray(arrays["meta_json"], dtype=np.uint8).tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{origin}: malformed smiles_bytes or meta_json ({exc})") from exc
        stored_elements = tuple(int(z) for z in np.asarray(arrays["elements"]).tolist())
        try:
            ds = cls(
                positions=arrays["positions"], atomic_numbers=np.asarray(arrays["atomic_numbers"]).astype(np.int64),
                atom_offsets=arrays["atom_offsets"], bond_pairs=np.asarray(arrays["bond_pairs"]).astype(np.int32),
                bond_orders=arrays["bond_orders"], bond_offsets=arrays["bond_offsets"],
                indices=arrays["indices"], smiles=smiles, split_labels=arrays["split_labels"],
                elements=stored_elements if elements is None else elements,
                heavy_atoms_only=heavy_atoms_only, skipped=meta.get("skipped"),
                source=meta.get("source", ""), metadata=meta.get("metadata"),
            )
        except (TypeError, ValueError) as exc:  # content the constructor rejects: name the file
            raise InputError(f"{origin}: {exc}") from exc
        if bool(np.asarray(arrays["heavy_atoms_only"])):
            ds.heavy_atoms_only = True
        return ds

    @classmethod
    def load(cls, path: str | os.PathLike, *, elements: Sequence[int] | None = None,
             heavy_atoms_only: bool = False) -> MoleculeDataset:
        """Read a file written by :meth:`save` (pure numpy; no RDKit needed).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            InputError: the file is not a valid ``.npz`` (:func:`read_npz`) or not a valid
                qmanifold molecule file (the message names the file).
        """
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"molecule file not found: {path}")
        arrays = read_npz(path)
        return cls.from_arrays(arrays, elements=elements, heavy_atoms_only=heavy_atoms_only, origin=path)

    @classmethod
    def from_molecules(
        cls,
        molecules: Iterable[Mapping[str, Any]],
        *,
        elements: Sequence[int] = ELEMENTS,
        heavy_atoms_only: bool = False,
        skipped: Mapping[str, int] | None = None,
        source: str = "",
        metadata: Mapping[str, Any] | None = None,
    ) -> MoleculeDataset:
        """Build a dataset from per-molecule dicts.

        Each dict needs ``positions`` ``(N, 3)`` Å and ``atomic_numbers`` ``(N,)``, and either
        ``bond_types`` ``(N, N)`` or ``bond_pairs`` ``(B, 2)`` + ``bond_orders`` ``(B,)``; optional
        ``index`` (default: running number), ``smiles`` (default ""), ``split_label`` (default -1).
        """
        pos, zs, pairs, orders, n_atoms, n_bonds, idx, smi, lab = [], [], [], [], [], [], [], [], []
        for k, mol in enumerate(molecules):
            p = np.asarray(mol["positions"], dtype=np.float64)
            z = np.asarray(mol["atomic_numbers"])
            if p.ndim != 2 or p.shape[1] != 3:
                raise ValueError(f"molecule {k}: positions must have shape (N, 3), got {p.shape}")
            if z.shape != (p.shape[0],):
                raise ValueError(f"molecule {k}: atomic_numbers shape {z.shape} does not match "
                                 f"{p.shape[0]} atoms in positions")
            if "bond_types" in mol:
                bt = np.asarray(mol["bond_types"])
                if bt.shape != (p.shape[0], p.shape[0]):
                    raise ValueError(f"molecule {k}: bond_types shape {bt.shape} does not match "
                                     f"{p.shape[0]} atoms in positions")
                pr, od = bonds_to_pairs(bt)
            else:
                pr = np.asarray(mol.get("bond_pairs", np.zeros((0, 2))), dtype=np.int64).reshape(-1, 2)
                od = np.asarray(mol.get("bond_orders", np.ones(len(pr))), dtype=np.int64).reshape(-1)
            pos.append(p)
            zs.append(z.astype(np.int64))
            pairs.append(pr.astype(np.int64))
            orders.append(od.astype(np.int64))
            n_atoms.append(p.shape[0])
            n_bonds.append(pr.shape[0])
            idx.append(int(mol.get("index", k)))
            smi.append(str(mol.get("smiles", "")))
            lab.append(int(mol.get("split_label", -1)))
        a_off = np.zeros(len(n_atoms) + 1, dtype=np.int64)
        np.cumsum(n_atoms, out=a_off[1:])
        b_off = np.zeros(len(n_bonds) + 1, dtype=np.int64)
        np.cumsum(n_bonds, out=b_off[1:])
        return cls(
            positions=np.concatenate(pos) if pos else np.zeros((0, 3)),
            atomic_numbers=np.concatenate(zs) if zs else np.zeros(0, dtype=np.int64),
            atom_offsets=a_off,
            bond_pairs=np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64),
            bond_orders=np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64),
            bond_offsets=b_off, indices=np.asarray(idx, dtype=np.int64), smiles=smi,
            split_labels=np.asarray(lab, dtype=np.int8), elements=elements,
            heavy_atoms_only=heavy_atoms_only, skipped=skipped, source=source, metadata=metadata,
        )

    def summary(self) -> str:
        """One-paragraph human-readable description (counts, sizes, skipped records)."""
        n = self.num_atoms
        parts = [f"{len(self)} molecules from {self.source or 'unknown source'}"]
        if len(self):
            parts.append(f"{int(n.sum())} atoms (per molecule min {int(n.min())}, "
                         f"mean {float(n.mean()):.2f}, max {int(n.max())})")
        if np.any(self.split_labels >= 0):
            sizes = {s: int(np.sum(self.split_labels == i)) for i, s in enumerate(SPLIT_NAMES)}
            parts.append("split " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
        total_skipped = sum(self.skipped.values())
        if total_skipped:
            parts.append(f"skipped {total_skipped} (" + ", ".join(
                f"{k}: {v}" for k, v in sorted(self.skipped.items())) + ")")
        else:
            parts.append("skipped 0")
        if self.heavy_atoms_only:
            parts.append("hydrogens removed")
        return "; ".join(parts)
