r"""``probe_stability``: the curvature-aligned criterion :math:`\Delta_2^{(D)}` for a plain PyTorch model.

Data flow: base batch → Hessian operator → top-D eigensolver → sufficient statistics of the added samples →
coefficients :math:`(a, c, B)` → estimator. The statistics are sums over samples, so that the
:class:`~lightning_curvprobe.CurvatureStability` metric can accumulate and synchronise them exactly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_curvprobe._checks import (
    ESTIMATORS,
    _check_choice,
    _check_int,
    _check_num_eigenvectors,
    _check_positive_float,
)
from lightning_curvprobe.functional._batch import _batch_size, _slice_batch
from lightning_curvprobe.functional.estimators import (
    _delta2_from_increments,
    _direct_increments,
    _gaussian_draws,
    _mean_and_stderr,
    _quadratic_error_from_sums,
    delta2_gaussian_moment,
    increment_coefficients,
    quadratic_surrogate,
)
from lightning_curvprobe.functional.hvp import HessianOperator, LossFn, ModelFunction, NonFiniteProbeError, _probe_mode
from lightning_curvprobe.functional.lanczos import EigenResult, top_eigenpairs
from lightning_curvprobe.functional.sharded import (
    ShardedFunction,
    ShardedHessianOperator,
    is_fully_sharded,
    sharded_eigensolve,
    sharded_statistics,
)


def _eigensolve(op: HessianOperator | ShardedHessianOperator, k: int, **kwargs: Any) -> EigenResult:
    """:func:`top_eigenpairs` of ``op`` inside one probe mode (each product's own is then nested and cheap).

    On a sharded model's operator the basis holds this process's rows only (see :mod:`.sharded`).
    """
    if isinstance(op, ShardedHessianOperator):
        return sharded_eigensolve(op, k, **kwargs)  # type: ignore[no-any-return]
    fn = op.fn
    with _probe_mode(fn.model):
        return top_eigenpairs(op.matvec, fn.num_params, k, dtype=fn.dtype, device=fn.device, **kwargs)


@dataclass
class _Statistics:
    """Sufficient statistics of one probe, as sums over this process's samples (see the metric's states)."""

    base_loss_sum: Tensor  # ()      k L_k(w0)
    base_count: Tensor  # ()         k
    base_grad_sum: Tensor  # (D,)    k U^T g_k
    base_hess_sum: Tensor  # (D, D)  k U^T H_k U
    added_loss: Tensor  # (m,)
    added_grad: Tensor  # (m, D)
    added_hess: Tensor  # (m, D, D)
    base_draw_loss_sum: Tensor  # (S,)   k L_k(w0 + U z_s) for direct Monte Carlo
    added_draw_loss: Tensor  # (m, S)    l_j(w0 + U z_s)
    qe_change_sum: Tensor  # (Q,)   k (L_k(w0 + U z_q) - L_k(w0)), for the quadratic-validity error
    qe_model_sum: Tensor  # (Q,)    k (g_k^T U z_q + z_q^T Lambda z_q / 2), its second-order model
    hvps: int = 0  # products spent on the added samples
    forward_passes: int = 0  # loss evaluations at perturbed points


def _collect_statistics(
    fn: ModelFunction,
    base_batch: Any,
    added_batch: Any,
    eigenvectors: Tensor,
    eigenvalues: Tensor,
    *,
    base_loss: Tensor | None = None,
    base_grad: Tensor | None = None,
    direct_z: Tensor | None = None,
    qe_z: Tensor | None = None,
) -> _Statistics:
    """Statistics of this process's base and added samples at the model's current weights.

    ``base_loss``/``base_grad`` (this process's mean loss and gradient on ``base_batch``) skip a forward and backward
    pass when the caller already has them. ``direct_z`` (S, D) and ``qe_z`` (Q, D) are the probe draws.
    ``eigenvalues`` is ``U^T H_k U`` of the global base set: its diagonal ``(D,)`` when ``U`` is an eigenbasis at the
    current weights, or the full ``(D, D)`` matrix otherwise (a subspace kept from an earlier refresh). A non-finite
    loss at a probe point ``w0 + U z`` raises :class:`NonFiniteProbeError`.

    The added samples' ``m · D`` products and the draws' forward passes are batched with ``torch.func.vmap``
    (:func:`~lightning_curvprobe.functional.hvp.per_sample_statistics`,
    :func:`~lightning_curvprobe.functional.hvp.perturbed_losses`); where that is not possible (a model ``vmap`` cannot
    trace, ``N`` too large for a batch, a non-finite value) the per-sample and per-draw loops below give the same
    numbers (to rounding) and the precise errors.
    """
    from lightning_curvprobe.functional.hvp import per_sample_statistics, perturbed_losses

    with torch.inference_mode(False):  # tensors written inside the probe must not be inference tensors
        dev, dt = fn.device, fn.dtype
        U = eigenvectors.to(device=dev, dtype=dt)  # the basis may be kept on another device (basis_device)
        D = U.shape[1]
        k = _batch_size(base_batch, "base_batch")
        m = _batch_size(added_batch, "added_batch")
        if base_loss is None or base_grad is None:
            op = HessianOperator(fn, base_batch, where="the base samples")
            base_loss, base_grad = op.loss, op.gradient
        hvps = 0
        batched = per_sample_statistics(fn, added_batch, U) if m else None
        if batched is not None:
            added_loss, added_grad, added_hess = batched
            hvps = m * D
        else:
            added_loss = torch.empty(m, dtype=dt, device=dev)
            added_grad = torch.empty(m, D, dtype=dt, device=dev)
            added_hess = torch.empty(m, D, D, dtype=dt, device=dev)
            for j in range(m):
                op_j = HessianOperator(fn, _slice_batch(added_batch, j, j + 1), where=f"added sample {j}")
                added_loss[j] = op_j.loss
                added_grad[j] = U.T @ op_j.gradient
                added_hess[j] = U.T @ op_j.matvec(U)
                hvps += op_j.num_hvps
        S = 0 if direct_z is None else direct_z.shape[0]
        Q = 0 if qe_z is None else qe_z.shape[0]
        base_draw = torch.empty(S, dtype=dt, device=dev)
        added_draw = torch.empty(m, S, dtype=dt, device=dev)
        qe_draw = torch.empty(Q, dtype=dt, device=dev)
        forward = 0
        if S or Q:
            w0 = fn.current()
            base = fn.prepare(base_batch)
            if S:
                added_all = fn.prepare(added_batch)
                draws = perturbed_losses(fn, w0, U, direct_z, base)  # type: ignore[arg-type]
                added_draws = perturbed_losses(fn, w0, U, direct_z, added_all, per_sample=True)  # type: ignore[arg-type]
                if draws is not None and added_draws is not None:
                    base_draw = draws * k
                    added_draw = added_draws.T.contiguous()
                else:
                    added = [_slice_batch(added_all, j, j + 1) for j in range(m)]
                    with _probe_mode(fn.model), torch.no_grad():
                        for s in range(S):
                            w = w0 + U @ direct_z[s].to(dt)  # type: ignore[index]
                            base_draw[s] = fn.loss(w, base) * k
                            for j in range(m):
                                added_draw[j, s] = fn.loss(w, added[j])
                forward += S * (1 + m)
            if Q:
                draws = perturbed_losses(fn, w0, U, qe_z, base)  # type: ignore[arg-type]
                if draws is not None:
                    qe_draw = draws
                else:
                    with _probe_mode(fn.model), torch.no_grad():
                        for q in range(Q):
                            qe_draw[q] = fn.loss(w0 + U @ qe_z[q].to(dt), base)  # type: ignore[index]
                forward += Q
        _check_draws(base_draw, added_draw, qe_draw)
        base_grad = base_grad.to(dt)
        projected = _projected_hessian(eigenvalues, D).to(device=dev, dtype=dt)
        return _Statistics(
            base_loss_sum=base_loss.reshape(()) * k,
            base_count=torch.tensor(float(k), dtype=dt, device=dev),
            base_grad_sum=(U.T @ base_grad) * k,
            base_hess_sum=projected * k,
            added_loss=added_loss,
            added_grad=added_grad,
            added_hess=added_hess,
            base_draw_loss_sum=base_draw,
            added_draw_loss=added_draw,
            qe_change_sum=(qe_draw - base_loss.reshape(())) * k,
            qe_model_sum=_second_order_model(qe_z, U.T @ base_grad, projected) * k,
            hvps=hvps,
            forward_passes=forward,
        )


def _check_draws(base_draw: Tensor, added_draw: Tensor, qe_draw: Tensor) -> None:
    """Raise :class:`NonFiniteProbeError` when a loss at a probe point ``w0 + U z`` is not finite."""
    for name, values in (("direct Monte Carlo", (base_draw, added_draw)), ("quadratic-validity", (qe_draw,))):
        bad = sum(int((~torch.isfinite(v)).sum()) for v in values)
        if bad:
            raise NonFiniteProbeError(
                f"the loss is not finite at {bad} of the {name} probe points w0 + U z (a smaller `sigma` keeps "
                "the probe inside the local regime)."
            )


def _projected_hessian(eigenvalues: Tensor, D: int) -> Tensor:
    """``U^T H_k U`` as a symmetric ``(D, D)`` matrix from its diagonal ``(D,)`` or the matrix itself."""
    if tuple(eigenvalues.shape) == (D,):
        return torch.diag(eigenvalues)
    if tuple(eigenvalues.shape) == (D, D):
        return 0.5 * (eigenvalues + eigenvalues.T)
    raise ValueError(
        f"`eigenvalues` must have shape ({D},) or ({D}, {D}) (the projected base Hessian U^T H_k U), got "
        f"{tuple(eigenvalues.shape)}."
    )


def _second_order_model(z: Tensor | None, grad: Tensor, projected: Tensor) -> Tensor:
    """``g^T z + z^T P z / 2`` per draw (rows of ``z``), ``P = U^T H_k U`` ``(D, D)``; empty without draws."""
    if z is None:
        return grad.new_zeros(0)
    z = z.to(grad)
    return z @ grad + 0.5 * ((z @ projected) * z).sum(-1)


def _evaluate(
    stats: _Statistics,
    *,
    sigma: float,
    estimator: str,
    num_samples: int,
    generator: torch.Generator,
    quadratic_z: Tensor | None = None,
) -> dict[str, Tensor]:
    """Criterion values from (globally summed) statistics; shared by ``probe_stability`` and the metric.

    ``quadratic_z`` (S, D): the quadratic Monte Carlo draws, if already drawn; else drawn here from ``generator``.
    """
    a, c, B = increment_coefficients(
        stats.base_loss_sum,
        stats.base_count,
        stats.base_grad_sum,
        stats.base_hess_sum,
        stats.added_loss,
        stats.added_grad,
        stats.added_hess,
    )
    if estimator == "gaussian_moment":
        per_sample = delta2_gaussian_moment(a, c, B, sigma)
    elif estimator == "quadratic_mc":
        z = _gaussian_draws(num_samples, c.shape[-1], sigma, generator, c) if quadratic_z is None else quadratic_z.to(c)
        per_sample = _delta2_from_increments(quadratic_surrogate(a, c, B, z))
    else:
        increments = _direct_increments(stats.base_draw_loss_sum, stats.base_count, stats.added_draw_loss)
        per_sample = _delta2_from_increments(increments)
    delta2, stderr = _mean_and_stderr(per_sample)
    out = {
        "delta2": delta2,
        "delta2_stderr": stderr,
        "delta2_per_sample": per_sample,
        "delta1": a.abs().mean(),
        "a": a,
        "c": c,
        "B": B,
    }
    if stats.qe_change_sum.numel() > 0:
        out["quadratic_error"] = _quadratic_error_from_sums(stats.qe_change_sum, stats.qe_model_sum)
    else:
        out["quadratic_error"] = torch.full_like(delta2, float("nan"))
    return out


def _criterion_in_subspace(
    fn: ModelFunction | ShardedFunction,
    op: HessianOperator | ShardedHessianOperator,
    base_batch: Any,
    added_batch: Any,
    eig: EigenResult,
    *,
    sigma: float,
    estimator: str,
    num_samples: int,
    quadratic_error_samples: int,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], _Statistics]:
    """Draws, statistics and estimator at a solved subspace; shared by ``probe_stability`` and ``stability_curve``.

    ``op`` is the base batch's operator (its loss and gradient are reused). The draws come from ``generator`` in a
    fixed order (direct Monte Carlo, then quadratic error, then quadratic Monte Carlo inside the estimator).
    """
    D = eig.eigenvectors.shape[1]
    direct_z = _gaussian_draws(num_samples, D, sigma, generator, eig.eigenvectors) if estimator == "direct_mc" else None
    qe_z = _gaussian_draws(quadratic_error_samples, D, sigma, generator, eig.eigenvectors)
    if isinstance(fn, ShardedFunction):
        stats = sharded_statistics(
            fn,
            op,  # type: ignore[arg-type]
            base_batch,
            added_batch,
            eig.eigenvectors,
            torch.diag(eig.eigenvalues),
            direct_z=direct_z,
            qe_z=qe_z,
        )
        out = _evaluate(stats, sigma=sigma, estimator=estimator, num_samples=num_samples, generator=generator)
        return out, stats
    stats = _collect_statistics(
        fn,
        base_batch,
        added_batch,
        eig.eigenvectors,
        eig.eigenvalues,
        base_loss=op.loss,
        base_grad=op.gradient,
        direct_z=direct_z,
        qe_z=qe_z,
    )
    out = _evaluate(stats, sigma=sigma, estimator=estimator, num_samples=num_samples, generator=generator)
    return out, stats


@dataclass
class ProbeResult:
    r"""Result of :func:`probe_stability`.

    Attributes:
        delta2: :math:`\Delta_2^{(D)}` by the chosen estimator, averaged over the added samples.
        delta2_stderr: standard error of ``delta2`` over the added samples (NaN for one added sample).
        delta2_per_sample: the criterion of each added sample, shape ``(m,)``.
        delta1: :math:`\Delta_1 = \operatorname{mean}_j |a_j|`.
        a: shape ``(m,)``; c: shape ``(m, D)``; B: shape ``(m, D, D)`` — the increment's quadratic model.
        eigenvalues: top-D eigenvalues of the base Hessian, descending, shape ``(D,)``.
        eigenvectors: the orthonormal subspace ``U``, shape ``(N, D)``.
        residuals: ``‖H u - λ u‖`` of each pair.
        hvps: Hessian-vector products the eigensolver spent on the base set.
        converged: whether the eigensolver met ``tol``.
        quadratic_error: relative error of the second-order model of :math:`L_k` at ``sigma`` (NaN if not measured).
        sigma: the probe scale; estimator: the estimator used.
        added_hvps: single-sample products spent on the added samples (``m · D``).
        basis: the eigenvectors plus the solver's guard vectors; pass as the next call's ``warm_start``.
    """

    delta2: Tensor
    delta2_stderr: Tensor
    delta2_per_sample: Tensor
    delta1: Tensor
    a: Tensor
    c: Tensor
    B: Tensor
    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    hvps: int
    converged: bool
    quadratic_error: Tensor
    sigma: float
    estimator: str
    added_hvps: int = 0
    basis: Tensor | None = field(default=None, repr=False)


def _check_common(
    num_eigenvectors: Any, sigma: Any, estimator: Any, num_samples: Any, tol: Any, num_params: int
) -> tuple[int, float, str, int, float]:
    return (
        _check_num_eigenvectors(num_eigenvectors, num_params),
        _check_positive_float("sigma", sigma),
        _check_choice("estimator", estimator, ESTIMATORS),
        _check_int("num_samples", num_samples, minimum=1),
        _check_positive_float("tol", tol),
    )


def probe_stability(
    model: nn.Module,
    loss_fn: LossFn,
    base_batch: Any,
    added_batch: Any,
    *,
    num_eigenvectors: int = 10,
    sigma: float = 1e-3,
    estimator: str = "gaussian_moment",
    num_samples: int = 64,
    warm_start: Tensor | None = None,
    tol: float = 1e-3,
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
    quadratic_error_samples: int = 8,
    hvp: str = "auto",
) -> ProbeResult:
    r"""Curvature-aligned stability :math:`\Delta_2^{(D)}` of the loss when one more sample joins the data.

    With the base set's mean loss :math:`L_k`, one added sample's loss :math:`\ell_j` and the top-``D`` eigenvectors
    :math:`U` of :math:`H_k = \nabla^2 L_k(w_0)`, the increment :math:`\delta_j = (\ell_j - L_k)/(k+1)` is probed at
    :math:`w_0 + Uz`, :math:`z \sim \mathcal N(0, \sigma^2 I_D)`:

    .. math:: \Delta_2^{(D)} = \operatorname{mean}_j\ \mathbb E_z\, \delta_j(w_0 + Uz)^2 .

    The default estimator is the closed form of the expectation of the squared quadratic model
    (:func:`delta2_gaussian_moment`); ``"quadratic_mc"`` averages the quadratic model over ``num_samples`` draws and
    ``"direct_mc"`` the true increments (two forward passes per draw and added sample). The model is not modified:
    parameters, buffers, ``.grad``, train/eval modes and the global RNG are left as they were.

    A model sharded with FSDP2's ``fully_shard`` (its trainable parameters ``DTensor`` shards on a 1-D data-parallel
    mesh) is probed on each process's own shards (:mod:`~lightning_curvprobe.functional.sharded`): every process of
    the mesh calls ``probe_stability`` together, with its own ``base_batch`` and the same ``added_batch`` and
    ``generator`` state; products are finite differences of the sharded gradients (``hvp="autograd"`` is refused), and
    ``eigenvectors``, ``basis`` and ``warm_start`` hold this process's rows.

    Args:
        model: the network, evaluated at its current weights (in eval mode during the probe).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
        base_batch: the ``k`` base samples (leading dimension of the first tensor).
        added_batch: the ``m`` candidate added samples; the result averages over them.
        num_eigenvectors: ``D``, the subspace dimension (``1 <= D < N``).
        sigma: the probe scale :math:`\sigma > 0`.
        estimator: ``"gaussian_moment"``, ``"quadratic_mc"`` or ``"direct_mc"``.
        num_samples: Monte Carlo draws for the MC estimators.
        warm_start: the previous result's ``basis`` (or ``eigenvectors``), shape ``(N, w)``.
        tol: eigensolver tolerance, ``‖H u - λ u‖ <= tol · |λ_1|``.
        generator: source of every random number (default: a generator seeded 0).
        max_basis: eigensolver memory in basis vectors (default about ``2D + 10``).
        quadratic_error_samples: draws for ``quadratic_error`` (0 skips it; one forward pass each).
        hvp: ``"autograd"`` (double backward), ``"finite_difference"`` (central differences of gradients, for models
            without second derivatives) or ``"auto"`` (autograd, falling back to finite differences once when the
            model has no double backward); see :class:`~lightning_curvprobe.functional.HessianOperator`.

    Returns:
        A :class:`ProbeResult` in the model's dtype (float64 for a float64 model, float32 otherwise).

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
        >>> x, y = torch.randn(33, 4, dtype=torch.float64), torch.randn(33, 1, dtype=torch.float64)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> res = probe_stability(model, loss_fn, (x[:32], y[:32]), (x[32:], y[32:]), num_eigenvectors=3, sigma=0.1)
        >>> res.eigenvectors.shape, res.delta2.dtype, bool(res.delta2 >= 0)
        (torch.Size([49, 3]), torch.float64, True)
    """
    sharded = is_fully_sharded(model)
    if sharded and hvp == "autograd":
        raise ValueError(
            "`hvp` must be 'auto' or 'finite_difference' for a model with sharded (DTensor) parameters: fully_shard "
            "has no double backward, so products are finite differences of gradients; got hvp='autograd'."
        )
    fn = ShardedFunction(model, loss_fn) if sharded else ModelFunction(model, loss_fn, hvp=hvp)
    D, sigma, estimator, num_samples, tol = _check_common(
        num_eigenvectors,
        sigma,
        estimator,
        num_samples,
        tol,
        fn.global_num_params if isinstance(fn, ShardedFunction) else fn.num_params,
    )
    _check_int("quadratic_error_samples", quadratic_error_samples, minimum=0)
    k = _batch_size(base_batch, "base_batch")
    m = _batch_size(added_batch, "added_batch")
    if k < 1:
        raise ValueError(f"`base_batch` must hold at least 1 sample, got {k}.")
    if m < 1:
        raise ValueError(f"`added_batch` must hold at least 1 sample, got {m}.")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if isinstance(fn, ShardedFunction):  # each process passes its own base samples
        op: HessianOperator | ShardedHessianOperator = fn.operator(
            base_batch, scale=fn.share(base_batch), where="the base samples"
        )
    else:
        op = HessianOperator(fn, base_batch, where="the base samples")
    eig = _eigensolve(op, D, tol=tol, max_basis=max_basis, warm_start=warm_start, generator=gen)
    if not eig.converged:
        warnings.warn(
            f"the eigensolver stopped after {eig.hvps} Hessian-vector products without reaching tol={tol} "
            f"(largest residual {float(eig.residuals.max()):.3g}); results use the current Ritz vectors.",
            RuntimeWarning,
            stacklevel=2,
        )
    out, stats = _criterion_in_subspace(
        fn,
        op,
        base_batch,
        added_batch,
        eig,
        sigma=sigma,
        estimator=estimator,
        num_samples=num_samples,
        quadratic_error_samples=quadratic_error_samples,
        generator=gen,
    )
    return ProbeResult(
        delta2=out["delta2"],
        delta2_stderr=out["delta2_stderr"],
        delta2_per_sample=out["delta2_per_sample"],
        delta1=out["delta1"],
        a=out["a"],
        c=out["c"],
        B=out["B"],
        eigenvalues=eig.eigenvalues,
        eigenvectors=eig.eigenvectors,
        residuals=eig.residuals,
        hvps=eig.hvps,
        converged=eig.converged,
        quadratic_error=out["quadratic_error"],
        sigma=sigma,
        estimator=estimator,
        added_hvps=stats.hvps,
        basis=eig.basis,
    )
