"""``examples/paper_reproduction.py --quick`` end to end: it runs, writes its report, and its numbers make sense."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "paper_reproduction.py"
FIGURES = [
    "fig1_decay.png",
    "fig2_ratio.png",
    "fig3_quadratic_validity.png",
    "fig4_gm_vs_mc.png",
    "fig5_stage_timing.png",
]


def _numbers(x, path="summary"):
    """Every number in a nested JSON value, with its path (booleans are not numbers here)."""
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield path, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_reproduction")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return out, json.loads((out / "summary.json").read_text()), elapsed


@pytest.mark.slow
def test_quick_run_finishes_in_time(quick_run):
    _, summary, elapsed = quick_run
    assert summary["quick"] is True
    assert elapsed < 120, f"--quick took {elapsed:.0f} s (limit 120 s)"


@pytest.mark.slow
def test_report_and_figures_written(quick_run):
    out, summary, _ = quick_run
    report = (out / "report.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in report
    assert not re.search(r"\b(nan|inf)\b", report, flags=re.IGNORECASE)
    if importlib.util.find_spec("matplotlib") is not None:
        assert summary["figures"] == FIGURES
        for name in FIGURES:
            assert (out / name).stat().st_size > 1000
            assert f"]({name})" in report


@pytest.mark.slow
def test_headline_numbers_finite(quick_run):
    _, summary, _ = quick_run
    required = {
        "decay": summary["decay"],
        "ratio": {k: summary["ratio"][k] for k in ("a2", "delta2", "delta2_se", "delta2_D", "ratio", "excess_D")},
        "validity": summary["validity"]["error_float64"],
        "gm_vs_mc": summary["gm_vs_mc"],
        "timing": summary["timing"],
        "model": summary["model"],
    }
    numbers = list(_numbers(required))
    assert len(numbers) > 100
    bad = [(p, v) for p, v in numbers if not math.isfinite(v)]
    assert not bad, bad
    # None in JSON stands for a non-finite value; none may hide in the required numbers
    assert "null" not in json.dumps(required)


@pytest.mark.slow
def test_slopes_negative_and_sensible(quick_run):
    _, summary, _ = quick_run
    slopes = summary["decay"]["slopes"]
    for name in ("delta1", "delta2", "delta2_D"):
        assert slopes[name] < 0, (name, slopes[name])
    # theory: about -1 and -2; loose bounds, the quick run has five small k
    assert -1.6 < slopes["delta1"] < -0.5
    assert -3.0 < slopes["delta2"] < -1.2
    assert -3.0 < slopes["delta2_D"] < -1.2
    pkg = summary["decay"]["package_slopes"]
    assert abs(pkg["delta2_D"] - slopes["delta2_D"]) < 1e-9
    assert abs(pkg["delta1"] - slopes["delta1"]) < 1e-9


@pytest.mark.slow
def test_estimators_and_stage_one_consistent(quick_run):
    _, summary, _ = quick_run
    mc = summary["gm_vs_mc"]
    for d in range(len(mc["D"])):
        for i, sigma in enumerate(mc["sigma"]):
            if sigma <= 1e-2:  # inside the quadratic regime: the closed form agrees with direct MC within its noise
                assert mc["rel_error"][d][i] < 5 * mc["rel_se"][d][i] + 1e-6
                assert mc["model_error"][d][i] < 1e-2
    stage1 = summary["timing"]["stage1"]
    assert stage1["lanczos"]["converged"]
    assert stage1["lanczos"]["residual"] <= summary["config"]["tol"] * 1.01
    assert stage1["power"]["hvps"] <= summary["timing"]["D"] * summary["config"]["power_max_iter"]
    stage3 = summary["timing"]["stage3"]
    assert stage3["gaussian_moment"]["seconds"] < stage3["direct_mc"]["seconds"]
    validity = summary["validity"]["error_float64"]
    assert validity[-1] > validity[len(validity) // 2]  # the quadratic model degrades at large sigma
