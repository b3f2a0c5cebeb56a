"""Batches as nested containers of tensors: counting, slicing and concatenating samples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        items: Any = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, str):
        items = batch
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _batch_size(batch: Any, name: str = "batch") -> int:
    """Number of samples: the leading dimension of the batch's first tensor."""
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        raise ValueError(
            f"`{name}` must be a tensor or a (nested) tuple, list or dict of tensors whose first tensor has a leading "
            f"sample dimension, got {type(batch).__name__}"
            + ("" if first is None else " whose first tensor is a 0-d tensor")
            + "."
        )
    return int(first.shape[0])


def _map_tensors(batch: Any, fn: Any) -> Any:
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: _map_tensors(v, fn) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(v, fn) for v in batch)
    return batch


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor whose leading dimension is the batch size."""
    size = _batch_size(batch)
    return _map_tensors(batch, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == size else t)


def _cat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of identical structure along the sample dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches), dim=0)
    if isinstance(first, Mapping):
        return type(first)({k: _cat_batches([b[k] for b in batches]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_cat_batches([b[i] for b in batches]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_batches([b[i] for b in batches]) for i in range(len(first)))
    return first


def _cast_batch(batch: Any, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Any:
    """Move tensors to ``device`` and floating tensors to ``dtype`` (integers, e.g. class labels, keep theirs)."""

    def fn(t: Tensor) -> Tensor:
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None and t.device != device:
            t = t.to(device)
        return t

    return _map_tensors(batch, fn)
