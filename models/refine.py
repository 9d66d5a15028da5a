r"""Complete molecules: hydrogens on heavy-atom conformers, and an optional MMFF94 refinement.

A heavy-atom model generates the heavy atoms only; users want complete molecules. Two steps, both
with RDKit, both stated in every SDF record they touch (``qm_hydrogens``, ``qm_refine``):

* **hydrogens placed** (the default for heavy-atom graphs): ``Chem.AddHs(mol, addCoords=True)``
  puts each hydrogen at the ideal position given its heavy atom's neighbours. The heavy atoms are
  exactly the generated ones.
* **MMFF94 refinement** (``refine="mmff"``): the complete molecule (hydrogens placed as above, or
  the generated ones of an all-atom graph) is minimised with MMFF94 (``max_iters`` iterations).
  Minimisation stays in the basin it starts from, so the conformer the model chose is kept and its
  local geometry (bond lengths, angles, ring puckers) is cleaned up, as ETKDG+MMFF does for ETKDG.
  With ``hydrogens_only=True`` the heavy atoms are held fixed (only the hydrogens relax). A
  minimisation that would change the configuration of a stereocentre or a stereo double bond (which
  happens from strained, nearly planar samples) is not applied: the sampled geometry is kept, with
  the reason in ``qm_refine`` and the count in ``mmff_changed_stereo``.

Heavy-atom indices never change: atom ``k < N`` of every output is graph atom ``k``, hydrogens
added by RDKit follow (``AddHs`` appends them). A molecule without MMFF94 parameters is left
unrefined and counted (``mmff_missing_params``), never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qmanifold.models.sampling import (
    HYDROGENS_GENERATED,
    HYDROGENS_PLACED,
    CompleteConformer,
    mol_with_coordinates,
    template_mol,
)

__all__ = ["REFINEMENTS", "CompleteConformer", "complete_conformer", "refine_conformers"]

#: accepted values of ``refine``
REFINEMENTS = ("none", "mmff")

def complete_conformer(graph, positions: np.ndarray, refine: str = "none", max_iters: int = 500,
                       hydrogens_only: bool = False) -> CompleteConformer:
    """Hydrogens for a heavy-atom conformer (all-atom graphs keep theirs), then optionally MMFF94.

    Args:
        graph: a :class:`~qmanifold.models.sampling.MolGraph`.
        positions: ``(N, 3)`` coordinates of the graph atoms (Å, finite).
        refine: ``"none"`` or ``"mmff"``.
        max_iters: MMFF94 iterations.
        hydrogens_only: MMFF94 with the graph atoms held fixed.
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    if refine not in REFINEMENTS:
        raise ValueError(f"unknown refinement {refine!r}; choose one of {REFINEMENTS}")
    mol = mol_with_coordinates(graph, positions)
    n = graph.num_atoms
    if graph.heavy_atoms_only:
        mol = Chem.AddHs(mol, addCoords=True)
        hydrogens = HYDROGENS_PLACED
    else:
        hydrogens = HYDROGENS_GENERATED
    stats = {"mmff_missing_params": 0, "mmff_not_converged": 0, "mmff_changed_stereo": 0}
    done = "none"
    if refine == "mmff":
        RDLogger.DisableLog("rdApp.*")
        try:
            props = AllChem.MMFFGetMoleculeProperties(mol) if bool(template_sanitized(graph)) else None
            ff = AllChem.MMFFGetMoleculeForceField(mol, props) if props is not None else None
        finally:
            RDLogger.EnableLog("rdApp.*")
        if ff is None:
            stats["mmff_missing_params"] = 1
            done = "none (no MMFF94 parameters for this molecule)"
        else:
            if hydrogens_only:
                for k in range(n):
                    ff.AddFixedPoint(k)
            before = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
            ff.Initialize()
            converged = ff.Minimize(maxIts=int(max_iters)) == 0
            stats["mmff_not_converged"] = int(not converged)
            done = (f"MMFF94, {'hydrogens only' if hydrogens_only else 'all atoms'}, max {int(max_iters)} iterations"
                    f"{'' if converged else ' (not converged)'}")
            # the force field moves the conformer's coordinates in place
            pos = np.asarray(ff.Positions(), dtype=np.float64).reshape(-1, 3)
            if _stereo_signature(graph, pos[:n]) != _stereo_signature(graph, before[:n]):
                stats["mmff_changed_stereo"] = 1
                done = "none (MMFF94 would have changed a stereocentre or E/Z bond; kept the sampled geometry)"
                pos = before
            conf = mol.GetConformer()
            for k in range(mol.GetNumAtoms()):
                conf.SetAtomPosition(k, pos[k].tolist())
    all_pos = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)
    z = np.asarray([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    return CompleteConformer(z, all_pos, all_pos[:n].copy(), hydrogens, done, stats)


def _stereo_signature(graph, positions: np.ndarray) -> tuple:
    """The labels of every potential stereo element of the graph in a geometry (chirality signs and
    cis/trans pairs; :mod:`qmanifold.models.stereo`)."""
    from qmanifold.models.stereo import potential_stereo, stereo_labels

    elements = potential_stereo(graph.atomic_numbers, graph.bond_types, graph.heavy_atoms_only)
    labels = stereo_labels(positions, graph.bond_types, elements)
    return tuple(labels.chirality.tolist()), labels.pairs


def template_sanitized(graph) -> bool:
    """Whether the graph's RDKit template sanitised (MMFF94 typing needs a sanitised molecule)."""
    return bool(template_mol(graph).GetIntProp("_qm_sanitized"))


def refine_conformers(graphs: Sequence, conformers: Sequence[np.ndarray], refine: str = "mmff",
                      max_iters: int = 500, hydrogens_only: bool = False, progress: bool = False
                      ) -> tuple[list[list[CompleteConformer]], dict]:
    """:func:`complete_conformer` for every conformer; returns ``(complete, summed stats)``.

    ``conformers[i]`` is ``(M, N_i, 3)``; ``complete[i][k]`` the complete conformer ``k`` of molecule ``i``.
    """
    out: list[list[CompleteConformer]] = []
    total = {"mmff_missing_params": 0, "mmff_not_converged": 0, "mmff_changed_stereo": 0}
    it = list(zip(graphs, conformers))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"hydrogens{' + ' + refine if refine != 'none' else ''}", unit="mol", dynamic_ncols=True)
    for g, confs in it:
        row = [complete_conformer(g, x, refine, max_iters, hydrogens_only) for x in np.asarray(confs)]
        for c in row:
            for k, v in c.stats.items():
                total[k] += v
        out.append(row)
    return out, total
