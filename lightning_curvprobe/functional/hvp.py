r"""Hessian-vector products of a model's loss on flat parameter vectors.

For the loss :math:`L(w) = \mathrm{loss\_fn}(\mathrm{model}, \mathrm{batch})` at parameters :math:`w \in \mathbb{R}^N`
(all parameters with ``requires_grad=True``, flattened in ``named_parameters()`` order), the operator applies
:math:`H = \nabla^2 L(w_0)` to vectors by double-backward autograd. The gradient graph is built once and reused for
every product, so a block of vectors costs one forward and backward pass plus one extra backward pass per vector.

The model itself is never modified: the loss is evaluated with :func:`torch.func.functional_call` on views of a flat
parameter vector, in eval mode (restored afterwards), with autocast disabled, in float32 or float64.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvprobe.functional._batch import _batch_size, _cast_batch

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Any]


class NonFiniteProbeError(FloatingPointError):
    """A loss, gradient or Hessian-vector product evaluated by the probe is not finite."""


@contextlib.contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on, inference mode and autocast off; every module's ``training`` flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    device_types = {p.device.type for p in model.parameters()} | {"cpu"}
    try:
        model.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for device_type in sorted(device_types):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _default_dtype(params: list[Tensor]) -> torch.dtype:
    """float64 when every trainable parameter is float64, float32 otherwise (bf16/fp16 models are probed in fp32)."""
    return torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so that :func:`torch.func.functional_call` can reparametrise it."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class ModelFunction:
    r"""The loss of a model as a function of a flat parameter vector, evaluated without touching the model.

    Args:
        model: the network; its trainable parameters (``requires_grad=True``) are the coordinates.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch's samples (a scalar).
        dtype: the dtype of the computation; default float64 for a float64 model, float32 otherwise. Parameters,
            floating buffers and floating batch tensors are cast to it on the fly (the model keeps its own).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> fn = ModelFunction(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> fn.num_params, fn.dtype
        (4, torch.float64)
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, *, dtype: torch.dtype | None = None) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"`model` must have at least one trainable parameter (requires_grad=True), got {type(model).__name__} "
                "with none."
            )
        bad = [n for n, p in named if not p.is_floating_point()]
        if bad:
            raise ValueError(f"`model` trainable parameters must be floating point, got non-floating {bad}.")
        self.model = model
        self.loss_fn = loss_fn
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.shapes = [p.shape for p in self._params]
        self.numels = [p.numel() for p in self._params]
        self.num_params = sum(self.numels)
        self.dtype = dtype if dtype is not None else _default_dtype(self._params)
        self.device = self._params[0].device
        self._module = _LossModule(model, loss_fn)
        self._buffers: dict[str, Tensor] = {}
        if any(p.dtype != self.dtype for p in self._params):
            self._buffers = {
                "model." + n: b.to(self.dtype)
                for n, b in model.named_buffers()
                if b is not None and b.is_floating_point()
            }

    def current(self) -> Tensor:
        """The model's current trainable parameters as one flat vector (a copy, in the compute dtype)."""
        with torch.inference_mode(False), torch.no_grad():
            return torch.cat([p.detach().reshape(-1).to(self.dtype) for p in self._params])

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """Views of ``w`` shaped like the parameters, keyed for the wrapped module."""
        views = torch.split(w, self.numels)
        return {"model." + n: v.view(s) for n, v, s in zip(self.names, views, self.shapes, strict=True)}

    def prepare(self, batch: Any) -> Any:
        """The batch on the model's device, floating tensors in the compute dtype, outside inference mode."""
        with torch.inference_mode(False):
            batch = _cast_batch(batch, self.dtype, self.device)
            return _clone_inference_tensors(batch)

    def loss(self, w: Tensor, batch: Any) -> Tensor:
        """``loss_fn(model, batch)`` at parameters ``w`` (differentiable in ``w``); call inside :func:`_probe_mode`."""
        params = self.unflatten(w)
        params.update(self._buffers)
        return torch.func.functional_call(self._module, params, (batch,), strict=False, tie_weights=True)


def _clone_inference_tensors(batch: Any) -> Any:
    from lightning_curvprobe.functional._batch import _map_tensors

    return _map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)


