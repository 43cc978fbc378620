"""Hard-negative mining costs: the nearest-neighbour search and the rules, at paper scale.

Run from the repository root:

    python benchmarks/mining_bench.py [--sizes 10000,100000,1000000] [--dim 1536]
                                      [--queries 2000] [--top-k 50] [--threads 2]

For each pool size: clustered unit vectors of ``--dim`` dimensions (items around topics,
queries drawn near pool items), the FAISS index ``rzenembed.mining.search``
builds for that size (flat inner product up to ``exact_limit``, IVF beyond), its build
time, the search time per 1,000 queries for ``--top-k`` neighbours, the index's memory
(resident set growth), the recall@top-k of the IVF index against exact search on the
same queries, and the rules (``rules.select_negatives``) per 1,000 queries. The figures in
docs/PERFORMANCE.md ("Mining") come from this script; the projection for the paper's
stage 2 (about 20 datasets x 100k rows + 400k clips) is computed there from them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rss import proc_status_kib

from rzenembed.config import MiningConfig
from rzenembed.mining.rules import select_negatives
from rzenembed.mining.search import build_index


def rss_mib() -> float:
    return proc_status_kib("VmRSS") / 1024


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    cfg = MiningConfig(top_k=args.top_k)
    print(f"dim {args.dim}, {args.queries} queries, top {args.top_k}, {args.threads} threads")
    for size in (int(s) for s in args.sizes.split(",")):
        rng = np.random.default_rng(size)
        # Clustered, as embeddings are: items around size/1000 topics (cosine about 0.6 to
        # their topic's other items), so a query's 50 nearest are a real neighbourhood
        # (uniform random vectors in 1536-d are all about equally far: no index finds
        # "their" neighbours, and recall would measure nothing).
        centres = unit(rng.standard_normal((max(10, size // 1000), args.dim)))
        pool = np.empty((size, args.dim), dtype=np.float32)
        for start in range(0, size, 100_000):  # drawn in blocks: bounded float64 temporaries
            count = min(100_000, size - start)
            topic = centres[rng.integers(len(centres), size=count)]
            noise = 0.8 * rng.standard_normal((count, args.dim)) / np.sqrt(args.dim)
            pool[start : start + count] = unit(topic + noise)
        picked = rng.choice(size, args.queries, replace=False)
        noise = 0.3 * rng.standard_normal((args.queries, args.dim)) / np.sqrt(args.dim)
        queries = unit(pool[picked] + noise).astype(np.float32)
        before = rss_mib()
        started = time.perf_counter()
        index = build_index(pool, cfg.exact_limit)
        built = time.perf_counter() - started
        memory = rss_mib() - before
        started = time.perf_counter()
        scores, candidates = index.search(queries, args.top_k)
        searched = time.perf_counter() - started
        kind = "exact" if size <= cfg.exact_limit else "ivf"
        recall = ""
        if kind == "ivf":  # exact neighbours of 200 queries by a plain product (no 2nd index)
            exact = pool @ queries[:200].T
            truth = np.argpartition(-exact, args.top_k, axis=0)[: args.top_k].T
            hits = [len(set(a) & set(b)) for a, b in zip(candidates[:200], truth, strict=True)]
            recall = f", recall@{args.top_k} {np.mean(hits) / args.top_k:.3f} vs exact"
            del exact
        started = time.perf_counter()
        select_negatives(
            queries,
            pool,
            candidates,
            scores,
            picked,
            [str(i) for i in picked],
            [str(i) for i in range(size)],
            [None] * size,
            [None] * args.queries,
            cfg,
        )
        ruled = time.perf_counter() - started
        per_k = 1000 / args.queries
        print(
            f"pool {size:>9,}: {kind} index built in {built:7.1f} s, +{memory:7.0f} MiB; "
            f"search {searched * per_k:6.2f} s / 1k queries{recall}; "
            f"rules {ruled * per_k:5.2f} s / 1k queries"
        )
        del index, pool


if __name__ == "__main__":
    main()
