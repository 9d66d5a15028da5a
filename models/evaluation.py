r"""Scoring generated conformers against reference geometries (RMSD coverage, geometry, validity).

Inputs are SDF files written by :mod:`qmanifold.models.sampling` (``qmanifold sample``) or
:mod:`qmanifold.models.baselines` (``qmanifold baseline``): each record holds the molecular graph, one
conformer (Å) and ``qm_*`` properties that name its source molecule (``qm_dataset``,
``qm_index``). References come from that dataset (or ``reference=``): the DFT geometry of each
QM9 molecule.

Metrics (``threshold`` delta, default 0.5 Å), following GEOM conformer-generation practice
(GeoMol, ET-Flow), with ``d(g, r)`` the symmetry-aware heavy-atom RMSD after optimal superposition
(RDKit ``rdMolAlign.GetBestRMS``: best over all graph automorphisms of the heavy-atom graph):

* recall: ``COV-R = mean_r [min_g d(g, r) < delta]``, ``AMR-R = mean_r min_g d(g, r)``;
* precision: ``COV-P = mean_g [min_r d(g, r) < delta]``, ``AMR-P = mean_g min_r d(g, r)``;

computed per molecule and averaged over molecules (means and medians are reported). QM9 has one
reference conformer per molecule, so ``COV-R`` is the fraction of molecules whose best generated
conformer is within delta of the reference and ``AMR-P`` the mean RMSD of all generated conformers.
:func:`coverage_metrics` accepts any number of references per molecule.

Geometry: bond lengths per bond type (``C-H``, ``C=O``, ``C:C`` aromatic, ...; Å) and bond angles
per angle type (``C-C-O``, degrees) of the generated conformers, compared with the reference
geometries of the same molecules by the 1-D Wasserstein distance (:func:`scipy.stats.wasserstein_distance`)
per type and a reference-count-weighted mean.

Validity: the fraction of conformers whose connectivity, re-perceived from the coordinates by
RDKit (``rdDetermineBonds.DetermineConnectivity``, covalent radii), equals the graph's
(bond orders ignored); reported for the references as well (a few QM9 geometries fail it too).

Ensembles of one molecule (:func:`evaluate_ensemble`, ``qmanifold evaluate --ensemble``): the
samples of ``qmanifold sample --data ens.npz -n N`` against all frames of a reference ensemble (an
independent MD run), atoms matched by index: bond-length/angle W1, COV/AMR on Kabsch RMSDs between
subsets, stereo agreement, connectivity.

Output: a JSON-serialisable dict (:func:`evaluate_samples`) and optional PNG plots
(:func:`plot_evaluation`: RMSD histogram, bond-length and bond-angle histograms).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qmanifold.atomic import atomic_open

__all__ = [
    "coverage_metrics",
    "best_rmsd",
    "read_sdf_records",
    "bond_geometry",
    "distribution_distances",
    "connectivity_matches",
    "evaluate_samples",
    "evaluate_ensemble",
    "kabsch_rmsd_matrix",
    "plot_evaluation",
    "write_json",
    "summarize_runs",
]

_ORDER_CHAR = {1: "-", 2: "=", 3: "#", 4: ":"}


# ----------------------------------------------------------------------------------------------
# coverage / AMR
# ----------------------------------------------------------------------------------------------


def coverage_metrics(rmsd: Sequence[np.ndarray], threshold: float = 0.5) -> dict:
    """COV/AMR recall and precision from per-molecule RMSD matrices.

    Args:
        rmsd: one array per molecule of shape ``(G_i, R_i)`` (generated x reference RMSDs, Å), or
            ``(G_i,)`` for one reference. Molecules with no generated or no reference conformer are
            rejected.
        threshold: coverage threshold delta (Å).

    Returns:
        ``{"COV-R", "AMR-R", "COV-P", "AMR-P"}`` (means over molecules; coverages as fractions in
        [0, 1]) plus ``"<metric>-median"`` and ``"num_molecules"``.

    Raises:
        ValueError: an empty list, an empty matrix, or NaN RMSDs.
    """
    if len(rmsd) == 0:
        raise ValueError("coverage_metrics: no molecules")
    per = defaultdict(list)
    for k, d in enumerate(rmsd):
        d = np.asarray(d, dtype=np.float64)
        if d.ndim == 1:
            d = d[:, None]
        if d.ndim != 2 or d.size == 0:
            raise ValueError(f"coverage_metrics: molecule {k} has an empty or malformed RMSD matrix {d.shape}")
        if np.any(np.isnan(d)):
            raise ValueError(f"coverage_metrics: molecule {k} has NaN RMSDs")
        min_over_gen = d.min(axis=0)  # (R,)
        min_over_ref = d.min(axis=1)  # (G,)
        per["COV-R"].append(float(np.mean(min_over_gen < threshold)))
        per["AMR-R"].append(float(np.mean(min_over_gen)))
        per["COV-P"].append(float(np.mean(min_over_ref < threshold)))
        per["AMR-P"].append(float(np.mean(min_over_ref)))
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in per.items()}
    out.update({f"{k}-median": float(np.median(v)) for k, v in per.items()})
    out["num_molecules"] = len(rmsd)
    out["threshold"] = float(threshold)
    return out


# ----------------------------------------------------------------------------------------------
# RDKit helpers
# ----------------------------------------------------------------------------------------------


def _chem():
    from rdkit import Chem, RDLogger

    return Chem, RDLogger


def _heavy(mol):
    Chem, _ = _chem()
    if all(a.GetAtomicNum() != 1 for a in mol.GetAtoms()):
        m = Chem.Mol(mol)
    else:
        m = Chem.RemoveHs(mol, sanitize=False)
    m.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(m)
    return m


def best_rmsd(probe, reference, heavy_atoms: bool = True) -> float:
    """Symmetry-aware RMSD (Å) of ``probe`` to ``reference`` after optimal superposition.

    Both are RDKit molecules with one conformer and the same graph. Heavy atoms only by default.
    Neither input is modified.

    Raises:
        ValueError: the two graphs do not match (no atom mapping).
    """
    from rdkit.Chem import rdMolAlign

    p = _heavy(probe) if heavy_atoms else _clone(probe)
    r = _heavy(reference) if heavy_atoms else _clone(reference)
    if p.GetNumAtoms() != r.GetNumAtoms():
        raise ValueError(f"probe has {p.GetNumAtoms()} atoms, reference {r.GetNumAtoms()}")
    if p.GetNumAtoms() == 1:
        return 0.0
    try:
        return float(rdMolAlign.GetBestRMS(p, r))
    except RuntimeError as exc:
        raise ValueError(f"the probe and reference graphs do not match ({exc})") from exc


def _clone(mol):
    Chem, _ = _chem()
    m = Chem.Mol(mol)
    m.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(m)
    return m


def read_sdf_records(path: str | os.PathLike) -> list[dict]:
    """Records of an SDF file: ``mol`` (RDKit, hydrogens kept; sanitised when RDKit can),
    ``positions`` ``(N, 3)`` Å, ``atomic_numbers`` ``(N,)``, ``bond_types`` ``(N, N)`` and
    ``props`` (all SD properties, as strings).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a record RDKit cannot parse or without 3-D coordinates (names the record),
            NaN coordinates, or an empty file.
    """
    Chem, RDLogger = _chem()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"samples file not found: {path}")
    from qmanifold.models.data.io import sdf_supplier

    supplier = sdf_supplier(path, sanitize=False)  # InputError "no molecules in FILE" when empty
    records = []
    RDLogger.DisableLog("rdApp.*")
    try:
        for k in range(len(supplier)):
            mol = supplier[k]
            if mol is None:
                raise ValueError(f"{path}: record {k} cannot be parsed by RDKit")
            try:
                Chem.SanitizeMol(mol)
            except Exception:  # noqa: BLE001 - RDKit's sanitisation errors have no common base
                mol.UpdatePropertyCache(strict=False)
                Chem.FastFindRings(mol)
            if mol.GetNumConformers() == 0:
                raise ValueError(f"{path}: record {k} has no coordinates")
            pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64).reshape(-1, 3)
            if not np.all(np.isfinite(pos)):
                raise ValueError(f"{path}: record {k} has NaN/infinite coordinates")
            n = mol.GetNumAtoms()
            bt = np.zeros((n, n), dtype=np.int64)
            for b in mol.GetBonds():
                code = 4 if b.GetIsAromatic() else {1.0: 1, 2.0: 2, 3.0: 3}.get(b.GetBondTypeAsDouble(), 1)
                i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
                bt[i, j] = bt[j, i] = code
            records.append({
                "mol": mol, "positions": pos, "bond_types": bt,
                "atomic_numbers": np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64),
                "props": {key: str(val) for key, val in mol.GetPropsAsDict(includePrivate=False).items()},
                "record": k,
            })
    finally:
        RDLogger.EnableLog("rdApp.*")
    if not records:
        raise ValueError(f"{path}: no records")
    return records


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------


def _elem_key(z: int) -> tuple[int, int]:
    return (1 if int(z) == 1 else 0, int(z))


def _symbol(z: int) -> str:
    from qmanifold.models.data.io import element_symbol

    return element_symbol(int(z))


def bond_geometry(positions: np.ndarray, atomic_numbers: np.ndarray, bond_types: np.ndarray
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Bond lengths (Å) per bond type and bond angles (degrees) per angle type of one conformer.

    Bond type keys: element symbols ordered C, N, O, F, ..., H joined by the order symbol
    (``-`` single, ``=`` double, ``#`` triple, ``:`` aromatic), e.g. ``"C-H"``, ``"C=O"``.
    Angle keys: ``"A-B-C"`` with the centre atom in the middle and the ends ordered the same way.
    """
    pos = np.asarray(positions, dtype=np.float64)
    z = np.asarray(atomic_numbers)
    bt = np.asarray(bond_types)
    lengths: dict[str, list[float]] = defaultdict(list)
    angles: dict[str, list[float]] = defaultdict(list)
    ii, jj = np.nonzero(np.triu(bt, 1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        a, b = sorted((i, j), key=lambda k: _elem_key(z[k]))
        key = f"{_symbol(z[a])}{_ORDER_CHAR.get(int(bt[i, j]), '?')}{_symbol(z[b])}"
        lengths[key].append(float(np.linalg.norm(pos[i] - pos[j])))
    for c in range(z.shape[0]):
        nb = np.nonzero(bt[c])[0].tolist()
        for x in range(len(nb)):
            for y in range(x + 1, len(nb)):
                a, b = sorted((nb[x], nb[y]), key=lambda k: _elem_key(z[k]))
                u, v = pos[a] - pos[c], pos[b] - pos[c]
                nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                if nu == 0 or nv == 0:
                    continue
                cosang = float(np.clip(np.dot(u, v) / (nu * nv), -1.0, 1.0))
                angles[f"{_symbol(z[a])}-{_symbol(z[c])}-{_symbol(z[b])}"].append(math.degrees(math.acos(cosang)))
    return dict(lengths), dict(angles)


def distribution_distances(generated: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]],
                           min_count: int = 1) -> dict:
    """1-D Wasserstein distance per type between generated and reference values.

    Returns ``{"per_type": {key: {"w1", "n_generated", "n_reference"}}, "mean": weighted mean
    (weights = reference counts), "types": number of types compared}``; types present on one
    side only are listed with ``w1 = None``.
    """
    from scipy.stats import wasserstein_distance

    per: dict[str, dict] = {}
    num = den = 0.0
    for key in sorted(set(generated) | set(reference)):
        g = np.asarray(generated.get(key, []), dtype=np.float64)
        r = np.asarray(reference.get(key, []), dtype=np.float64)
        entry = {"n_generated": int(g.size), "n_reference": int(r.size), "w1": None}
        if g.size >= min_count and r.size >= min_count:
            w = float(wasserstein_distance(g, r))
            entry["w1"] = w
            num += w * r.size
            den += r.size
        per[key] = entry
    return {"per_type": per, "mean": (num / den) if den else None,
            "types": sum(1 for e in per.values() if e["w1"] is not None)}


