"""What does the quotient machinery cost? Side-by-side timings of the engine on a QM9-like batch.

Run::

    python -m benchmarks.bench_engine                    # CPU, full timings
    python -m benchmarks.bench_engine --quick            # < 1 minute on a laptop CPU
    python -m benchmarks.bench_engine --device cuda --json results.json

For each comparison "a vs b" the same denoiser (``models.egnn.EGNNDenoiser``, optionally
``models.transformer.TransformerDenoiser``) and the same batch are used, and a and b are timed in
alternating blocks (so that background load affects both alike); the median time per call is
reported with ``ratio = a / b``.

Comparisons (see benchmarks/README.md for how to read them):

* sampler step: one quotient step vs one conventional step, for the ODE (denoiser + P_x) and the
  SDE (denoiser + P_x on drift and noise + mean curvature h + noise) samplers; the "overhead"
  column is ``(quotient - conventional) / conventional``;
* geometry: the projection plus curvature vs one denoiser forward; P_x (and P_x + h) alone vs
  centring alone;
* training: loss forward + backward, quotient vs conventional vs af3_align (Kabsch by SVD); and the
  quotient machinery alone (P_{x_t} of the residual, forward and forward + backward) vs Kabsch
  alignment alone (AF3 aligns onto a detached prediction, so it needs no backward).

``--quick`` uses a smaller EGNN (hidden 64, 3 layers) and 5 repeats; the default runs the denoisers
at their default size (EGNN hidden 128, 6 layers) with 7 repeats. On CPU the default is one thread
(``--threads``): on a shared machine extra intra-op threads mostly add contention noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch

import groups
from qmanifold import SDE, Quotient, QuotientDiffusion, integrate

__all__ = ["make_batch", "time_group", "time_pair", "run", "main"]


# ----------------------------------------------------------------------------------------------
# inputs


def make_batch(batch: int = 64, n_max: int = 29, *, seed: int = 0, device="cpu", dtype=torch.float32) -> dict:
    """A fixed QM9-like padded batch: sizes ~ QM9 (mean 18 atoms with H, 3..n_max), at least one
    molecule with ``n_max`` atoms, random (fixed) atom and symmetric bond types, coordinates with a
    ~1.5 Å spread, centred over the real atoms."""
    rng = np.random.default_rng(seed)
    sizes = np.clip(np.rint(rng.normal(18.0, 3.0, size=batch)), 3, n_max).astype(int)
    sizes[0] = n_max
    mask = torch.zeros(batch, n_max, dtype=torch.bool)
    for b, k in enumerate(sizes):
        mask[b, :k] = True
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
        from models.egnn import EGNNDenoiser

        net = EGNNDenoiser(**kwargs)
    elif name == "transformer":
        from models.transformer import TransformerDenoiser

        net = TransformerDenoiser(**kwargs)
    else:
        raise ValueError(f"unknown denoiser {name!r}; choose 'egnn' or 'transformer'")
    return net.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_group(fns: dict[str, Callable], device: torch.device, *, repeats: int, warmup: int = 2,
               block_s: float = 0.05) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin in blocks after warm-up.

    The functions are interleaved (block of f1, block of f2, ..., repeated ``repeats`` times) so that
    changing background load affects all of them alike. Each block runs ``number`` calls, chosen
    from the last warm-up round so that a block of the slowest function lasts about ``block_s``,
    and is bracketed by device synchronisation.
    """
    slowest = 1e-7
    for _ in range(warmup):
        for f in fns.values():
            _sync(device)
            start = time.perf_counter()
            f()
            _sync(device)
            slowest = max(slowest, time.perf_counter() - start)
    number = max(1, int(block_s / slowest))

    def block(f):
        _sync(device)
        start = time.perf_counter()
        for _ in range(number):
            f()
        _sync(device)
        return (time.perf_counter() - start) / number

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(block(f))
    return {k: statistics.median(v) for k, v in times.items()}


def time_pair(fa: Callable, fb: Callable, device: torch.device, **kwargs) -> tuple[float, float]:
    """:func:`time_group` for two functions: ``(median_a, median_b)`` in seconds per call."""
    out = time_group({"a": fa, "b": fb}, device, **kwargs)
    return out["a"], out["b"]


