"""Which top-D set the eigensolver returns at its defaults on spectra that flatten, against ARPACK (issue #18, item 4).

A spectrum that flattens below its top few eigenvalues (a BatchNorm CNN's: λ_10 at 2-20 % of λ_1, neighbours 0.01-1 %
of λ_1 apart) is where a Lanczos solver can stop before its Krylov space has found every member of the top D: each
returned pair then passes its residual test, but a clear member of the top D is missing and the D-th eigenvalue is
the (D+2)-th or (D+5)-th one. Models:

- ``cnn``: a 57k-parameter BatchNorm CNN (three 3x3 convolutions with 32, 64, 64 channels, stride 2 in the last two,
  each followed by BatchNorm and ReLU; global average pooling; a linear head) on 16x16 RGB synthetic images of 2
  classes (smooth random class templates plus unit noise; nothing downloaded), trained ``--steps`` Adam steps
  (lr 1e-3, batches of 64) from a seeded initialisation, probed (eval mode, float32) on k = 128 images;
- ``synthetic``: the dense float64 operator of ``tests/test_lanczos.py``'s flattening spectrum (n = 1000: λ_1 = 1,
  λ_2 = 0.3, then ``0.025 i^-0.12``, then a bulk in [-0.002, 0.01]) with random eigenvectors.

For each model state a tight reference (float64, tol 1e-9, the top D_max + 10 pairs), then for each D and each of
``--seeds`` start seeds, side by side: this package's solver at its defaults (tol 1e-3, every pair's residual
relative to its own Ritz value), the same with the former bound relative to |θ_1| for every pair
(``lanczos._PER_PAIR = False``), and ARPACK (scipy ``eigsh``, ``which='LA'``, ``tol=1e-3``: its own per-pair relative
test; ``v0`` from the same seed). Reported: products (median and range over the seeds), clear eigenvectors missed in
all (a top-D eigenvector whose eigenvalue exceeds λ_{D+1} by more than 1e-3·λ_1 is missed when the returned vectors
hold less than 0.9 of it), the least captured fraction of a clear eigenvector, the largest relative eigenvalue
error, and the solver's median products over ARPACK's.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/top_set.py            # ~10 minutes on 2 shared CPU cores
    PYTHONPATH=. python tests/benchmarks/top_set.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from scipy.sparse.linalg import LinearOperator, eigsh  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from test_lanczos import flattening_spectrum  # noqa: E402

from lightning_curvprobe.functional import lanczos  # noqa: E402
from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction  # noqa: E402

TOL = 1e-3
CLEAR = 1e-3  # a top-D eigenvalue more than this times λ_1 above λ_{D+1} stands clear of the boundary
CAPTURED = 0.9  # a clear eigenvector is missed when the returned vectors hold less than this fraction of it


class BatchNormCNN(nn.Module):
    def __init__(self, channels: tuple[int, int, int] = (32, 64, 64), classes: int = 2) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def images(n: int, classes: int = 2, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Smooth random class templates (bilinear upsampling of 4x4 noise) plus unit Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    templates = F.interpolate(torch.randn(classes, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear",
                              align_corners=False)
    y = torch.randint(0, classes, (n,), generator=g)
    return templates[y] + torch.randn(n, 3, size, size, generator=g), y


def ce_loss(model: nn.Module, batch: Any) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@dataclass
class State:
    """One operator to solve: its products (float32 or float64) and a float64 reference."""

    name: str
    n: int
    matvec: Callable[[Tensor], Tensor]
    dtype: torch.dtype
    ref_values: Tensor
    ref_vectors: Tensor
    counter: list[int] = field(default_factory=lambda: [0])

    def counted(self, v: Tensor) -> Tensor:
        self.counter[0] += v.shape[1]
        return self.matvec(v)


def cnn_states(steps_list: list[int], channels: tuple[int, int, int], k: int, kmax: int) -> list[State]:
    torch.manual_seed(0)
    model = BatchNormCNN(channels)
    x, y = images(2048 + k)
    base = (x[-k:], y[-k:])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    states, done = [], 0
    for steps in sorted(steps_list):
        model.train()
        for _ in range(steps - done):
            idx = torch.randint(0, 2048, (64,), generator=g)
            opt.zero_grad()
            ce_loss(model, (x[idx], y[idx])).backward()
            opt.step()
        done = steps
        frozen = copy.deepcopy(model)  # the operators keep this state while training goes on
        op = HessianOperator(ModelFunction(frozen, ce_loss), base)
        op64 = HessianOperator(ModelFunction(frozen, ce_loss, dtype=torch.float64), base)
        t0 = time.perf_counter()
        ref = lanczos.top_eigenpairs(op64.matvec, op64.dim, kmax + 10, tol=1e-9, max_hvps=5000)
        assert ref.converged
        lam = ref.eigenvalues
        top = " ".join(f"{float(v):.3f}" for v in lam[: kmax + 3] / lam[0])
        print(f"cnn after {steps} Adam steps: N = {op.dim}; reference {ref.hvps} products in "
              f"{time.perf_counter() - t0:.0f} s; λ/λ_1 = {top}", flush=True)
        states.append(State(f"cnn, {steps} Adam steps", op.dim, op.matvec, torch.float32, lam, ref.eigenvectors))
    return states


def synthetic_state(n: int) -> State:
    lam = flattening_spectrum(n)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(100), dtype=torch.float64))
    A = (Q * lam) @ Q.T
    A = 0.5 * (A + A.T)
    return State(f"synthetic (n = {n})", n, lambda v: A @ v, torch.float64, lam, Q)


def assess(state: State, values: Tensor, vectors: Tensor, d: int) -> tuple[int, float, float]:
    """(clear eigenvectors missed, least captured fraction of a clear one, largest relative eigenvalue error)."""
    lam, Q = state.ref_values, state.ref_vectors
    captured = ((Q[:, :d].T @ vectors.to(torch.float64)) ** 2).sum(dim=1)
    clear = lam[:d] - lam[d] > CLEAR * lam[0]
    err = float(((values.to(torch.float64) - lam[:d]).abs() / lam[:d].abs()).max())
    least = float(captured[clear].min()) if bool(clear.any()) else 1.0
    return int((clear & (captured < CAPTURED)).sum()), least, err


def run_solver(state: State, d: int, seed: int, per_pair: bool) -> tuple[int, Tensor, Tensor]:
    saved = lanczos._PER_PAIR
    lanczos._PER_PAIR = per_pair
    try:
        state.counter[0] = 0
        res = lanczos.top_eigenpairs(state.counted, state.n, d, tol=TOL, dtype=state.dtype,
                                     generator=torch.Generator().manual_seed(seed))
    finally:
        lanczos._PER_PAIR = saved
    assert res.converged and res.hvps == state.counter[0]
    return res.hvps, res.eigenvalues, res.eigenvectors


def run_arpack(state: State, d: int, seed: int) -> tuple[int, Tensor, Tensor]:
    n = state.n

    def mv(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).reshape(n, -1).to(state.dtype)
        return state.counted(v).to(torch.float64).numpy().reshape(x.shape)

    state.counter[0] = 0
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals, vecs = eigsh(LinearOperator((n, n), matvec=mv, dtype=np.float64), k=d, which="LA", tol=TOL, v0=v0)
    order = np.argsort(vals)[::-1]
    return state.counter[0], torch.from_numpy(vals[order].copy()), torch.from_numpy(vecs[:, order].copy())


METHODS = {
    "this solver (defaults)": lambda s, d, seed: run_solver(s, d, seed, per_pair=True),
    "this solver, bound relative to θ_1 (before)": lambda s, d, seed: run_solver(s, d, seed, per_pair=False),
    "ARPACK eigsh, tol=1e-3": run_arpack,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 6k-parameter CNN, n = 300 synthetic, D = 5, 2 seeds")
    parser.add_argument("--steps", default="5,50,100", help="Adam steps of the CNN states (comma-separated)")
    parser.add_argument("--ds", default="10,20", help="numbers of eigenpairs D (comma-separated)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--models", default="synthetic,cnn")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = [5] if args.quick else [int(v) for v in args.ds.split(",")]
    seeds = 2 if args.quick else args.seeds
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} threads; tol {TOL:g}; D in {ds}; {seeds} start seeds; a clear "
          f"eigenvector: λ_i − λ_(D+1) > {CLEAR:g}·λ_1, missed when captured < {CAPTURED:g}", flush=True)
    states: list[State] = []
    for model in args.models.split(","):
        if model == "synthetic":
            states.append(synthetic_state(300 if args.quick else 1000))
        elif model == "cnn":
            steps = [5] if args.quick else [int(v) for v in args.steps.split(",")]
            states += cnn_states(steps, (8, 16, 16) if args.quick else (32, 64, 64), 32 if args.quick else 128,
                                 max(ds))
    print("\n| model | D | method | products: median (min-max) | clear vectors missed | least captured | "
          "max eigenvalue error | products / ARPACK's |")
    print("|---|---|---|---|---|---|---|---|")
    for state in states:
        for d in ds:
            rows = {}
            for label, method in METHODS.items():
                hvps, missed, least, errs = [], 0, 1.0, []
                for seed in range(seeds):
                    h, values, vectors = method(state, d, seed)
                    m, c, e = assess(state, values, vectors, d)
                    hvps.append(h)
                    missed += m
                    least = min(least, c)
                    errs.append(e)
                rows[label] = (hvps, missed, least, max(errs))
            arpack = statistics.median(rows["ARPACK eigsh, tol=1e-3"][0])
            for label, (hvps, missed, least, err) in rows.items():
                med = statistics.median(hvps)
                print(f"| {state.name} | {d} | {label} | {med:g} ({min(hvps)}-{max(hvps)}) | {missed} | {least:.2f} | "
                      f"{err:.1e} | {med / arpack:.2f} |", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