def _check_loss(loss: Any, where: str) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn` must return a scalar tensor (the mean loss of the batch), got {shape} on {where}.")
    if not torch.isfinite(loss).all():
        raise NonFiniteProbeError(f"`loss_fn` returned a non-finite loss ({loss.item()}) on {where}.")
    return loss.reshape(())


def _reduce(tensor: Tensor, reduce_fn: ReduceFn | None) -> Tensor:
    if reduce_fn is None:
        return tensor
    out = reduce_fn(tensor)
    return out if isinstance(out, Tensor) else tensor


class HessianOperator:
    r"""Hessian of the loss on one batch at fixed parameters, applied to flat vectors.

    The gradient graph at :math:`w_0` is built once; :meth:`matvec` applies :math:`H = \nabla^2 L(w_0)` to a vector
    (shape ``(N,)``) or a block (shape ``(N, b)``) by one extra backward pass per vector.

    Sharded data: with ``scale = n_local / n_global`` and ``reduce_fn`` summing across processes (for example
    ``torch.distributed.all_reduce``), every process feeds its own shard and all obtain the loss, gradient and HVPs of
    the global mean loss.

    Args:
        fn: the model as a function of its flat parameters.
        batch: the samples; ``loss_fn`` returns their mean loss.
        scale: factor applied to the batch's mean loss before differentiating.
        reduce_fn: applied to every partial result (loss, gradient, HVP block); returns the reduced tensor or reduces
            in place and returns ``None``.
        point: the parameters to linearise at (default: the model's current ones).

    Attributes:
        loss: the (reduced, scaled) loss at ``point``.
        gradient: its gradient, shape ``(N,)``.
        local_loss: this process's scaled loss before the reduction.
        local_gradient: its gradient before the reduction.
        num_hvps: Hessian-vector products applied so far (a block of ``b`` vectors counts ``b``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False).double()
        >>> x, y = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
        >>> op = HessianOperator(ModelFunction(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()), (x, y))
        >>> op.matvec(torch.tensor([1.0, 0.0], dtype=torch.float64))  # H = 2 x^T x
        tensor([2., 4.], dtype=torch.float64)
    """

    def __init__(
        self,
        fn: ModelFunction,
        batch: Any,
        *,
        scale: float = 1.0,
        reduce_fn: ReduceFn | None = None,
        point: Tensor | None = None,
        where: str = "the probe batch",
    ) -> None:
        _batch_size(batch)
        self.fn = fn
        self.reduce_fn = reduce_fn
        self.num_hvps = 0
        self.where = where
        batch = fn.prepare(batch)
        with _probe_mode(fn.model):
            w = (fn.current() if point is None else point.detach().to(fn.dtype)).requires_grad_(True)
            loss = _check_loss(fn.loss(w, batch), where) * scale
            (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        self._w = w
        self._grad = grad
        self.local_loss = loss.detach()
        self.local_gradient = grad.detach()
        self.loss = _reduce(loss.detach().clone(), reduce_fn)
        self.gradient = _reduce(grad.detach().clone(), reduce_fn)
        if not (torch.isfinite(self.loss).all() and torch.isfinite(self.gradient).all()):
            raise NonFiniteProbeError(f"the loss or its gradient is not finite on {where}.")

    @property
    def dim(self) -> int:
        """N, the number of trainable parameters."""
        return self.fn.num_params

    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for ``v`` of shape ``(N,)`` or ``(N, b)``; counts one HVP per column."""
        with _probe_mode(self.fn.model):
            block = v.reshape(self.dim, -1).to(self.fn.dtype)
            out = torch.empty(block.shape, dtype=block.dtype, device=block.device)
            for i in range(block.shape[1]):
                if self._grad.requires_grad:
                    (hv,) = torch.autograd.grad(
                        self._grad, self._w, block[:, i], retain_graph=True, allow_unused=True, materialize_grads=True
                    )
                    out[:, i] = hv
                else:  # the loss is (at most) linear in the parameters
                    out[:, i] = 0
            self.num_hvps += block.shape[1]
            out = _reduce(out, self.reduce_fn)
        if not torch.isfinite(out).all():
            raise NonFiniteProbeError(f"a Hessian-vector product is not finite on {self.where}.")
        return out.reshape(v.shape)

    __call__ = matvec
