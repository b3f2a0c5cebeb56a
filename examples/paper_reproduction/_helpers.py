"""Private helpers of ``examples/paper_reproduction.py``: data, model, training, and the paper's baselines.

- the character-level data set built from the public-domain text in ``data/`` (see ``data/PROVENANCE.md``);
- a small decoder-only transformer (the same architecture as ``tests/benchmarks/eigensolver.py``'s ``TinyGPT``);
- the seed paper's Stage I eigensolver, deflated power iteration (random start per vector, at most 30 iterations,
  stop when the Rayleigh quotient changes by less than 1e-4 relatively, Hotelling deflation), which is a baseline and
  deliberately not part of the package;
- the direct Monte Carlo estimator of the true (not quadratic-model) criterion along a subspace, written here from
  scratch with ``torch.func.functional_call`` so that it checks the package's closed form independently.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

DATA = Path(__file__).resolve().parent / "data" / "alice29.txt"

# ----------------------------------------------------------------------------------------------------------- data


def load_text(path: Path = DATA) -> str:
    """The text with CRLF line ends normalised and the trailing end-of-file byte (0x1a) dropped."""
    return path.read_bytes().decode("ascii").replace("\r\n", "\n").replace("\x1a", "")


@dataclass
class CharData:
    """Non-overlapping windows of ``context + 1`` characters; the last ``held_out`` fraction of the text is held out."""

    vocab: list[str]
    train: Tensor  # (n_train, context + 1) int64
    held_out: Tensor  # (n_held_out, context + 1) int64

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def make_data(text: str, context: int, held_out: float = 0.1) -> CharData:
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    split = int(len(ids) * (1.0 - held_out))

    def windows(x: Tensor) -> Tensor:
        n = (len(x) - 1) // context
        return torch.stack([x[i * context : i * context + context + 1] for i in range(n)])

    return CharData(vocab, windows(ids[:split]), windows(ids[split:]))


# ---------------------------------------------------------------------------------------------------------- model


class CausalBlock(nn.Module):
    """Pre-LN transformer block with hand-written causal self-attention (twice differentiable everywhere)."""

    def __init__(self, d: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d_ff)
        self.fc2 = nn.Linear(d_ff, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """Decoder-only character-level language model: token + learned position embedding, blocks, LayerNorm, head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, d_ff: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(context, d))
        self.blocks = nn.ModuleList([CausalBlock(d, heads, d_ff) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over every token of the batch's sequences (one sample = one sequence)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(
    model: nn.Module, data: Tensor, *, steps: int, batch_size: int, lr: float, generator: torch.Generator
) -> list[float]:
    """Adam with a linear warm-up (5%) and cosine decay to 10% of ``lr``; returns the training losses."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warm = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses = []
    model.train()
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(model: nn.Module, data: Tensor, chunk: int = 256) -> float:
    total, count = 0.0, 0
    for i in range(0, len(data), chunk):
        b = data[i : i + chunk]
        total += float(lm_loss(model, b)) * len(b)
        count += len(b)
    return total / count


# ------------------------------------------------------------------------------------- power iteration (the paper)


@dataclass
class PowerResult:
    eigenvalues: Tensor  # (D,) in the order found (nearly descending)
    eigenvectors: Tensor  # (N, D)
    hvps: int
    seconds: float
    iterations: list[int]
    stops: list[str]  # per vector: "rq" (Rayleigh-quotient test met) or "cap" (hit max_iter)


def deflated_power_iteration(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    num: int,
    *,
    max_iter: int = 30,
    rtol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> PowerResult:
    r"""The seed paper's Stage I: ``num`` vectors by power iteration with Hotelling deflation.

    Vector ``i`` starts from a fresh random unit vector and iterates :math:`v \leftarrow \tilde H v / \lVert\tilde H
    v\rVert` with :math:`\tilde H v = H v - \sum_{l<i} \lambda_l u_l (u_l^\top v)`, at most ``max_iter`` times,
    stopping when the Rayleigh quotient changes by less than ``rtol`` relatively. One HVP per iteration.
    """
    gen = torch.Generator().manual_seed(seed)
    U = torch.zeros(n, 0, dtype=dtype)
    lams = torch.zeros(0, dtype=dtype)
    iters, stops = [], []
    hvps = 0
    t0 = time.perf_counter()
    for _ in range(num):
        v = torch.randn(n, generator=gen, dtype=dtype)
        v /= v.norm()
        theta_old: float | None = None
        lam, stop, it = float("nan"), "cap", 0
        while it < max_iter:
            hv = matvec(v).to(dtype)
            hvps += 1
            it += 1
            w = hv - U @ (lams * (U.T @ v))  # Hotelling deflation
            theta = float(v @ w)
            v, lam = w / w.norm(), theta
            if theta_old is not None and abs(theta - theta_old) < rtol * abs(theta_old):
                stop = "rq"
                break
            theta_old = theta
        U = torch.cat([U, v[:, None]], dim=1)
        lams = torch.cat([lams, torch.tensor([lam], dtype=dtype)])
        iters.append(it)
        stops.append(stop)
    return PowerResult(lams, U, hvps, time.perf_counter() - t0, iters, stops)


def achieved_residual(matvec: Callable[[Tensor], Tensor], vectors: Tensor) -> tuple[float, Tensor]:
    r"""``(max_i ‖H u_i − ρ_i u_i‖ / max_i |ρ_i|, ρ)`` with Rayleigh quotients ``ρ`` (extra HVPs nobody counts)."""
    U = vectors.to(torch.float64)
    U = U / U.norm(dim=0, keepdim=True)
    HU = matvec(U.to(vectors.dtype)).to(torch.float64)
    rho = (U * HU).sum(dim=0)
    res = (HU - U * rho).norm(dim=0)
    return float(res.max() / rho.abs().max()), rho


# ------------------------------------------------------------------------------------ direct Monte Carlo (checks)


class _LossOf(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class FlatLoss:
    """``w ↦ loss_fn(model at w, batch)`` for a flat parameter vector (no gradients, the model is not modified)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor]) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = ["model." + n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.w0 = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.wrapper = _LossOf(model, loss_fn)

    @torch.no_grad()
    def __call__(self, w: Tensor, batch: Any) -> Tensor:
        views = torch.split(w, self.numels)
        params = {n: v.view(s) for n, v, s in zip(self.names, views, self.shapes, strict=True)}
        return torch.func.functional_call(self.wrapper, params, (batch,), strict=False)


@torch.no_grad()
def increments_at(flat: FlatLoss, w: Tensor, base: Tensor, added: Tensor) -> Tensor:
    r"""True increments :math:`\delta_j(w) = (\ell_j(w) - L_k(w))/(k+1)` of every added sequence, shape (m,)."""
    k = base.shape[0]
    base_loss = flat(w, base)
    return torch.stack([(flat(w, added[j : j + 1]) - base_loss) / (k + 1) for j in range(added.shape[0])])


@torch.no_grad()
def direct_increments(flat: FlatLoss, base: Tensor, added: Tensor, U: Tensor, z: Tensor) -> Tensor:
    r"""True increments :math:`\delta_j(w_0 + Uz_s)` at the draws ``z`` (S, D): shape (m, S).

    Two kinds of forward pass per draw: one on the ``k`` base sequences and one per added sequence.
    """
    return torch.stack([increments_at(flat, flat.w0 + U @ z[s], base, added) for s in range(z.shape[0])], dim=1)


@torch.no_grad()
def full_space_excess(
    flat: FlatLoss, base: Tensor, added: Tensor, sigma: float, pairs: int, generator: torch.Generator
) -> Tensor:
    r"""Antithetic Monte Carlo of the full-space excess :math:`\Delta_2 - \overline{a^2}`, one value per pair.

    With :math:`\xi_s \sim \mathcal N(0, \sigma^2 I_N)` each value is
    :math:`\operatorname{mean}_j [(\delta_j(w_0+\xi_s)^2 + \delta_j(w_0-\xi_s)^2)/2 - a_j^2]`: the pair cancels the
    term :math:`2a_j c_j^\top\xi_s`, which has mean zero but would otherwise swamp the excess at small ``sigma``.
    """
    a2 = increments_at(flat, flat.w0, base, added) ** 2
    out = torch.empty(pairs, dtype=flat.w0.dtype)
    for s in range(pairs):
        xi = sigma * torch.randn(flat.w0.shape, generator=generator, dtype=torch.float64).to(flat.w0.dtype)
        plus = increments_at(flat, flat.w0 + xi, base, added) ** 2
        minus = increments_at(flat, flat.w0 - xi, base, added) ** 2
        out[s] = (0.5 * (plus + minus) - a2).mean()
    return out
