"""Real-model cases for the issue-17 acceptance tests (``test_real_models.py``): builders, LightningModules, data and a
float64 autograd reference.

Every model is tiny (a few hundred to a few thousand parameters) so that a fit of two epochs takes a few seconds on
2 CPU cores. Each LightningModule computes its loss in a pure ``compute_loss(batch)``; its ``training_step`` returns
that loss (plus ``self.log`` calls and, for :class:`MetricsClassifier`, the user's side effects), so the callback's
default loss (``training_step``) and the reference loss (``compute_loss`` on a float64 copy) are the same function.

The reference (:class:`Float64Reference`) evaluates losses, gradients and Hessian-vector products by plain
double-backward autograd on the *real* parameters of a float64 copy of the model in eval mode (no
``functional_call``, no ``vmap``), with ``scaled_dot_product_attention`` forced to its math backend, on a twin of the
model whose forward supports double backward (not compiled, no activation checkpointing) and that has the same
trainable parameters in the same ``named_parameters()`` order. (Hugging Face's causal-LM loss casts the logits to
float32, so for GPT-2 and Llama the reference is float32-accurate in the loss, ~1e-7 relative: still far below the
tolerances of the tests, which are 1e-4 and above.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
import torchmetrics
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils import parametrizations, parametrize
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

VOCAB, SEQ = 50, 12  # language models: vocabulary and sequence length
N_TRAIN, BATCH, N_VAL = 32, 8, 8  # 4 training steps per epoch
K, M = 8, 2  # probe: base samples and added samples


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator: data never touches the global RNG."""
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------- data


def token_sequences(n: int, seed: int) -> Tensor:
    """``n`` sequences of ``SEQ`` tokens, ``x[t+1] = (x[t] + step) mod VOCAB`` with a per-sequence step in 1..3 and
    10 % of the tokens replaced at random (learnable but not trivially)."""
    g = gen(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(SEQ)) % VOCAB
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, VOCAB, (n, SEQ), generator=g), ids)


class DictDataset(Dataset):
    """Samples as dicts ``{"input_ids", "attention_mask", "labels"}`` (the Hugging Face convention)."""

    def __init__(self, ids: Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def dict_batch(ids: Tensor) -> dict[str, Tensor]:
    return {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def features(n: int, shape: tuple[int, ...], seed: int, classes: int = 3) -> tuple[Tensor, Tensor]:
    """Gaussian inputs of ``shape`` with a 3-class label from a fixed random linear score, 10 % labels flipped."""
    g = gen(seed)
    x = torch.randn(n, *shape, generator=g)
    w = torch.randn(x[0].numel(), classes, generator=gen(1234))
    y = (x.reshape(n, -1) @ w).argmax(1)
    flip = torch.rand(n, generator=g) < 0.1
    return x, torch.where(flip, torch.randint(0, classes, (n,), generator=g), y)


# ----------------------------------------------------------------------------------------------- modules


class RealModule(L.LightningModule):
    """Base: ``training_step`` returns ``compute_loss`` and logs it (step and epoch), ``validation_step`` logs
    ``val_loss``, Adam over the trainable parameters, and a count of the Trainer's training batches."""

    lr = 1e-2

    def __init__(self) -> None:
        super().__init__()
        self.training_steps = 0

    def compute_loss(self, batch: Any) -> Tensor:
        raise NotImplementedError

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.training_steps += 1  # only the Trainer's loop calls this hook

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.compute_loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    def user_state(self) -> dict[str, Any]:
        """The user's Python-side state that the probe must leave exactly as it was."""
        return {"training_steps": self.training_steps}


class HFCausalLM(RealModule):
    """A tiny Hugging Face GPT-2 or Llama with random weights (default attention implementation: sdpa)."""

    def __init__(self, arch: str = "gpt2") -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        # no pad_token_id: Llama's embedding would get padding_idx=0, whose zeroed gradient row is no gradient of the
        # loss (the "Hessian" of double backward is then not symmetric) while token 0 occurs in the data
        ids = dict(bos_token_id=0, eos_token_id=0)
        if arch == "gpt2":  # tied lm_head / wte, dropout 0.1 in training (draws from the global RNG)
            config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16, **ids)
            self.model = GPT2LMHeadModel(config)
        elif arch == "llama":
            config = LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                vocab_size=VOCAB,
                max_position_embeddings=16,
                **ids,
            )
            self.model = LlamaForCausalLM(config)
        else:
            raise ValueError(arch)
        self.arch = arch

    def compute_loss(self, batch: Any) -> Tensor:
        return self.model(**batch).loss


