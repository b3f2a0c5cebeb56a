"""The probe on sharded parameters: FSDP2 (``fully_shard``) through the functional API and ModelParallelStrategy.

The 2-process runs live in ``fsdp2_probe_script.py`` (CPU, gloo). References are the same models unsharded in this
process, probed with autograd products: the sharded probe takes finite differences of the sharded model's gradients,
whose error in float64 is about 1e-9 relative per product (module docstring of ``functional/hvp.py``); on this model
the eigenvalues and ``delta2`` came out within 1e-10 of the references, and the tolerances below leave a factor of 10
to 100 over what was measured.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _integration_models import TinyRegressor, make_regression

from lightning_curvprobe import CurvatureStability
from lightning_curvprobe.functional import probe_stability
from lightning_curvprobe.functional.sharded import is_fully_sharded

HERE = Path(__file__).parent
PROBE = {"num_eigenvectors": 4, "sigma": 0.05, "tol": 1e-10}
# measured (this file's docstring): eigenvalues 8e-11, delta2 1e-11 .. 4e-11, quadratic_error 2e-9 relative
EIG_RTOL, DELTA2_RTOL, QE_RTOL = 1e-9, 1e-9, 1e-7


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("MASTER_PORT", _free_port())
    out = subprocess.run(
        [sys.executable, str(HERE / "fsdp2_probe_script.py"), str(tmp_path), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def _reference(state: dict[str, torch.Tensor] | None, indices: list[int] | None = None, **kwargs):
    torch.manual_seed(0)
    model = TinyRegressor().double()
    if state is not None:
        model.load_state_dict(state)
    x, y = make_regression()[1]
    idx = torch.arange(20) if indices is None else torch.as_tensor(indices)
    x, y = x[idx], y[idx]
    return probe_stability(
        model, TinyRegressor.mean_loss, (x[:16], y[:16]), (x[16:20], y[16:20]), hvp="autograd", **PROBE, **kwargs
    )


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.ddp
def test_functional_probe_of_a_fully_sharded_model_matches_the_unsharded_one(tmp_path):
    _run(tmp_path, "functional", _free_port())
    ranks = [torch.load(tmp_path / f"functional{r}.pt", weights_only=False) for r in range(2)]
    for r in ranks:
        assert r["untouched"], "the shards must be restored bit for bit"
        assert r["grads_none"], ".grad must be put back as it was (None)"
        # the pre-flight trusts float64 finite differences and flags those through a bfloat16 forward
        assert r["warnings"]["float64"] is None
        assert "MixedPrecisionPolicy" in r["warnings"]["bfloat16"] and "differ by" in r["warnings"]["bfloat16"]
    ref = _reference(None, generator=torch.Generator().manual_seed(3))
    r0, r1 = (r["results"] for r in ranks)
    # every process takes the same decisions on the same all-reduced numbers
    assert torch.equal(r0["eigenvalues"], r1["eigenvalues"]) and r0["hvps"] == r1["hvps"]
    assert r0["delta2"] == r1["delta2"] and r0["direct_mc"] == r1["direct_mc"]
    torch.testing.assert_close(r0["eigenvalues"], ref.eigenvalues, rtol=EIG_RTOL, atol=0)
    # the rows of the two processes make up the unsharded eigenvectors (in the shards' order)
    U = _rows_to_parameter_order(torch.cat([r0["eigenvectors"], r1["eigenvectors"]]))
    torch.testing.assert_close(U, ref.eigenvectors, rtol=0, atol=1e-7)
    for key, rtol in (("delta2", DELTA2_RTOL), ("delta1", 1e-12), ("delta2_stderr", DELTA2_RTOL)):
        assert _rel(float(r0[key]), float(getattr(ref, key))) < rtol, key
    # the same metric draws on the unsharded model, in the reference's subspace
    torch.manual_seed(0)
    model = TinyRegressor().double()
    x, y = make_regression()[1]
    metric = CurvatureStability(4, sigma=0.05, estimator="direct_mc", num_samples=16, seed=5)
    metric.update(
        model, TinyRegressor.mean_loss, (x[:16], y[:16]), (x[16:20], y[16:20]), ref.eigenvectors, ref.eigenvalues
    )
    assert _rel(r0["direct_mc"], float(metric.compute())) < DELTA2_RTOL
    assert _rel(r0["quadratic_error"], float(metric.details["quadratic_error"])) < QE_RTOL


def _rows_to_parameter_order(rows: torch.Tensor) -> torch.Tensor:
    """Rows in the sharded order (rank 0's shards of every parameter, then rank 1's) to ``named_parameters`` order.

    ``fully_shard`` splits each parameter's first dimension like ``torch.chunk`` over the 2 processes.
    """
    model = TinyRegressor().double()
    shapes = [p.shape for p in model.parameters()]
    pieces: list[list[torch.Tensor]] = [[] for _ in shapes]
    offset = 0
    for rank in range(2):
        for i, shape in enumerate(shapes):
            chunks = torch.chunk(torch.empty(shape), 2, dim=0)
            size = chunks[rank].numel() if rank < len(chunks) else 0
            pieces[i].append(rows[offset : offset + size])
            offset += size
    assert offset == rows.shape[0]
    return torch.cat([torch.cat(p) for p in pieces])


@pytest.fixture(scope="module")
def fit_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2_fit")
    _run(out, "fit")
    return [torch.load(out / f"fit{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.ddp
def test_model_parallel_fit_is_bit_identical_with_and_without_the_callback(fit_runs):
    for runs in fit_runs:
        with_cb, without = runs["with"], runs["without"]
        assert with_cb["world"] == 2 and with_cb["hvp_in_use"] == "finite_difference"
        assert len(with_cb["history"]) == 3
        for key, value in without["state"].items():
            assert torch.equal(with_cb["state"][key], value), key
        assert torch.equal(with_cb["rng"], without["rng"])
        _assert_same_state(with_cb["optimizer"], without["optimizer"])


def _assert_same_state(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        a = a.full_tensor() if hasattr(a, "full_tensor") else a
        b = b.full_tensor() if hasattr(b, "full_tensor") else b
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.ddp
def test_model_parallel_probe_matches_one_unsharded_process(fit_runs):
    r0, r1 = (runs["with"] for runs in fit_runs)
    keys = ("delta2", "delta1", "lambda_max", "hvps", "quadratic_error", "delta2_stderr", "subspace_overlap")
    for h0, h1 in zip(r0["history"], r1["history"], strict=True):
        for key in keys:
            assert h0[key] == pytest.approx(h1[key], rel=1e-13, nan_ok=True), key
    # each process holds its rows of the kept subspace: 97 parameters split 55 / 42 by fully_shard
    assert r0["basis"].shape[0] + r1["basis"].shape[0] == 97 and r0["basis"].shape[0] != 97
    ref = _reference(r0["state"], r0["probe_indices"])
    last = r0["history"][-1]
    assert _rel(last["lambda_max"], float(ref.eigenvalues[0])) < EIG_RTOL
    assert _rel(last["delta2"], float(ref.delta2)) < DELTA2_RTOL
    assert _rel(last["delta1"], float(ref.delta1)) < 1e-12
    assert _rel(last["delta2_stderr"], float(ref.delta2_stderr)) < DELTA2_RTOL


@pytest.mark.ddp
def test_model_parallel_resume_restores_each_process_rows(fit_runs):
    """2 epochs, a distributed checkpoint, and a resumed third epoch give the 3-epoch run's probe and weights."""
    for runs in fit_runs:
        straight, resumed = runs["with"], runs["resumed"]
        assert torch.equal(resumed["basis"], straight["basis"])
        for h_straight, h_resumed in zip(straight["history"], resumed["history"], strict=True):
            for key in ("delta2", "lambda_max", "hvps", "delta2_stderr", "subspace_overlap"):
                assert h_resumed[key] == pytest.approx(h_straight[key], rel=1e-13, nan_ok=True), key
        for key, value in straight["state"].items():
            assert torch.equal(resumed["state"][key], value), key


