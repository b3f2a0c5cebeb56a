"""Finite-difference against autograd Hessian-vector products: accuracy and cost, side by side in one run.

Three parts, each on the quickstart's regressor (after a few Adam steps) and the "small" transformer of
``_models.py`` (~110k parameters, GELU, trained a few steps on Markov tokens):

1. product accuracy: ``‖FD v − H v‖ / ‖H v‖`` for unit random ``v``, with ``H v`` by autograd in float64; FD in float64
   and float32 at the default step, and in float32 over a range of steps (factors of the default);
2. the probe in float32: top-D eigenvalues (relative difference to autograd's, against ``tol``) and ``delta2``
   (relative difference) from ``probe_stability(hvp="finite_difference")`` and ``hvp="autograd"``;
3. time per product (median over repeats): a block of ``D`` products, autograd (batched and per vector) and finite
   differences.

Run: ``OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python tests/benchmarks/hvp_kinds.py [--quick] [--threads 2]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models  # noqa: E402

from lightning_curvprobe.functional import HessianOperator, ModelFunction, probe_stability  # noqa: E402
from lightning_curvprobe.functional.hvp import _probe_mode  # noqa: E402


def quickstart(steps: int) -> tuple[torch.nn.Module, Any, Any, Any]:
    qs = _models.quickstart_module()
    torch.manual_seed(0)
    module = qs.Regressor().net
    train, _ = qs.make_data()
    x, y = train.tensors
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    for i in range(steps):
        xb, yb = x[i * 64 % 2048 : i * 64 % 2048 + 64], y[i * 64 % 2048 : i * 64 % 2048 + 64]
        opt.zero_grad()
        torch.nn.functional.mse_loss(module(xb), yb).backward()
        opt.step()

    def loss(m: torch.nn.Module, b: Any) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    return module, loss, (x[:64], y[:64]), (x[64:72], y[64:72])


def transformer(steps: int) -> tuple[torch.nn.Module, Any, Any, Any]:
    model = _models.make_gpt("small")
    tokens = _models.markov_tokens(256, 33, 32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(steps):
        opt.zero_grad()
        _models.lm_loss(model, (tokens[(i * 16) % 192 : (i * 16) % 192 + 16],)).backward()
        opt.step()
    return model, _models.lm_loss, (tokens[192:224],), (tokens[224:232],)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def accuracy(name: str, model: torch.nn.Module, loss: Any, base: Any, factors: list[float]) -> None:
    m64 = _copy(model, torch.float64)
    ref = HessianOperator(ModelFunction(m64, loss, hvp="autograd"), base)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(ref.dim, 3, generator=g, dtype=torch.float64)
    V /= V.norm(dim=0)
    HV = ref.matvec(V)
    fd64 = HessianOperator(ModelFunction(m64, loss, hvp="finite_difference"), base)
    fd32 = HessianOperator(ModelFunction(model, loss, hvp="finite_difference"), base)
    ag32 = HessianOperator(ModelFunction(model, loss, hvp="autograd"), base)
    print(f"\n== {name}: product accuracy, ‖FD v − Hv‖/‖Hv‖ (median of 3 unit vectors; Hv by autograd in float64)")
    ag32_err = statistics.median(rel(ag32.matvec(V[:, i].float()).double(), HV[:, i]) for i in range(3))
    fd64_err = statistics.median(rel(fd64.matvec(V[:, i]), HV[:, i]) for i in range(3))
    print(f"  autograd float32:            {ag32_err:.2e}")
    print(f"  finite differences float64:  {fd64_err:.2e}")
    with _probe_mode(model):
        for f in factors:
            errs = [rel(fd32._difference_product(V[:, i].float(), f).double(), HV[:, i]) for i in range(3)]
            label = "finite differences float32" if f == 1.0 else f"  step x {f:g}"
            print(f"  {label:<28} {statistics.median(errs):.2e}{'   <- default step' if f == 1.0 else ''}")


def probe(
    name: str, model: torch.nn.Module, loss: Any, base: Any, added: Any, D: int, tol: float, sigma: float
) -> None:
    kw = dict(num_eigenvectors=D, sigma=sigma, tol=tol)
    out = {}
    for kind in ("autograd", "finite_difference"):
        t0 = time.perf_counter()
        out[kind] = probe_stability(
            model, loss, base, added, hvp=kind, generator=torch.Generator().manual_seed(0), **kw
        )
        out[kind + "_s"] = time.perf_counter() - t0
    ag, fd = out["autograd"], out["finite_difference"]
    eig_rel = float(((fd.eigenvalues - ag.eigenvalues).abs() / ag.eigenvalues.abs()).max())
    eig_tol = float((fd.eigenvalues - ag.eigenvalues).abs().max() / ag.eigenvalues.abs().max())
    d2_rel = abs(float(fd.delta2) / float(ag.delta2) - 1)
    print(f"\n== {name}: probe_stability in float32, D = {D}, tol = {tol:g}, sigma = {sigma:g}")
    print(f"  lambda_1..D (autograd):      {[round(float(v), 5) for v in ag.eigenvalues]}")
    print(f"  max rel. eigenvalue diff:    {eig_rel:.2e}")
    print(f"  max |diff| / lambda_1:       {eig_tol:.2e}   (goal: within tol = {tol:g}, the solver's own scale)")
    print(f"  delta2 autograd / FD:        {float(ag.delta2):.6e} / {float(fd.delta2):.6e}")
    print(f"  delta2 rel. diff:            {d2_rel:.2e}   (goal 1e-3)")
    print(f"  eigensolver HVPs:            autograd {ag.hvps}, FD {fd.hvps}")
    print(f"  probe wall time:             autograd {out['autograd_s']:.2f} s, FD {out['finite_difference_s']:.2f} s")


def timing(name: str, model: torch.nn.Module, loss: Any, base: Any, D: int, repeats: int) -> None:
    ops = {
        "autograd, batched block": HessianOperator(ModelFunction(model, loss, hvp="autograd"), base),
        "autograd, per vector": HessianOperator(ModelFunction(model, loss, hvp="autograd"), base, max_batch=1),
        "finite differences": HessianOperator(ModelFunction(model, loss, hvp="finite_difference"), base),
    }
    V = torch.randn(next(iter(ops.values())).dim, D, generator=torch.Generator().manual_seed(2))
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(repeats):  # interleaved, so that machine noise hits every kind alike
        for k, op in ops.items():
            t0 = time.perf_counter()
            op.matvec(V)
            times[k].append((time.perf_counter() - t0) / D * 1e3)
    base_ms = statistics.median(times["autograd, per vector"])
    print(f"\n== {name}: ms per product, block of D = {D}, median of {repeats} (ratio to autograd per vector)")
    for k, ts in times.items():
        print(f"  {k:<26} {statistics.median(ts):8.3f} ms   x {statistics.median(ts) / base_ms:.2f}")


def _copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and few repeats (a smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    repeats = 3 if args.quick else 15
    factors = [1.0] if args.quick else [1.0, 0.1, 0.3, 3.0, 10.0]
    tasks = [("quickstart", quickstart(20 if args.quick else 200))]
    if not args.quick:
        tasks.append(("small transformer", transformer(100)))
    for name, (model, loss, base, added) in tasks:
        accuracy(name, model, loss, base, factors)
        for sigma in (1e-3, 3e-2):  # at the default sigma the curvature terms are far below float32's resolution
            probe(name, model, loss, base, added, D=4 if args.quick else 10, tol=1e-3, sigma=sigma)
        timing(name, model, loss, base, D=4 if args.quick else 10, repeats=repeats)


if __name__ == "__main__":
    main()
