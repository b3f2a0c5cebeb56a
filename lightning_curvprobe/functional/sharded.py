r"""The probe on sharded parameters (FSDP2 ``fully_shard``): first-order products on each process's own shards.

Under ``torch.distributed.fsdp.fully_shard`` every trainable parameter is a ``DTensor`` whose rows are split across
the processes of a 1-D data-parallel mesh. Double backward does not work there, but the model's own sharded forward
and first-order backward do, so the probe works on the flat vector of this process's local shards (its *rows* of the
global parameter vector, in the order of the processes) and never gathers the parameters:

* a point :math:`w_0 + \delta` is visited by adding this process's rows of :math:`\delta` to its local shards in
  place and copying the saved shards back afterwards, bit for bit; ``.grad`` is saved and restored around each
  backward pass;
* the Hessian-vector product is the central difference of :mod:`~lightning_curvprobe.functional.hvp`,
  :math:`H v \approx (\nabla L(w_0 + \varepsilon v) - \nabla L(w_0 - \varepsilon v)) / 2\varepsilon`, with the norms
  in :math:`\varepsilon` taken over all rows; FSDP's reduce-scatter hands each process its rows of the gradient;
* inner products are local partial sums all-reduced over the mesh, so the eigensolver
  (:func:`~lightning_curvprobe.functional.top_eigenpairs` with ``rows=`` and ``reduce_fn=``) keeps only this
  process's rows of its basis: ``max_basis · N / P`` numbers per process for ``P`` processes of equal shards.

Data: the base samples are split across the processes (each process passes its own; the loss is their global
sample-weighted mean); the added samples are the same on every process, and each one's gradient and products are
taken by all processes together (FSDP's collectives need every process in every pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_curvprobe.functional._batch import _batch_size, _slice_batch
from lightning_curvprobe.functional.hvp import (
    HessianOperator,
    LossFn,
    ModelFunction,
    NonFiniteProbeError,
    _check_depends,
    _check_loss,
    _probe_mode,
    finite_difference_step,
)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether any trainable parameter of ``model`` is a ``DTensor`` (e.g. after FSDP2's ``fully_shard``).

    Example:
        >>> import torch
        >>> is_fully_sharded(torch.nn.Linear(2, 2))
        False
    """
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters() if p.requires_grad)


def _share(reduce: Callable[[Tensor], Tensor], batch: Any, device: torch.device) -> float:
    k_local = _batch_size(batch, "base_batch")
    return k_local / float(reduce(torch.tensor([float(k_local)], dtype=torch.float64, device=device))[0])


