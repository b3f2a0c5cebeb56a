"""Rows of the subspace per process: sharded models (FSDP2), DDP, and the subspace in checkpoints.

Lightning writes a callback's state from process 0 only (``ModelParallelStrategy`` puts it in the checkpoint's
metadata file), so the subspace, held by rows across the processes between probes, is gathered there when a
checkpoint is saved: process 0 holds ``N · (D + p)`` numbers in CPU memory for the time of the save, the others their
own rows. On restore every process reads the whole subspace and keeps its rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_curvprobe.functional.hvp import ModelFunction
from lightning_curvprobe.functional.lanczos import EigenResult, _default_num_extra
from lightning_curvprobe.functional.probe import _eigensolve
from lightning_curvprobe.functional.sharded import RowShardedFunction, RowShards, ShardedFunction


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the processes of the default group, in place; returns it."""
    dist.all_reduce(tensor)
    return tensor


def gather_rows(local: Tensor, shards: ShardedFunction | RowShards) -> Tensor | None:
    """All processes' rows of ``local`` stacked in rank order on process 0 (CPU); None elsewhere (collective)."""
    group = shards.group
    rank = dist.get_rank(group)
    width = max(shards.row_counts)
    padded = local.new_zeros(width, local.shape[1], device=shards.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in shards.row_counts] if rank == 0 else None
    dist.gather(padded, parts, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if parts is None:
        return None
    return torch.cat([p[:c].cpu() for p, c in zip(parts, shards.row_counts, strict=True)])


def take_rows(full: Tensor, row_counts: list[int] | None, fn: ShardedFunction | RowShards) -> Tensor | None:
    """This process's rows of a restored subspace; None when it was saved with another layout of rows."""
    if full.shape[0] != fn.global_num_params or (row_counts is not None and row_counts != fn.row_counts):
        return None
    lo, hi = fn.rows
    return full[lo:hi].clone()


def check_strategy(trainer: Trainer, sigma: float | str, hvp: str = "auto") -> None:
    """Refuse, at setup, what the probe cannot run under.

    That is FSDP1, DeepSpeed, tensor parallelism, and on sharded parameters ``sigma="auto"`` and ``hvp="autograd"``.
    """
    name = type(trainer.strategy).__name__
    if "FSDP" in name or "DeepSpeed" in name:
        raise ValueError(
            "CurvatureStabilityCallback supports single-device, DDP, ddp_spawn and ModelParallelStrategy (FSDP2: "
            "torch.distributed.fsdp.fully_shard applied in configure_model, on a data-parallel mesh without tensor "
            f"parallelism); got strategy {name}. For sharded parameters use "
            "lightning.pytorch.strategies.ModelParallelStrategy(data_parallel_size=<processes>, "
            "tensor_parallel_size=1)."
        )
    tensor_parallel = getattr(trainer.strategy, "_tensor_parallel_size", 1)
    if "ModelParallel" in name and isinstance(tensor_parallel, int) and tensor_parallel > 1:
        raise ValueError(
            "CurvatureStabilityCallback supports ModelParallelStrategy with data parallelism only (fully_shard "
            f"on the data-parallel mesh); got tensor_parallel_size={tensor_parallel}. Pass tensor_parallel_size=1."
        )
    if "ModelParallel" in name and hvp == "autograd":
        raise ValueError(
            "`hvp` must be 'auto' or 'finite_difference' under ModelParallelStrategy (fully_shard has no double "
            "backward: products are finite differences of the sharded gradients), got hvp='autograd'."
        )
    if "ModelParallel" in name and sigma == "auto":
        raise ValueError(
            "`sigma` must be a number under ModelParallelStrategy (sigma='auto' is not supported on sharded "
            "parameters yet), got sigma='auto'."
        )


def measures_by_rows(num_eigenvectors: int, max_basis: int, world: int) -> bool:
    """Whether a DDP probe measures on its rows of ``U`` instead of gathering the ``D`` vectors.

    Gathering them (``D · N`` numbers per process) keeps the measurement as fast as on one process (added samples split
    over the processes, batched); it is used while that is no more than the process's share of the basis during a
    refresh (``max_basis · N / P``), so the probe's peak memory still falls with the number of processes. Beyond it,
    every process takes all added samples on its rows (``O(N)`` per process, each product gathering one vector).
    """
    return ROW_MEASUREMENT == "always" or (ROW_MEASUREMENT == "auto" and num_eigenvectors * world > max_basis)


#: ``"auto"`` (see :func:`measures_by_rows`), ``"always"`` or ``"never"`` (tests force either path).
ROW_MEASUREMENT = "auto"


class SubspaceRows:
    """Which rows of the subspace this process holds, and the steps of a probe that depend on it.

    One process holds all rows. Under DDP each holds an even share (:class:`RowShards`); the measurement gathers the
    ``D`` kept vectors, or with many processes (:func:`measures_by_rows`) works on the rows too. Under FSDP2 each
    holds the rows of its own parameter shards (:class:`ShardedFunction`).
    """

    def __init__(self) -> None:
        self.shards: ShardedFunction | RowShards | None = None
        self.by_rows = False
        self._restored: tuple[Tensor, list[int] | None] | None = None

    def restore(self, basis: Tensor | None, row_counts: list[int] | None) -> Tensor | None:
        """A checkpoint's subspace; returns the basis to use until :meth:`adopt`.

        Without ``row_counts`` its rows are in parameter order (one process or DDP, any number of processes): it is
        returned whole. With them (a sharded model's rows, process by process) it waits for :meth:`adopt`.
        """
        self._restored = None if basis is None or row_counts is None else (basis, row_counts)
        return basis if row_counts is None else None

    def adopt(self, shards: ShardedFunction | RowShards | None, basis: Tensor | None) -> tuple[Tensor | None, bool]:
        """From now on this process holds ``shards``' rows (all rows for None).

        Returns the kept basis' rows, and whether a restored one had to be dropped (saved with another layout).
        """
        self.shards = shards
        restored, self._restored = self._restored, None
        if restored is not None:
            rows = None if shards is None else take_rows(*restored, shards)
            return rows, rows is None
        if basis is not None and isinstance(shards, RowShards) and basis.shape[0] == shards.global_num_params:
            lo, hi = shards.rows
            return basis[lo:hi].clone(), False
        return basis, False

    def plan(self, world: int, sharded: bool, *, D: int, max_basis: int | None, N: int) -> bool:
        """Decide how this run measures (see :func:`measures_by_rows`); whether every process takes all added samples.

        ``max_basis`` is the callback's (None: the solver's default ``2 (D + p) + 10``), ``N`` the number of parameters.
        """
        size = max_basis if max_basis is not None else min(N, 2 * (D + _default_num_extra(D, N)) + 10)
        self.by_rows = world > 1 and not sharded and measures_by_rows(D, size, world)
        return sharded or self.by_rows

    def num_rows(self, fn: ModelFunction | ShardedFunction) -> int:
        """This process's rows of the subspace (a DDP layout follows a change of the trainable set)."""
        if isinstance(self.shards, RowShards) and self.shards.global_num_params != fn.num_params:
            self.shards = RowShards(fn.num_params, fn.device)  # the same change on every process
        return fn.num_params if not isinstance(self.shards, RowShards) else self.shards.rows[1] - self.shards.rows[0]

    @property
    def row_counts(self) -> list[int] | None:
        """Every process's rows when they are a sharded model's (None when in parameter order)."""
        return self.shards.row_counts if isinstance(self.shards, ShardedFunction) else None

    def eigensolve(self, op: Any, k: int, **kwargs: Any) -> EigenResult:
        """The refresh's eigensolve with this process's rows of the basis."""
        if isinstance(self.shards, RowShards):
            return self.shards.eigensolve(op, k, **kwargs)  # type: ignore[no-any-return]
        return _eigensolve(op, k, **kwargs)

    def reduce(self, tensor: Tensor, device: torch.device) -> Tensor:
        """A sum over rows from this process's part (unchanged in one process)."""
        return tensor if self.shards is None else self.shards.reduce(tensor.to(device))

    def measured(self, U: Tensor) -> Tensor:
        """``U`` as the measurement takes it: gathered under DDP unless measuring on the rows."""
        return self.shards.gather(U) if isinstance(self.shards, RowShards) and not self.by_rows else U

    def whole(self, U: Tensor) -> Tensor:
        """All rows of the measured ``U`` (for ``sigma="auto"``, which probes full vectors)."""
        return self.shards.gather(U) if isinstance(self.shards, RowShards) and self.by_rows else U

    def projected(self, op: Any, U: Tensor) -> Tensor:
        """``U^T H U`` (symmetrised) for the measured ``U``: ``D`` products."""
        by_rows = isinstance(self.shards, RowShards) and self.by_rows
        HU = (self.shards.matvec(op) if by_rows else op.matvec)(U)  # type: ignore[union-attr]
        P = U.T @ HU
        if by_rows or isinstance(self.shards, ShardedFunction):
            P = self.shards.reduce(P)  # type: ignore[union-attr]
        return 0.5 * (P + P.T)

    def function(self, fn: Any) -> RowShardedFunction | None:
        """The row-sharded function the measurement needs under DDP on rows (None otherwise)."""
        return RowShardedFunction(fn, self.shards) if isinstance(self.shards, RowShards) and self.by_rows else None

    def saved(self, basis: Tensor | None) -> Tensor | None:
        """The subspace for a checkpoint: all rows on process 0 (collective with several processes)."""
        if basis is None:
            return None
        return basis.cpu() if self.shards is None else gather_rows(basis, self.shards)
