r"""``QuotientDiffusion``: any torch denoiser, trained and sampled on a quotient space M/G.

Training (``loss``), with ``x_t = ahat_t eps + beta_t x1`` (t = 0 noise, t = 1 data), ``eps`` a
standard Gaussian in the centre-of-mass-free subspace when the group has translations:

* ``"quotient"`` (Xu et al., ICLR 2026): ``w(t) || P_{x_t}( D(x_t, t) - x1 ) ||^2`` (or
  ``|| P_{x_t}(v_theta - v_t) ||^2`` with ``prediction="v"``). Projection at the noisy point, on the
  residual, no alignment: the vertical part of the network output is free and never used.
* ``"conventional"``: ``w(t) || D - x1 ||^2`` (centre-of-mass free).
* ``"geodiff_align"``: ``x1`` is first aligned onto ``x_t`` (Kabsch for SE(3)), GeoDiff-style.
* ``"af3_align"``: ``x1`` is first aligned onto the stop-gradient prediction, AlphaFold3-style.

The three baselines are for comparison; the aligned ones have no consistent sampler (the paper's
point).

Sampling (``sample``): with ``v`` the velocity and ``s`` the score derived from D, and ``eta(t)``

* ``"ode"`` (quotient): ``dx = P_x v dt``; conventional: ``dx = v dt``;
* ``"sde"`` (quotient): ``dx = [P_x(v + eta s) - eta h] dt + sqrt(2 eta) P_x dW``;
  conventional: ``dx = (v + eta s) dt + sqrt(2 eta) dW`` (noise centred when there are translations);
* ``"heun"``: Heun's second-order method on the ODE;
* ``"edm"``: EDM-style stochastic sampler (Karras et al. 2022, Alg. 2): lifted noise injection
  ("churn") then a Heun step.

The sampler geometry defaults to the loss: quotient samplers for ``loss="quotient"``, conventional
samplers for the baselines.

Likelihoods (``log_prob``, ``sample(..., return_log_prob=True)``): the change of variables along the
probability-flow ODE ``dx = u dt`` (``u = P_x v`` on the quotient), with the divergence on M (the
centre-of-mass-free subspace) or on Q, and the orbit volume between them
(``log q_Q(pi x) = log q_M(x) + log vol(G x)``); see :mod:`qmanifold.likelihood` and
docs/diffusion.md, "Likelihoods on Q and on M".
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import sympy
import torch
from torch import nn

from . import likelihood as L
from ._validation import check_finite, check_mask, check_points
from .masking import apply_mask
from .progress import make_progress
from .quotient import Quotient
from .schedules import GeneralInterpolant, HarmonicPrior, Interpolant, check_time, make_interpolant
from .sde import SDE, integrate, tame
from .symbolic import T, as_sympy, lower

__all__ = ["QuotientDiffusion", "LOSSES", "SAMPLERS", "PREDICTIONS"]

LOSSES = ("quotient", "conventional", "geodiff_align", "af3_align")
PREDICTIONS = ("x1", "v")
SAMPLERS = ("ode", "sde", "heun", "edm")


def _defer_finite_checks(device: torch.device) -> bool:
    """Whether sampling on ``device`` checks the denoiser's output on the device and raises once at
    the end (accelerators: no host synchronisation per evaluation) rather than at each call (CPU,
    where the check costs no synchronisation)."""
    return device.type != "cpu"


def _positive_int(value: Any, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (Python or NumPy); ``bool`` is refused
    (``steps=True`` is a mistake, not one step) and so are floats, even integral ones."""
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_mask_rows(mask: torch.Tensor | None) -> None:
    """Raise ValueError if a configuration of ``mask`` ``(B, N)`` has no real point (one host
    synchronisation; the rows are listed only when there is an error)."""
    if mask is not None and not bool(mask.any(-1).all()):
        rows = torch.nonzero(~mask.any(-1)).reshape(-1)[:10].tolist()
        raise ValueError(f"mask has a configuration with no real point (batch row(s) {rows}); every "
                         "configuration needs at least one real point")


class _FiniteMonitor:
    """Records on the device the first denoiser evaluation of a sampling run whose output has a
    non-finite value at a real point, without synchronising; :meth:`check` raises afterwards."""

    def __init__(self, mask: torch.Tensor | None = None):
        self.mask = mask  # (B, N) bool: checked for configurations without a real point in check()
        self.calls = 0
        self.first = None  # 0-d int64 tensor: index of the first bad evaluation, -1 if none
        self.first_t = None
        self.first_count = None

    def observe(self, out: torch.Tensor, t: torch.Tensor) -> None:
        bad_count = (~torch.isfinite(out)).sum()
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.int64, device=out.device)
            self.first_t = torch.zeros((), dtype=t.dtype, device=t.device)
            self.first_count = torch.zeros((), dtype=torch.int64, device=out.device)
        newly = (bad_count > 0) & (self.first < 0)
        self.first = torch.where(newly, self.calls, self.first)
        self.first_t = torch.where(newly, t.reshape(-1)[0], self.first_t)
        self.first_count = torch.where(newly, bad_count, self.first_count)
        self.calls += 1

    def check(self) -> None:
        """Raise ValueError if the mask has a configuration without a real point or an evaluation
        was not finite (one host synchronisation)."""
        _check_mask_rows(self.mask)
        if self.first is None:
            return
        first = int(self.first)
        if first >= 0:
            raise ValueError(
                f"denoiser output contains {int(self.first_count)} non-finite value(s) at real points, first at "
                f"evaluation {first + 1} of {self.calls} (t = {float(self.first_t):.4g}); the samples are invalid. "
                "(On an accelerator the check runs on the device and is reported when sampling ends.)"
            )


def _with_node(times: torch.Tensor, t_max: float) -> torch.Tensor:
    """The increasing host grid ``times`` with ``t_max`` inserted as a node when it lies strictly
    inside its last interval or further in: the flow field is frozen beyond ``t_max`` (a kink in
    time), and a node there keeps a fixed-step Runge-Kutta method at its full order."""
    if not t_max < 1.0 or not float(times[0]) < t_max < float(times[-1]):
        return times
    if bool((times == t_max).any()):
        return times
    return torch.sort(torch.cat([times, times.new_tensor([t_max])])).values


