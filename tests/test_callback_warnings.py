"""The callback says what it sees, once: no validation, a quadratic error above the threshold, a loss that is not a
per-sample mean, and a fallback to finite differences (an info line)."""

from __future__ import annotations

import logging

import pytest
import torch.nn.functional as F  # noqa: N812
from _lightning_helpers import TinyClassifier, ce_loss, loaders, make_dataset, make_trainer

from lightning_curvprobe import CurvatureStabilityCallback

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*")


def _probe(**kw):
    args = dict(num_eigenvectors=2, num_probe_samples=16, probe_data=make_dataset(40, seed=3), loss_fn=ce_loss)
    args.update(kw)
    return CurvatureStabilityCallback(**args)


def _messages(record, text):
    return [str(w.message) for w in record if "CurvatureStabilityCallback" in str(w.message) and text in str(w.message)]


def _fit(tmp_path, cb, model=None, **kw):
    train, val = loaders()
    trainer = make_trainer(tmp_path, callbacks=[cb], **kw)
    trainer.fit(model or TinyClassifier(), train, val)
    return trainer


def test_no_validation_batches_warns_once_at_fit_start(tmp_path, recwarn):
    cb = _probe()
    _fit(tmp_path, cb, limit_val_batches=0, max_epochs=2)
    assert len(_messages(recwarn, "limit_val_batches=0, so no probe will run")) == 1
    assert _messages(recwarn, "no validation epoch ended") == [] and cb.history == []


def test_no_validation_epoch_in_the_fit_warns_once_at_the_end(tmp_path, recwarn):
    cb = _probe()
    _fit(tmp_path, cb, check_val_every_n_epoch=2, max_epochs=3, max_steps=6)  # stops before epoch 2 ends
    assert len(_messages(recwarn, "no validation epoch ended during this fit")) == 1


def test_quadratic_error_above_the_threshold_warns_once(tmp_path, recwarn):
    cb = _probe(sigma=3.0, max_quadratic_error=1e-6)
    _fit(tmp_path, cb, max_epochs=2)
    assert all(h["quadratic_error"] > 1e-6 for h in cb.history) and len(cb.history) == 2
    assert len(_messages(recwarn, "exceeds max_quadratic_error = 1e-06")) == 1
    assert "sigma='auto'" in _messages(recwarn, "exceeds")[0]


def test_sum_reduced_loss_warns_once_with_the_ratio(tmp_path, recwarn):
    def summed(module, batch):
        return F.cross_entropy(module(batch[0]), batch[1], reduction="sum")

    _fit(tmp_path, _probe(loss_fn=summed), max_epochs=2)
    (message,) = _messages(recwarn, "sample-weighted mean")
    assert "is 2 times" in message and "k^2" in message
    assert _messages(_fit_quiet(tmp_path), "sample-weighted mean") == []


def _fit_quiet(tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _fit(tmp_path, _probe(), max_epochs=1)
    return record


def test_fallback_to_finite_differences_is_announced_once(tmp_path, caplog):
    class Reentrant(TinyClassifier):
        def forward(self, x):
            import torch.utils.checkpoint as cp

            h = self.net[0](x)
            h = cp.checkpoint(self.net[1:4], h, use_reentrant=True)
            return self.net[4](h)

    cb = _probe()
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, cb, model=Reentrant(batchnorm=False, dropout=0.0), max_epochs=2)
    assert cb.hvp_in_use == "finite_difference"
    assert sum("taken by finite differences" in r.getMessage() for r in caplog.records) == 1
