r"""Training molecular denoisers with :class:`qmanifold.QuotientDiffusion`: loop, checkpoints, DDP.

Quick start (Python)::

    from qmanifold.models.training import TrainConfig, train
    summary = train(TrainConfig(data="qm9-extract", model="egnn", loss="quotient",
                                steps=500, out="runs/demo", hidden=64, layers=4))

or from the shell: ``qmanifold train --data qm9-extract --steps 500 --out runs/demo``.

What a run writes into ``out/`` (only rank 0 writes):

* ``last.pt`` -- the newest checkpoint, rewritten every ``ckpt_every`` steps and at the end of every
  invocation (also after SIGINT / SIGTERM); always a complete file (temporary file in the same
  directory, then :func:`os.replace`);
* ``best.pt`` -- the checkpoint with the lowest validation loss so far;
* ``log.jsonl`` -- one JSON object per line: ``{"kind": "train", "step", "epoch", "loss", "lr",
  "grad_norm", "time"}`` every ``log_every`` steps and ``{"kind": "val", "step", "val_loss",
  "val_quotient", "val_conventional", "time"}`` at each validation (``time`` = seconds since the
  run first started, summed over resumed invocations);
* ``config.json`` -- the resolved configuration; ``summary.json`` -- written at the end.

Reproducibility. Given the seed, everything the loop consumes is a function of stored state: the
model initialisation (``torch.manual_seed(seed)``), the batch order (size-bucketed batches, a
function of ``(seed, epoch)``), the noise / times / augmentations of the loss (a dedicated
``torch.Generator`` per rank, seeded ``seed * 1000 + 17 + rank``) and the optimizer / EMA. A
checkpoint stores the step, the position in the epoch, the generator states of all ranks, the
optimizer and the EMA, so ``--resume`` continues with the very same losses as an uninterrupted run
(tested, on CPU). The learning-rate schedule is a pure function of the step and ``steps``.

Non-finite losses. The loss is computed with ``check_output=False``
(:meth:`qmanifold.QuotientDiffusion.loss`), so a denoiser output with NaN/inf (a diverging run) gives
a non-finite loss instead of an exception. Such an update (non-finite loss or gradient norm) is
skipped -- no optimizer or EMA step, a warning naming the step, ``"skipped": true`` in the log -- and
after :data:`MAX_SKIPPED_UPDATES` of them training stops with :class:`TrainingDivergedError`, whose
message names the step and suggests a lower learning rate. ``last.pt`` is then rewritten with the
weights of the last finite update (skipped updates never touch the weights); a checkpoint whose
weights are not all finite is never written. Validation uses the same flag: a diverged model gets
a NaN validation loss (``null`` in the JSON files), never an exception. Direct calls of ``loss``
outside training keep the check. JSON files (``log.jsonl``, ``summary.json``) are strict: NaN and
inf are written as ``null`` (:func:`qmanifold.atomic.strict_json_value`).

Validation is comparable across runs: a fixed subset of the validation split (``val_limit``
molecules chosen with a fixed seed), a fixed batch size, times ``t_k = frac(k * 0.618...) *
t_max`` for molecule ``k`` and noise from a generator with a fixed seed. Three numbers are
reported: the run's own objective (``val_loss``, selects ``best.pt``), and the quotient and
conventional losses of the same predictions (``val_quotient``, ``val_conventional``) which do not
depend on the training objective and so compare runs trained with different losses. With EMA on,
validation uses the EMA weights (the ones sampling uses).

Data parallel. Under ``torchrun`` (environment ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``) the
loop initialises ``torch.distributed`` (``gloo`` on CPU, ``nccl`` on CUDA), wraps the diffusion
module in :class:`~torch.nn.parallel.DistributedDataParallel` and gives each rank every
``world_size``-th batch of each epoch's bucketed batch list (truncated to a multiple of
``world_size``, like ``DistributedSampler(drop_last=True)``). ``batch_size`` is per process. Only
rank 0 validates, logs and writes files; at the end the ranks compare their weights
(``summary["ranks_agree"]``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from qmanifold.atomic import atomic_open, atomic_write_json, atomic_write_text, strict_json_value
from qmanifold.errors import InputError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "TrainingDivergedError",
    "MAX_SKIPPED_UPDATES",
    "TrainConfig",
    "DistInfo",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "build_diffusion",
    "diffusion_from_checkpoint",
    "load_molecules",
    "dataset_split",
    "select_rows",
    "epoch_batches",
    "learning_rate",
    "validation_times",
    "validation_losses",
    "init_distributed",
    "resolve_device",
    "read_log",
    "export_checkpoint",
]

#: Value of the ``"format"`` key of every qmanifold checkpoint.
CHECKPOINT_FORMAT = "qmanifold-checkpoint"
#: Bump when the checkpoint layout changes incompatibly.
CHECKPOINT_VERSION = 1
#: Seed of the validation noise (fixed, so that validation losses compare across runs).
VAL_SEED = 20260421
#: Batch size used for validation (fixed for the same reason).
VAL_BATCH = 64
_GOLDEN = 0.6180339887498949
_REQUIRED_KEYS = ("format", "version", "model", "diffusion", "data", "step", "config")
#: Configuration fields that may change when resuming.
RESUMABLE_OVERRIDES = ("steps", "stop_after", "device", "val_every", "ckpt_every", "log_every",
                       "progress", "threads", "resume", "out")


#: Training stops (:class:`TrainingDivergedError`) once this many updates were skipped because
#: their loss or gradient was not finite.
MAX_SKIPPED_UPDATES = 20


class CheckpointError(ValueError):
    """A file is not a (readable, compatible) qmanifold checkpoint."""


class TrainingDivergedError(InputError, FloatingPointError):
    """Training stopped because :data:`MAX_SKIPPED_UPDATES` updates had a non-finite loss or
    gradient (typically a learning rate that is too high). ``last.pt`` holds the last finite state.

    An :class:`~qmanifold.errors.InputError` (the command line prints ``error: <message>`` and
    exits with status 2) and, as before, a ``FloatingPointError``.
    """


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI's ``train`` options map 1:1 onto this).

    Data: ``data`` (``"qm9"``, ``"qm9-extract"``, an ``.npz`` or ``.sdf`` path), ``heavy_atoms_only``,
    ``max_atoms`` (drop larger molecules), ``train_limit`` (a fixed random subset of the train
    split, the same for every seed), ``val_limit`` (validation molecules).

    Model: ``model`` (registry name), ``hidden`` / ``layers`` / ``heads`` (None: the network's
    default), ``model_kwargs`` (any other constructor argument).

    Objective: ``loss`` (quotient | conventional | geodiff_align | af3_align), ``interpolant``,
    ``prediction`` (x1 | v), ``augment`` (None: on for non-equivariant networks, i.e. the
    transformer).

    Optimisation: ``steps``, ``batch_size`` (per process), ``lr``, ``weight_decay`` (AdamW),
    ``warmup`` (linear warm-up steps), ``schedule`` (cosine to ``min_lr_ratio * lr`` over ``steps``,
    or constant), ``grad_clip`` (max global gradient norm, 0 = off), ``ema`` (EMA decay, 0 = off).

    Run control: ``out`` (directory), ``seed``, ``device`` (auto | cpu | cuda | cuda:K), ``dtype``
    (float32 | float64), ``val_every`` / ``ckpt_every`` / ``log_every`` (steps), ``stop_after``
    (stop this invocation at that step, keeping the schedule of ``steps``: for time-sliced jobs),
    ``resume``, ``threads`` (CPU threads), ``progress`` (tqdm bar), ``init_from`` (a checkpoint
    whose weights, and EMA weights, start a *new* run of the same model and data, with a fresh
    optimizer and schedule: fine-tuning, or continuing with an extended architecture whose new
    weights load as zeros; ignored when resuming, where ``last.pt`` holds the weights).
    """

    data: str = "qm9-extract"
    model: str = "egnn"
    loss: str = "quotient"
    steps: int = 1000
    out: str = "runs/train"
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    interpolant: str = "linear"
    prediction: str = "x1"
    augment: bool | None = None
    hidden: int | None = None
    layers: int | None = None
    heads: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    heavy_atoms_only: bool = False
    stereo: bool | None = None
    max_atoms: int | None = None
    train_limit: int | None = None
    val_limit: int = 200
    val_every: int = 500
    ckpt_every: int = 500
    log_every: int = 1
    stop_after: int | None = None
    resume: bool = False
    threads: int | None = None
    progress: bool = True
    init_from: str | None = None

    def validate(self) -> TrainConfig:
        """Check the values; returns ``self``. Raises ``ValueError`` naming the bad field."""
        from qmanifold.diffusion import LOSSES, PREDICTIONS
        from qmanifold.models.networks import available_denoisers

        if self.model.lower() not in available_denoisers():
            raise ValueError(f"unknown model {self.model!r}; available: {available_denoisers()}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {list(LOSSES)}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; choose one of {list(PREDICTIONS)}")
        if self.interpolant == "harmonic" and self.prediction != "v":
            raise ValueError("the harmonic prior (--interpolant harmonic) is a flow trained with --prediction v")
        for name in ("steps", "batch_size", "val_every", "ckpt_every", "log_every", "val_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("warmup",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1) (0 = off), got {self.ema}")
        if not self.grad_clip >= 0:  # also rejects NaN, which would silently turn clipping off
            raise ValueError(f"grad_clip must be a number >= 0 (0 = off), got {self.grad_clip}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be a positive step, got {self.stop_after}")
        if self.max_atoms is not None and self.max_atoms < 2:
            raise ValueError(f"max_atoms must be >= 2, got {self.max_atoms}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1, got {self.train_limit}")
        return self

    def resolved_augment(self) -> bool:
        """``augment`` with the default applied (on for the non-equivariant transformer)."""
        if self.augment is None:
            return self.model.lower() == "transformer"
        return bool(self.augment)

    def resolved_stereo(self) -> bool:
        """``stereo`` with the default applied (on for stereo-aware models such as ``chiral_egnn``)."""
        from qmanifold.models.networks import DENOISERS

        if self.stereo is None:
            return bool(getattr(DENOISERS[self.model.lower()], "stereo_aware", False))
        return bool(self.stereo)

    def model_config(self, num_atom_types: int) -> dict:
        """Constructor kwargs of the denoiser (``num_atom_types`` = number of elements; stereo-aware
        models take it as ``num_elements`` and build their own stereo-annotated vocabulary)."""
        from qmanifold.models.networks import DENOISERS

        kw = dict(self.model_kwargs)
        if getattr(DENOISERS[self.model.lower()], "stereo_aware", False):
            kw["num_elements"] = int(num_atom_types)
        else:
            kw["num_atom_types"] = int(num_atom_types) * (3 if self.resolved_stereo() else 1)
            if self.resolved_stereo():
                from qmanifold.models.stereo import NUM_STEREO_BOND_TYPES

                kw.setdefault("num_bond_types", NUM_STEREO_BOND_TYPES)
        for name in ("hidden", "layers", "heads"):
            v = getattr(self, name)
            if v is not None:
                kw[name] = int(v)
        return kw

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# devices and distributed
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Process-group facts: ``rank``, ``world_size``, ``local_rank``, ``active`` (DDP in use)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda"`` under DDP -> ``cuda:local_rank``.

    Raises:
        ValueError: CUDA asked for but not available, or an unknown device string.
    """
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:K)") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """Initialise ``torch.distributed`` when launched by ``torchrun`` (env ``WORLD_SIZE`` > 1).

    Backend: ``nccl`` for CUDA devices, ``gloo`` otherwise. Returns the process facts and the
    device of this process. Without the environment variables: a single process, no group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, active=True), device


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------