class QuotientDiffusion(nn.Module):
    """A diffusion / flow model on the quotient ``quotient`` around a user denoiser.

    Args:
        quotient: a :class:`~qmanifold.Quotient` (e.g. ``Quotient(groups.SE3)``).
        denoiser: any ``nn.Module`` (or callable) called as ``denoiser(x_t, t, mask=mask, **cond)``
            with ``x_t`` of shape ``(B, N, d)`` and ``t`` of shape ``(B,)``, returning ``(B, N, d)``:
            the clean-data prediction (``prediction="x1"``) or the velocity (``prediction="v"``).
        interpolant: a name (``"linear"``, ``"vp_cosine"``, ``"vp_linear"``, ``"edm"``), an
            :class:`~qmanifold.schedules.Interpolant`, or a
            :class:`~qmanifold.schedules.GeneralInterpolant` with a prior (velocity prediction).
        prediction: ``"x1"`` or ``"v"``.
        loss: one of :data:`LOSSES`.
        augment: apply an exactly Haar random rotation to each ``x1`` in :meth:`loss` (for
            non-equivariant denoisers).
        validate: check the denoiser's output shape and finiteness and the user data (NaN/inf).
            In :meth:`loss` and on a CPU this costs one host synchronisation per check; when
            sampling on an accelerator the finiteness of the outputs is recorded on the device and
            checked once when sampling ends (the error names the first bad evaluation).
    """

    _curved = False  # set per instance in __init__; the class default keeps older pickles working

    def __init__(
        self,
        quotient: Quotient,
        denoiser: Callable,
        interpolant: str | Interpolant | GeneralInterpolant = "linear",
        prediction: str = "x1",
        loss: str = "quotient",
        *,
        augment: bool = False,
        validate: bool = True,
    ):
        super().__init__()
        if not isinstance(quotient, Quotient):
            raise TypeError(f"quotient must be a qmanifold.Quotient, got {type(quotient).__name__}")
        if not callable(denoiser):  # nn.Module instances are callable
            raise TypeError(f"denoiser must be a torch.nn.Module or a callable denoiser(x_t, t, mask=mask, **cond), "
                            f"got {type(denoiser).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
        self._curved = quotient._curved is not None  # a curved total space M: qmanifold.curved_diffusion
        if self._curved:
            from . import curved_diffusion

            interpolant = curved_diffusion.setup(quotient, interpolant, prediction, loss, augment)
        elif isinstance(interpolant, str):
            interpolant = make_interpolant(interpolant)
        if not self._curved and not isinstance(interpolant, (Interpolant, GeneralInterpolant)):
            raise TypeError(f"interpolant must be a name or an Interpolant, got {type(interpolant).__name__}")
        self.general = isinstance(interpolant, GeneralInterpolant)
        if self.general and prediction != "v":
            raise ValueError("a GeneralInterpolant (non-Gaussian prior) is trained with prediction='v'")
        if loss in ("geodiff_align", "af3_align") and prediction != "x1":
            raise ValueError(f"the {loss} baseline is defined for prediction='x1' (alignment of the clean target)")
        if augment and (quotient.lie is None or quotient.lie._haar is None):
            raise ValueError(f"augment=True needs a compact rotation factor with a Haar sampler; {quotient.name} has none")
        self.quotient = quotient
        self.denoiser = denoiser
        self.interpolant = interpolant
        self.prediction = prediction
        self.loss_type = loss
        self.augment = augment
        self.validate = validate
        self._monitor: _FiniteMonitor | None = None  # set while sampling defers its finiteness checks

    # ------------------------------------------------------------------------------------------
    # helpers

    def _reference_tensor(self, cond: dict) -> tuple[torch.dtype, torch.device]:
        if isinstance(self.denoiser, nn.Module):
            for p in self.denoiser.parameters():
                return p.dtype if p.dtype.is_floating_point else torch.get_default_dtype(), p.device
        return torch.get_default_dtype(), torch.device("cpu")

    def _check_data(self, x: torch.Tensor, mask: torch.Tensor | None, name: str = "x1") -> None:
        check_points(x, self.quotient.point_dim, name)
        check_mask(mask, x)
        if x.dim() != 3:
            raise ValueError(f"{name} must have shape (B, N, d), got {tuple(x.shape)}")
        if self.validate:
            check_finite(apply_mask(x, mask), name)
            _check_mask_rows(mask)

    @staticmethod
    def _check_cond(cond: dict, batch: int) -> None:
        for key, value in cond.items():
            if isinstance(value, torch.Tensor) and value.shape[:1] != (batch,):
                got = value.shape[0] if value.dim() else "none (a scalar)"
                raise ValueError(f"conditioning {key!r} has leading dimension {got}, expected the batch size {batch}")

    def _call_denoiser(self, x_t: torch.Tensor, t: torch.Tensor, mask, cond: dict,
                       check_output: bool = True) -> torch.Tensor:
        out = self.denoiser(x_t, t, mask=mask, **cond)
        if not isinstance(out, torch.Tensor) or out.shape != x_t.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the denoiser returned {shape}, expected a tensor of shape {tuple(x_t.shape)} like x_t")
        if self.validate and check_output:
            if self._monitor is not None:
                self._monitor.observe(apply_mask(out, mask), t)
            else:
                check_finite(apply_mask(out, mask), "denoiser output")
        return out

    def _prior_scale(self) -> float:
        r"""Standard deviation ``s0`` of the Gaussian the samplers start from at ``t = 0``.

        The marginal at ``t = 0`` of a Gaussian interpolant is ``ahat(0) eps + beta(0) x1``; the
        samplers draw its Gaussian part ``N(0, ahat(0)^2 I)`` (exact when ``beta(0) = 0``; for EDM,
        ``sigma_max = 80`` dominates the data's scale, as in Karras et al. 2022). ``s0 = 1`` for
        ``linear``, ``1 - 2e-5`` for ``vp_linear``, ``sigma_max`` for ``edm``. A general interpolant
        without a prior starts from ``alpha(0) x0 + gamma(0) eps``: ``s0 = sqrt(alpha(0)^2 +
        gamma(0)^2)``; with a prior, ``x0`` is the prior's draw (``s0`` unused).
        """
        interp, zero = self.interpolant, torch.zeros((), dtype=torch.float64)
        if self.general:
            return math.hypot(float(interp.alpha(zero)), float(interp.gamma(zero)))
        return float(interp.ahat(zero))

    def _noise(self, shape, mask, generator, dtype, device) -> torch.Tensor:
        """Standard Gaussian in the centre-of-mass-free subspace (if translations), padded zeros."""
        z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return self.quotient.center(z, mask) if self.quotient.translations else apply_mask(z, mask)

    def _prepare_x1(self, x1: torch.Tensor, mask, generator) -> torch.Tensor:
        x1 = self.quotient.center(x1, mask)
        if self.augment:
            g = self.quotient.lie.random_element(x1.shape[:-2], generator=generator, dtype=x1.dtype, device=x1.device)
            x1 = apply_mask(x1 @ g.matrix.transpose(-1, -2), mask)
        return x1

    # ------------------------------------------------------------------------------------------
    # training

    def forward(self, x1: torch.Tensor, mask: torch.Tensor | None = None, **cond) -> torch.Tensor:
        """Alias of :meth:`loss` (so that DDP wraps the loss computation)."""
        return self.loss(x1, mask, **cond)

    def loss(
        self,
        x1: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        t: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        check_output: bool = True,
        **cond,
    ) -> torch.Tensor:
        """The training loss on a batch ``x1`` ``(B, N, d)`` (data, Å for molecules).

        Args:
            mask: ``(B, N)`` bool, True on real points.
            t: optional times ``(B,)`` in [0, 1]; default uniform on ``[0, t_max]``.
            generator: for reproducible noise / times / augmentation.
            reduction: ``"mean"`` (a scalar) or ``"none"`` (per sample, ``(B,)``).
            check_output: with ``validate`` on, raise ``ValueError`` when the denoiser's output has
                a non-finite value at a real point (one host synchronisation). ``False`` skips
                this check only (the data are still checked): a non-finite output then gives a
                non-finite loss, for callers that handle it themselves -- the training loop
                (:func:`qmanifold.models.training.train`) skips such updates and stops, with a
                message, when too many diverge.
            **cond: passed to the denoiser (e.g. ``atom_types``, ``bond_types``).

        Per sample: ``w(t) * sum_real |r|^2 / (N_real d)`` with the residual ``r`` of the chosen loss.

        On a curved total space (``Quotient(group, manifold=M)``, ``interpolant="geodesic"``):
        :func:`qmanifold.curved_diffusion.loss` -- ``x_t = exp_{x0}(t log_{x0} x1)``, the residual
        ``P_{x_t}(v_theta - log_{x_t}(x1)/(1-t))`` (or its ``prediction="x1"`` form) in M's metric.
        """
        if self._curved:
            from . import curved_diffusion

            return curved_diffusion.loss(self, x1, mask, t, generator, reduction, check_output, cond)
        self._check_data(x1, mask)
        batch = x1.shape[0]
        self._check_cond(cond, batch)
        dtype, device = x1.dtype, x1.device
        if t is None:
            t = torch.rand(batch, generator=generator, dtype=dtype, device=device) * getattr(self.interpolant, "t_max", 1.0)
        else:
            t = check_time(t).to(dtype=dtype, device=device)
            if t.shape != (batch,):
                raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
        x1 = self._prepare_x1(x1, mask, generator)
        eps = self._noise(x1.shape, mask, generator, dtype, device)
        interp = self.interpolant
        if self.general:
            x0 = interp.sample_prior(cond.get("bond_types"), mask, generator=generator, dtype=dtype) if interp.prior is not None else self._noise(x1.shape, mask, generator, dtype, device)
            x0 = self.quotient.center(x0.to(dtype), mask)
            x_t = apply_mask(interp.sample_xt(x0, x1, t, eps), mask)
            target = interp.target_velocity(x0, x1, eps, t)
        else:
            x_t = apply_mask(interp.sample_xt(x1, t, eps), mask)
            target = x1 if self.prediction == "x1" else interp.target_velocity(x1, eps, t)
        out = self._call_denoiser(x_t, t, mask, cond, check_output=check_output)
        if self.loss_type == "geodiff_align":
            target = self.quotient.align(x1, x_t, mask)
        elif self.loss_type == "af3_align":
            target = self.quotient.align(x1, out.detach(), mask)
        residual = out - target
        if self.loss_type == "quotient":
            residual = self.quotient.horizontal_projection(residual, x_t, mask)
        else:
            residual = self.quotient.center(residual, mask)
        dof = (mask.sum(-1).to(dtype) if mask is not None else torch.full((batch,), x1.shape[-2], dtype=dtype, device=device)) * x1.shape[-1]
        # w(t) converts the x1-residual into a velocity-like loss; a velocity residual is unweighted.
        weight = interp.weight(t).to(dtype) if self.prediction == "x1" and hasattr(interp, "weight") else torch.ones_like(t)
        per_sample = weight * residual.square().sum((-2, -1)) / dof
        if reduction == "mean":
            return per_sample.mean()
        if reduction == "none":
            return per_sample
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'")

    # ------------------------------------------------------------------------------------------
    # sampling

    def velocity(self, x: torch.Tensor, t: torch.Tensor, mask=None, **cond) -> torch.Tensor:
        """The model's marginal velocity ``v(x, t)`` (from D for ``prediction="x1"``)."""
        out = self._call_denoiser(x, t, mask, cond)
        if self.prediction == "v":
            return out
        return self.interpolant.velocity_from_denoiser(x, out, t)

    def velocity_and_score(self, x, t, mask=None, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v, s)`` with ``s = -(x - beta D)/ahat^2`` (Gaussian-prior interpolants only)."""
        out = self._call_denoiser(x, t, mask, cond)
        interp = self.interpolant
        if self.prediction == "v":
            v = out
            d = interp.denoiser_from_velocity(x, v, t)
        else:
            d = out
            v = interp.velocity_from_denoiser(x, d, t)
        return v, interp.score_from_denoiser(x, d, t)

    def _eta(self, eta) -> Callable:
        if eta is None:
            if self.general:
                raise ValueError("the SDE sampler needs a Gaussian-prior interpolant")
            eta = self.interpolant.ahat_expr ** 2
        if callable(eta) and not isinstance(eta, (sympy.Basic, str)):
            return eta
        fn = lower(as_sympy(eta, T, name="eta"), T)
        return fn

    def _time_grid(self, steps: int, grid, dtype, device) -> torch.Tensor:
        if isinstance(grid, torch.Tensor):
            times = grid.to(dtype=dtype, device=device)
            if times.dim() != 1 or times.shape[0] < 2:
                raise ValueError("a custom time grid must be a 1-D tensor with at least two times")
            return times
        if grid == "uniform":
            return torch.linspace(0.0, 1.0, steps + 1, dtype=dtype, device=device)
        if grid == "edm":
            from .schedules import edm_time_grid

            # Karras' rho = 7 spacing of the noise levels, mapped to this interpolant's times; the first
            # time is set to 0 (pure noise, where x0 is drawn), giving `steps` intervals.
            interp = self.interpolant if isinstance(self.interpolant, Interpolant) else None
            times = edm_time_grid(steps + 1, interpolant=interp, dtype=torch.float64).clone()
            times[0] = 0.0
            return times.to(dtype=dtype, device=device)
        raise ValueError(f"unknown time grid {grid!r}; choose 'uniform', 'edm' or pass a tensor")

    @torch.no_grad()
    def sample(
        self,
        shape: tuple[int, int, int] | None = None,
        mask: torch.Tensor | None = None,
        *,
        steps: int = 50,
        sampler: str = "ode",
        eta: Any = None,
        geometry: str | None = None,
        generator: torch.Generator | None = None,
        time_grid: str | torch.Tensor = "uniform",
        churn: float = 0.5,
        return_trajectory: bool = False,
        chunk_size: int | None = None,
        progress: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        curvature_factor: float = 1.0,
        x0: torch.Tensor | None = None,
        return_log_prob: bool = False,
        space: str = "quotient",
        estimator: str = "exact",
        probes: int = 1,
        probe: str = "rademacher",
        method: str | None = None,
        divergence_chunk: int | None = None,
        assume_equivariant: bool = False,
        **cond,
    ):
        """Draw samples ``(B, N, d)`` (and the trajectory ``(steps+1, B, N, d)`` if asked).

        Args:
            shape: ``(B, N, d)``; or give ``mask`` ``(B, N)`` for variable sizes.
            steps: number of time steps, a positive ``int`` (not a bool); denoiser evaluations:
                ``steps`` for ode/sde, about ``2 steps`` for heun/edm.
            sampler: ``"ode"``, ``"sde"``, ``"heun"`` or ``"edm"``.
            eta: SDE noise level: a number, a sympy expression / string in t, or a callable of the
                time tensor; default ``ahat(t)^2``.
            geometry: ``"quotient"`` or ``"conventional"``; default from the loss.
            generator: a ``torch.Generator`` (same seed, same samples).
            time_grid: ``"uniform"``, ``"edm"`` (rho = 7) or a 1-D tensor of times from 0 to 1.
            churn: EDM noise injection per step, as a fraction of the step (``sampler="edm"``).
            chunk_size: sample at most this many configurations at a time (memory); a positive int.
            progress: show a progress bar.
            curvature_factor: 1 (correct). 0 / -1 give the known-wrong variants (negative controls).
            x0: optional initial noise ``(B, N, d)``.
            return_log_prob: also return the model's log-density ``(B,)`` at each sample, by the
                change of variables along the probability-flow ODE integrated jointly with its
                divergence (see :meth:`log_prob`; deterministic samplers ``"ode"``/``"heun"``
                only; ``x0`` is centred). Returns ``(x, log_q)``, or ``(x, trajectory, log_q)``.
            space, estimator, probes, probe, divergence_chunk, assume_equivariant: as in
                :meth:`log_prob` (only with ``return_log_prob``; Hutchinson probes are drawn from
                ``generator`` after the initial noise).
            method: the scheme of the joint integration: default the sampler's own (``"euler"``
                for ``"ode"``, ``"heun"`` for ``"heun"``: the samples follow the same steps as
                without log-densities; the log-density error is then O(dt) / O(dt^2)), or
                ``"rk4"`` / ``"dopri5"`` (the samples are then that solver's).
            **cond: conditioning tensors with leading batch dimension B, passed to the denoiser.

        On a curved total space (``Quotient(group, manifold=M)``): :func:`qmanifold.curved_diffusion.sample`,
        samplers ``"ode"``, ``"heun"`` and ``"sde"`` by geodesic steps on M (every state is a point of M),
        ``x0`` from the prior on M; ``sampler="sde"`` needs ``score=callable(x, t, mask=None)``, the score
        ``grad_M log p_t`` (the geodesic interpolant's velocity does not determine it), and runs
        ``dx = [P_x(v + eta s) - c eta h] dt + sqrt(2 eta) P_x dW`` (default ``eta = (1 - t)^2``).
        """
        if self._curved:
            if return_log_prob:
                raise NotImplementedError("return_log_prob=True is not available on a curved total space yet (issue 15)")
            from . import curved_diffusion

            return curved_diffusion.sample(
                self, shape, mask, steps=steps, sampler=sampler, eta=eta, geometry=geometry, generator=generator,
                time_grid=time_grid, return_trajectory=return_trajectory, chunk_size=chunk_size, progress=progress,
                dtype=dtype, device=device, curvature_factor=curvature_factor, x0=x0, cond=cond)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        geometry = geometry or ("quotient" if self.loss_type == "quotient" else "conventional")
        if geometry not in ("quotient", "conventional"):
            raise ValueError(f"unknown geometry {geometry!r}; choose 'quotient' or 'conventional'")
        steps = _positive_int(steps, "steps")
        if chunk_size is not None:
            chunk_size = _positive_int(chunk_size, "chunk_size")
        if return_log_prob:
            if sampler not in ("ode", "heun"):
                raise ValueError(f"return_log_prob=True needs the deterministic probability-flow ODE (sampler='ode' or "
                                 f"'heun'); sampler={sampler!r} is stochastic and has no change-of-variables density")
            method = method or ("euler" if sampler == "ode" else "heun")
            self._check_log_prob_options(space, estimator, "M", method, probe, geometry, probes)
        ref_dtype, ref_device = self._reference_tensor(cond)
        dtype = dtype or ref_dtype
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"mask must be a (B, N) bool tensor, got {got}")
            device = device or mask.device
            if shape is None and self.quotient.point_dim is None:
                raise ValueError(f"{self.quotient.name} acts on points of any dimension: give shape=(B, N, d)")
            shape = shape or (mask.shape[0], mask.shape[1], self.quotient.point_dim)
            if tuple(shape[:2]) != tuple(mask.shape):
                raise ValueError(f"shape {tuple(shape)} does not match mask shape {tuple(mask.shape)}")
        if x0 is not None:
            shape = tuple(x0.shape)
        if shape is None:
            raise ValueError("give shape=(B, N, d) or a mask (B, N)")
        device = torch.device(device or ref_device)
        point_dim = self.quotient.point_dim
        if len(shape) != 3 or (point_dim is not None and shape[-1] != point_dim):
            raise ValueError(f"shape must be (B, N, {point_dim or 'd'}), got {tuple(shape)}")
        batch = shape[0]
        self._check_cond(cond, batch)
        if self.general and sampler in ("sde", "edm"):
            raise ValueError(f"sampler={sampler!r} needs a Gaussian-prior interpolant (score from D); with a GeneralInterpolant use 'ode' or 'heun'")
        # as in loss(), every configuration of the mask needs a real point: checked here on a CPU and
        # on the chunked path (which synchronises per chunk anyway), else with the deferred checks
        defer = self.validate and _defer_finite_checks(device)
        chunked = chunk_size is not None and batch > chunk_size
        if self.validate and (chunked or not defer):
            _check_mask_rows(mask)
        if chunked:
            pieces, trajs, logps = [], [], []
            for start in range(0, batch, chunk_size):
                sl = slice(start, min(batch, start + chunk_size))
                sub_cond = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
                out = self.sample(
                    (sl.stop - sl.start, *shape[1:]),
                    mask[sl] if mask is not None else None,
                    steps=steps, sampler=sampler, eta=eta, geometry=geometry, generator=generator,
                    time_grid=time_grid, churn=churn, return_trajectory=return_trajectory, chunk_size=None,
                    progress=progress, dtype=dtype, device=device, curvature_factor=curvature_factor,
                    x0=x0[sl] if x0 is not None else None, return_log_prob=return_log_prob, space=space,
                    estimator=estimator, probes=probes, probe=probe, method=method,
                    divergence_chunk=divergence_chunk, assume_equivariant=assume_equivariant, **sub_cond,
                )
                if return_log_prob:
                    *out, lp = out
                    logps.append(lp)
                    out = tuple(out) if return_trajectory else out[0]
                if return_trajectory:
                    pieces.append(out[0])
                    trajs.append(out[1])
                else:
                    pieces.append(out)
            result = torch.cat(pieces)
            result = (result, torch.cat(trajs, 1)) if return_trajectory else result
            if return_log_prob:
                return (*result, torch.cat(logps)) if return_trajectory else (result, torch.cat(logps))
            return result

        if x0 is None:
            if self.general and self.interpolant.prior is not None:
                x0 = self.interpolant.sample_prior(cond.get("bond_types"), mask, generator=generator, dtype=dtype)
                x0 = self.quotient.center(x0.to(device), mask)
            else:
                x0 = self._prior_scale() * self._noise(tuple(shape), mask, generator, dtype, device)
        else:
            self._check_data(x0, mask, "x0")
        # the grid is built (or copied once) on the host: the Heun sampler branches on its values,
        # and nothing in the sampling loop then synchronises with the device
        times_host = self._time_grid(steps, time_grid, dtype, torch.device("cpu"))
        times = times_host.to(device)
        bar = make_progress(times.shape[0] - 1, progress, f"sampling ({sampler}, {geometry})")
        callback = (lambda i, t, x: bar.update(1)) if bar is not None else None
        monitor = _FiniteMonitor(mask) if defer else None
        outer_monitor, self._monitor = self._monitor, monitor
        try:
            if return_log_prob:
                result = self._sample_log_prob(
                    x0, times_host, mask, method, geometry, space, estimator, probes, probe, divergence_chunk,
                    assume_equivariant, generator, return_trajectory, callback, cond,
                )
            elif sampler in ("ode", "sde"):
                result = self._sample_em(x0, times, mask, sampler, eta, geometry, generator, return_trajectory, callback, curvature_factor, cond)
            else:
                result = self._sample_heun(x0, times_host, mask, sampler, churn, geometry, generator,
                                           return_trajectory, callback, curvature_factor, cond)
        finally:
            self._monitor = outer_monitor
            if bar is not None:
                bar.close()
        if monitor is not None:
            monitor.check()
        return result

    def _projected(self, sde: SDE, geometry: str, curvature_factor: float):
        if geometry == "quotient":
            return self.quotient.lift(sde, curvature_factor=curvature_factor)
        return self.quotient.conventional(sde)

    def _em_sde(self, sampler: str, eta, cond: dict) -> SDE:
        """The SDE that :meth:`sample` integrates with Euler(-Maruyama) for ``sampler`` ``"ode"``
        (the probability-flow ODE ``dx = v dt``) or ``"sde"`` (``dx = [v + eta s] dt + sqrt(2 eta) dW``),
        before its lift."""
        if sampler == "ode":
            return SDE(drift=lambda x, t, mask=None: self.velocity(x, t, mask, **cond), diffusion=0)
        eta_of_t = self._eta(eta)
        last = {}

        def eta_fn(t):  # a step's drift and diffusion get the same t: evaluate eta(t) once
            if last.get("t") is not t:
                last["t"], last["eta"] = t, eta_of_t(t)
            return last["eta"]

        def drift(x, t, mask=None):
            v, s = self.velocity_and_score(x, t, mask, **cond)
            return v + eta_fn(t).to(x.dtype).reshape(-1, 1, 1) * s

        return SDE(drift=drift, diffusion=lambda t: torch.sqrt(2.0 * eta_fn(t)))

    def _sample_em(self, x0, times, mask, sampler, eta, geometry, generator, trajectory, callback, curvature_factor, cond):
        return integrate(
            self._projected(self._em_sde(sampler, eta, cond), geometry, curvature_factor), x0, times=times,
            mask=mask, generator=generator, return_trajectory=trajectory, callback=callback,
        )

    def _sample_heun(self, x0, times_host, mask, sampler, churn, geometry, generator, trajectory, callback,
                     curvature_factor, cond):
        """Heun (second order) on the (lifted) probability-flow ODE, with EDM churn for ``"edm"``.

        The churn step moves from t back to an earlier (noisier) time t_hat with the same
        marginal: ``y = (beta(t_hat)/beta(t)) x`` then a lifted Brownian increment of variance
        ``ahat(t_hat)^2 - (beta(t_hat) ahat(t) / beta(t))^2``:
        ``y + s P_y(z) - c (s^2/2) h(y)`` (quotient; the curvature increment tamed to norm <= s, see
        :func:`qmanifold.sde.tame`) or ``y + s z`` (conventional).
        The corrector is skipped on a final step that reaches ``t > t_max`` (ahat = 0 there).
        """
        interp = self.interpolant
        q = self.quotient
        project = (lambda v, x: q.horizontal_projection(v, x, mask)) if geometry == "quotient" else (lambda v, x: q.center(v, mask))
        batch_shape = x0.shape[:-2]
        x = x0
        traj = [x] if trajectory else None
        t_max = getattr(interp, "t_max", 1.0)
        times = times_host.to(x0.device)
        t_list = times_host.tolist()  # the grid's values, read on the host: branching on them costs no sync
        for i in range(len(t_list) - 1):
            t_cur, t_next = times[i], times[i + 1]
            if sampler == "edm" and churn > 0 and 0 < i < len(t_list) - 2:
                t_hat = (t_cur - churn * (t_next - t_cur)).clamp_min(0.0)
                ratio = interp.beta(t_hat) / interp.beta(t_cur).clamp_min(torch.finfo(x.dtype).tiny)
                var = (interp.ahat(t_hat).square() - (ratio * interp.ahat(t_cur)).square()).clamp_min(0.0)
                s = var.sqrt()
                y = ratio * x
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                y = y + s * project(z, y)
                if geometry == "quotient":
                    y = y + tame(-curvature_factor * 0.5 * var * q.mean_curvature(y, mask), s)
                x, t_cur = apply_mask(y, mask), t_hat
            dt = t_next - t_cur
            d_cur = project(self.velocity(x, t_cur.expand(batch_shape), mask, **cond), x)
            x_next = x + dt * d_cur
            if t_list[i + 1] <= t_max:
                d_next = project(self.velocity(x_next, t_next.expand(batch_shape), mask, **cond), x_next)
                x_next = x + 0.5 * dt * (d_cur + d_next)
            x = apply_mask(x_next, mask)
            if traj is not None:
                traj.append(x)
            if callback is not None:
                callback(i, t_next, x)
        return (x, torch.stack(traj)) if traj is not None else x

    # ------------------------------------------------------------------------------------------
    # likelihoods

    def _check_log_prob_options(self, space, estimator, route, method, probe, geometry, probes) -> None:
        for value, name, allowed in ((space, "space", L.SPACES), (estimator, "estimator", L.ESTIMATORS),
                                     (route, "route", L.ROUTES), (method, "method", L.METHODS),
                                     (probe, "probe", L.PROBES)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; choose one of {allowed}")
        if geometry not in (None, "quotient", "conventional"):
            raise ValueError(f"unknown geometry {geometry!r}; choose 'quotient' or 'conventional'")
        _positive_int(probes, "probes")
        prior = getattr(self.interpolant, "prior", None) if self.general else None
        if prior is not None and not isinstance(prior, HarmonicPrior) and not hasattr(prior, "log_prob"):
            raise ValueError(f"log-densities need the prior's log-density: {type(prior).__name__} has no "
                             "log_prob(x, bond_types, mask) method (HarmonicPrior is supported)")
        if isinstance(prior, HarmonicPrior) and not self.quotient.translations:
            raise ValueError("the harmonic prior lives on the centre-of-mass-free subspace, but "
                             f"{self.quotient.name} has no translations: its density on M is not defined")

    def _flow_field(self, geometry: str) -> Callable:
        """The ODE field ``u(x, t) = P_x v(x, t)`` (quotient) or ``Pi v`` (conventional) with the
        time clamped to ``t_max`` (denoiser and coefficients): on ``(t_max, 1]`` the velocity is
        the 0/0 limit of ``(x - beta D)/ahat``, so the field is frozen there."""
        t_max = getattr(self.interpolant, "t_max", 1.0)
        q = self.quotient

        def field(x, t, mask=None, **cond):
            te = t.clamp(max=t_max) if t_max < 1.0 else t
            v = self.velocity(x, te, mask, **cond)
            return q.horizontal_projection(v, x, mask) if geometry == "quotient" else q.center(v, mask)

        return field

    def _prior_log_density(self, x0: torch.Tensor, mask, cond: dict) -> torch.Tensor:
        """Log-density on M of the sampler's starting distribution at ``x0``: ``(B,)``."""
        prior = getattr(self.interpolant, "prior", None) if self.general else None
        if prior is None:
            return L.gaussian_log_density(x0, mask, self.quotient.translations, scale=self._prior_scale())
        if isinstance(prior, HarmonicPrior):
            return L.harmonic_log_density(prior, x0, cond.get("bond_types"), mask)
        return prior.log_prob(x0, cond.get("bond_types"), mask)

    def _check_equivariance(self, field, x, mask, cond) -> None:
        """Raise ValueError unless ``field`` is equivariant under the group's rotation-like factor at
        ``x`` (one Haar element per configuration, at t = 1/2 and t = 1; relative error at most
        1e-6 in float64, 1e-3 otherwise). Conditioning is assumed invariant."""
        lie = self.quotient.lie
        if lie is None or not lie.generators:
            return
        batch = x.shape[0]
        try:
            rot = lie.random_element((batch,), generator=torch.Generator().manual_seed(20240614),
                                     dtype=torch.float64, device="cpu").matrix.to(dtype=x.dtype, device=x.device)
        except NotImplementedError:
            raise ValueError(f"cannot check that the field is {lie.name}-equivariant (no Haar sampler for this group); "
                             "pass assume_equivariant=True if it is, or use space='total' with route='M'") from None
        tol = 1e-6 if x.dtype == torch.float64 else 1e-3
        for tv in (0.5, 1.0):
            t = torch.full((batch,), tv, dtype=x.dtype, device=x.device)
            err = float(L.equivariance_error(field, x, t, rot, mask, cond).max())
            if not err <= tol:
                raise ValueError(
                    f"the probability-flow field is not {lie.name}-equivariant at these configurations (relative "
                    f"error {err:.2e} > {tol:.0e} at t = {tv}): its density on Q is not defined by the lifted ODE "
                    "alone (the density on M is not invariant). space='total' with route='M' (the density on M "
                    "of the ODE's output) is defined for any field; pass assume_equivariant=True to accept the error")

    def _log_prob_rhs(self, field, route, geometry, probes_t, mask, cond, divergence_chunk, curvature_factor):
        """``rhs(x, t) -> (u, div)`` for :func:`qmanifold.likelihood.integrate_log_density`."""
        q = self.quotient

        def rhs(x, t):
            tb = t.expand(x.shape[0])
            project = L.horizontal_projector(q, x, mask) if route == "Q" else L.centring_projector(q, mask)
            u, div = L.divergence(field, x, tb, project, mask=mask, cond=cond, probes=probes_t,
                                  chunk_size=divergence_chunk)
            if route == "Q_curvature":  # div_Q = div_M + <u, h>
                div = div + curvature_factor * (u * q.mean_curvature(x, mask)).sum((-2, -1))
            return u, div

        return rhs

    def log_prob(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        space: str = "quotient",
        estimator: str = "exact",
        steps: int = 100,
        probes: int = 1,
        probe: str = "rademacher",
        method: str = "rk4",
        rtol: float = 1e-6,
        atol: float = 1e-6,
        time_grid: str | torch.Tensor = "uniform",
        route: str = "M",
        geometry: str | None = None,
        curvature_factor: float = 1.0,
        assume_equivariant: bool = False,
        generator: torch.Generator | None = None,
        chunk_size: int | None = None,
        divergence_chunk: int | None = None,
        progress: bool = False,
        return_details: bool = False,
        **cond,
    ):
        r"""Log-density of the model's samples at ``x`` ``(B, N, d)``: ``(B,)``.

        The probability-flow ODE ``dx/dt = u(x, t)`` of the sampler (``u = P_x v`` for the
        quotient geometry, the centred ``v`` for the conventional one) is integrated from the data
        (t = 1) back to the prior (t = 0) together with ``dl/dt = div u``; then
        ``log q_M(x) = log p_0(x_0) + l(0)`` with ``p_0`` the sampler's prior (the standard Gaussian
        on M, or the interpolant's harmonic prior). On the quotient,
        ``log q_Q(pi x) = log q_M(x) + log vol(G x)`` (:func:`qmanifold.likelihood.log_orbit_volume`).
        Conventions and derivation: docs/diffusion.md, "Likelihoods on Q and on M".

        Args:
            x: configurations; centred first when the group has translations (the density lives on
                the centre-of-mass-free subspace M, of dimension ``(N_real - 1) d``).
            mask: ``(B, N)`` bool, True on real points.
            space: ``"quotient"`` (density on Q w.r.t. its Riemannian volume) or ``"total"``
                (density on M w.r.t. Lebesgue measure; what reweighting against ``exp(-U/kT)``
                needs).
            estimator: ``"exact"`` (``N d`` VJPs per evaluation, batched) or ``"hutchinson"``
                (``probes`` random probes per configuration, fixed along the path; unbiased).
            steps: steps of the fixed-step methods; the initial step ``1/steps`` of ``"dopri5"``.
            probe: ``"rademacher"`` or ``"gaussian"`` (Hutchinson).
            method: ``"rk4"`` (default), ``"heun"``, ``"euler"`` or ``"dopri5"`` (adaptive, with
                ``rtol``/``atol`` on ``(x, l)``).
            time_grid: ``"uniform"``, ``"edm"`` or a tensor of times from 0 to 1 (as in :meth:`sample`).
            route: ``"M"`` (integrate ``div_M u``, then add ``log vol(G x)``), ``"Q"`` (integrate
                ``div_Q`` as the trace over the horizontal space, from the prior's density on Q,
                ``log p_0(x_0) + log vol(G x_0)``) or ``"Q_curvature"`` (``div_Q = div_M u + <u, h>``).
                The three agree for an equivariant field (a test).
            geometry: ``"quotient"`` or ``"conventional"`` (default from the loss, as in
                :meth:`sample`); the routes through Q need ``"quotient"``.
            curvature_factor: 1 (correct). 0 drops every orbit-volume / curvature term (negative
                control: the density on Q is then wrong by ``log vol``).
            assume_equivariant: skip the equivariance check. Without it, ``space="quotient"`` and
                the routes through Q first check that the field is equivariant at ``x`` (at t = 1/2
                and 1, one Haar rotation per configuration) and raise ``ValueError`` if not: a
                non-equivariant field has a well-defined density on M (``space="total"``,
                ``route="M"``) but its density on Q is not ``q_M vol``.
            generator: for the Hutchinson probes.
            chunk_size: at most this many configurations per solve (memory).
            divergence_chunk: at most this many directions (basis vectors or probes) per denoiser
                call; the denoiser sees batches of ``B * divergence_chunk`` (memory).
            progress: show a progress bar.
            return_details: return a dict with ``log_prob``, ``log_prob_total``,
                ``log_prob_quotient``, ``log_prior``, ``divergence_integral`` (``int_0^1 div dt``
                of the route), ``log_orbit_volume`` (at x), ``prior_point`` ``x_0`` and ``nfev``.
            **cond: conditioning tensors with leading batch dimension B, passed to the denoiser.

        The denoiser must treat the configurations of a batch independently (the exact trace
        replicates the batch); it is called with gradients enabled.
        """
        if self._curved:
            raise NotImplementedError("log_prob is not available on a curved total space yet (issue 15): the divergence "
                                      "on M and the orbit volumes of qmanifold.likelihood are written for flat M")
        geometry = geometry or ("quotient" if self.loss_type == "quotient" else "conventional")
        self._check_log_prob_options(space, estimator, route, method, probe, geometry, probes)
        if route != "M" and geometry != "quotient":
            raise ValueError(f"route={route!r} integrates the divergence on Q of a horizontal field: it needs "
                             "geometry='quotient'")
        steps = _positive_int(steps, "steps")
        if chunk_size is not None:
            chunk_size = _positive_int(chunk_size, "chunk_size")
        if divergence_chunk is not None:
            divergence_chunk = _positive_int(divergence_chunk, "divergence_chunk")
        self._check_data(x, mask, "x")
        batch = x.shape[0]
        self._check_cond(cond, batch)
        options = dict(space=space, estimator=estimator, steps=steps, probes=probes, probe=probe, method=method,
                       rtol=rtol, atol=atol, time_grid=time_grid, route=route, geometry=geometry,
                       curvature_factor=curvature_factor, assume_equivariant=assume_equivariant,
                       generator=generator, divergence_chunk=divergence_chunk, progress=progress,
                       return_details=return_details)
        if chunk_size is not None and batch > chunk_size:
            parts = []
            for start in range(0, batch, chunk_size):
                sl = slice(start, min(batch, start + chunk_size))
                sub_cond = {k: (v[sl] if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}
                parts.append(self.log_prob(x[sl], mask[sl] if mask is not None else None, chunk_size=None,
                                           **options, **sub_cond))
            if not return_details:
                return torch.cat(parts)
            return {k: (torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor) else sum(p[k] for p in parts))
                    for k in parts[0]}

        x = self.quotient.center(x, mask)
        field = self._flow_field(geometry)
        needs_equivariance = space == "quotient" or route != "M"
        if needs_equivariance and not assume_equivariant:
            self._check_equivariance(field, x, mask, cond)
        times = self._time_grid(steps, time_grid, x.dtype, torch.device("cpu"))
        if isinstance(time_grid, torch.Tensor) and not (float(times[0]) == 0.0 and float(times[-1]) == 1.0
                                                        and bool((times.diff() > 0).all())):
            raise ValueError("log_prob needs an increasing time grid from 0 (prior) to 1 (data)")
        if float(times[-1]) < 1.0:  # the "edm" grid ends at sigma_min: finish at t = 1
            times = torch.cat([times, times.new_ones(1)])
        times = _with_node(times, getattr(self.interpolant, "t_max", 1.0)).flip(0).to(x.device)
        probes_t = L.probe_directions(x, probes, probe, mask=mask, generator=generator) if estimator == "hutchinson" else None
        rhs = self._log_prob_rhs(field, route, geometry, probes_t, mask, cond, divergence_chunk, curvature_factor)
        bar = make_progress(times.shape[0] - 1, progress, f"log_prob ({method}, {estimator})")
        callback = (lambda i, t, y: bar.update(1)) if bar is not None else None
        try:
            x0, ell, nfev = L.integrate_log_density(rhs, x, times, method=method, mask=mask, rtol=rtol, atol=atol,
                                                    callback=callback)
        finally:
            if bar is not None:
                bar.close()
        return self._assemble_log_prob(x, x0, ell, mask, cond, space, route, curvature_factor, nfev, return_details)

    def _assemble_log_prob(self, x1, x0, ell, mask, cond, space, route, c, nfev, details):
        """Combine ``l = -int_0^1 div dt`` (the route's divergence), the prior at ``x0`` and the
        orbit volumes into the densities on M and on Q at ``x1``."""
        log_prior = self._prior_log_density(x0, mask, cond)
        lv1 = L.log_orbit_volume(self.quotient, x1, mask) if (space == "quotient" or route != "M" or details) else None
        if route == "M":
            log_total = log_prior + ell
            log_quotient = log_total + c * lv1 if lv1 is not None else None
        else:
            log_quotient = log_prior + c * L.log_orbit_volume(self.quotient, x0, mask) + ell
            log_total = log_quotient - c * lv1
        value = log_quotient if space == "quotient" else log_total
        if not details:
            return value
        return {"log_prob": value, "log_prob_total": log_total, "log_prob_quotient": log_quotient,
                "log_prior": log_prior, "divergence_integral": -ell, "log_orbit_volume": lv1, "prior_point": x0,
                "nfev": nfev}

    def _sample_log_prob(self, x0, times_host, mask, method, geometry, space, estimator, probes, probe,
                         divergence_chunk, assume_equivariant, generator, trajectory, callback, cond):
        """Integrate the probability-flow ODE forward from ``x0`` jointly with ``dl/dt = div_M u``:
        ``log q_M(x_1) = log p_0(x_0) - l(1)`` (route through M)."""
        x0 = self.quotient.center(x0, mask)
        field = self._flow_field(geometry)
        if space == "quotient" and not assume_equivariant:
            self._check_equivariance(field, x0, mask, cond)
        probes_t = L.probe_directions(x0, probes, probe, mask=mask, generator=generator) if estimator == "hutchinson" else None
        rhs = self._log_prob_rhs(field, "M", geometry, probes_t, mask, cond, divergence_chunk, 1.0)
        traj = [x0] if trajectory else None

        def on_step(i, t, x):
            if traj is not None:
                traj.append(x)
            if callback is not None:
                callback(i, t, x)

        t_max = getattr(self.interpolant, "t_max", 1.0)
        if method == "rk4":
            times_host = _with_node(times_host, t_max)
        x1, ell, nfev = L.integrate_log_density(rhs, x0, times_host.to(x0.device), method=method, mask=mask,
                                                skip_corrector_after=t_max, callback=on_step)
        log_q = self._assemble_log_prob(x1, x0, -ell, mask, cond, space, "M", 1.0, nfev, False)
        return (x1, torch.stack(traj), log_q) if traj is not None else (x1, log_q)
