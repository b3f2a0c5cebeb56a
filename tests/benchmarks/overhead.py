"""What leaving the callback on costs: fit wall time with and without ``CurvatureStabilityCallback``, side by side.

For the quickstart (``examples/quickstart.py``: MLP with BatchNorm/Dropout, 1638 training samples, batch 64) and a
small decoder-only transformer (``_models.GPT_SIZES["small"]``, ~106k parameters, synthetic Markov-chain tokens), it
runs ``Trainer.fit`` with the same seed without the callback and with it, interleaved, ``--repeats`` times in this one
process, and prints the median ratio of fit wall times and a breakdown of the callback's own time:

- ``base graph``: the base set's loss, gradient and gradient graph (``HessianOperator``), once per probe;
- ``eigensolve``: ``top_eigenpairs`` (warm-started Lanczos, run by ``probe._eigensolve``), on refresh epochs;
- ``coefficients``: ``CurvatureStability.update`` — the added samples' loss, projected gradient and projected
  Hessian (``m · D`` products) and the Monte Carlo forward passes;
- ``estimator``: ``CurvatureStability.compute``;
- ``logging``: ``ProbeLogger.log``;
- ``other``: the rest of ``on_validation_epoch_end`` (and the one-off probe-data preparation).

Configurations (the first is the headline; each ratio is against the baseline fit of the same repeat):

- quickstart: the quickstart's own callback (D = 10, k = 64, m = 8, σ = 1e-2, refresh every validation epoch);
  the same with the per-vector/per-sample loops of the previous version (``hvp.USE_BATCHED = False``, "before");
  callback defaults (m = 1); cheaper settings that a user can pick (``refresh_every_n_epochs``,
  ``quadratic_error_samples=0``, ``num_added_samples=1``, ``tol=1e-2``) and probing less often with the Trainer's
  ``check_val_every_n_epoch`` (that variant has its own baseline with the same Trainer setting); and one experiment
  that is not a setting: the eigensolver always taking its warm start as a block (one batched Rayleigh-Ritz product
  instead of Lanczos from one vector when the subspace moved; more HVPs, fewer sequential calls);
- transformer: callback defaults (D = 10, k = 64, m = 1, refresh every validation epoch), before and after.

A second table gives, per task, a lower bound on the ratio that no implementation can beat at refresh every
validation epoch (:func:`floor`: the base set's gradient graph and the ``D`` products that certify the returned
eigenvectors, timed in their cheapest form on the module fitted without the callback), the measured probe in training
steps, and the validation interval at which that probe would cost 5 %.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/overhead.py             # ~7 minutes on 2 shared CPU cores
    PYTHONPATH=. python tests/benchmarks/overhead.py --quick     # smoke run, a few seconds
    PYTHONPATH=. python tests/benchmarks/overhead.py --tasks quickstart --only "(D=10, k=64" --threads 1
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402, N812
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset, default_collate  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

import lightning_curvprobe.callback as cbm
import lightning_curvprobe.functional.hvp as hvp  # noqa: E402
from lightning_curvprobe import CurvatureStability, CurvatureStabilityCallback  # noqa: E402
from lightning_curvprobe._logging import ProbeLogger
from lightning_curvprobe._probe_data import training_step_loss  # noqa: E402
from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction, _probe_mode  # noqa: E402
from lightning_curvprobe.functional.probe import _eigensolve  # noqa: E402

PARTS = ("base graph", "eigensolve", "coefficients", "estimator", "logging")


class Timers:
    """Accumulated wall time of the callback's parts, installed once by wrapping functions (µs of overhead)."""

    def __init__(self) -> None:
        self.t: dict[str, float] = collections.defaultdict(float)
        self.n: collections.Counter[str] = collections.Counter()
        self.hvps = 0

    def reset(self) -> None:
        self.t.clear()
        self.n.clear()
        self.hvps = 0

    def wrap(self, owner: Any, name: str, label: str, on_result: Callable[[Any], None] | None = None) -> None:
        if not hasattr(owner, name):
            print(f"  (breakdown: {owner.__name__}.{name} not found, '{label}' not measured)")
            return
        fn = getattr(owner, name)
        timers = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timers.t[label] += time.perf_counter() - t0
            timers.n[label] += 1
            if on_result is not None:
                on_result(out)
            return out

        setattr(owner, name, wrapped)


TIMERS = Timers()


