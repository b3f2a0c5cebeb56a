"""``_signals.explain``: the Gaussian-moment decomposition of Δ₂^(D), the curvature share and the discrepancy.

References are independent of the code under test: dense float64 Hessians (``conftest.dense_coefficients``), the
eigenbasis of ``B`` instead of traces, and Monte Carlo over the quadratic surrogate for each term separately.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import DT, dense_coefficients, gen, mlp, mse_loss, regression_data

from lightning_curvprobe import CurvatureStability
from lightning_curvprobe._signals import SIGNAL_KEYS, TERM_KEYS, explain, gaussian_moment_terms
from lightning_curvprobe.functional import delta2_gaussian_moment, probe_stability

K, M, D = 24, 6, 4


def random_coefficients(m: int, dim: int, seed: int, *, a_scale: float = 1.0, b_scale: float = 1.0):
    """(a, c, B) with B symmetric and indefinite."""
    g = gen(seed)
    a = a_scale * torch.randn(m, generator=g, dtype=DT)
    c = torch.randn(m, dim, generator=g, dtype=DT)
    X = torch.randn(m, dim, dim, generator=g, dtype=DT)
    return a, c, b_scale * 0.5 * (X + X.transpose(-1, -2))


def terms_by_eigenbasis(a: float, c: torch.Tensor, B: torch.Tensor, sigma: float) -> tuple[float, float, float]:
    """The three terms from B's eigenvalues μ (no traces): y = Qᵀz ~ N(0, σ²I), ½zᵀBz = ½Σμ_i y_i².

    E[a·zᵀBz] = aσ²Σμ and E[(½zᵀBz)²] = ¼ Σ_ij μ_i μ_j E[y_i² y_j²] with E[y_i² y_j²] = σ⁴(1 + 2[i = j]).
    """
    mu = torch.linalg.eigvalsh(B)
    s2 = sigma**2
    fourth = s2 * s2 * (torch.ones(len(mu), len(mu), dtype=DT) + 2 * torch.eye(len(mu), dtype=DT))
    return a * a, s2 * float(c @ c), a * s2 * float(mu.sum()) + 0.25 * float(mu @ fourth @ mu)


@pytest.fixture(scope="module")
def probed():
    """A float64 MLP probed by the metric (Gaussian moment) and the dense reference coefficients in the same U."""
    model = mlp(depth=1, hidden=8, din=5, dout=3, seed=0)
    x, y = regression_data(K + M, seed=1)
    base, added = (x[:K], y[:K]), (x[K:], y[K:])
    sigma = 0.2
    ref = probe_stability(model, mse_loss, base, added, num_eigenvectors=D, sigma=sigma, tol=1e-10)
    metric = CurvatureStability(D, sigma=sigma, quadratic_error_samples=0)
    metric.update(model, mse_loss, base, added, ref.eigenvectors, ref.eigenvalues)
    metric.compute()
    _, a, c, B = dense_coefficients(model, mse_loss, base, added, ref.eigenvectors)
    return {
        "model": model,
        "base": base,
        "added": added,
        "ref": ref,
        "metric": metric,
        "a": a,
        "c": c,
        "B": B,
        "sigma": sigma,
    }


# ------------------------------------------------------------------------------------------ gaussian_moment_terms


@pytest.mark.parametrize("sigma", [1e-3, 0.1, 2.0])
def test_terms_sum_to_the_gaussian_moment_per_sample(sigma):
    a, c, B = random_coefficients(7, 5, seed=3)
    a2, grad, curv = gaussian_moment_terms(a, c, B, sigma)
    total = delta2_gaussian_moment(a, c, B, sigma)
    torch.testing.assert_close(a2 + grad + curv, total, rtol=1e-13, atol=0)


def test_terms_against_the_eigenbasis_of_b():
    """Each term separately, against a formula in B's eigenbasis (no trace identities)."""
    a, c, B = random_coefficients(5, 4, seed=4)
    a2, grad, curv = gaussian_moment_terms(a, c, B, 0.7)
    for j in range(5):
        want = terms_by_eigenbasis(float(a[j]), c[j], B[j], 0.7)
        assert (float(a2[j]), float(grad[j]), float(curv[j])) == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_each_term_is_the_expectation_of_its_part_of_the_squared_surrogate():
    """(a + cᵀz + ½zᵀBz)² = a² + [(cᵀz)²] + [a zᵀBz + ¼(zᵀBz)²] + (terms odd in z, mean 0): Monte Carlo over 400k
    draws of each bracket agrees with the closed-form term within 4 standard errors."""
    a, c, B = random_coefficients(3, 3, seed=5)
    sigma = 0.8
    _, grad, curv = gaussian_moment_terms(a, c, B, sigma)
    z = sigma * torch.randn(400_000, 3, generator=gen(6), dtype=DT)
    for j in range(3):
        lin = z @ c[j]
        quad = ((z @ B[j]) * z).sum(-1)
        for draws, closed in ((lin * lin, grad[j]), (a[j] * quad + 0.25 * quad * quad, curv[j])):
            se = float(draws.std()) / math.sqrt(len(draws))
            assert abs(float(draws.mean()) - float(closed)) < 4 * se, (j, float(draws.mean()), float(closed), se)


