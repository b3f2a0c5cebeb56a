"""lightning_curvprobe: watch the loss landscape stabilise while a Lightning model trains.

Public names: :class:`CurvatureStabilityCallback` (the Lightning callback), :class:`CurvatureStability` (the
torchmetrics metric) and :mod:`lightning_curvprobe.functional` (plain PyTorch, no Lightning import). The callback and
the metric are imported lazily, so ``import lightning_curvprobe.functional`` does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_curvprobe import functional

if TYPE_CHECKING:
    from lightning_curvprobe.callback import CurvatureStabilityCallback
    from lightning_curvprobe.early_stopping import StabilityEarlyStopping
    from lightning_curvprobe.metric import CurvatureStability

__all__ = ["CurvatureStability", "CurvatureStabilityCallback", "StabilityEarlyStopping", "functional"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "CurvatureStabilityCallback":
        from lightning_curvprobe.callback import CurvatureStabilityCallback

        return CurvatureStabilityCallback
    if name == "CurvatureStability":
        from lightning_curvprobe.metric import CurvatureStability

        return CurvatureStability
    if name == "StabilityEarlyStopping":
        from lightning_curvprobe.early_stopping import StabilityEarlyStopping

        return StabilityEarlyStopping
    raise AttributeError(f"module 'lightning_curvprobe' has no attribute {name!r}")
