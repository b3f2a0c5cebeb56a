"""Selective reorthogonalisation (``lanczos._SELECTIVE``): a product's remainder is subtracted only along the basis
vectors on which its coefficient exceeds ``eps ** _SEMI_ORTH`` of its norm.

Checked against dense references on spectra that stress the Krylov basis (clusters, flat bulks, many restarts), in
float64 and float32; against the full Gram-Schmidt pass (the switch off); the sharded path against one process; and
the selection itself on a small basis. One test shows that the checks are sensitive: with the threshold at 1 (no
subtraction at all) they fail.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_lanczos import Counter, check_pairs, sym_with_spectrum
from test_lanczos_sharded import _Threads

from lightning_curvprobe.functional import lanczos
from lightning_curvprobe.functional.lanczos import top_eigenpairs

DT = torch.float64


def _orth_error(Q: torch.Tensor) -> float:
    Q = Q.double()
    return float((Q.T @ Q - torch.eye(Q.shape[1], dtype=DT)).abs().max())


def _subtracted_vectors(monkeypatch) -> list[int]:
    """Counts the basis vectors read by the subtractions of the products' orthogonalisations."""
    reads: list[int] = []
    sub = lanczos._Basis.sub_

    def counted(self, lo, hi, X, coef):
        reads.append(hi - lo)
        return sub(self, lo, hi, X, coef)

    monkeypatch.setattr(lanczos._Basis, "sub_", counted)
    return reads


