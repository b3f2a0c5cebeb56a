"""The callback's probe samples and default loss, and the guards that keep the user's run untouched.

- :func:`draw_probe_batch`: the ``k + m`` probe samples, from ``probe_data`` or drawn once from the training data.
- :func:`training_step_loss`: the default loss, ``training_step(batch, 0)`` with ``self.log`` silenced.
- :func:`untouched_rng`: the global torch (CPU and CUDA), Python and NumPy RNG states restored on exit.
- :func:`user_state_kept`: the Python-side state of every submodule (lists, dicts, counters, tensors that are no
  Parameters or buffers, torchmetrics states) restored on exit, so that a ``training_step`` with side effects
  (``self.outputs.append(loss)``, ``self.train_acc(preds, y)``) leaves no trace of the probe's calls.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from lightning_curvprobe.functional._batch import _batch_size, _cat_batches, _map_tensors, _slice_batch

# attributes every nn.Module has (parameters, buffers, submodules, hooks, the training flag): not user state
_MODULE_KEYS = frozenset(nn.Module().__dict__)
#: Tensors of user state up to this many elements are copied before a probe, so that an in-place change can be undone.
CLONE_ELEMENTS = 1 << 20
_MAX_DEPTH = 4


def training_step_loss(pl_module: Any, batch: Any) -> Tensor:
    """The loss returned by ``training_step(batch, 0)``, with the module's logging silenced.

    Every call restores the module's Python-side state (:func:`user_state_kept`) before it returns: a torchmetrics
    update inside ``training_step`` called under ``vmap`` would otherwise keep a batched tensor in the metric's state,
    which the next call could not use.
    """
    with user_state_kept(pl_module):
        return _training_step_loss(pl_module, batch)


def _training_step_loss(pl_module: Any, batch: Any) -> Tensor:
    module = pl_module
    had = {name: name in module.__dict__ for name in ("log", "log_dict")}
    module.__dict__["log"] = _noop
    module.__dict__["log_dict"] = _noop
    try:
        out = module.training_step(batch, 0)
    finally:
        for name, present in had.items():
            if not present:
                del module.__dict__[name]
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ValueError(
            "`loss_fn` is None, so the loss is taken from training_step's output, which must be a tensor or a dict "
            f"with 'loss'; got {type(out).__name__}. Pass loss_fn=lambda module, batch: <mean loss of batch>."
        )
    return out


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


@contextlib.contextmanager
def untouched_rng(device: torch.device) -> Iterator[None]:
    """Restore the global torch (CPU and CUDA), Python and NumPy RNG states on exit."""
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


class _Snapshot:
    """A container's or tensor's content at one moment, restorable in place (the objects keep their identity)."""

    __slots__ = ("obj", "content", "version")

    def __init__(self, obj: Any, depth: int) -> None:
        self.obj = obj
        self.version = -1
        self.content: Any = None
        if isinstance(obj, Tensor):
            if not isinstance(obj, nn.Parameter) and not obj.is_inference():
                self.version = obj._version
                if obj.numel() <= CLONE_ELEMENTS:
                    with torch.no_grad():
                        self.content = obj.detach().clone()
        elif depth < _MAX_DEPTH and type(obj) is list:
            self.content = [_Snapshot(v, depth + 1) for v in obj]
        elif depth < _MAX_DEPTH and type(obj) is dict:
            self.content = {k: _Snapshot(v, depth + 1) for k, v in obj.items()}
        elif type(obj) is set:
            self.content = set(obj)

    def restore(self) -> bool:
        """Put the content back; False when a large tensor was changed in place (its content was not copied)."""
        obj, ok = self.obj, True
        if isinstance(obj, Tensor):
            if self.version >= 0 and obj._version != self.version:
                if self.content is None:
                    return False
                with torch.no_grad(), torch.inference_mode(False):
                    obj.copy_(self.content)
        elif type(obj) is list and self.content is not None:
            obj[:] = [snap.obj for snap in self.content]
            ok = all([snap.restore() for snap in self.content])
        elif type(obj) is dict and self.content is not None:
            obj.clear()
            obj.update({k: snap.obj for k, snap in self.content.items()})
            ok = all([snap.restore() for snap in self.content.values()])
        elif type(obj) is set and self.content is not None:
            obj.clear()
            obj.update(self.content)
        return ok


@contextlib.contextmanager
def user_state_kept(module: nn.Module) -> Iterator[list[str]]:
    """Restore every submodule's Python-side attributes (and their contents) on exit.

    Lists, dicts and sets are restored in place and tensors that are no Parameters or buffers are copied back when
    changed in place (up to :data:`CLONE_ELEMENTS` elements); attributes added meanwhile are removed. Yields a list to
    which the names of attributes that could not be restored (large tensors changed in place) are appended on exit.
    """
    saved = []
    for name, sub in module.named_modules():
        state = sub.__dict__
        keys = [key for key in state if key not in _MODULE_KEYS]
        saved.append((name, state, {key: _Snapshot(state[key], 0) for key in keys}))
    unrestored: list[str] = []
    try:
        yield unrestored
    finally:
        for name, state, snaps in saved:
            for key in [key for key in state if key not in _MODULE_KEYS and key not in snaps]:
                del state[key]
            for key, snap in snaps.items():
                state[key] = snap.obj
                if not snap.restore():
                    unrestored.append(f"{name}.{key}" if name else key)


def num_trainable(module: nn.Module) -> int:
    """The number of the module's trainable parameters (the probe's N)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def probe_data_len(data: Any) -> int:
    """Samples in ``probe_data`` (a map-style Dataset or a batch of tensors)."""
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    if isinstance(data, IterableDataset):
        raise TypeError("`probe_data` must be a map-style Dataset or a batch of tensors, got an IterableDataset.")
    return _batch_size(data, "probe_data")