# ----------------------------------------------------------------------------------------------
# the comparisons


def _one_step(model: QuotientDiffusion, sampler: str, geometry: str, x, mask, cond, t0: float, t1: float, gen):
    """Exactly what QuotientDiffusion.sample does per Euler(-Maruyama) step, for one step."""
    q = model.quotient
    if sampler == "ode":
        sde = SDE(drift=lambda x, t, mask=None: model.velocity(x, t, mask, **cond), diffusion=0)
    else:
        interp = model.interpolant

        def eta_fn(t):  # the sampler's default noise level eta(t) = ahat(t)^2
            return interp.ahat(t).square()

        def drift(x, t, mask=None):
            v, s = model.velocity_and_score(x, t, mask, **cond)
            return v + eta_fn(t).to(x.dtype).reshape(-1, 1, 1) * s

        sde = SDE(drift=drift, diffusion=lambda t: torch.sqrt(2.0 * eta_fn(t)))
    lifted = q.lift(sde) if geometry == "quotient" else q.conventional(sde)
    times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)

    def step():
        return integrate(lifted, x, times=times, mask=mask, generator=gen)

    return step


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    data = make_batch(args.batch, args.atoms, device=device, dtype=dtype)
    x1, mask = data["x1"], data["mask"]
    cond = {"atom_types": data["atom_types"], "bond_types": data["bond_types"]}
    size = f"B={args.batch},N={args.atoms},real={int(mask.sum())}"
    repeats = args.repeats or (5 if args.quick else 7)
    timing = dict(repeats=repeats, warmup=1 if args.quick else 2, block_s=0.02 if args.quick else 0.2)
    net_kwargs = {"hidden": 64, "layers": 3} if args.quick else {}
    q = Quotient(groups.SE3)
    gen = torch.Generator(device=device).manual_seed(0)
    records: list[dict] = []

    def emit(comparison, a, b, ta, tb, model_size=""):
        rec = {"comparison": comparison, "a": a, "b": b, "a_median_s": ta, "b_median_s": tb,
               "ratio": ta / tb, "device": str(device), "size": size + model_size}
        records.append(rec)
        print(_row(rec), flush=True)

    def compare(comparison, fns: dict, pairs, model_size=""):
        med = time_group(fns, device, **timing)
        for a, b in pairs:
            emit(comparison, a, b, med[a], med[b], model_size)

    print(_header(device, dtype, size, repeats))
    for name in args.denoisers:
        torch.manual_seed(0)
        net = build_denoiser(name, device, dtype, **net_kwargs)
        model_size = f",{name}:{sum(p.numel() for p in net.parameters())}params"
        quot = QuotientDiffusion(q, net, "linear", loss="quotient")
        x_t = q.center(0.5 * x1 + 0.8 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
        t = torch.full((x1.shape[0],), 0.5, device=device, dtype=dtype)

        with torch.no_grad():
            # --- one sampler step: quotient vs conventional ---------------------------------------
            for sampler in ("ode", "sde"):
                compare(f"{name}: {sampler} sampler step", {
                    "quotient": _one_step(quot, sampler, "quotient", x_t, mask, cond, 0.5, 0.52, gen),
                    "conventional": _one_step(quot, sampler, "conventional", x_t, mask, cond, 0.5, 0.52, gen),
                }, [("quotient", "conventional")], model_size)

            # --- geometry alone vs the network -------------------------------------------------
            v = net(x_t, t, mask=mask, **cond)
            compare(f"{name}: geometry vs network", {
                "P_x + h(x)": lambda: (q.horizontal_projection(v, x_t, mask), q.mean_curvature(x_t, mask)),
                f"{name} forward": lambda: net(x_t, t, mask=mask, **cond),
            }, [("P_x + h(x)", f"{name} forward")], model_size)

        # --- training: loss forward + backward ------------------------------------------------
        def train_step(kind):
            model = QuotientDiffusion(q, net, "linear", loss=kind)

            def f():
                net.zero_grad(set_to_none=True)
                model.loss(x1, mask, generator=gen, **cond).backward()
            return f

        compare(f"{name}: loss fwd+bwd", {k: train_step(k) for k in ("quotient", "conventional", "af3_align")},
                [("quotient", "conventional"), ("af3_align", "conventional"), ("quotient", "af3_align")], model_size)

    # --- the machinery alone ------------------------------------------------------------------------
    v = torch.randn(x1.shape, generator=gen, device=device, dtype=dtype)
    x_t = q.center(0.5 * x1 + 0.8 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)
    with torch.no_grad():
        compare("geometry alone", {
            "P_x (SE(3))": lambda: q.horizontal_projection(v, x_t, mask),
            "P_x + h(x)": lambda: (q.horizontal_projection(v, x_t, mask), q.mean_curvature(x_t, mask)),
            "centre": lambda: q.center(v, mask),
        }, [("P_x (SE(3))", "centre"), ("P_x + h(x)", "centre")])

    residual = v.clone().requires_grad_(True)
    pred = q.center(x1 + 0.3 * torch.randn(x1.shape, generator=gen, device=device, dtype=dtype), mask)

    def projection_fwd_bwd():
        residual.grad = None
        q.horizontal_projection(residual, x_t, mask).square().sum().backward()

    def projection_fwd():
        with torch.no_grad():
            return q.horizontal_projection(residual, x_t, mask)

    compare("loss machinery alone", {
        "P_{x_t}(residual) fwd+bwd": projection_fwd_bwd,
        "P_{x_t}(residual) fwd": projection_fwd,
        "Kabsch align (SVD)": lambda: q.align(x1, pred, mask),
    }, [("P_{x_t}(residual) fwd+bwd", "Kabsch align (SVD)"), ("P_{x_t}(residual) fwd", "Kabsch align (SVD)")])
    return records


# ----------------------------------------------------------------------------------------------
# output


def _fmt(s: float) -> str:
    if s >= 1.0:
        return f"{s:8.3f} s "
    if s >= 1e-3:
        return f"{s * 1e3:8.3f} ms"
    return f"{s * 1e6:8.1f} us"


def _header(device, dtype, size, repeats) -> str:
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"qmanifold engine benchmark  |  torch {torch.__version__}  |  device {device} ({name})  |  "
        f"threads {threads}  |  {dtype}  |  {size}  |  {repeats} alternating blocks, median per call",
        f"{'comparison':<34} {'a':<28} {'b':<22} {'a median':>11} {'b median':>11} {'a/b':>7} {'overhead':>9}",
        "-" * 130,
    ]
    return "\n".join(lines)