def load_molecules(spec: str, heavy_atoms_only: bool = False, max_atoms: int | None = None,
                   elements: Sequence[int] | None = None, progress: bool = True):
    """Load a dataset spec (see :func:`qmanifold.models.data.load_dataset`), optionally heavy-atom only,
    re-typed to ``elements`` and restricted to molecules with at most ``max_atoms`` atoms.

    Raises:
        ValueError: unknown spec, unreadable file, or no molecule left after the filter.
    """
    from qmanifold.models.data import load_dataset

    kwargs: dict[str, Any] = {}
    if str(spec).strip().lower() in ("qm9", "qm9-edm", "qm9_edm"):
        kwargs["progress"] = progress
    ds = load_dataset(spec, **kwargs)
    if heavy_atoms_only and not ds.heavy_atoms_only:
        ds = ds.without_hydrogens()
    if elements is not None and tuple(int(z) for z in elements) != tuple(ds.elements):
        ds = ds.with_elements(elements)
    if max_atoms is not None:
        keep = ds.num_atoms <= int(max_atoms)
        if not keep.any():
            raise ValueError(f"no molecule of {spec!r} has at most {max_atoms} atoms")
        if not keep.all():
            ds = ds.subset(np.nonzero(keep)[0])
    return ds


def dataset_split(ds, name: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)):
    """The ``train`` / ``valid`` / ``test`` part of ``ds`` (``"all"``: ``ds`` itself).

    Datasets with split labels (QM9) use them. User data without labels are split by a fixed
    permutation (``numpy.random.default_rng(0)``) into ``fractions`` -- deterministic, so that
    ``train`` and ``sample --split test`` agree.
    """
    if name == "all":
        return ds
    if name not in ("train", "valid", "test"):
        raise ValueError(f"unknown split {name!r}; choose train, valid, test or all")
    if np.any(ds.split_labels >= 0):
        return ds.split(name)
    m = len(ds)
    perm = np.random.default_rng(0).permutation(m)
    n_train = round(fractions[0] * m)
    n_valid = round(fractions[1] * m)
    if m >= 3:
        n_train = min(max(n_train, 1), m - 2)
        n_valid = min(max(n_valid, 1), m - n_train - 1)
    parts = {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid],
             "test": perm[n_train + n_valid:]}
    rows = np.sort(parts[name])
    if rows.size == 0:
        raise ValueError(f"dataset {ds.source!r} ({m} molecules, no split labels) is too small for a "
                         f"{name!r} split")
    return ds.subset(rows)