class ShardedFunction:
    r"""The loss of a ``fully_shard``-ed model as a function of this process's rows of the flat parameter vector.

    The global vector is the concatenation over processes (in rank order) of each one's local shards, flattened in
    ``named_parameters()`` order; this process holds rows ``rows[0]:rows[1]`` of it. Every method that runs the model
    is collective: all processes of the mesh must call it, in the same order.

    Args:
        model: the network; its trainable parameters must all be ``DTensor`` shards on one 1-D device mesh
            (``fully_shard`` without tensor parallelism), in float32 or float64.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch's samples.

    Attributes:
        num_params: this process's rows (the numbers in its local shards).
        global_num_params: ``N``, the rows of all processes.
        rows: ``(lo, hi)``, this process's rows of the global vector.
        row_counts: every process's number of rows, in rank order.
        hvp_kind: always ``"finite_difference"`` (the sharded model has no double backward).
    """

    hvp = "finite_difference"
    hvp_kind = "finite_difference"
    fallback_reason: str | None = None

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        dtensor = _dtensor_type()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                f"`model` must have at least one trainable parameter (requires_grad=True), got {type(model).__name__} "
                "with none."
            )
        plain = [n for n, p in named if dtensor is None or not isinstance(p, dtensor)]
        if plain:
            raise ValueError(
                "a sharded model's trainable parameters must all be DTensor shards (apply fully_shard to every "
                f"module that holds one, and to the root), got plain tensors for {plain[:5]}."
            )
        meshes = {id(p.device_mesh): p.device_mesh for _, p in named}  # type: ignore[attr-defined]
        mesh = next(iter(meshes.values()))
        if len(meshes) > 1 or mesh.ndim != 1:
            raise ValueError(
                "sharded models are supported on one 1-D data-parallel device mesh (fully_shard without tensor "
                f"parallelism or HSDP), got {len(meshes)} meshes of shape {tuple(mesh.shape)}."
            )
        dtypes = {p.dtype for _, p in named}
        if not dtypes <= {torch.float32, torch.float64}:
            raise ValueError(
                "the finite-difference products of a sharded model need float32 or float64 parameters (the "
                f"perturbation is applied to the shards themselves), got {sorted(str(d) for d in dtypes)}."
            )
        self.model = model
        self.loss_fn = loss_fn
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.group = mesh.get_group()
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.dtype = torch.float64 if dtypes == {torch.float64} else torch.float32
        local = self._locals()
        self.device = local[0].device
        self.numels = [t.numel() for t in local]
        self.num_params = sum(self.numels)
        counts = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        counts[self.rank] = float(self.num_params)
        self.reduce(counts)
        lo = int(counts[: self.rank].sum())
        self.rows = (lo, lo + self.num_params)
        self.row_counts = [int(c) for c in counts.tolist()]
        self.global_num_params = int(counts.sum())

    def _locals(self) -> list[Tensor]:
        """This process's shard of every trainable parameter (views of the parameters' own storage)."""
        with torch.no_grad():
            return [p.to_local() for p in self._params]  # type: ignore[attr-defined]

    def reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the mesh's processes, in place; returns it."""
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def share(self, batch: Any) -> float:
        """This process's share ``k_local / k`` of the samples that the processes pass together (collective)."""
        return _share(self.reduce, batch, self.device)

    def anywhere(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (collective)."""
        return float(self.reduce(torch.tensor([float(flag)], device=self.device))[0]) > 0

    def norm(self, v: Tensor) -> float:
        """The global Euclidean norm of a vector given by this process's rows (collective)."""
        sq = (v.to(torch.float64) ** 2).sum().reshape(1)
        return float(self.reduce(sq)[0]) ** 0.5

    def current(self) -> Tensor:
        """This process's rows of the current parameters (a copy, in the compute dtype)."""
        with torch.inference_mode(False), torch.no_grad():
            return torch.cat([t.reshape(-1) for t in self._locals()]).to(self.dtype)

    def _reshard(self) -> None:
        """Drop any all-gathered (unsharded) parameters, so that the next forward gathers the shards anew."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextlib.contextmanager
    def at(self, w: Tensor) -> Iterator[None]:
        """Within the block the model's shards hold ``w`` (this process's rows); the saved shards are copied back."""
        local = self._locals()
        saved = [t.clone() for t in local]
        self._reshard()
        try:
            with torch.no_grad():
                for t, part in zip(local, torch.split(w, self.numels), strict=True):
                    t.copy_(part.view_as(t))
            yield
        finally:
            self._reshard()
            with torch.no_grad():
                for t, s in zip(local, saved, strict=True):
                    t.copy_(s)

    def loss(self, w: Tensor, batch: Any, *, scale: float = 1.0, where: str = "the probe batch") -> Tensor:
        """This process's scaled loss at ``w`` (no graph); sum it over processes for the global loss."""
        with self.at(w), torch.no_grad():
            return _check_loss(self.loss_fn(self.model, batch), where).detach().to(self.dtype) * scale

    def gradient(
        self, w: Tensor, batch: Any, *, scale: float = 1.0, where: str = "the probe batch"
    ) -> tuple[Tensor, Tensor]:
        r"""This process's scaled loss at ``w`` and its rows of :math:`\nabla \sum_p \mathrm{scale}_p L_p(w)`.

        One forward and backward pass of the sharded model; FSDP's reduce-scatter (a mean over the processes) hands
        each process its rows, so the loss is multiplied by the number of processes before the backward pass. The
        parameters' ``.grad`` are saved before and put back after.
        """
        saved = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        try:
            with self.at(w):
                loss = _check_loss(self.loss_fn(self.model, batch), where) * scale
                _check_depends(loss, where)
                (loss * self.world).backward()
                parts = []
                for p, n in zip(self._params, self.numels, strict=True):
                    g = p.grad
                    if g is None:
                        parts.append(torch.zeros(n, dtype=self.dtype, device=self.device))
                    else:
                        parts.append(g.to_local().reshape(-1).to(self.dtype))  # type: ignore[attr-defined]
                grad = torch.cat(parts)
        finally:
            for p, g in zip(self._params, saved, strict=True):
                p.grad = g
        return loss.detach().to(self.dtype), grad

    def operator(
        self, batch: Any, *, scale: float = 1.0, replicated: bool = False, where: str = "the probe batch"
    ) -> ShardedHessianOperator:
        """The Hessian operator of the batch at the current weights (see :class:`ShardedHessianOperator`)."""
        return ShardedHessianOperator(self, batch, scale=scale, replicated=replicated, where=where)


