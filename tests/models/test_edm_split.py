"""The EDM split of QM9 (``standard_split(scheme="edm")``, ``--data qm9-edm``)."""

from __future__ import annotations

import numpy as np
import pytest

from qmanifold.models.data.qm9 import QM9_SIZE, QM9_SPLIT_SIZES, split_labels_for, standard_split


def test_edm_split_is_the_legacy_numpy_permutation_of_the_sorted_ids():
    ids = np.random.default_rng(5).permutation(np.arange(1, QM9_SIZE + 1)) * 3  # unsorted, not 0-based
    parts = standard_split(ids, scheme="edm")
    np.random.seed(0)
    perm = np.random.permutation(QM9_SIZE)
    expected = np.sort(ids)[perm]
    assert np.array_equal(parts["train"], expected[:100_000])
    assert np.array_equal(parts["valid"], expected[100_000:117_748])
    assert np.array_equal(parts["test"], expected[117_748:])
    assert tuple(len(parts[k]) for k in ("train", "valid", "test")) == QM9_SPLIT_SIZES
    # a different generator from the project's standard split
    assert not np.array_equal(standard_split(ids)["test"], parts["test"])
    labels = split_labels_for(parts["test"][:10], ids, scheme="edm")
    assert (labels == 2).all()


def test_unknown_split_scheme_is_named():
    with pytest.raises(ValueError, match="unknown split scheme 'bogus'"):
        standard_split(np.arange(QM9_SIZE), scheme="bogus")
