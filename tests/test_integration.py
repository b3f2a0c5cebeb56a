"""Production integration (issue 4): DDP, resume, precision, LightningCLI, failures, bad-input matrix."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from _integration_models import RegressionData, TinyRegressor, make_regression
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_curvprobe import CurvatureStabilityCallback
from lightning_curvprobe.functional import probe_stability

HERE = Path(__file__).parent
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


def _callback(**kw):
    args = dict(
        num_eigenvectors=4,
        sigma=0.05,
        num_probe_samples=16,
        num_added_samples=4,
        probe_data=make_regression()[1],
        tol=1e-10,
        loss_fn=TinyRegressor.mean_loss,
    )
    args.update(kw)
    return CurvatureStabilityCallback(**args)


def _fit(cb, max_epochs=2, ckpt_path=None, callbacks=(), model=None, data_dtype=torch.float64, **trainer_kw):
    L.seed_everything(0)
    train, _ = make_regression(dtype=data_dtype)
    model = model if model is not None else TinyRegressor()
    kw = dict(QUIET, enable_checkpointing=False, precision="64-true")
    kw.update(trainer_kw)
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=[cb, *callbacks], **kw)
    trainer.fit(model, DataLoader(train, batch_size=16), DataLoader(train, batch_size=64), ckpt_path=ckpt_path)
    return trainer, model


# ---------------------------------------------------------------- DDP


def _run_ddp_script(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """Run ``ddp_probe_script.py`` (2 gloo processes) with ``args``; its output and the two ranks' saved results."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, str(HERE / "ddp_probe_script.py"), str(tmp_path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    return out, r0, r1


@pytest.mark.ddp
def test_ddp_two_ranks_agree_with_single_process(tmp_path):
    _, r0, r1 = _run_ddp_script(tmp_path, "gaussian_moment", "resume")
    assert r0["world"] == 2 and not r0["by_rows"]  # 2 ranks gather the D kept vectors
    # each rank holds its rows of the subspace (97 parameters: 48 + 49); the checkpoint gathers them on rank 0, in
    # parameter order (basis_rows None: any number of processes can resume from it)
    assert r0["basis_rows"] is None and r0["basis"].shape[0] == 48 and r1["basis"].shape[0] == 49
    assert torch.equal(r0["saved_basis"], torch.cat([r0["basis"], r1["basis"]])) and r1["saved_basis"] is None
    # every rank ran the same Lanczos iterations on the all-reduced Hessian and logged the same values
    for h0, h1 in zip(r0["history"], r1["history"], strict=True):
        for key in ("delta2", "delta1", "lambda_max", "hvps", "quadratic_error", "delta2_stderr"):
            assert h0[key] == pytest.approx(h1[key], rel=1e-12, nan_ok=True), key
    # ... equal to a single process holding all probe samples, at the final weights
    model = TinyRegressor().double()
    model.load_state_dict(r0["state"])
    x, y = make_regression()[1]
    ref = probe_stability(
        model,
        TinyRegressor.mean_loss,
        (x[:16], y[:16]),
        (x[16:20], y[16:20]),
        num_eigenvectors=4,
        sigma=0.05,
        tol=1e-10,
    )
    last = r0["history"][-1]
    # both solves converge to residual 1e-10*lambda_1; the eigenvalues then agree to ~1e-20/gap, the criterion to ~1e-10
    assert last["lambda_max"] == pytest.approx(float(ref.eigenvalues[0]), rel=1e-10)
    torch.testing.assert_close(r0["eigenvalues"], ref.eigenvalues, rtol=1e-10, atol=0)
    assert last["delta2"] == pytest.approx(float(ref.delta2), rel=1e-9)
    assert last["delta1"] == pytest.approx(float(ref.delta1), rel=1e-10)
    assert last["delta2_stderr"] == pytest.approx(float(ref.delta2_stderr), rel=1e-9)
    # the rows of the two ranks make up the single process's eigenvectors
    U = torch.cat([r0["basis"], r1["basis"]])[:, :4]
    torch.testing.assert_close(U, ref.eigenvectors, rtol=0, atol=1e-8)
    # a resume from the checkpoint (all rows, in parameter order): each rank takes its rows back and refreshes warm;
    # rel=1e-6 for Lightning's resume of a float32-built module under "64-true" (see the single-process resume test)
    for r in (r0, r1):
        for key in ("delta2", "lambda_max", "hvps", "delta2_stderr"):
            assert r["resumed_history"][0][key] == r["history"][0][key], key  # restored from the checkpoint
        for key in ("delta2", "lambda_max", "hvps", "subspace_overlap"):
            assert r["resumed_history"][1][key] == pytest.approx(r["history"][1][key], rel=1e-6), key
        torch.testing.assert_close(r["resumed_basis"], r["basis"], rtol=0, atol=1e-6)