def test_spectral_special_case_is_all_curvature():
    """a = 0, c = 0, B = diag(δλ): only the curvature term, (σ⁴/4)(2Σδλ² + (Σδλ)²) (SPEC §1)."""
    dl = torch.tensor([0.3, -1.2, 2.0], dtype=DT)
    a, c, B = torch.zeros(1, dtype=DT), torch.zeros(1, 3, dtype=DT), torch.diag(dl)[None]
    sigma = 0.5
    a2, grad, curv = gaussian_moment_terms(a, c, B, sigma)
    assert float(a2) == 0 and float(grad) == 0
    want = sigma**4 / 4 * (2 * float((dl * dl).sum()) + float(dl.sum()) ** 2)
    assert float(curv) == pytest.approx(want, rel=1e-14)
    out = explain({"a": a, "c": c, "B": B, "delta2": delta2_gaussian_moment(a, c, B, sigma).mean()}, sigma, 10)
    assert out["curvature_share"] == 1.0
    assert out["delta2_terms/curvature"] == pytest.approx(want, rel=1e-14)


def test_curvature_term_can_be_negative():
    """The cross term a σ² tr B is negative when a and tr B have opposite signs and σ is small."""
    a, c, B = torch.tensor([1.0], dtype=DT), torch.zeros(1, 2, dtype=DT), -torch.eye(2, dtype=DT)[None]
    _, _, curv = gaussian_moment_terms(a, c, B, 0.1)
    assert float(curv) == pytest.approx(-2e-2 + 0.25e-4 * (2 * 2 + 4), rel=1e-14)
    assert float(curv) < 0


def test_nonsymmetric_b_is_symmetrised():
    a, c, B = random_coefficients(2, 3, seed=7)
    skew = torch.randn(2, 3, 3, generator=gen(8), dtype=DT)
    skew = skew - skew.transpose(-1, -2)
    for got, want in zip(gaussian_moment_terms(a, c, B + skew, 0.4), gaussian_moment_terms(a, c, B, 0.4), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-16)


# ------------------------------------------------------------------------------------------------------- explain


def test_explain_terms_sum_to_the_metric_delta2_exactly(probed):
    out = explain(probed["metric"].details, probed["sigma"], K)
    assert set(out) == set(SIGNAL_KEYS)
    assert all(isinstance(v, float) for v in out.values())
    want = float(delta2_gaussian_moment(probed["a"], probed["c"], probed["B"], probed["sigma"]).mean())
    total = math.fsum(out[key] for key in TERM_KEYS)
    assert total == pytest.approx(float(probed["metric"].details["delta2"]), rel=1e-12, abs=0)
    assert total == pytest.approx(want, rel=1e-9, abs=0)  # the dense reference (independent Hessians)


def test_explain_terms_against_dense_references(probed):
    """Each key against the dense float64 coefficients, term by term in B's eigenbasis."""
    out = explain(probed["metric"].details, probed["sigma"], K)
    per = [
        terms_by_eigenbasis(float(probed["a"][j]), probed["c"][j], probed["B"][j], probed["sigma"]) for j in range(M)
    ]
    for i, key in enumerate(TERM_KEYS):
        assert out[key] == pytest.approx(sum(t[i] for t in per) / M, rel=1e-8), key
    delta2 = float(probed["metric"].details["delta2"])
    assert out["curvature_share"] == pytest.approx((delta2 - sum(t[0] for t in per) / M) / delta2, rel=1e-7)
    assert out["discrepancy"] == pytest.approx((K + 1) ** 2 * delta2, rel=1e-14)
    # σ = 0.2 on this model: the probe adds a visible share, so the test is not the trivial "all a²" case
    assert 0.01 < out["curvature_share"] < 0.99