def select_rows(n: int, limit: int | None, seed: int = 0) -> np.ndarray:
    """``limit`` of ``range(n)`` chosen with ``default_rng(seed)`` (sorted), or all when ``None``."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(limit), replace=False))


def epoch_batches(num_atoms: np.ndarray, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches (lists of dataset rows) for ``epoch``.

    Size-bucketed batches of :class:`~qmanifold.models.data.SizeBucketBatchSampler` (shuffled with
    ``(seed, epoch)``), truncated to a multiple of ``world_size`` and dealt round-robin.

    Raises:
        ValueError: fewer batches than processes.
    """
    from qmanifold.models.data import SizeBucketBatchSampler

    sampler = SizeBucketBatchSampler(num_atoms, batch_size, shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    usable = len(batches) // world_size * world_size
    if usable == 0:
        raise ValueError(f"{len(batches)} batch(es) per epoch cannot be shared by {world_size} processes; "
                         f"use a smaller batch size or more data")
    return batches[rank:usable:world_size]


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "positions": batch["positions"].to(device=device, dtype=dtype),
        "mask": batch["mask"].to(device),
        "atom_types": batch["atom_types"].to(device),
        "bond_types": batch["bond_types"].to(device),
    }


# ----------------------------------------------------------------------------------------------
# model / diffusion
# ----------------------------------------------------------------------------------------------


#: stiffness k of the harmonic prior in 1/Å^2: an isolated bond then has E|x_i - x_j|^2 ~ 3/k = (1.4 Å)^2
HARMONIC_STIFFNESS = 1.5
#: regulariser of the harmonic prior (spread 1/sqrt(reg) = 10 Å of disconnected fragments)
HARMONIC_REG = 1e-2


