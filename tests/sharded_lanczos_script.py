"""Run by tests/test_lanczos_sharded.py: one of the 2 gloo processes of a row-sharded ``top_eigenpairs``.

Usage: python tests/sharded_lanczos_script.py OUT_DIR RANK WORLD PORT
Rank r holds rows ``ROWS[r]`` (uneven) of every vector; ``matvec`` all-gathers the local block into the full vector,
multiplies by the dense test matrix and returns its own rows. Each rank writes OUT_DIR/rank{r}.pt: per case the
result (local rows), the rows, and the first block ``matvec`` received (the start vectors, local rows).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from lightning_curvprobe.functional.lanczos import top_eigenpairs  # noqa: E402

N = 2401
ROWS = [(0, 1201), (1201, N)]  # uneven
DT = torch.float64
TOL = 1e-11
# case: (matrix, k, keyword arguments); "warm" starts from the local rows of "cold_b1"'s basis on the perturbed matrix
CASES = {
    "cold_b1": ("separated", 4, {}),
    "block3": ("separated", 4, {"block_size": 3}),
    "restarts": ("separated", 4, {"max_basis": 10}),
    "degenerate": ("degenerate", 4, {"tol": 1e-12}),
    "warm": ("perturbed", 4, {}),
    "basis_device": ("separated", 4, {"device": "cpu", "basis_device": "cpu"}),
}
SEED = 7


def make_matrix(kind: str) -> torch.Tensor:
    """A dense symmetric ``N x N`` float64 matrix: a few separated top eigenvalues, then a flat bulk in ``[0, 1]``.

    ``Q diag(ev) Qᵀ`` with ``Q`` a product of four Householder reflections and the eigenvalues at random positions
    (so that the eigenvectors' largest entries fall on either rank). ``degenerate``: a near-degenerate pair at 1.5
    (relative gap 1e-3); ``perturbed``: ``separated`` plus a small symmetric perturbation (norm about 1e-3).
    """
    g = torch.Generator().manual_seed(123)
    if kind == "degenerate":
        top = [2.0, 1.8, 1.5, 1.5 * (1 - 1e-3), 1.3, 1.2, 1.12, 1.08]
    else:
        top = [2.0, 1.7, 1.5, 1.35, 1.25, 1.18, 1.12, 1.08]
    bulk = torch.rand(N - len(top), generator=g, dtype=DT)
    ev = torch.cat([torch.tensor(top, dtype=DT), bulk])[torch.randperm(N, generator=g)]
    M = torch.diag(ev)
    for _ in range(4):
        u = torch.randn(N, 1, generator=g, dtype=DT)
        u /= u.norm()
        Mu = M @ u  # (I - 2uuᵀ) M (I - 2uuᵀ) = M + u aᵀ + a uᵀ
        a = 2 * float(u.T @ Mu) * u - 2 * Mu
        M.addr_(u[:, 0], a[:, 0]).addr_(a[:, 0], u[:, 0])
    if kind == "perturbed":
        E = torch.randn(N, N, generator=g, dtype=DT)
        E = E + E.T
        M = M + 1e-3 * E / (2 * (2 * N) ** 0.5)  # spectral norm about 1e-3
    return 0.5 * (M + M.T)


def solve(A: torch.Tensor, k: int, kw: dict, rows=None, reduce_fn=None, gather=None, warm_start=None):
    """``top_eigenpairs`` of ``A`` (sharded when ``rows`` is given); the result and the first block multiplied."""
    first = []
    kw = dict(kw)
    tol = kw.pop("tol", TOL)

    def matvec(x):
        if not first:
            first.append(x.clone())
        if rows is None:
            return A @ x
        full = gather(x) if gather is not None else x
        return A[rows[0] : rows[1]] @ full

    res = top_eigenpairs(
        matvec,
        N,
        k,
        tol=tol,
        dtype=DT,
        generator=torch.Generator().manual_seed(SEED),
        rows=rows,
        reduce_fn=reduce_fn,
        warm_start=warm_start,
        **kw,
    )
    return res, first[0]


def main() -> None:
    out, rank, world, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = ROWS[rank]
    sizes = [hi - lo for lo, hi in ROWS]
    calls = {"reduce": 0}

    def gather(x):  # gloo gathers equal sizes: padded to the largest share
        pad = max(sizes)
        padded = x.new_zeros(pad, x.shape[1])
        padded[: x.shape[0]] = x
        parts = [x.new_empty(pad, x.shape[1]) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])

    def reduce_fn(t):
        calls["reduce"] += 1
        dist.all_reduce(t)

    mats = {}
    results = {}
    for name, (kind, k, kw) in CASES.items():
        if kind not in mats:
            mats[kind] = make_matrix(kind)
        warm = results["cold_b1"]["basis"] if name == "warm" else None
        calls["reduce"] = 0
        res, first = solve(mats[kind], k, kw, rows, reduce_fn, gather, warm)
        results[name] = dict(vars(res), rows=rows, first=first, reductions=calls["reduce"])
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