class EncoderClassifier(RealModule):
    """``nn.TransformerEncoder`` (batch_first, 2 layers, dropout 0.1): eval-mode fast path, SDPA inside."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.encoder(self.proj(x)).mean(1)), y)


class ResNetCNN(RealModule):
    """A ResNet-style CNN: frozen stem (conv + BatchNorm, ``requires_grad=False``), one residual block with two
    BatchNorms, global average pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        for p in self.stem.parameters():
            p.requires_grad_(False)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        h = self.stem(x)
        h = F.relu(h + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h))))))
        return F.cross_entropy(self.head(h.mean((2, 3))), y)


class CompiledMLP(RealModule):
    """A middle block compiled with ``torch.compile(..., backend="aot_eager")`` (no double backward there)."""

    def __init__(self, compiled: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 16)
        block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.block = torch.compile(block, backend="aot_eager") if compiled else block
        self.head = nn.Linear(16, 3)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(self.block(torch.tanh(self.inp(x)))), y)


class _SoftplusOnce(torch.autograd.Function):
    """softplus with a hand-written backward marked ``once_differentiable`` (like many custom kernels): gradients
    work, double backward raises."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


class CustomFunctionMLP(RealModule):
    """An activation implemented as a custom ``autograd.Function`` without double backward (and without a vmap rule);
    ``custom=False`` is the same network with ``F.softplus`` (the reference twin)."""

    def __init__(self, custom: bool = True) -> None:
        super().__init__()
        self.custom = custom
        self.inp = nn.Linear(6, 16)
        self.hidden = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        act = _SoftplusOnce.apply if self.custom else F.softplus
        return F.cross_entropy(self.head(act(self.hidden(torch.tanh(self.inp(x))))), y)


class AliasedBackbone(RealModule):
    """``self.backbone = self.net[:2]``: the first Linear is reachable as ``net.0`` and as ``backbone.0``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
        self.backbone = self.net[:2]

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


class Symmetric(nn.Module):
    """``W = triu(A) + triu(A, 1)ᵀ``: a simple ``torch.nn.utils.parametrize`` parametrization."""

    def forward(self, a: Tensor) -> Tensor:
        return a.triu() + a.triu(1).transpose(-1, -2)


class TiedParametrizedLM(RealModule):
    """Next-token model: embedding and output head share one Parameter; one Linear's weight is symmetric
    (``parametrize.register_parametrization``) and another's orthogonal (``parametrizations.orthogonal``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 16)
        self.sym = nn.Linear(16, 16)
        parametrize.register_parametrization(self.sym, "weight", Symmetric())
        self.orth = parametrizations.orthogonal(nn.Linear(16, 16))
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.emb.weight  # weight tying

    def compute_loss(self, batch: Any) -> Tensor:
        ids = batch[0]
        h = torch.tanh(self.orth(torch.tanh(self.sym(self.emb(ids[:, :-1])))))
        return F.cross_entropy(self.head(h).reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


class CheckpointMLP(RealModule):
    """A block (with Dropout) run through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=...)`` in every
    forward, training or not; ``use_reentrant=None`` runs it plainly (the reference twin)."""

    def __init__(self, use_reentrant: bool | None = True) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.inp = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        h = torch.tanh(self.inp(x))
        if self.use_reentrant is None:
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return F.cross_entropy(self.head(h), y)


class MetricsClassifier(RealModule):
    """A ``training_step`` with the usual side effects: torchmetrics updated and logged, the loss appended to a
    Python list (as a tensor) and summed as a float (``.item()``), an int counter. The metric states are snapshotted
    in the module's own ``on_validation_epoch_end`` (Lightning calls it after the callbacks' hook, so after the probe)
    and ``on_train_epoch_end``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.seen = torchmetrics.SumMetric()  # updated, never logged (so never reset by Lightning)
        self.outputs: list[Tensor] = []
        self.loss_sum = 0.0
        self.calls = 0
        self.snapshots: list[dict[str, Any]] = []

    def compute_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        self.seen.update(torch.tensor(float(y.shape[0])))
        self.outputs.append(loss.detach().clone())
        self.loss_sum += loss.item()
        self.calls += 1
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def _snapshot(self, hook: str) -> None:
        self.snapshots.append(
            {
                "hook": hook,
                "acc": {k: v.clone() for k, v in self.train_acc.metric_state.items()},
                "acc_updates": self.train_acc._update_count,
                "seen": {k: v.clone() for k, v in self.seen.metric_state.items()},
                "outputs": len(self.outputs),
                "calls": self.calls,
            }
        )

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._snapshot("on_validation_epoch_end")

    def on_train_epoch_end(self) -> None:
        self._snapshot("on_train_epoch_end")

    def user_state(self) -> dict[str, Any]:
        return {
            **super().user_state(),
            "outputs": list(self.outputs),
            "loss_sum": self.loss_sum,
            "calls": self.calls,
            "snapshots": list(self.snapshots),
            "acc": {k: v.clone() for k, v in self.train_acc.metric_state.items()},
            "acc_updates": self.train_acc._update_count,
            "seen": {k: v.clone() for k, v in self.seen.metric_state.items()},
            "seen_updates": self.seen._update_count,
        }


