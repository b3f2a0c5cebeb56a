"""HessianOperator / ModelFunction against dense float64 Hessians from ``torch.autograd.functional.hessian``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    CASES,
    DT,
    ce_loss,
    class_data,
    dense_grad_loss,
    dense_hessian,
    flat_loss_fn,
    flat_params,
    gen,
    mlp,
    mlp_bn_dropout,
    mse_loss,
    regression_data,
    relerr,
    set_some_grads,
    snapshot,
)
from conftest import assert_untouched as _assert_untouched

from lightning_curvprobe.functional import HessianOperator, ModelFunction, NonFiniteProbeError

N_SAMPLES = 12


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(model in train mode, loss_fn, batch, dense eval-mode Hessian) for every model of the zoo."""
    make_model, make_data, loss_fn = CASES[request.param]
    model = make_model()
    batch = make_data(N_SAMPLES)
    H = dense_hessian(model, loss_fn, batch)
    model.train()  # the operator must switch to eval mode by itself (BatchNorm batch statistics, Dropout)
    return model, loss_fn, batch, H


def test_matvec_equals_dense_hessian(case):
    model, loss_fn, batch, H = case
    n = H.shape[0]
    op = HessianOperator(ModelFunction(model, loss_fn), batch)
    assert op.dim == n and op.num_hvps == 0
    assert H.norm() > 1e-3  # a non-trivial reference
    g = gen(7)
    for _ in range(3):
        v = torch.randn(n, generator=g, dtype=DT)
        hv = op.matvec(v)
        assert hv.shape == (n,) and hv.dtype == DT
        assert relerr(hv, H @ v) < 1e-12
    # unit vectors reproduce columns of H exactly (up to rounding)
    e = torch.zeros(n, dtype=DT)
    e[n // 2] = 1.0
    assert relerr(op(e), H[:, n // 2]) < 1e-12
    assert op.num_hvps == 4


def test_block_matvec_equals_columns_and_counts(case):
    model, loss_fn, batch, H = case
    n = H.shape[0]
    op = HessianOperator(ModelFunction(model, loss_fn), batch)
    V = torch.randn(n, 4, generator=gen(8), dtype=DT)
    HV = op.matvec(V)
    assert HV.shape == (n, 4)
    assert op.num_hvps == 4
    cols = torch.stack([op.matvec(V[:, i]) for i in range(4)], dim=1)
    assert op.num_hvps == 8
    torch.testing.assert_close(HV, cols, rtol=1e-13, atol=1e-14 * float(H.norm()))
    assert relerr(HV, H @ V) < 1e-12
    op.matvec(V[:, :1])
    assert op.num_hvps == 9


def test_loss_and_gradient_match_dense(case):
    model, loss_fn, batch, _ = case
    loss, grad = dense_grad_loss(model, loss_fn, batch)
    op = HessianOperator(ModelFunction(model, loss_fn), batch)
    torch.testing.assert_close(op.loss, loss, rtol=1e-13, atol=0)
    assert relerr(op.gradient, grad) < 1e-12
    assert op.loss.dtype == DT and op.gradient.dtype == DT


def test_eval_mode_is_used_not_train_mode():
    """In train mode BatchNorm would use batch statistics: the operator must use the running ones (eval mode)."""
    model = mlp_bn_dropout(seed=3)
    batch = regression_data(N_SAMPLES, seed=4)
    H_eval = dense_hessian(model, mse_loss, batch)
    model.train()
    op = HessianOperator(ModelFunction(model, mse_loss), batch)
    v = torch.randn(H_eval.shape[0], generator=gen(1), dtype=DT)
    assert relerr(op.matvec(v), H_eval @ v) < 1e-12
    # the check can fail: the train-mode Hessian (batch statistics, Dropout disabled) is far from the eval one
    train_model = copy.deepcopy(model)
    train_model[3].p = 0.0
    H_train = torch.autograd.functional.hessian(flat_loss_fn(train_model, mse_loss, batch), flat_params(train_model))
    assert relerr(H_train, H_eval) > 1e-2


@pytest.mark.parametrize("in_place", [False, True])
def test_sharded_operator_sums_to_global(in_place):
    """Two unequal shards with scale n_shard / n_total and a summing reduce_fn give the global loss, gradient, HVP."""
    model = mlp("tanh", seed=2)
    x, y = class_data(10, seed=3)
    full_batch = (x, y)
    fn = ModelFunction(model, ce_loss)
    full = HessianOperator(fn, full_batch)
    shards = [(x[:4], y[:4]), (x[4:], y[4:])]
    scales = [4 / 10, 6 / 10]
    parts = [HessianOperator(fn, s, scale=c) for s, c in zip(shards, scales, strict=True)]
    n = fn.num_params
    V = torch.randn(n, 3, generator=gen(4), dtype=DT)

    # the plain sum of the shards' partial results is the global result
    torch.testing.assert_close(parts[0].loss + parts[1].loss, full.loss, rtol=1e-14, atol=0)
    assert relerr(parts[0].gradient + parts[1].gradient, full.gradient) < 1e-13
    HV = full.matvec(V)
    assert relerr(parts[0].matvec(V) + parts[1].matvec(V), HV) < 1e-13
    # unscaled shard loss is the shard's own mean loss
    torch.testing.assert_close(HessianOperator(fn, shards[0]).loss, parts[0].loss / scales[0], rtol=1e-14, atol=0)

    # a fake all-reduce for "rank 0": adds rank 1's partial result (loss, then gradient, then HVP blocks)
    other = parts[1]
    queue = [other.local_loss, other.local_gradient, other.matvec(V), other.matvec(V[:, 0])[:, None]]
    seen = []

    def reduce_fn(t):
        seen.append(tuple(t.shape))
        add = queue.pop(0).reshape(t.shape)
        if in_place:
            t.add_(add)
            return None
        return t + add

    rank0 = HessianOperator(fn, shards[0], scale=scales[0], reduce_fn=reduce_fn)
    torch.testing.assert_close(rank0.loss, full.loss, rtol=1e-14, atol=0)
    assert relerr(rank0.gradient, full.gradient) < 1e-13
    # local (pre-reduction) values are kept separately
    torch.testing.assert_close(rank0.local_loss, parts[0].local_loss, rtol=0, atol=0)
    assert relerr(rank0.local_gradient, parts[0].gradient) < 1e-14
    assert relerr(rank0.matvec(V), HV) < 1e-13
    assert relerr(rank0.matvec(V[:, 0]), HV[:, 0]) < 1e-13
    assert seen == [(), (n,), (n, 3), (n, 1)]
    assert rank0.num_hvps == 4 and not queue


def test_point_argument_linearises_elsewhere():
    model = mlp("tanh", seed=5)
    batch = regression_data(N_SAMPLES, seed=6)
    w1 = flat_params(model) + 0.3 * torch.randn(flat_params(model).shape, generator=gen(2), dtype=DT)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(w1, moved.parameters())
    H0, H1 = dense_hessian(model, mse_loss, batch), dense_hessian(moved, mse_loss, batch)
    assert relerr(H1, H0) > 1e-2
    w0 = flat_params(model)
    op = HessianOperator(ModelFunction(model, mse_loss), batch, point=w1)
    v = torch.randn(w1.shape, generator=gen(3), dtype=DT)
    assert relerr(op.matvec(v), H1 @ v) < 1e-12
    assert torch.equal(flat_params(model), w0)


def test_model_function_current_and_dtype():
    model = mlp("relu", seed=1)
    fn = ModelFunction(model, mse_loss)
    assert fn.dtype == DT and fn.num_params == sum(p.numel() for p in model.parameters())
    assert torch.equal(fn.current(), flat_params(model))
    model32 = mlp("relu", seed=1).float()
    fn32 = ModelFunction(model32, mse_loss)
    assert fn32.dtype == torch.float32
    op = HessianOperator(fn32, regression_data(N_SAMPLES))  # float64 data are cast to the model's dtype
    assert op.matvec(torch.ones(fn32.num_params)).dtype == torch.float32


def test_frozen_parameters_are_not_coordinates():
    model = mlp("tanh", seed=1)
    model[0].weight.requires_grad_(False)
    batch = regression_data(N_SAMPLES)
    fn = ModelFunction(model, mse_loss)
    assert fn.num_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    H = dense_hessian(model, mse_loss, batch)  # the reference also uses trainable parameters only
    assert H.shape[0] == fn.num_params
    v = torch.randn(fn.num_params, generator=gen(0), dtype=DT)
    assert relerr(HessianOperator(fn, batch).matvec(v), H @ v) < 1e-12


@pytest.mark.parametrize("name", ["mlp_bn_dropout_ce", "conv_mse", "attention_ce"])
def test_model_untouched(name):
    make_model, make_data, loss_fn = CASES[name]
    model = make_model()
    model.train()
    next(iter(model.children())).eval()  # mixed flags: each module's own flag must come back
    set_some_grads(model)
    assert any(p.grad is None for p in model.parameters()) and any(p.grad is not None for p in model.parameters())
    before = snapshot(model)
    op = HessianOperator(ModelFunction(model, loss_fn), make_data(N_SAMPLES))
    op.matvec(torch.randn(op.dim, 2, generator=gen(0), dtype=DT))
    _assert_untouched(model, before)


def test_nonfinite_and_nonscalar_losses():
    model = mlp("tanh")
    batch = regression_data(N_SAMPLES)
    fn_vec = ModelFunction(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(0))
    with pytest.raises(ValueError, match="scalar tensor"):
        HessianOperator(fn_vec, batch)
    fn_nan = ModelFunction(model, lambda m, b: mse_loss(m, b) * float("nan"))
    with pytest.raises(NonFiniteProbeError, match="non-finite loss"):
        HessianOperator(fn_nan, batch)
    fn_inf = ModelFunction(model, lambda m, b: mse_loss(m, b) + float("inf"))
    with pytest.raises(NonFiniteProbeError, match="non-finite"):
        HessianOperator(fn_inf, batch)
    assert issubclass(NonFiniteProbeError, FloatingPointError)


def test_no_trainable_parameters():
    model = mlp("tanh")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="at least one trainable parameter"):
        ModelFunction(model, mse_loss)


def test_linear_loss_has_zero_hessian():
    model = torch.nn.Linear(4, 1).double()
    fn = ModelFunction(model, lambda m, b: m(b).sum() / b.shape[0])
    op = HessianOperator(fn, torch.randn(5, 4, generator=gen(0), dtype=DT))
    v = torch.randn(fn.num_params, 2, generator=gen(1), dtype=DT)
    assert torch.equal(op.matvec(v), torch.zeros_like(v))
    assert op.num_hvps == 2


def test_probe_mode_nested_restores_flags_once_at_the_outer_exit():
    """Nested ``_probe_mode`` of one model: eval inside throughout, mixed flags back only when the outer one exits."""
    from lightning_curvprobe.functional.hvp import _PROBE_STATE, _probe_mode

    model = mlp_bn_dropout(seed=3)
    model.train()
    model[1].eval()  # mixed flags must come back exactly
    before = [m.training for m in model.modules()]
    batch = regression_data(N_SAMPLES, seed=4)
    op = HessianOperator(ModelFunction(model, mse_loss), batch)
    v = torch.randn(op.dim, generator=gen(1), dtype=DT)
    calls: list[bool] = []  # model.eval() calls model.train(False): count the walks over the modules

    def counting_train(mode: bool = True) -> torch.nn.Module:
        calls.append(mode)
        return torch.nn.Module.train(model, mode)

    model.train = counting_train  # type: ignore[method-assign]
    alone = op.matvec(v)
    assert calls == [False], "a product on its own sets eval mode itself"
    with _probe_mode(model):
        assert calls == [False, False]
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            with _probe_mode(model):  # the inner one re-enables grad mode
                assert torch.is_grad_enabled() and not any(m.training for m in model.modules())
            assert not torch.is_grad_enabled(), "the inner exit must restore the grad mode around it"
        assert not any(m.training for m in model.modules()), "the inner exit must not restore the flags"
        nested = op.matvec(v)  # its own _probe_mode is the nested one: no walk over the modules
        assert calls == [False, False], "a nested _probe_mode must leave the modules alone"
        assert not any(m.training for m in model.modules())
        with pytest.raises(KeyError), _probe_mode(model):
            raise KeyError("inside")
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    assert torch.equal(nested, alone)
    assert not getattr(_PROBE_STATE, "active", {}), "no model may stay registered after the outer exit"
    # an error in the outer one restores the flags as well
    with pytest.raises(KeyError), _probe_mode(model):
        raise KeyError("outer")
    assert [m.training for m in model.modules()] == before
    # another model inside is not nested: it gets its own flags handled
    other = mlp_bn_dropout(seed=5).train()
    with _probe_mode(model), _probe_mode(other):
        assert not any(m.training for m in other.modules())
    assert all(m.training for m in other.modules()) and [m.training for m in model.modules()] == before
