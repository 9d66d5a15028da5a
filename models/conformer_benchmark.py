r"""``qmanifold benchmark conformers``: a trained model against RDKit ETKDG on the same molecules.

For each molecule of a split (``--data qm9-edm --split test`` by default; the first ``--limit``
molecules in the order of the split's permutation for QM9, dataset order otherwise) the command
generates conformers with

* the model of a checkpoint (:func:`qmanifold.models.sampling.sample_conformers`, ODE, 50 steps,
  batched; stereo-aware models get the stereo labels of the reference geometry), ``M`` per molecule;
* ETKDGv3, without and with MMFF94 (:func:`qmanifold.models.baselines.etkdg_conformers`), with the
  stereo of the reference geometry assigned before embedding, ``k`` per molecule for each ``k`` of
  ``--etkdg-counts`` (default ``M`` and 10);

and scores every method the same way. With ``d(g, r)`` the heavy-atom RMSD after optimal rigid
superposition minimised over graph automorphisms (no reflections;
:func:`qmanifold.models.evaluation.best_rmsd`) and one reference conformer ``r`` per molecule (QM9):

* ``COV-R(delta) = mean_mol [min_g d(g, r) < delta]``, ``AMR-R = mean_mol min_g d(g, r)``;
* ``COV-P(delta) = mean_mol mean_g [d(g, r) < delta]``, ``AMR-P = mean_mol mean_g d(g, r)``;

at ``delta`` in 0.25 / 0.5 / 1.0 Å (:func:`qmanifold.models.evaluation.coverage_metrics`), means
and medians over molecules. A conformer that could not be produced (embedding failure, NaN
coordinates) has ``d = inf``: it is a miss in the **all molecules** block (whose AMR is then
``inf``, written ``null`` in JSON), and the **succeeded** block scores only the conformers that
exist, over the molecules with at least one. Failures are counted, never dropped silently.

Further metrics: stereo correctness (the fraction of conformers that reproduce every requested
stereo label, :func:`qmanifold.models.stereo.stereo_agreement` with
:func:`qmanifold.models.sampling.graph_stereo`, over molecules with at least one labelled element;
missing conformers count as wrong), bond-length (Å) and bond-angle (degrees) 1-D Wasserstein
distances to the reference geometries (:func:`qmanifold.models.evaluation.distribution_distances`,
reference-count-weighted mean over types) and wall time per molecule (the model's batched sampling
time divided by the number of molecules; ETKDG timed per molecule).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "THRESHOLDS",
    "benchmark_graphs",
    "rmsd_to_reference",
    "aggregate_rmsd",
    "stereo_summary",
    "geometry_summary",
    "run_benchmark",
    "format_table",
]

#: coverage thresholds (Å)
THRESHOLDS = (0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------------------------
# molecules
# ----------------------------------------------------------------------------------------------


def _permutation_order(spec: str, split: str) -> np.ndarray | None:
    """QM9 ids of ``split`` in the order of the split's permutation (EDM for ``qm9-edm``, the standard
    one for ``qm9``), or None for other data."""
    key = str(spec).strip().lower()
    if key in ("qm9-edm", "qm9_edm"):
        scheme = "edm"
    elif key == "qm9":
        scheme = "standard"
    else:
        return None
    from qmanifold.models.data.qm9 import scan_qm9_indices, standard_split

    return standard_split(scan_qm9_indices(), scheme=scheme)[split]


def benchmark_graphs(spec: str, split: str = "test", limit: int | None = 1000, elements: Sequence[int] | None = None,
                     heavy_atoms_only: bool = False, max_atoms: int | None = None, progress: bool = True):
    """The molecules of the benchmark: ``(graphs, order)``.

    ``split`` of ``spec`` (:func:`qmanifold.models.training.dataset_split`, whose rows are sorted by
    id); for ``qm9-edm`` / ``qm9`` reordered by position in the split's permutation
    (``standard_split(..., scheme="edm" | "standard")[split]``, so the first ``limit`` are a uniformly
    random subset), otherwise in dataset order. ``order`` names the order used.
    """
    from qmanifold.models.sampling import graphs_from_dataset
    from qmanifold.models.training import dataset_split, load_molecules

    ds = load_molecules(spec, heavy_atoms_only=heavy_atoms_only, max_atoms=max_atoms, elements=elements,
                        progress=progress)
    part = dataset_split(ds, split)
    rows = np.arange(len(part))
    order = "dataset"
    perm_ids = _permutation_order(spec, split) if split != "all" else None
    if perm_ids is not None:
        position = {int(i): k for k, i in enumerate(perm_ids.tolist())}
        missing = [int(i) for i in part.indices if int(i) not in position]
        if missing:
            raise ValueError(f"{spec}: ids {missing[:5]} of the {split} split are not in its permutation")
        rows = np.argsort([position[int(i)] for i in part.indices], kind="stable")
        order = "edm permutation" if "edm" in str(spec).lower() else "standard permutation"
    if limit is not None:
        rows = rows[: int(limit)]
    return graphs_from_dataset(part, spec, rows), order


# ----------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------


def rmsd_to_reference(graph, conformers: np.ndarray | None, reference_mol=None) -> np.ndarray:
    """``(G,)`` heavy-atom best RMSDs (Å) of ``conformers`` ``(G, N, 3)`` to ``graph.positions``.

    A conformer with non-finite coordinates, or whose RMSD RDKit cannot compute, gets ``inf``;
    ``conformers=None`` (the method failed on the molecule) gives an empty array.
    """
    from qmanifold.models.evaluation import best_rmsd
    from qmanifold.models.sampling import mol_with_coordinates

    if conformers is None:
        return np.zeros(0)
    ref = reference_mol if reference_mol is not None else mol_with_coordinates(graph, graph.positions)
    out = np.full(len(conformers), np.inf)
    for k, x in enumerate(conformers):
        if not np.all(np.isfinite(x)):
            continue
        try:
            out[k] = best_rmsd(mol_with_coordinates(graph, x), ref)
        except ValueError:
            pass
    return out


def aggregate_rmsd(rmsd: Sequence[np.ndarray], n_expected: int, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """COV/AMR over molecules from per-molecule RMSDs to one reference conformer.

    Args:
        rmsd: one ``(G_i,)`` array per molecule (``inf``: a conformer that failed; fewer than
            ``n_expected`` entries, e.g. an empty array: the missing ones failed).
        n_expected: conformers asked for per molecule.
        thresholds: coverage thresholds (Å).

    Returns:
        ``{"all": {delta: coverage_metrics}, "succeeded": {delta: ...} or None, "num_molecules",
        "failed_molecules" (no conformer at all), "failed_conformers"}``; in ``all`` every missing
        conformer is a miss with RMSD ``inf``, ``succeeded`` uses the molecules with at least one
        conformer and only their finite RMSDs.
    """
    from qmanifold.models.evaluation import coverage_metrics

    if len(rmsd) == 0:
        raise ValueError("aggregate_rmsd: no molecules")
    full, ok = [], []
    failed_conf = failed_mol = 0
    for d in rmsd:
        d = np.asarray(d, dtype=np.float64).reshape(-1)
        if np.any(np.isnan(d)):
            raise ValueError("aggregate_rmsd: NaN RMSD (use inf for a failed conformer)")
        pad = max(int(n_expected) - d.size, 0)
        row = np.concatenate([d, np.full(pad, np.inf)]) if pad else d
        if row.size == 0:
            row = np.full(1, np.inf)
        failed_conf += int(np.sum(~np.isfinite(row)))
        full.append(row)
        fin = row[np.isfinite(row)]
        if fin.size:
            ok.append(fin)
        else:
            failed_mol += 1
    return {
        "all": {str(t): coverage_metrics(full, threshold=t) for t in thresholds},
        "succeeded": {str(t): coverage_metrics(ok, threshold=t) for t in thresholds} if ok else None,
        "num_molecules": len(full),
        "failed_molecules": failed_mol,
        "failed_conformers": failed_conf,
    }


def stereo_summary(graphs: Sequence, conformers: Sequence[np.ndarray | None], n_expected: int) -> dict:
    """Stereo correctness of generated conformers against ``graph_stereo(graph)``.

    Over molecules with at least one labelled element: ``correct`` = fraction of the ``n_expected``
    conformers per molecule that reproduce every label (missing or non-finite conformers are wrong),
    ``label_agreement`` = fraction of individual labels reproduced, ``molecules`` = how many
    molecules were counted (``correct`` is None when there are none).
    """
    from qmanifold.models.sampling import graph_stereo
    from qmanifold.models.stereo import stereo_agreement

    good = total = agree = labels = mols = 0
    for g, confs in zip(graphs, conformers):
        req = graph_stereo(g)
        if req is None or req.num_labelled == 0:
            continue
        mols += 1
        total += int(n_expected)
        labels += int(n_expected) * req.num_labelled
        for x in (confs if confs is not None else [])[: int(n_expected)]:
            if not np.all(np.isfinite(x)):
                continue
            a, n = stereo_agreement(x, g.bond_types, req)
            agree += a
            good += int(a == n)
    return {"correct": good / total if total else None, "label_agreement": agree / labels if labels else None,
            "molecules": mols}


def geometry_summary(graphs: Sequence, conformers: Sequence[np.ndarray | None]) -> dict:
    """Bond-length and bond-angle W1 of the (finite) generated conformers against the references."""
    from qmanifold.models.evaluation import bond_geometry, distribution_distances

    gen_l: dict = {}
    gen_a: dict = {}
    ref_l: dict = {}
    ref_a: dict = {}

    def merge(acc, new):
        for k, v in new.items():
            acc.setdefault(k, []).extend(v)

    for g, confs in zip(graphs, conformers):
        lr, ar = bond_geometry(g.positions, g.atomic_numbers, g.bond_types)
        merge(ref_l, lr)
        merge(ref_a, ar)
        for x in confs if confs is not None else []:
            if np.all(np.isfinite(x)):
                lg, ag = bond_geometry(x, g.atomic_numbers, g.bond_types)
                merge(gen_l, lg)
                merge(gen_a, ag)
    return {"bond_length_w1": distribution_distances(gen_l, ref_l)["mean"],
            "bond_angle_w1": distribution_distances(gen_a, ref_a)["mean"]}


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


def _model_conformers(qd, graphs, n: int, steps: int, seed: int, batch_size: int, device, progress: bool,
                      stereo_retries: int = 0, stats: dict | None = None, stereo_repair: bool = False
                      ) -> tuple[list[np.ndarray | None], bool]:
    """Model conformers; if the batched run produces NaNs, each molecule is sampled on its own
    (seed ``seed + i``) and the ones that still fail are None. Returns ``(conformers, resampled)``;
    ``stats`` receives the stereo-redraw counters of :func:`~qmanifold.models.sampling.sample_conformers`."""
    from qmanifold.models.sampling import sample_conformers

    stats = {} if stats is None else stats
    try:
        return list(sample_conformers(qd, graphs, n, steps=steps, sampler="ode", seed=seed, batch_size=batch_size,
                                      device=device, progress=progress, stereo_retries=stereo_retries,
                                      stereo_repair=stereo_repair, stats=stats)), False
    except FloatingPointError:
        pass
    out: list[np.ndarray | None] = []
    stats.update(stereo_redrawn=0, stereo_wrong=0, stereo_repaired=0)
    for i, g in enumerate(graphs):
        one: dict = {}
        try:
            out.append(sample_conformers(qd, [g], n, steps=steps, sampler="ode", seed=seed + i,
                                         batch_size=batch_size, device=device, progress=False,
                                         stereo_retries=stereo_retries, stereo_repair=stereo_repair,
                                         stats=one)[0])
        except FloatingPointError:
            out.append(None)
        for k in ("stereo_redrawn", "stereo_wrong", "stereo_repaired"):
            stats[k] += one.get(k, 0)
    return out, True


# state of the baseline workers (set before forking; read-only there)
_JOB: dict[str, Any] = {}


def _baseline_job(i: int) -> dict:
    """ETKDG variants of molecule ``i`` of ``_JOB["graphs"]``: ``{name: (conformers, stats, seconds, rmsd)}``."""
    from qmanifold.models.baselines import etkdg_conformers
    from qmanifold.models.sampling import MoleculeInputError, mol_with_coordinates

    g = _JOB["graphs"][i]
    ref = mol_with_coordinates(g, g.positions)
    out = {}
    for name, k, mmff in _JOB["variants"]:
        t1 = time.perf_counter()
        try:
            c, st = etkdg_conformers(g, k, seed=_JOB["seed"] + i, mmff=mmff, stereo_from_reference=True)
        except MoleculeInputError:
            c, st = None, {"embedding_failed": 1}
        out[name] = (c, st, time.perf_counter() - t1, rmsd_to_reference(g, c, ref))
    return out


def run_benchmark(checkpoint: str, data: str = "qm9-edm", split: str = "test", limit: int | None = 1000,
                  n_per_molecule: int = 2, etkdg_counts: Sequence[int] | None = None, steps: int = 50,
                  seed: int = 0, batch_size: int = 64, device: str = "auto", use_ema: bool = True,
                  max_atoms: int | None = None, thresholds: Sequence[float] = THRESHOLDS,
                  progress: bool = True, stereo_retries: int = 4, refine: bool = True, workers: int = 1,
                  stereo_repair: bool = True) -> dict:
    """Run the benchmark (module docstring) and return a JSON-serialisable dict.

    Result: ``{"config", "num_molecules", "order", "methods": {name: {"conformers_per_molecule",
    "rmsd": aggregate_rmsd(...), "stereo": stereo_summary(...), "geometry": geometry_summary(...),
    "time_per_molecule_s", "stats"}}}``; method names are ``model`` (the sampler's output, with up to
    ``stereo_retries`` stereo redraws and, with ``stereo_repair``, the remaining wrong or flat centres
    with three neighbours moved to their side, as ``qmanifold sample`` does), ``model+mmff`` (the same conformers completed with hydrogens and
    MMFF94-minimised, :mod:`qmanifold.models.refine`; with ``refine``), ``etkdg-k{K}`` and
    ``etkdg+mmff-k{K}``. ``workers`` > 1 runs the ETKDG baselines in that many processes (each
    molecule's time is still measured on one core).
    """
    from qmanifold.models.sampling import mol_with_coordinates
    from qmanifold.models.training import diffusion_from_checkpoint, load_checkpoint, resolve_device

    counts = list(dict.fromkeys(int(k) for k in ((n_per_molecule, 10) if etkdg_counts is None else etkdg_counts)))
    if any(k < 1 for k in counts):
        raise ValueError(f"--etkdg-counts must be positive, got {counts}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    qd = diffusion_from_checkpoint(ckpt, device=dev, use_ema=use_ema)
    info = ckpt["data"]
    heavy = bool(info.get("heavy_atoms_only", False))
    graphs, order = benchmark_graphs(data, split, limit, info["elements"], heavy, max_atoms, progress)
    if not graphs:
        raise ValueError(f"no molecules in the {split!r} split of {data!r}")

    t0 = time.perf_counter()
    model_stats: dict = {}
    model_confs, resampled = _model_conformers(qd, graphs, n_per_molecule, steps, seed, batch_size, dev, progress,
                                               stereo_retries, model_stats, stereo_repair)
    model_time = (time.perf_counter() - t0) / len(graphs)
    model_stats["resampled_per_molecule"] = resampled

    variants = [(f"etkdg{'+mmff' if mmff else ''}-k{k}", k, mmff) for k in counts for mmff in (False, True)]
    confs: dict[str, list] = {"model": model_confs}
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    stats: dict[str, dict] = {name: {} for name, _, _ in variants}
    stats["model"] = model_stats
    time_per: dict[str, float] = {"model": model_time}
    sizes = {"model": n_per_molecule, **{name: k for name, k, _ in variants}}
    refs = [mol_with_coordinates(g, g.positions) for g in graphs]
    rmsd: dict[str, list] = {"model": [rmsd_to_reference(g, c, r) for g, c, r in zip(graphs, model_confs, refs)]}
    if refine:
        from qmanifold.models.refine import complete_conformer

        t1 = time.perf_counter()
        refined, rstats = [], {}
        for g, c in zip(graphs, model_confs):
            if c is None:
                refined.append(None)
                continue
            row = [complete_conformer(g, x, "mmff") for x in c]
            for cc in row:
                for key, v in cc.stats.items():
                    rstats[key] = rstats.get(key, 0) + v
            refined.append(np.stack([cc.heavy for cc in row]))
        name = "model+mmff"
        confs[name], sizes[name], stats[name] = refined, n_per_molecule, {**model_stats, **rstats}
        time_per[name] = model_time + (time.perf_counter() - t1) / len(graphs)
        rmsd[name] = [rmsd_to_reference(g, c, r) for g, c, r in zip(graphs, refined, refs)]
    for name, _, _ in variants:
        confs[name] = []
        rmsd[name] = []
    _JOB.update(graphs=graphs, variants=variants, seed=seed)
    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("fork"))
            results = pool.map(_baseline_job, range(len(graphs)), chunksize=4)
        else:
            pool = None
            results = map(_baseline_job, range(len(graphs)))
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(graphs), desc="benchmark (ETKDG + scoring)", unit="mol",
                           dynamic_ncols=True)
        for res in results:
            for name, (c, st, sec, r) in res.items():
                times[name].append(sec)
                for key, v in st.items():
                    stats[name][key] = stats[name].get(key, 0) + int(v)
                confs[name].append(c)
                rmsd[name].append(r)
        if pool is not None:
            pool.shutdown()
    finally:
        _JOB.clear()
    for name, _, _ in variants:
        time_per[name] = float(np.mean(times[name]))

    methods: dict[str, Any] = {}
    for name in list(rmsd):
        methods[name] = {
            "conformers_per_molecule": sizes[name],
            "rmsd": aggregate_rmsd(rmsd[name], sizes[name], thresholds),
            "stereo": stereo_summary(graphs, confs[name], sizes[name]),
            "geometry": geometry_summary(graphs, confs[name]),
            "time_per_molecule_s": time_per[name],
            "stats": stats[name],
        }
    return {
        "config": {"checkpoint": str(checkpoint), "data": data, "split": split, "limit": limit,
                   "n_per_molecule": n_per_molecule, "etkdg_counts": counts, "steps": steps, "sampler": "ode",
                   "stereo_retries": int(stereo_retries), "stereo_repair": bool(stereo_repair), "refine": bool(refine),
                   "workers": int(workers),
                   "seed": seed, "device": str(dev), "ema": bool(use_ema), "heavy_atoms_only": heavy,
                   "model": ckpt["model"]["name"], "loss": ckpt["diffusion"]["loss"],
                   "thresholds": [float(t) for t in thresholds]},
        "num_molecules": len(graphs),
        "order": order,
        "molecules": [g.source for g in graphs],
        "methods": methods,
    }


def _fmt(v: float | None, pct: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"


def format_table(result: Mapping[str, Any]) -> str:
    """The benchmark as a Markdown table (all-molecules metrics: failures count as misses)."""
    th = [str(t) for t in result["config"]["thresholds"]]
    head = (["method", "confs/mol", "failed mol (conf)"] + [f"COV-R@{t} %" for t in th]
            + ["AMR-R mean", "AMR-R median"] + [f"COV-P@{t} %" for t in th]
            + ["AMR-P mean", "AMR-P median", "stereo ok %", "bond W1 Å", "angle W1 °", "s/mol"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, m in result["methods"].items():
        r = m["rmsd"]
        mid = r["all"][th[len(th) // 2]]
        row = [name, str(m["conformers_per_molecule"]), f"{r['failed_molecules']} ({r['failed_conformers']})"]
        row += [_fmt(r["all"][t]["COV-R"], pct=True) for t in th]
        row += [_fmt(mid["AMR-R"]), _fmt(mid["AMR-R-median"])]
        row += [_fmt(r["all"][t]["COV-P"], pct=True) for t in th]
        row += [_fmt(mid["AMR-P"]), _fmt(mid["AMR-P-median"]), _fmt(m["stereo"]["correct"], pct=True),
                _fmt(m["geometry"]["bond_length_w1"], digits=4), _fmt(m["geometry"]["bond_angle_w1"], digits=2),
                _fmt(m["time_per_molecule_s"], digits=4)]
        lines.append("| " + " | ".join(row) + " |")
    cfg = result["config"]
    note = (f"\n{result['num_molecules']} molecules of {cfg['data']} {cfg['split']} ({result['order']} order), "
            f"model {cfg['model']}/{cfg['loss']} ({cfg['sampler']}, {cfg['steps']} steps); heavy-atom RMSD (Å) to "
            f"the one reference conformer; failed conformers count as misses (RMSD inf); stereo ok over "
            f"{next(iter(result['methods'].values()))['stereo']['molecules']} molecules with labelled stereo.")
    return "\n".join(lines) + "\n" + note + "\n"
