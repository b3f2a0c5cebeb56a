"""``examples/stopping_study.py``: its data, its replay of the stopping rules, and ``--quick`` end to end."""

from __future__ import annotations

import hashlib
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
SCRIPT = ROOT / "examples" / "stopping_study.py"
DATA = ROOT / "examples" / "stopping_study" / "data"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("stopping_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stopping_study")
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


# ------------------------------------------------------------------------------------------------------------ data


def test_shipped_data_match_their_provenance_checksums():
    text = (DATA / "PROVENANCE.md").read_text()
    for name in ("digits.csv.gz", "breast_cancer.csv"):
        digest = hashlib.sha256((DATA / name).read_bytes()).hexdigest()
        assert f"`{digest}`" in text, name


def test_loaders_read_the_tables_and_split_them_disjointly(study):
    cfg = study.Config()
    digits = study.load_digits(0, cfg)
    n = [len(d) for d in (digits.train, digits.val, digits.test)]
    assert sum(n) == 1797 and n[0] == int(0.6 * 1797)
    x, y = digits.train.tensors
    assert x.shape[1] == 64 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    cancer = study.load_cancer(1, cfg)
    assert sum(len(d) for d in (cancer.train, cancer.val, cancer.test)) == 569
    xt, yt = cancer.train.tensors
    assert xt.shape[1] == 30 and set(yt.tolist()) == {0, 1}
    assert float(xt.mean(0).abs().max()) < 1e-5 and float((xt.std(0) - 1).abs().max()) < 1e-5  # standardised
    rows = {tuple(r.tolist()) for d in (cancer.train, cancer.val, cancer.test) for r in d.tensors[0]}
    assert len(rows) == 569  # no row in two splits (the table has no duplicate rows)


def test_alice_windows_come_from_disjoint_parts_of_the_book(study):
    cfg = study.QUICK
    split = study.load_alice(0, cfg)
    text = study.load_alice_text()
    vocab = sorted(set(text))
    assert split.num_classes == len(vocab) and split.num_features == cfg.alice_context
    parts = []
    for data in (split.train, split.val, split.test):
        x, y = data.tensors
        assert x.shape == (len(y), cfg.alice_context)
        windows = {
            "".join(vocab[i] for i in row.tolist()) + vocab[int(t)] for row, t in zip(x[:50], y[:50], strict=True)
        }
        parts.append(windows)
    cut1, cut2 = int(0.70 * len(text)), int(0.85 * len(text))
    for w in parts[0]:
        assert text.find(w) < cut1
    for w in parts[2]:
        assert text.find(w, cut2) >= cut2


# ----------------------------------------------------------------------------------------------------------- rules


def test_early_stopping_replay_follows_lightning_semantics(study):
    es = study.early_stopping
    values = [5.0, 4.0, 4.5, 4.2, 3.0, 3.1, 3.2, 3.3]
    assert es(values, patience=3) == 7  # best at 4; 5, 6, 7 do not improve; stops after the third
    assert es(values, patience=4) == 7  # never reaches 4 waits: the last epoch
    assert es([1.0, 0.99, 0.98, 0.97], patience=2, min_delta=0.05) == 2  # improvements smaller than min_delta
    assert es([1.0, 0.5, 0.45, 0.2], patience=1, min_delta=[0.0, 0.1, 0.1, 0.1]) == 2
    assert es([1.0, float("nan"), 0.5], patience=5) == 1  # check_finite stops at a NaN
    assert es([3.0, 3.0, 3.0], patience=5) == 2


def test_change_z_and_thresholds(study):
    z = study.change_z([10.0, 8.0, 8.0], [1.0, 1.0, 0.0])
    assert math.isnan(z[0]) and z[1] == pytest.approx(-2 / math.sqrt(2)) and z[2] == 0.0
    assert study.first_run([False, True, True, False, True, True, True], patience=3) == 6
    assert study.first_run([True, False], patience=2) == 1
    assert study.threshold_stop([1.0, 0.5, 0.009, 0.001], 0.01) == 2
    assert study.threshold_stop([1.0, 0.01], 0.01) == 1  # strict: never below, the last epoch


