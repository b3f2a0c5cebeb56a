"""The eigensolver at the callback's cadence: one refresh per quickstart epoch, cold against warm, by block size.

``CurvatureStabilityCallback`` refreshes its top-D subspace at every validation epoch, warm-started from the previous
refresh. This script replays that sequence without Lightning on the quickstart (``examples/quickstart.py``: the MLP
with BatchNorm and Dropout, 1638 training samples in batches of 64, i.e. 26 Adam steps per epoch) at the quickstart
callback's settings (k = 64 probe samples, D = 10, tol 1e-3): after every epoch of plain Adam steps it builds the probe
operator once and runs ``top_eigenpairs`` (through ``probe._eigensolve``, as the callback does) in each configuration,
each warm configuration starting from its own previous result:

- ``cold, b``: no warm start, ``block_size = b``;
- ``warm, b``: warm start from the previous refresh (``b = 1`` is the callback's default);
- ``warm as a block, b``: the previous subspace always taken as a block (one batched product of all its vectors,
  Rayleigh-Ritz, then Krylov blocks of ``b``), which the solver otherwise does only when its one-product test says the
  subspace barely moved (an experiment, not a setting: ``lanczos._BLOCK_WARM_FACTOR`` patched).

Reported per configuration, over the refreshes after the first ``--skip`` epochs (the early, fast-moving ones): HVPs,
product calls (the sequential steps), the sum of per-refresh median times (``--repeats`` solves each) and the time in
products; and, for scale, the median time of one training step (forward, backward, Adam update) measured in the same
run, so that the default refresh's cost can be read in training steps against the epoch's 26 (in this plain loop;
under Lightning a step costs more and ``overhead.py`` measures the callback's ratio itself).

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/refresh_sequence.py            # ~2 minutes on 2 shared CPU cores
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
BATCH = 64


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--skip", type=int, default=2, help="refreshes left out of the sums (the first epochs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--device", default="cpu", help="e.g. cuda: model, data and basis there (default cpu)")
    parser.add_argument("--quick", action="store_true", help="3 epochs, 1 repeat, no skip")
    parser.add_argument("--compare-solver", default=None, help="path of another lanczos.py (e.g. `git show "
                        "REV:lightning_curvprobe/functional/lanczos.py > old.py`): the default configuration with "
                        "its solver runs side by side, and its results are compared bit for bit")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repeats, args.skip = 3, 1, 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        global _sync
        _sync = functools.partial(torch.cuda.synchronize, device)
    t_start = time.perf_counter()

    qs = _models.quickstart_module()
    torch.manual_seed(0)
    module = qs.Regressor()
    net = module.net.to(device)
    train, _ = qs.make_data()
    x, y = (t.to(device) for t in train.tensors)
    gen = torch.Generator().manual_seed(1)
    base = tuple(t[torch.randperm(len(x), generator=gen)[:K].to(device)] for t in (x, y))
    fn = ModelFunction(net, lambda model, batch: F.mse_loss(model(batch[0]), batch[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step_times: list[float] = []

    def epoch() -> None:
        net.train()
        for idx in torch.randperm(len(x), generator=gen).to(device).split(BATCH):
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
        Config("warm as a block, b=13", 13, True, as_block=True),
    ]
    if args.compare_solver:
        other = _models.load_module("lanczos_compared", args.compare_solver)
        configs.insert(1, Config("warm, b=1, compared solver", 1, True, solver=other))
    steps_per_epoch = -(-len(x) // BATCH)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU threads"
    print(f"torch {torch.__version__}, {where}; quickstart MLP, N = {fn.num_params}, k = {K}, D = {D}, "
          f"tol {TOL:g}; {steps_per_epoch} Adam steps per epoch, {args.epochs} epochs, {args.repeats} repeats")
    print("\nHVPs per refresh (overlap: ‖U_prevᵀU‖²/D of the default configuration's consecutive subspaces)")
    print("epoch  overlap  " + "  ".join(f"{c.label.split(' (')[0]:>21s}" for c in configs))
    for e in range(args.epochs):
        epoch()
        op = HessianOperator(fn, base, where="the probe samples")
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
            line.append(f"{res.hvps:4d} HVPs {seconds * 1e3:6.1f} ms")
            if e >= args.skip:
                c.hvps.append(res.hvps)
                c.calls.append(calls)
                c.times.append(seconds)
                c.product_times.append(product_s)
        print(f"{e:5d}  {overlap:7.3f}  " + "  ".join(f"{s:>21s}" for s in line), flush=True)

    n_ref = len(configs[0].hvps)
    ref_time = sum(configs[0].times)
    print(f"\nSums over the {n_ref} refreshes from epoch {args.skip} on:\n")
    print("| configuration | HVPs | HVPs/refresh | product calls | time (ms) | time / default | in products |")
    print("|---|---|---|---|---|---|---|")
    for c in configs:
        t = sum(c.times)
        print(f"| {c.label} | {sum(c.hvps)} | {sum(c.hvps) / max(1, len(c.hvps)):.1f} | {sum(c.calls)} | "
              f"{t * 1e3:.0f} | {t / ref_time:.2f} | {sum(c.product_times) / t:.0%} |")
    for c in configs:
        if c.solver is not None:
            print(f"\n{c.label}: results bit-identical to the default's (products, eigenvalues, residuals, basis) at "
                  f"{sum(c.identical)} of {len(c.identical)} refreshes.")
    step = statistics.median(step_times)
    refresh = statistics.median(configs[0].times)
    epoch_s = steps_per_epoch * step
    print(f"\nOne training step (forward, backward, Adam): median {step * 1e3:.2f} ms; an epoch's {steps_per_epoch} "
          f"steps {epoch_s * 1e3:.0f} ms. The default refresh: median {refresh * 1e3:.1f} ms = {refresh / step:.1f} "
          f"training steps: the eigensolve alone adds {refresh / epoch_s:.2f} epochs' worth of steps per refresh to "
          f"this plain loop (Lightning's own per-step costs lengthen an epoch: see overhead.py for the callback).")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
