"""The likelihood checks of ``qmanifold verify`` and the exact densities of its toy targets.

* The exact densities (``ToyTarget.log_density``), each against a computation that shares no code
  with it: the SE(3) toy's (Gaussian term + log matrix Fisher normaliser) against plain Monte Carlo
  over Haar rotations (sigma = 0.5) and against importance sampling around the Procrustes rotation
  in exponential coordinates (the default sigma = 0.1), both with Haar rotations drawn here;
  against the exact denoiser by Tweedie's formula (the gradient of the marginal's log-density);
  the SO(2) and torus densities against quadrature over the angles, the permutation mixture
  against an explicit sum. Monte-Carlo tolerances are 5 estimated standard errors (delta method).
* The targets' closed-form orbit volumes against ``qmanifold.likelihood.log_orbit_volume``.
* ``run_likelihood_checks``: the correct variants pass (errors far below the tolerance), every
  negative control fails (errors above 1 nat), too few ODE steps fail; the negative controls equal
  ``log_prob(..., curvature_factor=0)``; ``matrix_fisher_mean`` is differentiable at F = 0.
* The suite and the CLI: the checks are listed, selectable by name, in the default and the quick
  suite, weighted in the progress bar, reported in the table and the JSON, plotted.

All deterministic (fixed seeds), float64.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from qmanifold import likelihood as L
from qmanifold.cli import VERIFY_LIKELIHOOD_SIZES, VERIFY_VARIANTS, main
from qmanifold.diffusion import QuotientDiffusion
from qmanifold.schedules import make_interpolant
from qmanifold.verify.likelihood_checks import (
    LIKELIHOOD_SIZES,
    LIKELIHOOD_VARIANTS,
    TOLERANCE,
    likelihood_cost,
    likelihood_variants_for,
    run_likelihood_checks,
)
from qmanifold.verify.matrix_fisher import matrix_fisher_log_normalizer_and_grad, matrix_fisher_mean, proper_svd
from qmanifold.verify.runner import (
    DEFAULT_CONFIG,
    QUICK_CONFIG,
    VARIANTS,
    ExactDenoiser,
    SuiteConfig,
    available_variants,
    builtin_case,
    estimated_cost,
    format_table,
    run_suite,
)
from qmanifold.verify.targets import center_points, make_target, se3_template_denoise

F64 = torch.float64
LINEAR = make_interpolant("linear")

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# helpers written independently of the library


def haar_rotations(k: int, seed: int) -> torch.Tensor:
    """k Haar rotations (k, 3, 3) from normalised Gaussian quaternions."""
    q = torch.randn(k, 4, generator=gen(seed), dtype=F64)
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rodrigues(omega: torch.Tensor) -> torch.Tensor:
    """exp of the skew matrix of omega (k, 3): (k, 3, 3)."""
    theta = omega.norm(dim=-1, keepdim=True).unsqueeze(-1)
    wx, wy, wz = omega.unbind(-1)
    zero = torch.zeros_like(wx)
    K = torch.stack([torch.stack([zero, -wz, wy], -1), torch.stack([wz, zero, -wx], -1),
                     torch.stack([-wy, wx, zero], -1)], -2)
    eye = torch.eye(3, dtype=omega.dtype)
    return eye + torch.sin(theta) / theta * K + (1 - torch.cos(theta)) / theta**2 * (K @ K)


def gaussian_on_m(y: torch.Tensor, c: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(y; c, sigma^2) on the CoM-free subspace of (N, d) configurations (y, c centred)."""
    n = (y.shape[-2] - 1) * y.shape[-1]
    return -0.5 * n * math.log(2 * math.pi * sigma**2) - (y - c).square().sum((-2, -1)) / (2 * sigma**2)


def log_mean_exp(logw: torch.Tensor) -> tuple[float, float]:
    """log of the mean of exp(logw) over the last axis and its delta-method standard error."""
    m = logw.max()
    w = torch.exp(logw - m)
    return float(m + torch.log(w.mean())), float(w.std() / (w.mean() * math.sqrt(w.shape[0])))


# ----------------------------------------------------------------------------------------------
# the exact densities


