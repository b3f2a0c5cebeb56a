"""The eigensolver at the callback's cadence: warm against cold refreshes, side by side, by block size.

``CurvatureStabilityCallback`` refreshes its top-D subspace at every validation epoch, warm-started from the previous
refresh. This script replays that sequence without Lightning: after every epoch of plain Adam steps it builds the
probe operator once and runs ``top_eigenpairs`` (through ``probe._eigensolve``, as the callback does) in each
configuration, each warm configuration starting from its own previous result. Models (D = 10, tol 1e-3, k = 64 probe
samples, the callback's defaults and the quickstart's settings):

- ``quickstart``: ``examples/quickstart.py``'s MLP with BatchNorm and Dropout (~5k parameters), 1638 training samples
  in batches of 64: 26 Adam steps (lr 1e-3) per epoch;
- ``transformer``: the overhead benchmark's small decoder-only transformer (``_models.GPT_SIZES["small"]``, ~106k
  parameters) on synthetic Markov-chain tokens, 8192 training sequences in batches of 32: 256 Adam steps (lr 3e-3) per
  epoch; k = 64 probe sequences.

Configurations: ``cold, b`` (no warm start, ``block_size = b``); ``warm, b`` (warm start from the previous refresh;
``b = 1`` is the callback's default); and on the quickstart the experiment ``warm as a block, b=1`` (the previous
subspace always taken as a block: one batched product of all its vectors, Rayleigh-Ritz, then single-vector Krylov
steps; ``lanczos._BLOCK_WARM_FACTOR`` patched), which the solver otherwise does only when its one-product test says
the subspace barely moved.

Reported per model, over the refreshes after the first ``--skip`` epochs: HVPs, product calls (the sequential steps),
the sum of per-refresh median times (``--repeats`` solves each) and the share in products; then, over the refreshes
whose overlap ``‖U_prevᵀU‖²/D`` (the default configuration's consecutive subspaces) is at least 0.95, each warm
configuration against the cold ones side by side: HVPs, calls, time and their ratios, with the largest residual over
its bound (``‖Hu − θu‖ / (tol·|θ|)``, bounded as the solver bounds it; ≤ 1: the same accuracy). For scale, the median
time of one training step (forward, backward, Adam update) measured in the same run.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/refresh_sequence.py            # ~10 minutes on 2 shared CPU cores
    PYTHONPATH=. python tests/benchmarks/refresh_sequence.py --models quickstart   # ~2 minutes
    PYTHONPATH=. python tests/benchmarks/refresh_sequence.py --quick    # smoke run, a few seconds
    PYTHONPATH=. python tests/benchmarks/refresh_sequence.py --device cuda   # the same on a GPU
    PYTHONPATH=. python tests/benchmarks/refresh_sequence.py --compare-solver old_lanczos.py   # another solver too
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

from lightning_curvprobe.functional import lanczos, probe  # noqa: E402
from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction  # noqa: E402

D = 10
TOL = 1e-3
K = 64
OVERLAP = 0.95  # warm against cold over the refreshes at least this close to the previous subspace


def _sync() -> None:
    """Waits for the device (set to ``torch.cuda.synchronize`` with ``--device cuda``); nothing to wait for on CPU."""


@dataclass
class Config:
    label: str
    block_size: int
    warm: bool
    as_block: bool = False
    prev: Tensor | None = None
    hvps: list[int] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    product_times: list[float] = field(default_factory=list)
    solver: Any = None  # another lanczos module (--compare-solver); None: the package's
    identical: list[bool] = field(default_factory=list)  # with a solver: its result equal to the default's, bit for bit
    worst: list[float] = field(default_factory=list)  # per refresh: the largest residual over its bound
    overlaps: list[float] = field(default_factory=list)  # per refresh: the default configuration's overlap


class CountingOperator:
    """``op.matvec`` with its calls and their time counted."""

    def __init__(self, op: HessianOperator) -> None:
        self._matvec = op.matvec  # the bound method, before the instance attribute shadows it
        self.calls = 0
        self.seconds = 0.0

    def matvec(self, v: Tensor) -> Tensor:
        _sync()
        t0 = time.perf_counter()
        out = self._matvec(v)
        _sync()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


_COMPARED = ("eigenvalues", "residuals", "basis")


def solve(op: HessianOperator, cfg: Config, repeats: int) -> tuple[Any, float, int, float]:
    """Median seconds of ``repeats`` solves, and the last result, product calls and product seconds."""
    saved = lanczos._BLOCK_WARM_FACTOR, probe.top_eigenpairs
    if cfg.as_block:
        lanczos._BLOCK_WARM_FACTOR = float("inf")
    if cfg.solver is not None:  # probe._eigensolve then runs the other module's solver
        probe.top_eigenpairs = cfg.solver.top_eigenpairs
    try:
        times = []
        for _ in range(repeats):
            counting = CountingOperator(op)
            op.matvec = counting.matvec  # type: ignore[method-assign]  # probe._eigensolve calls op.matvec
            _sync()
            t0 = time.perf_counter()
            res = probe._eigensolve(op, D, tol=TOL, block_size=cfg.block_size,
                                    warm_start=cfg.prev if cfg.warm else None)
            _sync()
            times.append(time.perf_counter() - t0)
            del op.matvec
    finally:
        lanczos._BLOCK_WARM_FACTOR, probe.top_eigenpairs = saved
    return res, statistics.median(times), counting.calls, counting.seconds


@dataclass
class Sequence:
    """A model, its data, one epoch of training and the probe operator at the current weights."""

    name: str
    fn: ModelFunction
    epoch: Callable[[], None]
    base: Any
    steps_per_epoch: int
    configs: list[Config]
    step_times: list[float]  # of the training steps, seconds


def bound_ratio(res: Any) -> float:
    """Largest ``‖Hu − θu‖ / (tol·|θ|)`` of the returned pairs, with the solver's bound (``lanczos._limits``)."""
    ev = res.eigenvalues.double()
    top = float(ev.abs()[0])
    bound = TOL * ev.abs().clamp(lanczos._PAIR_FLOOR * top, top)
    return float((res.residuals.double() / bound).max())


