"""Boltzmann generators: identical particles, DW4 (4 particles in 2D) and LJ13 (13 in 3D), and
alanine dipeptide (22 atoms, amber99sb-ildn with OBC implicit solvent through OpenMM).

* :mod:`.systems`  the energies (batched torch), their conventions and the quotient
  ``R^{N d} / (SE(d) x S_N)`` each system lives on;
* :mod:`.data`     ground truth by the project's own MCMC (seeded, burn-in and thinning from the
  measured autocorrelation time), cached as ``.npz``;
* :mod:`.network`  an E(n)- and permutation-equivariant EGNN velocity field for any dimension d;
* :mod:`.train`    a small flow-matching training loop around ``QuotientDiffusion`` (quotient loss,
  checkpoints, resumable);
* :mod:`.evaluate` NLL on held-out samples, Kish ESS of ``exp(-U/kT)/q``, energy histograms and
  their W1 to the ground truth before and after reweighting, plots;
* :mod:`.aldp`     alanine dipeptide: the project-built topology, OpenMM energies, ``qmanifold data
  aldp`` MD, and the metrics (Ramachandran free energy and KL to MD, L-chirality fraction, bond-length
  W1, ESS); its models are the molecular ``chiral_egnn`` trained with ``qmanifold train --data
  ens.npz``;
* :mod:`.cli`      ``qmanifold data``, ``qmanifold train-boltzmann``, ``qmanifold evaluate-boltzmann``
  (its parsers import the standard library only).

Walkthrough and measured numbers: docs/boltzmann.md. This package imports nothing heavy at import
time; import the submodules.
"""
