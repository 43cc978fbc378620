"""How far a score could move with other queries: bootstrap intervals over queries.

An evaluation set is a sample of the queries a model will meet; with 30 queries one query
moves a dataset's score by 3 points. Every report therefore carries, beside each point
score, a 95% interval from a seeded percentile bootstrap over queries:

- a dataset's interval resamples its queries (with replacement) ``RESAMPLES`` times and
  takes the 2.5th and 97.5th percentiles of the resampled mean;
- an aggregate (a category, a modality, All) is a mean over datasets, so each of its
  resamples is the mean of its datasets' resamples, each dataset resampled on its own
  (a stratified bootstrap: the datasets are fixed, their queries are the sample);
- champion gating compares two models on the same queries, so it resamples the
  per-query *differences* (candidate minus champion, paired): the interval of the
  difference is far narrower than two separate intervals would suggest, and a candidate
  is significantly better when that interval lies above zero.

Each dataset's resamples draw from a generator seeded by (``seed``, the dataset's name),
so an interval does not change when another dataset is added to the evaluation, and a
rerun gives the same numbers.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
DRAW_BLOCK = 4_000_000  # indices drawn at once (32 MB): memory stays flat for big datasets


def _generator(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def resampled_means(
    values: Sequence[float] | np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES
) -> np.ndarray:
    """``resamples`` means of ``values`` resampled with replacement."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no query values to resample")
    out = np.empty(resamples)
    block = max(1, DRAW_BLOCK // data.size)
    for start in range(0, resamples, block):
        count = min(block, resamples - start)
        picks = rng.integers(0, data.size, size=(count, data.size))
        out[start : start + count] = data[picks].mean(axis=1)
    return out


def percentile_interval(draws: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def dataset_draws(
    per_query: Mapping[str, Sequence[float] | np.ndarray],
    seed: int = SEED,
    resamples: int = RESAMPLES,
) -> dict[str, np.ndarray]:
    """Each dataset's resampled mean scores (one generator per dataset name)."""
    return {
        name: resampled_means(values, _generator(seed, name), resamples)
        for name, values in per_query.items()
    }


def level_members(report: Mapping[str, Any]) -> dict[str, list[str]]:
    """The datasets behind every level of a report (``All``, ``Image``, ``Image/CLS``,
    ``dataset:NAME``), as ``report.levels`` names them."""
    members: dict[str, list[str]] = {"All": list(report["datasets"])}
    for name, entry in report["datasets"].items():
        members.setdefault(entry["meta"], []).append(name)
        members.setdefault(f"{entry['meta']}/{entry['column']}", []).append(name)
        members[f"dataset:{name}"] = [name]
    return members


def _per_query(report: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(entry["per_query"], dtype=np.float64)
        for name, entry in report["datasets"].items()
        if entry.get("per_query")
    }


def report_intervals(
    report: Mapping[str, Any], seed: int = SEED, resamples: int = RESAMPLES
) -> dict[str, list[float]]:
    """``[low, high]`` for every level whose datasets all kept their per-query scores."""
    draws = dataset_draws(_per_query(report), seed, resamples)
    out = {}
    for level, names in level_members(report).items():
        if all(n in draws for n in names):
            low, high = percentile_interval(np.mean([draws[n] for n in names], axis=0))
            out[level] = [low, high]
    return out


def paired_difference(
    candidate: Mapping[str, Any],
    champion: Mapping[str, Any],
    level: str,
    seed: int = SEED,
    resamples: int = RESAMPLES,
) -> dict[str, Any] | None:
    """The paired bootstrap of ``level`` between two reports of the same evaluation sets:
    the mean difference (candidate minus champion) and its interval. None when the
    reports cannot be paired (a dataset missing from either, per-query scores missing or
    of another length: not the same queries)."""
    names = level_members(candidate).get(level)
    ours, theirs = _per_query(candidate), _per_query(champion)
    if not names or any(n not in ours or n not in theirs for n in names):
        return None
    if any(ours[n].shape != theirs[n].shape for n in names):
        return None
    differences = {n: ours[n] - theirs[n] for n in names}
    draws = dataset_draws(differences, seed, resamples)
    low, high = percentile_interval(np.mean([draws[n] for n in names], axis=0))
    mean = float(np.mean([differences[n].mean() for n in names]))
    return {
        "level": level,
        "difference": mean,
        "low": low,
        "high": high,
        "confidence": CONFIDENCE,
        "resamples": resamples,
        "queries": int(sum(differences[n].size for n in names)),
    }
