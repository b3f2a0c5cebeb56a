"""The pre-flight probe: every kind of evaluation the probe will make, once, at the initial weights.

Run before the first training step, it turns a model or loss that the probe cannot handle into a configuration error
there, instead of a failure after a full epoch: one loss, one gradient, one Hessian-vector product of the chosen kind
(under ``hvp="auto"`` this is where a model without double backward switches to finite differences), one batched
per-sample call where the batched path is used, and a check that the loss is a per-sample mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_curvprobe.functional._batch import _batch_size, _slice_batch
from lightning_curvprobe.functional.hvp import (
    HessianOperator,
    ModelFunction,
    NonFiniteProbeError,
    _check_loss,
    _probe_mode,
    per_sample_statistics,
)

#: Largest relative deviation of ``L(all) / mean of L(halves)`` from 1 that still counts as a per-sample mean.
MEAN_TOLERANCE = 1e-3
#: Finite-difference products at steps ε and ε/2 that agree this well (relative) are trusted to judge autograd's.
FD_CONSISTENCY = 0.05
#: An autograd product further than this (relative) from trusted finite differences is taken to be wrong.
AUTOGRAD_DISAGREEMENT = 0.25


@dataclass
class PreflightReport:
    """What the pre-flight found.

    Attributes:
        hvp_kind: the kind of product the probe will use, ``"autograd"`` or ``"finite_difference"``.
        fallback_reason: why ``hvp="auto"`` fell back to finite differences (None otherwise).
        mean_ratio: ``L(base) / ((k_1 L(half_1) + k_2 L(half_2)) / k)``: 1 for a per-sample mean loss, about 2 for a
            sum, other values for a token-weighted mean over padded sequences (NaN with fewer than 2 base samples).
        difference_warning: on a sharded model, why its finite-difference products look unreliable (two steps
            disagree by more than :data:`FD_CONSISTENCY`), None if they agree.
        autograd_warning: under ``hvp="autograd"``, why the double backward looks incomplete (None if it does not);
            ``"auto"`` falls back to finite differences instead.
    """

    hvp_kind: str
    fallback_reason: str | None
    mean_ratio: float
    autograd_warning: str | None = None
    difference_warning: str | None = None

    @property
    def is_mean(self) -> bool:
        """Whether the loss behaves as a per-sample mean (within :data:`MEAN_TOLERANCE`)."""
        return math.isnan(self.mean_ratio) or abs(self.mean_ratio - 1.0) <= MEAN_TOLERANCE


def preflight(fn: ModelFunction, base_batch: Any, added_batch: Any, *, seed: int = 0) -> PreflightReport:
    """One loss, gradient and Hessian-vector product on ``base_batch``, one batched per-sample call on ``added_batch``.

    The model, its ``.grad``, its modes and the global RNG are left untouched (the probe vector comes from a private
    generator seeded ``seed``). Errors propagate: a detached loss or a non-scalar loss raises ``ValueError``, a model
    without second derivatives under ``hvp="autograd"`` raises ``RuntimeError`` naming the fix.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> mean = ModelFunction(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
        >>> preflight(mean, (x, y), (x[:1], y[:1])).is_mean
        True
        >>> total = ModelFunction(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1], reduction="sum"))
        >>> round(preflight(total, (x, y), (x[:1], y[:1])).mean_ratio, 6)
        2.0
    """
    k = _batch_size(base_batch, "base_batch")
    with torch.inference_mode(False), _probe_mode(fn.model):
        op = HessianOperator(fn, base_batch, where="the base samples (pre-flight)")
        v = torch.randn(fn.num_params, generator=torch.Generator().manual_seed(seed), dtype=fn.dtype)
        v = (v / v.norm()).to(fn.device)
        hv = op.matvec(v)
        warning = (
            _check_double_backward(op, v, hv) if fn.hvp_kind == "autograd" and fn.hvp != "finite_difference" else None
        )
        if warning is not None and fn.hvp == "auto":
            fn.fall_back(RuntimeError(warning))
            warning = None
        if _batch_size(added_batch) > 0 and fn.hvp_kind == "autograd":
            per_sample_statistics(fn, _slice_batch(added_batch, 0, 1), v.to(fn.device)[:, None] / v.norm())
        ratio = float("nan")
        if k >= 2:
            with torch.no_grad():
                w0 = fn.current()
                half = k // 2
                parts = [_slice_batch(base_batch, 0, half), _slice_batch(base_batch, half, k)]
                losses = [_check_loss(fn.loss(w0, fn.prepare(p)), "half of the base samples") for p in parts]
                mean = (half * float(losses[0]) + (k - half) * float(losses[1])) / k
                ratio = float(op.loss) / mean if mean != 0 else float("nan")
    return PreflightReport(
        hvp_kind=fn.hvp_kind, fallback_reason=fn.fallback_reason, mean_ratio=ratio, autograd_warning=warning
    )


def _check_double_backward(op: HessianOperator, v: Tensor, hv: Tensor) -> str | None:
    """Why autograd's product is clearly not the Hessian's, or None.

    A double backward can be silently incomplete: a ``once_differentiable`` autograd Function in the middle of a
    model contributes nothing to it, with no error. Two finite-difference products (steps ε and ε/2, four gradient
    evaluations) decide: when they agree with each other to :data:`FD_CONSISTENCY` (no kink crossed, rounding small)
    and autograd's product differs from them by more than :data:`AUTOGRAD_DISAGREEMENT`, autograd is wrong. Where the
    finite differences are themselves unreliable (piecewise-linear activations, rounding) nothing is decided.
    """
    try:
        d1 = op._difference_product(v)
        d2 = op._difference_product(v, step_factor=0.5)
    except NonFiniteProbeError:  # the loss is not finite a step away: nothing can be judged
        return None
    scale = max(float(d2.norm()), torch.finfo(d2.dtype).tiny)
    consistency = float((d1 - d2).norm()) / scale
    disagreement = float((hv - d2).norm()) / scale
    if consistency < FD_CONSISTENCY and disagreement > AUTOGRAD_DISAGREEMENT:
        return (
            f"autograd's Hessian-vector product differs from finite differences by {disagreement:.2g} (relative), "
            f"while two finite-difference steps agree to {consistency:.2g}: the model's double backward is "
            "incomplete (e.g. a once_differentiable autograd Function)"
        )
    return None
