"""MMEB-V2 score files in the leaderboard's shape, and the leaderboard's aggregation.

The benchmark publishes one JSON per model: ``metadata`` and ``metrics`` grouped by
modality (``image``, ``video``, ``visdoc``), each dataset by its benchmark key with its
metrics (``hit@1``, ``ndcg_linear@5``, ...) and ``num_pred``/``num_data``. A dataset's
main score is ``hit@1`` (image, video) or ``ndcg_linear@5`` (visual documents); a
sub-category's score is the mean over its datasets, a modality's the mean over its
datasets, and the overall score the mean over every dataset (not over modalities).

Files are written with the reference's current keys (the fixed page splits as
``ViDoSeek-page-fixed`` and ``MMLongBench-page-fixed``) and read with every key it has
used (``rzenembed.evaluation.published``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rzenembed.evaluation.benchmark import MODALITIES, benchmark_dataset, is_benchmark_dataset
from rzenembed.evaluation.categories import category_of
from rzenembed.evaluation.compact_report import compact_section
from rzenembed.evaluation.published import WRITTEN_AS, read_scores

LEADERBOARD_JSON = "leaderboard.json"
# This project's metric names -> the leaderboard's (NDCG gains are linear in both).
RENAMED = {"ndcg@": "ndcg_linear@"}


def _leaderboard_metric(name: str) -> str:
    for ours, theirs in RENAMED.items():
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def leaderboard_scores(report: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """The benchmark datasets of a report as a leaderboard score file; datasets outside
    the benchmark are left out, skipped ones are named in the metadata."""
    metrics: dict[str, dict[str, Any]] = {m: {} for m in MODALITIES}
    for name, entry in report["datasets"].items():
        if not is_benchmark_dataset(name):
            continue
        values = {_leaderboard_metric(k): v for k, v in entry["metrics"].items()}
        values.update({"num_pred": entry["queries"], "num_data": entry["queries"]})
        metrics[benchmark_dataset(name).modality][WRITTEN_AS.get(name, name)] = values
    scored = sum(len(v) for v in metrics.values())
    return {
        "metadata": {
            "model_name": model_name,
            "report_generated_date": report.get("created")
            or datetime.now(UTC).isoformat(timespec="seconds"),
            "benchmark": "MMEB-V2",
            "datasets_scored": scored,
            "skipped": sorted(report.get("skipped", {})),
        },
        "metrics": metrics,
        # Beside the score file's own fields (which stay as the benchmark reads them): the
        # report's bootstrap intervals of the main score, by dataset and by level.
        "intervals": {
            level: bounds
            for level, bounds in report.get("intervals", {}).items()
            if not level.startswith("dataset:") or is_benchmark_dataset(level[8:])
        },
        "confidence": report.get("confidence", {}),
        # Scores per nested dimension and precision ("256/int8") over the benchmark's
        # datasets: by level with intervals, by dataset, and bytes a vector (empty when
        # the report scored no compact form).
        "compact": _compact(report),
    }


def _compact(report: Mapping[str, Any]) -> dict[str, Any]:
    datasets = {n: e for n, e in report["datasets"].items() if is_benchmark_dataset(n)}
    section = report.get("compact")  # the report's own when it scored the benchmark alone
    if section is None or len(datasets) != len(report["datasets"]):
        # (each variant's bootstrap over every dataset: seconds at 78 x 1,000 queries)
        section = compact_section({"datasets": datasets, "model": report.get("model")})
    if section is None:
        return {}
    return {
        key: {
            **{k: entry[k] for k in ("dimension", "precision", "bytes", "scores", "intervals")},
            "datasets": {
                WRITTEN_AS.get(n, n): e["variants"][key]["score"] for n, e in datasets.items()
            },
        }
        for key, entry in section["variants"].items()
    }


def write_leaderboard(report: Mapping[str, Any], out: str | Path, model_name: str) -> Path:
    path = Path(out)
    path.write_text(json.dumps(leaderboard_scores(report, model_name), indent=2) + "\n")
    return path


def main_scores(scores: Mapping[str, Any] | str | Path) -> dict[str, float]:
    """Each benchmark dataset's main score in a score file (a dict or a path), by the
    table's names; keys outside the benchmark are set aside (``read_scores`` says which)."""
    return read_scores(scores).scores


def aggregate(main: Mapping[str, float]) -> dict[str, float]:
    """Leaderboard levels from per-dataset main scores: ``Image/CLS``-style sub-categories,
    ``Image``/``Video``/``VisDoc`` modalities and ``All``, each a mean over datasets."""
    groups: dict[str, list[float]] = {}
    for name, score in main.items():
        category = category_of(benchmark_dataset(name).category)
        for level in (f"{category.meta}/{category.column}", category.meta, "All"):
            groups.setdefault(level, []).append(score)
    return {level: sum(values) / len(values) for level, values in groups.items()}