def draw_probe_batch(
    trainer: Trainer, probe_data: Any, n: int, indices: list[int] | None, generator: torch.Generator
) -> tuple[Any, list[int] | None]:
    """The first ``n`` samples of ``probe_data``, or ``n`` drawn once from the training data; and the drawn indices.

    ``indices`` (from an earlier call or a checkpoint) are reused, so that a resumed run probes the same samples.
    """
    if probe_data is not None:
        return take(probe_data, list(range(n)), collate=default_collate), indices
    loader = trainer.train_dataloader
    datamodule = getattr(trainer, "datamodule", None)
    if loader is None and datamodule is not None and hasattr(datamodule, "train_dataloader"):
        try:
            loader = datamodule.train_dataloader()
        except Exception as err:  # noqa: BLE001 - e.g. setup("validate") built no training set
            raise ValueError(
                "`probe_data` must be given when the training dataloader is not available: outside fit the "
                f"datamodule's train_dataloader() failed ({type(err).__name__}: {err}); got probe_data=None."
            ) from err
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if isinstance(loader, dict) and loader:
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "`probe_data` must be given when the training dataloader is not available (e.g. in "
            f"trainer.validate() without a datamodule), got probe_data=None and train dataloader {loader!r}."
        )
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        batches, count = [], 0
        for batch in loader:
            batches.append(batch)
            count += _batch_size(batch)
            if count >= n:
                break
        if count < n:
            raise ValueError(f"the training dataloader yielded {count} samples, fewer than k + m = {n}.")
        return _slice_batch(_cat_batches(batches), 0, n), indices
    size = len(dataset)  # type: ignore[arg-type]
    if size < n:
        raise ValueError(
            f"the training dataset holds {size} samples, fewer than num_probe_samples + num_added_samples = {n}."
        )
    if indices is None:
        indices = [int(i) for i in torch.randperm(size, generator=generator)[:n]]
    return take(dataset, indices, collate=loader.collate_fn or default_collate), indices


def take(data: Any, indices: Sequence[int], collate: Callable[[list[Any]], Any]) -> Any:
    """Samples ``indices`` of a Dataset (collated) or of a batch."""
    if isinstance(data, Dataset):
        return collate([data[i] for i in indices])
    return select(data, list(indices))


def select(batch: Any, indices: list[int]) -> Any:
    """Rows ``indices`` of every tensor of ``batch`` whose leading dimension is the batch size."""
    size = _batch_size(batch)
    index = torch.tensor(indices, dtype=torch.long)
    return _map_tensors(batch, lambda t: t[index.to(t.device)] if t.dim() > 0 and t.shape[0] == size else t)


def clone(batch: Any) -> Any:
    """A detached copy of every tensor of ``batch``."""
    return _map_tensors(batch, lambda t: t.detach().clone())
