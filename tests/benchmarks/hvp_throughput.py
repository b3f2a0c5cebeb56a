"""Hessian-vector products per second and forward passes per second, before and after batching, side by side.

"Before" is the previous version's code path — one backward pass per vector, one gradient graph per added sample,
one forward pass per draw — which the package still uses as its fallback (``hvp.USE_BATCHED = False``,
``HessianOperator(max_batch=1)``); "after" is the batched path (``torch.autograd.grad(..., is_grads_batched=True)``
for blocks, ``torch.func.vmap`` over added samples × vectors and over Monte Carlo draws). Both run in this process,
interleaved, ``--repeats`` times; medians are reported together with the largest relative difference between the
two results (rounding only).

Measured, on the quickstart MLP (~5k parameters, k = 64 base samples) and the small transformer (~106k parameters,
k = 64 sequences of 32 tokens), with D = 10 (13 vectors with the eigensolver's guard pairs), m = 8 added samples and
S = 64 draws:

1. ``single``: ``op.matvec`` of one vector (unchanged; the Lanczos steps are sequential single products);
2. ``block``: ``op.matvec`` of the 13-vector block;
3. ``warm Rayleigh-Ritz``: ``top_eigenpairs`` warm-started from the converged basis on the same operator (the
   block path: one product per warm vector, plus the few Krylov vectors the residuals demand);
4. ``added samples``: the m samples' loss, ``Uᵀg_j`` and ``UᵀH_jU`` (m · D products; before: m graph builds);
5. ``direct MC``: S · (1 + m) forward passes at ``w0 + U z_s`` (base batch and each added sample);
6. ``quadratic-error draws``: 8 forward passes of the base batch (done at every probe);
7. ``cold Lanczos, probe mode once``: a cold ``top_eigenpairs`` (sequential single products) with every product
   entering eval mode etc. on its own (before) against one ``_probe_mode`` around the whole solve, as the callback,
   ``probe_stability`` and ``stability_curve`` now do (after: each product's own is nested and skips the walk over
   the modules).

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/hvp_throughput.py            # ~2 minutes on 2 shared CPU cores
    PYTHONPATH=. python tests/benchmarks/hvp_throughput.py --quick    # smoke run, a few seconds
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

import lightning_curvprobe.functional.hvp as hvp  # noqa: E402
from lightning_curvprobe.functional._batch import _slice_batch  # noqa: E402
from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction, _probe_mode  # noqa: E402
from lightning_curvprobe.functional.lanczos import top_eigenpairs  # noqa: E402
from lightning_curvprobe.functional.probe import _collect_statistics  # noqa: E402


def relerr(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def loop_draws(fn: ModelFunction, w0: Tensor, U: Tensor, Z: Tensor, base: Any, added: Any) -> tuple[Tensor, Tensor]:
    """The previous version's direct-MC loop: one forward pass per draw and batch (base, then each added sample)."""
    m = added[0].shape[0] if isinstance(added, (tuple, list)) else added.shape[0]
    singles = [_slice_batch(added, j, j + 1) for j in range(m)]
    base_draw = torch.empty(Z.shape[0], dtype=fn.dtype)
    added_draw = torch.empty(m, Z.shape[0], dtype=fn.dtype)
    with _probe_mode(fn.model), torch.no_grad():
        for s in range(Z.shape[0]):
            w = w0 + U @ Z[s]
            base_draw[s] = fn.loss(w, base)
            for j in range(m):
                added_draw[j, s] = fn.loss(w, singles[j])
    return base_draw, added_draw