def install_timers() -> None:
    def count(eig: Any) -> None:
        TIMERS.hvps += int(getattr(eig, "hvps", 0))

    TIMERS.wrap(cbm, "HessianOperator", "base graph")
    TIMERS.wrap(cbm, "_eigensolve", "eigensolve", count)
    TIMERS.wrap(CurvatureStability, "update", "coefficients")
    TIMERS.wrap(CurvatureStability, "compute", "estimator")
    TIMERS.wrap(ProbeLogger, "log", "logging")
    TIMERS.wrap(CurvatureStabilityCallback, "on_validation_epoch_end", "total")
    TIMERS.wrap(CurvatureStabilityCallback, "on_train_start", "setup")


# ----------------------------------------------------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    make_module: Callable[[], L.LightningModule]
    make_loaders: Callable[[], tuple[DataLoader, DataLoader]]
    epochs: int


def quickstart_task(epochs: int) -> Task:
    qs = _models.quickstart_module()

    def loaders() -> tuple[DataLoader, DataLoader]:
        train, val = qs.make_data()
        return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=256)

    return Task("quickstart", qs.Regressor, loaders, epochs)


def transformer_task(epochs: int, num_train: int) -> Task:
    vocab = _models.GPT_SIZES["small"][0]
    context = _models.GPT_SIZES["small"][5]
    tokens = _models.markov_tokens(num_train + 512, context + 1, vocab)

    def loaders() -> tuple[DataLoader, DataLoader]:
        train, val = TensorDataset(tokens[:num_train]), TensorDataset(tokens[num_train:])
        return DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=256)

    name = f"transformer (GPT small, {num_train // 32} steps/epoch)"
    return Task(name, lambda: _models.gpt_lightning_module("small"), loaders, epochs)


@dataclass
class Config:
    label: str
    callback: dict[str, Any] | None  # None: the baseline fit
    trainer: dict[str, Any] = field(default_factory=dict)
    batched: bool = True
    patch: dict[str, Any] = field(default_factory=dict)  # module attributes overridden during the fit (experiments)


def fit(task: Task, cfg: Config) -> tuple[float, CurvatureStabilityCallback | None, int, L.LightningModule]:
    """Seconds of ``trainer.fit`` (same seed every time), the callback, the number of optimizer steps, the module."""
    hvp.USE_BATCHED = cfg.batched
    hvp._VMAP_FAILED.clear()
    saved = {key: getattr(*_attr(key)) for key in cfg.patch}
    for key, value in cfg.patch.items():
        setattr(*_attr(key), value)
    L.seed_everything(0, verbose=False)
    train, val = task.make_loaders()
    cb = CurvatureStabilityCallback(**cfg.callback) if cfg.callback is not None else None
    trainer = L.Trainer(
        max_epochs=task.epochs,
        callbacks=[cb] if cb is not None else [],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **cfg.trainer,
    )
    module = task.make_module()
    t0 = time.perf_counter()
    trainer.fit(module, train, val)
    elapsed = time.perf_counter() - t0
    hvp.USE_BATCHED = True
    for key, value in saved.items():
        setattr(*_attr(key), value)
    return elapsed, cb, trainer.global_step, module


def _attr(key: str) -> tuple[Any, str]:
    module, name = key.rsplit(".", 1)
    return sys.modules[module], name


@dataclass
class Summary:
    """What the floor measurement needs from a task's fits."""

    module: L.LightningModule  # fitted without the callback (the default Trainer's baseline, last repeat)
    fit_s: float  # median fit time of that baseline
    steps: int  # its optimizer steps
    probe_ms: float  # the first configuration's median callback time per probe
    probe_config: str