class BondGraphHarmonicPrior:
    """The harmonic prior of :class:`qmanifold.schedules.HarmonicPrior` on the *covalent* bond graph:
    bond codes 1..4 only (stereo-aware models also carry cis/trans pair codes, which are not bonds)."""

    def __init__(self, stiffness: float = HARMONIC_STIFFNESS, reg: float = HARMONIC_REG) -> None:
        from qmanifold.schedules import HarmonicPrior

        self.base = HarmonicPrior(stiffness, reg, dim=3)

    def sample(self, bonds: torch.Tensor, mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
               **kwargs: Any) -> torch.Tensor:
        if bonds is None:
            raise ValueError("the harmonic prior needs bond_types (the molecular graph)")
        covalent = (bonds >= 1) & (bonds <= 4)
        return self.base.sample(covalent, mask, generator, **kwargs)

    def __repr__(self) -> str:
        return f"BondGraphHarmonicPrior(stiffness={self.base.stiffness}, reg={self.base.reg})"


def make_molecular_interpolant(name: str):
    """The interpolant of a name: a registered Gaussian-prior one (``linear``, ``vp_cosine``, ...) or
    ``harmonic``: ``x_t = (1 - t) x_0 + t x_1`` with ``x_0`` from :class:`BondGraphHarmonicPrior` (ET-Flow's
    prior; velocity prediction)."""
    if name != "harmonic":
        return name
    from qmanifold.schedules import GeneralInterpolant

    return GeneralInterpolant("1 - t", "t", prior=BondGraphHarmonicPrior(), name="harmonic")


def build_diffusion(denoiser: nn.Module, loss: str, interpolant: str = "linear", prediction: str = "x1",
                    augment: bool = False):
    """``QuotientDiffusion(Quotient(SE3), denoiser, ...)`` (molecules: rigid motions of R^3).

    ``interpolant="harmonic"`` is the harmonic-prior flow (:func:`make_molecular_interpolant`), trained
    with ``prediction="v"``."""
    import qmanifold
    from qmanifold.groups import SE3

    return qmanifold.QuotientDiffusion(qmanifold.Quotient(SE3), denoiser, interpolant=make_molecular_interpolant(interpolant),
                                       prediction=prediction, loss=loss, augment=augment)


def learning_rate(step: int, base: float, total: int, warmup: int = 0, schedule: str = "cosine",
                  min_ratio: float = 0.05) -> float:
    """Learning rate used for the update that produces step ``step + 1``.

    Linear warm-up over ``warmup`` steps, then cosine decay from ``base`` to ``min_ratio * base``
    at ``total`` (or constant).
    """
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return base * w
    frac = min(1.0, step / max(1, total))
    return base * w * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac)))


@torch.no_grad()
def _ema_update(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema_model.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema_model.buffers(), model.buffers()):
        be.copy_(b)


def validation_times(count: int, t_max: float, offset: int = 0) -> torch.Tensor:
    """Fixed, well-spread times ``frac((k + offset + 1) * 0.618...) * t_max`` for ``k < count``."""
    k = torch.arange(offset, offset + count, dtype=torch.float64)
    return torch.frac((k + 1.0) * _GOLDEN) * t_max


@torch.no_grad()
def validation_losses(denoiser: nn.Module, batches: Sequence[dict], loss: str, interpolant: str,
                      prediction: str, augment: bool, device: torch.device, dtype: torch.dtype) -> dict:
    """Validation losses of ``denoiser`` on pre-collated ``batches`` (fixed times and noise).

    Returns ``{"val_loss": own objective, "val_quotient": ..., "val_conventional": ...}``
    (molecule-weighted means). The three use identical times and noise. A denoiser whose output is
    not finite (a diverged run) gets NaN losses rather than an exception (``check_output=False``).
    """
    was_training = denoiser.training
    denoiser.eval()
    kinds = {"val_loss": loss, "val_quotient": "quotient", "val_conventional": "conventional"}
    diffs = {k: build_diffusion(denoiser, v, interpolant, prediction, augment) for k, v in kinds.items()}
    t_max = float(getattr(next(iter(diffs.values())).interpolant, "t_max", 1.0))
    gen = torch.Generator(device=device).manual_seed(VAL_SEED)
    sums = {k: 0.0 for k in kinds}
    count, offset = 0, 0
    try:
        for b in batches:
            bsz = b["positions"].shape[0]
            t = validation_times(bsz, t_max, offset).to(device=device, dtype=dtype)
            offset += bsz
            state = gen.get_state()
            for k, qd in diffs.items():
                gen.set_state(state)
                per = qd.loss(b["positions"], b["mask"], t=t, generator=gen, reduction="none",
                              check_output=False, atom_types=b["atom_types"], bond_types=b["bond_types"])
                sums[k] += float(per.sum())
            count += bsz
    finally:
        denoiser.train(was_training)
    return {k: v / max(1, count) for k, v in sums.items()}


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: str) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(obj, fh)


