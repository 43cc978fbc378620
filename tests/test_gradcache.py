"""GradCache gives the gradients of a full-graph step while keeping one chunk's activations.

The tiny Qwen2-VL embedder carries LoRA adapters whose B factors are randomised (they start
at zero, which would make every vision/LLM LoRA A gradient zero and hide errors), and the
loss has learnable temperatures. Gradients of all trainable parameters are compared with
``torch.testing.assert_close(atol=1e-5, rtol=1e-4)`` in float32 (``TOL``). Fast structural
checks (no_sync placement, K > 1, no negatives, RNG stream) use a float64 toy encoder, and
two gloo ranks check the DDP path end to end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from rzenembed.config import LoraConfig, LossConfig, MatryoshkaConfig
from rzenembed.losses import RzenEmbedLoss, make_loss
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.training import gradcache
from rzenembed.training.gradcache import (
    ContrastiveBatch,
    PendingChunk,
    chunk_inputs,
    gradcache_step,
    plain_step,
    prepare_batch,
)

from .conftest import random_image
from .multiprocess import gloo_rank, run_ranks

TOL = {"atol": 1e-5, "rtol": 1e-4}
BATCH = 6
SEED = 1234

# --------------------------------------------------------------------------- tiny embedder


def queries() -> list[EmbedInput]:
    words = ["dog", "cat", "red car", "a bridge at night", "two children", "snow"]
    return [EmbedInput(text=f"a photo of {w}" + " please" * i) for i, w in enumerate(words)]


def positives() -> list[EmbedInput]:
    return [
        EmbedInput(images=[random_image(i, (56, 56 + 14 * i))], instruction="Represent it.")
        if i % 2
        else EmbedInput(text=f"the answer is number {i}" + " indeed" * i)
        for i in range(BATCH)
    ]


def negatives() -> list[EmbedInput]:
    return [EmbedInput(text="something else " * (1 + i % 3)) for i in range(BATCH)]


@dataclass
class Setup:
    """A LoRA embedder, the loss and every trainable parameter, by name."""

    embedder: RzenEmbedder
    loss: RzenEmbedLoss
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    calls: list[tuple[bool, bool]] = field(default_factory=list)

    def embed(self, chunk: dict[str, Tensor]) -> Tensor:
        reps = self.embedder(**chunk)
        self.calls.append((torch.is_grad_enabled(), reps.requires_grad))
        return reps

    def loss_fn(self, q: Tensor, p: Tensor, n: Tensor | None) -> dict[str, Any]:
        return self.loss(q, p, torch.zeros(q.shape[0], dtype=torch.long), negatives=n)

    def run(self, step: Callable, chunk: int | None, **kwargs: Any) -> tuple[dict, dict]:
        """(loss dict, gradients) of one step from seed ``SEED`` with fresh gradients."""
        batch = prepare_batch(self.embedder, queries(), positives(), negatives(), 1, chunk)
        for param in self.params.values():
            param.grad = None
        self.calls.clear()
        torch.manual_seed(SEED)
        result = step(self.embed, batch, self.loss_fn, **kwargs)
        grads = {name: p.grad.clone() for name, p in self.params.items()}
        return result, grads


def make_setup(model_dir: Path, model_config: Any, dropout: float) -> Setup:
    embedder = RzenEmbedder.from_pretrained(model_dir, config=model_config)
    embedder.apply_lora(LoraConfig(r=4, alpha=8, dropout=dropout))
    embedder.train()  # LoRA dropout is only active in train mode
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in embedder.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    loss = RzenEmbedLoss(LossConfig())
    setup = Setup(embedder, loss)
    setup.params = {n: p for n, p in embedder.named_parameters() if p.requires_grad}
    setup.params["loss.theta"] = loss.theta
    return setup


@pytest.fixture(scope="module")
def no_dropout(tiny_model_dir, tiny_model_config) -> Setup:
    return make_setup(tiny_model_dir, tiny_model_config, dropout=0.0)


@pytest.fixture(scope="module")
def with_dropout(tiny_model_dir, tiny_model_config) -> Setup:
    return make_setup(tiny_model_dir, tiny_model_config, dropout=0.1)


@pytest.fixture(scope="module")
def runs(no_dropout) -> Callable[[str, int | None], tuple[dict, dict, list]]:
    """Memoised runs without dropout: (step name, chunk) -> (result, grads, embed calls)."""
    cache: dict[tuple[str, int | None], tuple[dict, dict, list]] = {}
    steps = {"plain": plain_step, "gradcache": gradcache_step}

    def get(step: str, chunk: int | None) -> tuple[dict, dict, list]:
        if (step, chunk) not in cache:
            result, grads = no_dropout.run(steps[step], chunk)
            cache[step, chunk] = (result, grads, list(no_dropout.calls))
        return cache[step, chunk]

    return get


def assert_grads_close(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m, n=name: f"{n}: {m}")


def max_difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_the_comparison_is_not_vacuous(runs):
    _, grads, _ = runs("plain", None)
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert any("visual" in n for n in lora) and any("language_model" in n for n in lora)
    for name, grad in grads.items():  # vision and LLM LoRA, A and B, and the temperature
        assert grad.abs().max() > 1e-4, f"{name} has a (near) zero gradient"


@pytest.mark.parametrize("chunk", [2, 4, 5])
def test_gradcache_matches_an_unchunked_full_graph_step(runs, chunk):
    _, want, _ = runs("plain", None)
    _, got, _ = runs("gradcache", chunk)
    assert_grads_close(got, want)


@pytest.mark.parametrize("chunk", [None, 2, 5])
def test_returned_loss_equals_the_plain_step_loss(runs, chunk):
    want, _, _ = runs("plain", None)
    got, _, _ = runs("gradcache", chunk)
    # Chunks are padded differently from the single chunk: float32 noise of ~2e-6 remains.
    torch.testing.assert_close(got["loss"], want["loss"], **TOL)
    assert got["loss"].grad_fn is None and not got["loss"].requires_grad
    assert got["per_task_loss"] == pytest.approx(want["per_task_loss"], abs=TOL["atol"])
    assert got["masked_fraction"] == want["masked_fraction"]


def test_phase_one_keeps_no_autograd_graph(runs):
    _, _, calls = runs("gradcache", 2)
    chunks = 3 * 3  # 6 queries, 6 positives and 6 negatives in chunks of 2
    assert len(calls) == 2 * chunks
    # Phase 1: no graph, so no activations are kept; phase 3: one graph per chunk.
    assert calls[:chunks] == [(False, False)] * chunks
    assert calls[chunks:] == [(True, True)] * chunks


def test_dropout_masks_are_replayed_chunk_by_chunk(with_dropout, monkeypatch):
    plain_result, want = with_dropout.run(plain_step, 2)
    plain_end = torch.get_rng_state()
    result, got = with_dropout.run(gradcache_step, 2)
    assert_grads_close(got, want)
    torch.testing.assert_close(result["loss"], plain_result["loss"], **TOL)
    # The global RNG stream ends where the plain step leaves it.
    assert torch.equal(torch.get_rng_state(), plain_end)

    # Without the replay, phase 3 draws other masks than phase 1: clearly wrong gradients.
    monkeypatch.setattr(gradcache, "restore_rng_state", lambda state: None)
    _, unreplayed = with_dropout.run(gradcache_step, 2)
    assert max_difference(unreplayed, want) > 100 * TOL["atol"]


# --------------------------------------------------------------------------- toy encoder


IN_DIM, DIM = 10, 6


class ToyEncoder(nn.Module):
    """A float64 MLP with dropout standing in for the embedder; chunks are {"x": (n, IN_DIM)}."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, DIM)
        ).double()

    def forward(self, chunk: dict[str, Tensor]) -> Tensor:
        return F.normalize(self.net(chunk["x"]), dim=-1)


