"""The overhead budget: fit wall time with ``max_overhead=0.05`` against the same fit without the callback.

Three tasks, each fitted side by side (interleaved, same seed) without the callback, with the callback probing at
every validation epoch, and with ``max_overhead=0.05``:

- the quickstart (``examples/quickstart.py``; 26 training steps per validation);
- the small transformer of ``overhead.py`` (~106k parameters, synthetic Markov tokens);
- a ResNet-style CNN with BatchNorm (two residual blocks, ~20k parameters) on synthetic 3×16×16 images from a random
  teacher, validating every 16 training steps.

Printed per task: the median fit-time ratio to the baseline, the callback's own cumulative ``overhead`` (its logged
value at the end), and how many validation epochs refreshed, reused the kept subspace, or skipped.

Run: ``PYTHONPATH=. python tests/benchmarks/overhead_budget.py [--quick] [--repeats 3] [--threads 2] [--budget-only]
[--epoch-factor 10]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import collections  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402, N812
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

from lightning_curvprobe import CurvatureStabilityCallback  # noqa: E402

BUDGET = 0.05


class ResNetCNN(L.LightningModule):
    """Stem conv + BatchNorm, two residual blocks (conv-BN-ReLU-conv-BN), global average pooling, linear head."""

    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = F.relu(h + block(h))
        return self.head(h.mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def cnn_data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    teacher = torch.randn(4, 3 * 16 * 16, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x.flatten(1) @ teacher.T).argmax(1))


def tasks(quick: bool) -> dict[str, tuple[Any, Any, int]]:
    """name -> (module factory, loaders factory, epochs)."""
    qs = _models.quickstart_module()
    vocab, context = _models.GPT_SIZES["small"][0], _models.GPT_SIZES["small"][5]
    tokens = _models.markov_tokens(1024 + 256, context + 1, vocab)
    out = {
        "quickstart": (
            qs.Regressor,
            lambda: tuple(DataLoader(d, batch_size=64, shuffle=i == 0) for i, d in enumerate(qs.make_data())),
            3 if quick else 20,
        ),
        "ResNet CNN, validation every 16 steps": (
            ResNetCNN,
            lambda: (DataLoader(cnn_data(512), batch_size=32, shuffle=True), DataLoader(cnn_data(256, 1), 256)),
            3 if quick else 30,
        ),
    }
    if not quick:
        out["transformer (GPT small)"] = (
            lambda: _models.gpt_lightning_module("small"),
            lambda: (
                DataLoader(TensorDataset(tokens[:1024]), batch_size=32, shuffle=True),
                DataLoader(TensorDataset(tokens[1024:]), batch_size=256),
            ),
            12,
        )
    return out


class LoopTimer(L.Callback):
    """Wall time inside the training batches and the validation loops (registered before the probe's callback, so
    that a probe at the end of a validation epoch falls outside): what other jobs on the machine slow down as much as
    the baseline; the rest of a fit's time is set-up, the callback's own work and Lightning's."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start

    on_train_batch_start = on_validation_epoch_start = _begin
    on_train_batch_end = on_validation_epoch_end = _end


def fit(make_module: Any, make_loaders: Any, epochs: int, callback: dict[str, Any] | None) -> tuple[float, Any, float]:
    """Fit wall time, the callback, and the time outside training batches and validation loops."""
    L.seed_everything(0, verbose=False)
    train, val = make_loaders()
    cb = CurvatureStabilityCallback(**callback) if callback is not None else None
    loops = LoopTimer()
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[loops, cb] if cb else [loops],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    module = make_module()
    t0 = time.perf_counter()
    trainer.fit(module, train, val)
    total = time.perf_counter() - t0
    return total, cb, total - loops.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget-only", action="store_true", help="fit only the baseline and max_overhead (not every-epoch probes)"
    )
    parser.add_argument("--epoch-factor", type=int, default=1, help="fit this many times the epochs (longer fits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    repeats = 1 if args.quick else args.repeats
    configs = {
        "baseline": None,
        "every validation epoch": dict(num_eigenvectors=10, num_probe_samples=64),
        f"max_overhead={BUDGET}": dict(num_eigenvectors=10, num_probe_samples=64, max_overhead=BUDGET),
    }
    if args.budget_only:
        del configs["every validation epoch"]
    print(f"torch {torch.__version__}, {args.threads} threads, {repeats} repeats (interleaved), medians")
    for name, (make_module, make_loaders, epochs) in tasks(args.quick).items():
        epochs *= args.epoch_factor
        times: dict[str, list[float]] = collections.defaultdict(list)
        outside: dict[str, list[float]] = collections.defaultdict(list)
        last: dict[str, Any] = {}
        for _ in range(repeats):
            for label, cfg in configs.items():
                t, cb, rest = fit(make_module, make_loaders, epochs, cfg)
                times[label].append(t)
                outside[label].append(rest)
                last[label] = cb
        base = statistics.median(times["baseline"])
        base_rest = statistics.median(outside["baseline"])
        print(f"\n== {name}: {epochs} epochs, baseline fit {base:.2f} s ({base_rest:.2f} s outside the loops)")
        for label in configs:
            if label == "baseline":
                continue
            cb = last[label]
            ratios = [t / b for t, b in zip(times[label], times["baseline"], strict=True)]
            sched = cb._schedule
            kinds = collections.Counter("refresh" if h["hvps"] > 0 else "reuse" for h in cb.history)
            first = cb.history[0]["probe_seconds"] if cb.history else float("nan")
            print(
                f"  {label:<24} fit ratio {statistics.median(ratios):.3f}   callback's overhead "
                f"{sched.overhead():.3f}   probes: {kinds['refresh']} refresh, {kinds['reuse']} reuse, "
                f"{sched.num_skipped} skipped   first probe {first:.2f} s = {first / base:.3f} of the baseline fit, "
                f"pre-flight and probes {sched.probe_seconds:.2f} s; outside the loops "
                f"+{statistics.median(outside[label]) - base_rest:.2f} s over the baseline "
                f"(= {(statistics.median(outside[label]) - base_rest) / base:.3f} of its fit)"
            )


if __name__ == "__main__":
    main()
