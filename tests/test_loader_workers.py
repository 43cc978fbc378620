"""The processor runs over a step's chunks on several threads (``compute.loader_workers``),
each thread with its own processor: every chunk comes out exactly as one thread would make
it, in order, and the chunks really run at once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rzenembed.modeling.embedder import ThreadLocalPreparer
from rzenembed.training.gradcache import prepare_batch


def _items(image_factory, count: int, offset: int) -> list[dict]:
    return [
        {
            "text": f"item {offset + i}",
            "images": [image_factory(offset + i, (56 + 28 * (i % 2), 84))],
        }
        for i in range(count)
    ]


def test_threads_with_their_own_processors_pad_every_chunk_right(tiny_embedder):
    """The fast tokenizer keeps its padding settings on one shared object, so threads that
    share one processor pad some of 200 such chunks to the wrong length (seen as
    ``ValueError: ... same length``); with a processor per thread every chunk is exact."""
    chunks = [[f"word {j} " * (1 + (i * 7 + j) % 13) for j in range(4)] for i in range(200)]
    preparer = ThreadLocalPreparer(tiny_embedder)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(preparer.prepare, chunks))
    for chunk, out in zip(chunks, got, strict=True):
        assert torch.equal(out["input_ids"], tiny_embedder.prepare(chunk)["input_ids"])


def test_concurrent_chunks_equal_the_serial_ones_on_the_real_processor(
    tiny_embedder, image_factory
):
    queries = [f"query number {i} " * (1 + i % 3) for i in range(6)]
    positives = _items(image_factory, 6, 0)
    negatives = _items(image_factory, 6, 100)
    serial = prepare_batch(tiny_embedder, queries, positives, negatives, 1, 2)
    preparer = ThreadLocalPreparer(tiny_embedder)
    with ThreadPoolExecutor(3) as pool:
        concurrent = prepare_batch(preparer, queries, positives, negatives, 1, 2, pool=pool)
    assert len(serial.chunks()) == len(concurrent.chunks()) == 9
    for mine, theirs in zip(serial.chunks(), concurrent.chunks(), strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), key


class _SlowPreparer:
    """Sleeps in ``prepare`` (as decode does, without the GIL) and counts who overlaps."""

    def __init__(self):
        self.running, self.peak, self.lock = 0, 0, threading.Lock()

    def prepare(self, items):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return {"x": torch.tensor([float(len(items))])}


def test_the_chunks_of_all_three_roles_are_in_flight_together():
    preparer = _SlowPreparer()
    items = list(range(8))
    with ThreadPoolExecutor(4) as pool:
        batch = prepare_batch(preparer, items, items, items, 1, 2, pool=pool)
    assert preparer.peak == 4  # 12 chunks over three roles, four threads busy at once
    assert [float(c["x"]) for c in batch.chunks()] == [2.0] * 12
