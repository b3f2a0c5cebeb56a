"""Per-process memory and products of a refresh at 100M-10B parameters, from the formulas and measured counts.

Nothing here is measured at those sizes: the memory is the formula of ``lightning_curvprobe/_sharding.py`` and
``functional/sharded.py`` (basis ``max_basis · N / P``, kept subspace ``(D + p) · N / P``, checkpoint ``(D + p) · N``
gathered on process 0), checked at small N by ``sharded_lanczos.py`` and ``sharded_refresh_memory.py``; the product
counts are the ones measured (they depend on the spectrum, not on N), listed below with their source.

    python tests/benchmarks/scale_table.py
"""

from __future__ import annotations

import math

BYTES = 4  # float32
# measured products of one refresh: (cold, warm), source
PRODUCTS = {
    10: ((106, 24), "tests/benchmarks/memory.py, 10M-parameter transformer (stop 10 of issue #17's session)"),
    45: ((343, None), "tests/benchmarks/gpu_paper_scale.py, 98M-parameter GPT on an H200 (2026-11-28 log)"),
}


def guard(D: int) -> int:
    return max(2, math.ceil(D / 4))


def max_basis(D: int) -> int:
    return 2 * (D + guard(D)) + 10


def gib(numbers: float) -> str:
    value = numbers * BYTES / 2**30
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def ddp_measurement(D: int, N: float, P: int) -> str:
    """DDP gathers the D kept vectors while that is no more than its share of the basis, else measures on its rows."""
    if D * P <= max_basis(D):
        return f"{gib(D * N)} GiB (gathered)"
    return f"{gib(2 * N)} GiB (on rows)"


def main() -> None:
    print(
        "| N | D | processes | basis per process | kept subspace per process | DDP measurement | "
        "checkpoint on process 0 | products per refresh (cold / warm) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for N in (1e8, 1e9, 1e10):
        for D in (10, 45):
            (cold, warm), _ = PRODUCTS[D]
            products = f"{cold} / {warm if warm is not None else 'not measured'}"
            for P in (8, 64):
                kept = D + guard(D)
                print(
                    f"| {N:.0e} | {D} | {P} | {gib(max_basis(D) * N / P)} GiB | {gib(kept * N / P)} GiB | "
                    f"{ddp_measurement(D, N, P)} | {gib(kept * N)} GiB | {products} |"
                )
    print()
    for D, (_, source) in PRODUCTS.items():
        print(f"products at D = {D}: {source}")
    print("finite-difference products (sharded models) cost two first-order forward and backward passes each")


if __name__ == "__main__":
    main()
