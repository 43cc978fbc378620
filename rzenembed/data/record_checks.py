"""The checks a raw row passes to become a record, that need no media read: its shape and
types (``normalise``) and its texts (``check_texts``). A row that fails raises
``RowError`` with the reject reason.

Ingest (``rzenembed.prep.ingest``) runs them before it checks the media, and
``inspect-source`` (``rzenembed.data.inspect``) runs them on a source's first rows; they
live here, below both, so that neither imports the other for them.
"""

from __future__ import annotations

from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats import REJECT_KEY
from rzenembed.data.schema import MEDIA_KINDS


class RowError(ValueError):
    """A row that becomes a reject; ``reason`` is the reject's reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def normalise(raw: Any, source: SourceConfig) -> dict[str, Any]:
    """The row in ``RECORD_SCHEMA`` shape, dataset and task group from the source config."""
    if isinstance(raw, dict) and REJECT_KEY in raw:  # a format could not use the row
        raise RowError(raw[REJECT_KEY], raw["__detail__"])
    if not isinstance(raw, dict) or "__unparsable__" in raw:
        detail = raw.get("__error__", "") if isinstance(raw, dict) else type(raw).__name__
        raise RowError("schema_invalid", f"not a JSON object: {detail}")
    row_id = raw.get("id")
    if not isinstance(row_id, str | int) or row_id == "":
        raise RowError("schema_invalid", "id must be a non-empty string")
    negatives = raw.get("negatives") or []
    if not isinstance(negatives, list):
        raise RowError("schema_invalid", "negatives must be a list")
    return {
        "id": str(row_id),
        "dataset": source.name,
        "task_group": source.task_group,
        "query": _side(raw.get("query"), "query"),
        "positive": _side(raw.get("positive"), "positive"),
        "negatives": [_side(n, f"negatives[{i}]") for i, n in enumerate(negatives)],
        "group_id": None if raw.get("group_id") is None else str(raw["group_id"]),
        "label": None if raw.get("label") is None else str(raw["label"]),
        "segments": raw.get("segments"),
    }


def record_sides(row: dict[str, Any]) -> list[tuple[str, dict]]:
    """(where, side) of a normalised row: query, positive, then every negative."""
    named = [("query", row["query"]), ("positive", row["positive"])]
    return named + [(f"negatives[{i}]", n) for i, n in enumerate(row["negatives"])]


def check_texts(row: dict[str, Any], max_chars: int) -> None:
    """Query and positive each hold something; no text or instruction is over
    ``max_chars``."""
    for where in ("query", "positive"):
        part = row[where]
        if not (part["text"].strip() or part["instruction"].strip() or part["media"]):
            raise RowError("text_empty", f"{where} has no text, instruction or media")
    for where, part in record_sides(row):
        for key in ("text", "instruction"):
            if len(part[key]) > max_chars:
                raise RowError("text_too_long", f"{where}.{key}: {len(part[key])} > {max_chars}")


def _side(value: Any, where: str) -> dict[str, Any]:
    """A side in schema shape (``ref`` only as null: references are made by later steps)."""
    if not isinstance(value, dict):
        raise RowError("schema_invalid", f"{where} must be an object, got {type(value).__name__}")
    unknown = set(value) - {"instruction", "text", "media", "ref"}
    if unknown:
        raise RowError("schema_invalid", f"{where} has unknown fields {sorted(unknown)}")
    out = {"instruction": value.get("instruction") or "", "text": value.get("text") or ""}
    for key in ("instruction", "text"):
        if not isinstance(out[key], str):
            raise RowError("schema_invalid", f"{where}.{key} must be a string")
    out["media"] = [
        _media(m, f"{where}.media[{i}]") for i, m in enumerate(value.get("media") or [])
    ]
    if value.get("ref") is not None:
        # References are made by the video steps, which keep a video's clips in one shard;
        # ingest cuts shards by row count, so a source's own reference could not be
        # guaranteed to resolve: negatives are given in full in source rows.
        raise RowError("schema_invalid", f"{where}.ref: references are not accepted in sources")
    out["ref"] = None
    return out


def _media(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("kind") not in MEDIA_KINDS:
        raise RowError("schema_invalid", f"{where} must have kind in {MEDIA_KINDS}")
    if not isinstance(value.get("uri"), str) or not value["uri"]:
        raise RowError("schema_invalid", f"{where}.uri must be a non-empty string")
    fields = ("kind", "uri", "start_s", "end_s", "timestamps", "frames")
    return {k: value.get(k) for k in fields}
