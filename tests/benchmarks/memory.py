"""Peak memory of one refresh on a ~10M-parameter transformer on CPU, measured in fresh processes (VmHWM).

Every measurement runs in its own subprocess (``python memory.py --child ...``), so the peak resident set size
(``VmHWM`` in ``/proc/self/status``) belongs to that measurement alone:

- ``footprint``: build the model (``_models.GPT_SIZES["10m"]``) and the probe data, then one forward and backward
  pass of the loss on the base batch (parameters, gradients and activations: the model's own footprint in training,
  without optimizer state);
- ``operator``: build the same, then the base set's gradient graph (``HessianOperator``, ``create_graph=True``) and
  one Hessian-vector product: what any HVP-based method (power iteration included) holds besides its vectors;
- ``refresh cold`` / ``refresh warm``: build the same, then one refresh as the callback does it — the base set's
  gradient graph (``HessianOperator``), ``top_eigenpairs`` (D = 10, tol = 1e-3, default ``max_basis`` = 2(D + p) + 10
  = 36, or ``--max-basis``), the added sample's statistics and the quadratic-error draws (``_collect_statistics``)
  and the Gaussian-moment estimate. The warm refresh starts from the cold one's saved basis on weights moved by
  ``--warm-noise`` (relative Gaussian noise), as after some training steps.

It reports the peak in MiB, the excess over the footprint in MiB and as a multiple of ``N · 4`` bytes (N float32
numbers), to compare with the bound ``(max_basis + a small constant) · N``; the time and HVPs of the refresh; the time
split of each refresh: the eigensolver's products, its own work outside them (orthogonalisation, Rayleigh-Ritz,
restarts, Ritz vectors) as a share of the refresh, and the rest; and the size of the callback's checkpoint state
with ``save_subspace=True`` (the ``N × (D + p)`` basis) and ``False``.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/memory.py            # ~10M parameters, ~3 minutes on 2 shared CPU cores
    PYTHONPATH=. python tests/benchmarks/memory.py --quick    # ~20k parameters, a few seconds
    git show 8903edf:lightning_curvprobe/functional/lanczos.py > /tmp/lanczos_before.py
    PYTHONPATH=. python tests/benchmarks/memory.py --compare-solver /tmp/lanczos_before.py   # before and after
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import _models  # noqa: PLC0415
    import torch  # noqa: PLC0415

    import lightning_curvprobe  # noqa: F401, PLC0415 - the same imports (lightning, torchmetrics) in every child

    torch.set_num_threads(args.threads)
    warm_up_libraries()
    out: dict[str, Any] = {"rss_after_import_mib": _models.current_rss_mib()}
    cfg = _models.GPT_SIZES[args.size]
    vocab, context = cfg[0], cfg[5]
    model = _models.make_gpt(args.size)
    n = _models.num_params(model)
    tokens = _models.markov_tokens(args.k + 1, context + 1, vocab)
    base, added = tokens[: args.k], tokens[args.k :]
    out["N"] = n
    out["rss_model_mib"] = _models.current_rss_mib()
    t0 = time.perf_counter()
    if args.child == "footprint":
        loss = _models.lm_loss(model, base)
        loss.backward()
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = _models.peak_rss_mib()
        return out

    from lightning_curvprobe.functional.estimators import _gaussian_draws  # noqa: PLC0415
    from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction  # noqa: PLC0415
    from lightning_curvprobe.functional.lanczos import top_eigenpairs  # noqa: PLC0415
    from lightning_curvprobe.functional.probe import _collect_statistics, _evaluate  # noqa: PLC0415

    if args.child == "operator":
        op = HessianOperator(ModelFunction(model, _models.lm_loss), base)
        op.matvec(torch.randn(n, generator=torch.Generator().manual_seed(0)))
        out["seconds"] = time.perf_counter() - t0
        out["peak_mib"] = _models.peak_rss_mib()
        return out

    if args.solver:  # another version of lanczos.py (e.g. from git history), for a side-by-side comparison
        top_eigenpairs = _models.load_module("lanczos_compared", args.solver).top_eigenpairs  # noqa: F811
    warm = None
    if args.warm:
        warm = torch.load(args.warm)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(args.warm_noise * p.abs().mean() * torch.randn(p.shape, generator=g))
    out["rss_before_refresh_mib"] = _models.current_rss_mib()
    t0 = time.perf_counter()
    fn = ModelFunction(model, _models.lm_loss)
    op = HessianOperator(fn, base, where="the base samples")
    gen = torch.Generator().manual_seed(0)
    product_seconds = 0.0

    def timed_matvec(v: Any) -> Any:  # the eigensolver's products, timed (the rest of its time is its own work)
        nonlocal product_seconds
        t = time.perf_counter()
        out = op.matvec(v)
        product_seconds += time.perf_counter() - t
        return out

    t_eig = time.perf_counter()
    eig = top_eigenpairs(
        timed_matvec, n, args.D, tol=1e-3, max_basis=args.max_basis, warm_start=warm, generator=gen, dtype=fn.dtype
    )
    out["eig_seconds"] = time.perf_counter() - t_eig
    out["product_seconds"] = product_seconds
    qe_z = _gaussian_draws(8, args.D, 1e-3, gen, eig.eigenvectors)
    stats = _collect_statistics(
        fn, base, added, eig.eigenvectors, eig.eigenvalues, base_loss=op.loss, base_grad=op.gradient, qe_z=qe_z
    )
    value = _evaluate(stats, sigma=1e-3, estimator="gaussian_moment", num_samples=64, generator=gen)
    out["seconds"] = time.perf_counter() - t0
    out["peak_mib"] = _models.peak_rss_mib()
    out["hvps"] = eig.hvps
    out["added_hvps"] = stats.hvps
    out["converged"] = eig.converged
    out["delta2"] = float(value["delta2"])
    out["basis_width"] = eig.basis.shape[1]
    out["warm_width"] = 0 if warm is None else warm.shape[1]
    if args.save:
        torch.save(eig.basis.clone(), args.save)
    out["checkpoint_bytes"] = checkpoint_sizes(eig)
    return out


def warm_up_libraries() -> None:
    """A toy probe in every child, so that lazily loaded code and library workspaces (LAPACK, vmap) are counted in
    every measurement alike and the differences are the model-sized memory."""
    import torch  # noqa: PLC0415

    from lightning_curvprobe.functional import probe_stability  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(17, 4, generator=g), torch.randn(17, 1, generator=g)

    def mse(m: Any, b: Any) -> Any:
        return torch.nn.functional.mse_loss(m(b[0]), b[1])

    probe_stability(model, mse, (x[:16], y[:16]), (x[16:], y[16:]), num_eigenvectors=3, estimator="direct_mc",
                    num_samples=4)


def checkpoint_sizes(eig: Any) -> dict[str, int] | str:
    """Serialized size of the callback's ``state_dict`` with and without the subspace."""
    import torch  # noqa: PLC0415

    from lightning_curvprobe import CurvatureStabilityCallback  # noqa: PLC0415

    sizes = {}
    try:
        for save in (True, False):
            cb = CurvatureStabilityCallback(num_eigenvectors=eig.eigenvectors.shape[1], save_subspace=save)
            cb._basis = eig.basis  # what a refresh leaves behind (private attributes of the callback)
            cb._eigenvalues = eig.eigenvalues
            buf = io.BytesIO()
            torch.save(cb.state_dict(), buf)
            sizes[f"save_subspace={save}"] = buf.getbuffer().nbytes
    except Exception as err:  # noqa: BLE001 - the callback's internals may change; the size is then not measured
        return f"n/a ({type(err).__name__}: {err})"
    return sizes


