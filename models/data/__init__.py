"""Molecular datasets: QM9 (full, cached), a committed QM9 extract, and user data (npz / SDF).

Quick start::

    from qmanifold.models.data import load_dataset, make_dataloader
    ds = load_dataset("qm9-extract")          # pure numpy, 500 molecules
    train = ds.split("train")
    loader = make_dataloader(train, batch_size=32)
    batch = next(iter(loader))                # dict: positions (B, N, 3) Å, mask, atom_types, ...

See :mod:`qmanifold.models.data.dataset` for the item/storage format,
:mod:`qmanifold.models.data.io` for the user-data readers, :mod:`qmanifold.models.data.batching` for the batch
format and :mod:`qmanifold.models.data.qm9` for how QM9 bond graphs are built and split. Importing this
package needs neither RDKit nor qm9pack.
"""

from .batching import SizeBucketBatchSampler, collate_molecules, make_dataloader, padding_fraction
from .dataset import (
    BOND_AROMATIC,
    BOND_DOUBLE,
    BOND_NONE,
    BOND_SINGLE,
    BOND_TRIPLE,
    ELEMENTS,
    NUM_BOND_TYPES,
    SPLIT_NAMES,
    MoleculeDataset,
)
from .io import (
    load_dataset,
    load_npz_ensemble,
    load_sdf,
    perceive_bonds,
    resolve_bond_orders,
    save_npz_ensemble,
)
from .qm9 import (
    QM9_SIZE,
    QM9_SPLIT_SIZES,
    GraphMatchError,
    default_cache_dir,
    load_qm9,
    load_qm9_extract,
    match_smiles_to_geometry,
    standard_split,
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
    "QM9_SIZE",
    "QM9_SPLIT_SIZES",
    "MoleculeDataset",
    "GraphMatchError",
    "collate_molecules",
    "SizeBucketBatchSampler",
    "padding_fraction",
    "make_dataloader",
    "load_dataset",
    "load_qm9",
    "load_qm9_extract",
    "load_npz_ensemble",
    "save_npz_ensemble",
    "load_sdf",
    "perceive_bonds",
    "resolve_bond_orders",
    "match_smiles_to_geometry",
    "standard_split",
    "default_cache_dir",
]
