r"""Stability as a function of the data size, the choice of :math:`\sigma`, and the full-space :math:`\Delta_2`.

Three tools around :func:`~lightning_curvprobe.functional.probe_stability` (SPEC §1):

- :func:`stability_curve`: :math:`\Delta_2^{(D)}(k)` and :math:`\Delta_1(k)` on nested prefixes of the base set, the
  fitted decay exponents (theory: :math:`\Delta_1 \sim k^{-1}`, :math:`\Delta_2^{(D)} \sim k^{-2}`) and the extrapolated
  data size at which :math:`\Delta_2^{(D)}` falls below a tolerance.
- :func:`select_sigma`: the largest probe scale on a log grid at which the second-order model of :math:`L_k` along the
  curvature subspace is still valid.
- :func:`delta2_full_space`: the isotropic criterion :math:`\Delta_2 = \mathbb E\,\delta(w_0+\xi)^2`,
  :math:`\xi \sim \mathcal N(0, \sigma^2 I_N)`, by Monte Carlo (the reference the subspace criterion is compared with).

Plain PyTorch; the model is never modified (parameters, buffers, ``.grad``, train/eval flags and the global RNG are left
as they were).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvprobe._checks import _check_int, _check_positive_float
from lightning_curvprobe.functional._batch import _batch_size, _slice_batch
from lightning_curvprobe.functional.estimators import (
    _delta2_from_increments,
    _direct_increments,
    _gaussian_draws,
    _quadratic_error,
)
from lightning_curvprobe.functional.hvp import HessianOperator, LossFn, ModelFunction, _check_loss, _probe_mode
from lightning_curvprobe.functional.probe import _check_common, _criterion_in_subspace, _eigensolve

# ----------------------------------------------------------------------------------------------- power-law fit


def _fit_power_law(ks: Sequence[int] | Sequence[float], values: Sequence[float] | Tensor) -> tuple[float, float]:
    r"""Least-squares fit of :math:`\log v = b + p \log(k+1)`; returns ``(p, b)`` (slope, intercept).

    Only entries with a finite positive value enter the fit; with fewer than two of them (or all at the same ``k``)
    both are NaN.
    """
    vals = values.detach().double().cpu().tolist() if isinstance(values, Tensor) else [float(v) for v in values]
    if len(vals) != len(ks):
        raise ValueError(f"`values` must have one entry per k ({len(ks)}), got {len(vals)}.")
    pts = [(math.log(float(k) + 1.0), math.log(v)) for k, v in zip(ks, vals, strict=True) if math.isfinite(v) and v > 0]
    if len(pts) < 2:
        return math.nan, math.nan
    xm = math.fsum(x for x, _ in pts) / len(pts)
    ym = math.fsum(y for _, y in pts) / len(pts)
    sxx = math.fsum((x - xm) ** 2 for x, _ in pts)
    if sxx == 0:
        return math.nan, math.nan
    slope = math.fsum((x - xm) * (y - ym) for x, y in pts) / sxx
    return slope, ym - slope * xm


def _sufficient_k(slope: float, intercept: float, tolerance: float) -> int | None:
    r"""Smallest integer :math:`k \ge 1` with :math:`e^{b}(k+1)^{p} \le \mathrm{tol}`, or ``None``.

    For :math:`p < 0` this is :math:`\max(1, \lceil \exp((\log \mathrm{tol} - b)/p) \rceil - 1)`. ``None`` when the fit
    does not decrease (:math:`p \ge 0` or NaN) or the answer exceeds the float range.
    """
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope >= 0:
        return None
    log_x = (math.log(tolerance) - intercept) / slope  # log(k + 1) at which the fit equals the tolerance
    if log_x > 700.0:
        return None
    return max(1, math.ceil(math.exp(log_x)) - 1)


# ----------------------------------------------------------------------------------------------- stability curve


def _check_sample_sizes(sample_sizes: Any, base_size: int) -> list[int]:
    if isinstance(sample_sizes, (str, bytes)) or not isinstance(sample_sizes, Sequence):
        raise TypeError(f"`sample_sizes` must be a sequence of ints, got {type(sample_sizes).__name__}.")
    sizes: list[int] = []
    for s in sample_sizes:
        if isinstance(s, bool):
            raise TypeError(f"`sample_sizes` must hold ints, got {s!r} in {list(sample_sizes)}.")
        try:
            sizes.append(operator.index(s))
        except TypeError:
            raise TypeError(
                f"`sample_sizes` must hold ints, got {s!r} of type {type(s).__name__} in {list(sample_sizes)}."
            ) from None
    if not sizes:
        raise ValueError("`sample_sizes` must hold at least one base-set size, got an empty sequence.")
    if sizes[0] < 1:
        raise ValueError(f"`sample_sizes` must be positive, got {sizes}.")
    if any(sizes[i + 1] <= sizes[i] for i in range(len(sizes) - 1)):
        raise ValueError(f"`sample_sizes` must be strictly increasing, got {sizes}.")
    if sizes[-1] > base_size:
        raise ValueError(
            f"`sample_sizes` must not exceed the number of samples in `base_batch` ({base_size}), got {sizes}."
        )
    return sizes


@dataclass
class StabilityCurve:
    r"""Result of :func:`stability_curve`.

    Attributes:
        sample_sizes: the base-set sizes ``k`` probed, ascending.
        delta2: :math:`\Delta_2^{(D)}(k)` by the chosen estimator, shape ``(len(sample_sizes),)``.
        delta1: :math:`\Delta_1(k) = \operatorname{mean}_j |a_j|`, same shape.
        decay_exponent: slope ``p`` of the least-squares fit :math:`\log\Delta_2^{(D)} = b + p\log(k+1)` (theory:
            about ``-2``); NaN with fewer than two usable points.
        delta1_exponent: the same slope for :math:`\Delta_1` (theory: about ``-1``).
        intercept: ``b`` of the :math:`\Delta_2^{(D)}` fit.
        delta1_intercept: ``b`` of the :math:`\Delta_1` fit.
        sufficient_k: smallest integer ``k`` whose fitted :math:`\Delta_2^{(D)}` is at most ``tolerance``; ``None`` when
            no tolerance was given, the fitted curve does not decrease (slope ``>= 0`` or NaN) or the answer overflows.
        hvps: Hessian-vector products the eigensolver spent on each base prefix.
        eigenvalues: top-``D`` eigenvalues of each :math:`H_k`, descending.
        delta2_stderr: standard error of ``delta2`` over the added samples (NaN for one added sample).
        quadratic_error: validity of the quadratic model of :math:`L_k` at ``sigma`` per ``k`` (NaN if not measured).
        converged: whether each eigensolve met ``tol``.
        added_hvps: single-sample products spent on the added samples, all ``k`` together.
        tolerance: the tolerance ``sufficient_k`` refers to.
        basis: the last solve's basis; pass it as a later call's ``warm_start``.
    """

    sample_sizes: list[int]
    delta2: Tensor
    delta1: Tensor
    decay_exponent: float
    delta1_exponent: float
    intercept: float
    delta1_intercept: float
    sufficient_k: int | None
    hvps: list[int]
    eigenvalues: list[Tensor]
    delta2_stderr: Tensor
    quadratic_error: Tensor
    converged: list[bool]
    added_hvps: int = 0
    tolerance: float | None = None
    basis: Tensor | None = field(default=None, repr=False)

    def fitted_delta2(self, k: float) -> float:
        r"""The fitted :math:`\Delta_2^{(D)}(k) = e^{b}(k+1)^{p}` (NaN when the fit is undefined)."""
        log_value = self.intercept + self.decay_exponent * math.log(k + 1.0)
        return math.inf if log_value > 709.0 else math.exp(log_value)


def stability_curve(
    model: nn.Module,
    loss_fn: LossFn,
    base_batch: Any,
    added_batch: Any,
    *,
    sample_sizes: Sequence[int],
    num_eigenvectors: int = 10,
    sigma: float = 1e-3,
    estimator: str = "gaussian_moment",
    num_samples: int = 64,
    tol: float = 1e-3,
    tolerance: float | None = None,
    generator: torch.Generator | None = None,
    warm_start: Tensor | None = None,
    quadratic_error_samples: int = 0,
    hvp: str = "auto",
) -> StabilityCurve:
    r"""Stability criteria against the base-set size ``k``, their decay exponents and a sufficient data size.

    For every ``k`` in ``sample_sizes`` the base set is the prefix ``base_batch[:k]`` (so the sets are nested) and the
    added samples are the same ``added_batch``. Each ``k`` gets its own top-``D`` subspace of
    :math:`H_k = \nabla^2 L_k(w_0)`, the solve warm-started from the previous ``k``'s basis, and the values
    :math:`\Delta_2^{(D)}(k)` and :math:`\Delta_1(k)` exactly as :func:`probe_stability` computes them on that prefix.
    The decay is fitted by least squares on log-log axes,

    .. math::
        \log \Delta(k) \approx b + p \log(k+1),

    for :math:`\Delta_2^{(D)}` (``decay_exponent``, ``intercept``; theory: :math:`p \approx -2`, from
    :math:`\Delta_2^{(D)}(k+1) \le C(\sigma, D)/(k+1)^2`) and for :math:`\Delta_1` (``delta1_exponent``; theory
    :math:`p \approx -1`). Non-positive values are left out of the fit. With ``tolerance`` the fit is extrapolated to
    the smallest integer ``k`` with :math:`e^b (k+1)^p \le \mathrm{tolerance}`:

    .. math::
        k^\ast = \max\Bigl(1,\ \Bigl\lceil \exp\frac{\log \mathrm{tolerance} - b}{p} \Bigr\rceil - 1\Bigr)
        \quad (p < 0),

    and ``None`` when the fitted curve does not decrease (:math:`p \ge 0`), so no data size is predicted to suffice.
    The Monte Carlo draws (``"quadratic_mc"``, ``"direct_mc"``, ``quadratic_error_samples``) are the same standard
    normals for every ``k`` (common random numbers), so the curve is smooth in ``k``.

    Cost: for each ``k``, one forward and backward pass on the prefix plus the eigensolver's HVPs on it (reported in
    ``hvps``), and ``D`` single-sample HVPs per added sample.

    Args:
        model: the network, evaluated at its current weights (in eval mode during the probe).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        base_batch: at least ``max(sample_sizes)`` base samples; prefixes of it are the base sets.
        added_batch: the ``m`` candidate added samples, shared by every ``k``.
        sample_sizes: strictly increasing positive base-set sizes, the largest at most the size of ``base_batch``.
            Fitting needs two or more; with one the exponents are NaN.
        num_eigenvectors: ``D``, the subspace dimension (``1 <= D < N``).
        sigma: the probe scale :math:`\sigma > 0`.
        estimator: ``"gaussian_moment"``, ``"quadratic_mc"`` or ``"direct_mc"``.
        num_samples: Monte Carlo draws for the MC estimators.
        tol: eigensolver tolerance, ``‖H u - λ u‖ <= tol · |λ_1|``.
        tolerance: target for :math:`\Delta_2^{(D)}`; gives ``sufficient_k``.
        generator: source of every random number (default: a generator seeded 0); the global RNG is not used.
        warm_start: a basis for the first solve (e.g. a previous result's ``basis``), shape ``(N, w)``.
        quadratic_error_samples: draws for ``quadratic_error`` per ``k`` (0 skips it; one forward pass each).
        hvp: ``"autograd"``, ``"finite_difference"`` or ``"auto"``, as in :func:`probe_stability`.

    Returns:
        A :class:`StabilityCurve`, values in the model's dtype.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(70, 3, generator=g, dtype=torch.float64)
        >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
        >>> y = y + 0.3 * torch.randn(70, 1, generator=g, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> _ = [torch.nn.init.zeros_(p) for p in model.parameters()]  # w0 = 0: deterministic example
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> curve = stability_curve(model, loss_fn, (x[:64], y[:64]), (x[64:], y[64:]), sample_sizes=[4, 16, 64],
        ...                         num_eigenvectors=2, tolerance=1e-6)
        >>> curve.delta2.shape, curve.decay_exponent < -1, curve.sufficient_k > 64
        (torch.Size([3]), True, True)
    """
    fn = ModelFunction(model, loss_fn, hvp=hvp)
    D, sigma, estimator, num_samples, tol = _check_common(
        num_eigenvectors, sigma, estimator, num_samples, tol, fn.num_params
    )
    _check_int("quadratic_error_samples", quadratic_error_samples, minimum=0)
    if tolerance is not None:
        tolerance = _check_positive_float("tolerance", tolerance)
    base_size = _batch_size(base_batch, "base_batch")
    m = _batch_size(added_batch, "added_batch")
    if m < 1:
        raise ValueError(f"`added_batch` must hold at least 1 sample, got {m}.")
    sizes = _check_sample_sizes(sample_sizes, base_size)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    draw_seed: int | None = None  # one seed for the probe draws of every k: common random numbers across the curve

    delta2, delta1, stderr, qerr = [], [], [], []
    hvps: list[int] = []
    eigenvalues: list[Tensor] = []
    converged: list[bool] = []
    added_hvps = 0
    basis = warm_start
    for k in sizes:
        base_k = _slice_batch(base_batch, 0, k)
        op = HessianOperator(fn, base_k, where=f"the base samples [:{k}]")
        eig = _eigensolve(op, D, tol=tol, warm_start=basis, generator=gen)
        if not eig.converged:
            warnings.warn(
                f"the eigensolver stopped at k={k} after {eig.hvps} Hessian-vector products without reaching tol={tol} "
                f"(largest residual {float(eig.residuals.max()):.3g}); results use the current Ritz vectors.",
                RuntimeWarning,
                stacklevel=2,
            )
        basis = eig.basis
        if draw_seed is None:  # drawn after the first solve, which thus starts as probe_stability's would
            draw_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
        draw_gen = torch.Generator(device=gen.device).manual_seed(draw_seed)
        out, stats = _criterion_in_subspace(
            fn,
            op,
            base_k,
            added_batch,
            eig,
            sigma=sigma,
            estimator=estimator,
            num_samples=num_samples,
            quadratic_error_samples=quadratic_error_samples,
            generator=draw_gen,
        )
        delta2.append(out["delta2"])
        delta1.append(out["delta1"])
        stderr.append(out["delta2_stderr"])
        qerr.append(out["quadratic_error"])
        hvps.append(eig.hvps)
        eigenvalues.append(eig.eigenvalues)
        converged.append(eig.converged)
        added_hvps += stats.hvps

    d2, d1 = torch.stack(delta2), torch.stack(delta1)
    slope, intercept = _fit_power_law(sizes, d2)
    slope1, intercept1 = _fit_power_law(sizes, d1)
    return StabilityCurve(
        sample_sizes=sizes,
        delta2=d2,
        delta1=d1,
        decay_exponent=slope,
        delta1_exponent=slope1,
        intercept=intercept,
        delta1_intercept=intercept1,
        sufficient_k=None if tolerance is None else _sufficient_k(slope, intercept, tolerance),
        hvps=hvps,
        eigenvalues=eigenvalues,
        delta2_stderr=torch.stack(stderr),
        quadratic_error=torch.stack(qerr),
        converged=converged,
        added_hvps=added_hvps,
        tolerance=tolerance,
        basis=basis,
    )


# ----------------------------------------------------------------------------------------------- sigma selection


def _default_sigma_grid() -> list[float]:
    return [10.0 ** (-6.0 + 0.5 * i) for i in range(11)]  # 1e-6 ... 1e-1, two points per decade


def _check_grid(grid: Any) -> list[float]:
    if grid is None:
        return _default_sigma_grid()
    if isinstance(grid, Tensor):
        grid = grid.detach().cpu().tolist()
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) == 0:
        raise ValueError(f"`grid` must be a non-empty sequence of positive finite floats, got {grid!r}.")
    out = []
    for s in grid:
        ok = not isinstance(s, bool) and isinstance(s, (int, float)) and math.isfinite(s) and s > 0
        if not ok:
            raise ValueError(f"`grid` must hold positive finite floats, got {s!r} in {list(grid)}.")
        out.append(float(s))
    return sorted(set(out))


@dataclass
class SigmaSelection:
    """Result of :func:`select_sigma`.

    Attributes:
        sigma: the selected probe scale.
        grid: the candidate scales, ascending.
        errors: the quadratic-validity error at each grid point; NaN where not evaluated (after the early stop) or
            where the loss did not change at all.
        valid: whether ``sigma`` meets ``max_quadratic_error``; ``False`` means no grid point did and ``sigma`` is the
            smallest grid value.
        index: position of ``sigma`` in ``grid``.
        forward_passes: loss evaluations at perturbed points (besides the one forward and backward pass at ``w0``).
    """

    sigma: float
    grid: list[float]
    errors: list[float]
    valid: bool
    index: int
    forward_passes: int


def select_sigma(
    model: nn.Module,
    loss_fn: LossFn,
    base_batch: Any,
    eigenvectors: Tensor,
    eigenvalues: Tensor,
    *,
    max_quadratic_error: float = 0.1,
    grid: Sequence[float] | None = None,
    num_draws: int = 8,
    generator: torch.Generator | None = None,
    stop_early: bool = True,
) -> SigmaSelection:
    r"""``sigma="auto"``: the largest probe scale on a grid at which the quadratic model of :math:`L_k` is valid.

    The quadratic-validity error (SPEC §1) at scale :math:`\sigma`, over draws :math:`z_q = \sigma \zeta_q`,
    :math:`\zeta_q \sim \mathcal N(0, I_D)`, is the ratio of means

    .. math::
        e(\sigma) = \frac{\operatorname{mean}_q \bigl|L_k(w_0+Uz_q) - L_k(w_0) - g^\top z_q
        - \tfrac12 z_q^\top \Lambda z_q\bigr|}{\operatorname{mean}_q |L_k(w_0+Uz_q) - L_k(w_0)|},
        \qquad g = U^\top g_k,\ \Lambda = \operatorname{diag}(\lambda) = U^\top H_k U,

    and the selected scale is the largest grid :math:`\sigma` with :math:`e(\sigma) \le` ``max_quadratic_error``. The
    same :math:`\zeta_q` serve every grid point (common random numbers), so :math:`e` is smooth in :math:`\sigma`. At
    very small :math:`\sigma` the loss difference suffers cancellation (notably in float32) and :math:`e` is large
    again; taking the largest qualifying :math:`\sigma` handles that. The grid is scanned from small to large; with
    ``stop_early`` the scan stops at the first point whose error exceeds the threshold after an earlier point met it
    (later points are reported as NaN). If no grid point qualifies, the smallest grid :math:`\sigma` is returned with
    ``valid=False``.

    Cost: one forward and backward pass on ``base_batch`` (loss and gradient at :math:`w_0`) plus at most
    ``len(grid) · num_draws`` forward passes.

    Args:
        model: the network, evaluated at its current weights (in eval mode during the probe).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        base_batch: the ``k`` base samples.
        eigenvectors: ``U``, orthonormal eigenvectors of :math:`H_k`, shape ``(N, D)`` (e.g. a probe's result).
        eigenvalues: their eigenvalues, shape ``(D,)``.
        max_quadratic_error: the largest acceptable error (positive).
        grid: candidate scales (positive; sorted ascending, duplicates dropped); default
            ``10 ** linspace(-6, -1, 11)``.
        num_draws: draws per grid point.
        generator: source of the draws (default: a generator seeded 0); the global RNG is not used.
        stop_early: stop scanning once the error exceeds the threshold after having met it.

    Returns:
        A :class:`SigmaSelection`.

    Example:
        >>> import torch
        >>> from lightning_curvprobe.functional import probe_stability
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(32, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(32, 1, generator=g, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()  # MSE of a linear model: exactly quadratic
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> res = probe_stability(model, loss_fn, (x[:31], y[:31]), (x[31:], y[31:]), num_eigenvectors=2)
        >>> sel = select_sigma(model, loss_fn, (x[:31], y[:31]), res.eigenvectors, res.eigenvalues)
        >>> sel.sigma, sel.valid, sel.forward_passes
        (0.1, True, 88)
    """
    fn = ModelFunction(model, loss_fn)
    max_quadratic_error = _check_positive_float("max_quadratic_error", max_quadratic_error)
    _check_int("num_draws", num_draws, minimum=1)
    sigmas = _check_grid(grid)
    U, lam = _check_subspace(eigenvectors, eigenvalues, fn.num_params)
    U, lam = U.to(device=fn.device, dtype=fn.dtype), lam.to(device=fn.device, dtype=fn.dtype)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    op = HessianOperator(fn, base_batch, where="the base samples")  # the one forward and backward pass
    base_loss, proj_grad = op.loss.reshape(()), U.T @ op.gradient
    del op  # free its graph before the forward passes
    zeta = _gaussian_draws(num_draws, U.shape[1], 1.0, gen, U)
    w0 = fn.current()
    base = fn.prepare(base_batch)
    errors = [math.nan] * len(sigmas)
    best: int | None = None
    forward = 0
    with _probe_mode(fn.model), torch.no_grad():
        for i, s in enumerate(sigmas):
            z = s * zeta
            draw_loss = torch.stack([fn.loss(w0 + U @ z[q], base).reshape(()) for q in range(num_draws)])
            forward += num_draws
            err = float(_quadratic_error(base_loss, proj_grad, lam, z, draw_loss))
            errors[i] = err
            if err <= max_quadratic_error:  # False for NaN
                best = i
            elif stop_early and best is not None:
                break
    valid = best is not None
    idx = best if best is not None else 0
    return SigmaSelection(sigma=sigmas[idx], grid=sigmas, errors=errors, valid=valid, index=idx, forward_passes=forward)


def _check_subspace(eigenvectors: Any, eigenvalues: Any, num_params: int) -> tuple[Tensor, Tensor]:
    if not isinstance(eigenvectors, Tensor) or eigenvectors.dim() != 2 or eigenvectors.shape[0] != num_params:
        got = tuple(eigenvectors.shape) if isinstance(eigenvectors, Tensor) else type(eigenvectors).__name__
        raise ValueError(f"`eigenvectors` must be a tensor of shape ({num_params}, D), got {got}.")
    D = eigenvectors.shape[1]
    if D < 1:
        raise ValueError(f"`eigenvectors` must hold at least one column, got shape {tuple(eigenvectors.shape)}.")
    if not isinstance(eigenvalues, Tensor) or tuple(eigenvalues.shape) != (D,):
        got = tuple(eigenvalues.shape) if isinstance(eigenvalues, Tensor) else type(eigenvalues).__name__
        raise ValueError(f"`eigenvalues` must be a tensor of shape ({D},) matching `eigenvectors`, got {got}.")
    return eigenvectors.detach(), eigenvalues.detach()


# ----------------------------------------------------------------------------------------------- full-space delta2


def _full_space_increments(
    fn: ModelFunction, base_batch: Any, added_batch: Any, sigma: float, num_samples: int, generator: torch.Generator
) -> Tensor:
    r"""True increments :math:`\delta_j(w_0 + \xi_s)`, :math:`\xi_s \sim \mathcal N(0, \sigma^2 I_N)`: shape ``(m, S)``.

    One draw at a time (memory ``O(N)``); ``1 + m`` forward passes per draw.
    """
    k = _batch_size(base_batch, "base_batch")
    m = _batch_size(added_batch, "added_batch")
    w0 = fn.current()
    base = fn.prepare(base_batch)
    added = [fn.prepare(_slice_batch(added_batch, j, j + 1)) for j in range(m)]
    base_draw = torch.empty(num_samples, dtype=fn.dtype, device=fn.device)
    added_draw = torch.empty(m, num_samples, dtype=fn.dtype, device=fn.device)
    with _probe_mode(fn.model), torch.no_grad():
        for s in range(num_samples):
            w = w0 + _gaussian_draws(1, fn.num_params, sigma, generator, w0)[0]
            base_draw[s] = _check_loss(fn.loss(w, base), f"the base samples at draw {s}") * k
            for j in range(m):
                added_draw[j, s] = _check_loss(fn.loss(w, added[j]), f"added sample {j} at draw {s}")
    return _direct_increments(base_draw, k, added_draw)


def delta2_full_space(
    model: nn.Module,
    loss_fn: LossFn,
    base_batch: Any,
    added_batch: Any,
    *,
    sigma: float,
    num_samples: int = 64,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Full-space criterion :math:`\Delta_2` by isotropic Monte Carlo.

    .. math::
        \Delta_2 \approx \frac{1}{mS}\sum_{j=1}^{m}\sum_{s=1}^{S} \delta_j(w_0 + \xi_s)^2,\qquad
        \delta_j = \frac{\ell_j - L_k}{k+1},\quad \xi_s \sim \mathcal N(0, \sigma^2 I_N),

    the same draws :math:`\xi_s` for every added sample. No quadratic model is involved; for an exactly quadratic
    increment :math:`a + c^\top\xi + \tfrac12\xi^\top B\xi` (full-space :math:`a, c, B`) its expectation is
    ``delta2_gaussian_moment(a, c, B, sigma)``. Cost: ``S (1 + m)`` forward passes, memory ``O(N)``.

    Args:
        model: the network, evaluated at its current weights (in eval mode, never modified).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        base_batch: the ``k`` base samples.
        added_batch: the ``m`` added samples; the result averages over them.
        sigma: the probe scale :math:`\sigma > 0`.
        num_samples: draws ``S``.
        generator: source of the draws (default: a generator seeded 0); the global RNG is not used.

    Returns:
        A scalar tensor in the model's dtype.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(9, 3, generator=g, dtype=torch.float64)
        >>> y = torch.randn(9, 1, generator=g, dtype=torch.float64)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> d2 = delta2_full_space(model, loss_fn, (x[:8], y[:8]), (x[8:], y[8:]), sigma=0.01, num_samples=16)
        >>> d2.dtype, bool(d2 > 0)
        (torch.float64, True)
    """
    fn = ModelFunction(model, loss_fn)
    sigma = _check_positive_float("sigma", sigma)
    _check_int("num_samples", num_samples, minimum=1)
    k = _batch_size(base_batch, "base_batch")
    m = _batch_size(added_batch, "added_batch")
    if k < 1:
        raise ValueError(f"`base_batch` must hold at least 1 sample, got {k}.")
    if m < 1:
        raise ValueError(f"`added_batch` must hold at least 1 sample, got {m}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    increments = _full_space_increments(fn, base_batch, added_batch, sigma, num_samples, gen)
    return _delta2_from_increments(increments).mean()
