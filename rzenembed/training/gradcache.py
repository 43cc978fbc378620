"""GradCache: contrastive steps whose global batch is not bounded by device memory.

A contrastive loss couples every query with every candidate of the (gathered) global batch,
so the usual gradient accumulation — splitting the batch and summing per-part losses —
changes the loss: each part would only see its own in-batch negatives. GradCache (Gao et
al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021) keeps
the full-batch loss and splits only the *encoder* work:

1. embed every chunk without autograd (no activations kept), remembering each chunk's RNG
   state;
2. compute the loss on the detached embeddings of the whole batch and back-propagate it to
   the embeddings alone (cheap: ``(b, D)`` tensors), caching d loss / d embedding;
3. re-embed chunk by chunk with autograd, replaying the chunk's RNG state so dropout draws
   the same masks as in phase 1, and back-propagate the cached gradient slice into the
   encoder. Only one chunk's activations are alive at any time.

By the chain rule the accumulated parameter gradients equal those of one full-graph step
over the same chunks (:func:`plain_step`, the reference the tests compare against).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

Chunk = dict[str, Tensor]
EmbedFn = Callable[[Chunk], Tensor]
LossFn = Callable[[Tensor, Tensor, Tensor | None], dict[str, Any]]
NoSyncFn = Callable[[], AbstractContextManager[Any]]


class Preparer(Protocol):
    """Anything that turns a list of inputs into processor outputs (``RzenEmbedder``)."""

    def prepare(self, items: Sequence[Any]) -> dict[str, Tensor]: ...


@dataclass
class ContrastiveBatch:
    """One rank's share of a global batch, already run through the processor, in chunks.

    ``negatives`` holds the ``b * K`` hard negatives flattened query-major (the K negatives
    of query 0, then those of query 1, ...), chunked independently of the queries; None
    means no explicit negatives (``num_negatives`` is then 0). With ``negative_mask``
    (``(b, K)`` bool), rows may have fewer than K negatives: ``negatives`` then holds only
    the real ones, in the query-major order of the True slots, and the padded slots become
    zero vectors that the loss leaves out (no placeholder is ever embedded).
    """

    queries: list[Chunk]
    positives: list[Chunk]
    negatives: list[Chunk] | None
    num_negatives: int
    negative_mask: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.queries or not self.positives:
            raise ValueError("a contrastive batch needs at least one query and one positive")
        real = self.num_negatives if self.negative_mask is None else int(self.negative_mask.sum())
        if (self.negatives is None) != (real == 0):
            raise ValueError(
                f"negatives and num_negatives disagree: {real} real negatives but negatives "
                f"is {'None' if self.negatives is None else 'given'}"
            )

    def chunks(self) -> list[Chunk]:
        """Every chunk in embedding order: queries, then positives, then negatives."""
        return [*self.queries, *self.positives, *(self.negatives or [])]


# --------------------------------------------------------------------------- preparation


@dataclass
class PendingChunk:
    """Raw items of a chunk, run through the processor only when the chunk is embedded.

    Holding processor outputs for a whole global batch would make host memory grow with
    the batch (images are float32 patches: 22 MiB per image at 1280 visual tokens), which
    is what GradCache exists to avoid; a pending chunk costs one processor pass more per
    step (phase 1 and phase 3 each prepare it) and keeps memory flat.
    """

    items: list[Any]
    preparer: Preparer
    prepare_s: float = 0.0  # seconds spent in the processor for this chunk, all passes

    def prepare(self) -> Chunk:
        started = time.perf_counter()
        chunk = self.preparer.prepare(self.items)
        self.prepare_s += time.perf_counter() - started
        return chunk

    def __len__(self) -> int:
        return len(self.items)


def materialise(chunk: Chunk | PendingChunk) -> Chunk:
    """Processor outputs of ``chunk``, preparing it now when it is pending."""
    return chunk.prepare() if isinstance(chunk, PendingChunk) else chunk


def chunk_inputs(items: Sequence[T], chunk_size: int | None) -> list[list[T]]:
    """Split ``items`` into consecutive chunks of ``chunk_size`` (the last may be shorter).

    ``None`` or 0 means "do not chunk": one chunk with everything. No items give no chunks.
    """
    if chunk_size is not None and chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 or None, got {chunk_size}")
    items = list(items)
    if not items:
        return []
    step = chunk_size or len(items)
    return [items[start : start + step] for start in range(0, len(items), step)]


def prepare_batch(
    embedder: Preparer,
    queries: Sequence[Any],
    positives: Sequence[Any],
    negatives: Sequence[Any] | None,
    num_negatives: int,
    chunk_size: int | None,
    lazy: bool = False,
    negative_mask: Tensor | None = None,
    pool: Executor | None = None,
) -> ContrastiveBatch:
    """Run the processor over each chunk of queries, positives and flattened negatives.

    Chunks are prepared separately so each is padded only to its own longest item; a chunk
    is then the unit of work of both GradCache passes. With ``lazy`` the chunks stay raw
    (``PendingChunk``) and are prepared when embedded, so host memory does not grow with
    the global batch. With ``pool`` the chunks are prepared concurrently on it (each chunk
    on its own, so the result does not depend on how many run at once).
    """
    if len(queries) != len(positives):
        raise ValueError(f"got {len(queries)} queries but {len(positives)} positives")
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    negatives = list(negatives or [])
    if negative_mask is not None:
        if tuple(negative_mask.shape) != (len(queries), num_negatives):
            raise ValueError(
                f"negative_mask has shape {tuple(negative_mask.shape)}, expected "
                f"{(len(queries), num_negatives)}"
            )
        expected = int(negative_mask.sum())
        if len(negatives) != expected:
            raise ValueError(f"negative_mask marks {expected} real negatives, got {len(negatives)}")
    elif len(negatives) != len(queries) * num_negatives:
        raise ValueError(
            f"expected {len(queries)} x {num_negatives} = {len(queries) * num_negatives} "
            f"flattened negatives, got {len(negatives)}"
        )

    def prepared(items: Sequence[Any]) -> list[Any]:
        chunks = chunk_inputs(items, chunk_size)
        if lazy:
            return [PendingChunk(chunk, embedder) for chunk in chunks]
        if pool is not None:  # every chunk of the step in flight at once, collected below
            return [pool.submit(embedder.prepare, chunk) for chunk in chunks]
        return [embedder.prepare(chunk) for chunk in chunks]

    sides = [prepared(queries), prepared(positives), prepared(negatives) if negatives else None]
    if pool is not None and not lazy:
        sides = [None if s is None else [f.result() for f in s] for s in sides]
    return ContrastiveBatch(
        queries=sides[0],
        positives=sides[1],
        negatives=sides[2],
        num_negatives=num_negatives,
        negative_mask=negative_mask,
    )


# --------------------------------------------------------------------------- RNG replay


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state and, when CUDA is in use, that of every CUDA device."""

    cpu: Tensor
    cuda: list[Tensor] | None


