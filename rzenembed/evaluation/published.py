"""Score files as the benchmark publishes them, read into one dataset -> main score map.

MMEB-V2 score files (VLM2Vec's ``experiments/public/all_scores/*/<model>.json``, and what
its ``report_score_v2.py`` writes) hold ``metadata`` and ``metrics`` grouped by modality,
each dataset under a key with its metrics. The keys have moved with the releases, so a
reader that knows only the table's 78 names fails on every recent file:

- since the v2.1 fix of the visual-document page splits, the reference writes
  ``ViDoSeek-page-fixed`` and ``MMLongBench-page-fixed``; these are the table's
  ``ViDoSeek-page`` and ``MMLongBench-page`` (whose annotations are the fixed ones);
- a plain ``ViDoSeek-page`` / ``MMLongBench-page`` in a file dated before the fix
  (2025-11-03) scored the broken split: it is left out, with a note, since it measures
  another test set; an undated file's plain keys are taken as the fixed split, with a note;
- ``MomentSeeker_1k8`` (MomentSeeker before its test cases were deduplicated) and the
  English-only ViDoRe-V2 variants are published beside the 78 but are not among them:
  recognised and set aside, with a note;
- a dataset whose ``num_data`` is not the release's query count scored another version
  of the set (v2.0.0's MomentSeeker has 1,800 rows, the release 1,602): left out, noted;
- the reference writes ``FILE_N/A`` (and other markers) for datasets it found no score
  for: those are missing, noted, never zero;
- any other key is reported as unknown and ignored.

This project's own ``report.json`` reads the same way (its per-query scores are kept, so a
comparison can give intervals on any subset of datasets).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rzenembed.data.storage import filesystem, is_remote
from rzenembed.evaluation.benchmark import benchmark_dataset, is_benchmark_dataset

# Keys the reference writes for a table dataset under another name.
RENAMED = {
    "ViDoSeek-page-fixed": "ViDoSeek-page",
    "MMLongBench-page-fixed": "MMLongBench-page",
}
# Keys written beside the 78 that are known not to be among them.
OUTSIDE_THE_BENCHMARK = {
    "MomentSeeker_1k8": "MomentSeeker before deduplication (1,800 rows), not among the 78",
    "ViDoRe_biomedical_lectures_v2": "an English-only ViDoRe-V2 variant, not among the 78",
    "ViDoRe_economics_reports_v2": "an English-only ViDoRe-V2 variant, not among the 78",
    "ViDoRe_esg_reports_v2": "an English-only ViDoRe-V2 variant, not among the 78",
}
# The page splits were corrected on this date (VLM2Vec CHANGELOG; written as -fixed since).
PAGE_SPLITS_FIXED = "2025-11-03"
WRITTEN_AS = {table: key for key, table in RENAMED.items()}


class ScoreFileError(ValueError):
    """A file that is not a score file at all."""


@dataclass
class Scores:
    """One model's main score per benchmark dataset, and what reading them noticed."""

    name: str
    source: str
    scores: dict[str, float]
    notes: list[str] = field(default_factory=list)
    queries: dict[str, int] = field(default_factory=dict)
    # Per-query main scores (this project's reports only): intervals on any subset.
    per_query: dict[str, np.ndarray] = field(default_factory=dict)


def _date(metadata: Mapping[str, Any]) -> str:
    return str(metadata.get("report_generated_date") or "")[:10]