# ----------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One model: how to build it (after ``seed_everything``), its twin for the reference, data and extras."""

    name: str
    make: Callable[[], RealModule]
    make_reference: Callable[[], RealModule]
    train: Callable[[], DataLoader]
    val: Callable[[], DataLoader]
    probe_data: Any  # K base + M added samples
    extra_callbacks: Callable[[], list[L.Callback]] = field(default=lambda: [])
    before_fit: Callable[[], None] = field(default=lambda: None)
    # probe scale: large enough that the c and B terms carry >= ~20 % of delta2 (measured at these weights), so that
    # the comparison with the reference checks the subspace part too, not only a² (SPEC §1)
    sigma: float = 0.1


def _loaders(dataset: Dataset, val: Dataset) -> tuple[Callable[[], DataLoader], Callable[[], DataLoader]]:
    # the training loader shuffles with the global RNG: a probe that touched it would change the batches
    return (lambda: DataLoader(dataset, batch_size=BATCH, shuffle=True)), (lambda: DataLoader(val, batch_size=N_VAL))


def lm_case(arch: str) -> Case:
    train, val = _loaders(DictDataset(token_sequences(N_TRAIN, 0)), DictDataset(token_sequences(N_VAL, 1)))
    return Case(
        arch,
        lambda: HFCausalLM(arch),
        lambda: HFCausalLM(arch),
        train,
        val,
        dict_batch(token_sequences(K + M, 2)),
        sigma=0.03,
    )


def _tensor_case(name: str, make: Callable[..., RealModule], shape: tuple[int, ...], **kw: Any) -> Case:
    train, val = _loaders(TensorDataset(*features(N_TRAIN, shape, 0)), TensorDataset(*features(N_VAL, shape, 1)))
    ref = kw.pop("make_reference", make)
    return Case(name, make, ref, train, val, features(K + M, shape, 2), **kw)


def encoder_case() -> Case:
    return _tensor_case("transformer_encoder", EncoderClassifier, (6, 4))


def cnn_case() -> Case:
    return _tensor_case("resnet_cnn", ResNetCNN, (3, 8, 8), sigma=0.1)


def compiled_case() -> Case:
    return _tensor_case(
        "compiled",
        lambda: CompiledMLP(compiled=True),
        (6,),
        make_reference=lambda: CompiledMLP(compiled=False),
        before_fit=torch._dynamo.reset,  # both runs start from the same (empty) compile caches
        sigma=0.3,
    )


def custom_function_case() -> Case:
    return _tensor_case(
        "custom_function",
        lambda: CustomFunctionMLP(custom=True),
        (6,),
        make_reference=lambda: CustomFunctionMLP(custom=False),
        sigma=0.3,
    )