class ShardedHessianOperator:
    r"""Hessian of the global mean loss of a sharded model, applied to vectors given by this process's rows.

    Each product is a central difference of two gradients (four passes of the sharded model in all; see the module
    docstring). ``scale`` is this process's share of the global loss (``k_local / k``) when each process passes its
    own samples; with ``replicated=True`` every process passes the same batch and the loss is that batch's mean.

    Attributes:
        loss: the global loss at the current weights (identical on every process).
        gradient: this process's rows of its gradient.
        num_hvps: products applied so far (a block of ``b`` vectors counts ``b``).
    """

    kind = "finite_difference"

    def __init__(
        self,
        fn: ShardedFunction,
        batch: Any,
        *,
        scale: float = 1.0,
        replicated: bool = False,
        where: str = "the probe batch",
    ) -> None:
        _batch_size(batch)
        self.fn = fn
        self.where = where
        self.scale = scale / fn.world if replicated else scale
        self.num_hvps = 0
        self._batch = batch
        self._w0 = fn.current()
        with _probe_mode(fn.model):
            loss, grad = fn.gradient(self._w0, batch, scale=self.scale, where=where)
        self.loss = fn.reduce(loss.reshape(1).clone())[0]
        self.gradient = grad
        if not torch.isfinite(self.loss) or fn.anywhere(not bool(torch.isfinite(grad).all())):
            raise NonFiniteProbeError(f"the loss or its gradient is not finite on {where}.")
        self._w0_norm = fn.norm(self._w0)

    @property
    def dim(self) -> int:
        """This process's rows."""
        return self.fn.num_params

    def matvec(self, v: Tensor) -> Tensor:
        """This process's rows of ``H v`` for ``v`` of shape ``(rows,)`` or ``(rows, b)`` (collective)."""
        fn = self.fn
        block = v.reshape(self.dim, -1)
        out = torch.empty(self.dim, block.shape[1], dtype=fn.dtype, device=fn.device)
        with _probe_mode(fn.model):
            for i in range(block.shape[1]):
                out[:, i] = self._difference_product(block[:, i].to(device=fn.device, dtype=fn.dtype))
        self.num_hvps += block.shape[1]
        if fn.anywhere(not bool(torch.isfinite(out).all())):
            raise NonFiniteProbeError(f"a Hessian-vector product is not finite on {self.where}.")
        return out.to(v.device).reshape(v.shape)

    __call__ = matvec

    def _difference_product(self, v: Tensor, step_factor: float = 1.0) -> Tensor:
        norm = self.fn.norm(v)
        if norm == 0.0:
            return torch.zeros_like(v)
        eps = step_factor * finite_difference_step(self._w0_norm, norm, self.fn.dtype)
        _, g_plus = self.fn.gradient(self._w0 + eps * v, self._batch, scale=self.scale, where=self.where)
        _, g_minus = self.fn.gradient(self._w0 - eps * v, self._batch, scale=self.scale, where=self.where)
        return (g_plus - g_minus) / (2.0 * eps)