@pytest.mark.ddp
def test_ddp_measuring_on_rows_equals_gathering(tmp_path):
    """Many ranks measure on their rows of U with all added samples taken together (forced here on 2): refresh,
    reuse and refresh again give what gathering U gives."""
    (tmp_path / "gather").mkdir()
    (tmp_path / "rows").mkdir()
    _, g0, _ = _run_ddp_script(tmp_path / "gather", "direct_mc", "reuse")
    _, r0, r1 = _run_ddp_script(tmp_path / "rows", "direct_mc", "reuse", "by-rows")
    assert r0["by_rows"] and not g0["by_rows"]
    assert len(r0["history"]) == 3 and r0["history"][1]["hvps"] == 0  # the middle probe reused the subspace
    for h_rows, h_gather, h1 in zip(r0["history"], g0["history"], r1["history"], strict=True):
        for key in ("delta2", "delta1", "lambda_max", "quadratic_error", "delta2_stderr", "subspace_overlap"):
            assert h_rows[key] == pytest.approx(h_gather[key], rel=1e-9, nan_ok=True), key
            assert h_rows[key] == h1[key] or (math.isnan(h_rows[key]) and math.isnan(h1[key])), key


@pytest.mark.ddp
def test_ddp_non_finite_added_sample_on_one_rank_logs_nan_on_every_rank(tmp_path):
    """A non-finite value that only rank 1 meets (its added sample's loss) must not leave rank 0 waiting in the
    metric's sync: every rank learns of it, logs NaN, and training goes on identically on both ranks."""
    out, r0, r1 = _run_ddp_script(tmp_path, "gaussian_moment", "nan-added-rank1")
    for h0, h1 in zip(r0["history"], r1["history"], strict=True):
        assert math.isnan(h0["delta2"]) and math.isnan(h1["delta2"])
    assert len(r0["history"]) == 2
    assert "not finite" in out.stderr and out.stderr.count("Logging NaN") == 1
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]) and bool(torch.isfinite(value).all()), key


def test_ddp_sharded_metric_equals_union_in_process():
    """The sharding the callback uses (rank r takes samples r, r+W, ...) sums to the single-process statistics."""
    from lightning_curvprobe import CurvatureStability

    model = TinyRegressor().double()
    x, y = make_regression()[1]
    ref = probe_stability(
        model,
        TinyRegressor.mean_loss,
        (x[:16], y[:16]),
        (x[16:20], y[16:20]),
        num_eigenvectors=4,
        sigma=0.05,
        tol=1e-10,
    )
    merged = CurvatureStability(4, sigma=0.05)
    for rank in range(2):
        part = CurvatureStability(4, sigma=0.05)
        base = torch.arange(rank, 16, 2)
        added = torch.arange(16 + rank, 20, 2)
        part.update(
            model, TinyRegressor.mean_loss, (x[base], y[base]), (x[added], y[added]), ref.eigenvectors, ref.eigenvalues
        )
        merged.merge_state(part)
    assert float(merged.compute()) == pytest.approx(float(ref.delta2), rel=1e-10)


