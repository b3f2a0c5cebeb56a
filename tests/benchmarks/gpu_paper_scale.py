"""Paper-scale timing on one GPU: Stage I (eigensolve), Stage II (coefficients), Stage III (estimators), side by side.

The seed paper's setting: a decoder-only transformer of about 100M parameters (``_models.GPT_SIZES["100m"]``:
vocabulary 8192, d = 768, 12 layers, 12 heads, context 1024; 98.4M parameters), k = 8 base sequences of 1024 tokens
(synthetic Markov-chain tokens, nothing is downloaded), D = 45, float32 with TF32 off. The model is first trained
briefly with Adam (``--pretrain-steps``) so that the probe point is not the random initialisation. Then, in this one
run:

- Stage I, at the trained point: this package's ``top_eigenpairs`` cold (tol 1e-3, default guard pairs and
  ``max_basis``) and the paper's deflated power iteration (random start per vector, ≤ 30 iterations per vector, stop
  when the Rayleigh quotient changes by < 1e-4 relative, Hotelling deflation; ``_models.deflated_power``) on the
  same Hessian operator; then 20 more Adam steps and ``top_eigenpairs`` warm-started from the cold basis. For every
  solve: HVPs, wall time and the achieved residual ``max_i ‖H u_i − ρ_i u_i‖ / max_i |ρ_i|``, recomputed with extra
  products that are not counted or timed. The power iteration can be given a time budget (``--power-budget-s``):
  it then stops after the vector during which the budget ran out and its time for all D vectors is extrapolated
  from the per-vector time (marked "extrapolated").
- Stage II: the added sample's loss, projected gradient and D × D projected Hessian (D HVPs on one sequence).
- Stage III: the Gaussian-moment closed form, quadratic Monte Carlo (S draws) and direct Monte Carlo
  (S · (1 + m) forward passes).

Goal (issue): Stage I at least 10× faster than the power iteration measured in the same run, at better accuracy.
By counts alone that needs fewer than 3 products per eigenvector: the power iteration's 30-iteration cap bounds it
to 30 · D products (1350 at D = 45), and one product costs the same in both. The run compares at this package's
tolerance (``--tol``) only. Lanczos at the power iteration's own achieved residual was tried and left out, as it
measures nothing: that residual is far from converged (0.58 at ``--tiny``, 0.93 in the H200 run), and at ``--tiny``
such a Lanczos solve stopped after 6 products with eigenvalue errors of 0.89 · λ₁ against the power iteration's
1.8 · λ₁ (which, at its cap, had drifted towards eigenvalues of larger magnitude, not the largest ones).

The Krylov basis (``max_basis · N`` floats: 124 · 98.4M · 4 B = 45.5 GiB at D = 45) stays on the GPU when it and the
N × (D + p) Ritz vectors (another 20.9 GiB) fit in the memory left after the gradient graph and one product
(``--basis-device auto``: likely on an H200, not on an H100); otherwise it is kept in CPU memory (the
``basis_device`` argument of ``top_eigenpairs``): the GPU then holds the model, its gradient graph and one block of
vectors, and every Lanczos step moves one vector each way — but the full reorthogonalisation then reads the whole
basis from CPU memory at every step (~4 · 45 GiB), which can cost more than the product itself. ``--max-basis``
trades memory for restarts (at least 2 (D + p) + 1 for the warm start). The previous subspace (the warm start) is kept
in CPU memory, as a callback would keep it. Peak GPU memory (``torch.cuda.max_memory_allocated``) is reported per
stage.

    PYTHONPATH=. python tests/benchmarks/gpu_paper_scale.py                        # full size, needs a CUDA GPU
    PYTHONPATH=. python tests/benchmarks/gpu_paper_scale.py --power-budget-s 240   # cap the power iteration
    PYTHONPATH=. python tests/benchmarks/gpu_paper_scale.py --tiny                 # CPU, tiny model, seconds
    PYTHONPATH=. python tests/benchmarks/gpu_paper_scale.py --mid                  # CPU, 0.94M parameters, ~8 min

``--mid`` (vocabulary 512, d = 128, 4 layers, 4 heads, d_ff 512, 128 tokens, k = 8, D = 45, 50 pretraining steps,
S = 64; log in ``tests/benchmarks/results/``) counts what a GPU run would: Lanczos 231 HVPs cold and 231 warm
after 20 Adam steps (overlap 0.90), the power iteration 1350 (44 of 45 vectors at the cap). There the top of the
spectrum is flat (λ₄₅ = 0.60 λ₁) and Lanczos needs about 5 products per eigenvector, 209 even at ``--tol 1e-2``.

With ``--out DIR`` (or the environment variable ``OUT``) the results are also written to ``DIR/gpu_paper_scale.json``.
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

from lightning_curvprobe.functional.estimators import _gaussian_draws  # noqa: E402
from lightning_curvprobe.functional.hvp import (  # noqa: E402
    HessianOperator,
    ModelFunction,
    _probe_mode,
    perturbed_losses,
)
from lightning_curvprobe.functional.lanczos import top_eigenpairs  # noqa: E402
from lightning_curvprobe.functional.probe import _collect_statistics, _evaluate  # noqa: E402

TINY = dict(vocab=64, d=32, layers=2, heads=2, d_ff=64, seq_len=32, k=4, D=4, pretrain_steps=30, S=16)
MID = dict(vocab=512, d=128, layers=4, heads=4, d_ff=512, seq_len=128, k=8, D=45, pretrain_steps=50, S=64)
FULL = dict(vocab=8192, d=768, layers=12, heads=12, d_ff=3072, seq_len=1024, k=8, D=45, pretrain_steps=50, S=64)


def log(msg: str) -> None:
    print(msg, flush=True)


class Clock:
    """Wall time with device synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, f: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = time.perf_counter()
        out = f()
        self.sync()
        return time.perf_counter() - t0, out


