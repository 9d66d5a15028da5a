r"""E(3)-equivariant graph network denoiser (EGNN-style, Satorras et al. 2021).

Call convention (shared by every denoiser in :mod:`qmanifold.models.networks`)::

    out = model(x_t, t, mask=mask, atom_types=atom_types, bond_types=bond_types)

* ``x_t``  ``(B, N, 3)`` float32/float64 coordinates (need not be centred);
* ``t``    ``(B,)`` float in ``[0, 1]`` (``0`` = noise, ``1`` = data);
* ``mask`` ``(B, N)`` bool, True for real atoms, or None (all real);
* ``atom_types`` ``(B, N)`` int64 in ``[0, num_atom_types)`` or None;
* ``bond_types`` ``(B, N, N)`` int64 in ``[0, num_bond_types)`` or None
  (0 none, 1 single, 2 double, 3 triple, 4 aromatic by default).

Returns ``(B, N, 3)``: a field that is centred over the real atoms and exactly
zero at padded atoms (a predicted clean configuration ``x1`` or a velocity --
the network does not know which).

Symmetries (exact up to floating-point rounding). With ``R in SO(3)`` (indeed
any orthogonal ``R``), ``c in R^3`` and a permutation ``P`` of the atoms
(applied to coordinates, mask, atom types and both axes of bond types)

.. math::
    f(x R^\top + c) = f(x) R^\top,\qquad f(P x) = P f(x).

The output is *translation invariant*: the input is centred internally and
nothing is added back, so the output is always a centred configuration.

Architecture. Node features ``h_i^0 = E_atom(a_i) + E_time(t)``; static edge
features ``e_ij = E_bond(b_ij)``; per layer ``l`` with current coordinates
``x^l`` (``x^0`` = centred input), ``r_ij = x_i - x_j``, ``d_ij = |r_ij|``
and ``\phi(d)`` = :class:`~qmanifold.models.embeddings.DistanceExpansion`:

.. math::
    m_{ij} &= \mathrm{MLP}_e\big(\bar h_i, \bar h_j, \phi(d_{ij}), e_{ij}\big),
    \qquad \bar h = \mathrm{LN}(h), \qquad
    \alpha_{ij} = \sigma(w^\top m_{ij}) \\
    h_i &\leftarrow h_i + \mathrm{MLP}_h\Big(\bar h_i,\;
        \tfrac{1}{n-1}\sum_{j\ne i} \alpha_{ij} m_{ij}\Big) \\
    x_i &\leftarrow x_i + \tfrac{1}{n-1}\sum_{j\ne i}
        \frac{r_{ij}}{d_{ij} + 1}\; \rho \tanh\big(\mathrm{MLP}_x(m_{ij})\big)

where sums run over real atoms only and ``n`` is the number of real atoms.
``r/(d+1)`` has norm < 1 and the ``tanh`` is bounded by ``rho =
coords_range``, so each layer moves an atom by less than ``rho`` -- stable
even for the widely spread inputs at ``t = 0``. The head is a gated skip on
the re-centred ``x^L``

.. math:: y_i = (1 + g(\bar h_i))\, \mathrm{centre}(x^{L})_i, \qquad
          \mathrm{out} = \mathrm{centre}_{\text{mask}}(y),

with scalar ``g`` zero-initialised, which lets the network shrink the noisy
input (needed for data prediction at small ``t``) in a single equivariant step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qmanifold.models.embeddings import (
    AtomEmbedding,
    BondEmbedding,
    DenoiserBase,
    DistanceExpansion,
    TimeEmbedding,
    center_masked,
    pairwise_geometry,
    prepare_denoiser_inputs,
)

__all__ = ["EGNNLayer", "EGNNDenoiser"]


class EGNNLayer(nn.Module):
    """One equivariant message-passing layer (see module docstring).

    Args:
        hidden: node / message width ``H``.
        edge_dim: width of the static edge features (bond embedding).
        dist_dim: width ``R`` of the distance features (``DistanceExpansion.out_dim``).
        coords_range: bound ``rho`` on the per-pair coordinate coefficient.
        attention: gate messages with ``sigmoid(w^T m_ij)``.
    """

    def __init__(self, hidden: int, edge_dim: int, dist_dim: int,
                 coords_range: float = 10.0, attention: bool = True) -> None:
        super().__init__()
        self.coords_range = float(coords_range)
        self.norm = nn.LayerNorm(hidden)
        # First edge-MLP layer split into per-node and per-edge parts:
        # W [h_i, h_j, e_ij] = W_s h_i + W_d h_j + W_e e_ij (cheaper than concatenating).
        self.lin_src = nn.Linear(hidden, hidden)
        self.lin_dst = nn.Linear(hidden, hidden, bias=False)
        self.lin_edge = nn.Linear(edge_dim + dist_dim, hidden, bias=False)
        self.edge_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.att = nn.Linear(hidden, 1) if attention else None
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # Small initial coordinate updates (as in EDM): start close to identity.
        nn.init.xavier_uniform_(self.coord_mlp[-1].weight, gain=1e-3)
        nn.init.zeros_(self.coord_mlp[-1].bias)

    def forward(self, h: Tensor, x: Tensor, edge: Tensor, pair_w: Tensor, node_w: Tensor,
                dist: DistanceExpansion) -> tuple[Tensor, Tensor]:
        """
        Args:
            h: ``(B, N, H)`` node features (zero at padding).
            x: ``(B, N, 3)`` coordinates (zero at padding).
            edge: ``(B, N, N, E)`` static edge features.
            pair_w: ``(B, N, N, 1)`` aggregation weights
                ``[i, j real, i != j] / max(1, n - 1)``.
            node_w: ``(B, N, 1)`` ``1.0`` at real atoms, ``0.0`` at padding.
            dist: the distance expansion shared by all layers (owned by the denoiser).
        Returns:
            updated ``(h, x)``, both zero at padding.
        """
        rel, d = pairwise_geometry(x)
        hn = self.norm(h)
        pre = (self.lin_src(hn)[:, :, None, :] + self.lin_dst(hn)[:, None, :, :]
               + self.lin_edge(torch.cat([edge, dist(d)], dim=-1)))
        m = self.edge_mlp(pre)  # (B, N, N, H)
        gate = torch.sigmoid(self.att(m)) if self.att is not None else 1.0
        agg = (m * gate * pair_w).sum(dim=2)  # (B, N, H)
        h = (h + self.node_mlp(torch.cat([hn, agg], dim=-1))) * node_w
        coef = self.coords_range * torch.tanh(self.coord_mlp(m))  # (B, N, N, 1)
        dx = (rel / (d[..., None] + 1.0) * coef * pair_w).sum(dim=2)  # (B, N, 3)
        x = (x + dx) * node_w
        return h, x


class EGNNDenoiser(DenoiserBase):
    """E(3)-equivariant denoiser on the fully connected graph of real atoms.

    Args:
        num_atom_types: atom-type vocabulary size (default 5: H, C, N, O, F).
        num_bond_types: bond-type vocabulary size (default 5: none, single,
            double, triple, aromatic).
        hidden: node / message width.
        layers: number of :class:`EGNNLayer`.
        edge_dim: bond-embedding width.
        num_rbf: Gaussians in the distance expansion.
        cutoff: largest RBF centre (same length unit as the coordinates).
        learnable_rbf: trainable RBF centres / width.
        coords_range: bound on each per-pair coordinate coefficient.
        attention: sigmoid message gating.
        time_freq_dim: width of the sinusoidal time features.

    Forward: see the module docstring; ``(B, N, 3) -> (B, N, 3)``.
    Unknown keyword arguments raise ``TypeError`` (keyword-only signature).
    """

    name = "egnn"

    def __init__(
        self,
        num_atom_types: int = 5,
        num_bond_types: int = 5,
        hidden: int = 128,
        layers: int = 6,
        edge_dim: int = 32,
        num_rbf: int = 32,
        cutoff: float = 10.0,
        learnable_rbf: bool = False,
        coords_range: float = 10.0,
        attention: bool = True,
        time_freq_dim: int = 64,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or edge_dim < 1:
            raise ValueError(
                f"hidden, layers and edge_dim must be >= 1, got {hidden}, {layers}, {edge_dim}"
            )
        self.config = dict(
            num_atom_types=num_atom_types, num_bond_types=num_bond_types, hidden=hidden,
            layers=layers, edge_dim=edge_dim, num_rbf=num_rbf, cutoff=cutoff,
            learnable_rbf=learnable_rbf, coords_range=coords_range, attention=attention,
            time_freq_dim=time_freq_dim,
        )
        self.num_atom_types = int(num_atom_types)
        self.num_bond_types = int(num_bond_types)
        self.atom_emb = AtomEmbedding(num_atom_types, hidden)
        self.bond_emb = BondEmbedding(num_bond_types, edge_dim)
        self.time_emb = TimeEmbedding(hidden, freq_dim=time_freq_dim)
        self.dist = DistanceExpansion(num_rbf, cutoff, learnable=learnable_rbf)
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, edge_dim, self.dist.out_dim, coords_range, attention)
            for _ in range(layers)
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.skip_gate = nn.Linear(hidden, 1)
        nn.init.zeros_(self.skip_gate.weight)
        nn.init.zeros_(self.skip_gate.bias)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        mask: Tensor | None = None,
        atom_types: Tensor | None = None,
        bond_types: Tensor | None = None,
    ) -> Tensor:
        """``(B, N, 3), (B,) -> (B, N, 3)``, centred over real atoms, zero at padding."""
        inp = prepare_denoiser_inputs(
            x_t, t, mask, atom_types, bond_types,
            num_atom_types=self.num_atom_types, num_bond_types=self.num_bond_types,
            param_dtype=self._param_dtype(), owner=type(self).__name__,
        )
        x, mask = inp.x, inp.mask
        node_w = mask.to(x.dtype)[..., None]  # (B, N, 1)
        n_real = node_w.sum(dim=1, keepdim=True)  # (B, 1, 1)
        N = x.shape[1]
        eye = torch.eye(N, dtype=torch.bool, device=x.device)
        pair = mask[:, :, None] & mask[:, None, :] & ~eye
        pair_w = (pair.to(x.dtype) / (n_real - 1.0).clamp_min(1.0))[..., None]  # (B, N, N, 1)

        h = (self.atom_emb(inp.atom_types) + self.time_emb(inp.t)[:, None, :]) * node_w
        edge = self.bond_emb(inp.bond_types)
        for layer in self.layers:
            h, x = layer(h, x, edge, pair_w, node_w, self.dist)
        x = center_masked(x, mask)  # the updates need not preserve the centroid
        y = (1.0 + self.skip_gate(self.out_norm(h))) * x
        return center_masked(y, mask)
