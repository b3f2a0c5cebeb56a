"""Small float64 models, data and dense references shared by the functional-core tests.

Everything here is deliberately tiny (a few hundred to a couple of thousand parameters) so that dense Hessians
(``torch.autograd.functional.hessian``) and ``torch.linalg.eigh`` are cheap references.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator (tests never touch the global RNG)."""
    return torch.Generator().manual_seed(seed)


def _init_(model: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    """Re-initialise every parameter from a seeded generator (uniform, fan-in scaled), in float64."""
    g = gen(seed)
    model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p.shape[1:].numel() if p.dim() > 1 else p.numel()
            bound = scale / math.sqrt(max(fan_in, 1))
            p.copy_((torch.rand(p.shape, generator=g, dtype=DT) * 2 - 1) * bound)
    return model


# ----------------------------------------------------------------------------------------------- models


def mlp(act: str = "tanh", din: int = 5, hidden: int = 16, dout: int = 3, depth: int = 2, seed: int = 0) -> nn.Module:
    """MLP with ``depth`` hidden layers; ``act`` in {"tanh", "relu"}."""
    layers: list[nn.Module] = []
    width = din
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh() if act == "tanh" else nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, dout))
    return _init_(nn.Sequential(*layers), seed)


def mlp_bn_dropout(din: int = 5, hidden: int = 12, dout: int = 3, seed: int = 0) -> nn.Module:
    """MLP with BatchNorm1d and Dropout (their train-mode behaviour must not leak into the probe)."""
    model = nn.Sequential(
        nn.Linear(din, hidden), nn.BatchNorm1d(hidden), nn.Tanh(), nn.Dropout(0.5), nn.Linear(hidden, dout)
    )
    _init_(model, seed)
    bn = model[1]
    g = gen(seed + 1000)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.copy_(0.3 * torch.randn(hidden, generator=g, dtype=DT))
        bn.running_var.copy_(0.5 + torch.rand(hidden, generator=g, dtype=DT))
        bn.weight.add_(1.0)
        bn.num_batches_tracked.fill_(7)
    return model


class ConvNet(nn.Module):
    """Conv2d(1→4, 3×3) → tanh → Conv2d(4→4, 3×3) → ReLU → flatten → Linear; input (B, 1, 7, 7)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.c1(x))
        x = F.softplus(self.c2(x))
        return self.fc(x.flatten(1))


def convnet(seed: int = 0) -> nn.Module:
    return _init_(ConvNet(), seed)


class TinyAttention(nn.Module):
    """One single-head self-attention block with a residual, mean pooling and a linear head; input (B, T, d)."""

    def __init__(self, d: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        att = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(self.d), dim=-1)
        h = self.ln(x + att @ self.v(x))
        return self.head(h.mean(1))


def attention(seed: int = 0) -> nn.Module:
    model = _init_(TinyAttention(), seed)
    with torch.no_grad():
        model.ln.weight.add_(1.0)
    return model


def linear(din: int = 6, dout: int = 1, seed: int = 0) -> nn.Module:
    return _init_(nn.Linear(din, dout), seed)


# ----------------------------------------------------------------------------------------------- data and losses


def regression_data(n: int, din: int = 5, dout: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    return torch.randn(n, din, generator=g, dtype=DT), torch.randn(n, dout, generator=g, dtype=DT)


def regression_data_shaped(n: int, shape: tuple[int, ...], dout: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randn(n, dout, generator=g, dtype=DT)


def class_data(n: int, shape: tuple[int, ...] = (5,), classes: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = gen(seed)
    return torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


# (name, model factory, data factory, loss): the HVP zoo
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Any], Callable[..., Tensor]]] = {
    "mlp_tanh_ce": (lambda: mlp("tanh"), lambda n: class_data(n), ce_loss),
    "mlp_tanh_mse": (lambda: mlp("tanh"), lambda n: regression_data(n), mse_loss),
    "mlp_relu_ce": (lambda: mlp("relu"), lambda n: class_data(n), ce_loss),
    "mlp_relu_mse": (lambda: mlp("relu"), lambda n: regression_data(n), mse_loss),
    "mlp_bn_dropout_ce": (mlp_bn_dropout, lambda n: class_data(n), ce_loss),
    "mlp_bn_dropout_mse": (mlp_bn_dropout, lambda n: regression_data(n), mse_loss),
    "conv_ce": (convnet, lambda n: class_data(n, (1, 7, 7)), ce_loss),
    "conv_mse": (convnet, lambda n: regression_data_shaped(n, (1, 7, 7)), mse_loss),
    "attention_ce": (attention, lambda n: class_data(n, (3, 4)), ce_loss),
    "attention_mse": (attention, lambda n: regression_data_shaped(n, (3, 4)), mse_loss),
}


# ----------------------------------------------------------------------------------------------- dense references


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)]).clone()


class _LossOf(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def flat_loss_fn(model: nn.Module, loss_fn: Callable[..., Tensor], batch: Any) -> Callable[[Tensor], Tensor]:
    """``w ↦ loss_fn(model at w, batch)`` via ``torch.func.functional_call`` (call inside :class:`eval_mode`)."""
    named = trainable(model)
    names = ["model." + n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    wrapper = _LossOf(model, loss_fn)

    def f(w: Tensor) -> Tensor:
        params = {n: v.view(s) for n, v, s in zip(names, torch.split(w, numels), shapes, strict=True)}
        return torch.func.functional_call(wrapper, params, (batch,), strict=False)

    return f


class eval_mode:  # noqa: N801
    """Put every module in eval mode, restoring each module's own flag afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, f in self.flags:
            m.training = f


