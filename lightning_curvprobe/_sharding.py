"""Rows of the subspace per process: sharded models (FSDP2), DDP, and the subspace in checkpoints.

Lightning writes a callback's state from process 0 only (``ModelParallelStrategy`` puts it in the checkpoint's
metadata file), so the subspace, held by rows across the processes between probes, is gathered there when a
checkpoint is saved: process 0 holds ``N · (D + p)`` numbers in CPU memory for the time of the save, the others their
own rows. On restore every process reads the whole subspace and keeps its rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_curvprobe.functional.sharded import RowShards, ShardedFunction


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
