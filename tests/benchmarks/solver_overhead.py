"""The eigensolver's own work per step (outside the products), before and after the CPU changes of issue #18 item 3.

``top_eigenpairs`` on a synthetic float32 operator of ``n`` = 10^7 rows (a diagonal: a bulk ``u^4``, ``u`` uniform in
``[0, 1]``, and 16 separated top eigenvalues at random rows; D = 10, tol = 1e-3, the default basis of 36 vectors), so
that the products cost almost nothing and the solve's time is the solver's own work. The real product (one
Hessian-vector product of the 10M-parameter transformer of ``memory.py``) costs about 1.2 s on this machine
(``--product-ms``); the solver's time per step is reported against it.

Configurations, repeats interleaved (medians): ``before``, with the switches of
``lightning_curvprobe.functional.lanczos`` that select the former code paths (``_REUSE_INPUT``, ``_DOT_INNER``,
``_RITZ_IN_PLACE``, ``_MINMAX_SIGNS``, ``_SELECTIVE`` off), ``after`` (all on, the default: selective
reorthogonalisation with the threshold ``eps ** _SEMI_ORTH``), ``whole`` (all on but ``_SELECTIVE``: the whole
Gram-Schmidt subtraction every step), and ``selective eps^a`` for each further exponent ``a`` of ``--semi-orth``. All
run the same products (results equal to rounding). The first table compares ``before`` and ``after``; the second
``whole``, ``after`` and the other thresholds, with the share of products whose subtraction was skipped entirely (no
basis vector selected). Per configuration: products and restarts; the solver's own time per step; its part in the basis
passes (inner products and subtractions, ``_Basis.inner`` and ``_Basis.sub_``), in writing new basis vectors
(``_Basis.set_column``: the basis pages' first touch), in copying the vector to multiply (``_Basis.columns``), and once
per solve in the Ritz vectors and their signs (``_result``); the passes over the basis per step (vectors read by the
inner products and subtractions over the vectors then in the basis), the bytes they read and the rate; and the own time
against the product's, ``own / (own + product)``, the share of a step (the issue's goal: 10 %). The memory bandwidth on
this machine (a matrix-vector product of 16 vectors of ``n``) is printed for comparison.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/solver_overhead.py             # n = 1e7, 3 repeats, ~3 minutes
    PYTHONPATH=. python tests/benchmarks/solver_overhead.py --quick     # n = 2e5, a few seconds
    PYTHONPATH=. python tests/benchmarks/solver_overhead.py --max-basis 20 --semi-orth 0.9   # with restarts
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from lightning_curvprobe.functional import lanczos  # noqa: E402

DEFAULT_SEMI_ORTH = lanczos._SEMI_ORTH

SWITCHES = ("_REUSE_INPUT", "_DOT_INNER", "_RITZ_IN_PLACE", "_MINMAX_SIGNS")
# name: (the SWITCHES on, selective reorthogonalisation's exponent or None for the Gram-Schmidt pass every step)
CONFIGS: dict[str, tuple[bool, float | None]] = {
    "before": (False, None),
    "after": (True, lanczos._SEMI_ORTH),
    "whole": (True, None),
}
TIMED = {  # (class, method): the label its time goes to
    (lanczos._Basis, "inner"): "passes",
    (lanczos._Basis, "sub_"): "passes",
    (lanczos._Basis, "set_column"): "set_column",
    (lanczos._Basis, "columns"): "columns",
    (lanczos._Lanczos, "_result"): "result",
}


def diagonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.rand(n, generator=g) ** 4
    top = torch.tensor([10 * 0.85**i for i in range(16)])
    d[torch.randperm(n, generator=g)[:16]] = top + 1
    return d


class Meter:
    """Times selected solver methods and counts the basis vectors the inner products and subtractions read."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.vectors_read = 0
        self.passes = 0.0
        self.originals: dict[tuple[type, str], Any] = {}

    def install(self) -> None:
        for (cls, name), label in TIMED.items():
            original = getattr(cls, name)
            self.originals[(cls, name)] = original
            setattr(cls, name, self._timed(original, label, counted=name in ("inner", "sub_")))
        self.orthogonalisations = self.skips = 0
        project_out = lanczos._Basis.project_out_
        self.originals[(lanczos._Basis, "project_out_")] = project_out
        meter = self

        def counted(obj: Any, *args: Any, **kwargs: Any) -> Any:
            before = obj.skips
            out = project_out(obj, *args, **kwargs)
            if "skip" in kwargs:  # the products' orthogonalisation (not the start block's)
                meter.orthogonalisations += 1
                meter.skips += obj.skips - before
            return out

        lanczos._Basis.project_out_ = counted  # type: ignore[method-assign]

    def remove(self) -> None:
        for (cls, name), original in self.originals.items():
            setattr(cls, name, original)

    def _timed(self, original: Any, label: str, counted: bool) -> Any:
        meter = self

        def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if counted:
                lo, hi = args[0], args[1]
                meter.vectors_read += hi - lo
                meter.passes += (hi - lo) / max(1, obj.size)
            t = time.perf_counter()
            out = original(obj, *args, **kwargs)
            meter.seconds[label] += time.perf_counter() - t
            return out

        return wrapper