def sharded_statistics(
    fn: ShardedFunction | RowShardedFunction,
    op: ShardedHessianOperator | RowShardedOperator,
    base_batch: Any,
    added_batch: Any,
    eigenvectors: Tensor,
    projected: Tensor,
    *,
    direct_z: Tensor | None = None,
    qe_z: Tensor | None = None,
) -> Any:
    """The probe's sufficient statistics, global and identical on every process (a ``probe._Statistics``).

    ``op`` is the base samples' operator (this process's share, scaled by ``k_local / k``); ``added_batch`` is the
    same on every process; ``eigenvectors`` holds this process's rows of ``U``; ``projected`` is ``U^T H_k U``
    ``(D, D)``. Each added sample costs one gradient and ``D`` finite-difference products of the whole mesh; each
    draw ``z`` one forward pass on the base samples and one per added sample.
    """
    from lightning_curvprobe.functional.probe import _check_draws, _projected_hessian, _second_order_model, _Statistics

    with torch.inference_mode(False):
        dt, dev = fn.dtype, fn.device
        U = eigenvectors.to(device=dev, dtype=dt)
        D = U.shape[1]
        share = fn.share(base_batch)
        k = round(_batch_size(base_batch, "base_batch") / share)
        m = _batch_size(added_batch, "added_batch")
        L = op.loss.to(dt)
        g = fn.reduce(U.T @ op.gradient.to(dt))
        added_loss = torch.empty(m, dtype=dt, device=dev)
        added_grad = torch.empty(m, D, dtype=dt, device=dev)
        added_hess = torch.empty(m, D, D, dtype=dt, device=dev)
        hvps = 0
        for j in range(m):
            op_j = fn.operator(_slice_batch(added_batch, j, j + 1), replicated=True, where=f"added sample {j}")
            added_loss[j] = op_j.loss
            added_grad[j] = fn.reduce(U.T @ op_j.gradient)
            hess = fn.reduce(U.T @ op_j.matvec(U))
            added_hess[j] = 0.5 * (hess + hess.T)
            hvps += op_j.num_hvps
        S = 0 if direct_z is None else direct_z.shape[0]
        Q = 0 if qe_z is None else qe_z.shape[0]
        samples = [_slice_batch(added_batch, j, j + 1) for j in range(m)] if S else []
        w0 = fn.current()

        def losses_at(z: Tensor, with_added: bool) -> Tensor:
            """``[L_k(w0 + U z), l_1(...), ..., l_m(...)]`` (the added ones only ``with_added``), global."""
            w = w0 + U @ z.to(dt)
            parts = [fn.loss(w, base_batch, scale=share, where="the base samples (probe point)")]
            if with_added:
                parts += [fn.loss(w, s, scale=1.0 / fn.world, where=f"added sample {j}") for j, s in enumerate(samples)]
            return fn.reduce(torch.stack(parts))

        with _probe_mode(fn.model):
            direct = [losses_at(direct_z[s], True) for s in range(S)]  # type: ignore[index]
            qe = [losses_at(qe_z[q], False)[0] for q in range(Q)]  # type: ignore[index]
        base_draw = torch.stack([d[0] for d in direct]) * k if S else torch.empty(0, dtype=dt, device=dev)
        added_draw = torch.stack([d[1:] for d in direct], 1) if S else torch.empty(m, 0, dtype=dt, device=dev)
        qe_draw = torch.stack(qe) if Q else torch.empty(0, dtype=dt, device=dev)
        _check_draws(base_draw, added_draw, qe_draw)
        P = _projected_hessian(projected, D).to(device=dev, dtype=dt)
        return _Statistics(
            base_loss_sum=L * k,
            base_count=torch.tensor(float(k), dtype=dt, device=dev),
            base_grad_sum=g * k,
            base_hess_sum=P * k,
            added_loss=added_loss,
            added_grad=added_grad,
            added_hess=added_hess,
            base_draw_loss_sum=base_draw,
            added_draw_loss=added_draw,
            qe_change_sum=(qe_draw - L) * k,
            qe_model_sum=_second_order_model(qe_z, g, P) * k,
            hvps=hvps,
            forward_passes=S * (1 + m) + Q,
        )


def share_of(stats: Any, rank: int, world: int) -> Any:
    """This process's part of global statistics, for a metric that sums (and concatenates) the parts of all.

    Process 0 keeps the base sums (the others contribute zeros); each process keeps the added samples ``j`` with
    ``j % world == rank``.
    """
    from dataclasses import replace

    own = torch.arange(rank, stats.added_loss.shape[0], world, device=stats.added_loss.device)
    keep = 1.0 if rank == 0 else 0.0
    return replace(
        stats,
        base_loss_sum=stats.base_loss_sum * keep,
        base_count=stats.base_count * keep,
        base_grad_sum=stats.base_grad_sum * keep,
        base_hess_sum=stats.base_hess_sum * keep,
        base_draw_loss_sum=stats.base_draw_loss_sum * keep,
        qe_change_sum=stats.qe_change_sum * keep,
        qe_model_sum=stats.qe_model_sum * keep,
        added_loss=stats.added_loss[own],
        added_grad=stats.added_grad[own],
        added_hess=stats.added_hess[own],
        added_draw_loss=stats.added_draw_loss[own],
    )


def sharded_eigensolve(op: ShardedHessianOperator, k: int, **kwargs: Any) -> Any:
    """:func:`~lightning_curvprobe.functional.top_eigenpairs` of ``op`` with this process's rows of the basis."""
    from lightning_curvprobe.functional.lanczos import top_eigenpairs

    fn = op.fn
    with _probe_mode(fn.model):
        return top_eigenpairs(
            op.matvec,
            fn.global_num_params,
            k,
            dtype=fn.dtype,
            device=fn.device,
            rows=fn.rows,
            reduce_fn=fn.reduce,
            **kwargs,
        )


