"""Tests of lightning_curvprobe.functional.curve: stability curve, sigma selection, full-space Delta_2 (float64)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_curvprobe.functional.curve import (
    SigmaSelection,
    StabilityCurve,
    _fit_power_law,
    _full_space_increments,
    _sufficient_k,
    delta2_full_space,
    select_sigma,
    stability_curve,
)
from lightning_curvprobe.functional.estimators import delta2_gaussian_moment
from lightning_curvprobe.functional.hvp import ModelFunction
from lightning_curvprobe.functional.probe import probe_stability

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def init_(model: nn.Module, seed: int, dtype: torch.dtype = DT) -> nn.Module:
    g = gen(seed)
    model.to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[1:].numel() if p.dim() > 1 else p.numel()
            p.copy_((torch.rand(p.shape, generator=g, dtype=DT) * 2 - 1).to(dtype) / math.sqrt(fan_in))
    return model


def linear(din: int = 6, dout: int = 1, seed: int = 0) -> nn.Module:
    return init_(nn.Linear(din, dout), seed)


def tanh_mlp(din: int = 4, hidden: int = 8, dout: int = 1, seed: int = 0, dtype: torch.dtype = DT) -> nn.Module:
    return init_(nn.Sequential(nn.Linear(din, hidden), nn.Tanh(), nn.Linear(hidden, dout)), seed, dtype)


def data(n: int, din: int = 6, dout: int = 1, seed: int = 1, dtype: torch.dtype = DT) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    x = torch.randn(n, din, generator=g, dtype=DT)
    return x.to(dtype), torch.randn(n, dout, generator=g, dtype=DT).to(dtype)


def mse(model: nn.Module, batch: Any) -> Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def prefix(batch: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    return batch[0][:k], batch[1][:k]


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else (id(p.grad), p.grad.clone()) for n, p in model.named_parameters()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "rng": torch.get_rng_state().clone(),
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), n
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), n
    for n, g in before["grads"].items():
        a = after["grads"][n]
        assert (a is None) == (g is None), n
        if g is not None:
            assert a[0] == g[0] and torch.equal(a[1], g[1]), n
    assert after["training"] == before["training"]
    assert torch.equal(after["rng"], before["rng"]), "global RNG changed"


# ----------------------------------------------------------------------------------------------- power-law fit


def test_fit_power_law_recovers_exact_power_law() -> None:
    ks = [3, 7, 20, 100, 1000]
    values = [2.5 * (k + 1) ** -1.7 for k in ks]
    slope, intercept = _fit_power_law(ks, values)
    assert abs(slope + 1.7) < 1e-12 and abs(intercept - math.log(2.5)) < 1e-12
    slope_t, intercept_t = _fit_power_law(ks, torch.tensor(values, dtype=DT))
    assert (slope_t, intercept_t) == (slope, intercept)
    # non-positive and NaN entries are left out
    slope2, intercept2 = _fit_power_law(ks + [5, 9, 11], values + [0.0, -1.0, math.nan])
    assert abs(slope2 + 1.7) < 1e-12 and abs(intercept2 - math.log(2.5)) < 1e-12
    assert all(math.isnan(v) for v in _fit_power_law([3, 7], [1.0, 0.0]))
    assert all(math.isnan(v) for v in _fit_power_law([3], [1.0]))


def test_sufficient_k_formula() -> None:
    slope, intercept = -2.0, math.log(5.0)  # fitted Delta(k) = 5 / (k+1)^2
    fitted = lambda k: 5.0 / (k + 1) ** 2  # noqa: E731
    k = _sufficient_k(slope, intercept, 1e-3)  # (k+1)^2 >= 5000  ->  k + 1 >= 70.7
    assert k == 70 and fitted(k) <= 1e-3 < fitted(k - 1)
    assert k == math.ceil(math.exp((math.log(1e-3) - intercept) / slope)) - 1
    assert _sufficient_k(slope, intercept, 10.0) == 1  # already below at k = 1: clamped to 1
    assert _sufficient_k(0.0, intercept, 1e-3) is None  # no decay: no data size suffices
    assert _sufficient_k(0.5, intercept, 1e-3) is None
    assert _sufficient_k(math.nan, math.nan, 1e-3) is None
    assert _sufficient_k(-1e-6, 0.0, 1e-300) is None  # beyond the float range


# ----------------------------------------------------------------------------------------------- stability curve


def test_curve_matches_probe_stability_on_each_prefix() -> None:
    model = linear(din=12)  # N = 13, MSE: exactly quadratic loss
    base, added = data(40, din=12, seed=2), data(3, din=12, seed=3)
    sizes = [5, 10, 20, 40]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    curve = stability_curve(model, mse, base, added, sample_sizes=sizes, num_eigenvectors=3, sigma=0.3, tol=1e-12)
    assert_untouched(model, before)
    assert isinstance(curve, StabilityCurve) and curve.sample_sizes == sizes
    assert curve.delta2.dtype == DT and curve.delta2.shape == (4,) and all(curve.converged)
    for i, k in enumerate(sizes):
        ref = probe_stability(model, mse, prefix(base, k), added, num_eigenvectors=3, sigma=0.3, tol=1e-12)
        assert abs(float(curve.delta2[i] / ref.delta2) - 1) < 1e-10
        assert abs(float(curve.delta1[i] / ref.delta1) - 1) < 1e-10
        assert torch.allclose(curve.eigenvalues[i], ref.eigenvalues, rtol=1e-10, atol=0)
    assert curve.added_hvps == len(sizes) * 3 * 3
    assert torch.isnan(curve.quadratic_error).all()  # quadratic_error_samples=0: not measured
    assert curve.sufficient_k is None  # no tolerance given


def test_curve_decay_exponents_follow_theory() -> None:
    # w0 = least-squares fit on a large data set; base and added samples i.i.d. from the same law, with distinct top
    # input variances so that H_k has a stable top-2 subspace. With w0 fixed, a_j = (l_j - L_k)/(k+1) ->
    # (l_j - E l)/(k+1): Delta_1 ~ 1/k; c_j and B_j ~ 1/(k+1) too, so Delta_2 ~ 1/(k+1)^2. At sigma = 0.3 the c and B
    # terms carry > 99% of Delta_2 (a^2 < 1% at k = 64), so this tests more than a^2.
    g = gen(0)
    din, n_fit = 10, 4000
    scale = torch.tensor([4.0, 2.5] + [1.0] * (din - 2), dtype=DT)
    w_true = torch.randn(din, 1, generator=g, dtype=DT)

    def draw(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, din, generator=g, dtype=DT) * scale
        return x, x @ w_true + 0.5 * torch.randn(n, 1, generator=g, dtype=DT)

    x_fit, y_fit = draw(n_fit)
    sol = torch.linalg.lstsq(torch.cat([x_fit, torch.ones(n_fit, 1, dtype=DT)], 1), y_fit).solution
    model = nn.Linear(din, 1).to(DT)
    with torch.no_grad():
        model.weight.copy_(sol[:din].T)
        model.bias.copy_(sol[din])
    base, added = draw(256), draw(16)
    sizes = [8, 16, 32, 64, 128, 256]
    curve = stability_curve(
        model, mse, base, added, sample_sizes=sizes, num_eigenvectors=2, sigma=0.3, tol=1e-8, tolerance=1e-7
    )
    # Noise: L_k fluctuates by std(l)/sqrt(k) around E l (35% of the spread of l_j at k = 8, 6% at k = 256); over
    # seeds 0..19 of this construction the slopes were -1.00 +- 0.035 (Delta_1, range -1.09..-0.95) and
    # -1.97 +- 0.08 (Delta_2, range -2.22..-1.86): the bounds below are 6-8 standard deviations wide.
    assert -1.3 <= curve.delta1_exponent <= -0.7, curve.delta1_exponent
    assert -2.5 <= curve.decay_exponent <= -1.5, curve.decay_exponent
    assert bool((curve.delta2[1:] < curve.delta2[:-1]).all())
    k = curve.sufficient_k
    assert k is not None and k > sizes[-1]
    assert curve.fitted_delta2(k) <= 1e-7 < curve.fitted_delta2(k - 1)


def test_curve_warm_start_spends_no_more_hvps_than_cold() -> None:
    model = tanh_mlp(din=4, hidden=10, dout=2, seed=3)  # N = 72
    base, added = data(128, din=4, dout=2, seed=4), data(2, din=4, dout=2, seed=5)
    sizes, D, tol = [16, 32, 64, 128], 4, 1e-6
    curve = stability_curve(model, mse, base, added, sample_sizes=sizes, num_eigenvectors=D, tol=tol, sigma=0.1)
    cold = [probe_stability(model, mse, prefix(base, k), added, num_eigenvectors=D, tol=tol, sigma=0.1) for k in sizes]
    warm_total, cold_total = sum(curve.hvps), sum(r.hvps for r in cold)
    print(f"HVPs per k, warm: {curve.hvps} (total {warm_total}); cold: {[r.hvps for r in cold]} (total {cold_total})")
    assert curve.hvps[0] == cold[0].hvps  # the first solve starts as probe_stability's (same generator)
    assert warm_total <= cold_total
    for i, r in enumerate(cold):
        assert torch.allclose(curve.eigenvalues[i], r.eigenvalues, rtol=1e-6, atol=0)
        assert abs(float(curve.delta2[i] / r.delta2) - 1) < 1e-4


def test_curve_common_random_numbers_and_single_size() -> None:
    model = tanh_mlp()
    base, added = data(24, din=4, seed=6), data(2, din=4, seed=7)
    kw: dict[str, Any] = dict(num_eigenvectors=3, sigma=0.2, estimator="direct_mc", num_samples=8, tol=1e-10)
    curve = stability_curve(model, mse, base, added, sample_sizes=[24], quadratic_error_samples=4, **kw)
    assert math.isnan(curve.decay_exponent) and math.isnan(curve.delta1_exponent) and curve.sufficient_k is None
    assert bool(torch.isfinite(curve.quadratic_error).all())
    again = stability_curve(model, mse, base, added, sample_sizes=[12, 24], quadratic_error_samples=4, **kw)
    # the probe draws are the same standard normals at every k: the last point does not depend on the earlier ones
    assert torch.allclose(again.delta2[1], curve.delta2[0], rtol=1e-6)
    assert torch.allclose(again.quadratic_error[1], curve.quadratic_error[0], rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(sample_sizes=[]), ValueError, "`sample_sizes`.*at least one"),
        (dict(sample_sizes=[0, 4]), ValueError, "`sample_sizes` must be positive"),
        (dict(sample_sizes=[4, 4]), ValueError, "`sample_sizes` must be strictly increasing"),
        (dict(sample_sizes=[8, 4]), ValueError, "`sample_sizes` must be strictly increasing"),
        (dict(sample_sizes=[4, 11]), ValueError, r"`sample_sizes` must not exceed .*\(10\)"),
        (dict(sample_sizes=[2.5, 4]), TypeError, "`sample_sizes` must hold ints"),
        (dict(sample_sizes=5), TypeError, "`sample_sizes` must be a sequence"),
        (dict(sample_sizes=[4], tolerance=0.0), ValueError, "`tolerance`"),
        (dict(sample_sizes=[4], sigma=-1.0), ValueError, "`sigma`"),
        (dict(sample_sizes=[4], num_eigenvectors=7), ValueError, "`num_eigenvectors`"),
        (dict(sample_sizes=[4], estimator="bogus"), ValueError, "`estimator`"),
        (dict(sample_sizes=[4], quadratic_error_samples=-1), ValueError, "`quadratic_error_samples`"),
    ],
)
def test_curve_bad_inputs(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    kwargs.setdefault("num_eigenvectors", 2)
    with pytest.raises(exc, match=match):
        stability_curve(linear(), mse, data(10), data(1), **kwargs)


# ----------------------------------------------------------------------------------------------- sigma selection


def _subspace(model: nn.Module, base: Any, D: int, tol: float = 1e-12) -> tuple[Tensor, Tensor]:
    res = probe_stability(model, mse, base, (base[0][:1], base[1][:1]), num_eigenvectors=D, tol=tol)
    return res.eigenvectors, res.eigenvalues


def test_select_sigma_exact_quadratic_picks_largest() -> None:
    model, base = linear(), data(20, seed=8)
    U, lam = _subspace(model, base, 3)
    before = snapshot(model)
    sel = select_sigma(model, mse, base, U, lam, num_draws=4)
    assert_untouched(model, before)
    assert isinstance(sel, SigmaSelection) and sel.valid
    assert len(sel.grid) == 11 and sel.grid[0] == pytest.approx(1e-6) and sel.grid[-1] == 0.1
    assert sel.sigma == 0.1 and sel.index == 10
    assert max(sel.errors) < 1e-6  # the quadratic model is exact: only rounding
    assert sel.forward_passes == 11 * 4


def test_select_sigma_tanh_mlp_largest_below_threshold() -> None:
    model, base = tanh_mlp(din=4, hidden=8, seed=1), data(16, din=4, seed=9)
    U, lam = _subspace(model, base, 3)
    thr = 2e-3  # between the errors at sigma = 0.0316 (6.3e-4) and 0.1 (5.0e-3) with these draws and canonical signs
    sel = select_sigma(model, mse, base, U, lam, max_quadratic_error=thr, num_draws=6, generator=gen(3))
    full = select_sigma(
        model, mse, base, U, lam, max_quadratic_error=thr, num_draws=6, generator=gen(3), stop_early=False
    )
    i = sel.index
    assert sel.valid and 0 < i < len(sel.grid) - 1
    assert sel.errors[i] <= thr < sel.errors[i + 1]
    assert all(math.isnan(e) for e in sel.errors[i + 2 :])  # stopped early
    assert sel.forward_passes == (i + 2) * 6 and full.forward_passes == 11 * 6
    # common random numbers: the scanned errors do not depend on the early stop; smooth growth above rounding
    assert sel.errors[: i + 2] == full.errors[: i + 2]
    above = [e for e in full.errors if e > 1e-6]
    assert len(above) >= 4 and all(b > a for a, b in zip(above, above[1:], strict=False))
    assert full.sigma == sel.sigma
    # independent recomputation of one grid point with the same standard normals
    zeta = torch.randn(6, 3, generator=gen(3), dtype=DT)
    fn = ModelFunction(model, mse)
    w0 = fn.current().requires_grad_(True)
    loss0 = fn.loss(w0, base)
    (g0,) = torch.autograd.grad(loss0, w0)
    s = sel.grid[i]
    with torch.no_grad():
        z = s * zeta
        change = torch.stack([fn.loss(w0 + U @ zq, base) - loss0 for zq in z])
        model_q = z @ (U.T @ g0) + 0.5 * (z * z) @ lam
        ref = float((change - model_q).abs().mean() / change.abs().mean())
    assert sel.errors[i] == pytest.approx(ref, rel=1e-8)


def test_select_sigma_float32_cancellation_and_no_valid_point() -> None:
    model, base = tanh_mlp(din=4, hidden=8, seed=1, dtype=torch.float32), data(16, din=4, seed=9, dtype=torch.float32)
    U, lam = _subspace(model, base, 3, tol=1e-5)
    sel = select_sigma(model, mse, base, U, lam, max_quadratic_error=0.05, stop_early=False)
    assert sel.errors[0] > 0.05  # cancellation in L(w0 + Uz) - L(w0) at sigma = 1e-6 in float32
    assert sel.valid and sel.errors[sel.index] <= 0.05
    assert all(not (e <= 0.05) for e in sel.errors[sel.index + 1 :])
    none = select_sigma(model, mse, base, U, lam, max_quadratic_error=1e-9, grid=[1e-2, 1e-3])
    assert not none.valid and none.sigma == 1e-3 and none.index == 0 and none.grid == [1e-3, 1e-2]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_quadratic_error=0.0), "`max_quadratic_error`"),
        (dict(grid=[]), "`grid`"),
        (dict(grid=[1e-3, -1.0]), "`grid`"),
        (dict(num_draws=0), "`num_draws`"),
        (dict(eigenvectors=torch.zeros(5, 2, dtype=DT)), r"`eigenvectors` must be a tensor of shape \(7, D\)"),
        (dict(eigenvalues=torch.zeros(3, dtype=DT)), r"`eigenvalues` must be a tensor of shape \(2,\)"),
    ],
)
def test_select_sigma_bad_inputs(kwargs: dict[str, Any], match: str) -> None:
    args = dict(eigenvectors=torch.eye(7, 2, dtype=DT), eigenvalues=torch.ones(2, dtype=DT))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        select_sigma(linear(), mse, data(10), **args)


# ----------------------------------------------------------------------------------------------- full-space delta2


def _linear_flat_loss(din: int, dout: int, batch: tuple[Tensor, Tensor]) -> Any:
    x, y = batch

    def f(w: Tensor) -> Tensor:  # weight (dout, din) then bias, in named_parameters order
        W, b = w[: dout * din].view(dout, din), w[dout * din :]
        return ((x @ W.T + b - y) ** 2).mean()

    return f


@pytest.mark.parametrize(("sigma", "max_a2_share"), [(0.3, 0.8), (1.5, 0.05)])
def test_delta2_full_space_matches_exact_expectation_on_quadratic_loss(sigma: float, max_a2_share: float) -> None:
    din, dout, S = 3, 2, 400
    model = linear(din, dout, seed=4)  # N = 8
    base, added = data(6, din, dout, seed=10), data(2, din, dout, seed=11)
    k = 6
    w0 = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    f_k = _linear_flat_loss(din, dout, base)
    H_k = torch.autograd.functional.hessian(f_k, w0)
    g_k = torch.autograd.functional.jacobian(f_k, w0)
    a, c, B = [], [], []
    for j in range(2):
        f_j = _linear_flat_loss(din, dout, (added[0][j : j + 1], added[1][j : j + 1]))
        a.append((f_j(w0) - f_k(w0)) / (k + 1))
        c.append((torch.autograd.functional.jacobian(f_j, w0) - g_k) / (k + 1))
        B.append((torch.autograd.functional.hessian(f_j, w0) - H_k) / (k + 1))
    a_t, c_t, B_t = torch.stack(a), torch.stack(c), torch.stack(B)
    exact = delta2_gaussian_moment(a_t, c_t, B_t, sigma).mean()
    # the signal is not only a^2: the c and B terms carry a good share of it (most of it at the larger sigma)
    assert float((a_t**2).mean()) < max_a2_share * float(exact)

    before = snapshot(model)
    est = delta2_full_space(model, mse, base, added, sigma=sigma, num_samples=S, generator=gen(21))
    assert_untouched(model, before)
    inc = _full_space_increments(ModelFunction(model, mse), base, added, sigma, S, gen(21))
    assert est.dtype == DT and torch.allclose(est, (inc**2).mean(), rtol=1e-14)
    # draw by draw the increment is exactly the full-space quadratic a + c.xi + xi.B.xi/2
    g = gen(21)
    xi = torch.stack([sigma * torch.randn(1, 8, generator=g, dtype=DT)[0] for _ in range(S)])
    quad = a_t[:, None] + c_t @ xi.T + 0.5 * torch.einsum("sn,mnp,sp->ms", xi, B_t, xi)
    assert torch.allclose(inc, quad, rtol=1e-10, atol=1e-13)
    per_draw = (inc**2).mean(0)
    se = float(per_draw.std() / math.sqrt(S))
    assert abs(float(est) - float(exact)) <= 4 * se, (float(est), float(exact), se)


def test_delta2_full_space_defaults_and_untouched_bn_dropout() -> None:
    model = init_(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 1)), 0)
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    base, added = data(8, din=4, seed=12), data(2, din=4, seed=13)
    before = snapshot(model)
    d1 = delta2_full_space(model, mse, base, added, sigma=0.05, num_samples=8)
    d2 = delta2_full_space(model, mse, base, added, sigma=0.05, num_samples=8)
    assert_untouched(model, before)
    assert torch.equal(d1, d2) and bool(d1 > 0)  # default generator seeded 0, deterministic (eval mode)
    U, lam = _subspace(model, base, 2)
    before = snapshot(model)
    select_sigma(model, mse, base, U, lam, num_draws=2, grid=[1e-3, 1e-2])
    stability_curve(model, mse, base, added, sample_sizes=[4, 8], num_eigenvectors=2, estimator="direct_mc")
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(sigma=0.0), "`sigma`"),
        (dict(sigma=0.1, num_samples=0), "`num_samples`"),
        (dict(sigma=0.1, added_batch=(torch.zeros(0, 6, dtype=DT), torch.zeros(0, 1, dtype=DT))), "`added_batch`"),
    ],
)
def test_delta2_full_space_bad_inputs(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = dict(added_batch=data(1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        delta2_full_space(linear(), mse, data(10), **args)
