"""Which retrieved candidates become a query's hard negatives, and why the others do not.

Every retrieved candidate is either chosen or removed by exactly one rule, the first that
applies, in this order:

``own_positive``
    the query's own positive;
``same_item``
    another row's positive with the same content as this query's positive (the same
    text and media: one picture listed twice, one caption under two ids);
``same_group``
    a row of the query's group (``group_id``: clips of one video, identical labels, one
    document), never each other's negatives by the dataset's own statement;
``near_duplicate``
    a candidate whose embedding is within ``near_duplicate`` cosine of the positive's: the
    same item re-encoded, resized or re-captioned, which no id or URI reveals. The cosine is
    taken after the pool's mean vector is removed from both (and they are normalised
    again): embedding spaces are anisotropic, an untrained or briefly trained model puts
    every pair above 0.98, and even trained ones share a common direction; without it, a
    copy stays near 1 while unrelated items fall towards 0, so one threshold serves any
    model;
``above_percpos``
    a candidate the query scores above ``percpos`` x its positive's score (NV-Retriever's
    TopK-PercPos): so close that it is more likely an unlabelled positive than a negative
    (with a positive score at or below zero: any candidate scoring at least as high);
``skipped_rank``
    the first ``skip_first`` survivors, if configured;
``outside_window``
    survivors ranked outside ``window`` (after the skip);
``not_drawn``
    window members beyond the ``negatives`` drawn (seeded per query, so a rerun draws
    the same ones and another seed others);
``judged_relevant``
    drawn negatives a vision-language judge says also answer the query (``judge``; off
    by default), dropped without replacement.

Counts per rule are kept for the report: a rule that removes most candidates says the pool
is full of duplicates or the thresholds are off.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from rzenembed.config import MiningConfig

RULES = (
    "own_positive",
    "same_item",
    "same_group",
    "near_duplicate",
    "above_percpos",
    "skipped_rank",
    "outside_window",
    "not_drawn",
    "judged_relevant",  # applied after the draw, by the optional judge (mining.judge)
)
CHUNK = 256  # queries whose candidate vectors are gathered at once (n x k x d floats)


@dataclass
class Selection:
    """The chosen pool indices per query (best first), their scores, and the counts."""

    chosen: list[list[int]]
    scores: list[list[float]]
    removed: Counter = field(default_factory=Counter)
    positive_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    short: int = 0  # queries left with fewer than ``negatives``


def _codes(keys: Sequence[str | None]) -> np.ndarray:
    """Integer codes of keys (equal keys, equal codes); None becomes -1 (matches nothing)."""
    table: dict[str, int] = {}
    return np.array(
        [-1 if k is None else table.setdefault(k, len(table)) for k in keys], dtype=np.int64
    )


def query_seed(seed: int, row_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(row_id.encode())])


def select_negatives(
    queries: np.ndarray,
    pool: np.ndarray,
    candidates: np.ndarray,
    scores: np.ndarray,
    positive_of: Sequence[int],
    query_ids: Sequence[str],
    pool_items: Sequence[str | None],
    pool_groups: Sequence[str | None],
    query_groups: Sequence[str | None],
    cfg: MiningConfig,
    seed: int = 0,
) -> Selection:
    """Apply the rules to each query's retrieved ``candidates`` (pool indices, best first,
    -1 for none) with their ``scores``. ``queries`` and ``pool`` are L2-normalised vectors;
    ``positive_of[i]`` is the pool index of query ``i``'s positive; ``pool_items`` and
    ``pool_groups`` give each pool entry's content key and group, ``query_groups`` each
    query's group."""
    n, k = candidates.shape
    if n == 0:
        return Selection([], [], Counter(), np.zeros(0), 0)
    positive_of = np.asarray(positive_of, dtype=np.int64)
    items = _codes(pool_items)
    groups = _codes([*pool_groups, *query_groups])
    pool_group, query_group = groups[: len(pool_groups)], groups[len(pool_groups) :]
    # Each row's own positive is the pool entry of the same index (the step's case): read
    # in place, not gathered (a gathered copy of a 400k x 1536 pool is 2.4 GB).
    identity = len(pool) == n and np.array_equal(positive_of, np.arange(n))
    positive_scores = np.einsum("nd,nd->n", queries, pool if identity else pool[positive_of])
    # Centred cosines without a centred copy of the pool: (a - m).(b - m) expands to
    # a.b - a.m - b.m + m.m, with each entry's a.m and centred norm computed once.
    mean = pool.mean(axis=0, dtype=np.float64).astype(np.float32)
    shift = pool @ mean
    lengths = np.sqrt(
        np.maximum(np.einsum("nd,nd->n", pool, pool) - 2 * shift + mean @ mean, 1e-12)
    )
    rule = np.full((n, k), -1, dtype=np.int64)  # index into RULES, -1: survives so far
    valid = candidates >= 0
    safe = np.where(valid, candidates, 0)
    for start in range(0, n, CHUNK):
        rows = slice(start, min(n, start + CHUNK))
        cand, positive = safe[rows], positive_of[rows]
        dots = np.einsum("nkd,nd->nk", pool[cand], pool[positive])
        centred = dots - shift[cand] - shift[positive][:, None] + mean @ mean
        near = centred / (lengths[cand] * lengths[positive][:, None]) >= cfg.near_duplicate
        if cfg.percpos is None:
            above = np.zeros_like(near)
        else:
            own = positive_scores[rows][:, None]
            limit = np.where(own > 0, cfg.percpos * own, own)
            above = np.where(own > 0, scores[rows] > limit, scores[rows] >= limit)
        checks = [
            cand == positive[:, None],
            (items[cand] == items[positive][:, None]) & (items[positive][:, None] >= 0),
            (pool_group[cand] == query_group[rows][:, None]) & (query_group[rows][:, None] >= 0),
            near,
            above,
        ]
        block = rule[rows]
        for code, hit in enumerate(checks):
            block[(block < 0) & hit & valid[rows]] = code
        rule[rows] = block
    removed: Counter = Counter()
    for code, name in enumerate(RULES[:5]):
        removed[name] = int(np.sum(rule == code))
    low, high = cfg.window
    chosen, chosen_scores, short = [], [], 0
    for i in range(n):
        survivors = np.flatnonzero((rule[i] < 0) & valid[i])
        skipped, rest = survivors[: cfg.skip_first], survivors[cfg.skip_first :]
        window, outside = rest[low:high], np.concatenate([rest[:low], rest[high:]])
        if len(window) > cfg.negatives:
            rng = query_seed(seed, str(query_ids[i]))
            picked = np.sort(rng.choice(len(window), cfg.negatives, replace=False))
            drawn = window[picked]
        else:
            drawn = window
        removed["skipped_rank"] += len(skipped)
        removed["outside_window"] += len(outside)
        removed["not_drawn"] += len(window) - len(drawn)
        short += len(drawn) < cfg.negatives
        chosen.append([int(c) for c in candidates[i, drawn]])
        chosen_scores.append([float(s) for s in scores[i, drawn]])
    return Selection(chosen, chosen_scores, removed, positive_scores, short)