def test_plain_models_are_not_sharded():
    assert not is_fully_sharded(torch.nn.Linear(3, 2))


@pytest.mark.parametrize(
    ("name", "attrs", "match"),
    [
        ("FSDPStrategy", {}, r"got strategy FSDPStrategy\. For sharded parameters use .*ModelParallelStrategy"),
        ("DeepSpeedStrategy", {}, r"got strategy DeepSpeedStrategy\. For sharded parameters use"),
        ("ModelParallelStrategy", {"_tensor_parallel_size": 2}, r"got tensor_parallel_size=2\. Pass"),
        ("ModelParallelStrategy", {"_tensor_parallel_size": 1}, r"`sigma` must be a number .* got sigma='auto'"),
        ("ModelParallelStrategy", {"_tensor_parallel_size": 1}, r"`hvp` must be 'auto' or .* got hvp='autograd'"),
    ],
)
def test_unsupported_sharded_strategies_are_refused_at_setup(name, attrs, match):
    from lightning_curvprobe._sharding import check_strategy as _check_strategy

    class FakeTrainer:
        strategy = type(name, (), attrs)()

    with pytest.raises(ValueError, match=match):
        sigma = "auto" if "sigma" in match else 0.05
        _check_strategy(FakeTrainer(), sigma, "autograd" if "hvp" in match else "auto")  # type: ignore[arg-type]


def test_model_parallel_with_data_parallelism_only_is_accepted():
    from lightning_curvprobe._sharding import check_strategy as _check_strategy

    class FakeTrainer:
        strategy = type("ModelParallelStrategy", (), {"_tensor_parallel_size": 1})()

    _check_strategy(FakeTrainer(), 0.05)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"sample_sizes": [4, 8]}, {"full_space_samples": 4}])
def test_curve_and_full_space_reference_are_refused_with_several_processes(kwargs):
    from lightning_curvprobe import CurvatureStabilityCallback

    class FakeTrainer:
        world_size = 2
        strategy = type("DDPStrategy", (), {})()

    x, y = make_regression()[1]
    cb = CurvatureStabilityCallback(num_eigenvectors=2, num_probe_samples=16, probe_data=(x, y), **kwargs)
    with pytest.raises(ValueError, match=r"must be None and 0 with several processes .* with 2 processes"):
        cb.setup(FakeTrainer(), TinyRegressor(), "fit")  # type: ignore[arg-type]