def test_se3_density_matches_monte_carlo_over_haar_rotations():
    """sigma = 0.5: q_M(x) = E_R[N(R^T x; c, sigma^2)] over 400,000 Haar rotations, at three exact
    samples, the mirror image of one (chirality: the proper SVD's negative s3) and a random
    configuration. Tolerance: 5 Monte-Carlo standard errors (each below 0.02 nats)."""
    target = make_target("se3", sigma_data=0.5)
    c = target.template
    x = target.sample(3, gen(0), dtype=F64)
    mirror = x[:1] * torch.tensor([1.0, 1.0, -1.0], dtype=F64)
    other = center_points(torch.randn(1, 4, 3, generator=gen(1), dtype=F64))
    points = torch.cat([x, mirror, other])
    closed = target.log_density(points)
    R = haar_rotations(400_000, seed=2)
    for i, xi in enumerate(points):
        logw = gaussian_on_m(xi @ R, c, 0.5)  # row n of x R is (R^T x_n)^T
        est, se = log_mean_exp(logw)
        assert se < 0.02, (i, se)
        assert abs(est - float(closed[i])) < 5 * se, (i, est, float(closed[i]), se)
    assert float(closed[0] - closed[3]) > 0.5  # the mirror image is less likely: the density is chiral


def test_se3_density_matches_importance_sampling_at_the_default_sigma():
    """sigma = 0.1 (the verify target): importance sampling of the rotation integral around the
    Procrustes rotation R0, R = R0 exp([omega]), omega ~ N(0, 0.09^2 I) (the posterior's spread is
    about 0.07), with the normalised Haar density 2 (1 - cos|omega|) / (8 pi^2 |omega|^2) in
    exponential coordinates. 200,000 draws per point; tolerance 5 standard errors (each below
    2e-3 nats)."""
    target = make_target("se3")
    c = target.template
    points = target.sample(4, gen(3), dtype=F64)
    closed = target.log_density(points)
    s = 0.09
    omega = s * torch.randn(200_000, 3, generator=gen(4), dtype=F64)
    theta = omega.norm(dim=-1)
    log_haar = torch.log(2 * (1 - torch.cos(theta)) / theta**2) - math.log(8 * math.pi**2)
    log_proposal = -0.5 * (omega.square().sum(-1) / s**2) - 1.5 * math.log(2 * math.pi * s**2)
    E = rodrigues(omega)
    for i, xi in enumerate(points):
        U, _, Vh = torch.linalg.svd(xi.mT @ c)
        R0 = U @ torch.diag(torch.tensor([1.0, 1.0, float(torch.linalg.det(U @ Vh))], dtype=F64)) @ Vh
        R = R0 @ E
        logw = gaussian_on_m(xi @ R, c, 0.1) + log_haar - log_proposal
        est, se = log_mean_exp(logw)
        assert se < 2e-3, (i, se)
        assert abs(est - float(closed[i])) < 5 * se, (i, est, float(closed[i]), se)


def test_se3_density_gradient_is_the_exact_denoiser_by_tweedie():
    """x_t = beta x1 + ahat eps has the law of the same toy with template beta c and noise
    s^2 = beta^2 sigma^2 + ahat^2, so E[x1 | x_t] = (x_t + ahat^2 grad log q_t(x_t)) / beta:
    autograd through the density must reproduce the exact denoiser (to 1e-9)."""
    target = make_target("se3")
    g = gen(5)
    x1 = target.sample(6, g, dtype=F64)
    eps = target.sample_noise(6, g, dtype=F64)
    for ahat, beta in ((0.3, 0.7), (0.8, 0.4), (0.05, 0.95)):
        s = math.sqrt(beta**2 * target.sigma_data**2 + ahat**2)
        marginal = make_target("se3", template=beta * target.template, sigma_data=s)
        xt = (ahat * eps + beta * x1).requires_grad_(True)
        (score,) = torch.autograd.grad(marginal.log_density(xt).sum(), xt)
        tweedie = (xt.detach() + ahat**2 * center_points(score)) / beta
        exact = se3_template_denoise(xt.detach(), ahat, beta, target.template, target.sigma_data)
        torch.testing.assert_close(tweedie, exact, rtol=0, atol=1e-9)


