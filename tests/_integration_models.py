"""Small float64 Lightning modules and data shared by the integration tests and the DDP script."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import TensorDataset


def make_regression(
    n: int = 128, dim: int = 6, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[TensorDataset, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    x, y = x.to(dtype), y.to(dtype)
    probe = (x[:24].clone(), y[:24].clone())
    return TensorDataset(x, y), probe


class TinyRegressor(L.LightningModule):
    def __init__(self, dim: int = 6, hidden: int = 12, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))

    @staticmethod
    def mean_loss(module: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(module.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.mean_loss(self, batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.mean_loss(self, batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RegressionData(L.LightningDataModule):
    """A datamodule for LightningCLI tests (train and validation loaders over the same small set)."""

    def __init__(self, n: int = 96, batch_size: int = 16) -> None:
        super().__init__()
        self.n = n
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        self.train, _ = make_regression(n=self.n)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=self.batch_size)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=64)
