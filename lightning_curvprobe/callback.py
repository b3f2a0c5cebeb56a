r"""``CurvatureStabilityCallback``: Δ₂^(D) at every validation epoch of a Lightning ``Trainer``.

The callback only schedules, handles Lightning's contexts and logs; the mathematics lives in
:mod:`lightning_curvprobe.functional` and :class:`~lightning_curvprobe.CurvatureStability`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_curvprobe._checks import (
    ESTIMATORS,
    _check_choice,
    _check_device,
    _check_int,
    _check_num_eigenvectors,
    _check_optional_positive,
    _check_positive_float,
    _check_prefix,
    _check_sample_sizes,
    _check_sigma,
)
from lightning_curvprobe._logging import ProbeLogger
from lightning_curvprobe._probe_data import (
    CLONE_ELEMENTS,
    clone,
    draw_probe_batch,
    num_trainable,
    probe_data_len,
    select,
    training_step_loss,
    untouched_rng,
    user_state_kept,
)
from lightning_curvprobe._schedule import ProbeSchedule, no_validation_reason
from lightning_curvprobe._sharding import SubspaceRows, all_reduce_sum, check_strategy
from lightning_curvprobe._signals import SIGNAL_KEYS, explain
from lightning_curvprobe.functional._batch import _batch_size, _cast_batch
from lightning_curvprobe.functional.curve import StabilityCurve, delta2_full_space, select_sigma, stability_curve
from lightning_curvprobe.functional.hvp import HVP_KINDS, HessianOperator, ModelFunction, NonFiniteProbeError
from lightning_curvprobe.functional.lanczos import EigenResult, _default_num_extra
from lightning_curvprobe.functional.preflight import preflight
from lightning_curvprobe.functional.sharded import RowShards, ShardedFunction, is_fully_sharded, sharded_preflight
from lightning_curvprobe.metric import CurvatureStability

Estimator = Literal["gaussian_moment", "quadratic_mc", "direct_mc"]
_KEYS = ("delta2", "delta1", "lambda_max", "subspace_overlap", "hvps", "quadratic_error")


class CurvatureStabilityCallback(Callback):
    r"""Log the curvature-aligned stability criterion :math:`\Delta_2^{(D)}` at the end of validation epochs.

    At each validation epoch (never during the sanity check) the callback refreshes the top-``D`` eigenspace
    :math:`U` of the Hessian of the loss on ``num_probe_samples`` fixed base samples (thick-restart Lanczos,
    warm-started from the previous refresh, every ``refresh_every_n_epochs`` validation epochs), then measures how much
    the mean loss changes when one of ``num_added_samples`` further samples joins the base set, probed at
    :math:`w_0 + Uz`, :math:`z \sim \mathcal N(0, \sigma^2 I_D)`:

    .. math::
        \Delta_2^{(D)} = \operatorname{mean}_j\,\mathbb E_z\bigl[\delta_j(w_0+Uz)^2\bigr],\qquad
        \delta_j = \frac{\ell_j - L_k}{k + 1}.

    Logged keys (``<prefix>`` = ``log_prefix``, one value per validation epoch, at epoch level):

    - ``<prefix>/delta2``: :math:`\Delta_2^{(D)}` by ``estimator`` (also on the progress bar). Lower means the local
      landscape no longer moves when data is added; monitor it with ``EarlyStopping(monitor="curvprobe/delta2",
      mode="min")``.
    - ``<prefix>/delta1``: :math:`\Delta_1 = \operatorname{mean}_j |a_j|`, the change of the loss at :math:`w_0` itself.
    - ``<prefix>/lambda_max``: the largest Hessian eigenvalue on the base samples.
    - ``<prefix>/subspace_overlap``: :math:`\lVert U_{prev}^\top U\rVert_F^2 / D` (1 = unchanged, NaN at the first
      refresh).
    - ``<prefix>/hvps``: Hessian-vector products the eigensolver spent in this refresh (0 when not refreshed).
    - ``<prefix>/quadratic_error``: relative error of the second-order model of the loss along the probe directions at
      :math:`\sigma` (small = :math:`\sigma` is inside the local regime).
    - ``<prefix>/delta2_stderr``: standard error of ``delta2`` over added samples (only when ``num_added_samples > 1``).
    - ``<prefix>/sigma``: the probe scale in use (the selected one with ``sigma="auto"``).
    - ``<prefix>/probe_seconds``: the probe's wall time at this validation epoch.
    - ``<prefix>/overhead``: the probe's cumulative time over the training time so far (also on skipped epochs).
    - ``<prefix>/delta2_terms/a2``, ``<prefix>/delta2_terms/gradient``, ``<prefix>/delta2_terms/curvature``: the
      Gaussian-moment decomposition of ``delta2`` (mean :math:`a^2`, :math:`\sigma^2\lVert c\rVert^2` and the terms in
      :math:`B`), ``<prefix>/curvature_share`` :math:`= (\Delta_2^{(D)} - \overline{a^2})/\Delta_2^{(D)}`,
      ``<prefix>/discrepancy`` :math:`= (k+1)^2\Delta_2^{(D)}` and ``<prefix>/delta2_rel_peak`` (``delta2`` as a
      fraction of its largest value so far in the run; the stopping study's gating signal), see
      :func:`lightning_curvprobe._signals.explain`.
    - with ``sample_sizes`` (at refreshes): ``<prefix>/decay_exponent`` and ``<prefix>/delta1_exponent`` (log-log
      slopes of :math:`\Delta_2^{(D)}` and :math:`\Delta_1` against ``k+1``; theory about -2 and -1) and
      ``<prefix>/sufficient_k`` (the extrapolated smallest ``k`` with :math:`\Delta_2^{(D)} \le`
      ``sufficient_tolerance``; NaN when the curve does not decrease or no tolerance is set).
    - with ``full_space_samples > 0``: ``<prefix>/delta2_full`` (isotropic Monte Carlo :math:`\Delta_2`) and
      ``<prefix>/subspace_ratio`` :math:`= \Delta_2^{(D)} / \Delta_2`.
    - with a ``TensorBoardLogger``: the top-``D`` eigenvalues as the histogram ``<prefix>/eigenvalues``, and, when
      matplotlib is installed, images at each refresh: ``<prefix>/spectrum`` (the top-``D`` eigenvalues against their
      index; look for a gap after the first few and for the top ones settling) and, with ``sample_sizes``,
      ``<prefix>/sample_growth`` (log-log :math:`\Delta` against ``k+1`` with the fitted lines; parallel straight lines
      of slope about -2 and -1 mean the theory's regime, a flattening curve means more data stops helping).

    Before the first training step (and at the start of ``trainer.validate``) a pre-flight probe at the initial
    weights evaluates one loss, one gradient, one Hessian-vector product and one batched per-sample call, so that a
    model or loss the probe cannot handle fails there with a message naming the cause; it also warns once when the
    loss is not a per-sample mean. A probe that fails later (a non-finite loss or product, or any error) logs NaN and
    warns once with the cause, and training goes on (``on_error="raise"`` stops instead); Lightning's
    ``EarlyStopping(check_finite=True)`` (its default) then stops the run — a NaN probe usually means the training
    itself diverged.

    The callback never changes the training it watches: the module keeps the same Parameter objects (aliased, tied
    and parametrized modules included), and weights, ``.grad``, optimizer state, BatchNorm buffers, train/eval modes,
    the global RNG streams and the module's Python-side state (lists, counters, torchmetrics states that
    ``training_step`` updates) are left exactly as they were. The probe runs in eval mode (Dropout off, BatchNorm on
    its running statistics), with autocast off, attention (SDPA) on its math backend and compiled modules run eagerly.

    Args:
        num_eigenvectors: ``D``, the subspace dimension (``1 <= D <`` number of trainable parameters).
        sigma: probe scale :math:`\sigma > 0` (in parameter units), or ``"auto"``: at each refresh, the largest
            :math:`\sigma` on the grid ``10**linspace(-6, -1, 11)`` whose quadratic-validity error stays below
            ``max_quadratic_error`` (cost: one forward and backward pass plus at most 88 forward passes on the base
            samples; under DDP rank 0's choice is used on every rank).
        num_probe_samples: ``k``, base samples.
        num_added_samples: ``m``, candidate added samples (the result averages over them).
        estimator: ``"gaussian_moment"`` (closed form, default), ``"quadratic_mc"`` or ``"direct_mc"``.
        num_mc_samples: draws of the Monte Carlo estimators.
        refresh_every_n_epochs: recompute the subspace every this many validation epochs. In between, the kept
            :math:`U` is reused and :math:`U^\top H_k U` is evaluated at the current weights (``D`` products in one
            block instead of a solve), so the criterion is exact for that :math:`U`; ``lambda_max`` is then the
            largest Rayleigh-Ritz value in the kept subspace.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor``, mean loss over the batch; default: the loss returned by
            ``pl_module.training_step(batch, 0)`` with its ``self.log`` calls silenced (not for manual optimization).
        probe_data: a batch (tuple/list/dict of tensors) or a ``Dataset`` with at least ``k + m`` samples: the first
            ``k`` are the base set, the next ``m`` the added ones. Default: ``k + m`` samples drawn once (with the
            callback's own generator) from the training dataloader's dataset, kept for the whole run.
        tol: eigensolver tolerance, ``‖Hu - λu‖ <= tol · |λ_1|``.
        max_basis: eigensolver memory in basis vectors (default about ``2D + 10``).
        basis_device: where the eigensolver's Krylov basis (``max_basis · N`` floats) and the kept subspace live,
            e.g. ``"cpu"`` for a model on a GPU whose memory cannot hold the basis; default: the model's device.
        quadratic_error_samples: forward passes spent on ``quadratic_error`` per probe (0 = not logged).
        log_prefix: prefix of the logged keys.
        seed: seed of the callback's own ``torch.Generator``.
        save_subspace: keep the subspace (``N x (D + p)`` floats) in checkpoints so that a resumed run refreshes warm.
        max_quadratic_error: the validity threshold of ``sigma="auto"``.
        sample_sizes: base-set sizes ``k`` (nested prefixes of the base samples, each ``<= num_probe_samples``) for
            the sample-growth curve computed at each refresh (single-process runs; each solve warm-started).
        sufficient_tolerance: the :math:`\Delta_2^{(D)}` target of ``sufficient_k``.
        full_space_samples: Monte Carlo draws of the full-space :math:`\Delta_2` (0 = off; single-process runs;
            two forward passes per draw and added sample).
        hvp: how Hessian-vector products are taken: ``"autograd"`` (double backward), ``"finite_difference"``
            (central differences of gradients, two first-order passes per product, for models without second
            derivatives such as reentrant activation checkpointing) or ``"auto"`` (autograd, falling back to finite
            differences once, with one info message, when the pre-flight finds no double backward). The kind in use
            is :attr:`hvp_in_use` after the pre-flight.
        on_error: ``"warn"`` (a probe that fails during training logs NaN and warns once) or ``"raise"``.
        max_overhead: a budget for the probe's cumulative time as a fraction of training time (e.g. ``0.05``), or
            None (probe every validation epoch). Within the budget, each validation epoch refreshes, reuses the kept
            subspace, or skips the probe (see :mod:`lightning_curvprobe._schedule`); the first probe always runs. A
            skipped epoch logs no probe value, so ``trainer.callback_metrics`` keeps the last one: gate early
            stopping with :class:`StabilityEarlyStopping`, which counts only the epochs that measured.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> probe = CurvatureStabilityCallback(num_eigenvectors=10, sigma=1e-3)
        >>> trainer = Trainer(callbacks=[probe, EarlyStopping(monitor="curvprobe/delta2", mode="min")],
        ...                   logger=False, enable_checkpointing=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        num_eigenvectors: int = 10,
        sigma: float | Literal["auto"] = 1e-3,
        num_probe_samples: int = 64,
        num_added_samples: int = 1,
        estimator: Estimator = "gaussian_moment",
        num_mc_samples: int = 64,
        refresh_every_n_epochs: int = 1,
        loss_fn: Callable[[LightningModule, Any], Tensor] | None = None,
        probe_data: Any = None,
        tol: float = 1e-3,
        max_basis: int | None = None,
        basis_device: str | None = None,
        quadratic_error_samples: int = 8,
        log_prefix: str = "curvprobe",
        seed: int = 0,
        save_subspace: bool = True,
        max_quadratic_error: float = 0.1,
        sample_sizes: list[int] | None = None,
        sufficient_tolerance: float | None = None,
        full_space_samples: int = 0,
        hvp: Literal["auto", "autograd", "finite_difference"] = "auto",
        on_error: Literal["warn", "raise"] = "warn",
        max_overhead: float | None = None,
    ) -> None:
        super().__init__()
        self.num_eigenvectors = _check_int("num_eigenvectors", num_eigenvectors, minimum=1)
        self.sigma: float | str = _check_sigma(sigma)
        self.num_probe_samples = _check_int("num_probe_samples", num_probe_samples, minimum=1)
        self.num_added_samples = _check_int("num_added_samples", num_added_samples, minimum=1)
        self.estimator = _check_choice("estimator", estimator, ESTIMATORS)
        self.num_mc_samples = _check_int("num_mc_samples", num_mc_samples, minimum=1)
        self.refresh_every_n_epochs = _check_int("refresh_every_n_epochs", refresh_every_n_epochs, minimum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(pl_module, batch) or None, got {loss_fn!r}.")
        self.loss_fn = loss_fn
        if probe_data is not None:
            n = probe_data_len(probe_data)
            need = num_probe_samples + num_added_samples
            if n < need:
                raise ValueError(
                    f"`probe_data` must hold at least num_probe_samples + num_added_samples = {need} samples, got {n}."
                )
        self.probe_data = probe_data
        self.tol = _check_positive_float("tol", tol)
        self.max_basis = None if max_basis is None else _check_int("max_basis", max_basis, minimum=2)
        self.basis_device = _check_device("basis_device", basis_device)
        self.quadratic_error_samples = _check_int("quadratic_error_samples", quadratic_error_samples, minimum=0)
        self.log_prefix = _check_prefix("log_prefix", log_prefix)
        self.seed = _check_int("seed", seed, minimum=0)
        self.save_subspace = bool(save_subspace)
        self.max_quadratic_error = _check_positive_float("max_quadratic_error", max_quadratic_error)
        self.sample_sizes = _check_sample_sizes("sample_sizes", sample_sizes, num_probe_samples)
        self.sufficient_tolerance = _check_optional_positive("sufficient_tolerance", sufficient_tolerance)
        self.full_space_samples = _check_int("full_space_samples", full_space_samples, minimum=0)
        self.hvp = _check_choice("hvp", hvp, HVP_KINDS)
        self.on_error = _check_choice("on_error", on_error, ("warn", "raise"))
        self.max_overhead = _check_optional_positive("max_overhead", max_overhead)
        self._sigma_value = 1e-3 if self.sigma == "auto" else float(self.sigma)
        self._logger = ProbeLogger(log_prefix)
        self._warned: set[str] = set()
        self._warned_no_probe = False
        self._probes_this_fit = 0
        self._start_step = 0
        #: the kind of Hessian-vector product in use after the pre-flight: "autograd" or "finite_difference"
        self.hvp_in_use: str | None = None
        # runtime state
        self._generator = torch.Generator().manual_seed(seed)
        self._basis: Tensor | None = None  # (N, D + p) from the last refresh, warm start of the next
        self._rows = SubspaceRows()  # with several processes _basis holds this one's rows
        self._eigenvalues: Tensor | None = None
        self._probe_indices: list[int] | None = None
        self._base: Any = None
        self._added: Any = None
        self._schedule = ProbeSchedule(self.refresh_every_n_epochs, self.max_overhead)
        self._solver_seconds = 0.0
        #: the last epoch at which the probe measured (None before the first); skipped epochs leave it unchanged
        self.measured_epoch: int | None = None
        self._num_refreshes = 0
        self._metric: CurvatureStability | None = None
        self.last_result: EigenResult | None = None
        self.last_curve: StabilityCurve | None = None
        self.history: list[dict[str, float]] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            log_prefix=self.log_prefix, num_eigenvectors=self.num_eigenvectors, sigma=self.sigma
        )

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer, self.sigma, self.hvp)
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "`loss_fn` must be given when the LightningModule uses manual optimization "
                "(automatic_optimization=False): its training_step steps the optimizers itself, so the callback "
                "cannot call it to get the loss. Pass loss_fn=lambda module, batch: <mean loss of batch>; "
                "got loss_fn=None."
            )
        if num_trainable(pl_module) > 0 or not is_overridden("configure_model", pl_module, LightningModule):
            self._check_trainable(pl_module)
        # else: the layers are built in configure_model, which Lightning calls after this hook; checked at
        # on_train_start / on_validation_start, still before any training step
        world = trainer.world_size
        if world > 1 and (self.sample_sizes is not None or self.full_space_samples > 0):
            raise ValueError(
                "`sample_sizes` and `full_space_samples` must be None and 0 with several processes (they probe their "
                "own sample subsets and full-space directions of all N parameters in one process; leave them to a "
                f"single-process run), got sample_sizes={self.sample_sizes!r}, "
                f"full_space_samples={self.full_space_samples} with {world} processes."
            )
        if self.num_probe_samples < world:
            raise ValueError(
                f"`num_probe_samples` must be at least the number of processes ({world}) so that every rank holds a "
                f"base sample, got {self.num_probe_samples}."
            )
        if self._metric is None:
            self._metric = CurvatureStability(
                self.num_eigenvectors,
                sigma=self._sigma_value,
                estimator=self.estimator,
                num_samples=self.num_mc_samples,
                quadratic_error_samples=self.quadratic_error_samples,
                seed=self.seed,
                hvp=self.hvp,
                sync_on_compute=True,
            )

    def _check_trainable(self, pl_module: LightningModule) -> None:
        """The module's trainable parameters admit the configured ``D`` and ``max_basis``."""
        num_params = num_trainable(pl_module)
        if num_params == 0:
            raise ValueError(
                f"`pl_module` must have trainable parameters (requires_grad=True), got {type(pl_module).__name__} "
                "with none."
            )
        D = _check_num_eigenvectors(self.num_eigenvectors, num_params)
        if self.max_basis is not None:
            # a warm start brings D + p columns and the solver needs one more Krylov vector than those
            need = min(num_params, 2 * (D + _default_num_extra(D, num_params)) + 1)
            if self.max_basis < need:
                raise ValueError(
                    f"`max_basis` must be at least 2 (D + p) + 1 = {need} for D = {D} (p = "
                    f"{_default_num_extra(D, num_params)} guard vectors; the warm start of a refresh holds D + p "
                    f"vectors and extends them), or None for the default, got {self.max_basis}."
                )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probes_this_fit = 0
        self._schedule.start()
        reason = no_validation_reason(trainer, pl_module)
        if reason is not None:
            rank_zero_warn(f"CurvatureStabilityCallback: {reason}, so no probe will run in this fit.")
            self._warned_no_probe = True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step  # a resumed fit's steps so far are restored by now
        self._prepare_probe_data(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self._base is None:
            self._prepare_probe_data(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._probes_this_fit == 0 and not self._warned_no_probe:
            rank_zero_warn(
                "CurvatureStabilityCallback: no validation epoch ended during this fit, so no probe ran (validation "
                "runs every `check_val_every_n_epoch` epochs; the probe runs at the end of each validation epoch)."
            )
            self._warned_no_probe = True

    # ------------------------------------------------------------------ probe

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        action = self._schedule.decide(has_subspace=self._basis is not None)
        if trainer.world_size > 1:  # the ranks' clocks differ: rank 0 decides for all
            action = trainer.strategy.broadcast(action)
        if action == "skip":
            self._schedule.record("skip", seconds=0.0)
            self._logger.log(trainer, pl_module, {"overhead": self._schedule.overhead()}, None, None)
            return
        start = time.perf_counter()
        self._solver_seconds = 0.0
        unrestored: list[str] = []
        try:
            with untouched_rng(pl_module.device), user_state_kept(pl_module) as unrestored:
                if self._base is None:
                    self._prepare_probe_data(trainer, pl_module)
                values = self._probe(trainer, pl_module, refresh=action == "refresh")
        except Exception as err:  # noqa: BLE001 - the run goes on unless on_error="raise"
            if self.on_error == "raise":
                raise
            values = self._failed(trainer, err)
        self._probes_this_fit += 1
        self.measured_epoch = trainer.current_epoch
        if unrestored:
            self._warn_once(
                "state",
                f"attributes {unrestored} of the module were changed in place during the probe and are too large to "
                f"have been copied beforehand (more than {CLONE_ELEMENTS} elements); pass a `loss_fn` without side "
                "effects.",
            )
        seconds = time.perf_counter() - start
        self._schedule.record(
            action,
            seconds=seconds,
            solver_seconds=self._solver_seconds,
            products=int(values.get("hvps", 0)),
            dimension=self.num_eigenvectors,
        )
        values["probe_seconds"] = seconds
        values["overhead"] = self._schedule.overhead()
        self.history.append({"epoch": float(trainer.current_epoch), **values})
        self._report(trainer, values)
        self._logger.log(trainer, pl_module, values, self._eigenvalues, self.last_curve)

    def _report(self, trainer: Trainer, values: dict[str, float]) -> None:
        """One info line on the first probe's cost; one warning for a quadratic error above the threshold."""
        steps = trainer.global_step - self._start_step  # the steps of this fit (after a resume too)
        if self._probes_this_fit == 1 and trainer.state.fn == "fit" and steps > 0:
            step_seconds = self._schedule.train_seconds() / steps
            in_steps = values["probe_seconds"] / step_seconds if step_seconds > 0 else float("nan")
            if self.max_overhead is None:
                hint = "set max_overhead (e.g. 0.05) to bound it"
            else:
                hint = f"max_overhead={self.max_overhead:g} bounds it"
            rank_zero_info(
                f"CurvatureStabilityCallback: the first probe took {values['probe_seconds']:.3g} s, about "
                f"{in_steps:.3g} training steps; at this validation interval ({steps} steps) a probe at every "
                f"validation epoch adds about {in_steps / steps:.0%} to training time; {hint} "
                f"({self.log_prefix}/overhead logs the cumulative ratio)."
            )
        qe = values.get("quadratic_error", float("nan"))
        if qe > self.max_quadratic_error:
            self._warn_once(
                "quadratic_error",
                f"quadratic_error = {qe:.3g} exceeds max_quadratic_error = {self.max_quadratic_error}: sigma = "
                f"{self._sigma_value:g} leaves the local regime where the quadratic model (and delta2) is meaningful; "
                "use sigma='auto' or a smaller sigma.",
            )

    def _failed(self, trainer: Trainer, err: Exception) -> dict[str, float]:
        """NaN values for a probe that failed, with one warning naming the cause."""
        if isinstance(err, NonFiniteProbeError):
            message = f"{err} Logging NaN"
            hint = "(a NaN probe usually means the training itself diverged)"
        else:
            message = f"the probe failed ({type(err).__name__}: {err}). Logging NaN"
            hint = "(pass on_error='raise' to stop on such errors)"
        self._warn_once("failed", f"{message}; the model is untouched and training goes on {hint}.")
        nan = float("nan")
        values = {key: nan for key in (*_KEYS, *SIGNAL_KEYS)}
        values["hvps"] = 0.0
        values["sigma"] = self._sigma_value
        if self.num_added_samples > 1:
            values["delta2_stderr"] = nan
        return values

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"CurvatureStabilityCallback: {message}")

    def _probe(self, trainer: Trainer, pl_module: LightningModule, refresh: bool) -> dict[str, float]:
        """Refresh (or reuse) the subspace, then measure the criterion in it; raises on failure."""
        fn = self._function(pl_module)
        world = trainer.world_size
        reduce_fn = all_reduce_sum if world > 1 and torch.distributed.is_initialized() else None
        scale = _batch_size(self._base) / self.num_probe_samples
        op = self._call_user(
            lambda: (
                fn.operator(self._base, scale=scale, where="the base samples")
                if isinstance(fn, ShardedFunction)
                else HessianOperator(fn, self._base, scale=scale, reduce_fn=reduce_fn, where="the base samples")
            ),
            "the base samples",
        )
        rows = self._rows.num_rows(fn)
        if self._basis is not None and self._basis.shape[0] != rows:
            self._trainable_set_changed(self._basis.shape[0], rows)
            refresh = True
        hvps, overlap = self._refresh(op) if refresh else (0, 1.0)
        assert self._basis is not None and self._eigenvalues is not None
        U = self._rows.measured(self._basis[:, : self.num_eigenvectors].to(device=fn.device, dtype=fn.dtype))
        if refresh:
            projected = self._eigenvalues.to(U)  # U^T H_k U = diag(eigenvalues) at these weights
        else:
            # the kept U is no eigenbasis at the current weights: U^T H_k U from D products (one block)
            projected = self._call_user(lambda: self._rows.projected(op, U), "the base samples (projected Hessian)")
            self._eigenvalues = torch.linalg.eigvalsh(projected).flip(0)
        if refresh and self.sigma == "auto":
            selection = self._call_user(
                lambda: select_sigma(
                    pl_module,
                    self._loss_fn(pl_module),
                    self._base,
                    self._rows.whole(U),
                    self._eigenvalues.to(U),  # type: ignore[union-attr]
                    max_quadratic_error=self.max_quadratic_error,
                    generator=self._generator,
                ),
                "the base samples (sigma selection)",
            )
            self._sigma_value = float(trainer.strategy.broadcast(selection.sigma))
        delta2, details = self._measure(pl_module, op, U, projected, scale, reduce_fn)
        values = {
            "delta2": delta2,
            "delta1": float(details["delta1"]),
            "lambda_max": float(self._eigenvalues[0]),
            "subspace_overlap": overlap,
            "hvps": float(hvps),
            "quadratic_error": float(details["quadratic_error"]),
            "sigma": self._sigma_value,
        }
        peak = max((h["delta2"] for h in self.history if math.isfinite(h["delta2"])), default=None)
        values.update(explain(details, self._sigma_value, self.num_probe_samples, peak_delta2=peak))
        extra = self._extras(pl_module, refresh)
        if "delta2_full" in extra:
            extra["subspace_ratio"] = delta2 / extra["delta2_full"] if extra["delta2_full"] > 0 else float("nan")
        values.update(extra)
        if self.num_added_samples > 1:
            values["delta2_stderr"] = float(details["delta2_stderr"])
        return values

    def _refresh(self, op: Any) -> tuple[int, float]:
        """A new top-D subspace, warm-started from the kept one; returns the products spent and the overlap."""
        fn = op.fn
        prev = self._basis
        if prev is None:
            warm = None
        elif self.basis_device is None:
            warm = prev.to(device=fn.device, dtype=fn.dtype)
        else:  # stays where it is kept: the solver moves it one column at a time
            warm = prev.to(dtype=fn.dtype)
        start = time.perf_counter()
        eig = self._call_user(
            lambda: self._rows.eigensolve(
                op,
                self.num_eigenvectors,
                tol=self.tol,
                max_basis=self.max_basis,
                warm_start=warm,
                generator=self._generator,
                basis_device=self.basis_device,
            ),
            "the base samples (eigensolver)",
        )
        self._solver_seconds = time.perf_counter() - start
        self.last_result = eig
        if not eig.converged:
            rank_zero_warn(
                f"CurvatureStabilityCallback: the eigensolver stopped after {eig.hvps} Hessian-vector "
                f"products without reaching tol={self.tol}; raise `max_basis` or `tol`."
            )
        D = self.num_eigenvectors
        U_prev = None if prev is None else prev[:, :D].to(eig.eigenvectors)
        if U_prev is None:
            overlap = float("nan")
        else:
            cross = self._rows.reduce(U_prev.T @ eig.eigenvectors, fn.device)
            overlap = float(cross.pow(2).sum()) / D
        self._basis = eig.basis.detach()
        self._eigenvalues = eig.eigenvalues.detach()
        self._num_refreshes += 1
        return eig.hvps, overlap

    def _measure(
        self,
        pl_module: LightningModule,
        op: Any,
        U: Tensor,
        projected: Tensor,
        scale: float,
        reduce_fn: Callable[[Tensor], Tensor] | None,
    ) -> tuple[float, dict[str, Tensor]]:
        """The criterion through the metric (synced across ranks): ``delta2`` and the metric's details."""
        assert self._metric is not None
        metric = self._metric.to(pl_module.device)
        metric.sigma = self._sigma_value
        metric.reset()
        function = self._rows.function(op.fn)
        plain = function is None and not isinstance(op.fn, ShardedFunction)  # this rank's base loss, gradient known
        failed: NonFiniteProbeError | None = None
        try:
            self._call_user(
                lambda: metric.update(
                    pl_module,
                    self._loss_fn(pl_module),
                    self._base,
                    self._added,
                    U,
                    projected,
                    base_loss=op.local_loss / scale if plain else None,
                    base_grad=op.local_gradient / scale if plain else None,
                    function=function,
                ),
                "the added samples",
            )
        except NonFiniteProbeError as err:
            failed = err
        # the added samples and probe points are this rank's own: all ranks learn of a failure on any of them before
        # compute() (which every rank must call, or the others wait for ever)
        if reduce_fn is not None:
            flag = reduce_fn(torch.tensor([float(failed is not None)], device=op.fn.device))
            if failed is None and float(flag[0]) > 0:
                failed = NonFiniteProbeError("a probe value is not finite on another process.")
        if failed is not None:
            metric.reset()
            raise failed
        delta2 = float(metric.compute())
        return delta2, metric.details

    def _trainable_set_changed(self, old: int, new: int) -> None:
        """The kept subspace lives in another parameter space: drop it (the refresh is cold)."""
        _check_num_eigenvectors(self.num_eigenvectors, new)
        rank_zero_warn(
            f"CurvatureStabilityCallback: the number of trainable parameters changed from {old} to {new} (layers "
            "frozen or unfrozen, e.g. by a fine-tuning callback); the subspace is recomputed cold and "
            "`subspace_overlap` is NaN for this refresh."
        )
        self._basis = None
        self._eigenvalues = None

    def _extras(self, pl_module: LightningModule, refresh: bool) -> dict[str, float]:
        """The optional sample-growth curve (at refreshes) and full-space comparison."""
        out: dict[str, float] = {}
        loss_fn = self._loss_fn(pl_module)
        if refresh and self.sample_sizes is not None:
            curve = self._call_user(
                lambda: stability_curve(
                    pl_module,
                    loss_fn,
                    self._base,
                    self._added,
                    sample_sizes=self.sample_sizes,  # type: ignore[arg-type]
                    num_eigenvectors=self.num_eigenvectors,
                    sigma=self._sigma_value,
                    estimator=self.estimator,
                    num_samples=self.num_mc_samples,
                    tol=self.tol,
                    tolerance=self.sufficient_tolerance,
                    generator=self._generator,
                    warm_start=self._basis,
                    hvp=self.hvp,
                ),
                "the base samples (sample-growth curve)",
            )
            self.last_curve = curve
            out["decay_exponent"] = float(curve.decay_exponent)
            out["delta1_exponent"] = float(curve.delta1_exponent)
            out["sufficient_k"] = float("nan") if curve.sufficient_k is None else float(curve.sufficient_k)
        if self.full_space_samples > 0:
            out["delta2_full"] = float(
                self._call_user(
                    lambda: delta2_full_space(
                        pl_module,
                        loss_fn,
                        self._base,
                        self._added,
                        sigma=self._sigma_value,
                        num_samples=self.full_space_samples,
                        generator=self._generator,
                    ),
                    "the probe samples (full-space Monte Carlo)",
                )
            )
        return out

    def _call_user(self, thunk: Callable[[], Any], where: str) -> Any:
        """Run ``thunk``; a user error is re-raised with the probe's context (non-finite values pass through)."""
        try:
            return thunk()
        except NonFiniteProbeError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with context, same type where possible
            probe = self._schedule.num_probes + 1
            message = (
                f"CurvatureStabilityCallback: evaluating the loss on {where} failed (probe {probe}, "
                f"{self.num_probe_samples} base samples, {self.num_added_samples} added samples): "
                f"{type(err).__name__}: {err}"
            )
            try:
                wrapped = type(err)(message)
            except Exception:  # noqa: BLE001 - an exception type that takes other arguments
                wrapped = RuntimeError(message)
            raise wrapped from err

    # ------------------------------------------------------------------ data and loss

    def _loss_fn(self, pl_module: LightningModule) -> Callable[[Any, Any], Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        return training_step_loss

    def _function(self, pl_module: LightningModule) -> ModelFunction | ShardedFunction:
        """The module's loss on flat parameters (on its shards, when sharded), with the pre-flight's product kind."""
        if is_fully_sharded(pl_module):
            return ShardedFunction(pl_module, self._loss_fn(pl_module))
        return ModelFunction(pl_module, self._loss_fn(pl_module), hvp=self.hvp)

    def _prepare_probe_data(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the probe samples once (this rank's share, on the module's device), then run the pre-flight."""
        if self._base is not None:
            return
        self._check_trainable(pl_module)
        start = time.perf_counter()
        self._draw_and_preflight(trainer, pl_module)
        self._schedule.add(time.perf_counter() - start)  # the pre-flight is the callback's cost too

    def _draw_and_preflight(self, trainer: Trainer, pl_module: LightningModule) -> None:
        k, m = self.num_probe_samples, self.num_added_samples
        with untouched_rng(pl_module.device), user_state_kept(pl_module):
            batch, self._probe_indices = draw_probe_batch(
                trainer, self.probe_data, k + m, self._probe_indices, self._generator
            )
            rank, world = trainer.global_rank, trainer.world_size
            device = pl_module.device
            # added samples taken by all processes together (sharded models, DDP measuring by rows): all on each
            together = self._rows.plan(
                world,
                is_fully_sharded(pl_module),
                D=self.num_eigenvectors,
                max_basis=self.max_basis,
                N=num_trainable(pl_module),
            )
            own_added = list(range(k, k + m)) if together else list(range(k + rank, k + m, world))
            with torch.inference_mode(False):
                base = _cast_batch(select(batch, list(range(rank, k, world))), device=device)
                added = _cast_batch(select(batch, own_added), device=device)
                base, added = clone(base), clone(added)
            fn = self._function(pl_module)
            if isinstance(fn, ShardedFunction):
                report = self._call_user(
                    lambda: sharded_preflight(fn, base, seed=self.seed), "the base samples (pre-flight)"
                )
                self._adopt_rows(fn)
            else:
                report = self._call_user(
                    lambda: preflight(fn, base, added, seed=self.seed), "the base samples (pre-flight)"
                )
                several = world > 1 and torch.distributed.is_initialized()
                self._adopt_rows(RowShards(fn.num_params, fn.device) if several else None)
        self._base, self._added = base, added
        self.hvp_in_use = report.hvp_kind
        if report.fallback_reason is not None:
            rank_zero_info(
                "CurvatureStabilityCallback: this model has no second derivatives here "
                f"({report.fallback_reason}); Hessian-vector products are taken by finite differences of gradients "
                "(hvp='finite_difference', two gradient evaluations per product)."
            )
        if report.autograd_warning is not None:
            self._warn_once("autograd", f"{report.autograd_warning}; pass hvp='auto' or 'finite_difference'.")
        if report.difference_warning is not None:
            self._warn_once("difference", f"{report.difference_warning}.")
        if not report.is_mean:
            self._warn_once(
                "mean",
                f"the loss on all {_batch_size(base)} base samples is {report.mean_ratio:.4g} times the "
                "sample-weighted mean of its values on two halves: the criterion assumes a per-sample mean loss "
                "(a sum reduction makes delta2 about k^2 too large; a token-weighted mean over padded sequences "
                "weighs samples unequally). Return the mean loss over the batch's samples.",
            )

    def _adopt_rows(self, shards: ShardedFunction | RowShards | None) -> None:
        """From now on this process holds its rows of the subspace (and of a restored one)."""
        self._basis, dropped = self._rows.adopt(shards, self._basis)
        if dropped:
            self._eigenvalues = None
            self._warn_once("layout", "the checkpoint's subspace has another layout of rows; the refresh is cold.")

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "basis": self._rows.saved(self._basis) if self.save_subspace else None,
            "basis_rows": self._rows.row_counts,
            "eigenvalues": self._eigenvalues.cpu() if self._eigenvalues is not None else None,
            "probe_indices": self._probe_indices,
            "generator_state": self._generator.get_state(),
            "metric_generator_state": self._metric.generator.get_state() if self._metric is not None else None,
            "num_probes": self._schedule.num_probes,
            "schedule": self._schedule.state_dict(),
            "sigma_value": self._sigma_value,
            "num_refreshes": self._num_refreshes,
            "history": [dict(h) for h in self.history],
        }

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            rank_zero_warn(
                f"CurvatureStabilityCallback: the checkpoint holds no state for {self.state_key}; the probe starts "
                "afresh (cold eigensolve, probe samples drawn again)."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # all rows of the subspace: with several processes each takes its own at the pre-flight
        rows = state_dict.get("basis_rows")
        self._basis = self._rows.restore(state_dict.get("basis"), None if rows is None else list(rows))
        self._eigenvalues = state_dict.get("eigenvalues")
        if self._basis is None:
            self._eigenvalues = None
        self._probe_indices = state_dict.get("probe_indices")
        if state_dict.get("generator_state") is not None:
            self._generator.set_state(state_dict["generator_state"])
        if state_dict.get("metric_generator_state") is not None and self._metric is not None:
            self._metric.generator.set_state(state_dict["metric_generator_state"])
        self._schedule.load_state_dict(state_dict.get("schedule", {"num_probes": state_dict.get("num_probes", 0)}))
        if self.sigma == "auto":
            self._sigma_value = float(state_dict.get("sigma_value", self._sigma_value))
        self._num_refreshes = int(state_dict.get("num_refreshes", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._base = self._added = None