def connectivity_matches(positions: np.ndarray, atomic_numbers: np.ndarray, bond_types: np.ndarray) -> bool:
    """Whether RDKit's connectivity perceived from ``positions`` equals the graph's bonds."""
    from qmanifold.models.data.io import perceive_bonds

    pairs = perceive_bonds(np.asarray(positions, dtype=np.float64), np.asarray(atomic_numbers))
    found = {(int(i), int(j)) for i, j in np.asarray(pairs).reshape(-1, 2)}
    ii, jj = np.nonzero(np.triu(np.asarray(bond_types), 1))
    return found == set(zip(ii.tolist(), jj.tolist()))


# ----------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------


def _merge_geometry(acc: dict, new: Mapping[str, list]) -> None:
    for k, v in new.items():
        acc.setdefault(k, []).extend(v)


_PER_RECORD_PROPS = {"qm_source", "qm_index", "qm_smiles", "qm_sample", "qm_dataset", "qm_heavy_atoms_only"}


def _without_added_hydrogens(rec: dict) -> dict:
    """A heavy-atom record whose SDF also holds the hydrogens placed after sampling (they follow the
    graph atoms, :func:`qmanifold.models.sampling.make_records`): the graph atoms only, for scoring."""
    z = rec["atomic_numbers"]
    n = int(np.count_nonzero(z != 1))
    if n == z.shape[0] or np.any(z[:n] == 1):
        return rec
    Chem, _ = _chem()
    mol = Chem.RWMol(rec["mol"])
    for k in range(z.shape[0] - 1, n - 1, -1):
        mol.RemoveAtom(k)
    return {**rec, "mol": mol.GetMol(), "positions": rec["positions"][:n], "atomic_numbers": z[:n],
            "bond_types": rec["bond_types"][:n, :n]}


