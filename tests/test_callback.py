"""CurvatureStabilityCallback inside a real (tiny, CPU) Lightning Trainer: SPEC §3–§4."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _lightning_helpers import (
    NUM_PARAMS_BN,
    ManualClassifier,
    TinyClassifier,
    ce_loss,
    column,
    loaders,
    make_dataset,
    make_trainer,
    probe_batch,
    read_metrics_csv,
)
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_curvprobe import CurvatureStabilityCallback
from lightning_curvprobe._signals import SIGNAL_KEYS
from lightning_curvprobe.functional import probe_stability

KEYS = (
    "delta2",
    "delta1",
    "lambda_max",
    "subspace_overlap",
    "hvps",
    "quadratic_error",
    "sigma",
    "probe_seconds",
    "overhead",
    *SIGNAL_KEYS,
)
PREFIXED = {f"curvprobe/{k}" for k in KEYS}

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
    "ignore:.*no logger configured.*",
    "ignore:.*The number of training batches.*",
    "ignore:.*litlogger.*",
)


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    """``Trainer(deterministic=True)`` flips process-wide switches: put them back for the other tests."""
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.set_rng_state(rng)


def probe(**kwargs: Any) -> CurvatureStabilityCallback:
    defaults: dict[str, Any] = {"num_eigenvectors": 3, "sigma": 1e-2, "num_probe_samples": 32}
    defaults.update(kwargs)
    return CurvatureStabilityCallback(**defaults)


def fit(tmp_path: Path, callbacks: list[Any], model_kw: dict[str, Any] | None = None, **trainer_kw: Any):
    """``seed_everything(0)``, then a fresh ``TinyClassifier(**model_kw)`` fitted on the shuffled loader."""
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(**(model_kw or {}))
    train, val = loaders()
    trainer = make_trainer(tmp_path, callbacks=callbacks, **trainer_kw)
    trainer.fit(model, train, val)
    return trainer, model


# ----------------------------------------------------------------------------------------------- EarlyStopping


def test_early_stopping_threshold_stops_at_the_predicted_epoch(tmp_path):
    max_epochs = 5
    # an over-confident start: per-sample losses are spread widely at first and delta2 falls as the model fits
    model_kw = {"lr": 0.01, "head_scale": 10.0}
    ref = probe()
    fit(tmp_path / "ref", [ref], model_kw, max_epochs=max_epochs)
    values = [h["delta2"] for h in ref.history]
    assert len(values) == max_epochs and all(math.isfinite(v) and v > 0 for v in values)
    # a validation epoch e (preferably 2) whose value falls below everything before it; threshold halfway between
    # (geometrically), so the first value under it is the one of epoch e
    e = next((i for i in (2, 1, 3) if values[i] < min(values[:i])), None)
    assert e is not None, f"delta2 never decreased during training: {values}"
    threshold = math.sqrt(values[e] * min(values[:e]))

    cb = probe()
    es = EarlyStopping(monitor="curvprobe/delta2", mode="min", stopping_threshold=threshold, patience=1000)
    trainer, _ = fit(tmp_path / "es", [cb, es], model_kw, max_epochs=max_epochs)
    # same seed, same training: the probe values are reproduced until the stop
    assert [h["delta2"] for h in cb.history] == values[: e + 1]
    assert len(cb.history) == e + 1
    assert trainer.should_stop
    assert trainer.current_epoch < max_epochs - 1
    assert es.stopping_reason == EarlyStoppingReason.STOPPING_THRESHOLD
    assert "threshold" in (es.stopping_reason_message or "").lower()
    assert es.stopped_epoch == e


def test_early_stopping_patience_stops_on_a_plateau(tmp_path):
    # lr = 0 and no BatchNorm (whose running statistics move even at lr = 0): the weights never change, so delta2 is
    # the same at every validation epoch and EarlyStopping sees no improvement after the first one.
    patience = 2
    cb = probe()
    es = EarlyStopping(monitor="curvprobe/delta2", mode="min", patience=patience)
    model_kw = {"lr": 0.0, "optimizer": "sgd", "batchnorm": False}
    trainer, _ = fit(tmp_path, [cb, es], model_kw, max_epochs=8)
    values = [h["delta2"] for h in cb.history]
    assert len(values) == patience + 1, values
    assert trainer.current_epoch < 8 - 1
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    np.testing.assert_allclose(values, values[0], rtol=1e-5)
    assert es.best_score.item() == pytest.approx(values[0], rel=1e-6)


@pytest.mark.parametrize(
    ("trainer_kw", "expected_runs"),
    [
        ({"max_epochs": 4, "check_val_every_n_epoch": 2}, 2),
        ({"max_epochs": 2, "val_check_interval": 0.5}, 4),
    ],
    ids=["check_val_every_n_epoch=2", "val_check_interval=0.5"],
)
def test_one_value_per_validation_run(tmp_path, trainer_kw, expected_runs):
    cb = probe()
    es = EarlyStopping(monitor="curvprobe/delta2", mode="min", patience=1000)  # strict: fails if the key is missing
    logger = CSVLogger(tmp_path, name="csv")
    val_runs = []

    class Counter(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                val_runs.append(trainer.global_step)

    trainer, _ = fit(tmp_path, [cb, es, Counter()], logger=logger, num_sanity_val_steps=2, **trainer_kw)
    assert not es.stopping_reason == EarlyStoppingReason.NON_FINITE_METRIC
    assert len(val_runs) == expected_runs  # the schedule itself (sanity check excluded)
    assert len(cb.history) == expected_runs
    assert all(math.isfinite(h["delta2"]) and h["delta2"] > 0 for h in cb.history)
    _, rows = read_metrics_csv(Path(logger.log_dir) / "metrics.csv")
    logged = column(rows, "curvprobe/delta2")
    assert len(logged) == expected_runs
    # logged in the same rows as validation_step's own key, i.e. at Lightning's step for that validation run
    assert [step for step, _ in logged] == [step for step, _ in column(rows, "val_loss")]
    np.testing.assert_allclose([v for _, v in logged], [h["delta2"] for h in cb.history], rtol=1e-6)
    # every validation run refreshed the subspace (refresh_every_n_epochs=1) and spent HVPs on it
    assert all(h["hvps"] > 0 for h in cb.history)


# ----------------------------------------------------------------------------------------------- loggers


def test_tensorboard_events_hold_every_documented_key(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    epochs = 3
    cb = probe(num_added_samples=2)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer, _ = fit(tmp_path, [cb], logger=logger, max_epochs=epochs)
    ea = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    scalars = set(tags["scalars"])
    expected = PREFIXED | {"curvprobe/delta2_stderr"}  # stderr: logged because num_added_samples > 1
    assert expected <= scalars, sorted(scalars)
    assert {t for t in scalars if t.startswith("curvprobe/")} == expected
    for key in sorted(expected):
        events = ea.Scalars(key)
        assert len(events) == epochs, (key, events)
        name = key.split("/", 1)[1]
        want = [h[name] for h in cb.history]
        got = [e.value for e in events]
        if name == "subspace_overlap":  # NaN at the first refresh (no previous subspace), then in [0, 1]
            assert math.isnan(got[0]) and math.isnan(want[0])
            got, want = got[1:], want[1:]
            assert all(0.0 <= v <= 1.0 + 1e-6 for v in got)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert "curvprobe/eigenvalues" in tags["histograms"], tags["histograms"]
    hists = ea.Histograms("curvprobe/eigenvalues")
    assert len(hists) == epochs
    for h in hists:
        assert h.histogram_value.num == 3  # D eigenvalues
    assert hists[-1].histogram_value.max == pytest.approx(cb.history[-1]["lambda_max"], rel=1e-5)
    # one histogram per validation epoch, next to the epoch's scalars (the callback writes it at trainer.global_step,
    # Lightning's epoch-level scalars land at global_step - 1)
    scalar_steps = [e.step for e in ea.Scalars("curvprobe/delta2")]
    assert all(0 <= h.step - s <= 1 for h, s in zip(hists, scalar_steps, strict=True))


def test_csv_logger_columns_and_nothing_leaks_from_training_step(tmp_path):
    """With and without the callback (default loss_fn = training_step): the logs differ exactly by curvprobe/*."""

    def run(name: str, callbacks: list[Any]) -> tuple[list[str], list[dict[str, str]]]:
        logger = CSVLogger(tmp_path, name=name)
        fit(tmp_path / name, callbacks, logger=logger, max_epochs=3, deterministic=True)
        return read_metrics_csv(Path(logger.log_dir) / "metrics.csv")

    cb = probe(loss_fn=None)  # the probe calls training_step, which calls self.log("train_loss", ...)
    cols_with, rows_with = run("with", [cb])
    cols_without, rows_without = run("without", [])
    assert len(cb.history) == 3
    assert set(cols_with) - set(cols_without) == PREFIXED
    assert set(cols_without) <= set(cols_with)
    assert {"train_loss_step", "train_loss_epoch", "train_margin", "val_loss", "epoch", "step"} <= set(cols_without)
    for key in cols_without:
        assert column(rows_with, key) == column(rows_without, key), key
    for key in PREFIXED:
        assert len(column(rows_with, key)) == 3, key


# ----------------------------------------------------------------------------------------------- training undisturbed


def _assert_nested_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_nested_equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _final_state(tmp_path: Path, callbacks: list[Any]) -> dict[str, Any]:
    trainer, model = fit(tmp_path, callbacks, max_epochs=3, deterministic=True)
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
        "training_steps": model.training_steps,
        "training_flags": [m.training for m in model.modules()],
    }


@pytest.mark.parametrize(
    "probe_kw",
    [
        {},  # probe drawn from the training dataloader, loss from training_step, Gaussian-moment estimator
        {"probe_data": "explicit", "loss_fn": ce_loss, "estimator": "direct_mc", "num_mc_samples": 8},
    ],
    ids=["default-probe", "explicit-probe-direct-mc"],
)
def test_training_is_bit_identical_with_and_without_the_callback(tmp_path, probe_kw):
    if probe_kw.get("probe_data") == "explicit":
        probe_kw = {**probe_kw, "probe_data": make_dataset(40, seed=3)}
    baseline = _final_state(tmp_path / "without", [])
    cb = probe(num_added_samples=2, **probe_kw)
    probed = _final_state(tmp_path / "with", [cb])
    assert len(cb.history) == 3 and all(math.isfinite(h["delta2"]) for h in cb.history)
    # buffers are in the state_dict: BatchNorm running_mean / running_var / num_batches_tracked
    assert any(k.endswith("num_batches_tracked") for k in baseline["model"])
    assert int(baseline["model"]["net.1.num_batches_tracked"]) == 3 * 6
    _assert_nested_equal(probed["model"], baseline["model"], "state_dict")
    _assert_nested_equal(probed["optimizer"], baseline["optimizer"], "optimizer")
    assert baseline["optimizer"]["state"], "Adam state is empty: the comparison would prove nothing"
    assert torch.equal(probed["torch_rng"], baseline["torch_rng"])
    assert probed["python_rng"] == baseline["python_rng"]
    assert np.array_equal(probed["numpy_rng"], baseline["numpy_rng"])
    assert probed["training_steps"] == baseline["training_steps"] == 3 * 6
    assert probed["training_flags"] == baseline["training_flags"]


# ----------------------------------------------------------------------------------------------- value


def test_logged_value_equals_probe_stability_at_the_final_weights(tmp_path):
    """float64 end to end; the callback and ``probe_stability`` each solve the eigenproblem to tol = 1e-10.

    Tolerances: ``delta2`` (Gaussian moment) depends on ``U`` only through ``a``, ``‖c‖²``, ``tr B`` and ``tr B²``,
    which are invariant under rotations inside the subspace, so the two runs (the callback warm-started, the reference
    cold) can differ only by the subspace error, about ``tol · λ₁ / (λ_D − λ_{D+1})`` ≈ 1e-10 · 12 here, times the
    share of the ``c``/``B`` terms in ``delta2`` (< 1): rel 1e-9 leaves margin over that bound (measured: ~1e-16).
    ``delta1`` does not depend on ``U`` at all (rel 1e-12); an eigenvalue's error is quadratic in the residual.
    """
    k, m, D, sigma = 24, 2, 3, 0.2
    x, y = probe_batch(k + m, dtype=torch.float64)
    cb = probe(
        num_eigenvectors=D, sigma=sigma, num_probe_samples=k, num_added_samples=m, probe_data=(x, y),
        loss_fn=ce_loss, tol=1e-10,
    )  # fmt: skip
    trainer, model = fit(tmp_path, [cb], max_epochs=2, precision="64-true")
    assert next(model.parameters()).dtype == torch.float64
    assert cb.last_result is not None and cb.last_result.converged
    last = cb.history[-1]
    ref = probe_stability(model, ce_loss, (x[:k], y[:k]), (x[k:], y[k:]), num_eigenvectors=D, sigma=sigma, tol=1e-10)
    assert ref.converged and ref.delta2.dtype == torch.float64
    assert last["delta2"] == pytest.approx(float(ref.delta2), rel=1e-9, abs=0)
    assert last["delta1"] == pytest.approx(float(ref.delta1), rel=1e-12, abs=0)
    assert last["lambda_max"] == pytest.approx(float(ref.eigenvalues[0]), rel=1e-10, abs=0)
    assert last["delta2_stderr"] == pytest.approx(float(ref.delta2_stderr), rel=1e-8, abs=0)
    # what the loggers received is the same number (rounded to float32 by the logging path)
    logged = float(trainer.callback_metrics["curvprobe/delta2"])
    assert logged == pytest.approx(last["delta2"], rel=1e-6)
    # at this sigma the c and B terms carry a real share of delta2 (so the comparison also checks the subspace part)
    a2 = float((ref.a**2).mean())
    assert (float(ref.delta2) - a2) / float(ref.delta2) > 0.1


@pytest.mark.parametrize("estimator", ["gaussian_moment", "quadratic_mc", "direct_mc"])
def test_every_estimator_runs_in_the_trainer(tmp_path, estimator):
    cb = probe(estimator=estimator, num_mc_samples=16, loss_fn=ce_loss, num_added_samples=2)
    trainer, _ = fit(tmp_path, [cb], max_epochs=1, limit_train_batches=2)
    assert len(cb.history) == 1
    value = cb.history[0]["delta2"]
    assert math.isfinite(value) and value > 0
    assert float(trainer.callback_metrics["curvprobe/delta2"]) == pytest.approx(value, rel=1e-6)


# ----------------------------------------------------------------------------------------------- validate()


def test_trainer_validate_with_probe_data_logs_delta2(tmp_path):
    cb = probe(probe_data=make_dataset(40, seed=3), loss_fn=ce_loss)
    L.seed_everything(0, verbose=False)
    model = TinyClassifier()
    _, val = loaders()
    trainer = make_trainer(tmp_path, callbacks=[cb])
    out = trainer.validate(model, dataloaders=val)
    assert torch.is_inference_mode_enabled() is False
    assert len(cb.history) == 1
    assert "curvprobe/delta2" in trainer.callback_metrics
    assert out and "curvprobe/delta2" in out[0]
    assert out[0]["curvprobe/delta2"] == pytest.approx(cb.history[0]["delta2"], rel=1e-6)
    assert math.isfinite(cb.history[0]["delta2"]) and cb.history[0]["delta2"] > 0
    assert model.training_steps == 0


def test_trainer_validate_without_probe_data_asks_for_it(tmp_path):
    cb = probe()
    model = TinyClassifier()
    _, val = loaders()
    with pytest.raises(ValueError, match="probe_data"):
        make_trainer(tmp_path, callbacks=[cb]).validate(model, dataloaders=val)


def test_basis_device_keeps_the_subspace_there_and_changes_nothing(tmp_path):
    default, on_cpu = probe(), probe(basis_device="cpu")
    fit(tmp_path, [default], max_epochs=2)
    fit(tmp_path, [on_cpu], max_epochs=2)
    assert on_cpu._basis is not None and on_cpu._basis.device == torch.device("cpu")
    assert on_cpu.history[-1]["hvps"] > 0  # the second refresh was warm-started from the kept subspace
    for a, b in zip(default.history, on_cpu.history, strict=True):
        assert a.keys() == b.keys()  # the same device here: bit for bit the same run
        timed = {"probe_seconds", "overhead"}  # wall times: the values that differ between identical runs
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a.keys() - timed)


# ----------------------------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_eigenvectors": 0}, r"`num_eigenvectors`.*got 0"),
        ({"sigma": 0}, r"`sigma`.*positive.*got 0"),
        ({"sigma": -1}, r"`sigma`.*positive.*got -1"),
        ({"sigma": float("nan")}, r"`sigma`.*positive.*got nan"),
        ({"estimator": "bogus"}, r"`estimator`.*'gaussian_moment'.*'quadratic_mc'.*'direct_mc'.*got 'bogus'"),
        ({"num_probe_samples": 0}, r"`num_probe_samples`.*got 0"),
        ({"num_added_samples": 0}, r"`num_added_samples`.*got 0"),
        ({"basis_device": "nowhere"}, r"`basis_device`.*'cpu'.*got 'nowhere'"),
        (
            {"num_probe_samples": 8, "num_added_samples": 2, "probe_data": probe_batch(9)},
            r"`probe_data`.*at least.*10 samples, got 9",
        ),
        (
            {"num_probe_samples": 8, "num_added_samples": 2, "probe_data": make_dataset(5)},
            r"`probe_data`.*at least.*10 samples, got 5",
        ),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(sorted(v)),
)
def test_bad_configuration_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        probe(**kwargs)


@pytest.mark.parametrize("sigma", ["Auto", "auto ", None, -1.0])
def test_bad_sigma_names_auto_as_allowed(sigma):
    with pytest.raises((TypeError, ValueError), match=r"`sigma` must be a positive finite float or 'auto', got "):
        probe(sigma=sigma)


def _fit_expecting(tmp_path: Path, cb: CurvatureStabilityCallback, model: TinyClassifier, exc: type, match: str):
    train, val = loaders()
    trainer = make_trainer(tmp_path, callbacks=[cb], max_epochs=1)
    with pytest.raises(exc, match=match):
        trainer.fit(model, train, val)
    assert model.training_steps == 0, "the error came after a training step"
    return trainer


def test_num_eigenvectors_not_below_num_params_raises_at_setup(tmp_path):
    model = TinyClassifier()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == NUM_PARAMS_BN
    cb = probe(num_eigenvectors=n)  # construction cannot know N
    _fit_expecting(tmp_path, cb, model, ValueError, rf"`num_eigenvectors`.*\({n}\).*got {n}")


def test_manual_optimization_without_loss_fn_raises_at_setup(tmp_path):
    _fit_expecting(tmp_path, probe(), ManualClassifier(), ValueError, r"`loss_fn`.*manual optimization")


def test_manual_optimization_with_loss_fn_runs(tmp_path):
    cb = probe(loss_fn=ce_loss)
    model = ManualClassifier()
    train, val = loaders()
    make_trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model, train, val)
    assert len(cb.history) == 1 and math.isfinite(cb.history[0]["delta2"])


def _per_sample_loss(module, batch):
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


@pytest.mark.parametrize("explicit", [False, True], ids=["train-loader-probe", "explicit-probe"])
def test_non_scalar_loss_fails_before_the_first_training_step(tmp_path, explicit):
    data = make_dataset(40, seed=3) if explicit else None
    cb = probe(loss_fn=_per_sample_loss, probe_data=data)
    _fit_expecting(tmp_path, cb, TinyClassifier(), ValueError, r"`loss_fn`.*scalar.*got \(32,\)")


def test_non_finite_loss_fails_before_the_first_training_step(tmp_path):
    cb = probe(loss_fn=lambda module, batch: ce_loss(module, batch) * float("inf"))
    _fit_expecting(tmp_path, cb, TinyClassifier(), FloatingPointError, r"`loss_fn`.*non-finite")