class StackPreparer:
    """``prepare`` for the toy encoder: raw vectors stacked into one chunk tensor."""

    def prepare(self, items: list[Tensor]) -> dict[str, Tensor]:
        return {"x": torch.stack(items)}


def toy_data(batch: int, num_neg: int, seed: int = 1) -> tuple[list, list, list]:
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(batch, IN_DIM, generator=gen, dtype=torch.float64)
    query = pos + 0.7 * torch.randn(batch, IN_DIM, generator=gen, dtype=torch.float64)
    neg = torch.randn(batch * num_neg, IN_DIM, generator=gen, dtype=torch.float64)
    return list(query), list(pos), list(neg)


def toy_loss(matryoshka: bool = False) -> nn.Module:
    nested = MatryoshkaConfig(dims=[2, 4, DIM], weights=[1.0, 0.5, 1.0]) if matryoshka else None
    return make_loss(LossConfig(gather_across_ranks=True, matryoshka=nested)).double()


def toy_step(
    step: Callable, encoder: nn.Module, loss: RzenEmbedLoss, batch: ContrastiveBatch, **kw: Any
) -> tuple[dict, list[Tensor]]:
    params = [*encoder.parameters(), loss.theta]
    for param in params:
        param.grad = None
    rows = sum(len(c) if isinstance(c, PendingChunk) else len(c["x"]) for c in batch.queries)
    task = torch.zeros(rows, dtype=torch.long)

    def loss_fn(q: Tensor, p: Tensor, n: Tensor | None) -> dict[str, Any]:
        return loss(q, p, task, negatives=n)

    result = step(encoder, batch, loss_fn, **kw)
    return result, [param.grad.clone() for param in params]


