"""The eigensolver's reorthogonalisation: a second Gram-Schmidt pass always, or only when needed (DGKS).

``top_eigenpairs`` orthogonalises every product against its whole basis. Two classical Gram-Schmidt passes always
("twice is enough") read the basis four times per product; the Daniel-Gragg-Kaufman-Stewart rule (the one ARPACK
uses) runs the second pass only when the first removed more than half of the squared norm. This script solves the
same operators cold with both (``lanczos._ALWAYS_TWICE`` switched, repeats interleaved) and reports, per model: HVPs
and restarts (which should not change), passes over the basis (calls of ``_Basis.inner``), the median solve time, the
achieved residual ``max_i ‖H u_i − ρ_i u_i‖ / max_i |ρ_i|`` (recomputed with uncounted products), the orthogonality
``max |UᵀU − I|`` of the returned vectors, and the largest eigenvalue difference between the two.

Models (float32, 2 CPU threads): the quickstart MLP at the callback's settings (k = 64 probe samples, D = 10, the
callback's ``tol`` 1e-3), the overhead benchmark's 110k-parameter transformer (D = 10), and with ``--mid`` a
0.94M-parameter transformer at the paper's D = 45 (the model and base set of ``gpu_paper_scale.py --mid``), where
the basis (124 · N floats) is large enough for its passes to cost as much as the products on a CPU.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/reorthogonalisation.py          # MLP and small transformer, ~1 minute
    PYTHONPATH=. python tests/benchmarks/reorthogonalisation.py --mid    # also D = 45 on 0.94M parameters, +7 min
    PYTHONPATH=. python tests/benchmarks/reorthogonalisation.py --quick  # smoke run, a few seconds
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402
import gpu_paper_scale  # noqa: E402

from lightning_curvprobe.functional import lanczos  # noqa: E402
from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction  # noqa: E402

TOL = 1e-3


def quickstart_operator() -> tuple[str, HessianOperator, int]:
    qs = _models.quickstart_module()
    torch.manual_seed(0)
    net = qs.Regressor().net
    train, _ = qs.make_data()
    x, y = train.tensors
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(1)).split(64):  # one epoch
        opt.zero_grad()
        F.mse_loss(net(x[idx]), y[idx]).backward()
        opt.step()
    fn = ModelFunction(net, lambda model, batch: F.mse_loss(model(batch[0]), batch[1]))
    return "quickstart MLP", HessianOperator(fn, (x[:64], y[:64]), where="the probe samples"), 10


def gpt_operator(cfg: tuple[int, ...], k: int, steps: int, D: int) -> tuple[str, HessianOperator, int]:
    """The base set's operator after ``steps`` Adam steps, built as ``gpu_paper_scale.py`` builds it (seed 0, m = 1)."""
    model = _models.make_gpt(cfg, seed=0)
    pool = _models.markov_tokens(max(256, 8 * k) + k + 1, cfg[5] + 1, cfg[0], seed=3)
    base, train = pool[:k], pool[k + 1 :]
    gpu_paper_scale.train(model, torch.optim.Adam(model.parameters(), lr=3e-4), train, steps, k, 0)
    fn = ModelFunction(model, _models.lm_loss)
    name = f"GPT {fn.num_params / 1e6:.2f}M, D = {D}"
    return name, HessianOperator(fn, base, where="the base sequences"), D


def count_passes() -> list[int]:
    """Counts the calls of ``_Basis.inner`` (one pass over the basis each; ``sub_`` is a second read per pass)."""
    calls: list[int] = []
    inner = lanczos._Basis.inner

    def counted(self: Any, lo: int, hi: int, X: Tensor) -> Tensor:
        calls.append(hi - lo)
        return inner(self, lo, hi, X)

    lanczos._Basis.inner = counted  # type: ignore[method-assign]
    return calls


def compare(name: str, op: HessianOperator, D: int, repeats: int, passes: list[int]) -> list[str]:
    n = op.fn.num_params
    runs: dict[bool, list[Any]] = {True: [], False: []}
    times: dict[bool, list[float]] = {True: [], False: []}
    counted: dict[bool, tuple[int, int]] = {}
    for _ in range(repeats):
        for always in (True, False):  # interleaved: the machine's load affects both alike
            lanczos._ALWAYS_TWICE = always
            passes.clear()
            t0 = time.perf_counter()
            res = lanczos.top_eigenpairs(op.matvec, n, D, tol=TOL, generator=torch.Generator().manual_seed(0),
                                         dtype=torch.float32)
            times[always].append(time.perf_counter() - t0)
            runs[always].append(res)
            counted[always] = (len(passes), sum(passes))
    lanczos._ALWAYS_TWICE = False
    lines = []
    base = statistics.median(times[True])
    for always, label in ((True, "second pass always"), (False, "DGKS (default)")):
        res = runs[always][-1]
        achieved, _ = _models.achieved_residual(op.matvec, res.eigenvectors)
        U = res.eigenvectors.double()
        orth = float((U.T @ U - torch.eye(U.shape[1], dtype=torch.float64)).abs().max())
        diff = float((res.eigenvalues - runs[True][-1].eigenvalues).abs().max() / res.eigenvalues[0].abs())
        t = statistics.median(times[always])
        lines.append(f"| {name} | {label} | {res.hvps} | {res.restarts} | {counted[always][0]} | "
                     f"{counted[always][1]} | {t:.3f} | {t / base:.2f} | {achieved:.1e} | {orth:.1e} | {diff:.1e} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="solves per mode (interleaved); --mid: 1")
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--mid", action="store_true", help="also D = 45 on the 0.94M-parameter transformer")
    parser.add_argument("--quick", action="store_true", help="1 repeat, the MLP and a tiny transformer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    passes = count_passes()
    print(f"torch {torch.__version__}, {args.threads} CPU threads, float32, tol {TOL:g}, cold solves, "
          f"{1 if args.quick else args.repeats} repeats per mode (interleaved)\n")
    print("| operator | second Gram-Schmidt pass | HVPs | restarts | passes over the basis | columns read | "
          "median time (s) | time / always | achieved residual | max abs(UᵀU − I) | eigenvalue diff / λ₁ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [(quickstart_operator, args.repeats)]
    if args.quick:
        cases = [(quickstart_operator, 1), (lambda: gpt_operator(_models.GPT_SIZES["tiny"], 8, 5, 5), 1)]
    else:
        cases.append((lambda: gpt_operator(_models.GPT_SIZES["small"], 16, 30, 10), args.repeats))
        if args.mid:  # gpu_paper_scale.py --mid's model and base set
            mid = gpu_paper_scale.MID
            cfg = tuple(mid[key] for key in ("vocab", "d", "layers", "heads", "d_ff", "seq_len"))
            cases.append((lambda: gpt_operator(cfg, mid["k"], mid["pretrain_steps"], mid["D"]), 1))
    for build, repeats in cases:
        name, op, D = build()
        for line in compare(name, op, D, repeats, passes):
            print(line, flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