def test_curvature_share_and_discrepancy_without_probe_terms():
    """c = 0, B = 0: Δ₂^(D) is mean a², the share is 0 and √discrepancy is the RMS loss gap ℓ_j − L_k."""
    k = 9
    gaps = torch.tensor([2.0, -1.0, 0.5], dtype=DT)  # ℓ_j − L_k
    a = gaps / (k + 1)
    c, B = torch.zeros(3, 2, dtype=DT), torch.zeros(3, 2, 2, dtype=DT)
    out = explain({"a": a, "c": c, "B": B, "delta2": (a * a).mean()}, 0.01, k)
    assert out["curvature_share"] == 0.0
    assert out["delta2_terms/gradient"] == 0.0 and out["delta2_terms/curvature"] == 0.0
    assert math.sqrt(out["discrepancy"]) == pytest.approx(math.sqrt(float((gaps * gaps).mean())), rel=1e-14)


def test_discrepancy_is_free_of_k_where_delta2_is_not():
    """The same loss gaps seen from base sets of different sizes: Δ₂^(D) scales like (k+1)⁻², the discrepancy not."""
    gaps = torch.tensor([0.4, -0.9], dtype=DT)
    c, B = torch.zeros(2, 1, dtype=DT), torch.zeros(2, 1, 1, dtype=DT)
    values = []
    for k in (7, 63):
        a = gaps / (k + 1)
        values.append(explain({"a": a, "c": c, "B": B, "delta2": (a * a).mean()}, 1e-3, k))
    assert values[0]["discrepancy"] == pytest.approx(values[1]["discrepancy"], rel=1e-13)
    assert values[0]["delta2_terms/a2"] / values[1]["delta2_terms/a2"] == pytest.approx(64, rel=1e-12)


@pytest.mark.parametrize("estimator", ["quadratic_mc", "direct_mc"])
def test_mc_estimators_terms_are_the_gaussian_moment_decomposition(probed, estimator):
    """With a Monte Carlo estimator the terms are still those of the closed form (they sum to GM of the same a, c, B,
    not to the estimate), while the share and the discrepancy use the estimator's own delta2."""
    metric = CurvatureStability(
        D, sigma=probed["sigma"], estimator=estimator, num_samples=16, quadratic_error_samples=0
    )
    ref = probed["ref"]
    metric.update(probed["model"], mse_loss, probed["base"], probed["added"], ref.eigenvectors, ref.eigenvalues)
    delta2 = float(metric.compute())
    out = explain(metric.details, probed["sigma"], K)
    gm = float(
        delta2_gaussian_moment(metric.details["a"], metric.details["c"], metric.details["B"], probed["sigma"]).mean()
    )
    assert math.fsum(out[key] for key in TERM_KEYS) == pytest.approx(gm, rel=1e-12)
    assert abs(gm - delta2) > 1e-9 * gm  # 16 draws: the estimate is not the closed form
    assert out["curvature_share"] == pytest.approx((delta2 - out["delta2_terms/a2"]) / delta2, rel=1e-12)
    assert out["discrepancy"] == pytest.approx((K + 1) ** 2 * delta2, rel=1e-14)


def test_small_sigma_is_almost_all_a2(probed):
    """At σ = 1e-3 the same coefficients give a share that is tiny, and it grows like σ² (gradient term dominant)."""
    d = probed["metric"].details
    shares = []
    for sigma in (1e-3, 2e-3):
        delta2 = delta2_gaussian_moment(d["a"], d["c"], d["B"], sigma).mean()
        shares.append(explain({**d, "delta2": delta2}, sigma, K)["curvature_share"])
    assert 0 < shares[0] < 1e-3
    assert shares[1] / shares[0] == pytest.approx(4.0, rel=1e-2)


def test_float32_details_give_floats(probed):
    d = {key: probed["metric"].details[key].float() for key in ("a", "c", "B", "delta2")}
    out = explain(d, probed["sigma"], K)
    want = explain(probed["metric"].details, probed["sigma"], K)
    for key in SIGNAL_KEYS:
        assert isinstance(out[key], float)
        assert out[key] == pytest.approx(want[key], rel=1e-4, abs=1e-7)