def _load_reference(spec: str, heavy_atoms_only: bool, cache: dict):
    key = (spec, heavy_atoms_only)
    if key not in cache:
        from qmanifold.models.training import load_molecules

        cache[key] = load_molecules(spec, heavy_atoms_only=heavy_atoms_only, progress=False)
    return cache[key]


def evaluate_samples(samples: str | os.PathLike | Sequence[dict], reference: str | None = None,
                     threshold: float = 0.5, progress: bool = True, keep_values: bool = False) -> dict:
    """Score the conformers of an SDF file (see the module docstring).

    Args:
        samples: an SDF path (or records from :func:`read_sdf_records`).
        reference: dataset spec of the reference geometries (``"qm9"``, ``"qm9-extract"``, a path);
            default: each record's ``qm_dataset``. Records without a reference (SMILES input) are
            scored for validity only.
        threshold: coverage threshold (Å).
        progress: tqdm bar over molecules.
        keep_values: also return the raw values under ``"_values"`` (for :func:`plot_evaluation`;
            not JSON output).

    Returns:
        A JSON-serialisable dict: ``coverage`` (COV/AMR), ``connectivity_match``,
        ``reference_connectivity_match``, ``bond_length_w1`` (Å), ``bond_angle_w1`` (degrees),
        ``per_molecule`` (identifier, RMSDs), ``method`` (the properties shared by all records).

    Raises:
        ValueError: a record whose graph or atom count does not match its reference molecule, a
            record without a source identifier, or an unknown reference molecule.
    """
    from qmanifold.models.sampling import graphs_from_dataset, mol_with_coordinates

    path = None
    if isinstance(samples, (str, os.PathLike)):
        path = os.fspath(samples)
        records = read_sdf_records(path)
    else:
        records = list(samples)
    groups: dict[str, list[dict]] = {}
    for rec in records:
        src = rec["props"].get("qm_source")
        if not src:
            where = f"record {rec.get('record', '?')}"
            raise ValueError(f"{path or 'samples'}: {where} has no qm_source property; write samples with "
                             f"`qmanifold sample` / `qmanifold baseline`")
        groups.setdefault(src, []).append(rec)

    ref_cache: dict = {}
    per_molecule = []
    rmsd_lists = []
    gen_len: dict[str, list] = {}
    gen_ang: dict[str, list] = {}
    ref_len: dict[str, list] = {}
    ref_ang: dict[str, list] = {}
    conn_ok = conn_total = 0
    ref_conn_ok = ref_conn_total = 0
    all_rmsd: list[float] = []
    items = list(groups.items())
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="evaluating", unit="mol", dynamic_ncols=True)
    try:
        for src, recs in items:
            props = recs[0]["props"]
            spec = reference or props.get("qm_dataset", "")
            heavy = props.get("qm_heavy_atoms_only", "0") in ("1", "True", "true")
            if heavy:
                recs = [_without_added_hydrogens(r) for r in recs]
            ref_graph = None
            if spec:
                try:
                    index = int(props.get("qm_index", "-1"))
                except ValueError as exc:
                    raise ValueError(f"{src}: malformed qm_index {props.get('qm_index')!r}") from exc
                if index >= 0:
                    ds = _load_reference(spec, heavy, ref_cache)
                    try:
                        row = ds.find(index)
                    except KeyError:
                        raise ValueError(f"{src}: molecule index {index} is not in the reference data {spec!r}") from None
                    ref_graph = graphs_from_dataset(ds, spec, [row])[0]
            entry: dict[str, Any] = {"source": src, "index": int(props.get("qm_index", "-1") or -1),
                                     "smiles": props.get("qm_smiles", ""), "num_samples": len(recs)}
            for rec in recs:
                ok = connectivity_matches(rec["positions"], rec["atomic_numbers"], rec["bond_types"])
                conn_ok += int(ok)
                conn_total += 1
                bl, ba = bond_geometry(rec["positions"], rec["atomic_numbers"], rec["bond_types"])
                _merge_geometry(gen_len, bl)
                _merge_geometry(gen_ang, ba)
            if ref_graph is not None:
                for rec in recs:
                    if rec["atomic_numbers"].shape != ref_graph.atomic_numbers.shape or not np.array_equal(
                            rec["atomic_numbers"], ref_graph.atomic_numbers):
                        raise ValueError(f"{src} (record {rec.get('record', '?')}): atom-count/element mismatch with "
                                         f"the reference molecule ({rec['atomic_numbers'].shape[0]} vs "
                                         f"{ref_graph.num_atoms} atoms)")
                ref_mol = mol_with_coordinates(ref_graph, ref_graph.positions)
                rm = []
                for rec in recs:
                    try:
                        rm.append(best_rmsd(rec["mol"], ref_mol))
                    except ValueError as exc:
                        raise ValueError(f"{src} (record {rec.get('record', '?')}): {exc}") from None
                rm_arr = np.asarray(rm)
                rmsd_lists.append(rm_arr)
                all_rmsd.extend(rm)
                entry.update(rmsd=[round(v, 5) for v in rm], min_rmsd=float(rm_arr.min()),
                             mean_rmsd=float(rm_arr.mean()))
                r_ok = connectivity_matches(ref_graph.positions, ref_graph.atomic_numbers, ref_graph.bond_types)
                ref_conn_ok += int(r_ok)
                ref_conn_total += 1
                bl, ba = bond_geometry(ref_graph.positions, ref_graph.atomic_numbers, ref_graph.bond_types)
                _merge_geometry(ref_len, bl)
                _merge_geometry(ref_ang, ba)
            per_molecule.append(entry)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    shared = {}
    for k, v in records[0]["props"].items():
        if k in _PER_RECORD_PROPS:
            continue
        if all(r["props"].get(k) == v for r in records):
            shared[k] = v
    result: dict[str, Any] = {
        "samples": path, "reference": reference, "threshold": float(threshold),
        "method": shared, "num_records": len(records), "num_molecules": len(groups),
        "num_molecules_with_reference": len(rmsd_lists),
        "coverage": coverage_metrics(rmsd_lists, threshold) if rmsd_lists else None,
        "connectivity_match": conn_ok / conn_total if conn_total else None,
        "reference_connectivity_match": ref_conn_ok / ref_conn_total if ref_conn_total else None,
        "bond_length_w1": distribution_distances(gen_len, ref_len) if ref_len else None,
        "bond_angle_w1": distribution_distances(gen_ang, ref_ang) if ref_ang else None,
        "per_molecule": per_molecule,
    }
    if keep_values:
        result["_values"] = {"rmsd": all_rmsd, "min_rmsd": [float(np.min(r)) for r in rmsd_lists],
                             "gen_lengths": gen_len, "ref_lengths": ref_len, "gen_angles": gen_ang,
                             "ref_angles": ref_ang}
    return result


