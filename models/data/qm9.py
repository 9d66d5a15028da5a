"""QM9: parsing, bond graphs, the standard split, caching and the committed extract.

Source
------
QM9 is read from the CSV files shipped in the PyPI package ``qm9pack`` (``data/qm9_part{1,2,3}.csv``;
130,831 molecules, the QM9 set without the 3,054 molecules that failed the original consistency
check). The package itself is never imported (its ``__init__`` needs ``pkg_resources``); the data
folder is located with :func:`importlib.util.find_spec`. Columns used: ``Index`` (QM9 id),
``SMILES``, ``N_atoms``, ``Elements`` (list literal of symbols) and ``XYZ_Ang`` (list literal of
coordinates in Å), parsed with :mod:`csv` and :func:`ast.literal_eval`.

Bond graph
----------
The bonds and bond orders come from the SMILES; the atom order and coordinates from the XYZ
geometry. The two are matched by :func:`match_smiles_to_geometry`:

1. the SMILES is parsed by RDKit (sanitised: Kekulé + aromaticity perception; failure ->
   ``smiles_parse_failure``); bond codes 1/2/3 single/double/triple, 4 aromatic;
2. the element counts of the SMILES (heavy atoms + their hydrogen counts) must equal those of
   the geometry (``atom_count_mismatch`` / ``formula_mismatch``);
3. in the geometry each hydrogen is attached to its nearest heavy atom (which must be within
   ``tolerance`` x the covalent-radius sum), and every heavy-atom pair closer than
   ``tolerance`` x their covalent-radius sum (RDKit radii, ``tolerance = 1.3`` as in RDKit's
   ``DetermineConnectivity``) becomes a *candidate* bond;
4. the heavy-atom graph of the SMILES, with atoms labelled by (element, number of H), is matched
   as a subgraph of the candidate graph with RDKit's substructure search. The match need not be
   induced: strained cages (e.g. bicyclo[1.1.1]pentanes) have non-bonded 1,3 contacts of
   1.8-1.95 Å that a pure distance cut-off reports as bonds, while the longest real bonds in
   QM9 are as long as 1.29 x the radius sum -- no single cut-off separates them, a subgraph match
   with a generous cut-off does. No match -> ``graph_mismatch``;
5. if several matches exist, the one with the smallest total mapped bond length is kept (ties:
   the smallest length-weighted bond order, which puts multiple bonds on the shorter distances);
6. a candidate contact that is clearly a bond (shorter than 1.1 x the radius sum) but absent
   from the SMILES graph means the geometry does not show the SMILES molecule ->
   ``graph_mismatch``;
7. the hydrogens of each SMILES atom map to the hydrogens attached to its image (they are
   interchangeable in the graph).

This is exact graph matching, robust to atom order, and needs no 3-D embedding. On qm9pack's
130,831 molecules it drops two (ids 133857 and 133859, whose SMILES has a C-C bond that is
2.1 Å long in the relaxed geometry).

Standard split
--------------
:func:`standard_split`: sort the QM9 ids of *all* rows of the source (130,831), take
``numpy.random.default_rng(0).permutation(130831)``, first 100,000 -> train, next 17,748 ->
valid, last 13,083 -> test. The split is always computed over the full list of ids in the source
files (also with ``limit=``), and molecules that fail processing are removed from their split
afterwards, so a molecule's split never depends on which other molecules failed.

Caching
-------
:func:`load_qm9` caches the processed dataset (all atoms, uncompressed ``.npz``) in
``$QMANIFOLD_CACHE`` or ``~/.cache/qmanifold``, written atomically. A cache that cannot be read
or was built from different source files / an older processing version is rebuilt with a
warning.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from .dataset import (
    _SYMBOLS,
    BOND_AROMATIC,
    BOND_DOUBLE,
    BOND_SINGLE,
    BOND_TRIPLE,
    ELEMENTS,
    SPLIT_NAMES,
    MoleculeDataset,
)

__all__ = [
    "QM9_SIZE",
    "QM9_SPLIT_SIZES",
    "PROCESSING_VERSION",
    "EXTRACT_PATH",
    "GraphMatchError",
    "qm9_data_dir",
    "qm9_csv_files",
    "default_cache_dir",
    "scan_qm9_indices",
    "standard_split",
    "split_labels_for",
    "match_smiles_to_geometry",
    "parse_qm9",
    "load_qm9",
    "load_qm9_extract",
]

#: Number of molecules in qm9pack's QM9 (rows of the three CSV files).
QM9_SIZE = 130_831
#: Train / valid / test sizes of the standard split (sum = QM9_SIZE).
QM9_SPLIT_SIZES: tuple[int, int, int] = (100_000, 17_748, 13_083)
#: Bump when the processing changes; old caches are then rebuilt.
PROCESSING_VERSION = 1
#: The committed extract (see :mod:`qmanifold.models.data.extract`).
EXTRACT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qm9_extract.npz")

_CSV_NAMES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_COLUMNS = ("Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
_SYMBOL_TO_Z = {s: z for z, s in enumerate(_SYMBOLS) if z > 0}

#: Candidate-bond cut-off factor on the covalent-radius sum.
BOND_TOLERANCE = 1.3
#: Contacts below this factor must be bonds in the SMILES graph.
STRICT_BOND_FACTOR = 1.1
_MAX_MATCHES = 10_000


# ----------------------------------------------------------------------------------------------
# Locating the source
# ----------------------------------------------------------------------------------------------


def qm9_data_dir() -> str:
    """The ``data`` folder of the installed ``qm9pack`` package (without importing it).

    Raises:
        FileNotFoundError: qm9pack is not installed or its data folder is missing.
    """
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("QM9 source data not found: the PyPI package 'qm9pack' is not installed "
                                "(pip install qm9pack, or the 'molecules' extra). "
                                "Use load_qm9_extract() for the small committed extract.")
    for loc in spec.submodule_search_locations:
        d = os.path.join(loc, "data")
        if os.path.isdir(d):
            return d
    raise FileNotFoundError(f"qm9pack is installed at {list(spec.submodule_search_locations)} but has no "
                            f"'data' folder")


def qm9_csv_files() -> list[str]:
    """Paths of the three QM9 CSV files, in index order.

    Raises:
        FileNotFoundError: a file is missing.
    """
    d = qm9_data_dir()
    paths = [os.path.join(d, n) for n in _CSV_NAMES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"QM9 CSV file(s) missing from qm9pack: {missing}")
    return paths


def default_cache_dir() -> str:
    """``$QMANIFOLD_CACHE`` if set, else ``~/.cache/qmanifold``."""
    env = os.environ.get("QMANIFOLD_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "qmanifold")


def _fingerprint(files: Sequence[str]) -> list[list[Any]]:
    return [[os.path.basename(f), int(os.path.getsize(f))] for f in files]


# ----------------------------------------------------------------------------------------------
# Split
# ----------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _scan_cached(files: tuple[str, ...], fingerprint: tuple) -> np.ndarray:
    ids: list[int] = []
    for path in files:
        with open(path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader([fh.readline()]))
            col = header.index("Index")
            for line in fh:
                if not line.strip():
                    continue
                try:
                    ids.append(int(line.split(",", col + 1)[col]))
                except (ValueError, IndexError) as exc:
                    raise ValueError(f"{path}: cannot read the Index column of line {line[:60]!r}") from exc
    return np.asarray(ids, dtype=np.int64)


def scan_qm9_indices(files: Sequence[str] | None = None) -> np.ndarray:
    """QM9 ids of every row of the source files (fast: reads only the ``Index`` column).

    Returns:
        ``(R,)`` int64 ids in file order (R = 130,831 for qm9pack).
    """
    files = tuple(qm9_csv_files() if files is None else files)
    return _scan_cached(files, tuple(map(tuple, _fingerprint(files)))).copy()


def standard_split(
    indices: Sequence[int] | np.ndarray,
    seed: int = 0,
    sizes: Sequence[int] = QM9_SPLIT_SIZES,
    scheme: str = "standard",
) -> dict[str, np.ndarray]:
    """The standard QM9 train/valid/test split of a list of molecule ids.

    The ids are sorted, ``perm = numpy.random.default_rng(seed).permutation(n)`` is drawn and
    ``sorted_ids[perm[:sizes[0]]]`` is train, the next ``sizes[1]`` valid, the last ``sizes[2]``
    test.

    ``scheme="edm"`` draws the permutation with NumPy's legacy generator instead
    (``numpy.random.seed(seed); numpy.random.permutation(n)``), which is the split of EDM (Hoogeboom et
    al. 2022) and of the conformer benchmarks that follow it: train = positions 0..99,999,
    valid = the next 17,748, test = positions 117,748 onwards.

    Args:
        indices: ``(n,)`` distinct integer ids (all rows of the source, failed ones included).
        seed: generator seed (0 for the standard split).
        sizes: ``(n_train, n_valid, n_test)``, summing to ``n``.

    Returns:
        ``{"train": ids, "valid": ids, "test": ids}``, int64 arrays in permutation order (so the
        first ``k`` ids of a split are a uniformly random subset of it).

    Raises:
        ValueError: duplicate ids, or ``sizes`` does not sum to the number of ids.
    """
    ids = np.asarray(indices, dtype=np.int64).reshape(-1)
    sorted_ids = np.sort(ids)
    if sorted_ids.size and np.any(np.diff(sorted_ids) == 0):
        raise ValueError("standard_split: indices contain duplicates")
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 3 or any(s < 0 for s in sizes):
        raise ValueError(f"sizes must be three non-negative ints (train, valid, test), got {sizes}")
    if sum(sizes) != sorted_ids.size:
        raise ValueError(f"split sizes {sizes} sum to {sum(sizes)} but there are {sorted_ids.size} ids; "
                         f"the standard split needs all {QM9_SIZE} QM9 ids")
    if scheme == "standard":
        perm = np.random.default_rng(seed).permutation(sorted_ids.size)
    elif scheme == "edm":
        perm = np.random.RandomState(seed).permutation(sorted_ids.size)
    else:
        raise ValueError(f"unknown split scheme {scheme!r}; use 'standard' or 'edm'")
    a, b = sizes[0], sizes[0] + sizes[1]
    return {"train": sorted_ids[perm[:a]], "valid": sorted_ids[perm[a:b]], "test": sorted_ids[perm[b:]]}


def split_labels_for(
    dataset_indices: np.ndarray,
    universe: np.ndarray,
    seed: int = 0,
    sizes: Sequence[int] = QM9_SPLIT_SIZES,
    scheme: str = "standard",
) -> np.ndarray:
    """Split labels (0 train, 1 valid, 2 test) of ``dataset_indices`` under :func:`standard_split`.

    Args:
        dataset_indices: ``(M,)`` ids of the molecules kept.
        universe: ids of all source rows, over which the split is drawn.

    Raises:
        ValueError: an id of ``dataset_indices`` is not in ``universe``.
    """
    parts = standard_split(universe, seed=seed, sizes=sizes, scheme=scheme)
    ids = np.asarray(dataset_indices, dtype=np.int64)
    labels = np.full(ids.shape, -1, dtype=np.int8)
    for k, name in enumerate(SPLIT_NAMES):
        labels[np.isin(ids, parts[name])] = k
    if np.any(labels < 0):
        raise ValueError(f"ids {ids[labels < 0][:10].tolist()} are not in the split universe")
    return labels


# ----------------------------------------------------------------------------------------------
# SMILES <-> geometry matching (needs RDKit)
# ----------------------------------------------------------------------------------------------


class GraphMatchError(ValueError):
    """A molecule whose SMILES graph cannot be placed on its geometry.

    Attributes:
        reason: short machine-readable reason (used as the skip-count key).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


