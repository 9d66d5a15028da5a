"""Summary of the two independent alanine-dipeptide MD runs of `qmanifold data aldp` and the
Ramachandran-KL noise floor (histogram noise of finite MD samples), written to md_summary.json.

Run (one thread):  OMP_NUM_THREADS=1 python benchmarks/runs/aldp/analyse_md.py RUN_A.npz RUN_B.npz OUT.json

KL convention: models/boltzmann/aldp.py (36 x 36 periodic bins, eps = 1e-10 per bin, KL(P_ref || Q)).
"Reference" P is always 10,000 frames of run B (every 2nd frame); Q are frames of run A.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from qmanifold.boltzmann import integrated_autocorrelation_time
from qmanifold.models.boltzmann import aldp


def main(path_a: str, path_b: str, out: str) -> None:
    t0 = time.time()
    a, b = aldp.load_ensemble(path_a), aldp.load_ensemble(path_b)
    xa, xb = a["positions"], b["positions"]
    phi_a, psi_a = aldp.backbone_dihedrals(xa)
    phi_b, psi_b = aldp.backbone_dihedrals(xb)
    hist = aldp.ramachandran_histogram
    ref = hist(phi_b[1::2], psi_b[1::2])  # 10,000 frames of run B

    def kl_of(idx):
        return aldp.ramachandran_kl(ref, hist(phi_a[idx], psi_a[idx]))

    n_a = len(xa)
    floors = {
        "A_2000_every_10th_vs_B_10000": kl_of(np.arange(0, n_a, max(1, n_a // 2000))[:2000]),
        "A_10000_every_2nd_vs_B_10000": kl_of(np.arange(0, n_a, 2)[:10000]),
        "A_all_20000_vs_B_10000": kl_of(np.arange(n_a)),
    }
    rng = np.random.default_rng(0)
    rand2k = [kl_of(np.sort(rng.choice(n_a, min(n_a, 2000), replace=False))) for _ in range(10)]
    rand10k = [kl_of(np.sort(rng.choice(n_a, min(n_a, 10000), replace=False))) for _ in range(10)]
    floors["A_2000_random_vs_B_10000_mean_sd_of_10"] = [float(np.mean(rand2k)), float(np.std(rand2k))]
    floors["A_10000_random_vs_B_10000_mean_sd_of_10"] = [float(np.mean(rand10k)), float(np.std(rand10k))]
    # within one run: first half vs second half (10,000 each)
    half = n_a // 2
    floors["A_first_half_vs_A_second_half"] = aldp.ramachandran_kl(hist(phi_a[:half], psi_a[:half]),
                                                                   hist(phi_a[half:], psi_a[half:]))
    sub = np.linspace(0, n_a - 1, 200).astype(int)
    cip = {"A": sorted(set(aldp.cip_labels(xa[sub]))), "B": sorted(set(aldp.cip_labels(xb[sub])))}

    def tau(v):
        v = np.asarray(v, dtype=np.float64)
        return integrated_autocorrelation_time(torch.as_tensor(v)) if v.std() > 0 else None

    def run_summary(md, phi, psi):
        m = md["meta"]
        e = md["energy"]
        basin = (phi > 0).astype(float)
        return dict(
            seed=m["seed"], frames=len(e), ns=m["ns"], seconds_production=m["seconds_production"],
            seconds_equilibration=m["seconds_equilibration"], ns_per_day=m["ns_per_day"],
            mean_energy_kT=float(e.mean()), std_energy_kT=float(e.std()),
            phi_positive_fraction=float(basin.mean()), phi_positive_transitions=int(np.abs(np.diff(basin)).sum()),
            l_fraction=aldp.l_fraction(md["positions"]),
            tau_frames=dict(energy=tau(e), cos_phi=tau(np.cos(phi)), sin_psi=tau(np.sin(psi)),
                            cos_psi=tau(np.cos(psi)), phi_positive=tau(basin)),
            bond_length_mean_A=float(aldp.bond_lengths(md["positions"]).mean()),
        )

    summary = dict(
        runs={"A": run_summary(a, phi_a, psi_a), "B": run_summary(b, phi_b, psi_b)},
        meta_A=a["meta"], files=dict(A=path_a, B=path_b),
        cip_labels_of_200_frames=cip,
        ramachandran_kl_noise_floor=floors,
        kl_convention="KL(P_B10000 || Q_A) on 36 x 36 periodic bins, eps 1e-10 added to every bin of both, renormalised",
        bond_length_w1_A_vs_B=aldp.bond_length_w1(xa, xb),
        energy_w1_A_vs_B=aldp._w1(a["energy"], b["energy"]),
        seconds=time.time() - t0,
    )
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "meta_A"}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
