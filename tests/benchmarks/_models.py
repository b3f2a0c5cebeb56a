"""Models, data and measuring helpers shared by the benchmark scripts in this folder (not collected by pytest).

- the quickstart's ``Regressor`` and data (imported from ``examples/quickstart.py``);
- ``GPT``: the paper-reproduction example's decoder-only transformer with hand-written causal attention (twice
  differentiable on every device, so Hessian-vector products by double backward work), sized by ``GPT_SIZES``;
  ``GPTModule`` wraps it for Lightning;
- ``markov_tokens``: synthetic token sequences from a random sparse Markov chain (nothing is downloaded);
- ``deflated_power``: the seed paper's deflated power iteration (the baseline of SPEC §2), device-aware;
- ``achieved_residual``: ``max_i ‖H u_i − ρ_i u_i‖ / max_i |ρ_i|`` recomputed with extra, uncounted products;
- ``peak_rss_mib`` / ``current_rss_mib``: VmHWM / VmRSS of this process from ``/proc/self/status``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quickstart_module() -> Any:
    """``examples/quickstart.py`` as a module (its ``Regressor`` and ``make_data``)."""
    path = os.path.join(ROOT, "examples")
    if path not in sys.path:
        sys.path.insert(0, path)
    import quickstart  # noqa: PLC0415

    return quickstart


# ------------------------------------------------------------------------------------------------------ transformer


def load_module(name: str, path: str) -> Any:
    """The Python file ``path`` as the module ``name`` (once; registered first, as its dataclasses look it up)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _paper_helpers() -> Any:
    """``examples/paper_reproduction/_helpers.py`` (loaded by path: its folder shares the example script's name)."""
    path = os.path.join(ROOT, "examples", "paper_reproduction", "_helpers.py")
    return load_module("paper_reproduction_helpers", path)


#: the example's transformer (pre-LN blocks with hand-written causal attention, learned positions, untied head)
GPT = _paper_helpers().TinyGPT


def gpt_num_params(vocab: int, d: int, layers: int, heads: int, d_ff: int, context: int) -> int:
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * d_ff + d_ff) + (d_ff * d + d)
    return vocab * d + context * d + layers * per_block + 2 * d + d * vocab + vocab


#: named transformer sizes: (vocab, d, layers, heads, d_ff, context)
GPT_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (32, 32, 2, 2, 64, 16),  # ~30k
    "small": (32, 64, 2, 4, 256, 32),  # ~110k, the overhead benchmark's transformer
    "10m": (256, 320, 8, 8, 1280, 32),  # ~10.0M, the memory benchmark
    "100m": (8192, 768, 12, 12, 3072, 1024),  # ~98M, the GPU paper-scale benchmark
}


def make_gpt(size: str | tuple[int, ...], seed: int = 0) -> GPT:
    cfg = GPT_SIZES[size] if isinstance(size, str) else size
    torch.manual_seed(seed)
    return GPT(*cfg)


def lm_loss(model: nn.Module, batch: Any) -> Tensor:
    """Mean next-token cross-entropy of a batch of sequences ``(b, t + 1)``."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def markov_tokens(num: int, length: int, vocab: int, seed: int = 3, concentration: float = 0.2) -> Tensor:
    """``num`` sequences of ``length`` tokens from a random Markov chain with Dirichlet(``concentration``) rows."""
    g = torch.Generator().manual_seed(seed)
    gamma = torch.distributions.Gamma(torch.full((vocab,), concentration), torch.ones(vocab))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        trans = gamma.sample((vocab,))
    trans = trans / trans.sum(dim=1, keepdim=True)
    seqs = torch.empty(num, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (num,), generator=g)
    for t in range(length - 1):
        seqs[:, t + 1] = torch.multinomial(trans[seqs[:, t]], 1, generator=g)[:, 0]
    return seqs


def gpt_lightning_module(size: str | tuple[int, ...], lr: float = 3e-3, seed: int = 0) -> Any:
    """A ``LightningModule`` training ``make_gpt(size)`` with Adam on next-token cross-entropy."""
    import lightning as L  # noqa: PLC0415, N812

    class GPTModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_gpt(size, seed)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = lm_loss(self.net, batch)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", lm_loss(self.net, batch))

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=lr)

    return GPTModule()


# ------------------------------------------------------------------------------------------- power iteration (paper)


@dataclass
class PowerResult:
    values: Tensor
    vectors: Tensor
    hvps: int
    iters: list[int] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)  # "rq" (the paper's test met) or "cap" (max_iter reached)
    seconds: float = 0.0


def deflated_power(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    k: int,
    *,
    max_iter: int = 30,
    rtol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    budget_s: float | None = None,
) -> PowerResult:
    """The seed paper's deflated power iteration (SPEC §2): random start per vector, at most ``max_iter`` iterations,
    stop when the Rayleigh quotient changes by less than ``rtol`` relatively, Hotelling deflation
    ``H_defl v = H v − Σ_i λ_i u_i (u_iᵀ v)``. ``budget_s`` stops after the vector during which it ran out.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    U = torch.zeros(n, 0, dtype=dtype, device=device)
    lams = torch.zeros(0, dtype=dtype, device=device)
    iters, stops, hvps = [], [], 0
    t0 = time.perf_counter()
    for _ in range(k):
        v = torch.randn(n, generator=gen, dtype=dtype, device=device)
        v /= v.norm()
        theta_old: float | None = None
        lam, stop, it = float("nan"), "cap", 0
        while it < max_iter:
            hv = matvec(v).reshape(n).to(dtype)
            hvps += 1
            it += 1
            w = hv - U @ (lams * (U.T @ v))
            theta = float(v @ w)
            v, lam = w / w.norm(), theta
            if theta_old is not None and abs(theta - theta_old) < rtol * abs(theta_old):
                stop = "rq"
                break
            theta_old = theta
        U = torch.cat([U, v[:, None]], dim=1)
        lams = torch.cat([lams, torch.tensor([lam], dtype=dtype, device=device)])
        iters.append(it)
        stops.append(stop)
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            break
    return PowerResult(lams, U, hvps, iters, stops, time.perf_counter() - t0)


def achieved_residual(matvec: Callable[[Tensor], Tensor], U: Tensor, chunk: int = 8) -> tuple[float, Tensor]:
    """``(max_i ‖H u_i − ρ_i u_i‖ / max_i |ρ_i|, ρ)`` for the columns of ``U`` (normalised), in chunks of columns."""
    res, rhos = [], []
    for lo in range(0, U.shape[1], chunk):
        V = U[:, lo : lo + chunk]
        V = V / V.norm(dim=0, keepdim=True)
        HV = matvec(V).reshape(V.shape).to(V.dtype)
        rho = (V * HV).sum(dim=0)
        res.append((HV - V * rho).norm(dim=0))
        rhos.append(rho)
        del HV
    r, rho = torch.cat(res), torch.cat(rhos)
    return float(r.max() / rho.abs().max()), rho


# ---------------------------------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (VmHWM), MiB."""
    return _status_kib("VmHWM") / 1024


def current_rss_mib() -> float:
    """Resident set size now (VmRSS), MiB."""
    return _status_kib("VmRSS") / 1024


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