def _atomic_write_text(path: str, text: str) -> None:
    atomic_write_text(path, text)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Write a checkpoint dict atomically (adds ``format`` / ``version``).

    ``payload`` must hold at least ``model`` (``{"name", "config", "state_dict"}``), ``diffusion``,
    ``data``, ``step`` and ``config``.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in ("format", "version") and k not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    obj = dict(payload)
    obj["format"] = CHECKPOINT_FORMAT
    obj["version"] = CHECKPOINT_VERSION
    _atomic_torch_save(obj, os.fspath(path))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and validate a qmanifold checkpoint (``torch.load(weights_only=True)``, no pickles run).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unreadable / truncated file, not a qmanifold checkpoint (e.g. a bare
            ``state_dict`` or another project's checkpoint), or an unsupported version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file (e.g. {os.path.join(path, 'best.pt')})")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip errors, EOF, unpickling errors all mean the same thing here
        size = os.path.getsize(path)
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
        raise CheckpointError(
            f"{path}: cannot read as a qmanifold checkpoint ({type(exc).__name__}: {detail[:300]}); the file "
            f"({size} bytes) is truncated or corrupted, or holds objects a qmanifold checkpoint never contains") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a qmanifold checkpoint (holds a {type(obj).__name__}, not a dict)")
    if obj.get("format") != CHECKPOINT_FORMAT:
        hint = ""
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = " (it looks like a bare state_dict; qmanifold checkpoints also store the model name and config)"
        raise CheckpointError(f"{path}: not a qmanifold checkpoint (no format={CHECKPOINT_FORMAT!r} marker){hint}")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {obj.get('version')!r} is not supported "
                              f"(this qmanifold reads version {CHECKPOINT_VERSION})")
    missing = [k for k in _REQUIRED_KEYS if k not in obj]
    model = obj.get("model")
    if not missing and not (isinstance(model, dict) and {"name", "config", "state_dict"} <= set(model)):
        missing = ["model.name/config/state_dict"]
    if missing:
        raise CheckpointError(f"{path}: incomplete qmanifold checkpoint, missing {missing}")
    return obj


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, provenance: dict | None = None,
                      use_ema: bool = True) -> dict:
    """Write a slim, inference-only copy of a checkpoint (atomically) and return it.

    The copy keeps the model (its weights are the EMA weights when ``use_ema`` and the source has
    them), the diffusion settings, the data description, the step and the training configuration,
    and adds ``provenance`` (free-form, JSON-like); it drops the optimizer, the RNG states and the
    second copy of the weights, so it is a few times smaller and cannot be resumed.
    """
    ckpt = load_checkpoint(src)
    state = ckpt["ema_state_dict"] if use_ema and ckpt.get("ema_state_dict") is not None else ckpt["model"]["state_dict"]
    slim = {k: ckpt[k] for k in _REQUIRED_KEYS}
    slim["model"] = {**ckpt["model"], "state_dict": {k: v.clone() for k, v in state.items()}}
    slim["ema_state_dict"] = None
    slim["exported_from"] = {"path": os.path.basename(os.fspath(src)), "ema": bool(use_ema and ckpt.get("ema_state_dict") is not None)}
    for key in ("best_val", "elapsed", "epoch"):
        if key in ckpt:
            slim[key] = ckpt[key]
    slim["provenance"] = dict(provenance or {})
    save_checkpoint(dst, slim)
    return slim


def diffusion_from_checkpoint(ckpt: dict | str | os.PathLike, device: str | torch.device = "cpu",
                              use_ema: bool = True):
    """Rebuild the trained :class:`~qmanifold.QuotientDiffusion` (eval mode) from a checkpoint.

    Args:
        ckpt: a dict from :func:`load_checkpoint` or a path.
        device: where to put the model.
        use_ema: take the EMA weights when the checkpoint has them.

    Raises:
        CheckpointError: unknown model name or weights that do not fit the stored architecture.
    """
    from qmanifold.models.networks import available_denoisers, build_denoiser

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    m = ckpt["model"]
    if m["name"] not in available_denoisers():
        raise CheckpointError(f"checkpoint model {m['name']!r} is not a registered denoiser "
                              f"({available_denoisers()})")
    try:
        denoiser = build_denoiser(m["name"], **m["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint model config does not fit {m['name']!r}: {exc}") from exc
    state = ckpt.get("ema_state_dict") if use_ema and ckpt.get("ema_state_dict") is not None else m["state_dict"]
    try:
        denoiser.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit the stored {m['name']!r} architecture "
                              f"(from another model or version?): {first}") from exc
    dtype = getattr(torch, ckpt["config"].get("dtype", "float32"))
    denoiser = denoiser.to(device=device, dtype=dtype).eval()
    d = ckpt["diffusion"]
    return build_diffusion(denoiser, d["loss"], d.get("interpolant", "linear"), d.get("prediction", "x1"),
                           bool(d.get("augment", False)))


def read_log(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """Entries of a ``log.jsonl`` (optionally only ``kind`` ``"train"`` or ``"val"``).

    Numbers that were not finite (the loss of a skipped update, a diverged validation) are
    ``None`` (written as ``null``).
    """
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------


class _StopFlag:
    """Turns SIGINT / SIGTERM into a flag checked between steps (the state stays consistent)."""

    def __init__(self) -> None:
        self.raised: str | None = None
        self._old: dict = {}

    def __enter__(self) -> _StopFlag:  # noqa: PYI034 - typing.Self needs Python 3.11
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):
                    pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.raised is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _rng_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _check_resume_config(stored: dict, cfg: TrainConfig) -> TrainConfig:
    """The stored configuration with the resumable fields taken from ``cfg``; warns on others."""
    new = dict(stored)
    current = cfg.to_dict()
    defaults = TrainConfig().to_dict()
    # options left at their default were most likely not given: only flag the others
    differing = sorted(k for k in current if k not in RESUMABLE_OVERRIDES and k in stored
                       and stored[k] != current[k] and current[k] != defaults.get(k))
    if differing:
        warnings.warn("resuming with the stored configuration; these options differ from the command "
                      "line and are ignored: " + ", ".join(f"{k} (stored {stored[k]!r}, given {current[k]!r})"
                                                           for k in differing), stacklevel=3)
    for k in RESUMABLE_OVERRIDES:
        new[k] = current[k]
    return TrainConfig.from_dict(new)


