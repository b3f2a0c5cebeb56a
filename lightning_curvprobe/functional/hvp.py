r"""Hessian-vector products of a model's loss on flat parameter vectors.

For the loss :math:`L(w) = \mathrm{loss\_fn}(\mathrm{model}, \mathrm{batch})` at parameters :math:`w \in \mathbb{R}^N`
(all parameters with ``requires_grad=True``, flattened in ``named_parameters()`` order), the operator applies
:math:`H = \nabla^2 L(w_0)` to vectors by double-backward autograd. The gradient graph is built once and reused for
every product, so a block of vectors costs one forward and backward pass plus one extra backward pass per vector.

The model itself is never modified: the loss is evaluated with the model's own modules, whose trainable
``nn.Parameter`` entries are swapped for views of a flat parameter vector for the duration of a call (every module
that holds a Parameter, so aliased, tied and ``parametrize``-d modules see the same view) and put back as the very same
objects afterwards; in eval mode (restored afterwards), with autocast disabled, in float32 or float64, and with
:func:`torch.nn.functional.scaled_dot_product_attention` on its math backend (the fused CPU and CUDA kernels have no
double backward).

Two kinds of product (``hvp=``): ``"autograd"`` (double backward, exact to rounding) and ``"finite_difference"``
(central differences of first-order gradients, for models without second derivatives: reentrant activation
checkpointing, ``once_differentiable`` autograd Functions, fused kernels without a double backward, sharded
parameters):

.. math:: H v \approx \frac{\nabla L(w_0 + \varepsilon v) - \nabla L(w_0 - \varepsilon v)}{2 \varepsilon},
    \qquad \varepsilon = c\, u^{1/3} \max(\lVert w_0 \rVert, 1) / \lVert v \rVert,\quad c = 0.02,

with ``u`` the unit roundoff of the compute dtype: the perturbation is a fraction :math:`c\,u^{1/3}` of the weights'
own norm (8e-5 in float32). The truncation error is :math:`\varepsilon^2/6 \cdot \nabla^3 L[v, v, \cdot]` and the
rounding error about :math:`u \lVert \nabla L\rVert / \varepsilon`. The textbook balance of the two for a random
direction (:math:`c \approx 0.5`) is too coarse along the top eigenvectors, where the third derivative is largest:
measured with ``tests/benchmarks/hvp_kinds.py`` in float32 on a 110k-parameter transformer, the top-10 eigenvalues
were 3.7e-2·λ₁ off at :math:`c = 0.5`, 4.6e-4 at 0.05 and 4e-5 at 0.015 (quickstart MLP: 1.1e-3, 1.3e-5, 1.4e-5),
with ``delta2`` within 3e-7 relative at the small steps. In float64 the products agree with autograd to about
2e-9. On piecewise-linear activations (ReLU) a finite difference also sees the kinks that autograd's Hessian ignores (a
small step crosses fewer of them).

``"auto"`` uses autograd and falls back to finite differences once, for the rest of the model's life, when building
or applying the double-backward graph fails.

Compiled modules (``torch.compile``) run eagerly inside the probe, so autograd products work there and the user's
compiled code and its caches are left untouched.

Batching: a block of ``b`` vectors is applied by one batched backward pass (``torch.autograd.grad(...,
is_grads_batched=True)``, i.e. ``vmap`` over the vectors) in chunks of at most ``max(1, BATCH_ELEMENTS // N)``
vectors, so the extra memory of a chunk stays near ``BATCH_ELEMENTS`` numbers: small models (where a product's cost is
per-call overhead) get the whole block in one pass, large ones (``N > BATCH_ELEMENTS``) fall back to one backward per
vector. :func:`per_sample_statistics` and :func:`perturbed_losses` batch the added samples' projected Hessians and the
Monte Carlo forward passes with :mod:`torch.func` in the same way. Whenever ``vmap`` cannot trace a model (an
operation without a batching rule, data-dependent control flow, ``.item()``, ...), the per-vector / per-sample loops
are used instead; results agree to rounding.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_curvprobe.functional._batch import _batch_size, _cast_batch, _map_tensors

LossFn = Callable[[nn.Module, Any], Tensor]
ReduceFn = Callable[[Tensor], Any]

#: Most numbers (``vectors x N``) that one batched pass may hold in flight: blocks of Hessian-vector products, the
#: added samples' products and the Monte Carlo perturbations are chunked to stay within it (64 MiB in float32).
BATCH_ELEMENTS = 1 << 24
#: Set to False to use the per-vector and per-sample loops everywhere (the benchmarks compare both).
USE_BATCHED = True
# models for which vmap failed once (their next probes go straight to the loops)
_VMAP_FAILED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_VMAP_WARNING = r".*(performance drop|batching rule|fallback).*"


class NonFiniteProbeError(FloatingPointError):
    """A loss, gradient or Hessian-vector product evaluated by the probe is not finite."""


# per thread: id(model) -> device types, for the models inside an (outer) _probe_mode
_PROBE_STATE = threading.local()


@contextlib.contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on, inference mode and autocast off, SDPA on its math backend; ``training`` flags restored.

    Re-entrant: nested inside another ``_probe_mode`` of the same model (one around a whole eigensolve, and one per
    Hessian-vector product), the inner one only re-enters the grad and autocast modes and leaves the flags to the
    outer one. That saves walking every module twice per product: 0.1–0.3 ms of a 0.7–3 ms product on the
    quickstart's MLP (1 and 2 threads).
    """
    active: dict[int, list[str]] = _PROBE_STATE.__dict__.setdefault("active", {})
    key = id(model)
    nested = key in active
    if nested:
        flags, device_types = [], active[key]
    else:
        flags = [(m, m.training) for m in model.modules()]
        device_types = active[key] = sorted({p.device.type for p in model.parameters()} | {"cpu"})
    try:
        if not nested:
            model.eval()
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for device_type in device_types:
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))  # the fused kernels have no double backward
            stack.enter_context(_eager())
            yield
    finally:
        if not nested:
            del active[key]
        for module, flag in flags:
            module.training = flag


