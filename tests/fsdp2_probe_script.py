"""Run by tests/test_sharded.py in a subprocess: the probe on FSDP2 (``fully_shard``) models, 2 CPU gloo processes.

Usage: python tests/fsdp2_probe_script.py OUT_DIR MODE

* ``functional``: ``probe_stability`` on a ``fully_shard``-ed MLP in 2 processes (``torch.multiprocessing.spawn``);
  rank r writes OUT_DIR/functional{r}.pt with its rows of the eigenvectors, the eigenvalues and the criterion.
* ``fit``: Lightning fits under ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` (the
  launcher re-executes this script for rank 1): 3 epochs with the callback, 3 without, and 2 with the callback, saved
  to a distributed checkpoint and resumed for the third. Rank r writes OUT_DIR/fit{r}.pt.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _integration_models import TinyRegressor, make_regression  # noqa: E402

from lightning_curvprobe import CurvatureStability, CurvatureStabilityCallback  # noqa: E402
from lightning_curvprobe.functional import probe_stability  # noqa: E402

PROBE = {"num_eigenvectors": 4, "sigma": 0.05, "tol": 1e-10}


def shard(net: nn.Sequential, mesh, **kwargs) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    fully_shard(net, mesh=mesh, **kwargs)


def _preflight_warning(model: nn.Module, batch) -> str | None:
    from lightning_curvprobe.functional.sharded import ShardedFunction, sharded_preflight

    return sharded_preflight(ShardedFunction(model, TinyRegressor.mean_loss), batch).difference_warning


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights (collective: every rank gathers every DTensor)."""
    out = {}
    for name, value in module.state_dict().items():
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        out[name] = full.detach().clone()
    return out


# ------------------------------------------------------------------ functional API


def functional_worker(rank: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = TinyRegressor().double()
    x, y = make_regression()[1]
    shard(model.net, init_device_mesh("cpu", (2,)))
    before = [p.to_local().clone() for p in model.parameters()]
    mine = torch.arange(rank, 16, 2)
    res = probe_stability(
        model,
        TinyRegressor.mean_loss,
        (x[mine], y[mine]),
        (x[16:20], y[16:20]),
        generator=torch.Generator().manual_seed(3),
        **PROBE,
    )
    results = {
        "eigenvalues": res.eigenvalues,
        "eigenvectors": res.eigenvectors,
        "delta2": res.delta2,
        "delta1": res.delta1,
        "delta2_stderr": res.delta2_stderr,
        "hvps": res.hvps,
    }
    # the draws of direct Monte Carlo and of the quadratic error through the metric, whose generator is its own
    # (probe_stability's draws follow the eigensolver's, which consumes its generator differently when sharded)
    metric = CurvatureStability(4, sigma=0.05, estimator="direct_mc", num_samples=16, seed=5)
    metric.update(
        model, TinyRegressor.mean_loss, (x[mine], y[mine]), (x[16:20], y[16:20]), res.eigenvectors, res.eigenvalues
    )
    results["direct_mc"] = float(metric.compute())
    results["quadratic_error"] = float(metric.details["quadratic_error"])
    untouched = all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters(), strict=True))
    grads_none = all(p.grad is None for p in model.parameters())
    warnings = {"float64": _preflight_warning(model, (x[mine], y[mine]))}
    # a bfloat16 forward (FSDP2's mixed precision) makes the finite differences unreliable: the pre-flight says so
    from torch.distributed.fsdp import MixedPrecisionPolicy

    torch.manual_seed(0)
    low = TinyRegressor()
    shard(low.net, init_device_mesh("cpu", (2,)), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    warnings["bfloat16"] = _preflight_warning(low, (x[mine].float(), y[mine].float()))
    torch.save(
        {"results": results, "untouched": untouched, "grads_none": grads_none, "warnings": warnings},
        os.path.join(out, f"functional{rank}.pt"),
    )
    dist.destroy_process_group()


# ------------------------------------------------------------------ Lightning


class ShardedRegressor(TinyRegressor):
    """TinyRegressor in float64, its MLP sharded by ``fully_shard`` on the data-parallel mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.double()

    def configure_model(self) -> None:
        shard(self.net, self.device_mesh["data_parallel"])


def trainer(max_epochs: int, callbacks: list, root: str | None = None) -> L.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def callback(probe: tuple[torch.Tensor, ...]) -> CurvatureStabilityCallback:
    return CurvatureStabilityCallback(
        num_probe_samples=16, num_added_samples=4, probe_data=probe, loss_fn=TinyRegressor.mean_loss, **PROBE
    )


def fit(epochs: int, with_callback: bool, out: str, ckpt: str | None = None, save: str | None = None) -> dict:
    L.seed_everything(0)
    train, probe = make_regression()
    model = ShardedRegressor()
    cb = callback(probe)
    t = trainer(epochs, [cb] if with_callback else [], root=out)
    loaders = (
        torch.utils.data.DataLoader(train, batch_size=16),
        torch.utils.data.DataLoader(train, batch_size=64),
    )
    t.fit(model, *loaders, ckpt_path=ckpt)
    if save is not None:
        t.save_checkpoint(save)
    return {
        "history": [dict(h) for h in cb.history] if with_callback else [],
        "basis": None if cb._basis is None else cb._basis.clone(),
        "state": full_state(model),
        "optimizer": t.optimizers[0].state_dict() if t.optimizers else None,
        "rank": t.global_rank,
        "world": t.world_size,
        "rng": torch.get_rng_state(),
        "hvp_in_use": cb.hvp_in_use,
        "probe_indices": cb._probe_indices,
    }


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "functional":
        torch.multiprocessing.spawn(functional_worker, args=(out, sys.argv[3]), nprocs=2)
        return
    torch.set_num_threads(1)
    ckpt = os.path.join(out, "two_epochs.ckpt")
    runs = {
        "with": fit(3, True, out),
        "without": fit(3, False, out),
        "two": fit(2, True, out, save=ckpt),
    }
    runs["resumed"] = fit(3, True, out, ckpt=ckpt)
    rank = runs["with"]["rank"]
    torch.save(runs, os.path.join(out, f"fit{rank}.pt"))


if __name__ == "__main__":
    main()
