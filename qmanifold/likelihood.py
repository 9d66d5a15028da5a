r"""Log-likelihoods of the probability-flow ODE on the total space M and on the quotient Q = M/G.

Functional core of :meth:`qmanifold.QuotientDiffusion.log_prob` and of
``QuotientDiffusion.sample(..., return_log_prob=True)``. The derivation is in docs/diffusion.md,
"Likelihoods on Q and on M"; the conventions in brief:

* **M** is the centre-of-mass-free subspace ``M_0 = {x : sum_n x_n = 0}`` of the real points
  (dimension ``n = (N - 1) d``) when the group has translations, else ``R^{N d}`` (``n = N d``).
  Densities on M are with respect to the Lebesgue (Hausdorff) measure of ``M_0`` with the
  Euclidean metric of ``R^{N d}``; padded points carry no coordinates.
* **Q** is ``M_0 / K`` with ``K`` the rotation-like (compact) factor of the group (and its
  discrete factor), with the quotient Riemannian metric. For a K-invariant density on M the coarea
  formula gives ``q_Q(pi x) = q_M(x) vol(K x)``, and ``vol(K x) = vol(K) sqrt(det Gram(x))``
  (:func:`log_orbit_volume`).
* **ODE.** ``dx/dt = u(x, t)`` from ``t = 0`` (prior) to ``t = 1`` (data); the change of variables
  gives ``d/dt log q_t(x_t) = -div_M u(x_t, t)``, hence

      log q_M(x_1) = log p_0(x_0) - int_0^1 div_M u(x_t, t) dt.

  ``log_prob`` integrates ``(x, l)`` *backwards* from ``(x_1, 0)`` at ``t = 1`` with
  ``dl/dt = div u``; then ``l(0) = -int_0^1 div u dt`` and ``log q(x_1) = log p_0(x_0) + l(0)``.
* **Divergences.** ``div_M u = tr(Pi J Pi)`` (``J`` the Jacobian of ``u``, ``Pi`` the centring
  projector) and ``div_Q u_bar = tr(P_x J P_x)`` (trace over the horizontal space, the tangent
  space of Q). For a horizontal K-equivariant ``u`` the vertical trace is
  ``<u, grad log vol> = -<u, h>``, so ``div_M u = div_Q u_bar - <u, h>``.

Every trace is a sum of quadratic forms ``<w, J w>`` over a set of directions ``w``
(:func:`jacobian_quadratic_forms`): the projected standard basis (exact, ``N d`` directions) or
projected random probes (Hutchinson). One VJP per direction, batched by replicating the batch
(so it works with any ``nn.Module``, no ``vmap`` needed), chunked over directions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .masking import apply_mask, center, count_points

__all__ = [
    "ESTIMATORS",
    "PROBES",
    "SPACES",
    "ROUTES",
    "METHODS",
    "jacobian_quadratic_forms",
    "basis_directions",
    "probe_directions",
    "divergence",
    "centring_projector",
    "horizontal_projector",
    "hutchinson_variance",
    "gaussian_log_density",
    "harmonic_log_density",
    "log_group_volume",
    "log_orbit_volume",
    "equivariance_error",
    "integrate_log_density",
]

ESTIMATORS = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
SPACES = ("quotient", "total")
#: "M": integrate div_M; "Q": integrate div_Q as the horizontal trace; "Q_curvature": integrate
#: div_Q as div_M + <u, h> (the curvature term).
ROUTES = ("M", "Q", "Q_curvature")
METHODS = ("euler", "heun", "rk4", "dopri5")

#: ``field(x, t, mask, **cond) -> u``: ``x (b, N, d)``, ``t (b,)``, ``mask (b, N)`` or None,
#: conditioning tensors with leading dimension b; each configuration's output depends on its own
#: inputs only (no batch statistics).
Field = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------------------------
# traces


def _replicate(value: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, ...) -> (k B, ...)``: k copies of the batch, copy-major."""
    return value.unsqueeze(0).expand(k, *value.shape).reshape(k * value.shape[0], *value.shape[1:])