def sharded_preflight(fn: ShardedFunction, base_batch: Any, *, seed: int = 0) -> Any:
    """One loss and gradient, and one product at two steps, of the sharded model on ``base_batch`` (collective).

    Raises what the probe would raise later (a detached or non-scalar loss, a non-finite value); the model, its
    ``.grad`` and the global RNG are left as they were. Returns a ``PreflightReport`` (finite differences; the
    per-sample-mean check of the unsharded pre-flight is not made) whose ``difference_warning`` says when the products
    at steps ε and ε/2 disagree by more than ``FD_CONSISTENCY``: the sharded forward computes in low precision (e.g.
    ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``), or the loss has kinks (ReLU) at the scale of the step.
    """
    from lightning_curvprobe.functional.preflight import FD_CONSISTENCY, PreflightReport

    with torch.inference_mode(False):
        op = fn.operator(base_batch, scale=fn.share(base_batch), where="the base samples (pre-flight)")
        gen = torch.Generator().manual_seed(seed + fn.rank)
        v = torch.randn(fn.num_params, generator=gen, dtype=fn.dtype).to(fn.device)
        with _probe_mode(fn.model):
            d1 = op._difference_product(v)
            d2 = op._difference_product(v, step_factor=0.5)
    diff = fn.reduce(torch.stack([((d1 - d2).double() ** 2).sum(), (d2.double() ** 2).sum()]))
    consistency = float(diff[0].sqrt() / diff[1].sqrt().clamp_min(torch.finfo(torch.float64).tiny))
    warning = None
    if not consistency < FD_CONSISTENCY:
        warning = (
            f"finite-difference Hessian-vector products at steps ε and ε/2 differ by {consistency:.2g} (relative): "
            "the sharded model's products are unreliable here (a forward in low precision, e.g. fully_shard's "
            "MixedPrecisionPolicy(param_dtype=torch.bfloat16), or kinks of the loss at the scale of the step); "
            "eigenvalues and delta2 carry that error"
        )
    reason = "the parameters are sharded (FSDP2 fully_shard: no double backward)"
    return PreflightReport(
        hvp_kind="finite_difference", fallback_reason=reason, mean_ratio=float("nan"), difference_warning=warning
    )


class RowShards:
    """The flat parameter vector's rows split evenly over the processes of a data-parallel run (DDP).

    Under DDP every process holds all parameters but only rows ``rows[0]:rows[1]`` of the eigensolver's basis and of
    the kept subspace, so their memory per process falls by the number of processes. A product gathers the block's
    rows from all processes (``N · b`` numbers), applies the all-reduced Hessian and keeps this process's rows; the
    measurement gathers the ``D`` kept vectors (``N · D`` numbers, for the time of the probe).

    Args:
        n: ``N``, the number of trainable parameters.
        device: where the collectives run (the model's device).
    """

    group = None  # the default process group

    def __init__(self, n: int, device: torch.device) -> None:
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        bounds = [n * r // self.world for r in range(self.world + 1)]
        self.row_counts = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        self.rows = (bounds[self.rank], bounds[self.rank + 1])
        self.global_num_params = n
        self.device = device

    def reduce(self, tensor: Tensor) -> Tensor:
        """Sum over the processes, in place; returns ``tensor``."""
        dist.all_reduce(tensor)
        return tensor

    def gather(self, local: Tensor) -> Tensor:
        """All rows ``(N, b)`` from every process's ``(rows, b)`` block (collective)."""
        block = local.reshape(local.shape[0], -1).to(self.device)
        width = max(self.row_counts)
        padded = block.new_zeros(width, block.shape[1])
        padded[: block.shape[0]] = block
        parts = [torch.empty_like(padded) for _ in self.row_counts]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, self.row_counts, strict=True)])

    def matvec(self, op: HessianOperator) -> Callable[[Tensor], Tensor]:
        """``op`` (all-reduced, on all rows) as an operator on this process's rows.

        A block is gathered ``op.max_batch`` vectors at a time (one at a time once ``N`` exceeds
        :data:`~lightning_curvprobe.functional.hvp.BATCH_ELEMENTS`), so the gathered vectors and their products stay
        within what one batched product holds anyway.
        """
        lo, hi = self.rows

        def apply(block: Tensor) -> Tensor:
            cols = block.reshape(hi - lo, -1)
            out = torch.empty_like(cols)
            for j in range(0, cols.shape[1], op.max_batch):
                part = cols[:, j : j + op.max_batch]
                out[:, j : j + part.shape[1]] = op.matvec(self.gather(part))[lo:hi].to(out)
            return out.reshape(block.shape)

        return apply

    def eigensolve(self, op: HessianOperator, k: int, **kwargs: Any) -> Any:
        """``top_eigenpairs`` of the (all-reduced) operator ``op`` with this process's rows of the basis."""
        fn = op.fn
        matvec = self.matvec(op)

        from lightning_curvprobe.functional.lanczos import top_eigenpairs

        with _probe_mode(fn.model):
            return top_eigenpairs(
                matvec,
                self.global_num_params,
                k,
                dtype=fn.dtype,
                device=fn.device,
                rows=self.rows,
                reduce_fn=self.reduce,
                **kwargs,
            )


