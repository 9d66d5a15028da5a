r"""Classical conformer baseline: RDKit ETKDG (v3), optionally refined with the MMFF94 force field.

The conformers are generated for exactly the molecular graphs that the model samples (same atom
order, same identifiers) and written with :func:`qmanifold.models.sampling.write_sdf`, so
``qmanifold evaluate`` scores both the same way::

    qmanifold baseline --method etkdg --mmff --data qm9 --split test --limit 25 \
        --n-per-molecule 4 --out etkdg.sdf --seed 0

Embedding: ``EmbedMultipleConfs`` with ``ETKDGv3`` and ``randomSeed = seed + i`` for molecule ``i``
(reproducible per molecule); if fewer than ``M`` conformers come back, the missing ones are retried
with explicit stereoisomers, then random starting coordinates (see :func:`etkdg_conformers`). Heavy-atom-only graphs get
hydrogens for the embedding (and the force field), which are removed again afterwards.
MMFF: ``MMFFOptimizeMoleculeConfs`` (``max_iters`` iterations); molecules without MMFF parameters
are left as embedded (counted in the returned statistics).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from qmanifold.models.sampling import MoleculeInputError, MolGraph, template_mol

__all__ = ["METHODS", "etkdg_conformers", "baseline_conformers"]

#: Baseline methods known to :func:`baseline_conformers` / ``qmanifold baseline``.
METHODS = ("etkdg",)


def _embed(mol, k: int, seed: int, random_coords: bool, mmff: bool, max_iters: int, stats: dict) -> list[np.ndarray]:
    """Up to ``k`` ETKDGv3 conformers of a copy of ``mol`` (all atoms, Å), MMFF-optimised if asked."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.Mol(mol)
    m.RemoveAllConformers()
    params = AllChem.ETKDGv3()
    params.randomSeed = int(seed)
    params.numThreads = 1
    params.useRandomCoords = bool(random_coords)
    ids = list(AllChem.EmbedMultipleConfs(m, numConfs=int(k), params=params))
    if not ids:
        return []
    if mmff:
        if AllChem.MMFFHasAllMoleculeParams(m):
            res = AllChem.MMFFOptimizeMoleculeConfs(m, maxIters=int(max_iters), numThreads=1)
            stats["mmff_not_converged"] += sum(1 for conv, _ in res if conv != 0)
        else:
            stats["mmff_missing_params"] += len(ids)
    return [np.asarray(m.GetConformer(i).GetPositions(), dtype=np.float64) for i in ids]