def run_task(
    task: Task, configs: list[Config], repeats: int, only: str | None = None
) -> tuple[list[str], Summary | None]:
    """Interleaved fits; returns the table rows and, when the default Trainer's baseline ran, a :class:`Summary`."""
    if only:
        parts = [p.strip() for p in only.split(",") if p.strip()]
        configs = [c for c in configs if any(p in c.label for p in parts)]
        if not configs:
            return [], None
    times: dict[str, list[float]] = collections.defaultdict(list)
    parts: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    info: dict[str, str] = {}
    fitted: dict[str, tuple[L.LightningModule, int]] = {}
    baseline_of = {c.label: _baseline_label(c) for c in configs}
    baselines = {baseline_of[c.label]: Config(baseline_of[c.label], None, c.trainer) for c in configs}
    print(f"\n== {task.name}: {task.epochs} epochs, {repeats} repeats (interleaved)")
    for r in range(repeats):
        for base in baselines.values():
            t, _, steps, module = fit(task, base)
            times[base.label].append(t)
            fitted[base.label] = (module, steps)
            info[base.label] = f"{steps} steps"
            print(f"  repeat {r}: {base.label:55s} {t:7.2f} s")
        for cfg in configs:
            TIMERS.reset()
            t, cb, steps, _ = fit(task, cfg)
            times[cfg.label].append(t)
            assert cb is not None
            probes = len(cb.history)
            total = TIMERS.t.get("total", 0.0) + TIMERS.t.get("setup", 0.0)
            for p in PARTS:
                parts[cfg.label][p].append(TIMERS.t.get(p, 0.0))
            parts[cfg.label]["other"].append(total - sum(TIMERS.t.get(p, 0.0) for p in PARTS))
            parts[cfg.label]["callback total"].append(total)
            hvps = [int(h.get("hvps", 0)) for h in cb.history]
            info[cfg.label] = f"{probes} probes, HVPs/refresh {hvps}"
            ratio = t / times[baseline_of[cfg.label]][-1]
            print(f"  repeat {r}: {cfg.label:55s} {t:7.2f} s  ratio {ratio:.3f}  callback {total:.2f} s")
    rows = []
    for cfg in configs:
        base = baseline_of[cfg.label]
        ratios = [a / b for a, b in zip(times[cfg.label], times[base], strict=True)]
        med = {p: statistics.median(v) for p, v in parts[cfg.label].items()}
        probes = int(info[cfg.label].split()[0])
        breakdown = ", ".join(f"{p} {1e3 * med[p] / max(probes, 1):.1f}" for p in (*PARTS, "other"))
        rows.append(
            f"| {task.name} | {cfg.label} | {statistics.median(times[base]):.2f} | "
            f"{statistics.median(times[cfg.label]):.2f} | **{statistics.median(ratios):.3f}** "
            f"({min(ratios):.3f}–{max(ratios):.3f}) | {1e3 * med['callback total'] / max(probes, 1):.1f} | "
            f"{breakdown} | {info[cfg.label]}; baseline {info[base]} |"
        )
    plain = _baseline_label(Config("", None))
    if plain not in fitted:
        return rows, None
    head = configs[0]
    probes = max(int(info[head.label].split()[0]), 1)
    summary = Summary(
        module=fitted[plain][0],
        fit_s=statistics.median(times[plain]),
        steps=fitted[plain][1],
        probe_ms=1e3 * statistics.median(parts[head.label]["callback total"]) / probes,
        probe_config=head.label.strip(),
    )
    return rows, summary


def floor(task: Task, summary: Summary, repeats: int, k: int = 64, D: int = 10) -> str:
    """A lower bound on the ratio at refresh every validation epoch, measured on the module fitted without callback.

    Whatever the eigensolver, a refresh must build the base set's gradient graph (one forward and backward pass with
    ``create_graph``, on ``k`` samples) and multiply each of the ``D`` eigenvectors it returns by the Hessian (their
    residuals ``‖Hu - θu‖`` certify them; ``D`` products is what a perfect warm start costs). Both are timed here in
    their cheapest form: the operator the callback builds (its default loss, ``training_step``'s, on ``k`` samples
    drawn as the callback draws them), and the ``D`` products as one batched block or one at a time, whichever is
    faster (medians of ``repeats``). Everything else the callback does (the Krylov vectors a moved subspace needs, the
    added samples, logging) comes on top, so ``1 + (graph + D products) / epoch`` bounds the ratio from below.
    """
    train, _ = task.make_loaders()
    dataset = train.dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:k]  # as the callback draws
    batch = default_collate([dataset[int(i)] for i in idx])
    module = summary.module
    fn = ModelFunction(module, training_step_loss)

    def median_ms(f: Callable[[], Any]) -> float:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(ts)

    graph_ms = median_ms(lambda: HessianOperator(fn, batch))
    op = HessianOperator(fn, batch)
    U = _eigensolve(op, D, tol=1e-3).eigenvectors
    with _probe_mode(module):
        block_ms = median_ms(lambda: op.matvec(U))
        single_ms = median_ms(lambda: [op.matvec(U[:, i]) for i in range(D)])
    products_ms = min(block_ms, single_ms)
    epoch_ms = 1e3 * summary.fit_s / task.epochs
    step_ms = 1e3 * summary.fit_s / summary.steps
    bound = 1 + (graph_ms + products_ms) / epoch_ms
    probe_steps = summary.probe_ms / step_ms
    return (
        f"| {task.name} | {epoch_ms:.1f} ({summary.steps // task.epochs} steps) | {step_ms:.2f} | {graph_ms:.2f} | "
        f"{block_ms:.2f} / {single_ms:.2f} | **{bound:.3f}** | {summary.probe_ms:.1f} = {probe_steps:.0f} steps "
        f"({summary.probe_config}) | {probe_steps / 0.05:.0f} |"
    )


