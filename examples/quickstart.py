"""Quickstart: Δ₂^(D) live in TensorBoard for a small network, with early stopping on it.

Fits a small MLP (with BatchNorm and Dropout) to a smooth synthetic regression target (nothing is downloaded), adds
one CurvatureStabilityCallback to the Trainer and stops once the curvature-aligned stability criterion has stopped
improving. About a minute on a 2-core CPU.

    python examples/quickstart.py [--max-epochs 40] [--out curvprobe_logs]
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


def make_data(n: int = 2048, dim: int = 8, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A smooth, noise-free target: the per-sample losses shrink as the network fits it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 2, generator=g)
    y = torch.sin(x @ w) + 0.5 * x[:, :2] ** 2 - 0.5
    split = int(0.8 * n)
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


class Regressor(L.LightningModule):
    def __init__(self, dim: int = 8, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden),
            torch.nn.BatchNorm1d(hidden),
            torch.nn.GELU(),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(hidden, hidden),
            torch.nn.GELU(),
            torch.nn.Linear(hidden, 2),
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=40)
    parser.add_argument("--out", default="curvprobe_logs")
    args = parser.parse_args()

    L.seed_everything(0)
    train, val = make_data()
    # The callback: top-10 Hessian eigenspace of the loss on 64 fixed training samples, refreshed (warm-started)
    # at every validation epoch; Δ₂^(D) averaged over 8 candidate added samples, probed at σ = 1e-2.
    probe = CurvatureStabilityCallback(num_eigenvectors=10, sigma=1e-2, num_probe_samples=64, num_added_samples=8)
    # Stop after 5 validation epochs without a new minimum of Δ₂^(D). This shows the mechanism; the stopping study
    # (examples/stopping_study/report.md) finds val_loss the better gate where a validation set exists.
    stop = EarlyStopping(monitor="curvprobe/delta2", mode="min", patience=5)
    logger = TensorBoardLogger(args.out, name="quickstart")
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        callbacks=[probe, stop],
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=10,
    )
    trainer.fit(model := Regressor(), DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256))

    print("\nepoch  delta2     ± stderr   delta1     lambda_max  overlap  hvps  quad_err")
    for h in probe.history:
        print(
            f"{int(h['epoch']):5d}  {h['delta2']:.3e}  {h['delta2_stderr']:.1e}  {h['delta1']:.3e}  "
            f"{h['lambda_max']:10.4f}  {h['subspace_overlap']:7.3f}  {int(h['hvps']):4d}  {h['quadratic_error']:.1e}"
        )
    if stop.stopped_epoch:
        print(f"\nEarlyStopping stopped the fit at epoch {trainer.current_epoch} (val_loss "
              f"{float(trainer.callback_metrics['val_loss']):.4f}).")
    else:
        print(f"\nRan all {args.max_epochs} epochs (val_loss {float(trainer.callback_metrics['val_loss']):.4f}).")
    print(f"TensorBoard logs: {logger.log_dir}")
    print(f"View them with:   tensorboard --logdir {os.path.abspath(args.out)}")
    del model


if __name__ == "__main__":
    main()