def _from_score_file(
    data: Mapping[str, Any], source: str, name: str | None, release_sizes: bool
) -> Scores:
    metadata = data.get("metadata") or {}
    out = Scores(name or str(metadata.get("model_name") or Path(source).stem), source, {})
    dated = _date(metadata)
    for modality, datasets in data["metrics"].items():
        if not isinstance(datasets, Mapping):
            out.notes.append(f"{modality}: not a group of datasets, ignored")
            continue
        for key, values in datasets.items():
            dataset = RENAMED.get(key, key)
            if key in OUTSIDE_THE_BENCHMARK:
                out.notes.append(f"{key}: {OUTSIDE_THE_BENCHMARK[key]}; set aside")
                continue
            if not is_benchmark_dataset(dataset):
                out.notes.append(f"{key}: unknown dataset key, ignored")
                continue
            item = benchmark_dataset(dataset)
            if not isinstance(values, Mapping):
                out.notes.append(f"{key}: no score ({values})")
                continue
            if item.modality != modality:
                out.notes.append(f"{key}: a {item.modality} dataset listed under {modality}")
            if key in WRITTEN_AS:  # a plain page-split key: which split did it score?
                if any(k == WRITTEN_AS[key] for k in datasets):
                    out.notes.append(f"{key}: beside {WRITTEN_AS[key]}, which is kept")
                    continue
                if dated and dated < PAGE_SPLITS_FIXED:
                    out.notes.append(
                        f"{key}: scored on the page split before its fix "
                        f"({PAGE_SPLITS_FIXED}; file dated {dated}); left out"
                    )
                    continue
                out.notes.append(f"{key}: taken as the fixed page split ({WRITTEN_AS[key]})")
            try:
                score = float(values[item.metric])
                count = None if values.get("num_data") is None else int(values["num_data"])
            except KeyError:
                out.notes.append(f"{key}: no {item.metric}, left out")
                continue
            except (TypeError, ValueError):
                out.notes.append(f"{key}: a value that is not a number, left out")
                continue
            if release_sizes and count is not None and count != item.queries:
                out.notes.append(
                    f"{key}: scored on {count} queries, the release has {item.queries} "
                    f"(another version of the set); left out"
                )
                continue
            out.scores[dataset] = score
            if count is not None:
                out.queries[dataset] = count
    return out


def _from_report(data: Mapping[str, Any], source: str, name: str | None) -> Scores:
    model = data.get("model") or {}
    label = name or model.get("name") or Path(str(model.get("path") or source)).name
    out = Scores(str(label), source, {})
    for dataset, entry in data["datasets"].items():
        if not is_benchmark_dataset(dataset):
            continue  # the sample corpus's own sets: nothing published to compare with
        out.scores[dataset] = float(entry["score"])
        out.queries[dataset] = int(entry["queries"])
        if entry.get("per_query"):
            out.per_query[dataset] = np.asarray(entry["per_query"], dtype=np.float64)
    return out


def read_scores(
    source: str | Path | Mapping[str, Any], name: str | None = None, release_sizes: bool = False
) -> Scores:
    """The benchmark datasets' main scores in a score file or one of this project's
    reports (a path, an already parsed dict, or a folder holding ``report.json``).
    ``release_sizes``: leave out a dataset scored on another number of queries than the
    release has (for published files; a run on a scaled-down release is not one)."""
    if isinstance(source, Mapping):
        data, where = source, "<dict>"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "report.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ScoreFileError(f"score file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ScoreFileError(f"{path} is not JSON: {error}") from None
        where = str(path)
    return read_scores_text(data, where, name, release_sizes)


def read_scores_at(uri: str, endpoint_url: str | None = None, name: str | None = None) -> Scores:
    """``read_scores`` of a published file on storage (a path or an ``s3://`` URI); its
    datasets scored on another number of queries than the release's are left out."""
    if not is_remote(uri):
        return read_scores(uri, name, release_sizes=True)
    fs, path = filesystem(uri, endpoint_url)
    try:
        data = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise ScoreFileError(f"score file not found: {uri}") from None
    except json.JSONDecodeError as error:
        raise ScoreFileError(f"{uri} is not JSON: {error}") from None
    return read_scores_text(data, uri, name, release_sizes=True)


def read_scores_text(
    data: Any, source: str, name: str | None = None, release_sizes: bool = False
) -> Scores:
    """``read_scores`` on parsed JSON ``data`` that came from ``source``."""
    if isinstance(data, Mapping) and isinstance(data.get("metrics"), Mapping):
        return _from_score_file(data, source, name, release_sizes)
    if isinstance(data, Mapping) and isinstance(data.get("datasets"), Mapping):
        return _from_report(data, source, name)
    raise ScoreFileError(
        f"{source}: neither a score file (metadata, metrics by modality) nor an evaluation "
        "report (datasets)"
    )