def _baseline_label(cfg: Config) -> str:
    extra = ", ".join(f"{k}={v}" for k, v in cfg.trainer.items())
    return "baseline (no callback" + (f", {extra})" if extra else ")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2 epochs, few configurations (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="fits per configuration (default 3, quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="quickstart epochs (default 20, quick 2)")
    parser.add_argument("--gpt-epochs", type=int, default=None, help="transformer epochs (default 3, quick 1)")
    parser.add_argument("--gpt-train", type=int, default=None, help="transformer training sequences (default 8192)")
    parser.add_argument("--tasks", default="quickstart,transformer")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only", default=None, help="comma-separated parts of configuration labels: run just those (and baselines)"
    )
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    install_timers()
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {repeats}")

    qs_cb = dict(num_eigenvectors=10, sigma=1e-2, num_probe_samples=64, num_added_samples=8)
    rows: list[str] = []
    floors: list[str] = []
    floor_repeats = 2 if args.quick else 11
    tasks = [t.strip() for t in args.tasks.split(",")]
    if "quickstart" in tasks:
        epochs = args.epochs or (2 if args.quick else 20)
        configs = [
            Config("quickstart callback (D=10, k=64, m=8)", qs_cb),
            Config("  same, before (per-vector/per-sample loops)", qs_cb, batched=False),
        ]
        if not args.quick:
            configs += [
                Config("callback defaults (m=1, σ=1e-3)", {}),
                Config("quickstart cb, refresh_every_n_epochs=5", {**qs_cb, "refresh_every_n_epochs": 5}),
                Config(
                    "m=1, quadratic_error_samples=0, refresh_every_n_epochs=5",
                    {**qs_cb, "num_added_samples": 1, "quadratic_error_samples": 0, "refresh_every_n_epochs": 5},
                ),
                Config("quickstart cb, tol=1e-2", {**qs_cb, "tol": 1e-2}),
                Config("quickstart cb, Trainer(check_val_every_n_epoch=5)", qs_cb, {"check_val_every_n_epoch": 5}),
                Config("quickstart cb, Trainer(check_val_every_n_epoch=10)", qs_cb, {"check_val_every_n_epoch": 10}),
                Config(
                    "experiment: warm start always as a block (batched Rayleigh-Ritz)",
                    qs_cb,
                    patch={"lightning_curvprobe.functional.lanczos._BLOCK_WARM_FACTOR": float("inf")},
                ),
            ]
        task = quickstart_task(epochs)
        task_rows, summary = run_task(task, configs, repeats, args.only)
        rows += task_rows
        if summary is not None:
            floors.append(floor(task, summary, floor_repeats, k=qs_cb["num_probe_samples"]))
    if "transformer" in tasks:
        epochs = args.gpt_epochs or 1 if args.quick else (args.gpt_epochs or 3)
        num_train = args.gpt_train or (256 if args.quick else 8192)
        gpt_cb = {"num_probe_samples": 16} if args.quick else {}
        configs = [
            Config("callback defaults (D=10, k=64, m=1)" if not args.quick else "callback (k=16)", gpt_cb),
            Config("  same, before (per-vector/per-sample loops)", gpt_cb, batched=False),
        ]
        task = transformer_task(epochs, num_train)
        task_rows, summary = run_task(task, configs, repeats, args.only)
        rows += task_rows
        if summary is not None:
            floors.append(floor(task, summary, floor_repeats, k=gpt_cb.get("num_probe_samples", 64)))

    print("\nBreakdown: median callback milliseconds per probe (validation epoch).")
    print(
        "\n| task | configuration | fit without (s) | fit with (s) | ratio, median (range) | callback ms/probe | "
        "breakdown ms/probe | notes |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if floors:
        print(
            "\nFloor at refresh every validation epoch (D = 10; see floor()): the base graph and the D products that "
            "certify the returned eigenvectors, in their cheapest form (batched block / one at a time), against the "
            "epoch of the fit without the callback; the last columns read the measured probe in training steps (fit "
            "time / optimizer steps) and the validation interval at which it would cost 5 % (more products are "
            "needed when the subspace moves further between probes)."
        )
        print(
            "\n| task | epoch without callback (ms) | step (ms) | base graph (ms) | D products, block / singles (ms) | "
            "lower bound on the ratio | probe (ms) = training steps | steps between probes for 5 % |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for row in floors:
            print(row)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
