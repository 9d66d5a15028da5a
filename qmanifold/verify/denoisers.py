"""Denoisers with a known answer, for the verification suite.

- :class:`ExactDenoiser`: the target's exact posterior mean ``E[x1 | x_t]`` (the toy targets of
  :mod:`qmanifold.verify.targets` and :mod:`qmanifold.verify.curved_targets` have it in closed form),
  so that any failure of a sampler is the sampler's and not a network's.
- :class:`GarbageVertical`: wraps a denoiser and adds a random vertical (rigid-motion) field to its
  output; the lifted samplers must not notice.

They sit below both :mod:`qmanifold.verify.runner` and :mod:`qmanifold.verify.likelihood_checks`
(which both use them), so that neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn


class ExactDenoiser(nn.Module):
    """The target's exact ``E[x1 | x_t]`` as a denoiser module ``(x_t, t, mask) -> (B, N, d)``."""

    def __init__(self, case, interpolant):
        super().__init__()
        self.case = case
        self.interpolant = interpolant

    def forward(self, x, t, mask=None):
        ahat, beta = self.interpolant.ahat(t), self.interpolant.beta(t)
        out = self.case.target.denoise(self.case.from_group(x), ahat, beta)
        return self.case.to_group(out.to(x.dtype))


class GarbageVertical(nn.Module):
    """Adds a random fundamental field ``sum_a omega_a A_a x_c`` (and a random translation) with
    ``omega ~ N(0, scale^2)`` drawn afresh at every call: the vertical part becomes garbage while
    the horizontal part stays exact."""

    def __init__(self, inner: nn.Module, quotient, scale: float = 3.0, seed: int = 12345):
        super().__init__()
        self.inner = inner
        self.quotient = quotient
        self.scale = scale
        self.seed = seed
        self._generator = None

    def forward(self, x, t, mask=None):
        out = self.inner(x, t, mask=mask)
        if self._generator is None or self._generator.device != x.device:
            self._generator = torch.Generator(device=x.device).manual_seed(self.seed)
        gens = self.quotient.lie.generator_tensor(x.dtype, x.device)
        omega = self.scale * torch.randn(*x.shape[:-2], gens.shape[0], generator=self._generator, dtype=x.dtype, device=x.device)
        xc = self.quotient.center(x, mask)
        field = xc @ torch.einsum("...a,aij->...ij", omega, gens).transpose(-1, -2)
        if self.quotient.translations:
            shift = torch.randn(*x.shape[:-2], 1, x.shape[-1], generator=self._generator, dtype=x.dtype, device=x.device)
            field = field + self.scale * shift
        return out + field