def dense_hessian(model: nn.Module, loss_fn: Callable[..., Tensor], batch: Any) -> Tensor:
    """Dense Hessian of the loss in the flat trainable parameters, in eval mode (reference, float64)."""
    f = flat_loss_fn(model, loss_fn, batch)
    w = flat_params(model)
    with eval_mode(model):
        H = torch.autograd.functional.hessian(f, w, vectorize=True)
    return 0.5 * (H + H.T)


def dense_grad_loss(model: nn.Module, loss_fn: Callable[..., Tensor], batch: Any) -> tuple[Tensor, Tensor]:
    """Loss and its gradient in the flat trainable parameters, in eval mode."""
    f = flat_loss_fn(model, loss_fn, batch)
    w = flat_params(model).requires_grad_(True)
    with eval_mode(model):
        loss = f(w)
        (g,) = torch.autograd.grad(loss, w)
    return loss.detach(), g


def dense_coefficients(
    model: nn.Module, loss_fn: Callable[..., Tensor], base: Any, added: Any, U: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``UᵀH_kU`` and the added samples' ``a, c, B`` (SPEC §1) for any orthonormal ``U``, from explicit Hessians."""
    k = base[0].shape[0]
    Lk, gk = dense_grad_loss(model, loss_fn, base)
    P = U.T @ dense_hessian(model, loss_fn, base) @ U
    a, c, B = [], [], []
    for j in range(added[0].shape[0]):
        one = tuple(t[j : j + 1] for t in added)
        lj, gj = dense_grad_loss(model, loss_fn, one)
        a.append((lj - Lk) / (k + 1))
        c.append(U.T @ (gj - gk) / (k + 1))
        Bj = (U.T @ dense_hessian(model, loss_fn, one) @ U - P) / (k + 1)
        B.append(0.5 * (Bj + Bj.T))
    return P, torch.stack(a), torch.stack(c), torch.stack(B)


def relerr(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------- "untouched" checks


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a probe must leave alone: parameters, buffers, .grad, training flags and the global RNG."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_ids": {n: None if p.grad is None else id(p.grad) for n, p in model.named_parameters()},
        "training": [(n, m.training) for n, m in model.named_modules()],
        "rng": torch.get_rng_state().clone(),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), f"parameter {n} changed"
    assert before["buffers"].keys() == after["buffers"].keys()
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), f"buffer {n} changed"
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, f".grad of {n} appeared"
        else:
            assert after["grads"][n] is not None and torch.equal(after["grads"][n], g), f".grad of {n} changed"
    assert after["grad_ids"] == before["grad_ids"], ".grad tensors were replaced"
    assert after["training"] == before["training"], "training flags changed"
    assert torch.equal(after["rng"], before["rng"]), "global RNG state changed"
    assert after["requires_grad"] == before["requires_grad"]


def set_some_grads(model: nn.Module, seed: int = 5) -> None:
    """Give every other parameter a random ``.grad`` (the rest keep ``None``)."""
    g = gen(seed)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) if i % 2 == 0 else None
