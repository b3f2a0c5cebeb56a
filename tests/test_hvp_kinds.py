"""Hessian-vector products on the models people train: finite differences, SDPA, compile, checkpointing, aliasing.

Every reference is a dense float64 Hessian of the same function (``torch.autograd.functional.hessian`` on a plain
model, under the SDPA math backend where attention is involved).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from conftest import DT, _init_, gen, mlp
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize

from lightning_curvprobe.functional import HessianOperator, ModelFunction, probe_stability
from lightning_curvprobe.functional.hvp import FD_STEP_SCALE, finite_difference_step
from lightning_curvprobe.functional.preflight import preflight

pytestmark = pytest.mark.filterwarnings("ignore:.*requires_grad.*", "ignore:.*use_reentrant.*")


def _data(n: int = 24, din: int = 5, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    return torch.randn(n, din, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def _ce(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def dense_hessian(model: nn.Module, loss_fn, batch) -> Tensor:
    """Dense Hessian of ``loss_fn`` in the trainable parameters, by torch.func on a flat vector (math SDPA)."""
    fn = ModelFunction(model, loss_fn, hvp="autograd")
    training = model.training
    model.eval()  # as the probe sees it (Dropout off)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            # reverse over reverse with grad mode on, so that no fused inference fast path is taken
            return torch.autograd.functional.hessian(lambda w: fn.loss(w, batch), fn.current(), vectorize=True)
    finally:
        model.train(training)


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _same_parameters(model: nn.Module, before: list[tuple[str, int, bool, type]]) -> bool:
    now = [(n, id(p), p.requires_grad, type(p)) for n, p in model.named_parameters(remove_duplicate=False)]
    return now == before


def _snapshot(model: nn.Module) -> list[tuple[str, int, bool, type]]:
    return [(n, id(p), p.requires_grad, type(p)) for n, p in model.named_parameters(remove_duplicate=False)]


# --------------------------------------------------------------------------------------------- finite differences


def test_finite_difference_products_match_autograd_in_float64():
    model = mlp("tanh", hidden=16, seed=1)
    batch = _data()
    H = dense_hessian(model, _ce, batch)
    V = torch.randn(H.shape[0], 6, generator=gen(2), dtype=DT)
    fd = HessianOperator(ModelFunction(model, _ce, hvp="finite_difference"), batch)
    ag = HessianOperator(ModelFunction(model, _ce, hvp="autograd"), batch)
    assert fd.kind == "finite_difference" and ag.kind == "autograd"
    assert _rel(ag.matvec(V), H @ V) < 1e-13
    # step balances truncation (eps^2) and rounding (u/eps): about u^(2/3) ~ 1e-11 relative in float64
    assert _rel(fd.matvec(V), H @ V) < 1e-8
    assert fd.num_hvps == 6
    # the loss and gradient agree exactly: both come from one first-order pass at w0
    assert torch.equal(fd.loss, ag.loss) and _rel(fd.gradient, ag.gradient) < 1e-14


def test_finite_difference_step_scales_with_weights_and_vector():
    u32 = torch.finfo(torch.float32).eps / 2
    c = FD_STEP_SCALE
    assert finite_difference_step(10.0, 1.0, torch.float32) == pytest.approx(c * u32 ** (1 / 3) * 10.0)
    assert finite_difference_step(0.1, 2.0, torch.float32) == pytest.approx(c * u32 ** (1 / 3) / 2.0)


def test_finite_difference_probe_matches_autograd_probe():
    model = mlp("tanh", hidden=12, seed=3)
    x, y = _data(36, seed=4)
    kw = dict(num_eigenvectors=3, sigma=0.05, tol=1e-9, generator=None)
    ref = probe_stability(model, _ce, (x[:32], y[:32]), (x[32:], y[32:]), hvp="autograd", **kw)
    fd = probe_stability(model, _ce, (x[:32], y[:32]), (x[32:], y[32:]), hvp="finite_difference", **kw)
    assert torch.allclose(fd.eigenvalues, ref.eigenvalues, rtol=1e-8, atol=0)
    assert float(fd.delta2) == pytest.approx(float(ref.delta2), rel=1e-8)
    assert torch.allclose(fd.B.abs(), ref.B.abs(), rtol=1e-6, atol=1e-9 * float(ref.B.abs().max()))


def test_bad_hvp_kind_is_refused():
    with pytest.raises(ValueError, match=r"`hvp` must be one of 'auto', 'autograd', 'finite_difference', got 'fd'"):
        ModelFunction(mlp(), _ce, hvp="fd")


# --------------------------------------------------------------------------------------------- aliasing and tying


class Aliased(nn.Module):
    """``self.backbone`` is ``self.net[:2]``: the same Linear reachable by two attribute paths (fine-tuning idiom)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.backbone = self.net[:2]

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.backbone(x))