def test_chunk_inputs_splits_in_order_with_a_ragged_tail():
    assert chunk_inputs(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert chunk_inputs(list(range(5)), None) == [[0, 1, 2, 3, 4]]
    assert chunk_inputs(list(range(5)), 0) == [[0, 1, 2, 3, 4]]
    assert chunk_inputs(list(range(3)), 8) == [[0, 1, 2]]
    assert chunk_inputs([], 4) == []
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_inputs([1], -1)


def test_prepare_batch_chunks_each_role_and_checks_counts():
    q, p, n = toy_data(5, 2)
    batch = prepare_batch(StackPreparer(), q, p, n, 2, 3)
    assert [c["x"].shape[0] for c in batch.queries] == [3, 2]
    assert batch.negatives is not None
    assert [c["x"].shape[0] for c in batch.negatives] == [3, 3, 3, 1]
    assert prepare_batch(StackPreparer(), q, p, None, 0, 3).negatives is None
    with pytest.raises(ValueError, match="flattened negatives"):
        prepare_batch(StackPreparer(), q, p, n[:-1], 2, 3)
    with pytest.raises(ValueError, match="positives"):
        prepare_batch(StackPreparer(), q, p[:-1], None, 0, 3)


@pytest.mark.parametrize("matryoshka", [False, True])
@pytest.mark.parametrize("num_neg", [0, 2])
@pytest.mark.parametrize("chunk", [None, 1, 3, 4])
def test_toy_gradcache_matches_plain_step(num_neg, chunk, matryoshka):
    """Also with nested dimensions: the summed prefix losses' gradient with respect to the
    cached full embeddings gives the plain step's gradients (same tolerance)."""
    q, p, n = toy_data(7, num_neg)
    encoder, loss = ToyEncoder(), toy_loss(matryoshka)
    reference = prepare_batch(StackPreparer(), q, p, n, num_neg, None)
    want_result, want = toy_step(plain_step, encoder, loss, reference)
    batch = prepare_batch(StackPreparer(), q, p, n, num_neg, chunk)
    result, got = toy_step(gradcache_step, encoder, loss, batch)
    assert float(result["loss"]) == pytest.approx(float(want_result["loss"]), abs=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


class CountingPreparer(StackPreparer):
    def __init__(self) -> None:
        self.calls = 0

    def prepare(self, items: list[Tensor]) -> dict[str, Tensor]:
        self.calls += 1
        return super().prepare(items)


def test_lazy_chunks_are_prepared_when_embedded_and_give_the_same_gradients():
    q, p, n = toy_data(7, 2)
    encoder, loss = ToyEncoder(), toy_loss()
    eager = prepare_batch(StackPreparer(), q, p, n, 2, 3)
    want_result, want = toy_step(gradcache_step, encoder, loss, eager)
    preparer = CountingPreparer()
    lazy = prepare_batch(preparer, q, p, n, 2, 3, lazy=True)
    assert preparer.calls == 0 and all(isinstance(c, PendingChunk) for c in lazy.chunks())
    result, got = toy_step(gradcache_step, encoder, loss, lazy)
    assert preparer.calls == 2 * len(lazy.chunks())  # phase 1 and phase 3, nothing kept
    assert float(result["loss"]) == float(want_result["loss"])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


def test_loss_sees_query_major_negatives_of_shape_b_k_d():
    q, p, n = toy_data(5, 3)
    batch = prepare_batch(StackPreparer(), q, p, n, 3, 4)
    encoder = ToyEncoder()
    seen: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def loss_fn(qr: Tensor, pr: Tensor, nr: Tensor | None) -> dict[str, Any]:
        seen.append((qr, pr, nr))
        assert nr is not None
        return {"loss": (qr * pr).sum() + (qr[:, None] * nr).sum()}

    gradcache_step(encoder, batch, loss_fn)
    (qr, pr, nr), expected = seen[0], encoder({"x": torch.stack(n)}).detach()
    assert qr.is_leaf and qr.requires_grad and qr.grad_fn is None
    assert nr is not None and nr.shape == (5, 3, DIM)
    for i in range(5):
        for k in range(3):  # negative k of query i is flattened item i * K + k
            torch.testing.assert_close(nr[i, k].detach(), expected[i * 3 + k])
    torch.testing.assert_close(pr.detach(), encoder({"x": torch.stack(p)}).detach())


def test_all_but_the_last_reembedding_run_inside_no_sync():
    q, p, n = toy_data(5, 1)
    batch = prepare_batch(StackPreparer(), q, p, n, 1, 2)  # 3 + 3 + 3 chunks
    encoder, loss = ToyEncoder(dropout=0.3).train(), toy_loss()
    events: list[str] = []
    inside = [False]

    @contextlib.contextmanager
    def no_sync() -> Iterator[None]:
        inside[0] = True
        try:
            yield
        finally:
            inside[0] = False

    def embed(chunk: dict[str, Tensor]) -> Tensor:
        if torch.is_grad_enabled():
            events.append("no_sync" if inside[0] else "sync")
        return encoder(chunk)

    def loss_fn(qr: Tensor, pr: Tensor, nr: Tensor | None) -> dict[str, Any]:
        return loss(qr, pr, torch.zeros(5, dtype=torch.long), negatives=nr)

    torch.manual_seed(SEED)
    gradcache_step(embed, batch, loss_fn, no_sync=no_sync)
    assert events == ["no_sync"] * 8 + ["sync"]


def test_rng_stream_ends_where_the_plain_step_leaves_it():
    q, p, n = toy_data(5, 1)
    batch = prepare_batch(StackPreparer(), q, p, n, 1, 2)
    encoder, loss = ToyEncoder(dropout=0.3).train(), toy_loss()
    torch.manual_seed(SEED)
    _, want = toy_step(plain_step, encoder, loss, batch)
    after_plain = torch.get_rng_state()
    torch.manual_seed(SEED)
    _, got = toy_step(gradcache_step, encoder, loss, batch)
    assert torch.equal(torch.get_rng_state(), after_plain)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)


# --------------------------------------------------------------------------- two DDP ranks

WORLD, GLOBAL_BATCH, GLOBAL_NEGS = 2, 8, 1
JOIN_TIMEOUT_S = 120


def _ddp_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank: its half of the batch through GradCache with a DDP encoder and no_sync."""
    gloo_rank(_ddp_gradcache, rank, port, out_dir, WORLD)


class TwoTowerEncoder(nn.Module):
    """Negatives go through their own tower, so the last (negative) chunk leaves the other
    tower unused, as a text-only chunk leaves Qwen2-VL's vision LoRA unused."""

    def __init__(self) -> None:
        super().__init__()
        self.main, self.negative = ToyEncoder(), ToyEncoder(dropout=0.0)

    def forward(self, chunk: dict[str, Tensor]) -> Tensor:
        return (self.negative if "negative" in chunk else self.main)(chunk)


def _rank_batch(rank: int) -> ContrastiveBatch:
    """This rank's half of the global toy batch, in chunks of 3, negatives tagged."""
    q, p, n = toy_data(GLOBAL_BATCH, GLOBAL_NEGS)
    half = GLOBAL_BATCH // WORLD
    rows = slice(rank * half, (rank + 1) * half)
    neg_rows = slice(rows.start * GLOBAL_NEGS, rows.stop * GLOBAL_NEGS)
    return tag_negatives(prepare_batch(StackPreparer(), q[rows], p[rows], n[neg_rows], 1, 3))


def tag_negatives(batch: ContrastiveBatch) -> ContrastiveBatch:
    for chunk in batch.negatives or []:
        chunk["negative"] = torch.ones(1)
    return batch


def _ddp_gradcache(rank: int) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    for name, encoder, find_unused in [
        ("dense", ToyEncoder(), False),
        ("towers", TwoTowerEncoder(), True),  # required when the last chunk skips parameters
    ]:
        batch = _rank_batch(rank)
        model = DDP(encoder, find_unused_parameters=find_unused)
        reductions: list[int] = []

        # No annotations: DDP checks them and rejects the strings that __future__ makes.
        def counting_hook(state, bucket, reductions=reductions):
            reductions.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        loss = toy_loss()
        result, _ = toy_step(gradcache_step, model, loss, batch, no_sync=model.no_sync)
        # The temperature lives outside the DDP module here: average its gradient by hand.
        dist.all_reduce(loss.theta.grad)
        loss.theta.grad /= WORLD
        out[name] = {
            "loss": float(result["loss"]),
            "grads": [*(p.grad for p in model.parameters()), loss.theta.grad],
            "reductions": len(reductions),
            "chunks": len(batch.chunks()),
        }
    return out


def test_ddp_gradcache_matches_one_process_and_reduces_once(tmp_path: Path) -> None:
    ranks = run_ranks(_ddp_rank, WORLD, tmp_path, JOIN_TIMEOUT_S)
    q, p, n = toy_data(GLOBAL_BATCH, GLOBAL_NEGS)
    for name, encoder in [("dense", ToyEncoder()), ("towers", TwoTowerEncoder())]:
        whole = tag_negatives(prepare_batch(StackPreparer(), q, p, n, GLOBAL_NEGS, None))
        want_result, want = toy_step(plain_step, encoder, toy_loss(), whole)
        results = [rank[name] for rank in ranks]
        mean_loss = sum(r["loss"] for r in results) / WORLD
        assert mean_loss == pytest.approx(float(want_result["loss"]))
        for result in results:
            assert result["chunks"] == 6  # 4 rows: 2 query, 2 positive and 2 negative chunks
            assert result["reductions"] == 1  # one bucket, all-reduced once, after the last chunk
            for g, w in zip(result["grads"], want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)
