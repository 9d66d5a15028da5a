"""Shared building blocks for the molecular denoiser networks.

This module holds what :mod:`qmanifold.models.egnn` and :mod:`qmanifold.models.transformer` have in
common:

* :func:`sinusoidal_time_features` / :class:`TimeEmbedding` -- diffusion time
  ``t in [0, 1]`` (``t = 0`` noise, ``t = 1`` data) to a hidden vector;
* :class:`AtomEmbedding` / :class:`BondEmbedding` -- categorical atom / bond
  types to vectors, each with one extra "unspecified" row used when the types
  are not given (``None``) and for padded atoms / pairs;
* :class:`DistanceExpansion` -- bounded distance features (Gaussian RBF on
  ``[0, cutoff]`` plus the soft feature ``log(1 + d)``), robust to the large
  inter-atomic distances of pure-noise inputs;
* :func:`pairwise_geometry`, :func:`masked_mean`, :func:`center_masked` --
  masked geometric helpers;
* :func:`prepare_denoiser_inputs` -- the input validation and normalisation
  common to every denoiser (``denoiser(x_t, t, mask=..., atom_types=...,
  bond_types=...)``), and :class:`DenoiserBase` (``config``,
  ``count_parameters``).

Shapes use ``B`` = batch, ``N`` = atoms (padded), ``D`` = feature width.
All helpers keep the device and dtype of their inputs.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "SUPPORTED_FLOAT_DTYPES",
    "sinusoidal_time_features",
    "TimeEmbedding",
    "AtomEmbedding",
    "BondEmbedding",
    "DistanceExpansion",
    "pairwise_geometry",
    "masked_mean",
    "center_masked",
    "DenoiserInputs",
    "prepare_denoiser_inputs",
    "DenoiserBase",
]

#: Floating dtypes accepted for coordinates (half precision is rejected: the
#: distance features and the masked mean are not reliable in float16).
SUPPORTED_FLOAT_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# time
# ---------------------------------------------------------------------------
def sinusoidal_time_features(
    t: Tensor, dim: int, max_period: float = 10_000.0, scale: float = 1_000.0
) -> Tensor:
    r"""Sinusoidal features of a scalar time.

    With ``half = dim // 2`` and frequencies
    :math:`\omega_k = \mathrm{max\_period}^{-k/\mathrm{half}}`, ``k = 0..half-1``,

    .. math:: \phi(t) = [\sin(s t \omega_k)]_k \oplus [\cos(s t \omega_k)]_k
              (\oplus\ t \text{ if dim is odd}),

    where ``s = scale`` stretches ``t in [0, 1]`` over the usual DDPM range.

    Args:
        t: ``(B,)`` floating tensor.
        dim: output width (>= 2).
    Returns:
        ``(B, dim)`` tensor, same dtype/device as ``t``.
    """
    if t.dim() != 1:
        raise ValueError(f"t must have shape (B,), got {tuple(t.shape)}")
    if dim < 2:
        raise ValueError(f"time feature dim must be >= 2, got {dim}")
    half = dim // 2
    k = torch.arange(half, dtype=t.dtype, device=t.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = (scale * t)[:, None] * freqs[None, :]
    feats = [torch.sin(args), torch.cos(args)]
    if dim % 2 == 1:
        feats.append(t[:, None])
    return torch.cat(feats, dim=-1)


class TimeEmbedding(nn.Module):
    r"""``t (B,) -> (B, out_dim)``: sinusoidal features followed by an MLP.

    ``e(t) = W_2\,\mathrm{SiLU}(W_1 \phi(t) + b_1) + b_2``.
    """

    def __init__(self, out_dim: int, freq_dim: int = 64, max_period: float = 10_000.0,
                 scale: float = 1_000.0) -> None:
        super().__init__()
        self.freq_dim = int(freq_dim)
        self.max_period = float(max_period)
        self.scale = float(scale)
        self.mlp = nn.Sequential(
            nn.Linear(self.freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim)
        )

    def forward(self, t: Tensor) -> Tensor:
        feats = sinusoidal_time_features(t, self.freq_dim, self.max_period, self.scale)
        return self.mlp(feats)


# ---------------------------------------------------------------------------
# categorical types
# ---------------------------------------------------------------------------
class _TypeEmbedding(nn.Module):
    """``nn.Embedding`` with ``num_types + 1`` rows; the last row is "unspecified"."""

    def __init__(self, num_types: int, dim: int) -> None:
        super().__init__()
        if num_types < 1:
            raise ValueError(f"number of types must be >= 1, got {num_types}")
        self.num_types = int(num_types)
        self.embedding = nn.Embedding(self.num_types + 1, dim)

    @property
    def unspecified_index(self) -> int:
        return self.num_types

    def forward(self, types: Tensor) -> Tensor:
        return self.embedding(types)


class AtomEmbedding(_TypeEmbedding):
    """Atom types ``(B, N)`` int64 in ``[0, num_atom_types]`` -> ``(B, N, dim)``.

    Index ``num_atom_types`` means "unspecified" (types not given / padding).
    """


class BondEmbedding(_TypeEmbedding):
    """Bond types ``(B, N, N)`` int64 in ``[0, num_bond_types]`` -> ``(B, N, N, dim)``.

    Index ``num_bond_types`` means "unspecified" (bonds not given / padding).
    """


# ---------------------------------------------------------------------------
# distances
# ---------------------------------------------------------------------------
class DistanceExpansion(nn.Module):
    r"""Bounded features of a distance ``d >= 0``.

    .. math:: f(d) = \Big[\exp\!\big(-\tfrac{(d-\mu_k)^2}{2\sigma^2}\big)\Big]_{k=1}^{K}
              \oplus \log(1 + d),

    with ``K = num_rbf`` centres ``mu_k`` evenly spaced on ``[0, cutoff]`` and
    width ``sigma = cutoff / (K - 1)``. The Gaussians are in ``[0, 1]`` and
    vanish beyond the cutoff, where the slowly growing ``log(1 + d)`` still
    tells distances apart; so the features stay O(1) even for the pure-noise
    inputs at ``t = 0``.

    Args:
        num_rbf: number of Gaussians ``K`` (>= 2).
        cutoff: largest centre.
        learnable: make centres and (log-)width trainable parameters.
    Shapes:
        ``(...,) -> (..., K + 1)``; ``out_dim == K + 1``.
    """

    def __init__(self, num_rbf: int = 32, cutoff: float = 10.0, learnable: bool = False) -> None:
        super().__init__()
        if num_rbf < 2:
            raise ValueError(f"num_rbf must be >= 2, got {num_rbf}")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be > 0, got {cutoff}")
        centres = torch.linspace(0.0, float(cutoff), int(num_rbf))
        log_width = torch.tensor(math.log(float(cutoff) / (num_rbf - 1)))
        if learnable:
            self.centres = nn.Parameter(centres)
            self.log_width = nn.Parameter(log_width)
        else:
            self.register_buffer("centres", centres)
            self.register_buffer("log_width", log_width)
        self.num_rbf = int(num_rbf)

    @property
    def out_dim(self) -> int:
        return self.num_rbf + 1

    def forward(self, d: Tensor) -> Tensor:
        z = (d[..., None] - self.centres) * torch.exp(-self.log_width)
        return torch.cat([torch.exp(-0.5 * z * z), torch.log1p(d)[..., None]], dim=-1)


# ---------------------------------------------------------------------------
# masked geometry
# ---------------------------------------------------------------------------
def pairwise_geometry(x: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    r"""Relative vectors and distances.

    ``rel[b, i, j] = x[b, i] - x[b, j]`` and ``d = sqrt(|rel|^2 + eps)`` (the
    ``eps`` keeps the gradient finite on the diagonal; both are exactly
    rotation/translation invariant resp. equivariant).

    Shapes: ``x (B, N, 3) -> rel (B, N, N, 3), d (B, N, N)``.
    """
    rel = x[:, :, None, :] - x[:, None, :, :]
    d = torch.sqrt((rel * rel).sum(-1) + eps)
    return rel, d


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    r"""Mean over real atoms: ``sum_i m_i x_i / max(1, sum_i m_i)``.

    Shapes: ``x (B, N, D)``, ``mask (B, N)`` bool ``-> (B, 1, D)``.
    """
    w = mask.to(x.dtype)[..., None]
    count = w.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (x * w).sum(dim=1, keepdim=True) / count


def center_masked(x: Tensor, mask: Tensor) -> Tensor:
    """Subtract the masked mean and set padded rows to exactly zero. ``(B, N, D)``."""
    w = mask.to(x.dtype)[..., None]
    return (x - masked_mean(x, mask)) * w


# ---------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------
class DenoiserInputs(NamedTuple):
    """Normalised denoiser inputs (see :func:`prepare_denoiser_inputs`)."""

    x: Tensor  # (B, N, 3) centred over real atoms, padded rows = 0
    t: Tensor  # (B,) same dtype as x
    mask: Tensor  # (B, N) bool
    atom_types: Tensor  # (B, N) int64; padded / unspecified -> num_atom_types
    bond_types: Tensor  # (B, N, N) int64; padded pairs / unspecified -> num_bond_types


def _check_index_tensor(name: str, value: Tensor, shape: tuple[int, ...], owner: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{owner}: {name} must be an integer (int64) tensor, got {value.dtype}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{owner}: {name} must have shape {shape}, got {tuple(value.shape)}")


def prepare_denoiser_inputs(
    x_t: Tensor,
    t: Tensor,
    mask: Tensor | None,
    atom_types: Tensor | None,
    bond_types: Tensor | None,
    *,
    num_atom_types: int,
    num_bond_types: int,
    param_dtype: torch.dtype | None = None,
    owner: str = "denoiser",
) -> DenoiserInputs:
    r"""Validate and normalise the inputs of a denoiser call.

    Checks only metadata (shapes, dtypes, devices), never values, so it does
    not synchronise with an accelerator. Index values are *not* range-checked
    here: an out-of-range type on a real atom raises in ``nn.Embedding``.

    Normalisation:

    * ``x`` is centred over the real atoms and padded rows are set to 0
      (arbitrary, even non-finite, padded coordinates cannot leak);
    * ``t`` is cast to ``x.dtype``;
    * ``mask=None`` becomes all-True;
    * ``atom_types=None`` / ``bond_types=None`` become the "unspecified"
      index; padded atoms and pairs touching a padded atom are set to the
      "unspecified" index as well (so their given values are irrelevant).

    Raises:
        TypeError: non-tensor input, ``x`` not float32/float64 (or not the
            model's parameter dtype), ``t`` not floating, ``mask`` not bool,
            types not integer, tensors on different devices.
        ValueError: any shape mismatch.
    """
    if not isinstance(x_t, Tensor):
        raise TypeError(f"{owner}: x_t must be a torch.Tensor, got {type(x_t).__name__}")
    if x_t.dtype not in SUPPORTED_FLOAT_DTYPES:
        raise TypeError(
            f"{owner}: x_t must be float32 or float64, got {x_t.dtype}"
        )
    if x_t.dim() != 3 or x_t.shape[-1] != 3:
        raise ValueError(f"{owner}: x_t must have shape (B, N, 3), got {tuple(x_t.shape)}")
    if param_dtype is not None and x_t.dtype != param_dtype:
        raise TypeError(
            f"{owner}: x_t has dtype {x_t.dtype} but the model parameters are {param_dtype}; "
            f"convert one of them (e.g. model.to({x_t.dtype}))"
        )
    B, N, _ = x_t.shape
    device = x_t.device

    if not isinstance(t, Tensor):
        raise TypeError(f"{owner}: t must be a torch.Tensor of shape (B,), got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{owner}: t must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{owner}: t must have shape (B,) = ({B},), got {tuple(t.shape)}")
    if t.device != device:
        raise TypeError(f"{owner}: t is on {t.device} but x_t is on {device}")
    t = t.to(x_t.dtype)

    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=device)
    else:
        if not isinstance(mask, Tensor):
            raise TypeError(f"{owner}: mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{owner}: mask must have dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"{owner}: mask must have shape (B, N) = ({B}, {N}), got {tuple(mask.shape)}")
        if mask.device != device:
            raise TypeError(f"{owner}: mask is on {mask.device} but x_t is on {device}")

    pair_real = mask[:, :, None] & mask[:, None, :]

    if atom_types is None:
        atom_types = torch.full((B, N), num_atom_types, dtype=torch.long, device=device)
    else:
        _check_index_tensor("atom_types", atom_types, (B, N), owner)
        if atom_types.device != device:
            raise TypeError(f"{owner}: atom_types is on {atom_types.device} but x_t is on {device}")
        atom_types = torch.where(mask, atom_types.long(), num_atom_types)

    if bond_types is None:
        bond_types = torch.full((B, N, N), num_bond_types, dtype=torch.long, device=device)
    else:
        _check_index_tensor("bond_types", bond_types, (B, N, N), owner)
        if bond_types.device != device:
            raise TypeError(f"{owner}: bond_types is on {bond_types.device} but x_t is on {device}")
        bond_types = torch.where(pair_real, bond_types.long(), num_bond_types)

    # Zero the padded rows *before* centring so that non-finite padding cannot leak.
    x = torch.where(mask[..., None], x_t, torch.zeros((), dtype=x_t.dtype, device=device))
    x = center_masked(x, mask)
    return DenoiserInputs(x, t, mask, atom_types, bond_types)


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------
class DenoiserBase(nn.Module):
    """Common interface of the molecular denoisers.

    Subclasses set ``self.config`` (a dict of their constructor arguments, so
    that ``type(model)(**model.config)`` rebuilds the architecture) and a
    class attribute ``name`` (the registry key in :mod:`qmanifold.models.networks`).
    """

    name: str = ""
    config: dict[str, Any]

    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) scalar parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.items())
