"""Evaluation costs: embedding throughput and global ranking time.

Run from the repository root:

    python benchmarks/eval_bench.py [--texts 512] [--images 128] [--batch-size 16]
                                    [--queries 10000] [--candidates 100000] [--dim 1536]

1. **Embedding throughput** (items/s) of the tiny model on CPU through
   ``RzenEmbedder.encode``, for text-only inputs (4 to 200 words, log-uniform, so lengths
   differ as in real corpora) and image inputs (sides from 28 to 224 pixels: 4 to 64 visual
   tokens), with length-sorted batching (what ``encode`` does) and without; the ratio is
   what sorting buys by cutting padding. Each figure is the median of ``--repeats`` runs
   after one warm-up run.
2. **Ranking** ``--queries`` queries against a global corpus of ``--candidates`` random unit
   vectors of ``--dim`` dimensions with ``score_dataset`` (blocked matrix products, then the
   tie-exact per-query metrics), split into the matrix products alone and the whole call.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rzenembed.config import ModelConfig
from rzenembed.evaluation.evalset import EvalDataset
from rzenembed.evaluation.runner import SCORE_BLOCK, score_dataset
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.modeling.tiny import build_tiny_model

WORDS = [
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "star",
    "moves",
    "left",
    "right",
    "top",
    "bottom",
    "page",
    "table",
    "row",
]


def texts(count: int, rng: np.random.Generator) -> list[EmbedInput]:
    lengths = np.exp(rng.uniform(np.log(4), np.log(200), count)).astype(int)
    return [
        EmbedInput(text=" ".join(rng.choice(WORDS, n)), instruction="Find it.") for n in lengths
    ]


def images(count: int, rng: np.random.Generator) -> list[EmbedInput]:
    out = []
    for _ in range(count):
        side = int(rng.integers(28, 225))
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        out.append(EmbedInput(images=[Image.fromarray(pixels, "RGB")], instruction="Represent."))
    return out


def throughput(embedder, items, batch_size, sort, repeats) -> float:
    embedder.encode(items[: 2 * batch_size], batch_size, sort_by_length=sort)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.encode(items, batch_size, sort_by_length=sort)
        times.append(time.perf_counter() - start)
    return len(items) / statistics.median(times)


def ranking(queries: int, candidates: int, dim: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1)
    c = torch.nn.functional.normalize(torch.randn(candidates, dim, generator=gen), dim=1)
    relevant = torch.randint(candidates, (queries,), generator=gen).tolist()
    dataset = EvalDataset(
        name="bench", category="visdoc_ood", media_root=".",
        queries=[{"qid": str(i), "candidate_ids": [], "relevant_ids": [str(r)]}
                 for i, r in enumerate(relevant)],
        candidates=[{"cid": str(i), "dataset": "bench", "candidate": {}}
                    for i in range(candidates)],
    )  # fmt: skip
    start = time.perf_counter()
    for s in range(0, queries, SCORE_BLOCK):
        (q[s : s + SCORE_BLOCK] @ c.T).numpy()
    matmul = time.perf_counter() - start
    start = time.perf_counter()
    rows = score_dataset(q, c, dataset)
    total = time.perf_counter() - start
    assert len(rows) == queries
    return {"matmul_s": matmul, "total_s": total, "queries_per_s": queries / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1536)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "tiny")
        cfg = ModelConfig(name_or_path=str(path), max_visual_tokens=64, max_text_tokens=512)
        embedder = RzenEmbedder.from_pretrained(path, config=cfg)
        print(f"torch threads {args.threads}, batch {args.batch_size}, tiny model on CPU")
        print(f"{'inputs':<8}{'items':>7}{'sorted/s':>11}{'unsorted/s':>12}{'ratio':>8}")
        for name, items in (("text", texts(args.texts, rng)), ("image", images(args.images, rng))):
            fast = throughput(embedder, items, args.batch_size, True, args.repeats)
            slow = throughput(embedder, items, args.batch_size, False, args.repeats)
            print(f"{name:<8}{len(items):>7}{fast:>11.1f}{slow:>12.1f}{fast / slow:>7.2f}x")
    r = ranking(args.queries, args.candidates, args.dim)
    print(
        f"ranking {args.queries} queries x {args.candidates} candidates, dim {args.dim}: "
        f"{r['total_s']:.1f} s ({r['queries_per_s']:.0f} queries/s), "
        f"of which matrix products {r['matmul_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