def test_so2_torus_and_permutation_densities_match_direct_computations():
    """SO(2) and torus: the rotation average by the trapezoid rule over 4096 angles (spectrally
    accurate for a periodic integrand); permutations: the explicit sum over the 24 Gaussians."""
    theta = 2 * math.pi * torch.arange(4096, dtype=F64) / 4096
    rot = torch.stack([torch.stack([theta.cos(), -theta.sin()], -1), torch.stack([theta.sin(), theta.cos()], -1)], -2)
    so2 = make_target("so2")
    x = torch.cat([so2.sample(4, gen(6), dtype=F64), center_points(torch.randn(1, 3, 2, generator=gen(7), dtype=F64))])
    for i, xi in enumerate(x):
        direct = torch.logsumexp(gaussian_on_m(xi @ rot, so2.template, so2.sigma_data), 0) - math.log(4096)
        assert abs(float(direct - so2.log_density(x)[i])) < 1e-10

    torus = make_target("torus")
    z = torus.sample(4, gen(8), dtype=F64)
    closed = torus.log_density(z)
    for i, zi in enumerate(z):
        total = 0.0
        for j in range(torus.k):
            mean = torus.mu[j] * torch.stack([theta.cos(), theta.sin()], -1)  # (4096, 2)
            logp = -math.log(2 * math.pi * torus.tau[j] ** 2) - (zi[j] - mean).square().sum(-1) / (2 * torus.tau[j] ** 2)
            total += float(torch.logsumexp(logp, 0) - math.log(4096))
        assert abs(total - float(closed[i])) < 1e-10

    perm = make_target("permutations")
    y = perm.sample(4, gen(9), dtype=F64)
    closed = perm.log_density(y)
    for i, yi in enumerate(y[..., 0]):
        comps = [float(torch.distributions.Normal(perm.m[list(p)], perm.tau).log_prob(yi).sum())
                 for p in itertools.permutations(range(perm.n))]
        assert abs(float(torch.logsumexp(torch.tensor(comps, dtype=F64), 0)) - math.log(24) - float(closed[i])) < 1e-10


