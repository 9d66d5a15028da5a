r"""Alanine dipeptide (ACE-ALA-NME) as a Boltzmann target: topology, force field, MD ground truth,
energies of generated samples, and the standard metrics (Ramachandran KL, L-fraction, bond W1).

**Molecule.** The standard 22-atom capped L-alanine dipeptide, built here (nothing downloaded): the
heavy-atom SMILES ``CC(=O)N[C@@H](C)C(=O)NC`` (L-alanine, CIP *S* at CA) with explicit hydrogens,
renumbered to the usual PDB order

====  ======  ====  ======  ====  ======  ====  ======
idx   atom    idx   atom    idx   atom    idx   atom
====  ======  ====  ======  ====  ======  ====  ======
0     H1 ACE  6     N  ALA  12    HB2     18    C  NME
1     CH3     7     H       13    HB3     19    H1
2     H2      8     CA      14    C       20    H2
3     H3      9     HA      15    O       21    H3
4     C       10    CB      16    N  NME
5     O       11    HB1     17    H
====  ======  ====  ======  ====  ======  ====  ======

(:data:`ATOMS`), so ``phi = C(4)-N(6)-CA(8)-C(14)`` and ``psi = N(6)-CA(8)-C(14)-N(16)``. The
OpenMM topology (:func:`topology`) is made from this table and the bond list, and amber99sb-ildn's
residue templates ACE / ALA / NME are matched to it by graph (tested).

**Force field and dynamics.** amber99sb-ildn with OBC implicit solvent (``amber99_obc.xml``), no
cutoff, 300 K. **No constraints** (``constraints=None``): every bond, including those to hydrogen,
is flexible. Generated samples are scored with the same force field, and a model that puts a C-H
bond at 1.05 Å instead of 1.09 Å must be charged the harmonic energy of that error, which a
constrained force field would not do (and bond-length W1 is only meaningful if the reference has a
physical bond-length distribution). The price is a 1 fs time step (the fastest mode, C-H/N-H
stretching, has a period of about 11 fs). Langevin dynamics (OpenMM's ``LangevinMiddleIntegrator``,
friction 1/ps), minimisation, then ``equilibration_ps`` of equilibration, then one frame per ps.
CPU platform with one thread; the velocity and integrator seeds are ``seed + 1`` (OpenMM reads 0 as
"random").

**Units.** Coordinates in Å; energies in kT with ``kT = k_B 300 K = 2.4943 kJ/mol``.

**Metrics** (the functions below, on ``(..., 22, 3)`` arrays):

* :func:`backbone_dihedrals` -> ``(phi, psi)`` in radians, ``(-pi, pi]``;
* :func:`ramachandran_histogram` on ``36 x 36`` periodic bins of 10 degrees (optionally weighted)
  and :func:`ramachandran_kl` ``KL(P_MD || Q_model) = sum_b P_b log(P_b / Q_b)`` where both
  histograms get ``eps = 1e-10`` added to every bin before normalising (empty MD bins contribute 0;
  a bin the MD visits and the model never does contributes ``P_b log(P_b / 1e-10)``, large);
* :func:`l_fraction`: the chirality of CA from the sign of the triple product
  ``(N - CA) . ((C - CA) x (CB - CA))``, which is positive for L-alanine (checked against RDKit's
  CIP label *S* = L of the built structure and of MD frames; tested);
* :func:`bond_length_w1`: the exact 1-D Wasserstein-1 distance (Å) between the bond lengths of
  the model and of MD, pooled over all 21 bonds;
* :func:`evaluate_samples`: all of the above plus, given the model's log-densities, the Kish ESS of
  ``w = exp(-U/kT) / q`` and the reweighted histograms / energy W1.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

import numpy as np

__all__ = [
    "ATOMS",
    "BONDS",
    "SMILES",
    "PHI_ATOMS",
    "PSI_ATOMS",
    "CHIRAL_ATOMS",
    "TEMPERATURE",
    "KT_KJ_PER_MOL",
    "FORMAT_VERSION",
    "reference_structure",
    "topology",
    "pdb_text",
    "openmm_system",
    "EnergyEvaluator",
    "energy",
    "run_md",
    "save_ensemble",
    "load_ensemble",
    "default_path",
    "load_or_generate",
    "dihedral",
    "backbone_dihedrals",
    "ramachandran_histogram",
    "ramachandran_kl",
    "signed_volume",
    "l_fraction",
    "cip_labels",
    "bond_lengths",
    "bond_length_w1",
    "read_samples",
    "sample_with_log_prob",
    "evaluate_samples",
    "write_plots",
]

#: (PDB atom name, residue name, residue number, element) in the file's atom order
ATOMS: tuple[tuple[str, str, int, str], ...] = (
    ("H1", "ACE", 1, "H"), ("CH3", "ACE", 1, "C"), ("H2", "ACE", 1, "H"), ("H3", "ACE", 1, "H"),
    ("C", "ACE", 1, "C"), ("O", "ACE", 1, "O"),
    ("N", "ALA", 2, "N"), ("H", "ALA", 2, "H"), ("CA", "ALA", 2, "C"), ("HA", "ALA", 2, "H"),
    ("CB", "ALA", 2, "C"), ("HB1", "ALA", 2, "H"), ("HB2", "ALA", 2, "H"), ("HB3", "ALA", 2, "H"),
    ("C", "ALA", 2, "C"), ("O", "ALA", 2, "O"),
    ("N", "NME", 3, "N"), ("H", "NME", 3, "H"), ("C", "NME", 3, "C"), ("H1", "NME", 3, "H"),
    ("H2", "NME", 3, "H"), ("H3", "NME", 3, "H"),
)
#: (i, j, order) of the 21 bonds, in ATOMS indices
BONDS: tuple[tuple[int, int, int], ...] = (
    (0, 1, 1), (1, 2, 1), (1, 3, 1), (1, 4, 1), (4, 5, 2), (4, 6, 1), (6, 7, 1), (6, 8, 1), (8, 9, 1),
    (8, 10, 1), (10, 11, 1), (10, 12, 1), (10, 13, 1), (8, 14, 1), (14, 15, 2), (14, 16, 1), (16, 17, 1),
    (16, 18, 1), (18, 19, 1), (18, 20, 1), (18, 21, 1),
)
#: heavy-atom SMILES of L-alanine dipeptide (CA is CIP S)
SMILES = "CC(=O)N[C@@H](C)C(=O)NC"
PHI_ATOMS = (4, 6, 8, 14)
PSI_ATOMS = (6, 8, 14, 16)
#: (CA, N, C, CB): the chirality centre and the three heavy neighbours of the signed volume
CHIRAL_ATOMS = (8, 6, 14, 10)
ATOMIC_NUMBERS = np.array([{"H": 1, "C": 6, "N": 7, "O": 8}[a[3]] for a in ATOMS], dtype=np.int64)
TEMPERATURE = 300.0
#: k_B T at 300 K in kJ/mol (OpenMM's MOLAR_GAS_CONSTANT_R = 8.314462618... J/(mol K))
KT_KJ_PER_MOL = 8.31446261815324e-3 * TEMPERATURE
FORMAT_VERSION = 1
FORCE_FIELD = ("amber99sbildn.xml", "amber99_obc.xml")
DEFAULTS = dict(timestep_fs=1.0, friction_per_ps=1.0, equilibration_ps=100.0, frame_ps=1.0)


# ----------------------------------------------------------------------------------------------
# Topology


def reference_structure(seed: int = 0) -> np.ndarray:
    """One conformation ``(22, 3)`` in Å, ATOMS order: an RDKit ETKDG embedding of :data:`SMILES`
    with hydrogens (seeded), MMFF-relaxed. Only a starting point for the MD."""
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(SMILES))
    heavy_to_new = {0: 1, 1: 4, 2: 5, 3: 6, 4: 8, 5: 10, 6: 14, 7: 15, 8: 16, 9: 18}
    order = [-1] * mol.GetNumAtoms()  # order[new] = old
    for old, new in heavy_to_new.items():
        order[new] = old
        hs = sorted(a.GetIdx() for a in mol.GetAtomWithIdx(old).GetNeighbors() if a.GetAtomicNum() == 1)
        slots = [k for k, (_, _, _, el) in enumerate(ATOMS) if el == "H"
                 and any((min(k, new), max(k, new)) == (min(i, j), max(i, j)) for i, j, _ in BONDS if k in (i, j))]
        for k, h in zip(slots, hs, strict=True):
            order[k] = h
    mol = Chem.RenumberAtoms(mol, order)
    if AllChem.EmbedMolecule(mol, randomSeed=int(seed)) != 0:
        raise RuntimeError("RDKit could not embed alanine dipeptide")
    AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    return np.asarray(mol.GetConformer().GetPositions(), dtype=np.float64)


def topology():
    """The OpenMM ``Topology`` of :data:`ATOMS` / :data:`BONDS` (residues ACE 1, ALA 2, NME 3)."""
    from openmm import app

    top = app.Topology()
    chain = top.addChain("A")
    residues, atoms = {}, []
    for name, res, num, el in ATOMS:
        if num not in residues:
            residues[num] = top.addResidue(res, chain, id=str(num))
        atoms.append(top.addAtom(name, app.Element.getBySymbol(el), residues[num]))
    for i, j, order in BONDS:
        top.addBond(atoms[i], atoms[j], type=app.Double if order == 2 else app.Single, order=order)
    return top


def pdb_text(positions: np.ndarray | None = None) -> str:
    """A PDB file (text) of the molecule at ``positions`` ``(22, 3)`` Å (default: the reference structure)."""
    import io

    from openmm import app, unit

    pos = reference_structure() if positions is None else np.asarray(positions, dtype=np.float64)
    buf = io.StringIO()
    app.PDBFile.writeFile(topology(), (pos / 10.0) * unit.nanometer, buf, keepIds=True)
    return buf.getvalue()


def openmm_system():
    """amber99sb-ildn + OBC implicit solvent, no cutoff, no constraints (module docstring)."""
    from openmm import app

    ff = app.ForceField(*FORCE_FIELD)
    return ff.createSystem(topology(), nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False)


def _cpu_platform(threads: int = 1):
    import openmm as mm

    return mm.Platform.getPlatformByName("CPU"), {"Threads": str(int(threads))}


# ----------------------------------------------------------------------------------------------
# Energies of arbitrary configurations


class EnergyEvaluator:
    """``U(x) / kT`` of configurations through OpenMM (one context, frames set one at a time).

    ``evaluator(x)``: ``(..., 22, 3)`` Å (numpy or torch) -> ``(...)`` float64 numpy. Frames with
    non-finite coordinates, or whose energy OpenMM returns as NaN/inf or fails on, get ``+inf``
    (weight 0 in reweighting). The loop is over frames (about 20 us each for this molecule).
    """

    def __init__(self, threads: int = 1, platform: str = "CPU"):
        import openmm as mm

        self._mm = mm
        self.system = openmm_system()
        integ = mm.VerletIntegrator(0.001)
        if platform == "CPU":
            plat, props = _cpu_platform(threads)
            self.context = mm.Context(self.system, integ, plat, props)
        else:
            self.context = mm.Context(self.system, integ, mm.Platform.getPlatformByName(platform))
        self._integ = integ

    def __call__(self, x) -> np.ndarray:
        from openmm import unit

        arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        arr = np.asarray(arr, dtype=np.float64)
        if arr.shape[-2:] != (len(ATOMS), 3):
            raise ValueError(f"alanine dipeptide energies need shape (..., {len(ATOMS)}, 3) in Å, got {arr.shape}")
        flat = arr.reshape(-1, len(ATOMS), 3)
        out = np.full(flat.shape[0], np.inf)
        for k, frame in enumerate(flat):
            if not np.isfinite(frame).all():
                continue
            try:
                self.context.setPositions(frame / 10.0)
                e = self.context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            except Exception:  # noqa: BLE001 - OpenMM raises for pathological coordinates; score them +inf
                e = math.inf
            if math.isfinite(e):
                out[k] = e / KT_KJ_PER_MOL
        return out.reshape(arr.shape[:-2])


_EVALUATOR: EnergyEvaluator | None = None


def energy(x) -> np.ndarray:
    """``U(x)/kT`` of ``(..., 22, 3)`` Å configurations (a cached :class:`EnergyEvaluator`, one thread)."""
    global _EVALUATOR
    if _EVALUATOR is None:
        _EVALUATOR = EnergyEvaluator()
    return _EVALUATOR(x)


# ----------------------------------------------------------------------------------------------
# MD ground truth


def run_md(
    ns: float,
    *,
    seed: int = 0,
    timestep_fs: float = DEFAULTS["timestep_fs"],
    friction_per_ps: float = DEFAULTS["friction_per_ps"],
    equilibration_ps: float = DEFAULTS["equilibration_ps"],
    frame_ps: float = DEFAULTS["frame_ps"],
    threads: int = 1,
    log: Callable[[str], None] = print,
    progress_every_ps: float = 1000.0,
) -> dict:
    """Langevin MD of the module docstring. Returns ``dict(positions (F, 22, 3) Å float32, energy (F,)
    kT float64, time_ps (F,), meta)`` with ``F = round(ns * 1000 / frame_ps)`` frames."""
    import openmm as mm
    from openmm import unit

    if not ns > 0:
        raise ValueError(f"ns must be positive, got {ns}")
    steps_per_frame = round(frame_ps * 1000.0 / timestep_fs)
    n_frames = round(ns * 1000.0 / frame_ps)
    if steps_per_frame < 1 or n_frames < 1:
        raise ValueError(f"no frames: ns={ns}, frame_ps={frame_ps}, timestep_fs={timestep_fs}")
    t0 = time.time()
    system = openmm_system()
    integ = mm.LangevinMiddleIntegrator(TEMPERATURE * unit.kelvin, friction_per_ps / unit.picosecond,
                                        timestep_fs * unit.femtosecond)
    integ.setRandomNumberSeed(int(seed) + 1)
    plat, props = _cpu_platform(threads)
    ctx = mm.Context(system, integ, plat, props)
    ctx.setPositions(reference_structure(seed) / 10.0)
    mm.LocalEnergyMinimizer.minimize(ctx, 1.0, 2000)
    ctx.setVelocitiesToTemperature(TEMPERATURE * unit.kelvin, int(seed) + 1)
    eq_steps = round(equilibration_ps * 1000.0 / timestep_fs)
    if eq_steps:
        integ.step(eq_steps)
    t_eq = time.time() - t0
    pos = np.empty((n_frames, len(ATOMS), 3), dtype=np.float32)
    en = np.empty(n_frames, dtype=np.float64)
    every = max(1, round(progress_every_ps / frame_ps))
    t1 = time.time()
    for f in range(n_frames):
        integ.step(steps_per_frame)
        st = ctx.getState(getPositions=True, getEnergy=True)
        pos[f] = st.getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        en[f] = st.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / KT_KJ_PER_MOL
        if (f + 1) % every == 0:
            el = time.time() - t1
            log(f"[aldp] seed {seed}: {(f + 1) * frame_ps / 1000.0:.3f} ns of {ns} ({el:.0f} s, "
                f"{(f + 1) * frame_ps / 1000.0 / el * 86400.0:.1f} ns/day)")
    t_prod = time.time() - t1
    phi, _psi = backbone_dihedrals(pos.astype(np.float64))
    meta = dict(
        format_version=FORMAT_VERSION, system="aldp", molecule="alanine dipeptide (ACE-ALA-NME), L-alanine",
        smiles=SMILES, atom_names=[f"{r}{n}:{a}" for a, r, n, _ in ATOMS],
        force_field=list(FORCE_FIELD), nonbonded="NoCutoff", constraints="none (all bonds flexible)",
        temperature_K=TEMPERATURE, kT_kJ_per_mol=KT_KJ_PER_MOL, energy_unit="kT", length_unit="angstrom",
        integrator="LangevinMiddleIntegrator", timestep_fs=timestep_fs, friction_per_ps=friction_per_ps,
        equilibration_ps=equilibration_ps, frame_ps=frame_ps, steps_per_frame=steps_per_frame, ns=float(ns),
        n_frames=n_frames, seed=int(seed), openmm_seed=int(seed) + 1, platform="CPU", threads=int(threads),
        openmm_version=mm.__version__, seconds_equilibration=t_eq, seconds_production=t_prod,
        ns_per_day=ns / t_prod * 86400.0, mean_energy=float(en.mean()), std_energy=float(en.std()),
        phi_positive_fraction=float((phi > 0).mean()),
    )
    return dict(positions=pos, energy=en, time_ps=(np.arange(n_frames) + 1) * frame_ps, meta=meta)


def save_ensemble(path: str | os.PathLike, md: dict) -> None:
    """Write an MD result as an ensemble ``.npz`` readable by
    :func:`qmanifold.models.data.io.load_npz_ensemble` (``positions`` Å, ``atomic_numbers``,
    ``bonds`` ``(21, 3)`` rows ``(i, j, order)``, ``smiles``, ``charge``) plus ``energy`` (kT),
    ``time_ps`` and ``meta`` (a JSON string)."""
    from qmanifold.models.data.dataset import atomic_savez

    arrays = dict(positions=np.asarray(md["positions"], dtype=np.float32), atomic_numbers=ATOMIC_NUMBERS,
                  bonds=np.asarray(BONDS, dtype=np.int64), smiles=np.asarray(SMILES),
                  charge=np.asarray(0, dtype=np.int64), energy=np.asarray(md["energy"], dtype=np.float64),
                  time_ps=np.asarray(md["time_ps"], dtype=np.float64), meta=np.asarray(json.dumps(md["meta"])))
    atomic_savez(path, arrays, compressed=True)


def load_ensemble(path: str | os.PathLike) -> dict:
    """Read a file of :func:`save_ensemble`: ``dict(positions (F, 22, 3) float64, energy, time_ps, meta)``.
    A plain ensemble file without energies/meta (any ``positions`` ``(F, 22, 3)``) gets ``energy``
    None and ``meta`` {}; ValueError on a wrong shape."""
    from qmanifold.models.data.dataset import read_npz

    z = read_npz(path)
    if "positions" not in z:
        raise ValueError(f"{path}: no 'positions' field; not an alanine-dipeptide ensemble")
    pos = np.asarray(z["positions"], dtype=np.float64)
    if pos.ndim == 2:
        pos = pos[None]
    if pos.shape[1:] != (len(ATOMS), 3):
        raise ValueError(f"{path}: positions have shape {pos.shape}, expected (F, {len(ATOMS)}, 3) in the "
                         "alanine-dipeptide atom order of qmanifold.models.boltzmann.aldp.ATOMS")
    if "atomic_numbers" in z and not np.array_equal(np.asarray(z["atomic_numbers"]).astype(np.int64), ATOMIC_NUMBERS):
        raise ValueError(f"{path}: atomic_numbers {np.asarray(z['atomic_numbers']).tolist()} are not the "
                         f"alanine-dipeptide order {ATOMIC_NUMBERS.tolist()}")
    meta = json.loads(str(z["meta"])) if "meta" in z else {}
    return dict(positions=pos, energy=np.asarray(z["energy"], dtype=np.float64) if "energy" in z else None,
                time_ps=np.asarray(z["time_ps"]) if "time_ps" in z else None, meta=meta)


def default_path(ns: float, seed: int) -> str:
    """``$QMANIFOLD_CACHE/boltzmann/aldp_<ns>ns_seed<seed>.npz`` (default ``~/.cache/qmanifold``)."""
    root = os.environ.get("QMANIFOLD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qmanifold")
    return os.path.join(root, "boltzmann", f"aldp_{ns:g}ns_seed{seed}.npz")


def load_or_generate(ns: float, path: str | None = None, *, seed: int = 0, overwrite: bool = False,
                     log=print, **options) -> tuple[dict, str, bool]:
    """The cached MD at ``path`` if it was made with the same ns, seed and MD settings (time step,
    friction, equilibration, frame interval; unspecified ones at their defaults), else run and save
    it. Returns ``(md, path, cached)``; ValueError if ``path`` holds a different run and not ``overwrite``."""
    path = path or default_path(ns, seed)
    if os.path.exists(path) and not overwrite:
        md = load_ensemble(path)
        settings = {k: float(DEFAULTS[k] if options.get(k) is None else options[k]) for k in DEFAULTS}
        want = dict(system="aldp", ns=float(ns), seed=int(seed), **settings)
        got = {k: md["meta"].get(k) for k in want}
        if got != want:
            raise ValueError(f"{path} holds a different data set ({got}, wanted {want}); pass --overwrite to "
                             "replace it or choose another --out")
        return md, path, True
    md = run_md(ns, seed=seed, log=log, **{k: v for k, v in options.items() if v is not None})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_ensemble(path, md)
    return md, path, False


# ----------------------------------------------------------------------------------------------
# Metrics


def dihedral(x: np.ndarray, i: int, j: int, k: int, m: int) -> np.ndarray:
    """Dihedral angle ``i-j-k-m`` of ``(..., N, 3)`` in radians, ``(-pi, pi]`` (IUPAC sign: positive
    for a clockwise rotation of the far bond seen along ``j -> k``): ``atan2(|b2| b1 . n2, n1 . n2)``
    with ``b1 = x_j - x_i``, ``b2 = x_k - x_j``, ``b3 = x_m - x_k``, ``n1 = b1 x b2``, ``n2 = b2 x b3``
    (``n1 x n2 = b2 (b1 . (b2 x b3))``, so the sine part is ``|b2| b1 . (b2 x b3)``)."""
    x = np.asarray(x, dtype=np.float64)
    b1, b2, b3 = x[..., j, :] - x[..., i, :], x[..., k, :] - x[..., j, :], x[..., m, :] - x[..., k, :]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * np.einsum("...i,...i->...", b1, n2)
    return np.arctan2(y, np.einsum("...i,...i->...", n1, n2))


def backbone_dihedrals(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(phi, psi)`` of ``(..., 22, 3)`` configurations in radians (:data:`PHI_ATOMS`, :data:`PSI_ATOMS`)."""
    return dihedral(x, *PHI_ATOMS), dihedral(x, *PSI_ATOMS)