def _spectrum(kind: str, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if kind == "clustered":  # top pairs 1e-6 apart, then a gap
        top = [4.0, 4.0 - 1e-6, 4.0 - 2e-6, 3.0, 3.0 - 1e-5, 2.9]
    elif kind == "flat":  # a slowly decaying top over a flat bulk: many restarts
        top = [1.0 + 0.02 * (8 - i) for i in range(8)]
    else:  # "decaying"
        top = [10 * 0.8**i for i in range(8)]
    rest = torch.rand(n - len(top), generator=g, dtype=DT) * 0.9
    return torch.cat([torch.tensor(top, dtype=DT), rest])


@pytest.mark.parametrize("kind", ["clustered", "flat", "decaying"])
@pytest.mark.parametrize("max_basis", [None, 14])
def test_selective_float64_against_eigh(kind, max_basis, monkeypatch):
    """Eigenvalues to 1e-8 |λ1|, reported residuals the true ones, orthonormal vectors; fewer subtracted vectors
    than with the full pass, and the same products (within one) and pairs."""
    n, k, tol = 240, 5, 1e-10
    A = sym_with_spectrum(_spectrum(kind, n), seed=3)
    reads = _subtracted_vectors(monkeypatch)
    runs, subtracted = {}, {}
    for selective in (False, True):
        monkeypatch.setattr(lanczos, "_SELECTIVE", selective)
        reads.clear()
        runs[selective] = top_eigenpairs(Counter(A), n, k, tol=tol, max_basis=max_basis)
        subtracted[selective] = sum(reads)
    sel, full = runs[True], runs[False]
    assert sel.converged
    check_pairs(A, sel, k, tol)
    assert _orth_error(sel.basis) <= 1e-12
    if max_basis is not None:
        assert sel.restarts > 0
    assert abs(sel.hvps - full.hvps) <= 1
    torch.testing.assert_close(sel.eigenvalues, full.eigenvalues, rtol=0, atol=1e-12 * float(full.eigenvalues[0]))
    assert subtracted[True] < subtracted[False]


@pytest.mark.parametrize("max_basis", [None, 20])
def test_selective_float32_over_row_chunks(max_basis, monkeypatch):
    """float32, n above one row chunk (the float64-summed inner products): eigenvalues and vectors of a diagonal
    operator to float32 accuracy, orthonormal to float32 rounding, and as with the full pass."""
    n, k, tol = 3 * lanczos._ROW_CHUNK + 123, 6, 1e-4
    g = torch.Generator().manual_seed(2)
    d = torch.rand(n, generator=g, dtype=DT) ** 3
    rows = torch.randperm(n, generator=g)[:10]
    d[rows] = torch.tensor([5.0 * 0.9**i for i in range(10)], dtype=DT) + 1.0
    d32 = d.float()
    ref = torch.sort(d, descending=True).values[:k]
    runs = {}
    for selective in (False, True):
        monkeypatch.setattr(lanczos, "_SELECTIVE", selective)
        runs[selective] = top_eigenpairs(
            lambda x: d32[:, None] * x, n, k, tol=tol, max_basis=max_basis, dtype=torch.float32
        )
    sel, full = runs[True], runs[False]
    assert sel.converged and abs(sel.hvps - full.hvps) <= 1
    torch.testing.assert_close(sel.eigenvalues.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(sel.eigenvalues, full.eigenvalues, rtol=1e-6, atol=0)
    assert _orth_error(sel.basis) <= 2 * max(_orth_error(full.basis), 1e-5)
    U = sel.eigenvectors.double()
    resid = (d[:, None] * U - U * sel.eigenvalues.double()).norm(dim=0)
    assert torch.all(resid <= 2 * tol * float(ref[0])), resid
    # the eigenvectors are the coordinate vectors of the top entries
    top = torch.sort(d, descending=True).indices[:k]
    torch.testing.assert_close(U.abs().amax(dim=0), torch.ones(k, dtype=DT), rtol=0, atol=1e-4)
    assert torch.equal(U.abs().argmax(dim=0), top)


def test_checks_fail_without_any_reorthogonalisation(monkeypatch):
    """The threshold at 1 (eps ** 0: nothing is ever subtracted, plain Lanczos): the checks above fail, which is what
    makes them tests of the selection."""
    n, k, tol = 240, 5, 1e-10
    A = sym_with_spectrum(_spectrum("flat", n), seed=3)
    monkeypatch.setattr(lanczos, "_SEMI_ORTH", 0.0)
    res = top_eigenpairs(Counter(A), n, k, tol=tol, max_basis=14, max_hvps=400)
    with pytest.raises(AssertionError):
        assert res.converged
        check_pairs(A, res, k, tol)
        assert _orth_error(res.basis) <= 1e-12


def test_project_out_selects_the_large_coefficients():
    """Only the basis vectors with a coefficient above ``skip · ‖x‖`` are subtracted (in runs of consecutive
    vectors); their coefficients are returned, the others zero; with none selected ``x`` is untouched."""
    g = torch.Generator().manual_seed(8)
    n, m = 400, 7
    Q, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=DT))
    basis = lanczos._Basis(n, m + 1, DT, torch.device("cpu"))
    basis.blocks[0][:m] = Q.T
    basis.size = m
    far = torch.randn(n, 1, generator=g, dtype=DT)
    far -= Q @ (Q.T @ far)
    far /= far.norm()
    small = torch.tensor([1e-13, 2e-3, 3e-3, 1e-14, 0.0, 4e-3, 1e-13], dtype=DT)
    x0 = far + Q @ small[:, None]
    skip = 1e-9
    x = x0.clone()
    coef = basis.project_out_(x, m, skip=skip)
    chosen = small.abs() > skip * float(x0.norm())
    torch.testing.assert_close(coef[:, 0], torch.where(chosen, small, torch.zeros_like(small)), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(x, x0 - Q[:, chosen] @ small[chosen, None], rtol=0, atol=1e-15)
    assert basis.skips == 0 and basis.last_norms is not None
    # nothing above the threshold: x untouched, zero coefficients, its norms kept
    x = far.clone()
    coef = basis.project_out_(x, m, skip=skip)
    assert torch.equal(x, far) and torch.equal(coef, torch.zeros_like(coef)) and basis.skips == 1
    torch.testing.assert_close(basis.last_norms, far.norm(dim=0), rtol=1e-15, atol=0)
    # the full pass (skip 0): every coefficient
    x = x0.clone()
    coef = basis.project_out_(x, m)
    torch.testing.assert_close(coef[:, 0], small, rtol=1e-10, atol=1e-15)


def test_selected_subtraction_as_one_product_on_gpus(monkeypatch):
    """The GPU form of the subtraction (one product per row block over the span of the selected vectors, the others'
    coefficients zero), run on the CPU: the same vector and coefficients as the runs."""
    g = torch.Generator().manual_seed(12)
    n, m = 3 * lanczos._ROW_CHUNK + 5, 9
    basis = lanczos._Basis(n, m + 1, torch.float32, torch.device("cpu"))
    Q = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=DT))[0]
    basis.set_columns(0, Q.float())
    basis.size = m
    far = torch.randn(n, 1, generator=g, dtype=DT)
    far -= Q @ (Q.T @ far)
    x0 = (far / far.norm() + Q @ torch.tensor([0, 1e-3, 0, 0, 2e-3, 3e-3, 0, 1e-3, 0], dtype=DT)[:, None]).float()
    out = {}
    for devices in (("cuda",), ("cuda", "cpu")):
        monkeypatch.setattr(lanczos, "_BATCHED_INNER_DEVICES", devices)
        x = x0.clone()
        out[devices] = (basis.project_out_(x, m, skip=1e-4), x)
    (c_runs, x_runs), (c_span, x_span) = out.values()
    assert torch.equal(c_runs, c_span) and int((c_span != 0).sum()) == 4
    torch.testing.assert_close(x_span, x_runs, rtol=0, atol=1e-7)
    assert float((Q.T @ x_span.double()).abs().max()) < 1e-6


