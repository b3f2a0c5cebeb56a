"""Row-sharded ``top_eigenpairs(rows=..., reduce_fn=...)``: two gloo processes against one process, simulated ranks
(threads summing in rank order) for more than two processes and for the processes' ordering, and the argument checks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lightning_curvprobe.functional.lanczos import _canonical_signs_, _shard_layout, top_eigenpairs

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import sharded_lanczos_script as script  # noqa: E402

DT = torch.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The two gloo processes' results (``sharded_lanczos_script.py``), and the single-process references."""
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "sharded_lanczos_script.py"), str(out), str(r), "2", port],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    # the references while the two processes run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mats, refs = {}, {}
        for name, (kind, k, kw) in script.CASES.items():
            if kind not in mats:
                mats[kind] = script.make_matrix(kind)
            warm = refs["cold_b1"][0].basis if name == "warm" else None
            refs[name] = script.solve(mats[kind], k, kw, warm_start=warm)
            # one process given rows=(0, n): the sharded code path with every row (the same start vectors)
            warm = refs["cold_b1_rows"][0].basis if name == "warm" else None
            refs[name + "_rows"] = script.solve(
                mats[kind], k, kw, rows=(0, script.N), reduce_fn=lambda t: None, warm_start=warm
            )
    finally:
        torch.set_num_threads(threads)
    for proc in procs:
        text, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, text[-4000:]
    r0 = torch.load(out / "rank0.pt", weights_only=False)
    r1 = torch.load(out / "rank1.pt", weights_only=False)
    return r0, r1, refs, mats


@pytest.mark.parametrize("case", list(script.CASES))
def test_two_gloo_ranks_match_one_process(two_ranks, case):
    r0, r1, refs, mats = two_ranks
    a, b = r0[case], r1[case]
    ref, ref_first = refs[case]
    # every process took the same decisions and got bitwise the same small quantities
    assert a["rows"] == script.ROWS[0] and b["rows"] == script.ROWS[1]
    for key in ("eigenvalues", "residuals"):
        assert torch.equal(a[key], b[key]), key
    assert (a["hvps"], a["restarts"], a["converged"]) == (b["hvps"], b["restarts"], b["converged"])
    assert a["converged"] and ref.converged
    assert a["eigenvectors"].shape == (1201, 4) and b["eigenvectors"].shape == (1200, 4)
    # ... equal to one process holding every row
    torch.testing.assert_close(a["eigenvalues"], ref.eigenvalues, rtol=1e-10, atol=0)
    U = torch.cat([a["eigenvectors"], b["eigenvectors"]])
    assert float((U - ref.eigenvectors).abs().max()) <= 1e-8
    V = torch.cat([a["basis"], b["basis"]])
    torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1], dtype=DT), rtol=0, atol=1e-12)
    # residuals: the reported ones within the bound, and the true ones of the gathered vectors as small
    kind, _, kw = script.CASES[case]
    tol = kw.get("tol", script.TOL)
    theta = a["eigenvalues"]
    true_res = (mats[kind] @ U - U * theta).norm(dim=0)
    assert bool((a["residuals"] <= tol * theta.abs()).all())
    assert bool((true_res <= 2 * tol * theta.abs() + 1e-13).all()), true_res
    torch.testing.assert_close(a["residuals"], ref.residuals, rtol=0, atol=tol * float(theta[0]))
    # the start vectors (normalised; the raw draws are bitwise equal, test_random_start_block_...): the start of one
    # process, sharded code path (rows=(0, n)) or not; from there the same path, the sums over rows aside (split over
    # the processes)
    ref_rows, rows_first = refs[case + "_rows"]
    first = torch.cat([a["first"], b["first"]])
    if case != "warm":
        torch.testing.assert_close(first, rows_first, rtol=0, atol=1e-14)
        torch.testing.assert_close(first, ref_first, rtol=0, atol=1e-14)
        assert a["hvps"] == ref.hvps
    assert (a["hvps"], a["restarts"]) == (ref_rows.hvps, ref_rows.restarts)
    torch.testing.assert_close(a["eigenvalues"], ref_rows.eigenvalues, rtol=1e-12, atol=0)
    assert float((U - ref_rows.eigenvectors).abs().max()) <= 1e-10
    if case == "restarts":
        assert a["restarts"] > 5
    if case == "basis_device":  # the same solve as cold_b1
        assert torch.equal(a["eigenvectors"], r0["cold_b1"]["eigenvectors"])
    # sums over rows are batched: a few reductions per product
    assert a["reductions"] <= 4 * a["hvps"] + 20, a["reductions"]