def quickstart_sequence(device: torch.device, gen: torch.Generator, step_times: list[float]) -> Sequence:
    qs = _models.quickstart_module()
    torch.manual_seed(0)
    net = qs.Regressor().net.to(device)
    train, _ = qs.make_data()
    x, y = (t.to(device) for t in train.tensors)
    base = tuple(t[torch.randperm(len(x), generator=gen)[:K].to(device)] for t in (x, y))
    fn = ModelFunction(net, lambda model, batch: F.mse_loss(model(batch[0]), batch[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def epoch() -> None:
        net.train()
        for idx in torch.randperm(len(x), generator=gen).to(device).split(64):
            _sync()
            t0 = time.perf_counter()
            opt.zero_grad()
            F.mse_loss(net(x[idx]), y[idx]).backward()
            opt.step()
            _sync()
            step_times.append(time.perf_counter() - t0)

    configs = [
        Config("warm, b=1 (callback default)", 1, True),
        Config("cold, b=1", 1, False),
        Config("warm, b=4", 4, True),
        Config("cold, b=4", 4, False),
        Config("warm, b=13", 13, True),
        Config("cold, b=13", 13, False),
        Config("warm as a block, b=1", 1, True, as_block=True),
    ]
    return Sequence(f"quickstart MLP, N = {fn.num_params}", fn, epoch, base, -(-len(x) // 64), configs, step_times)


def transformer_sequence(device: torch.device, gen: torch.Generator, step_times: list[float], size: str,
                         num_train: int, k: int) -> Sequence:
    vocab, context = _models.GPT_SIZES[size][0], _models.GPT_SIZES[size][5]
    tokens = _models.markov_tokens(num_train, context + 1, vocab).to(device)
    net = _models.make_gpt(size).to(device)
    base = tokens[torch.randperm(num_train, generator=gen)[:k].to(device)]
    fn = ModelFunction(net, _models.lm_loss)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def epoch() -> None:
        net.train()
        for idx in torch.randperm(num_train, generator=gen).to(device).split(32):
            _sync()
            t0 = time.perf_counter()
            opt.zero_grad()
            _models.lm_loss(net, tokens[idx]).backward()
            opt.step()
            _sync()
            step_times.append(time.perf_counter() - t0)

    configs = [
        Config("warm, b=1 (callback default)", 1, True),
        Config("cold, b=1", 1, False),
        Config("warm, b=13", 13, True),
        Config("cold, b=13", 13, False),
    ]
    return Sequence(f"transformer ({size}), N = {fn.num_params}, k = {k}", fn, epoch, base,
                    -(-num_train // 32), configs, step_times)


def run_sequence(seq: Sequence, args: argparse.Namespace, other: Any) -> None:
    configs = seq.configs
    if other is not None:
        configs.insert(1, Config("warm, b=1, compared solver", 1, True, solver=other))
    step_times = seq.step_times
    print(f"\n=== {seq.name}: D = {D}, tol {TOL:g}; {seq.steps_per_epoch} Adam steps per epoch, {args.epochs} epochs, "
          f"{args.repeats} repeats")
    print("HVPs per refresh (overlap: ‖U_prevᵀU‖²/D of the default configuration's consecutive subspaces)")
    print("epoch  overlap  " + "  ".join(f"{c.label.split(' (')[0]:>21s}" for c in configs))
    for e in range(args.epochs):
        seq.epoch()
        op = HessianOperator(seq.fn, seq.base, where="the probe samples")
        line, overlap = [], float("nan")
        for c in configs:
            res, seconds, calls, product_s = solve(op, c, args.repeats)
            if c is configs[0] and c.prev is not None:
                overlap = float((c.prev[:, :D].T @ res.eigenvectors).pow(2).sum()) / D
            if c is configs[0]:
                default = res
            elif c.solver is not None:
                c.identical.append(all(torch.equal(getattr(res, a), getattr(default, a)) for a in _COMPARED)
                                   and res.hvps == default.hvps)
            c.prev = res.basis
            line.append(f"{res.hvps:4d} HVPs {seconds * 1e3:7.1f} ms")
            if e >= args.skip:
                c.hvps.append(res.hvps)
                c.calls.append(calls)
                c.times.append(seconds)
                c.product_times.append(product_s)
                c.worst.append(bound_ratio(res))
        for c in configs:
            if e >= args.skip:
                c.overlaps.append(overlap)
        print(f"{e:5d}  {overlap:7.3f}  " + "  ".join(f"{s:>21s}" for s in line), flush=True)

    n_ref = len(configs[0].hvps)
    ref_time = sum(configs[0].times)
    print(f"\nSums over the {n_ref} refreshes from epoch {args.skip} on:\n")
    print("| configuration | HVPs | HVPs/refresh | product calls | time (ms) | time / default | in products | "
          "max residual / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for c in configs:
        t = sum(c.times)
        print(f"| {c.label} | {sum(c.hvps)} | {sum(c.hvps) / max(1, len(c.hvps)):.1f} | {sum(c.calls)} | "
              f"{t * 1e3:.0f} | {t / ref_time:.2f} | {sum(c.product_times) / t:.0%} | {max(c.worst):.2g} |")
    close = [i for i, o in enumerate(configs[0].overlaps) if o >= OVERLAP]
    print(f"\nWarm against cold over the {len(close)} refreshes with overlap ≥ {OVERLAP} "
          f"({', '.join(f'{configs[0].overlaps[i]:.3f}' for i in close) or 'none'}), side by side:\n")
    print("| warm | cold | HVPs warm / cold | calls warm / cold | time (ms) warm / cold | HVPs ratio | calls ratio | "
          "time ratio | max residual / bound, warm and cold |")
    print("|---|---|---|---|---|---|---|---|---|")
    if close:
        colds = [c for c in configs if not c.warm]
        for w in (c for c in configs if c.warm and c.solver is None):
            for c in colds:
                h = [sum(x.hvps[i] for i in close) for x in (w, c)]
                k = [sum(x.calls[i] for i in close) for x in (w, c)]
                t = [sum(x.times[i] for i in close) for x in (w, c)]
                r = [max(x.worst[i] for i in close) for x in (w, c)]
                print(f"| {w.label} | {c.label} | {h[0]} / {h[1]} | {k[0]} / {k[1]} | {t[0] * 1e3:.0f} / "
                      f"{t[1] * 1e3:.0f} | {h[0] / h[1]:.2f} | {k[0] / k[1]:.2f} | {t[0] / t[1]:.2f} | "
                      f"{r[0]:.2g}, {r[1]:.2g} |")
    for c in configs:
        if c.solver is not None:
            print(f"\n{c.label}: results bit-identical to the default's (products, eigenvalues, residuals, basis) at "
                  f"{sum(c.identical)} of {len(c.identical)} refreshes.")
    step = statistics.median(step_times)
    refresh = statistics.median(configs[0].times)
    epoch_s = seq.steps_per_epoch * step
    print(f"\nOne training step (forward, backward, Adam): median {step * 1e3:.2f} ms; an epoch's "
          f"{seq.steps_per_epoch} steps {epoch_s * 1e3:.0f} ms. The default refresh: median {refresh * 1e3:.1f} ms = "
          f"{refresh / step:.1f} training steps: the eigensolve alone adds {refresh / epoch_s:.2f} epochs' worth of "
          f"steps per refresh to this plain loop (Lightning's own per-step costs lengthen an epoch: see overhead.py "
          f"for the callback).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="quickstart,transformer")
    parser.add_argument("--epochs", type=int, default=None, help="refreshes per model (default 14)")
    parser.add_argument("--skip", type=int, default=2, help="refreshes left out of the sums (the first epochs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed solves per refresh (quickstart)")
    parser.add_argument("--gpt-repeats", type=int, default=1, help="timed solves per refresh (transformer)")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--device", default="cpu", help="e.g. cuda: model, data and basis there (default cpu)")
    parser.add_argument("--quick", action="store_true", help="3 epochs, 1 repeat, no skip; a tiny transformer")
    parser.add_argument("--compare-solver", default=None, help="path of another lanczos.py (e.g. `git show "
                        "REV:lightning_curvprobe/functional/lanczos.py > old.py`): the default configuration with "
                        "its solver runs side by side, and its results are compared bit for bit")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.gpt_repeats, args.skip = 3, 1, 1, 0
    args.epochs = args.epochs or 14
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        global _sync
        _sync = functools.partial(torch.cuda.synchronize, device)
    t_start = time.perf_counter()
    other = _models.load_module("lanczos_compared", args.compare_solver) if args.compare_solver else None
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU threads"
    print(f"torch {torch.__version__}, {where}")
    for name in args.models.split(","):
        gen = torch.Generator().manual_seed(1)
        step_times: list[float] = []
        if name == "quickstart":
            seq = quickstart_sequence(device, gen, step_times)
            repeats = args.repeats
        else:
            seq = (transformer_sequence(device, gen, step_times, "tiny", 512, 16) if args.quick
                   else transformer_sequence(device, gen, step_times, "small", 8192, K))
            repeats = args.gpt_repeats
        run_sequence(seq, argparse.Namespace(**{**vars(args), "repeats": repeats}), other)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