def _eager() -> contextlib.AbstractContextManager[Any]:
    """Compiled modules and functions run eagerly (``torch.compiler.set_stance("force_eager")``, torch >= 2.6).

    Eager code has double backward and ``vmap`` where aot_autograd has neither; tracing a compiled frame under
    ``vmap`` would also make dynamo skip that frame for the rest of the run, and new batch shapes and grad modes would
    add recompilations to the user's cache. Eagerly, the user's compiled code and its cache are left as they were.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _default_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float64 when every trainable parameter is float64, float32 otherwise (bf16/fp16 models are probed in fp32)."""
    return torch.float64 if all(p.dtype == torch.float64 for p in params) else torch.float32


HvpKind = str  # "auto" | "autograd" | "finite_difference"
HVP_KINDS = ("auto", "autograd", "finite_difference")
# models whose double backward failed once under hvp="auto" -> the reason (their next probes use finite differences)
_NO_DOUBLE_BACKWARD: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class ModelFunction:
    r"""The loss of a model as a function of a flat parameter vector, evaluated without touching the model.

    Inside :meth:`bind` every module's ``_parameters`` entry that holds a trainable Parameter refers to a view of the
    flat vector instead; on exit the very same Parameter objects are put back (aliased submodules, tied weights and
    ``torch.nn.utils.parametrize`` originals included, which :func:`torch.func.functional_call` with
    ``tie_weights=True`` does not guarantee for a submodule reachable by two paths).

    Args:
        model: the network; its trainable parameters (``requires_grad=True``) are the coordinates.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch's samples (a scalar).
        dtype: the dtype of the computation; default float64 for a float64 model, float32 otherwise. Parameters,
            floating buffers and floating batch tensors are cast to it on the fly (the model keeps its own).
        hvp: ``"autograd"``, ``"finite_difference"`` or ``"auto"`` (autograd, falling back to finite differences
            once when the model has no double backward; see the module docstring).

    Attributes:
        hvp_kind: the kind of product in use, ``"autograd"`` or ``"finite_difference"``.
        fallback_reason: why ``"auto"`` fell back to finite differences (None otherwise).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> fn = ModelFunction(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> fn.num_params, fn.dtype, fn.hvp_kind
        (4, torch.float64, 'autograd')
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, *, dtype: torch.dtype | None = None, hvp: HvpKind = "auto"
    ) -> None:
        if hvp not in HVP_KINDS:
            allowed = ", ".join(repr(k) for k in HVP_KINDS)
            raise ValueError(f"`hvp` must be one of {allowed}, got {hvp!r}.")
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
        self.hvp = hvp
        self.fallback_reason: str | None = _NO_DOUBLE_BACKWARD.get(model) if hvp == "auto" else None
        index = {id(p): i for i, p in enumerate(self._params)}
        cast = any(p.dtype != self.dtype for p in self._params)
        # (owner dict, key, index of the flat view or -1, original): every slot that holds a trainable Parameter, and
        # the floating buffers when the compute dtype differs from the model's
        self._slots: list[tuple[dict[str, Any], str, int, Tensor]] = []
        self._buffers: list[Tensor] = []
        for module in model.modules():
            for key, param in module._parameters.items():
                if param is not None and id(param) in index:
                    self._slots.append((module._parameters, key, index[id(param)], param))
            if cast:
                for key, buf in module._buffers.items():
                    if buf is not None and buf.is_floating_point():
                        self._slots.append((module._buffers, key, -1 - len(self._buffers), buf))
                        self._buffers.append(buf.to(self.dtype))

    @property
    def hvp_kind(self) -> str:
        """``"finite_difference"`` when chosen or fallen back to, else ``"autograd"``."""
        if self.hvp == "finite_difference" or self.fallback_reason is not None:
            return "finite_difference"
        return "autograd"

    def fall_back(self, err: BaseException) -> None:
        """Under ``hvp="auto"``: use finite differences from now on (for this model), remembering why."""
        if self.hvp != "auto":
            raise RuntimeError(
                "hvp='autograd': second derivatives of the loss are not available for this model "
                f"({type(err).__name__}: {err}); use hvp='finite_difference' (or 'auto') for first-order "
                "finite-difference products."
            ) from err
        self.fallback_reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        _NO_DOUBLE_BACKWARD[self.model] = self.fallback_reason

    def current(self) -> Tensor:
        """The model's current trainable parameters as one flat vector (a copy, in the compute dtype)."""
        with torch.inference_mode(False), torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self._params]).to(self.dtype)

    def unflatten(self, w: Tensor) -> list[Tensor]:
        """Views of ``w`` shaped like the trainable parameters, in ``named_parameters()`` order."""
        views = torch.split(w, self.numels)
        return [v.view(s) for v, s in zip(views, self.shapes, strict=True)]

    @contextlib.contextmanager
    def bind(self, w: Tensor) -> Iterator[None]:
        """Within the block the model computes with parameters ``w`` (differentiable in ``w``); restored on exit.

        Backward passes that recompute the forward (activation checkpointing) must run inside the block too.
        """
        views = self.unflatten(w)
        done = []
        try:
            for owner, key, i, original in self._slots:
                owner[key] = views[i] if i >= 0 else self._buffers[-1 - i]
                done.append((owner, key, original))
            yield
        finally:
            for owner, key, original in done:
                owner[key] = original

    def prepare(self, batch: Any) -> Any:
        """The batch on the model's device, floating tensors in the compute dtype, outside inference mode."""
        with torch.inference_mode(False):
            batch = _cast_batch(batch, self.dtype, self.device)
            return _clone_inference_tensors(batch)

    def loss(self, w: Tensor, batch: Any) -> Tensor:
        """``loss_fn(model, batch)`` at parameters ``w`` (differentiable in ``w``); call inside :func:`_probe_mode`."""
        with self.bind(w):
            return self.loss_fn(self.model, batch)

    def gradient(
        self, w: Tensor, batch: Any, *, scale: float = 1.0, where: str = "the probe batch"
    ) -> tuple[Tensor, Tensor]:
        """The (scaled) loss and its gradient at ``w`` by one first-order backward pass; call inside ``_probe_mode``.

        ``backward()`` into a leaf of the probe's own (never ``autograd.grad``), so that reentrant activation
        checkpointing works too; the model's Parameters and their ``.grad`` are not part of the graph.
        """
        leaf = w.detach().requires_grad_(True)
        with self.bind(leaf):
            loss = _check_loss(self.loss_fn(self.model, batch), where) * scale
            _check_depends(loss, where)
            loss.backward()
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        return loss.detach(), grad


