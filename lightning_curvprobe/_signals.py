r"""What a probe's :math:`\Delta_2^{(D)}` is made of, and a gating signal that does not depend on ``k``.

At small :math:`\sigma` the criterion is almost all :math:`\operatorname{mean}_j a_j^2`, the squared spread of the
added samples' losses around the base mean, divided by :math:`(k+1)^2`: the curvature-aligned probe then adds little
to what :math:`\Delta_1` already says. :func:`explain` makes that visible at every probe by splitting the
Gaussian-moment closed form into its three parts (SPEC §1):

.. math::
    \mathrm{GM}_j = \underbrace{a_j^2}_{\text{a2}}
    + \underbrace{\sigma^2\lVert c_j\rVert^2}_{\text{gradient}}
    + \underbrace{a_j\sigma^2\operatorname{tr}B_j + \tfrac{\sigma^4}{4}\bigl(2\operatorname{tr}(B_j^2)
      + (\operatorname{tr}B_j)^2\bigr)}_{\text{curvature}}

No Lightning import: the callback calls :func:`explain` on the metric's ``details``; anyone else can too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from lightning_curvprobe._checks import _check_int, _check_positive_float

TERM_KEYS = ("delta2_terms/a2", "delta2_terms/gradient", "delta2_terms/curvature")
"""Keys of the three Gaussian-moment terms in :func:`explain`'s result (log them under the callback's prefix)."""

SIGNAL_KEYS = (*TERM_KEYS, "curvature_share", "discrepancy", "delta2_rel_peak")
"""Every key :func:`explain` returns, in a fixed order."""


def gaussian_moment_terms(a: Tensor, c: Tensor, B: Tensor, sigma: float) -> tuple[Tensor, Tensor, Tensor]:
    r"""The three parts of the Gaussian-moment criterion, per added sample.

    For :math:`z \sim \mathcal N(0, \sigma^2 I_D)` and the quadratic model
    :math:`q_j(z) = a_j + c_j^\top z + \tfrac12 z^\top B_j z`,

    .. math::
        \mathbb E\,q_j(z)^2 = a_j^2 + \sigma^2\lVert c_j\rVert^2
        + \Bigl[a_j\sigma^2\operatorname{tr}B_j + \tfrac{\sigma^4}{4}\bigl(2\operatorname{tr}(B_j^2)
        + (\operatorname{tr}B_j)^2\bigr)\Bigr],

    returned as ``(a2, gradient, curvature)`` in that order; their sum is
    :func:`~lightning_curvprobe.functional.delta2_gaussian_moment` up to rounding. ``a2`` is the squared increment at
    :math:`w_0` itself, ``gradient`` what the probe adds through the slope of the increment along :math:`U`, and
    ``curvature`` what it adds through the increment's curvature :math:`B_j` (the cross term with :math:`a_j` can be
    negative, so ``curvature`` can be too). ``B`` is symmetrised first.

    Args:
        a: :math:`a_j`, shape ``(m,)`` (or any batch shape ``(...)``).
        c: :math:`c_j`, shape ``(m, D)``.
        B: :math:`B_j`, shape ``(m, D, D)``.
        sigma: probe scale :math:`\sigma > 0`.

    Returns:
        ``(a2, gradient, curvature)``, each of shape ``(m,)``.

    Example:
        >>> import torch
        >>> a, c, B = torch.tensor([1.0]), torch.tensor([[2.0, 0.0]]), torch.diag(torch.tensor([1.0, 3.0]))[None]
        >>> gaussian_moment_terms(a, c, B, sigma=1.0)  # 1, 4, 1·4 + (2·10 + 16)/4
        (tensor([1.]), tensor([4.]), tensor([13.]))
    """
    sigma = _check_positive_float("sigma", sigma)
    s2 = sigma * sigma
    B = 0.5 * (B + B.transpose(-1, -2))
    tr = B.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr_sq = (B * B).sum((-2, -1))  # tr(B²) for symmetric B
    a2 = a * a
    gradient = s2 * (c * c).sum(-1)
    curvature = a * s2 * tr + 0.25 * s2 * s2 * (2 * tr_sq + tr * tr)
    return a2, gradient, curvature


def explain(
    details: Mapping[str, Tensor], sigma: float, num_probe_samples: int, peak_delta2: float | None = None
) -> dict[str, float]:
    r"""The values that say what a probe's :math:`\Delta_2^{(D)}` is made of, ready to log.

    From the metric's ``details`` (``a`` ``(m,)``, ``c`` ``(m, D)``, ``B`` ``(m, D, D)`` and ``delta2``; see
    :class:`~lightning_curvprobe.CurvatureStability`), with ``k = num_probe_samples``:

    - ``delta2_terms/a2`` :math:`= \operatorname{mean}_j a_j^2`, the squared increment at :math:`w_0`
      (:math:`a_j = (\ell_j - L_k)/(k+1)`): how far the added samples' losses lie from the base mean.
    - ``delta2_terms/gradient`` :math:`= \operatorname{mean}_j \sigma^2\lVert c_j\rVert^2`: the slope of the increment
      inside the top-``D`` subspace.
    - ``delta2_terms/curvature``
      :math:`= \operatorname{mean}_j \bigl[a_j\sigma^2\operatorname{tr}B_j
      + \tfrac{\sigma^4}{4}(2\operatorname{tr}B_j^2 + (\operatorname{tr}B_j)^2)\bigr]`: the increment's curvature.
    - ``curvature_share`` :math:`= (\Delta_2^{(D)} - \operatorname{mean}_j a_j^2)/\Delta_2^{(D)}`: the fraction of the
      logged value that the probe adds to :math:`\operatorname{mean}_j a_j^2`; near 0 means the curve is the spread of
      per-sample losses and nothing else (the usual case at :math:`\sigma \le 10^{-2}`).
    - ``discrepancy`` :math:`= (k+1)^2\,\Delta_2^{(D)}`: the criterion per added sample, free of the base-set size (the
      theory's :math:`(k+1)^{-2}` decay is divided out), so that runs with different ``num_probe_samples`` compare;
      :math:`\sqrt{\cdot}` is about the RMS gap :math:`\ell_j - L_k` in loss units.
    - ``delta2_rel_peak`` :math:`= \Delta_2^{(D)} / \max(\text{peak}, \Delta_2^{(D)})`: the criterion as a fraction of
      the largest value it has reached in this run (1 at a new peak), free of ``k`` and of the loss's units. This is
      the gating signal the stopping study (``examples/stopping_study/report.md``) recommends over ``delta2`` itself:
      :math:`\Delta_2^{(D)}` usually *rises* over the first epochs (the per-sample losses spread out) before it falls,
      so a rule that waits for a plateau of ``delta2`` from epoch 0 stops in that hump; a threshold on the fraction of
      the peak does not. It says that the per-sample training losses have converged, not that the model has started
      to overfit.

    With ``estimator="gaussian_moment"`` the three terms sum to ``delta2``. With ``"quadratic_mc"`` and
    ``"direct_mc"`` they are still the Gaussian-moment decomposition of the quadratic surrogate (its exact
    expectation, which quadratic Monte Carlo estimates with sampling noise, and direct Monte Carlo approximates only
    inside the quadratic regime), while ``curvature_share`` and ``discrepancy`` use the estimator's own ``delta2``.
    Missing coefficients (a probe that logged NaN) or a non-finite ``delta2`` give NaN for every key;
    ``curvature_share`` and ``delta2_rel_peak`` are NaN when ``delta2`` (and the peak) is 0.

    Args:
        details: the metric's ``details`` after ``compute()``, holding at least ``a``, ``c``, ``B`` and ``delta2``.
        sigma: the probe scale the metric used.
        num_probe_samples: ``k``, the number of base samples.
        peak_delta2: the largest finite ``delta2`` of the earlier probes of this run (``None`` at the first probe).

    Returns:
        A dict of Python floats with the keys :data:`SIGNAL_KEYS`.

    Example:
        >>> import torch
        >>> from lightning_curvprobe.functional import delta2_gaussian_moment
        >>> a = torch.tensor([0.02, -0.01], dtype=torch.float64)
        >>> c = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
        >>> B = torch.diag_embed(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> delta2 = delta2_gaussian_moment(a, c, B, 0.01).mean()
        >>> out = explain({"a": a, "c": c, "B": B, "delta2": delta2}, sigma=0.01, num_probe_samples=63)
        >>> round(out["delta2_terms/a2"], 12), round(out["delta2_terms/gradient"], 12)
        (0.00025, 2.5e-05)
        >>> abs(sum(out[key] for key in TERM_KEYS) - float(delta2)) < 1e-15
        True
        >>> round(out["curvature_share"], 4), round(out["discrepancy"], 6)
        (0.096, 1.132739)
        >>> round(explain({"a": a, "c": c, "B": B, "delta2": delta2}, 0.01, 63, peak_delta2=0.01)["delta2_rel_peak"], 6)
        0.027655
    """
    sigma = _check_positive_float("sigma", sigma)
    k = _check_int("num_probe_samples", num_probe_samples, minimum=1)
    nan = {key: math.nan for key in SIGNAL_KEYS}
    if not all(name in details for name in ("a", "c", "B", "delta2")):
        return nan
    delta2 = float(details["delta2"])
    if not math.isfinite(delta2):
        return nan
    a2, gradient, curvature = gaussian_moment_terms(details["a"], details["c"], details["B"], sigma)
    mean_a2 = float(a2.mean())
    peak = delta2 if peak_delta2 is None or not math.isfinite(peak_delta2) else max(float(peak_delta2), delta2)
    return {
        "delta2_terms/a2": mean_a2,
        "delta2_terms/gradient": float(gradient.mean()),
        "delta2_terms/curvature": float(curvature.mean()),
        "curvature_share": (delta2 - mean_a2) / delta2 if delta2 != 0 else math.nan,
        "discrepancy": (k + 1) ** 2 * delta2,
        "delta2_rel_peak": delta2 / peak if peak > 0 else math.nan,
    }
