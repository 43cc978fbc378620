"""Each query's nearest pool entries by inner product (cosine on normalised vectors).

FAISS does the search: an exact flat index for pools up to ``exact_limit`` entries (a few
hundred thousand: a 100k x 1536 pool is 600 MB and a query batch scans it in milliseconds
per query on a GPU, well under a second per thousand on CPU), an inverted-file index
beyond (``nlist`` = sqrt(pool) lists, trained on a seeded sample of 64 per list,
``IVF_PROBES`` lists searched), whose recall is below 1 (measured by
benchmarks/mining_bench.py) and which the report names. Queries are searched
in batches so memory stays at one batch of results.
"""

from __future__ import annotations

import math

import numpy as np

SEARCH_BATCH = 4096  # queries per FAISS call
IVF_PROBES = 32
TRAIN_PER_LIST = 64  # k-means training rows per inverted list


def _normalised(vectors: np.ndarray) -> np.ndarray:
    """Unit rows as contiguous float32; rows that already are come back uncopied (a pool of
    a million 1536-d vectors is 6 GB)."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    if np.allclose(norms, 1.0, atol=1e-4):
        return out
    return out / np.maximum(norms, 1e-12)


def build_index(pool: np.ndarray, exact_limit: int, seed: int = 0):
    """A FAISS inner-product index over ``pool`` (rows normalised here): flat when the pool
    is at most ``exact_limit`` entries, IVF (trained on 64 x nlist sampled rows) beyond."""
    import faiss

    vectors = _normalised(pool)
    size, dim = vectors.shape
    if size <= exact_limit:
        index = faiss.IndexFlatIP(dim)
    else:
        lists = max(1, int(math.sqrt(size)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(size, min(size, TRAIN_PER_LIST * lists), replace=False)]
        index.train(sample)
        index.nprobe = min(IVF_PROBES, lists)
    index.add(vectors)
    return index


def top_k(
    queries: np.ndarray, pool: np.ndarray, k: int, exact_limit: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, str]:
    """(scores, pool indices, index kind): each query's ``k`` best pool entries, best
    first; indices are -1 (score -inf) where the pool has fewer than ``k`` entries."""
    index = build_index(pool, exact_limit, seed)
    kind = "exact" if len(pool) <= exact_limit else "ivf"
    vectors = _normalised(queries)
    k = min(k, len(pool))
    scores = np.empty((len(vectors), k), dtype=np.float32)
    indices = np.empty((len(vectors), k), dtype=np.int64)
    for start in range(0, len(vectors), SEARCH_BATCH):
        part = slice(start, start + SEARCH_BATCH)
        scores[part], indices[part] = index.search(vectors[part], k)
    scores[indices < 0] = -np.inf
    return scores, indices, kind
