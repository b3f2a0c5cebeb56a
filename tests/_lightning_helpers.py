"""Tiny Lightning modules, data and Trainer factories for the callback tests (CPU, a few hundred parameters)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

DIN, HIDDEN, CLASSES = 6, 16, 3
# Linear(6, 16) + BatchNorm1d(16) affine + Linear(16, 3)
NUM_PARAMS_BN = DIN * HIDDEN + HIDDEN + 2 * HIDDEN + HIDDEN * CLASSES + CLASSES  # 195
NUM_PARAMS_NO_BN = NUM_PARAMS_BN - 2 * HIDDEN  # 163


class TinyClassifier(L.LightningModule):
    """Linear → BatchNorm1d → tanh → Dropout → Linear, cross-entropy; counts the Trainer's training batches.

    ``training_step`` logs ``train_loss`` (step and epoch level) so that a leak of the callback's calls to
    ``training_step`` into the logs would be visible; ``validation_step`` logs ``val_loss``.
    """

    def __init__(
        self,
        lr: float = 0.05,
        optimizer: str = "adam",
        batchnorm: bool = True,
        dropout: float = 0.2,
        head_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.lr = lr
        self.optimizer_name = optimizer
        self.net = nn.Sequential(
            nn.Linear(DIN, HIDDEN),
            nn.BatchNorm1d(HIDDEN) if batchnorm else nn.Identity(),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(HIDDEN, CLASSES),
        )
        if head_scale != 1.0:  # an over-confident random start: large, widely spread per-sample losses
            with torch.no_grad():
                self.net[-1].weight.mul_(head_scale)
        self.training_steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.training_steps += 1  # only the Trainer's loop calls this hook (the probe may call training_step)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_margin", (loss - 1.0).abs(), on_step=False, on_epoch=True)  # an epoch-only key
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class ManualClassifier(TinyClassifier):
    """The same network trained with manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def ce_loss(module: nn.Module, batch: Any) -> Tensor:
    """Mean cross-entropy of a batch ``(x, y)``: the probe's ``loss_fn``."""
    x, y = batch
    return F.cross_entropy(module(x), y)


def make_dataset(n: int = 192, seed: int = 0, dtype: torch.dtype = torch.float32) -> TensorDataset:
    """A learnable 3-class problem on 6 Gaussian features (seeded, never touches the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIN, generator=g, dtype=torch.float64)
    score = torch.stack([x[:, 0] + x[:, 1], x[:, 2] - x[:, 3], 0.5 * x[:, 4] * x[:, 5]], dim=1)
    y = score.argmax(1)
    flip = torch.rand(n, generator=g) < 0.1  # a little label noise so the loss never reaches zero
    y = torch.where(flip, torch.randint(0, CLASSES, (n,), generator=g), y)
    return TensorDataset(x.to(dtype), y)


def probe_batch(n: int, seed: int = 7, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """``n`` samples from the same distribution as :func:`make_dataset`, as one batch ``(x, y)``."""
    ds = make_dataset(n, seed=seed, dtype=dtype)
    return ds.tensors[0], ds.tensors[1]


def loaders(n: int = 192, batch_size: int = 32, dtype: torch.dtype = torch.float32) -> tuple[DataLoader, DataLoader]:
    """A shuffled training loader (its shuffling draws from the global RNG) and a validation loader."""
    train = DataLoader(make_dataset(n, seed=0, dtype=dtype), batch_size=batch_size, shuffle=True)
    val = DataLoader(make_dataset(64, seed=1, dtype=dtype), batch_size=64)
    return train, val


def make_trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    """A quiet single-process CPU Trainer writing under ``tmp_path`` (no logger or checkpoints unless asked)."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False,
        "default_root_dir": str(tmp_path),
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def read_metrics_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a CSVLogger ``metrics.csv``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def column(rows: list[dict[str, str]], key: str) -> list[tuple[str, float]]:
    """``(step, value)`` of every row where ``key`` is filled."""
    return [(r["step"], float(r[key])) for r in rows if r.get(key, "") != ""]
