r"""Exact toy targets on quotient spaces M/G for the verification suite.

Every target is a distribution of configurations :math:`x_1` of shape ``point_shape = (N, d)``
that is invariant under its group, together with an *exact* denoiser, exact samples and a
dictionary of invariant features for two-sample tests.

Conventions (shared with the rest of qmanifold):

* configurations are tensors of shape (B, N, d); time :math:`t\in[0,1]`, t = 0 noise, t = 1 data;
* **Gaussian-prior interpolant** (``interpolant == "gaussian"``; SO2, SE3, Torus, Permutations):
  :math:`x_t = \hat\alpha_t\,\varepsilon + \beta_t\, x_1`, :math:`\varepsilon \sim N(0, I)`.
  For targets with ``com_free = True`` (SO2, SE3: the groups contain translations)
  :math:`\varepsilon` and :math:`x_1` live in the centre-of-mass-free subspace
  :math:`\{x: \sum_n x_n = 0\}`, i.e. :math:`\varepsilon` is a standard Gaussian projected to
  zero mean over points (:meth:`ToyTarget.sample_noise`).  ``denoise(x_t, ahat, beta)``
  returns :math:`\mathbb{E}[x_1 \mid x_t]` for ``ahat, beta`` of shape (B,) (or scalars);
  it is finite for :math:`\hat\alpha \in (0, 10^4]`, :math:`\beta \in [0, 1]`.
* **VE interpolant on the flat torus** (``interpolant == "ve_torus"``; Lattice only):
  :math:`x_t = \operatorname{wrap}(x_1 + \sigma_t \varepsilon)`, see
  :class:`WrappedNormalLattice`; its denoiser takes ``(x_t, sigma)``.

All Gaussian-prior targets share one structure: :math:`x_1 = g\cdot(c + \sigma\xi)` with
:math:`g` uniform on a compact group acting linearly and isometrically, :math:`c` fixed and
:math:`\xi` standard Gaussian (on the CoM-free space where relevant).  Given :math:`g`,
:math:`x_t \mid g \sim N(\beta g c,\ s^2 I)` with :math:`s^2 = \beta^2\sigma^2 + \hat\alpha^2`,
so the posterior over the group is

.. math::  \pi(g \mid x_t) \propto \exp\big(\beta \langle x_t, g c\rangle / s^2\big)

(von Mises for SO(2) and U(1)^k, matrix Fisher for SO(3), a finite softmax for S_n), and,
everything being linear in :math:`g`,

.. math::  \mathbb{E}[x_1 \mid x_t] = \frac{\hat\alpha^2}{s^2}\,\mathbb{E}[g \mid x_t]\, c
           + \frac{\beta\sigma^2}{s^2}\, x_t .

Errors: SO2, Torus and Permutations are closed forms (machine precision; the Bessel ratio
uses the scaled ``i0e``/``i1e``, the permutation mixture a log-sum-exp softmax).  SE3 uses
the 1-D Bessel integral of :mod:`qmanifold.verify.matrix_fisher` with a graded composite
Gauss--Legendre rule (relative error < 1e-12 in float64 for :math:`\|S\| \le 10^{8}`).  The
lattice theta sums are truncated with a relative error below ``exp(-pi (M-1/2)^2 + pi/4)``
(< 1e-27 for the default M = 5).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from .matrix_fisher import haar_so3, matrix_fisher_mean

__all__ = [
    "ToyTarget",
    "SO2Template",
    "SE3Template",
    "TorusRadial",
    "PermutationMixture",
    "WrappedNormalLattice",
    "available_targets",
    "make_target",
    "bessel_ratio",
    "bessel_ratio_over_x",
    "center_points",
    "so2_template_denoise",
    "se3_template_denoise",
    "torus_radial_denoise",
    "permutation_mixture_denoise",
    "wrapped_normal_displacement",
    "importance_posterior_mean",
    "so2_template_log_density",
    "se3_template_log_density",
    "torus_radial_log_density",
    "permutation_mixture_log_density",
]


# ----------------------------------------------------------------------------- helpers


def center_points(x: torch.Tensor) -> torch.Tensor:
    """Project (..., N, d) configurations onto the centre-of-mass-free subspace."""
    return x - x.mean(dim=-2, keepdim=True)


def bessel_ratio(kappa: torch.Tensor) -> torch.Tensor:
    r"""Mean resultant length of the von Mises law, :math:`A(\kappa) = I_1(\kappa)/I_0(\kappa)`,
    computed with the scaled Bessel functions (stable for :math:`\kappa \to \infty`); κ >= 0."""
    return torch.special.i1e(kappa) / torch.special.i0e(kappa)


def bessel_ratio_over_x(kappa: torch.Tensor) -> torch.Tensor:
    r""":math:`A(\kappa)/\kappa = I_1(\kappa)/(\kappa I_0(\kappa))` for κ >= 0, equal to 1/2 at 0.

    Used so that :math:`\mathbb{E}[e^{i\theta}]` can be formed without dividing by
    :math:`|z|` (no 0/0 at the origin)."""
    pos = kappa > 0
    safe = torch.where(pos, kappa, torch.ones_like(kappa))
    val = torch.special.i1e(safe) / (safe * torch.special.i0e(safe))
    return torch.where(pos, val, torch.full_like(kappa, 0.5))


def _as_batch(v, name: str, B: int, like: torch.Tensor) -> torch.Tensor:
    """Convert a scalar / (B,) schedule value to a (B,) tensor on like's device and dtype."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v.expand(B)
    if v.shape != (B,):
        raise ValueError(f"{name} must be a scalar or have shape ({B},) matching x_t; got {tuple(v.shape)}")
    return v