# ------------------------------------------------------------------------------------------------ edge cases


@pytest.mark.filterwarnings("ignore:The ..compute.. method of metric:UserWarning")
def test_failed_probe_details_give_nan():
    """The metric's details after a compute with nothing accumulated hold no coefficients: every key is NaN."""
    metric = CurvatureStability(2, sigma=0.1)
    assert math.isnan(float(metric.compute()))
    out = explain(metric.details, 0.1, 8)
    assert set(out) == set(SIGNAL_KEYS) and all(math.isnan(v) for v in out.values())


def test_non_finite_delta2_gives_nan():
    a, c, B = random_coefficients(2, 2, seed=9)
    out = explain({"a": a, "c": c, "B": B, "delta2": torch.tensor(float("inf"), dtype=DT)}, 0.1, 8)
    assert all(math.isnan(v) for v in out.values())


def test_zero_delta2_has_no_share():
    z = torch.zeros
    out = explain(
        {"a": z(2, dtype=DT), "c": z(2, 3, dtype=DT), "B": z(2, 3, 3, dtype=DT), "delta2": z((), dtype=DT)}, 0.1, 8
    )
    assert math.isnan(out["curvature_share"])
    assert out["delta2_terms/a2"] == 0.0 and out["discrepancy"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma": 0.0}, r"`sigma` must be a positive finite float, got 0.0"),
        ({"sigma": float("nan")}, r"`sigma` must be a positive finite float, got nan"),
        ({"num_probe_samples": 0}, r"`num_probe_samples` must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    a, c, B = random_coefficients(1, 2, seed=10)
    args = {
        "details": {"a": a, "c": c, "B": B, "delta2": torch.tensor(1.0, dtype=DT)},
        "sigma": 0.1,
        "num_probe_samples": 4,
        **kwargs,
    }
    with pytest.raises(ValueError, match=match):
        explain(**args)


def test_module_does_not_import_lightning():
    code = (
        "import sys; import lightning_curvprobe._signals; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------------ delta2_rel_peak


def _pure_a(gaps: list[float], k: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    a = scale * torch.tensor(gaps, dtype=DT) / (k + 1)
    return {
        "a": a,
        "c": torch.zeros(len(gaps), 2, dtype=DT),
        "B": torch.zeros(len(gaps), 2, 2, dtype=DT),
        "delta2": (a * a).mean(),
    }


def test_rel_peak_is_one_at_the_first_probe_and_at_a_new_peak():
    d = _pure_a([1.0, -2.0], k=9)
    delta2 = float(d["delta2"])
    assert explain(d, 0.01, 9)["delta2_rel_peak"] == 1.0
    assert explain(d, 0.01, 9, peak_delta2=0.5 * delta2)["delta2_rel_peak"] == 1.0
    assert explain(d, 0.01, 9, peak_delta2=float("nan"))["delta2_rel_peak"] == 1.0
    assert explain(d, 0.01, 9, peak_delta2=4 * delta2)["delta2_rel_peak"] == pytest.approx(0.25, rel=1e-15)


def test_rel_peak_is_free_of_the_loss_units_and_of_k():
    """The same run seen with the loss multiplied by 10 or with another base-set size: the same fraction of the peak,
    while delta2 itself changes by 100 and by the (k+1)² ratio."""
    gaps_peak, gaps_now = [3.0, -1.0], [0.3, 0.2]
    values = []
    for scale, k in ((1.0, 15), (10.0, 15), (1.0, 63)):
        peak = float(_pure_a(gaps_peak, k, scale)["delta2"])
        values.append(explain(_pure_a(gaps_now, k, scale), 0.01, k, peak_delta2=peak)["delta2_rel_peak"])
    assert values[0] == pytest.approx(values[1], rel=1e-13) and values[0] == pytest.approx(values[2], rel=1e-13)
    assert values[0] == pytest.approx((0.09 + 0.04) / (9.0 + 1.0), rel=1e-13)


def test_rel_peak_of_a_zero_criterion_without_peak_is_nan():
    out = explain(_pure_a([0.0, 0.0], k=4), 0.01, 4)
    assert math.isnan(out["delta2_rel_peak"])
    assert explain(_pure_a([0.0, 0.0], k=4), 0.01, 4, peak_delta2=1e-3)["delta2_rel_peak"] == 0.0