def ramachandran_histogram(phi: np.ndarray, psi: np.ndarray, weights: np.ndarray | None = None,
                           bins: int = 36) -> np.ndarray:
    """Normalised ``(bins, bins)`` histogram of ``(phi, psi)`` on the torus ``[-pi, pi)^2`` (periodic:
    angles are wrapped first, so ``pi`` falls in the first bin). Non-finite angles or weights are
    dropped; ValueError if nothing is left."""
    phi, psi = np.asarray(phi, dtype=np.float64).ravel(), np.asarray(psi, dtype=np.float64).ravel()
    w = np.ones_like(phi) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not (phi.shape == psi.shape == w.shape):
        raise ValueError(f"phi, psi and weights must have the same length, got {phi.shape}, {psi.shape}, {w.shape}")
    ok = np.isfinite(phi) & np.isfinite(psi) & np.isfinite(w) & (w > 0)
    if not ok.any() or w[ok].sum() <= 0:
        raise ValueError("no finite (phi, psi) with positive weight to histogram")
    wrap = lambda a: np.mod(a + np.pi, 2.0 * np.pi)
    ia = np.minimum((wrap(phi[ok]) / (2.0 * np.pi) * bins).astype(np.int64), bins - 1)
    ib = np.minimum((wrap(psi[ok]) / (2.0 * np.pi) * bins).astype(np.int64), bins - 1)
    h = np.zeros((bins, bins))
    np.add.at(h, (ia, ib), w[ok])
    return h / h.sum()


