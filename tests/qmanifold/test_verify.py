"""`qmanifold verify`: the quick suite's verdicts (positives pass, negative controls fail), the JSON
and plots it writes, and its errors on bad input."""

from __future__ import annotations

import json

import pytest
import sympy
import torch

from qmanifold import LieGroup, Quotient, groups
from qmanifold.cli import main
from qmanifold.verify.runner import (
    QUICK_CONFIG,
    VARIANTS,
    VerificationCase,
    builtin_case,
    compare_features,
    run_case,
    run_suite,
)
from qmanifold.verify.targets import make_target

REQUIRED_KEYS = {"target", "variant", "expected", "passed", "statistic", "p_value", "effect_size", "n_samples", "steps"}


@pytest.mark.slow
def test_quick_suite_verdicts_json_and_plots(tmp_path, capsys):
    """The CI suite: every positive variant passes, every negative control fails, on every target."""
    out = tmp_path / "verify.json"
    plots = tmp_path / "plots"
    code = main(["verify", "--quick", "--json", str(out), "--plots", str(plots), "--no-progress"])
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert code == 0, printed
    assert {r["target"] for r in records} == set(QUICK_CONFIG.targets)
    for r in records:
        assert REQUIRED_KEYS <= set(r)
        assert r["passed"] == (r["expected"] == "pass"), r
        assert 0.0 <= r["p_value"] <= 1.0 and r["n_samples"] == QUICK_CONFIG.n_samples
    # every negative control is present for the groups with continuous fibres, and fails
    negatives = {(r["target"], r["variant"]) for r in records if r["expected"] == "fail"}
    for target in ("so2", "se3", "torus"):
        for variant in ("sde_paper_sign", "sde_no_curvature", "garbage_vertical_conventional"):
            assert (target, variant) in negatives
    pngs = sorted(p.name for p in plots.iterdir())
    assert len(pngs) == len(records) and all(p.endswith(".png") for p in pngs)
    assert (plots / "se3__sde_paper_sign.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "verdicts as expected" in printed


def test_user_declared_group_runs_unchanged():
    """A group declared by the user (sympy action) plugs into the runner like the built-ins."""
    th, a, b, x, y = sympy.symbols("theta a b x y", real=True)
    se2 = LieGroup.from_action(
        "my SE(2)", [th, a, b], [x, y],
        [sympy.cos(th) * x - sympy.sin(th) * y + a, sympy.sin(th) * x + sympy.cos(th) * y + b],
    )
    case = VerificationCase("mine", make_target("so2"), Quotient(se2))
    good = run_case(case, "quotient_sde", n_samples=1500, steps=100)
    bad = run_case(case, "sde_paper_sign", n_samples=1500, steps=100)
    assert good.passed and good.ok
    assert not bad.passed and bad.ok
    assert builtin_case("so2_user_group").quotient.lie.translations


def test_exit_code_is_nonzero_when_a_verdict_is_unexpected(monkeypatch, capsys):
    """If a negative control passed (here: forced by declaring it a positive), the CLI says so."""
    from dataclasses import replace

    monkeypatch.setitem(VARIANTS, "sde_paper_sign", replace(VARIANTS["sde_paper_sign"], expected="pass"))
    code = main(["verify", "--targets", "so2", "--variants", "sde_paper_sign", "--n-samples", "500", "--steps", "50", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "UNEXPECTED" in captured.err


def test_bad_inputs_name_the_problem(capsys):
    assert main(["verify", "--targets", "nope", "--no-progress"]) == 2
    assert "unknown target 'nope'" in capsys.readouterr().err and True
    assert main(["verify", "--targets", "so2", "--variants", "bogus", "--no-progress"]) == 2
    assert "available:" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n_samples"):
        run_case(builtin_case("so2"), "quotient_ode", n_samples=10)
    with pytest.raises(ValueError, match="continuous fibres"):
        run_case(builtin_case("permutations"), "sde_paper_sign")
    with pytest.raises(ValueError, match="dimension 2"):
        VerificationCase("mismatch", make_target("so2"), Quotient(groups.SE3))
    with pytest.raises(ValueError, match="centred"):
        VerificationCase("mismatch", make_target("so2"), Quotient(groups.SO2))
    with pytest.raises(SystemExit):
        main(["verify", "--n-samples", "0"])


def test_compare_features_has_power_and_calibration():
    gen = torch.Generator().manual_seed(0)
    a = {"f": torch.randn(3000, generator=gen, dtype=torch.float64)}
    b = {"f": torch.randn(3000, generator=gen, dtype=torch.float64)}
    shifted = {"f": torch.randn(3000, generator=gen, dtype=torch.float64) + 0.3}
    assert compare_features(a, b)["passed"]
    res = compare_features(shifted, b)
    # a 0.3 sd shift: KS power ~1 at n = 3000 (critical D ~ 0.042 vs expected D ~ 0.12)
    assert not res["passed"] and 0.2 < res["effect_size"] < 0.4
    nan = {"f": torch.full((3000,), float("nan"), dtype=torch.float64)}
    assert not compare_features(nan, b)["passed"]
    with pytest.raises(ValueError, match="feature names"):
        compare_features({"g": a["f"]}, b)


def test_suite_skips_negative_controls_on_discrete_groups():
    records = run_suite(["lattice"], n_samples=500, steps=50, heun_steps=20, progress=False)
    assert {r.variant for r in records} == {"quotient_ode", "quotient_sde", "quotient_heun"}
    assert all(r.ok for r in records)


def test_table_keeps_columns_apart_for_huge_effect_sizes():
    from qmanifold.verify.runner import VerificationRecord, format_table

    rec = VerificationRecord(target="se3", variant="garbage_vertical_conventional", expected="fail", passed=False,
                             statistic=1.0, p_value=0.0, effect_size=726189.795, n_samples=4000, steps=200,
                             seconds=1.0, description="", group="SE(3)", features={})
    row = format_table([rec]).splitlines()[2].split()
    assert row[5:8] == ["0.00e+00", "7.262e+05", "4000"]
