"""Per-process peak memory of one cold refresh, unsharded and over 2 gloo processes (DDP rows, FSDP2 shards).

Issue #19: the eigensolve of a refresh (top-D eigenpairs, D = 10, the default ``max_basis = 2 (D + p) + 10``,
``tol = 1e-3``, float32) of a real model, an MLP of ``N`` parameters (``--depth`` tanh layers of width ``--hidden``,
a 16-output linear head; about 3.3 M parameters by default) on a generated regression batch of 32 samples (nothing is
downloaded), in three set-ups, each in fresh processes (``torch.multiprocessing.spawn``, one thread each):

1. ``unsharded``: one process, ``HessianOperator`` (autograd products) and ``top_eigenpairs``;
2. ``DDP rows``: two gloo processes, each with the whole model and half of the batch, the operator all-reduced
   (``HessianOperator(scale=k_local/k, reduce_fn=all_reduce)``) and the basis split by rows (``RowShards``): each
   product gathers the block's rows from both processes;
3. ``FSDP2``: two gloo processes, ``fully_shard`` on every Linear and on the root, each with half of the batch;
   ``ShardedFunction`` and ``sharded_eigensolve`` (finite-difference products on the local shards).

In each process: the model, the data and the operator are built; then one product of a random vector is measured on
its own, then the refresh. Each peak is the increase of the resident set over the state just before: ``VmHWM`` is
reset through ``/proc/self/clear_refs`` (checked: the reset must bring ``VmHWM`` down to ``VmRSS``; where it does
not, a thread samples ``VmRSS`` every 5 ms instead), minus ``VmRSS`` before. The children run with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed at 1 MiB (unless set already): by default glibc raises its mmap threshold to the
largest block freed so far (up to 32 MiB), so vectors of ``N`` floats freed earlier could be kept in the heap and
reused, and the peak would depend on the process's history rather than on what the refresh holds at once.

Reported per process: rows ``N/P``, ``max_basis``, the peak increase of one product and of the refresh in MiB and in
units of ``N`` floats (``N · 4`` bytes), next to the formula's prediction (see ``formula`` below: the basis
``max_basis · N/P`` plus the transients named there), products, restarts, time; then the relative differences of
the eigenvalues between the set-ups, and against a reference solve (unsharded, ``D + 4`` pairs at ``tol = 1e-6``, after
the measurements; ``--no-reference`` skips it) with the top-``D`` members that a set-up missed (returned the next
eigenvalue in place of).

A script, not a test::

    PYTHONPATH=. python tests/benchmarks/sharded_refresh_memory.py            # N = 3.3 M: a few minutes on 2 cores
    PYTHONPATH=. python tests/benchmarks/sharded_refresh_memory.py --quick    # N = 25 k, D = 4: < 30 s
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from lightning_curvprobe.functional.hvp import HessianOperator, ModelFunction, _probe_mode  # noqa: E402
from lightning_curvprobe.functional.lanczos import _basis_capacity, _default_num_extra, top_eigenpairs  # noqa: E402
from lightning_curvprobe.functional.sharded import RowShards, ShardedFunction, sharded_eigensolve  # noqa: E402

SAMPLES = 32
DOUT = 16
SETUPS = ("unsharded", "DDP rows", "FSDP2")
MIB = 2**20


# ------------------------------------------------------------------------------------------ memory readings


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class PeakMeter:
    """The peak resident set over a block, minus the resident set at its start (kB)."""

    def __init__(self) -> None:
        self.method = "VmHWM"
        self._stop = threading.Event()
        self._max = 0
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMeter:
        gc.collect()
        self.start_kb = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            ok = _status_kb("VmHWM") <= _status_kb("VmRSS") + 1024
        except OSError:
            ok = False
        if not ok:  # no reset here: sample instead
            self.method = "VmRSS every 5 ms"
            self._max = self.start_kb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _status_kb("VmRSS"))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_kb = max(self._max, _status_kb("VmRSS")) - self.start_kb
        else:
            self.peak_kb = _status_kb("VmHWM") - self.start_kb
        self.after_kb = _status_kb("VmRSS") - self.start_kb


# ------------------------------------------------------------------------------------------ model and data


def make_model(din: int, hidden: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = din
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    layers.append(nn.Linear(width, DOUT))
    return nn.Sequential(*layers)


def make_data(din: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the outputs of a random tanh teacher plus noise (seeded)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, din, generator=g)
    teacher = torch.randn(din, DOUT, generator=g) / din**0.5
    y = torch.tanh(x @ teacher) + 0.1 * torch.randn(SAMPLES, DOUT, generator=g)
    return x, y


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# ------------------------------------------------------------------------------------------ one process


def worker(rank: int, setup: str, world: int, port: int, cfg: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make_model(cfg["din"], cfg["hidden"], cfg["depth"])
    x, y = make_data(cfg["din"])
    per = SAMPLES // world
    batch = (x[rank * per : (rank + 1) * per].clone(), y[rank * per : (rank + 1) * per].clone())
    del x, y
    n_global = sum(p.numel() for p in model.parameters())
    largest_layer = max(p.numel() for p in model.parameters())
    kw = dict(tol=cfg["tol"], generator=torch.Generator().manual_seed(2))
    if setup == "unsharded":
        fn = ModelFunction(model, mse)
        op = HessianOperator(fn, batch)
        rows = (0, n_global)
        product = op.matvec

        def solve():
            with _probe_mode(model):
                return top_eigenpairs(op.matvec, n_global, cfg["D"], dtype=fn.dtype, device=fn.device, **kw)

    elif setup == "DDP rows":
        fn = ModelFunction(model, mse)
        shards = RowShards(fn.num_params, fn.device)
        op = HessianOperator(fn, batch, scale=per / SAMPLES, reduce_fn=shards.reduce)
        rows = shards.rows

        def product(v):  # what RowShards.eigensolve's matvec does with each block
            return op.matvec(shards.gather(v))[rows[0] : rows[1]].clone()

        def solve():
            return shards.eigensolve(op, cfg["D"], **kw)

    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        fn = ShardedFunction(model, mse)
        op = fn.operator(batch, scale=fn.share(batch))
        rows = fn.rows
        product = op.matvec

        def solve():
            return sharded_eigensolve(op, cfg["D"], **kw)

    local = rows[1] - rows[0]
    v = torch.randn(local, 1, generator=torch.Generator().manual_seed(3 + rank))
    if world > 1:
        dist.barrier()
    with PeakMeter() as one:
        hv = product(v)
    del hv, v
    if world > 1:
        dist.barrier()
    with PeakMeter() as meter:
        t0 = time.perf_counter()
        res = solve()
        seconds = time.perf_counter() - t0
    out = dict(
        setup=setup,
        rank=rank,
        world=world,
        N=n_global,
        rows=local,
        largest_layer=largest_layer,
        product_peak_kb=one.peak_kb,
        peak_kb=meter.peak_kb,
        after_kb=meter.after_kb,
        method=meter.method,
        hvps=res.hvps,
        restarts=res.restarts,
        converged=res.converged,
        seconds=seconds,
        eigenvalues=res.eigenvalues.tolist(),
        residuals=res.residuals.tolist(),
    )
    if setup == "unsharded" and cfg["reference"]:  # after the measurements: the true top eigenvalues
        ref = top_eigenpairs(
            op.matvec, n_global, cfg["D"] + 4, tol=1e-6, dtype=fn.dtype, generator=torch.Generator().manual_seed(5)
        )
        out["reference"] = ref.eigenvalues.tolist()
    with open(os.path.join(out_dir, f"{setup.replace(' ', '_')}{rank}.json"), "w") as f:
        json.dump(out, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(setup: str, cfg: dict) -> list[dict]:
    world = 1 if setup == "unsharded" else 2
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(worker, args=(setup, world, _free_port(), cfg, out_dir), nprocs=world)
        results = []
        for r in range(world):
            with open(os.path.join(out_dir, f"{setup.replace(' ', '_')}{r}.json")) as f:
                results.append(json.load(f))
    return results


# ------------------------------------------------------------------------------------------ the formula


def formula(r: dict, cap: int) -> tuple[dict[str, float], float]:
    """Predicted peak increases in numbers (float32): the refresh's terms, and the product's alone (their sum).

    * basis: ``max_basis · N/P`` (the Krylov basis, this process's rows);
    * unsharded, autograd product: ``3 N`` (the per-parameter gradients of the double backward, ``N`` in all, their
      concatenation into the flat vector's gradient, ``N``, and ``matvec``'s output column, ``N``);
    * DDP rows: the gathered block (``N · b``, ``b = 1``) held through the same autograd product ``3 N``
      (``RowShards.gather``'s own peak, the padded rows, the ``P`` parts and their concatenation, ``(2 + 1/P) N``,
      comes before the product and stays below it);
    * FSDP2: five local vectors of ``N/P`` held at once in the second gradient of a central difference (the
      perturbed point ``w0 - εv``, the saved shards, the gradient's shards, their concatenation, and ``g₊``) and
      FSDP's all-gathered parameters of the layer in use and of the prefetched one (``2 ×`` the largest layer);
    * the solver's own vectors beside the basis during a product: the copy of the multiplied vector and the product
      it gets back, ``2 N/P`` (the Ritz vectors are built block by block, basis plus a sixteenth of the result: less).
    """
    n, rows = r["N"], r["rows"]
    terms: dict[str, float] = {"basis": cap * rows}
    if r["setup"] == "unsharded":
        terms["autograd product"] = 3 * n
    elif r["setup"] == "DDP rows":
        terms["gathered block"] = n
        terms["autograd product"] = 3 * n
    else:
        terms["local vectors"] = 5 * rows
        terms["FSDP all-gathered layers"] = 2 * r["largest_layer"]
    product = sum(terms.values()) - terms["basis"]
    terms["solver vectors"] = 2 * rows
    return terms, product


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small MLP (N = 25 k) and D = 4: a smoke run")
    ap.add_argument("--din", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--D", type=int, default=None)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument(
        "--no-reference", action="store_true", help="skip the reference solve (unsharded, D + 4 pairs, tol 1e-6)"
    )
    ap.add_argument(
        "--setups", default=",".join(SETUPS[1:]), help="the 2-process set-ups to run (the unsharded one always runs)"
    )
    args = ap.parse_args()
    cfg = dict(
        din=args.din or (64 if args.quick else 640),
        hidden=args.hidden or (64 if args.quick else 640),
        depth=args.depth or (6 if args.quick else 8),
        D=args.D or (4 if args.quick else 10),
        tol=args.tol,
        reference=not args.no_reference,
    )
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MIB))  # read by the children's glibc (see the docstring)
    print("command:", " ".join(["python", *sys.argv]))
    print(
        f"torch {torch.__version__}; MLP {cfg['din']} -> {cfg['depth']} x tanh({cfg['hidden']}) -> {DOUT}, "
        f"{SAMPLES} samples (each of 2 processes half), MSE; D = {cfg['D']}, tol {cfg['tol']:g}, float32; "
        f"1 thread per process, {os.cpu_count()} CPU cores (shared); "
        f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}",
        flush=True,
    )
    runs = {}
    chosen = [s.strip() for s in args.setups.split(",") if s.strip()]
    if not set(chosen) <= set(SETUPS[1:]):
        ap.error(f"--setups: choose among {SETUPS[1:]}, got {chosen}")
    for setup in ("unsharded", *chosen):
        runs[setup] = run(setup, cfg)
        print(f"  {setup}: done", flush=True)
    first = runs["unsharded"][0]
    n, D = first["N"], cfg["D"]
    cap = _basis_capacity(n, D + _default_num_extra(D, n), 1, 1, None)
    print(
        f"\nN = {n:,} parameters (N floats = {n * 4 / MIB:.2f} MiB); max_basis = {cap}; largest layer "
        f"{first['largest_layer']:,} = {first['largest_layer'] / n:.3f} N"
    )
    methods = sorted({r["method"] for rs in runs.values() for r in rs})
    if methods == ["VmHWM"]:
        print(
            "peak memory: VmHWM reset through /proc/self/clear_refs (checked in every measurement: VmHWM fell to VmRSS)"
        )
    else:
        print("peak memory: " + ", ".join(methods) + " (VmRSS sampled where the VmHWM reset did not work)")
    print()
    print(
        "| set-up | rank | rows N/P | one product: peak (MiB) | (N floats) | formula (N floats) | "
        "refresh: peak (MiB) | (N floats) | formula (N floats) | held after (N floats) | products | restarts | "
        "converged | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    nf = n * 4 / 1024  # kB per N floats
    for setup, results in runs.items():
        for r in results:
            terms, product = formula(r, cap)
            print(
                f"| {setup} | {r['rank']} | {r['rows']:,} | {r['product_peak_kb'] / 1024:.1f} | "
                f"{r['product_peak_kb'] / nf:.2f} | {product / n:.2f} | {r['peak_kb'] / 1024:.1f} | "
                f"{r['peak_kb'] / nf:.2f} | {sum(terms.values()) / n:.2f} | {r['after_kb'] / nf:.2f} | "
                f"{r['hvps']} | {r['restarts']} | {r['converged']} | {r['seconds']:.1f} |"
            )
    print("\nformula terms (N floats), rank 0 of each set-up:")
    for setup, results in runs.items():
        terms, _ = formula(results[0], cap)
        print(
            f"  {setup}: "
            + " + ".join(f"{k} {v / n:.2f}" for k, v in terms.items())
            + f" = {sum(terms.values()) / n:.2f}"
        )
    L = first["largest_layer"] / n
    print(
        f"\nper process, P processes (N floats): unsharded {cap} + 3 + 2 = {cap + 5}; DDP rows ({cap} + 2) / P + 4 "
        f"(the gathered block and the autograd product are whole-N terms); FSDP2 ({cap} + 7) / P + 2 x {L:.3f} "
        "(largest layer)"
    )
    ref = first["eigenvalues"]
    print("\neigenvalues (unsharded):", " ".join(f"{v:.6g}" for v in ref))
    print(
        "residual / eigenvalue (unsharded):",
        " ".join(f"{r / v:.1e}" for r, v in zip(first["residuals"], ref, strict=True)),
    )
    for setup in chosen:
        mine = runs[setup][0]
        diffs = [abs(a - b) / abs(b) for a, b in zip(mine["eigenvalues"], ref, strict=True)]
        same = all(r["eigenvalues"] == mine["eigenvalues"] for r in runs[setup])
        print(f"{setup}: relative difference to unsharded, by index:", " ".join(f"{d:.1e}" for d in diffs))
        print(
            f"{setup}: residual / eigenvalue:",
            " ".join(f"{r / v:.1e}" for r, v in zip(mine["residuals"], mine["eigenvalues"], strict=True)),
        )
        print(
            f"largest relative eigenvalue difference, {setup} against unsharded: {max(diffs):.2e} "
            f"(ranks identical: {same})"
        )
    if "reference" in first:
        true = first["reference"]
        print("\nreference (unsharded, D + 4 pairs, tol 1e-6):", " ".join(f"{v:.6g}" for v in true))
        for setup, results in runs.items():
            mine = results[0]["eigenvalues"]
            err = max(abs(a - b) / abs(b) for a, b in zip(mine, true, strict=False))
            # a returned value closer to an eigenvalue beyond the top D than to its own: a top-D member missed
            nearest = [min(range(len(true)), key=lambda i, v=v: abs(true[i] - v)) for v in mine]
            missed = [true[i] for i in range(len(mine)) if i not in nearest]
            print(
                f"{setup}: largest relative error against the reference {err:.2e}; top-D members missed: "
                + (" ".join(f"{v:.6g}" for v in missed) if missed else "none")
            )
    one = first["peak_kb"]
    for setup in chosen:
        print(
            f"largest per-process refresh peak, {setup} over unsharded: "
            f"{max(r['peak_kb'] for r in runs[setup]) / one:.2f}"
        )


if __name__ == "__main__":
    main()
