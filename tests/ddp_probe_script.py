"""Run by tests/test_integration.py in a subprocess: a 2-process CPU DDP fit with the callback.

Lightning's DDP launcher re-executes this script for rank 1, so it must be a standalone script (not pytest).
Usage: python tests/ddp_probe_script.py OUT_DIR [ESTIMATOR] [nan-added-rank1 | by-rows | reuse | resume ...]
``reuse``: 3 epochs refreshing every 2nd (the middle one reuses the kept subspace). ``resume``: also 1 epoch, a
checkpoint, and the 2nd epoch resumed from it.
With ``nan-added-rank1`` the target of an added sample that only rank 1 holds is NaN (its loss is not finite there).
Each rank writes OUT_DIR/rank{r}.pt with its logged history, the probe's subspace and the final weights.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _integration_models import TinyRegressor, make_regression  # noqa: E402

from lightning_curvprobe import CurvatureStabilityCallback  # noqa: E402


def main() -> None:
    out = sys.argv[1]
    estimator = sys.argv[2] if len(sys.argv) > 2 else "gaussian_moment"
    torch.set_num_threads(1)
    L.seed_everything(0)
    train, probe = make_regression()
    if "by-rows" in sys.argv[3:]:  # measure on each rank's rows of U (the path of many ranks) instead of gathering U
        import lightning_curvprobe._sharding

        lightning_curvprobe._sharding.ROW_MEASUREMENT = "always"
    if len(sys.argv) > 3 and sys.argv[3] == "nan-added-rank1":
        probe[1][17] = float("nan")  # added samples 16..19: rank r holds 16 + r and 18 + r
    reuse = "reuse" in sys.argv[3:]
    cb, trainer, model = fit(probe, train, estimator, 3 if reuse else 2, reuse)
    saved = cb.state_dict()  # collective: the subspace's rows are gathered on rank 0
    result = {
        "history": cb.history,
        "basis": cb._basis,
        "saved_basis": saved["basis"],
        "basis_rows": saved["basis_rows"],
        "eigenvalues": cb._eigenvalues,
        "by_rows": cb._rows.by_rows,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "world": trainer.world_size,
    }
    if "resume" in sys.argv[3:]:  # 1 epoch, a checkpoint, and the second epoch resumed from it
        ckpt = os.path.join(out, "one_epoch.ckpt")
        fit(probe, train, estimator, 1, reuse, save=ckpt)
        resumed, _, _ = fit(probe, train, estimator, 2, reuse, ckpt_path=ckpt)
        result["resumed_history"] = resumed.history
        result["resumed_basis"] = resumed._basis
    torch.save(result, os.path.join(out, f"rank{trainer.global_rank}.pt"))


def fit(probe, train, estimator: str, epochs: int, reuse: bool, save: str | None = None, ckpt_path: str | None = None):
    L.seed_everything(0)
    model = TinyRegressor()
    cb = CurvatureStabilityCallback(
        num_eigenvectors=4,
        sigma=0.05,
        num_probe_samples=16,
        num_added_samples=4,
        estimator=estimator,
        num_mc_samples=16,
        probe_data=probe,
        tol=1e-10,
        loss_fn=TinyRegressor.mean_loss,
        refresh_every_n_epochs=2 if reuse else 1,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        precision="64-true",
        max_epochs=epochs,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loaders = torch.utils.data.DataLoader(train, batch_size=16), torch.utils.data.DataLoader(train, batch_size=64)
    trainer.fit(model, *loaders, ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return cb, trainer, model


if __name__ == "__main__":
    main()