def _row(rec: dict) -> str:
    over = f"{100 * (rec['ratio'] - 1):+8.1f}%" if rec["b"] == "conventional" else ""
    return (f"{rec['comparison']:<34} {rec['a']:<28} {rec['b']:<22} {_fmt(rec['a_median_s']):>11} "
            f"{_fmt(rec['b_median_s']):>11} {rec['ratio']:7.3f} {over:>9}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:K)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the records as a JSON list")
    parser.add_argument("--quick", action="store_true", help="EGNN only, at hidden 64 / 3 layers, 5 repeats "
                        "(< 1 minute on CPU)")
    parser.add_argument("--denoisers", default=None, help="comma list of egnn,transformer (default: egnn; both "
                        "unless --quick)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--atoms", type=int, default=29, help="padded number of atoms N")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--repeats", type=int, default=None, help="alternating timing blocks per comparison "
                        "(default 5 with --quick, else 7)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine "
                        "more threads mostly add contention noise; 0 keeps torch's default)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.denoisers is None:
        args.denoisers = ["egnn"] if args.quick else ["egnn", "transformer"]
    else:
        args.denoisers = [d.strip() for d in args.denoisers.split(",") if d.strip()]
    start = time.perf_counter()
    records = run(args)
    print(f"\n(total {time.perf_counter() - start:.1f} s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=2)
        print(f"wrote {len(records)} records to {args.json}")
    return records


if __name__ == "__main__":
    main(sys.argv[1:])
