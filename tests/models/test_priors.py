"""The harmonic prior of the molecular layer (ET-Flow's, on the covalent bond graph)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qmanifold.models.networks import build_denoiser
from qmanifold.models.training import BondGraphHarmonicPrior, TrainConfig, build_diffusion


def _chain(n: int = 6, extra_codes: bool = False) -> torch.Tensor:
    bonds = torch.zeros(1, n, n, dtype=torch.long)
    for i in range(n - 1):
        bonds[0, i, i + 1] = bonds[0, i + 1, i] = 1 + (i % 2)
    if extra_codes:  # cis/trans pair codes of stereo-aware models are not bonds
        bonds[0, 0, 3] = bonds[0, 3, 0] = 5
        bonds[0, 1, 4] = bonds[0, 4, 1] = 6
    return bonds


def test_harmonic_prior_uses_covalent_bonds_only_and_has_bond_length_spread():
    prior = BondGraphHarmonicPrior()
    plain = prior.sample(_chain(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coded = prior.sample(_chain(extra_codes=True), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(plain, coded)
    assert torch.allclose(plain.mean(1), torch.zeros(1, 3, dtype=torch.float64), atol=1e-12)  # CoM-free
    many = prior.sample(_chain().expand(4000, -1, -1), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    bond = (many[:, 1] - many[:, 0]).norm(dim=-1)
    far = (many[:, 5] - many[:, 0]).norm(dim=-1)
    # bonded atoms sit about a bond length apart (E|d|^2 ~ 3/k with k = 1.5), far ends of the chain further
    assert 1.1 < bond.square().mean().sqrt() < 1.6 and far.mean() > 1.8 * bond.mean()
    with pytest.raises(ValueError, match="needs bond_types"):
        prior.sample(None)


def test_harmonic_flow_trains_and_samples(tmp_path):
    from qmanifold.models.sampling import graph_from_smiles, sample_conformers
    from qmanifold.models.training import diffusion_from_checkpoint, train

    with pytest.raises(ValueError, match="--prediction v"):
        TrainConfig(interpolant="harmonic").validate()
    out = tmp_path / "run"
    train(TrainConfig(data="qm9-extract", model="chiral_egnn", heavy_atoms_only=True, interpolant="harmonic",
                      prediction="v", steps=3, batch_size=8, hidden=16, layers=1, val_every=3, ckpt_every=3,
                      val_limit=8, out=str(out), progress=False, device="cpu"))
    qd = diffusion_from_checkpoint(out / "last.pt")
    assert qd.general and qd.interpolant.name == "harmonic"
    g = graph_from_smiles("CC(O)C#N", [1, 6, 7, 8, 9], heavy_atoms_only=True)
    x = sample_conformers(qd, [g], 3, steps=5, progress=False)[0]
    assert x.shape == (3, 5, 3) and np.isfinite(x).all()
    # the sampler starts from the prior of each molecule's bond graph
    qd0 = build_diffusion(build_denoiser("chiral_egnn", hidden=16, layers=1), "quotient", "harmonic", "v")
    assert isinstance(qd0.interpolant.prior, BondGraphHarmonicPrior)