class RowShardedFunction:
    """A replicated (DDP) model's loss as a function of this process's rows of its flat parameter vector.

    The same interface as :class:`ShardedFunction`, so that :func:`sharded_statistics` measures with only this
    process's rows of ``U``: a point ``w0 + U z`` is gathered (``N`` numbers) and evaluated with the model's own
    :class:`~lightning_curvprobe.functional.hvp.ModelFunction` (autograd products where the model has them).

    Args:
        fn: the model as a function of all its parameters.
        shards: the processes' rows.
    """

    def __init__(self, fn: ModelFunction, shards: RowShards) -> None:
        self.fn, self.shards = fn, shards
        self.model, self.dtype, self.device = fn.model, fn.dtype, fn.device
        self.hvp_kind, self.fallback_reason = fn.hvp_kind, fn.fallback_reason
        self.rank, self.world, self.rows = shards.rank, shards.world, shards.rows
        self.num_params = shards.rows[1] - shards.rows[0]
        self.global_num_params = shards.global_num_params
        self._point: tuple[Tensor, Tensor] | None = None  # the last point's rows and its gathered vector

    def reduce(self, tensor: Tensor) -> Tensor:
        """Sum over the processes, in place; returns ``tensor``."""
        return self.shards.reduce(tensor)

    def share(self, batch: Any) -> float:
        """This process's share ``k_local / k`` of the samples that the processes pass together (collective)."""
        return _share(self.reduce, batch, self.device)

    def current(self) -> Tensor:
        """This process's rows of the current parameters."""
        lo, hi = self.rows
        return self.fn.current()[lo:hi].clone()

    def loss(self, w: Tensor, batch: Any, *, scale: float = 1.0, where: str = "the probe batch") -> Tensor:
        """This process's scaled loss at the point whose rows are ``w`` (collective: the point is gathered once)."""
        if self._point is None or self._point[0] is not w:  # the base and every added sample at one point: one gather
            self._point = (w, self.shards.gather(w)[:, 0])
        full = self._point[1]
        with torch.no_grad():
            return _check_loss(self.fn.loss(full, self.fn.prepare(batch)), where).detach() * scale

    def operator(
        self, batch: Any, *, scale: float = 1.0, replicated: bool = False, where: str = "the probe batch"
    ) -> RowShardedOperator:
        """The Hessian operator of the batch on this process's rows (see :class:`RowShardedOperator`)."""
        return RowShardedOperator(self, batch, scale=scale, replicated=replicated, where=where)


class RowShardedOperator:
    """A replicated model's Hessian operator on this process's rows: the global loss, its gradient's rows, products.

    With ``replicated`` every process passes the same batch and computes the same values (no reduction); otherwise
    each passes its own share, scaled by ``scale``, and the loss, gradient and products are all-reduced.
    """

    def __init__(self, rfn: RowShardedFunction, batch: Any, *, scale: float, replicated: bool, where: str) -> None:
        from lightning_curvprobe.functional.hvp import HessianOperator

        self.fn = rfn
        reduce_fn = None if replicated else rfn.shards.reduce
        self.op = HessianOperator(rfn.fn, batch, scale=1.0 if replicated else scale, reduce_fn=reduce_fn, where=where)
        lo, hi = rfn.rows
        self.loss = self.op.loss
        self.gradient = self.op.gradient[lo:hi].clone()
        self.kind = self.op.kind
        self._apply = rfn.shards.matvec(self.op)

    @property
    def num_hvps(self) -> int:
        """Products applied so far."""
        return self.op.num_hvps

    def matvec(self, v: Tensor) -> Tensor:
        """This process's rows of ``H v`` for ``v`` given by its rows (collective)."""
        return self._apply(v)
