r"""Top eigenpairs of a symmetric operator from matrix-vector products: thick-restart Lanczos.

The solver keeps an orthonormal basis :math:`V = [V_d, V_p]` of ``done`` vectors (already multiplied by :math:`H`) and
``pending`` vectors, and the exact block Krylov relation

.. math:: H V_d = V_d T + V_p C, \qquad T = V_d^\top H V_d,\; C = V_p^\top H V_d .

A Ritz pair :math:`(\theta, y = V_d s)` of :math:`T` has the residual :math:`H y - \theta y = V_p C s`, so its norm
:math:`\lVert C s\rVert` is known without extra products. Each step multiplies one pending vector (the direction
that carries most of the unconverged residuals), subtracts the product's known large components (``C``'s row on the
done vectors, and its own Rayleigh quotient: the Lanczos recurrence), orthogonalises the rest against the basis
(selective reorthogonalisation: the inner products with the whole basis, and the subtraction along those basis vectors
only on which the remainder's coefficient exceeds ``eps ** 0.9`` of its norm, see "Work outside the products"; a
second classical Gram-Schmidt pass whenever the first removed more than half of the squared norm, the DGKS criterion
that ARPACK uses; after the recurrence's subtraction that is rare) and appends the remainder as a new pending vector.
With one pending vector this is Lanczos; with ``block_size = b`` each step multiplies the ``b`` pending directions of
the ``b`` leading unconverged residuals (block Lanczos). Eigenvectors are returned with a canonical sign
(largest-magnitude entry positive).

Warm start: one product tests whether the previous subspace :math:`Q` is still (nearly) invariant, with
:math:`v_0 = Q\mathbf 1/\lVert Q\mathbf 1\rVert` and
:math:`\rho = \lVert (I - QQ^\top) H v_0\rVert / \lVert H v_0\rVert`.
If :math:`\rho \le 10\,\mathrm{tol}` the subspace barely moved: the old vectors enter the basis as a block, so a
Rayleigh-Ritz step (one product per vector) plus the few Krylov vectors that the residuals demand confirm it. Otherwise
Lanczos runs from :math:`v_0`, whose first product is the test's: a moved subspace costs about what a cold solve
costs (putting a moved block in the basis was measured to cost up to 1.7x a cold solve: its residual directions must
all be expanded). Measured at the callback's cadence (``tests/benchmarks/refresh_sequence.py``): 0.72 of a cold
solve's products (0.66 of its time) on the quickstart at subspace overlaps 0.95-0.99, 0.99 on the small transformer
at overlaps 0.72-0.90. On spectra this flat the Krylov space must separate the boundary pairs whatever the start
vector, so a warm start saves only the products that bring a random start near the subspace. When the basis is
full, the top Ritz vectors are kept and the rest discarded (thick restart: the relation stays exact).

A pair is converged when :math:`\lVert H y - \theta y\rVert \le \mathrm{tol}\,|\theta|`, relative to its own Ritz
value as in ARPACK (bounded to :math:`[0.01, 1]\cdot\mathrm{tol}\,|\theta_1|`, so that eigenvalues near zero do not
demand residuals at rounding level). To guard against returning the wrong member of a near-degenerate cluster,
``num_extra`` pairs beyond the requested ones are converged too (to ten times their own bound) and not reported. On a
spectrum that flattens below its top few eigenvalues (a BatchNorm CNN's, ``tests/benchmarks/top_set.py``) the former
bound, :math:`\mathrm{tol}\,|\theta_1|` for every pair, let the solver stop before its Krylov space had found every
member of the top ``k``: at D = 10-20, clear members missed at most start seeds and eigenvalues 1.5-25 % off; with
the per-pair bound none is missed and every eigenvalue is within 4e-5 of the truth, at about the products ARPACK's own
per-pair test takes (0.95-1.05 of them, medians over 5 start seeds).

Memory: besides the basis (``max_basis · n`` numbers, on ``basis_device``) the solver holds one chunk of products at a
time (the whole block when ``n`` is small, one vector when ``n > 2**24``) and a few single vectors; it orthogonalises in
place, and rotates and restarts the basis in place chunk by chunk. A warm start is copied into the basis and
orthonormalised there (no other copy of it). Each basis vector is contiguous (see :class:`_Basis`), and the basis is
held in up to 16 row blocks, so the ``n · (k + p)`` Ritz vectors are built while it is released block by block: the
peak is the basis plus a sixteenth of the result (the returned ``eigenvectors`` are a view of ``basis``).

Row-sharded (``rows=(lo, hi)``, ``reduce_fn``): each of several processes holds rows ``lo:hi`` of every vector, so
its basis is ``max_basis · (hi - lo)`` numbers. Every sum over rows (the inner products with the basis, the Gram
matrices of the orthonormalisations, the norms) is the process's share summed over the processes by ``reduce_fn``:
one call per inner-product block, with the norms that the same step needs alongside (about three calls per product
in plain Lanczos), so every process holds the same projected matrices and takes the same decisions. The random start
block is drawn from ``generator`` in chunks of :data:`_RANDOM_CHUNK` numbers, each process keeping the
numbers of its rows: the transient is one chunk (65536 numbers), not a vector of ``n`` (80 GB in float64 at
n = 10^10). Every process draws every chunk (about 25 M numbers/s from a CPU generator, so 400 s per column at
n = 10^10, O(n) time as before), which leaves ``generator`` where the unsharded solver leaves it: the probe's later
draws from it (its Monte Carlo samples) are the unsharded probe's. The union of the processes' start vectors does not
depend on the partition, and with a CPU generator it is the unsharded start, bit for bit.

Work outside the products, per step: one pass over the basis for the inner products (one matrix-vector product per
row block, the remainder's norm alongside), a subtraction along the basis vectors that they select, and a few passes
over the new vector. The inner products of a float32 basis are summed over row chunks in float64 (a single float32
product over millions of rows loses ~1e-4 relative accuracy, which at ``tol = 1e-3`` can stall the solver): on a GPU
as one batched product per row block, on a CPU as a loop over the chunks (a dot per chunk for one vector with one
vector); a float64 basis is summed directly. The vector to multiply is copied into a buffer reused from step to step
(a fresh ``n``-sized tensor per step paid its page faults every time), the canonical signs read each Ritz vector once
(its minimum and maximum), and the Ritz vectors are written block by block into the result (no second copy).

Selective reorthogonalisation: after the local step a remainder's coefficient on a basis vector is subtracted (and
recorded in ``T``) only where it exceeds ``eps ** 0.9`` of the remainder's norm; smaller components stay in the new
vector (not recorded: the Krylov relation stays exact, the basis orthonormal to about that level, which the returned
vectors keep: the tests check float64 results to 1e-12 against ``eigh``). The subtraction is one matrix product per run
of consecutive selected vectors and row block on a CPU, one per row block over the span of the selected vectors on a
GPU. It saves less than a pass: a component left in a vector grows by about ``‖H‖/β`` in the next step (Paige) and is
subtracted then, and in float32 the remainder keeps 1e-4-1e-3 of its norm along the two vectors of the local step, so
some vector is selected at every step. A larger threshold would skip more but perturbs the relation by about the
threshold times ``‖H‖`` when the grown components are subtracted (with ``eps ** 0.85`` a float64 solve reported
residuals 1.6e-12 ``|θ_1|`` off the true ones where ``‖H‖ = 50 |θ_1|``). Measured
(``tests/benchmarks/solver_overhead.py``, n = 1e7 float32, D = 10, 2 shared CPU threads, 30 products, medians of 3):
1.11 GB read from the basis per step against 1.36 GB with the whole subtraction (2.0 passes against 2.4; ``eps ** 0.5``
would read 0.99 GB), 90 ms per step in the passes against 95, 135 ms of own work per step against 142 (10.1 % and 10.6 %
of a step with a 1.2 s product); with restarts (``max_basis = 20``) 1.11 GB against 1.21 and 140 ms against 141. float64
(n = 2e6): 24 basis vectors read per step against 32. On the 10M-parameter transformer
(``tests/benchmarks/memory.py --compare-solver``, cold refresh, 108 products, a full basis of 36 after the first 36; two
runs): the solver's own work 21.0 s against 24.6 s (195 ms per product against 228) with products of 0.68 s, 21 % of the
refresh against 22 %; 17.3 s against 18.1 s (160 ms against 168) with products of 0.49 s, 24 % against 26 % (an earlier
run, with products of 1.08 s and the whole subtraction: 22.9 s, 15.6 %). It stays above 10 % of a refresh on this
machine: one pass over a full basis of 36 float32 vectors of 1e7 reads 1.44 GB, about 100 ms at the 12-16 GB/s these
passes reach here, 8-17 % of a step with a 0.5-1.1 s product, before the subtractions and the first touch of each new
basis vector's pages (18-23 ms per vector of 1e7 float32 with 4 KiB pages; about a quarter with PyTorch's
``THP_MEM_ALLOC_ENABLE=1``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_curvprobe._checks import _check_int, _check_positive_float

MatVec = Callable[[Tensor], Tensor]
Reduce = Callable[[Tensor], "Tensor | None"]

_ROW_CHUNK = 1 << 16
_BLOCK_ELEMENTS = 1 << 24  # a block step multiplies at most max(1, this // n) vectors at a time (its N x b memory)
_BLOCK_WARM_FACTOR = 10.0
_GUARD_FACTOR = 10.0  # guard pairs are converged to this multiple of their bound
_PER_PAIR = True  # residual bounds relative to each pair's |θ_i| (False: to |θ_1| for every pair, as before)
_PAIR_FLOOR = 0.01  # ... but never below this fraction of |θ_1| (eigenvalues near zero)
_BATCHED_INNER = True  # _inner64 on the devices below: one batched product over the row chunks
_BATCHED_INNER_DEVICES = ("cuda",)
_COMBINE_CHUNK = 1 << 18  # entries per chunk when vectors are combined in place (restarts, rotations)
_BASIS_BLOCKS = 16  # the basis is held in up to this many row blocks (see _Basis.ritz_vectors)
# Daniel-Gragg-Kaufman-Stewart (1976): after one Gram-Schmidt pass, x keeps its orthogonality to working precision
# (relative to its norm) when its norm is still at least this fraction of the norm before; otherwise a second pass.
_DGKS = 1 / math.sqrt(2)
_ALWAYS_TWICE = False  # True: the second pass every time (the benchmarks compare both)
# Selective reorthogonalisation: a product's remainder (after the local step) is subtracted only along the basis
# vectors on which its coefficient exceeds eps(dtype) ** _SEMI_ORTH of its norm (none selected: one pass over the basis,
# not two); False: the whole Gram-Schmidt subtraction every step, as before (the benchmarks and tests compare both).
# 0.9, not Simon's 0.5: a component left in a vector grows by about ‖H‖/β per step and is subtracted later, and the
# coefficients recorded then perturb the Krylov relation by about eps ** _SEMI_ORTH · ‖H‖ (with 0.85 the reported
# residuals of a float64 solve were 1.6e-12 |θ_1| off the true ones where ‖H‖ = 50 |θ_1|; the tests allow 1e-12)
_SELECTIVE = True
_SEMI_ORTH = 0.9
_RITZ_EVERY_STEP = False  # True: the Ritz pairs at every step, also where no decision needs them (tests compare)
_RANK_PARTS = 256  # sharded: sub-ranges per round when the processes find their order from their row ranges
_REUSE_INPUT = True  # the product's input block copied into one buffer reused from step to step (benchmarks compare)
_RITZ_IN_PLACE = True  # the Ritz vectors written block by block into the result (benchmarks compare)
_MINMAX_SIGNS = True  # canonical signs from one min/max read of each vector (benchmarks compare)
_DOT_INNER = True  # float32 inner products of one vector with one vector: a dot per row chunk (benchmarks compare)
_RANDOM_CHUNK = 1 << 16  # sharded random start: numbers drawn per call (a multiple of 16, see _random_chunks)


@dataclass
class EigenResult:
    """Output of :func:`top_eigenpairs`.

    Attributes:
        eigenvalues: Ritz values, descending, shape ``(k,)``.
        eigenvectors: orthonormal Ritz vectors, shape ``(N, k)`` (with ``rows=(lo, hi)``: this process's rows,
            ``(hi - lo, k)``).
        residuals: ``‖H u - θ u‖`` for each pair, shape ``(k,)``.
        hvps: operator applications (one per vector).
        converged: whether every returned pair met its residual bound ``tol · |θ_i|`` (and the guard pairs ten times
            theirs).
        restarts: number of thick restarts.
        basis: the returned vectors followed by the converged guard vectors, shape ``(N, k + p)`` (with ``rows``: this
            process's rows); pass it as the next solve's ``warm_start``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    hvps: int
    converged: bool
    restarts: int
    basis: Tensor


def _default_num_extra(k: int, n: int) -> int:
    return max(0, min(max(2, math.ceil(k / 4)), n - k))


class _Basis:
    """Orthonormal basis storage with a fixed capacity (the only O(N) memory of the solver).

    Vector-major: each basis vector's ``n`` numbers are contiguous, so that taking a vector for a product, storing a
    new one and the inner products with the basis (one matrix-vector product with a ``(count, rows)`` matrix) read and
    write only the numbers they need (a row-major ``n x cap`` layout touches a cache line per row to read or write one
    column: measured 2-3 times the memory traffic of the vector-major products at n = 1e7). The ``cap x n`` numbers are
    held in up to :data:`_BASIS_BLOCKS` blocks of whole ``_ROW_CHUNK``-row chunks (``blocks[i][j]`` holds entries
    ``bounds[i]`` of vector ``j``), so that the Ritz vectors can be built while the basis is released block by block
    (:meth:`ritz_vectors`): the solver's peak is the basis plus ``1 / _BASIS_BLOCKS`` of the result, never the basis
    plus the whole result. Vectors ``size:`` are unused (uninitialised; their contents are never read).
    """

    def __init__(
        self, n: int, cap: int, dtype: torch.dtype, device: torch.device, reduce: Reduce | None = None
    ) -> None:
        rows = _ROW_CHUNK * max(1, math.ceil(math.ceil(n / _BASIS_BLOCKS) / _ROW_CHUNK))
        self.n = n
        self.bounds = [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]
        # never read beyond `size`: left uninitialised (a zero fill was a pass over the whole basis, ~1 s at n = 1e7)
        self.blocks = [torch.empty(cap, r1 - r0, dtype=dtype, device=device) for r0, r1 in self.bounds]
        self.size = 0
        # sharded (rows of a distributed space): sums over rows are this process's share, then `reduce`d
        self.reduce = reduce
        self.last_norms: Tensor | None = None  # column norms after project_out_'s last pass, if it took them
        self.skips = 0  # project_out_ calls that subtracted nothing (semi-orthogonal already, see its `skip`)

    def columns(self, lo: int, hi: int, out: Tensor | None = None) -> Tensor:
        """A new ``n x (hi - lo)`` tensor holding vectors ``lo:hi`` (strides ``(1, n)``: each vector contiguous).

        ``out``: a ``(m, n)`` buffer with ``m >= hi - lo`` to fill instead (its rows ``:hi - lo``, returned transposed).
        """
        if out is None:
            return torch.cat([V[lo:hi] for V in self.blocks], dim=1).T
        for (r0, r1), V in zip(self.bounds, self.blocks, strict=True):
            out[: hi - lo, r0:r1] = V[lo:hi]
        return out[: hi - lo].T

    def set_column(self, j: int, x: Tensor, scale: float = 1.0) -> None:
        """Vector ``j`` = ``x / scale`` (``x``: shape ``(n, 1)``)."""
        for (r0, r1), V in zip(self.bounds, self.blocks, strict=True):
            torch.div(x[r0:r1, 0], scale, out=V[j])

    def set_columns(self, j: int, X: Tensor) -> None:
        """Vectors ``j:j + m`` = the columns of ``X`` (shape ``(n, m)``)."""
        for (r0, r1), V in zip(self.bounds, self.blocks, strict=True):
            V[j : j + X.shape[1]] = X[r0:r1].T

    def inner(self, lo: int, hi: int, X: Tensor) -> Tensor:
        """``V[:, lo:hi].T @ X`` (``X``: ``(n, m)``); float32 sums over row chunks in float64 (:func:`_inner64`).

        Sharded: the shares of every process summed by one reduction (float64 before the final rounding).
        """
        if self.reduce is not None:
            return _reduced(self.reduce, self._share(lo, hi, X)).to(X.dtype)
        if len(self.blocks) == 1 and (self.n <= _ROW_CHUNK or X.dtype == torch.float64):
            return self.blocks[0][lo:hi] @ X
        out = torch.zeros(hi - lo, X.shape[1], dtype=torch.float64, device=X.device)
        for (r0, r1), V in zip(self.bounds, self.blocks, strict=True):
            out += _inner64(V[lo:hi].T, X[r0:r1])
        return out.to(X.dtype)

    def _share(self, lo: int, hi: int, X: Tensor) -> Tensor:
        """This process's rows' share of ``V[:, lo:hi].T @ X``, summed in float64."""
        out = torch.zeros(hi - lo, X.shape[1], dtype=torch.float64, device=X.device)
        for (r0, r1), V in zip(self.bounds, self.blocks, strict=True):
            out += _inner64(V[lo:hi].T, X[r0:r1])
        return out

    def norms(self, X: Tensor) -> Tensor:
        """The norms of ``X``'s columns (sharded: in float64, from one reduction of the squared norms' shares)."""
        if self.reduce is None:
            return X.norm(dim=0)
        return _reduced(self.reduce, _sqnorms64(X)).sqrt()

    def norm(self, x: Tensor) -> float:
        """The norm of a single vector ``x`` (shape ``(n, 1)``)."""
        if self.reduce is None:
            return float(x.norm())
        return float(self.norms(x).norm())

    def inner_norms(self, lo: int, hi: int, X: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`inner` and :meth:`norms` of ``X`` together (sharded: one reduction for both)."""
        if self.reduce is None:
            return self.inner(lo, hi, X), X.norm(dim=0)
        both = _reduced(self.reduce, torch.cat([self._share(lo, hi, X), _sqnorms64(X)[None]]))
        return both[:-1].to(X.dtype), both[-1].sqrt()

    def sub_(self, lo: int, hi: int, X: Tensor, coef: Tensor) -> None:
        """``X -= V[:, lo:hi] @ coef`` in place."""
        for (r0, r1), V in zip(self.bounds, self.blocks, strict=True):
            X[r0:r1].addmm_(V[lo:hi].T, coef, alpha=-1)

    def project_out_(self, X: Tensor, count: int, norms: Tensor | None = None, skip: float = 0.0) -> Tensor:
        """Classical Gram-Schmidt of ``X`` against vectors ``:count``, in place; returns the coefficients.

        ``norms``: the norms of ``X``'s columns, when the caller has them already. ``skip > 0``: selective
        reorthogonalisation (:meth:`_Lanczos._orthogonalise`): only the basis vectors on which some column's coefficient
        exceeds ``skip`` times that column's norm are subtracted (see :meth:`_sub_selected_`), and only their
        coefficients are returned (the others zero: ``X`` keeps those components). The choice reads reduced values
        only, so every process of a sharded solve makes the same.

        A second pass runs unless every column kept at least :data:`_DGKS` of its norm in the first (then the rounding
        error of the first pass, about ``eps`` times the norm before, is already ``eps``-small relative to what is
        left). Measured in ``tests/benchmarks/reorthogonalisation.py``: 8-43 % of the second passes skipped, the same
        products (to one in float32, where rounding can move a convergence test by a step) and residuals, and
        orthogonality still at float32 rounding.
        """
        self.last_norms = None
        if _ALWAYS_TWICE:
            before, coef = None, self.inner(0, count, X)
        elif norms is None:
            coef, before = self.inner_norms(0, count, X)
        else:
            before, coef = norms, self.inner(0, count, X)
        if skip > 0 and before is not None:
            coef, subtracted = self._sub_selected_(X, coef, skip * before.to(coef.dtype))
            if not subtracted:  # X untouched: its norms are those before
                self.last_norms = before
                return coef
        else:
            self.sub_(0, count, X, coef)
        if before is not None:
            after = self.norms(X)
            if bool((after >= _DGKS * before).all()):
                self.last_norms = after
                return coef
        coef2 = self.inner(0, count, X)
        self.sub_(0, count, X, coef2)
        return coef + coef2

    def _sub_selected_(self, X: Tensor, coef: Tensor, limit: Tensor) -> tuple[Tensor, bool]:
        """``X -= V[:, rows] @ coef[rows]`` for the basis vectors ``rows`` with a coefficient above ``limit``.

        ``limit``: one threshold per column of ``X``; a vector is selected when any column's coefficient exceeds it.

        Runs of consecutive vectors are subtracted together (one matrix product per run and row block: no gathered
        copy). On the devices of :data:`_BATCHED_INNER_DEVICES` (GPUs, where each product is a kernel launch) one
        product per row block instead, over the span from the first selected vector to the last, with the coefficients
        of the others zeroed. Returns ``coef`` with the other rows zeroed, and whether any row was selected (if not,
        ``X`` is untouched: the step skipped the subtraction pass).
        """
        rows = (coef.abs() > limit).any(dim=1)
        idx = rows.nonzero()[:, 0].tolist()
        if not idx:
            self.skips += 1
            return torch.zeros_like(coef), False
        kept = coef * rows[:, None].to(coef.dtype)
        if _BATCHED_INNER and X.device.type in _BATCHED_INNER_DEVICES:
            self.sub_(idx[0], idx[-1] + 1, X, kept[idx[0] : idx[-1] + 1])
            return kept, True
        start = prev = idx[0]
        for i in idx[1:] + [-1]:
            if i != prev + 1:
                self.sub_(start, prev + 1, X, coef[start : prev + 1])
                start = i
            prev = i
        return kept, True

    def matmul_(self, lo: int, hi: int, Z: Tensor) -> None:
        """``V[:, lo:lo + m] = V[:, lo:hi] @ Z`` in place (``Z``: ``(hi - lo, m)``), see :func:`_combine_`."""
        for V in self.blocks:
            _combine_(V, lo, hi, Z)

    def restart_(self, nd: int, npend: int, Sk: Tensor) -> None:
        """Thick restart in place: vectors ``:keep`` = ``V[:, :nd] @ Sk``, the ``npend`` pending vectors move left."""
        keep = Sk.shape[1]
        for V in self.blocks:
            _combine_(V, 0, nd, Sk)
            V[keep : keep + npend] = V[nd : nd + npend].clone()
        self.size = keep + npend

    def ritz_vectors(self, nd: int, coeffs: Tensor) -> Tensor:
        """``V[:, :nd] @ coeffs`` stored column by column (shape ``(n, m)``, strides ``(1, n)``), releasing the basis.

        Each block's share of the result is computed and the block freed before the next one is read. The result is
        allocated first and each share written into its columns (its pages are touched, hence resident, only then):
        peak the basis plus one share. (Formerly each share was a tensor of its own, copied into the result at the end:
        twice the result at the end, and every page of the result faulted twice; measured 1.4 s against 0.7 s at
        n = 1e7, 30 basis vectors, k + p = 13, float32.)
        """
        if _RITZ_IN_PLACE and len(self.blocks) > 1:
            out = self.blocks[0].new_empty(coeffs.shape[1], self.n)
            for i, ((r0, r1), V) in enumerate(zip(self.bounds, self.blocks, strict=True)):
                torch.mm(coeffs.T, V[:nd], out=out[:, r0:r1])
                self.blocks[i] = V.new_empty(0, 0)
                del V
            self.blocks = []
            return out.T
        shares = []
        for i, V in enumerate(self.blocks):
            shares.append(coeffs.T @ V[:nd])
            self.blocks[i] = V.new_empty(0, 0)
            del V
        self.blocks = []
        if len(shares) == 1:
            return shares[0].T
        out = shares[0].new_empty(coeffs.shape[1], self.n)
        for i, (r0, r1) in enumerate(self.bounds):
            out[:, r0:r1] = shares[i]
            shares[i] = shares[i].new_empty(0, 0)
        return out.T


def _reduced(reduce: Reduce, t: Tensor) -> Tensor:
    """``t`` summed over the processes by ``reduce`` (in place, or returning the sum)."""
    t = t.contiguous()
    out = reduce(t)
    return t if out is None else out


def _sqnorms64(X: Tensor) -> Tensor:
    """The squared norms of ``X``'s columns, summed in float64 over row chunks (this process's share when sharded)."""
    out = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    for r0 in range(0, X.shape[0], _ROW_CHUNK):
        c = X[r0 : r0 + _ROW_CHUNK].to(torch.float64)
        out += (c * c).sum(dim=0)
    return out


def _random_chunks(total: int, generator: torch.Generator) -> Iterator[tuple[int, Tensor]]:
    """``torch.randn(total, dtype=float64, generator=generator)`` in pieces: ``(offset, piece)`` pairs, in order.

    Pieces of :data:`_RANDOM_CHUNK` numbers, the last one at least 16 long (a short remainder joins the piece before
    it), so at most ``_RANDOM_CHUNK + 15`` numbers at a time. ``generator`` advances as under the single draw. For a
    CPU generator the pieces are also, bit for bit, the single draw's values (PyTorch fills a normal tensor of 16 or
    more numbers in blocks of 16, redrawing the last 16 when the size is not a multiple of 16: pieces of a multiple of
    16, the last one at least 16 long, draw the same numbers in the same order; checked by the tests).
    """
    pos = 0
    while pos < total:
        m = min(_RANDOM_CHUNK, total - pos)
        if total - pos - m < 16:
            m = total - pos
        yield pos, torch.randn(m, generator=generator, dtype=torch.float64, device=generator.device)
        pos += m


def _shard_layout(lo: int, hi: int, n: int, reduce: Reduce, device: torch.device) -> tuple[int, int]:
    """This process's place among the processes sharing the rows of ``range(n)`` and their number: ``(slot, world)``.

    Collective. The processes are ordered by their first row ``lo`` (their rank order, as their ranges partition
    ``range(n)`` in rank order), found with sum reductions only: each round counts the processes' ``lo`` in up to
    :data:`_RANK_PARTS` sub-ranges of every range still holding two or more of them (a few rounds of small tensors).
    The ranges are then checked to partition ``range(n)`` (ValueError on every process otherwise).
    """

    def summed(values: list[float]) -> list[float]:
        return _reduced(reduce, torch.tensor(values, dtype=torch.float64, device=device)).tolist()

    world = int(summed([1.0])[0])
    slot = 0
    pending = [(0, n, 0)]  # (start, width, processes with lo below start): ranges holding two or more lo
    while pending:
        layout = []  # (start, end, step, parts, below) per pending range
        for start, width, below in pending:
            step = -(-width // min(_RANK_PARTS, width))
            layout.append((start, start + width, step, -(-width // step), below))
        counts = [0.0] * sum(parts for _, _, _, parts, _ in layout)
        offset = 0
        for start, end, step, parts, _ in layout:
            if start <= lo < end:
                counts[offset + (lo - start) // step] = 1.0
            offset += parts
        counts = summed(counts)
        pending, offset = [], 0
        for start, end, step, parts, below in layout:
            for i in range(parts):
                c, s0 = int(counts[offset + i]), start + i * step
                width = min(step, end - s0)
                if c == 1 and s0 <= lo < s0 + width:
                    slot = below
                elif c > 1:
                    if width == 1:
                        raise ValueError(f"`rows` of two processes start at the same row {s0}.")
                    pending.append((s0, width, below))
                below += c
            offset += parts
    bounds = [0.0] * (2 * world)
    bounds[2 * slot : 2 * slot + 2] = [float(lo), float(hi)]
    b = [int(v) for v in summed(bounds)]
    if b[0] != 0 or b[-1] != n or any(b[2 * i + 1] != b[2 * i + 2] for i in range(world - 1)):
        ranges = [(b[2 * i], b[2 * i + 1]) for i in range(world)]
        raise ValueError(f"`rows` of the processes must partition range({n}) in rank order, got {ranges}.")
    return slot, world


def _inner(A: Tensor, X: Tensor) -> Tensor:
    """``A.T @ X`` summed over row chunks of ``_ROW_CHUNK`` in float64.

    One float32 matrix-vector product over millions of rows accumulates its rounding errors: measured ~1e-4 relative
    at n = 1e7 (against ~5e-7 chunked), enough to spoil the Krylov relation at ``tol = 1e-3``. Within one chunk this is
    the plain product, so small problems get exactly what ``A.T @ X`` gives.
    """
    if A.shape[0] <= _ROW_CHUNK:
        return A.T @ X
    return _inner64(A, X).to(A.dtype)


def _inner64(A: Tensor, X: Tensor) -> Tensor:
    """:func:`_inner` before its final rounding: the row chunks' partial products summed in float64.

    On the devices in :data:`_BATCHED_INNER_DEVICES` (GPUs) this is one batched product (:func:`_inner_batched`),
    elsewhere a loop over the chunks (on a CPU the loop's matrix-vector products read the basis at full speed).
    """
    n = A.shape[0]
    if n <= _ROW_CHUNK or A.dtype == torch.float64:  # float64 sums need no chunking
        return (A.T @ X).to(torch.float64)
    if _BATCHED_INNER and A.device.type in _BATCHED_INNER_DEVICES:
        return _inner_batched(A, X)
    if _DOT_INNER and A.shape[1] == 1 and X.shape[1] == 1:
        # one vector with one vector: a dot per chunk (a 1 x c times c x 1 matrix product per chunk ran at half the
        # speed: 20 ms against 11 ms at n = 1e7), the partial sums added in float64
        a, x = A[:, 0], X[:, 0]
        parts = torch.empty(-(-n // _ROW_CHUNK), dtype=A.dtype, device=A.device)
        for i, r0 in enumerate(range(0, n, _ROW_CHUNK)):
            torch.dot(a[r0 : r0 + _ROW_CHUNK], x[r0 : r0 + _ROW_CHUNK], out=parts[i])
        return parts.to(torch.float64).sum().reshape(1, 1)
    out = torch.zeros(A.shape[1], X.shape[1], dtype=torch.float64, device=A.device)
    for r0 in range(0, n, _ROW_CHUNK):
        out += (A[r0 : r0 + _ROW_CHUNK].T @ X[r0 : r0 + _ROW_CHUNK]).to(torch.float64)
    return out


def _inner_batched(A: Tensor, X: Tensor) -> Tensor:
    """:func:`_inner64` as one batched product over the row chunks (one kernel launch instead of one per chunk).

    The chunks are strided views of ``A`` (no copy): ``(q, R, c)`` transposed to ``(q, c, R)`` is a batch of
    matrices. Each chunk's partial product is the same as in the loop; the ``q`` partial sums are then added in
    float64. Used on GPUs, where a basis of 10^8 rows would otherwise cost ~1500 launches per inner product.
    """
    n = A.shape[0]
    full = n - n % _ROW_CHUNK
    q = full // _ROW_CHUNK
    parts = torch.bmm(A[:full].unflatten(0, (q, _ROW_CHUNK)).transpose(1, 2), X[:full].unflatten(0, (q, _ROW_CHUNK)))
    out = parts.to(torch.float64).sum(dim=0)
    if full < n:
        out += (A[full:].T @ X[full:]).to(torch.float64)
    return out


def _orthonormal_columns(W: Tensor, dtype: torch.dtype, reduce: Reduce | None = None) -> Tensor:
    """An orthonormal basis of the span of ``W`` (``n x w``), as a new ``n x r`` tensor on ``W``'s device (``r <= w``).

    See :func:`_orthonormalise_`, which this runs on a copy of ``W`` (sharded: this process's rows of it).
    """
    Q = W.T.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)  # (w, n): each vector contiguous
    r = _orthonormalise_([Q], Q.shape[0], reduce)
    return Q.T if r == Q.shape[0] else Q[:r].clone().T


def _orthonormalise_(blocks: list[Tensor], w: int, reduce: Reduce | None = None) -> int:
    """Orthonormalise the first ``w`` vectors of a basis stored as :class:`_Basis` blocks, in place; returns the rank.

    ``blocks[i][j]`` holds entries ``bounds[i]`` of vector ``j``. On return vectors ``:r`` are an orthonormal basis of
    the span of the original ``w`` vectors and vectors ``r:w`` are zero. Cholesky QR twice: the ``w x w`` Gram matrix
    is summed in float64 over row chunks (:func:`_inner64`) and factored, and ``W R^{-1}`` is applied in place, chunk
    by chunk. For a full-rank ``W`` the vectors are those of Gram-Schmidt on ``W``, up to rounding (positive diagonal
    of ``R``). When ``W`` is ill-conditioned (smallest Cholesky pivot² below ``sqrt(eps(dtype))`` of the largest Gram
    entry: condition number above ~54 in float32, ~8000 in float64, where the float32 chunk sums of the Gram matrix
    could no longer be trusted to give an orthonormal result), the first pass is an eigenvalue-based whitening instead
    that drops the directions with Gram eigenvalues below ``sqrt(eps)`` of the largest; a rank-deficient or zero ``W``
    thus gives fewer (or no) vectors. (The solver re-orthogonalises every vector it takes into its basis anyway: this
    only has to be good enough for the warm-start test.) Unlike LAPACK's Householder QR this works for any ``n · w``
    (LAPACK's 32-bit workspace sizes fail beyond ~2^31 elements: measured on a 98.4M x 57 float32 basis), reads ``W``
    in one pass per factorisation and needs no memory beyond one chunk of products. Sharded (``reduce`` given, the
    blocks holding this process's rows), each Gram matrix is this process's share summed over the processes by one
    reduction, so that every process takes the same decisions.
    """
    if w == 0 or not blocks:
        return 0
    dtype = blocks[0].dtype
    eps = torch.finfo(dtype).eps
    r = w
    for sweep in range(2):
        G = _inner64(blocks[0][:r].T, blocks[0][:r].T)
        for V in blocks[1:]:
            G += _inner64(V[:r].T, V[:r].T)
        if reduce is not None:
            G = _reduced(reduce, G)
        G = 0.5 * (G + G.T)
        L, info = torch.linalg.cholesky_ex(G)
        top = float(G.diagonal().max())
        if top <= 0 or not math.isfinite(top):
            for V in blocks:
                V[:w] = 0
            return 0
        lo = float(L.diagonal().min()) ** 2 if int(info) == 0 else 0.0
        if sweep == 0 and lo <= math.sqrt(eps) * top:
            # (nearly) dependent vectors: keep the well-determined directions of the span, then re-orthonormalise
            evals, evecs = torch.linalg.eigh(G)
            keep = evals > math.sqrt(eps) * float(evals[-1])
            Z = (evecs[:, keep] / evals[keep].sqrt()).flip(1)
            for V in blocks:
                _combine_(V, 0, r, Z.to(dtype), zero_rest=True)
            r = Z.shape[1]
            continue
        Rinv = torch.linalg.solve_triangular(L.T, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=True)
        for V in blocks:
            _combine_(V, 0, r, Rinv.to(dtype))
    return r


def _combine_(V: Tensor, lo: int, hi: int, Z: Tensor, zero_rest: bool = False) -> None:
    """``V[lo:lo + m] = Z.T @ V[lo:hi]`` in place (vectors are rows of ``V``), chunk by chunk of entries.

    No ``(hi - lo) x n`` temporary: one chunk of :data:`_COMBINE_CHUNK` entries of the ``m`` new vectors at a time.
    ``Z`` has shape ``(hi - lo, m)`` with ``m <= hi - lo``; with ``zero_rest`` vectors ``lo + m:hi`` are zeroed.
    """
    m = Z.shape[1]
    Zt = Z.T.contiguous()
    for c0 in range(0, V.shape[1], _COMBINE_CHUNK):
        cols = V[:, c0 : c0 + _COMBINE_CHUNK]
        cols[lo : lo + m] = Zt @ cols[lo:hi]
    if zero_rest and m < hi - lo:
        V[lo + m : hi] = 0


def _block_chunk(n: int) -> int:
    """Vectors multiplied at once within a block step: a whole block for small ``n``, one at a time for large."""
    return max(1, _BLOCK_ELEMENTS // n)


def top_eigenpairs(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    tol: float = 1e-3,
    max_basis: int | None = None,
    num_extra: int | None = None,
    warm_start: Tensor | None = None,
    block_size: int = 1,
    max_hvps: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    basis_device: torch.device | str | None = None,
    rows: tuple[int, int] | None = None,
    reduce_fn: Reduce | None = None,
) -> EigenResult:
    r"""The ``k`` algebraically largest eigenpairs of a symmetric operator, from products only.

    Args:
        matvec: applies the operator to a block of shape ``(n, b)`` and returns ``(n, b)`` (with ``rows``: this
            process's rows of the block, shape ``(hi - lo, b)``, and of the product; gathering is the caller's).
        n: dimension of the operator (with ``rows``: still the global dimension).
        k: number of eigenpairs returned.
        tol: a pair is converged when ``‖H u - θ u‖ ≤ tol · |θ|`` (its own Ritz value; at most ``tol · |θ_1|``, at
            least ``0.01 tol · |θ_1|``).
        max_basis: most basis vectors held at once (memory is ``max_basis · n`` numbers plus a few vectors, see
            above); default ``2 (k + p) + 10 block_size`` (more when a warm start is wider), at most ``n``.
        num_extra: guard pairs ``p`` converged beyond ``k`` and not reported; default ``max(2, ⌈k/4⌉)``.
        warm_start: previous eigenvectors, shape ``(n, w)``; they enter the basis as a block. They may live on another
            device than the basis (e.g. in CPU memory while the basis is on the GPU): they are copied into the basis
            one row block at a time and orthonormalised there, so they cost no memory beyond the basis.
        block_size: vectors multiplied per step (block Lanczos): the random start vectors of a cold start, and the
            width of a moved warm start's Krylov block. ``1`` (default) is plain Lanczos, the fewest products; a
            larger block needs more products in all (and a larger default basis) but fewer sequential calls, which
            pays only when one batched product of ``b`` vectors costs much less than ``b`` single ones. Measured at
            the callback's cadence (``tests/benchmarks/refresh_sequence.py``, 12 warm refreshes one epoch apart,
            D = 10, tol 1e-3, 2 CPU threads): on the quickstart's 5k-parameter MLP ``b = 4`` and ``b = 13`` take 0.94
            and 0.85 of the time of ``b = 1`` for 1.6 and 2.3 times the products; on the 106k-parameter transformer,
            where a batched product costs about ``b`` single ones, ``b = 13`` takes 1.7 times as long, so the default
            stays 1.
        max_hvps: stop (``converged=False``) after this many products; default ``max(500, 60 (k + p))``.
        generator: source of the random start vectors (the global RNG is never used); default a generator seeded 0.
        dtype: dtype of the basis.
        device: device of the operator: ``matvec`` receives its blocks there; default that of ``warm_start`` or CPU.
        basis_device: device of the Krylov basis (the ``max_basis · n`` numbers), of the small projected matrices and
            of the returned vectors; default ``device``. With a model on a GPU, ``basis_device="cpu"`` keeps the basis
            in CPU memory: each product then moves one block (``n · b`` numbers) to ``device`` and its result back, so
            the GPU holds the model, its gradient graph and one block in and out, never the basis.
        rows: ``(lo, hi)`` with ``0 <= lo < hi <= n``: this process holds rows ``lo:hi`` of every vector (the basis
            sharded by rows over processes whose ranges partition ``range(n)`` in rank order, possibly unevenly).
            ``matvec`` then gets and returns local rows, ``warm_start`` is given as local rows ``(hi - lo, w)``, and the
            returned ``eigenvectors`` and ``basis`` are local rows. Every process must call collectively, with the same
            arguments (bar ``rows``, ``warm_start`` and ``matvec``) and the same ``generator`` state. The memory per
            process is ``max_basis · (hi - lo)`` numbers (the basis) plus a few vectors of ``hi - lo``; the random
            start block's ``n · b`` numbers are drawn from ``generator`` in chunks of 65536 (each process draws them
            all and keeps its rows': a transient of one chunk, never a vector of ``n``), so the union of the
            processes' start vectors does not depend on the partition, ``generator`` ends where the unsharded solver
            leaves it, and with a CPU generator the start is the unsharded one, bit for bit.
        reduce_fn: required with ``rows``: sums a tensor over the processes, in place (returning None) or returning the
            sum, e.g. ``torch.distributed.all_reduce``; every process must obtain the same values. It gets small
            contiguous float64 tensors on ``basis_device`` (a backend that cannot reduce there, e.g. NCCL with the
            basis in CPU memory, needs a ``reduce_fn`` that moves them). Every sum over rows
            (inner products, Gram matrices, norms) is this process's share summed by ``reduce_fn``, so every process
            takes the same decisions (convergence, restarts, breakdowns, block sizes) and gets the same eigenvalues;
            the shares of one Gram matrix (with the norms it can carry) go in one call. A few calls of small tensors at
            the start find the processes' order (for the sign rule) and check that the ranges partition ``range(n)``.

    Returns:
        An :class:`EigenResult` with eigenvalues in descending order.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
        >>> res = top_eigenpairs(lambda v: A @ v, 50, 3, tol=1e-10)
        >>> res.eigenvalues.round(decimals=8), res.converged
        (tensor([50., 49., 48.], dtype=torch.float64), True)

        Sharded over the processes of a ``torch.distributed`` group (``rank`` holds rows ``lo:hi`` of ``A``'s)::

            def matvec(x):  # local rows in, local rows out
                parts = [x.new_empty(h - l, x.shape[1]) for l, h in ranges]
                torch.distributed.all_gather(parts, x.contiguous())
                return A[lo:hi] @ torch.cat(parts)

            res = top_eigenpairs(matvec, n, 3, rows=(lo, hi), reduce_fn=torch.distributed.all_reduce)
            # res.eigenvalues: the same on every process; res.eigenvectors: rows lo:hi
    """
    _check_int("n", n, minimum=1)
    _check_int("k", k, minimum=1, maximum=n)
    tol = _check_positive_float("tol", tol)
    _check_int("block_size", block_size, minimum=1)
    rows = _check_rows(rows, reduce_fn, n)
    local = n if rows is None else rows[1] - rows[0]
    p = _default_num_extra(k, n) if num_extra is None else _check_int("num_extra", num_extra, minimum=0)
    p = min(p, n - k)
    kt = k + p
    if device is None:
        device = warm_start.device if warm_start is not None else torch.device("cpu")
    op_device = torch.device(device)
    device = op_device if basis_device is None else torch.device(basis_device)  # from here on: the basis' device
    if warm_start is not None:
        if warm_start.dim() == 1:
            warm_start = warm_start[:, None]
        if warm_start.dim() != 2 or warm_start.shape[0] != local:
            where = "" if rows is None else f" (this process's rows {rows[0]}:{rows[1]})"
            raise ValueError(f"`warm_start` must have shape ({local}, w){where}, got {tuple(warm_start.shape)}.")
    width = min(warm_start.shape[1] if warm_start is not None else block_size, n)
    cap = _basis_capacity(n, kt, width, block_size, max_basis)
    solver = _Lanczos(
        matvec,
        n,
        k,
        kt,
        tol=tol,
        cap=cap,
        block_size=block_size,
        max_hvps=max(500, 60 * kt) if max_hvps is None else max_hvps,
        generator=torch.Generator().manual_seed(0) if generator is None else generator,
        dtype=dtype,
        op_device=op_device,
        device=device,
        rows=rows,
        reduce=reduce_fn,
    )
    solver.start(warm_start, width)
    return solver.run()


def _check_rows(rows: tuple[int, int] | None, reduce_fn: Reduce | None, n: int) -> tuple[int, int] | None:
    """``rows`` as ``(lo, hi)`` with ``0 <= lo < hi <= n``, and ``reduce_fn`` given exactly when ``rows`` is."""
    if rows is None:
        if reduce_fn is not None:
            raise ValueError(
                "`reduce_fn` is only allowed together with `rows` (this process's row range (lo, hi)), got "
                f"reduce_fn={reduce_fn!r} and rows=None."
            )
        return None
    try:
        lo, hi = rows
        lo, hi = (0, 0) if isinstance(lo, bool) or isinstance(hi, bool) else (operator.index(lo), operator.index(hi))
    except (TypeError, ValueError):  # not a pair of integers
        lo = hi = 0
    if not isinstance(rows, (tuple, list)) or not 0 <= lo < hi <= n:
        raise ValueError(f"`rows` must be a pair of ints (lo, hi) with 0 <= lo < hi <= n = {n}, got {rows!r}.")
    if reduce_fn is None or not callable(reduce_fn):
        raise ValueError(
            "`reduce_fn` is required with `rows`: a callable summing a tensor over the processes (e.g. "
            f"torch.distributed.all_reduce), got {reduce_fn!r}."
        )
    return lo, hi


def _basis_capacity(n: int, kt: int, width: int, block_size: int, max_basis: int | None) -> int:
    """The basis' capacity: ``max_basis`` (checked against the least the solver needs) or the default."""
    if max_basis is None:
        return min(n, max(2 * kt, kt + width) + 10 * block_size)
    cap = _check_int("max_basis", max_basis, minimum=1)
    min_cap = min(n, kt + width + 1)
    if cap < min_cap:
        raise ValueError(
            f"`max_basis` must be at least k + num_extra + (start block width) + 1 = {min_cap}, got {max_basis}."
        )
    return min(cap, n)


class _Lanczos:
    """One solve of :func:`top_eigenpairs`, with one method per step.

    It holds the basis, the projected matrices ``T`` and ``C``, the Ritz pairs and the counters; the steps are the
    start block, the Krylov extension, the reorthogonalisation, Rayleigh-Ritz, the convergence check and the restart.

    Basis columns ``:nd`` are done (multiplied: ``H V_d = V_d T + V_p C``), columns ``nd:nd + npend`` pending.
    """

    def __init__(
        self,
        matvec: MatVec,
        n: int,
        k: int,
        kt: int,
        *,
        tol: float,
        cap: int,
        block_size: int,
        max_hvps: int,
        generator: torch.Generator,
        dtype: torch.dtype,
        op_device: torch.device,
        device: torch.device,
        rows: tuple[int, int] | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        self.matvec, self.n, self.k, self.kt, self.tol = matvec, n, k, kt, tol
        self.cap, self.block_size, self.max_hvps, self.generator = cap, block_size, max_hvps, generator
        self.dtype, self.op_device, self.device = dtype, op_device, device
        self.small = torch.float64  # projected matrices are tiny: keep them in float64
        self.eps = torch.finfo(dtype).eps
        # sharded: this process's rows lo:hi of every vector (n stays the global dimension); its place among the
        # processes (for the sign rule) is found, and the ranges checked, with a few collective reductions
        self.rows, self.reduce = rows, reduce
        self.local = n if rows is None else rows[1] - rows[0]
        self.shard = None if rows is None or reduce is None else (reduce, *_shard_layout(*rows, n, reduce, device))
        self.basis = _Basis(self.local, cap, dtype, device, reduce)
        self.hvps = self.restarts = self.nd = self.npend = 0
        self.T = self._zeros(0, 0)
        self.C = self._zeros(0, 0)  # pending x done
        self.cached: tuple[Tensor, Tensor] | None = None  # a product already paid for: (vector, H vector)
        self.input_buffer: Tensor | None = None  # the vectors to multiply, reused (see _input_buffer)
        # the k returned pairs meet their bound; the p guard pairs _GUARD_FACTOR times theirs (they exist to reveal a
        # missed member of a cluster, which a looser residual still does: a Ritz value is within its residual of an
        # eigenvalue)
        self.pair_tol = torch.ones(kt, dtype=self.small, device=device)
        self.pair_tol[k:] = _GUARD_FACTOR
        self.theta = self._zeros(0)
        self.S = self._zeros(0, 0)
        self.res = self._zeros(0)
        self.scale = 1.0
        self.converged = False

    def _zeros(self, *shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=self.small, device=self.device)

    # ------------------------------------------------------------------------------------------------ products

    def _apply(self, x: Tensor, owned: bool = False) -> Tensor:
        """``matvec`` of a block of vectors, the product on the basis' device.

        The block reaches ``matvec`` as a tensor of its own (copied unless ``owned``), so the product may be worked on
        in place.
        """
        x = x.to(device=self.op_device, copy=not owned)
        return self.matvec(x).reshape(self.local, x.shape[1]).to(device=self.device, dtype=self.dtype)

    def _input_buffer(self, m: int) -> Tensor | None:
        """A ``(m', n)`` buffer (``m' >= m``) for the vectors to multiply, reused from step to step (None: allocate).

        A fresh ``n``-sized tensor per product costs its page faults at first touch: measured 30 ms against 14 ms for
        the copy itself at n = 1e7 float32 on a CPU, a tenth of the solver's own work per step. Used only when the
        operator runs on the basis' device (otherwise the block is copied to the operator's device anyway); it holds
        one chunk of vectors (:func:`_block_chunk`: one vector for ``n > 2**24``), the memory of the fresh tensor it
        replaces, and is released before the Ritz vectors are built. The previous product (which ``matvec`` may have
        computed in place, in it) is consumed before the next is taken.
        """
        if not _REUSE_INPUT or self.op_device != self.device:
            return None
        if self.input_buffer is None or self.input_buffer.shape[0] < m:
            self.input_buffer = torch.empty(m, self.local, dtype=self.dtype, device=self.device)
        return self.input_buffer

    def _random_block(self, b: int) -> Tensor:
        g = self.generator
        if self.rows is None:
            x = torch.randn(self.n, b, generator=g, dtype=torch.float64, device=g.device)
            return x.to(device=self.device, dtype=self.dtype)
        # sharded: the (n, b) block's n · b numbers (row-major) drawn from the generator chunk by chunk, each process
        # keeping those of its rows (a transient of one chunk, never n; see _random_chunks)
        lo, hi = self.rows
        b_lo, b_hi = lo * b, hi * b
        out = torch.empty((hi - lo) * b, dtype=self.dtype, device=self.device)
        for f0, x in _random_chunks(self.n * b, g):
            f1 = f0 + x.shape[0]
            if f1 > b_lo and f0 < b_hi:
                r0, r1 = max(f0, b_lo), min(f1, b_hi)
                out[r0 - b_lo : r1 - b_lo] = x[r0 - f0 : r1 - f0]
        return out.view(hi - lo, b)

    def _admit(self, column: Callable[[int], Tensor], count: int) -> int:
        """Orthonormalise ``count`` columns against the basis and append them as pending; returns how many were kept.

        ``column(i)`` gives the i-th as a new ``(n, 1)`` tensor on the basis' device; it may read basis column ``i``
        (the warm start, already in the basis), which is never overwritten before it is read (``size <= i``).
        """
        basis, added = self.basis, 0
        for i in range(count):
            x = column(i)
            norms = basis.norms(x)
            basis.project_out_(x, basis.size, norms)
            norm0 = float(norms[0])
            norm = float(basis.last_norms[0]) if basis.last_norms is not None else None
            norm = basis.norm(x) if norm is None else norm
            if norm0 == 0 or norm <= 1e3 * self.eps * norm0 or basis.size >= self.cap:
                continue
            basis.set_column(basis.size, x / norm)
            basis.size += 1
            added += 1
        return added

    def _append_pending(self, block: Tensor) -> int:
        dev, dt = self.device, self.dtype
        return self._admit(lambda i: block[:, i : i + 1].to(device=dev, dtype=dt, copy=True), block.shape[1])

    # ------------------------------------------------------------------------------------------------ start block

    def start(self, warm_start: Tensor | None, width: int) -> None:
        """The first pending vectors: ``width`` random ones (cold), or from the warm start (:meth:`_warm_block`)."""
        start = self._random_block(width) if warm_start is None else self._warm_block(warm_start)
        if start is not None:
            self.npend = self._append_pending(start)
            del start
        if self.npend == 0:  # degenerate warm start: fall back to a random vector
            self.npend = self._append_pending(self._random_block(1))
        self.C = self._zeros(self.npend, 0)

    def _warm_block(self, warm_start: Tensor) -> Tensor | None:
        """One product decides how to use the warm start; returns the start block (None: the old vectors are pending).

        v0 = sum of the orthonormalised previous vectors; if H v0 still lies in their span (rho <= factor * tol), the
        subspace barely moved: put the whole block in the basis (Rayleigh-Ritz, then Krylov vectors as the residuals
        demand). Otherwise run Lanczos from v0, whose first product is this one: a moved subspace then costs about
        what a cold solve does, never a block more. The previous vectors are copied into the basis and orthonormalised
        there (no copy of them besides the basis; from another device, e.g. CPU memory, they move one row block at a
        time).
        """
        basis = self.basis
        if warm_start.shape[1] > self.cap:  # only when w > n (then cap = n): its span has at most n dimensions
            warm_start = _orthonormal_columns(warm_start, self.dtype, self.reduce)
        w = warm_start.shape[1]
        for (r0, r1), V in zip(basis.bounds, basis.blocks, strict=True):
            V[:w] = warm_start[r0:r1].T
        r = _orthonormalise_(basis.blocks, w, self.reduce)
        if r == 0:  # nothing to start from (e.g. a zero warm start): a random vector
            return self._random_block(1)
        v0 = torch.cat([V[:r].sum(dim=0) for V in basis.blocks])[:, None]
        if self.reduce is None:
            v0 /= v0.norm()
        else:
            v0 /= basis.norm(v0)
        hv0 = self._apply(v0)
        self.hvps += 1
        rem = hv0.clone()
        if basis.reduce is None:
            coef, hv0_norm = basis.inner(0, r, rem), float(hv0.norm())
        else:  # one reduction
            coef, norms = basis.inner_norms(0, r, rem)
            hv0_norm = float(norms[0])
        basis.sub_(0, r, rem, coef)
        rho = basis.norm(rem) / max(hv0_norm, torch.finfo(self.dtype).tiny)
        del rem
        if rho <= _BLOCK_WARM_FACTOR * self.tol:
            # the r vectors are orthonormal already (to float32 rounding, 1.3e-7 at n = 1e7): pending as they are
            self.npend = basis.size = r
            return None
        # v0 (its product is paid for) and, for a block, the leading previous vectors
        b = self.block_size
        start = v0 if b == 1 else torch.cat([v0, basis.columns(0, min(r, b - 1))], dim=1)
        self.cached = (v0, hv0)
        return start

    # ------------------------------------------------------------------------------------------------ main loop

    def run(self) -> EigenResult:
        """Krylov steps until the Ritz pairs pass :meth:`_stop`; then the result."""
        while True:
            # The Ritz pairs serve the convergence test (from kt done vectors on), the rotation of a pending block,
            # the stops and the restarts (which need a full basis, cap >= kt + 2, so nd >= kt with one pending
            # vector). Between plain Lanczos steps before that they are not computed: the same iterations with fewer
            # small dense eigensolves, each a LAPACK call that wakes every thread.
            nd, npend = self.nd, self.npend
            if nd > 0 and (_RITZ_EVERY_STEP or nd >= self.kt or npend != 1 or self.hvps >= self.max_hvps):
                self._rayleigh_ritz()
                if self._stop():
                    break
            if npend == 0:  # invariant subspace found: continue with a fresh random direction
                if self.basis.size >= self.cap:
                    self._restart(self.cap - 1)
                self.npend = self._append_pending(self._random_block(1))
                self.C = self._zeros(self.npend, self.nd)
                continue
            self._extend()
        return self._result()

    # ------------------------------------------------------------------------------------------------ Rayleigh-Ritz

    def _rayleigh_ritz(self) -> None:
        """Ritz pairs of ``T`` (descending) and their residual norms ``‖C s‖`` (no products)."""
        evals, evecs = torch.linalg.eigh(self.T)
        self.theta, self.S = evals.flip(0), evecs.flip(1)
        self.res = (self.C @ self.S).norm(dim=0) if self.npend > 0 else torch.zeros_like(self.theta)
        theta = self.theta
        self.scale = max(abs(float(theta[0])), float(theta.abs().max()) * self.eps, torch.finfo(self.dtype).tiny)

    def _limits(self, want: int) -> Tensor:
        """Residual bounds of the leading ``want`` pairs: ``tol · |θ_i|``, within ``[_PAIR_FLOOR, 1] · tol · |θ_1|``.

        Relative to each pair's own Ritz value, as ARPACK's test: on a spectrum that flattens below its top few
        eigenvalues a bound relative to ``|θ_1|`` alone let the solver stop before the Krylov space had found every
        member of the top ``k`` (``tests/benchmarks/top_set.py``). Guard pairs get ``_GUARD_FACTOR`` times the bound.
        """
        if not _PER_PAIR:  # the former test, kept for the benchmarks' side-by-side comparison
            return self.tol * self.scale * self.pair_tol[:want]
        own = self.theta[:want].abs().clamp(_PAIR_FLOOR * self.scale, self.scale)
        return self.tol * self.pair_tol[:want] * own

    def _stop(self) -> bool:
        """Convergence and guard check: all pairs within their bounds, the whole space spanned, or no budget left."""
        want = min(self.kt, self.nd)
        if self.nd >= self.kt and bool((self.res[:want] <= self._limits(want)).all()):
            self.converged = True
            return True
        if self.npend == 0 and self.basis.size >= self.n:  # the basis spans the whole space: Ritz pairs are exact
            self.converged = True
            return True
        return self.hvps >= self.max_hvps

    # ------------------------------------------------------------------------------------------------ Krylov step

    def _extend(self) -> None:
        """One (block) Lanczos step: multiply ``b`` pending vectors, orthogonalise the products, extend ``T``, ``C``."""
        nd, npend = self.nd, self.npend
        # the first step multiplies the whole start block (as much of it as the basis has room for), later steps
        # block_size pending vectors
        b = min(npend, max(1, self.cap - self.basis.size)) if nd == 0 else min(npend, self.block_size)
        if nd > 0 and npend > 1:
            self._rotate_pending(b)
        if self.basis.size + b > self.cap and self.cap < self.n and nd > 0:  # with cap == n the remainders fit
            self._restart(self.cap - b)
        nd, nb = self.nd, self.basis.size
        coef, Rcoef, r = self._multiply(b, nb)
        # projected matrix over the done vectors plus the b just multiplied
        C, T = self.C, self.T
        Tn = self._zeros(nd + b, nd + b)
        Tn[:nd, :nd] = T
        cross = 0.5 * (C[:b, :].T + coef[:nd])
        Tn[:nd, nd:] = cross
        Tn[nd:, :nd] = cross.T
        Tn[nd:, nd:] = 0.5 * (coef[nd : nd + b] + coef[nd : nd + b].T)
        rest = torch.cat([C[b:, :], coef[nd + b : nb]], dim=1)  # the other pending vectors' rows
        self.basis.size = nb + r
        self.C = torch.cat([rest, torch.cat([self._zeros(r, nd), Rcoef[:r]], dim=1)])
        self.T = Tn
        self.nd = nd + b
        self.npend = npend - b + r

    def _rotate_pending(self, b: int) -> None:
        """Rotate the pending block: its first ``b`` vectors span the ``b`` leading unconverged residual directions.

        With one pending vector this is plain Lanczos (nothing to rotate).
        """
        want = min(self.kt, self.nd)
        E = self.C @ self.S[:, :want]
        unconv = (self.res[:want] > self._limits(want)).nonzero()[:, 0]
        first = int(unconv[0]) if len(unconv) else 0
        d = E[:, unconv[:b]] if len(unconv) >= b else E[:, first : first + b]
        d = d / d.norm(dim=0).clamp_min(torch.finfo(self.small).tiny)
        eye = torch.eye(self.npend, dtype=self.small, device=self.device)
        Z, _ = torch.linalg.qr(torch.cat([d, eye], dim=1)[:, : self.npend])
        self.basis.matmul_(self.nd, self.nd + self.npend, Z.to(self.dtype))
        self.C = Z.T @ self.C

    def _multiply(self, b: int, nb: int) -> tuple[Tensor, Tensor, int]:
        """Multiply the first ``b`` pending vectors and orthogonalise the products (:meth:`_orthogonalise`).

        The products are taken in chunks when n is large, so that only a chunk of them is held at once. Returns the
        coefficients on the ``nb`` basis vectors, those among the remainders, and how many remainders joined the basis.
        """
        nd = self.nd
        coef = torch.empty(nb, b, dtype=self.small, device=self.device)
        chunk = min(b, _block_chunk(self.n))
        Rcoef = self._zeros(b, b)
        r = 0
        for lo in range(0, b, chunk):
            hi = min(b, lo + chunk)
            if self.cached is not None and nd == 0 and lo == 0:
                # the start vector's product, paid for by the warm-start test, and the rest of the chunk
                W = self.cached[1] / self.basis.norm(self.cached[0])
                if hi - lo > 1:
                    W = torch.cat([W, self._apply(self.basis.columns(nd + 1, nd + hi), owned=True)], dim=1)
                    self.hvps += hi - lo - 1
                self.cached = None
            else:
                W = self._apply(self.basis.columns(nd + lo, nd + hi, self._input_buffer(hi - lo)), owned=True)
                self.hvps += hi - lo
            r = self._orthogonalise(W, nb, lo, coef, Rcoef, r)
            del W
        return coef, Rcoef, r

    def _orthogonalise(self, W: Tensor, nb: int, lo: int, coef: Tensor, Rcoef: Tensor, r: int) -> int:
        """Reorthogonalise products ``W`` (the step's columns ``lo:``) against the basis; append the remainders.

        Against the ``nb`` basis vectors first, then among the ``r`` remainders already kept; returns the new count.
        With :data:`_SELECTIVE`, a remainder's components along basis vectors below ``eps ** _SEMI_ORTH`` of its norm
        are left in it (and not recorded in ``T``: the Krylov relation stays exact, with a basis orthonormal to that
        level); only the basis vectors with a larger coefficient are subtracted (:meth:`_Basis.project_out_`).
        """
        basis, eps, nd = self.basis, self.eps, self.nd
        # the products' components along themselves (for the local step) and their norms: one reduction when sharded
        own, wnorms = basis.inner_norms(nd + lo, nd + lo + W.shape[1], W)
        # NaN and inf propagate into the norms: only a non-finite norm (or an overflowing one) needs the full check
        if not bool(torch.isfinite(wnorms).all()) and not self._all_finite(W):
            from lightning_curvprobe.functional.hvp import NonFiniteProbeError

            raise NonFiniteProbeError("the eigensolver met a non-finite Hessian-vector product.")
        skip = eps**_SEMI_ORTH if _SELECTIVE else 0.0
        coef[:, lo : lo + W.shape[1]] = self._local_step(W, lo, own) + basis.project_out_(W, nb, skip=skip).to(
            self.small
        )
        last = basis.last_norms  # W's norms, if the pass took them (unsharded: bitwise those of x.norm())
        # orthonormalise the remainders (already orthogonal to the basis) among themselves: a block at once when it is
        # well conditioned, else (or for single vectors) one at a time, dropping those that break down
        if r == 0 and W.shape[1] > 1 and self._remainder_block(W, wnorms, nb, lo, Rcoef):
            return W.shape[1]
        for i in range(W.shape[1]):
            x, wnorm = W[:, i : i + 1], float(wnorms[i])
            for _ in range(2):
                if r > 0:
                    c = basis.inner(nb, nb + r, x)
                    basis.sub_(nb, nb + r, x, c)
                    Rcoef[:r, lo + i] += c[:, 0].to(self.small)
            norm = float(last[i]) if last is not None and r == 0 else basis.norm(x)  # x unchanged while r == 0
            if norm > max(100.0, 10.0 * nb) * eps * wnorm and nb + r < self.cap:
                basis.set_column(nb + r, x, norm)
                Rcoef[r, lo + i] = norm
                r += 1
            # else: breakdown, H q lies in the span of the basis (an invariant subspace)
        return r

    def _all_finite(self, W: Tensor) -> bool:
        """Whether every entry of ``W`` is finite (sharded: on every process)."""
        if self.reduce is None:
            return bool(torch.isfinite(W).all())
        bad = torch.tensor([float((~torch.isfinite(W)).sum())], dtype=torch.float64, device=W.device)
        return float(_reduced(self.reduce, bad)[0]) == 0

    def _remainder_block(self, W: Tensor, wnorms: Tensor, nb: int, lo: int, Rcoef: Tensor) -> bool:
        """Orthonormalise the remainders ``W`` among themselves as one block (Cholesky QR twice) and append them.

        Done only when every remainder keeps its place (no breakdown: each Cholesky pivot, the norm of a remainder
        orthogonalised against the ones before it, above the single-vector rule's threshold) and the block is well
        conditioned (smallest pivot² above ``sqrt(eps)`` of the largest squared norm); returns False otherwise, without
        touching ``W``. One Gram matrix and one matrix product per pass instead of a pass per pair of remainders.
        """
        m = W.shape[1]
        if nb + m > self.cap:
            return False
        eye = torch.eye(m, dtype=self.small, device=self.device)
        R, X = eye, W
        for sweep in range(2):
            G = _inner64(X, X)
            if self.reduce is not None:
                G = _reduced(self.reduce, G)
            L, info = torch.linalg.cholesky_ex(0.5 * (G + G.T))
            if sweep == 0:
                pivots = L.diagonal()
                limit = max(100.0, 10.0 * nb) * self.eps * wnorms.to(self.small)
                ok = int(info) == 0 and bool((pivots > limit).all())
                if not ok or float(pivots.min()) ** 2 <= math.sqrt(self.eps) * float(G.diagonal().max()):
                    return False
            X = X @ torch.linalg.solve_triangular(L.T, eye, upper=True).to(X.dtype)
            R = L.T @ R
        self.basis.set_columns(nb, X)
        Rcoef[:m, lo : lo + m] = R
        return True

    def _local_step(self, W: Tensor, lo: int, own: Tensor) -> Tensor:
        """Subtract from ``W`` its known large components; returns them as coefficients on the basis (``(nb, m)``).

        The products ``W = H P`` of pending vectors ``P`` (the step's columns ``lo:``) have components ``C[p]`` along
        the done vectors (the Krylov relation: nonzero on the last block only, or on the kept Ritz vectors after a
        restart) and ``Pᵀ H P`` along ``P`` itself (one inner product with ``P``). What is left is the next Lanczos
        vector, and the Gram-Schmidt pass after this (selective: only the components above its threshold) removes only
        small components: its DGKS test then keeps the norm, so a second pass over the basis is rarely needed (it used
        to run at most steps, since the remainder ``β`` of a converging Lanczos step is much smaller than the product).
        ``own``: ``Pᵀ W``, computed by the caller.
        """
        nd, m, basis = self.nd, W.shape[1], self.basis
        local = self._zeros(basis.size, m)
        local[nd + lo : nd + lo + m] = own.to(self.small)
        rows = self.C[lo : lo + m]
        nz = rows.abs().amax(dim=0).nonzero()
        c0 = int(nz[0]) if len(nz) else nd
        local[c0:nd] = rows[:, c0:nd].T
        basis.sub_(c0, nd + lo + m, W, local[c0 : nd + lo + m].to(W.dtype))
        return local

    # ------------------------------------------------------------------------------------------------ restart

    def _restart(self, cap: int) -> None:
        """Thick restart: keep the top Ritz vectors of the done block and every pending vector (the relation is exact).

        ``cap`` is the number of basis vectors allowed after the restart (it already leaves room for the vectors about
        to be added).
        """
        kt, nd = self.kt, self.nd
        room = cap - self.npend
        keep = max(1, min(nd - 1, room, max(kt, kt + (room - kt) // 2)))
        self.basis.restart_(nd, self.npend, self.S[:, :keep].to(self.dtype))
        self.T = torch.diag(self.theta[:keep])
        self.C = self.C @ self.S[:, :keep]
        self.nd = keep
        self.restarts += 1

    # ------------------------------------------------------------------------------------------------ result

    def _result(self) -> EigenResult:
        self.input_buffer = None  # not part of the peak while the Ritz vectors are built
        want = min(self.kt, self.nd)
        coeffs = self.S[:, :want].to(self.dtype)
        # the Ritz vectors, stored column by column (each vector contiguous), built while the basis is released;
        # eigenvectors is a view of basis
        vectors = self.basis.ritz_vectors(self.nd, coeffs)
        _canonical_signs_(vectors, self.shard)
        kk = min(self.k, self.nd)
        return EigenResult(
            eigenvalues=self.theta[:kk].to(self.dtype),
            eigenvectors=vectors[:, :kk],
            residuals=self.res[:kk].to(self.dtype),
            hvps=self.hvps,
            converged=self.converged and kk == self.k,
            restarts=self.restarts,
            basis=vectors,
        )


def _canonical_signs_(vectors: Tensor, shard: tuple[Reduce, int, int] | None = None) -> None:
    """Flip each column so that its entry of largest magnitude is positive (in place; ties: the lowest index).

    An eigenvector is defined up to its sign; fixing it makes the result independent of the path that found it (a
    cold or a warm start, another start vector), so that draws expressed in the eigenbasis (``U z``) are reproducible.

    ``shard = (reduce, slot, world)``: ``vectors`` holds this process's rows, the ``slot``-th of ``world`` row ranges
    in order. Each process puts its own candidate of every column (its entry of largest magnitude, the first of equal
    ones) in its slot of a ``(world, k)`` tensor, one reduction sums them, and every process picks the same one: the
    largest magnitude, ties to the lowest slot (hence to the lowest global row).
    """
    if shard is not None:
        reduce, slot, world = shard
        cand = torch.zeros(world, vectors.shape[1], dtype=torch.float64, device=vectors.device)
        for j in range(vectors.shape[1]):
            v = vectors[:, j]
            if v.numel():
                cand[slot, j] = _largest_entry(v)
        cand = _reduced(reduce, cand)
        pick = cand.abs().argmax(dim=0)  # the first of equal magnitudes: the lowest slot
        for j in (cand.gather(0, pick[None])[0] < 0).nonzero()[:, 0].tolist():
            vectors[:, j].neg_()
        return
    for j in range(vectors.shape[1]):  # column by column: no N x k temporary
        v = vectors[:, j]
        if v.numel() and _largest_entry(v) < 0:
            v.neg_()


def _largest_entry(v: Tensor) -> float:
    """The entry of largest magnitude of the vector ``v`` (of equal magnitudes, the first).

    One read of ``v`` (its minimum and maximum) and no temporary; only when the two have the same magnitude, the first
    of them is found (``v.abs().argmax()``, which allocates a copy of ``v``: at n = 1e7 float32 that cost 40 ms a
    column, its page faults included, against 5 ms).
    """
    if not _MINMAX_SIGNS:
        return float(v[v.abs().argmax()])
    lo, hi = (float(t) for t in torch.aminmax(v))
    if hi > -lo:
        return hi
    if -lo > hi:
        return lo
    return float(v[v.abs().argmax()])
