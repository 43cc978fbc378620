"""Score an embedder on evaluation sets.

Candidates are embedded once per dataset and kept in a cache keyed by the model digest,
the dataset's candidates and the encoding settings, so evaluating the same model again
(another query set over the same corpus, a rerun after a crash, a report regenerated)
embeds only the queries. Media are read slice by slice while embedding, so a 100k-page
corpus never sits in memory as decoded images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from rzenembed.data.folders import write_bytes
from rzenembed.data.storage import filesystem, join
from rzenembed.evaluation.categories import category_of, main_metric
from rzenembed.evaluation.evalset import EvalDataset, discover, load_eval_folder
from rzenembed.evaluation.metrics import DEFAULT_KS, mean_metrics, rank_metrics
from rzenembed.modeling.inputs import EmbedInput
from rzenembed.training.collate import MediaReader, to_input

ENCODE_SLICE = 256  # items read from storage and embedded per slice
SCORE_BLOCK = 1024  # queries scored against a global corpus per matrix product


class Encoder(Protocol):
    def encode(self, items: Sequence[EmbedInput], batch_size: int = 16) -> torch.Tensor: ...


@dataclass
class DatasetScore:
    """The scores of one dataset: its main metric and every metric, averaged over queries."""

    name: str
    category: str
    meta: str
    column: str
    ranking: str
    queries: int
    candidates: int
    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _encode(
    encoder: Encoder, sides: Sequence[dict], reader: MediaReader, max_frames: int,
    batch_size: int, desc: str, show_progress: bool,
) -> torch.Tensor:  # fmt: skip
    parts = []
    starts = range(0, len(sides), ENCODE_SLICE)
    for start in tqdm(starts, desc=desc, disable=not show_progress, unit="slice"):
        chunk = sides[start : start + ENCODE_SLICE]
        parts.append(encoder.encode([to_input(s, reader, max_frames) for s in chunk], batch_size))
    return torch.cat(parts) if parts else torch.empty(0, 0)


def candidate_cache_key(model_digest: str, dataset: EvalDataset, max_frames: int) -> str:
    payload = json.dumps(
        [model_digest, dataset.name, dataset.media_root, max_frames, dataset.candidates],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _cached_candidates(
    encoder: Encoder, dataset: EvalDataset, reader: MediaReader, max_frames: int,
    batch_size: int, cache_dir: str | None, model_digest: str | None, show_progress: bool,
    endpoint_url: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Candidate vectors from the cache (a local folder or a URI on the storage root, so
    every node shares it), or embedded and added to it."""
    sides = [c["candidate"] for c in dataset.candidates]
    if cache_dir is None or model_digest is None:
        return _encode(encoder, sides, reader, max_frames, batch_size,
                       f"{dataset.name} candidates", show_progress)  # fmt: skip
    uri = join(str(cache_dir), f"{candidate_cache_key(model_digest, dataset, max_frames)}.pt")
    fs, path = filesystem(uri, endpoint_url)
    if fs.exists(path):
        with fs.open(path, "rb") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)
    vectors = _encode(encoder, sides, reader, max_frames, batch_size,
                      f"{dataset.name} candidates", show_progress)  # fmt: skip
    buffer = io.BytesIO()
    torch.save(vectors, buffer)
    write_bytes(uri, buffer.getvalue(), endpoint_url)  # whole or not at all
    return vectors


def score_dataset(
    query_vectors: torch.Tensor, candidate_vectors: torch.Tensor, dataset: EvalDataset,
    ks: Sequence[int] = DEFAULT_KS, ndcg_k: int = 5,
) -> list[dict[str, float]]:  # fmt: skip
    """Per-query metrics; local queries rank their own list, global ones the whole corpus."""
    index = {c["cid"]: i for i, c in enumerate(dataset.candidates)}
    rows: list[dict[str, float] | None] = [None] * len(dataset.queries)
    global_rows = []
    for qi, query in enumerate(dataset.queries):
        if query["candidate_ids"]:
            pool = [index[c] for c in query["candidate_ids"]]
            scores = (candidate_vectors[pool] @ query_vectors[qi]).numpy()
            relevant = set(query["relevant_ids"])
            gains = [1.0 if c in relevant else 0.0 for c in query["candidate_ids"]]
            rows[qi] = rank_metrics(scores, gains, ks, ndcg_k)
        else:
            global_rows.append(qi)
    for start in range(0, len(global_rows), SCORE_BLOCK):
        block = global_rows[start : start + SCORE_BLOCK]
        matrix = (query_vectors[block] @ candidate_vectors.T).numpy()
        for row, qi in zip(matrix, block, strict=True):
            gains = np.zeros(len(dataset.candidates))
            gains[[index[c] for c in dataset.queries[qi]["relevant_ids"]]] = 1.0
            rows[qi] = rank_metrics(row, gains, ks, ndcg_k)
    return [r for r in rows if r is not None]


def evaluate(
    encoder: Encoder,
    eval_paths: Sequence[str | Path] | str | Path,
    *,
    model_digest: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    max_frames: int | None = None,
    ndcg_k: int = 5,
    datasets: Sequence[str] = (),
    show_progress: bool = False,
    endpoint_url: str | None = None,
) -> list[DatasetScore]:
    """Score ``encoder`` on every dataset found under ``eval_paths`` (see ``discover``).

    ``datasets`` keeps only the named datasets (all when empty). ``max_frames`` defaults to
    the embedder's configured video frame count (4 for a plain encoder).
    """
    if isinstance(eval_paths, str | Path):
        eval_paths = [eval_paths]
    if max_frames is None:
        cfg = getattr(encoder, "cfg", None)
        max_frames = int(getattr(cfg, "video_frames", 4))
    cache = str(cache_dir) if cache_dir is not None else None
    folders = [folder for path in eval_paths for folder in discover(path)]
    results = []
    for folder in folders:
        for dataset in load_eval_folder(folder):
            if datasets and dataset.name not in datasets:
                continue
            reader = MediaReader(dataset.media_root)
            candidates = _cached_candidates(
                encoder,
                dataset,
                reader,
                max_frames,
                batch_size,
                cache,
                model_digest,
                show_progress,
                endpoint_url,
            )
            queries = _encode(encoder, [q["query"] for q in dataset.queries], reader,
                              max_frames, batch_size, f"{dataset.name} queries",
                              show_progress)  # fmt: skip
            rows = score_dataset(queries, candidates, dataset, ndcg_k=ndcg_k)
            metrics = mean_metrics(rows)
            category = category_of(dataset.category)
            metric = main_metric(dataset.category, ndcg_k)
            results.append(DatasetScore(
                name=dataset.name, category=dataset.category, meta=category.meta,
                column=category.column, ranking=dataset.ranking, queries=len(dataset.queries),
                candidates=len(dataset.candidates), metric=metric, score=metrics[metric],
                metrics=metrics,
            ))  # fmt: skip
    missing = sorted(set(datasets) - {r.name for r in results})
    if missing:
        raise ValueError(f"evaluation datasets not found: {missing}")
    return results