def test_evaluate_rules_on_a_synthetic_trace(study):
    """A hand-made trace: the best validation epoch, each rule's stop, its regret and its cost."""
    cfg = study.Config(patience=2)
    val = [1.0, 0.8, 0.7, 0.75, 0.8, 0.9]
    delta2 = [1.0, 2.0, 1.5, 0.5, 0.01, 0.005]
    rows = []
    for e in range(6):
        rows.append(
            {
                "val_loss": val[e],
                "test_loss": val[e] + 0.1,
                "test_acc": 0.5,
                "train_s": 1.0,
                "val_s": 0.5,
                "probe_s": 2.0,
                "curve_s": 7.0,
                "heldout_probe_s": 3.0,
                "delta2": delta2[e],
                "delta2_stderr": 0.1,
                "delta2_rel_peak": delta2[e] / max(delta2[: e + 1]),
                "excess": 0.0,
                "heldout_delta2": val[e],
                "curve_slope": -2.0,
                "curve_intercept": 0.0,
            }
        )
    trace = {"rows": rows, "n_train": 100, "preflight_s": 0.25, "heldout_preflight_s": 0.0}
    res = study.evaluate_rules(trace, cfg)
    assert res["_best"]["epoch"] == 2
    assert res["fixed"]["stop_epoch"] == 5 and res["fixed"]["saved"] == 0.0
    assert res["val_loss"]["stop_epoch"] == 4  # 3 and 4 do not improve on epoch 2
    assert res["val_loss"]["cost_s"] == pytest.approx(5 * 1.5)
    assert res["val_loss"]["test_loss_regret"] == pytest.approx(0.1) and res["val_loss"]["ckpt_regret"] == 0.0
    assert res["delta2"]["stop_epoch"] == 2  # the hump: epochs 1 and 2 above epoch 0's value
    assert res["delta2"]["cost_s"] == pytest.approx(3 * 3.0 + 0.25)
    assert res["rel_peak"]["stop_epoch"] == 4  # 0.01 / 2.0 < 0.01
    assert res["rel_peak"]["saved"] == pytest.approx(1 - (5 * 3.0 + 0.25) / 6.0)
    assert res["heldout_delta2"]["stop_epoch"] == 4


# ------------------------------------------------------------------------------------------------------- --quick


@pytest.mark.slow
def test_quick_run_finishes_in_seconds(quick_run):
    _, summary, elapsed = quick_run
    assert summary["quick"] is True
    assert elapsed < 90, f"--quick took {elapsed:.0f} s"


@pytest.mark.slow
def test_quick_report_and_figures(quick_run):
    out, summary, _ = quick_run
    report = (out / "report.md").read_text()
    for heading in ("## Summary", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7.", "## 8."):
        assert heading in report, heading
    assert not re.search(r"\b(nan|inf)\b", report, flags=re.IGNORECASE)
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(summary["figures"]) == 4
        for name in summary["figures"]:
            assert (out / name).stat().st_size > 10_000
            assert f"]({name})" in report


@pytest.mark.slow
def test_quick_replay_matches_live_early_stopping(quick_run):
    """Refits with real EarlyStopping callbacks stop where the replay says, on identical logged values."""
    _, summary, _ = quick_run
    checks = summary["live_checks"]
    assert {c["rule"] for c in checks} == {"val_loss", "delta2_se", "rel_peak"}
    for c in checks:
        assert c["identical_values"] and c["live_stop"] == c["replayed_stop"], c


@pytest.mark.slow
def test_quick_traces_hold_the_decomposition_and_the_timings(quick_run):
    """Every probe's terms sum to the logged delta2 (Gaussian moment, float32 model) and every rule is accounted."""
    _, summary, _ = quick_run
    assert {t["task"] for t in summary["traces"]} == {"alice", "digits", "cancer"}
    for trace in summary["traces"]:
        for row in trace["rows"]:
            total = row["delta2_terms/a2"] + row["delta2_terms/gradient"] + row["delta2_terms/curvature"]
            assert total == pytest.approx(row["delta2"], rel=1e-5)
            assert 0 < row["delta2_rel_peak"] <= 1.0
            assert row["discrepancy"] == pytest.approx(
                (summary["config"]["num_probe_samples"] + 1) ** 2 * row["delta2"]
            )
            assert row["probe_s"] > 0 and row["train_s"] > 0 and row["heldout_probe_s"] > 0
    for res in summary["analysis"]["per_run"].values():
        for name, r in res.items():
            if name != "_best":
                assert 0 <= r["stop_epoch"] < 10 and r["cost_s"] > 0 and r["saved"] < 1, (name, r)
