r"""Non-equivariant transformer denoiser with pairwise (graph + distance) attention bias.

Call convention (shared by every denoiser in :mod:`qmanifold.models.networks`)::

    out = model(x_t, t, mask=mask, atom_types=atom_types, bond_types=bond_types)

with ``x_t (B, N, 3)`` float32/float64, ``t (B,)`` in ``[0, 1]`` (``0`` = noise,
``1`` = data), ``mask (B, N)`` bool or None, ``atom_types (B, N)`` int64 or
None, ``bond_types (B, N, N)`` int64 or None. Returns ``(B, N, 3)``, centred
over the real atoms and exactly zero at padded atoms.

Symmetries. The network is permutation-equivariant (no positional encodings:
tokens are atoms, attention is a set operation) and translation *invariant*
(the input is centred internally; the output is centred). It is deliberately
**not** rotation-equivariant: the raw centred coordinates enter through a
linear token embedding and the output is a linear read-out. Rotational
symmetry must be learned from data via random-rotation augmentation (done by
the training code).

Architecture. Tokens

.. math:: h_i^0 = W_x x_i + E_\text{atom}(a_i) + E_\text{time}(t),

pair features ``p_ij = MLP_p(E_bond(b_ij), phi(d_ij))`` computed once from the
input distances (``phi`` = :class:`~qmanifold.models.embeddings.DistanceExpansion`), and
``L`` pre-LayerNorm blocks

.. math::
    A^{(k)}_{ij} &= \mathrm{softmax}_j\Big(\frac{q_i^{(k)} \cdot k_j^{(k)}}{\sqrt{d_k}}
        + w_k^\top p_{ij} + \log m_j\Big) \\
    h &\leftarrow h + W_o\,[A^{(k)} V^{(k)}]_k, \qquad
    h \leftarrow h + \mathrm{FFN}(\mathrm{LN}(h))

(``log m_j`` = key padding mask: padded keys get exactly zero weight). The
output head is ``LN -> Linear(H, 3)``, masked and re-centred.
"""

from __future__ import annotations

import math

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

__all__ = ["BiasedAttentionBlock", "TransformerDenoiser"]


class BiasedAttentionBlock(nn.Module):
    """Pre-LN transformer block with a per-head additive pair bias.

    Args:
        hidden: token width ``H`` (divisible by ``heads``).
        heads: attention heads.
        pair_dim: width ``P`` of the pair features.
        ff_mult: FFN expansion factor.
        dropout: dropout on attention weights and FFN output.
    """

    def __init__(self, hidden: int, heads: int, pair_dim: int, ff_mult: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = hidden // heads
        self.ln_attn = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.pair_bias = nn.Linear(pair_dim, heads, bias=False)
        self.out = nn.Linear(hidden, hidden)
        self.ln_ff = nn.LayerNorm(hidden)
        self.ff = nn.Sequential(
            nn.Linear(hidden, ff_mult * hidden), nn.GELU(), nn.Linear(ff_mult * hidden, hidden),
            nn.Dropout(dropout),
        )
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, pair: Tensor, key_mask: Tensor) -> Tensor:
        """
        Args:
            h: ``(B, N, H)`` tokens.
            pair: ``(B, N, N, P)`` pair features.
            key_mask: ``(B, N)`` bool, True for real atoms.
        Returns:
            ``(B, N, H)``.
        """
        B, N, H = h.shape
        q, k, v = (
            self.qkv(self.ln_attn(h)).view(B, N, 3, self.heads, self.head_dim)
            .permute(2, 0, 3, 1, 4).unbind(0)
        )  # each (B, heads, N, head_dim)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        scores = scores + self.pair_bias(pair).permute(0, 3, 1, 2)  # (B, heads, N, N)
        # Finite fill (not -inf): a batch row with no real atom stays NaN-free.
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = self.attn_drop(torch.softmax(scores, dim=-1))
        o = (attn @ v).transpose(1, 2).reshape(B, N, H)
        h = h + self.out(o)
        return h + self.ff(self.ln_ff(h))


class TransformerDenoiser(DenoiserBase):
    """Non-equivariant transformer denoiser (see module docstring).

    Args:
        num_atom_types: atom-type vocabulary size (default 5: H, C, N, O, F).
        num_bond_types: bond-type vocabulary size (default 5).
        hidden: token width.
        layers: number of attention blocks.
        heads: attention heads (must divide ``hidden``).
        pair_dim: width of the pair features feeding the attention bias.
        edge_dim: bond-embedding width.
        num_rbf: Gaussians in the distance expansion.
        cutoff: largest RBF centre (same length unit as the coordinates).
        learnable_rbf: trainable RBF centres / width.
        ff_mult: FFN expansion factor.
        dropout: dropout rate (0 by default).
        time_freq_dim: width of the sinusoidal time features.

    Forward: ``(B, N, 3), (B,) -> (B, N, 3)``; unknown keyword arguments raise
    ``TypeError`` (keyword-only signature).
    """

    name = "transformer"

    def __init__(
        self,
        num_atom_types: int = 5,
        num_bond_types: int = 5,
        hidden: int = 128,
        layers: int = 6,
        heads: int = 8,
        pair_dim: int = 32,
        edge_dim: int = 32,
        num_rbf: int = 32,
        cutoff: float = 10.0,
        learnable_rbf: bool = False,
        ff_mult: int = 4,
        dropout: float = 0.0,
        time_freq_dim: int = 64,
    ) -> None:
        super().__init__()
        if hidden < 1 or layers < 1 or heads < 1:
            raise ValueError(f"hidden, layers and heads must be >= 1, got {hidden}, {layers}, {heads}")
        if hidden % heads != 0:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.config = dict(
            num_atom_types=num_atom_types, num_bond_types=num_bond_types, hidden=hidden,
            layers=layers, heads=heads, pair_dim=pair_dim, edge_dim=edge_dim, num_rbf=num_rbf,
            cutoff=cutoff, learnable_rbf=learnable_rbf, ff_mult=ff_mult, dropout=dropout,
            time_freq_dim=time_freq_dim,
        )
        self.num_atom_types = int(num_atom_types)
        self.num_bond_types = int(num_bond_types)
        self.coord_in = nn.Linear(3, hidden)
        self.atom_emb = AtomEmbedding(num_atom_types, hidden)
        self.time_emb = TimeEmbedding(hidden, freq_dim=time_freq_dim)
        self.bond_emb = BondEmbedding(num_bond_types, edge_dim)
        self.dist = DistanceExpansion(num_rbf, cutoff, learnable=learnable_rbf)
        self.pair_mlp = nn.Sequential(
            nn.Linear(edge_dim + self.dist.out_dim, pair_dim), nn.SiLU(), nn.Linear(pair_dim, pair_dim)
        )
        self.blocks = nn.ModuleList(
            BiasedAttentionBlock(hidden, heads, pair_dim, ff_mult, dropout) for _ in range(layers)
        )
        self.out_norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 3)

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
        node_w = mask.to(x.dtype)[..., None]
        h = (self.coord_in(x) + self.atom_emb(inp.atom_types)
             + self.time_emb(inp.t)[:, None, :]) * node_w
        _, d = pairwise_geometry(x)
        pair = self.pair_mlp(torch.cat([self.bond_emb(inp.bond_types), self.dist(d)], dim=-1))
        for block in self.blocks:
            h = block(h, pair, mask) * node_w
        return center_masked(self.head(self.out_norm(h)), mask)