def ramachandran_kl(p: np.ndarray, q: np.ndarray, eps: float = 1e-10) -> float:
    """``KL(P || Q) = sum_b P_b log(P_b / Q_b)`` of two histograms (P = MD, Q = model), each with
    ``eps`` added to every bin and renormalised (so bins P leaves empty add ~0 and an empty Q bin
    costs ``P_b log(P_b / eps)``). ``KL(P || P) = 0``."""
    p = np.asarray(p, dtype=np.float64) + eps
    q = np.asarray(q, dtype=np.float64) + eps
    if p.shape != q.shape:
        raise ValueError(f"histograms must have the same shape, got {p.shape} and {q.shape}")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def signed_volume(x: np.ndarray, center: int = CHIRAL_ATOMS[0], a: int = CHIRAL_ATOMS[1], b: int = CHIRAL_ATOMS[2],
                  c: int = CHIRAL_ATOMS[3]) -> np.ndarray:
    """``(x_a - x_o) . ((x_b - x_o) x (x_c - x_o))`` (Å^3) of ``(..., N, 3)``; ``o`` = ``center``.
    For CA with (N, C, CB) it is positive for L-alanine (CIP S); a reflection flips its sign."""
    x = np.asarray(x, dtype=np.float64)
    o = x[..., center, :]
    return np.einsum("...i,...i->...", x[..., a, :] - o, np.cross(x[..., b, :] - o, x[..., c, :] - o))


