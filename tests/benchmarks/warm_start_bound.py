"""How much can a warm start save? The quickstart's refresh sequence against oracle warm starts (issue #18, item 2).

Item 2's goal is a warm refresh in at most half the time of a cold one at subspace overlap >= 0.95, at the same
residuals (``‖Hu − θu‖ ≤ tol·|θ|``). The callback's warm start (``refresh_sequence.py``) takes 0.72 of the cold
products there. This script asks whether *any* start drawn from the previous subspace could take half: it replaces
the previous subspace by an oracle, the current Hessian's exact top ``k + p`` eigenvectors, each tilted out of that
eigenspace by a random direction so that the subspace overlap is exactly ``ov`` (0.97, 0.99, 0.999: closer than any
refresh of the sequence comes), and runs the solver from it as the callback does (``warm_start=``): the default path
(Lanczos from the sum of the start vectors) and the block path (all start vectors multiplied as a block, then Krylov
steps; ``lanczos._BLOCK_WARM_FACTOR`` patched as in ``refresh_sequence.py``).

The quickstart is trained as in ``refresh_sequence.py`` (26 Adam steps per epoch). At each epoch the probe operator's
Hessian (N = 4994, its 64 probe samples) is formed densely from batched products and its spectrum taken with
``torch.linalg.eigh`` in float64; the solves then multiply by that float32 matrix, so that products are counted, not
timed (on the quickstart a refresh's time follows its products: 81 % of it is products, ``refresh_sequence.py``).
Per epoch: the overlap ``‖U_prevᵀU‖²/D`` of consecutive exact top-D subspaces, the HVPs of a cold solve, of the warm
solve from the previous refresh, and of the oracle starts; the pair that converges last; and the boundary's
Kaniel-Paige-Saad gap ``γ = (λ_D − λ_{D+1}) / (λ_{D+1} − λ_min)``, with the Lanczos steps it takes to gain a decade
on the D-th pair, ``ln 10 / ln(1 + 2γ + 2 sqrt(γ² + γ))`` (the Chebyshev rate: no start vector changes it).

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/warm_start_bound.py              # ~6 minutes on 2 CPU cores
    PYTHONPATH=. python tests/benchmarks/warm_start_bound.py --epochs 4   # ~2 minutes
    PYTHONPATH=. python tests/benchmarks/warm_start_bound.py --quick      # smoke run: 2 epochs, no skip
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import refresh_sequence  # noqa: E402

from lightning_curvprobe.functional import lanczos, probe  # noqa: E402
from lightning_curvprobe.functional.hvp import HessianOperator  # noqa: E402

D = refresh_sequence.D
TOL = refresh_sequence.TOL
KT = D + lanczos._default_num_extra(D, 10**6)  # k + p: the pairs the solver converges (the warm start's width)
OVERLAPS = (0.97, 0.99, 0.999)


def dense_hessian(op: HessianOperator, n: int, chunk: int = 512) -> Tensor:
    """The operator as a symmetric float64 matrix, from batched products of identity columns."""
    cols = []
    with probe._probe_mode(op.fn.model):
        for c0 in range(0, n, chunk):
            eye = torch.zeros(n, min(chunk, n - c0), dtype=op.fn.dtype)
            eye[c0 : c0 + eye.shape[1]].fill_diagonal_(1.0)
            cols.append(op.matvec(eye).to(torch.float64))
    H = torch.cat(cols, dim=1)
    return 0.5 * (H + H.T)


class LastPair:
    """Records, through ``_Lanczos._stop``, which of the ``k + p`` pairs were still unconverged at the last check."""

    def __init__(self) -> None:
        self.last: list[int] = []
        self._orig = lanczos._Lanczos._stop

    def __enter__(self) -> LastPair:
        recorder = self

        def stop(solver: Any) -> bool:
            want = min(solver.kt, solver.nd)
            if solver.nd >= solver.kt:
                unconv = (solver.res[:want] > solver._limits(want)).nonzero()[:, 0].tolist()
                if unconv:
                    recorder.last = [i + 1 for i in unconv]
            return recorder._orig(solver)  # type: ignore[no-any-return]

        lanczos._Lanczos._stop = stop  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        lanczos._Lanczos._stop = self._orig  # type: ignore[method-assign]


def solve(H: Tensor, warm: Tensor | None, seed: int, as_block: bool = False) -> tuple[Any, list[int]]:
    saved = lanczos._BLOCK_WARM_FACTOR
    if as_block:
        lanczos._BLOCK_WARM_FACTOR = float("inf")
    try:
        with LastPair() as rec:
            res = lanczos.top_eigenpairs(lambda v: H @ v, H.shape[0], D, tol=TOL, warm_start=warm,
                                         dtype=torch.float32, generator=torch.Generator().manual_seed(seed))
    finally:
        lanczos._BLOCK_WARM_FACTOR = saved
    return res, rec.last


def oracle_start(U: Tensor, ov: float, gen: torch.Generator) -> Tensor:
    """The exact top-``KT`` eigenvectors, each tilted by a random unit direction orthogonal to them: overlap ``ov``."""
    X = torch.randn(U.shape[0], U.shape[1], generator=gen, dtype=torch.float64)
    X -= U @ (U.T @ X)
    X /= X.norm(dim=0)
    s = math.sqrt(1.0 - ov)
    return (math.sqrt(1.0 - s * s) * U + s * X).float()


def check(res: Any, ev: Tensor, U: Tensor) -> tuple[float, float]:
    """Largest relative eigenvalue error of the D returned pairs, and the captured share of the true top-D space."""
    err = float(((res.eigenvalues.double() - ev[:D]).abs() / ev[:D].abs()).max())
    cap = float((U[:, :D].T @ res.eigenvectors.double()).pow(2).sum()) / D
    return err, cap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="epochs left out of the medians (the first refreshes)")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--quick", action="store_true", help="2 epochs, none skipped (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.skip = 2, 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(1)
    seq = refresh_sequence.quickstart_sequence(torch.device("cpu"), gen, [])
    n = seq.fn.num_params
    print(f"torch {torch.__version__}, {args.threads} CPU threads; {seq.name}; D = {D}, k + p = {KT}, tol {TOL:g}")
    labels = ["cold", "warm (previous refresh)"] + [f"oracle {ov}" for ov in OVERLAPS] + \
        [f"oracle {ov}, as a block" for ov in OVERLAPS]
    rows: list[dict[str, Any]] = []
    prev: Tensor | None = None
    prev_U: Tensor | None = None
    worst_err, worst_cap = 0.0, 1.0
    print("\nepoch  overlap  " + "  ".join(f"{label:>24s}" for label in labels) + "   last pair (cold / warm)   γ_D"
          "   steps per decade")
    for e in range(args.epochs):
        seq.epoch()
        op = HessianOperator(seq.fn, seq.base, where="the probe samples")
        H64 = dense_hessian(op, n)
        evals, evecs = torch.linalg.eigh(H64)
        ev, U = evals.flip(0), evecs.flip(1)[:, :KT].contiguous()
        H = H64.float()
        overlap = float("nan") if prev_U is None else float((prev_U.T @ U[:, :D]).pow(2).sum()) / D
        hvps: dict[str, int] = {}
        cold, last_cold = solve(H, None, e)
        hvps["cold"] = cold.hvps
        warm, last_warm = solve(H, prev, e)
        hvps["warm (previous refresh)"] = warm.hvps
        for res in (cold, warm):
            err, cap = check(res, ev, U)
            worst_err, worst_cap = max(worst_err, err), min(worst_cap, cap)
        og = torch.Generator().manual_seed(1000 + e)
        for ov in OVERLAPS:
            start = oracle_start(U, ov, og)
            for as_block in (False, True):
                res, _ = solve(H, start, e, as_block)
                err, cap = check(res, ev, U)
                worst_err, worst_cap = max(worst_err, err), min(worst_cap, cap)
                hvps[f"oracle {ov}" + (", as a block" if as_block else "")] = res.hvps
        gamma = float((ev[D - 1] - ev[D]) / (ev[D] - ev[-1]))
        per_decade = math.log(10) / math.log(1 + 2 * gamma + 2 * math.sqrt(gamma * gamma + gamma))
        prev, prev_U = warm.basis, U[:, :D]
        rows.append({"overlap": overlap, "hvps": hvps, "gamma": gamma, "per_decade": per_decade,
                     "lambda": ev[D - 3 : D + 3].tolist()})
        print(f"{e:5d}  {overlap:7.3f}  " + "  ".join(f"{hvps[label]:>19d} HVPs" for label in labels)
              + f"   {str(last_cold):>11s} / {str(last_warm):<11s}  {gamma:.4f}  {per_decade:6.1f}", flush=True)

    kept = rows[args.skip:]
    close = [r for r in kept if r["overlap"] >= refresh_sequence.OVERLAP]
    print(f"\nMedians over the {len(kept)} refreshes from epoch {args.skip} on, and over the {len(close)} with overlap "
          f"≥ {refresh_sequence.OVERLAP}; ratios to the cold solve of the same refresh (medians of the ratios):\n")
    print("| start | HVPs (all) | HVPs (overlap ≥ 0.95) | / cold (all) | / cold (overlap ≥ 0.95) |")
    print("|---|---|---|---|---|")

    def med(label: str, rs: list[dict[str, Any]], ratio: bool) -> str:
        if not rs:
            return "—"
        vals = [r["hvps"][label] / (r["hvps"]["cold"] if ratio else 1) for r in rs]
        return f"{statistics.median(vals):.2f}" if ratio else f"{statistics.median(vals):.1f}"

    for label in labels:
        print(f"| {label} | {med(label, kept, False)} | {med(label, close, False)} | {med(label, kept, True)} | "
              f"{med(label, close, True)} |")
    print(f"\nEvery solve: largest relative eigenvalue error of the {D} returned pairs {worst_err:.1e}, smallest "
          f"captured share of the exact top-{D} subspace {worst_cap:.6f}.")
    print(f"Boundary gap γ_D: median {statistics.median(r['gamma'] for r in kept):.4f}; Lanczos steps per decade on "
          f"the D-th pair: median {statistics.median(r['per_decade'] for r in kept):.1f}; λ_(D-2..D+3) at the last "
          f"epoch: {', '.join(f'{x:.3f}' for x in rows[-1]['lambda'])}.")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