def run_child(args: argparse.Namespace, mode: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--size", args.size, "--k", str(args.k),
           "--D", str(args.D), "--threads", str(args.threads), *extra]
    if args.max_basis:
        cmd += ["--max-basis", str(args.max_basis)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(HERE)),
                                                                     os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny transformer, no warm refresh (smoke test)")
    parser.add_argument("--size", default=None, help="_models.GPT_SIZES key (default 10m, quick tiny)")
    parser.add_argument("--k", type=int, default=None, help="base sequences (default 16, quick 8)")
    parser.add_argument("--D", type=int, default=10)
    parser.add_argument("--max-basis", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per measurement (median)")
    parser.add_argument("--warm-noise", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compare-solver", default=None, help="path of another lanczos.py (e.g. `git show "
                        "REV:lightning_curvprobe/functional/lanczos.py > old.py`): its refreshes are measured too")
    parser.add_argument("--solver", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warm", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or ("tiny" if args.quick else "10m")
    args.k = args.k or (8 if args.quick else 16)
    if args.child:
        print(json.dumps(child(args)))
        return

    import statistics  # noqa: PLC0415

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        basis_path = os.path.join(tmp, "basis.pt")
        results: dict[str, list[dict[str, Any]]] = {"footprint": [], "operator": [], "refresh cold": [],
                                                    "refresh warm": []}
        for r in range(args.repeats):
            results["footprint"].append(run_child(args, "footprint", []))
            if not args.quick:
                results["operator"].append(run_child(args, "operator", []))
            results["refresh cold"].append(run_child(args, "refresh", ["--save", basis_path] if r == 0 else []))
            if not args.quick:
                results["refresh warm"].append(
                    run_child(args, "refresh", ["--warm", basis_path, "--warm-noise", str(args.warm_noise)])
                )
            if args.compare_solver:
                extra = ["--solver", os.path.abspath(args.compare_solver)]
                path = os.path.join(tmp, "basis_compared.pt")
                results.setdefault("compared: refresh cold", []).append(
                    run_child(args, "refresh", [*extra, "--save", path] if r == 0 else extra)
                )
                if not args.quick:
                    results.setdefault("compared: refresh warm", []).append(
                        run_child(args, "refresh", [*extra, "--warm", path, "--warm-noise", str(args.warm_noise)])
                    )
        results = {k: v for k, v in results.items() if v}
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("peak_mib", "seconds")} for k, v in results.items()}
    n = results["footprint"][0]["N"]
    nf = n * 4 / 2**20  # MiB of N float32 numbers
    foot = med["footprint"]["peak_mib"]
    D = args.D
    kt = results["refresh cold"][0]["basis_width"]
    cap = args.max_basis or min(n, max(2 * kt, kt + kt) + 10)
    print(f"N = {n} parameters (N float32 = {nf:.1f} MiB), k = {args.k} sequences, D = {D} (+{kt - D} guard pairs), "
          f"max_basis = {cap}; {args.repeats} fresh process(es) per measurement")
    oper = med["operator"]["peak_mib"] if "operator" in med else None
    print("\n| measurement | peak RSS (MiB) | excess over footprint: MiB, / (N·4 B) | excess over operator: MiB, "
          "/ (N·4 B) | the same less the warm start held by the caller, / (N·4 B) | time (s) | HVPs |")
    print("|---|---|---|---|---|---|---|")
    for key, stats in med.items():
        r0 = results[key][0]
        hv = f"{r0['hvps']} (+{r0['added_hvps']} added)" if "hvps" in r0 else ("1" if key == "operator" else "")
        cols = []
        for ref in (foot, oper):
            excess = None if ref is None else stats["peak_mib"] - ref
            cols.append("—" if excess is None or excess <= 0 else f"{excess:.0f}, {excess / nf:.1f}")
        width = r0.get("warm_width", 0)
        own = "—" if oper is None or "hvps" not in r0 else f"{(stats['peak_mib'] - oper) / nf - width:.1f}"
        print(f"| {key} | {stats['peak_mib']:.0f} | {cols[0]} | {cols[1]} | {own} | {stats['seconds']:.1f} | {hv} |")
    print("\nTime split of a refresh (medians over the fresh processes): the eigensolver's products (HVPs), its own "
          "work outside them (orthogonalisation, Rayleigh-Ritz, restarts, Ritz vectors), and the rest of the refresh "
          "(gradient graph, added samples' statistics, quadratic-error draws, estimate).\n")
    print("| refresh | time (s) | eigensolver (s) | in products (s) | solver's own work (s) | own work / refresh | "
          "per product (ms) |")
    print("|---|---|---|---|---|---|---|")
    for key, runs in results.items():
        if "eig_seconds" not in runs[0]:
            continue
        refresh = statistics.median(x["seconds"] for x in runs)
        eig_s = statistics.median(x["eig_seconds"] for x in runs)
        prod = statistics.median(x["product_seconds"] for x in runs)
        own = statistics.median(x["eig_seconds"] - x["product_seconds"] for x in runs)
        share = statistics.median((x["eig_seconds"] - x["product_seconds"]) / x["seconds"] for x in runs)
        print(f"| {key} | {refresh:.1f} | {eig_s:.1f} | {prod:.1f} | {own:.2f} | {share:.1%} | "
              f"{1e3 * own / runs[0]['hvps']:.1f} |")
    r0 = results["refresh cold"][0]
    print(f"\nprocess RSS after imports {r0['rss_after_import_mib']:.0f} MiB, after building model + data "
          f"{r0['rss_model_mib']:.0f} MiB; bound (max_basis + c)·N with max_basis = {cap}: excess / (N·4 B) above "
          f"should be ≤ {cap} + c; a warm refresh's input (the previous subspace, N × (D + p), kept by the caller: "
          "the callback's state between refreshes) is counted in the last column's reference")
    print(f"checkpoint state of the callback (torch.save of state_dict): {r0['checkpoint_bytes']} "
          f"(N × (D + p) × 4 B = {n * kt * 4} B)")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; command: PYTHONPATH=. python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