def _check_depends(loss: Tensor, where: str) -> None:
    if not loss.requires_grad:
        raise ValueError(
            f"`loss_fn` must return a loss that depends on the trainable parameters, got a tensor without a graph on "
            f"{where} (detached, computed under torch.no_grad(), or rebuilt from .item()); return the loss tensor "
            "itself."
        )


#: The constant ``c`` of the finite-difference step ``ε = c u^{1/3} max(‖w0‖, 1) / ‖v‖`` (see the module docstring).
FD_STEP_SCALE = 0.02


def finite_difference_step(w0_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    r"""The central-difference step :math:`\varepsilon = c\,u^{1/3} \max(\lVert w_0\rVert, 1) / \lVert v\rVert`.

    ``c`` is :data:`FD_STEP_SCALE`, ``u`` the unit roundoff of ``dtype``.

    Example:
        >>> f"{finite_difference_step(1.0, 1.0, torch.float64):.3g}"
        '9.61e-08'
        >>> f"{finite_difference_step(50.0, 1.0, torch.float32):.3g}"  # 8e-5 of a norm-50 weight vector
        '0.00391'
    """
    u = torch.finfo(dtype).eps / 2
    return FD_STEP_SCALE * u ** (1.0 / 3.0) * max(w0_norm, 1.0) / max(v_norm, torch.finfo(dtype).tiny)


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

    With autograd products (``fn.hvp_kind == "autograd"``) the gradient graph at :math:`w_0` is built once;
    :meth:`matvec` applies :math:`H = \nabla^2 L(w_0)` to a vector (shape ``(N,)``) or a block (shape ``(N, b)``) by one
    extra backward pass per vector, batched over the block's vectors (``max_batch`` at a time). With finite differences
    each vector costs two first-order forward and backward passes (see the module docstring for the step). Under
    ``hvp="auto"`` a failure to build or apply the double-backward graph switches ``fn`` to finite differences.

    Sharded data: with ``scale = n_local / n_global`` and ``reduce_fn`` summing across processes (for example
    ``torch.distributed.all_reduce``), every process feeds its own shard and all obtain the loss, gradient and HVPs of
    the global mean loss.

    Args:
        fn: the model as a function of its flat parameters (it also says which kind of product to use).
        batch: the samples; ``loss_fn`` returns their mean loss.
        scale: factor applied to the batch's mean loss before differentiating.
        reduce_fn: applied to every partial result (loss, gradient, HVP block); returns the reduced tensor or reduces
            in place and returns ``None``.
        point: the parameters to linearise at (default: the model's current ones).
        where: names the batch in error messages.
        max_batch: most vectors per batched backward pass (default ``max(1, BATCH_ELEMENTS // N)``; 1 = one backward
            pass per vector, the lowest memory).

    Attributes:
        loss: the (reduced, scaled) loss at ``point``.
        gradient: its gradient, shape ``(N,)``.
        local_loss: this process's scaled loss before the reduction.
        local_gradient: its gradient before the reduction.
        num_hvps: Hessian-vector products applied so far (a block of ``b`` vectors counts ``b``).
        max_batch: most vectors per batched backward pass.
        batch_error: why batched products were abandoned for this operator (None while they work).

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
        max_batch: int | None = None,
    ) -> None:
        _batch_size(batch)
        self.fn = fn
        self.reduce_fn = reduce_fn
        self.num_hvps = 0
        self.where = where
        self.scale = scale
        if max_batch is None:
            max_batch = max(1, BATCH_ELEMENTS // fn.num_params) if USE_BATCHED else 1
        self.max_batch = int(max_batch)
        self._batched = self.max_batch > 1
        self.batch_error: str | None = None
        self._batch = fn.prepare(batch)
        w0 = (fn.current() if point is None else point.detach().to(fn.dtype)).detach()
        self._w0 = w0
        self._w: Tensor | None = None
        self._grad: Tensor | None = None
        with _probe_mode(fn.model):
            if fn.hvp_kind == "autograd":
                try:
                    loss, grad = self._build_graph(w0)
                except (RuntimeError, NotImplementedError) as err:  # no double backward here?
                    loss, grad = fn.gradient(w0, self._batch, scale=scale, where=where)  # a user error raises here
                    fn.fall_back(err)  # first order works: the second order is what failed
            else:
                loss, grad = fn.gradient(w0, self._batch, scale=scale, where=where)
        self.local_loss = loss.detach()
        self.local_gradient = grad.detach()
        self.loss = _reduce(loss.detach().clone(), reduce_fn)
        self.gradient = _reduce(grad.detach().clone(), reduce_fn)
        if not (torch.isfinite(self.loss).all() and torch.isfinite(self.gradient).all()):
            raise NonFiniteProbeError(f"the loss or its gradient is not finite on {where}.")
        self._w0_norm = float(w0.norm())

    def _build_graph(self, w0: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and gradient at ``w0`` with the gradient's graph kept for double-backward products."""
        fn = self.fn
        w = w0.clone().requires_grad_(True)
        with fn.bind(w):
            loss = _check_loss(fn.loss_fn(fn.model, self._batch), self.where) * self.scale
            _check_depends(loss, self.where)
            (grad,) = torch.autograd.grad(loss, w, create_graph=True)
        self._w, self._grad = w, grad
        return loss, grad

    @property
    def kind(self) -> str:
        """The kind of product this operator applies: ``"autograd"`` or ``"finite_difference"``."""
        return "autograd" if self._grad is not None and self.fn.hvp_kind == "autograd" else "finite_difference"

    @property
    def dim(self) -> int:
        """N, the number of trainable parameters."""
        return self.fn.num_params

    def matvec(self, v: Tensor) -> Tensor:
        """``H @ v`` for ``v`` of shape ``(N,)`` or ``(N, b)``; counts one HVP per column.

        ``v`` may live on another device than the model (e.g. a Krylov basis kept in CPU memory): it is moved to the
        model's device chunk by chunk and the result is returned on ``v``'s device. A block is applied by batched
        backward passes of at most :attr:`max_batch` vectors (see the module docstring).
        """
        block = v.reshape(self.dim, -1)
        b = block.shape[1]
        dev = self.fn.device
        with _probe_mode(self.fn.model):
            out = torch.empty(self.dim, b, dtype=self.fn.dtype, device=dev)
            chunk = self.max_batch
            lo = 0
            while lo < b:
                hi = min(b, lo + chunk)
                part = block[:, lo:hi].to(device=dev, dtype=self.fn.dtype)
                if self.kind == "autograd":
                    try:
                        done = self._autograd_products(part, out[:, lo:hi])
                    except (RuntimeError, NotImplementedError) as err:  # the double backward itself failed
                        self.fn.fall_back(err)
                        self._w = self._grad = None
                        continue
                    if not done:  # vmap failed for this model: per-vector products from now on
                        continue
                else:
                    for i in range(hi - lo):
                        out[:, lo + i] = self._difference_product(part[:, i])
                lo = hi
            self.num_hvps += b
            out = _reduce(out, self.reduce_fn)
        if not torch.isfinite(out).all():
            raise NonFiniteProbeError(f"a Hessian-vector product is not finite on {self.where}.")
        return out.to(v.device).reshape(v.shape)

    def _autograd_products(self, part: Tensor, out: Tensor) -> bool:
        """Write ``H part`` into ``out`` by double backward; False when the batched pass failed (nothing written)."""
        assert self._w is not None and self._grad is not None
        if not self._grad.requires_grad:  # the loss is (at most) linear in the parameters
            out.zero_()
            return True
        with self.fn.bind(self._w):  # a checkpointed forward recomputes with the probe's parameters
            if part.shape[1] > 1 and self._batched:
                hv = self._batched_hvp(part)
                if hv is None:
                    return False
                out.copy_(hv.T)
                return True
            for i in range(part.shape[1]):
                (hv,) = torch.autograd.grad(
                    self._grad, self._w, part[:, i], retain_graph=True, allow_unused=True, materialize_grads=True
                )
                out[:, i] = hv
        return True

    def _difference_product(self, v: Tensor, step_factor: float = 1.0) -> Tensor:
        """``(∇L(w0 + εv) − ∇L(w0 − εv)) / 2ε`` (this process's part, before the reduction); ε times ``step_factor``."""
        norm = float(v.norm())
        if norm == 0.0:
            return torch.zeros_like(v)
        eps = step_factor * finite_difference_step(self._w0_norm, norm, self.fn.dtype)
        fn, w0 = self.fn, self._w0
        _, g_plus = fn.gradient(w0 + eps * v, self._batch, scale=self.scale, where=self.where)
        _, g_minus = fn.gradient(w0 - eps * v, self._batch, scale=self.scale, where=self.where)
        return (g_plus - g_minus) / (2.0 * eps)

    def _batched_hvp(self, part: Tensor) -> Tensor | None:
        """``(H part)^T`` of shape ``(b, N)`` by one batched backward pass; None (and loops from now on) if it fails."""
        assert self._grad is not None and self._w is not None
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_VMAP_WARNING)
                (hv,) = torch.autograd.grad(
                    self._grad,
                    self._w,
                    part.T.contiguous(),
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                    is_grads_batched=True,
                )
            return hv
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            self._batched = False
            self.batch_error = f"{type(err).__name__}: {err}"
            return None

    __call__ = matvec


def _vmap_allowed(fn: ModelFunction) -> bool:
    return USE_BATCHED and fn.model not in _VMAP_FAILED


def _vmap_failed(fn: ModelFunction, err: BaseException) -> None:
    _VMAP_FAILED[fn.model] = f"{type(err).__name__}: {err}"


def _sample_selector(batch: Any) -> Callable[[Tensor], Any]:
    """``select(idx)``: the one-sample batch ``idx`` (under ``vmap`` over ``idx``: each sample as a batch of 1)."""
    size = _batch_size(batch)

    def select(idx: Tensor) -> Any:
        index = idx.reshape(1)
        return _map_tensors(
            batch, lambda t: t.index_select(0, index.to(t.device)) if t.dim() > 0 and t.shape[0] == size else t
        )

    return select


def per_sample_statistics(
    fn: ModelFunction, batch: Any, U: Tensor, *, max_batch: int | None = None
) -> tuple[Tensor, Tensor, Tensor] | None:
    r"""Each sample's loss :math:`\ell_j`, projected gradient :math:`U^\top g_j` and Hessian :math:`U^\top H_j U`.

    The ``m`` samples and the ``D`` columns of ``U`` are batched with :mod:`torch.func` (``vmap`` over samples of a
    reverse-over-reverse product ``vmap``-ped over the columns): ``m · D`` Hessian-vector products without ``m``
    separate graph builds, in chunks of samples holding at most ``max_batch`` vectors (default
    ``BATCH_ELEMENTS // N``). Call inside ``torch.inference_mode(False)``.

    Returns:
        ``(loss (m,), grad (m, D), hess (m, D, D))`` in ``fn.dtype`` on the model's device, or None when batching is
        not possible here: ``vmap`` fails for the model (remembered, later calls return None at once), ``D`` vectors do
        not fit in ``max_batch``, or a value is not finite or not a scalar (the caller's per-sample loop then raises
        the precise error).
    """
    n = fn.num_params
    m = _batch_size(batch)
    D = U.shape[1]
    limit = max(1, BATCH_ELEMENTS // n) if max_batch is None else max_batch
    if m == 0 or D > limit or not _vmap_allowed(fn) or fn.hvp_kind != "autograd":
        return None
    per_chunk = max(1, limit // D)
    batch = fn.prepare(batch)
    select = _sample_selector(batch)
    UT = U.to(device=fn.device, dtype=fn.dtype).T.contiguous()  # (D, N)
    w0 = fn.current()

    def one(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sample = select(idx)

        def loss(w: Tensor) -> Tensor:
            return fn.loss(w, sample).reshape(())

        g, vjp_fn, value = torch.func.vjp(torch.func.grad_and_value(loss), w0, has_aux=True)  # type: ignore[misc]
        (HU,) = torch.func.vmap(vjp_fn)(UT)  # (D, N): rows H_j u_d
        return value, UT @ g, UT @ HU.T

    losses, grads, hess = [], [], []
    try:
        with _probe_mode(fn.model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VMAP_WARNING)
            for lo in range(0, m, per_chunk):
                idx = torch.arange(lo, min(m, lo + per_chunk), device=fn.device)
                value, g, h = torch.func.vmap(one, randomness="error")(idx)
                losses.append(value.detach())
                grads.append(g.detach())
                hess.append(h.detach())
    except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as err:
        _vmap_failed(fn, err)
        return None
    out = torch.cat(losses), torch.cat(grads), torch.cat(hess)
    if out[0].shape != (m,) or not all(bool(torch.isfinite(t).all()) for t in out):
        return None
    return out


def perturbed_losses(
    fn: ModelFunction,
    w0: Tensor,
    U: Tensor,
    z: Tensor,
    batch: Any,
    *,
    per_sample: bool = False,
    max_batch: int | None = None,
) -> Tensor | None:
    r"""Losses at the perturbed points :math:`w_0 + U z_s` (rows ``z_s`` of ``z``), batched over the draws.

    One ``vmap``-ped forward pass per chunk of draws (at most ``max_batch`` perturbed parameter vectors at once,
    default ``BATCH_ELEMENTS // N``). With ``per_sample``, every sample of ``batch`` is evaluated on its own (as a batch
    of one, ``vmap``-ped over the samples too) and the result has shape ``(S, m)``; otherwise it is the batch's mean
    loss, shape ``(S,)``. No gradients are recorded. ``batch`` must already be prepared (:meth:`ModelFunction.prepare`).

    Returns:
        The losses in ``fn.dtype``, or None when ``vmap`` fails for the model (the caller then loops over draws).
    """
    S = z.shape[0]
    if S == 0 or not _vmap_allowed(fn):
        return None
    limit = max(1, BATCH_ELEMENTS // fn.num_params) if max_batch is None else max_batch
    if limit < 2:
        return None
    U = U.to(device=fn.device, dtype=fn.dtype)
    z = z.to(device=fn.device, dtype=fn.dtype)
    select = _sample_selector(batch) if per_sample else None
    m = _batch_size(batch)
    if per_sample and m == 0:
        return torch.zeros(S, 0, dtype=fn.dtype, device=fn.device)

    def at(zs: Tensor) -> Tensor:
        w = w0 + U @ zs
        if select is None:
            return fn.loss(w, batch).reshape(())
        return torch.func.vmap(lambda idx: fn.loss(w, select(idx)).reshape(()), randomness="error")(
            torch.arange(m, device=fn.device)
        )

    out = []
    try:
        with _probe_mode(fn.model), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VMAP_WARNING)
            for lo in range(0, S, limit):
                out.append(torch.func.vmap(at, randomness="error")(z[lo : lo + limit]))
    except (RuntimeError, NotImplementedError, ValueError, TypeError, IndexError) as err:
        _vmap_failed(fn, err)
        return None
    result = torch.cat(out)
    return result if result.shape == ((S, m) if per_sample else (S,)) else None
