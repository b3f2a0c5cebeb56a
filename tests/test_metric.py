"""CurvatureStability (torchmetrics): flags, exact sharded accumulation, pickling, state_dict, reset, details."""

from __future__ import annotations

import math
import pickle
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_curvprobe import CurvatureStability
from lightning_curvprobe.functional import probe_stability

DT = torch.float64
ESTIMATORS = ("gaussian_moment", "quadratic_mc", "direct_mc")
K, M, D, SIGMA = 16, 4, 3, 0.3


def _model(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.7)
    return model


def _data(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def mse(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def _sl(batch: tuple[Tensor, Tensor], start: int, stop: int) -> tuple[Tensor, Tensor]:
    return batch[0][start:stop], batch[1][start:stop]


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    """A float64 MLP (58 parameters), K base + M added samples and the top-D subspace of the base Hessian."""
    model = _model()
    data = _data(K + M)
    base, added = _sl(data, 0, K), _sl(data, K, K + M)
    ref = probe_stability(model, mse, base, added, num_eigenvectors=D, sigma=SIGMA, tol=1e-10)
    assert ref.converged
    return {"model": model, "base": base, "added": added, "ref": ref}


def _metric(estimator: str = "gaussian_moment", **kw: Any) -> CurvatureStability:
    return CurvatureStability(D, sigma=SIGMA, estimator=estimator, num_samples=32, quadratic_error_samples=6, **kw)


def _update(metric: CurvatureStability, s: dict[str, Any], base: Any, added: Any) -> None:
    metric.update(s["model"], mse, base, added, s["ref"].eigenvectors, s["ref"].eigenvalues)


def _summary(metric: CurvatureStability) -> dict[str, float]:
    value = metric.compute()
    assert value.dtype == DT
    return {
        "delta2": float(value),
        **{k: float(metric.details[k]) for k in ("delta1", "delta2_stderr", "quadratic_error")},
    }


def _assert_close(got: dict[str, float], want: dict[str, float], rel: float) -> None:
    for key, w in want.items():
        assert math.isfinite(w) and w != 0, (key, w)
        assert got[key] == pytest.approx(w, rel=rel, abs=0), key


def test_flags():
    assert CurvatureStability.higher_is_better is False
    assert CurvatureStability.full_state_update is False
    assert CurvatureStability.is_differentiable is False
    metric = _metric()
    assert metric.higher_is_better is False and metric.full_state_update is False and metric.is_differentiable is False


# (base split, added split): shard 1 gets base[:b] and added[:a], shard 2 the rest; a = M leaves shard 2 without added
SPLITS = [(7, 3), (9, M)]


@pytest.mark.parametrize("split", SPLITS, ids=["7|9-3|1", "9|7-4|0"])
@pytest.mark.parametrize("how", ["two-updates", "merge_state"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_sharded_accumulation_equals_one_update(setup, estimator, how, split):
    b, a = split
    base, added = setup["base"], setup["added"]
    whole = _metric(estimator)
    _update(whole, setup, base, added)
    want = _summary(whole)

    if how == "two-updates":
        sharded = _metric(estimator)
        _update(sharded, setup, _sl(base, 0, b), _sl(added, 0, a))
        _update(sharded, setup, _sl(base, b, K), _sl(added, a, M))
    else:  # two "ranks", each with its own metric (same seed: same draws), states merged like a DDP sync
        sharded, other = _metric(estimator), _metric(estimator)
        _update(sharded, setup, _sl(base, 0, b), _sl(added, 0, a))
        _update(other, setup, _sl(base, b, K), _sl(added, a, M))
        sharded.merge_state(other)
    _assert_close(_summary(sharded), want, rel=1e-10)


def test_gaussian_moment_metric_equals_probe_stability(setup):
    metric = _metric()
    _update(metric, setup, setup["base"], setup["added"])
    ref = setup["ref"]
    assert float(metric.compute()) == pytest.approx(float(ref.delta2), rel=1e-12)
    assert float(metric.details["delta1"]) == pytest.approx(float(ref.delta1), rel=1e-12)
    assert float(metric.details["delta2_stderr"]) == pytest.approx(float(ref.delta2_stderr), rel=1e-10)


@pytest.mark.parametrize("estimator", ["quadratic_mc", "direct_mc"])
def test_monte_carlo_draws_follow_the_seed(setup, estimator):
    """Same seed → same draws (the premise of the sharded test); another seed → another value."""
    values = []
    for seed in (0, 0, 1):
        metric = _metric(estimator, seed=seed)
        _update(metric, setup, setup["base"], setup["added"])
        values.append(float(metric.compute()))
    assert values[0] == values[1]
    assert values[2] != values[0]
    # both estimate the same Gaussian-moment quantity (quadratic MC exactly in expectation): same order of magnitude
    gm = float(setup["ref"].delta2)
    assert 0.2 * gm < values[0] < 5 * gm


def test_picklable_and_state_dict_is_empty(setup):
    fresh = _metric("quadratic_mc")
    assert len(fresh.state_dict()) == 0
    pickle.loads(pickle.dumps(fresh))

    metric = _metric("quadratic_mc")
    _update(metric, setup, setup["base"], setup["added"])
    assert len(metric.state_dict()) == 0  # states are persistent=False by default (torchmetrics)
    clone = pickle.loads(pickle.dumps(metric))
    assert isinstance(clone, CurvatureStability)
    # the copy carries the accumulated states and the generator's position: it computes the same value
    assert float(clone.compute()) == float(metric.compute())
    # ... and keeps accumulating like the original
    _update(clone, setup, setup["base"], setup["added"])
    assert math.isfinite(float(clone.compute()))


def test_compute_after_reset_is_nan(setup):
    metric = _metric()
    _update(metric, setup, setup["base"], setup["added"])
    assert math.isfinite(float(metric.compute()))
    metric.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics: "compute called before update"
        value = metric.compute()
    assert torch.isnan(value)
    assert all(torch.isnan(metric.details[k]) for k in ("delta1", "delta2_stderr", "quadratic_error"))
    # and it recovers after the next update
    _update(metric, setup, setup["base"], setup["added"])
    assert float(metric.compute()) == pytest.approx(float(setup["ref"].delta2), rel=1e-12)


def test_never_updated_compute_is_nan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isnan(_metric().compute())


def test_details_after_compute(setup):
    metric = _metric()
    _update(metric, setup, setup["base"], setup["added"])
    delta2 = metric.compute()
    details = metric.details
    assert {"delta1", "delta2_stderr", "quadratic_error"} <= set(details)
    ref = setup["ref"]
    assert float(details["delta1"]) == pytest.approx(float(ref.a.abs().mean()), rel=1e-12)
    # stderr over the M added samples of their per-sample criteria
    per_sample = ref.delta2_per_sample
    assert float(details["delta2_stderr"]) == pytest.approx(float(per_sample.std() / math.sqrt(M)), rel=1e-10)
    assert float(delta2) == pytest.approx(float(per_sample.mean()), rel=1e-12)
    qe = float(details["quadratic_error"])
    assert math.isfinite(qe) and qe >= 0

    off = CurvatureStability(D, sigma=SIGMA, quadratic_error_samples=0)
    _update(off, setup, setup["base"], setup["added"])
    off.compute()
    assert math.isnan(float(off.details["quadratic_error"]))


def test_single_added_sample_has_nan_stderr(setup):
    metric = _metric()
    _update(metric, setup, setup["base"], _sl(setup["added"], 0, 1))
    assert math.isfinite(float(metric.compute()))
    assert math.isnan(float(metric.details["delta2_stderr"]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_eigenvectors": 0}, r"`num_eigenvectors`.*got 0"),
        ({"sigma": 0}, r"`sigma`.*positive.*got 0"),
        ({"sigma": -1}, r"`sigma`.*positive.*got -1"),
        ({"estimator": "exact"}, r"`estimator`.*'gaussian_moment'.*got 'exact'"),
        ({"num_samples": 0}, r"`num_samples`.*got 0"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v[k]}" for k in v),
)
def test_bad_arguments(kwargs, match):
    args = {"num_eigenvectors": D, **kwargs}
    with pytest.raises(ValueError, match=match):
        CurvatureStability(**args)


def test_update_rejects_eigenvectors_of_the_wrong_width(setup):
    metric = _metric()
    U = setup["ref"].eigenvectors
    with pytest.raises(ValueError, match=r"`eigenvectors`.*\(N, 3\).*got \(58, 2\)"):
        metric.update(setup["model"], mse, setup["base"], setup["added"], U[:, :2], setup["ref"].eigenvalues[:2])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_forward_accumulates_like_update(setup, estimator):
    """``metric(...)`` (torchmetrics' forward: an internal reset, the batch value, states merged back) accumulates
    exactly what ``update`` does, with the cycle's draws, and returns the value of its own samples alone."""
    base, added = setup["base"], setup["added"]
    U, lam = setup["ref"].eigenvectors, setup["ref"].eigenvalues
    by_update, by_forward, alone = _metric(estimator), _metric(estimator), _metric(estimator)
    batch_values = []
    for lo, hi, alo, ahi in ((0, 7, 0, 3), (7, K, 3, M)):
        _update(by_update, setup, _sl(base, lo, hi), _sl(added, alo, ahi))
        batch_values.append(by_forward(setup["model"], mse, _sl(base, lo, hi), _sl(added, alo, ahi), U, lam))
    _assert_close(_summary(by_forward), _summary(by_update), rel=1e-13)
    _update(alone, setup, _sl(base, 0, 7), _sl(added, 0, 3))
    assert float(batch_values[0]) == pytest.approx(float(alone.compute()), rel=1e-13, abs=0)


@pytest.mark.parametrize("estimator", ["quadratic_mc", "gaussian_moment"])
def test_projected_hessian_matrix_for_a_subspace_that_is_no_eigenbasis(setup, estimator):
    """``eigenvalues`` may be ``UᵀH_kU`` as a (D, D) matrix (a kept subspace at moved weights). On a random
    orthonormal ``U`` that matrix is far from diagonal; the result equals the dense float64 reference built from
    explicit Hessians (rel 1e-10), and passing its diagonal only gives another number."""
    from conftest import dense_coefficients

    from lightning_curvprobe.functional import delta2_gaussian_moment, quadratic_surrogate
    from lightning_curvprobe.functional.estimators import _gaussian_draws

    model, base, added = setup["model"], setup["base"], setup["added"]
    n = setup["ref"].eigenvectors.shape[0]
    U, _ = torch.linalg.qr(torch.randn(n, D, generator=torch.Generator().manual_seed(3), dtype=DT))
    P, a_t, c_t, B_t = dense_coefficients(model, mse, base, added, U)
    assert float((P - torch.diag(P.diagonal())).abs().max()) > 0.1 * float(P.diagonal().abs().max())
    metric = _metric(estimator)
    metric.update(model, mse, base, added, U, P)
    got = float(metric.compute())
    if estimator == "gaussian_moment":
        want = delta2_gaussian_moment(a_t, c_t, B_t, SIGMA).mean()
    else:  # the same draws: the metric's generator after the quadratic-error draws
        g = torch.Generator().manual_seed(0)
        _gaussian_draws(6, D, SIGMA, g, U)
        z = _gaussian_draws(32, D, SIGMA, g, U)
        want = quadratic_surrogate(a_t, c_t, B_t, z).pow(2).mean(-1).mean()
    assert got == pytest.approx(float(want), rel=1e-10, abs=0)
    diagonal_only = _metric(estimator)
    diagonal_only.update(model, mse, base, added, U, P.diagonal())
    assert abs(float(diagonal_only.compute()) - got) > 1e-6 * got


def test_update_rejects_a_projected_hessian_of_the_wrong_shape(setup):
    U = setup["ref"].eigenvectors
    with pytest.raises(ValueError, match=r"`eigenvalues` must have shape \(3,\) or \(3, 3\).*got \(4,\)"):
        _metric().update(setup["model"], mse, setup["base"], setup["added"], U, torch.ones(4, dtype=DT))