_RCOV: np.ndarray | None = None


def _covalent_radii() -> np.ndarray:
    global _RCOV
    if _RCOV is None:
        from rdkit import Chem

        pt = Chem.GetPeriodicTable()
        r = np.zeros(119)
        for z in range(1, 119):
            r[z] = pt.GetRcovalent(z)
        _RCOV = r
    return _RCOV


def _skeleton(labels: Sequence[tuple[int, int]], edges: Iterable[tuple[int, int]]):
    """Unsanitised RDKit graph: atoms = (element, H count) labels (H count in the isotope field)."""
    from rdkit import Chem

    m = Chem.RWMol()
    for z, h in labels:
        a = Chem.Atom(int(z))
        a.SetIsotope(int(h) + 1)
        a.SetNoImplicit(True)
        m.AddAtom(a)
    for i, j in edges:
        m.AddBond(int(i), int(j), Chem.BondType.SINGLE)
    m = m.GetMol()
    m.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(m)
    return m


def match_smiles_to_geometry(
    smiles: str,
    atomic_numbers: np.ndarray,
    positions: np.ndarray,
    tolerance: float = BOND_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Bonds of ``smiles`` expressed in the atom order of a geometry (see the module docstring).

    Args:
        smiles: SMILES string (hydrogens implicit or explicit).
        atomic_numbers: ``(N,)`` atomic numbers of the geometry, hydrogens included.
        positions: ``(N, 3)`` coordinates, Å.
        tolerance: candidate-bond factor on the covalent-radius sum.

    Returns:
        ``(pairs, orders)``: ``(B, 2)`` int64 geometry atom indices with ``i < j`` and ``(B,)``
        int64 bond codes (1 single, 2 double, 3 triple, 4 aromatic).

    Raises:
        GraphMatchError: with ``reason`` one of ``smiles_parse_failure``, ``atom_count_mismatch``,
            ``formula_mismatch``, ``unsupported_bond``, ``graph_mismatch``.
    """
    from rdkit import Chem

    z = np.asarray(atomic_numbers, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.float64)
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise GraphMatchError("smiles_parse_failure", f"RDKit cannot parse/sanitise {smiles!r}")
    heavy_s = [a.GetAtomicNum() for a in mol.GetAtoms()]
    if any(zz == 1 for zz in heavy_s):
        raise GraphMatchError("graph_mismatch", f"{smiles!r} has hydrogens that are not attached to heavy atoms")
    h_s = [a.GetTotalNumHs() for a in mol.GetAtoms()]
    if len(heavy_s) + sum(h_s) != len(z):
        raise GraphMatchError("atom_count_mismatch", f"{smiles!r} has {len(heavy_s) + sum(h_s)} atoms with "
                                                     f"hydrogens, the geometry {len(z)}")
    formula_s = np.bincount(np.asarray(heavy_s + [1] * sum(h_s), dtype=np.int64), minlength=119)
    if not np.array_equal(formula_s, np.bincount(z, minlength=119)):
        raise GraphMatchError("formula_mismatch", f"elements of {smiles!r} differ from the geometry's")
    codes = []
    for b in mol.GetBonds():
        if b.GetIsAromatic():
            codes.append(BOND_AROMATIC)
            continue
        bt = b.GetBondType()
        code = {Chem.BondType.SINGLE: BOND_SINGLE, Chem.BondType.DOUBLE: BOND_DOUBLE,
                Chem.BondType.TRIPLE: BOND_TRIPLE}.get(bt)
        if code is None:
            raise GraphMatchError("unsupported_bond", f"bond type {bt} in {smiles!r}")
        codes.append(code)
    s_edges = [(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()]

    rcov = _covalent_radii()
    heavy = np.nonzero(z != 1)[0]
    hyd = np.nonzero(z == 1)[0]
    if heavy.size == 0:
        raise GraphMatchError("graph_mismatch", "no heavy atoms")
    diff = pos[:, None, :] - pos[None, :, :]
    dist = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    rsum = rcov[z][:, None] + rcov[z][None, :]
    if hyd.size:
        dh = dist[np.ix_(hyd, heavy)]
        nearest = np.argmin(dh, axis=1)  # position in `heavy`
        near_d = dh[np.arange(hyd.size), nearest]
        if np.any(near_d > tolerance * rsum[hyd, heavy[nearest]]):
            raise GraphMatchError("graph_mismatch", "a hydrogen is not within bonding distance of any heavy atom")
        g_h = np.bincount(nearest, minlength=heavy.size)
    else:
        nearest = np.zeros(0, dtype=np.int64)
        g_h = np.zeros(heavy.size, dtype=np.int64)
    d_heavy = dist[np.ix_(heavy, heavy)]
    cand = d_heavy < tolerance * rsum[np.ix_(heavy, heavy)]
    np.fill_diagonal(cand, False)
    ci, cj = np.nonzero(np.triu(cand, k=1))
    target = _skeleton(list(zip(z[heavy].tolist(), g_h.tolist())), zip(ci.tolist(), cj.tolist()))
    query = _skeleton(list(zip(heavy_s, h_s)), s_edges)
    matches = target.GetSubstructMatches(query, uniquify=False, maxMatches=_MAX_MATCHES, useChirality=False)
    if not matches:
        raise GraphMatchError("graph_mismatch", f"the bond graph of {smiles!r} does not fit the geometry")
    si = np.asarray([e[0] for e in s_edges], dtype=np.int64)
    sj = np.asarray([e[1] for e in s_edges], dtype=np.int64)
    order_w = np.asarray([1.5 if c == BOND_AROMATIC else c for c in codes], dtype=np.float64)
    best_key, best = None, None
    for mt in matches:
        m_arr = np.asarray(mt, dtype=np.int64)
        d = d_heavy[m_arr[si], m_arr[sj]] if si.size else np.zeros(0)
        key = (round(float(d.sum()), 6), float((d * order_w).sum()))
        if best_key is None or key < best_key:
            best_key, best = key, m_arr
    m_arr = best
    # strict check: clear contacts must be SMILES bonds
    used = np.zeros_like(cand)
    if si.size:
        used[m_arr[si], m_arr[sj]] = True
        used[m_arr[sj], m_arr[si]] = True
    strict = d_heavy < STRICT_BOND_FACTOR * rsum[np.ix_(heavy, heavy)]
    np.fill_diagonal(strict, False)
    if np.any(strict & ~used):
        raise GraphMatchError("graph_mismatch", f"the geometry has a bond that {smiles!r} lacks")
    pairs = [(int(heavy[m_arr[i]]), int(heavy[m_arr[j]])) for i, j in zip(si.tolist(), sj.tolist())]
    orders = list(codes)
    # hydrogens: every H is bonded to the heavy atom it was assigned to
    for h, hv in zip(hyd.tolist(), nearest.tolist()):
        pairs.append((int(heavy[hv]), int(h)))
        orders.append(BOND_SINGLE)
    p = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    p = np.stack([p.min(axis=1), p.max(axis=1)], axis=1) if p.size else p
    return p, np.asarray(orders, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Row processing (runs in worker processes)
# ----------------------------------------------------------------------------------------------

Row = tuple  # (index:int, smiles:str, n_atoms:str, elements:str, xyz:str)


def _process_row(row: Row) -> tuple[str, Any]:
    """``("ok", (index, smiles, z uint8, pos float32, pairs int32, orders uint8))`` or ``("skip", (index, reason))``."""
    index, smiles, n_atoms, elements_lit, xyz_lit = row
    if smiles is None:
        return "skip", (index, "malformed_row")
    try:
        symbols = ast.literal_eval(elements_lit)
        xyz = np.asarray(ast.literal_eval(xyz_lit), dtype=np.float64)
        n = int(n_atoms)
    except (ValueError, SyntaxError, TypeError, MemoryError):
        return "skip", (index, "malformed_row")
    if not isinstance(symbols, (list, tuple)):
        return "skip", (index, "malformed_row")
    if len(symbols) != n or xyz.shape != (n, 3):
        return "skip", (index, "atom_count_mismatch")
    try:
        z = np.asarray([_SYMBOL_TO_Z[str(s).strip()] for s in symbols], dtype=np.int64)
    except KeyError:
        return "skip", (index, "unknown_element")
    if not np.all(np.isfinite(xyz)):
        return "skip", (index, "nonfinite_coordinates")
    try:
        pairs, orders = match_smiles_to_geometry(smiles, z, xyz)
    except GraphMatchError as exc:
        return "skip", (index, exc.reason)
    return "ok", (index, smiles, z.astype(np.uint8), xyz.astype(np.float32),
                  pairs.astype(np.int32), orders.astype(np.uint8))


def _process_chunk(rows: list[Row]) -> list[tuple[str, Any]]:
    return [_process_row(r) for r in rows]


def _init_worker() -> None:
    try:
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")
    except ImportError:  # pragma: no cover
        pass


def _iter_rows(files: Sequence[str], limit: int | None, select: set[int] | None) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    count = 0
    for path in files:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            missing = [c for c in _COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{path}: QM9 CSV lacks column(s) {missing}")
            cols = [header.index(c) for c in _COLUMNS]
            width = max(cols) + 1
            for rec in reader:
                if not rec:
                    continue
                if limit is not None and count >= limit:
                    return
                count += 1
                if len(rec) < width:
                    yield (-count, None, None, None, None)  # reported as malformed_row
                    continue
                try:
                    idx = int(rec[cols[0]])
                except ValueError:
                    yield (-count, None, None, None, None)
                    continue
                if select is not None and idx not in select:
                    continue
                yield (idx, rec[cols[1]], rec[cols[2]], rec[cols[3]], rec[cols[4]])


def _byte_ranges(files: Sequence[str], block: int = 2 << 20) -> list[tuple[str, int, int]]:
    """Cut each file into ``(path, start, end)`` byte ranges of about ``block`` bytes."""
    out = []
    for path in files:
        size = os.path.getsize(path)
        for start in range(0, size, block):
            out.append((path, start, min(size, start + block)))
    return out


def _process_range(task: tuple[str, int, int]) -> list[tuple[str, Any]]:
    """Parse and process the CSV lines that *start* inside the byte range ``[start, end)``.

    A line belongs to the range holding its first byte; the header line (offset 0) is skipped.
    QM9 CSV records are single lines (no quoted newlines), which :func:`parse_qm9` relies on.
    """
    path, start, end = task
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, "rb") as fh:
        header = next(csv.reader([fh.readline().decode("utf-8")]))
        cols = [header.index(c) for c in _COLUMNS]
        width = max(cols) + 1
        if start == 0:
            pass  # header already consumed
        else:
            fh.seek(start - 1)
            fh.readline()  # finish the line that owns byte start-1
        rows: list[Row] = []
        while fh.tell() < end:
            line = fh.readline()
            if not line:
                break
            text = line.decode("utf-8").rstrip("\r\n")
            if not text.strip():
                continue
            rec = next(csv.reader([text]))
            if len(rec) < width:
                rows.append((-1, None, None, None, None))
                continue
            try:
                idx = int(rec[cols[0]])
            except ValueError:
                rows.append((-1, None, None, None, None))
                continue
            rows.append((idx, rec[cols[1]], rec[cols[2]], rec[cols[3]], rec[cols[4]]))
    return _process_chunk(rows)


def _chunks(it: Iterator[Row], size: int) -> Iterator[list[Row]]:
    buf: list[Row] = []
    for r in it:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def parse_qm9(
    files: Sequence[str] | None = None,
    limit: int | None = None,
    select: Iterable[int] | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> MoleculeDataset:
    """Parse QM9 CSV rows into a :class:`MoleculeDataset` (no caching; needs RDKit).

    Args:
        files: CSV paths (default: qm9pack's three files).
        limit: read only the first ``limit`` rows.
        select: parse only rows whose QM9 id is in this set.
        progress: show a tqdm progress bar.
        num_workers: worker processes (default ``min(2, cpu count)``, 0 = in process; small jobs
            run in process).

    Returns:
        Dataset sorted by QM9 id, with standard split labels (drawn over all ids of ``files``),
        ``skipped`` counts by reason and ``metadata["skipped_indices"]`` (first 1000 ids per
        reason).
    """
    try:
        import rdkit  # noqa: F401
    except ImportError as exc:
        raise ImportError("parsing QM9 needs RDKit (pip install rdkit); load_qm9_extract() works "
                          "without it") from exc
    from tqdm.auto import tqdm

    files = list(qm9_csv_files() if files is None else files)
    if limit is not None:
        limit = int(limit)
        if limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit}")
    sel = None if select is None else {int(s) for s in select}
    universe = scan_qm9_indices(files)
    total = len(universe) if limit is None else min(limit, len(universe))
    if sel is not None:
        total = len(sel)
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    if total < 2000:
        num_workers = 0

    t0 = time.perf_counter()
    results: list[tuple[str, Any]] = []
    bar = tqdm(total=total, disable=not progress, unit="mol", desc="QM9", dynamic_ncols=True)
    chunks = _chunks(_iter_rows(files, limit, sel), 500)
    try:
        if num_workers and num_workers > 0:
            import multiprocessing as mp

            method = "fork" if (sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()) else "spawn"
            ctx = mp.get_context(method)
            with ctx.Pool(num_workers, initializer=_init_worker) as pool:
                if limit is None and sel is None:
                    # workers read their own byte ranges: no CSV parsing or row shipping in this process
                    outputs = pool.imap_unordered(_process_range, _byte_ranges(files), chunksize=1)
                else:
                    outputs = pool.imap(_process_chunk, chunks, chunksize=1)
                for out in outputs:
                    results.extend(out)
                    bar.update(len(out))
        else:
            from rdkit import RDLogger

            RDLogger.DisableLog("rdApp.*")
            try:
                for chunk in chunks:
                    out = _process_chunk(chunk)
                    results.extend(out)
                    bar.update(len(out))
            finally:
                RDLogger.EnableLog("rdApp.*")
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0

    skipped: dict[str, int] = {}
    skipped_ids: dict[str, list[int]] = {}
    good: dict[int, tuple] = {}
    for status, payload in results:
        if status == "ok":
            idx = int(payload[0])
            if idx in good:
                skipped["duplicate_index"] = skipped.get("duplicate_index", 0) + 1
                skipped_ids.setdefault("duplicate_index", []).append(idx)
                continue
            good[idx] = payload
        else:
            idx, reason = payload
            skipped[reason] = skipped.get(reason, 0) + 1
            lst = skipped_ids.setdefault(reason, [])
            if len(lst) < 1000:
                lst.append(int(idx))
    order = sorted(good)
    mols = [good[i] for i in order]
    n_atoms = np.asarray([m[2].size for m in mols], dtype=np.int64)
    n_bonds = np.asarray([m[4].shape[0] for m in mols], dtype=np.int64)
    a_off = np.zeros(len(mols) + 1, dtype=np.int64)
    np.cumsum(n_atoms, out=a_off[1:])
    b_off = np.zeros(len(mols) + 1, dtype=np.int64)
    np.cumsum(n_bonds, out=b_off[1:])
    ids = np.asarray(order, dtype=np.int64)
    if len(universe) == sum(QM9_SPLIT_SIZES):
        labels = split_labels_for(ids, universe)
    else:
        warnings.warn(f"the QM9 source has {len(universe)} rows, not {QM9_SIZE}; no standard split labels",
                      stacklevel=2)
        labels = None
    meta = {
        "kind": "qm9",
        "processing_version": PROCESSING_VERSION,
        "source_files": _fingerprint(files),
        "limit": limit,
        "selected": None if sel is None else len(sel),
        "rows_read": len(results),
        "universe_size": len(universe),
        "split_seed": 0,
        "split_sizes": list(QM9_SPLIT_SIZES),
        "parse_seconds": round(elapsed, 2),
        "num_workers": int(num_workers),
        "skipped_indices": skipped_ids,
        "bond_tolerance": BOND_TOLERANCE,
    }
    return MoleculeDataset(
        positions=np.concatenate([m[3] for m in mols]) if mols else np.zeros((0, 3), np.float32),
        atomic_numbers=np.concatenate([m[2] for m in mols]).astype(np.int64) if mols else np.zeros(0, np.int64),
        atom_offsets=a_off,
        bond_pairs=np.concatenate([m[4] for m in mols]) if mols else np.zeros((0, 2), np.int32),
        bond_orders=np.concatenate([m[5] for m in mols]) if mols else np.zeros(0, np.uint8),
        bond_offsets=b_off, indices=ids, smiles=[m[1] for m in mols], split_labels=labels,
        elements=ELEMENTS, skipped=skipped, source="qm9", metadata=meta,
    )


# ----------------------------------------------------------------------------------------------
# Public loaders
# ----------------------------------------------------------------------------------------------


def _cache_path(cache_dir: str, limit: int | None) -> str:
    tag = "all" if limit is None else f"first{int(limit)}"
    return os.path.join(cache_dir, f"qm9_v{PROCESSING_VERSION}_{tag}.npz")


def load_qm9(
    cache_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    *,
    elements: Sequence[int] = ELEMENTS,
    heavy_atoms_only: bool = False,
    cache: bool = True,
    rebuild: bool = False,
    num_workers: int | None = None,
) -> MoleculeDataset:
    """Load QM9 (qm9pack CSVs) as a :class:`MoleculeDataset`, using a disk cache.

    First call: parses the CSVs (about a minute for all 130,831 molecules with 2 workers), prints
    a summary and writes the cache atomically; later calls read the cache (about a second).

    Args:
        cache_dir: cache folder (default :func:`default_cache_dir`: ``$QMANIFOLD_CACHE`` or
            ``~/.cache/qmanifold``).
        limit: only the first ``limit`` rows (cached separately); the split labels are still those
            of the full standard split.
        progress: progress bar and summary printout.
        elements: element list for ``atom_types`` (default H, C, N, O, F).
        heavy_atoms_only: drop hydrogens (the cache always holds all atoms).
        cache: read/write the cache at all.
        rebuild: ignore an existing cache and re-parse.
        num_workers: parser processes (default 2).

    Returns:
        The dataset, sorted by QM9 id; ``.skipped`` counts dropped molecules by reason;
        ``.split(name)`` gives the standard split.

    Raises:
        FileNotFoundError: qm9pack (the source data) is not installed.
        ImportError: parsing is needed and RDKit is not installed.
    """
    files = qm9_csv_files()
    fp = _fingerprint(files)
    ds: MoleculeDataset | None = None
    path = None
    if cache:
        path = _cache_path(os.fspath(cache_dir) if cache_dir is not None else default_cache_dir(), limit)
        if os.path.exists(path) and not rebuild:
            try:
                ds = MoleculeDataset.load(path)
                meta = ds.metadata
                if (meta.get("kind") != "qm9" or meta.get("processing_version") != PROCESSING_VERSION
                        or meta.get("source_files") != fp or meta.get("limit") != limit):
                    warnings.warn(f"QM9 cache {path} was built from other source files or an older "
                                  f"processing version; rebuilding it", stacklevel=2)
                    ds = None
            except (ValueError, OSError) as exc:
                warnings.warn(f"QM9 cache {path} is corrupt ({exc}); rebuilding it", stacklevel=2)
                ds = None
    if ds is not None and progress:
        print(f"[qmanifold] QM9 (from cache {path}): {ds.summary()}")
    if ds is None:
        ds = parse_qm9(files, limit=limit, progress=progress, num_workers=num_workers)
        if path is not None:
            try:
                ds.save(path, compressed=False)
            except OSError as exc:
                warnings.warn(f"could not write the QM9 cache {path}: {exc}", stacklevel=2)
        if progress:
            print(f"[qmanifold] QM9: {ds.summary()}; parsed in {ds.metadata.get('parse_seconds')} s"
                  + (f"; cached at {path}" if path else ""))
    if tuple(elements) != ds.elements:
        ds = ds.with_elements(elements)
    if heavy_atoms_only:
        ds = ds.without_hydrogens()
    return ds


def load_qm9_edm(**kwargs) -> MoleculeDataset:
    """Full QM9 (:func:`load_qm9`, same cache) with the EDM split (``standard_split(scheme="edm")``).

    This is the split of the conformer benchmark (``qmanifold benchmark conformers``): a model
    evaluated on its test molecules must be trained on its train split (``--data qm9-edm``).
    """
    ds = load_qm9(**kwargs)
    labels = split_labels_for(ds.indices, scan_qm9_indices(), scheme="edm")
    meta = dict(ds.metadata, split="edm")
    return ds._derived(split_labels=labels, metadata=meta, source=f"{ds.source} (EDM split)")


def load_qm9_extract(
    path: str | os.PathLike | None = None,
    *,
    elements: Sequence[int] = ELEMENTS,
    heavy_atoms_only: bool = False,
) -> MoleculeDataset:
    """The committed QM9 extract (300 train / 100 valid / 100 test molecules of the standard split).

    Pure numpy: needs neither RDKit nor qm9pack. Same format as :func:`load_qm9`, with QM9 ids in
    ``.indices`` and split labels, so ``.split("train")`` works.

    Raises:
        FileNotFoundError: the extract file is missing (regenerate it with
            ``python -m qmanifold.models.data.extract``).
    """
    p = EXTRACT_PATH if path is None else os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"QM9 extract not found at {p}; regenerate it with `python -m qmanifold.models.data.extract`")
    ds = MoleculeDataset.load(p, heavy_atoms_only=heavy_atoms_only)
    if tuple(elements) != ds.elements:
        ds = ds.with_elements(elements)
    return ds
