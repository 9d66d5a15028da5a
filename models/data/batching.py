"""Padded batches of molecules and a size-bucketing batch sampler.

Batch format (:func:`collate_molecules`), for ``B`` molecules padded to ``Nmax`` atoms:

========================  ==================  =========================================================
key                       shape / type        content
========================  ==================  =========================================================
``positions``             (B, Nmax, 3) f32    coordinates in Å, 0 at padding
``mask``                  (B, Nmax) bool      True for real atoms
``atomic_numbers``        (B, Nmax) int64     0 at padding
``atom_types``            (B, Nmax) int64     index into the element list, 0 at padding
``bond_types``            (B, Nmax, Nmax) i64 0 none / 1 single / 2 double / 3 triple / 4 aromatic, 0 at padding
``num_atoms``             (B,) int64          real atoms per molecule
``index``                 (B,) int64          source ids (QM9 id, frame, SDF record)
``smiles``                list[str]           length B
========================  ==================  =========================================================

Padding slots are indistinguishable from "no bond" / type 0 in the integer tensors; always use
``mask``.

:class:`SizeBucketBatchSampler` groups molecules of similar size so that little padding is
wasted; use it as ``DataLoader(ds, batch_sampler=sampler, collate_fn=collate_molecules)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["collate_molecules", "SizeBucketBatchSampler", "padding_fraction", "make_dataloader"]

_REQUIRED = ("positions", "atomic_numbers", "atom_types", "bond_types")


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def collate_molecules(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pad a list of molecule items (as returned by ``MoleculeDataset[k]``) into one batch.

    Args:
        items: non-empty list of dicts with ``positions`` (N, 3), ``atomic_numbers`` (N,),
            ``atom_types`` (N,), ``bond_types`` (N, N) (tensors or arrays), optional ``index``
            (int, default -1) and ``smiles`` (str, default "").

    Returns:
        The batch dict described in the module docstring.

    Raises:
        ValueError: empty list, missing keys, or shapes inconsistent within an item.
    """
    if len(items) == 0:
        raise ValueError("collate_molecules: empty batch")
    pos_list, z_list, t_list, b_list = [], [], [], []
    for k, it in enumerate(items):
        missing = [key for key in _REQUIRED if key not in it]
        if missing:
            raise ValueError(f"collate_molecules: item {k} lacks key(s) {missing}")
        p = _as_tensor(it["positions"], torch.float32)
        z = _as_tensor(it["atomic_numbers"], torch.int64)
        t = _as_tensor(it["atom_types"], torch.int64)
        b = _as_tensor(it["bond_types"], torch.int64)
        n = p.shape[0]
        if p.ndim != 2 or p.shape[1] != 3:
            raise ValueError(f"collate_molecules: item {k} positions must be (N, 3), got {tuple(p.shape)}")
        if z.shape != (n,) or t.shape != (n,) or b.shape != (n, n):
            raise ValueError(f"collate_molecules: item {k} has {n} atoms in positions but atomic_numbers "
                             f"{tuple(z.shape)}, atom_types {tuple(t.shape)}, bond_types {tuple(b.shape)}")
        pos_list.append(p)
        z_list.append(z)
        t_list.append(t)
        b_list.append(b)
    bsz = len(items)
    counts = torch.tensor([p.shape[0] for p in pos_list], dtype=torch.int64)
    nmax = int(counts.max()) if bsz else 0
    positions = torch.zeros(bsz, nmax, 3, dtype=torch.float32)
    atomic_numbers = torch.zeros(bsz, nmax, dtype=torch.int64)
    atom_types = torch.zeros(bsz, nmax, dtype=torch.int64)
    bond_types = torch.zeros(bsz, nmax, nmax, dtype=torch.int64)
    for k in range(bsz):
        n = pos_list[k].shape[0]
        positions[k, :n] = pos_list[k]
        atomic_numbers[k, :n] = z_list[k]
        atom_types[k, :n] = t_list[k]
        bond_types[k, :n, :n] = b_list[k]
    mask = torch.arange(nmax)[None, :] < counts[:, None]
    return {
        "positions": positions,
        "mask": mask,
        "atomic_numbers": atomic_numbers,
        "atom_types": atom_types,
        "bond_types": bond_types,
        "num_atoms": counts,
        "index": torch.tensor([int(it.get("index", -1)) for it in items], dtype=torch.int64),
        "smiles": [str(it.get("smiles", "")) for it in items],
    }


