r"""``CurvatureStabilityCallback``: Δ₂^(D) at every validation epoch of a Lightning ``Trainer``.

The callback only schedules, handles Lightning's contexts and logs; the mathematics lives in
:mod:`lightning_curvprobe.functional` and :class:`~lightning_curvprobe.CurvatureStability`.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate
from typing_extensions import override

from lightning_curvprobe._checks import (
    ESTIMATORS,
    _check_choice,
    _check_int,
    _check_num_eigenvectors,
    _check_positive_float,
)
from lightning_curvprobe.functional._batch import _batch_size, _cast_batch, _slice_batch
from lightning_curvprobe.functional.curve import StabilityCurve, delta2_full_space, select_sigma, stability_curve
from lightning_curvprobe.functional.hvp import (
    HessianOperator,
    ModelFunction,
    NonFiniteProbeError,
    _check_loss,
    _probe_mode,
)
from lightning_curvprobe.functional.lanczos import EigenResult, _default_num_extra
from lightning_curvprobe.functional.probe import _eigensolve
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

    A probe that meets a non-finite loss or Hessian-vector product logs NaN and warns once; Lightning's
    ``EarlyStopping(check_finite=True)`` (its default) then stops the run — a NaN probe usually means the training
    itself diverged. The callback never changes the training it watches: weights, ``.grad``, optimizer state,
    BatchNorm buffers, train/eval modes and the global RNG streams are left exactly as they were.

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
    ) -> None:
        super().__init__()
        self.num_eigenvectors = _check_int("num_eigenvectors", num_eigenvectors, minimum=1)
        self.sigma: float | str = "auto" if sigma == "auto" else _check_sigma(sigma)
        self.num_probe_samples = _check_int("num_probe_samples", num_probe_samples, minimum=1)
        self.num_added_samples = _check_int("num_added_samples", num_added_samples, minimum=1)
        self.estimator = _check_choice("estimator", estimator, ESTIMATORS)
        self.num_mc_samples = _check_int("num_mc_samples", num_mc_samples, minimum=1)
        self.refresh_every_n_epochs = _check_int("refresh_every_n_epochs", refresh_every_n_epochs, minimum=1)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(pl_module, batch) or None, got {loss_fn!r}.")
        self.loss_fn = loss_fn
        if probe_data is not None:
            n = _probe_data_len(probe_data)
            need = num_probe_samples + num_added_samples
            if n < need:
                raise ValueError(
                    f"`probe_data` must hold at least num_probe_samples + num_added_samples = {need} samples, got {n}."
                )
        self.probe_data = probe_data
        self.tol = _check_positive_float("tol", tol)
        self.max_basis = None if max_basis is None else _check_int("max_basis", max_basis, minimum=2)
        if basis_device is not None:
            try:
                torch.device(basis_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"`basis_device` must be None or a torch device string such as 'cpu' or 'cuda:0', got "
                    f"{basis_device!r}."
                ) from err
        self.basis_device = basis_device
        self.quadratic_error_samples = _check_int("quadratic_error_samples", quadratic_error_samples, minimum=0)
        if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
            raise ValueError(f"`log_prefix` must be a non-empty string not ending in '/', got {log_prefix!r}.")
        self.log_prefix = log_prefix
        self.seed = _check_int("seed", seed, minimum=0)
        self.save_subspace = bool(save_subspace)
        self.max_quadratic_error = _check_positive_float("max_quadratic_error", max_quadratic_error)
        if sample_sizes is not None:
            sizes = list(sample_sizes)
            ok = all(isinstance(v, int) and not isinstance(v, bool) for v in sizes)
            if not sizes or not ok or any(v < 1 for v in sizes) or sizes != sorted(set(sizes)):
                raise ValueError(
                    "`sample_sizes` must be a non-empty strictly increasing list of positive ints, "
                    f"got {sample_sizes!r}."
                )
            if sizes[-1] > num_probe_samples:
                raise ValueError(
                    f"`sample_sizes` must not exceed num_probe_samples={num_probe_samples}, got {sample_sizes!r}."
                )
            sample_sizes = sizes
        self.sample_sizes = sample_sizes
        self.sufficient_tolerance = (
            None
            if sufficient_tolerance is None
            else _check_positive_float("sufficient_tolerance", sufficient_tolerance)
        )
        self.full_space_samples = _check_int("full_space_samples", full_space_samples, minimum=0)
        self._sigma_value = 1e-3 if self.sigma == "auto" else float(self.sigma)
        self._warned_plot = False
        # runtime state
        self._generator = torch.Generator().manual_seed(seed)
        self._basis: Tensor | None = None  # (N, D + p) from the last refresh, warm start of the next
        self._eigenvalues: Tensor | None = None
        self._probe_indices: list[int] | None = None
        self._base: Any = None
        self._added: Any = None
        self._num_probes = 0
        self._num_refreshes = 0
        self._warned_nonfinite = False
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
        _check_strategy(trainer)
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError(
                "`loss_fn` must be given when the LightningModule uses manual optimization "
                "(automatic_optimization=False): its training_step steps the optimizers itself, so the callback "
                "cannot call it to get the loss. Pass loss_fn=lambda module, batch: <mean loss of batch>; "
                "got loss_fn=None."
            )
        if _num_trainable(pl_module) > 0 or not is_overridden("configure_model", pl_module, LightningModule):
            self._check_trainable(pl_module)
        # else: the layers are built in configure_model, which Lightning calls after this hook; checked at
        # on_train_start / on_validation_start, still before any training step
        world = trainer.world_size
        if world > 1 and (self.sample_sizes is not None or self.full_space_samples > 0):
            raise ValueError(
                "`sample_sizes` and `full_space_samples` are supported in single-process runs only for now, got "
                f"sample_sizes={self.sample_sizes!r}, full_space_samples={self.full_space_samples} with "
                f"{world} processes."
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
                sync_on_compute=True,
            )

    def _check_trainable(self, pl_module: LightningModule) -> None:
        """The module's trainable parameters admit the configured ``D`` and ``max_basis``."""
        num_params = _num_trainable(pl_module)
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
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare_probe_data(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self._base is None:
            self._prepare_probe_data(trainer, pl_module)

    # ------------------------------------------------------------------ probe

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._base is None:
            self._prepare_probe_data(trainer, pl_module)
        values = self._probe(trainer, pl_module)
        self._log(trainer, pl_module, values)

    def _probe(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        assert self._metric is not None
        refresh = self._basis is None or self._num_probes % self.refresh_every_n_epochs == 0
        self._num_probes += 1
        metric = self._metric.to(pl_module.device)
        nan = float("nan")
        try:
            with _untouched_rng(pl_module.device):
                fn = ModelFunction(pl_module, self._loss_fn(pl_module))
                world = trainer.world_size
                reduce_fn = _all_reduce_sum if world > 1 and torch.distributed.is_initialized() else None
                k_local = _batch_size(self._base)
                scale = k_local / self.num_probe_samples
                op = self._call_user(
                    lambda: HessianOperator(fn, self._base, scale=scale, reduce_fn=reduce_fn, where="the base samples"),
                    "the base samples",
                )
                if self._basis is not None and self._basis.shape[0] != fn.num_params:
                    self._trainable_set_changed(self._basis.shape[0], fn.num_params)
                    refresh = True
                prev = self._basis
                hvps = 0
                if refresh:
                    if prev is None:
                        warm = None
                    elif self.basis_device is None:
                        warm = prev.to(device=fn.device, dtype=fn.dtype)
                    else:  # stays where it is kept: the solver moves it one column at a time
                        warm = prev.to(dtype=fn.dtype)
                    eig = self._call_user(
                        lambda: _eigensolve(
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
                    hvps = eig.hvps
                    self.last_result = eig
                    if not eig.converged:
                        rank_zero_warn(
                            f"CurvatureStabilityCallback: the eigensolver stopped after {eig.hvps} Hessian-vector "
                            f"products without reaching tol={self.tol}; raise `max_basis` or `tol`."
                        )
                    D = self.num_eigenvectors
                    U_prev = None if prev is None else prev[:, :D].to(eig.eigenvectors)
                    overlap = nan if U_prev is None else float((U_prev.T @ eig.eigenvectors).pow(2).sum()) / D
                    self._basis = eig.basis.detach()
                    self._eigenvalues = eig.eigenvalues.detach()
                    self._num_refreshes += 1
                else:
                    overlap = 1.0
                assert self._basis is not None and self._eigenvalues is not None
                U = self._basis[:, : self.num_eigenvectors].to(device=fn.device, dtype=fn.dtype)
                if refresh:
                    projected = self._eigenvalues.to(U)  # U^T H_k U = diag(eigenvalues) at these weights
                else:
                    # the kept U is no eigenbasis at the current weights: U^T H_k U from D products (one block)
                    HU = self._call_user(lambda: op.matvec(U), "the base samples (projected Hessian)")
                    projected = U.T @ HU
                    projected = 0.5 * (projected + projected.T)
                    self._eigenvalues = torch.linalg.eigvalsh(projected).flip(0)
                if refresh and self.sigma == "auto":
                    selection = self._call_user(
                        lambda: select_sigma(
                            pl_module,
                            self._loss_fn(pl_module),
                            self._base,
                            U,
                            self._eigenvalues.to(U),  # type: ignore[union-attr]
                            max_quadratic_error=self.max_quadratic_error,
                            generator=self._generator,
                        ),
                        "the base samples (sigma selection)",
                    )
                    self._sigma_value = float(trainer.strategy.broadcast(selection.sigma))
                metric.sigma = self._sigma_value
                metric.reset()
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
                            base_loss=op.local_loss / scale,
                            base_grad=op.local_gradient / scale,
                        ),
                        "the added samples",
                    )
                except NonFiniteProbeError as err:
                    failed = err
                # the added samples and probe points are this rank's own: all ranks learn of a failure on any of
                # them before compute() (which every rank must call, or the others wait for ever)
                if reduce_fn is not None:
                    flag = reduce_fn(torch.tensor([float(failed is not None)], device=fn.device))
                    if failed is None and float(flag[0]) > 0:
                        failed = NonFiniteProbeError("a probe value is not finite on another process.")
                if failed is not None:
                    metric.reset()
                    raise failed
                delta2 = float(metric.compute())
                details = metric.details
                extra = self._extras(pl_module, refresh)
            values = {
                "delta2": delta2,
                "delta1": float(details["delta1"]),
                "lambda_max": float(self._eigenvalues[0]),
                "subspace_overlap": overlap,
                "hvps": float(hvps),
                "quadratic_error": float(details["quadratic_error"]),
                "sigma": self._sigma_value,
            }
            if "delta2_full" in extra:
                extra["subspace_ratio"] = delta2 / extra["delta2_full"] if extra["delta2_full"] > 0 else nan
            values.update(extra)
            if self.num_added_samples > 1:
                values["delta2_stderr"] = float(details["delta2_stderr"])
        except NonFiniteProbeError as err:
            if not self._warned_nonfinite:
                rank_zero_warn(
                    f"CurvatureStabilityCallback: {err} Logging NaN; the model is untouched and training goes on "
                    "(a NaN probe usually means the training itself diverged)."
                )
                self._warned_nonfinite = True
            values = {key: nan for key in _KEYS}
            values["hvps"] = 0.0
            values["sigma"] = self._sigma_value
            if self.num_added_samples > 1:
                values["delta2_stderr"] = nan
        self.history.append({"epoch": float(trainer.current_epoch), **values})
        return values

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
        except Exception as err:  # noqa: BLE001 - re-raised with context
            raise RuntimeError(
                f"CurvatureStabilityCallback: evaluating the loss on {where} failed (probe {self._num_probes}, "
                f"{self.num_probe_samples} base samples, {self.num_added_samples} added samples): "
                f"{type(err).__name__}: {err}"
            ) from err

    def _log(self, trainer: Trainer, pl_module: LightningModule, values: dict[str, float]) -> None:
        dtype = self._eigenvalues.dtype if self._eigenvalues is not None else torch.float32
        for key, value in values.items():
            pl_module.log(
                f"{self.log_prefix}/{key}",
                torch.tensor(value, dtype=dtype),
                on_step=False,
                on_epoch=True,
                prog_bar=key == "delta2",
                logger=True,
                # identical on every rank already; the (exact) mean only silences Lightning's DDP advice
                sync_dist=trainer.world_size > 1,
            )
        if trainer.is_global_zero and self._eigenvalues is not None and not math.isnan(values["delta2"]):
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is not None and type(logger).__name__ == "TensorBoardLogger":
                    # the step Lightning gives the epoch's scalars (the last optimizer step), so the two line up
                    step = max(trainer.global_step - 1, 0)
                    experiment.add_histogram(f"{self.log_prefix}/eigenvalues", self._eigenvalues.float().cpu(), step)
                    if values.get("hvps", 0) > 0:  # a refresh: draw the pictures
                        self._log_figures(experiment, step)

    def _log_figures(self, experiment: Any, step: int) -> None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            if not self._warned_plot:
                rank_zero_info(
                    "CurvatureStabilityCallback: install matplotlib (pip install 'lightning-curvprobe[plot]') to get "
                    "the spectrum and sample-growth images in TensorBoard; skipping them."
                )
                self._warned_plot = True
            return
        assert self._eigenvalues is not None
        eig = self._eigenvalues.detach().double().cpu()
        fig = Figure(figsize=(4.5, 3.2), dpi=100)
        ax = fig.add_subplot()
        ax.plot(range(1, len(eig) + 1), eig.tolist(), "o-")
        ax.set_xlabel("index i")
        ax.set_ylabel("Hessian eigenvalue λ_i")
        ax.set_title(f"top-{len(eig)} spectrum")
        fig.tight_layout()
        experiment.add_figure(f"{self.log_prefix}/spectrum", fig, step)
        curve = self.last_curve
        if curve is not None:
            fig = Figure(figsize=(4.5, 3.2), dpi=100)
            ax = fig.add_subplot()
            kp1 = [k + 1 for k in curve.sample_sizes]
            for name, vals, slope, icpt in (
                ("Δ₂^(D)", curve.delta2, curve.decay_exponent, curve.intercept),
                ("Δ₁", curve.delta1, curve.delta1_exponent, curve.delta1_intercept),
            ):
                line = ax.loglog(kp1, [float(v) for v in vals], "o", label=f"{name}: slope {slope:.2f}")[0]
                if math.isfinite(slope):
                    ax.loglog(kp1, [math.exp(icpt) * x**slope for x in kp1], "-", color=line.get_color())
            ax.set_xticks(kp1, labels=[str(x) for x in kp1])
            ax.set_xticks([], minor=True)
            ax.set_xlabel("k + 1")
            ax.set_ylabel("criterion")
            ax.legend(fontsize=8)
            fig.tight_layout()
            experiment.add_figure(f"{self.log_prefix}/sample_growth", fig, step)

    # ------------------------------------------------------------------ data and loss

    def _loss_fn(self, pl_module: LightningModule) -> Callable[[Any, Any], Tensor]:
        if self.loss_fn is not None:
            return self.loss_fn
        return _training_step_loss

    def _prepare_probe_data(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the probe samples once: this rank's share of the base and added sets, on the module's device."""
        if self._base is not None:
            return
        self._check_trainable(pl_module)
        k, m = self.num_probe_samples, self.num_added_samples
        with _untouched_rng(pl_module.device):
            if self.probe_data is not None:
                batch = _take(self.probe_data, list(range(k + m)), collate=default_collate)
            else:
                batch = self._draw_from_train_loader(trainer, k + m)
        rank, world = trainer.global_rank, trainer.world_size
        base_idx = list(range(rank, k, world))
        added_idx = list(range(k + rank, k + m, world))
        device = pl_module.device
        with torch.inference_mode(False):
            base = _cast_batch(_select(batch, base_idx), device=device)
            added = _cast_batch(_select(batch, added_idx), device=device)
            self._base = _clone(base)
            self._added = _clone(added)
        # the loss must be a finite scalar before any training step
        fn = ModelFunction(pl_module, self._loss_fn(pl_module))
        with _untouched_rng(device), _probe_mode(pl_module), torch.no_grad():
            loss = self._call_user(lambda: fn.loss(fn.current(), fn.prepare(self._base)), "the base samples")
            _check_loss(loss, "the probe's base samples")

    def _draw_from_train_loader(self, trainer: Trainer, n: int) -> Any:
        loader = trainer.train_dataloader
        datamodule = getattr(trainer, "datamodule", None)
        if loader is None and datamodule is not None and hasattr(datamodule, "train_dataloader"):
            try:
                loader = datamodule.train_dataloader()
            except Exception as err:  # noqa: BLE001 - e.g. setup("validate") built no training set
                raise ValueError(
                    "`probe_data` must be given when the training dataloader is not available: outside fit the "
                    f"datamodule's train_dataloader() failed ({type(err).__name__}: {err}); got probe_data=None."
                ) from err
        if isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if isinstance(loader, dict) and loader:
            loader = next(iter(loader.values()))
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "`probe_data` must be given when the training dataloader is not available (e.g. in "
                f"trainer.validate() without a datamodule), got probe_data=None and train dataloader {loader!r}."
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            batches, count = [], 0
            for batch in loader:
                batches.append(batch)
                count += _batch_size(batch)
                if count >= n:
                    break
            if count < n:
                raise ValueError(f"the training dataloader yielded {count} samples, fewer than k + m = {n}.")
            from lightning_curvprobe.functional._batch import _cat_batches

            return _slice_batch(_cat_batches(batches), 0, n)
        size = len(dataset)  # type: ignore[arg-type]
        if size < n:
            raise ValueError(
                f"the training dataset holds {size} samples, fewer than num_probe_samples + num_added_samples = {n}."
            )
        if self._probe_indices is None:
            perm = torch.randperm(size, generator=self._generator)[:n]
            self._probe_indices = [int(i) for i in perm]
        return _take(dataset, self._probe_indices, collate=loader.collate_fn or default_collate)

    # ------------------------------------------------------------------ state

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "basis": self._basis.cpu() if (self.save_subspace and self._basis is not None) else None,
            "eigenvalues": self._eigenvalues.cpu() if self._eigenvalues is not None else None,
            "probe_indices": self._probe_indices,
            "generator_state": self._generator.get_state(),
            "metric_generator_state": self._metric.generator.get_state() if self._metric is not None else None,
            "num_probes": self._num_probes,
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
        self._basis = state_dict.get("basis")
        self._eigenvalues = state_dict.get("eigenvalues")
        if self._basis is None:
            self._eigenvalues = None
        self._probe_indices = state_dict.get("probe_indices")
        if state_dict.get("generator_state") is not None:
            self._generator.set_state(state_dict["generator_state"])
        if state_dict.get("metric_generator_state") is not None and self._metric is not None:
            self._metric.generator.set_state(state_dict["metric_generator_state"])
        self._num_probes = int(state_dict.get("num_probes", 0))
        if self.sigma == "auto":
            self._sigma_value = float(state_dict.get("sigma_value", self._sigma_value))
        self._num_refreshes = int(state_dict.get("num_refreshes", 0))
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._base = self._added = None


def _training_step_loss(pl_module: Any, batch: Any) -> Tensor:
    """The loss returned by ``training_step(batch, 0)``, with the module's logging silenced."""
    module = pl_module
    noop = _noop
    had = {name: name in module.__dict__ for name in ("log", "log_dict")}
    module.__dict__["log"] = noop
    module.__dict__["log_dict"] = noop
    try:
        out = module.training_step(batch, 0)
    finally:
        for name, present in had.items():
            if not present:
                del module.__dict__[name]
    if isinstance(out, dict):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ValueError(
            "`loss_fn` is None, so the loss is taken from training_step's output, which must be a tensor or a dict "
            f"with 'loss'; got {type(out).__name__}. Pass loss_fn=lambda module, batch: <mean loss of batch>."
        )
    return out


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


def _check_strategy(trainer: Trainer) -> None:
    name = type(trainer.strategy).__name__
    if any(s in name for s in ("FSDP", "DeepSpeed", "ModelParallel")):
        raise ValueError(
            f"CurvatureStabilityCallback supports single-device, DDP and ddp_spawn strategies; sharded strategies "
            f"are not supported yet, got strategy {name}."
        )


@contextlib.contextmanager
def _untouched_rng(device: torch.device) -> Iterator[None]:
    """Restore the global torch (CPU and CUDA), Python and NumPy RNG states on exit."""
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np = None  # type: ignore[assignment]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)


def _probe_data_len(data: Any) -> int:
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return len(data)  # type: ignore[arg-type]
    if isinstance(data, IterableDataset):
        raise TypeError("`probe_data` must be a map-style Dataset or a batch of tensors, got an IterableDataset.")
    return _batch_size(data, "probe_data")


def _take(data: Any, indices: Sequence[int], collate: Callable[[list[Any]], Any]) -> Any:
    if isinstance(data, Dataset):
        return collate([data[i] for i in indices])
    return _select(data, list(indices))


def _select(batch: Any, indices: list[int]) -> Any:
    from lightning_curvprobe.functional._batch import _map_tensors

    size = _batch_size(batch)
    index = torch.tensor(indices, dtype=torch.long)
    return _map_tensors(batch, lambda t: t[index.to(t.device)] if t.dim() > 0 and t.shape[0] == size else t)


def _clone(batch: Any) -> Any:
    from lightning_curvprobe.functional._batch import _map_tensors

    return _map_tensors(batch, lambda t: t.detach().clone())


def _num_trainable(module: LightningModule) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _check_sigma(sigma: Any) -> float:
    try:
        return _check_positive_float("sigma", sigma)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("positive finite float", "positive finite float or 'auto'", 1)) from None