@pytest.mark.parametrize("gpu_form", [False, True])
def test_selective_gpu_form_solve(gpu_form, monkeypatch):
    """A float32 solve with the GPU forms of the inner products and the subtraction, run on the CPU, against eigh."""
    if gpu_form:
        monkeypatch.setattr(lanczos, "_BATCHED_INNER_DEVICES", ("cuda", "cpu"))
    n, k, tol = 2 * lanczos._ROW_CHUNK + 77, 5, 1e-4
    g = torch.Generator().manual_seed(6)
    d = torch.rand(n, generator=g, dtype=DT) ** 2
    d[torch.randperm(n, generator=g)[:8]] = torch.tensor([3.0 * 0.9**i for i in range(8)], dtype=DT) + 1.0
    runs = {}
    for selective in (False, True):
        monkeypatch.setattr(lanczos, "_SELECTIVE", selective)
        runs[selective] = top_eigenpairs(
            lambda x: d.float()[:, None] * x, n, k, tol=tol, max_basis=16, dtype=torch.float32
        )
    res, full = runs[True], runs[False]
    assert res.converged and res.restarts > 0
    ref = torch.sort(d, descending=True).values[:k]
    torch.testing.assert_close(res.eigenvalues.double(), ref, rtol=1e-5, atol=0)
    # float32 rounding: the full pass's vectors are orthonormal to ~1e-5 here too
    assert _orth_error(res.basis) <= 2 * max(_orth_error(full.basis), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_sharded_matches_one_process(dtype):
    """Three simulated ranks with restarts: every rank takes the same decisions (the selection reads reduced values
    only) and gets the one-process result."""
    n, k = 150, 4
    A = sym_with_spectrum(_spectrum("flat", n), seed=9).to(dtype)
    cuts = [0, 31, 97, n]
    ranges = list(zip(cuts[:-1], cuts[1:], strict=True))
    tol = 1e-10 if dtype == torch.float64 else 1e-4

    def solve(rows=None, reduce_fn=None, gather=None):
        def matvec(x):
            return A @ x if rows is None else A[rows[0] : rows[1]] @ gather(x)

        gen = torch.Generator().manual_seed(4)
        return top_eigenpairs(
            matvec, n, k, tol=tol, dtype=dtype, generator=gen, rows=rows, reduce_fn=reduce_fn, max_basis=12
        )

    ref = solve()
    assert ref.restarts > 0
    whole = solve((0, n), lambda t: None, lambda x: x)
    threads = _Threads(3)
    got = threads.run(lambda r: solve(ranges[r], threads.reduce(r), threads.gather(r)))
    for res in got:
        assert not isinstance(res, Exception), res
        assert torch.equal(res.eigenvalues, got[0].eigenvalues) and res.hvps == got[0].hvps
        assert res.restarts == got[0].restarts
    U = torch.cat([res.eigenvectors for res in got])
    assert got[0].hvps == whole.hvps
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got[0].eigenvalues, whole.eigenvalues, rtol=rtol, atol=0)
    torch.testing.assert_close(got[0].eigenvalues, ref.eigenvalues, rtol=10 * rtol, atol=0)
    assert float((U - ref.eigenvectors).abs().max()) <= (1e-8 if dtype == torch.float64 else 1e-3)
    assert _orth_error(U) <= (1e-12 if dtype == torch.float64 else 1e-5)


def test_threshold_is_between_rounding_and_semi_orthogonality():
    """``eps ** _SEMI_ORTH`` lies below Simon's semi-orthogonality level ``sqrt(eps)`` and above rounding."""
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        assert 2 * eps < eps**lanczos._SEMI_ORTH < math.sqrt(eps)
