"""The overhead budget (``max_overhead``) and ``StabilityEarlyStopping`` against Lightning's own callbacks."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from test_callback import fit, probe

from lightning_curvprobe import StabilityEarlyStopping
from lightning_curvprobe._schedule import ProbeSchedule

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:.*LeafSpec.*")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_no_budget_follows_the_cadence():
    schedule = ProbeSchedule(3, max_overhead=None, clock=Clock())
    schedule.start()
    actions = []
    for _ in range(7):
        actions.append(schedule.decide(has_subspace=bool(actions)))
        schedule.record(actions[-1], seconds=1.0, solver_seconds=0.5, products=10, dimension=2)
    assert actions == ["refresh", "reuse", "reuse", "refresh", "reuse", "reuse", "refresh"]


@pytest.mark.parametrize("budget", [0.02, 0.05, 0.2])
def test_budget_bounds_the_cumulative_overhead(budget):
    """Training steps of 1 s, validation every 4 steps; a refresh costs 3 s (1 s outside 20 products), a reuse 1.5 s.

    After the first probe, the cumulative probe time never exceeds the budget's allowance by more than nothing:
    every later probe is taken only when its estimated (here: exact) cost fits.
    """
    clock = Clock()
    schedule = ProbeSchedule(1, max_overhead=budget, clock=clock)
    schedule.start()
    cost = {"refresh": 3.0, "reuse": 1.5}
    taken = []
    for epoch in range(400):
        clock.now += 4.0  # training
        action = schedule.decide(has_subspace=bool(taken))
        if action != "skip":
            taken.append(action)
            clock.now += cost[action]
            schedule.record(action, seconds=cost[action], solver_seconds=2.0, products=20, dimension=5)
        else:
            schedule.record("skip", seconds=0.0)
        if epoch > 0 and action != "skip":
            assert schedule.probe_seconds <= budget * schedule.train_seconds() + 1e-9
    assert taken[0] == "refresh"
    assert schedule.overhead() <= budget + 1e-9
    # the budget is used, not wasted: within one probe of the allowance at the end
    assert schedule.probe_seconds >= budget * schedule.train_seconds() - max(cost.values())
    if budget >= 0.2:
        assert "refresh" in taken[1:]  # a generous budget refreshes again
    assert schedule.num_skipped + len(taken) == 400


def test_a_reuse_is_estimated_before_it_is_measured():
    schedule = ProbeSchedule(1, max_overhead=0.1, clock=Clock())
    schedule.record("refresh", seconds=3.0, solver_seconds=2.0, products=20, dimension=5)
    # 1 s outside the solver + D = 5 products of 0.1 s
    assert schedule.estimate("reuse") == pytest.approx(1.5)
    schedule.record("reuse", seconds=1.2)
    assert schedule.estimate("reuse") == 1.2 and schedule.estimate("refresh") == 3.0 and schedule.estimate("skip") == 0


def test_schedule_state_round_trip():
    clock = Clock()
    schedule = ProbeSchedule(2, max_overhead=0.1, clock=clock)
    schedule.start()
    clock.now = 5.0
    schedule.record("refresh", seconds=1.0, solver_seconds=0.5, products=10, dimension=2)
    schedule.record("skip", seconds=0.0)
    state = schedule.state_dict()
    other = ProbeSchedule(2, max_overhead=0.1, clock=Clock())
    other.load_state_dict(state)
    assert other.state_dict() == state and other.elapsed() == 5.0 and other.train_seconds() == 4.0
    assert all(isinstance(v, (int, float, dict)) for v in state.values())  # weights_only-loadable


def _tiny_budget_fit(tmp_path, callbacks, **kw):
    return fit(tmp_path, callbacks, max_epochs=6, **kw)


def test_skipped_epochs_do_not_fool_early_stopping_or_checkpointing(tmp_path):
    """A budget so small that every probe after the first is skipped.

    Lightning's EarlyStopping sees the stale first value at every later epoch, counts it as no improvement and stops
    after ``patience`` epochs; StabilityEarlyStopping only checks when the probe measured and lets the run finish.
    ModelCheckpoint monitoring the key neither raises nor saves on skipped epochs.
    """
    budget = probe(max_overhead=1e-9)
    trainer, _ = _tiny_budget_fit(tmp_path, [budget, EarlyStopping(monitor="curvprobe/delta2", patience=2)])
    assert len(budget.history) == 1 and budget.measured_epoch == 0
    assert trainer.current_epoch == 3  # stopped by stale values: epochs 1, 2 counted as "no improvement"

    budget = probe(max_overhead=1e-9)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", monitor="curvprobe/delta2", save_top_k=1)
    trainer, _ = _tiny_budget_fit(
        tmp_path, [budget, StabilityEarlyStopping(budget, patience=2), ckpt], enable_checkpointing=True
    )
    assert trainer.current_epoch == 6 and not trainer.should_stop  # ran to max_epochs
    assert len(budget.history) == 1 and budget._schedule.num_skipped == 5
    # saved once, when the value was measured: a stale value is never strictly better than the best (with
    # save_top_k > 1 a skipped epoch could fill a free slot with the last measured score)
    assert [p.name for p in (tmp_path / "ck").glob("*.ckpt")] == ["epoch=0-step=6.ckpt"]
    assert "curvprobe/overhead" in trainer.callback_metrics


def test_stability_early_stopping_stops_on_measured_epochs(tmp_path):
    """Without a budget every epoch measures: the subclass behaves exactly as EarlyStopping."""
    runs = {}
    for cls in (EarlyStopping, StabilityEarlyStopping):
        cb = probe()
        stop = cls(monitor="curvprobe/delta2", patience=1) if cls is EarlyStopping else cls(cb, patience=1)
        trainer, _ = fit(tmp_path, [cb, stop], max_epochs=8)
        runs[cls.__name__] = (trainer.current_epoch, stop.wait_count, [h["delta2"] for h in cb.history])
    assert runs["EarlyStopping"] == runs["StabilityEarlyStopping"]


def test_budget_leaves_training_bit_identical(tmp_path):
    _, plain = fit(tmp_path, [], max_epochs=4)
    cb = probe(max_overhead=0.05)
    _, probed = fit(tmp_path, [cb], max_epochs=4)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in probed.state_dict().items())
    assert len(cb.history) >= 1 and all(math.isfinite(h["overhead"]) for h in cb.history)
    # the pre-flight before the first step is the callback's cost too: counted on top of the probes' own time
    assert cb._schedule.probe_seconds > sum(h["probe_seconds"] for h in cb.history if math.isfinite(h["probe_seconds"]))


def test_bad_max_overhead_is_refused():
    with pytest.raises(ValueError, match=r"`max_overhead` must be a positive finite float, got -0.1"):
        probe(max_overhead=-0.1)
    with pytest.raises(TypeError, match=r"`probe` must be a CurvatureStabilityCallback, got EarlyStopping"):
        StabilityEarlyStopping(EarlyStopping(monitor="x"))
