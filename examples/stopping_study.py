"""Does gating early stopping on the curvature probe help? A study on three small real tasks, on a CPU.

Each (task, seed) is trained once for a fixed epoch budget with a ``CurvatureStabilityCallback`` probing at every
validation epoch; every epoch records the validation and held-out test loss and accuracy, the probe's logged values,
the Gaussian-moment decomposition of Δ₂^(D) (``lightning_curvprobe._signals.explain``), the sample-growth curve behind
``sufficient_k``, and the wall time of training, validation and the probe. The callback never changes the training it
watches (bit-identical weights), so every stopping rule can then be replayed on the recorded trace: the rule's stop
epoch, the held-out numbers of the weights it stops with, and its cost (training up to the stop, plus validation and
probes if it needs them) against the fixed budget. A live ``EarlyStopping`` fit per rule kind checks the replay.

Tasks (nothing is downloaded; provenance in ``stopping_study/data/PROVENANCE.md``):

- ``alice``: next-character prediction on *Alice's Adventures in Wonderland* (``paper_reproduction/data/alice29.txt``),
  an embedding + MLP on 16-character contexts; train, validation and test windows come from disjoint parts of the book.
- ``digits``: the 8×8 handwritten digits (UCI optdigits test set, 1797 images), an MLP.
- ``cancer``: Breast Cancer Wisconsin (Diagnostic), 569 rows × 30 features, an MLP.

It writes ``report.md``, ``summary.json`` and PNG figures to ``--out``::

    python examples/stopping_study.py                              # full run (see the report for its time)
    python examples/stopping_study.py --quick --out /tmp/ss        # seconds: tiny budgets, one seed

Figures need matplotlib; without it the report is written without them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared small CPU: no busy-waiting OpenMP threads

import argparse  # noqa: E402
import csv  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback, EarlyStopping  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_curvprobe import CurvatureStabilityCallback  # noqa: E402
from lightning_curvprobe._signals import explain, gaussian_moment_terms  # noqa: E402
from lightning_curvprobe.functional.curve import _sufficient_k, stability_curve  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent
DATA = EXAMPLES / "stopping_study" / "data"
ALICE = EXAMPLES / "paper_reproduction" / "data" / "alice29.txt"
PREFIX = "curvprobe"
STUDY = "curvprobe_study"


# --------------------------------------------------------------------------------------------------------- config


@dataclass
class Config:
    tasks: tuple[str, ...] = ("alice", "digits", "cancer")
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    max_epochs: dict[str, int] = field(default_factory=lambda: {"alice": 16, "digits": 60, "cancer": 60})
    patience: int = 5
    rel_peak_threshold: float = 0.01
    # the probe (as in the quickstart, with more added samples for a tighter standard error)
    num_eigenvectors: int = 10
    sigma: float = 1e-2
    num_probe_samples: int = 64
    num_added_samples: int = 16
    sample_sizes: tuple[int, ...] = (16, 32, 64)
    extra_sigmas: tuple[float, ...] = (1e-3, 1e-1)  # decomposition of the same (a, c, B) at other scales
    # data sizes
    alice_context: int = 16
    alice_windows: tuple[int, int, int] = (24000, 2000, 2000)
    subsample: float = 1.0  # fraction of digits/cancer rows used (quick mode)
    live_checks: tuple[tuple[str, int], ...] = (("cancer", 0), ("digits", 1))
    threads: int = 1
    quick: bool = False


QUICK = Config(
    seeds=(0,),
    max_epochs={"alice": 3, "digits": 4, "cancer": 4},
    patience=2,
    num_eigenvectors=3,
    num_probe_samples=24,
    num_added_samples=6,
    sample_sizes=(12, 24),
    alice_windows=(600, 200, 200),
    subsample=0.4,
    live_checks=(("cancer", 0),),
    quick=True,
)


# ----------------------------------------------------------------------------------------------------------- data


@dataclass
class Split:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    num_features: int


def _split_rows(x: Tensor, y: Tensor, seed: int, subsample: float, num_classes: int) -> Split:
    """Shuffle rows with ``seed`` and split 60/20/20 (after keeping a ``subsample`` fraction)."""
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(y), generator=g)
    perm = perm[: max(30, int(subsample * len(perm)))]
    x, y = x[perm], y[perm]
    n_tr, n_va = int(0.6 * len(y)), int(0.2 * len(y))
    tr, va, te = slice(0, n_tr), slice(n_tr, n_tr + n_va), slice(n_tr + n_va, None)
    return Split(
        TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va]), TensorDataset(x[te], y[te]), num_classes, x.shape[1]
    )


def load_digits(seed: int, cfg: Config) -> Split:
    """UCI optdigits (test set, 1797 images of 8×8 pixels in 0..16), pixels scaled to [0, 1]."""
    with gzip.open(DATA / "digits.csv.gz", "rt") as f:
        rows = [[float(v) for v in line.split(",")] for line in f if line.strip()]
    t = torch.tensor(rows)
    return _split_rows(t[:, :64] / 16.0, t[:, 64].long(), seed, cfg.subsample, 10)


def load_cancer(seed: int, cfg: Config) -> Split:
    """Breast Cancer Wisconsin (Diagnostic): 30 features standardised with the training rows' mean and std."""
    with open(DATA / "breast_cancer.csv", newline="") as f:
        reader = csv.reader(f)
        next(reader)  # header: n_samples, n_features, class names
        rows = [[float(v) for v in r] for r in reader if r]
    t = torch.tensor(rows)
    split = _split_rows(t[:, :30], t[:, 30].long(), seed, cfg.subsample, 2)
    x_tr = split.train.tensors[0]
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-8)
    norm = [TensorDataset((d.tensors[0] - mu) / sd, d.tensors[1]) for d in (split.train, split.val, split.test)]
    return Split(*norm, num_classes=2, num_features=30)


def load_alice_text() -> str:
    """The book as text: CRLF → LF, the trailing end-of-file byte dropped (as in ``paper_reproduction.py``)."""
    return ALICE.read_bytes().decode("ascii").replace("\r\n", "\n").replace("\x1a", "")


def load_alice(seed: int, cfg: Config) -> Split:
    """Character windows of ``alice_context`` characters and the next one, from disjoint parts of the book.

    The first 70 % of the text gives the training windows, the next 15 % the validation windows and the last 15 % the
    test windows, each drawn at random positions (with ``seed``) inside its part.
    """
    text = load_alice_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(ch) for ch in text])
    T = cfg.alice_context
    bounds = [0, int(0.70 * len(ids)), int(0.85 * len(ids)), len(ids)]
    g = torch.Generator().manual_seed(2000 + seed)
    parts = []
    for (lo, hi), n in zip(zip(bounds[:-1], bounds[1:], strict=False), cfg.alice_windows, strict=True):
        starts = lo + torch.randperm(hi - lo - T, generator=g)[:n]
        idx = starts[:, None] + torch.arange(T + 1)[None, :]
        w = ids[idx]
        parts.append(TensorDataset(w[:, :T], w[:, T]))
    return Split(*parts, num_classes=len(vocab), num_features=T)


LOADERS: dict[str, Callable[[int, Config], Split]] = {"alice": load_alice, "digits": load_digits, "cancer": load_cancer}
TASK_LABEL = {
    "alice": "Alice (next character)",
    "digits": "8×8 digits",
    "cancer": "Breast cancer (tabular)",
}
HYPER = {  # learning rate, batch size, width
    "alice": (3e-3, 128, 128),
    "digits": (1e-3, 32, 128),
    "cancer": (3e-4, 16, 64),
}


# ---------------------------------------------------------------------------------------------------------- model


def make_net(task: str, split: Split) -> nn.Module:
    """A small network per task: embedding + MLP for characters, a two-hidden-layer MLP otherwise."""
    width = HYPER[task][2]
    if task == "alice":
        emb = 16
        return nn.Sequential(
            nn.Embedding(split.num_classes, emb),
            nn.Flatten(),
            nn.Linear(emb * split.num_features, width),
            nn.GELU(),
            nn.Linear(width, split.num_classes),
        )
    return nn.Sequential(
        nn.Linear(split.num_features, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, split.num_classes),
    )


