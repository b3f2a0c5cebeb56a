"""lightning_curvprobe: watch the loss landscape stabilise while a Lightning model trains."""

from lightning_curvprobe import functional

__all__ = ["functional"]
__version__ = "0.1.0"