def _check_x(x: torch.Tensor, point_shape: tuple[int, int], who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or tuple(x.shape[1:]) != tuple(point_shape):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected a tensor of shape (B, {point_shape[0]}, {point_shape[1]}); got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{who}: expected a floating-point tensor; got dtype {x.dtype}")


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _randn(shape, generator, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=dtype, device=_gen_device(generator))


def _rand(shape, generator, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(*shape, generator=generator, dtype=dtype, device=_gen_device(generator))


def _finish(x: torch.Tensor, dtype, device) -> torch.Tensor:
    return x.to(device=device if device is not None else x.device,
                dtype=dtype if dtype is not None else torch.get_default_dtype())


def _pairwise_features(x: torch.Tensor, out: dict[str, torch.Tensor]) -> None:
    N = x.shape[-2]
    for i in range(N):
        for j in range(i + 1, N):
            out[f"dist_{i}_{j}"] = (x[:, i] - x[:, j]).norm(dim=-1)


def _distance_features(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pairwise distances and distances to the centre of a centred configuration (n, N, d)."""
    out: dict[str, torch.Tensor] = {}
    _pairwise_features(x, out)
    for i in range(x.shape[1]):
        out[f"radius_{i}"] = x[:, i].norm(dim=-1)
    return out


def _rot2(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _float_tensor(v, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).clone()
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}; got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite; got {t.tolist()}")
    return t


def _nonneg(v, name: str) -> float:
    v = float(v)
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0; got {v}")
    return v


# ----------------------------------------------------------------------------- functional core


def so2_template_denoise(x_t, ahat, beta, template: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""Exact :math:`\mathbb{E}[x_1 \mid x_t]` for :math:`x_1 = R_\theta(c + \sigma\xi)`, CoM-free.

    Writing points as complex numbers, :math:`\langle x, R_\theta c\rangle = a\cos\theta - b\sin\theta`
    with :math:`a = \sum_n x_n\cdot c_n`, :math:`b = \sum_n x_n \times c_n` (2-D cross product
    :math:`x^{(0)}c^{(1)} - x^{(1)}c^{(0)}`).  The posterior over θ is von Mises with
    concentration :math:`\kappa = \beta\sqrt{a^2+b^2}/s^2` and mean direction
    :math:`(\cos\mu, \sin\mu) = (a, -b)/\sqrt{a^2+b^2}`, hence

    .. math::  \mathbb{E}[R_\theta \mid x_t] = \frac{A(\kappa)}{\kappa}\frac{\beta}{s^2}
               \begin{pmatrix} a & b \\ -b & a\end{pmatrix}, \qquad A = I_1/I_0 .

    Args:
        x_t: (B, N, 2); projected onto the CoM-free subspace first.
        ahat, beta: (B,) or scalars.
        template: (N, 2) centred template c.  sigma: σ >= 0.

    Returns:
        (B, N, 2) CoM-free posterior mean.  Error: machine precision.
    """
    B = x_t.shape[0]
    ahat = _as_batch(ahat, "ahat", B, x_t)
    beta = _as_batch(beta, "beta", B, x_t)
    c = template.to(device=x_t.device, dtype=x_t.dtype)
    x = center_points(x_t)
    s2 = beta * beta * sigma**2 + ahat * ahat
    a = (x * c).sum(dim=(-2, -1))
    b = (x[..., 0] * c[:, 1] - x[..., 1] * c[:, 0]).sum(-1)
    kappa = beta / s2 * torch.hypot(a, b)
    coef = bessel_ratio_over_x(kappa) * beta / s2
    ER = coef[:, None, None] * torch.stack([torch.stack([a, b], -1), torch.stack([-b, a], -1)], -2)
    ERc = c @ ER.mT  # row n: E[R] c_n
    return (ahat * ahat / s2)[:, None, None] * ERc + (beta * sigma**2 / s2)[:, None, None] * x


def se3_template_denoise(x_t, ahat, beta, template: torch.Tensor, sigma: float, **quad) -> torch.Tensor:
    r"""Exact :math:`\mathbb{E}[x_1 \mid x_t]` for :math:`x_1 = R(c + \sigma\xi)`, R Haar on SO(3), CoM-free.

    The posterior over R is matrix Fisher, :math:`\propto \exp\operatorname{tr}(R^\top M)`
    with :math:`M = (\beta/s^2)\sum_n x_{t,n} c_n^\top`, and
    :math:`\mathbb{E}[R\mid x_t]` comes from :func:`matrix_fisher_mean` (proper SVD + 1-D
    Bessel integral).

    Args:
        x_t: (B, N, 3); projected onto the CoM-free subspace first.
        ahat, beta: (B,) or scalars.
        template: (N, 3) centred template.  sigma: σ >= 0.  quad: quadrature options.

    Returns:
        (B, N, 3).  Error: that of the quadrature (default rule: relative < 1e-12 in
        float64), see :mod:`qmanifold.verify.matrix_fisher`.
    """
    B = x_t.shape[0]
    ahat = _as_batch(ahat, "ahat", B, x_t)
    beta = _as_batch(beta, "beta", B, x_t)
    c = template.to(device=x_t.device, dtype=x_t.dtype)
    x = center_points(x_t)
    s2 = beta * beta * sigma**2 + ahat * ahat
    M = (beta / s2)[:, None, None] * (x.mT @ c)
    ER = matrix_fisher_mean(M, **quad)
    ERc = c @ ER.mT
    return (ahat * ahat / s2)[:, None, None] * ERc + (beta * sigma**2 / s2)[:, None, None] * x


def torus_radial_denoise(x_t, ahat, beta, mu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    r"""Exact :math:`\mathbb{E}[x_1\mid x_t]` for independent :math:`z_j = e^{i\phi_j}(\mu_j + \tau_j\xi_j)`.

    Per point, the posterior of :math:`\phi_j` is von Mises with
    :math:`\kappa_j = \beta\mu_j|x_j|/s_j^2`, :math:`s_j^2 = \beta^2\tau_j^2 + \hat\alpha^2`,
    centred on the phase of :math:`x_j`, so the denoiser is the radial map

    .. math:: \mathbb{E}[z_j \mid x_t] = \Big(\frac{\hat\alpha^2}{s_j^2}\frac{A(\kappa_j)}{\kappa_j}
              \frac{\beta\mu_j^2}{s_j^2} + \frac{\beta\tau_j^2}{s_j^2}\Big)\, x_j .

    Args:
        x_t: (B, k, 2) (no centring: the torus has no translations).
        ahat, beta: (B,) or scalars.  mu: (k,) radii >= 0.  tau: (k,) noise scales >= 0.

    Returns:
        (B, k, 2).  Error: machine precision.
    """
    B = x_t.shape[0]
    ahat = _as_batch(ahat, "ahat", B, x_t)[:, None]
    beta = _as_batch(beta, "beta", B, x_t)[:, None]
    mu = mu.to(device=x_t.device, dtype=x_t.dtype)
    tau = tau.to(device=x_t.device, dtype=x_t.dtype)
    s2 = beta * beta * tau * tau + ahat * ahat  # (B, k)
    r = x_t.norm(dim=-1)
    kappa = beta * mu * r / s2
    scale = ahat * ahat / s2 * bessel_ratio_over_x(kappa) * beta * mu * mu / s2 + beta * tau * tau / s2
    return scale.unsqueeze(-1) * x_t


def permutation_mixture_denoise(x_t, ahat, beta, permuted_means: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Exact :math:`\mathbb{E}[x_1\mid x_t]` for :math:`x_1 = P(m + \tau\xi)`, P uniform in :math:`S_n`.

    Posterior weights over the n! permutations :math:`w_P = \operatorname{softmax}_P
    (\beta\langle x_t, Pm\rangle/s^2)` (log-sum-exp), :math:`s^2 = \beta^2\tau^2 + \hat\alpha^2`.

    Args:
        x_t: (B, n, 1).  ahat, beta: (B,) or scalars.
        permuted_means: (n!, n) all permutations of m.  tau: τ >= 0.

    Returns:
        (B, n, 1).  Error: machine precision.
    """
    B = x_t.shape[0]
    ahat = _as_batch(ahat, "ahat", B, x_t)
    beta = _as_batch(beta, "beta", B, x_t)
    Pm = permuted_means.to(device=x_t.device, dtype=x_t.dtype)
    x = x_t[..., 0]
    s2 = beta * beta * tau**2 + ahat * ahat
    w = torch.softmax((beta / s2)[:, None] * (x @ Pm.T), dim=-1)
    EPm = w @ Pm
    out = (ahat * ahat / s2)[:, None] * EPm + (beta * tau**2 / s2)[:, None] * x
    return out.unsqueeze(-1)


def wrapped_normal_displacement(x_t, sigma, mu: torch.Tensor, tau: torch.Tensor, n_terms: int = 5) -> torch.Tensor:
    r"""Exact posterior mean displacement :math:`\mathbb{E}[\tilde x_1 - \tilde x_t \mid x_t]`
    on the flat torus :math:`\mathbb{R}^k/\mathbb{Z}^k` for :math:`x_1 \sim WN(\mu, \tau^2)`,
    :math:`x_t = \operatorname{wrap}(x_1 + \sigma\varepsilon)`.

    The lifted displacement :math:`\delta = -\sigma\varepsilon` has, per coordinate with
    :math:`v = \tau^2 + \sigma^2` and :math:`d = x_t - \mu` reduced to :math:`[-1/2, 1/2)`,

    .. math::  \mathbb{E}[\delta \mid x_t] = \sigma^2 \partial_x \log p_\sigma(x_t)
               = \frac{\sigma^2}{v}\sum_{m\in\mathbb{Z}} w_m (m - d),\quad
               w_m \propto e^{-(d - m)^2/(2v)}

    (a tangent vector at :math:`x_t`).  For :math:`v \le 1/(2\pi)` the sum is truncated to
    :math:`|m| \le M` (relative error :math:`\le 4 e^{-(M^2 - M)/(2v)} \le 4e^{-\pi(M^2-M)}`);
    for :math:`v > 1/(2\pi)` the Poisson-dual (Fourier) form is used,

    .. math::  p \propto 1 + 2\sum_{n=1}^{M} q^{n^2}\cos 2\pi n d,\quad
               \partial_d p \propto -4\pi\sum_{n=1}^{M} n q^{n^2}\sin 2\pi n d,\quad
               q = e^{-2\pi^2 v},

    with truncation error :math:`\le 4\pi (M+1) e^{-\pi (M+1)^2}`.  With M = 5 both are far
    below float64 precision.

    Args:
        x_t: (B, N, k) points of the torus (any representative).
        sigma: (B,) or scalar noise level σ > 0.
        mu: (N, k) means, tau: (N, k) wrapped-normal scales.  n_terms: M.

    Returns:
        (B, N, k) posterior mean displacement.
    """
    B = x_t.shape[0]
    sigma = _as_batch(sigma, "sigma", B, x_t)[:, None, None]
    mu = mu.to(device=x_t.device, dtype=x_t.dtype)
    tau = tau.to(device=x_t.device, dtype=x_t.dtype)
    v = tau * tau + sigma * sigma  # (B, N, k)
    d = x_t - mu
    d = d - torch.round(d)
    m = torch.arange(-n_terms, n_terms + 1, device=x_t.device, dtype=x_t.dtype)
    # direct (heat-kernel) sum
    diff = m - d.unsqueeze(-1)  # (B, N, k, 2M+1)
    w = torch.softmax(-(diff * diff) / (2.0 * v.unsqueeze(-1)), dim=-1)
    direct = sigma * sigma / v * (w * diff).sum(-1)
    # Poisson-dual (Fourier) sum
    n = m[n_terms + 1:]  # 1..M
    qn = torch.exp(-2.0 * math.pi**2 * v.unsqueeze(-1) * n * n)
    ang = 2.0 * math.pi * n * d.unsqueeze(-1)
    p = 1.0 + 2.0 * (qn * torch.cos(ang)).sum(-1)
    dp = -4.0 * math.pi * (n * qn * torch.sin(ang)).sum(-1)
    fourier = sigma * sigma * dp / p
    return torch.where(v <= 1.0 / (2.0 * math.pi), direct, fourier)


# ----------------------------------------------------------------------------- exact densities


def _check_density_inputs(x: torch.Tensor, scale: torch.Tensor | float, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"{who}: expected a floating-point tensor of shape (B, N, d); got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not bool((torch.as_tensor(scale) > 0).all()):
        raise ValueError(f"{who}: the noise scale must be > 0 for the target to have a density (a zero scale "
                         f"puts all mass on one orbit); got {torch.as_tensor(scale).tolist()}")


def so2_template_log_density(x: torch.Tensor, template: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""Log-density on M of :math:`x_1 = R_\theta(c + \sigma\xi)` (θ uniform, ξ CoM-free standard Gaussian).

    M is the CoM-free subspace of :math:`\mathbb{R}^{N\times 2}`, of dimension :math:`n = 2(N-1)`,
    with its Lebesgue measure; ``x`` is centred first.  Given θ, :math:`x_1` is the standard
    Gaussian of M scaled by σ around :math:`R_\theta c`; averaging over θ with
    :math:`\langle x, R_\theta c\rangle = a\cos\theta - b\sin\theta` (``a``, ``b`` as in
    :func:`so2_template_denoise`) gives

    .. math::  q_M(x) = (2\pi\sigma^2)^{-n/2}\,
               \exp\!\Big(-\frac{|x|^2 + |c|^2}{2\sigma^2}\Big)\, I_0\!\Big(\frac{\sqrt{a^2+b^2}}{\sigma^2}\Big),

    evaluated with the scaled ``i0e`` (:math:`\log I_0(\kappa) = \log \tilde I_0(\kappa) + \kappa`).

    Args:
        x: (B, N, 2).  template: (N, 2) centred c.  sigma: σ > 0.

    Returns:
        (B,) log-densities.  Error: machine precision.
    """
    _check_density_inputs(x, sigma, "so2_template_log_density")
    c = template.to(device=x.device, dtype=x.dtype)
    x = center_points(x)
    n = 2 * (x.shape[-2] - 1)
    a = (x * c).sum(dim=(-2, -1))
    b = (x[..., 0] * c[:, 1] - x[..., 1] * c[:, 0]).sum(-1)
    kappa = torch.hypot(a, b) / sigma**2
    return (-0.5 * n * math.log(2.0 * math.pi * sigma**2) - (x.square().sum((-2, -1)) + c.square().sum()) / (2.0 * sigma**2)
            + torch.log(torch.special.i0e(kappa)) + kappa)


def se3_template_log_density(x: torch.Tensor, template: torch.Tensor, sigma: float, **quad) -> torch.Tensor:
    r"""Log-density on M of :math:`x_1 = R(c + \sigma\xi)` (R Haar on SO(3), ξ CoM-free standard Gaussian).

    M is the CoM-free subspace of :math:`\mathbb{R}^{N\times 3}`, of dimension :math:`n = 3(N-1)`,
    with its Lebesgue measure; ``x`` is centred first.  Given R, :math:`x_1` is the standard
    Gaussian of M scaled by σ around :math:`Rc`, and
    :math:`|x - Rc|^2 = |x|^2 + |c|^2 - 2\sum_n x_n^\top R c_n = |x|^2 + |c|^2 - 2\sigma^2\operatorname{tr}(F^\top R)`
    with :math:`F = \sigma^{-2}\sum_n x_n c_n^\top`, so averaging over the normalised Haar
    measure gives the matrix Fisher normaliser :math:`c(F) = \int_{SO(3)} e^{\operatorname{tr}(F^\top R)}dR`:

    .. math::  q_M(x) = (2\pi\sigma^2)^{-n/2}\,
               \exp\!\Big(-\frac{|x|^2 + |c|^2}{2\sigma^2}\Big)\; c(F),
               \qquad c(F) = c(\operatorname{diag}(s)),

    with s the proper singular values of F (:func:`~qmanifold.verify.matrix_fisher.proper_svd`;
    :math:`s_3 < 0` when :math:`\det F < 0`: a mirror image of the template is less likely than the
    template, the density is chiral) and :math:`\log c` from
    :func:`~qmanifold.verify.matrix_fisher.matrix_fisher_log_normalizer` (the 1-D Bessel integral).
    The large terms :math:`-(|x|^2+|c|^2)/(2\sigma^2)` and :math:`s_1+s_2+s_3` cancel to a rounding
    error of about :math:`10^{-16}(|x|^2+|c|^2)/\sigma^2`.

    Args:
        x: (B, N, 3).  template: (N, 3) centred c.  sigma: σ > 0.
        quad: quadrature options of the normaliser (default: the 736-node fixed rule, relative
            error < 1e-12 for :math:`\|F\| \le 10^8`).

    Returns:
        (B,) log-densities.  Not differentiable at :math:`F = 0` (the SVD); use it for values.
    """
    from .matrix_fisher import matrix_fisher_log_normalizer, proper_svd

    _check_density_inputs(x, sigma, "se3_template_log_density")
    c = template.to(device=x.device, dtype=x.dtype)
    x = center_points(x)
    n = 3 * (x.shape[-2] - 1)
    _, s, _ = proper_svd(x.mT @ c / sigma**2)
    log_c = matrix_fisher_log_normalizer(s, **quad)
    return -0.5 * n * math.log(2.0 * math.pi * sigma**2) - (x.square().sum((-2, -1)) + c.square().sum()) / (2.0 * sigma**2) + log_c


def torus_radial_log_density(x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    r"""Log-density on :math:`M = \mathbb{C}^k = (\mathbb{R}^2)^k` of independent
    :math:`z_j = e^{i\phi_j}(\mu_j + \tau_j\xi_j)` (:math:`\phi_j` uniform, :math:`\xi_j \sim N(0, I_2)`).

    Each point is a 2-D Gaussian :math:`N((\mu_j, 0), \tau_j^2 I)` averaged over rotations:

    .. math::  q_M(x) = \prod_j \frac{1}{2\pi\tau_j^2}
               \exp\!\Big(-\frac{r_j^2 + \mu_j^2}{2\tau_j^2}\Big) I_0\!\Big(\frac{\mu_j r_j}{\tau_j^2}\Big),
               \qquad r_j = |x_j| .

    Args:
        x: (B, k, 2) (no centring).  mu: (k,) >= 0.  tau: (k,) > 0.

    Returns:
        (B,) log-densities.  Error: machine precision.
    """
    _check_density_inputs(x, tau, "torus_radial_log_density")
    mu = mu.to(device=x.device, dtype=x.dtype)
    tau = tau.to(device=x.device, dtype=x.dtype)
    r2 = x.square().sum(-1)
    kappa = mu * r2.sqrt() / tau**2
    per_point = (-torch.log(2.0 * math.pi * tau**2) - (r2 + mu * mu) / (2.0 * tau**2)
                 + torch.log(torch.special.i0e(kappa)) + kappa)
    return per_point.sum(-1)


def permutation_mixture_log_density(x: torch.Tensor, permuted_means: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Log-density on :math:`M = \mathbb{R}^n` of :math:`x_1 = P(m + \tau\xi)`, P uniform in :math:`S_n`:
    the uniform mixture :math:`q_M(x) = \frac{1}{n!}\sum_P N(x; Pm, \tau^2 I_n)` (log-sum-exp).

    Args:
        x: (B, n, 1).  permuted_means: (n!, n) all permutations of m.  tau: τ > 0.

    Returns:
        (B,) log-densities.  Error: machine precision.
    """
    _check_density_inputs(x, tau, "permutation_mixture_log_density")
    Pm = permuted_means.to(device=x.device, dtype=x.dtype)
    n = x.shape[-2]
    sq = (x[..., 0].unsqueeze(-2) - Pm).square().sum(-1)  # (B, n!)
    return (torch.logsumexp(-sq / (2.0 * tau**2), dim=-1) - math.log(Pm.shape[0])
            - 0.5 * n * math.log(2.0 * math.pi * tau**2))


def importance_posterior_mean(x_t, ahat, beta, pool: torch.Tensor, *, chunk: int = 65536):
    r"""Brute-force Monte-Carlo posterior mean by self-normalised importance weighting.

    :math:`\mathbb{E}[x_1\mid x_t] \approx \sum_i w_i x_1^{(i)}`,
    :math:`w_i \propto N(x_t; \beta x_1^{(i)}, \hat\alpha^2 I)` over exact target draws
    ``pool`` (for CoM-free targets both x_t and the pool must be centred; the Gaussian
    density on the CoM-free subspace has the same quadratic form).

    Args:
        x_t: (B, N, d); ahat, beta: (B,) or scalars; pool: (P, N, d).

    Returns:
        ``(mean, stderr, ess)`` of shapes (B, N, d), (B, N, d), (B,); ``stderr`` is the delta
        method standard error :math:`\sqrt{\sum_i w_i^2 (x^{(i)} - \text{mean})^2}` and ``ess``
        the effective sample size :math:`1/\sum_i w_i^2`.
    """
    B = x_t.shape[0]
    ahat = _as_batch(ahat, "ahat", B, x_t)
    beta = _as_batch(beta, "beta", B, x_t)
    xf = x_t.reshape(B, -1)
    pf = pool.reshape(pool.shape[0], -1).to(x_t)
    sq = (pf * pf).sum(-1)
    logits = []
    for start in range(0, pf.shape[0], chunk):
        blk, sqb = pf[start:start + chunk], sq[start:start + chunk]
        logits.append((2 * beta[:, None] * (xf @ blk.T) - beta[:, None] ** 2 * sqb) / (2 * ahat[:, None] ** 2))
    w = torch.softmax(torch.cat(logits, -1), dim=-1)  # (B, P)
    mean = w @ pf
    second = (w * w) @ (pf * pf) - 2 * mean * ((w * w) @ pf) + (w * w).sum(-1, keepdim=True) * mean * mean
    ess = 1.0 / (w * w).sum(-1)
    shape = (B,) + tuple(pool.shape[1:])
    return mean.reshape(shape), second.clamp(min=0).sqrt().reshape(shape), ess


# ----------------------------------------------------------------------------- objects


class ToyTarget:
    """Base class of the exact toy targets (thin wrapper around the functional core).

    Attributes:
        name: registry name.  point_shape: (N, d).  group_name: one of "SO2", "SE3",
        "Torus", "Permutations", "Lattice".  com_free: whether x_1 and ε live in the
        centre-of-mass-free subspace.  interpolant: "gaussian" (x_t = ahat ε + beta x_1) or
        "ve_torus" (x_t = wrap(x_1 + σ ε)).  relative_cost: measured seconds per sample and
        denoiser evaluation in the verification runner (sampler step and tests included), relative
        to the SO(2) toy's ODE; sde_cost: the SDE samplers' factor on top (the mean curvature and
        the noise).  Both only weight the runner's progress bar.  has_density: whether
        :meth:`log_density` (closed form on M and on Q) is available.
    """

    name: str = ""
    group_name: str = ""
    com_free: bool = False
    interpolant: str = "gaussian"
    point_shape: tuple[int, int] = (0, 0)
    has_density: bool = False
    relative_cost: float = 1.0
    sde_cost: float = 1.0

    def sample(self, n: int, generator: torch.Generator | None = None, *, dtype=None, device=None) -> torch.Tensor:
        """n exact draws of x_1, shape (n, N, d).  Drawn in float64 on the generator's device,
        then cast to ``dtype`` (default: torch's default dtype) and ``device``."""
        if int(n) != n or n < 0:
            raise ValueError(f"{type(self).__name__}.sample: n must be a non-negative integer; got {n}")
        return _finish(self._sample(int(n), generator), dtype, device)

    def _sample(self, n: int, generator) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_noise(self, n: int, generator: torch.Generator | None = None, *, dtype=None, device=None) -> torch.Tensor:
        """Prior noise ε (n, N, d): standard Gaussian, projected to zero mean over points
        when ``com_free``."""
        eps = _randn((int(n),) + tuple(self.point_shape), generator)
        if self.com_free:
            eps = center_points(eps)
        return _finish(eps, dtype, device)

    def forward(self, x1: torch.Tensor, eps: torch.Tensor, ahat, beta) -> torch.Tensor:
        """The interpolant x_t = ahat ε + beta x_1 (ahat, beta: (B,) or scalars)."""
        B = x1.shape[0]
        ahat = _as_batch(ahat, "ahat", B, x1)[:, None, None]
        beta = _as_batch(beta, "beta", B, x1)[:, None, None]
        return ahat * eps + beta * x1

    def denoise(self, x_t: torch.Tensor, ahat, beta) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_density(self, x: torch.Tensor, space: str = "total") -> torch.Tensor:
        r"""Exact log-density of the target at ``x`` (B, N, d): (B,).

        ``space="total"``: on M (the CoM-free subspace with its Lebesgue measure when
        ``com_free``, else :math:`\mathbb{R}^{N d}`), the convention of
        ``QuotientDiffusion.log_prob``.  ``space="quotient"``: on Q = M/G with its Riemannian
        volume, :math:`\log q_Q(\pi x) = \log q_M(x) + \log \mathrm{vol}(G x)`
        (:meth:`log_orbit_volume`, written out per target).  Only targets with ``has_density``.
        """
        if space not in ("total", "quotient"):
            raise ValueError(f"space must be 'total' or 'quotient'; got {space!r}")
        if not self.has_density:
            raise NotImplementedError(f"{type(self).__name__} has no closed-form density")
        _check_x(x, self.point_shape, f"{type(self).__name__}.log_density")
        log_m = self._log_density_total(x)
        return log_m if space == "total" else log_m + self.log_orbit_volume(x)

    def _log_density_total(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_orbit_volume(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """log of the volume of the group orbit of ``x`` in M (Riemannian, Euclidean metric): (B,)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, point_shape={self.point_shape}, group={self.group_name})"


_SO2_DEFAULT = [[0.0, 0.0], [1.0, 0.0], [0.3, 0.8]]  # scalene, chiral in the plane
_SE3_DEFAULT = [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.4, 1.2, 0.0], [0.3, 0.5, 1.0]]  # chiral, scalene tetrahedron


class SO2Template(ToyTarget):
    r"""Rigid planar template under random rotations: :math:`x_1 = R_\theta(c + \sigma\xi)`.

    :math:`\theta \sim U[0, 2\pi)`, :math:`c` a fixed template (centred on construction;
    default the scalene triangle (0,0), (1,0), (0.3,0.8), N = 3), :math:`\xi` standard
    Gaussian projected to zero mean over points.  The target lives in the CoM-free subspace
    and is rotation invariant there, i.e. this is SO(2) acting on CoM-free configurations
    (equivalently SE(2) with translations quotiented out by centring); ``com_free = True``.

    Exact denoiser: :func:`so2_template_denoise` (von Mises posterior over θ, closed form
    with the Bessel ratio :math:`I_1/I_0`; error at machine precision).  Exact density:
    :func:`so2_template_log_density` on M, times :math:`2\pi|\bar x|` on Q (:meth:`log_density`).

    Features: pairwise distances ``dist_i_j``, radii ``radius_i`` (distance to the
    centroid), signed cross products ``cross_i`` = :math:`\bar x_i \times \bar x_{i+1}`
    (rotation invariant, reflection odd: detects the chirality of the template), and
    ``log_orbit_volume`` = :math:`\tfrac12\log\sum_n |\bar x_n|^2` (the log length of the
    SO(2) orbit up to a constant: the invariant that the mean-curvature drift
    :math:`-\eta h = \eta\,\nabla \log \mathrm{vol}` moves directly).
    """

    name = "so2"
    group_name = "SO2"
    com_free = True
    has_density = True

    def __init__(self, template=None, sigma_data: float = 0.1):
        c = _float_tensor(_SO2_DEFAULT if template is None else template, "template")
        if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] < 2:
            raise ValueError(f"SO2Template: template must have shape (N, 2) with N >= 2; got {tuple(c.shape)}")
        self.template = center_points(c)
        self.sigma_data = _nonneg(sigma_data, "sigma_data")
        self.point_shape = (c.shape[0], 2)

    def _sample(self, n, generator):
        theta = 2 * math.pi * _rand((n,), generator)
        y = self.template.to(theta.device) + self.sigma_data * center_points(_randn((n,) + self.point_shape, generator))
        return y @ _rot2(theta).mT

    def denoise(self, x_t, ahat, beta):
        """E[x_1 | x_t] for x_t (B, N, 2), ahat/beta (B,) or scalars; see :func:`so2_template_denoise`."""
        _check_x(x_t, self.point_shape, "SO2Template.denoise")
        return so2_template_denoise(x_t, ahat, beta, self.template, self.sigma_data)

    def features(self, x):
        _check_x(x, self.point_shape, "SO2Template.features")
        x = center_points(x)
        out = _distance_features(x)
        N = x.shape[1]
        for i in range(N):
            u, v = x[:, i], x[:, (i + 1) % N]
            out[f"cross_{i}"] = u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]
        out["log_orbit_volume"] = 0.5 * torch.log(x.square().sum(dim=(-2, -1)))
        return out

    def _log_density_total(self, x):
        return so2_template_log_density(x, self.template, self.sigma_data)

    def log_orbit_volume(self, x):
        r""":math:`\log(2\pi|\bar x|)`: the SO(2) orbit of the centred :math:`\bar x` is a circle of radius :math:`|\bar x|`."""
        return math.log(2.0 * math.pi) + 0.5 * torch.log(center_points(x).square().sum(dim=(-2, -1)))


class SE3Template(ToyTarget):
    r"""A "molecule under random SE(3) transformations": :math:`x_1 = R(c + \sigma\xi)`.

    R Haar on SO(3), c a fixed centred template of N >= 2 points (default: a chiral
    non-planar 4-point conformation with distinct bond lengths), ξ standard Gaussian
    projected to zero mean; translations are quotiented out by centring (``com_free``).

    Exact denoiser: :func:`se3_template_denoise`.  The posterior over R is matrix Fisher
    :math:`\propto\exp\operatorname{tr}(R^\top M)`, :math:`M = (\beta/s^2)\sum_n x_{t,n}c_n^\top`;
    :math:`\mathbb{E}[R]` is computed from the 1-D Bessel integral (see
    :mod:`qmanifold.verify.matrix_fisher`; with the default fixed rule the relative
    quadrature error is < 1e-12 in float64, also as ahat -> 0 where the posterior concentrates;
    ``**quad`` picks another rule, e.g. the verification runner's ``rule="scaled", n_nodes=6,
    levels=3``, within 3.4e-8 along its sampling paths).  Exact density:
    :func:`se3_template_log_density` on M (a Gaussian term times the matrix Fisher normaliser),
    times :math:`8\pi^2\sqrt{\det K}` on Q (:meth:`log_density`).

    Features: pairwise distances ``dist_i_j``, radii ``radius_i``, for N >= 4 signed
    volumes ``volume_i`` = det(x_{i+1}-x_i, x_{i+2}-x_i, x_{i+3}-x_i) (chirality), and
    ``log_orbit_volume`` = :math:`\tfrac12\log\det K(x)` with the inertia tensor
    :math:`K = \sum_n (|x_n|^2 I - x_n x_n^\top)` (the log volume of the SO(3) orbit up to a
    constant, which the mean-curvature drift moves directly; :math:`-\infty` only on the
    collinear configurations, a null set).
    """

    name = "se3"
    group_name = "SE3"
    com_free = True
    has_density = True
    relative_cost = 8.0  # the runner's matrix Fisher quadrature (48 nodes, 4 Bessel functions each), an SVD

    def __init__(self, template=None, sigma_data: float = 0.1, **quad):
        c = _float_tensor(_SE3_DEFAULT if template is None else template, "template")
        if c.ndim != 2 or c.shape[1] != 3 or c.shape[0] < 2:
            raise ValueError(f"SE3Template: template must have shape (N, 3) with N >= 2; got {tuple(c.shape)}")
        self.template = center_points(c)
        self.sigma_data = _nonneg(sigma_data, "sigma_data")
        self.point_shape = (c.shape[0], 3)
        self.quad = dict(quad)

    def _sample(self, n, generator):
        R = haar_so3(n, generator)
        y = self.template.to(R.device) + self.sigma_data * center_points(_randn((n,) + self.point_shape, generator))
        return y @ R.mT

    def denoise(self, x_t, ahat, beta):
        """E[x_1 | x_t] for x_t (B, N, 3), ahat/beta (B,) or scalars; see :func:`se3_template_denoise`."""
        _check_x(x_t, self.point_shape, "SE3Template.denoise")
        return se3_template_denoise(x_t, ahat, beta, self.template, self.sigma_data, **self.quad)

    def features(self, x):
        _check_x(x, self.point_shape, "SE3Template.features")
        x = center_points(x)
        out = _distance_features(x)
        N = x.shape[1]
        for i in range(N - 3):
            e = torch.stack([x[:, i + 1] - x[:, i], x[:, i + 2] - x[:, i], x[:, i + 3] - x[:, i]], dim=-2)
            out[f"volume_{i}"] = torch.linalg.det(e)
        sq = x.square().sum(dim=(-2, -1))
        inertia = sq[:, None, None] * torch.eye(3, dtype=x.dtype, device=x.device) - x.mT @ x
        out["log_orbit_volume"] = 0.5 * torch.logdet(inertia)
        return out

    def _log_density_total(self, x):
        # the reference rule (736 nodes), not the runner's faster sampling rule
        return se3_template_log_density(x, self.template, self.sigma_data)

    def log_orbit_volume(self, x):
        r""":math:`\log(8\pi^2\sqrt{\det K(\bar x)})`: the orbit map :math:`R \mapsto R\bar x` pulls the
        Euclidean metric back to the left-invariant metric with matrix K (the inertia tensor) in the
        basis :math:`L_a v = e_a\times v` of so(3), in which SO(3) has volume :math:`8\pi^2`."""
        x = center_points(x)
        sq = x.square().sum(dim=(-2, -1))
        inertia = sq[:, None, None] * torch.eye(3, dtype=x.dtype, device=x.device) - x.mT @ x
        return math.log(8.0 * math.pi**2) + 0.5 * torch.logdet(inertia)


class TorusRadial(ToyTarget):
    r"""The k-torus of phases :math:`U(1)^k` acting on :math:`\mathbb{C}^k \cong (\mathbb{R}^2)^k`.

    Point shape (N = k, d = 2): point j is the complex coordinate
    :math:`z_j = e^{i\phi_j}(\mu_j + \tau_j\xi_j)`, :math:`\phi_j \sim U[0,2\pi)` independent,
    :math:`\xi_j \sim N(0, I_2)`; the radius :math:`r_j = |z_j|` is Rician(μ_j, τ_j) and
    :math:`\mathbb{E}r_j^2 = \mu_j^2 + 2\tau_j^2`.  No centring (``com_free = False``).

    Exact denoiser: :func:`torus_radial_denoise` (per-point von Mises posterior, a radial
    map; machine precision).  Features: radii ``radius_j`` (the invariants of U(1)^k),
    ``radius2_j`` and ``log_orbit_volume`` = :math:`\sum_j \log r_j` (the log volume of the
    orbit, a product of circles, up to a constant).
    """

    name = "torus"
    has_density = True
    relative_cost = 0.8
    sde_cost = 1.8
    group_name = "Torus"
    com_free = False

    def __init__(self, k: int = 3, mu=None, tau=0.25):
        if int(k) != k or k < 1:
            raise ValueError(f"TorusRadial: k must be a positive integer; got {k}")
        k = int(k)
        mu = _float_tensor(torch.linspace(0.5, 2.0, k, dtype=torch.float64) if mu is None else mu, "mu")
        tau = _float_tensor(tau, "tau")
        try:
            mu = mu.expand(k).clone()
            tau = tau.expand(k).clone()
        except RuntimeError as err:
            raise ValueError(f"TorusRadial: mu and tau must be scalars or have shape ({k},); got "
                             f"{tuple(mu.shape)}, {tuple(tau.shape)}") from err
        if (mu < 0).any() or (tau < 0).any():
            raise ValueError(f"TorusRadial: mu and tau must be >= 0; got mu={mu.tolist()}, tau={tau.tolist()}")
        self.k, self.mu, self.tau = k, mu, tau
        self.point_shape = (k, 2)

    def _sample(self, n, generator):
        phi = 2 * math.pi * _rand((n, self.k), generator)
        y = _randn((n, self.k, 2), generator) * self.tau.to(phi.device)[:, None]
        y[..., 0] += self.mu.to(phi.device)
        return (_rot2(phi) @ y.unsqueeze(-1)).squeeze(-1)

    def denoise(self, x_t, ahat, beta):
        """E[x_1 | x_t] for x_t (B, k, 2); see :func:`torus_radial_denoise`."""
        _check_x(x_t, self.point_shape, "TorusRadial.denoise")
        return torus_radial_denoise(x_t, ahat, beta, self.mu, self.tau)

    def features(self, x):
        _check_x(x, self.point_shape, "TorusRadial.features")
        r = x.norm(dim=-1)
        out = {f"radius_{j}": r[:, j] for j in range(self.k)}
        out.update({f"radius2_{j}": r[:, j] ** 2 for j in range(self.k)})
        out["log_orbit_volume"] = torch.log(r).sum(-1)
        return out

    def _log_density_total(self, x):
        return torus_radial_log_density(x, self.mu, self.tau)

    def log_orbit_volume(self, x):
        r""":math:`\sum_j \log(2\pi r_j)`: the orbit is a product of circles of radii :math:`r_j = |z_j|`."""
        return torch.log(2.0 * math.pi * x.norm(dim=-1)).sum(-1)


class PermutationMixture(ToyTarget):
    r"""Symmetrised Gaussian on :math:`\mathbb{R}^n` (point shape (n, 1)): :math:`x_1 = P(m + \tau\xi)`.

    P a uniform random permutation of the n coordinates, m a fixed vector (default with
    distinct entries, spread over [-1.5, 1.5]), :math:`\xi \sim N(0, I_n)`; equivalently the
    uniform mixture of the n! Gaussians :math:`N(Pm, \tau^2 I)`.  No centring.

    Exact denoiser: :func:`permutation_mixture_denoise` (enumerates the n! permutations,
    log-sum-exp weights; n <= 7).  Features: order statistics ``sorted_i``, consecutive gaps
    ``gap_i`` = sorted_{i+1} - sorted_i, and ``mean``.
    """

    name = "permutations"
    has_density = True
    relative_cost = 0.3
    group_name = "Permutations"
    com_free = False
    MAX_N = 7

    def __init__(self, n: int = 4, m=None, tau: float = 0.3):
        if int(n) != n or not (1 <= n <= self.MAX_N):
            raise ValueError(f"PermutationMixture: n must be an integer in [1, {self.MAX_N}] (n! components "
                             f"are enumerated); got {n}")
        n = int(n)
        m = _float_tensor(torch.linspace(-1.5, 1.5, n, dtype=torch.float64) if m is None else m, "m", (n,))
        self.n, self.m, self.tau = n, m, _nonneg(tau, "tau")
        self.point_shape = (n, 1)
        perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long)
        self.permuted_means = m[perms]  # (n!, n)

    def _sample(self, n, generator):
        y = self.m.to(_gen_device(generator)) + self.tau * _randn((n, self.n), generator)
        perm = torch.argsort(_rand((n, self.n), generator), dim=-1)
        return y.gather(-1, perm).unsqueeze(-1)

    def denoise(self, x_t, ahat, beta):
        """E[x_1 | x_t] for x_t (B, n, 1); see :func:`permutation_mixture_denoise`."""
        _check_x(x_t, self.point_shape, "PermutationMixture.denoise")
        return permutation_mixture_denoise(x_t, ahat, beta, self.permuted_means, self.tau)

    def features(self, x):
        _check_x(x, self.point_shape, "PermutationMixture.features")
        s = x[..., 0].sort(dim=-1).values
        out = {f"sorted_{i}": s[:, i] for i in range(self.n)}
        out.update({f"gap_{i}": s[:, i + 1] - s[:, i] for i in range(self.n - 1)})
        out["mean"] = s.mean(-1)
        return out

    def _log_density_total(self, x):
        return permutation_mixture_log_density(x, self.permuted_means, self.tau)

    def log_orbit_volume(self, x):
        r""":math:`\log n!`: a generic orbit is n! points (counting measure; ties are a null set)."""
        return torch.full(x.shape[:1], math.lgamma(self.n + 1.0), dtype=x.dtype, device=x.device)


class WrappedNormalLattice(ToyTarget):
    r"""Wrapped normal on the flat torus :math:`\mathbb{R}^k/\mathbb{Z}^k` (quotient by the lattice).

    Point shape (N, k), default N = 1: independent coordinates
    :math:`x_{1} = \operatorname{wrap}(\mu + \tau\xi) \in [0,1)^k`, i.e. :math:`WN(\mu,\tau^2)`.

    **Interpolant.**  The Gaussian-prior interpolant does not make sense here (the periodic
    lift of the target is not normalisable and :math:`\beta x_1` is not well defined modulo
    :math:`\mathbb{Z}^k` for :math:`\beta\notin\mathbb{Z}`).  This target therefore uses the
    variance-exploding / Brownian process *on the torus*,
    :math:`x_t = \operatorname{wrap}(x_1 + \sigma_t\varepsilon)`, ``interpolant = "ve_torus"``,
    with :math:`\sigma_t` decreasing to 0 at t = 1.  The marginal is
    :math:`WN(\mu, \tau^2+\sigma^2)`, whose total-variation distance to the uniform prior is
    :math:`\le \sum_{n\ge1} 2 e^{-2\pi^2 n^2(\tau^2+\sigma^2)}` per coordinate
    (< 6e-9 for σ = 1): the t = 0 prior is uniform on the torus for σ large.

    Exact denoiser: :meth:`denoise_displacement` returns the tangent vector
    :math:`\mathbb{E}[\tilde x_1 - \tilde x_t\mid x_t] = \sigma^2\nabla\log p_\sigma(x_t)` (theta
    sums, truncation error < 1e-27 for M = 5, see :func:`wrapped_normal_displacement`);
    :meth:`denoise` returns :math:`x_t` plus that displacement (a point of the covering space
    near :math:`x_t`; wrap it to compare with samples).

    Features (invariant under integer shifts): ``wrapped_n_j`` (coordinate in [0, 1)),
    ``cos_n_j`` and ``sin_n_j`` of :math:`2\pi x` (the ingredients of the circular mean;
    :math:`\mathbb{E}\cos 2\pi x_j = \cos(2\pi\mu_j) e^{-2\pi^2\tau_j^2}`).
    """

    name = "lattice"
    relative_cost = 0.4
    group_name = "Lattice"
    com_free = False
    interpolant = "ve_torus"

    def __init__(self, k: int = 2, mu=None, tau=None, n_points: int = 1, n_terms: int = 5):
        if int(k) != k or k < 1:
            raise ValueError(f"WrappedNormalLattice: k must be a positive integer; got {k}")
        if int(n_points) != n_points or n_points < 1:
            raise ValueError(f"WrappedNormalLattice: n_points must be a positive integer; got {n_points}")
        if int(n_terms) != n_terms or n_terms < 1:
            raise ValueError(f"WrappedNormalLattice: n_terms must be a positive integer; got {n_terms}")
        k, N = int(k), int(n_points)
        mu = _float_tensor(torch.linspace(0.25, 0.6, k, dtype=torch.float64) if mu is None else mu, "mu")
        tau = _float_tensor(torch.linspace(0.1, 0.2, k, dtype=torch.float64) if tau is None else tau, "tau")
        try:
            mu = mu.expand(N, k).clone()
            tau = tau.expand(N, k).clone()
        except RuntimeError as err:
            raise ValueError(f"WrappedNormalLattice: mu and tau must broadcast to ({N}, {k}); got "
                             f"{tuple(mu.shape)}, {tuple(tau.shape)}") from err
        if (tau < 0).any():
            raise ValueError(f"WrappedNormalLattice: tau must be >= 0; got {tau.tolist()}")
        self.k, self.mu, self.tau, self.n_terms = k, torch.remainder(mu, 1.0), tau, int(n_terms)
        self.point_shape = (N, k)

    def _sample(self, n, generator):
        y = self.mu.to(_gen_device(generator)) + self.tau.to(_gen_device(generator)) * _randn((n,) + self.point_shape, generator)
        return torch.remainder(y, 1.0)

    def sample_noise(self, n, generator=None, *, dtype=None, device=None):
        """Standard Gaussian ε (n, N, k) for the VE process (not wrapped)."""
        return _finish(_randn((int(n),) + tuple(self.point_shape), generator), dtype, device)

    def sample_prior(self, n, generator=None, *, dtype=None, device=None):
        """Uniform points on the torus [0, 1)^k, the σ -> ∞ limit of the forward process."""
        return _finish(_rand((int(n),) + tuple(self.point_shape), generator), dtype, device)

    def forward(self, x1, eps, sigma):
        """x_t = wrap(x_1 + σ ε) in [0, 1)^k; sigma (B,) or scalar."""
        s = _as_batch(sigma, "sigma", x1.shape[0], x1)[:, None, None]
        return torch.remainder(x1 + s * eps, 1.0)

    def denoise_displacement(self, x_t, sigma):
        """E[x̃_1 - x̃_t | x_t] (B, N, k) for sigma (B,) or scalar; see :func:`wrapped_normal_displacement`."""
        _check_x(x_t, self.point_shape, "WrappedNormalLattice.denoise_displacement")
        return wrapped_normal_displacement(x_t, sigma, self.mu, self.tau, self.n_terms)

    def denoise(self, x_t, sigma):
        """x_t + E[x̃_1 - x̃_t | x_t]: the posterior mean as a point of the covering space near x_t.

        Note the signature (x_t, sigma): this target uses the VE torus interpolant."""
        return x_t + self.denoise_displacement(x_t, sigma)

    def features(self, x):
        _check_x(x, self.point_shape, "WrappedNormalLattice.features")
        w = torch.remainder(x, 1.0)
        out: dict[str, torch.Tensor] = {}
        N, k = self.point_shape
        for i in range(N):
            for j in range(k):
                out[f"wrapped_{i}_{j}"] = w[:, i, j]
                out[f"cos_{i}_{j}"] = torch.cos(2 * math.pi * x[:, i, j])
                out[f"sin_{i}_{j}"] = torch.sin(2 * math.pi * x[:, i, j])
        return out


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., ToyTarget]] = {
    "so2": SO2Template,
    "se3": SE3Template,
    "torus": TorusRadial,
    "permutations": PermutationMixture,
    "lattice": WrappedNormalLattice,
}


def available_targets() -> tuple[str, ...]:
    """Names accepted by :func:`make_target`."""
    return tuple(_REGISTRY)


def make_target(name: str, **kwargs) -> ToyTarget:
    """Construct a toy target by name ("so2", "se3", "torus", "permutations", "lattice");
    every parameter has a default, so ``make_target(name)`` works."""
    key = str(name).lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown target {name!r}; available targets: {', '.join(_REGISTRY)}")
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for target {key!r}: {err}") from err