def backbone_case() -> Case:
    from lightning.pytorch.callbacks import BackboneFinetuning

    return _tensor_case(
        "backbone_finetuning",
        AliasedBackbone,
        (6,),
        extra_callbacks=lambda: [BackboneFinetuning(unfreeze_backbone_at_epoch=1, verbose=False)],
        sigma=0.3,
    )


def tied_case() -> Case:
    train, val = _loaders(TensorDataset(token_sequences(N_TRAIN, 0)), TensorDataset(token_sequences(N_VAL, 1)))
    return Case(
        "tied_parametrized", TiedParametrizedLM, TiedParametrizedLM, train, val, (token_sequences(K + M, 2),), sigma=0.2
    )


def checkpoint_case(use_reentrant: bool) -> Case:
    return _tensor_case(
        f"checkpoint_reentrant={use_reentrant}",
        lambda: CheckpointMLP(use_reentrant),
        (6,),
        make_reference=lambda: CheckpointMLP(None),
        sigma=0.3,
    )


def metrics_case() -> Case:
    return _tensor_case("torchmetrics_side_effects", MetricsClassifier, (6,), sigma=0.2)


# ----------------------------------------------------------------------------------------------- float64 reference


def canonical(name: str) -> str:
    """A parameter or state_dict name without ``torch.compile``'s ``_orig_mod.`` level."""
    return name.replace("_orig_mod.", "")


def reference_copy(case: Case, module: nn.Module) -> RealModule:
    """A float64, eval-mode twin of ``module`` (fresh instance of ``case.make_reference``) with its state and its
    ``requires_grad`` flags; the trainable parameters come in the same order as ``module``'s."""
    ref = case.make_reference()
    state = {canonical(k): v for k, v in module.state_dict().items()}
    ref.load_state_dict(state)
    flags = {canonical(n): p.requires_grad for n, p in module.named_parameters()}
    for n, p in ref.named_parameters():
        p.requires_grad_(flags[n])
    ref.double().eval()
    mine = [(canonical(n), p.shape) for n, p in module.named_parameters() if p.requires_grad]
    theirs = [(n, p.shape) for n, p in ref.named_parameters() if p.requires_grad]
    assert mine == theirs, (mine, theirs)
    return ref


