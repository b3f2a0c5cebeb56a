"""``StabilityEarlyStopping``: Lightning's ``EarlyStopping`` that counts only the epochs at which the probe measured."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping
from typing_extensions import override

from lightning_curvprobe.callback import CurvatureStabilityCallback


class StabilityEarlyStopping(EarlyStopping):
    r"""Early stopping on a probe value that ignores the validation epochs at which the probe did not measure.

    With ``max_overhead`` the probe skips some validation epochs and logs nothing then, so
    ``trainer.callback_metrics`` still holds the last measured value; Lightning's ``EarlyStopping`` would count each
    such stale value as "no improvement" and stop ``patience`` validation epochs after the last real one. This
    subclass checks only at epochs where ``probe`` measured, so ``patience`` counts probes. Every other argument is
    ``EarlyStopping``'s (``monitor`` defaults to ``"<log_prefix>/delta2"``, ``mode`` to ``"min"``).

    Args:
        probe: the :class:`CurvatureStabilityCallback` whose values are monitored (it must run in the same Trainer).
        monitor: the key to monitor; default ``f"{probe.log_prefix}/delta2"``.
        mode: ``"min"`` or ``"max"``.
        kwargs: passed to ``EarlyStopping`` (``patience``, ``min_delta``, ``check_finite``, ...).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> probe = CurvatureStabilityCallback(num_eigenvectors=4, max_overhead=0.05)
        >>> stop = StabilityEarlyStopping(probe, patience=3)
        >>> stop.monitor
        'curvprobe/delta2'
        >>> trainer = Trainer(callbacks=[probe, stop], logger=False, enable_checkpointing=False)
    """

    def __init__(
        self, probe: CurvatureStabilityCallback, monitor: str | None = None, mode: str = "min", **kwargs: Any
    ) -> None:
        if not isinstance(probe, CurvatureStabilityCallback):
            raise TypeError(f"`probe` must be a CurvatureStabilityCallback, got {type(probe).__name__}.")
        super().__init__(monitor=monitor or f"{probe.log_prefix}/delta2", mode=mode, **kwargs)
        self.probe = probe

    def _measured_now(self, trainer: Trainer) -> bool:
        return self.probe.measured_epoch == trainer.current_epoch

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measured_now(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._measured_now(trainer):
            super().on_validation_end(trainer, pl_module)
