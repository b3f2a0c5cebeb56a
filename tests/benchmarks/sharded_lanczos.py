"""Row-sharded eigensolve (issue #19 item 1): the basis memory of each process with 1 and with 2 gloo processes.

One refresh-sized solve, ``top_eigenpairs(matvec, n, k)`` at the callback's default ``tol = 1e-3`` in float32, of a
synthetic symmetric operator with a cheap product: ``H = diag(d) + U diag(s) Uᵀ`` with a flat bulk ``d`` uniform in
``[0, 1]``, ``U`` of 16 random columns of norm about 1 and weights ``s = 10 · 0.8^i`` (a few separated top
eigenvalues above the bulk). Each process holds rows ``lo:hi`` of ``d`` and ``U`` (drawn over all ``n`` rows from one
seed, the rest dropped), so a sharded product needs only ``Uᵀ x`` summed over the processes (one all-reduce of
``16 x b`` numbers; summed in float64 over row chunks, so that both runs multiply by the same operator to float32
rounding).

Runs, each in a fresh process: the unsharded solver in 1 process, then ``rows=`` / ``reduce_fn=`` over 2 gloo
processes with uneven rows (rank 0 holds 55 %). Per process: its rows, the basis capacity ``max_basis`` and the basis'
``max_basis · rows · 4 B``, the peak resident-memory increase during the solve (``VmHWM`` reset through
``/proc/self/clear_refs`` before the solve, minus ``VmRSS`` before it; without that reset the peak since the process
started), products, restarts, ``reduce_fn`` calls, and time; then the largest relative difference of the eigenvalues
between the runs and whether both ranks' eigenvalues are bitwise equal.

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/sharded_lanczos.py            # n = 2,000,000, k = 10: ~30 s
    PYTHONPATH=. python tests/benchmarks/sharded_lanczos.py --quick    # n = 100,000, k = 4: a few seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from lightning_curvprobe.functional.lanczos import _basis_capacity, _default_num_extra, top_eigenpairs  # noqa: E402

RANK_SHARE = 0.55  # rank 0's share of the rows with 2 processes
LOW_RANK = 16
CHUNK = 1 << 16


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
        return True
    except OSError:
        return False


def _operator(n: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``lo:hi`` of ``d`` and ``U``, and ``s``: every column drawn over all ``n`` rows (one at a time)."""
    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g)[lo:hi].clone()
    U = torch.empty(hi - lo, LOW_RANK)
    for j in range(LOW_RANK):
        U[:, j] = torch.randn(n, generator=g)[lo:hi] / n**0.5
    s = 10.0 * 0.8 ** torch.arange(LOW_RANK, dtype=torch.float32)
    return d, U, s


def worker(rank: int, world: int, port: int, n: int, k: int, tol: float) -> None:
    torch.set_num_threads(1)
    sharded = world > 1
    if sharded:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        cut = int(RANK_SHARE * n)
        lo, hi = (0, cut) if rank == 0 else (cut, n)
    else:
        lo, hi = 0, n
    d, U, s = _operator(n, lo, hi)
    calls = [0]

    def reduce_fn(t: torch.Tensor) -> None:
        calls[0] += 1
        dist.all_reduce(t)

    def matvec(x: torch.Tensor) -> torch.Tensor:
        # Uᵀ x summed over row chunks in float64 (a single float32 sum over millions of rows is ~1e-4 off, which
        # would make the 1- and 2-process operators differ by more than the solver's own rounding)
        c = torch.zeros(LOW_RANK, x.shape[1], dtype=torch.float64)
        for r0 in range(0, x.shape[0], CHUNK):
            c += (U[r0 : r0 + CHUNK].T @ x[r0 : r0 + CHUNK]).double()
        if sharded:
            dist.all_reduce(c)
        return d[:, None] * x + U @ (s[:, None] * c).float()

    kw = dict(rows=(lo, hi), reduce_fn=reduce_fn) if sharded else {}
    rss0 = _status_kb("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    res = top_eigenpairs(matvec, n, k, tol=tol, dtype=torch.float32, generator=torch.Generator().manual_seed(1), **kw)
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") - rss0
    cap = _basis_capacity(n, k + _default_num_extra(k, n), 1, 1, None)
    out = dict(
        world=world,
        rank=rank,
        rows=hi - lo,
        cap=cap,
        basis_mb=cap * (hi - lo) * 4 / 2**20,
        peak_mb=peak_kb / 1024,
        peak_reset=reset,
        hvps=res.hvps,
        restarts=res.restarts,
        converged=res.converged,
        reductions=calls[0],
        seconds=seconds,
        eigenvalues=res.eigenvalues.tolist(),
        eig_hex=[float(v).hex() for v in res.eigenvalues],
    )
    print("RESULT " + json.dumps(out), flush=True)
    if sharded:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, n: int, k: int, tol: float) -> list[dict]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(world), str(port), str(n), str(k), str(tol)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        text, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"worker exited with {p.returncode}:\n{text[-3000:]}")
        results.append(json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 100,000, k = 4 (smoke run)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        rank, world, port, n, k = (int(v) for v in args.worker[:5])
        worker(rank, world, port, n, k, float(args.worker[5]))
        return
    n = args.n or (100_000 if args.quick else 2_000_000)
    k = args.k or (4 if args.quick else 10)
    print(
        f"torch {torch.__version__}; n = {n:,}, k = {k}, tol {args.tol:g}, float32 basis; "
        f"H = diag(d) + U diag(s) Uᵀ (rank {LOW_RANK}); 1 thread per process, {os.cpu_count()} CPU cores (shared)"
    )
    runs = {"1 process (unsharded)": _launch(1, n, k, args.tol), "2 gloo processes (rows=)": _launch(2, n, k, args.tol)}
    print()
    print(
        "| run | rank | rows | max_basis | basis max_basis·rows·4 B (MiB) | peak RSS increase in the solve (MiB) | "
        "products | restarts | reduce_fn calls | converged | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, results in runs.items():
        for r in results:
            print(
                f"| {label} | {r['rank']} | {r['rows']:,} | {r['cap']} | {r['basis_mb']:.1f} | {r['peak_mb']:.1f} | "
                f"{r['hvps']} | {r['restarts']} | {r['reductions']} | {r['converged']} | {r['seconds']:.2f} |"
            )
    one, two = runs["1 process (unsharded)"][0], runs["2 gloo processes (rows=)"]
    rel = max(abs(a - b) / abs(b) for a, b in zip(two[0]["eigenvalues"], one["eigenvalues"], strict=True))
    print()
    print("eigenvalues (1 process):", " ".join(f"{v:.6g}" for v in one["eigenvalues"]))
    print(f"largest relative eigenvalue difference, 2 processes against 1: {rel:.2e}")
    print(f"ranks' eigenvalues bitwise equal: {two[0]['eig_hex'] == two[1]['eig_hex']}")
    if not all(r["peak_reset"] for rs in runs.values() for r in rs):
        print("(VmHWM could not be reset: the peak is the process's since it started)")
    ratio = max(r["peak_mb"] for r in two) / one["peak_mb"]
    print(f"largest per-process peak increase, 2 processes over 1: {ratio:.2f}")


if __name__ == "__main__":
    main()