def solve(
    d: torch.Tensor, k: int, tol: float, on: bool, semi_orth: float | None, max_basis: int | None = None
) -> dict[str, Any]:
    for name in SWITCHES:
        setattr(lanczos, name, on)
    lanczos._SELECTIVE = semi_orth is not None
    lanczos._SEMI_ORTH = semi_orth if semi_orth is not None else DEFAULT_SEMI_ORTH
    product = [0.0]

    def matvec(x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        y = d[:, None] * x
        product[0] += time.perf_counter() - t
        return y

    meter = Meter()
    meter.install()
    try:
        t0 = time.perf_counter()
        res = lanczos.top_eigenpairs(matvec, d.shape[0], k, tol=tol, dtype=torch.float32, max_basis=max_basis)
        total = time.perf_counter() - t0
    finally:
        meter.remove()
        for name in SWITCHES:
            setattr(lanczos, name, True)
        lanczos._SELECTIVE, lanczos._SEMI_ORTH = True, DEFAULT_SEMI_ORTH
    steps = res.hvps
    own = total - product[0]
    return {
        "hvps": res.hvps,
        "restarts": res.restarts,
        "converged": res.converged,
        "eigenvalues": res.eigenvalues,
        "own_ms": 1e3 * (own - meter.seconds["result"]) / steps,
        "own_total_ms": 1e3 * own / steps,
        "passes_ms": 1e3 * meter.seconds["passes"] / steps,
        "set_column_ms": 1e3 * meter.seconds["set_column"] / steps,
        "columns_ms": 1e3 * meter.seconds["columns"] / steps,
        "result_s": meter.seconds["result"],
        "passes": meter.passes / steps,
        "vectors_read": meter.vectors_read / steps,
        "skipped": meter.skips / max(1, meter.orthogonalisations),
    }


def bandwidth_gbs(n: int, repeats: int = 5) -> float:
    """Read rate of a float32 matrix-vector product over 16 vectors of ``n`` (the memory bandwidth the passes see)."""
    V = torch.randn(16, n)
    x = torch.randn(n)
    V @ x
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        V @ x
        times.append(time.perf_counter() - t)
    return 16 * n * 4 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=float, default=1e7)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-basis", type=int, default=None, help="a smaller basis: restarts")
    parser.add_argument("--product-ms", type=float, default=1200.0, help="the real product's time to compare with")
    parser.add_argument(
        "--semi-orth",
        default="0.5",
        help="exponents a of further selective configurations (threshold eps**a), besides the solver's default "
        f"{DEFAULT_SEMI_ORTH}",
    )
    parser.add_argument("--quick", action="store_true", help="n = 2e5, k = 4, 1 repeat: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.n, args.k, args.repeats = 2e5, 4, 1
    n = int(args.n)
    configs = dict(CONFIGS)
    for a in (float(x) for x in args.semi_orth.split(",") if x):
        if a != DEFAULT_SEMI_ORTH:
            configs[f"selective eps^{a:g}"] = (True, a)
    torch.set_num_threads(args.threads)
    print(f"command: PYTHONPATH=. python {' '.join(sys.argv)}")
    print(
        f"torch {torch.__version__}, {args.threads} threads, n = {n:,}, float32, D = {args.k}, tol = {args.tol}, "
        f"max_basis = {args.max_basis or 'default'}"
    )
    t_start = time.perf_counter()
    d = diagonal(n)
    gbs = bandwidth_gbs(n)
    print(f"memory bandwidth (16 x n float32 matrix-vector product): {gbs:.1f} GB/s")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, (on, semi_orth) in configs.items():
            runs[name].append(solve(d, args.k, args.tol, on, semi_orth, args.max_basis))
    medians = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0] if isinstance(rs[0][key], float)}
        for name, rs in runs.items()
    }
    _table(["before", "after"], runs, medians, n, gbs, args.product_ms)
    b, a = runs["before"][0], runs["after"][0]
    rel = float(((a["eigenvalues"] - b["eigenvalues"]).abs() / b["eigenvalues"].abs()).max())
    print(f"\nsame products: {a['hvps'] == b['hvps']}; converged: {a['converged'] and b['converged']}; ")
    print(f"largest relative eigenvalue difference, after against before: {rel:.1e}")
    ratio = medians["after"]["own_total_ms"] / medians["before"]["own_total_ms"]
    print(f"own time per step, after / before: {ratio:.2f}")
    floor = medians["after"]["vectors_read"] * n * 4 / 1e9 / gbs * 1e3
    print(
        f"floor of the basis passes at {gbs:.1f} GB/s: {floor:.0f} ms/step "
        f"({100 * floor / (floor + args.product_ms):.1f} % of a step with a {args.product_ms:.0f} ms product)"
    )
    _selective_table(configs, runs, medians, n, args.product_ms)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