def _to64(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to64(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to64(v) for v in batch)
    return batch


def select(batch: Any, lo: int, hi: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[lo:hi]
    if isinstance(batch, dict):
        return {k: select(v, lo, hi) for k, v in batch.items()}
    return type(batch)(select(v, lo, hi) for v in batch)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread for the reference's tiny float64 kernels (on a busy 2-core machine OpenMP's barriers
    made them ~100x slower than one thread); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def math_sdpa() -> Iterator[None]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        yield


class Float64Reference:
    """Loss, gradient and Hessian-vector products of ``model.compute_loss`` by plain autograd in float64."""

    def __init__(self, model: RealModule) -> None:
        self.model = model
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.N = sum(p.numel() for p in self.params)

    def _flat(self, tensors: Any) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    def grad(self, batch: Any, create_graph: bool = False) -> tuple[Tensor, Tensor]:
        with math_sdpa():
            loss = self.model.compute_loss(_to64(batch))
            g = torch.autograd.grad(
                loss, self.params, create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
        return loss, self._flat(g)

    def hessian_apply(self, batch: Any, V: Tensor, chunk: int = 128) -> Tensor:
        """``H V`` for ``V`` of shape ``(N, b)``: batched double-backward passes of ``chunk`` columns
        (``is_grads_batched``), one pass per column where the batched pass is not supported."""
        _, g = self.grad(batch, create_graph=True)
        cols = []
        with math_sdpa():
            for lo in range(0, V.shape[1], chunk):
                part = V[:, lo : lo + chunk].T.contiguous()
                try:
                    hv = torch.autograd.grad(
                        g, self.params, part, retain_graph=True, is_grads_batched=True, allow_unused=True,
                        materialize_grads=True,
                    )  # fmt: skip
                    cols.append(torch.cat([t.reshape(part.shape[0], -1) for t in hv], 1).T)
                except RuntimeError:
                    for i in range(part.shape[0]):
                        hv = torch.autograd.grad(
                            g, self.params, part[i], retain_graph=True, allow_unused=True, materialize_grads=True
                        )
                        cols.append(self._flat(hv)[:, None])
        return torch.cat(cols, 1)

    def top_eigenvalues(self, batch: Any, D: int, dense_max: int = 1000) -> Tensor:
        """The top-``D`` eigenvalues of the Hessian on ``batch``, descending: dense ``eigh`` up to ``dense_max``
        parameters, ARPACK (``scipy.sparse.linalg.eigsh``, tol 1e-12) on the autograd products above."""
        if self.N <= dense_max:
            H = self.hessian_apply(batch, torch.eye(self.N, dtype=torch.float64))
            return torch.linalg.eigvalsh(0.5 * (H + H.T)).flip(0)[:D]
        from scipy.sparse.linalg import LinearOperator, eigsh

        _, g = self.grad(batch, create_graph=True)

        def matvec(v: np.ndarray) -> np.ndarray:
            with math_sdpa():
                vt = torch.from_numpy(np.ascontiguousarray(v).reshape(-1))
                hv = torch.autograd.grad(
                    g, self.params, vt, retain_graph=True, allow_unused=True, materialize_grads=True
                )
            return self._flat(hv).numpy()

        op = LinearOperator((self.N, self.N), matvec=matvec, dtype=np.float64)
        v0 = torch.randn(self.N, generator=gen(0), dtype=torch.float64).numpy()
        vals = eigsh(op, k=D, which="LA", tol=1e-12, v0=v0, return_eigenvectors=False)
        return torch.from_numpy(np.sort(vals)[::-1].copy())

    def criterion_at(self, U: Tensor, base: Any, added: Any, sigma: float) -> dict[str, Any]:
        """SPEC §1 at the subspace ``U`` (N x D): ``a, c, B`` of every added sample from ``UᵀH_kU`` (the exact
        projection, not the eigenvalues), the Gaussian-moment ``delta2`` (mean over added samples) and ``delta1``."""
        U = U.detach().to(torch.float64)
        k = _first(base).shape[0]
        m = _first(added).shape[0]
        Lk, gk = self.grad(base)
        Lk, gk = Lk.detach(), gk.detach()
        P = U.T @ self.hessian_apply(base, U)
        P = 0.5 * (P + P.T)
        a, c, B = [], [], []
        for j in range(m):
            one = select(added, j, j + 1)
            lj, gj = self.grad(one)
            a.append((lj.detach() - Lk) / (k + 1))
            c.append(U.T @ (gj.detach() - gk) / (k + 1))
            Pj = U.T @ self.hessian_apply(one, U)
            Bj = (0.5 * (Pj + Pj.T) - P) / (k + 1)
            B.append(Bj)
        a_t, c_t, B_t = torch.stack(a), torch.stack(c), torch.stack(B)
        s2 = sigma**2
        trB = B_t.diagonal(dim1=1, dim2=2).sum(-1)
        trB2 = (B_t * B_t.transpose(1, 2)).sum((1, 2))
        gm = a_t**2 + a_t * s2 * trB + s2 * (c_t**2).sum(-1) + (s2**2 / 4) * (2 * trB2 + trB**2)
        return {
            "a": a_t,
            "c": c_t,
            "B": B_t,
            "P": P,
            "base_loss": float(Lk),
            "delta2": float(gm.mean()),
            "delta1": float(a_t.abs().mean()),
            "a2": float((a_t**2).mean()),
        }

    def residuals(self, base: Any, U: Tensor, theta: Tensor) -> Tensor:
        """``‖H_k u_i − θ_i u_i‖`` of the given pairs under the float64 Hessian."""
        U = U.detach().to(torch.float64)
        HU = self.hessian_apply(base, U)
        return (HU - U * theta.to(torch.float64)).norm(dim=0)


def _first(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch
    return next(t for t in (_first(v) for v in values) if t is not None)


EPS32 = float(torch.finfo(torch.float32).eps)


def loss_abs_error(base_loss: float, k: int) -> float:
    """Bound used for ``a = (ℓ_j − L_k)/(k+1)`` computed in float32: the losses (sums of at most a few hundred
    float32 terms) carry a relative error well below 64 ulp, so ``|Δa| ≤ 2 · 64 · eps32 · |L| / (k+1)``."""
    return 2 * 64 * EPS32 * max(abs(base_loss), 1.0) / (k + 1)


def isfinite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)
