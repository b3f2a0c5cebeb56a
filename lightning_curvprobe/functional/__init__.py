"""Plain-PyTorch core of lightning_curvprobe (no Lightning import): HVPs, the eigensolver and the estimators."""

from lightning_curvprobe.functional.curve import (
    SigmaSelection,
    StabilityCurve,
    delta2_full_space,
    select_sigma,
    stability_curve,
)
from lightning_curvprobe.functional.estimators import (
    delta2_gaussian_moment,
    increment_coefficients,
    quadratic_surrogate,
)
from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction, NonFiniteProbeError
from lightning_curvprobe.functional.lanczos import EigenResult, top_eigenpairs
from lightning_curvprobe.functional.probe import ProbeResult, probe_stability

__all__ = [
    "EigenResult",
    "HessianOperator",
    "ModelFunction",
    "NonFiniteProbeError",
    "ProbeResult",
    "SigmaSelection",
    "StabilityCurve",
    "delta2_full_space",
    "delta2_gaussian_moment",
    "increment_coefficients",
    "probe_stability",
    "quadratic_surrogate",
    "select_sigma",
    "stability_curve",
    "top_eigenpairs",
]