def gpu_peak(device: torch.device, reset: bool = True) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def check_batched_inner(device: torch.device) -> dict[str, Any]:
    """The eigensolver's batched inner product on this GPU: same values as the chunk loop, and no copy of the basis.

    On failure the solver is switched to the loop (``lanczos._BATCHED_INNER = False``) and the run goes on.
    """
    from lightning_curvprobe.functional import lanczos

    n = 40 * lanczos._ROW_CHUNK + 123
    V = torch.randn(n, 64, device=device)
    A, X = V[:, :50], torch.randn(n, 1, device=device)
    lanczos._BATCHED_INNER = False
    loop = lanczos._inner(A, X)  # also creates cuBLAS's workspace (32 MiB on an H200), which is not a copy
    torch.bmm(A[:64].unflatten(0, (2, 32)).transpose(1, 2), X[:64].unflatten(0, (2, 32)))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    batched = lanczos._inner_batched(A, X).float()
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - before
    exact = A.double().T @ X.double()
    err = float((batched.double() - loop.double()).abs().max() / exact.abs().max())
    ok = err < 1e-5 and extra < 0.05 * A.numel() * 4
    lanczos._BATCHED_INNER = ok
    log(f"batched inner product on the GPU: max difference to the chunk loop {err:.1e} (relative), extra memory "
        f"{extra / 2**20:.1f} MiB for a {A.numel() * 4 / 2**20:.0f} MiB basis view -> {'used' if ok else 'NOT used'}")
    del V, A, X
    return dict(max_rel_difference=err, extra_bytes=extra, used=ok)


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, data: Tensor, steps: int, batch: int, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = _models.lm_loss(model, data[idx])
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny transformer, D=4: a smoke run in seconds")
    parser.add_argument("--mid", action="store_true", help="CPU, 0.94M-parameter transformer at D=45: ~8 minutes")
    parser.add_argument("--device", default=None, help="default cuda (tiny, mid: cpu)")
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {value}")
    parser.add_argument("--m", type=int, default=1, help="added samples (default 1, the paper's setting)")
    parser.add_argument("--steps", type=int, default=20, help="Adam steps between the cold and the warm solve")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--train-batch", type=int, default=None, help="default k")
    parser.add_argument("--tol", type=float, default=1e-3, help="top_eigenpairs tolerance (relative to |λ1|)")
    parser.add_argument("--power-iters", type=int, default=30)
    parser.add_argument("--power-rtol", type=float, default=1e-4)
    parser.add_argument("--power-budget-s", type=float, default=None, help="stop the power iteration after this")
    parser.add_argument("--basis-device", default="auto", help="auto (default): the GPU when the basis fits in its "
                        "free memory after the gradient graph and one product (with 20%% to spare), else cpu")
    parser.add_argument("--max-basis", type=int, default=None, help="default 2 (D + p) + 10")
    parser.add_argument("--num-extra", type=int, default=None, help="guard pairs p (default max(2, ceil(D/4)))")
    parser.add_argument("--sigma", type=float, default=1e-3)
    parser.add_argument("--reference", action="store_true", help="also a tight (tol 1e-6) solve for eigenvalue errors "
                        "(default on with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="write gpu_paper_scale.json here")
    args = parser.parse_args()
    sizes = dict(TINY if args.tiny else MID if args.mid else FULL)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    device = torch.device(args.device or ("cpu" if args.tiny or args.mid else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU) or on a GPU machine")
    reference = args.reference or args.tiny
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    clock = Clock(device)
    results: dict[str, Any] = {"args": vars(args), "sizes": sizes, "device": str(device)}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
        results["batched_inner"] = check_batched_inner(device)
    t_start = time.perf_counter()

    # ------------------------------------------------------------------------------------------- model and data
    k, D, m, S = sizes["k"], sizes["D"], args.m, sizes["S"]
    cfg = (sizes["vocab"], sizes["d"], sizes["layers"], sizes["heads"], sizes["d_ff"], sizes["seq_len"])
    model = _models.make_gpt(cfg, seed=args.seed).to(device)
    n = _models.num_params(model)
    pool = _models.markov_tokens(max(256, 8 * k) + k + m, sizes["seq_len"] + 1, sizes["vocab"], seed=args.seed + 3)
    base, added, train_pool = pool[:k].to(device), pool[k : k + m].to(device), pool[k + m :].to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    tb = args.train_batch or k
    t_pre, loss = clock(lambda: train(model, opt, train_pool, sizes["pretrain_steps"], tb, args.seed))
    log(f"device {device}{' (' + results.get('gpu', '') + ')' if device.type == 'cuda' else ''}, torch "
        f"{torch.__version__}, TF32 off, float32; GPT {cfg} = {n / 1e6:.2f}M parameters; k = {k} sequences of "
        f"{sizes['seq_len']} tokens, D = {D}, m = {m}, S = {S}")
    log(f"pretraining: {sizes['pretrain_steps']} Adam steps (batch {tb}) in {t_pre:.1f} s, last loss {loss:.3f}")
    results["N"] = n
    gpu_peak(device)

    fn = ModelFunction(model, _models.lm_loss)
    t_op, op = clock(lambda: HessianOperator(fn, base, where="the base samples"))
    t_hvp, _ = clock(lambda: op.matvec(torch.randn(n, device=device)))
    op.num_hvps = 0
    kt = D + (args.num_extra if args.num_extra is not None else max(2, -(-D // 4)))
    cap = args.max_basis or 2 * kt + 10
    basis_bytes = cap * n * 4
    if args.basis_device != "auto":
        basis_device = torch.device(args.basis_device)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # the basis and, at the end, the N x (D + p) Ritz vectors
        basis_device = device if free > 1.1 * (cap + kt) * n * 4 else torch.device("cpu")
    else:
        basis_device = device
    log(f"gradient graph of the base set: {t_op:.2f} s; one HVP {t_hvp:.2f} s; GPU peak so far "
        f"{gpu_peak(device, reset=False) or 0:.1f} GiB; basis {cap} x N = {basis_bytes / 2**30:.1f} GiB on "
        f"{basis_device}")
    results["basis_device"] = str(basis_device)

    def solve(operator: HessianOperator, warm: Tensor | None = None, tol: float = args.tol) -> tuple[float, Any]:
        return clock(lambda: top_eigenpairs(
            operator.matvec, n, D, tol=tol, max_basis=args.max_basis, num_extra=args.num_extra, warm_start=warm,
            generator=torch.Generator().manual_seed(args.seed), dtype=torch.float32, device=device,
            basis_device=basis_device,
        ))

    def residual(operator: HessianOperator, U: Tensor) -> float:
        h0 = operator.num_hvps
        # U stays where it is (the basis device); the operator takes and returns blocks there, chunk by chunk
        res, _ = _models.achieved_residual(operator.matvec, U, chunk=1 if n > 10**7 else 8)
        operator.num_hvps = h0  # not counted
        return res

    rows: list[dict[str, Any]] = []

    def dump() -> None:
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "gpu_paper_scale.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)

    def record(stage: str, method: str, seconds: float, hvps: int | None, res: float | None, note: str = "") -> None:
        row = dict(stage=stage, method=method, seconds=seconds, hvps=hvps, residual=res, note=note,
                   gpu_peak_gib=gpu_peak(device))
        rows.append(row)
        results["rows"] = rows
        dump()  # after every row: a run cut off by its time limit still leaves its results
        shown = "" if res is None else f"residual {res:.1e}  "
        log(f"  {stage:4s} {method:50s} {seconds:9.2f} s  HVPs {hvps if hvps is not None else '—':>5}  {shown}{note}")

    # ----------------------------------------------------------------------------------------------- Stage I
    log("\nStage I (top-D eigenpairs of the base Hessian)")
    ref_vals = None
    if reference:
        _, ref = solve(op, tol=1e-6)
        ref_vals = ref.eigenvalues.double().cpu()
        log(f"  reference (tol 1e-6): {ref.hvps} HVPs, λ1 = {float(ref_vals[0]):.4g}, λD = {float(ref_vals[-1]):.4g}")

    def eig_err(values: Tensor) -> str:
        if ref_vals is None:
            return ""
        v = values.double().cpu().sort(descending=True).values
        return f"eig err {float((v - ref_vals[: len(v)]).abs().max() / ref_vals[0].abs()):.1e}"

    t_cold, cold = solve(op)
    res_cold = residual(op, cold.eigenvectors)
    record("I", "Lanczos cold", t_cold, cold.hvps, res_cold,
           f"converged {cold.converged}, {cold.restarts} restarts {eig_err(cold.eigenvalues)}")
    # the previous subspace is kept in CPU memory, as a callback's state would be (the warm start reads it there)
    cold_basis = cold.basis.cpu()
    cold_values = cold.eigenvalues.cpu()
    del cold

    h0 = op.num_hvps
    t_pow, power = clock(lambda: _models.deflated_power(
        op.matvec, n, D, max_iter=args.power_iters, rtol=args.power_rtol, seed=args.seed, device=device,
        budget_s=args.power_budget_s,
    ))
    done = power.vectors.shape[1]
    res_pow = residual(op, power.vectors)
    capped = power.stops.count("cap")
    note = (f"{done}/{D} vectors, iters/vector {min(power.iters)}–{max(power.iters)}, {capped} stopped at the cap "
            f"{eig_err(power.values)}")
    t_pow_full = t_pow * D / done
    if done < D:
        note += f"; extrapolated to D: {t_pow_full:.1f} s"
    record("I", f"power iteration (≤{args.power_iters} it/vector, rtol {args.power_rtol:g})", t_pow,
           op.num_hvps - h0, res_pow, note)
    overlap = float((cold_basis[:, :D].T @ power.vectors.cpu()).pow(2).sum()) / D
    del power  # N x D on the GPU

    t_steps, loss = clock(lambda: train(model, opt, train_pool, args.steps, tb, args.seed + 1))
    log(f"  {args.steps} Adam steps: {t_steps:.1f} s, loss {loss:.3f}")
    fn2 = ModelFunction(model, _models.lm_loss)
    op2 = HessianOperator(fn2, base, where="the base samples")
    speedup = t_pow_full / t_cold
    better = res_cold < res_pow
    verdict = "met" if speedup >= 10 and better else "NOT met"
    log(f"  goal (Lanczos cold ≥ 10× faster than power at better accuracy): {verdict} — {speedup:.1f}× "
        f"({'extrapolated ' if done < D else ''}power {t_pow_full:.1f} s vs {t_cold:.1f} s), residual "
        f"{res_cold:.1e} vs {res_pow:.1e}; overlap power/Lanczos {overlap:.3f}")
    results["stage1_goal"] = dict(speedup_cold=speedup, better_accuracy=better, verdict=verdict,
                                  power_extrapolated=done < D)
    dump()
    try:  # a failure here must not cost Stages II and III (a GPU run is one shot)
        t_warm, warm = solve(op2, cold_basis)
        res_warm = residual(op2, warm.eigenvectors)
        ov = float((cold_basis[:, :D].T @ warm.eigenvectors.cpu()).pow(2).sum()) / D
        record("I", f"Lanczos warm (after {args.steps} Adam steps)", t_warm, warm.hvps, res_warm,
               f"converged {warm.converged}, subspace overlap with the cold solve {ov:.3f}; "
               f"{t_pow_full / t_warm:.1f}× faster than power")
        U, evals = warm.eigenvectors.to(device), warm.eigenvalues.to(device)
    except Exception as err:  # noqa: BLE001 - reported, and the run goes on with the cold subspace
        log(f"  Lanczos warm FAILED: {type(err).__name__}: {err}; Stages II-III use the cold subspace")
        results["warm_error"] = f"{type(err).__name__}: {err}"
        U, evals = cold_basis[:, :D].to(device), cold_values.to(device)

    # ---------------------------------------------------------------------------------------------- Stage II
    log("\nStage II (coefficients a, c, B of the added sample(s), at the warm point)")
    gen = torch.Generator().manual_seed(args.seed)
    t2, stats = clock(lambda: _collect_statistics(fn2, base, added, U, evals, base_loss=op2.loss,
                                                  base_grad=op2.gradient))
    record("II", f"{m} added × {D} HVPs", t2, stats.hvps, None)

    # --------------------------------------------------------------------------------------------- Stage III
    log("\nStage III (estimators)")
    for est in ("gaussian_moment", "quadratic_mc"):
        t3, out = clock(lambda est=est: _evaluate(stats, sigma=args.sigma, estimator=est, num_samples=S,
                                                  generator=gen))
        record("III", est + (f" (S = {S})" if est != "gaussian_moment" else ""), t3, None, None,
               f"Δ₂^(D) = {float(out['delta2']):.3e}")
    z = _gaussian_draws(S, D, args.sigma, gen, U)

    batched_draws = [True]

    def direct() -> Any:
        w0 = fn2.current()
        pb, pa = fn2.prepare(base), fn2.prepare(added)
        b = perturbed_losses(fn2, w0, U, z, pb)
        a = perturbed_losses(fn2, w0, U, z, pa, per_sample=True)
        if b is None or a is None:  # N too large to batch the draws: one forward pass per draw, as the package does
            batched_draws[0] = False
            b = torch.empty(S, dtype=fn2.dtype, device=device)
            a = torch.empty(S, m, dtype=fn2.dtype, device=device)
            singles = [pa[j : j + 1] for j in range(m)]
            with _probe_mode(model), torch.no_grad():
                for s_ in range(S):
                    w = w0 + U @ z[s_]
                    b[s_] = fn2.loss(w, pb)
                    for j in range(m):
                        a[s_, j] = fn2.loss(w, singles[j])
        stats.base_draw_loss_sum, stats.added_draw_loss = b * k, a.T.contiguous()
        return _evaluate(stats, sigma=args.sigma, estimator="direct_mc", num_samples=S, generator=gen)

    t3, out = clock(direct)
    note = f"Δ₂^(D) = {float(out['delta2']):.3e}; {'vmap over draws' if batched_draws[0] else 'one pass per draw'}"
    record("III", f"direct_mc (S = {S}, {S * (1 + m)} forward passes)", t3, None, None, note)

    log("\n| stage | method | time (s) | HVPs | achieved residual | GPU peak (GiB) | notes |")
    log("|---|---|---|---|---|---|---|")
    for r in rows:
        res = "—" if r["residual"] is None else f"{r['residual']:.1e}"
        peak = "—" if r["gpu_peak_gib"] is None else f"{r['gpu_peak_gib']:.1f}"
        log(f"| {r['stage']} | {r['method']} | {r['seconds']:.2f} | {r['hvps'] if r['hvps'] is not None else '—'} | "
            f"{res} | {peak} | {r['note']} |")
    results["rows"] = rows
    results["total_s"] = time.perf_counter() - t_start
    log(f"\ntotal {results['total_s']:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")
    dump()


if __name__ == "__main__":
    main()