# ---------------------------------------------------------------- resume


def test_resume_continues_warm_and_matches_uninterrupted_run(tmp_path, caplog):
    full_cb = _callback()
    _fit(full_cb, max_epochs=4)

    first_cb = _callback()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit(first_cb, max_epochs=2, callbacks=[ckpt], enable_checkpointing=True)
    last = tmp_path / "last.ckpt"
    assert last.exists()
    state = torch.load(last, weights_only=True)  # plain tensors and Python values only
    assert first_cb.state_key in state["callbacks"]

    resumed_cb = _callback()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _fit(
            resumed_cb,
            max_epochs=4,
            ckpt_path=str(last),
            callbacks=[ModelCheckpoint(dirpath=tmp_path / "b")],
            enable_checkpointing=True,
        )
    # the first probe's cost line counts this fit's steps only (8 per epoch), not the 16 restored ones
    assert "at this validation interval (8 steps)" in caplog.text
    assert len(resumed_cb.history) == len(full_cb.history) == 4
    # epochs 0-1 come from the checkpointed history (bit-identical); epochs 2-3 were probed after the resume.
    # Lightning's own resume of this float32-built module under precision="64-true" moves the weights by ~1e-8
    # (the checkpoint is loaded before the module is converted to float64), hence rel=1e-6 there.
    for got, want in zip(resumed_cb.history[:2], full_cb.history[:2], strict=True):
        assert got.keys() == want.keys()
        assert all(
            got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k]))
            for k in got
            if k not in ("probe_seconds", "overhead")
        )
    for got, want in zip(resumed_cb.history[2:], full_cb.history[2:], strict=True):
        for key in ("delta2", "delta1", "lambda_max", "hvps", "subspace_overlap"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, nan_ok=True), key
    # the first refresh after the resume was warm: same HVP count as the uninterrupted run's warm refresh,
    # and fewer than the cold first refresh
    assert resumed_cb.history[2]["hvps"] == full_cb.history[2]["hvps"]
    assert not math.isnan(resumed_cb.history[2]["subspace_overlap"])


