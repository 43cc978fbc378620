"""Evaluation sets on disk: loading, checking, discovering, and the MMEB importer.

A set is a folder with ``queries`` and ``candidates`` tables (``.jsonl`` or ``.parquet``,
shaped like ``EVAL_QUERY_SCHEMA`` / ``EVAL_CANDIDATE_SCHEMA``) and an optional
``evalset.json`` whose ``media_root`` says where relative media URIs live (default: the
folder itself). A query with ``candidate_ids`` is ranked against that list ("local"), one
without against every candidate of its dataset ("global"). One folder may hold several
datasets; each is scored on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rzenembed.data.formats.mmeb import mmeb_side
from rzenembed.evaluation.categories import category_of

QUERIES, CANDIDATES, META = "queries", "candidates", "evalset.json"


class EvalSetError(ValueError):
    """An evaluation set that cannot be scored as written."""


@dataclass
class EvalDataset:
    """One dataset of an evaluation set: its queries and the candidates they rank."""

    name: str
    category: str
    media_root: str
    queries: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ranking(self) -> str:
        return "local" if any(q["candidate_ids"] for q in self.queries) else "global"

    @property
    def frames(self) -> int | None:
        """Frames per video the set was defined with (the benchmark's 8), if it says."""
        return self.meta.get("frames")

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the set comes from, for reports: release tag and annotations digest."""
        keys = ("source", "release", "annotations_digest", "benchmark_queries")
        return {k: self.meta[k] for k in keys if k in self.meta}


def _read_table(folder: Path, stem: str) -> list[dict[str, Any]]:
    jsonl, parquet = folder / f"{stem}.jsonl", folder / f"{stem}.parquet"
    if jsonl.is_file():
        return _read_jsonl(jsonl)
    if parquet.is_file():
        return pq.read_table(parquet).to_pylist()
    raise EvalSetError(f"{folder} has no {stem}.jsonl or {stem}.parquet")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every row of a JSONL file; a malformed line is an error naming its number."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise EvalSetError(f"{path}:{number}: not JSON ({error})") from None
    return rows


def is_eval_folder(folder: Path) -> bool:
    return any((folder / f"{QUERIES}.{ext}").is_file() for ext in ("jsonl", "parquet"))


def discover(path: str | Path) -> list[Path]:
    """``path`` itself when it is an evaluation set, else its sub-folders that are."""
    path = Path(path)
    if not path.is_dir():
        raise EvalSetError(f"evaluation set folder not found: {path}")
    if is_eval_folder(path):
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_dir() and is_eval_folder(p))
    if not found:
        raise EvalSetError(f"{path} holds no evaluation set (no queries.jsonl/.parquet)")
    return found


def load_eval_folder(folder: str | Path) -> list[EvalDataset]:
    """Every dataset of the set in ``folder``, checked (ids resolve, each query has a
    relevant candidate, local relevant ids are in the query's list, one category each)."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text()) if (folder / META).is_file() else {}
    media_root = str(Path(folder, meta.get("media_root", ".")).resolve())
    queries, candidates = _read_table(folder, QUERIES), _read_table(folder, CANDIDATES)
    by_dataset: dict[str, list[dict]] = {}
    for c in candidates:
        by_dataset.setdefault(c["dataset"], []).append(c)
    grouped: dict[str, list[dict]] = {}
    for q in queries:
        grouped.setdefault(q["dataset"], []).append(q)
    out = []
    for name, rows in grouped.items():
        pool = by_dataset.get(name, [])
        _check(folder, name, rows, pool)
        out.append(EvalDataset(name, rows[0]["category"], media_root, rows, pool, meta))
    return out


def _check(folder: Path, name: str, queries: list[dict], candidates: list[dict]) -> None:
    cids = [c["cid"] for c in candidates]
    if len(set(cids)) != len(cids):
        raise EvalSetError(f"{folder}: dataset {name} repeats candidate ids")
    known = set(cids)
    categories = {q["category"] for q in queries}
    if len(categories) != 1:
        raise EvalSetError(f"{folder}: dataset {name} mixes categories {sorted(categories)}")
    category_of(next(iter(categories)))  # a known category, or a clear error
    for q in queries:
        listed, relevant = q.get("candidate_ids") or [], q.get("relevant_ids") or []
        if not relevant:
            raise EvalSetError(f"{folder}: query {q['qid']} has no relevant candidate")
        unknown = [c for c in [*listed, *relevant] if c not in known]
        if unknown:
            raise EvalSetError(f"{folder}: query {q['qid']} names unknown candidates {unknown}")
        grades = q.get("relevance")
        if grades is not None and (len(grades) != len(relevant) or min(grades) <= 0):
            raise EvalSetError(
                f"{folder}: query {q['qid']} needs one positive relevance per relevant id"
            )
        if listed and not set(relevant) <= set(listed):
            raise EvalSetError(
                f"{folder}: query {q['qid']} has relevant candidates outside its own list"
            )


def write_eval_folder(
    folder: Path, queries: list[dict], candidates: list[dict], meta: dict[str, Any]
) -> None:
    """An evaluation set folder: the two JSONL tables and ``evalset.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, table in ((QUERIES, queries), (CANDIDATES, candidates)):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in table)
        (folder / f"{stem}.jsonl").write_text(lines, encoding="utf-8")
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- MMEB


def _listed(row: dict[str, Any], key: str, count: int | None = None) -> list:
    value = row.get(key)
    if value is None:
        return [None] * (count or 0)
    if isinstance(value, str):
        return [value]
    return list(value)


def read_mmeb_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    return _read_jsonl(path)


def import_mmeb_eval(
    rows: Iterable[dict[str, Any]],
    name: str,
    category: str,
    out: str | Path,
    media_root: str | Path,
) -> Path:
    """Write an MMEB (VLM2Vec) evaluation dataset as an evaluation set folder.

    Each MMEB row has the query (``qry_text`` / ``qry`` and ``qry_img_path`` /
    ``qry_image_path``) and its candidate list (``tgt_text`` and ``tgt_img_path``, lists of
    the same length; the first candidate is the relevant one). Candidates with the same text
    and image are one candidate, so a label list shared by every query is embedded once.
    ``<|image_1|>`` is removed (the prompt template places the image). Image paths stay
    relative to ``media_root``, recorded in ``evalset.json``.
    """
    category_of(category)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    queries, candidates, index = [], [], {}
    for number, row in enumerate(rows):
        texts = _listed(row, "tgt_text")
        images = _listed(row, "tgt_img_path", len(texts))
        texts = texts or [None] * len(images)
        if not texts or len(texts) != len(images):
            raise EvalSetError(
                f"MMEB row {number} of {name}: tgt_text and tgt_img_path must be lists of one "
                f"length with at least one candidate"
            )
        listed = []
        for text, image in zip(texts, images, strict=True):
            candidate = mmeb_side(text, image)
            key = json.dumps(candidate, sort_keys=True)
            if key not in index:
                index[key] = f"{name}-c{len(index):06d}"
                candidates.append({"cid": index[key], "dataset": name, "candidate": candidate})
            listed.append(index[key])
        query = mmeb_side(
            row.get("qry_text", row.get("qry")), row.get("qry_img_path", row.get("qry_image_path"))
        )
        if not query["text"] and not query["media"]:
            raise EvalSetError(f"MMEB row {number} of {name}: empty query")
        queries.append(
            {
                "qid": f"{name}-q{number:06d}",
                "dataset": name,
                "category": category,
                "query": query,
                "candidate_ids": list(dict.fromkeys(listed)),
                "relevant_ids": [listed[0]],
            }
        )
    meta = {
        "name": name,
        "category": category,
        "source": "mmeb",
        "media_root": str(Path(media_root).resolve()),
    }
    write_eval_folder(out, queries, candidates, meta)
    return out
