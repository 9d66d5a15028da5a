"""``qmanifold bench``: side-by-side timings of the quotient machinery on the current device.

Everything is measured in one run, on one device, with the two sides of each comparison timed in
alternating blocks (:func:`time_blocks`), and reported as medians and the ratio of the medians
``a / b``, and as the paired ratio (geometric mean of the per-round ratios of the rounds that timed
both sides back to back) with its 95 % confidence interval (:func:`paired_ratio`; ``ratio_paired``
and ``ratio_ci95`` in ``--json``): a ratio whose interval contains 1 is within the run's own timing
noise.

* ``copy``: the device's copy bandwidth (``dst.copy_(src)`` of a large buffer), the yardstick for
  the memory-bound kernels;
* ``projection`` / ``projection_masked`` / ``projection_curvature`` / ``lifted_update``: the
  default path of :class:`~qmanifold.Quotient` (fused Triton kernel on a GPU, the torch path on a
  CPU) vs the plain-torch SE(3) path (:mod:`qmanifold.so3`), with the achieved bandwidth
  ``bytes / time`` of the default path and its fraction of the copy bandwidth, and peak memory
  (CUDA); on a GPU also the device time of both sides (:func:`device_time`: the calls replayed
  from a CUDA graph, so without the host's launch path) and the bandwidth fraction it implies;
* ``generic_kernel``: the kernel generated for a user-declared group (here SE(3) declared by its
  generators, and the 2-torus) vs the hand-written SE(3) kernel, per point;
* ``projection_geomstats``: geomstats' pre-shape (Kendall) horizontal projection, if installed;
* ``loss``: the quotient loss vs the AF3-aligned loss (Kabsch by SVD), forward + backward with the
  molecular EGNN; ``train_step``: quotient vs conventional loss;
* ``sampler_step`` (SDE) and ``sampler_step_ode``: one quotient step vs one conventional step
  with the same EGNN;
* ``kabsch`` vs ``projection``: the alignment AF3 needs vs the projection the quotient loss needs.

Shared timing / batch utilities (:func:`time_blocks`, :func:`time_group`, :func:`paired_ratio`,
:func:`paired_record`, :func:`make_batch`,
:func:`build_denoiser`, :func:`one_step`, :func:`training_step`) are also used by
``benchmarks/bench_engine.py`` and ``benchmarks/profile_train_step.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

__all__ = [
    "time_blocks", "time_group", "paired_ratio", "paired_record", "make_batch", "build_denoiser", "one_step",
    "training_step", "PrecomputedDenoiser", "fmt_seconds",
    "copy_bandwidth", "device_time", "run", "format_table", "register", "main",
]


# ----------------------------------------------------------------------------------------------
# timing (shared with benchmarks/bench_engine.py)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_blocks(fns: dict[str, Callable], device: torch.device, *, repeats: int, warmup: int = 2,
                block_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``repeats`` rounds, timed round-robin in blocks.

    The functions are interleaved (block of f1, block of f2, ..., repeated ``repeats`` times, the
    order rotated each round) so that changing background load affects all of them alike; entry
    ``r`` of every list is from round ``r``, so the lists can be compared round by round
    (:func:`paired_ratio`). Each block runs ``number`` calls, chosen from the last warm-up round
    so that a block of the slowest function lasts about ``block_s``, and is bracketed by device
    synchronisation.
    """
    device = torch.device(device)
    slowest = 1e-7
    for _ in range(warmup):  # the first round may include compilation: size blocks from the last
        slowest = 1e-7
        for f in fns.values():
            sync(device)
            start = time.perf_counter()
            f()
            sync(device)
            slowest = max(slowest, time.perf_counter() - start)
    number = max(1, int(block_s / slowest))

    def block(f):
        sync(device)
        start = time.perf_counter()
        for _ in range(number):
            f()
        sync(device)
        return (time.perf_counter() - start) / number

    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    for r in range(repeats):
        # rotate the order each round, so that no function always runs first (after another's
        # synchronisation, allocator state or clock ramp)
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            times[k].append(block(fns[k]))
    return times


