"""probe_stability against dense references, exact identities on quadratic losses, and its contract."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import (
    DT,
    assert_untouched,
    ce_loss,
    class_data,
    dense_grad_loss,
    dense_hessian,
    gen,
    linear,
    mlp,
    mlp_bn_dropout,
    mse_loss,
    regression_data,
    relerr,
    set_some_grads,
    snapshot,
)

from lightning_curvprobe.functional import (
    HessianOperator,
    ModelFunction,
    NonFiniteProbeError,
    delta2_gaussian_moment,
    increment_coefficients,
    probe_stability,
    quadratic_surrogate,
    top_eigenpairs,
)
from lightning_curvprobe.functional.estimators import _direct_increments
from lightning_curvprobe.functional.lanczos import _default_num_extra
from lightning_curvprobe.functional.probe import _collect_statistics


def linear_setup(k: int = 32, din: int = 8, seed: int = 0):
    """Linear regression with MSE (an exactly quadratic loss), k base samples, weights not at the minimiser."""
    model = linear(din, 1, seed=seed)
    x, y = regression_data(k + 3, din, 1, seed=seed + 1)
    return model, (x[:k], y[:k]), (x[k:], y[k:])


def zero_a_added_sample(model, base):
    """An added sample with a = 0: the inputs of base sample 0 with a target whose loss equals L_k (SPEC §1).

    ℓ_j = (f(x_0) − y_j)² = L_k for y_j = f(x_0) − √L_k; its gradient and Hessian differ from the base set's, so c and B
    carry the whole signal.
    """
    x, y = base
    with torch.no_grad():
        L = mse_loss(model, base)
        yj = model(x[:1]) - L.sqrt()
    return x[:1].clone(), yj


def q2_standard_error(a, c, B, sigma: float, S: int, seed: int) -> float:
    """SE of an S-draw mean of the squared surrogate, sd(q²)/√S, with sd estimated from 2·10⁵ independent draws."""
    z = sigma * torch.randn(200_000, c.shape[-1], generator=gen(seed), dtype=DT)
    return float((quadratic_surrogate(a, c, B, z) ** 2).std(dim=-1).max()) / math.sqrt(S)


# ----------------------------------------------------------------------------------------------- exactly quadratic loss


@pytest.mark.parametrize("sigma", [1e-2, 0.5, 3.0])
def test_direct_equals_quadratic_draw_for_draw_on_linear_mse(sigma):
    """On an exactly quadratic loss the quadratic model is exact: δ(w0 + U z) = a + cᵀz + ½ zᵀBz for every z."""
    model, base, added = linear_setup()
    fn = ModelFunction(model, mse_loss)
    op = HessianOperator(fn, base)
    eig = top_eigenpairs(op.matvec, fn.num_params, 4, tol=1e-13)
    z = sigma * torch.randn(40, 4, generator=gen(5), dtype=DT)
    stats = _collect_statistics(fn, base, added, eig.eigenvectors, eig.eigenvalues, direct_z=z)
    assert stats.forward_passes == 40 * (1 + 3)
    a, c, B = increment_coefficients(
        stats.base_loss_sum,
        stats.base_count,
        stats.base_grad_sum,
        stats.base_hess_sum,
        stats.added_loss,
        stats.added_grad,
        stats.added_hess,
    )
    direct = _direct_increments(stats.base_draw_loss_sum, stats.base_count, stats.added_draw_loss)
    quad = quadratic_surrogate(a, c, B, z)
    assert direct.shape == quad.shape == (3, 40)
    assert relerr(direct, quad) < 1e-10
    assert float(direct.abs().min()) > 0


def test_direct_differs_from_quadratic_on_nonquadratic_loss():
    """The same identity fails for a tanh MLP at a large σ (so the test above can fail)."""
    model = mlp("tanh", seed=1)
    x, y = regression_data(20, seed=2)
    base, added = (x[:16], y[:16]), (x[16:], y[16:])
    fn = ModelFunction(model, mse_loss)
    eig = top_eigenpairs(HessianOperator(fn, base).matvec, fn.num_params, 3, tol=1e-10)
    z = 1.0 * torch.randn(20, 3, generator=gen(5), dtype=DT)
    stats = _collect_statistics(fn, base, added, eig.eigenvectors, eig.eigenvalues, direct_z=z)
    a, c, B = increment_coefficients(
        stats.base_loss_sum,
        stats.base_count,
        stats.base_grad_sum,
        stats.base_hess_sum,
        stats.added_loss,
        stats.added_grad,
        stats.added_hess,
    )
    direct = _direct_increments(stats.base_draw_loss_sum, stats.base_count, stats.added_draw_loss)
    assert relerr(direct, quadratic_surrogate(a, c, B, z)) > 1e-2


def test_zero_a_case_c_and_B_carry_the_signal():
    """a = 0 exactly (added sample: a base input with a target whose loss is L_k); Δ₂^(D) ≫ a², and every estimator
    agrees with the closed form within its Monte Carlo standard error."""
    model, base, _ = linear_setup(k=16)
    added = zero_a_added_sample(model, base)
    sigma, D = 0.3, 3
    gm = probe_stability(model, mse_loss, base, added, num_eigenvectors=D, sigma=sigma, tol=1e-12)
    a, c, B = gm.a, gm.c, gm.B
    assert abs(float(a[0])) < 1e-14
    c_term = sigma**2 * float((c * c).sum())
    trB, trB2 = float(B[0].diagonal().sum()), float((B[0] * B[0]).sum())
    b_term = sigma**4 / 4 * (2 * trB2 + trB**2)
    assert c_term > 1e-3 and b_term > 1e-4 * c_term  # both terms are present
    torch.testing.assert_close(gm.delta2, torch.tensor(c_term + b_term, dtype=DT), rtol=1e-12, atol=0)
    assert float(gm.delta2) > 1e20 * float(a[0]) ** 2
    assert float(gm.delta1) < 1e-14
    # MC estimators: |MC − GM| ≤ 4 SE (asymptotically normal mean; fixed seeds). For direct MC the increments are
    # exactly the surrogate (linear model, MSE), so the same SE applies.
    S = 20_000
    se = q2_standard_error(a, c, B, sigma, S, seed=77)
    assert se < 0.02 * float(gm.delta2)  # the comparison has power
    for estimator, gseed in (("quadratic_mc", 1), ("direct_mc", 2)):
        res = probe_stability(
            model,
            mse_loss,
            base,
            added,
            num_eigenvectors=D,
            sigma=sigma,
            tol=1e-12,
            estimator=estimator,
            num_samples=S if estimator == "quadratic_mc" else 2000,
            generator=gen(gseed),
            quadratic_error_samples=0,
        )
        # same coefficients up to the signs of the eigenvectors (another generator, another start vector)
        gm_again = delta2_gaussian_moment(res.a, res.c, res.B, sigma)
        torch.testing.assert_close(gm_again, gm.delta2_per_sample, rtol=1e-9, atol=0)
        bound = 4 * se * (1 if estimator == "quadratic_mc" else math.sqrt(S / 2000))
        assert abs(float(res.delta2) - float(gm.delta2)) <= bound, (estimator, res.delta2, gm.delta2, bound)


def test_quadratic_error_vanishes_on_quadratic_loss():
    model, base, added = linear_setup()
    res = probe_stability(model, mse_loss, base, added, num_eigenvectors=3, sigma=1.0, tol=1e-12)
    assert float(res.quadratic_error) < 1e-10
    # a tanh MLP: the second-order model of L_k degrades as σ grows
    model = mlp("tanh", seed=2)
    x, y = regression_data(20, seed=3)
    errs = [
        float(
            probe_stability(
                model, mse_loss, (x[:16], y[:16]), (x[16:], y[16:]), num_eigenvectors=3, sigma=s
            ).quadratic_error
        )
        for s in (1e-3, 1.0)
    ]
    assert errs[0] < 1e-2 and errs[1] > 10 * errs[0]
    none = probe_stability(
        model, mse_loss, (x[:16], y[:16]), (x[16:], y[16:]), num_eigenvectors=3, quadratic_error_samples=0
    )
    assert math.isnan(float(none.quadratic_error))


# ----------------------------------------------------------------------------------------------- dense references


@pytest.fixture(scope="module")
def mlp_probe():
    """A tanh MLP (419 parameters) with cross-entropy: probe result and dense references for base and added samples."""
    model = mlp("tanh", seed=4)
    x, y = class_data(27, seed=5)
    base, added = (x[:24], y[:24]), (x[24:], y[24:])
    res = probe_stability(model, ce_loss, base, added, num_eigenvectors=4, sigma=0.05, tol=1e-12)
    Hk = dense_hessian(model, ce_loss, base)
    Lk, gk = dense_grad_loss(model, ce_loss, base)
    per = [dense_grad_loss(model, ce_loss, (x[i : i + 1], y[i : i + 1])) for i in range(24, 27)]
    Hj = [dense_hessian(model, ce_loss, (x[i : i + 1], y[i : i + 1])) for i in range(24, 27)]
    return model, base, added, res, Hk, Lk, gk, per, Hj


def test_coefficients_equal_dense_references(mlp_probe):
    _, _, _, res, Hk, Lk, gk, per, Hj = mlp_probe
    k = 24
    U = res.eigenvectors
    assert res.converged
    ref_vals, ref_vecs = torch.linalg.eigh(Hk)
    torch.testing.assert_close(res.eigenvalues, ref_vals.flip(0)[:4], rtol=0, atol=1e-10 * float(ref_vals.abs().max()))
    # the subspace is the top-4 eigenspace: ‖Q_4ᵀU‖_F² = 4
    assert abs(float((ref_vecs.flip(1)[:, :4].T @ U).norm() ** 2) - 4) < 1e-9
    for j, ((lj, gj), H) in enumerate(zip(per, Hj, strict=True)):
        a_ref = (lj - Lk) / (k + 1)
        c_ref = U.T @ (gj - gk) / (k + 1)
        B_ref = (U.T @ H @ U - U.T @ Hk @ U) / (k + 1)
        B_ref = 0.5 * (B_ref + B_ref.T)
        assert math.isclose(float(res.a[j]), float(a_ref), rel_tol=1e-10)
        assert relerr(res.c[j], c_ref) < 1e-9
        assert relerr(res.B[j], B_ref) < 1e-9
    assert res.added_hvps == 3 * 4
    assert res.c.shape == (3, 4) and res.B.shape == (3, 4, 4) and res.a.shape == (3,)


def test_reported_value_is_mean_over_added_samples(mlp_probe):
    _, _, _, res, *_ = mlp_probe
    per = delta2_gaussian_moment(res.a, res.c, res.B, 0.05)
    torch.testing.assert_close(res.delta2_per_sample, per, rtol=1e-14, atol=0)
    torch.testing.assert_close(res.delta2, per.mean(), rtol=1e-14, atol=0)
    torch.testing.assert_close(res.delta2_stderr, per.std() / math.sqrt(3), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.delta1, res.a.abs().mean(), rtol=1e-14, atol=0)
    assert res.sigma == 0.05 and res.estimator == "gaussian_moment"


def test_hvp_count_and_warm_start(mlp_probe):
    model, base, added, res, *_ = mlp_probe
    assert res.hvps > 4
    assert res.basis.shape == (res.eigenvectors.shape[0], 4 + _default_num_extra(4, res.eigenvectors.shape[0]))
    again = probe_stability(
        model, ce_loss, base, added, num_eigenvectors=4, sigma=0.05, tol=1e-10, warm_start=res.basis
    )
    assert again.converged and again.hvps <= res.basis.shape[1] + 1  # Rayleigh–Ritz (+ one test product)
    torch.testing.assert_close(again.delta2, res.delta2, rtol=1e-8, atol=0)


@pytest.mark.parametrize("k", [8, 16, 32, 64])
def test_nested_base_sets_B_scales_like_inverse_k(k):
    """Same added sample, base sets = prefixes: (k+1)·B = Uᵀ(H_j − H_k)U and (k+1)·c = Uᵀ(g_j − g_k) exactly, so
    (k+1)‖B‖₂ ≤ ‖H_j‖₂ + ‖H_k‖₂ (U orthonormal) — B = O(1/(k+1))."""
    model = mlp("tanh", din=4, hidden=8, dout=2, seed=6)
    x, y = regression_data(65, din=4, dout=2, seed=7)
    base, added = (x[:k], y[:k]), (x[64:], y[64:])
    res = probe_stability(model, mse_loss, base, added, num_eigenvectors=3, sigma=0.1, tol=1e-12)
    Hk, Hj = dense_hessian(model, mse_loss, base), dense_hessian(model, mse_loss, added)
    (Lk, gk), (lj, gj) = dense_grad_loss(model, mse_loss, base), dense_grad_loss(model, mse_loss, added)
    U = res.eigenvectors
    M = U.T @ (Hj - Hk) @ U
    assert relerr(res.B[0] * (k + 1), 0.5 * (M + M.T)) < 1e-9
    assert relerr(res.c[0] * (k + 1), U.T @ (gj - gk)) < 1e-9
    assert math.isclose(float(res.a[0]) * (k + 1), float(lj - Lk), rel_tol=1e-10)
    bound = float(torch.linalg.matrix_norm(Hj, 2) + torch.linalg.matrix_norm(Hk, 2))
    assert float(torch.linalg.matrix_norm(res.B[0], 2)) * (k + 1) <= bound


# ----------------------------------------------------------------------------------------------- dtype, determinism


def test_dtypes_follow_the_model():
    model, base, added = linear_setup()
    res = probe_stability(model, mse_loss, base, added, num_eigenvectors=2, sigma=0.1)
    for t in (res.delta2, res.delta1, res.a, res.c, res.B, res.eigenvalues, res.eigenvectors, res.quadratic_error):
        assert t.dtype == torch.float64
    model32 = linear(8, 1, seed=0).float()
    res32 = probe_stability(model32, mse_loss, base, added, num_eigenvectors=2, sigma=0.1)  # float64 data are cast
    for t in (res32.delta2, res32.delta1, res32.a, res32.c, res32.B, res32.eigenvalues, res32.eigenvectors):
        assert t.dtype == torch.float32
    torch.testing.assert_close(res32.delta2.double(), res.delta2, rtol=1e-4, atol=0)
    assert all(p.dtype == torch.float32 for p in model32.parameters())


def test_deterministic_given_generator():
    model = mlp("tanh", seed=8)
    x, y = regression_data(20, seed=9)
    base, added = (x[:16], y[:16]), (x[16:], y[16:])
    kw = dict(num_eigenvectors=3, sigma=0.1, estimator="quadratic_mc", num_samples=100)
    r1 = probe_stability(model, mse_loss, base, added, generator=gen(3), **kw)
    r2 = probe_stability(model, mse_loss, base, added, generator=gen(3), **kw)
    assert torch.equal(r1.delta2, r2.delta2) and torch.equal(r1.eigenvectors, r2.eigenvectors)
    r3 = probe_stability(model, mse_loss, base, added, generator=gen(4), **kw)
    assert not torch.equal(r3.delta2, r1.delta2)
    d1 = probe_stability(model, mse_loss, base, added, **kw)  # default generator: seeded 0
    d2 = probe_stability(model, mse_loss, base, added, **kw)
    assert torch.equal(d1.delta2, d2.delta2)


# ----------------------------------------------------------------------------------------------- nothing disturbed


@pytest.mark.parametrize("estimator", ["gaussian_moment", "quadratic_mc", "direct_mc"])
def test_model_untouched(estimator):
    model = mlp_bn_dropout(seed=2)
    model.train()
    model[4].eval()  # mixed flags: each module's own flag must be restored
    set_some_grads(model)
    x, y = class_data(14, seed=3)
    before = snapshot(model)
    res = probe_stability(
        model,
        ce_loss,
        (x[:12], y[:12]),
        (x[12:], y[12:]),
        num_eigenvectors=3,
        sigma=0.05,
        estimator=estimator,
        num_samples=16,
    )
    assert torch.isfinite(res.delta2)
    assert_untouched(model, before)


def test_model_untouched_without_grads_and_eval_mode_used():
    """The probe evaluates in eval mode: it equals the probe of an identical model already in eval mode."""
    x, y = class_data(14, seed=3)
    train_model = mlp_bn_dropout(seed=2).train()
    eval_model = mlp_bn_dropout(seed=2).eval()
    before = snapshot(train_model)
    r_train = probe_stability(train_model, ce_loss, (x[:12], y[:12]), (x[12:], y[12:]), num_eigenvectors=3)
    r_eval = probe_stability(eval_model, ce_loss, (x[:12], y[:12]), (x[12:], y[12:]), num_eigenvectors=3)
    assert torch.equal(r_train.delta2, r_eval.delta2)
    assert_untouched(train_model, before)
    assert all(p.grad is None for p in train_model.parameters())


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def small():
    model, base, added = linear_setup(k=8)
    return model, base, added


def test_bad_num_eigenvectors(small):
    model, base, added = small
    with pytest.raises(ValueError, match=r"`num_eigenvectors` must be an int >= 1, got 0"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=0)
    with pytest.raises(
        ValueError,
        match=r"`num_eigenvectors` must be smaller than the number of trainable parameters "
        r"\(9\), got 9",
    ):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=9)
    with pytest.raises(TypeError, match=r"`num_eigenvectors` must be an int, got 2.5"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=2.5)
    # D = N − 1 is allowed
    res = probe_stability(model, mse_loss, base, added, num_eigenvectors=8, tol=1e-10)
    assert res.converged and res.eigenvectors.shape == (9, 8)


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_sigma(small, sigma):
    model, base, added = small
    with pytest.raises(ValueError, match=r"`sigma` must be a positive finite float"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=2, sigma=sigma)


def test_bad_estimator_num_samples_tol(small):
    model, base, added = small
    with pytest.raises(
        ValueError, match=r"`estimator` must be one of 'gaussian_moment', 'quadratic_mc', 'direct_mc', got 'exact'"
    ):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=2, estimator="exact")
    with pytest.raises(ValueError, match=r"`num_samples` must be an int >= 1, got 0"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=2, estimator="quadratic_mc", num_samples=0)
    with pytest.raises(ValueError, match=r"`tol` must be a positive finite float, got 0.0"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=2, tol=0.0)
    with pytest.raises(ValueError, match=r"`quadratic_error_samples` must be an int >= 0"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=2, quadratic_error_samples=-1)


def test_empty_batches(small):
    model, base, added = small
    x, y = base
    with pytest.raises(ValueError, match=r"`base_batch` must hold at least 1 sample, got 0"):
        probe_stability(model, mse_loss, (x[:0], y[:0]), added, num_eigenvectors=2)
    with pytest.raises(ValueError, match=r"`added_batch` must hold at least 1 sample, got 0"):
        probe_stability(model, mse_loss, base, (x[:0], y[:0]), num_eigenvectors=2)
    with pytest.raises(ValueError, match=r"`base_batch` must be a tensor or a \(nested\) tuple"):
        probe_stability(model, mse_loss, ("no", "tensors"), added, num_eigenvectors=2)


def test_bad_losses(small):
    model, base, added = small
    before = snapshot(model)

    def vector_loss(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean(1)

    with pytest.raises(ValueError, match=r"`loss_fn` must return a scalar tensor .* got \(8,\) on the base samples"):
        probe_stability(model, vector_loss, base, added, num_eigenvectors=2)

    def float_loss(m, b):
        return 1.0

    with pytest.raises(ValueError, match=r"`loss_fn` must return a scalar tensor .* got float"):
        probe_stability(model, float_loss, base, added, num_eigenvectors=2)

    def nan_loss(m, b):
        return mse_loss(m, b) * float("nan")

    with pytest.raises(NonFiniteProbeError, match=r"`loss_fn` returned a non-finite loss \(nan\) on the base samples"):
        probe_stability(model, nan_loss, base, added, num_eigenvectors=2)

    def inf_on_added(m, b):  # finite on the base set, infinite on the (single) added samples
        loss = mse_loss(m, b)
        return loss + float("inf") if b[0].shape[0] == 1 else loss

    with pytest.raises(NonFiniteProbeError, match=r"non-finite loss \(inf\) on added sample 0"):
        probe_stability(model, inf_on_added, base, added, num_eigenvectors=2)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("estimator", "qe", "name"),
    [("direct_mc", 0, "direct Monte Carlo"), ("gaussian_moment", 4, "quadratic-validity")],
)
def test_non_finite_loss_at_probe_points_raises(small, estimator, qe, name):
    """Finite at ``w0`` (loss, gradient, HVPs) but not at points ``w0 + Uz`` the draws reach: raised, not NaN."""
    model, base, added = small
    before = snapshot(model)
    limit = float(model.weight.detach().pow(2).sum()) + 1e-3

    def barrier_loss(m, b):
        return mse_loss(m, b) + 1e-3 * torch.log(limit - m.weight.pow(2).sum())

    kw = dict(num_eigenvectors=2, sigma=0.5, estimator=estimator, num_samples=8, quadratic_error_samples=qe)
    with pytest.raises(NonFiniteProbeError, match=rf"not finite at [1-9]\d* of the {name} probe points"):
        probe_stability(model, barrier_loss, base, added, **kw)
    assert_untouched(model, before)
    ok = probe_stability(model, barrier_loss, base, added, **{**kw, "sigma": 1e-6})  # inside the barrier
    assert math.isfinite(float(ok.delta2))


def test_no_trainable_parameters(small):
    model, base, added = small
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"`model` must have at least one trainable parameter"):
        probe_stability(model, mse_loss, base, added, num_eigenvectors=1)


def test_no_warning_when_converged(small):
    model, base, added = small
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = probe_stability(model, mse_loss, base, added, num_eigenvectors=3, tol=1e-10)
    assert res.converged