def _table(
    names: list[str], runs: dict[str, list[dict[str, Any]]], medians: dict, n: int, gbs: float, product_ms: float
) -> None:
    """The before/after table: the solver's time per step and where it goes."""
    print(
        "\n| solver | products | restarts | own ms/step | basis passes ms/step | set_column ms/step | columns ms/step "
        "| result s (once) | own incl. result ms/step | passes/step | basis GB/step | GB/s in passes "
        f"| own / (own + {product_ms:.0f} ms product) |"
    )
    print("|" + "---|" * 13)
    for name in names:
        med, r0 = medians[name], runs[name][0]
        gb = med["vectors_read"] * n * 4 / 1e9
        rate = gb / (med["passes_ms"] / 1e3) if med["passes_ms"] > 0 else float("nan")
        share = med["own_total_ms"] / (med["own_total_ms"] + product_ms)
        print(
            f"| {name} | {r0['hvps']} | {r0['restarts']} | {med['own_ms']:.0f} | {med['passes_ms']:.0f} "
            f"| {med['set_column_ms']:.0f} | {med['columns_ms']:.0f} | {med['result_s']:.2f} "
            f"| {med['own_total_ms']:.0f} | {med['passes']:.2f} | {gb:.2f} | {rate:.1f} | {100 * share:.1f} % |"
        )


def _selective_table(
    configs: dict[str, tuple[bool, float | None]],
    runs: dict[str, list[dict[str, Any]]],
    medians: dict,
    n: int,
    product_ms: float,
) -> None:
    """The whole subtraction against the selective ones (the default's threshold and the others asked for)."""
    print(
        f"\nSelective reorthogonalisation (``after`` = eps^{DEFAULT_SEMI_ORTH:g}, the default) against the whole "
        "Gram-Schmidt subtraction every step (``whole``), all other switches on:\n"
    )
    print(
        "| solver | products | own incl. result ms/step | basis passes ms/step | passes/step | basis GB/step "
        "| subtractions skipped | largest relative eigenvalue difference against whole "
        f"| own / (own + {product_ms:.0f} ms product) |"
    )
    print("|" + "---|" * 9)
    ref = runs["whole"][0]["eigenvalues"]
    for name in ["whole", "after"] + [c for c in configs if c.startswith("selective")]:
        med, r0 = medians[name], runs[name][0]
        rel = float(((r0["eigenvalues"] - ref).abs() / ref.abs()).max())
        share = med["own_total_ms"] / (med["own_total_ms"] + product_ms)
        print(
            f"| {name} | {r0['hvps']} | {med['own_total_ms']:.0f} | {med['passes_ms']:.0f} | {med['passes']:.2f} "
            f"| {med['vectors_read'] * n * 4 / 1e9:.2f} | {100 * med['skipped']:.0f} % | {rel:.1e} "
            f"| {100 * share:.1f} % |"
        )
    for name in ["whole", "after"] + [c for c in configs if c.startswith("selective")]:
        if not runs[name][0]["converged"]:
            print(f"{name}: NOT converged")


if __name__ == "__main__":
    main()
