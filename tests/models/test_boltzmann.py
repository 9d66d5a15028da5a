"""Boltzmann generators at toy size: energies against hand-computed values, the MCMC against a law
known in closed form, ESS/W1/autocorrelation estimators against independent computations, the ESS
of an exact model (100 %) and of a wrong one, the network's symmetries, resumable training, and the
command line end to end on a tiny budget.

Statistical tests use fixed seeds; each has a known-wrong variant that must fail.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from qmanifold import Quotient, QuotientDiffusion, make_interpolant
from qmanifold.boltzmann import (
    autocorrelation,
    importance_log_weights,
    integrated_autocorrelation_time,
    kish_ess,
    log_partition_estimate,
    mcmc,
    self_normalized_weights,
    wasserstein_1d,
)
from qmanifold.models.boltzmann import cli as bcli
from qmanifold.models.boltzmann.network import EGNNVelocity
from qmanifold.models.boltzmann.systems import (
    DW4_PARAMS,
    LJ13_GLOBAL_MINIMUM,
    SYSTEMS,
    _icosahedron,
    dw4_energy,
    get_system,
    harmonic_energy,
    lennard_jones_energy,
    lj13_energy,
    pair_distances,
)

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def center(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-2, keepdim=True)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


# ----------------------------------------------------------------------------------------------
# energies


def test_dw4_energy_by_hand():
    # a square of side 4: the four sides sit at d0 (0 each), the two diagonals at 4 sqrt 2
    square = torch.tensor([[[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0]]], dtype=F64)
    s = 4.0 * math.sqrt(2.0) - 4.0
    assert float(dw4_energy(square)) == pytest.approx(2 * (0.9 * s**4 - 4 * s**2), rel=1e-12)
    # four points on a line, spacing 1: distances 1 (x3), 2 (x2), 3 (x1)
    line = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]], dtype=F64)
    pair = {d: 0.9 * (d - 4) ** 4 - 4 * (d - 4) ** 2 for d in (1, 2, 3)}
    assert float(dw4_energy(line)) == pytest.approx(3 * pair[1] + 2 * pair[2] + pair[3], rel=1e-12)
    assert DW4_PARAMS == dict(a=0.9, b=-4.0, c=0.0, d0=4.0)
    # the wells of one pair at d0 +- sqrt(-b / 2a), barrier b^2 / 4a
    d_well = 4 + math.sqrt(4 / 1.8)
    two = torch.tensor([[[0.0, 0.0], [d_well, 0.0]]], dtype=F64)
    assert float(pair_distances(two)) == pytest.approx(d_well)


def test_lennard_jones_by_hand_and_the_lj13_global_minimum():
    two = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]], dtype=F64)
    assert float(lennard_jones_energy(two)) == pytest.approx(-1.0)  # the pair minimum -eps at r_m
    far = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]], dtype=F64)
    assert float(lennard_jones_energy(far)) == pytest.approx(2.0**-12 - 2 * 2.0**-6)
    # the Mackay icosahedron, LJ13's global minimum: -44.326801 eps (Wales & Doye 1997) for the pair
    # sum over i<j; a halved sum gives -22.16. The icosahedron's one free parameter is its radius.
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda r: float(lennard_jones_energy(_icosahedron(r))), bounds=(0.8, 1.2), method="bounded",
                          options=dict(xatol=1e-10))
    assert res.fun == pytest.approx(LJ13_GLOBAL_MINIMUM, abs=1e-5)
    x = _icosahedron(res.x)
    # harmonic part: 12 vertices at radius r, the centre at the centroid
    assert float(harmonic_energy(x)) == pytest.approx(0.5 * 12 * res.x**2, rel=1e-12)
    assert float(lj13_energy(x[None])) == pytest.approx(LJ13_GLOBAL_MINIMUM + 6 * res.x**2, abs=1e-5)


@pytest.mark.parametrize("name", ["dw4", "lj13"])
def test_energies_are_invariant(name):
    system = get_system(name)
    x = system.init(3, gen(0), F64)
    R = random_orthogonal(system.dim, 1)
    perm = torch.randperm(system.n_particles, generator=gen(2))
    moved = (x @ R.T + torch.randn(1, 1, system.dim, generator=gen(3), dtype=F64))[:, perm]
    torch.testing.assert_close(system.energy(moved), system.energy(x), rtol=1e-10, atol=1e-10)
    assert bool(torch.isfinite(system.energy(x)).all())


def test_the_command_line_lists_the_systems():
    assert set(bcli.SYSTEM_NAMES) == set(SYSTEMS)
    assert bcli.DEFAULT_N == {k: s.default_n for k, s in SYSTEMS.items()}
    with pytest.raises(ValueError, match="unknown system"):
        get_system("lj55")


# ----------------------------------------------------------------------------------------------
# estimators


def test_kish_ess_wasserstein_and_weights_against_independent_computations():
    log_w = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)) + 700.0  # would overflow exp
    assert float(kish_ess(log_w)) == pytest.approx(10.0**2 / (4 * 30.0))
    assert float(kish_ess(torch.zeros(7, dtype=F64))) == pytest.approx(1.0)
    assert float(kish_ess(torch.tensor([0.0, -math.inf, -math.inf], dtype=F64))) == pytest.approx(1 / 3)
    assert float(kish_ess(torch.full((3,), -math.inf, dtype=F64))) == 0.0
    w = self_normalized_weights(log_w)
    torch.testing.assert_close(w, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64))
    assert float(log_partition_estimate(torch.log(torch.tensor([1.0, 3.0], dtype=F64)))) == pytest.approx(math.log(2.0))
    lw = importance_log_weights(torch.tensor([1.0, math.inf]), torch.tensor([-2.0, 0.0]), kT=2.0)
    assert lw.tolist() == [1.5, -math.inf]
    a = torch.randn(300, generator=gen(0), dtype=F64)
    b = 0.5 + 2 * torch.randn(200, generator=gen(1), dtype=F64)
    wa = torch.rand(300, generator=gen(2), dtype=F64)
    assert float(wasserstein_1d(a, b)) == pytest.approx(stats.wasserstein_distance(a.numpy(), b.numpy()), rel=1e-10)
    assert float(wasserstein_1d(a, b, a_weights=wa)) == pytest.approx(
        stats.wasserstein_distance(a.numpy(), b.numpy(), u_weights=wa.numpy()), rel=1e-10)
    with pytest.raises(ValueError, match="non-finite value has a positive weight"):
        wasserstein_1d(torch.tensor([0.0, math.inf]), b, a_weights=torch.ones(2))


def test_autocorrelation_time_of_an_ar1_process():
    """AR(1) x_k = phi x_{k-1} + noise: rho(k) = phi^k, tau = (1 + phi) / (1 - phi) = 19 for phi = 0.9.
    The known-wrong estimate (the sum of the autocorrelation without the factor 2, tau = 10) fails."""
    phi, T, C = 0.9, 20000, 8
    noise = torch.randn(T, C, generator=gen(0), dtype=F64)
    x = torch.zeros(T, C, dtype=F64)
    x[0] = noise[0] / math.sqrt(1 - phi**2)
    for k in range(1, T):
        x[k] = phi * x[k - 1] + noise[k]
    rho = autocorrelation(x)
    assert float(rho[0]) == 1.0 and float(rho[1]) == pytest.approx(phi, abs=0.01) and float(rho[5]) == pytest.approx(phi**5, abs=0.02)
    tau = integrated_autocorrelation_time(x)
    assert tau == pytest.approx(19.0, rel=0.08)
    assert not 0.92 * 10.0 < tau < 1.08 * 10.0


# ----------------------------------------------------------------------------------------------
# MCMC on a law known in closed form


def gaussian_energy(sigma: float):
    return lambda x: 0.5 * x.square().sum((-2, -1)) / sigma**2


@pytest.mark.parametrize("method", ["mala", "metropolis"])
def test_mcmc_samples_a_gaussian_on_the_centre_of_mass_free_subspace(method):
    """U = |x|^2 / (2 s^2) on the centred configurations of N = 3 points in 2D (dimension 4): |x|^2 / s^2
    is chi^2 with (N - 1) d = 4 degrees of freedom and each coordinate has variance s^2 (1 - 1/N). The
    chain is thinned at twice its measured autocorrelation time. Known-wrong: the chi^2 law of the full
    dimension N d = 6 (a chain that ignored the constraint) is rejected, and so is the sampler run at
    the wrong temperature."""
    s, N, d = 0.7, 3, 2
    energy = gaussian_energy(s)
    x0 = center(torch.randn(100, N, d, generator=gen(1), dtype=F64)) * 3.0
    pilot = mcmc(energy, x0, n_samples=1, thin=1500, burn_in=500, method=method, step_size=0.3,
                 target_acceptance=0.57 if method == "mala" else 0.3, project=center, generator=gen(2), trace=True)
    thin = math.ceil(2 * integrated_autocorrelation_time(pilot.trace))
    assert 1 <= thin <= 40
    run = mcmc(energy, pilot.final, n_samples=20, thin=thin, method=method, step_size=pilot.step_size, project=center,
               generator=gen(3))
    x = run.samples.reshape(-1, N, d)
    assert float(x.sum(-2).abs().max()) < 1e-10  # stays on M
    r2 = (x.square().sum((-2, -1)) / s**2).numpy()
    assert stats.kstest(r2, stats.chi2(df=(N - 1) * d).cdf).pvalue > 0.01
    assert stats.kstest(r2, stats.chi2(df=N * d).cdf).pvalue < 1e-6
    var = float(x.var())
    assert var == pytest.approx(s**2 * (1 - 1 / N), rel=0.05)
    hot = mcmc(energy, pilot.final, n_samples=20, thin=thin, method=method, step_size=pilot.step_size, kT=1.5,
               project=center, generator=gen(3))
    r2_hot = (hot.samples.reshape(-1, N, d).square().sum((-2, -1)) / s**2).numpy()
    assert stats.kstest(r2_hot, stats.chi2(df=(N - 1) * d).cdf).pvalue < 1e-6
    assert float(run.chain_acceptance.min()) > 0.1


def test_tamed_mala_is_exact_and_escapes_a_steep_wall():
    """The tamed drift keeps the kernel exact (a quartic law: the 1-D marginal of U = x^4 matches its
    density) and a chain started far out on the quartic moves, where untamed MALA at the same step
    size rejects every proposal."""
    energy = lambda x: x.pow(4).sum((-2, -1))
    x0 = torch.full((200, 1, 1), 0.5, dtype=F64)
    run = mcmc(energy, x0, n_samples=30, thin=20, burn_in=300, step_size=0.5, max_drift=1.0, generator=gen(0))
    v = run.samples.reshape(-1).numpy()
    grid = np.linspace(-3, 3, 20001)
    dens = np.exp(-grid**4)
    cdf = np.cumsum(dens) / dens.sum()
    assert stats.kstest(v, lambda q: np.interp(q, grid, cdf)).pvalue > 0.01
    far = torch.full((50, 1, 1), 6.0, dtype=F64)
    stuck = mcmc(energy, far, n_samples=1, thin=50, step_size=0.5, generator=gen(1))
    moved = mcmc(energy, far, n_samples=1, thin=50, step_size=0.5, max_drift=1.0, generator=gen(1))
    assert stuck.acceptance == 0.0
    assert moved.acceptance > 0.2 and float(moved.final.abs().max()) < 3.0


# ----------------------------------------------------------------------------------------------
# the ESS of an exact model


class IsotropicGaussian(nn.Module):
    """Exact denoiser of x1 ~ N(0, s^2 I) on M_0 (centred) for the linear interpolant."""

    def __init__(self, s: float):
        super().__init__()
        self.s = s
        self.interp = make_interpolant("linear")

    def forward(self, x, t, mask=None):
        a, b = self.interp.ahat(t)[:, None, None], self.interp.beta(t)[:, None, None]
        return b * self.s**2 / (b * b * self.s**2 + a * a) * center(x)


@pytest.mark.parametrize(("model_s", "expect_exact"), [(1.7, True), (2.3, False)])
def test_ess_is_100_percent_when_the_model_is_the_target(model_s, expect_exact):
    """Target U = |x|^2 / (2 s^2) on M_0 of 4 points in 2D (quotient SE(2) x S_N, s = 1.7). The model with
    the exact denoiser samples the target, so every weight exp(-U)/q equals Z = (2 pi s^2)^{n/2},
    n = (N - 1) d = 6: ESS = 100 % and log mean w = log Z (this checks the centre-of-mass-free
    convention of the densities). Known-wrong: the exact model of s = 2.3 has ESS far below 100 %."""
    system = get_system("dw4")
    s = 1.7
    model = QuotientDiffusion(Quotient(system.group), IsotropicGaussian(model_s), "linear")
    x, log_q = model.sample((256, 4, 2), steps=40, method="rk4", return_log_prob=True, space="total",
                            generator=gen(0), dtype=F64)
    energy = 0.5 * x.square().sum((-2, -1)) / s**2
    log_w = importance_log_weights(energy, log_q)
    ess = float(kish_ess(log_w))
    log_z = 0.5 * 6 * math.log(2 * math.pi * s**2)
    if expect_exact:
        assert ess > 0.99999
        assert float(log_partition_estimate(log_w)) == pytest.approx(log_z, abs=1e-4)
        assert float(log_w.std()) < 1e-3
    else:
        assert ess < 0.8
        # reweighting repairs the energy distribution of the wrong model
        e_true = 0.5 * torch.from_numpy(stats.chi2(df=6).rvs(4000, random_state=0))  # U = chi^2_6 / 2
        w = self_normalized_weights(log_w)
        assert float(wasserstein_1d(energy, e_true, a_weights=w)) < 0.5 * float(wasserstein_1d(energy, e_true))


# ----------------------------------------------------------------------------------------------
# network


@pytest.mark.parametrize("d", [2, 3])
def test_the_network_is_equivariant_and_translation_invariant(d):
    torch.manual_seed(0)
    net = EGNNVelocity(hidden=16, layers=2).double()
    for p in net.parameters():  # make the coordinate updates non-trivial
        nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 6, d, generator=gen(1), dtype=F64)
    t = torch.rand(5, generator=gen(2), dtype=F64)
    v = net(x, t)
    assert float(v.detach().abs().max()) > 1e-3
    assert float(v.detach().sum(-2).abs().max()) < 1e-10  # centred
    R = random_orthogonal(d, 3)
    perm = torch.randperm(6, generator=gen(4))
    shift = torch.randn(5, 1, d, generator=gen(5), dtype=F64)
    torch.testing.assert_close(net((x @ R.T + shift)[:, perm], t), (v @ R.T)[:, perm], rtol=1e-9, atol=1e-10)
    # each configuration is treated independently (as log_prob's batched trace requires)
    torch.testing.assert_close(net(x[2:3], t[2:3]), v[2:3], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# training and the command line


def run_cli(argv) -> int:
    from qmanifold.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("bg") / "dw4.npz"
    argv = ["data", "dw4", "--n", "200", "--chains", "20", "--burn-in", "3000", "--pilot", "500", "--out", str(path),
            "--no-progress"]
    assert run_cli(argv) == 0
    return path


def test_data_are_cached_and_documented(tiny_data, capsys):
    from qmanifold.models.boltzmann.data import load

    data = load(tiny_data)
    m = data.meta
    assert data.x.shape == (200, 4, 2) and data.test.sum() == m["n_test"] > 0
    assert np.abs(data.x.sum(1)).max() < 1e-10
    np.testing.assert_allclose(dw4_energy(torch.from_numpy(data.x)).numpy(), data.energy, rtol=1e-10)
    assert m["burn_in"] >= 20 * max(m["tau_energy"], m["tau_mean_distance"])
    assert m["thin"] >= 2 * max(m["tau_energy"], m["tau_mean_distance"])
    assert set(data.chain[data.test]).isdisjoint(set(data.chain[~data.test]))
    argv = ["data", "dw4", "--n", "200", "--chains", "20", "--burn-in", "3000", "--pilot", "500", "--out", str(tiny_data)]
    assert run_cli(argv) == 0
    assert "cached" in capsys.readouterr().out
    assert run_cli(["data", "dw4", "--n", "300", "--out", str(tiny_data)]) == 2  # a different data set: refused
    assert "different data set" in capsys.readouterr().err


def test_train_resumes_exactly(tiny_data, tmp_path):
    from qmanifold.models.boltzmann.train import TrainConfig, train

    cfg = TrainConfig(steps=6, batch_size=8, hidden=8, layers=1, warmup=2, ckpt_every=3, log_every=1)
    quiet = lambda *a, **k: None
    train(str(tiny_data), str(tmp_path / "a"), cfg, log=quiet)
    train(str(tiny_data), str(tmp_path / "b"), cfg, stop_after=3, log=quiet)
    train(str(tiny_data), str(tmp_path / "b"), cfg, resume=True, log=quiet)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in a["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=0)


def test_the_command_line_end_to_end(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train-boltzmann", "--data", str(tiny_data), "--out", str(run), "--steps", "4", "--batch-size", "8",
                    "--hidden", "8", "--layers", "1", "--no-progress"]) == 0
    assert run_cli(["train-boltzmann", "--data", str(tiny_data), "--out", str(run), "--steps", "4"]) == 2  # not empty
    out_json, plots = tmp_path / "eval.json", tmp_path / "plots"
    argv = ["evaluate-boltzmann", "--system", "dw4", "--checkpoint", str(run / "last.pt"), "--n", "16", "--steps", "3",
            "--json", str(out_json), "--plots", str(plots)]
    assert run_cli(argv) == 0
    res = json.loads(out_json.read_text())
    for key in ("nll", "nll_quotient", "ess", "energy_w1", "energy_w1_reweighted", "energy_w1_clipped", "distance_w1",
                "log_z_estimate"):
        assert math.isfinite(res[key]), key
    assert 0.0 < res["ess"] <= 1.0 and res["n_samples"] == 16
    assert res["energy_w1_clipped"] <= res["energy_w1"] + 1e-12 and 0.0 <= res["high_energy_fraction"] <= 1.0
    assert res["equivariance_error"] < 1e-3  # float32
    assert res["nll_without_gaussian_constant"] == pytest.approx(res["nll"] - 3 * math.log(2 * math.pi))
    assert sorted(p.name for p in plots.iterdir()) == ["dw4_distances.png", "dw4_energy.png", "dw4_log_weights.png"]
    assert run_cli(argv) == 2  # outputs exist: refused without --overwrite
    assert run_cli(["evaluate-boltzmann", "--system", "lj13", "--checkpoint", str(run / "last.pt"), "--n", "16"]) == 2
    assert "is a dw4 model" in capsys.readouterr().err


def test_the_parsers_import_no_heavy_module():
    code = ("import sys\nfrom qmanifold.cli import main\n"
            "try:\n    main(['evaluate-boltzmann', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'scipy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
