r"""``CurvatureStability``: the criterion :math:`\Delta_2^{(D)}` as a torchmetrics ``Metric`` with exact DDP sync."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_curvprobe._checks import ESTIMATORS, _check_choice, _check_int, _check_positive_float
from lightning_curvprobe.functional.estimators import _gaussian_draws
from lightning_curvprobe.functional.hvp import HVP_KINDS, LossFn, ModelFunction
from lightning_curvprobe.functional.probe import _collect_statistics, _evaluate, _projected_hessian, _Statistics
from lightning_curvprobe.functional.sharded import (
    RowShardedFunction,
    ShardedFunction,
    is_fully_sharded,
    sharded_statistics,
    share_of,
)

_SUM_STATES = (
    "base_loss_sum",
    "base_count",
    "base_grad_sum",
    "base_hess_sum",
    "base_draw_loss_sum",
    "qe_change_sum",
    "qe_model_sum",
)
_CAT_STATES = ("added_loss", "added_grad", "added_hess", "added_draw_loss")


class CurvatureStability(Metric):
    r"""Curvature-aligned stability :math:`\Delta_2^{(D)}` (Kiselev & Grabovoy, 2026) from sufficient statistics.

    For a subspace :math:`U` (top-``D`` eigenvectors of the base Hessian :math:`H_k`, eigenvalues :math:`\lambda`),
    each :meth:`update` adds the sums over this process's base samples — loss :math:`\sum_i \ell_i`, count,
    projected gradient :math:`\sum_i U^\top g_i`, projected Hessian :math:`\sum_i U^\top H_i U`
    (:math:`= n\,\mathrm{diag}(\lambda)`) — and, per added sample :math:`j`, its loss, :math:`U^\top g_j` and
    :math:`U^\top H_j U` (``D`` single-sample Hessian-vector products). Sums are reduced with ``"sum"`` and the added
    samples with ``"cat"``, so a DDP sync is exact on any number of processes. :meth:`compute` forms

    .. math::
        a_j = \frac{\ell_j - L_k}{k+1},\quad c_j = \frac{U^\top(g_j - g_k)}{k+1},\quad
        B_j = \frac{U^\top H_j U - U^\top H_k U}{k+1}

    and returns :math:`\operatorname{mean}_j \mathbb E_{z\sim\mathcal N(0,\sigma^2 I)}[\delta_j(w_0+Uz)^2]` by the
    chosen estimator (Gaussian-moment closed form, quadratic Monte Carlo or direct Monte Carlo). After
    :meth:`compute`, :attr:`details` also holds ``delta1``, ``delta2_stderr`` (over added samples) and
    ``quadratic_error``.

    Args:
        num_eigenvectors: ``D``.
        sigma: probe scale :math:`\sigma > 0`.
        estimator: ``"gaussian_moment"``, ``"quadratic_mc"`` or ``"direct_mc"``.
        num_samples: Monte Carlo draws (for the MC estimators).
        quadratic_error_samples: draws for the quadratic-validity error (0 = off).
        seed: seed of the metric's own generator (draws are identical on every process).
        hvp: how the added samples' Hessian-vector products are taken: ``"autograd"``, ``"finite_difference"`` or
            ``"auto"`` (see :class:`~lightning_curvprobe.functional.HessianOperator`).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> from lightning_curvprobe.functional import probe_stability
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()
        >>> x, y = torch.randn(17, 3, dtype=torch.float64), torch.randn(17, 1, dtype=torch.float64)
        >>> loss_fn = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])
        >>> ref = probe_stability(model, loss_fn, (x[:16], y[:16]), (x[16:], y[16:]), num_eigenvectors=2, sigma=0.1)
        >>> metric = CurvatureStability(num_eigenvectors=2, sigma=0.1)
        >>> metric.update(model, loss_fn, (x[:8], y[:8]), (x[16:], y[16:]), ref.eigenvectors, ref.eigenvalues)
        >>> metric.update(model, loss_fn, (x[8:16], y[8:16]), (x[16:16], y[16:16]), ref.eigenvectors, ref.eigenvalues)
        >>> bool(torch.isclose(metric.compute(), ref.delta2, rtol=1e-10))
        True
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    base_loss_sum: Tensor
    base_count: Tensor
    base_grad_sum: Tensor
    base_hess_sum: Tensor
    base_draw_loss_sum: Tensor
    qe_change_sum: Tensor
    qe_model_sum: Tensor
    added_loss: list[Tensor] | Tensor
    added_grad: list[Tensor] | Tensor
    added_hess: list[Tensor] | Tensor
    added_draw_loss: list[Tensor] | Tensor

    def __init__(
        self,
        num_eigenvectors: int,
        sigma: float = 1e-3,
        estimator: str = "gaussian_moment",
        num_samples: int = 64,
        quadratic_error_samples: int = 8,
        seed: int = 0,
        hvp: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.hvp = _check_choice("hvp", hvp, HVP_KINDS)
        self.num_eigenvectors = _check_int("num_eigenvectors", num_eigenvectors, minimum=1)
        self.sigma = _check_positive_float("sigma", sigma)
        self.estimator = _check_choice("estimator", estimator, ESTIMATORS)
        self.num_samples = _check_int("num_samples", num_samples, minimum=1)
        self.quadratic_error_samples = _check_int("quadratic_error_samples", quadratic_error_samples, minimum=0)
        self.seed = _check_int("seed", seed, minimum=0)
        self.generator = torch.Generator().manual_seed(seed)
        D = num_eigenvectors
        S = num_samples if estimator == "direct_mc" else 0
        self.add_state("base_loss_sum", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("base_count", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("base_grad_sum", torch.zeros(D), dist_reduce_fx="sum")
        self.add_state("base_hess_sum", torch.zeros(D, D), dist_reduce_fx="sum")
        self.add_state("base_draw_loss_sum", torch.zeros(S), dist_reduce_fx="sum")
        self.add_state("qe_change_sum", torch.zeros(quadratic_error_samples), dist_reduce_fx="sum")
        self.add_state("qe_model_sum", torch.zeros(quadratic_error_samples), dist_reduce_fx="sum")
        self.add_state("added_loss", [], dist_reduce_fx="cat")
        self.add_state("added_grad", [], dist_reduce_fx="cat")
        self.add_state("added_hess", [], dist_reduce_fx="cat")
        self.add_state("added_draw_loss", [], dist_reduce_fx="cat")
        self._direct_z: Tensor | None = None
        self._qe_z: Tensor | None = None
        self._quad_z: Tensor | None = None
        self._keep_draws = False  # True inside forward(), whose internal reset() must keep the cycle's draws
        self.details: dict[str, Tensor] = {}

    def _draws(self, eigenvectors: Tensor) -> None:
        """The probe draws of this accumulation cycle: drawn once, identical on every process.

        Direct Monte Carlo and quadratic-error points are needed in :meth:`update`; the quadratic Monte Carlo draws
        only in :meth:`compute`, but are fixed here too, so that every ``compute`` of a cycle (and the batch values of
        ``forward``) uses the same ones.
        """
        if self._qe_z is None:
            S = self.num_samples if self.estimator == "direct_mc" else 0
            self._direct_z = _gaussian_draws(S, self.num_eigenvectors, self.sigma, self.generator, eigenvectors)
            self._qe_z = _gaussian_draws(
                self.quadratic_error_samples, self.num_eigenvectors, self.sigma, self.generator, eigenvectors
            )
            if self.estimator == "quadratic_mc":  # drawn last: the stream order of update-then-compute is kept
                self._quad_z = _gaussian_draws(
                    self.num_samples, self.num_eigenvectors, self.sigma, self.generator, eigenvectors
                )

    def update(  # type: ignore[override]
        self,
        model: nn.Module,
        loss_fn: LossFn,
        base_batch: Any,
        added_batch: Any,
        eigenvectors: Tensor,
        eigenvalues: Tensor,
        *,
        base_loss: Tensor | None = None,
        base_grad: Tensor | None = None,
        function: ShardedFunction | RowShardedFunction | None = None,
    ) -> None:
        r"""Add this process's base samples and added samples, probed in the subspace ``eigenvectors``.

        Args:
            model: the network at the probe point (left unchanged).
            loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss over the batch.
            base_batch: this process's base samples (may be a shard of the global base set).
            added_batch: this process's added samples (may hold none).
            eigenvectors: ``U`` of shape ``(N, D)``, top-``D`` eigenvectors of the *global* base Hessian.
            eigenvalues: their eigenvalues ``(D,)`` (the Rayleigh-Ritz values, :math:`U^\\top H_k U` is then
                diagonal), or the projected global base Hessian :math:`U^\\top H_k U` itself as a ``(D, D)`` matrix
                when ``U`` is not an eigenbasis at the current weights (e.g. a subspace kept from an earlier
                refresh).
            base_loss: this process's mean loss on ``base_batch``, if already known (saves a pass).
            base_grad: its gradient (flat, length ``N``), if already known.
            function: the model as a function of this process's rows of the parameter vector, when ``eigenvectors``
                holds only those rows: a :class:`~lightning_curvprobe.functional.sharded.RowShardedFunction` for a
                replicated (DDP) model (a ``fully_shard``-ed model gets its own
                :class:`~lightning_curvprobe.functional.sharded.ShardedFunction`).

        A model with sharded parameters (FSDP2 ``fully_shard``) is probed on its shards (see
        :mod:`~lightning_curvprobe.functional.sharded`): ``eigenvectors`` then holds this process's rows of ``U``,
        ``added_batch`` must be the same on every process, every process must call ``update`` together, and
        ``base_loss`` / ``base_grad`` are not used. The same holds with ``function``.
        """
        if eigenvectors.dim() != 2 or eigenvectors.shape[1] != self.num_eigenvectors:
            raise ValueError(
                f"`eigenvectors` must have shape (N, {self.num_eigenvectors}), got {tuple(eigenvectors.shape)}."
            )
        projected = _projected_hessian(eigenvalues, self.num_eigenvectors)  # checked before anything is drawn
        self._draws(eigenvectors)
        if function is not None or is_fully_sharded(model):
            fn = function if function is not None else ShardedFunction(model, loss_fn)
            stats = self._sharded_statistics(fn, base_batch, added_batch, eigenvectors, projected)
        else:
            stats = self._statistics(
                model, loss_fn, base_batch, added_batch, eigenvectors, projected, base_loss, base_grad
            )
        for name in _SUM_STATES:
            value = getattr(stats, name)
            setattr(self, name, getattr(self, name).to(value) + value)
        for name in _CAT_STATES:
            getattr(self, name).append(getattr(stats, name))

    def _statistics(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        base_batch: Any,
        added_batch: Any,
        eigenvectors: Tensor,
        projected: Tensor,
        base_loss: Tensor | None,
        base_grad: Tensor | None,
    ) -> _Statistics:
        fn = ModelFunction(model, loss_fn, hvp=self.hvp)
        return _collect_statistics(
            fn,
            base_batch,
            added_batch,
            eigenvectors,
            projected,
            base_loss=base_loss,
            base_grad=base_grad,
            direct_z=self._direct_z,
            qe_z=self._qe_z,
        )

    def _sharded_statistics(
        self,
        fn: ShardedFunction | RowShardedFunction,
        base_batch: Any,
        added_batch: Any,
        eigenvectors: Tensor,
        projected: Tensor,
    ) -> _Statistics:
        """Global statistics of a sharded model, cut to this process's share (the sync adds the shares up)."""
        op = fn.operator(base_batch, scale=fn.share(base_batch), where="the base samples")
        stats = sharded_statistics(
            fn, op, base_batch, added_batch, eigenvectors, projected, direct_z=self._direct_z, qe_z=self._qe_z
        )
        return share_of(stats, fn.rank, fn.world)  # type: ignore[no-any-return]

    def compute(self) -> Tensor:
        """Δ₂^(D) by the configured estimator (mean over added samples); also fills :attr:`details`."""
        cat = {name: _cat_state(getattr(self, name)) for name in _CAT_STATES}
        dtype = self.base_loss_sum.dtype
        if float(self.base_count) < 1 or cat["added_loss"] is None or cat["added_loss"].numel() == 0:
            nan = torch.full((), float("nan"), dtype=dtype, device=self.base_loss_sum.device)
            self.details = {"delta2": nan, "delta1": nan, "delta2_stderr": nan, "quadratic_error": nan}
            return nan
        D = self.num_eigenvectors
        stats = _Statistics(
            base_loss_sum=self.base_loss_sum,
            base_count=self.base_count,
            base_grad_sum=self.base_grad_sum,
            base_hess_sum=self.base_hess_sum,
            added_loss=cat["added_loss"],
            added_grad=cat["added_grad"].reshape(-1, D),  # type: ignore[union-attr]
            added_hess=cat["added_hess"].reshape(-1, D, D),  # type: ignore[union-attr]
            base_draw_loss_sum=self.base_draw_loss_sum,
            added_draw_loss=cat["added_draw_loss"],  # type: ignore[arg-type]
            qe_change_sum=self.qe_change_sum,
            qe_model_sum=self.qe_model_sum,
        )
        out = _evaluate(
            stats,
            sigma=self.sigma,
            estimator=self.estimator,
            num_samples=self.num_samples,
            generator=self.generator,
            quadratic_z=self._quad_z,
        )
        self.details = out
        return out["delta2"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``update`` plus the criterion of this call's samples alone (torchmetrics' ``forward``).

        torchmetrics resets the metric inside ``forward`` to compute the batch value; the draws of the accumulation
        cycle are kept through that reset, so that ``metric(...)`` and ``metric.update(...)`` accumulate the same
        statistics.
        """
        self._keep_draws = True
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._keep_draws = False

    def reset(self) -> None:
        """Clear the statistics and the draws (the generator continues its stream)."""
        super().reset()
        if not self._keep_draws:
            self._direct_z = None
            self._qe_z = None
            self._quad_z = None
        self.details = {}


def _cat_state(state: list[Tensor] | Tensor) -> Tensor | None:
    """A "cat" state as one tensor: a list before a sync, already a tensor after it; None when empty."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else None
