"""Tests for qmanifold.schedules: interpolants, weights, EDM grid, harmonic prior."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qmanifold.schedules import (
    DEFAULT_T_MAX,
    GeneralInterpolant,
    HarmonicPrior,
    IndependentCoupling,
    Interpolant,
    Schedule,
    available_interpolants,
    check_time,
    edm_preconditioning,
    edm_sigma_grid,
    edm_time_grid,
    make_interpolant,
    register_interpolant,
)
from qmanifold.symbolic import T

NAMES = ["linear", "vp_cosine", "vp_linear", "edm"]


# --- hand-written reference formulas (torch) ---------------------------------------------------


def ref_linear(t):
    return 1 - t, t


def ref_vp_cosine(t):
    return torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)


def ref_vp_cosine_offset(t, s=0.008):
    beta = torch.cos(math.pi / 2 * (1 - t + s) / (1 + s)) / math.cos(math.pi / 2 * s / (1 + s))
    return torch.sqrt(1 - beta**2), beta


def ref_vp_linear(t, bmin=0.1, bmax=20.0):
    u = 1 - t
    g = bmin * u / 2 + (bmax - bmin) * u**2 / 4
    return torch.sqrt(1 - torch.exp(-2 * g)), torch.exp(-g)


def ref_edm(t, smin=0.002, smax=80.0, rho=7.0):
    sigma = (smax ** (1 / rho) + t * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return sigma, torch.ones_like(t)


REFS = {"linear": ref_linear, "vp_cosine": ref_vp_cosine, "vp_linear": ref_vp_linear, "edm": ref_edm}


@pytest.fixture(scope="module")
def interps():
    return {n: make_interpolant(n) for n in NAMES}


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


# --- named schedules -----------------------------------------------------------------------------


def test_registry():
    assert set(NAMES) <= set(available_interpolants())
    with pytest.raises(ValueError, match="unknown interpolant 'nope'.*edm.*linear.*vp_cosine.*vp_linear"):
        make_interpolant("nope")
    with pytest.raises(TypeError):
        make_interpolant(3)
    register_interpolant("test_lin2", lambda **kw: Interpolant("1 - t", "t", name="test_lin2", **kw))
    assert make_interpolant("test_lin2").name == "test_lin2"
    with pytest.raises(ValueError, match="already registered"):
        register_interpolant("linear", lambda **kw: None)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_named_matches_hand_written(interps, name, dtype):
    I = interps[name]
    t = torch.linspace(0, 1, 101, dtype=dtype)
    a_ref, b_ref = REFS[name](t.double())
    a, b = I.ahat(t), I.beta(t)
    assert a.dtype == dtype and b.dtype == dtype
    tol = _tol(dtype) if name != "edm" else dict(rtol=1e-9 if dtype == torch.float64 else 1e-4, atol=1e-10)
    torch.testing.assert_close(a, a_ref.to(dtype), **tol)
    torch.testing.assert_close(b, b_ref.to(dtype), **tol)
    torch.testing.assert_close(I.sigma(t[1:]), (a_ref / b_ref)[1:].to(dtype), **tol)


def test_vp_cosine_offset_matches_hand_written():
    I = make_interpolant("vp_cosine", offset=0.008)
    t = torch.linspace(0, 1, 51, dtype=torch.float64)
    a_ref, b_ref = ref_vp_cosine_offset(t)
    torch.testing.assert_close(I.ahat(t), a_ref)
    torch.testing.assert_close(I.beta(t), b_ref)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None)
@given(vals=st.lists(st.floats(min_value=0.0, max_value=0.99), min_size=1, max_size=8))
def test_derivatives_match_autograd(interps, name, vals):
    I = interps[name]
    t = torch.tensor(vals, dtype=torch.float64, requires_grad=True)
    (ga,) = torch.autograd.grad(I.ahat(t).sum(), t)
    b = I.beta(t)
    gb = torch.autograd.grad(b.sum(), t)[0] if b.requires_grad else torch.zeros_like(t)  # edm: beta = 1
    torch.testing.assert_close(I.dahat(t.detach()), ga, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(I.dbeta(t.detach()), gb, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_boundary_values(interps, name):
    I = interps[name]
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a, b = I.ahat(ends), I.beta(ends)
    assert a[0] > 0
    assert float(b[1]) == pytest.approx(1.0, abs=1e-12)
    if name == "edm":
        assert float(a[1]) == pytest.approx(0.002, rel=1e-9) and float(a[0]) == pytest.approx(80.0, rel=1e-9)
        assert I.t_max == 1.0
    else:
        assert abs(float(a[1])) < 1e-12
        assert I.t_max == DEFAULT_T_MAX
    if name in ("linear", "vp_cosine"):
        assert float(b[0]) == 0.0 and float(a[0]) == 1.0
    if name == "vp_linear":
        assert float(b[0]) == pytest.approx(math.exp(-(0.05 + 19.9 / 4)), rel=1e-12)


@pytest.mark.parametrize("name, kw", [("vp_cosine", {}), ("vp_cosine", {"offset": 0.008}), ("vp_linear", {}),
                                      ("vp_linear", {"beta_min": 0.5, "beta_max": 10.0})])
def test_variance_preserving(name, kw):
    I = make_interpolant(name, **kw)
    t = torch.linspace(0, 1, 201, dtype=torch.float64)
    torch.testing.assert_close(I.ahat(t) ** 2 + I.beta(t) ** 2, torch.ones_like(t), rtol=0, atol=1e-12)
    # VP: W = beta'/ahat
    ti = t[:-1]
    torch.testing.assert_close(I.wronskian(ti), I.dbeta(ti) / I.ahat(ti), rtol=1e-8, atol=1e-10)


# --- velocity / score / denoiser identities ---------------------------------------------------------


def _batch(dtype, B=5, N=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(B, N, d, generator=g, dtype=dtype)
    eps = torch.randn(B, N, d, generator=g, dtype=dtype)
    return x1, eps


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_mass_velocity_identities(interps, name, dtype):
    I = interps[name]
    x1, eps = _batch(dtype)
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 0.95], dtype=dtype)
    x_t = I.sample_xt(x1, t, eps)
    a, b = I.ahat(t)[:, None, None], I.beta(t)[:, None, None]
    torch.testing.assert_close(x_t, a * eps + b * x1)
    v_target = I.target_velocity(x1, eps, t)
    v = I.velocity_from_denoiser(x_t, x1, t)
    assert v.dtype == dtype and v.shape == x1.shape
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    scale = v_target.abs().max().clamp(min=1)
    torch.testing.assert_close(v / scale, v_target / scale, **tol)
    torch.testing.assert_close(I.denoiser_from_velocity(x_t, v_target, t), x1, **tol)
    torch.testing.assert_close(I.eps_from_denoiser(x_t, x1, t), eps, **tol)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(tv=st.floats(min_value=0.0, max_value=0.999), m=st.floats(-2, 2), s=st.floats(0.1, 3.0))
def test_gaussian_score(interps, name, tv, m, s):
    """x1 ~ N(m, s^2 I): x_t ~ N(beta m, ahat^2 + beta^2 s^2), D = E[x1 | x_t] in closed form."""
    I = interps[name]
    x_t = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None].expand(7, 2) * (1 + 0.1 * torch.arange(2))
    t = torch.full((7,), tv, dtype=torch.float64)
    a, b = I.ahat(t)[:, None], I.beta(t)[:, None]
    var = a**2 + b**2 * s**2
    D = m + b * s**2 / var * (x_t - b * m)
    score = -(x_t - b * m) / var
    torch.testing.assert_close(I.score_from_denoiser(x_t, D, t), score, rtol=1e-8, atol=1e-8)
    # velocity of the Gaussian path: dx/dt along the flow is linear in x; check via D-formula consistency
    v = I.velocity_from_denoiser(x_t, D, t)
    torch.testing.assert_close(I.denoiser_from_velocity(x_t, v, t), D, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_finite_at_t_equal_one(interps, name):
    I = interps[name]
    x_t, D = _batch(torch.float32)
    t = torch.ones(5)
    for fn in (I.velocity_from_denoiser, I.score_from_denoiser, I.denoiser_from_velocity, I.eps_from_denoiser):
        assert torch.isfinite(fn(x_t, D, t)).all()
    assert torch.isfinite(I.weight(torch.linspace(0, 1, 11))).all()
    # t > t_max uses the coefficients of t_max
    if I.t_max < 1:
        tm = torch.full((5,), I.t_max)
        torch.testing.assert_close(I.velocity_from_denoiser(x_t, D, t), I.velocity_from_denoiser(x_t, D, tm))


def test_time_shapes_and_broadcast(interps):
    I = interps["linear"]
    x1, eps = _batch(torch.float64)
    # scalar python float, 0-dim tensor, (B,), (B, N)
    for t in (0.3, torch.tensor(0.3), torch.full((5,), 0.3), torch.full((5, 4), 0.3)):
        torch.testing.assert_close(I.sample_xt(x1, t, eps), 0.7 * eps + 0.3 * x1)
    # float32 t on float64 state -> float64 output
    assert I.sample_xt(x1, torch.full((5,), 0.3, dtype=torch.float32), eps).dtype == torch.float64
    with pytest.raises(ValueError, match="leading dimensions"):
        I.sample_xt(x1[0, 0], torch.full((5, 4), 0.3), eps[0, 0])
    with pytest.raises(TypeError, match="t must be"):
        I.sample_xt(x1, "0.3", eps)
    with pytest.raises(TypeError, match="floating-point"):
        I.sample_xt(torch.ones(3, dtype=torch.int64), 0.3, torch.ones(3))


# --- weights ---------------------------------------------------------------------------------------


def test_default_velocity_weight_equals_velocity_mse(interps):
    x1, eps = _batch(torch.float64)
    D = x1 + 0.1 * torch.randn_like(x1)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    for name in ("linear", "vp_cosine", "vp_linear"):
        I = interps[name]
        assert I.weight_name == "velocity"
        x_t = I.sample_xt(x1, t, eps)
        v_err = (I.velocity_from_denoiser(x_t, D, t) - I.target_velocity(x1, eps, t)).pow(2).sum((1, 2))
        d_err = I.weight(t) * (D - x1).pow(2).sum((1, 2))
        torch.testing.assert_close(d_err, v_err, rtol=1e-9, atol=1e-12)
    # linear: 1/(1-t)^2, clamped at weight_max = 1e3
    torch.testing.assert_close(interps["linear"].weight(torch.tensor([0.0, 0.5, 0.99, 1.0], dtype=torch.float64)),
                               torch.tensor([1.0, 4.0, 1e3, 1e3], dtype=torch.float64))


def test_weight_presets_and_custom(interps):
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    snr = (t / (1 - t)) ** 2
    assert torch.allclose(make_interpolant("linear", weight="uniform").weight(t), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(make_interpolant("linear", weight="snr").weight(t), snr)
    torch.testing.assert_close(make_interpolant("linear", weight="min_snr").weight(t), snr.clamp(max=5))
    torch.testing.assert_close(make_interpolant("linear", weight="Min(snr, 5)").weight(t), snr.clamp(max=5))
    torch.testing.assert_close(make_interpolant("linear", weight="1/sigma**2 + 4").weight(t), 1 / snr.sqrt() ** -2 + 4)
    torch.testing.assert_close(make_interpolant("linear", weight=1 + T).weight(t), 1 + t)
    torch.testing.assert_close(make_interpolant("linear", weight="t", weight_max=0.5).weight(t), t.clamp(max=0.5))
    edm = interps["edm"]
    assert edm.weight_name == "edm"
    sig = edm.sigma(t)
    torch.testing.assert_close(edm.weight(t), 1 / sig**2 + 1 / 0.25)
    with pytest.raises(ValueError, match="free symbol"):
        make_interpolant("linear", weight="velocityy")
    with pytest.raises(ValueError, match="weight"):
        make_interpolant("linear", weight="t - 2")


# --- EDM -------------------------------------------------------------------------------------------


def test_edm_grid_and_preconditioning(interps):
    edm = interps["edm"]
    steps = 18
    sig = edm_sigma_grid(steps, dtype=torch.float64)
    i = torch.arange(steps, dtype=torch.float64)
    karras = (80 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sig, karras)
    tg = edm_time_grid(steps, dtype=torch.float64)
    torch.testing.assert_close(tg, torch.linspace(0, 1, steps, dtype=torch.float64))
    torch.testing.assert_close(edm_time_grid(steps, interpolant=edm, dtype=torch.float64), tg, rtol=0, atol=1e-12)
    torch.testing.assert_close(edm.sigma(tg), sig, rtol=1e-9, atol=0)
    # any interpolant: sigma(t_i) = sigma_i (within its range)
    vc = interps["vp_cosine"]
    tv = edm_time_grid(steps, interpolant=vc, dtype=torch.float64)
    assert (tv[1:] > tv[:-1]).all()
    torch.testing.assert_close(vc.sigma(tv), sig, rtol=1e-8, atol=0)
    # EDM velocity is the Karras ODE: v = sigma'(t) (x - D)/sigma
    x, D = _batch(torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    s, ds = edm.ahat(t)[:, None, None], edm.dahat(t)[:, None, None]
    torch.testing.assert_close(edm.velocity_from_denoiser(x, D, t), ds * (x - D) / s)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sig, 0.5)
    torch.testing.assert_close(c_skip, 0.25 / (sig**2 + 0.25))
    torch.testing.assert_close(c_in**2 * (sig**2 + 0.25), torch.ones_like(sig))
    torch.testing.assert_close(edm.weight(tg) * c_out**2, torch.ones_like(sig))  # EDM: lambda c_out^2 = 1
    assert c_noise.dtype == torch.float64
    with pytest.raises(ValueError, match="steps"):
        edm_time_grid(1)


# --- validation errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ahat, beta, match",
    [
        ("t", "t", r"ahat\(0\) = 0.* must be > 0"),
        ("1 - t", "t/2", r"beta\(1\) = 0.5.*must equal 1"),
        ("2 - t", "t", r"ahat\(1\) = 1.*must be 0"),
        ("1 - s", "t", "free symbol"),
        ("1 - t", "sin(5*pi*t/2)", "strictly decreasing"),
        ("(1 - t)*(1 - 2*t)", "t", "ahat must be > 0"),
    ],
)
def test_interpolant_validation(ahat, beta, match):
    with pytest.raises(ValueError, match=match):
        Interpolant(ahat, beta)


def test_custom_interpolant_strings_and_sympy():
    a = Interpolant(ahat="1 - t", beta="t")
    b = Interpolant(ahat=1 - T, beta=T)
    t = torch.rand(4, dtype=torch.float64)
    torch.testing.assert_close(a.ahat(t), b.ahat(t))
    assert a.dahat_expr == -1 and a.wronskian_expr == 1
    c = Interpolant("1 - t", "t**2")  # W(0) = 0 tolerated
    assert c.wronskian(torch.tensor(0.0)) == 0
    assert "linear" in repr(make_interpolant("linear"))
    s = Schedule("t**3", "f")
    assert s.derivative.expr == 3 * T**2 and s.at(0.5) == 0.125 and "f(t)" in repr(s)


def test_check_time():
    assert check_time(0.5) == 0.5
    tt = torch.tensor([0.0, 0.3, 1.0])
    assert check_time(tt) is tt
    for bad in (1.5, -0.1, float("nan"), torch.tensor([0.2, 1.2]), torch.tensor([float("inf")]),
                torch.tensor([0.5, float("nan")])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            check_time(bad)
    with pytest.raises(TypeError):
        check_time(True)
    with pytest.raises(TypeError):
        check_time("0.5")


# --- general interpolant ---------------------------------------------------------------------------


def test_general_interpolant_velocity_is_time_derivative():
    G = GeneralInterpolant("1 - t", "t", "sqrt(t*(1 - t))/2")
    g = torch.Generator().manual_seed(1)
    x0, x1, eps = (torch.randn(4, 5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    _, jvp = torch.autograd.functional.jvp(lambda tt: G.sample_xt(x0, x1, tt, eps), t, torch.ones_like(t))
    torch.testing.assert_close(G.target_velocity(x0, x1, eps, t), jvp)
    torch.testing.assert_close(G.sample_xt(x0, x1, 1.0, eps), x1)
    torch.testing.assert_close(G.sample_xt(x0, x1, 0.0, eps), x0)
    with pytest.raises(ValueError, match="eps is required"):
        G.sample_xt(x0, x1, t)
    # gamma == 0 -> eps optional; coupling default independent
    G0 = GeneralInterpolant("1 - t", "t")
    torch.testing.assert_close(G0.target_velocity(x0, x1, None, t), x1 - x0)
    assert isinstance(G0.coupling, IndependentCoupling)
    a, b = G0.couple(x0, x1)
    assert a is x0 and b is x1
    with pytest.raises(ValueError, match="no prior"):
        G0.sample_prior()


def test_gaussian_interpolant_as_general(interps):
    I = interps["vp_cosine"]
    G = I.as_general()
    x1, eps = _batch(torch.float64)
    t = torch.rand(5, dtype=torch.float64)
    torch.testing.assert_close(G.sample_xt(eps, x1, t), I.sample_xt(x1, t, eps))
    torch.testing.assert_close(G.target_velocity(eps, x1, None, t), I.target_velocity(x1, eps, t))


@pytest.mark.parametrize(
    "args, match",
    [
        (("1 - t", "t/2"), r"beta\(1\)"),
        (("0", "t", "0"), r"alpha\(0\) > 0 or gamma\(0\) > 0"),
        (("1 - t", "t", "1 + t"), r"gamma\(1\)"),
        (("1 - t", "t", "(1 - t)/(t - 1/2)**2"), "not finite"),
    ],
)
def test_general_interpolant_validation(args, match):
    with pytest.raises(ValueError, match=match):
        GeneralInterpolant(*args)


# --- harmonic prior --------------------------------------------------------------------------------


def _graphs():
    """Two molecules, padded to N = 7: a 5-atom branched chain and a 3-atom chain (bond types 1..2)."""
    N = 7
    bonds = torch.zeros(2, N, N, dtype=torch.int64)
    for i, j, k in [(0, 1, 1), (1, 2, 2), (2, 3, 1), (1, 4, 1)]:
        bonds[0, i, j] = bonds[0, j, i] = k
    for i, j in [(0, 1), (1, 2)]:
        bonds[1, i, j] = bonds[1, j, i] = 1
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, :3] = True
    return bonds, mask


def _pinv_cov(adj: np.ndarray, k: float, r: float) -> np.ndarray:
    L = np.diag(adj.sum(1)) - adj
    lam, U = np.linalg.eigh(k * L + r * np.eye(len(adj)))
    ones = np.ones(len(adj)) / math.sqrt(len(adj))
    C = sum(np.outer(U[:, i], U[:, i]) / lam[i] for i in range(len(adj)))
    P = np.eye(len(adj)) - np.outer(ones, ones)
    return P @ C @ P


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_harmonic_prior_structure(dtype):
    bonds, mask = _graphs()
    prior = HarmonicPrior(stiffness=1.0, reg=1e-2)
    g = torch.Generator().manual_seed(0)
    x = prior.sample(bonds, mask, g, dtype=dtype)
    assert x.shape == (2, 7, 3) and x.dtype == dtype
    assert (x[~mask] == 0).all()
    com = x.sum(1) / mask.sum(1, keepdim=True)
    assert com.abs().max() < (1e-5 if dtype == torch.float32 else 1e-12)
    # same generator seed -> same sample
    x2 = prior.sample(bonds, mask, torch.Generator().manual_seed(0), dtype=dtype)
    torch.testing.assert_close(x, x2)
    # batched == per item (same noise on the valid atoms)
    z = torch.randn(2, 7, 3, generator=g, dtype=dtype)
    xb = prior.sample(bonds, mask, noise=z)
    for b in range(2):
        n = int(mask[b].sum())
        xi = prior.sample(bonds[b : b + 1, :n, :n], mask[b : b + 1, :n], noise=z[b : b + 1, :n].clone())
        torch.testing.assert_close(xb[b, :n], xi[0], rtol=1e-5, atol=1e-5)
    # upper-triangular input is symmetrised; float input = edge weights
    up = torch.triu(bonds)
    torch.testing.assert_close(prior.sample(up, mask, noise=z), xb)
    torch.testing.assert_close(prior.sample((bonds > 0).to(dtype), mask, noise=z), xb)
    with pytest.raises(ValueError, match=r"\(B, N, N\)"):
        prior.sample(bonds[0], mask[0])
    with pytest.raises(ValueError, match="mask"):
        prior.sample(bonds, mask[:, :3])
    with pytest.raises(ValueError):
        HarmonicPrior(reg=0.0)


def test_harmonic_prior_covariance_monte_carlo():
    bonds, mask = _graphs()
    k, r = 1.5, 0.05
    prior = HarmonicPrior(stiffness=k, reg=r)
    C = prior.covariance(bonds, mask)
    for b in range(2):
        n = int(mask[b].sum())
        ref = _pinv_cov((bonds[b, :n, :n] > 0).double().numpy(), k, r)
        np.testing.assert_allclose(C[b, :n, :n].double().numpy(), ref, atol=1e-6)
        assert (C[b, n:] == 0).all() and (C[b, :, n:] == 0).all()
    # Monte-Carlo: M copies of each molecule, 3 coordinates each
    M = 20000
    bb = bonds.repeat(M, 1, 1)
    mm = mask.repeat(M, 1)
    x = prior.sample(bb, mm, torch.Generator().manual_seed(123), dtype=torch.float64)
    x = x.view(M, 2, 7, 3)
    for b in range(2):
        xs = x[:, b].permute(0, 2, 1).reshape(-1, 7)  # samples of one coordinate, (3M, N)
        emp = xs.T @ xs / xs.shape[0]
        torch.testing.assert_close(emp, C[b].double(), rtol=0, atol=0.06)


def test_general_interpolant_with_harmonic_prior():
    bonds, mask = _graphs()
    G = GeneralInterpolant("1 - t", "t", "sqrt(t*(1 - t))/4", prior=HarmonicPrior(), name="etflow")
    x0 = G.sample_prior(bonds, mask, torch.Generator().manual_seed(0), dtype=torch.float64)
    x1 = torch.randn(2, 7, 3, dtype=torch.float64) * mask[..., None]
    eps = torch.randn(2, 7, 3, dtype=torch.float64) * mask[..., None]
    x0, x1 = G.couple(x0, x1, mask)
    t = torch.tensor([0.25, 0.75], dtype=torch.float64)
    x_t = G.sample_xt(x0, x1, t, eps)
    assert x_t.shape == (2, 7, 3) and (x_t[~mask] == 0).all()
    v = G.target_velocity(x0, x1, eps, t)
    torch.testing.assert_close(v, x1 - x0 + G.dgamma(t)[:, None, None] * eps)
    assert "etflow" in repr(G) and "HarmonicPrior" in repr(G)
