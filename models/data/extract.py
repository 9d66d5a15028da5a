"""Builder of the committed QM9 extract ``models/data/qm9_extract.npz``.

The extract holds the first 300 train, 100 valid and 100 test molecules of the standard split
(in the split's permutation order, i.e. a uniformly random subset of each split; molecules that
fail processing are passed over), processed exactly like :func:`qmanifold.models.data.qm9.load_qm9`, with
their QM9 ids in ``.indices``. It is read by :func:`qmanifold.models.data.qm9.load_qm9_extract` with numpy
only. A small JSON file next to it records the provenance and the ids per split.

Regenerate with (needs RDKit and qm9pack)::

    python -m qmanifold.models.data.extract            # writes models/data/qm9_extract.npz + .json
    python -m qmanifold.models.data.extract --out /tmp/x.npz --train 50 --valid 10 --test 10
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import numpy as np

from .io import SPLIT_NAMES, MoleculeDataset, _atomic_write_text
from .qm9 import (
    EXTRACT_PATH,
    PROCESSING_VERSION,
    QM9_SPLIT_SIZES,
    parse_qm9,
    qm9_csv_files,
    scan_qm9_indices,
    standard_split,
)

__all__ = ["build_qm9_extract", "main"]

DEFAULT_COUNTS = (300, 100, 100)


def build_qm9_extract(
    path: str | os.PathLike = EXTRACT_PATH,
    counts: Sequence[int] = DEFAULT_COUNTS,
    write_json: bool = True,
    progress: bool = True,
) -> MoleculeDataset:
    """Parse the chosen QM9 molecules and write the extract (compressed ``.npz``, atomically).

    Args:
        path: destination ``.npz`` (a ``.json`` with the same stem is written next to it).
        counts: molecules per split ``(train, valid, test)``.
        write_json: also write the provenance JSON.
        progress: progress bar.

    Returns:
        The extract dataset (sorted by QM9 id, split labels of the standard split).

    Raises:
        ValueError: bad counts, or too many candidates failed processing.
    """
    counts = tuple(int(c) for c in counts)
    if len(counts) != 3 or any(c < 0 for c in counts):
        raise ValueError(f"counts must be three non-negative ints (train, valid, test), got {counts}")
    files = qm9_csv_files()
    parts = standard_split(scan_qm9_indices(files))
    margin = 50
    candidates = {name: parts[name][: c + margin] for name, c in zip(SPLIT_NAMES, counts)}
    pool = parse_qm9(files, select=np.concatenate(list(candidates.values())), progress=progress, num_workers=0)
    present = set(pool.indices.tolist())
    chosen: dict[str, list[int]] = {}
    for name, c in zip(SPLIT_NAMES, counts):
        ok = [int(i) for i in candidates[name] if int(i) in present]
        if len(ok) < c:
            raise ValueError(f"only {len(ok)} of {c + margin} {name} candidates could be processed")
        chosen[name] = ok[:c]
    keep = np.sort(np.concatenate([np.asarray(v, dtype=np.int64) for v in chosen.values()]))
    rows = np.searchsorted(pool.indices, keep)
    sub = pool.subset(rows)
    passed_over = {name: [int(i) for i in candidates[name][: candidates[name].tolist().index(chosen[name][-1]) + 1]
                          if int(i) not in present] if chosen[name] else [] for name in SPLIT_NAMES}
    meta = {
        "kind": "qm9-extract",
        "processing_version": PROCESSING_VERSION,
        "source_files": pool.metadata.get("source_files"),
        "split_seed": 0,
        "split_sizes": list(QM9_SPLIT_SIZES),
        "counts": dict(zip(SPLIT_NAMES, counts)),
        "passed_over": passed_over,
        "bond_tolerance": pool.metadata.get("bond_tolerance"),
        "build_command": "python -m qmanifold.models.data.extract",
    }
    out = MoleculeDataset.from_arrays(sub.to_arrays())
    out.source = "qm9-extract"
    out.metadata = meta
    out.skipped = {}
    out.save(path, compressed=True)
    if write_json:
        info = dict(meta)
        info["file"] = os.path.basename(os.fspath(path))
        info["num_molecules"] = len(out)
        info["num_atoms"] = int(out.num_atoms.sum())
        info["indices"] = {name: sorted(chosen[name]) for name in SPLIT_NAMES}
        info["description"] = ("QM9 molecules (qm9pack CSVs) of the standard split "
                               "(default_rng(0) permutation of the 130,831 sorted ids: 100000/17748/13083), "
                               "first molecules of each split in permutation order; coordinates in Angstrom")
        _atomic_write_text(os.path.splitext(os.fspath(path))[0] + ".json", json.dumps(info, indent=1) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description="Build the committed QM9 extract.")
    ap.add_argument("--out", default=EXTRACT_PATH, help="output .npz path (default: the committed file)")
    ap.add_argument("--train", type=int, default=DEFAULT_COUNTS[0])
    ap.add_argument("--valid", type=int, default=DEFAULT_COUNTS[1])
    ap.add_argument("--test", type=int, default=DEFAULT_COUNTS[2])
    ap.add_argument("--no-json", action="store_true", help="do not write the provenance JSON")
    args = ap.parse_args(argv)
    ds = build_qm9_extract(args.out, (args.train, args.valid, args.test), write_json=not args.no_json)
    print(f"wrote {args.out}: {ds.summary()} ({os.path.getsize(args.out) / 1024:.1f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