# ---------------------------------------------------------------------------------------------- simulated ranks


class _Threads:
    """``world`` threads as processes: ``reduce(rank)`` sums over them in rank order, ``gather(rank)`` concatenates."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.parts: list = [None] * world

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.parts[rank] = t.clone()
        self.barrier.wait()
        parts = list(self.parts)
        self.barrier.wait()
        return parts

    def reduce(self, rank: int):
        def fn(t: torch.Tensor) -> None:
            parts = self._exchange(rank, t)
            total = parts[0].clone()
            for p in parts[1:]:
                total += p
            t.copy_(total)

        return fn

    def gather(self, rank: int):
        return lambda x: torch.cat(self._exchange(rank, x))

    def run(self, fn) -> list:
        """``fn(rank)`` on every thread; the results, or the exceptions raised."""
        out: list = [None] * self.world

        def body(rank: int) -> None:
            try:
                out[rank] = fn(rank)
            except Exception as e:  # noqa: BLE001
                out[rank] = e  # the others meet it at the same point (or time out at the barrier)

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out


def test_shard_layout_orders_uneven_ranges():
    n = 100_000
    cuts = [0, 3, 4, 70_000, 70_001, 99_999, n]  # neighbouring starts: found in later rounds
    ranges = list(zip(cuts[:-1], cuts[1:], strict=True))
    order = [4, 0, 5, 2, 1, 3]  # thread i holds ranges[order[i]]
    g = _Threads(len(ranges))
    got = g.run(lambda r: _shard_layout(*ranges[order[r]], n, g.reduce(r), torch.device("cpu")))
    assert got == [(order[r], len(ranges)) for r in range(len(ranges))]


@pytest.mark.parametrize(
    "ranges",
    [[(0, 5), (6, 10)], [(0, 6), (5, 10)], [(0, 5), (0, 5)], [(5, 10), (0, 4)]],
    ids=["gap", "overlap", "same-start", "short"],
)
def test_shard_layout_rejects_ranges_that_do_not_partition(ranges):
    g = _Threads(len(ranges))
    got = g.run(lambda r: _shard_layout(*ranges[r], 10, g.reduce(r), torch.device("cpu")))
    assert all(isinstance(e, ValueError) and "rows" in str(e) for e in got), got


def test_canonical_signs_decided_over_every_rank():
    # column 0: largest magnitude on rank 1 (negative); column 1: a tie across ranks (rank 0's, positive, wins);
    # column 2: a tie within rank 1 (its first, negative, wins)
    full = torch.tensor([[0.1, 2.0, 0.3], [0.5, 0.0, 0.0], [-3.0, -2.0, -1.0], [1.0, 0.0, 1.0]], dtype=DT)
    ref = full.clone()
    _canonical_signs_(ref)
    ranges = [(0, 2), (2, 4)]
    g = _Threads(2)
    parts = [full[lo:hi].clone() for lo, hi in ranges]
    g.run(lambda r: _canonical_signs_(parts[r], (g.reduce(r), r, 2)))
    assert torch.equal(torch.cat(parts), ref)
    assert ref[2, 0] > 0 and ref[0, 1] > 0 and ref[2, 2] > 0


def _matrix(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    ev = torch.cat([torch.tensor([3.0, 2.5, 2.2, 2.0, 1.9, 1.8], dtype=DT), torch.rand(n - 6, generator=g, dtype=DT)])
    return (Q * ev) @ Q.T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_three_simulated_ranks_match_one_process(dtype):
    n, k = 120, 3
    A = _matrix(n).to(dtype)
    cuts = [0, 17, 80, n]
    ranges = list(zip(cuts[:-1], cuts[1:], strict=True))
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def solve(rows=None, reduce_fn=None, gather=None, warm=None, **kw):
        def matvec(x):
            return A @ x if rows is None else A[rows[0] : rows[1]] @ gather(x)

        gen = torch.Generator().manual_seed(1)
        return top_eigenpairs(
            matvec, n, k, tol=tol, dtype=dtype, generator=gen, rows=rows, reduce_fn=reduce_fn, warm_start=warm, **kw
        )

    ref = solve()
    whole = solve((0, n), lambda t: None, lambda x: x)  # one process, the sharded code path
    g = _Threads(3)
    got = g.run(lambda r: solve(ranges[r], g.reduce(r), g.gather(r)))
    for res in got:
        assert not isinstance(res, Exception), res
        assert torch.equal(res.eigenvalues, got[0].eigenvalues) and res.hvps == got[0].hvps
    U = torch.cat([res.eigenvectors for res in got])
    # against one process given rows=(0, n): the same start, sums over rows split otherwise
    assert got[0].hvps == whole.hvps
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0].eigenvalues, whole.eigenvalues, rtol=rtol, atol=0)
    assert float((U - whole.eigenvectors).abs().max()) <= (1e-10 if dtype == torch.float64 else 1e-3)
    # against the unsharded solver (the same start vector, other reductions): within the tolerance
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0].eigenvalues, ref.eigenvalues, rtol=rtol, atol=0)
    assert float((U - ref.eigenvectors).abs().max()) <= (1e-8 if dtype == torch.float64 else 1e-3)


def test_simulated_ranks_wide_warm_start():
    """A warm start (local rows) wider than the space: orthonormalised over the ranks before it enters the basis."""
    n = 40
    A = _matrix(n, seed=4)
    ranges = [(0, 9), (9, 25), (25, n)]
    W = torch.randn(n, n + 2, generator=torch.Generator().manual_seed(2), dtype=DT)

    def solve(rows=None, reduce_fn=None, gather=None):
        def matvec(x):
            return A @ x if rows is None else A[rows[0] : rows[1]] @ gather(x)

        warm = W if rows is None else W[rows[0] : rows[1]]
        return top_eigenpairs(matvec, n, 3, tol=1e-10, rows=rows, reduce_fn=reduce_fn, warm_start=warm)

    ref = solve()
    g = _Threads(3)
    got = g.run(lambda r: solve(ranges[r], g.reduce(r), g.gather(r)))
    assert all(torch.equal(res.eigenvalues, got[0].eigenvalues) for res in got), got
    torch.testing.assert_close(got[0].eigenvalues, ref.eigenvalues, rtol=1e-10, atol=0)
    U = torch.cat([res.eigenvectors for res in got])
    assert float((U - ref.eigenvectors).abs().max()) <= 1e-8


def test_rows_covering_every_row_in_one_process_matches_unsharded():
    n = 400
    A = _matrix(n, seed=3)
    kw = dict(tol=1e-10, generator=torch.Generator().manual_seed(5))
    ref = top_eigenpairs(lambda v: A @ v, n, 4, **kw)
    kw["generator"] = torch.Generator().manual_seed(5)
    res = top_eigenpairs(lambda v: A @ v, n, 4, rows=(0, n), reduce_fn=lambda t: t, **kw)
    assert res.hvps == ref.hvps and res.restarts == ref.restarts
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.eigenvectors, ref.eigenvectors, rtol=0, atol=1e-9)
    # the generator ends where the unsharded solver leaves it (the probe's later draws come from it)
    assert torch.equal(kw["generator"].get_state(), ref_state(5, n, 1))


def ref_state(seed: int, n: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    torch.randn(n, b, generator=g, dtype=DT)
    return g.get_state()


# ---------------------------------------------------------------------------------------------- argument checks


def test_rows_and_reduce_fn_are_checked():
    A = torch.eye(10, dtype=DT)

    def mv(v):
        return A[:5] @ v

    with pytest.raises(ValueError, match=r"`reduce_fn` is required with `rows`.*got None"):
        top_eigenpairs(mv, 10, 2, rows=(0, 5))
    with pytest.raises(ValueError, match=r"`reduce_fn` is required.*got 3"):
        top_eigenpairs(mv, 10, 2, rows=(0, 5), reduce_fn=3)
    for bad in [(5, 5), (-1, 5), (0, 11), (6, 4), (0, 5, 7), (0.0, 5), "0:5", 5]:
        with pytest.raises(ValueError, match=r"`rows` must be a pair of ints \(lo, hi\) with 0 <= lo < hi <= n = 10"):
            top_eigenpairs(mv, 10, 2, rows=bad, reduce_fn=lambda t: None)
    with pytest.raises(ValueError, match=r"`reduce_fn` is only allowed together with `rows`"):
        top_eigenpairs(lambda v: A @ v, 10, 2, reduce_fn=lambda t: None)
    with pytest.raises(ValueError, match=r"`warm_start` must have shape \(5, w\) \(this process's rows 0:5\)"):
        top_eigenpairs(mv, 10, 2, rows=(0, 5), reduce_fn=lambda t: None, warm_start=torch.ones(10, 2, dtype=DT))
    # one process claiming half the rows: the ranges do not partition range(n)
    with pytest.raises(ValueError, match=r"partition range\(10\)"):
        top_eigenpairs(mv, 10, 2, rows=(0, 5), reduce_fn=lambda t: None)


def test_rows_accept_integer_types():
    import numpy as np

    A = torch.eye(6, dtype=DT)
    res = top_eigenpairs(lambda v: A @ v, 6, 2, rows=[np.int64(0), torch.tensor(6)], reduce_fn=lambda t: None)
    assert res.eigenvectors.shape == (6, 2)


@pytest.mark.parametrize("n", [50, 2 * 65536 + 100, 2 * 65536 + 5, 3 * 65536])
def test_random_start_block_drawn_in_chunks(monkeypatch, n):
    """The raw start block: its ``n · b`` numbers drawn from the generator in chunks, each rank keeping its rows'. The
    union over the ranks is, bit for bit, the unsharded draw ``randn(n, b)``, whatever the partition; the generator
    ends in the same state, and no draw is larger than one chunk."""
    from lightning_curvprobe.functional import lanczos
    from lightning_curvprobe.functional.lanczos import _RANDOM_CHUNK, _Lanczos

    cuts = sorted({0, 13, 14, 65536 - 1, 65536, 65536 + 1, 2 * 65536 - 1, n - 1, n} & set(range(n + 1)))
    partitions = [[(0, n)], list(zip(cuts[:-1], cuts[1:], strict=True)), [(0, n // 3), (n // 3, n)]]
    sizes = []
    randn = torch.randn

    def recorded(*args, **kwargs):
        out = randn(*args, **kwargs)
        sizes.append(out.numel())
        return out

    def block(rows, b, dtype=DT, seed=3):
        solver = object.__new__(_Lanczos)
        solver.n, solver.rows, solver.dtype, solver.device = n, rows, dtype, torch.device("cpu")
        solver.generator = torch.Generator().manual_seed(seed)
        return solver._random_block(b), solver.generator

    for b in (1, 3):
        ref, ref_gen = block(None, b)
        monkeypatch.setattr(lanczos.torch, "randn", recorded)
        for ranges in partitions:
            parts = [block(r, b) for r in ranges]
            assert torch.equal(torch.cat([p for p, _ in parts]), ref)
            assert all(torch.equal(g.get_state(), ref_gen.get_state()) for _, g in parts)
        monkeypatch.setattr(lanczos.torch, "randn", randn)
    assert sizes and max(sizes) <= _RANDOM_CHUNK + 15
    # float32: the float64 draw rounded, as the unsharded path does
    assert torch.equal(torch.cat([block(r, 2, torch.float32)[0] for r in partitions[-1]]), block(None, 2)[0].float())


def test_non_finite_product_on_one_rank_raises_on_every_rank():
    from lightning_curvprobe.functional.hvp import NonFiniteProbeError

    n = 60
    A = _matrix(n, seed=6)
    ranges = [(0, 25), (25, n)]
    g = _Threads(2)

    def solve(rank):
        lo, hi = ranges[rank]
        calls = [0]

        def matvec(x):
            calls[0] += 1
            out = A[lo:hi] @ g.gather(rank)(x)
            if rank == 1 and calls[0] == 3:
                out[4, 0] = float("nan")
            return out

        return top_eigenpairs(matvec, n, 2, rows=(lo, hi), reduce_fn=g.reduce(rank))

    got = g.run(solve)
    assert all(isinstance(e, NonFiniteProbeError) for e in got), got