def batched_draws(fn: ModelFunction, w0: Tensor, U: Tensor, Z: Tensor, base: Any, added: Any) -> tuple[Tensor, Tensor]:
    b = hvp.perturbed_losses(fn, w0, U, Z, base)
    a = hvp.perturbed_losses(fn, w0, U, Z, added, per_sample=True)
    assert b is not None and a is not None, hvp._VMAP_FAILED.get(fn.model)
    return b, a.T


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def bench_case(
    name: str, model: nn.Module, loss_fn: Any, base: Any, added: Any, D: int, S: int, repeats: int
) -> list[str]:
    fn = ModelFunction(model, loss_fn)
    N = fn.num_params
    k = base[0].shape[0] if isinstance(base, (tuple, list)) else base.shape[0]
    m = added[0].shape[0] if isinstance(added, (tuple, list)) else added.shape[0]
    op_loop = HessianOperator(fn, base, max_batch=1)
    op_batch = HessianOperator(fn, base)
    print(f"\n== {name}: N = {N}, k = {k}, m = {m}, D = {D}, S = {S}; batched chunk {op_batch.max_batch} vectors")
    eig = top_eigenpairs(op_batch.matvec, N, D, tol=1e-3, dtype=fn.dtype)
    kt = eig.basis.shape[1]
    U = eig.eigenvectors
    g = torch.Generator().manual_seed(0)
    V1 = torch.randn(N, 1, generator=g)
    Vb = torch.randn(N, kt, generator=g)
    Z = 1e-2 * torch.randn(S, D, generator=g)
    Zq = 1e-2 * torch.randn(8, D, generator=g)
    w0 = fn.current()
    base_p, added_p = fn.prepare(base), fn.prepare(added)

    def stats(batched: bool) -> Any:
        hvp.USE_BATCHED = batched
        try:
            return _collect_statistics(fn, base, added, U, eig.eigenvalues, base_loss=op_batch.loss,
                                       base_grad=op_batch.gradient)
        finally:
            hvp.USE_BATCHED = True

    def qe(batched: bool) -> Tensor:
        if batched:
            out = hvp.perturbed_losses(fn, w0, U, Zq, base_p)
            assert out is not None
            return out
        with _probe_mode(fn.model), torch.no_grad():
            return torch.stack([fn.loss(w0 + U @ z, base_p) for z in Zq])

    def warm(op: HessianOperator) -> Any:
        return top_eigenpairs(op.matvec, N, D, tol=1e-3, warm_start=eig.basis, dtype=fn.dtype)

    def cold(one_mode: bool) -> Any:
        gen = torch.Generator().manual_seed(1)
        with _probe_mode(fn.model) if one_mode else contextlib.nullcontext():
            return top_eigenpairs(op_batch.matvec, N, D, tol=1e-3, dtype=fn.dtype, generator=gen)

    measures: list[tuple[str, str, int, Callable[[], Any], Callable[[], Any], Callable[[Any], Tensor]]] = [
        ("single HVP", "HVPs/s", 1, lambda: op_loop.matvec(V1), lambda: op_batch.matvec(V1), lambda r: r),
        (f"block of {kt} HVPs", "HVPs/s", kt, lambda: op_loop.matvec(Vb), lambda: op_batch.matvec(Vb), lambda r: r),
        ("warm Rayleigh-Ritz (same point)", "HVPs/s", 0, lambda: warm(op_loop), lambda: warm(op_batch),
         lambda r: r.eigenvalues),
        (f"added samples: {m}×{D} HVPs", "HVPs/s", m * D, lambda: stats(False), lambda: stats(True),
         lambda r: r.added_hess),
        (f"direct MC: {S}×(1+{m}) forwards", "fwd/s", S * (1 + m),
         lambda: loop_draws(fn, w0, U, Z, base_p, added_p), lambda: batched_draws(fn, w0, U, Z, base_p, added_p),
         lambda r: torch.cat([r[0], r[1].reshape(-1)])),
        ("quadratic-error draws: 8 forwards", "fwd/s", 8, lambda: qe(False), lambda: qe(True), lambda r: r),
        ("cold Lanczos, probe mode once", "HVPs/s", 0, lambda: cold(False), lambda: cold(True),
         lambda r: r.eigenvalues),
    ]
    rows = []
    for label, unit, count, before, after, value in measures:
        tb, ta = [], []
        rb = ra = None
        for _ in range(repeats + 1):  # the first round warms up
            t, rb = timed(before)
            tb.append(t)
            t, ra = timed(after)
            ta.append(t)
        tb, ta = tb[1:], ta[1:]
        if count == 0:  # the warm solve: count its products
            count = rb.hvps
            assert ra.hvps == rb.hvps, (ra.hvps, rb.hvps)
            label += f" ({count} HVPs)"
        mb, ma = statistics.median(tb), statistics.median(ta)
        err = relerr(value(ra), value(rb))
        print(f"  {label:42s} before {count / mb:9.1f} {unit} ({1e3 * mb:8.2f} ms)   after {count / ma:9.1f} {unit} "
              f"({1e3 * ma:8.2f} ms)   ×{mb / ma:5.2f}   max rel. diff {err:.1e}")
        rows.append(f"| {name} | {label} | {count / mb:.1f} | {count / ma:.1f} | {unit} | ×{mb / ma:.2f} | {err:.1e} |")
    assert not hvp._VMAP_FAILED, dict(hvp._VMAP_FAILED)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 5, quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 5)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, repeats {repeats} (medians)")
    D, m, S = (4, 3, 8) if args.quick else (10, 8, 64)
    rows: list[str] = []

    qs = _models.quickstart_module()
    train, _ = qs.make_data()
    torch.manual_seed(0)
    model = qs.Regressor().net
    x, y = train.tensors
    k = 16 if args.quick else 64

    def mse(mod: nn.Module, batch: Any) -> Tensor:
        return torch.nn.functional.mse_loss(mod(batch[0]), batch[1])

    rows += bench_case("quickstart MLP", model, mse, (x[:k], y[:k]), (x[k : k + m], y[k : k + m]), D, S, repeats)

    size = "tiny" if args.quick else "small"
    vocab, context = _models.GPT_SIZES[size][0], _models.GPT_SIZES[size][5]
    tokens = _models.markov_tokens(k + m, context + 1, vocab)
    gpt = _models.make_gpt(size)
    rows += bench_case(f"GPT {size}", gpt, _models.lm_loss, tokens[:k], tokens[k : k + m], D, S, repeats)

    print("\n| model | measure | before | after | unit | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