class Classifier(L.LightningModule):
    """Cross-entropy classifier; ``val_loss`` is logged on one batch holding the whole validation split."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def probe_loss(module: nn.Module, batch: Any) -> Tensor:
    """The probe's ``loss_fn``: mean cross-entropy of the batch."""
    return F.cross_entropy(module(batch[0]), batch[1])


# ---------------------------------------------------------------------------------------------------- recording


class _Clock(Callback):
    """Stamps the time at its place in the callback list (hooks run in list order).

    The first clock (``first=True``) also stamps the start of each training epoch and of its validation; every clock
    stamps ``name`` at ``on_validation_epoch_end`` and ``name@train_start`` at ``on_train_start``.
    """

    def __init__(self, name: str, stamps: dict[str, float], first: bool = False) -> None:
        self.name, self.stamps, self.first = name, stamps, first

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.stamps[f"{self.name}@train_start"] = time.perf_counter()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.first:
            self.stamps["epoch_start"] = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if self.first:
            self.stamps["val_start"] = time.perf_counter()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.stamps[self.name] = time.perf_counter()


@torch.no_grad()
def _evaluate(net: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a whole split (one batch; eval mode)."""
    x, y = data.tensors
    logits = net(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).double().mean())


def _details(probe: CurvatureStabilityCallback) -> dict[str, Tensor]:
    """The metric's ``details`` of the probe's last compute (what ``explain`` reads)."""
    metric = getattr(probe, "_metric", None)
    details = getattr(metric, "details", None)
    if not details:
        raise RuntimeError("the probe's metric details are not available; this study reads probe._metric.details")
    return details


class Recorder(Callback):
    """Records one row per validation epoch (placed last in the callback list, after both probes).

    Reads the probes' logged values from ``probe.history`` and the coefficients from the metric's ``details``; times
    each probe between the clock stamps around it; then evaluates the train, validation and test sets and the
    sample-growth curve outside the timed regions. Nothing here changes the model or the global RNG streams.
    """

    def __init__(
        self,
        stamps: dict[str, float],
        probe: CurvatureStabilityCallback,
        heldout: CurvatureStabilityCallback | None,
        split: Split,
        cfg: Config,
    ) -> None:
        self.stamps, self.probe, self.heldout, self.split, self.cfg = stamps, probe, heldout, split, cfg
        self.rows: list[dict[str, float]] = []
        self.preflight_s = math.nan
        self.heldout_preflight_s = math.nan
        self._generator = torch.Generator().manual_seed(7)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        s, now = self.stamps, time.perf_counter()
        self.preflight_s = s["heldout_start@train_start"] - s["probe_start@train_start"]
        self.heldout_preflight_s = now - s["heldout_start@train_start"]  # 0 without the held-out probe

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        now = time.perf_counter()
        s = self.stamps
        row: dict[str, float] = {
            "epoch": float(trainer.current_epoch),
            "train_s": s["val_start"] - s["epoch_start"],
            "val_s": s["probe_start"] - s["val_start"],
            "probe_s": s["heldout_start"] - s["probe_start"],
            "heldout_probe_s": now - s["heldout_start"],
        }
        row.update({k: float(v) for k, v in self.probe.history[-1].items() if k != "epoch"})
        details = _details(self.probe)
        previous = [r["delta2"] for r in self.rows if math.isfinite(r["delta2"])]
        signals = explain(details, self.cfg.sigma, self.cfg.num_probe_samples, peak_delta2=max(previous, default=None))
        row.update(signals)
        row["excess"] = signals["delta2_terms/gradient"] + signals["delta2_terms/curvature"]
        # the callback logs explain()'s keys itself; delta2_rel_peak needs the run's peak (peak_delta2), so the study
        # logs its own value under another prefix for the live EarlyStopping check
        pl_module.log(f"{STUDY}/delta2_rel_peak", signals["delta2_rel_peak"], on_step=False, on_epoch=True)
        for sig in self.cfg.extra_sigmas:  # the same (a, c, B) decomposed at other probe scales
            a2, grad, curv = (t.mean() for t in gaussian_moment_terms(details["a"], details["c"], details["B"], sig))
            total = float(a2 + grad + curv)
            row[f"share@{sig:g}"] = float(grad + curv) / total if total != 0 else math.nan
        row[f"share@{self.cfg.sigma:g}"] = row["curvature_share"]
        if self.heldout is not None:
            held = self.heldout.history[-1]
            row["heldout_delta2"] = float(held["delta2"])
            row["heldout_delta2_stderr"] = float(held.get("delta2_stderr", math.nan))
            row["heldout_share"] = explain(_details(self.heldout), self.cfg.sigma, self.cfg.num_probe_samples)[
                "curvature_share"
            ]
        was_training = pl_module.training
        pl_module.eval()
        row["val_loss"], row["val_acc"] = _evaluate(pl_module.net, self.split.val)
        row["test_loss"], row["test_acc"] = _evaluate(pl_module.net, self.split.test)
        row["train_loss"], row["train_acc"] = _evaluate(pl_module.net, self.split.train)
        pl_module.train(was_training)
        if self.heldout is None:  # a light fit (replay check): no curve
            self.rows.append(row)
            return
        # the sample-growth curve behind `sufficient_k` (what the callback's `sample_sizes=` option computes), timed
        t0 = time.perf_counter()
        x, y = self.probe.probe_data
        k, m = self.cfg.num_probe_samples, self.cfg.num_added_samples
        last = getattr(self.probe, "last_result", None)
        curve = stability_curve(
            pl_module,
            probe_loss,
            (x[:k], y[:k]),
            (x[k : k + m], y[k : k + m]),
            sample_sizes=list(self.cfg.sample_sizes),
            num_eigenvectors=self.cfg.num_eigenvectors,
            sigma=self.cfg.sigma,
            generator=self._generator,
            warm_start=None if last is None else last.basis,
        )
        row["curve_s"] = time.perf_counter() - t0
        row["curve_slope"] = float(curve.decay_exponent)
        row["curve_intercept"] = float(curve.intercept)
        self.rows.append(row)


class StderrEarlyStopping(EarlyStopping):
    """``EarlyStopping`` on ``<prefix>/delta2`` whose ``min_delta`` is the current ``<prefix>/delta2_stderr``.

    An epoch counts as an improvement only when Δ₂^(D) falls below the best value so far by more than its own standard
    error over the added samples.
    """

    def __init__(self, prefix: str = PREFIX, **kwargs: Any) -> None:
        super().__init__(monitor=f"{prefix}/delta2", mode="min", **kwargs)
        self.stderr_key = f"{prefix}/delta2_stderr"

    def _run_early_stopping_check(self, trainer: Any) -> None:
        stderr = trainer.callback_metrics.get(self.stderr_key)
        if stderr is not None and math.isfinite(float(stderr)):
            self.min_delta = -float(stderr)  # EarlyStopping keeps min_delta negative in mode "min"
        super()._run_early_stopping_check(trainer)


def _probe(cfg: Config, seed: int, data: tuple[Tensor, Tensor], prefix: str) -> CurvatureStabilityCallback:
    return CurvatureStabilityCallback(
        num_eigenvectors=cfg.num_eigenvectors,
        sigma=cfg.sigma,
        num_probe_samples=cfg.num_probe_samples,
        num_added_samples=cfg.num_added_samples,
        loss_fn=probe_loss,
        probe_data=data,
        log_prefix=prefix,
        seed=seed,
    )


def fit(
    task: str, seed: int, cfg: Config, extra_callbacks: list[Callback] | None = None, light: bool = False
) -> dict[str, Any]:
    """Train one (task, seed) with two probes at every epoch and return the recorded trace.

    The main probe takes its ``k`` base and ``m`` added samples from the training split (the callback's default); the
    second (prefix ``curvprobe_heldout``) has the same base samples and ``m`` added samples from the validation split.
    ``light=True`` (the replay check) runs the main probe only and skips the sample-growth curve.
    """
    torch.set_num_threads(cfg.threads)
    split = LOADERS[task](seed, cfg)
    lr, batch_size, _ = HYPER[task]
    L.seed_everything(seed, verbose=False)
    module = Classifier(make_net(task, split), lr)
    k, m = cfg.num_probe_samples, cfg.num_added_samples
    g = torch.Generator().manual_seed(3000 + seed)
    idx = torch.randperm(len(split.train), generator=g)[: k + m]
    x_tr, y_tr = split.train.tensors
    x_va, y_va = split.val.tensors
    vdx = torch.randperm(len(split.val), generator=g)[:m]
    probe = _probe(cfg, seed, (x_tr[idx], y_tr[idx]), PREFIX)  # first k base, next m added
    heldout_data = (torch.cat([x_tr[idx[:k]], x_va[vdx]]), torch.cat([y_tr[idx[:k]], y_va[vdx]]))
    heldout = None if light else _probe(cfg, seed, heldout_data, f"{PREFIX}_heldout")
    stamps: dict[str, float] = {}
    recorder = Recorder(stamps, probe, heldout, split, cfg)
    callbacks: list[Callback] = [
        _Clock("probe_start", stamps, first=True),
        probe,
        _Clock("heldout_start", stamps),
        *([] if heldout is None else [heldout]),
        recorder,
        *(extra_callbacks or []),
    ]
    trainer = L.Trainer(
        max_epochs=cfg.max_epochs[task],
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    train_loader = DataLoader(split.train, batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(split.val, batch_size=len(split.val))
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=".*but have no logger configured.*")
        trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - t0
    return {
        "task": task,
        "seed": seed,
        "rows": recorder.rows,
        "preflight_s": recorder.preflight_s,
        "heldout_preflight_s": recorder.heldout_preflight_s,
        "fit_wall_s": wall,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "num_params": sum(p.numel() for p in module.parameters()),
        "steps_per_epoch": len(train_loader),
        "epochs_run": len(recorder.rows),
    }


# --------------------------------------------------------------------------------------------------------- rules


def early_stopping(values: list[float], patience: int, min_delta: list[float] | float = 0.0) -> int:
    """Lightning's ``EarlyStopping(mode="min")`` replayed: the index of the epoch after which training stops.

    An epoch improves when its value is below the best so far by more than ``min_delta`` (per epoch if a list); the run
    stops after ``patience`` epochs in a row without improvement, or at a non-finite value (``check_finite``); without
    a stop, the last epoch.
    """
    best, wait = math.inf, 0
    for e, v in enumerate(values):
        md = min_delta[e] if isinstance(min_delta, list) else min_delta
        if not math.isfinite(v):
            return e
        if v < best - (md if math.isfinite(md) else 0.0):
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return e
    return len(values) - 1


def change_z(values: list[float], stderr: list[float]) -> list[float]:
    """Change between consecutive probes in units of its standard error: (Δ_t − Δ_{t−1}) / √(se_t² + se_{t−1}²)."""
    out = [math.nan]
    for t in range(1, len(values)):
        se = math.sqrt(stderr[t] ** 2 + stderr[t - 1] ** 2)
        out.append((values[t] - values[t - 1]) / se if se > 0 else math.nan)
    return out


def first_run(flags: list[bool], patience: int) -> int:
    """Index of the epoch that ends the first run of ``patience`` consecutive True flags (last epoch if none)."""
    run = 0
    for e, f in enumerate(flags):
        run = run + 1 if f else 0
        if run >= patience:
            return e
    return len(flags) - 1


@dataclass
class Rule:
    """A stopping rule: its stop epoch on a trace, what it costs beyond training (per-epoch columns of the trace and
    one-off pre-flight costs), and the logged value it monitors, if any (for the best-checkpoint variant)."""

    name: str
    label: str
    costs: tuple[str, ...]
    stop: Callable[[dict[str, Any], Config], int]
    monitor: str | None = None


def _col(trace: dict[str, Any], key: str) -> list[float]:
    return [float(r[key]) for r in trace["rows"]]


def threshold_stop(values: list[float], threshold: float) -> int:
    """``EarlyStopping(mode="min", stopping_threshold=threshold)`` with an endless patience, replayed: the first epoch
    whose value is below ``threshold`` (or not finite); without one, the last epoch."""
    for e, v in enumerate(values):
        if not math.isfinite(v) or v < threshold:
            return e
    return len(values) - 1


def _sufficient_stop(trace: dict[str, Any], cfg: Config, fraction: float = 0.01) -> int:
    """Stop once ``sufficient_k`` ≤ the training-set size ``n`` at the tolerance ``fraction`` × the largest fitted
    Δ₂^(D)(n) so far, i.e. once the fitted curve at the data size in hand has fallen to ``fraction`` of its peak."""
    n = trace["n_train"]
    top = -math.inf
    for e, r in enumerate(trace["rows"]):
        fitted = math.exp(r["curve_intercept"] + r["curve_slope"] * math.log(n + 1.0))
        top = max(top, fitted) if math.isfinite(fitted) else top
        sk = _sufficient_k(r["curve_slope"], r["curve_intercept"], fraction * top)
        if sk is not None and sk <= n:
            return e
    return len(trace["rows"]) - 1


def _stop_change_z(t: dict[str, Any], c: Config) -> int:
    z = change_z(_col(t, "delta2"), _col(t, "delta2_stderr"))
    return first_run([not (v < -1.0) for v in z], c.patience)


PROBE = ("probe_s", "preflight_s")
RULES = [
    Rule("fixed", "fixed budget (no validation, no probe)", (), lambda t, c: len(t["rows"]) - 1),
    Rule(
        "val_loss",
        "EarlyStopping(val_loss, patience)",
        ("val_s",),
        lambda t, c: early_stopping(_col(t, "val_loss"), c.patience),
        "val_loss",
    ),
    Rule(
        "delta2",
        "EarlyStopping(curvprobe/delta2, patience), the README's recipe",
        PROBE,
        lambda t, c: early_stopping(_col(t, "delta2"), c.patience),
        "delta2",
    ),
    Rule(
        "delta2_se",
        "EarlyStopping(curvprobe/delta2, patience, min_delta = the current delta2_stderr)",
        PROBE,
        lambda t, c: early_stopping(_col(t, "delta2"), c.patience, _col(t, "delta2_stderr")),
        "delta2",
    ),
    Rule(
        "change_z",
        "stop after `patience` probes in a row without a significant fall, z = (Δ_t − Δ_{t−1})/se > −1",
        PROBE,
        _stop_change_z,
    ),
    Rule(
        "excess",
        "EarlyStopping on the probe's own part, Δ₂^(D) − mean a² (delta2_terms/gradient + delta2_terms/curvature), "
        "patience",
        PROBE,
        lambda t, c: early_stopping(_col(t, "excess"), c.patience),
        "excess",
    ),
    Rule(
        "rel_peak",
        "EarlyStopping(curvprobe/delta2_rel_peak, stopping_threshold=0.01, endless patience): stop once Δ₂^(D) is "
        "below 1/100 of its peak so far",
        PROBE,
        lambda t, c: threshold_stop(_col(t, "delta2_rel_peak"), c.rel_peak_threshold),
    ),
    Rule(
        "sufficient_k",
        "stop once sufficient_k ≤ n_train at a tolerance of 1/100 of the peak fitted Δ₂^(D)(n_train) so far",
        (*PROBE, "curve_s"),
        _sufficient_stop,
    ),
    Rule(
        "heldout_delta2",
        "EarlyStopping(curvprobe_heldout/delta2, patience), a second probe whose added samples are validation samples",
        ("heldout_probe_s", "heldout_preflight_s"),
        lambda t, c: early_stopping(_col(t, "heldout_delta2"), c.patience),
        "heldout_delta2",
    ),
]


def _argmin(trace: dict[str, Any], key: str | None, stop: int) -> int:
    """The epoch ≤ ``stop`` with the lowest finite value of ``key`` (``stop`` itself without a monitored key)."""
    if key is None:
        return stop
    vals = _col(trace, key)[: stop + 1]
    finite = [e for e, v in enumerate(vals) if math.isfinite(v)]
    return min(finite, key=vals.__getitem__) if finite else stop


def evaluate_rules(trace: dict[str, Any], cfg: Config) -> dict[str, dict[str, float]]:
    """Every rule's stop on one trace: epochs, held-out numbers at the stop, position against the best validation
    epoch, and cost (seconds and fraction of the fixed budget's training time)."""
    rows = trace["rows"]
    val = _col(trace, "val_loss")
    best = min(range(len(val)), key=val.__getitem__)
    fixed_cost = sum(r["train_s"] for r in rows)
    out: dict[str, dict[str, float]] = {}
    for rule in RULES:
        e = rule.stop(trace, cfg)
        cost = sum(r["train_s"] for r in rows[: e + 1])
        for key in rule.costs:
            cost += trace[key] if key in trace else sum(r[key] for r in rows[: e + 1])
        out[rule.name] = {
            "stop_epoch": e,
            "epochs": e + 1,
            "vs_best_val": e - best,
            "test_loss": rows[e]["test_loss"],
            "test_acc": rows[e]["test_acc"],
            "test_loss_regret": rows[e]["test_loss"] - rows[best]["test_loss"],
            # with ModelCheckpoint(monitor=the same key) restoring the epoch of its best value up to the stop
            "ckpt_regret": rows[_argmin(trace, rule.monitor, e)]["test_loss"] - rows[best]["test_loss"],
            "cost_s": cost,
            "saved": 1.0 - cost / fixed_cost,
        }
    out["_best"] = {"epoch": best, "test_loss": rows[best]["test_loss"], "test_acc": rows[best]["test_acc"]}
    return out


# ------------------------------------------------------------------------------------------------------ analysis


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _corr(x: list[float], y: list[float]) -> float:
    pts = [(a, b) for a, b in zip(x, y, strict=True) if math.isfinite(a) and math.isfinite(b)]
    if len(pts) < 3:
        return math.nan
    xs, ys = zip(*pts, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((a - mx) * (b - my) for a, b in pts)
    sxx = sum((a - mx) ** 2 for a in xs)
    syy = sum((b - my) ** 2 for b in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _log(xs: list[float]) -> list[float]:
    return [math.log(x) if x > 0 else math.nan for x in xs]


def analyse(traces: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Aggregate the rules per task and overall, and describe what Δ₂^(D) is made of on each task."""
    results = {f"{t['task']}/{t['seed']}": evaluate_rules(t, cfg) for t in traces}
    per_task: dict[str, Any] = {}
    for task in cfg.tasks:
        keys = [k for k in results if k.split("/")[0] == task]
        if not keys:
            continue
        agg: dict[str, Any] = {}
        for rule in RULES:
            agg[rule.name] = {
                stat: _mean_sd([results[k][rule.name][stat] for k in keys])
                for stat in (
                    "epochs",
                    "vs_best_val",
                    "test_loss",
                    "test_acc",
                    "test_loss_regret",
                    "ckpt_regret",
                    "saved",
                )
            }
        agg["_best"] = {stat: _mean_sd([results[k]["_best"][stat] for k in keys]) for stat in results[keys[0]]["_best"]}
        tr = [t for t in traces if t["task"] == task]
        rows = [r for t in tr for r in t["rows"]]
        probe_s = [r["probe_s"] for r in rows]
        train_s = [r["train_s"] for r in rows]
        steps = tr[0]["steps_per_epoch"]
        describe = {
            "num_params": tr[0]["num_params"],
            "n_train": tr[0]["n_train"],
            "n_val": tr[0]["n_val"],
            "n_test": tr[0]["n_test"],
            "steps_per_epoch": steps,
            "max_epochs": cfg.max_epochs[task],
            "probe_s_median": statistics.median(probe_s),
            "train_epoch_s_median": statistics.median(train_s),
            "curve_s_median": statistics.median([r["curve_s"] for r in rows]),
            "probe_in_steps": statistics.median(probe_s) / (statistics.median(train_s) / steps),
            "share_median": {
                f"{s:g}": statistics.median([r[f"share@{s:g}"] for r in rows])
                for s in sorted((*cfg.extra_sigmas, cfg.sigma))
            },
            "share_max": {
                f"{s:g}": max(abs(r[f"share@{s:g}"]) for r in rows) for s in sorted((*cfg.extra_sigmas, cfg.sigma))
            },
            "quadratic_error_median": statistics.median([r["quadratic_error"] for r in rows]),
            # over epochs, within each run: how closely log Δ₂^(D) follows log mean a², and log train-loss spread
            "corr_log_delta2_log_a2": statistics.fmean(
                _corr(_log(_col(t, "delta2")), _log(_col(t, "delta2_terms/a2"))) for t in tr
            ),
            "corr_log_delta2_val_loss": statistics.fmean(
                _corr(_log(_col(t, "delta2")), _col(t, "val_loss")) for t in tr
            ),
            "corr_log_delta2_epoch": statistics.fmean(
                _corr(_log(_col(t, "delta2")), [float(i) for i in range(len(t["rows"]))]) for t in tr
            ),
            "gradient_over_a2_median": statistics.median(
                [r["delta2_terms/gradient"] / r["delta2_terms/a2"] for r in rows]
            ),
            "curvature_over_a2_median": statistics.median(
                [r["delta2_terms/curvature"] / r["delta2_terms/a2"] for r in rows]
            ),
            # the hump: Δ₂^(D) rises over the first epochs before it falls
            "peak_epoch": [max(range(len(t["rows"])), key=_col(t, "delta2").__getitem__) for t in tr],
            "rises_first": sum(_col(t, "delta2")[0] < max(_col(t, "delta2")) for t in tr),
            "fall_from_peak": statistics.median(_col(t, "delta2")[-1] / max(_col(t, "delta2")) for t in tr),
            "best_val_epoch": [min(range(len(t["rows"])), key=_col(t, "val_loss").__getitem__) for t in tr],
            "delta2_fall_after_best": statistics.median(
                _col(t, "delta2")[-1]
                / _col(t, "delta2")[min(range(len(t["rows"])), key=_col(t, "val_loss").__getitem__)]
                for t in tr
            ),
            "val_rise_after_best": statistics.median(_col(t, "val_loss")[-1] / min(_col(t, "val_loss")) for t in tr),
        }
        per_task[task] = {"rules": agg, "describe": describe}
    overall = {
        rule.name: {
            stat: _mean_sd([results[k][rule.name][stat] for k in results])
            for stat in ("epochs", "vs_best_val", "test_loss_regret", "ckpt_regret", "saved")
        }
        for rule in RULES
    }
    # how often each rule stops within ±2 epochs of the best validation epoch, before it, after it, or never
    lengths = {f"{t['task']}/{t['seed']}": len(t["rows"]) for t in traces}
    position = {
        rule.name: {
            "within_2": sum(abs(results[k][rule.name]["vs_best_val"]) <= 2 for k in results) / len(results),
            "early": sum(results[k][rule.name]["vs_best_val"] < -2 for k in results) / len(results),
            "late": sum(results[k][rule.name]["vs_best_val"] > 2 for k in results) / len(results),
            "never": sum(results[k][rule.name]["stop_epoch"] == lengths[k] - 1 for k in results) / len(results),
        }
        for rule in RULES
    }
    # the rel_peak threshold is a choice: the same rule at other thresholds, per task
    sensitivity: dict[str, dict[str, dict[str, float]]] = {}
    for thr in (0.3, 0.1, 0.03, 0.01, 0.003):
        sensitivity[f"{thr:g}"] = {}
        for task in per_task:
            tr = [t for t in traces if t["task"] == task]
            vs, regret = [], []
            for t in tr:
                e = threshold_stop(_col(t, "delta2_rel_peak"), thr)
                best = min(range(len(t["rows"])), key=_col(t, "val_loss").__getitem__)
                vs.append(e - best)
                regret.append(t["rows"][e]["test_loss"] - t["rows"][best]["test_loss"])
            sensitivity[f"{thr:g}"][task] = {"vs_best_val": statistics.fmean(vs), "regret": statistics.fmean(regret)}
    return {
        "per_run": results,
        "per_task": per_task,
        "overall": overall,
        "position": position,
        "lengths": lengths,
        "rel_peak_sensitivity": sensitivity,
    }


# -------------------------------------------------------------------------------------------------- live checks


def live_checks(cfg: Config, traces: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Refit with real ``EarlyStopping`` callbacks and compare their stop epochs with the replay of the same rule."""
    checks = []
    for task, seed in cfg.live_checks:
        trace = next((t for t in traces if t["task"] == task and t["seed"] == seed), None)
        if trace is None:
            continue
        for name, make in (
            ("val_loss", lambda: EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience)),
            ("delta2_se", lambda: StderrEarlyStopping(patience=cfg.patience)),
            (
                "rel_peak",
                lambda: EarlyStopping(
                    monitor=f"{STUDY}/delta2_rel_peak",
                    mode="min",
                    stopping_threshold=cfg.rel_peak_threshold,
                    patience=1_000_000,
                ),
            ),
        ):
            replayed = next(r for r in RULES if r.name == name).stop(trace, cfg)
            live = fit(task, seed, cfg, extra_callbacks=[make()], light=True)
            live_stop = live["epochs_run"] - 1
            same_trace = all(
                a["val_loss"] == b["val_loss"] and a["delta2"] == b["delta2"]
                for a, b in zip(live["rows"], trace["rows"], strict=False)
            )
            checks.append(
                {
                    "task": task,
                    "seed": seed,
                    "rule": name,
                    "replayed_stop": replayed,
                    "live_stop": live_stop,
                    "identical_values": same_trace,
                    "agree": replayed == live_stop and same_trace,
                }
            )
    return checks


# ------------------------------------------------------------------------------------------------------- figures


def make_figures(traces: list[dict[str, Any]], analysis: dict[str, Any], cfg: Config, out: Path) -> list[str]:
    """Four PNGs: curves with each rule's stop, the decomposition of Δ₂^(D), stop positions, cost against regret."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names: list[str] = []
    tasks = [t for t in cfg.tasks if any(tr["task"] == t for tr in traces)]
    colors = dict(zip([r.name for r in RULES], plt.cm.tab10.colors, strict=False))

    # 1. curves of one seed per task, with the stop of every rule
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.3 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        tr = next(t for t in traces if t["task"] == task)
        ep = list(range(1, len(tr["rows"]) + 1))
        ax = axes[i][0]
        ax.plot(ep, _col(tr, "val_loss"), label="validation loss", color="k")
        ax.plot(ep, _col(tr, "test_loss"), label="test loss", color="0.6", ls="--")
        res = analysis["per_run"][f"{task}/{tr['seed']}"]
        for j, rule in enumerate(RULES):
            e = res[rule.name]["stop_epoch"] + 1
            ax.axvline(e + 0.08 * (j - 3), color=colors[rule.name], lw=1.2, alpha=0.8, label=f"stop: {rule.name}")
        ax.set_title(f"{TASK_LABEL[task]}, seed {tr['seed']}: losses and where each rule stops", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy")
        if i == 0:
            ax.legend(fontsize=6, ncol=2)
        ax = axes[i][1]
        d2, se = _col(tr, "delta2"), _col(tr, "delta2_stderr")
        ax.plot(ep, d2, color="C0", label="delta2")
        ax.fill_between(
            ep,
            [max(a - b, 1e-30) for a, b in zip(d2, se, strict=True)],
            [a + b for a, b in zip(d2, se, strict=True)],
            color="C0",
            alpha=0.25,
            label="± stderr",
        )
        ax.plot(ep, _col(tr, "delta2_terms/a2"), color="C3", ls=":", label="mean a² term")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(f"Δ₂^(D) at σ = {cfg.sigma:g} and its a² term", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "fig1_curves.png", dpi=110)
    plt.close(fig)
    names.append("fig1_curves.png")

    # 2. the decomposition: terms of one seed, and the curvature share at three sigmas (all seeds)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        trs = [t for t in traces if t["task"] == task]
        tr = trs[0]
        ep = list(range(1, len(tr["rows"]) + 1))
        ax = axes[i][0]
        ax.plot(ep, _col(tr, "delta2_terms/a2"), label="a2: mean a²")
        ax.plot(ep, _col(tr, "delta2_terms/gradient"), label="gradient: mean σ²‖c‖²")
        ax.plot(ep, [abs(v) for v in _col(tr, "delta2_terms/curvature")], label="|curvature|: terms in B")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(
            f"{TASK_LABEL[task]}, seed {tr['seed']}: the three terms of Δ₂^(D) at σ = {cfg.sigma:g}", fontsize=9
        )
        ax.legend(fontsize=7)
        ax = axes[i][1]
        for j, s in enumerate(sorted((*cfg.extra_sigmas, cfg.sigma))):
            for n, t in enumerate(trs):
                sh = [max(abs(v), 1e-12) for v in _col(t, f"share@{s:g}")]
                ax.plot(range(1, len(sh) + 1), sh, color=f"C{j}", alpha=0.6, label=f"σ = {s:g}" if n == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title("|curvature share| = |Δ₂^(D) − mean a²| / Δ₂^(D), every seed", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fig2_decomposition.png", dpi=110)
    plt.close(fig)
    names.append("fig2_decomposition.png")

    # 3. stop epoch relative to the best validation epoch, per rule and task (one dot per seed)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.3 * len(tasks), 3.6), squeeze=False, sharey=False)
    for i, task in enumerate(tasks):
        ax = axes[0][i]
        keys = [k for k in analysis["per_run"] if k.split("/")[0] == task]
        for j, rule in enumerate(RULES):
            ys = [analysis["per_run"][k][rule.name]["vs_best_val"] for k in keys]
            ax.scatter([j + 0.06 * (n - len(ys) / 2) for n in range(len(ys))], ys, color=colors[rule.name], s=18)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(RULES)), [r.name for r in RULES], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("stop epoch − best validation epoch")
        ax.set_title(TASK_LABEL[task], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "fig3_stop_vs_best.png", dpi=110)
    plt.close(fig)
    names.append("fig3_stop_vs_best.png")

    # 4. compute saved against held-out loss regret
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.3 * len(tasks), 3.6), squeeze=False)
    for i, task in enumerate(tasks):
        ax = axes[0][i]
        keys = [k for k in analysis["per_run"] if k.split("/")[0] == task]
        for rule in RULES:
            xs = [analysis["per_run"][k][rule.name]["saved"] for k in keys]
            ys = [analysis["per_run"][k][rule.name]["test_loss_regret"] for k in keys]
            ax.scatter(xs, ys, color=colors[rule.name], s=18, label=rule.name)
        ax.axvline(0, color="k", lw=0.6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("compute saved vs fixed budget (probe cost included)")
        ax.set_ylabel("test loss − test loss at best val epoch")
        ax.set_title(TASK_LABEL[task], fontsize=9)
        if i == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "fig4_cost_vs_regret.png", dpi=110)
    plt.close(fig)
    names.append("fig4_cost_vs_regret.png")
    return names


# -------------------------------------------------------------------------------------------------------- report


def _pm(ms: tuple[float, float], fmt: str = ".2f") -> str:
    m, s = ms
    return f"{m:{fmt}} ± {s:{fmt}}"


PROBE_RULES = ("delta2", "delta2_se", "change_z", "excess", "rel_peak", "sufficient_k", "heldout_delta2")


def _paired(an: dict[str, Any], task: str, rule: str) -> tuple[float, float]:
    """Mean and standard error over seeds of (the rule's regret − validation loss's regret) on ``task``."""
    diffs = [
        r[rule]["test_loss_regret"] - r["val_loss"]["test_loss_regret"]
        for k, r in an["per_run"].items()
        if k.split("/")[0] == task
    ]
    if len(diffs) < 2:
        return statistics.fmean(diffs), 0.0
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


def _constant_stop(an: dict[str, Any], rule: str, task: str) -> int | None:
    """The stop epoch if the rule stopped at the same epoch in every run of ``task`` (two runs or more), else None."""
    stops = [r[rule]["stop_epoch"] for k, r in an["per_run"].items() if k.split("/")[0] == task]
    return stops[0] if len(stops) > 1 and len(set(stops)) == 1 else None


def conclusion(an: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    """The study's verdict, worded from the numbers: per task, the probe rules against validation loss."""
    lines = []
    for task, pt in an["per_task"].items():
        rules, d = pt["rules"], pt["describe"]
        val = rules["val_loss"]
        best_name = min(PROBE_RULES, key=lambda n: rules[n]["test_loss_regret"][0])
        b = rules[best_name]
        paired = {n: _paired(an, task, n) for n in PROBE_RULES}  # (mean, se) of probe − val_loss regret over seeds
        mean, se = paired[best_name]
        cheaper = b["saved"][0] > val["saved"][0]
        if mean + 2 * se < 0:
            verdict = (
                "**helps**: a lower held-out loss than validation-loss early stopping, beyond the seed-to-seed "
                "spread" + (" and with less compute" if cheaper else ", at more compute")
            )
        elif all(m - 2 * e > 0 for m, e in paired.values()):
            verdict = (
                "**hurts**: every probe rule ends with a higher held-out loss than validation-loss early "
                "stopping, beyond the seed-to-seed spread"
            )
        else:
            verdict = "**adds nothing** that the seeds can tell apart from validation-loss early stopping" + (
                f" (the best probe rule's regret differs by {mean:+.3f} ± {se:.3f})"
            )
        if val["ckpt_regret"][0] < b["test_loss_regret"][0]:
            verdict += (
                f' (with `ModelCheckpoint(monitor="val_loss")` restoring the best epoch, validation loss\'s regret is '
                f"{val['ckpt_regret'][0]:+.3f})"
            )
        fixed = _constant_stop(an, best_name, task)
        if fixed is not None and fixed <= cfg["patience"] + 1:
            epochs = ", ".join(f"{pt2['rules'][best_name]['epochs'][0]:.1f}" for pt2 in an["per_task"].values())
            verdict += (
                f"; but `{best_name}` stopped at epoch {fixed} in every run of this task, as soon as its patience "
                f"allowed (mean epochs trained on the three tasks: {epochs}): a short fixed budget in disguise, which "
                "suits this task only because its best validation epoch is early"
            )
        lines.append(
            f"- **{TASK_LABEL[task]}** (best validation epoch {_pm(rules['_best']['epoch'], '.1f')}): {verdict}. "
            f"Best probe rule `{best_name}`: regret {b['test_loss_regret'][0]:+.3f}, stops "
            f"{b['vs_best_val'][0]:+.1f} epochs from the best validation epoch, compute saved {b['saved'][0]:+.2f}; "
            f"`val_loss`: regret {val['test_loss_regret'][0]:+.3f}, {val['vs_best_val'][0]:+.1f} epochs, saved "
            f"{val['saved'][0]:+.2f}. The README's `delta2` recipe: regret "
            f"{rules['delta2']['test_loss_regret'][0]:+.3f}, {rules['delta2']['vs_best_val'][0]:+.1f} epochs. "
            f"One probe costs {d['probe_in_steps']:.0f} training steps "
            f"here ({d['steps_per_epoch']} steps per epoch)."
        )
    return lines


def _budget_reached(an: dict[str, Any], rule: str, task: str) -> int:
    """How many runs of ``task`` the rule let run the whole budget."""
    return sum(
        an["per_run"][k][rule]["stop_epoch"] == n - 1 for k, n in an["lengths"].items() if k.split("/")[0] == task
    )


def headline(an: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The summary bullets and the closing discussion, with the numbers of this run."""
    pts = an["per_task"]
    d = {t: pt["describe"] for t, pt in pts.items()}
    corr = min(x["corr_log_delta2_log_a2"] for x in d.values())
    share = (
        {t: x["share_median"]["0.01"] for t, x in d.items()}
        if all("0.01" in x["share_median"] for x in d.values())
        else {}
    )
    rises = sum(x["rises_first"] for x in d.values())
    runs = sum(len(x["peak_epoch"]) for x in d.values())
    pos = an["position"]
    ov = an["overall"]
    probe_steps = [x["probe_in_steps"] for x in d.values()]
    wins = [t for t in pts if any(m + 2 * e < 0 for m, e in (_paired(an, t, n) for n in PROBE_RULES))]
    head = [
        f"- **Δ₂^(D) is the spread of per-sample training losses.** Over the epochs of every run, log Δ₂^(D) follows "
        f"log mean a² with correlation ≥ {corr:.4f}; at σ = 1e-2 the part the probe adds to mean a² "
        + (
            "(`curvature_share`) has a median of " + ", ".join(f"{v:.1e} ({t})" for t, v in share.items())
            if share
            else "is small"
        )
        + ". It grows late in training, when the losses themselves have converged, and with σ (section 2).",
        f"- **It rises before it falls** ({rises} of {runs} runs): at initialisation every sample has about the same "
        'loss, so the spread starts small. `EarlyStopping(monitor="curvprobe/delta2")` from epoch 0 (the README\'s '
        f"recipe) then stops in that hump: before the best validation epoch in {pos['delta2']['early']:.0%} of runs; "
        f'with `min_delta` = the standard error in {pos["delta2_se"]["early"]:.0%}; the "no significant fall" rule '
        f"in {pos['change_z']['early']:.0%}.",
        "- **It keeps falling while the model overfits**: after the best validation epoch it falls by a further "
        + ", ".join(f"{x['delta2_fall_after_best']:.0e}× ({t})" for t, x in d.items())
        + " by the end of the budget while the validation loss grows by "
        + ", ".join(f"{x['val_rise_after_best']:.2f}× ({t})" for t, x in d.items())
        + ". A curvature gate says that training has converged on the training samples, not that it generalises.",
        f"- **Against EarlyStopping(val_loss)** (regret {ov['val_loss']['test_loss_regret'][0]:+.3f} in test loss over "
        f"all runs): `rel_peak` {ov['rel_peak']['test_loss_regret'][0]:+.3f}, `delta2` "
        f"{ov['delta2']['test_loss_regret'][0]:+.3f}, `delta2_se` {ov['delta2_se']['test_loss_regret'][0]:+.3f}, "
        f"`change_z` {ov['change_z']['test_loss_regret'][0]:+.3f}, `sufficient_k` "
        f"{ov['sufficient_k']['test_loss_regret'][0]:+.3f}, `heldout_delta2` "
        f"{ov['heldout_delta2']['test_loss_regret'][0]:+.3f}. A probe rule ends with a lower held-out loss than "
        f"validation loss, beyond the seed-to-seed spread, on {len(wins)} of {len(pts)} tasks"
        + (f" ({', '.join(wins)}; see section 6 for why)" if wins else "")
        + ".",
        f"- **Compute**: one probe costs {min(probe_steps):.0f}–{max(probe_steps):.0f} training steps on these small "
        "models, as much as or more than a whole epoch of the two tables; saved compute (probe included) over all "
        f"runs: `val_loss` {ov['val_loss']['saved'][0]:+.2f}, `rel_peak` {ov['rel_peak']['saved'][0]:+.2f}, "
        f"`sufficient_k` {ov['sufficient_k']['saved'][0]:+.2f} (its sample-growth curve costs 3–4 probes).",
    ]
    discussion = [
        "What to do with this. Where a validation set exists, gate on the validation loss; the probe is for watching "
        "the landscape, and its decomposition (`delta2_terms/*`, `curvature_share`) says how much of the curve is "
        "more than the spread of the losses. Without a validation set, do not use `EarlyStopping(monitor="
        '"curvprobe/delta2")` from epoch 0 (the hump stops it early); the study\'s recommended gate is the scale-free '
        "`curvprobe/delta2_rel_peak` (Δ₂^(D) over the largest value it has reached in the run: free of k and of the "
        "loss's units, 1 at a new peak), stopped at a threshold:",
        "",
        "```python",
        'EarlyStopping(monitor="curvprobe/delta2_rel_peak", mode="min", stopping_threshold=0.01, patience=10**9)',
        "```",
        "",
        "It does not stop in the hump, but what it detects is convergence of the training losses, and where that lies "
        "relative to the best validation epoch depends on the task: here it stopped "
        + "; ".join(
            f"{pts[t]['rules']['rel_peak']['vs_best_val'][0]:+.1f} epochs from it on {t} (budget reached in "
            f"{_budget_reached(an, 'rel_peak', t)}"
            f" of {len(d[t]['peak_epoch'])} runs)"
            for t in pts
        )
        + ", and no single threshold fits every task (sensitivity table in section 5). The probe's own part, "
        "Δ₂^(D) − mean a² (rule `excess`), ended with a held-out regret of "
        + ", ".join(f"{pts[t]['rules']['excess']['test_loss_regret'][0]:+.3f} ({t})" for t in pts)
        + " against "
        + ", ".join(f"{pts[t]['rules']['val_loss']['test_loss_regret'][0]:+.3f}" for t in pts)
        + " for the validation loss.",
    ]
    return head, discussion


def write_report(summary: dict[str, Any], out: Path) -> None:
    """``report.md`` from the summary: numbers from ``summary``, prose that states what they show."""
    cfg = summary["config"]
    an = summary["analysis"]
    quick = cfg["quick"]
    pts = an["per_task"]
    sig = sorted(next(iter(pts.values()))["describe"]["share_median"], key=float)
    cmd = f"python examples/stopping_study.py{' --quick' if quick else ''}"
    lines = [
        "# Early stopping on the curvature probe: a study on three small real tasks",
        "",
        f"Generated by `{cmd}` in {summary['wall_s'] / 60:.1f} min of wall time "
        f"({summary.get('cpu_s', math.nan) / 60:.1f} min of CPU time) on {summary['machine']}, "
        f"{cfg['threads']} torch thread, torch {summary['torch']}, lightning {summary['lightning']}. "
        f"Seeds {list(cfg['seeds'])} per task." + (" **Quick run: tiny budgets, not a result.**" if quick else ""),
        "",
        "## Summary",
        "",
        *summary.get("headline", []),
        "",
        "## 1. Set-up",
        "",
        "Each (task, seed) is trained once for a fixed epoch budget with `CurvatureStabilityCallback` probing at every "
        f"validation epoch: D = {cfg['num_eigenvectors']}, σ = {cfg['sigma']:g}, k = {cfg['num_probe_samples']} base "
        f"and m = {cfg['num_added_samples']} added samples from the training split, Gaussian-moment estimator. A "
        "second "
        "callback instance (prefix `curvprobe_heldout`) has the same base samples and m added samples from the "
        "validation split. `lightning_curvprobe._signals.explain()` decomposes each probe (the callback logs "
        "these keys; the study passes the run's peak as `peak_delta2` for `delta2_rel_peak`). The callback leaves "
        "training bit-identical, so "
        "every stopping rule is replayed on the recorded trace; live `EarlyStopping` fits check the replay "
        "(section 7). "
        "Held-out numbers are those of the weights the rule stops with (`EarlyStopping` restores nothing); "
        "`ckpt regret` is the same with a `ModelCheckpoint` on the rule's monitored value restoring its best epoch. "
        "Cost = training time up to the stop, plus the validation passes if the rule needs them, plus the wall time of "
        "the probe (pre-flight included) if it needs the probe; `saved` = 1 − cost / (training time of the fixed "
        "budget, which needs neither). Negative `saved`: the rule cost more than training the whole budget.",
        "",
        "| task | data (train/val/test) | parameters | steps/epoch | budget (epochs) | one probe | one epoch of "
        "training | probe in training steps | sample-growth curve |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, pt in pts.items():
        d = pt["describe"]
        lines.append(
            f"| {TASK_LABEL[task]} | {d['n_train']}/{d['n_val']}/{d['n_test']} | {d['num_params']:,} | "
            f"{d['steps_per_epoch']} | {d['max_epochs']} | {d['probe_s_median'] * 1e3:.0f} ms | "
            f"{d['train_epoch_s_median'] * 1e3:.0f} ms | {d['probe_in_steps']:.0f} | "
            f"{d['curve_s_median'] * 1e3:.0f} ms |"
        )
    lines += [
        "",
        "Tasks (provenance in `data/PROVENANCE.md` and `../paper_reproduction/data/PROVENANCE.md`): **Alice** — "
        "next-character prediction on *Alice's Adventures in Wonderland* (public domain), an embedding + MLP on "
        f"{cfg['alice_context']}-character contexts, windows from disjoint parts of the book (70 % / 15 % / 15 %); "
        "**digits** — the UCI optdigits test set (1797 8×8 images, CC BY 4.0), a two-hidden-layer MLP; **cancer** — "
        "Breast Cancer Wisconsin (Diagnostic) (569 × 30, CC BY 4.0), a two-hidden-layer MLP. Adam, cross-entropy, "
        "splits 60/20/20 drawn per seed for the two tables. Timings are medians over all epochs and seeds, on a 2-core "
        "machine that other jobs shared: they vary by ±50 % between runs; stop epochs and held-out numbers do not "
        "(deterministic CPU run).",
        "",
        "## 2. What Δ₂^(D) is made of",
        "",
        "`curvature_share` = (Δ₂^(D) − mean a²)/Δ₂^(D), the part of the logged value that the probe adds to the "
        "squared loss gap a = (ℓ_j − L_k)/(k+1); median over all epochs and seeds, largest |share| in brackets. The "
        "σ = 1e-3 and 1e-1 columns decompose the same (a, c, B) at another probe scale (the quadratic model is not "
        "validated there). Last column: correlation over epochs of log Δ₂^(D) with log mean a² (mean over seeds).",
        "",
        "| task | " + " | ".join(f"share at σ = {s}" for s in sig) + f" | quadratic error at σ = {cfg['sigma']:g} "
        "(median) | corr(log Δ₂^(D), log mean a²) |",
        "|---|" + "---|" * (len(sig) + 2),
    ]
    for task, pt in pts.items():
        d = pt["describe"]
        cells = [f"{d['share_median'][s]:.1e} ({d['share_max'][s]:.1e})" for s in sig]
        lines.append(
            f"| {TASK_LABEL[task]} | "
            + " | ".join(cells)
            + f" | {d['quadratic_error_median']:.1e} | {d['corr_log_delta2_log_a2']:.4f} |"
        )
    lines += [
        "",
        "How Δ₂^(D) moves during training (per task: epochs of its peak and of the best validation loss, per seed; how "
        "far it falls from its peak by the end of the budget; how much further it falls after the best validation "
        "epoch "
        "while the validation loss rises):",
        "",
        "| task | runs where Δ₂^(D) rises first | peak epoch | best validation epoch | end / peak | Δ₂^(D) end / at "
        "best val | val loss end / best |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, pt in pts.items():
        d = pt["describe"]
        lines.append(
            f"| {TASK_LABEL[task]} | {d['rises_first']}/{len(d['peak_epoch'])} | {d['peak_epoch']} | "
            f"{d['best_val_epoch']} | {d['fall_from_peak']:.1e} | {d['delta2_fall_after_best']:.1e} | "
            f"{d['val_rise_after_best']:.2f} |"
        )
    lines += [
        "",
        "![decomposition](fig2_decomposition.png)",
        "",
        "## 3. The stopping rules",
        "",
    ]
    costs = {
        "val_s": "validation",
        "probe_s": "probe",
        "curve_s": "sample-growth curve",
        "heldout_probe_s": "held-out probe",
    }
    lines += [
        f"- `{r.name}`: {r.label}. Cost: training" + "".join(f" + {costs[c]}" for c in r.costs if c in costs) + "."
        for r in RULES
    ]
    lines += [
        "",
        f"Patience {cfg['patience']} for every patience rule. Per task: mean ± sd over seeds; `vs best` = stop epoch − "
        "epoch of the lowest validation loss within the budget (negative: too early); `regret` = test loss at the stop "
        "− test loss at the best validation epoch.",
        "",
        "## 4. Results per task",
        "",
    ]
    for task, pt in pts.items():
        b = pt["rules"]["_best"]
        lines += [
            f"### {TASK_LABEL[task]}",
            "",
            f"Best validation epoch {_pm(b['epoch'], '.1f')} (0-based); there the test loss is "
            f"{_pm(b['test_loss'], '.3f')} "
            f"and the accuracy {_pm(b['test_acc'], '.3f')}.",
            "",
            "| rule | epochs | vs best | test loss | test acc | regret | ckpt regret | compute saved |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in RULES:
            a = pt["rules"][r.name]
            lines.append(
                f"| `{r.name}` | {_pm(a['epochs'], '.1f')} | {_pm(a['vs_best_val'], '+.1f')} | "
                f"{_pm(a['test_loss'], '.3f')} | {_pm(a['test_acc'], '.3f')} | {_pm(a['test_loss_regret'], '+.3f')} | "
                f"{_pm(a['ckpt_regret'], '+.3f')} | {_pm(a['saved'], '+.2f')} |"
            )
        lines.append("")
    lines += [
        "## 5. All tasks together",
        "",
        "| rule | stops within ±2 epochs of best | earlier | later | never (runs the budget) | regret | ckpt regret | "
        "compute saved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in RULES:
        p, o = an["position"][r.name], an["overall"][r.name]
        lines.append(
            f"| `{r.name}` | {p['within_2']:.0%} | {p['early']:.0%} | {p['late']:.0%} | {p['never']:.0%} | "
            f"{_pm(o['test_loss_regret'], '+.3f')} | {_pm(o['ckpt_regret'], '+.3f')} | {_pm(o['saved'], '+.2f')} |"
        )
    lines += [
        "",
        "![curves](fig1_curves.png)",
        "",
        "![stops](fig3_stop_vs_best.png)",
        "",
        "![cost](fig4_cost_vs_regret.png)",
        "",
        "`rel_peak` at other thresholds (mean stop − best validation epoch / mean regret):",
        "",
        "| threshold | " + " | ".join(TASK_LABEL[t] for t in pts) + " |",
        "|---|" + "---|" * len(pts),
    ]
    for thr, per in an["rel_peak_sensitivity"].items():
        lines.append(
            f"| {thr} | " + " | ".join(f"{per[t]['vs_best_val']:+.1f} / {per[t]['regret']:+.3f}" for t in pts) + " |"
        )
    lines += ["", "## 6. Conclusion: where gating on curvature helps, hurts or adds nothing", ""]
    lines += conclusion(an, cfg)
    lines += ["", *summary.get("discussion", []), ""]
    lines += [
        "## 7. Replay check",
        "",
        "The same (task, seed) refitted with a real `EarlyStopping` (`delta2_se`: a subclass that sets `min_delta` "
        "from "
        "the logged `delta2_stderr` at each check; `rel_peak`: `stopping_threshold` on the value the study's callback "
        "logs as `curvprobe_study/delta2_rel_peak`, computed by `explain(..., peak_delta2=...)` with the run's peak) "
        "stops where the replay says, with identical logged values:",
        "",
        "| task | seed | rule | replayed stop | live EarlyStopping stop | identical values | agree |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in summary["live_checks"]:
        lines.append(
            f"| {c['task']} | {c['seed']} | `{c['rule']}` | {c['replayed_stop']} | {c['live_stop']} | "
            f"{c['identical_values']} | {c['agree']} |"
        )
    lines += [
        "",
        "## 8. Reproduce",
        "",
        "```bash",
        f"{cmd} --out examples/stopping_study",
        "```",
        "",
        f"This run: {summary['wall_s']:.0f} s wall time ({summary['wall_s'] / 60:.1f} min) and "
        f"{summary.get('cpu_s', math.nan):.0f} s of CPU time ({summary.get('cpu_s', math.nan) / 60:.1f} min) in one "
        "thread, replay checks and figures included. The wall time depends on what else the machine runs (this 2-core "
        "machine was shared with other jobs); the CPU time is about the wall time of a run on an idle core.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------- main


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets and one seed: seconds")
    parser.add_argument("--out", default=str(EXAMPLES / "stopping_study"), help="folder for report.md and figures")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: 0..4; quick: 0)")
    parser.add_argument("--tasks", nargs="+", default=None, choices=sorted(LOADERS), help="tasks to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--from-summary", default=None, help="re-analyse the traces of an earlier run's summary.json (no training)"
    )
    args = parser.parse_args(argv)
    if args.from_summary is not None:
        return reanalyse(Path(args.from_summary), Path(args.out), figures=not args.no_figures)
    cfg = QUICK if args.quick else Config()
    cfg = replace(cfg, threads=args.threads)
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.tasks is not None:
        cfg = replace(cfg, tasks=tuple(args.tasks))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners
    t0, c0 = time.perf_counter(), time.process_time()
    traces = []
    for task in cfg.tasks:
        for seed in cfg.seeds:
            tr = fit(task, seed, cfg)
            traces.append(tr)
            print(f"{task:7s} seed {seed}: {tr['epochs_run']} epochs in {tr['fit_wall_s']:.1f} s", flush=True)
    analysis = analyse(traces, cfg)
    checks = live_checks(cfg, traces)
    summary: dict[str, Any] = {
        "quick": cfg.quick,
        "config": asdict(cfg),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": sys.version.split()[0],
        "analysis": analysis,
        "live_checks": checks,
        "traces": traces,
    }
    summary["figures"] = [] if args.no_figures else make_figures(traces, analysis, cfg, out)
    summary["wall_s"] = time.perf_counter() - t0
    summary["cpu_s"] = time.process_time() - c0
    summary["headline"], summary["discussion"] = headline(analysis)
    write_report(summary, out)
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    print(f"wrote {out / 'report.md'} ({summary['wall_s']:.0f} s)")
    return summary


def _nan_from_none(x: Any) -> Any:
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: _nan_from_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_from_none(v) for v in x]
    return x


def reanalyse(path: Path, out: Path, figures: bool = True) -> dict[str, Any]:
    """Rewrite the report (and figures) from the traces recorded in an earlier ``summary.json``.

    The rules are replayed on the recorded traces exactly as in the run that wrote them; training, live checks and
    timings are those of that run.
    """
    summary = json.loads(path.read_text())
    cfg_dict = dict(summary["config"])
    for key in ("tasks", "seeds", "sample_sizes", "extra_sigmas", "alice_windows"):
        cfg_dict[key] = tuple(cfg_dict[key])
    cfg_dict["live_checks"] = tuple(tuple(x) for x in cfg_dict["live_checks"])
    cfg = Config(**cfg_dict)
    traces = _nan_from_none(summary["traces"])
    out.mkdir(parents=True, exist_ok=True)
    analysis = analyse(traces, cfg)
    summary["analysis"] = analysis
    summary["figures"] = make_figures(traces, analysis, cfg, out) if figures else []
    summary["headline"], summary["discussion"] = headline(analysis)
    write_report(summary, out)
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1))
    print(f"rewrote {out / 'report.md'} from {path}")
    return summary


if __name__ == "__main__":
    main()
