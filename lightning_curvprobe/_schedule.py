r"""When to probe: the refresh cadence and the overhead budget of :class:`CurvatureStabilityCallback`.

At each validation epoch the callback asks :class:`ProbeSchedule` for one of three actions:

- ``"refresh"``: a new top-``D`` subspace (warm-started eigensolve), then the criterion in it;
- ``"reuse"``: the kept subspace, with :math:`U^\top H_k U` at the current weights (``D`` products in one block), then
  the criterion (exact for that :math:`U`);
- ``"skip"``: nothing is probed and no probe value is logged (only ``<prefix>/overhead``).

Without a budget (``max_overhead=None``) every validation epoch probes and the cadence alone decides between refresh
and reuse (``refresh_every_n_epochs``). With ``max_overhead = f`` the schedule keeps the cumulative probe time within
``f`` times the training time (the fit's wall time outside the probe, validation loops included): it takes the
cadence's action if its estimated cost fits in what the budget has accrued, else a reuse if that fits (once: the next
due refresh is saved up for rather than replaced again), else skips.
The first probe of a run always refreshes (nothing can be reused yet) and counts in full: the probes after it wait
until training has paid for it. Costs are estimated from the last measured probe of each kind (a reuse never measured
yet is estimated from a refresh's non-solver time plus ``D`` of its products).
"""

from __future__ import annotations

import math
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

ACTIONS = ("refresh", "reuse", "skip")


class ProbeSchedule:
    """The cadence and overhead budget of the probe (plain Python, no Lightning).

    Args:
        refresh_every_n_epochs: refresh every this many probes (reuse in between).
        max_overhead: the budget, probe time over training time (``None`` = no budget).
        clock: a monotonic clock in seconds (tests pass a fake one).

    Example:
        >>> now = [0.0]
        >>> schedule = ProbeSchedule(1, max_overhead=0.1, clock=lambda: now[0])
        >>> schedule.start()
        >>> schedule.decide(has_subspace=False)  # the first probe always refreshes
        'refresh'
        >>> now[0] = 10.0; schedule.record("refresh", seconds=2.0, solver_seconds=1.5, products=30, dimension=3)
        >>> now[0] = 20.0; schedule.decide(has_subspace=True)  # 18 s of training allow 1.8 s, 2 s are spent
        'skip'
        >>> now[0] = 30.0; schedule.decide(has_subspace=True)  # 0.8 s left: a reuse (0.5 s + 3 products) fits
        'reuse'
        >>> round(schedule.overhead(), 4)
        0.0714
    """

    def __init__(self, refresh_every_n_epochs: int, max_overhead: float | None, clock: Any = time.perf_counter):
        self.refresh_every_n_epochs = refresh_every_n_epochs
        self.max_overhead = max_overhead
        self._clock = clock
        self.probe_seconds = 0.0  # cumulative, this run (resumed runs continue the count)
        self.elapsed_before = 0.0  # wall time of earlier fits of this run (from a checkpoint)
        self.num_probes = 0
        self.num_skipped = 0
        self._start: float | None = None
        self._cost: dict[str, float] = {}
        self._refresh_rest = math.nan  # a refresh's time outside the solver
        self._seconds_per_product = math.nan
        self._dimension = 0
        self._deferred = False  # the last due refresh was replaced by a reuse

    def start(self) -> None:
        """The fit starts now (training time is counted from here)."""
        self._start = self._clock()

    def elapsed(self) -> float:
        """Wall time of the run so far (this fit and the checkpointed earlier ones)."""
        return self.elapsed_before + (0.0 if self._start is None else self._clock() - self._start)

    def train_seconds(self) -> float:
        """Wall time outside the probe."""
        return max(self.elapsed() - self.probe_seconds, 0.0)

    def overhead(self) -> float:
        """Cumulative probe time over training time (NaN before any training time)."""
        train = self.train_seconds()
        return self.probe_seconds / train if train > 0 else math.nan

    def decide(self, *, has_subspace: bool) -> str:
        """``"refresh"``, ``"reuse"`` or ``"skip"`` for this validation epoch."""
        cadence = "refresh" if not has_subspace or self.num_probes % self.refresh_every_n_epochs == 0 else "reuse"
        if not has_subspace or self.max_overhead is None or self._start is None:
            return cadence
        allowance = self.max_overhead * self.train_seconds() - self.probe_seconds
        # a due refresh that does not fit is replaced by a reuse once; then the budget saves up for the refresh,
        # so that a subspace is never kept for ever just because reuses are cheaper
        options = ("refresh", "reuse") if cadence == "refresh" and not self._deferred else (cadence,)
        for action in options:
            if self.estimate(action) <= allowance:
                return action
        return "skip"

    def estimate(self, action: str) -> float:
        """Expected seconds of ``action`` from the last measured probes (0 for a skip)."""
        if action == "skip":
            return 0.0
        if action in self._cost:
            return self._cost[action]
        if action == "reuse" and math.isfinite(self._refresh_rest):
            return self._refresh_rest + self._dimension * self._seconds_per_product
        return self._cost.get("refresh", 0.0)

    def record(
        self, action: str, *, seconds: float, solver_seconds: float = 0.0, products: int = 0, dimension: int = 0
    ) -> None:
        """A probe of kind ``action`` took ``seconds`` (``solver_seconds`` of it in the eigensolver's products)."""
        if action == "skip":
            self.num_skipped += 1
            return
        due = self.num_probes % self.refresh_every_n_epochs == 0
        self._deferred = action == "reuse" and due and self.num_probes > 0
        self.num_probes += 1
        self.probe_seconds += seconds
        self._cost[action] = seconds
        if action == "refresh" and products > 0:
            self._refresh_rest = max(seconds - solver_seconds, 0.0)
            self._seconds_per_product = solver_seconds / products
            self._dimension = dimension

    def add(self, seconds: float) -> None:
        """Time the callback spent outside a probe (the pre-flight) counts as probe time."""
        self.probe_seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        """The counters a resumed run continues from (plain Python values)."""
        return {
            "probe_seconds": self.probe_seconds,
            "elapsed": self.elapsed(),
            "num_probes": self.num_probes,
            "num_skipped": self.num_skipped,
            "cost": dict(self._cost),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their defaults)."""
        self.probe_seconds = float(state.get("probe_seconds", 0.0))
        self.elapsed_before = float(state.get("elapsed", 0.0))
        self.num_probes = int(state.get("num_probes", self.num_probes))
        self.num_skipped = int(state.get("num_skipped", 0))
        self._cost = {k: float(v) for k, v in state.get("cost", {}).items()}


def no_validation_reason(trainer: Trainer, pl_module: LightningModule) -> str | None:
    """Why no validation epoch (hence no probe) will run in this fit, or None."""
    if not is_overridden("validation_step", pl_module):
        return f"{type(pl_module).__name__} defines no validation_step"
    limit = trainer.limit_val_batches
    if limit == 0:
        return f"limit_val_batches={limit!r}"
    max_epochs = trainer.max_epochs
    every = trainer.check_val_every_n_epoch
    if every is not None and max_epochs is not None and 0 < max_epochs < every and trainer.max_steps == -1:
        return f"check_val_every_n_epoch={every} exceeds max_epochs={max_epochs}"
    return None