# ----------------------------------------------------------------------------------------------
# ensemble to ensemble
# ----------------------------------------------------------------------------------------------


def kabsch_rmsd_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """RMSD (Å) after optimal superposition by a proper rotation (Kabsch; reflections excluded, so
    mirror images stay apart), atoms matched by index: ``a`` ``(G, N, 3)``, ``b`` ``(R, N, 3)`` ->
    ``(G, R)``. From the singular values ``s`` of ``A_c^T B_c``:
    ``N rmsd^2 = |A_c|^2 + |B_c|^2 - 2 (s_1 + s_2 + sign(det) s_3)``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 3 or b.ndim != 3 or a.shape[1:] != b.shape[1:] or a.shape[2] != 3:
        raise ValueError(f"kabsch_rmsd_matrix needs (G, N, 3) and (R, N, 3), got {a.shape} and {b.shape}")
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    h = np.einsum("gni,rnj->grij", a, b)
    s = np.linalg.svd(h, compute_uv=False)
    d = np.sign(np.linalg.det(h))
    trace = s[..., 0] + s[..., 1] + np.where(d < 0, -1.0, 1.0) * s[..., 2]
    sq = (a * a).sum((1, 2))[:, None] + (b * b).sum((1, 2))[None, :] - 2.0 * trace
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1])


def evaluate_ensemble(samples: str | os.PathLike | Sequence[dict], reference: str | None = None, *,
                      split: str = "all", threshold: float = 0.5, max_reference: int = 5000, max_rmsd: int = 500,
                      seed: int = 0, progress: bool = True, keep_values: bool = False) -> dict:
    """Ensemble-to-ensemble scoring: the conformers of ONE molecule (an SDF of ``qmanifold sample
    --data ens.npz -n N``) against the conformations of that molecule in ``reference`` (an ensemble
    ``.npz``, e.g. an independent MD run; default: the records' ``qm_dataset``), atoms matched by
    index (the sample keeps the file's atom order; checked).

    Metrics (reference frames: ``split`` of the reference, at most ``max_reference`` of them drawn
    with ``seed``):

    * ``bond_length_w1`` / ``bond_angle_w1``: per-type 1-D W1 as in :func:`evaluate_samples`;
      ``bond_length_w1_pooled``: W1 (Å) of all bond lengths pooled; ``bond_length_w1_per_bond``:
      the mean over bonds of the W1 of each bond's length (atom order makes bonds comparable);
    * ``coverage``: COV/AMR (:func:`coverage_metrics`) on heavy-atom RMSDs after Kabsch superposition
      with atoms matched by index (:func:`kabsch_rmsd_matrix`; no symmetry search) between at most
      ``max_rmsd`` generated and ``max_rmsd`` reference conformers (seeded subsets);
    * ``stereo_match``: fraction of samples whose isomeric SMILES perceived from 3-D equals the
      most common one of (at most 200) reference frames (``reference_stereo``: that SMILES and its
      frequency); a mirror image or an inverted centre counts as a mismatch;
    * ``connectivity_match``: as in :func:`evaluate_samples`.

    Raises:
        ValueError: records of more than one molecule, a reference that is not one molecule, or
            elements / connectivity that differ from the reference in atom order.
    """
    from scipy.stats import wasserstein_distance

    from qmanifold.models.sampling import ensemble_graph, stereo_properties
    from qmanifold.models.training import dataset_split, select_rows

    path = None
    if isinstance(samples, (str, os.PathLike)):
        path = os.fspath(samples)
        records = read_sdf_records(path)
    else:
        records = list(samples)
    if not records:
        raise ValueError("no records to evaluate")
    props = records[0]["props"]
    spec = reference or props.get("qm_dataset", "")
    if not spec:
        raise ValueError(f"{path or 'samples'}: no --reference given and the records name no qm_dataset")
    heavy = props.get("qm_heavy_atoms_only", "0") in ("1", "True", "true")
    if heavy:
        records = [_without_added_hydrogens(r) for r in records]
    z0, conn0 = records[0]["atomic_numbers"], records[0]["bond_types"] > 0
    for rec in records[1:]:
        if not (np.array_equal(rec["atomic_numbers"], z0) and np.array_equal(rec["bond_types"] > 0, conn0)):
            raise ValueError(f"{path or 'samples'}: record {rec.get('record', '?')} is a different molecule (or atom "
                             "order) than record 0; ensemble mode scores the conformers of one molecule")
    ds = dataset_split(_load_reference(spec, heavy, {}), split)
    graph = ensemble_graph(ds, spec)
    if not np.array_equal(graph.atomic_numbers, z0):
        raise ValueError(f"the samples' elements in atom order {_formula_order(z0)} differ from the reference's "
                         f"{_formula_order(graph.atomic_numbers)} ({spec}); ensemble mode matches atoms by index")
    if not np.array_equal(graph.bond_types > 0, conn0):
        raise ValueError(f"the samples' bond graph differs from the reference's ({spec})")
    n_atoms = z0.shape[0]
    ref_all = np.asarray(ds.all_positions, dtype=np.float64).reshape(len(ds), n_atoms, 3)
    rows = select_rows(len(ds), max_reference, seed=seed)
    ref = ref_all[rows]
    gen = np.stack([r["positions"] for r in records])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(records) + len(ref), desc="ensemble geometry", unit="conf", dynamic_ncols=True)
    gen_len: dict[str, list] = {}
    gen_ang: dict[str, list] = {}
    ref_len: dict[str, list] = {}
    ref_ang: dict[str, list] = {}
    conn_ok = 0
    try:
        for rec in records:
            bl, ba = bond_geometry(rec["positions"], z0, rec["bond_types"])
            _merge_geometry(gen_len, bl)
            _merge_geometry(gen_ang, ba)
            conn_ok += int(connectivity_matches(rec["positions"], z0, rec["bond_types"]))
            if bar is not None:
                bar.update(1)
        for x in ref:
            bl, ba = bond_geometry(x, graph.atomic_numbers, graph.bond_types)
            _merge_geometry(ref_len, bl)
            _merge_geometry(ref_ang, ba)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    ii, jj = np.nonzero(np.triu(graph.bond_types, 1))
    lg = np.linalg.norm(gen[:, ii] - gen[:, jj], axis=-1)
    lr = np.linalg.norm(ref[:, ii] - ref[:, jj], axis=-1)
    per_bond = [float(wasserstein_distance(lg[:, k], lr[:, k])) for k in range(ii.size)]
    heavy_idx = np.nonzero(z0 != 1)[0] if np.any(z0 != 1) else np.arange(n_atoms)
    g_sub = gen[select_rows(len(gen), max_rmsd, seed=seed)][:, heavy_idx]
    r_sub = ref[select_rows(len(ref), max_rmsd, seed=seed + 1)][:, heavy_idx]
    rmsd = kabsch_rmsd_matrix(g_sub, r_sub)
    stereo_ref = [stereo_properties(graph, x)["qm_stereo_smiles"] for x in ref[select_rows(len(ref), 200, seed=seed)]]
    values, counts = np.unique(np.asarray(stereo_ref, dtype=object).astype(str), return_counts=True)
    top = str(values[np.argmax(counts)])
    stereo_gen = [stereo_properties(graph, rec["positions"])["qm_stereo_smiles"] for rec in records]
    shared = {k: v for k, v in props.items() if k not in _PER_RECORD_PROPS and all(r["props"].get(k) == v for r in records)}
    result: dict[str, Any] = {
        "mode": "ensemble", "samples": path, "reference": spec, "reference_split": split,
        "threshold": float(threshold), "method": shared, "num_records": len(records), "num_molecules": 1,
        "num_reference_frames": len(ds), "num_reference_frames_used": len(ref),
        "atom_order": "matched by index (checked: same elements and bond graph in the same order)",
        "coverage": dict(coverage_metrics([rmsd], threshold), num_generated=len(g_sub),
                         num_reference=len(r_sub), rmsd="heavy atoms, Kabsch (proper rotations), atoms by index"),
        "connectivity_match": conn_ok / len(records),
        "bond_length_w1": distribution_distances(gen_len, ref_len),
        "bond_angle_w1": distribution_distances(gen_ang, ref_ang),
        "bond_length_w1_pooled": float(wasserstein_distance(lg.ravel(), lr.ravel())),
        "bond_length_w1_per_bond": {"mean": float(np.mean(per_bond)), "max": float(np.max(per_bond)),
                                    "bonds": [[int(i), int(j), w] for i, j, w in zip(ii, jj, per_bond)]},
        "stereo_match": float(np.mean([s == top for s in stereo_gen])),
        "reference_stereo": {"smiles": top, "fraction": float(counts.max() / counts.sum()), "frames": int(counts.sum())},
    }
    if keep_values:
        result["_values"] = {"rmsd": rmsd.ravel().tolist(), "min_rmsd": rmsd.min(1).tolist(), "gen_lengths": gen_len,
                             "ref_lengths": ref_len, "gen_angles": gen_ang, "ref_angles": ref_ang}
    return result


def _formula_order(z: np.ndarray) -> str:
    return "".join(_symbol(int(v)) for v in np.asarray(z)[:12]) + ("..." if len(z) > 12 else "")


# ----------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic strict-JSON write: keys starting with ``_`` at the top level are dropped, NaN and inf
    become ``null`` (:func:`qmanifold.atomic.atomic_write_json`)."""
    from qmanifold.atomic import atomic_write_json

    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if not str(k).startswith("_")}
    atomic_write_json(path, obj)


def _save_figure(fig, path: str) -> None:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, bbox_inches="tight")


