"""Step-size study: denoiser evaluations needed to reach the effect size of ``qmanifold verify``.

For the toy quotients of ``qmanifold verify`` (exact denoisers, exact reference samples) and each
sampler

* ``em``   -- the lifted SDE, Euler-Maruyama (``quotient_sde``; 1 evaluation per step),
* ``heun`` -- the lifted probability-flow ODE, Heun (``quotient_heun``; 2 per step, the last
  corrector at t = 1 skipped),
* ``edm``  -- EDM-style stochastic sampler: lifted churn + Heun (``QuotientDiffusion.sample(
  sampler="edm")``; 2 per step),

each on the uniform time grid of ``qmanifold verify`` and (suffix ``_pow``) on the power grid
``t_i = 1 - (1 - i/n)^p`` (default ``p = 1.5``: smaller steps towards the data end, where the
probability-flow velocity of the linear interpolant varies fastest), passed to
``QuotientDiffusion.sample(time_grid=...)``.

run the verification at several step counts and several seeds, and record the effect size (the
largest 1-D Wasserstein distance between generated and exact invariant features, in units of the
exact feature's standard deviation), the corrected KS p-value and the number of denoiser
evaluations (counted, not computed). The reference is Euler-Maruyama at the ``verify`` default
(200 steps): the table reports, per sampler, the smallest evaluation budget whose mean effect size
is at most the reference's and whose runs all pass, and its ratio to the reference budget.

Run::

    python -m benchmarks.step_study                     # so2 + se3, 4 seeds, 4000 samples (~25 min, 1 CPU core)
    python -m benchmarks.step_study --quick             # so2 only (~1 minute)
    python -m benchmarks.step_study --json results/step_study.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from qmanifold.bench import write_json
from qmanifold.verify import runner as R

__all__ = ["run_study", "summarise", "main"]

_EDM = R.Variant("quotient_edm", "lifted EDM sampler (churn + Heun)", "pass", "edm")
SAMPLERS = {  # name -> (verify variant, power of the time grid or None for uniform)
    "em": (R.VARIANTS["quotient_sde"], None),
    "em_pow": (R.VARIANTS["quotient_sde"], "power"),
    "heun": (R.VARIANTS["quotient_heun"], None),
    "heun_pow": (R.VARIANTS["quotient_heun"], "power"),
    "edm_pow": (_EDM, "power"),
}


class _TimeGrid:
    """Make ``QuotientDiffusion.sample`` (as called by ``run_case``) use the power grid."""

    def __init__(self, power: float | None):
        self.power = power
        self._orig = R.QuotientDiffusion.sample

    def __enter__(self):
        power, orig = self.power, self._orig
        if power is not None:
            def sample(model, *args, **kwargs):
                u = torch.linspace(0.0, 1.0, kwargs["steps"] + 1, dtype=torch.float64)
                kwargs["time_grid"] = 1.0 - (1.0 - u) ** power
                return orig(model, *args, **kwargs)

            R.QuotientDiffusion.sample = sample
        return self

    def __exit__(self, *exc):
        R.QuotientDiffusion.sample = self._orig


class _Counter:
    """Counts denoiser evaluations (calls of the exact denoiser, one per batch)."""

    def __init__(self):
        self.calls = 0
        self._orig = R.ExactDenoiser.forward

    def __enter__(self):
        counter = self

        def forward(module, *args, **kwargs):
            counter.calls += 1
            return counter._orig(module, *args, **kwargs)

        R.ExactDenoiser.forward = forward
        return self

    def __exit__(self, *exc):
        R.ExactDenoiser.forward = self._orig


def run_study(cases, grids: dict[str, list[int]], *, seeds: int, n_samples: int, dtype=torch.float64,
              device="cpu", power: float = 1.5, progress: bool = True, first_seed: int = 0) -> list[dict]:
    records = []
    for case_name in cases:
        for sampler, steps_list in grids.items():
            variant, grid = SAMPLERS[sampler]
            for steps in steps_list:
                for seed in range(first_seed, first_seed + seeds):
                    start = time.perf_counter()
                    with _Counter() as counter, _TimeGrid(power if grid == "power" else None):
                        rec = R.run_case(R.builtin_case(case_name), variant, n_samples=n_samples, steps=steps,
                                         heun_steps=steps, seed=seed, dtype=dtype, device=device)
                    out = {"case": case_name, "sampler": sampler, "grid": f"power {power}" if grid else "uniform",
                           "steps": steps, "seed": seed,
                           "nfe": counter.calls, "effect_size": rec.effect_size, "p_value": rec.p_value,
                           "passed": rec.passed, "n_samples": n_samples, "seconds": time.perf_counter() - start}
                    records.append(out)
                    if progress:
                        print(f"  {case_name:5s} {sampler:8s} steps={steps:4d} seed={seed} nfe={out['nfe']:4d} "
                              f"effect={out['effect_size']:.4f} p={out['p_value']:.3g} "
                              f"{'pass' if out['passed'] else 'FAIL'} ({out['seconds']:.1f}s)", flush=True)
    return records


def noise_floor(cases, *, seeds: int, n_samples: int, dtype=torch.float64, device="cpu",
                first_seed: int = 0) -> list[dict]:
    """Effect size between two independent *exact* samples (what a perfect sampler scores): the
    floor below which differences between samplers are sampling noise."""
    out = []
    for case_name in cases:
        case = R.builtin_case(case_name)
        for seed in range(first_seed, first_seed + seeds):
            gen = torch.Generator(device=device).manual_seed(seed + 20_000)
            ref_gen = torch.Generator(device=device).manual_seed(seed + 10_000)  # as run_case
            a = case.target.sample(n_samples, gen, dtype=dtype, device=device)
            b = case.target.sample(n_samples, ref_gen, dtype=dtype, device=device)
            stats = R.compare_features(case.target.features(a), case.target.features(b))
            out.append({"case": case_name, "sampler": "exact", "grid": "-", "steps": 0, "seed": seed, "nfe": 0,
                        "effect_size": stats["effect_size"], "p_value": stats["p_value"], "passed": bool(stats["passed"]),
                        "n_samples": n_samples, "seconds": 0.0})
    return out


def _paired(rs: list[dict], ref: list[dict]) -> tuple[float, float, int]:
    """Mean and standard error of ``effect - reference effect`` over the seeds both ran. Runs of
    one seed share the initial noise and the exact reference sample, so the paired difference is
    much less noisy than the difference of the means."""
    ref_by_seed = {r["seed"]: r["effect_size"] for r in ref}
    diffs = [r["effect_size"] - ref_by_seed[r["seed"]] for r in rs if r["seed"] in ref_by_seed]
    if len(diffs) < 2:
        return float("nan"), float("nan"), len(diffs)
    return statistics.mean(diffs), statistics.stdev(diffs) / len(diffs) ** 0.5, len(diffs)


def summarise(records: list[dict], reference_steps: int) -> tuple[str, list[dict]]:
    """Mean effect size per (case, sampler, steps), its paired difference to Euler-Maruyama at
    ``reference_steps``, and the budget each sampler needs to reach that reference, by two criteria:

    * strict: mean effect size <= the reference's mean, every run passing;
    * within noise: the paired difference to the reference is at most two standard errors (the
      sampler is not detectably worse at this sample size and number of seeds), every run passing.

    When the reference sits at the exact-vs-exact noise floor the strict criterion compares two
    noise draws; then the second criterion, and a run at a larger sample size, say more.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["case"], r["sampler"], r["steps"]), []).append(r)
    rows = []
    for (case, sampler, steps), rs in sorted(groups.items()):
        effects = [r["effect_size"] for r in rs]
        ref = groups.get((case, "em", reference_steps), [])
        diff, diff_se, paired = _paired(rs, ref)
        rows.append({"case": case, "sampler": sampler, "steps": steps, "nfe": rs[0]["nfe"],
                     "effect_size": statistics.mean(effects),
                     "effect_se": statistics.stdev(effects) / len(effects) ** 0.5 if len(effects) > 1 else float("nan"),
                     "diff_vs_reference": diff, "diff_se": diff_se, "paired_seeds": paired,
                     "min_p": min(r["p_value"] for r in rs), "all_pass": all(r["passed"] for r in rs),
                     "seeds": len(rs)})
    lines = [(f"{'case':<6} {'sampler':<9} {'steps':>6} {'NFE':>6} {'effect':>8} {'± se':>7} "
              f"{'- EM ref':>9} {'± se':>7} {'min p':>8} {'pass':>5}")]
    for row in rows:
        lines.append(f"{row['case']:<6} {row['sampler']:<9} {row['steps']:>6} {row['nfe']:>6} {row['effect_size']:>8.4f} "
                     f"{row['effect_se']:>7.4f} {row['diff_vs_reference']:>+9.4f} {row['diff_se']:>7.4f} "
                     f"{row['min_p']:>8.3g} {('all' if row['all_pass'] else 'no'):>5}")
    summary = []
    lines.append("")
    lines.append(f"budget to reach the Euler-Maruyama effect size at {reference_steps} steps (every run passing; "
                 "strict: mean <= reference; within noise: paired difference <= 2 se):")
    for case in sorted({r["case"] for r in rows}):
        ref = [r for r in rows if r["case"] == case and r["sampler"] == "em" and r["steps"] == reference_steps]
        if not ref:
            lines.append(f"  {case}: no Euler-Maruyama run at {reference_steps} steps")
            continue
        target, ref_nfe = ref[0]["effect_size"], ref[0]["nfe"]
        floor = [r for r in rows if r["case"] == case and r["sampler"] == "exact"]
        if floor:
            lines.append(f"  {case:5s} (noise floor: two exact samples score {floor[0]['effect_size']:.4f})")
        for sampler in SAMPLERS:
            candidates = sorted((r for r in rows if r["case"] == case and r["sampler"] == sampler and r["all_pass"]),
                                key=lambda r: r["nfe"])
            strict = next((r for r in candidates if r["effect_size"] <= target), None)
            noise = next((r for r in candidates if r["paired_seeds"] >= 2
                          and r["diff_vs_reference"] <= 2 * r["diff_se"]), None)
            entry = {"case": case, "sampler": sampler, "target_effect": target, "reference_nfe": ref_nfe,
                     "nfe": strict["nfe"] if strict else None, "steps": strict["steps"] if strict else None,
                     "effect_size": strict["effect_size"] if strict else None,
                     "fraction_of_reference": strict["nfe"] / ref_nfe if strict else None,
                     "nfe_within_noise": noise["nfe"] if noise else None,
                     "fraction_within_noise": noise["nfe"] / ref_nfe if noise else None}
            text = (f"strict {strict['nfe']:4d} NFE ({strict['nfe'] / ref_nfe:.3f} x {ref_nfe})" if strict
                    else "strict: not reached")
            text += (f"; within noise {noise['nfe']:4d} NFE ({noise['nfe'] / ref_nfe:.3f} x; difference "
                     f"{noise['diff_vs_reference']:+.4f} ± {noise['diff_se']:.4f})" if noise else "; within noise: not reached")
            lines.append(f"  {case:5s} {sampler:8s}: {text}")
            summary.append(entry)
    return "\n".join(lines), summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=None, help="verify targets (default: so2 se3; --quick: so2)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1 (to "
                        "extend an earlier run; merge the JSON records)")
    parser.add_argument("--n-samples", type=int, default=4000, help="samples per run (the verify default)")
    parser.add_argument("--em-steps", default="50,100,200", help="Euler-Maruyama step counts (uniform grid)")
    parser.add_argument("--em-pow-steps", default="50,100", help="Euler-Maruyama step counts (power grid)")
    parser.add_argument("--heun-steps", default="16,24,32", help="Heun step counts (uniform grid)")
    parser.add_argument("--heun-pow-steps", default="8,10,12,16,20,25", help="Heun step counts (power grid)")
    parser.add_argument("--edm-pow-steps", default="12,16,25", help="EDM sampler step counts (power grid)")
    parser.add_argument("--power", type=float, default=1.5, help="power p of the grid t_i = 1 - (1 - i/n)^p")
    parser.add_argument("--reference-steps", type=int, default=200, help="Euler-Maruyama reference (verify default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="so2 only, 1 seed")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-reference", action="store_true",
                        help="do not add the Euler-Maruyama reference run (e.g. it runs in another process; "
                             "merge the JSON records and call summarise)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cases = args.cases or (["so2"] if args.quick else ["so2", "se3"])
    seeds = 1 if args.quick else args.seeds

    def ints(text):
        return [int(t) for t in text.split(",") if t]

    grids = {"em": ints(args.em_steps), "em_pow": ints(args.em_pow_steps), "heun": ints(args.heun_steps),
             "heun_pow": ints(args.heun_pow_steps), "edm_pow": ints(args.edm_pow_steps)}
    if args.reference_steps not in grids["em"] and not args.no_reference:
        grids["em"].append(args.reference_steps)
    start = time.perf_counter()
    records = noise_floor(cases, seeds=seeds, n_samples=args.n_samples, device=args.device, first_seed=args.first_seed)
    records += run_study(cases, grids, seeds=seeds, n_samples=args.n_samples, device=args.device, power=args.power,
                         first_seed=args.first_seed)
    table, summary = summarise(records, args.reference_steps)
    print()
    print(table)
    print(f"\n(total {time.perf_counter() - start:.0f} s; {args.n_samples} samples per run, {seeds} seed(s), float64)")
    result = {"records": records, "summary": summary, "config": vars(args)}
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
