"""Ranking metrics of one query, exact under tied scores.

Every metric is the expected value over all orders of tied candidates. A ranking that
breaks ties by list position (argmax takes the first) makes a score depend on how the
candidate list was written: MMEB lists put the relevant candidate first, so a collapsed
model whose scores all tie would get Hit@1 = 1.0 there. Averaged over tie orders it gets
chance, whatever the order.

Gains are linear (``gain = relevance``, not ``2^rel - 1``) and the discount at 0-based
position p is ``1 / log2(p + 2)``, as the MMEB visual-document scores use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10)


def _discounts(count: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(count, dtype=np.float64) + 2.0)


def _none_picked(size: int, relevant: int, picks: int) -> float:
    """P(none of ``relevant`` items lands among ``picks`` random slots of ``size``)."""
    if picks <= 0:
        return 1.0
    if size - relevant < picks:
        return 0.0
    i = np.arange(picks, dtype=np.float64)
    return float(np.prod((size - relevant - i) / (size - i)))


def _expected_reciprocal_rank(above: int, size: int, relevant: int) -> float:
    """E[1 / rank of the first relevant] when it sits in a tie group of ``size`` items,
    ``relevant`` of them relevant, after ``above`` strictly better candidates."""
    j = np.arange(size - relevant + 1, dtype=np.float64)
    # P(first relevant at offset >= j) = prod_{i<j} (size - relevant - i) / (size - i)
    survive = np.concatenate([[1.0], np.cumprod((size - relevant - j) / (size - j))])
    at = survive[:-1] - survive[1:]
    return float(np.sum(at / (above + j + 1.0)))


def rank_metrics(
    scores: Sequence[float] | np.ndarray,
    relevance: Sequence[float] | np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
    ndcg_k: int = 5,
) -> dict[str, float]:
    """``hit@k`` (a relevant candidate in the top k), ``recall@k``, ``ndcg@<ndcg_k>`` and
    ``mrr`` of one query, given every candidate's score and relevance (0 = not relevant;
    graded values are linear gains)."""
    scores = np.asarray(scores, dtype=np.float64)
    gains = np.asarray(relevance, dtype=np.float64)
    if scores.shape != gains.shape or scores.ndim != 1 or scores.size == 0:
        raise ValueError(f"scores {scores.shape} and relevance {gains.shape} must be equal 1-d")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    relevant = gains > 0
    total_relevant = int(relevant.sum())
    if total_relevant == 0:
        raise ValueError("a query needs at least one relevant candidate")
    n = scores.size
    depth = min(n, max(*ks, ndcg_k))
    # Every candidate that can reach the top `depth`, with its whole tie group.
    threshold = np.partition(scores, n - depth)[n - depth]
    top = np.flatnonzero(scores >= threshold)
    top = top[np.argsort(-scores[top], kind="stable")]
    values = scores[top]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(values) != 0) + 1])
    ends = np.concatenate([starts[1:], [values.size]])
    groups = [
        (int(a), int(b), int(relevant[top[a:b]].sum()), float(gains[top[a:b]].sum()))
        for a, b in zip(starts, ends, strict=True)
    ]
    out: dict[str, float] = {}
    for k in ks:
        in_top = sum(r * min(max(k - a, 0), b - a) / (b - a) for a, b, r, _ in groups)
        out[f"recall@{k}"] = in_top / total_relevant
        miss = 1.0
        for a, b, r, _ in groups:
            if a >= k:
                break
            miss *= _none_picked(b - a, r, min(k - a, b - a))
        out[f"hit@{k}"] = 1.0 - miss
    discounts = _discounts(ndcg_k)
    dcg = sum(
        g / (b - a) * discounts[a : min(b, ndcg_k)].sum() for a, b, _, g in groups if a < ndcg_k
    )
    ideal = np.sort(gains)[::-1][:ndcg_k]
    out[f"ndcg@{ndcg_k}"] = float(dcg / np.sum(ideal * discounts[: ideal.size]))
    best = scores[relevant].max()
    above = int((scores > best).sum())
    tied = scores == best
    out["mrr"] = _expected_reciprocal_rank(above, int(tied.sum()), int((tied & relevant).sum()))
    return out


def positional_metrics(
    scores: Sequence[float] | np.ndarray, relevance: Sequence[float] | np.ndarray, ndcg_k: int = 5
) -> dict[str, float]:
    """``hit@1`` and ``ndcg@<ndcg_k>`` when ties are broken by list position (the first
    listed wins), the convention of the reference MMEB harness, whose local lists put the
    relevant candidate first. Reported beside the tie-exact values so a user can see why
    two numbers for the same vectors disagree."""
    scores = np.asarray(scores, dtype=np.float64)
    gains = np.asarray(relevance, dtype=np.float64)
    n = scores.size
    depth = min(n, max(ndcg_k, 1))
    # Only candidates that can reach the top ``depth`` (with their whole tie group) are
    # ordered: by score, then by list position.
    threshold = np.partition(scores, n - depth)[n - depth]
    near = np.flatnonzero(scores >= threshold)
    order = near[np.lexsort((near, -scores[near]))]
    discounts = _discounts(ndcg_k)
    top = gains[order[:ndcg_k]]
    ideal = np.sort(gains)[::-1][:ndcg_k]
    dcg, best = np.sum(top * discounts[: top.size]), np.sum(ideal * discounts[: ideal.size])
    return {"hit@1": float(gains[order[0]] > 0), f"ndcg@{ndcg_k}": float(dcg / best)}


def mean_metrics(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-metric mean over queries."""
    if not rows:
        return {}
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