def plot_evaluation(result: Mapping[str, Any], out_dir: str | os.PathLike, title: str = "", top: int = 6) -> list[str]:
    """PNG plots of an :func:`evaluate_samples` result computed with ``keep_values=True``.

    Writes ``rmsd_hist.png`` (all and per-molecule best heavy-atom RMSDs, threshold line),
    ``bond_lengths.png`` and ``bond_angles.png`` (the ``top`` most frequent types, generated vs
    reference). Returns the written paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = result.get("_values")
    if vals is None:
        raise ValueError("plot_evaluation needs evaluate_samples(..., keep_values=True)")
    out_dir = os.fspath(out_dir)
    written = []
    if vals["rmsd"]:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        hi = max(max(vals["rmsd"]), result["threshold"]) * 1.05
        bins = np.linspace(0, hi, 40)
        ax.hist(vals["rmsd"], bins=bins, alpha=0.6, label="all generated")
        ax.hist(vals["min_rmsd"], bins=bins, alpha=0.6, label="best per molecule")
        ax.axvline(result["threshold"], color="k", ls="--", lw=1, label=f"threshold {result['threshold']} Å")
        ax.set_xlabel("heavy-atom RMSD to reference (Å)")
        ax.set_ylabel("count")
        ax.set_title(title or "RMSD to reference")
        ax.legend(fontsize=8)
        p = os.path.join(out_dir, "rmsd_hist.png")
        _save_figure(fig, p)
        plt.close(fig)
        written.append(p)
    for name, gk, rk, unit in (("bond_lengths", "gen_lengths", "ref_lengths", "Å"),
                               ("bond_angles", "gen_angles", "ref_angles", "degrees")):
        gen, ref = vals[gk], vals[rk]
        keys = sorted(ref or gen, key=lambda k: -len((ref or gen)[k]))[:top]
        if not keys:
            continue
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, key in zip(axes.ravel(), keys):
            g = np.asarray(gen.get(key, []))
            r = np.asarray(ref.get(key, []))
            both = np.concatenate([g, r]) if (g.size or r.size) else np.zeros(1)
            lo, hi = np.percentile(both, 0.5), np.percentile(both, 99.5)
            if hi <= lo:
                lo, hi = lo - 0.1, hi + 0.1
            bins = np.linspace(lo, hi, 40)
            if g.size:
                ax.hist(np.clip(g, lo, hi), bins=bins, density=True, alpha=0.6, label=f"generated ({g.size})")
            if r.size:
                ax.hist(np.clip(r, lo, hi), bins=bins, density=True, alpha=0.6, label=f"reference ({r.size})")
            ax.set_title(key)
            ax.set_xlabel(unit)
            ax.legend(fontsize=7)
        for ax in axes.ravel()[len(keys):]:
            ax.axis("off")
        fig.suptitle(title or name.replace("_", " "))
        fig.tight_layout()
        p = os.path.join(out_dir, f"{name}.png")
        _save_figure(fig, p)
        plt.close(fig)
        written.append(p)
    return written


def summarize_runs(results: Mapping[str, Sequence[Mapping[str, Any]]],
                   metrics: Sequence[str] = ("COV-R", "AMR-R", "COV-P", "AMR-P")) -> dict:
    """Mean and standard deviation (over seeds) of coverage metrics per method.

    Args:
        results: ``{method: [evaluate_samples result per seed, ...]}``.

    Returns:
        ``{method: {metric: {"mean", "std", "values"}, "seeds": n}}`` (std with ddof=1; 0 for one seed).
        Also ``connectivity_match`` and ``bond_length_w1`` / ``bond_angle_w1`` means.
    """
    table: dict[str, dict] = {}
    for method, runs in results.items():
        row: dict[str, Any] = {"seeds": len(runs)}
        series: dict[str, list[float]] = defaultdict(list)
        for r in runs:
            cov = r.get("coverage") or {}
            for m in metrics:
                if cov.get(m) is not None:  # null in eval.json: not computed / not finite
                    series[m].append(float(cov[m]))
            if r.get("connectivity_match") is not None:
                series["connectivity_match"].append(float(r["connectivity_match"]))
            for key in ("bond_length_w1", "bond_angle_w1"):
                if r.get(key) and r[key].get("mean") is not None:
                    series[key].append(float(r[key]["mean"]))
        for m, v in series.items():
            arr = np.asarray(v)
            row[m] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
                      "values": [float(x) for x in arr]}
        table[method] = row
    return table