def test_closed_form_orbit_volumes_agree_with_the_library():
    """log vol(G x) written per target (2 pi |x|, 8 pi^2 sqrt(det K), prod 2 pi r_j, n!) equals
    qmanifold.likelihood.log_orbit_volume on the quotients the verify cases use."""
    for name in ("so2", "se3", "torus", "permutations", "so2_user_group"):
        case = builtin_case(name)
        x = case.target.sample(5, gen(10), dtype=F64)
        library = L.log_orbit_volume(case.quotient, case.to_group(x))
        torch.testing.assert_close(case.target.log_orbit_volume(x), library, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(case.target.log_density(x, "quotient") - case.target.log_density(x),
                                   library, rtol=0, atol=1e-12, msg=name)


def test_density_errors_are_clear():
    with pytest.raises(ValueError, match="noise scale must be > 0"):
        make_target("se3", sigma_data=0.0).log_density(torch.zeros(1, 4, 3, dtype=F64))
    with pytest.raises(ValueError, match="space must be"):
        make_target("so2").log_density(torch.zeros(1, 3, 2, dtype=F64), space="both")
    with pytest.raises(NotImplementedError, match="no closed-form density"):
        make_target("lattice").log_density(torch.zeros(1, 1, 2, dtype=F64))
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        make_target("se3").log_density(torch.zeros(1, 3, 3, dtype=F64))


def test_matrix_fisher_mean_is_differentiable_at_zero_and_unchanged_elsewhere():
    """At F = 0 (the exact SE(3) denoiser at t = 0) E[R] = F/3 has the derivative I/3, where the SVD's
    is NaN; away from the ball |F| <= 1e-8 the value is the SVD formula, bit for bit."""
    F = torch.zeros(2, 3, 3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(matrix_fisher_mean(F)[:, 0, 1].sum(), F)
    expected = torch.zeros(2, 3, 3, dtype=F64)
    expected[:, 0, 1] = 1 / 3
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    G = torch.randn(5, 3, 3, generator=gen(11), dtype=F64) * torch.tensor([1e-7, 1.0, 30.0, 1e3, 1e-6], dtype=F64)[:, None, None]
    U, s, V = proper_svd(G)
    direct = (U * matrix_fisher_log_normalizer_and_grad(s)[1].unsqueeze(-2)) @ V.mT
    assert torch.equal(matrix_fisher_mean(G), direct)
    small = 1e-9 * torch.randn(3, 3, generator=gen(12), dtype=F64)
    torch.testing.assert_close(matrix_fisher_mean(small), small / 3, rtol=0, atol=1e-17)


# ----------------------------------------------------------------------------------------------
# the checks


@pytest.mark.parametrize("name,n", [("so2", 6), ("se3", 3), ("torus", 6), ("permutations", 6)])
def test_checks_pass_for_the_correct_variants_and_fail_for_the_wrong_ones(name, n):
    records = run_likelihood_checks(builtin_case(name), list(LIKELIHOOD_VARIANTS) if name != "permutations"
                                    else ["likelihood_route_m", "likelihood_no_orbit_volume"], n_samples=n, steps=40)
    assert all(r.ok for r in records), [(r.variant, r.statistic) for r in records]
    tol = TOLERANCE[F64]
    for r in records:
        assert r.kind == "likelihood" and r.tolerance == tol and r.n_samples == n and r.steps == 40
        assert math.isnan(r.p_value) and r.effect_size == pytest.approx(r.statistic / tol)
        if r.expected == "pass":
            assert r.statistic < tol / 10  # a margin of 10 at 40 RK4 steps
        else:
            assert r.statistic > 1.0  # a nat or more: log vol(G x) or log vol(K)
    by_name = {r.variant: r for r in records}
    if "likelihood_route_q" in by_name:
        assert set(by_name["likelihood_route_q"].features) == {"quotient", "total", "route_gap"}
        assert by_name["likelihood_route_q"].features["route_gap"]["max_abs_error"] < tol / 10  # route Q == route M
        assert by_name["likelihood_wrong_group_volume"].features["quotient"]["mean_error"] == pytest.approx(
            -L.log_group_volume(builtin_case(name).quotient.lie)[0], abs=1e-4)


def test_too_few_steps_fail_the_check():
    """The tolerance has teeth against the solver's own error: 5 RK4 steps are off by > 1e-3."""
    (rec,) = run_likelihood_checks(builtin_case("so2"), ["likelihood_route_m"], n_samples=4, steps=5)
    assert not rec.passed and not rec.ok and rec.statistic > 1e-3


def test_negative_controls_equal_log_prob_with_curvature_factor_zero():
    """The negative controls are assembled from the correct solves; they equal what log_prob returns
    with curvature_factor=0 on route M and on route Q."""
    case = builtin_case("so2")
    names = ["likelihood_no_orbit_volume", "likelihood_route_q_no_orbit_volume"]
    _, values = run_likelihood_checks(case, names, n_samples=3, steps=10, seed=7, return_values=True)
    x = case.target.sample(3, torch.Generator().manual_seed(7 + 20_000), dtype=F64)
    model = QuotientDiffusion(case.quotient, ExactDenoiser(case, LINEAR), LINEAR, validate=False)
    for name, route in zip(names, ("M", "Q")):
        library = model.log_prob(x, steps=10, route=route, curvature_factor=0.0)
        torch.testing.assert_close(values[name][0], library, rtol=0, atol=1e-10, msg=name)
        torch.testing.assert_close(values[name][1], case.target.log_density(x, "quotient"), rtol=0, atol=0)


def test_bad_checks_name_the_problem():
    with pytest.raises(ValueError, match="no closed-form density"):
        run_likelihood_checks(builtin_case("lattice"), ["likelihood_route_m"])
    with pytest.raises(ValueError, match="continuous fibres"):
        run_likelihood_checks(builtin_case("permutations"), ["likelihood_route_q"])
    with pytest.raises(ValueError, match="unknown likelihood variant"):
        run_likelihood_checks(builtin_case("so2"), ["likelihood_bogus"])
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['likelihood_bogus'\]; available: .*likelihood_route_q"):
        run_suite(["so2"], ["likelihood_bogus"], progress=False)


# ----------------------------------------------------------------------------------------------
# the suite and the CLI


def test_checks_are_in_the_default_and_quick_suites_and_listed():
    names = tuple(LIKELIHOOD_VARIANTS)
    assert available_variants()[-len(names):] == names and set(names) <= set(VERIFY_VARIANTS)
    assert DEFAULT_CONFIG.variants is None and set(names) <= set(QUICK_CONFIG.variants)
    assert VERIFY_LIKELIHOOD_SIZES == (LIKELIHOOD_SIZES["n_samples"], LIKELIHOOD_SIZES["steps"])
    for config in (DEFAULT_CONFIG, QUICK_CONFIG):
        assert config.overrides["se3/likelihood"] == {"n_samples": 8}
    expected = {"so2": 5, "se3": 5, "torus": 5, "permutations": 2, "lattice": 0, "so2_user_group": 5}
    for target, k in expected.items():
        assert len(likelihood_variants_for(builtin_case(target), names)) == k, target


def test_suite_runs_the_checks_with_the_progress_bar_weighted_by_their_cost(monkeypatch):
    import tqdm.auto

    bars = []

    class Recorder:
        def __init__(self, total, **kwargs):
            self.total, self.updates = total, []
            bars.append(self)

        def set_postfix_str(self, text):
            pass

        def update(self, amount):
            self.updates.append(amount)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    cfg = SuiteConfig(targets=("so2",), n_samples=200, steps=10, heun_steps=4, overrides={"so2/likelihood": {"n_samples": 3}})
    records = run_suite(["so2"], ["quotient_heun", "likelihood_route_m", "likelihood_no_orbit_volume"], config=cfg,
                        progress=True)
    assert [r.variant for r in records] == ["quotient_heun", "likelihood_route_m", "likelihood_no_orbit_volume"]
    assert all(r.ok for r in records[1:]) and [(r.n_samples, r.steps) for r in records[1:]] == [(3, 40), (3, 40)]
    case = builtin_case("so2")
    lik = likelihood_cost(case, [LIKELIHOOD_VARIANTS["likelihood_route_m"], LIKELIHOOD_VARIANTS["likelihood_no_orbit_volume"]],
                          n_samples=3, steps=40)
    heun = estimated_cost(case, VARIANTS["quotient_heun"], **cfg.sizes("so2", VARIANTS["quotient_heun"]),
                          checkpoints=cfg.checkpoints, grid_power=cfg.grid_power)
    (bar,) = bars
    assert bar.updates == [heun, lik] and bar.total == heun + lik
    # one solve for the two checks (both use route M); route Q adds a second; SE(3) costs more per sample
    assert likelihood_cost(case, [LIKELIHOOD_VARIANTS["likelihood_route_q"]], 3, 40) == 2 * lik
    assert likelihood_cost(builtin_case("se3"), [LIKELIHOOD_VARIANTS["likelihood_route_m"]], 8, 40) > \
        3 * likelihood_cost(case, [LIKELIHOOD_VARIANTS["likelihood_route_m"]], 8, 40)
    table = format_table(records)
    assert "likelihood check" in table and "KS D" in table and "verdicts as expected" in table


def test_cli_lists_selects_and_reports_the_checks(tmp_path, capsys):
    out, plots = tmp_path / "lik.json", tmp_path / "plots"
    code = main(["verify", "--targets", "se3", "permutations", "--variants", "likelihood_route_q",
                 "likelihood_wrong_group_volume", "likelihood_route_m", "--likelihood-samples", "2", "--json", str(out),
                 "--plots", str(plots), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    records = json.loads(out.read_text())
    assert [(r["target"], r["variant"]) for r in records] == [
        ("se3", "likelihood_route_q"), ("se3", "likelihood_wrong_group_volume"), ("se3", "likelihood_route_m"),
        ("permutations", "likelihood_route_m")]
    for r in records:
        assert r["kind"] == "likelihood" and r["p_value"] is None and r["ok"] and r["n_samples"] == 2
        assert r["steps"] == LIKELIHOOD_SIZES["steps"] and r["tolerance"] == TOLERANCE[F64]
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"{r['target']}__{r['variant']}.png" for r in records)
    assert "likelihood_wrong_group_volume" in printed and "4/4 verdicts as expected" in printed
    with pytest.raises(SystemExit):
        main(["verify", "--likelihood-steps", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--help"])
    assert exit_info.value.code == 0 and "likelihood_route_q_no_orbit_volume" in capsys.readouterr().out
