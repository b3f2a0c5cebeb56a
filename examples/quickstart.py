"""Quickstart: Δ₂^(D) live in TensorBoard for a small classifier, with early stopping on it.

Trains a small MLP on synthetic data (nothing is downloaded), adds one CurvatureStabilityCallback to the Trainer and
stops when the curvature-aligned stability criterion stops improving. About a minute on a 2-core CPU.

    python examples/quickstart.py [--max-epochs 30] [--out curvprobe_logs]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_curvprobe import CurvatureStabilityCallback  # noqa: E402


def make_data(n: int = 2048, dim: int = 20, classes: int = 4, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian blobs with label noise: learnable, but not trivially separable."""
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    flip = torch.rand(n, generator=g) < 0.05
    y = torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)
    split = int(0.8 * n)
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


class Classifier(L.LightningModule):
    def __init__(self, dim: int = 20, hidden: int = 64, classes: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, classes),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", torch.nn.functional.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--out", default="curvprobe_logs")
    args = parser.parse_args()

    L.seed_everything(0)
    train, val = make_data()
    model = Classifier()
    probe = CurvatureStabilityCallback(num_eigenvectors=10, sigma=1e-2, num_probe_samples=64, num_added_samples=4)
    stop = EarlyStopping(monitor="curvprobe/delta2", mode="min", patience=4)
    logger = TensorBoardLogger(args.out, name="quickstart")
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[probe, stop],
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(
        model,
        DataLoader(train, batch_size=64, shuffle=True),
        DataLoader(val, batch_size=256),
    )

    print("\nepoch  delta2      delta1      lambda_max  overlap  hvps  quad_err")
    for h in probe.history:
        print(
            f"{int(h['epoch']):5d}  {h['delta2']:.3e}  {h['delta1']:.3e}  {h['lambda_max']:10.4f}  "
            f"{h['subspace_overlap']:7.3f}  {int(h['hvps']):4d}  {h['quadratic_error']:.2e}"
        )
    stopped = f"EarlyStopping stopped at epoch {trainer.current_epoch}" if stop.stopped_epoch else "ran all epochs"
    print(f"\n{stopped}. TensorBoard logs: {logger.log_dir}")
    print(f"View them with:  tensorboard --logdir {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