def capture_rng_state() -> RngState:
    """Snapshot the default generators that dropout draws from.

    CUDA states are taken only once CUDA is initialised (a model on the GPU guarantees it),
    so a CPU run never creates CUDA contexts. Other accelerators are not covered.
    """
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return RngState(cpu=torch.get_rng_state(), cuda=cuda)


def restore_rng_state(state: RngState) -> None:
    """Put the default generators back to ``state`` (see ``capture_rng_state``)."""
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state_all(state.cuda)


# --------------------------------------------------------------------------- the steps


def gradcache_step(
    embed: EmbedFn,
    batch: ContrastiveBatch,
    loss_fn: LossFn,
    no_sync: NoSyncFn | None = None,
) -> dict[str, Any]:
    """One GradCache step: accumulate into ``.grad`` the full-batch loss gradient.

    Args:
        embed: maps one prepared chunk to ``(n, D)`` embeddings, e.g. ``lambda b:
            embedder(**b)`` (or the DDP-wrapped module).
        batch: this rank's chunks.
        loss_fn: ``(query (b, D), positive (b, D), negatives (b, K, D) or None) -> dict``
            with a scalar ``"loss"``. It may gather across ranks; parameters it owns (the
            temperatures) get their gradient in phase 2, directly.
        no_sync: e.g. ``ddp_model.no_sync``. Every re-embedding but the last runs inside
            it, so DDP all-reduces the accumulated gradients once per step, after the last.

    The caller zeroes gradients before and steps the optimiser after. The global RNG
    stream ends where :func:`plain_step` over the same chunks would leave it (the state
    after phase 2, equal to the one after phase 1 when the loss draws no random numbers),
    so the next step draws fresh dropout masks. Returns the loss dict of phase 2 with
    tensors detached.

    Under DDP every rank must hold the same number of chunks (each forward and the loss
    are collective). If the last chunk can leave parameters unused (a text-only chunk skips
    the vision LoRA), wrap with ``find_unused_parameters=True``: gradients accumulated under
    ``no_sync`` are still reduced then. Parameters of ``loss_fn`` outside the DDP module
    need their gradients averaged across ranks by the caller.
    """
    chunks = batch.chunks()
    # Phase 1: embed every chunk without a graph, noting the RNG state it started from.
    states, reps = _embed_without_graph(embed, chunks)
    # Phase 2: full-batch loss on leaf copies of the embeddings; its backward gives the loss
    # parameters their gradients and caches d loss / d embedding for every row.
    query, positive, negatives = _split_roles(batch, reps, requires_grad=True)
    result = loss_fn(query, positive, _as_negatives(negatives, batch, query))
    result["loss"].backward()
    grads = _chunk_grads(reps, (query, positive, negatives))
    # The RNG state a plain step would end in (after its forward and its loss); phase 3
    # rewinds the stream chunk by chunk, so it is put back at the end.
    after = capture_rng_state()
    # Phase 3: re-embed each chunk with a graph under its phase-1 RNG state (same dropout
    # masks) and push the cached gradient through it; one chunk's activations at a time.
    for index, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
        last = index == len(chunks) - 1
        context = no_sync() if no_sync is not None and not last else contextlib.nullcontext()
        with context:
            restore_rng_state(state)
            embed(materialise(chunk)).backward(grad)
    restore_rng_state(after)
    return detach_result(result)