class SizeBucketBatchSampler(Sampler[list[int]]):
    """Batches of molecules with similar atom counts (little padding), reshuffled per epoch.

    Each epoch: the rows are shuffled, cut into pools of ``batch_size * pool_batches`` rows,
    each pool is sorted by atom count and cut into batches, and the batch order is shuffled.
    With ``shuffle=False`` the rows are sorted by size once and batched in that order.
    Deterministic for a given ``seed`` and epoch (:meth:`set_epoch`).

    Args:
        num_atoms: ``(M,)`` atom counts (e.g. ``dataset.num_atoms``).
        batch_size: molecules per batch (>= 1).
        shuffle: randomise pools and batch order.
        seed: base seed.
        drop_last: drop the last, incomplete batch of each pool.
        pool_batches: pool size in batches (larger = tighter size grouping, less randomness).
    """

    def __init__(self, num_atoms: Sequence[int] | np.ndarray, batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, pool_batches: int = 50) -> None:
        n = np.asarray(num_atoms, dtype=np.int64).reshape(-1)
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size}")
        if int(pool_batches) < 1:
            raise ValueError(f"pool_batches must be a positive int, got {pool_batches}")
        self.num_atoms = n
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.pool_batches = int(pool_batches)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the shuffle)."""
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        m = self.num_atoms.size
        if not self.shuffle:
            order = np.argsort(self.num_atoms, kind="stable")
            pools = [order]
            rng = None
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(m)
            size = self.batch_size * self.pool_batches
            pools = [perm[i:i + size] for i in range(0, m, size)]
            pools = [p[np.argsort(self.num_atoms[p], kind="stable")] for p in pools]
        batches = []
        for pool in pools:
            for i in range(0, pool.size, self.batch_size):
                b = pool[i:i + self.batch_size]
                if self.drop_last and b.size < self.batch_size:
                    continue
                batches.append(b)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self._batches():
            yield b.tolist()

    def __len__(self) -> int:
        m = self.num_atoms.size
        if not self.drop_last:
            if not self.shuffle:
                return -(-m // self.batch_size)  # noqa: PLE0303 - a ceiling division of m >= 0
            size = self.batch_size * self.pool_batches
            full, rest = divmod(m, size)
            return full * self.pool_batches + -(-rest // self.batch_size)
        return len(self._batches())


def padding_fraction(batches: Sequence[Sequence[int]], num_atoms: Sequence[int] | np.ndarray) -> float:
    """Fraction of padded atom slots over ``batches`` (0 = no waste)."""
    n = np.asarray(num_atoms, dtype=np.int64)
    slots = real = 0
    for b in batches:
        sizes = n[np.asarray(b, dtype=np.int64)]
        if sizes.size:
            slots += int(sizes.max()) * sizes.size
            real += int(sizes.sum())
    return 0.0 if slots == 0 else 1.0 - real / slots


def make_dataloader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0, bucket: bool = True,
                    drop_last: bool = False, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A :class:`~torch.utils.data.DataLoader` yielding padded batches of ``dataset``.

    Args:
        dataset: a :class:`~qmanifold.models.data.io.MoleculeDataset` (needs ``num_atoms`` when ``bucket``).
        batch_size: molecules per batch.
        shuffle: reshuffle each epoch.
        seed: seed of the bucketing sampler / the shuffling generator.
        bucket: group molecules of similar size (:class:`SizeBucketBatchSampler`).
        drop_last: drop incomplete batches.
        num_workers: DataLoader workers.
    """
    if bucket:
        sampler = SizeBucketBatchSampler(dataset.num_atoms, batch_size, shuffle=shuffle, seed=seed,
                                         drop_last=drop_last)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_molecules,
                                           num_workers=num_workers)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                       collate_fn=collate_molecules, num_workers=num_workers, generator=gen)