def l_fraction(x: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Fraction (optionally weighted) of configurations whose CA is L (``signed_volume > 0``)."""
    v = signed_volume(x).ravel()
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    ok = np.isfinite(v) & np.isfinite(w)
    return float((w[ok] * (v[ok] > 0)).sum() / w[ok].sum()) if w[ok].sum() > 0 else float("nan")


def cip_labels(x: np.ndarray) -> list[str]:
    """RDKit's CIP label (``"R"``/``"S"``, ``"?"`` if none) of CA for each ``(22, 3)`` frame of ``x``,
    stereo assigned from the 3D coordinates (the reference for :func:`l_fraction`: L-alanine is S)."""
    from rdkit import Chem
    from rdkit.Chem import rdCIPLabeler
    from rdkit.Geometry import Point3D

    rw = Chem.RWMol()
    for z in ATOMIC_NUMBERS:
        rw.AddAtom(Chem.Atom(int(z)))
    for i, j, order in BONDS:
        rw.AddBond(i, j, Chem.BondType.DOUBLE if order == 2 else Chem.BondType.SINGLE)
    mol = rw.GetMol()
    Chem.SanitizeMol(mol)
    out = []
    for frame in np.asarray(x, dtype=np.float64).reshape(-1, len(ATOMS), 3):
        m = Chem.Mol(mol)
        conf = Chem.Conformer(len(ATOMS))
        for k, p in enumerate(frame):
            conf.SetAtomPosition(k, Point3D(*map(float, p)))
        m.AddConformer(conf, assignId=True)
        Chem.AssignStereochemistryFrom3D(m)
        rdCIPLabeler.AssignCIPLabels(m)
        a = m.GetAtomWithIdx(CHIRAL_ATOMS[0])
        out.append(a.GetProp("_CIPCode") if a.HasProp("_CIPCode") else "?")
    return out


def bond_lengths(x: np.ndarray) -> np.ndarray:
    """Lengths ``(..., 21)`` (Å) of :data:`BONDS`."""
    x = np.asarray(x, dtype=np.float64)
    i = np.array([b[0] for b in BONDS])
    j = np.array([b[1] for b in BONDS])
    return np.linalg.norm(x[..., i, :] - x[..., j, :], axis=-1)


def _w1(a: np.ndarray, b: np.ndarray, wa: np.ndarray | None = None) -> float:
    import torch

    from qmanifold.boltzmann import wasserstein_1d

    ta = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)
    tb = torch.as_tensor(np.ascontiguousarray(b), dtype=torch.float64)
    tw = None if wa is None else torch.as_tensor(np.ascontiguousarray(wa), dtype=torch.float64)
    return float(wasserstein_1d(ta, tb, a_weights=tw))


def bond_length_w1(x_model: np.ndarray, x_ref: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact W1 (Å) between the bond lengths of ``x_model`` and ``x_ref`` pooled over all 21 bonds
    (``weights``: per-configuration importance weights of the model samples, optional)."""
    bm, br = bond_lengths(x_model), bond_lengths(x_ref)
    w = None if weights is None else np.repeat(np.asarray(weights, dtype=np.float64), bm.shape[-1])
    return _w1(bm.ravel(), br.ravel(), w)


# ----------------------------------------------------------------------------------------------
# Evaluation of generated samples


def read_samples(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Configurations ``(S, 22, 3)`` Å (and ``log_q`` ``(S,)`` if the file has one) from an SDF of
    ``qmanifold sample`` (atoms must be in :data:`ATOMS` order; checked) or an ``.npz`` with
    ``positions`` (optional ``log_q``)."""
    path = os.fspath(path)
    if path.lower().endswith(".sdf"):
        from qmanifold.models.evaluation import read_sdf_records

        recs = read_sdf_records(path)
        for r in recs:
            if not np.array_equal(r["atomic_numbers"], ATOMIC_NUMBERS):
                raise ValueError(f"{path}: record {r['record']} has elements {r['atomic_numbers'].tolist()}, not "
                                 f"alanine dipeptide in the atom order of aldp.ATOMS {ATOMIC_NUMBERS.tolist()} "
                                 "(sample with `qmanifold sample --data <aldp .npz> -n N`, which keeps the order)")
        return np.stack([r["positions"] for r in recs]), None
    from qmanifold.models.data.dataset import read_npz

    z = read_npz(path)
    lq = np.asarray(z["log_q"], dtype=np.float64) if "log_q" in z else None
    return load_ensemble(path)["positions"], lq


def _log_q_from_file(path: str | os.PathLike, n: int) -> np.ndarray:
    """``(n,)`` model log-densities from ``.npy`` or ``.npz`` (field ``log_q``)."""
    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        lq = np.load(path, allow_pickle=False)
    else:
        from qmanifold.models.data.dataset import read_npz

        z = read_npz(path)
        if "log_q" not in z:
            raise ValueError(f"{path}: no field 'log_q' (the model's log-densities of the samples)")
        lq = z["log_q"]
    lq = np.asarray(lq, dtype=np.float64).ravel()
    if lq.shape[0] != n:
        raise ValueError(f"{path}: {lq.shape[0]} log-densities for {n} samples")
    return lq


def evaluate_samples(x_model: np.ndarray, x_ref: np.ndarray, *, e_ref: np.ndarray | None = None,
                     log_q: np.ndarray | None = None, e_model: np.ndarray | None = None, bins: int = 36,
                     eps: float = 1e-10) -> tuple[dict, dict]:
    """All ALDP metrics of model samples against reference MD (module docstring).

    Args:
        x_model: ``(S, 22, 3)`` Å generated configurations (ATOMS order).
        x_ref: ``(F, 22, 3)`` Å reference MD frames (an independent run).
        e_ref: ``(F,)`` their energies in kT (default: recomputed with :func:`energy`).
        log_q: ``(S,)`` the model's log-densities of ``x_model`` (on the same coordinates, Å):
            enables the importance weights ``w = exp(-U/kT) / q``, the Kish ESS and the reweighted metrics.
        e_model: ``(S,)`` model energies in kT if already known (default: :func:`energy`).

    Returns:
        ``(results, arrays)``: the JSON record and the arrays of the plots.
    """
    import torch

    from qmanifold.boltzmann import importance_log_weights, kish_ess, self_normalized_weights

    x_model = np.asarray(x_model, dtype=np.float64)
    x_ref = np.asarray(x_ref, dtype=np.float64)
    for name, x in (("x_model", x_model), ("x_ref", x_ref)):
        if x.ndim != 3 or x.shape[1:] != (len(ATOMS), 3):
            raise ValueError(f"{name} must have shape (S, {len(ATOMS)}, 3) in Å, got {x.shape}")
    e_model = energy(x_model) if e_model is None else np.asarray(e_model, dtype=np.float64)
    e_ref = energy(x_ref) if e_ref is None else np.asarray(e_ref, dtype=np.float64)
    phi_m, psi_m = backbone_dihedrals(x_model)
    phi_r, psi_r = backbone_dihedrals(x_ref)
    h_ref = ramachandran_histogram(phi_r, psi_r, bins=bins)
    h_model = ramachandran_histogram(phi_m, psi_m, bins=bins)
    finite = np.isfinite(e_model)
    cap = float(e_ref.max())
    res: dict = dict(
        system="aldp", n_samples=len(x_model), n_reference=len(x_ref),
        conventions=dict(
            units="angstrom, kT at 300 K", bins=f"{bins} x {bins} periodic bins of (phi, psi) on [-pi, pi)^2",
            kl=f"KL(MD || model) = sum P log(P / Q), eps = {eps:g} added to every bin of both histograms, renormalised",
            l_fraction="sign of (N - CA) . ((C - CA) x (CB - CA)) > 0 (CIP S = L-alanine)",
            bond_w1="W1 (angstrom) of the 21 bond lengths pooled", energy="amber99sb-ildn + OBC, no cutoff, flexible bonds"),
        ramachandran_kl=ramachandran_kl(h_ref, h_model, eps),
        l_fraction=l_fraction(x_model), l_fraction_reference=l_fraction(x_ref),
        bond_length_w1=bond_length_w1(x_model, x_ref),
        phi_positive_fraction=float(np.mean(phi_m > 0)), phi_positive_fraction_reference=float(np.mean(phi_r > 0)),
        nonfinite_energy_fraction=float(np.mean(~finite)),
        high_energy_fraction=float(np.mean(~(e_model <= cap))),
        energy_w1=_w1(np.where(finite, e_model, np.inf), e_ref) if finite.all() else float("inf"),
        energy_w1_clipped=_w1(np.minimum(np.where(finite, e_model, cap), cap), e_ref),
        mean_energy_model=float(e_model[finite].mean()) if finite.any() else float("nan"),
        mean_energy_reference=float(e_ref.mean()),
    )
    arrays = dict(phi_m=phi_m, psi_m=psi_m, phi_r=phi_r, psi_r=psi_r, e_model=e_model, e_ref=e_ref, h_ref=h_ref,
                  h_model=h_model)
    if log_q is not None:
        log_q = np.asarray(log_q, dtype=np.float64).ravel()
        if log_q.shape[0] != len(x_model):
            raise ValueError(f"log_q has {log_q.shape[0]} entries for {len(x_model)} samples")
        log_w = importance_log_weights(torch.from_numpy(e_model), torch.from_numpy(log_q), 1.0)
        ess = float(kish_ess(log_w))
        w = self_normalized_weights(log_w).numpy()
        res.update(ess=ess, ess_percent=100.0 * ess)
        if ess > 0:
            h_rw = ramachandran_histogram(phi_m, psi_m, weights=w, bins=bins)
            res.update(ramachandran_kl_reweighted=ramachandran_kl(h_ref, h_rw, eps),
                       l_fraction_reweighted=l_fraction(x_model, w),
                       bond_length_w1_reweighted=bond_length_w1(x_model, x_ref, w),
                       energy_w1_reweighted=_w1(np.where(finite, e_model, cap), e_ref, w),
                       mean_energy_reweighted=float((w[finite] * e_model[finite]).sum()))
            arrays["h_reweighted"] = h_rw
        arrays.update(weights=w, log_w=log_w.numpy())
    return res, arrays


def _free_energy(h: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        f = -np.log(h)
    return f - np.min(f[np.isfinite(f)]) if np.isfinite(f).any() else f


def write_plots(directory: str | os.PathLike, results: dict, arrays: dict) -> list[str]:
    """PNG plots: Ramachandran free energies ``-log p(phi, psi)`` (kT) of MD, the model and (with
    log-densities) the reweighted model; energy histograms before/after reweighting; log-weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    paths = []
    panels = [("MD (reference)", arrays["h_ref"]), (f"model (KL {results['ramachandran_kl']:.3f})", arrays["h_model"])]
    if "h_reweighted" in arrays:
        panels.append((f"reweighted (KL {results['ramachandran_kl_reweighted']:.3f}, ESS {results['ess_percent']:.1f} %)",
                       arrays["h_reweighted"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.0, 3.6), squeeze=False,
                             constrained_layout=True)
    for ax, (title, h) in zip(axes[0], panels):
        f = _free_energy(h)
        im = ax.imshow(np.where(np.isfinite(f), f, np.nan).T, origin="lower", extent=(-180, 180, -180, 180),
                       cmap="viridis", vmin=0, vmax=10, aspect="equal")
        ax.set_xlabel("phi (deg)")
        ax.set_ylabel("psi (deg)")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="free energy -log p (kT)", shrink=0.85)
    paths.append(os.path.join(directory, "aldp_ramachandran.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    e_ref, e_model = arrays["e_ref"], arrays["e_model"]
    lo, hi = np.percentile(e_ref, [0.05, 99.95])
    pad = 0.15 * (hi - lo)
    b = np.linspace(lo - pad, hi + pad, 80)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(np.clip(e_ref, b[0], b[-1]), bins=b, density=True, histtype="stepfilled", alpha=0.35, color="k", label="MD")
    ok = np.isfinite(e_model)
    ax.hist(np.clip(e_model[ok], b[0], b[-1]), bins=b, density=True, histtype="step", lw=1.5,
            label=f"model (W1 clipped {results['energy_w1_clipped']:.2f})")
    if "weights" in arrays and results.get("ess", 0) > 0:
        ax.hist(np.clip(e_model[ok], b[0], b[-1]), bins=b, weights=arrays["weights"][ok], density=True, histtype="step",
                lw=1.5, label=f"reweighted (W1 {results['energy_w1_reweighted']:.2f})")
    ax.set_xlabel("energy U/kT (values outside clipped to the edges)")
    ax.set_ylabel("density")
    ax.set_title("alanine dipeptide: energies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(directory, "aldp_energy.png"))
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if "log_w" in arrays:
        lw = arrays["log_w"][np.isfinite(arrays["log_w"])]
        fig, ax = plt.subplots(figsize=(6, 4))
        if lw.size:
            ax.hist(lw - lw.max(), bins=60, color="C2")
        ax.set_xlabel("log w - max log w   (w = exp(-U/kT) / q)")
        ax.set_ylabel("count")
        fig.tight_layout()
        paths.append(os.path.join(directory, "aldp_log_weights.png"))
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def sample_with_log_prob(checkpoint: str | os.PathLike, data: str | os.PathLike, n: int, *, steps: int = 20,
                         method: str = "rk4", estimator: str = "exact", seed: int = 0, batch_size: int = 100,
                         divergence_chunk: int | None = None, use_ema: bool = True, probes: int = 1,
                         log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """``n`` configurations ``(n, 22, 3)`` Å of a molecular checkpoint (``qmanifold train --data
    <aldp .npz>``, e.g. ``chiral_egnn``) with their log-densities ``log q`` ``(n,)`` on the
    centre-of-mass-free subspace of ``R^66`` (``QuotientDiffusion.sample(return_log_prob=True,
    space="total")``; probability-flow ODE, ``method`` with ``steps`` steps; ``estimator="exact"``
    costs 66 vector-Jacobian products per evaluation, ``"hutchinson"`` one, but its noise biases
    the ESS down; ``probes`` Hutchinson probes per evaluation divide that noise's variance). Coordinates are Å throughout (the molecular models do not rescale), so ``log q`` is
    per Å^63 and ``exp(-U/kT) / q`` are the importance weights. No stereo redraws or repairs: the
    samples are the model's own distribution (the L-fraction measures its chirality)."""
    import torch

    from qmanifold.models.sampling import _collate_graphs, ensemble_graph
    from qmanifold.models.training import diffusion_from_checkpoint, load_checkpoint, load_molecules

    ck = load_checkpoint(checkpoint, map_location="cpu")
    qd = diffusion_from_checkpoint(ck, device="cpu", use_ema=use_ema)
    info = ck["data"]
    if bool(info.get("heavy_atoms_only", False)):
        raise ValueError(f"{checkpoint} was trained on heavy atoms only; the force field needs all 22 atoms")
    graph = ensemble_graph(load_molecules(os.fspath(data), elements=info["elements"], progress=False), os.fspath(data))
    if not np.array_equal(graph.atomic_numbers, ATOMIC_NUMBERS):
        raise ValueError(f"{data} is not alanine dipeptide in the atom order of aldp.ATOMS")
    params = list(qd.denoiser.parameters())
    dtype = params[0].dtype
    stereo_elements = None
    if bool(getattr(qd.denoiser, "stereo_aware", False)):
        n_types = getattr(qd.denoiser, "num_atom_types", None)
        stereo_elements = int(getattr(qd.denoiser, "num_elements", 0) or (n_types or 0) // 3)
    if divergence_chunk is None:  # about 4096 replicated configurations per network call
        divergence_chunk = max(1, 4096 // max(1, min(int(batch_size), int(n))))
    gen = torch.Generator().manual_seed(int(seed))
    xs, lqs = [], []
    t0 = time.time()
    for s in range(0, int(n), int(batch_size)):
        b = min(int(batch_size), int(n) - s)
        cond = _collate_graphs([graph] * b, "cpu", dtype, stereo_elements)
        x, lq = qd.sample(mask=cond["mask"], steps=steps, sampler="ode", method=method, generator=gen, dtype=dtype,
                          return_log_prob=True, space="total", estimator=estimator, probes=int(probes),
                          divergence_chunk=divergence_chunk,
                          atom_types=cond["atom_types"], bond_types=cond["bond_types"])
        xs.append(x.to(torch.float64).numpy())
        lqs.append(lq.to(torch.float64).numpy())
        log(f"[aldp] sampled {s + b} / {n} with log-densities ({time.time() - t0:.0f} s)")
    return np.concatenate(xs), np.concatenate(lqs)
