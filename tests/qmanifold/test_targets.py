"""Tests of the exact toy targets (qmanifold.verify.targets) and the matrix Fisher routines.

Monte-Carlo comparisons use fixed seeds; their tolerances are stated in units of the
estimated Monte-Carlo standard error (self-normalised importance sampling, delta method).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import special

from qmanifold.verify import (
    PermutationMixture,
    SE3Template,
    SO2Template,
    WrappedNormalLattice,
    available_targets,
    haar_so3,
    importance_posterior_mean,
    make_target,
    matrix_fisher_log_normalizer,
    matrix_fisher_log_normalizer_and_grad,
    matrix_fisher_mean,
    proper_svd,
)
from qmanifold.verify.targets import _rot2

F64 = torch.float64
GAUSSIAN = ["so2", "se3", "torus", "permutations"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_group_action(name: str, x: torch.Tensor, g: torch.Generator):
    """Apply a random (per-sample) group element to x (B, N, d); returns (gx, act) where
    act(y) applies the same elements to another tensor of the same shape."""
    B, N, _ = x.shape
    if name == "so2":
        R = _rot2(2 * math.pi * torch.rand(B, generator=g, dtype=F64)).to(x)
        return x @ R.mT, lambda y: y @ R.mT
    if name == "se3":
        R = haar_so3(B, g).to(x)
        return x @ R.mT, lambda y: y @ R.mT
    if name == "torus":
        R = _rot2(2 * math.pi * torch.rand(B, N, generator=g, dtype=F64)).to(x)
        act = lambda y: (R @ y.unsqueeze(-1)).squeeze(-1)
        return act(x), act
    if name == "permutations":
        perm = torch.argsort(torch.rand(B, N, generator=g), dim=-1)
        act = lambda y: y.gather(1, perm.unsqueeze(-1).expand_as(y))
        return act(x), act
    if name == "lattice":
        shift = torch.randint(-3, 4, x.shape, generator=g).to(x)
        return x + shift, lambda y: y + shift
    raise AssertionError(name)


# --------------------------------------------------------------------------- registry / metadata


def test_registry_and_metadata():
    assert set(available_targets()) == {"so2", "se3", "torus", "permutations", "lattice"}
    groups = {"so2": "SO2", "se3": "SE3", "torus": "Torus", "permutations": "Permutations", "lattice": "Lattice"}
    for name in available_targets():
        t = make_target(name)
        assert t.name == name
        assert t.group_name == groups[name]
        assert len(t.point_shape) == 2
        assert type(t).__doc__ and len(type(t).__doc__) > 200
        x = t.sample(5, gen(0))
        assert x.shape == (5,) + tuple(t.point_shape) and x.dtype == torch.get_default_dtype()
    assert make_target("se3").point_shape == (4, 3)
    assert make_target("so2").point_shape == (3, 2)
    assert make_target("lattice").interpolant == "ve_torus"
    assert make_target("torus", k=2).point_shape == (2, 2)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="available targets: so2, se3, torus, permutations, lattice"):
        make_target("sphere")
    with pytest.raises(ValueError, match="bad arguments"):
        make_target("so2", nonsense=1)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        SE3Template(template=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="sigma_data"):
        SO2Template(sigma_data=-1.0)
    with pytest.raises(ValueError, match="n must be an integer"):
        PermutationMixture(n=9)
    t = make_target("so2")
    with pytest.raises(ValueError, match=r"expected a tensor of shape \(B, 3, 2\)"):
        t.denoise(torch.zeros(2, 4, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"ahat must be a scalar or have shape \(2,\)"):
        t.denoise(torch.zeros(2, 3, 2), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        matrix_fisher_log_normalizer(torch.zeros(2))


# --------------------------------------------------------------------------- matrix Fisher


def test_matrix_fisher_closed_forms():
    # c(diag(s,0,0)) = sinh(s)/s (R11 uniform on [-1,1] under Haar), d/ds log c = coth s - 1/s
    for s in [1e-2, 0.5, 3.0, 30.0, 300.0, 3e4]:
        lc, g = matrix_fisher_log_normalizer_and_grad(torch.tensor([s, 0.0, 0.0], dtype=F64))
        exact = math.log(math.sinh(s) / s) if s < 300 else s - math.log(2 * s) + math.log1p(-math.exp(-2 * s))
        assert abs(lc.item() - exact) < 1e-13 * max(1.0, abs(exact))
        assert abs(g[0].item() - (1 / math.tanh(s) - 1 / s)) < 1e-12
        assert abs(g[1].item()) < 1e-13 and abs(g[2].item()) < 1e-13  # exactly 0 up to float64 rounding
    # c(s I) = e^s (I0(2s) - I1(2s))  (trace distribution of Haar rotations)
    for s in [0.1, 1.0, 10.0, 1e3, 1e5]:
        lc, g = matrix_fisher_log_normalizer_and_grad(torch.tensor([s, s, s], dtype=F64))
        exact = 3 * s + math.log(special.ive(0, 2 * s) - special.ive(1, 2 * s))
        assert abs(lc.item() - exact) < 1e-13 * max(1.0, abs(exact))
        h = 1e-5 * max(1.0, s)
        fd = (3 * (s + h) + math.log(special.ive(0, 2 * (s + h)) - special.ive(1, 2 * (s + h)))
              - 3 * (s - h) - math.log(special.ive(0, 2 * (s - h)) - special.ive(1, 2 * (s - h)))) / (2 * h)
        assert torch.allclose(g, torch.full((3,), fd / 3, dtype=F64), atol=1e-8)


def test_matrix_fisher_gradient_and_invariances():
    s = torch.tensor([[2.0, 1.0, -0.5], [-1.0, 2.0, 0.3], [0.2, -3.0, -1.0], [5.0, 5.0, 5.0]], dtype=F64)
    lc, g = matrix_fisher_log_normalizer_and_grad(s)
    h = 1e-6
    for i in range(3):
        e = torch.zeros(3, dtype=F64)
        e[i] = h
        fd = (matrix_fisher_log_normalizer(s + e) - matrix_fisher_log_normalizer(s - e)) / (2 * h)
        assert torch.allclose(g[:, i], fd, atol=1e-8)
    # invariance under permutations and flipping two signs
    lc2 = matrix_fisher_log_normalizer(s[:, [2, 0, 1]] * torch.tensor([-1.0, -1.0, 1.0], dtype=F64))
    assert torch.allclose(lc, lc2, atol=1e-13)


def test_matrix_fisher_vs_monte_carlo():
    g = gen(1)
    R = haar_so3(1_000_000, g)
    Ss = torch.tensor([[2.0, 1.0, -0.5], [3.0, 2.0, 1.0], [1.0, 0.5, 0.2]], dtype=F64)
    for s in Ss:
        tr = (R.diagonal(dim1=-2, dim2=-1) * s).sum(-1)
        w = torch.exp(tr)
        c_mc, c_se = w.mean(), w.std() / math.sqrt(len(w))
        c = matrix_fisher_log_normalizer(s).exp()
        assert abs(c - c_mc) < 5 * c_se, (s, c.item(), c_mc.item(), c_se.item())
    # E[R] for a general (non-diagonal, det < 0) parameter matrix
    F = torch.tensor([[1.2, -0.7, 0.3], [0.4, 0.9, -1.1], [-0.5, 0.8, 0.6]], dtype=F64)
    F = F @ torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64))
    assert torch.linalg.det(F) < 0
    logits = (F * R).sum((-2, -1))
    w = torch.softmax(logits, 0)
    mean = torch.einsum("i,ijk->jk", w, R)
    se = torch.sqrt(torch.einsum("i,ijk->jk", w * w, (R - mean) ** 2))
    ER = matrix_fisher_mean(F)
    assert ((ER - mean).abs() / se).max() < 5
    assert (ER - mean).abs().max() < 5e-3


def test_matrix_fisher_quadrature_convergence_extreme():
    Ss = torch.tensor(
        [[1e4, 5e3, 1e2], [1e4, 1e4, -1e4], [1e4, 1.0, 0.0], [1e6, 1e6, 1e6], [1e8, 1e7, -1e2],
         [1e3, 1e3, 0.0], [0.0, 0.0, 0.0], [1e-3, 0.0, 0.0], [2.0, 1.0, -0.5], [50.0, 0.0, 0.0]],
        dtype=F64,
    )
    l1, g1 = matrix_fisher_log_normalizer_and_grad(Ss, n_nodes=16)
    l2, g2 = matrix_fisher_log_normalizer_and_grad(Ss, n_nodes=32)
    l3, g3 = matrix_fisher_log_normalizer_and_grad(Ss, n_nodes=16, levels=40, ratio=0.5)
    for la, ga in [(l2, g2), (l3, g3)]:
        assert ((l1 - la).abs() / la.abs().clamp(min=1.0)).max() < 1e-12
        assert (g1 - ga).abs().max() < 1e-12
    assert torch.isfinite(l1).all() and torch.isfinite(g1).all()
    # large-S Gaussian asymptotics: E[R_11] = 1 - (1/(s1+s2) + 1/(s1+s3))/2 + O(s^-2)
    s = Ss[0]
    approx = torch.stack([1 - 0.5 * (1 / (s[0] + s[1]) + 1 / (s[0] + s[2])),
                          1 - 0.5 * (1 / (s[1] + s[0]) + 1 / (s[1] + s[2])),
                          1 - 0.5 * (1 / (s[2] + s[0]) + 1 / (s[2] + s[1]))])
    assert (g1[0] - approx).abs().max() < 1e-6


def _log_uniform_singular_values(n: int, seed: int) -> torch.Tensor:
    """Singular-value triples with magnitudes log-uniform in [1e-3, 1e8], random signs, and both
    isotropic (random direction) and strongly anisotropic (1 : u : v, |u|, |v| log-uniform down
    to 1e-6) shapes: the boundary layers of the Bessel integral at every width and combination."""
    g = gen(seed)
    mag = 10 ** (torch.rand(n, 1, generator=g, dtype=F64) * 11 - 3)
    iso = torch.randn(n, 3, generator=g, dtype=F64)
    iso = iso / iso.norm(dim=-1, keepdim=True)
    uv = 10 ** (-6 * torch.rand(n, 2, generator=g, dtype=F64)) * torch.randn(n, 2, generator=g, dtype=F64).sign()
    aniso = torch.cat([torch.ones(n, 1, dtype=F64), uv], -1)
    return torch.cat([mag * iso, mag * aniso])


def test_scaled_quadrature_agrees_with_the_fixed_rule():
    """The scaled rule of the verification suite (6 nodes x 4 panels per half, graded at each
    matrix's own boundary layers, 48 nodes) and the 9-node variant against the 736-node fixed rule:
    the error bounds stated in matrix_fisher's docstring (with a margin), by magnitude of S."""
    s = torch.cat([
        _log_uniform_singular_values(5_000, 7),
        torch.tensor([[1e4, 1e4, -1e4], [1e4, 5e3, 1e2], [1e8, 1e8, -1e8], [1e8, 1.0, 0.0], [30.0, 30.0, -29.9],
                      [10.0, 9.99, -9.99], [0.0, 0.0, 0.0], [1e-3, 0.0, 0.0], [2.0, 1.0, -0.5]], dtype=F64),
    ])
    ref_l, ref_g = matrix_fisher_log_normalizer_and_grad(s)
    norm = s.norm(dim=-1)
    bounds = {9: [(1e2, 2e-11), (1e3, 2e-9), (1e4, 4e-8), (1e5, 5e-7), (2e8, 5e-5)],
              6: [(1e2, 5e-8), (1e3, 1.5e-6), (1e4, 1e-5), (1e5, 5e-5), (2e8, 1e-3)]}
    for n_nodes, table in bounds.items():
        l, g = matrix_fisher_log_normalizer_and_grad(s, rule="scaled", n_nodes=n_nodes, levels=3)
        assert torch.isfinite(l).all() and torch.isfinite(g).all()
        err = (g - ref_g).abs().amax(-1)  # absolute error of E[R_ii], numbers in [-1, 1]
        rel_l = (l - ref_l).abs() / ref_l.abs().clamp(min=1.0)
        for bound, tol in table:
            sel = norm <= bound
            assert err[sel].max() < tol, (n_nodes, bound, err[sel].max().item())
        assert rel_l.max() < 2e-8, (n_nodes, rel_l.max().item())
    # the scaled rule is what the verification suite's SE(3) case uses, and it agrees with the
    # fixed rule on its denoiser along a sampling path's range of noise levels
    from qmanifold.verify.runner import builtin_case

    target = builtin_case("se3").target
    assert target.quad == {"rule": "scaled", "n_nodes": 6, "levels": 3}
    x1 = target.sample(64, gen(8), dtype=F64)
    eps = target.sample_noise(64, gen(9), dtype=F64)
    fixed = make_target("se3")
    for ahat, beta in [(1.0, 0.05), (0.5, 0.5), (0.1, 0.9), (1e-3, 1.0)]:
        x_t = target.forward(x1, eps, ahat, beta)
        assert (target.denoise(x_t, ahat, beta) - fixed.denoise(x_t, ahat, beta)).abs().max() < 1e-6
    with pytest.raises(ValueError, match="unknown quadrature rule 'adaptive'"):
        matrix_fisher_log_normalizer(s[:2], rule="adaptive")
    with pytest.raises(ValueError, match="levels >= 1"):
        matrix_fisher_log_normalizer(s[:2], rule="scaled", levels=0)


def test_matrix_fisher_mean_limit_is_rotation():
    g = gen(2)
    F = torch.randn(16, 3, 3, generator=g, dtype=F64)
    U, s, V = proper_svd(F)
    assert torch.allclose(U @ torch.diag_embed(s) @ V.mT, F, atol=1e-12)
    assert torch.allclose(torch.linalg.det(U), torch.ones(16, dtype=F64))
    assert torch.allclose(torch.linalg.det(V), torch.ones(16, dtype=F64))
    assert (s[:, 0] >= s[:, 1]).all() and (s[:, 1] >= s[:, 2].abs()).all()
    ER = matrix_fisher_mean(1e7 * F)
    eye = torch.eye(3, dtype=F64)
    assert (ER @ ER.mT - eye).abs().max() < 1e-5
    assert (torch.linalg.det(ER) - 1).abs().max() < 1e-5
    assert (ER - U @ V.mT).abs().max() < 1e-5
    # float32 agrees with float64
    ER32 = matrix_fisher_mean((3 * F).float())
    assert ER32.dtype == torch.float32
    assert (ER32.double() - matrix_fisher_mean(3 * F)).abs().max() < 1e-5


# --------------------------------------------------------------------------- exact denoisers vs Monte Carlo


@pytest.mark.parametrize("name", GAUSSIAN)
def test_denoiser_matches_importance_sampling(name):
    t = make_target(name)
    g = gen(10)
    pool = t.sample(300_000, g, dtype=F64)
    x1 = t.sample(6, g, dtype=F64)
    eps = t.sample_noise(6, g, dtype=F64)
    settings = [(1.0, 0.5), (0.5, 1.0)] + ([(0.3, 1.0)] if name != "torus" else [])
    for ahat, beta in settings:
        x_t = t.forward(x1, eps, ahat, beta)
        exact = t.denoise(x_t, torch.full((6,), ahat, dtype=F64), torch.full((6,), beta, dtype=F64))
        mc, se, ess = importance_posterior_mean(x_t, ahat, beta, pool)
        assert ess.min() > 300, (name, ahat, beta, ess.min().item())
        # 24-72 entries per setting, each within 5 Monte-Carlo standard errors (observed max ~3.2;
        # the O(1/ESS) bias of self-normalised weights is far below one standard error here)
        z = (exact - mc).abs() / se
        assert z.max() < 5, (name, ahat, beta, z.max().item())


def test_lattice_displacement_matches_monte_carlo():
    t = make_target("lattice")
    g = gen(11)
    pool = t.sample(100_000, g, dtype=F64)[:, 0]  # (P, 2) in [0, 1)
    # lifts m in {-2..2}^2: omitted lifts have |delta_j| >= 2, weight <= exp(-2 / sigma^2) < 1e-7
    m = torch.stack(torch.meshgrid(torch.arange(-2, 3), torch.arange(-2, 3), indexing="ij"), -1).reshape(-1, 2).to(F64)
    x1 = t.sample(4, g, dtype=F64)
    eps = t.sample_noise(4, g, dtype=F64)
    for sigma in [0.05, 0.2, 0.35]:
        x_t = t.forward(x1, eps, sigma)
        exact = t.denoise_displacement(x_t, sigma)
        for b in range(4):
            delta = (pool[:, None, :] + m[None] - x_t[b, 0]).reshape(-1, 2)  # lifted displacements
            w = torch.softmax(-(delta**2).sum(-1) / (2 * sigma**2), 0)
            mean = w @ delta
            se = torch.sqrt((w * w) @ (delta - mean) ** 2)
            assert ((exact[b, 0] - mean).abs() / se).max() < 5, (sigma, b)
    # denoise is a lift: x_t plus the displacement
    x_t = t.forward(x1, eps, 0.1)
    assert torch.allclose(t.denoise(x_t, 0.1) - x_t, t.denoise_displacement(x_t, 0.1))


def test_lattice_branches_agree_and_limits():
    t = WrappedNormalLattice(k=1, mu=[0.3], tau=[0.0])
    x = torch.linspace(-0.7, 1.7, 101, dtype=F64).reshape(-1, 1, 1)
    vstar = 1 / (2 * math.pi)
    below = t.denoise_displacement(x, math.sqrt(vstar) * (1 - 1e-12))
    above = t.denoise_displacement(x, math.sqrt(vstar) * (1 + 1e-12))
    assert (below - above).abs().max() < 1e-12  # heat-kernel and Fourier sums agree at the switch
    # odd symmetry about mu and periodicity
    d = torch.linspace(0.01, 0.49, 7, dtype=F64).reshape(-1, 1, 1)
    s = torch.full((7,), 0.3, dtype=F64)
    assert torch.allclose(t.denoise_displacement(0.3 + d, s), -t.denoise_displacement(0.3 - d, s), atol=1e-14)
    assert torch.allclose(t.denoise_displacement(0.3 + d + 5, s), t.denoise_displacement(0.3 + d, s), atol=1e-12)
    # tiny noise: with tau = 0 the posterior is the point mass at mu, so the displacement is
    # mu - x_t (shortest lift); with tau > 0 it tends to 0
    assert torch.allclose(t.denoise_displacement(0.3 + d, 1e-4), -d, atol=1e-12)
    t2 = WrappedNormalLattice(k=1, mu=[0.3], tau=[0.1])
    assert t2.denoise_displacement(0.3 + d, 1e-4).abs().max() < 1e-6
    # huge noise: the prior is uniform on the torus and E[x1 - x_t | x_t] = sigma^2 grad log p -> 0
    assert t.denoise_displacement(0.3 + d, 50.0).abs().max() < 1e-12


# --------------------------------------------------------------------------- equivariance


@pytest.mark.parametrize("name", GAUSSIAN)
def test_denoiser_equivariance(name):
    t = make_target(name)
    g = gen(20)
    B = 32
    x_t = t.forward(t.sample(B, g, dtype=F64), t.sample_noise(B, g, dtype=F64),
                    torch.rand(B, generator=g, dtype=F64) * 2 + 0.05, torch.rand(B, generator=g, dtype=F64))
    ahat = torch.rand(B, generator=g, dtype=F64) + 0.1
    beta = torch.rand(B, generator=g, dtype=F64)
    gx, act = random_group_action(name, x_t, g)
    out, out_g = t.denoise(x_t, ahat, beta), t.denoise(gx, ahat, beta)
    assert torch.allclose(out_g, act(out), atol=1e-10), (out_g - act(out)).abs().max()
    if t.com_free:  # translation invariance and CoM-free output
        shift = torch.randn(B, 1, x_t.shape[-1], generator=g, dtype=F64)
        assert torch.allclose(t.denoise(x_t + shift, ahat, beta), out, atol=1e-10)
        assert out.mean(1).abs().max() < 1e-12


def test_lattice_translation_equivariance():
    t = make_target("lattice")
    g = gen(21)
    x_t = torch.rand(16, 1, 2, generator=g, dtype=F64)
    sigma = torch.rand(16, generator=g, dtype=F64) + 0.01
    gx, act = random_group_action("lattice", x_t, g)
    assert torch.allclose(t.denoise(gx, sigma), act(t.denoise(x_t, sigma)), atol=1e-10)


# --------------------------------------------------------------------------- samples


@pytest.mark.parametrize("name", available_targets())
def test_features_invariant(name):
    t = make_target(name)
    g = gen(30)
    x = t.sample(64, g, dtype=F64)
    gx, _ = random_group_action(name, x, g)
    if t.com_free:
        gx = gx + torch.randn(64, 1, x.shape[-1], generator=g, dtype=F64)
    f, fg = t.features(x), t.features(gx)
    assert f.keys() == fg.keys() and len(f) > 0
    for k in f:
        assert f[k].shape == (64,)
        assert torch.allclose(f[k], fg[k], atol=1e-9), k


def test_sample_moments():
    g = gen(40)
    n = 40_000
    for name in ["so2", "se3"]:
        t = make_target(name)
        x = t.sample(n, g, dtype=F64)
        N, d = t.point_shape
        assert x.mean(1).abs().max() < 1e-12  # centred
        assert x.mean(0).abs().max() < 0.03  # rotation invariance => E[x1] = 0
        sq = (x**2).sum((1, 2))
        expect = (t.template**2).sum() + t.sigma_data**2 * (N - 1) * d
        assert abs(sq.mean() - expect) < 5 * sq.std() / math.sqrt(n)
        f = t.features(x)
        c = t.template
        d01 = f["dist_0_1"] ** 2  # E|x0 - x1|^2 = |c0 - c1|^2 + 2 sigma^2 d (centring cancels in differences)
        expect = ((c[0] - c[1]) ** 2).sum() + 2 * t.sigma_data**2 * d
        assert abs(d01.mean() - expect) < 5 * d01.std() / math.sqrt(n)
    t = make_target(name := "torus")
    x = t.sample(n, g, dtype=F64)
    r2 = (x**2).sum(-1)
    expect = t.mu**2 + 2 * t.tau**2
    assert ((r2.mean(0) - expect).abs() < 5 * r2.std(0) / math.sqrt(n)).all(), name
    assert x.mean(0).abs().max() < 0.05
    t = make_target("permutations")
    x = t.sample(n, g, dtype=F64)[..., 0]
    assert (x.mean(0) - t.m.mean()).abs().max() < 0.05  # each coordinate is the average component
    tot = x.sum(-1)
    assert abs(tot.mean() - t.m.sum()) < 5 * t.tau * math.sqrt(t.n / n)
    srt = t.features(x.unsqueeze(-1))
    assert all((srt[f"gap_{i}"] >= 0).all() for i in range(t.n - 1))
    t = make_target("lattice")
    x = t.sample(n, g, dtype=F64)
    assert ((x >= 0) & (x < 1)).all()
    f = t.features(x)
    for j in range(t.k):
        damp = math.exp(-2 * math.pi**2 * t.tau[0, j].item() ** 2)
        assert abs(f[f"cos_0_{j}"].mean() - math.cos(2 * math.pi * t.mu[0, j]) * damp) < 5 / math.sqrt(n)
        assert abs(f[f"sin_0_{j}"].mean() - math.sin(2 * math.pi * t.mu[0, j]) * damp) < 5 / math.sqrt(n)


# --------------------------------------------------------------------------- numerical stability


@pytest.mark.parametrize("name", GAUSSIAN)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_denoiser_finite(name, dtype):
    t = make_target(name)
    g = gen(50)
    ahats = [1e-4, 1e-2, 1.0, 100.0, 1e4]
    betas = [0.0, 0.5, 1.0]
    grid = [(a, b) for a in ahats for b in betas]
    B = len(grid)
    ahat = torch.tensor([a for a, _ in grid], dtype=dtype)
    beta = torch.tensor([b for _, b in grid], dtype=dtype)
    x_t = t.forward(t.sample(B, g, dtype=dtype), t.sample_noise(B, g, dtype=dtype), ahat, beta)
    out = t.denoise(x_t, ahat, beta)
    assert out.dtype == dtype and out.shape == x_t.shape
    assert torch.isfinite(out).all()
    assert torch.isfinite(t.denoise(torch.zeros_like(x_t), ahat, beta)).all()
    # beta = 0: no information, E[x1] = 0 for the rotation / phase-invariant targets
    if name != "permutations":
        assert out[beta == 0].abs().max() < 1e-6
    if dtype == F64:  # float32 agrees with float64
        out32 = t.denoise(x_t.float(), ahat.float(), beta.float())
        assert (out32.double() - out).abs().max() < 1e-4 * (1 + out.abs().max())


def test_lattice_finite():
    t = make_target("lattice")
    for dtype in [torch.float32, F64]:
        sig = torch.tensor([1e-4, 1e-2, 0.3, 1.0, 100.0, 1e4], dtype=dtype)
        x = torch.rand(6, 1, 2, generator=gen(51), dtype=F64).to(dtype) * 3 - 1
        out = t.denoise_displacement(x, sig)
        assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", GAUSSIAN)
def test_small_noise_limit(name):
    """As ahat -> 0 with beta = 1: with data noise the denoiser tends to the identity; with
    sigma_data = 0 it projects x_t onto the orbit (the point x1 it came from)."""
    g = gen(60)
    t = make_target(name)
    x1 = t.sample(8, g, dtype=F64)
    x_t = t.forward(x1, t.sample_noise(8, g, dtype=F64), 1e-4, 1.0)
    assert (t.denoise(x_t, 1e-4, 1.0) - x_t).abs().max() < 1e-5
    zero = {"so2": dict(sigma_data=0.0), "se3": dict(sigma_data=0.0), "torus": dict(tau=0.0),
            "permutations": dict(tau=0.0)}[name]
    t0 = make_target(name, **zero)
    x1 = t0.sample(8, g, dtype=F64)
    x_t = t0.forward(x1, t0.sample_noise(8, g, dtype=F64), 1e-4, 1.0)
    assert (t0.denoise(x_t, 1e-4, 1.0) - x1).abs().max() < 1e-3