def jacobian_quadratic_forms(
    field: Field,
    x: torch.Tensor,
    t: torch.Tensor,
    directions: torch.Tensor,
    mask: torch.Tensor | None = None,
    cond: dict | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``q_k = <w_k, J(x) w_k>`` for every direction ``w_k``, with ``J = d field / dx`` at ``(x, t)``.

    One vector-Jacobian product per direction, batched: the batch is replicated ``K`` times (at
    most ``chunk_size`` copies per call), the field is evaluated once on the replicated batch, and
    one backward pass with the directions as cotangents gives ``J^T w_k`` for every copy.

    Args:
        field: see :data:`Field`.
        x: ``(B, N, d)``; t: ``(B,)``; mask: ``(B, N)`` or None; cond: tensors with leading B
            (replicated) or anything else (passed unchanged).
        directions: ``(K, B, N, d)``; they are not differentiated (treated as constants).
        chunk_size: at most this many directions per field evaluation (memory).

    Returns:
        ``(u, q)``: the field at ``x`` ``(B, N, d)`` (detached) and the forms ``(K, B)``.
    """
    cond = cond or {}
    K, B = directions.shape[0], x.shape[0]
    chunk = K if chunk_size is None else max(1, int(chunk_size))
    value, forms = None, []
    with torch.enable_grad():
        for start in range(0, K, chunk):
            w = directions[start:start + chunk].detach()
            k = w.shape[0]
            xr = _replicate(x.detach(), k).requires_grad_(True)
            sub = {key: (_replicate(v, k) if isinstance(v, torch.Tensor) else v) for key, v in cond.items()}
            out = field(xr, _replicate(t, k), None if mask is None else _replicate(mask, k), **sub)
            wr = w.reshape(xr.shape)
            if out.requires_grad:
                (grad,) = torch.autograd.grad(out, xr, grad_outputs=wr, allow_unused=True)
            else:
                grad = None
            q = torch.zeros(k, B, dtype=x.dtype, device=x.device) if grad is None else (grad * wr).sum((-2, -1)).reshape(k, B)
            forms.append(q.detach())
            if value is None:
                value = out.detach()[:B]
    if value is None:  # no directions at all: evaluate the field once
        value = field(x, t, mask, **cond).detach()
        return value, torch.zeros(0, B, dtype=x.dtype, device=x.device)
    return value, torch.cat(forms)


def _expand(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.unsqueeze(0).expand(k, *x.shape)


def basis_directions(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The standard basis of ``R^{N d}`` for every configuration: ``(N d, B, N, d)`` (padded
    coordinates zero). Project it (centring / horizontal projection) before use."""
    B, N, d = x.shape
    eye = torch.eye(N * d, dtype=x.dtype, device=x.device).reshape(N * d, 1, N, d).expand(N * d, B, N, d)
    return apply_mask(eye, None if mask is None else _expand(mask, N * d))


def probe_directions(x: torch.Tensor, probes: int, kind: str = "rademacher", *, mask: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``probes`` random vectors per configuration: ``(probes, B, N, d)``, i.i.d. entries that are
    Rademacher (+-1) or standard Gaussian, padded coordinates zero. Project them before use: with
    ``z' = P z`` for an orthogonal projector P, ``E[z' z'^T] = P``."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")
    shape = (probes, *x.shape)
    dev = generator.device if generator is not None else x.device
    if kind == "gaussian":
        z = torch.randn(shape, generator=generator, dtype=x.dtype, device=dev)
    else:
        z = torch.randint(0, 2, shape, generator=generator, device=dev).to(x.dtype) * 2 - 1
    return apply_mask(z.to(x.device), None if mask is None else _expand(mask, probes))


def divergence(
    field: Field,
    x: torch.Tensor,
    t: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    cond: dict | None = None,
    probes: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(u, tr(P J P))`` at ``(x, t)`` for the orthogonal projector P given by ``project``.

    ``project(w)`` maps directions ``(K, B, N, d)`` to ``P w`` (the centring ``Pi`` for the
    divergence on M, the horizontal projection ``P_x`` for the divergence on Q).

    * ``probes=None``: exact, ``sum_k <P e_k, J P e_k> = tr(P J P)`` over the ``N d`` basis
      vectors ``e_k`` (``N d`` VJPs).
    * ``probes`` ``(S, B, N, d)`` (:func:`probe_directions`): Hutchinson,
      ``(1/S) sum_s <P z_s, J P z_s>``, unbiased since ``E[P z z^T P] = P``; variance in
      :func:`hutchinson_variance`.

    Returns ``u`` ``(B, N, d)`` and the trace ``(B,)``.
    """
    if probes is None:
        u, q = jacobian_quadratic_forms(field, x, t, project(basis_directions(x, mask)), mask, cond, chunk_size=chunk_size)
        return u, q.sum(0)
    u, q = jacobian_quadratic_forms(field, x, t, project(probes), mask, cond, chunk_size=chunk_size)
    return u, q.mean(0)


def centring_projector(quotient, mask: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w (K, B, N, d) -> Pi w``: the orthogonal projector onto M (centring over the real points
    when the group has translations, else only masking)."""
    def project(w: torch.Tensor) -> torch.Tensor:
        m = None if mask is None else _expand(mask, w.shape[0])
        return center(w, m) if quotient.translations else apply_mask(w, m)

    return project


def horizontal_projector(quotient, x: torch.Tensor, mask: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``w (K, B, N, d) -> P_x w``: the orthogonal projector onto the horizontal space at ``x``
    ``(B, N, d)`` (the tangent space of Q; centred), evaluated at the current ``x`` (a constant
    for the trace, not differentiated)."""
    def project(w: torch.Tensor) -> torch.Tensor:
        k = w.shape[0]
        m = None if mask is None else _expand(mask, k)
        return quotient.horizontal_projection(w, _expand(x.detach(), k), m)

    return project


def hutchinson_variance(matrix: torch.Tensor, kind: str = "rademacher") -> torch.Tensor:
    r"""Variance of one Hutchinson probe ``z^T A z`` as an estimate of ``tr A``: ``(..., D, D) -> (...,)``.

    With ``S = (A + A^T)/2`` (only the symmetric part enters a quadratic form):

    * Gaussian ``z ~ N(0, I)``: ``Var = 2 ||S||_F^2``;
    * Rademacher ``z_i = +-1``: ``Var = 2 (||S||_F^2 - sum_i S_ii^2)`` (no diagonal contribution).

    For projected probes ``P z`` take ``A = P J P`` in the standard basis of ``R^{N d}``. With
    ``S`` probes the mean has ``Var / S``. Along an ODE path with probes fixed over time the
    estimate of ``int tr A_t dt`` is ``z^T (int A_t dt) z``: the same formula with ``A = int A_t dt``.
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")
    s = 0.5 * (matrix + matrix.transpose(-1, -2))
    frob = s.square().sum((-2, -1))
    if kind == "gaussian":
        return 2.0 * frob
    return 2.0 * (frob - torch.diagonal(s, dim1=-2, dim2=-1).square().sum(-1))


# ----------------------------------------------------------------------------------------------
# priors and orbit volumes


def gaussian_log_density(x: torch.Tensor, mask: torch.Tensor | None = None, translations: bool = True,
                         scale: float = 1.0) -> torch.Tensor:
    r"""Log-density of ``N(0, scale^2 I)`` on M: ``-|x|^2 / (2 scale^2) - n log scale - (n / 2) log(2 pi)``: ``(B,)``.

    ``n = (N_real - 1) d`` with translations (``x`` is centred first: the density lives on
    ``M_0``; it is the law of the centred standard Gaussian that the sampler draws), ``N_real d``
    without.
    """
    xc = center(x, mask) if translations else apply_mask(x, mask)
    dim = (count_points(x, mask) - (1.0 if translations else 0.0)) * x.shape[-1]
    return (-0.5 * xc.square().sum((-2, -1)) / scale**2 - dim * math.log(scale)
            - 0.5 * dim * math.log(2.0 * math.pi))


def harmonic_log_density(prior, x: torch.Tensor, bonds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Log-density on ``M_0`` of :class:`~qmanifold.schedules.HarmonicPrior`: ``(B,)``.

    Each coordinate is ``N(0, C)``, ``C = P Q^{-1} P`` with ``Q = k L + r I`` (valid atoms), of
    rank ``n - 1``: ``Q 1 = r 1`` (``L 1 = 0``), so ``C^+ = P Q P`` and
    ``pdet C = r / det Q``. For centred ``y_c`` (coordinate c of the configuration)

        log p = sum_c [ -y_c^T Q y_c / 2 ] - (dim / 2) [ (n - 1) log 2 pi + log r - log det Q ].
    """
    if bonds is None:
        raise ValueError("the harmonic prior's log-density needs the bond_types conditioning")
    if not bonds.is_floating_point():  # bond types: > 0 means bonded (as in HarmonicPrior), in x's precision
        bonds = (bonds > 0).to(x.dtype)
    q = prior.precision(bonds.to(x.dtype), mask).to(x.dtype)
    xc = center(x, mask)
    quad = (xc * (q @ xc)).sum((-2, -1))
    n = count_points(x, mask)
    logdet = torch.linalg.slogdet(q)[1]
    dim = x.shape[-1]
    return -0.5 * quad - 0.5 * dim * ((n - 1.0) * math.log(2.0 * math.pi) + math.log(prior.reg) - logdet)


def _log_vol_sphere(k: int) -> float:
    """``log vol(S^{k-1})`` of the unit sphere in R^k: ``log(2 pi^{k/2} / Gamma(k/2))``."""
    return math.log(2.0) + 0.5 * k * math.log(math.pi) - math.lgamma(0.5 * k)


def log_group_volume(lie) -> tuple[float, bool]:
    r"""``(log vol(K), known)``: the volume of the compact rotation-like factor K of ``lie`` in the
    left-invariant metric for which the declared generators are orthonormal.

    * SO(d) (``kind == "special_orthogonal"``): with the standard generators
      ``E_ij - E_ji`` (orthonormal for ``<X, Y> = tr(X^T Y) / 2``)
      ``vol SO(d) = prod_{k=2}^{d} vol(S^{k-1})`` (SO(2): ``2 pi``; SO(3): ``8 pi^2``); other
      normalisations are corrected by ``-1/2 log det C``, ``C_ab = tr(A_a^T A_b) / 2``.
    * torus (``kind == "torus"``, ``exp(2 pi A_a) = I``): ``(2 pi)^k``, assuming the kernel of
      ``c -> exp(sum c_a A_a)`` is exactly ``2 pi Z^k`` (true for ``groups.Torus(k)``).
    * only translations: 0 (nothing to quotient beyond the centring).
    * any other group: ``(0.0, False)``: the constant is unknown and dropped (densities on Q are
      then correct up to this additive constant).
    """
    k = len(lie.generators)
    if k == 0:
        return 0.0, True
    if lie.kind == "special_orthogonal":
        d = lie.point_dim
        gens = lie.generator_tensor(torch.float64, "cpu")
        c = 0.5 * torch.einsum("aij,bij->ab", gens, gens)
        value = sum(_log_vol_sphere(j) for j in range(2, d + 1)) - 0.5 * float(torch.linalg.slogdet(c)[1])
        return value, True
    if lie.kind == "torus":
        return k * math.log(2.0 * math.pi), True
    return 0.0, False


def log_orbit_volume(quotient, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""``log vol(G x)``: the log-volume of the orbit of ``x`` in ``M_0`` (the factor between the
    densities on Q and on M): ``(B,)``.

        log vol(G x) = 1/2 log det Gram_K(x) + log vol(K) + log N_real!   (the last one only
                                                                         for a permutation factor)

    * ``Gram_K`` is the Gram matrix of the rotation-like generators only: the
      ``(d/2) log N_real`` that :meth:`Quotient.log_orbit_volume` adds for translations is
      removed, because Q is identified with ``M_0 / K`` (translations are removed by centring,
      not integrated over).
    * ``log vol(K)`` from :func:`log_group_volume` (dropped when unknown).
    * a permutation factor contributes the counting measure of a generic orbit, ``N_real!``
      (points with a non-trivial stabiliser form a null set).

    Raises:
        ValueError: a lattice factor (the quotient of ``R^k`` by ``Z^k`` is a torus: a density on
        M is not normalisable there).
    """
    from .discrete import Lattice, Permutations

    value = torch.zeros(x.shape[:-2], dtype=x.dtype, device=x.device)
    lie, disc = quotient.lie, quotient.discrete
    if lie is not None and lie.generators:
        value = quotient.log_orbit_volume(x, mask)
        if lie.translations:
            value = value - 0.5 * x.shape[-1] * torch.log(count_points(x, mask).clamp_min(1.0))
        value = value + log_group_volume(lie)[0]
    if disc is not None:
        if isinstance(disc, Lattice):
            raise ValueError(f"densities on the quotient by {quotient.name} are not defined here: a lattice "
                             "quotient is a torus and the total-space density is periodic, not normalisable")
        if isinstance(disc, Permutations):
            value = value + torch.lgamma(count_points(x, mask) + 1.0)
        else:
            raise ValueError(f"unknown discrete factor {disc!r}: its orbit size is not known")
    return value


def equivariance_error(
    field: Field,
    x: torch.Tensor,
    t: torch.Tensor,
    rotations: torch.Tensor,
    mask: torch.Tensor | None = None,
    cond: dict | None = None,
) -> torch.Tensor:
    r"""Relative equivariance error ``|u(R x) - R u(x)| / (|u(x)| + |u(R x)|)`` per configuration.

    ``rotations`` ``(B, d, d)`` act on every point (``x_n -> R x_n``); conditioning tensors are
    passed unchanged (assumed invariant, e.g. atom types). ``(B,)``; 0 for an equivariant field.
    """
    cond = cond or {}
    with torch.no_grad():
        u = field(x, t, mask, **cond)
        xr = apply_mask(x @ rotations.transpose(-1, -2), mask)
        ur = field(xr, t, mask, **cond)
        target = apply_mask(u @ rotations.transpose(-1, -2), mask)
        num = (ur - target).square().sum((-2, -1)).sqrt()
        den = u.square().sum((-2, -1)).sqrt() + ur.square().sum((-2, -1)).sqrt()
    return num / den.clamp_min(torch.finfo(x.dtype).tiny)


# ----------------------------------------------------------------------------------------------
# ODE integration of (x, l) with dl/dt = div u

Rhs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

# Dormand-Prince 5(4) tableau (Dormand & Prince 1980; the 5th-order solution is propagated)
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _combine(y: torch.Tensor, h, ks: Sequence[torch.Tensor], coefs: Sequence[float]) -> torch.Tensor:
    out = y
    for c, k in zip(coefs, ks):
        if c != 0.0:
            out = out + (h * c) * k
    return out


def integrate_log_density(
    rhs: Rhs,
    x: torch.Tensor,
    times: torch.Tensor,
    *,
    method: str = "rk4",
    mask: torch.Tensor | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-6,
    max_steps: int = 100_000,
    skip_corrector_after: float | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    r"""Integrate ``dx/dt = u``, ``dl/dt = div u`` (``(u, div) = rhs(x, t)``, ``t`` a 0-d tensor)
    from ``times[0]`` to ``times[-1]`` (either direction) with ``l = 0`` at the start.

    Methods: ``"euler"`` (order 1), ``"heun"`` (order 2; with ``skip_corrector_after`` a step
    that ends at ``t > skip_corrector_after`` is an Euler step, as in the Heun sampler),
    ``"rk4"`` (classical Runge-Kutta, order 4) on the grid ``times``; ``"dopri5"`` (adaptive
    Dormand-Prince 5(4) from ``times[0]`` to ``times[-1]``, initial step ``times[1] - times[0]``,
    one step size for the batch, accepted when the RMS over the components of ``(x, l)`` of
    ``err / (atol + rtol max(|y|, |y_new|))`` is <= 1 for every configuration; it synchronises
    with the host once per step).

    ``callback(i, t, x)`` is called after every (accepted) step with the new time and state.

    Returns ``(x_end (B, N, d), l_end (B,), nfev)`` (``nfev``: evaluations of ``rhs``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    batch = x.shape[0]
    ell = torch.zeros(batch, dtype=x.dtype, device=x.device)
    nfev = 0

    def f(xx, tt):
        nonlocal nfev
        nfev += 1
        u, div = rhs(xx, tt)
        return apply_mask(u, mask), div

    if method == "dopri5":
        return _dopri5(f, x, ell, times, mask, rtol, atol, max_steps, callback, lambda: nfev)
    t_host = times.detach().cpu().tolist()
    for i in range(len(t_host) - 1):
        t0, t1 = times[i], times[i + 1]
        h = t1 - t0
        if method == "euler":
            u, dv = f(x, t0)
            x, ell = x + h * u, ell + h * dv
        elif method == "heun":
            u1, d1 = f(x, t0)
            xe = x + h * u1
            if skip_corrector_after is not None and t_host[i + 1] > skip_corrector_after:
                x, ell = xe, ell + h * d1
            else:
                u2, d2 = f(apply_mask(xe, mask), t1)
                x, ell = x + 0.5 * h * (u1 + u2), ell + 0.5 * h * (d1 + d2)
        else:  # rk4
            half = t0 + 0.5 * h
            u1, d1 = f(x, t0)
            u2, d2 = f(apply_mask(x + 0.5 * h * u1, mask), half)
            u3, d3 = f(apply_mask(x + 0.5 * h * u2, mask), half)
            u4, d4 = f(apply_mask(x + h * u3, mask), t1)
            x = x + (h / 6.0) * (u1 + 2.0 * u2 + 2.0 * u3 + u4)
            ell = ell + (h / 6.0) * (d1 + 2.0 * d2 + 2.0 * d3 + d4)
        x = apply_mask(x, mask)
        if callback is not None:
            callback(i, t1, x)
    return x, ell, nfev


def _dopri5(f, x, ell, times, mask, rtol, atol, max_steps, callback, count):
    t_start, t_end = float(times[0]), float(times[-1])
    span = t_end - t_start
    if span == 0.0:
        return x, ell, 0
    sign = 1.0 if span > 0 else -1.0
    h = float(times[1] - times[0]) if times.shape[0] > 1 else span
    t = t_start
    k1 = f(x, times.new_tensor(t))
    steps = 0
    n_points = count_points(x, mask) * x.shape[-1] + 1.0  # components of (x, l) per configuration
    while sign * (t_end - t) > 1e-12 * abs(span):
        if steps >= max_steps:
            raise RuntimeError(f"dopri5: more than {max_steps} steps from t = {t_start} to {t_end} (stuck at t = {t:.6g}); "
                               "loosen rtol/atol or use a fixed-step method")
        h = sign * min(abs(h), abs(t_end - t))
        ks = [k1]
        for stage in range(1, 7):
            coefs = _DP_A[stage]
            xs = apply_mask(_combine(x, h, [k[0] for k in ks], coefs), mask)
            ks.append(f(xs, times.new_tensor(t + _DP_C[stage] * h)))
        x_new = apply_mask(_combine(x, h, [k[0] for k in ks], _DP_B), mask)
        ell_new = _combine(ell, h, [k[1] for k in ks], _DP_B)
        diff = [b - b4 for b, b4 in zip(_DP_B, _DP_B4)]
        err_x = _combine(torch.zeros_like(x), h, [k[0] for k in ks], diff)
        err_l = _combine(torch.zeros_like(ell), h, [k[1] for k in ks], diff)
        scale_x = atol + rtol * torch.maximum(x.abs(), x_new.abs())
        scale_l = atol + rtol * torch.maximum(ell.abs(), ell_new.abs())
        sq = apply_mask((err_x / scale_x).square(), mask).sum((-2, -1)) + (err_l / scale_l).square()
        err = float((sq / n_points).sqrt().max())
        steps += 1
        if err <= 1.0:
            t = t + h
            x, ell = x_new, ell_new
            k1 = ks[6]  # first same as last
            if callback is not None:
                callback(steps - 1, times.new_tensor(t), x)
        factor = 5.0 if err == 0.0 else min(5.0, max(0.2, 0.9 * err ** -0.2))
        h = h * factor
    return x, ell, count()
