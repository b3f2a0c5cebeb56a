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

from lightning_curvprobe.functional.hvp import HessianOperator, _probe_mode
from lightning_curvprobe.functional.lanczos import EigenResult, top_eigenpairs
from lightning_curvprobe.functional.sharded import ShardedFunction


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


def check_strategy(trainer: Trainer, sigma: float | str) -> None:
    """Refuse, at setup, what the probe cannot run under (FSDP1, DeepSpeed, tensor parallelism, sharded ``'auto'``)."""
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
    if "ModelParallel" in name and sigma == "auto":
        raise ValueError(
            "`sigma` must be a number under ModelParallelStrategy (sigma='auto' is not supported on sharded "
            "parameters yet), got sigma='auto'."
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

    def eigensolve(self, op: HessianOperator, k: int, **kwargs: Any) -> EigenResult:
        """``top_eigenpairs`` of the (all-reduced) operator ``op`` with this process's rows of the basis."""
        lo, hi = self.rows
        fn = op.fn

        def matvec(block: Tensor) -> Tensor:
            return op.matvec(self.gather(block))[lo:hi].clone().reshape(block.shape)

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