def plain_step(embed: EmbedFn, batch: ContrastiveBatch, loss_fn: LossFn) -> dict[str, Any]:
    """The reference: embed every chunk with autograd, compute the loss, one backward.

    Memory grows with the whole batch; the gradients are what :func:`gradcache_step` must
    reproduce when started from the same RNG state.
    """
    reps = [embed(materialise(chunk)) for chunk in batch.chunks()]
    query, positive, negatives = _split_roles(batch, reps, requires_grad=False)
    result = loss_fn(query, positive, _as_negatives(negatives, batch, query))
    result["loss"].backward()
    return detach_result(result)


def detach_result(result: dict[str, Any]) -> dict[str, Any]:
    """The loss dict with every tensor detached, so no graph outlives the step."""
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in result.items()}


# --------------------------------------------------------------------------- helpers


def _embed_without_graph(
    embed: EmbedFn, chunks: list[Chunk]
) -> tuple[list[RngState], list[Tensor]]:
    """Phase 1: per chunk, the RNG state before it and its embeddings (no autograd graph)."""
    states, reps = [], []
    for chunk in chunks:
        states.append(capture_rng_state())
        # no_grad, not inference_mode: inference tensors could not become phase 2's leaves.
        with torch.no_grad():
            reps.append(embed(materialise(chunk)))
    return states, reps


def _split_roles(
    batch: ContrastiveBatch, reps: list[Tensor], requires_grad: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Concatenate chunk embeddings into query, positive and flat ``(b*K, D)`` negatives.

    With ``requires_grad`` the results are fresh leaves (phase 2), whose ``.grad`` is the
    cached gradient; otherwise the concatenation keeps the chunks' graphs (plain step).
    """
    counts = (len(batch.queries), len(batch.positives), len(batch.negatives or []))
    parts: list[Tensor | None] = []
    start = 0
    for count in counts:
        if count == 0:
            parts.append(None)
            continue
        joined = torch.cat(reps[start : start + count])
        parts.append(joined.requires_grad_() if requires_grad else joined)
        start += count
    query, positive, negatives = parts
    assert query is not None and positive is not None  # ContrastiveBatch guarantees chunks
    if query.shape[0] != positive.shape[0]:
        raise ValueError(f"{query.shape[0]} query rows but {positive.shape[0]} positive rows")
    expected = query.shape[0] * batch.num_negatives
    if batch.negative_mask is not None:
        expected = int(batch.negative_mask.sum())
    if negatives is not None and negatives.shape[0] != expected:
        raise ValueError(f"expected {expected} negative rows, got {negatives.shape[0]}")
    return query, positive, negatives


def _as_negatives(flat: Tensor | None, batch: ContrastiveBatch, query: Tensor) -> Tensor | None:
    """Query-major negatives as the ``(b, K, D)`` the loss expects; with a mask, the real
    ones are scattered into their slots (differentiably) and padded slots stay zero."""
    if batch.num_negatives == 0:
        return None
    rows, dim = query.shape
    if batch.negative_mask is None:
        assert flat is not None
        return flat.view(rows, batch.num_negatives, dim)
    full = query.new_zeros(rows * batch.num_negatives, dim)
    if flat is not None:
        slots = batch.negative_mask.reshape(-1).nonzero().squeeze(1).to(query.device)
        full = full.index_copy(0, slots, flat.to(full.dtype))
    return full.view(rows, batch.num_negatives, dim)


def _chunk_grads(reps: list[Tensor], leaves: tuple[Tensor | None, ...]) -> list[Tensor]:
    """The cached gradient of each chunk's embeddings, in chunk order.

    A leaf the loss did not reach (no ``.grad``) contributes zeros, so its chunks are still
    re-embedded and the backward passes, collectives included, stay the same on all ranks.
    """
    flat = [
        leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        for leaf in leaves
        if leaf is not None
    ]
    grads = torch.cat(flat).split([rep.shape[0] for rep in reps])
    return list(grads)
