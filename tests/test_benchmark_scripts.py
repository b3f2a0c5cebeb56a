"""Smoke tests of the benchmark scripts in tests/benchmarks/ (their --quick / --tiny modes, a few seconds each) and of
the package features they measure: batched Hessian-vector products, batched per-sample statistics and Monte Carlo
forward passes (with their per-vector / per-sample fallbacks), and ``top_eigenpairs(basis_device=...)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import DT, gen, mlp, mse_loss, regression_data

import lightning_curvprobe.functional.hvp as hvp
from lightning_curvprobe.functional import HessianOperator, ModelFunction, top_eigenpairs
from lightning_curvprobe.functional._batch import _slice_batch
from lightning_curvprobe.functional.probe import _collect_statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tests", "benchmarks")
SCRIPTS = {
    "gpu_paper_scale": ["gpu_paper_scale.py", "--tiny"],
    "overhead": ["overhead.py", "--quick"],
    "hvp_throughput": ["hvp_throughput.py", "--quick"],
    "memory": ["memory.py", "--quick"],
    "refresh_sequence": ["refresh_sequence.py", "--quick"],
    "reorthogonalisation": ["reorthogonalisation.py", "--quick"],
    "top_set": ["top_set.py", "--quick"],
    "warm_start_bound": ["warm_start_bound.py", "--quick"],
}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def script_runs():
    """Start every script at once (they are short and mostly import time), then collect (rc, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.pop("OUT", None)
    procs = {}
    for name, (script, *args) in SCRIPTS.items():
        procs[name] = (
            subprocess.Popen(
                [sys.executable, os.path.join(BENCH, script), *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
            time.perf_counter(),
        )
    out = {}
    for name, (proc, t0) in procs.items():
        try:
            text, _ = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            text += f"\n[killed after {TIMEOUT_S} s]"
        out[name] = (proc.returncode, text, time.perf_counter() - t0)
    return out


def _run_alone(script: str, *args: str) -> str:
    """Run one benchmark script on its own (it starts its own processes); its output, after checking it succeeded."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    return text


def _table_rows(text: str, width: int) -> list[list[str]]:
    """The data rows (second cell a number) of the Markdown tables of ``width`` cells in a script's output."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")]
    return [r for r in rows if len(r) == width and r[1].isdigit()]


def _check(script_runs, name: str, *expected: str) -> str:
    rc, text, _ = script_runs[name]
    assert rc == 0, f"{name} exited with {rc}:\n{text[-4000:]}"
    for e in expected:
        assert e in text, f"{name}: {e!r} not in output:\n{text[-4000:]}"
    return text


def test_gpu_paper_scale_tiny_runs_on_cpu(script_runs):
    text = _check(
        script_runs,
        "gpu_paper_scale",
        "Lanczos cold",
        "power iteration",
        "Lanczos warm",
        "Stage II",
        "gaussian_moment",
        "quadratic_mc",
        "direct_mc",
        "goal (Lanczos cold",
    )
    assert "device cpu" in text


def test_overhead_quick(script_runs):
    text = _check(
        script_runs,
        "overhead",
        "| quickstart |",
        "| transformer",
        "eigensolve",
        "coefficients",
        "logging",
        "lower bound on the ratio",
    )
    floors = [line for line in text.splitlines() if line.startswith("| ") and "steps) |" in line]
    assert len(floors) == 2, text[-3000:]  # one floor row per task
    for line in floors:
        bound = float(line.split("**")[1])
        assert 1.0 < bound < 10.0, line


def test_hvp_throughput_quick(script_runs):
    _check(script_runs, "hvp_throughput", "HVPs/s", "fwd/s", "added samples", "direct MC", "warm Rayleigh-Ritz")


def test_memory_quick(script_runs):
    _check(script_runs, "memory", "| refresh cold |", "excess / (N·4 B)", "save_subspace=False")


def test_refresh_sequence_quick(script_runs):
    text = _check(
        script_runs,
        "refresh_sequence",
        "| warm, b=1 (callback default) |",
        "| cold, b=13 |",
        "| warm as a block, b=1 |",
        "=== transformer",
        "Warm against cold",
        "One training step",
    )
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[1].isdigit():
            rows.append((cells[0], int(cells[1]), int(cells[3]), float(cells[7])))
    assert len(rows) == 11, text[-3000:]  # 7 quickstart and 4 transformer configurations
    for label, hvps, calls, worst in rows:
        # plain Lanczos multiplies one vector per call; blocks (and a warm start taken as a block) several
        one_at_a_time = label in ("warm, b=1 (callback default)", "cold, b=1")
        assert calls == hvps if one_at_a_time else calls < hvps, (label, hvps, calls)
        assert worst <= 1.0, (label, worst)  # every returned pair within its residual bound


def test_top_set_quick(script_runs):
    text = _check(script_runs, "top_set", "| this solver (defaults) |", "| ARPACK eigsh, tol=1e-3 |", "(before)")
    rows = _table_rows(text, 8)
    assert len(rows) == 6, text[-3000:]  # two models, three methods
    for model, _, method, _, missed, _, err, _ in rows:
        if method == "this solver (defaults)":
            assert missed == "0" and float(err) <= 1e-2, (model, missed, err)


def test_warm_start_bound_quick(script_runs):
    text = _check(script_runs, "warm_start_bound", "| cold |", "| oracle 0.999, as a block |", "steps per decade")
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines() if ln.startswith("| ")]
    rows = [r for r in rows if len(r) == 5 and r[1].replace(".", "").isdigit()]
    assert [r[0] for r in rows][:2] == ["cold", "warm (previous refresh)"] and len(rows) == 8, text[-3000:]
    assert all(float(r[3]) > 0 for r in rows), rows  # every start's products against the cold solve's
    line = next(ln for ln in text.splitlines() if ln.startswith("Every solve"))
    err = float(line.split("returned pairs ")[1].split(",")[0])
    captured = float(line.split("subspace ")[1].rstrip("."))
    assert err <= 1e-2 and captured >= 0.99, line  # every solve found the true top-D at its tolerance


def test_reorthogonalisation_quick(script_runs):
    text = _check(script_runs, "reorthogonalisation", "| quickstart MLP | second pass always |", "| DGKS (default) |")
    rows: dict[str, dict[str, tuple[float, ...]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 11 and cells[2].isdigit():
            rows.setdefault(cells[0], {})[cells[1]] = tuple(float(c) for c in (*cells[2:6], *cells[8:]))
    assert len(rows) == 2, text[-3000:]
    for model, modes in rows.items():
        hvps, _, passes, _, residual, orth, diff = modes["DGKS (default)"]
        ref = modes["second pass always"]
        # the same products (a float32 rounding difference may move a convergence test by one): only passes over
        # the basis are left out
        assert abs(hvps - ref[0]) <= 1 and passes < ref[2], model
        assert residual <= 1e-3 and orth <= 1e-5 and diff <= 1e-5, model


# ------------------------------------------------------------------------------------------ batched products


@pytest.fixture
def small():
    model = mlp("tanh", din=5, hidden=16, dout=3, seed=0)
    x, y = regression_data(15, din=5, dout=3, seed=1)
    return model, (x[:10], y[:10]), (x[10:], y[10:])


def test_block_matvec_batched_equals_per_vector(small):
    model, base, _ = small
    fn = ModelFunction(model, mse_loss)
    batched, loop = HessianOperator(fn, base), HessianOperator(fn, base, max_batch=1)
    assert batched.max_batch > 1
    V = torch.randn(fn.num_params, 7, generator=gen(0), dtype=DT)
    HV = batched.matvec(V)
    torch.testing.assert_close(HV, loop.matvec(V), rtol=1e-13, atol=1e-13)
    assert batched.num_hvps == loop.num_hvps == 7 and batched.batch_error is None
    chunked = HessianOperator(fn, base, max_batch=3)  # 3 + 3 + 1
    torch.testing.assert_close(chunked.matvec(V), HV, rtol=1e-13, atol=1e-13)


def test_block_matvec_falls_back_when_batched_backward_fails(small, monkeypatch):
    model, base, _ = small
    fn = ModelFunction(model, mse_loss)
    op = HessianOperator(fn, base)
    ref = HessianOperator(fn, base, max_batch=1).matvec(torch.eye(fn.num_params, 4, dtype=DT))
    grad = torch.autograd.grad

    def no_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule for this model")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batched)
    torch.testing.assert_close(op.matvec(torch.eye(fn.num_params, 4, dtype=DT)), ref, rtol=1e-13, atol=1e-13)
    assert "no batching rule" in op.batch_error and op.num_hvps == 4


def _stats(fn, base, added, U, direct=True):
    g = gen(3)
    z = 0.1 * torch.randn(5, U.shape[1], generator=g, dtype=DT)
    qz = 0.1 * torch.randn(4, U.shape[1], generator=g, dtype=DT)
    return _collect_statistics(
        fn, base, added, U, torch.tensor([3.0, 2.0], dtype=DT), direct_z=z if direct else None, qe_z=qz
    )


_FIELDS = ("added_loss", "added_grad", "added_hess", "base_draw_loss_sum", "added_draw_loss", "qe_change_sum")


def test_statistics_batched_equal_loops(small, monkeypatch):
    model, base, added = small
    fn = ModelFunction(model, mse_loss)
    U = torch.linalg.qr(torch.randn(fn.num_params, 2, generator=gen(2), dtype=DT))[0]
    batched = _stats(fn, base, added, U)
    assert model not in hvp._VMAP_FAILED
    monkeypatch.setattr(hvp, "USE_BATCHED", False)
    loop = _stats(fn, base, added, U)
    for f in _FIELDS:
        torch.testing.assert_close(getattr(batched, f), getattr(loop, f), rtol=1e-12, atol=1e-14)
    assert batched.hvps == loop.hvps == 5 * 2 and batched.forward_passes == loop.forward_passes == 5 * 6 + 4


class _Branchy(torch.nn.Module):
    """Data-dependent control flow: ``vmap`` cannot trace it, the per-sample loops must take over."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(5, 3).double()

    def forward(self, x):
        h = self.lin(x)
        return torch.tanh(h) if float(h.detach().sum()) > 0 else h * h


def test_statistics_fall_back_for_untraceable_model(small, monkeypatch):
    _, base, added = small
    model = _Branchy()
    fn = ModelFunction(model, mse_loss)
    U = torch.linalg.qr(torch.randn(fn.num_params, 2, generator=gen(2), dtype=DT))[0]
    out = _stats(fn, base, added, U)
    assert model in hvp._VMAP_FAILED
    monkeypatch.setattr(hvp, "USE_BATCHED", False)
    ref = _stats(fn, base, added, U)
    for f in _FIELDS:
        torch.testing.assert_close(getattr(out, f), getattr(ref, f), rtol=1e-12, atol=1e-14)
    # and each added sample's loss still matches its own one-sample batch
    for j in range(5):
        torch.testing.assert_close(out.added_loss[j], mse_loss(model, _slice_batch(added, j, j + 1)).detach())


def test_basis_device_same_results_and_blocks_on_operator_device(small):
    model, base, _ = small
    fn = ModelFunction(model, mse_loss)
    op = HessianOperator(fn, base)
    devices = []

    def matvec(v):
        devices.append(v.device)
        return op.matvec(v)

    a = top_eigenpairs(op.matvec, fn.num_params, 3, tol=1e-8, dtype=DT)
    b = top_eigenpairs(matvec, fn.num_params, 3, tol=1e-8, dtype=DT, device="cpu", basis_device="cpu")
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=0, atol=0)
    assert all(d.type == "cpu" for d in devices) and b.basis.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_basis_in_cpu_memory_with_model_on_gpu(small):
    model, base, _ = small
    model = model.cuda()
    base = tuple(t.cuda() for t in base)
    fn = ModelFunction(model, mse_loss)
    op = HessianOperator(fn, base)
    seen = []

    def matvec(v):
        seen.append(v.device.type)
        return op.matvec(v)

    res = top_eigenpairs(matvec, fn.num_params, 3, tol=1e-8, dtype=DT, device="cuda", basis_device="cpu")
    ref = top_eigenpairs(op.matvec, fn.num_params, 3, tol=1e-8, dtype=DT, device="cuda")
    assert set(seen) == {"cuda"} and res.basis.device.type == "cpu" and ref.basis.device.type == "cuda"
    torch.testing.assert_close(res.eigenvalues, ref.eigenvalues.cpu(), rtol=1e-10, atol=1e-12)
    # the operator also accepts blocks on another device and answers there
    v = torch.randn(fn.num_params, 2, dtype=DT)
    torch.testing.assert_close(op.matvec(v), op.matvec(v.cuda()).cpu(), rtol=1e-12, atol=1e-14)


def test_sharded_lanczos_quick():
    """``sharded_lanczos.py --quick`` (run on its own: it starts its own two gloo processes)."""
    text = _run_alone("sharded_lanczos.py", "--quick")
    assert "ranks' eigenvalues bitwise equal: True" in text, text[-3000:]
    rows = _table_rows(text, 11)
    assert [r[0] for r in rows] == ["1 process (unsharded)"] + ["2 gloo processes (rows=)"] * 2, text[-3000:]
    one, *two = rows
    assert all(r[9] == "True" for r in rows) and two[0][6] == two[1][6]  # converged; the ranks' products agree
    # each rank's basis holds its rows only
    assert float(two[0][4]) + float(two[1][4]) == pytest.approx(float(one[4]), rel=1e-3)
    rel = float(text.split("2 processes against 1: ")[1].split()[0])
    assert rel < 1e-3, text[-3000:]


def test_sharded_refresh_memory_quick():
    """``sharded_refresh_memory.py --quick`` (run on its own: it spawns its own 1 and 2 gloo processes)."""
    text = _run_alone("sharded_refresh_memory.py", "--quick")
    rows = _table_rows(text, 14)
    assert [r[0] for r in rows] == ["unsharded", "DDP rows", "DDP rows", "FSDP2", "FSDP2"], text[-3000:]
    one, *two = rows
    assert all(r[12] == "True" for r in rows)  # converged
    assert two[0][10] == two[1][10] and two[2][10] == two[3][10]  # each run's ranks multiplied together
    n_one = int(one[2].replace(",", ""))
    assert all(int(r[2].replace(",", "")) * 2 == n_one for r in two)  # each process holds half of the rows
    assert all(float(r[4]) > 0 and float(r[7]) > 0 for r in rows)  # a peak increase measured in every process
    for setup in ("DDP rows", "FSDP2"):
        rel = float(text.split(f"largest relative eigenvalue difference, {setup} against unsharded: ")[1].split()[0])
        assert rel < 1e-3, text[-3000:]
        assert f"{setup}: largest relative error against the reference" in text


def test_solver_overhead_quick():
    """``solver_overhead.py --quick``: the solver's own time per step, before and after, on a synthetic operator."""
    text = _run_alone("solver_overhead.py", "--quick")
    rows = _table_rows(text, 13)
    assert [r[0] for r in rows] == ["before", "after"], text[-3000:]
    assert rows[0][1] == rows[1][1]  # the same products
    assert all(float(r[9]) > 0 for r in rows)  # passes over the basis counted
    assert "same products: True; converged: True" in text, text[-3000:]
    rel = float(text.split("after against before: ")[1].split()[0])
    assert rel < 1e-5, text[-3000:]
