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

Nothing here imports RDKit at module import time; only :func:`load_sdf`, :func:`perceive_bonds` and
the bond-order resolution of :func:`load_npz_ensemble` (:func:`resolve_bond_orders`) need it. The
QM9 loaders (:mod:`qmanifold.models.data.qm9`) are imported only when :func:`load_dataset` is asked for QM9, so neither module imports the other
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
    "resolve_bond_orders",
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
# Bond orders and formal charges of one molecule (RDKit)
# ----------------------------------------------------------------------------------------------

_BOND_TYPE_NAMES = {BOND_SINGLE: "SINGLE", BOND_DOUBLE: "DOUBLE", BOND_TRIPLE: "TRIPLE", BOND_AROMATIC: "AROMATIC"}


def _formula(z: Sequence[int]) -> str:
    """Hill-style formula text of atomic numbers (for messages)."""
    counts: dict[str, int] = {}
    for v in z:
        sym = element_symbol(int(v))
        counts[sym] = counts.get(sym, 0) + 1
    order = [k for k in ("C", "H") if k in counts] + sorted(k for k in counts if k not in ("C", "H"))
    return "".join(f"{k}{counts[k] if counts[k] > 1 else ''}" for k in order)


def _graph_mol(z: np.ndarray, bond_types: np.ndarray, explicit_h: bool, use_orders: bool):
    """Unsanitised RDKit molecule of a bond matrix; atom ``k`` is atom ``k`` of the input.

    ``use_orders=False`` makes every bond single (connectivity only). With ``explicit_h`` every atom
    is flagged ``NoImplicit`` (all hydrogens are atoms of the input), else RDKit may add implicit H.
    """
    from rdkit import Chem

    rw = Chem.RWMol()
    for v in z:
        a = Chem.Atom(int(v))
        a.SetNoImplicit(bool(explicit_h))
        rw.AddAtom(a)
    ii, jj = np.nonzero(np.triu(bond_types, 1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        code = int(bond_types[i, j]) if use_orders else BOND_SINGLE
        rw.AddBond(i, j, getattr(Chem.BondType, _BOND_TYPE_NAMES[code]))
        if code == BOND_AROMATIC:
            rw.GetBondBetweenAtoms(i, j).SetIsAromatic(True)
            rw.GetAtomWithIdx(i).SetIsAromatic(True)
            rw.GetAtomWithIdx(j).SetIsAromatic(True)
    return rw.GetMol()


def _sanitize_error(mol) -> str | None:
    """None if RDKit sanitises ``mol`` (in place), else RDKit's message."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        Chem.SanitizeMol(mol)
    except Exception as exc:  # noqa: BLE001 - RDKit's sanitisation errors have no common base
        return str(exc).strip() or type(exc).__name__
    finally:
        RDLogger.EnableLog("rdApp.*")
    return None


def _perceive_orders(z: np.ndarray, conn: np.ndarray, positions: np.ndarray, charge: int, origin: str):
    """Bond orders and formal charges of the connectivity ``conn`` from one geometry with RDKit's
    ``rdDetermineBonds.DetermineBondOrders(mol, charge=charge)`` (xyz2mol); InputError if it fails."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    mol = _graph_mol(z, conn, explicit_h=True, use_orders=False)
    conf = Chem.Conformer(len(z))
    for k, p in enumerate(np.asarray(positions, dtype=np.float64)):
        conf.SetAtomPosition(k, Point3D(float(p[0]), float(p[1]), float(p[2])))
    conf.Set3D(True)
    mol.AddConformer(conf, assignId=True)
    advice = ("give the bond orders ('bond_orders' with 'bonds' as (M, 2) pairs, or 'bonds' as (M, 3) "
              "rows) or a 'smiles' template, and 'charge' if the molecule is charged")
    RDLogger.DisableLog("rdApp.*")
    try:
        rdDetermineBonds.DetermineBondOrders(mol, charge=int(charge), embedChiral=False)
    except Exception as exc:  # noqa: BLE001 - RDKit raises ValueError / RuntimeError variants
        raise InputError(f"{origin}: bond-order perception failed on frame 0 (RDKit DetermineBondOrders, "
                         f"total charge {int(charge)}): {str(exc).strip()}. Bond orders and charges are "
                         f"never guessed; {advice}") from None
    finally:
        RDLogger.EnableLog("rdApp.*")
    radicals = [a.GetIdx() for a in mol.GetAtoms() if a.GetNumRadicalElectrons()]
    if radicals:
        raise InputError(f"{origin}: bond-order perception on frame 0 (RDKit DetermineBondOrders, total "
                         f"charge {int(charge)}) left unpaired electrons on atom(s) {radicals[:10]}; {advice}")
    err = _sanitize_error(mol)
    if err is not None:
        raise InputError(f"{origin}: RDKit cannot sanitise the perceived molecule ({err}); {advice}")
    return mol


def _match_smiles(smiles: str, z: np.ndarray, conn: np.ndarray, explicit_h: bool, origin: str):
    """The molecule of ``smiles`` (with hydrogens as atoms when ``explicit_h``) and the map from its
    atoms to the input's: ``(template, match)`` with ``match[k]`` = input atom of template atom ``k``.

    Raises:
        InputError: unparseable SMILES, different elements/atom count, or a bond graph that differs
            from ``conn``.
    """
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    try:
        tmpl = Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if tmpl is None:
        raise InputError(f"{origin}: field 'smiles' {smiles!r} cannot be parsed/sanitised by RDKit")
    if explicit_h:
        tmpl = Chem.AddHs(tmpl)
    tz = [a.GetAtomicNum() for a in tmpl.GetAtoms()]
    if sorted(tz) != sorted(int(v) for v in z):
        hint = "" if explicit_h else " (the file has no hydrogens, so the SMILES is read with implicit ones)"
        raise InputError(f"{origin}: field 'smiles' {smiles!r} does not match the atoms: the SMILES has "
                         f"{_formula(tz)} ({len(tz)} atoms), the file {_formula(z)} ({len(z)} atoms){hint}")
    n_bonds = int(np.count_nonzero(np.triu(conn, 1)))
    query = Chem.RWMol(tmpl)
    for a in query.GetAtoms():
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
        a.SetNumRadicalElectrons(0)
        a.SetIsotope(0)
    for b in query.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    target = _graph_mol(z, conn, explicit_h=explicit_h, use_orders=False)
    target.UpdatePropertyCache(strict=False)
    query = query.GetMol()
    query.UpdatePropertyCache(strict=False)
    match = target.GetSubstructMatch(query) if tmpl.GetNumBonds() == n_bonds else ()
    if len(match) != len(z):
        raise InputError(f"{origin}: field 'smiles' {smiles!r} does not match the connectivity of the file "
                         f"({tmpl.GetNumBonds()} bonds in the SMILES, {n_bonds} in the file, and no "
                         f"atom-to-atom match of the two bond graphs)")
    return tmpl, match


def resolve_bond_orders(
    positions: np.ndarray,
    atomic_numbers: np.ndarray,
    bond_types: np.ndarray | None = None,
    *,
    explicit_orders: bool = False,
    smiles: str = "",
    charge: int | None = None,
    formal_charges: np.ndarray | None = None,
    origin: str = "molecule",
) -> dict[str, Any]:
    """Bond orders, formal charges and a SMILES of one molecule given as coordinates (RDKit).

    The bond orders come from, in this order of precedence:

    1. ``explicit_orders``: the codes of ``bond_types`` as given (``"explicit"``);
    2. a ``smiles`` template, matched onto the connectivity atom by atom (RDKit
       ``AllChem.AssignBondOrdersFromTemplate``; ``"smiles"``);
    3. perception from ``positions`` (RDKit ``rdDetermineBonds.DetermineBondOrders(mol, charge)``,
       the xyz2mol algorithm; ``"perceived"``), which needs every hydrogen as an atom.

    The connectivity is ``bond_types > 0`` or, when ``bond_types`` is None, perceived from
    ``positions`` (:func:`perceive_bonds`). Formal charges are never guessed: they come from
    ``formal_charges``, else the SMILES, else the perception (which places them consistently with
    ``charge``). With explicit orders and neither, all atoms are neutral if RDKit accepts the
    valences so; otherwise the perceived charges are taken if they make the explicit orders valid,
    and an :class:`~qmanifold.errors.InputError` is raised if not. A file without hydrogen atoms is
    read with implicit hydrogens (heavy-atom-only data); its orders must then be explicit or come
    from a SMILES. Aromaticity follows RDKit's model after sanitisation (aromatic bonds -> code 4),
    as for QM9.

    Args:
        positions: ``(N, 3)`` coordinates of one frame, Å.
        atomic_numbers: ``(N,)``.
        bond_types: ``(N, N)`` bond codes (0 none, 1..4), or None to perceive the connectivity.
        explicit_orders: the codes of ``bond_types`` are bond orders given by the user (not
            connectivity only).
        smiles: optional SMILES of the molecule ("" = none).
        charge: total charge; None = not given (0 for the perception, the SMILES's or
            ``formal_charges``' sum otherwise). When given it must equal the sum of the formal charges.
        formal_charges: optional ``(N,)`` integer formal charges.
        origin: name used in error messages (the file).

    Returns:
        A dict: ``bond_types`` ``(N, N)`` int64 (connectivity unchanged, orders resolved),
        ``formal_charges`` ``(N,)`` int64, ``charge`` (int), ``smiles`` (the given SMILES if it
        describes the resolved molecule -- same graph, orders and charges -- else RDKit's canonical
        SMILES, hydrogens implicit, stereo from ``positions``), ``bond_orders``
        (``"explicit"``/``"smiles"``/``"perceived"``), ``charges`` (where the formal charges came
        from) and ``description`` (one human-readable line).

    Raises:
        InputError: perception failed (the message says so and asks for ``bond_orders`` or
            ``smiles``), a SMILES that does not match the atoms or connectivity, charges that
            contradict ``charge`` or the bond orders, or a file without hydrogens and no orders.
        ImportError: RDKit is not installed.
    """
    Chem = _require_rdkit("bond-order resolution")
    from rdkit.Chem import AllChem
    from rdkit.Geometry import Point3D

    z = np.asarray(atomic_numbers, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64)
    n = z.shape[0]
    explicit_h = bool(np.any(z == 1))
    if bond_types is None:
        pairs = perceive_bonds(pos, z)
        conn = np.zeros((n, n), dtype=np.int64)
        conn[pairs[:, 0], pairs[:, 1]] = conn[pairs[:, 1], pairs[:, 0]] = BOND_SINGLE
        conn_text = "connectivity perceived from frame 0 (RDKit DetermineConnectivity)"
        if explicit_orders:
            raise ValueError("explicit_orders needs bond_types")
    else:
        conn = np.asarray(bond_types, dtype=np.int64)
        conn_text = "connectivity from the file's 'bonds'"
    fc = None
    if formal_charges is not None:
        fc = np.asarray(formal_charges)
        if fc.shape != (n,) or fc.dtype.kind not in "iuf" or not np.all(np.isfinite(fc)) \
                or np.any(fc != np.round(fc)) or np.any(np.abs(fc) > 8):
            raise InputError(f"{origin}: field 'formal_charges' must hold ({n},) integers (one per atom, "
                             f"|q| <= 8), got dtype {fc.dtype} shape {fc.shape}")
        fc = fc.astype(np.int64)
    if charge is not None:
        c = np.asarray(charge)
        cv = float(c.reshape(-1)[0]) if c.size == 1 and c.dtype.kind in "iuf" else float("nan")
        if not np.isfinite(cv) or cv != round(cv):
            raise InputError(f"{origin}: field 'charge' must be one integer (the total charge), got {charge!r}")
        charge = round(cv)
    if fc is not None and charge is not None and int(fc.sum()) != charge:
        raise InputError(f"{origin}: the formal charges sum to {int(fc.sum())} but 'charge' is {charge}")

    def set_charges(mol, q) -> None:
        for k, a in enumerate(mol.GetAtoms()):
            a.SetFormalCharge(int(q[k]))

    if explicit_orders:
        mol = _graph_mol(z, conn, explicit_h=explicit_h, use_orders=True)
        source = "explicit"
        orders_text = "bond orders from the file"
        if fc is not None:
            set_charges(mol, fc)
            charges_text = "file 'formal_charges'"
        elif smiles:
            tmpl, match = _match_smiles(smiles, z, conn, explicit_h, origin)
            q = np.zeros(n, dtype=np.int64)
            for k, t in enumerate(match):
                q[t] = tmpl.GetAtomWithIdx(k).GetFormalCharge()
            set_charges(mol, q)
            charges_text = "the SMILES"
        else:
            charges_text = "none (every atom neutral)"
        err = _sanitize_error(mol)
        if err is not None and fc is None and not smiles and explicit_h:
            # the orders imply charged atoms: take RDKit's perceived charges if they fit these orders
            try:
                perceived = _perceive_orders(z, conn, pos, 0 if charge is None else charge, origin)
            except InputError:
                perceived = None
            if perceived is not None:
                q = np.array([a.GetFormalCharge() for a in perceived.GetAtoms()], dtype=np.int64)
                trial = _graph_mol(z, conn, explicit_h=explicit_h, use_orders=True)
                set_charges(trial, q)
                if _sanitize_error(trial) is None:
                    mol, err = trial, None
                    charges_text = "perceived from frame 0 (RDKit DetermineBondOrders; they fit the file's orders)"
        if err is not None:
            raise InputError(f"{origin}: the file's bond orders with formal charges from {charges_text} are "
                             f"not a valid molecule for RDKit ({err}); formal charges are never guessed: give "
                             f"'formal_charges' ((N,) integers) or a 'smiles' with the charges")
    elif smiles:
        tmpl, _ = _match_smiles(smiles, z, conn, explicit_h, origin)
        target = _graph_mol(z, conn, explicit_h=explicit_h, use_orders=False)
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")
        try:
            mol = AllChem.AssignBondOrdersFromTemplate(tmpl, target)
        except Exception as exc:  # noqa: BLE001 - ValueError("No matching found") or a sanitisation error
            raise InputError(f"{origin}: RDKit cannot assign the bond orders of field 'smiles' {smiles!r} to "
                             f"the file's connectivity ({str(exc).strip()})") from None
        finally:
            RDLogger.EnableLog("rdApp.*")
        mol = Chem.Mol(mol)
        err = _sanitize_error(mol)
        if err is not None:
            raise InputError(f"{origin}: the bond orders of field 'smiles' {smiles!r} on the file's connectivity "
                             f"are not a valid molecule for RDKit ({err})")
        source = "smiles"
        orders_text = "bond orders from the SMILES template (RDKit AssignBondOrdersFromTemplate)"
        charges_text = "the SMILES"
        if fc is not None:
            set_charges(mol, fc)
            charges_text = "file 'formal_charges'"
            err = _sanitize_error(mol)
            if err is not None:
                raise InputError(f"{origin}: the file's 'formal_charges' contradict the bond orders of the "
                                 f"SMILES {smiles!r} ({err})")
    else:
        if not explicit_h:
            raise InputError(f"{origin}: the file has no hydrogen atoms, so bond orders cannot be perceived "
                             f"from the geometry (RDKit DetermineBondOrders needs every hydrogen); for "
                             f"heavy-atom-only data give 'bond_orders' (with 'bonds' as (M, 2) pairs), 'bonds' "
                             f"as (M, 3) rows or an (N, N) matrix with the orders, or a 'smiles'")
        q_total = charge if charge is not None else (int(fc.sum()) if fc is not None else 0)
        mol = _perceive_orders(z, conn, pos, q_total, origin)
        source = "perceived"
        orders_text = f"bond orders perceived from frame 0 (RDKit DetermineBondOrders, total charge {q_total})"
        charges_text = "the perception"
        if fc is not None:
            got = np.array([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=np.int64)
            if not np.array_equal(got, fc):
                bad = np.nonzero(got != fc)[0]
                raise InputError(f"{origin}: the bond orders perceived from frame 0 put formal charges "
                                 f"{got[bad][:10].tolist()} on atom(s) {bad[:10].tolist()}, but 'formal_charges' "
                                 f"says {fc[bad][:10].tolist()}; give 'bond_orders' or a 'smiles' to fix the "
                                 f"bond orders")
            charges_text = "file 'formal_charges' (the perception agrees)"

    q = np.array([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=np.int64)
    total = int(q.sum())
    if charge is not None and total != charge:
        raise InputError(f"{origin}: the formal charges (from {charges_text}) sum to {total} but 'charge' is "
                         f"{charge}")
    out_codes = np.zeros((n, n), dtype=np.int64)
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        out_codes[i, j] = out_codes[j, i] = _rdkit_bond_code(b)
    if not np.array_equal(out_codes > 0, conn > 0) or np.any(out_codes[conn > 0] == 0):
        raise InputError(f"{origin}: bond-order resolution changed the connectivity or produced an unsupported "
                         f"bond type (internal check)")
    # the SMILES stored with the data: the user's if it is this molecule, else the canonical one
    stereo_mol = Chem.Mol(mol)
    conf = Chem.Conformer(n)
    for k, p in enumerate(pos):
        conf.SetAtomPosition(k, Point3D(float(p[0]), float(p[1]), float(p[2])))
    conf.Set3D(True)
    stereo_mol.RemoveAllConformers()
    stereo_mol.AddConformer(conf, assignId=True)
    Chem.AssignStereochemistryFrom3D(stereo_mol)
    canonical = Chem.MolToSmiles(Chem.RemoveHs(stereo_mol))
    out_smiles = canonical
    if smiles:
        ref = Chem.MolFromSmiles(smiles)
        flat = Chem.MolToSmiles(Chem.RemoveHs(mol), isomericSmiles=False)
        if ref is not None and Chem.MolToSmiles(ref, isomericSmiles=False) == flat:
            out_smiles = smiles
    description = f"{conn_text}; {orders_text}; formal charges from {charges_text}; total charge {total}"
    return {"bond_types": out_codes, "formal_charges": q, "charge": total, "smiles": out_smiles,
            "bond_orders": source, "charges": charges_text, "description": description}


# ----------------------------------------------------------------------------------------------
# User data: .npz conformer ensembles
# ----------------------------------------------------------------------------------------------


def _bond_order_codes(values: np.ndarray, origin: str, field: str) -> np.ndarray:
    """Bond codes 1..4 from user orders (1, 2, 3, 4 or 1.5 = aromatic); InputError otherwise."""
    order = np.asarray(values, dtype=np.float64).copy()
    if not np.all(np.isfinite(order)):
        raise InputError(f"{origin}: field {field!r} contains NaN or infinite bond orders")
    order[order == 1.5] = BOND_AROMATIC
    if np.any((order != np.round(order)) | (order < 1) | (order > BOND_AROMATIC)):
        raise InputError(f"{origin}: field {field!r} orders must be 1, 2, 3, 4 (aromatic) or 1.5 "
                         f"(aromatic), got {sorted(set(np.asarray(values, dtype=np.float64).tolist()))}")
    return order.astype(np.int64)


def _bonds_from_field(bonds: np.ndarray, n: int, origin: str,
                      bond_orders: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Dense ``(N, N)`` bond matrix from the ``bonds`` (and ``bond_orders``) fields of an ensemble file.

    Accepted layouts: ``(N, N)`` symmetric matrix with a zero diagonal (entries 0..4);
    ``(M, 2)`` integer pairs, with their orders in ``bond_orders`` ``(M,)`` or else connectivity
    only (coded single); ``(M, 3)`` rows ``(i, j, order)`` with order in 1, 2, 3, 4 (or 1.5 for
    aromatic). A square array that is symmetric with a zero diagonal is read as a matrix, which is
    unambiguous because a ``(3, 3)`` pair list of that form would contain a bond of order 0.

    Returns:
        ``(matrix, explicit)``: the ``(N, N)`` int64 codes and whether they carry bond orders given
        by the user (``(M, 3)`` rows, ``bond_orders``, or a matrix with a code > 1) rather than
        connectivity only.
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
        if bond_orders is not None:
            raise InputError(f"{origin}: field 'bond_orders' goes with 'bonds' as (M, 2) pairs; here "
                             f"'bonds' is an ({n}, {n}) matrix that already holds the orders")
        mat = bf.astype(np.int64)
        return mat, bool(np.any(mat > BOND_SINGLE))
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
        if bond_orders is not None:
            raise InputError(f"{origin}: field 'bond_orders' goes with 'bonds' as (M, 2) pairs; here "
                             f"'bonds' has (i, j, order) rows that already hold the orders")
        order = _bond_order_codes(bf[:, 2], origin, "bonds")
        explicit = True
    elif bond_orders is not None:
        bo = np.asarray(bond_orders)
        if bo.dtype.kind not in "iuf" or bo.ndim != 1 or bo.shape[0] != len(ij):
            raise InputError(f"{origin}: field 'bond_orders' must be a numeric ({len(ij)},) array, one "
                             f"order per row of 'bonds'; got dtype {bo.dtype} shape {bo.shape}")
        order = _bond_order_codes(bo, origin, "bond_orders")
        explicit = True
    else:
        order = np.ones(len(ij), dtype=np.int64)
        explicit = False
    mat = np.zeros((n, n), dtype=np.int64)
    lo, hi = np.minimum(ij[:, 0], ij[:, 1]), np.maximum(ij[:, 0], ij[:, 1])
    if len(np.unique(lo * n + hi)) != len(lo):
        raise InputError(f"{origin}: field 'bonds' lists the same atom pair twice")
    mat[lo, hi] = order
    mat[hi, lo] = order
    return mat, explicit


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
    * ``bonds`` (optional): ``(M, 2)`` int pairs (connectivity), ``(M, 3)`` rows
      ``(i, j, order)`` or an ``(N, N)`` symmetric matrix (bond codes as in
      :mod:`qmanifold.models.data.dataset`). Absent: connectivity is perceived from the first frame
      with RDKit (:func:`perceive_bonds`);
    * ``bond_orders`` (optional): ``(M,)`` orders 1, 2, 3, 4 (aromatic; 1.5 also accepted) of the
      ``(M, 2)`` pairs of ``bonds``;
    * ``smiles`` (optional): the molecule's SMILES, a template for the bond orders;
    * ``charge`` (optional): total charge, an integer (default 0 for the perception);
    * ``formal_charges`` (optional): ``(N,)`` integer formal charges.

    Bond orders and formal charges are resolved once, on the first frame of the full molecule
    (before any hydrogen removal), by :func:`resolve_bond_orders`: explicit orders (``(M, 3)``
    rows, ``bond_orders``, or a matrix with a code > 1) > the ``smiles`` template > perception
    from frame 0 (RDKit ``DetermineBondOrders`` with ``charge``). Charges are never guessed.
    Which source was used is recorded in ``metadata["bonds"]`` (a sentence) and
    ``metadata["bond_orders"]`` (``"explicit"``, ``"smiles"`` or ``"perceived"``), with
    ``metadata["charges"]``, ``metadata["charge"]`` and ``metadata["formal_charges"]``. Every
    frame's ``smiles`` is the given SMILES if it describes the resolved molecule, else RDKit's
    canonical SMILES of it (hydrogens implicit, stereo of frame 0; the given one is kept in
    ``metadata["smiles_input"]``), so the SDF writer (:func:`qmanifold.models.sampling.template_mol`)
    takes the formal charges from it. Bond codes follow RDKit's aromaticity model (aromatic
    bonds -> 4), as for QM9.

    Args:
        path: the ``.npz`` file.
        elements: supported atomic numbers (``atom_types`` index into them).
        heavy_atoms_only: drop hydrogens (after the bond orders are resolved with them).

    Returns:
        A :class:`MoleculeDataset` with ``F`` items, one per frame, ``index`` = frame number,
        no split labels.

    Raises:
        FileNotFoundError: the file does not exist.
        InputError: not a valid ``.npz`` (:func:`~qmanifold.models.data.dataset.read_npz`), a
            missing or malformed field (named in the message),
            NaN/infinite coordinates, atom count mismatch, an element not in ``elements``, bond
            orders that cannot be perceived (the message asks for ``bond_orders`` or ``smiles``),
            a SMILES that does not match the atoms/connectivity, or inconsistent charges.
        ImportError: RDKit is not installed and the bond orders are not all explicit.
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
    if "bond_orders" in data and "bonds" not in data:
        raise InputError(f"{path}: field 'bond_orders' needs 'bonds' as (M, 2) atom pairs (one order per pair)")
    bonds, explicit = None, False
    if "bonds" in data:
        bonds, explicit = _bonds_from_field(data["bonds"], n, f"{path}", data.get("bond_orders"))
    smiles = ""
    if "smiles" in data:
        s = np.asarray(data["smiles"])
        if s.ndim != 0 or s.dtype.kind not in "US":
            raise InputError(f"{path}: field 'smiles' must be a single string, got dtype {s.dtype} shape {s.shape}")
        smiles = str(s.item().decode() if isinstance(s.item(), bytes) else s.item()).strip()
    metadata: dict[str, Any] = {"kind": "npz-ensemble"}
    try:
        _require_rdkit("bond-order resolution")
        have_rdkit = True
    except ImportError:
        if not explicit:
            raise
        have_rdkit = False
    if have_rdkit:
        res = resolve_bond_orders(pos[0], z, bonds, explicit_orders=explicit, smiles=smiles,
                                  charge=data.get("charge"), formal_charges=data.get("formal_charges"),
                                  origin=path)
        bonds = res["bond_types"]
        if smiles and res["smiles"] != smiles:
            metadata["smiles_input"] = smiles
        smiles = res["smiles"]
        metadata.update(bonds=res["description"], bond_orders=res["bond_orders"], charges=res["charges"],
                        charge=res["charge"], formal_charges=res["formal_charges"].tolist())
    else:  # explicit orders without RDKit: used as given; charges and SMILES cannot be resolved
        metadata.update(bonds="connectivity and bond orders from the file's 'bonds' (formal charges not "
                              "resolved: RDKit is not installed)", bond_orders="explicit")
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
        source=path, metadata=metadata,
    )


def save_npz_ensemble(
    path: str | os.PathLike,
    positions: np.ndarray,
    atomic_numbers: np.ndarray,
    bonds: np.ndarray | None = None,
    smiles: str | None = None,
    *,
    bond_orders: np.ndarray | None = None,
    charge: int | None = None,
    formal_charges: np.ndarray | None = None,
) -> None:
    """Write an ensemble file readable by :func:`load_npz_ensemble` (atomically).

    Args:
        path: destination ``.npz``.
        positions: ``(F, N, 3)`` coordinates, Å.
        atomic_numbers: ``(N,)``.
        bonds: optional ``(M, 2)``, ``(M, 3)`` or ``(N, N)`` bond description.
        smiles: optional SMILES string.
        bond_orders: optional ``(M,)`` orders of ``(M, 2)`` ``bonds`` (1, 2, 3, 4 = aromatic).
        charge: optional total charge (int).
        formal_charges: optional ``(N,)`` integer formal charges.

    Raises:
        ValueError: ``bond_orders`` without ``bonds``.
    """
    arrays = {"positions": np.asarray(positions, dtype=np.float32),
              "atomic_numbers": np.asarray(atomic_numbers, dtype=np.int64)}
    if bonds is not None:
        arrays["bonds"] = np.asarray(bonds)
    if bond_orders is not None:
        if bonds is None:
            raise ValueError("bond_orders needs bonds as (M, 2) atom pairs")
        arrays["bond_orders"] = np.asarray(bond_orders)
    if smiles is not None:
        arrays["smiles"] = np.asarray(str(smiles))
    if charge is not None:
        arrays["charge"] = np.asarray(int(charge), dtype=np.int64)
    if formal_charges is not None:
        arrays["formal_charges"] = np.asarray(formal_charges, dtype=np.int64)
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