def _initialise_from(cfg: TrainConfig, denoiser: nn.Module, ema_model: nn.Module | None, data_spec: dict) -> None:
    """Load the weights (and EMA weights) of ``cfg.init_from`` into a new run's networks.

    Raises:
        CheckpointError: unreadable file, another model, another element vocabulary or stereo
        setting, or weights that do not fit (the message names which).
    """
    src = load_checkpoint(cfg.init_from, map_location="cpu")
    if src["model"]["name"] != cfg.model.lower():
        raise CheckpointError(f"--init-from {cfg.init_from}: it holds a {src['model']['name']!r} model, this run "
                              f"trains {cfg.model!r}")
    for key in ("elements", "stereo", "heavy_atoms_only"):
        if key in src["data"] and src["data"][key] != data_spec[key]:
            raise CheckpointError(f"--init-from {cfg.init_from}: its data has {key}={src['data'][key]!r}, this run "
                                  f"{data_spec[key]!r}")
    try:
        denoiser.load_state_dict(src["model"]["state_dict"])
        if ema_model is not None:
            ema_model.load_state_dict(src.get("ema_state_dict") or src["model"]["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"--init-from {cfg.init_from}: its weights do not fit this run's architecture "
                              f"({str(exc).splitlines()[0]}); --hidden/--layers/--model-kwargs must match") from exc


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training run; returns the summary dict (also ``out/summary.json``).

    Raises:
        ValueError: bad configuration / data; FileExistsError: ``out`` holds a run and ``resume``
        is off; CheckpointError: ``resume`` with an unreadable ``last.pt``;
        TrainingDivergedError: :data:`MAX_SKIPPED_UPDATES` updates had a non-finite loss or
        gradient (``last.pt`` and ``summary.json``, with ``"stopped_by": "diverged"``, are written
        first).
    """
    from qmanifold.models.networks import build_denoiser

    cfg.validate()
    info, device = init_distributed(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    elif info.active and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))))
    out = os.fspath(cfg.out)
    last_path = os.path.join(out, "last.pt")
    best_path = os.path.join(out, "best.pt")
    log_path = os.path.join(out, "log.jsonl")

    ckpt = None
    if os.path.exists(last_path):
        if not cfg.resume:
            raise FileExistsError(f"{out} already holds a training run ({last_path}); pass --resume to continue "
                                  f"it or choose another --out")
        ckpt = load_checkpoint(last_path, map_location="cpu")
        cfg = _check_resume_config(ckpt["config"], cfg)
        if not isinstance(ckpt.get("rng"), dict) or "world_size" not in ckpt["rng"]:
            raise CheckpointError(f"{last_path} has no training state (RNG states) to resume from")
        if ckpt["rng"]["world_size"] != info.world_size:
            raise CheckpointError(f"{last_path} was written by {ckpt['rng']['world_size']} process(es); resume it "
                                  f"with the same number (now {info.world_size}) to continue identically")
    elif cfg.resume and info.is_main:
        print(f"[qmanifold] no checkpoint in {out}; starting a new run")
    dtype = getattr(torch, cfg.dtype)

    # ---- data
    ds = load_molecules(cfg.data, cfg.heavy_atoms_only, cfg.max_atoms, progress=cfg.progress and info.is_main)
    train_ds = dataset_split(ds, "train")
    train_ds = train_ds.subset(select_rows(len(train_ds), cfg.train_limit, seed=0))
    val_ds = dataset_split(ds, "valid")
    val_ds = val_ds.subset(select_rows(len(val_ds), cfg.val_limit, seed=1))
    stereo = cfg.resolved_stereo()
    if stereo:  # stereo-annotated atom and bond types, read from each molecule's reference geometry
        from qmanifold.models.stereo import StereoDataset

        train_ds = StereoDataset(train_ds, progress=cfg.progress and info.is_main)
        val_ds = StereoDataset(val_ds)
    data_spec = {
        "data": cfg.data, "heavy_atoms_only": bool(cfg.heavy_atoms_only), "max_atoms": cfg.max_atoms,
        "stereo": stereo,
        "elements": [int(z) for z in ds.elements], "num_train": len(train_ds), "num_val": len(val_ds),
        "source": ds.source,
    }
    if ckpt is not None and [int(z) for z in ckpt["data"]["elements"]] != data_spec["elements"]:
        raise CheckpointError(f"{last_path}: element list {ckpt['data']['elements']} differs from the data's "
                              f"{data_spec['elements']}")

    # ---- model
    torch.manual_seed(cfg.seed)
    model_config = cfg.model_config(len(ds.elements))
    denoiser = build_denoiser(cfg.model, **model_config).to(device=device, dtype=dtype)
    augment = cfg.resolved_augment()
    qd = build_diffusion(denoiser, cfg.loss, cfg.interpolant, cfg.prediction, augment)
    ema_model = copy.deepcopy(denoiser).eval() if cfg.ema > 0 else None
    if ema_model is not None:
        for p in ema_model.parameters():
            p.requires_grad_(False)
    if ckpt is None and cfg.init_from:
        _initialise_from(cfg, denoiser, ema_model, data_spec)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = _rng_generator(device, cfg.seed * 1000 + 17 + info.rank)

    step, epoch, pos = 0, 0, 0
    best_val = math.inf
    elapsed_before = 0.0
    if ckpt is not None:
        try:
            denoiser.load_state_dict(ckpt["model"]["state_dict"])
            if ema_model is not None and ckpt.get("ema_state_dict") is not None:
                ema_model.load_state_dict(ckpt["ema_state_dict"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{last_path}: cannot restore the training state ({exc})") from exc
        step, epoch, pos = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        best_val = float(ckpt.get("best_val", math.inf))
        elapsed_before = float(ckpt.get("elapsed", 0.0))
        gen.set_state(ckpt["rng"]["generators"][info.rank])
        torch.set_rng_state(ckpt["rng"]["torch"])

    module: nn.Module = qd
    if info.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        module = DDP(qd, device_ids=[device.index] if device.type == "cuda" else None)

    # ---- bookkeeping files (rank 0)
    if info.is_main:
        os.makedirs(out, exist_ok=True)
        _atomic_write_text(os.path.join(out, "config.json"), json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
        if ckpt is not None and os.path.exists(log_path):  # drop log lines beyond the checkpoint
            kept = [r for r in read_log(log_path) if r.get("step", 0) <= step]
            _atomic_write_text(log_path, "".join(json.dumps(strict_json_value(r), allow_nan=False) + "\n"
                                                 for r in kept))
        elif ckpt is None:
            _atomic_write_text(log_path, "")
    # closed in the finally clause at the end of the run
    log_fh = open(log_path, "a", encoding="utf-8") if info.is_main else None  # noqa: SIM115

    val_batches = None
    if info.is_main:
        from qmanifold.models.data import collate_molecules

        order = np.argsort(val_ds.num_atoms, kind="stable")
        val_batches = [_to_device(collate_molecules([val_ds[int(i)] for i in order[s:s + VAL_BATCH]]), device, dtype)
                       for s in range(0, len(order), VAL_BATCH)]

    def log(row: dict) -> None:
        if log_fh is not None:
            log_fh.write(json.dumps(strict_json_value(row), allow_nan=False) + "\n")
            log_fh.flush()

    t_start = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - t_start

    def gather_generator_states() -> list:
        state = gen.get_state()
        if not info.active:
            return [state]
        import torch.distributed as dist

        states: list = [None] * info.world_size
        dist.all_gather_object(states, state)
        return states

    def checkpoint(paths: Iterable[str], val: dict | None) -> bool:
        """Write ``paths`` (rank 0); returns whether they were written (False elsewhere)."""
        states = gather_generator_states()  # collective: every rank calls
        if not info.is_main:
            return False
        payload = {
            "model": {"name": denoiser.name, "config": dict(denoiser.config), "state_dict": denoiser.state_dict()},
            "ema_state_dict": ema_model.state_dict() if ema_model is not None else None,
            "diffusion": {"group": "SE3", "loss": cfg.loss, "interpolant": cfg.interpolant,
                          "prediction": cfg.prediction, "augment": augment},
            "data": data_spec,
            "optimizer": opt.state_dict(),
            "step": step, "epoch": epoch, "batch_in_epoch": pos,
            "rng": {"generators": states, "torch": torch.get_rng_state(), "world_size": info.world_size},
            "best_val": best_val, "last_val": val, "elapsed": elapsed(),
            "config": cfg.to_dict(),
            "versions": {"torch": str(torch.__version__), "qmanifold": _qmanifold_version()},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if not _all_finite(denoiser, ema_model):
            warnings.warn(f"the weights are not finite at step {step}; {', '.join(paths)} not written (the "
                          f"previous file, if any, keeps the last finite state)", stacklevel=2)
            return False
        for p in paths:
            save_checkpoint(p, payload)
        return True

    def run_validation() -> dict | None:
        nonlocal best_val
        val = None
        if info.is_main:
            net = ema_model if ema_model is not None else denoiser
            val = validation_losses(net, val_batches, cfg.loss, cfg.interpolant, cfg.prediction, augment, device, dtype)
            log({"kind": "val", "step": step, **val, "ema": ema_model is not None, "time": round(elapsed(), 3)})
        return val

    from qmanifold.models.data import collate_molecules

    num_atoms = train_ds.num_atoms
    batches = epoch_batches(num_atoms, cfg.batch_size, cfg.seed, epoch, info.rank, info.world_size)
    target = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    bar = None
    if cfg.progress and info.is_main and step < target:
        from tqdm.auto import tqdm

        bar = tqdm(total=target, initial=step, desc=f"train {cfg.model}/{cfg.loss}", dynamic_ncols=True)
    last_loss = float("nan")
    last_val: dict | None = ckpt.get("last_val") if ckpt is not None else None
    skipped = 0
    last_skipped = None
    diverged_message = ""
    stopped_by = None
    denoiser.train()
    try:
        with _StopFlag() as stop:
            while step < target:
                stop_now = stop.raised is not None
                if info.active:  # every rank stops at the same step
                    import torch.distributed as dist

                    flag = torch.tensor([1 if stop_now else 0], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop_now = bool(int(flag))
                if stop_now:
                    stopped_by = stop.raised or "signal (another rank)"
                    break
                if pos >= len(batches):
                    epoch, pos = epoch + 1, 0
                    batches = epoch_batches(num_atoms, cfg.batch_size, cfg.seed, epoch, info.rank, info.world_size)
                rows = batches[pos]
                pos += 1
                b = _to_device(collate_molecules([train_ds[i] for i in rows]), device, dtype)
                lr = learning_rate(step, cfg.lr, cfg.steps, cfg.warmup, cfg.schedule, cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = lr
                # check_output=False: a non-finite output gives a non-finite loss, skipped below
                loss = module(b["positions"], b["mask"], generator=gen, check_output=False,
                              atom_types=b["atom_types"], bond_types=b["bond_types"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                params = [p for p in denoiser.parameters() if p.grad is not None]
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                gnorm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                ok = bool(torch.isfinite(gnorm)) and bool(torch.isfinite(loss.detach()))
                if ok:
                    opt.step()
                    if ema_model is not None:
                        _ema_update(ema_model, denoiser, min(cfg.ema, (1.0 + step) / (10.0 + step)))
                else:
                    skipped += 1
                    last_skipped = step + 1
                    if info.is_main:
                        warnings.warn(f"non-finite loss or gradient at step {step + 1}; update skipped "
                                      f"({skipped} of at most {MAX_SKIPPED_UPDATES})", stacklevel=2)
                step += 1
                loss_value = loss.detach()
                if info.active:
                    import torch.distributed as dist

                    dist.all_reduce(loss_value)
                    loss_value = loss_value / info.world_size
                last_loss = float(loss_value)
                if step % cfg.log_every == 0 or step == target:
                    log({"kind": "train", "step": step, "epoch": epoch, "loss": last_loss, "lr": lr,
                         "grad_norm": float(gnorm), "skipped": not ok, "time": round(elapsed(), 3)})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", val=f"{last_val['val_loss']:.4f}" if last_val else "-")
                want_val = step % cfg.val_every == 0 or step == cfg.steps
                want_last = step % cfg.ckpt_every == 0 or step == target
                improved = False
                if want_val:
                    last_val = run_validation()
                    if info.is_main and last_val["val_loss"] < best_val:
                        best_val, improved = last_val["val_loss"], True
                    if info.active:  # best.pt is decided on rank 0
                        import torch.distributed as dist

                        flag = torch.tensor([1 if improved else 0], device=device)
                        dist.broadcast(flag, 0)
                        improved = bool(int(flag))
                paths = ([best_path] if improved else []) + ([last_path] if want_last else [])
                if paths:
                    checkpoint(paths, last_val)
                if skipped >= MAX_SKIPPED_UPDATES:  # `ok` agrees on all ranks (gradients are all-reduced)
                    stopped_by = "diverged"
                    break
        if stopped_by == "diverged":
            written = checkpoint([last_path], last_val)  # skipped updates left the weights as they were
            if info.is_main:
                kept = (f"{last_path} holds the weights of the last finite update" if written else
                        f"the weights are not finite, so {last_path} was not rewritten")
                diverged_message = (
                    f"training diverged at step {last_skipped}: {skipped} updates had a non-finite loss or "
                    f"gradient (the limit is {MAX_SKIPPED_UPDATES}) and were skipped; {kept}. Lower the "
                    f"learning rate (--lr, now {cfg.lr:g}) and start a new run in another --out, or check "
                    f"the data")
        elif stopped_by is not None:
            checkpoint([last_path], last_val)
            if info.is_main:
                print(f"\n[qmanifold] {stopped_by}: stopped at step {step}; {last_path} written, continue with --resume")
    finally:
        if bar is not None:
            bar.close()
        if log_fh is not None:
            log_fh.close()

    ranks_agree = None
    if info.active:
        ranks_agree = _ranks_agree(denoiser)
    summary = {
        "out": out, "step": step, "steps": cfg.steps, "finished": step >= cfg.steps,
        "stopped_by": stopped_by, "epoch": epoch, "last_train_loss": last_loss, "last_val": last_val,
        "best_val_loss": best_val if math.isfinite(best_val) else None, "skipped_updates": skipped,
        "wall_time_s": round(elapsed(), 3), "parameters": denoiser.count_parameters(),
        "model": denoiser.name, "model_config": dict(denoiser.config), "loss": cfg.loss,
        "augment": augment, "device": str(device), "world_size": info.world_size,
        "threads": torch.get_num_threads(), "ranks_agree": ranks_agree,
        "num_train": len(train_ds), "num_val": len(val_ds),
    }
    if info.is_main:
        atomic_write_json(os.path.join(out, "summary.json"), summary)  # strict JSON: NaN -> null
    if info.active:
        import torch.distributed as dist

        dist.barrier()
    if stopped_by == "diverged":
        raise TrainingDivergedError(diverged_message or f"training diverged at step {step} (see rank 0)")
    return summary


def _all_finite(*models: nn.Module | None) -> bool:
    """Whether every parameter and floating buffer of ``models`` is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for m in models if m is not None
             for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _ranks_agree(model: nn.Module) -> bool:
    """All ranks hold the same parameters (compares against rank 0 with a broadcast)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, 0)
    same = torch.tensor([1 if torch.equal(flat, ref) else 0], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(int(same))


def _qmanifold_version() -> str:
    import qmanifold

    return qmanifold.__version__