def _stereo_from_reference(graph: MolGraph, mol):
    """A copy of ``mol`` (the template, before hydrogens are added) with its stereo assigned from
    ``graph.positions`` by RDKit ``AssignStereochemistryFrom3D`` (chiral tags and E/Z), or None
    when the graph has no reference geometry or RDKit cannot perceive it."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    if graph.positions is None:
        return None
    pos = np.asarray(graph.positions, dtype=np.float64)
    if pos.shape != (graph.num_atoms, 3) or not np.all(np.isfinite(pos)):
        return None
    m = Chem.Mol(mol)
    m.RemoveAllConformers()
    conf = Chem.Conformer(graph.num_atoms)
    for k in range(graph.num_atoms):
        conf.SetAtomPosition(k, Point3D(*map(float, pos[k])))
    conf.Set3D(True)
    cid = m.AddConformer(conf, assignId=True)
    try:
        Chem.AssignStereochemistryFrom3D(m, confId=cid, replaceExistingTags=True)
    except Exception:  # noqa: BLE001 - RDKit's perception errors have no common base
        return None
    m.RemoveAllConformers()
    return m


def etkdg_conformers(graph: MolGraph, n: int, seed: int = 0, mmff: bool = False, max_iters: int = 500,
                     stereo_from_reference: bool = False) -> tuple[np.ndarray, dict]:
    """``n`` ETKDG conformers of ``graph`` (``(n, N, 3)`` Å, graph atom order) and statistics.

    With ``stereo_from_reference`` the molecule's stereocentres and stereo double bonds are first
    assigned from the reference geometry ``graph.positions`` (RDKit ``AssignStereochemistryFrom3D``),
    so that ETKDG embeds the same stereoisomer as the reference (the one a stereo-aware model is asked
    for); a graph without a usable reference geometry is embedded unassigned and counted in
    ``stereo_from_reference_failed``.

    Fallbacks, in order, when ETKDG returns fewer than ``n`` conformers (counted in the stats):
    explicit stereoisomers of the unassigned stereocentres in a seeded random order
    (``stereo_enumerated``: QM9 SMILES carry no stereo, and for strained cages most random stereo
    assignments cannot be embedded); random starting coordinates (3 tries, ``random_coords``);
    finally repeating the conformers found (``duplicated``).

    Raises:
        MoleculeInputError: no conformer at all could be embedded.
    """
    from rdkit import Chem, RDLogger

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    base = template_mol(graph)
    stats = {"random_coords": 0, "stereo_enumerated": 0, "duplicated": 0, "mmff_missing_params": 0,
             "mmff_not_converged": 0}
    if stereo_from_reference:
        assigned = _stereo_from_reference(graph, base)
        stats["stereo_from_reference_failed"] = int(assigned is None)
        base = base if assigned is None else assigned
    mol = Chem.AddHs(base) if graph.heavy_atoms_only else Chem.Mol(base)
    RDLogger.DisableLog("rdApp.*")
    try:
        confs = _embed(mol, n, seed, False, mmff, max_iters, stats)
        if len(confs) < n:
            from rdkit.Chem.EnumerateStereoisomers import EnumerateStereoisomers, StereoEnumerationOptions

            opts = StereoEnumerationOptions(onlyUnassigned=True, unique=True, maxIsomers=64)
            isomers = list(EnumerateStereoisomers(Chem.Mol(mol), options=opts))
            if len(isomers) > 1:  # only worth it when there are unassigned stereocentres
                order = np.random.default_rng(seed).permutation(len(isomers))
                for k in order.tolist():
                    if len(confs) >= n:
                        break
                    extra = _embed(isomers[k], n - len(confs), seed + 104729 * (k + 1), False, mmff, max_iters, stats)
                    stats["stereo_enumerated"] += len(extra)
                    confs += extra
        for attempt in range(1, 4):
            if len(confs) >= n:
                break
            extra = _embed(mol, n - len(confs), seed + 7919 * attempt, True, mmff, max_iters, stats)
            stats["random_coords"] += len(extra)
            confs += extra
    finally:
        RDLogger.EnableLog("rdApp.*")
    if not confs:
        raise MoleculeInputError(f"{graph.source}: RDKit ETKDG cannot embed this molecule (also not with random "
                                 f"coordinates or explicit stereoisomers)")
    if len(confs) < n:
        stats["duplicated"] += n - len(confs)
        confs = [confs[i % len(confs)] for i in range(n)]
    na = graph.num_atoms
    return np.stack([c[:na] for c in confs[:n]]), stats


def baseline_conformers(graphs: Sequence[MolGraph], n_per_molecule: int, method: str = "etkdg", mmff: bool = False,
                        seed: int = 0, progress: bool = True, stereo_from_reference: bool = False
                        ) -> tuple[list[np.ndarray], dict]:
    """Baseline conformers for each graph (``(M, N_i, 3)`` arrays, Å) and summed statistics.

    ``stereo_from_reference``: assign each molecule's stereo from its reference geometry before
    embedding (see :func:`etkdg_conformers`)."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline method {method!r}; choose one of {list(METHODS)}")
    out = []
    total: dict = {}
    it = graphs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(graphs, desc=f"{method}{'+mmff' if mmff else ''}", unit="mol", dynamic_ncols=True)
    for i, g in enumerate(it):
        confs, stats = etkdg_conformers(g, n_per_molecule, seed=seed + i, mmff=mmff,
                                        stereo_from_reference=stereo_from_reference)
        out.append(confs)
        for k, v in stats.items():
            total[k] = total.get(k, 0) + v
    if total.get("mmff_missing_params"):
        warnings.warn(f"{total['mmff_missing_params']} conformer(s) lack MMFF parameters and were not optimised",
                      stacklevel=2)
    return out, total
