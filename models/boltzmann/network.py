r"""An E(n)-equivariant, permutation-equivariant velocity field for identical particles in R^d
(EGNN of Satorras et al. 2021, in the form of the "dynamics" networks of equivariant continuous
flows, Satorras et al. 2021b and Klein et al. 2023).

Call: ``v = net(x, t, mask=None)`` with ``x`` ``(B, N, d)``, ``t`` ``(B,)`` -> ``(B, N, d)``.

Architecture. Every particle starts with the same feature ``h_i^0 = MLP(tau(t))`` (identical
particles: nothing distinguishes them but their positions), ``tau`` sinusoidal features of t. With
``x^0`` the centred input and, per layer, ``r_ij = x_i - x_j``, ``d2_ij = |r_ij|^2``:

.. math::
    m_{ij} = \phi_e(h_i, h_j, d2_{ij}), \qquad
    h_i \leftarrow h_i + \phi_h\big(h_i, \tfrac{1}{N-1}\sum_{j \ne i} m_{ij}\big), \qquad
    x_i \leftarrow x_i + \tfrac{1}{N-1}\sum_{j \ne i} \frac{r_{ij}}{\sqrt{d2_{ij} + 1}}\, \phi_x(m_{ij}),

and ``v = centre(x^L - x^0)``. Symmetries (exact up to rounding): for any orthogonal R, shift c and
permutation P, ``v(x R^T + c) = v(x) R^T`` and ``v(P x) = P v(x)``; the output is centred. The
last layer of ``phi_x`` starts near zero, so the initial field is close to 0.

All pairs interact (no cutoff); real points only when a mask is given. A configuration's output
depends on its own inputs only (no batch statistics), as ``QuotientDiffusion.log_prob`` requires.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["EGNNLayer", "EGNNVelocity", "time_features"]


def time_features(t: Tensor, dim: int) -> Tensor:
    """``(B,) -> (B, dim)``: ``t`` and sin/cos of ``2 pi k t`` for ``k = 1..(dim - 1)/2``."""
    k = torch.arange(1, (dim - 1) // 2 + 1, dtype=t.dtype, device=t.device)
    ang = 2.0 * math.pi * t[:, None] * k
    feats = torch.cat([t[:, None], torch.sin(ang), torch.cos(ang)], dim=-1)
    if feats.shape[-1] < dim:
        feats = torch.cat([feats, torch.zeros(t.shape[0], dim - feats.shape[-1], dtype=t.dtype, device=t.device)], -1)
    return feats


class EGNNLayer(nn.Module):
    """One equivariant layer (module docstring)."""

    def __init__(self, hidden: int, coords_range: float = 15.0):
        super().__init__()
        self.coords_range = float(coords_range)
        self.edge_mlp = nn.Sequential(nn.Linear(2 * hidden + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.xavier_uniform_(self.coord_mlp[-1].weight, gain=1e-3)
        nn.init.zeros_(self.coord_mlp[-1].bias)

    def forward(self, h: Tensor, x: Tensor, pair_w: Tensor) -> tuple[Tensor, Tensor]:
        """``h (B, N, H)``, ``x (B, N, d)``, ``pair_w (B, N, N, 1)`` = ``[i != j, both real] / (n - 1)``."""
        rel = x[:, :, None, :] - x[:, None, :, :]  # (B, N, N, d)
        d2 = rel.square().sum(-1, keepdim=True)
        n = h.shape[1]
        m = self.edge_mlp(torch.cat([h[:, :, None, :].expand(-1, -1, n, -1), h[:, None, :, :].expand(-1, n, -1, -1), d2], -1))
        agg = (m * pair_w).sum(2)
        h = h + self.node_mlp(torch.cat([h, agg], -1))
        coef = self.coords_range * torch.tanh(self.coord_mlp(m) / self.coords_range)
        x = x + (rel / torch.sqrt(d2 + 1.0) * coef * pair_w).sum(2)
        return h, x


class EGNNVelocity(nn.Module):
    """E(n)- and permutation-equivariant velocity field ``(B, N, d), (B,) -> (B, N, d)``.

    Args:
        hidden: feature width H.
        layers: number of :class:`EGNNLayer`.
        time_dim: width of the time features.
        coords_range: soft bound on each pair's coordinate coefficient (``rho tanh(. / rho)``).
    """

    def __init__(self, hidden: int = 32, layers: int = 3, time_dim: int = 17, coords_range: float = 15.0):
        super().__init__()
        if hidden < 1 or layers < 1 or time_dim < 1:
            raise ValueError(f"hidden, layers and time_dim must be >= 1, got {hidden}, {layers}, {time_dim}")
        self.config = dict(hidden=hidden, layers=layers, time_dim=time_dim, coords_range=coords_range)
        self.time_dim = int(time_dim)
        self.embed = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList(EGNNLayer(hidden, coords_range) for _ in range(layers))

    def forward(self, x: Tensor, t: Tensor, mask: Tensor | None = None) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, d), got {tuple(x.shape)}")
        B, N, _ = x.shape
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(B)
        real = torch.ones(B, N, dtype=torch.bool, device=x.device) if mask is None else mask
        w = real.to(x.dtype)[..., None]
        count = w.sum(1, keepdim=True).clamp_min(1.0)
        x0 = (x - (x * w).sum(1, keepdim=True) / count) * w
        eye = torch.eye(N, dtype=torch.bool, device=x.device)
        pair = real[:, :, None] & real[:, None, :] & ~eye
        pair_w = (pair.to(x.dtype) / (count - 1.0).clamp_min(1.0))[..., None]
        h = self.embed(time_features(t, self.time_dim).to(x.dtype))[:, None, :].expand(B, N, -1) * w
        xl = x0
        for layer in self.layers:
            h, xl = layer(h, xl, pair_w)
            h = h * w
        v = (xl - x0) * w
        return (v - (v * w).sum(1, keepdim=True) / count) * w

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
