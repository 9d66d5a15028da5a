r"""Flow-matching training of an equivariant Boltzmann generator with the quotient loss.

The model is ``QuotientDiffusion(Quotient(SE(d) x S_N), EGNNVelocity, "linear", prediction="v",
loss="quotient")``: ``x_t = (1 - t) eps + t x1`` with ``eps`` the centred standard Gaussian, and the
loss ``|| P_{x_t}(v_theta(x_t, t) - (x1 - eps)) ||^2`` with ``P_{x_t}`` the horizontal projection of
``SE(d)`` at the noisy point (translations by centring, rotations by the projection). The
permutation factor is handled by the network's permutation equivariance (no matching of prior and
data samples over permutations or rotations).

:func:`train` is a small loop: Adam, linear warm-up then cosine decay, gradient clipping, an EMA of
the weights, and a checkpoint ``last.pt`` (model, EMA, optimiser, random state, step) every
``ckpt_every`` steps and at the end; ``resume=True`` continues from it with the same schedule,
bit-for-bit as an uninterrupted run (same random stream). ``log.jsonl`` holds one line per logged
step; ``config.json`` the configuration.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from qmanifold import Quotient, QuotientDiffusion
from qmanifold.atomic import atomic_open, atomic_write_json

from .data import BoltzmannData, load
from .network import EGNNVelocity
from .systems import System, get_system

__all__ = ["TrainConfig", "build_model", "train", "load_checkpoint", "CHECKPOINT_VERSION"]

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Training settings (defaults: a few CPU minutes for DW4)."""

    steps: int = 5000
    batch_size: int = 256
    lr: float = 5e-4
    warmup: int = 100
    min_lr_factor: float = 0.05
    grad_clip: float = 1.0
    ema: float = 0.999
    hidden: int | None = None  # default: the system's
    layers: int | None = None
    seed: int = 0
    ckpt_every: int = 500
    log_every: int = 50


def build_model(system: System, hidden: int, layers: int) -> QuotientDiffusion:
    """The flow-matching model of the module docstring (float32 parameters)."""
    net = EGNNVelocity(hidden=hidden, layers=layers)
    return QuotientDiffusion(Quotient(system.group), net, "linear", prediction="v", loss="quotient")


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _save(path: str, payload: dict) -> None:
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)


def train(data: BoltzmannData | str, out: str, cfg: TrainConfig, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = False, log=print) -> dict:
    """Train on the training split of ``data`` (a :class:`BoltzmannData` or a path) into ``out``.

    Returns a summary dict (also written to ``out/summary.json``): steps, final loss (mean of the
    last logged window), seconds, parameters, data file metadata.
    """
    data_path = data if isinstance(data, str) else None
    data = load(data) if isinstance(data, str) else data
    system = data.system
    hidden = cfg.hidden or system.model["hidden"]
    layers = cfg.layers or system.model["layers"]
    cfg = TrainConfig(**{**asdict(cfg), "hidden": hidden, "layers": layers})
    os.makedirs(out, exist_ok=True)
    last = os.path.join(out, "last.pt")
    x_train = torch.from_numpy(data.split("train")).to(torch.float32)
    if x_train.shape[0] < 2:
        raise ValueError("the training split has fewer than 2 samples")
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on the seed only
        torch.manual_seed(cfg.seed)
        model = build_model(system, hidden, layers)
    ema = copy.deepcopy(model.denoiser).requires_grad_(False)
    opt = torch.optim.Adam(model.denoiser.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history, seconds = 0, [], 0.0
    if resume:
        if not os.path.exists(last):
            raise ValueError(f"--resume: no checkpoint {last}")
        ck = torch.load(last, map_location="cpu", weights_only=False)
        if ck.get("config", {}).get("hidden") != hidden or ck.get("config", {}).get("layers") != layers:
            raise ValueError(f"{last} was trained with hidden/layers {ck['config'].get('hidden')}/{ck['config'].get('layers')}, "
                             f"not {hidden}/{layers}")
        if ck.get("data_meta", {}).get("system") != system.name:
            raise ValueError(f"{last} is a {ck.get('data_meta', {}).get('system')} model, the data are {system.name}")
        model.denoiser.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        gen.set_state(ck["generator"])
        step, seconds = int(ck["step"]), float(ck.get("seconds", 0.0))
        cfg = TrainConfig(**{**ck["config"], "steps": cfg.steps, "ckpt_every": cfg.ckpt_every, "log_every": cfg.log_every})
        log(f"[train] resumed {last} at step {step}")
    atomic_write_json(os.path.join(out, "config.json"), dict(config=asdict(cfg), system=system.name, data=data_path,
                                                              data_meta=data.meta))

    def checkpoint() -> None:
        _save(last, dict(version=CHECKPOINT_VERSION, model=model.denoiser.state_dict(), ema=ema.state_dict(),
                         optimizer=opt.state_dict(), generator=gen.get_state(), step=step, config=asdict(cfg),
                         system=system.name, data_meta=data.meta, seconds=seconds))

    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=step, desc=f"train {system.name}", leave=False)
    window = []
    t_start = time.time()
    cpu_start = time.process_time()
    log_file = open(os.path.join(out, "log.jsonl"), "a", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        while step < end:
            idx = torch.randint(0, x_train.shape[0], (cfg.batch_size,), generator=gen)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            loss = model.loss(x_train[idx], generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.denoiser.parameters(), cfg.grad_clip)
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.denoiser.parameters()):
                    pe.lerp_(p, 1.0 - cfg.ema)
            step += 1
            window.append(float(loss.detach()))
            if step % cfg.log_every == 0 or step == end:
                rec = dict(step=step, loss=sum(window) / len(window), lr=opt.param_groups[0]["lr"],
                           seconds=seconds + time.time() - t_start)
                history.append(rec)
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                window = []
            if step % cfg.ckpt_every == 0 or step == end:
                seconds_now = seconds + time.time() - t_start
                seconds, t_start = seconds_now, time.time()
                checkpoint()
            if bar is not None:
                bar.update(1)
    finally:
        log_file.close()
        if bar is not None:
            bar.close()
    seconds += time.time() - t_start
    summary = dict(system=system.name, steps=step, planned_steps=cfg.steps, seconds=seconds,
                   cpu_seconds_this_invocation=time.process_time() - cpu_start,
                   parameters=sum(p.numel() for p in model.denoiser.parameters()),
                   final_loss=history[-1]["loss"] if history else None, config=asdict(cfg),
                   n_train=int(x_train.shape[0]), threads=torch.get_num_threads())
    atomic_write_json(os.path.join(out, "summary.json"), summary)
    log(f"[train] {system.name}: step {step}/{cfg.steps}, loss {summary['final_loss']}, {seconds:.0f} s -> {last}")
    return summary


def load_checkpoint(path: str, *, use_ema: bool = True, dtype: torch.dtype = torch.float32
                    ) -> tuple[QuotientDiffusion, System, dict]:
    """``(model, system, checkpoint)`` from a ``last.pt`` written by :func:`train` (EMA weights by
    default), in ``dtype``, in evaluation mode."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION or "ema" not in ck:
        raise ValueError(f"{path} is not a Boltzmann-generator checkpoint (train one with `qmanifold train-boltzmann`)")
    system = get_system(ck["system"])
    model = build_model(system, ck["config"]["hidden"], ck["config"]["layers"])
    model.denoiser.load_state_dict(ck["ema"] if use_ema else ck["model"])
    model.denoiser.to(dtype).eval()
    return model, system, ck
