"""``qmanifold bench`` and the benchmark scripts: they run, and what they write has the promised form.

Timings themselves are not asserted (they are the benchmark's output, not a property of the
code); the record format, the ratios' arithmetic and the comparisons the issue asks for are.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from qmanifold import bench
from qmanifold.cli import main as cli_main

REQUIRED = {"comparison", "a", "b", "a_median_s", "b_median_s", "ratio", "device", "size"}


@pytest.fixture(scope="module")
def quick_records(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    # the command line as a user runs it, one timing block per side to keep the test short
    assert cli_main(["bench", "--quick", "--repeats", "1", "--json", str(path)]) == 0
    return json.loads(path.read_text(), parse_constant=_reject)  # strict JSON: no NaN / Infinity


def _reject(constant):
    raise ValueError(f"non-standard JSON constant {constant}")


def test_bench_json_records_have_the_documented_fields(quick_records):
    comparisons = {r["comparison"] for r in quick_records}
    assert {"sampler_step", "loss", "projection", "copy", "train_step", "lifted_update"} <= comparisons
    for rec in quick_records:
        assert REQUIRED <= set(rec), rec
        assert rec["device"] == "cpu"
        if rec["comparison"] == "copy":
            assert rec["a_GBps"] > 0 and rec["b_median_s"] is None and rec["ratio"] is None  # no b side
            continue
        assert rec["a_median_s"] > 0 and rec["b_median_s"] > 0
        assert math.isclose(rec["ratio"], rec["a_median_s"] / rec["b_median_s"], rel_tol=1e-12)
        assert "a_device_s" not in rec  # CUDA-graph device time exists only on a GPU
        assert "ratio_ci95" not in rec  # one round (--repeats 1) gives no interval


def test_bench_pairs_are_the_ones_the_issue_names(quick_records):
    by_name = {r["comparison"]: r for r in quick_records}
    assert (by_name["sampler_step"]["a"], by_name["sampler_step"]["b"]) == ("quotient", "conventional")
    assert (by_name["loss"]["a"], by_name["loss"]["b"]) == ("quotient", "af3_align")
    assert by_name["projection"]["a"].startswith("default") and by_name["projection"]["b"] == "plain torch"
    assert 0 < by_name["projection"]["a_copy_fraction"] < 1.5  # bytes / time / copy bandwidth


def test_bench_reports_what_the_machinery_adds_to_a_step(quick_records):
    """``*_machinery`` records time the part of a step in which quotient and conventional differ
    (the sampler step with the network's output given; P_{x_t} vs centring of the loss residual) and
    express a - b as a share of the whole conventional step timed in the same run."""
    by_name = {r["comparison"]: r for r in quick_records}
    for machinery, whole in (("sampler_machinery", "sampler_step"), ("sampler_machinery_ode", "sampler_step_ode"),
                             ("train_machinery", "train_step")):
        rec = by_name[machinery]
        assert rec["step_s"] == by_name[whole]["b_median_s"]
        assert math.isclose(rec["added_share_of_step"], (rec["a_median_s"] - rec["b_median_s"]) / rec["step_s"],
                            rel_tol=1e-12)
        # the network is not in it: a machinery step is far cheaper than the whole step
        assert rec["a_median_s"] < 0.5 * by_name[whole]["a_median_s"], rec


def test_precomputed_denoiser_returns_its_output_unchanged():
    out = torch.randn(2, 5, 3)
    net = bench.PrecomputedDenoiser(out)
    assert net(torch.zeros(2, 5, 3), torch.zeros(2)) is net.output and torch.equal(net.output, out)


def test_bench_marks_records_after_a_fused_kernel_fell_back(monkeypatch, capsys, tmp_path):
    """A fused kernel that failed to compile sends its later ops to the torch path; the rows timed
    from then on carry ``fused_fallback`` and the run prints a warning naming the kernel."""
    import qmanifold.kernels as K

    monkeypatch.setattr(K, "_BROKEN", {"se3": "CompilationError: (stand-in)"})
    torch.set_num_threads(1)
    path = tmp_path / "bench.json"
    assert cli_main(["bench", "--quick", "--repeats", "1", "--sections", "projection", "--json", str(path)]) == 0
    records = json.loads(path.read_text())
    timed = [r for r in records if r["comparison"] != "copy"]  # (the copy bandwidth is no kernel of ours)
    assert timed and all(r["fused_fallback"] == {"se3": "CompilationError: (stand-in)"} for r in timed)
    out = capsys.readouterr().out
    assert out.count("WARNING: the fused se3 kernel failed to compile") == 1


def test_bench_reports_a_ratio_interval_from_paired_rounds(tmp_path, capsys):
    torch.set_num_threads(1)
    path = tmp_path / "bench.json"
    assert cli_main(["bench", "--quick", "--repeats", "3", "--sections", "projection", "--json", str(path)]) == 0
    timed = [r for r in json.loads(path.read_text()) if r["comparison"] != "copy"]
    assert len(timed) >= 7
    for rec in timed:
        lo, hi = rec["ratio_ci95"]
        assert 0 < lo <= rec["ratio_paired"] <= hi and math.isfinite(hi), rec
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("projection "))
    assert "{:.3f} [{:.3f}, {:.3f}]".format(timed[0]["ratio_paired"], *timed[0]["ratio_ci95"]) in row


def test_paired_ratio_is_the_geometric_mean_with_the_t_interval_of_log_ratios():
    # a constant ratio gives a zero-width interval, whatever load drift the rounds share
    drift = [1.0, 3.0, 0.5, 2.0, 1.5]
    est, lo, hi = bench.paired_ratio([1.1 * d for d in drift], drift)
    assert est == pytest.approx(1.1, rel=1e-12)
    assert lo == pytest.approx(1.1, rel=1e-12) and hi == pytest.approx(1.1, rel=1e-12)
    # by hand for two rounds: logs 0 and log 2, mean log(2)/2, sd log(2)/sqrt(2), t_{0.975,1} = 12.706
    est, lo, hi = bench.paired_ratio([1.0, 2.0], [1.0, 1.0])
    half = 12.7062047 * (math.log(2) / math.sqrt(2)) / math.sqrt(2)
    assert est == pytest.approx(math.sqrt(2), rel=1e-12)
    assert lo == pytest.approx(math.exp(math.log(2) / 2 - half), rel=1e-6)
    assert hi == pytest.approx(math.exp(math.log(2) / 2 + half), rel=1e-6)
    est, lo, hi = bench.paired_ratio([1.0], [2.0])
    assert est == 0.5 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="paired rounds"):
        bench.paired_ratio([1.0, 2.0], [1.0])


def test_paired_ratio_interval_covers_the_true_ratio_at_its_level():
    """Coverage under the model it assumes (independent log-normal noise per block, a drift shared by
    the round): 95 % of the intervals contain the true ratio. 4000 runs of 5 rounds: the standard
    error of the coverage is 0.35 %, so [93.5 %, 96.5 %] has ample room; a normal quantile instead of
    Student's (coverage ~88 %) or a missing sqrt(n) (~100 %) falls outside."""
    gen = torch.Generator().manual_seed(0)
    runs, rounds, true_ratio = 4000, 5, 1.07
    drift = torch.exp(0.5 * torch.randn(runs, rounds, generator=gen, dtype=torch.float64))
    noise_a = torch.exp(0.08 * torch.randn(runs, rounds, generator=gen, dtype=torch.float64))
    noise_b = torch.exp(0.08 * torch.randn(runs, rounds, generator=gen, dtype=torch.float64))
    times_a, times_b = (true_ratio * drift * noise_a).tolist(), (drift * noise_b).tolist()
    covered = sum(lo <= true_ratio <= hi for _, lo, hi in map(bench.paired_ratio, times_a, times_b))
    assert 0.935 <= covered / runs <= 0.965, covered / runs


def test_bench_rejects_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the error path is for machines without one")
    assert cli_main(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_timing_helpers():
    calls = {"a": 0, "b": 0}

    def fa():
        calls["a"] += 1

    def fb():
        calls["b"] += 1

    out = bench.time_group({"a": fa, "b": fb}, torch.device("cpu"), repeats=3, warmup=1, block_s=0.001)
    assert set(out) == {"a", "b"} and all(v > 0 for v in out.values())
    assert calls["a"] == calls["b"] >= 4  # interleaved blocks of the same length
    order = []
    bench.time_group({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, torch.device("cpu"),
                     repeats=2, warmup=1, block_s=1e-9)
    assert order == ["a", "b", "a", "b", "b", "a"]  # warm-up, then rounds in rotated order
    assert bench.device_time(fa, torch.device("cpu")) is None
    assert bench.fmt_seconds(2.5).strip() == "2.500 s" and bench.fmt_seconds(2e-6).strip() == "2.0 us"


def test_step_study_summary_picks_the_cheapest_passing_budget():
    from benchmarks.step_study import summarise

    def rec(sampler, steps, nfe, effect, passed=True, seed=0):
        return {"case": "toy", "sampler": sampler, "steps": steps, "nfe": nfe, "effect_size": effect,
                "p_value": 0.5 if passed else 1e-9, "passed": passed, "seed": seed}

    records = [rec("em", 200, 200, 0.050), rec("em", 200, 200, 0.040, seed=1),
               rec("heun_pow", 8, 15, 0.055), rec("heun_pow", 8, 15, 0.030, seed=1),   # mean 0.0425 <= 0.045
               rec("heun_pow", 6, 11, 0.020), rec("heun_pow", 6, 11, 0.020, False, seed=1),  # one run fails
               rec("edm_pow", 10, 19, 0.090), rec("edm_pow", 10, 19, 0.080, seed=1)]
    table, summary = summarise(records, reference_steps=200)
    found = {s["sampler"]: s for s in summary}
    assert found["heun_pow"]["nfe"] == 15 and math.isclose(found["heun_pow"]["fraction_of_reference"], 15 / 200)
    assert found["edm_pow"]["nfe"] is None
    assert "not reached" in table
    # within noise: the paired difference to EM (seed by seed) is at most two standard errors
    assert found["heun_pow"]["nfe_within_noise"] == 15
    assert found["edm_pow"]["nfe_within_noise"] is None  # +0.04 ± 0.005: clearly worse