def time_group(fns: dict[str, Callable], device: torch.device, *, repeats: int, warmup: int = 2,
               block_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function over the rounds of :func:`time_blocks`."""
    return {k: statistics.median(v) for k, v in time_blocks(fns, device, repeats=repeats, warmup=warmup,
                                                            block_s=block_s).items()}


def paired_ratio(times_a: list[float], times_b: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The ratio ``a / b`` from rounds that timed both sides (:func:`time_blocks`), with a confidence
    interval: ``(estimate, low, high)``.

    The two sides of a round run back to back, so the per-round log ratio ``log(a_r / b_r)``
    cancels load that drifts between rounds. The estimate is the geometric mean of the per-round
    ratios, ``exp(mean log(a_r / b_r))``, and the interval is Student's t interval of that mean
    log ratio, exponentiated, assuming the rounds are independent. It says whether a ratio's
    distance from 1 is larger than the run's own timing noise. (The ratio of the two medians, the
    records' ``ratio``, is a different estimate of the same thing and can fall outside the interval
    when a round is an outlier.) Low and high are ``nan`` for fewer than two rounds.
    """
    from scipy.stats import t as student_t

    if len(times_a) != len(times_b) or not times_a:
        raise ValueError(f"paired rounds expected, got {len(times_a)} and {len(times_b)} times")
    n = len(times_a)
    logs = np.log(np.asarray(times_a, dtype=np.float64) / np.asarray(times_b, dtype=np.float64))
    estimate = float(np.exp(logs.mean()))
    if n < 2:
        return estimate, float("nan"), float("nan")
    half = student_t.ppf(0.5 + level / 2, n - 1) * logs.std(ddof=1) / np.sqrt(n)
    return estimate, float(np.exp(logs.mean() - half)), float(np.exp(logs.mean() + half))


def paired_record(comparison: str, a: str, b: str, times_a: list[float], times_b: list[float], **fields) -> dict:
    """A comparison record from the per-round times of its two sides (:func:`time_blocks`): the
    medians ``a_median_s`` / ``b_median_s``, their ``ratio``, the given ``fields`` (device, size,
    ...), and with two or more rounds ``ratio_paired`` and ``ratio_ci95`` (:func:`paired_ratio`)."""
    ta, tb = statistics.median(times_a), statistics.median(times_b)
    rec = {"comparison": comparison, "a": a, "b": b, "a_median_s": ta, "b_median_s": tb, "ratio": ta / tb, **fields}
    if len(times_a) >= 2:
        estimate, lo, hi = paired_ratio(times_a, times_b)
        rec["ratio_paired"], rec["ratio_ci95"] = estimate, [lo, hi]
    return rec


def write_json(path: str, data) -> None:
    """Write benchmark results (a list of records, or a dict) to ``path`` as strict JSON (a value
    that is not a number, such as the copy record's ``ratio``, is ``null``), atomically, and say so."""
    from .atomic import atomic_write_json

    atomic_write_json(path, data)
    what = f"{len(data)} records" if isinstance(data, list) else "results"
    print(f"wrote {what} to {path}")


def fmt_seconds(s: float) -> str:
    if s >= 1.0:
        return f"{s:8.3f} s "
    if s >= 1e-3:
        return f"{s * 1e3:8.3f} ms"
    return f"{s * 1e6:8.1f} us"


def peak_memory(fn: Callable, device: torch.device) -> int | None:
    """Peak CUDA memory allocated during one call, above what was allocated before (bytes)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def device_time(fn: Callable, device: torch.device, *, calls: int = 20, replays: int = 10,
                rounds: int = 3) -> float | None:
    """Device seconds per call of ``fn`` with the host's launch path taken out.

    ``calls`` calls are captured in one CUDA graph, which is replayed ``replays`` times between two
    CUDA events; the median over ``rounds`` is returned. What :func:`time_group` measures is wall
    time, which for a small kernel is the host's launch path (Python, the launcher) rather than the
    memory traffic; this is the GPU's side of it. ``None`` on a CPU, or when ``fn`` cannot be
    captured (for example because it synchronises with the host); the reason is printed.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up (compilation, allocator) off the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        sync(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        per_call = []
        for _ in range(rounds):
            start.record()
            for _ in range(replays):
                graph.replay()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) / 1e3 / (replays * calls))
        del graph
        return statistics.median(per_call)
    except Exception as exc:  # noqa: BLE001 - not capturable: report wall time only
        print(f"note: device time not measured ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        sync(device)
        return None


def copy_bandwidth(device: torch.device, nbytes: int, *, repeats: int = 5) -> float:
    """Copy bandwidth ``2 * nbytes / t`` (read + write) of ``dst.copy_(src)``, bytes per second."""
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = time_group({"copy": lambda: dst.copy_(src)}, device, repeats=repeats, warmup=2, block_s=0.05)["copy"]
    return 2.0 * n * 4 / t


# ----------------------------------------------------------------------------------------------
# inputs and model steps (shared with benchmarks/bench_engine.py)


def qm9_mask(batch: int, n_max: int = 29, *, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """A padding mask ``(batch, n_max)`` with QM9-like sizes (mean 18 atoms with H, 3..n_max, at
    least one molecule of ``n_max`` atoms), and the sizes."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.rint(rng.normal(18.0, 3.0, size=batch)), 3, n_max).astype(int)
    sizes[0] = n_max
    mask = torch.arange(n_max)[None, :] < torch.as_tensor(sizes)[:, None]
    return mask, sizes


def make_batch(batch: int = 64, n_max: int = 29, *, seed: int = 0, device="cpu", dtype=torch.float32) -> dict:
    """A fixed QM9-like padded batch: sizes ~ QM9 (mean 18 atoms with H, 3..n_max), at least one
    molecule with ``n_max`` atoms, random (fixed) atom and symmetric bond types, coordinates with a
    ~1.5 Å spread, centred over the real atoms."""
    mask, sizes = qm9_mask(batch, n_max, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(batch, n_max, 3, generator=gen, dtype=torch.float64)
    w = mask[..., None].double()
    x = (x - (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)) * w
    atom_types = torch.randint(0, 5, (batch, n_max), generator=gen) * mask
    bonds = torch.randint(0, 5, (batch, n_max, n_max), generator=gen)
    bonds = torch.triu(bonds, 1)
    bonds = (bonds + bonds.transpose(1, 2)) * (mask[:, :, None] & mask[:, None, :])
    return {
        "x1": x.to(device=device, dtype=dtype),
        "mask": mask.to(device),
        "atom_types": atom_types.to(device),
        "bond_types": bonds.to(device),
        "sizes": sizes,
    }


def build_denoiser(name: str, device, dtype, **kwargs) -> torch.nn.Module:
    """The denoiser at its default size (EGNN: hidden 128, 6 layers) unless ``kwargs`` say otherwise."""
    if name == "egnn":
        from qmanifold.models.egnn import EGNNDenoiser

        net = EGNNDenoiser(**kwargs)
    elif name == "transformer":
        from qmanifold.models.transformer import TransformerDenoiser

        net = TransformerDenoiser(**kwargs)
    else:
        raise ValueError(f"unknown denoiser {name!r}; choose 'egnn' or 'transformer'")
    return net.to(device=device, dtype=dtype)


def one_step(model, sampler: str, geometry: str, x, mask, cond, t0: float, t1: float, gen) -> Callable:
    """A function doing exactly what ``QuotientDiffusion.sample`` does per Euler(-Maruyama) step."""
    from .sde import integrate

    # the same SDE and lift as sample(sampler=..., geometry=...) with the default noise level
    lifted = model._projected(model._em_sde(sampler, None, cond), geometry, 1.0)
    times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)

    def step():
        return integrate(lifted, x, times=times, mask=mask, generator=gen)

    return step


class PrecomputedDenoiser(torch.nn.Module):
    """A stand-in denoiser that returns a fixed output ``(B, N, d)`` at no cost: a sampler step with
    it times everything the step does besides the network (the quotient machinery, the schedule
    arithmetic, the noise)."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.register_buffer("output", output)

    def forward(self, x, t, mask=None, **cond):
        return self.output


def training_step(quotient, net, loss: str, x1, mask, cond, gen) -> Callable:
    """A function doing one training step's forward + backward of ``loss`` with ``net``."""
    from .diffusion import QuotientDiffusion

    model = QuotientDiffusion(quotient, net, "linear", loss=loss)

    def step():
        net.zero_grad(set_to_none=True)
        model.loss(x1, mask, generator=gen, **cond).backward()

    return step


# ----------------------------------------------------------------------------------------------
# the benchmark


def _sizes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if device.type == "cuda":
        return [(65536, 29), (4096, 256)] if quick else [(65536, 29), (4096, 256), (16384, 256)]
    return [(2048, 29), (128, 256)] if quick else [(16384, 29), (1024, 256)]


def run(args) -> list[dict]:
    """Run the comparisons selected by ``args`` (see :func:`register`); returns the records."""
    from qmanifold import groups

    from . import so3
    from .diffusion import QuotientDiffusion
    from .kernels import FusedGeometry, status
    from .lie import LieGroup
    from .quotient import Quotient

    device = torch.device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    quick = args.quick
    repeats = args.repeats or (5 if quick else 7)
    timing = dict(repeats=repeats, warmup=1 if quick else 2, block_s=0.02 if quick else 0.1)
    sections = set(args.sections)
    records: list[dict] = []
    gen = torch.Generator(device=device).manual_seed(0)
    q = Quotient(groups.SE3)  # the default path
    fs = lambda t: torch.finfo(dtype).bits // 8 * t  # bytes of t floats
    print(_header(device, dtype, repeats, q))
    copy_bps = None
    if sections & {"copy", "projection"}:
        nbytes = (256 << 20) if device.type == "cuda" else (32 << 20 if quick else 128 << 20)
        copy_bps = copy_bandwidth(device, nbytes, repeats=repeats)
        rec = {"comparison": "copy", "a": "dst.copy_(src)", "b": "-", "a_median_s": 2 * nbytes / copy_bps,
               "b_median_s": float("nan"), "ratio": float("nan"), "device": str(device), "size": f"{nbytes >> 20} MiB",
               "a_GBps": copy_bps / 1e9}
        records.append(rec)
        print(f"copy bandwidth: {copy_bps / 1e9:.1f} GB/s (read + write of {nbytes >> 20} MiB)")

    reported_fallbacks: set = set()

    def emit(rec):
        rec.setdefault("device", str(device))
        # a fused kernel that failed to compile sends every later op of that kernel to the torch
        # path: the records from then on do not measure the fused default, and say so
        broken = status()["broken_kernels"]
        if broken:
            rec["fused_fallback"] = broken
        records.append(rec)
        print(_row(rec), flush=True)
        for name, error in broken.items():
            if name not in reported_fallbacks:
                reported_fallbacks.add(name)
                print(f"WARNING: the fused {name} kernel failed to compile ({error}); this row and every later "
                      "one ran its torch path (marked fused_fallback in --json)", flush=True)

    def compare(comparison, fa, fb, a, b, size, nbytes=None, mem=True, device_times=None, show=True):
        """Time ``fa`` against ``fb``; ``device_times`` (default: when ``nbytes`` is given) adds the
        CUDA-graph device time of both on a GPU. ``show=False``: return the record without emitting it
        (the caller adds fields, then emits)."""
        blocks = time_blocks({"a": fa, "b": fb}, device, **timing)
        rec = paired_record(comparison, a, b, blocks["a"], blocks["b"], device=str(device), size=size)
        ta, tb = rec["a_median_s"], rec["b_median_s"]
        if nbytes is not None:
            rec["bytes"] = nbytes
            rec["a_GBps"] = nbytes / ta / 1e9
            rec["b_GBps"] = nbytes / tb / 1e9
            if copy_bps:
                rec["a_copy_fraction"] = nbytes / ta / copy_bps
                rec["b_copy_fraction"] = nbytes / tb / copy_bps
        if mem and device.type == "cuda":
            rec["a_peak_bytes"] = peak_memory(fa, device)
            rec["b_peak_bytes"] = peak_memory(fb, device)
        if device_times is None:
            device_times = nbytes is not None
        if device_times and device.type == "cuda":
            # the same ops replayed from a CUDA graph: GPU time without the host launch path
            for side, fn in (("a", fa), ("b", fb)):
                dev_s = device_time(fn, device)
                if dev_s is not None:
                    rec[f"{side}_device_s"] = dev_s
                    if copy_bps and nbytes is not None:
                        rec[f"{side}_device_copy_fraction"] = nbytes / dev_s / copy_bps
        if show:
            emit(rec)
        return rec

    # what the default path runs here: the Triton kernel, or (fused backend on a CPU) the torch path
    runs_here = q._fused.runs(torch.empty(0, device=device)) if q._fused is not None else None
    default_name = "fused" if runs_here == "triton" else ("torch path of the fused backend" if runs_here else q.backend)

    # --- geometry kernels ---------------------------------------------------------------------------
    if "projection" in sections:
        for b_, n_ in _sizes(device, quick):
            pts = b_ * n_
            x = torch.randn(b_, n_, 3, generator=gen, device=device, dtype=dtype)
            v = torch.randn(b_, n_, 3, generator=gen, device=device, dtype=dtype)
            z = torch.randn(b_, n_, 3, generator=gen, device=device, dtype=dtype)
            size = f"B={b_},N={n_},points={pts}"
            with torch.no_grad():
                compare("projection", lambda: q.horizontal_projection(v, x),
                        lambda: so3.horizontal_projection(v, x), f"default ({default_name})", "plain torch", size,
                        nbytes=fs(3 * pts * 3))
                compare("projection_curvature", lambda: (q._fused or _Plain()).projection_and_curvature(v, x),
                        lambda: (so3.horizontal_projection(v, x), so3.mean_curvature(x)),
                        f"default ({default_name})", "plain torch", size, nbytes=fs(4 * pts * 3))
                s = torch.full((b_,), 0.1, device=device, dtype=dtype)
                ref = FusedGeometry(groups.SE3, path="torch")
                geom = q._fused or ref
                compare("lifted_update", lambda: geom.lifted_update(x, v, z, 0.01, s, -0.005, tame_limit=s),
                        lambda: ref.lifted_update(x, v, z, 0.01, s, -0.005, tame_limit=s),
                        f"default ({default_name})", "plain torch", size, nbytes=fs(4 * pts * 3))
                if n_ == 29:
                    mask = qm9_mask(b_, n_)[0].to(device)
                    real = int(mask.sum())
                    compare("projection_masked", lambda: q.horizontal_projection(v, x, mask),
                            lambda: so3.horizontal_projection(v, x, mask), f"default ({default_name})", "plain torch",
                            f"B={b_},N={n_},real={real}", nbytes=fs(3 * pts * 3) + pts)
        # a user-declared group: the generated kernel vs the hand-written SE(3) kernel (same points)
        user_se3 = LieGroup("SE(3), user-declared", 3, generators=groups.so3_generators(), translations=True)
        b_, n_ = _sizes(device, quick)[0]
        pts = b_ * n_
        x = torch.randn(b_, n_, 3, generator=gen, device=device, dtype=dtype)
        v = torch.randn(b_, n_, 3, generator=gen, device=device, dtype=dtype)
        user = FusedGeometry(user_se3, path="auto", generated=True)
        hand = FusedGeometry(groups.SE3, path="auto")
        which = user.runs(x)
        with torch.no_grad():
            compare("generic_kernel", lambda: user.projection_and_curvature(v, x),
                    lambda: hand.projection_and_curvature(v, x),
                    f"user-declared SE(3) ({'generated kernel' if which != 'torch' else 'generic torch'})",
                    f"SE(3) ({'hand-written kernel' if which != 'torch' else 'so3 torch'})",
                    f"B={b_},N={n_},points={pts}", nbytes=fs(4 * pts * 3))
            torus = FusedGeometry(groups.Torus(2), path="auto")
            x4 = torch.randn(b_, n_, 4, generator=gen, device=device, dtype=dtype)
            v4 = torch.randn(b_, n_, 4, generator=gen, device=device, dtype=dtype)
            compare("generic_kernel_per_point", lambda: torus.projection_and_curvature(v4, x4),
                    lambda: hand.projection_and_curvature(v, x),
                    f"T^2 on C^2 ({'generated kernel' if which != 'torch' else 'generic torch'})",
                    f"SE(3) ({'hand-written kernel' if which != 'torch' else 'so3 torch'})",
                    f"B={b_},N={n_},points={pts}", nbytes=None)
        try:
            import geomstats  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken install is reported like a missing one
            print("note: geomstats is not installed: projection vs geomstats skipped "
                  "(pip install 'qmanifold[geomstats]')")
        else:
            _geomstats_comparison(compare, q, device, dtype, gen, quick)

    # --- molecular model: loss and sampler step ------------------------------------------------------
    if sections & {"loss", "sampler"}:
        batch = args.batch
        data = make_batch(batch, 29, device=device, dtype=dtype)
        x1, mask = data["x1"], data["mask"]
        cond = {"atom_types": data["atom_types"], "bond_types": data["bond_types"]}
        torch.manual_seed(0)
        net_kwargs = {"hidden": 64, "layers": 3} if quick else {}
        net = build_denoiser("egnn", device, dtype, **net_kwargs)
        params = sum(p.numel() for p in net.parameters())
        size = f"B={batch},N=29,real={int(mask.sum())},egnn:{params}params"
        if "loss" in sections:
            blocks = time_blocks({k: training_step(q, net, k, x1, mask, cond, gen)
                                  for k in ("quotient", "af3_align", "conventional")}, device, **timing)
            for comp, a, b in (("loss", "quotient", "af3_align"), ("train_step", "quotient", "conventional")):
                emit(paired_record(comp, a, b, blocks[a], blocks[b], device=str(device), size=size))
            # the machinery alone: P_{x_t}(residual) forward + backward vs Kabsch alignment (SVD)
            x_t = q.center(0.5 * x1 + 0.8 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
            pred = q.center(x1 + 0.3 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
            residual = torch.randn(x1.shape, generator=gen, device=device, dtype=dtype).requires_grad_(True)

            def projection_fwd_bwd():
                residual.grad = None
                q.horizontal_projection(residual, x_t, mask).square().sum().backward()

            compare("loss_machinery", projection_fwd_bwd, lambda: q.align(x1, pred, mask),
                    "P_{x_t}(residual) fwd+bwd", "Kabsch align (SVD)", size.split(",egnn")[0])

            # what the quotient loss adds to a training step: the one op in which it differs from the
            # conventional loss (P_{x_t} of the residual instead of its centring), timed alone
            def centring_fwd_bwd():
                residual.grad = None
                q.center(residual, mask).square().sum().backward()

            rec = compare("train_machinery", projection_fwd_bwd, centring_fwd_bwd, "P_{x_t}(residual) fwd+bwd",
                          "centre(residual) fwd+bwd", size, mem=False, show=False)
            _added_share(rec, statistics.median(blocks["conventional"]), "conventional training step")
            emit(rec)
        if "sampler" in sections:
            quot = QuotientDiffusion(q, net, "linear", loss="quotient", validate=False)
            x_t = q.center(0.5 * x1 + 0.8 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
            with torch.no_grad():
                # the same steps with the network's output precomputed: everything but the network
                t_mid = torch.full((batch,), 0.5, device=device, dtype=dtype)
                free = QuotientDiffusion(q, PrecomputedDenoiser(net(x_t, t_mid, mask=mask, **cond)), "linear",
                                         loss="quotient", validate=False)
                for sampler, comp in (("sde", "sampler_step"), ("ode", "sampler_step_ode")):
                    fa = one_step(quot, sampler, "quotient", x_t, mask, cond, 0.5, 0.52, gen)
                    fb = one_step(quot, sampler, "conventional", x_t, mask, cond, 0.5, 0.52, gen)
                    # ODE step: device time too, i.e. how much of a step is the host's launch path (a
                    # CUDA graph of the step would remove it). Not for the SDE step: it draws noise
                    # from a user generator, which CUDA-graph capture refuses.
                    full = compare(comp, fa, fb, "quotient", "conventional", size, mem=False,
                                   device_times=sampler == "ode")
                    rec = compare(comp.replace("_step", "_machinery"),
                                  one_step(free, sampler, "quotient", x_t, mask, cond, 0.5, 0.52, gen),
                                  one_step(free, sampler, "conventional", x_t, mask, cond, 0.5, 0.52, gen),
                                  "quotient step, network output given", "conventional step, same", size,
                                  mem=False, device_times=False, show=False)
                    _added_share(rec, full["b_median_s"], "conventional step")
                    emit(rec)
    return records


class _Plain:
    """The SE(3) plain-torch pair (P_x v, h) when the default path has no fused geometry."""

    def projection_and_curvature(self, v, x, mask=None):
        from . import so3

        return so3.horizontal_projection(v, x, mask), so3.mean_curvature(x, mask)


def _geomstats_comparison(compare, q, device, dtype, gen, quick):
    """qmanifold's projection vs geomstats' pre-shape (Kendall) bundle projection on the same
    batch (geomstats runs on the CPU with its numpy backend; qmanifold on ``device``)."""
    from geomstats.geometry.pre_shape import PreShapeBundle, PreShapeSpace

    b_, n_ = (512, 29) if quick else (4096, 29)
    space = PreShapeSpace(k_landmarks=n_, ambient_dim=3, equip=True)
    bundle = PreShapeBundle(space)
    rng = np.random.default_rng(0)
    xn = space.projection(rng.standard_normal((b_, n_, 3)))  # centred, unit norm
    vn = space.to_tangent(rng.standard_normal((b_, n_, 3)), xn)
    xd = torch.as_tensor(xn).to(device=device, dtype=dtype)
    vd = torch.as_tensor(vn).to(device=device, dtype=dtype)
    compare("projection_geomstats", lambda: q.horizontal_projection(vd, xd), lambda: bundle.horizontal_projection(vn, xn),
            f"qmanifold default ({device.type})", "geomstats PreShapeBundle (numpy)", f"B={b_},N={n_}", mem=False)


# ----------------------------------------------------------------------------------------------
# output


def _added_share(rec: dict, step_s: float, step_name: str) -> None:
    """Add to a ``*_machinery`` record what its side a costs beyond side b, as a fraction of a whole
    step (``added_share_of_step = (a - b) / step``): what the quotient machinery adds to that step."""
    rec["step_s"] = step_s
    rec["step"] = step_name
    rec["added_share_of_step"] = (rec["a_median_s"] - rec["b_median_s"]) / step_s


def _header(device, dtype, repeats, q) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    from .kernels import status

    st = status()
    lines = [
        f"qmanifold bench  |  torch {torch.__version__}  |  device {device} ({name})  |  threads {threads}  |  "
        f"{dtype}  |  {repeats} alternating blocks: medians per call; paired a/b with its 95% CI  |  "
        f"Quotient backend: {q.backend}  |  "
        f"triton: {st['triton_version'] or 'no'}"
        + (f" (launches: {'direct' if st['direct_launch'] else 'through Triton'})" if st["triton"] else ""),
        (f"{'comparison':<26} {'a':<44} {'b':<30} {'a median':>11} {'b median':>11} {'a/b':>7} {'paired a/b [95% CI]':>23} "
         f"{'a GB/s':>8} {'a %copy':>8} {'peak a/b MiB':>14}  size"),
        "-" * 214,
    ]
    return "\n".join(lines)


def _row(rec: dict) -> str:
    gbps = f"{rec['a_GBps']:8.1f}" if "a_GBps" in rec else f"{'':>8}"
    frac = f"{100 * rec['a_copy_fraction']:7.1f}%" if "a_copy_fraction" in rec else f"{'':>8}"
    mem = ""
    if rec.get("a_peak_bytes") is not None:
        mem = f"{rec['a_peak_bytes'] / 2**20:.1f}/{rec['b_peak_bytes'] / 2**20:.1f}"
    row = (f"{rec['comparison']:<26} {rec['a']:<44} {rec['b']:<30} {fmt_seconds(rec['a_median_s']):>11} "
           f"{fmt_seconds(rec['b_median_s']):>11} {rec['ratio']:7.3f} {format_paired(rec):>23} {gbps} {frac} {mem:>14}  {rec['size']}")
    if "added_share_of_step" in rec:
        row += (f"\n{'':<26}   a - b = {100 * rec['added_share_of_step']:+.2f}% of a {rec['step']} "
                f"({fmt_seconds(rec['step_s']).strip()}): what the quotient machinery adds to it")
    if "a_device_s" in rec:
        dev_frac = f" = {100 * rec['a_device_copy_fraction']:.1f}% of copy" if "a_device_copy_fraction" in rec else ""
        b_dev = f", b {fmt_seconds(rec['b_device_s']).strip()}" if "b_device_s" in rec else ""
        row += (f"\n{'':<26}   device time (CUDA graph replay, no host launch path): a "
                f"{fmt_seconds(rec['a_device_s']).strip()}{dev_frac}{b_dev}")
    return row


def format_paired(rec: dict) -> str:
    """``"1.008 [0.986, 1.031]"``: a record's paired ratio and its 95 % interval ("" without them)."""
    if "ratio_ci95" not in rec:
        return ""
    return "{:.3f} [{:.3f}, {:.3f}]".format(rec["ratio_paired"], *rec["ratio_ci95"])


def format_table(records: list[dict]) -> str:
    return "\n".join(_row(r) for r in records if r["comparison"] != "copy")


# ----------------------------------------------------------------------------------------------
# command line


SECTIONS = ("copy", "projection", "loss", "sampler")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:K)")
    p.add_argument("--quick", action="store_true", help="smaller sizes and a small EGNN (about a minute on a CPU)")
    p.add_argument("--json", metavar="PATH", help="write the records as a JSON list")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--repeats", type=int, default=None, help="alternating timing blocks (default 5 quick, else 7)")
    p.add_argument("--batch", type=int, default=64, help="molecules per batch for the loss / sampler comparisons")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine more "
                   "threads mostly add contention noise; 0 keeps torch's default)")


def handler(args) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} requested but CUDA is not available", file=sys.stderr)
        return 2
    start = time.perf_counter()
    records = run(args)
    print(f"\n(total {time.perf_counter() - start:.1f} s)")
    if args.json:
        write_json(args.json, records)
    return 0


def register(subparsers) -> None:
    """Add the ``bench`` subcommand to the ``qmanifold`` command line."""
    p = subparsers.add_parser(
        "bench",
        help="side-by-side benchmarks of the quotient machinery on this device",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=handler)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmanifold.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return handler(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
