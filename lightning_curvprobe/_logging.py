"""Logging of the callback's values: scalars through ``LightningModule.log``, spectrum and pictures to TensorBoard."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_curvprobe.functional.curve import StabilityCurve


class ProbeLogger:
    """Logs one probe's values under ``<prefix>/<key>`` to every logger of the Trainer.

    Args:
        prefix: the key prefix (the callback's ``log_prefix``).
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._warned_plot = False

    def log(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        values: dict[str, float],
        eigenvalues: Tensor | None,
        curve: StabilityCurve | None,
    ) -> None:
        """Log ``values`` as ``<prefix>/<key>`` (epoch level); the spectrum and pictures to TensorBoard at rank 0."""
        dtype = eigenvalues.dtype if eigenvalues is not None else torch.float32
        with warnings.catch_warnings():
            # logger=True keeps the values in trainer.validate()'s results; without a logger Lightning would warn once
            # per key and epoch that none is configured
            warnings.filterwarnings("ignore", message=r".*but have no logger configured.*")
            for key, value in values.items():
                pl_module.log(
                    f"{self.prefix}/{key}",
                    torch.tensor(value, dtype=dtype),
                    on_step=False,
                    on_epoch=True,
                    prog_bar=key == "delta2",
                    logger=True,
                    # identical on every rank already; the (exact) mean only silences Lightning's DDP advice
                    sync_dist=trainer.world_size > 1,
                )
        if trainer.is_global_zero and eigenvalues is not None and not math.isnan(values["delta2"]):
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is not None and type(logger).__name__ == "TensorBoardLogger":
                    # the step Lightning gives the epoch's scalars (the last optimizer step), so the two line up
                    step = max(trainer.global_step - 1, 0)
                    experiment.add_histogram(f"{self.prefix}/eigenvalues", eigenvalues.float().cpu(), step)
                    if values.get("hvps", 0) > 0:  # a refresh: draw the pictures
                        self._figures(experiment, step, eigenvalues, curve)

    def _figures(self, experiment: Any, step: int, eigenvalues: Tensor, curve: StabilityCurve | None) -> None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned_plot:
                rank_zero_info(
                    "CurvatureStabilityCallback: install matplotlib (pip install 'lightning-curvprobe[plot]') to get "
                    "the spectrum and sample-growth images in TensorBoard; skipping them."
                )
                self._warned_plot = True
            return
        eig = eigenvalues.detach().double().cpu()
        fig = Figure(figsize=(4.5, 3.2), dpi=100)
        ax = fig.add_subplot()
        ax.plot(range(1, len(eig) + 1), eig.tolist(), "o-")
        ax.set_xlabel("index i")
        ax.set_ylabel("Hessian eigenvalue λ_i")
        ax.set_title(f"top-{len(eig)} spectrum")
        fig.tight_layout()
        experiment.add_figure(f"{self.prefix}/spectrum", fig, step)
        if curve is not None:
            fig = Figure(figsize=(4.5, 3.2), dpi=100)
            ax = fig.add_subplot()
            kp1 = [k + 1 for k in curve.sample_sizes]
            for name, vals, slope, icpt in (
                ("Δ₂^(D)", curve.delta2, curve.decay_exponent, curve.intercept),
                ("Δ₁", curve.delta1, curve.delta1_exponent, curve.delta1_intercept),
            ):
                line = ax.loglog(kp1, [float(v) for v in vals], "o", label=f"{name}: slope {slope:.2f}")[0]
                if math.isfinite(slope):
                    ax.loglog(kp1, [math.exp(icpt) * x**slope for x in kp1], "-", color=line.get_color())
            ax.set_xticks(kp1, labels=[str(x) for x in kp1])
            ax.set_xticks([], minor=True)
            ax.set_xlabel("k + 1")
            ax.set_ylabel("criterion")
            ax.legend(fontsize=8)
            fig.tight_layout()
            experiment.add_figure(f"{self.prefix}/sample_growth", fig, step)