def test_checkpoint_without_callback_state_warns(tmp_path):
    L.seed_everything(0)
    train, _ = make_regression()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = L.Trainer(max_epochs=1, callbacks=[ckpt], **QUIET, precision="64-true")
    trainer.fit(TinyRegressor(), DataLoader(train, batch_size=16), DataLoader(train, batch_size=64))
    cb = _callback()
    with pytest.warns(UserWarning, match="holds no state"):
        _fit(cb, max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(cb.history) == 1 and math.isnan(cb.history[0]["subspace_overlap"])  # cold


def test_save_subspace_false_keeps_checkpoint_small_and_refreshes_cold(tmp_path):
    cb = _callback(save_subspace=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    _fit(cb, max_epochs=1, callbacks=[ckpt], enable_checkpointing=True)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][cb.state_key]
    assert state["basis"] is None
    resumed = _callback(save_subspace=False)
    _fit(resumed, max_epochs=2, ckpt_path=str(tmp_path / "last.ckpt"))
    assert math.isnan(resumed.history[1]["subspace_overlap"])  # no previous subspace: cold refresh


def test_two_instances_have_distinct_state_keys():
    a, b = _callback(), _callback(num_eigenvectors=3, log_prefix="probe3")
    assert a.state_key != b.state_key
    trainer, _ = _fit(a, max_epochs=1, callbacks=[b])
    assert "curvprobe/delta2" in trainer.callback_metrics and "probe3/delta2" in trainer.callback_metrics


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize(
    ("precision", "param_dtype", "probe_dtype"),
    [
        ("bf16-mixed", torch.float32, torch.float32),
        ("bf16-true", torch.bfloat16, torch.float32),
        ("64-true", torch.float64, torch.float64),
        ("32-true", torch.float32, torch.float32),
    ],
)
def test_precisions(precision, param_dtype, probe_dtype):
    cb = _callback(tol=1e-4, loss_fn=_cast_loss, probe_data=make_regression(dtype=torch.float32)[1])
    data_dtype = torch.float64 if precision == "64-true" else torch.float32
    trainer, model = _fit(cb, max_epochs=1, precision=precision, data_dtype=data_dtype)
    assert all(p.dtype == param_dtype for p in model.parameters())  # the module was not converted
    assert cb.last_result is not None and cb.last_result.eigenvectors.dtype == probe_dtype
    assert math.isfinite(cb.history[-1]["delta2"]) and cb.history[-1]["delta2"] > 0


def _cast_loss(module, batch):
    x, y = batch
    out = module.net(x.to(module.net[0].weight.dtype))
    return torch.nn.functional.mse_loss(out, y.to(out.dtype))


# ---------------------------------------------------------------- LightningCLI


def _cli_config(tmp_path, **init_args):
    cfg = {
        "trainer": {
            "max_epochs": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "precision": "64-true",
            "callbacks": [
                {
                    "class_path": "lightning_curvprobe.CurvatureStabilityCallback",
                    "init_args": {"num_eigenvectors": 3, "sigma": 0.05, "num_probe_samples": 16, **init_args},
                }
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lightning_cli_configures_callback_from_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    path = _cli_config(tmp_path, estimator="quadratic_mc", num_mc_samples=32)
    cli = LightningCLI(TinyRegressor, RegressionData, args=["fit", "--config", str(path)], save_config_callback=None)
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, CurvatureStabilityCallback)]
    assert len(cbs) == 1 and cbs[0].estimator == "quadratic_mc" and cbs[0].num_eigenvectors == 3
    assert len(cbs[0].history) == 1 and cbs[0].history[0]["delta2"] > 0


def test_lightning_cli_rejects_invalid_yaml_value(tmp_path, capsys):
    from lightning.pytorch.cli import LightningCLI

    path = _cli_config(tmp_path, estimator="taylor")
    with pytest.raises(SystemExit):
        LightningCLI(TinyRegressor, RegressionData, args=["fit", "--config", str(path)], save_config_callback=None)
    err = capsys.readouterr().err
    assert "estimator" in err and "taylor" in err


# ---------------------------------------------------------------- failures at run time


def _diverging_loss(module, batch):
    """The probe's loss turns NaN from the second epoch on (the training itself stays finite)."""
    loss = TinyRegressor.mean_loss(module, batch)
    return loss * float("nan") if module.current_epoch >= 1 else loss


def test_non_finite_probe_logs_nan_warns_once_and_training_goes_on():
    cb = _callback(loss_fn=_diverging_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, model = _fit(cb, max_epochs=3)
    msgs = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert trainer.current_epoch == 3  # the run went on
    assert math.isfinite(cb.history[0]["delta2"])
    assert math.isnan(cb.history[1]["delta2"]) and math.isnan(cb.history[2]["delta2"])
    assert math.isnan(float(trainer.callback_metrics["curvprobe/delta2"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_probe_does_not_change_training():
    cb = _callback(loss_fn=_diverging_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, with_cb = _fit(cb, max_epochs=2)
    _, without = _fit(_NoOp(), max_epochs=2)
    for (name, a), b in zip(with_cb.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _NoOp(L.Callback):
    pass


def test_user_loss_exception_at_preflight_is_raised_with_context_before_training():
    def broken(module, batch):
        raise KeyError("feature.*missing")

    model = TinyRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyError, match=r"CurvatureStabilityCallback: evaluating the loss on the base samples") as info:
        _fit(_callback(loss_fn=broken), max_epochs=1, model=model)
    assert isinstance(info.value.__cause__, KeyError)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no training step ran


def _fails_after_preflight(module, batch):
    if module.trainer.global_step > 0:  # the pre-flight passes; the probe at the first validation epoch fails
        raise KeyError("feature.*missing")
    return TinyRegressor.mean_loss(module, batch)


def test_probe_failure_during_training_raises_with_context_under_on_error_raise():
    with pytest.raises(KeyError, match=r"evaluating the loss on the base samples.*feature.*missing") as info:
        _fit(_callback(loss_fn=_fails_after_preflight, on_error="raise"), max_epochs=1)
    assert isinstance(info.value.__cause__, KeyError)


def test_probe_failure_during_training_logs_nan_warns_once_and_training_is_untouched():
    cb = _callback(loss_fn=_fails_after_preflight)
    with pytest.warns(UserWarning, match=r"the probe failed \(KeyError.*feature.*missing.*training goes on") as rec:
        _, model = _fit(cb, max_epochs=3)
    assert sum("the probe failed" in str(w.message) for w in rec) == 1
    assert len(cb.history) == 3 and all(math.isnan(h["delta2"]) for h in cb.history)
    _, reference = _fit(_callback(loss_fn=TinyRegressor.mean_loss), max_epochs=3)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- bad input matrix


class _Frozen(TinyRegressor):
    def __init__(self):
        super().__init__()
        for p in self.parameters():
            p.requires_grad_(False)

    def configure_optimizers(self):
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


class _Manual(TinyRegressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


BAD_CONSTRUCTION = [
    (dict(num_eigenvectors=0), ValueError, r"`num_eigenvectors` must be an int >= 1, got 0"),
    (dict(num_eigenvectors=2.5), TypeError, r"`num_eigenvectors` must be an int, got 2.5"),
    (dict(sigma=0.0), ValueError, r"`sigma` must be a positive finite float or 'auto', got 0.0"),
    (dict(sigma=-1e-3), ValueError, r"`sigma` must be a positive finite float or 'auto', got -0.001"),
    (dict(sigma=float("inf")), ValueError, r"`sigma` must be a positive finite float or 'auto', got inf"),
    (dict(sigma="small"), TypeError, r"`sigma` must be a positive finite float or 'auto', got 'small'"),
    (
        dict(estimator="taylor"),
        ValueError,
        r"`estimator` must be one of 'gaussian_moment', 'quadratic_mc', 'direct_mc', got 'taylor'",
    ),
    (dict(num_probe_samples=0), ValueError, r"`num_probe_samples` must be an int >= 1, got 0"),
    (dict(num_added_samples=0), ValueError, r"`num_added_samples` must be an int >= 1, got 0"),
    (dict(num_mc_samples=0), ValueError, r"`num_mc_samples` must be an int >= 1, got 0"),
    (dict(refresh_every_n_epochs=0), ValueError, r"`refresh_every_n_epochs` must be an int >= 1, got 0"),
    (dict(tol=0.0), ValueError, r"`tol` must be a positive finite float, got 0.0"),
    (
        dict(num_probe_samples=30),
        ValueError,
        r"`probe_data` must hold at least num_probe_samples \+ num_added_samples = 34 samples, got 24",
    ),
    (dict(loss_fn="mse"), TypeError, r"`loss_fn` must be callable"),
    (dict(log_prefix=""), ValueError, r"`log_prefix` must be a non-empty string"),
    (dict(quadratic_error_samples=-1), ValueError, r"`quadratic_error_samples` must be an int >= 0, got -1"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD_CONSTRUCTION)
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _callback(**kwargs)


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (_Frozen, {}, r"`pl_module` must have trainable parameters"),
        (
            TinyRegressor,
            dict(num_eigenvectors=97),
            r"`num_eigenvectors` must be smaller than the number of trainable parameters \(97\), got 97",
        ),
        (_Manual, dict(loss_fn=None), r"`loss_fn` must be given when the LightningModule uses manual optimization"),
        (TinyRegressor, dict(loss_fn=lambda m, b: m.net(b[0])), r"`loss_fn` must return a scalar tensor"),
    ],
)
def test_bad_setup(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _fit(_callback(**kwargs), max_epochs=1, model=model())
