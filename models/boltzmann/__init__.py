"""Boltzmann generators for identical particles: DW4 (4 particles in 2D) and LJ13 (13 in 3D).

* :mod:`.systems`  the energies (batched torch), their conventions and the quotient
  ``R^{N d} / (SE(d) x S_N)`` each system lives on;
* :mod:`.data`     ground truth by the project's own MCMC (seeded, burn-in and thinning from the
  measured autocorrelation time), cached as ``.npz``;
* :mod:`.network`  an E(n)- and permutation-equivariant EGNN velocity field for any dimension d;
* :mod:`.train`    a small flow-matching training loop around ``QuotientDiffusion`` (quotient loss,
  checkpoints, resumable);
* :mod:`.evaluate` NLL on held-out samples, Kish ESS of ``exp(-U/kT)/q``, energy histograms and
  their W1 to the ground truth before and after reweighting, plots;
* :mod:`.cli`      ``qmanifold data``, ``qmanifold train-boltzmann``, ``qmanifold evaluate-boltzmann``
  (its parsers import the standard library only).

Walkthrough and measured numbers: docs/boltzmann.md. This package imports nothing heavy at import
time; import the submodules.
"""