class Tied(nn.Module):
    """An embedding and an output head sharing one Parameter, plus an orthogonal parametrization."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        parametrize.register_parametrization(self.mix, "weight", _Symmetric())
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


class _Symmetric(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).T


@pytest.mark.parametrize("make", [Aliased, Tied], ids=["aliased", "tied+parametrize"])
def test_shared_modules_keep_their_parameters_and_match_dense(make):
    torch.manual_seed(0)
    model = make().to(DT)
    _init_(model, seed=5)
    if isinstance(model, Tied):
        g = gen(6)
        tokens = torch.randint(0, 7, (20,), generator=g)
        batch = (tokens, torch.randint(0, 7, (20,), generator=g))
    else:
        batch = _data(20, seed=6)
    before = _snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fn = ModelFunction(model, _ce)
    assert fn.num_params == sum(p.numel() for p in model.parameters())  # a tied Parameter counts once
    H = dense_hessian(model, _ce, batch)
    V = torch.randn(fn.num_params, 4, generator=gen(7), dtype=DT)
    for kind in ("autograd", "finite_difference"):
        op = HessianOperator(ModelFunction(model, _ce, hvp=kind), batch)
        assert _rel(op.matvec(V), H @ V) < (1e-13 if kind == "autograd" else 1e-8)
    res = probe_stability(
        model, _ce, (batch[0][:16], batch[1][:16]), (batch[0][16:], batch[1][16:]), num_eigenvectors=2
    )
    assert math.isfinite(float(res.delta2))
    assert _same_parameters(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if isinstance(model, Aliased):
        assert model.backbone[0].weight is model.net[0].weight
    else:
        assert model.head.weight is model.emb.weight


# --------------------------------------------------------------------------------------------- attention (SDPA)


class Attention(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(3, 8)
        if kind == "mha":
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        else:
            self.att = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = self.att(h, h, h, need_weights=False)[0] if self.kind == "mha" else self.att(h)
        return self.out(h.mean(1))


@pytest.mark.parametrize("kind", ["mha", "encoder_layer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_through_sdpa_has_second_derivatives(kind, dtype):
    torch.manual_seed(0)
    model = Attention(kind).to(DT)
    _init_(model, seed=8)
    g = gen(9)
    batch = (torch.randn(12, 5, 3, generator=g, dtype=DT), torch.randint(0, 2, (12,), generator=g))
    H = dense_hessian(model, _ce, batch)
    model = model.to(dtype)
    op = HessianOperator(ModelFunction(model, _ce, hvp="autograd"), batch)
    V = torch.randn(H.shape[0], 3, generator=gen(10), dtype=DT)
    tol = 1e-12 if dtype == DT else 1e-4
    assert _rel(op.matvec(V.to(dtype)).double(), H @ V) < tol


# --------------------------------------------------------------------------------------------- compile, checkpoints


class Checkpointed(nn.Module):
    def __init__(self, mode: str | None) -> None:
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 8))
        self.out = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        if self.mode == "compiled":
            h = self.compiled(h)
        elif self.mode is None:
            h = self.block(h)
        else:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.out(h)


def _pair(mode: str) -> tuple[nn.Module, nn.Module]:
    plain = Checkpointed(None).to(DT)
    _init_(plain, seed=11)
    other = Checkpointed(mode).to(DT)
    other.load_state_dict(plain.state_dict())
    return plain, other


@pytest.mark.parametrize("mode, kind", [("reentrant", "finite_difference"), ("non_reentrant", "autograd")])
def test_activation_checkpointing(mode, kind):
    plain, model = _pair(mode)
    x, y = _data(36, seed=12)
    kw = dict(num_eigenvectors=3, sigma=0.05, tol=1e-9)
    ref = probe_stability(plain, _ce, (x[:32], y[:32]), (x[32:], y[32:]), hvp="autograd", **kw)
    res = probe_stability(model, _ce, (x[:32], y[:32]), (x[32:], y[32:]), hvp="auto", **kw)
    fn = ModelFunction(model, _ce)
    assert fn.hvp_kind == kind
    rtol = 1e-8 if kind == "finite_difference" else 1e-12
    assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=rtol, atol=0)
    assert float(res.delta2) == pytest.approx(float(ref.delta2), rel=rtol)
    if kind == "finite_difference":
        assert "use_reentrant" in (fn.fallback_reason or "")
        with pytest.raises(RuntimeError, match=r"hvp='autograd'.*use hvp='finite_difference'"):
            HessianOperator(ModelFunction(model, _ce, hvp="autograd"), (x, y)).matvec(
                torch.ones(fn.num_params, dtype=DT)
            )
    assert all(p.grad is None for p in model.parameters())


def test_compiled_submodule_runs_eagerly_in_the_probe_and_keeps_its_compiled_code():
    plain, model = _pair("compiled")
    calls = {"n": 0}

    def counting_backend(gm, example_inputs):
        def run(*args):
            calls["n"] += 1
            return gm.forward(*args)

        return run

    model.compiled = torch.compile(model.block, backend=counting_backend)
    x, y = _data(36, seed=13)
    _ce(model, (x[:8], y[:8])).backward()
    assert calls["n"] == 1
    for p in model.parameters():
        p.grad = None
    ref = probe_stability(plain, _ce, (x[:32], y[:32]), (x[32:], y[32:]), num_eigenvectors=3, tol=1e-9)
    res = probe_stability(model, _ce, (x[:32], y[:32]), (x[32:], y[32:]), num_eigenvectors=3, tol=1e-9)
    assert ModelFunction(model, _ce).hvp_kind == "autograd"
    assert torch.allclose(res.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    assert calls["n"] == 1  # the probe never ran the compiled graph...
    _ce(model, (x[:8], y[:8])).backward()
    assert calls["n"] == 2  # ...and training still does (dynamo did not give up on the frame)


class _OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward is not differentiable: a double backward silently drops its second derivative."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return (1 - y * y) * grad


class _Custom(nn.Module):
    def __init__(self, once: bool) -> None:
        super().__init__()
        self.once = once
        self.l1, self.l2 = nn.Linear(5, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(x)
        return self.l2(_OnceDifferentiableTanh.apply(h) if self.once else torch.tanh(h))


def test_silently_incomplete_double_backward_falls_back_under_auto():
    smooth = _init_(_Custom(once=False), seed=14)
    model = _Custom(once=True).to(DT)
    model.load_state_dict(smooth.state_dict())
    x, y = _data(20, seed=15)
    H = dense_hessian(smooth, _ce, (x, y))
    V = torch.randn(H.shape[0], 2, generator=gen(16), dtype=DT)
    # autograd's product misses the activation's second derivative, without an error
    wrong = HessianOperator(ModelFunction(model, _ce, hvp="autograd"), (x, y)).matvec(V)
    assert _rel(wrong, H @ V) > 0.05
    report = preflight(ModelFunction(model, _ce), (x, y), (x[:1], y[:1]))
    assert report.hvp_kind == "finite_difference" and "once_differentiable" in report.fallback_reason
    assert _rel(HessianOperator(ModelFunction(model, _ce), (x, y)).matvec(V), H @ V) < 1e-8
    # a model whose double backward is right keeps autograd
    assert preflight(ModelFunction(smooth, _ce), (x, y), (x[:1], y[:1])).hvp_kind == "autograd"


# --------------------------------------------------------------------------------------------- pre-flight


def test_detached_loss_is_a_configuration_error():
    model = mlp()
    with pytest.raises(ValueError, match=r"depends on the trainable parameters.*detached"):
        preflight(ModelFunction(model, lambda m, b: _ce(m, b).detach()), _data(), _data(1))


def test_preflight_measures_a_token_weighted_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6)).to(DT)
    g = gen(17)
    tokens = torch.randint(0, 6, (8, 5), generator=g)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[:4, 2:] = False  # the first half is padded: a mean over tokens weighs the second half more

    def token_mean(m, b):
        logits = m(b[0])
        per_token = F.cross_entropy(logits.reshape(-1, 6), b[0].reshape(-1), reduction="none").reshape(b[0].shape)
        return (per_token * b[1]).sum() / b[1].sum()

    report = preflight(ModelFunction(model, token_mean), (tokens, mask), (tokens[:1], mask[:1]))
    assert not report.is_mean and abs(report.mean_ratio - 1) > 1e-2
    assert all(p.grad is None for p in model.parameters())


def test_benchmark_script_quick_runs():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, OMP_WAIT_POLICY="PASSIVE")
    script = os.path.join(root, "tests", "benchmarks", "hvp_kinds.py")
    out = subprocess.run(
        [sys.executable, script, "--quick"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for expected in ("finite differences float64", "max rel. eigenvalue diff", "delta2 rel. diff", "ms per product"):
        assert expected in out.stdout
