"""The callback across a run's changes: a reused subspace, a changing trainable set, layers built in
``configure_model``, a datamodule outside fit, probe points where the loss is not finite, and bad ``max_basis``."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from _lightning_helpers import (
    CLASSES,
    DIN,
    HIDDEN,
    NUM_PARAMS_NO_BN,
    TinyClassifier,
    ce_loss,
    loaders,
    make_dataset,
    make_trainer,
    probe_batch,
)
from conftest import dense_coefficients
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader

from lightning_curvprobe import CurvatureStabilityCallback
from lightning_curvprobe.functional import delta2_gaussian_moment
from lightning_curvprobe.functional.lanczos import _default_num_extra

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*LeafSpec.*",
    "ignore:.*no logger configured.*",
    "ignore:.*The number of training batches.*",
    "ignore:.*litlogger.*",
)


def _probe(**kwargs: Any) -> CurvatureStabilityCallback:
    defaults: dict[str, Any] = {"num_eigenvectors": 3, "sigma": 1e-2, "num_probe_samples": 32, "loss_fn": ce_loss}
    defaults.update(kwargs)
    return CurvatureStabilityCallback(**defaults)


def _fit(tmp_path: Path, model: L.LightningModule, callbacks: list[Any], **trainer_kw: Any) -> L.Trainer:
    train, val = loaders(dtype=torch.float64 if trainer_kw.get("precision") == "64-true" else torch.float32)
    trainer = make_trainer(tmp_path, callbacks=callbacks, **trainer_kw)
    trainer.fit(model, train, val)
    return trainer


def _curvprobe_warnings(record: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in record if "CurvatureStabilityCallback" in str(w.message) and text in str(w.message)]


# ----------------------------------------------------------------------------------------------- reused subspace


def test_reused_subspace_is_probed_with_the_current_projected_hessian(tmp_path):
    """With ``refresh_every_n_epochs=2`` epoch 1 reuses epoch 0's ``U`` at weights 6 Adam steps further on.

    The reference is dense float64 at the final weights (the last validation comes after the last step) with that
    same ``U``: ``a``, ``c = Uᵀ(g_j − g_k)/(k+1)`` and ``B = Uᵀ(H_j − H_k)U/(k+1)`` from explicit Hessians, then the
    Gaussian moment. Nothing is solved iteratively on either side (the reuse epoch spends D products, no solve), so
    the two agree to rounding: rel 1e-10. Using epoch 0's eigenvalues for ``UᵀH_kU`` instead (the stale value)
    misses by far more than that (checked below), so the test tells the two apart.
    """
    k, m, D, sigma = 24, 2, 3, 0.3
    x, y = probe_batch(k + m, dtype=torch.float64)
    cb = _probe(
        num_eigenvectors=D, sigma=sigma, num_probe_samples=k, num_added_samples=m, probe_data=(x, y),
        refresh_every_n_epochs=2, quadratic_error_samples=4, tol=1e-10,
    )  # fmt: skip
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(batchnorm=False, dropout=0.0)
    _fit(tmp_path, model, [cb], max_epochs=2, limit_train_batches=6, precision="64-true")
    first, reused = cb.history
    assert first["hvps"] > 0 and reused["hvps"] == 0 and reused["subspace_overlap"] == 1.0
    assert cb._basis is not None and cb._basis.dtype == torch.float64
    U = cb._basis[:, :D]
    P, a_t, c_t, B_t = dense_coefficients(model, ce_loss, (x[:k], y[:k]), (x[k:], y[k:]), U)
    want = float(delta2_gaussian_moment(a_t, c_t, B_t, sigma).mean())
    assert reused["delta2"] == pytest.approx(want, rel=1e-10, abs=0)
    assert reused["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(P)[-1]), rel=1e-10, abs=0)
    # the stale diagonal (epoch 0's eigenvalues) gives another number: the check above can fail
    stale_P = torch.diag(cb.last_result.eigenvalues)  # type: ignore[union-attr]
    stale_B = B_t + (P - stale_P) / (k + 1)
    stale = float(delta2_gaussian_moment(a_t, c_t, stale_B, sigma).mean())
    assert abs(stale - want) > 1e-4 * want
    assert float(torch.linalg.matrix_norm(P - stale_P)) > 1e-3 * float(P.diagonal().abs().max())


# ----------------------------------------------------------------------------------------------- trainable set


class _UnfreezeAtEpoch1(Callback):
    """Freeze the first layer for epoch 0 and unfreeze it from epoch 1 on (as Lightning's BaseFinetuning does)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.net[0].requires_grad_(False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.net[0].requires_grad_(True)


def test_a_changed_trainable_set_refreshes_cold_with_one_warning(tmp_path):
    cb = _probe(probe_data=make_dataset(40, seed=3))
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(batchnorm=False, dropout=0.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, model, [_UnfreezeAtEpoch1(), cb], max_epochs=3, limit_train_batches=2)
    frozen = NUM_PARAMS_NO_BN - (DIN * HIDDEN + HIDDEN)
    assert len(_curvprobe_warnings(record, f"changed from {frozen} to {NUM_PARAMS_NO_BN}")) == 1
    assert cb._basis is not None and cb._basis.shape[0] == NUM_PARAMS_NO_BN
    h0, h1, h2 = cb.history
    assert math.isnan(h0["subspace_overlap"]) and math.isnan(h1["subspace_overlap"])  # cold, cold again
    assert 0 < h2["subspace_overlap"] <= 1 + 1e-6  # warm again in the new space
    assert all(h["hvps"] > 0 and math.isfinite(h["delta2"]) and h["delta2"] > 0 for h in cb.history)


class _Lazy(TinyClassifier):
    """The network is built in ``configure_model``, which Lightning calls after ``Callback.setup``."""

    def __init__(self) -> None:
        super().__init__(batchnorm=False, dropout=0.0)
        self.net = None  # type: ignore[assignment]

    def configure_model(self) -> None:
        if self.net is None:
            self.net = nn.Sequential(nn.Linear(DIN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))


def test_layers_built_in_configure_model(tmp_path):
    cb = _probe()
    L.seed_everything(0, verbose=False)
    _fit(tmp_path, _Lazy(), [cb], max_epochs=1, limit_train_batches=2)
    assert len(cb.history) == 1 and math.isfinite(cb.history[0]["delta2"]) and cb.history[0]["hvps"] > 0


def test_configure_model_still_checks_num_eigenvectors_before_training(tmp_path):
    model = _Lazy()
    cb = _probe(num_eigenvectors=NUM_PARAMS_NO_BN)
    train, val = loaders()
    with pytest.raises(ValueError, match=rf"`num_eigenvectors`.*\({NUM_PARAMS_NO_BN}\).*got {NUM_PARAMS_NO_BN}"):
        make_trainer(tmp_path, callbacks=[cb], max_epochs=1).fit(model, train, val)
    assert model.training_steps == 0


# ----------------------------------------------------------------------------------------------- max_basis


def test_max_basis_below_the_warm_start_fails_at_setup_and_the_least_one_runs(tmp_path):
    D = 4
    need = 2 * (D + _default_num_extra(D, NUM_PARAMS_NO_BN)) + 1
    model = TinyClassifier(batchnorm=False, dropout=0.0)
    train, val = loaders()
    with pytest.raises(ValueError, match=rf"`max_basis` must be at least 2 \(D \+ p\) \+ 1 = {need}.*got {need - 1}"):
        make_trainer(tmp_path, callbacks=[_probe(num_eigenvectors=D, max_basis=need - 1)]).fit(model, train, val)
    assert model.training_steps == 0
    cb = _probe(num_eigenvectors=D, max_basis=need)
    L.seed_everything(0, verbose=False)
    _fit(tmp_path, TinyClassifier(batchnorm=False, dropout=0.0), [cb], max_epochs=2, limit_train_batches=2)
    assert len(cb.history) == 2 and 0 < cb.history[1]["subspace_overlap"] <= 1 + 1e-6  # the warm refresh ran


# ----------------------------------------------------------------------------------------------- validate()


class _DataModule(L.LightningDataModule):
    """A usual datamodule: the training set exists only after ``setup("fit")``."""

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = make_dataset(192, seed=0)
        self.val_set = make_dataset(64, seed=1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=64)


def test_validate_with_a_datamodule_and_no_probe_data_asks_for_probe_data(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[_probe()])
    with pytest.raises(ValueError, match=r"`probe_data` must be given.*train_dataloader\(\) failed.*AttributeError"):
        trainer.validate(TinyClassifier(), datamodule=_DataModule())
    cb = _probe(probe_data=make_dataset(40, seed=3))
    make_trainer(tmp_path, callbacks=[cb]).validate(TinyClassifier(), datamodule=_DataModule())
    assert len(cb.history) == 1 and math.isfinite(cb.history[0]["delta2"])


# ----------------------------------------------------------------------------------------------- probe points


def _finite_only_near_the_start(limit: float):
    """Cross-entropy plus a barrier that is finite only while the first layer's squared norm stays below ``limit``."""

    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        barrier = torch.log(limit - module.net[0].weight.pow(2).sum())
        return F.cross_entropy(module(x), y) + 1e-3 * barrier

    return loss_fn


@pytest.mark.parametrize("estimator", ["direct_mc", "gaussian_moment"])
def test_non_finite_loss_at_probe_points_logs_nan_and_warns_once(tmp_path, estimator):
    """The loss is finite at ``w0`` (and so are its gradient and HVPs) but not at some ``w0 + Uz``: the direct
    Monte Carlo draws (and, with the Gaussian moment, the quadratic-error draws) meet it; NaN and one warning,
    training untouched (lr 0: the weights stay where the barrier is finite)."""
    L.seed_everything(0, verbose=False)
    model = TinyClassifier(batchnorm=False, dropout=0.0, lr=0.0, optimizer="sgd")
    limit = float(model.net[0].weight.detach().pow(2).sum()) + 1e-3
    cb = _probe(
        loss_fn=_finite_only_near_the_start(limit), sigma=0.5, estimator=estimator, num_mc_samples=8,
        probe_data=make_dataset(40, seed=3),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, model, [cb], max_epochs=2, limit_train_batches=2)
    assert model.training_steps == 4
    assert len(cb.history) == 2 and all(math.isnan(h["delta2"]) for h in cb.history)
    name = "direct Monte Carlo" if estimator == "direct_mc" else "quadratic-validity"
    assert len(_curvprobe_warnings(record, "not finite at")) == 1
    assert len(_curvprobe_warnings(record, name)) == 1
