"""Hit@1 of an embedder on an evaluation set in the raw JSONL layout.

An evaluation folder holds ``queries.jsonl`` and ``candidates.jsonl`` (the shapes of
``EVAL_QUERY_SCHEMA`` / ``EVAL_CANDIDATE_SCHEMA``) with media beside them. Each query is
ranked against its own ``candidate_ids`` ("local") or, when that list is empty, against
every candidate of its dataset ("global"); Hit@1 is the share of queries whose top-ranked
candidate is relevant. Candidates are embedded once per set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rzenembed.modeling import RzenEmbedder
from rzenembed.training.collate import MediaReader, to_input


@dataclass
class EvalScore:
    name: str
    category: str
    queries: int
    hit_at_1: float


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hit_at_1(
    embedder: RzenEmbedder, folder: str | Path, batch_size: int = 16, max_frames: int = 4
) -> EvalScore:
    """Score ``embedder`` on the evaluation set in ``folder``."""
    folder = Path(folder)
    queries = _read_jsonl(folder / "queries.jsonl")
    candidates = _read_jsonl(folder / "candidates.jsonl")
    reader = MediaReader(str(folder.resolve()))
    cand_vectors = embedder.encode(
        [to_input(c["candidate"], reader, max_frames) for c in candidates], batch_size
    )
    query_vectors = embedder.encode(
        [to_input(q["query"], reader, max_frames) for q in queries], batch_size
    )
    index = {c["cid"]: i for i, c in enumerate(candidates)}
    by_dataset: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        by_dataset.setdefault(c["dataset"], []).append(i)
    hits = 0
    for q, vector in zip(queries, query_vectors, strict=True):
        pool = [index[c] for c in q["candidate_ids"]] or by_dataset[q["dataset"]]
        scores = cand_vectors[torch.tensor(pool)] @ vector
        best = candidates[pool[int(scores.argmax())]]["cid"]
        hits += best in set(q["relevant_ids"])
    category = queries[0]["category"] if queries else ""
    return EvalScore(folder.name, category, len(queries), hits / max(1, len(queries)))
