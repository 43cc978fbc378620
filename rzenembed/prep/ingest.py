"""Ingest/validate: a raw source becomes the first committed version of a dataset.

Each row is checked for shape and types, empty or oversized text, and every media item it
references: the URI must stay inside the source folder, the file must exist and decode
(images: header size checked before pixels are decoded; videos: the last frame must
decode). Good rows are normalised to ``RECORD_SCHEMA``; bad ones become rejects with a
reason code. Media are not copied: records keep URIs relative to the source folder, which
the manifest records as ``media_root``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rzenembed.config import PipelineConfig, SourceConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.importers import iter_raw_rows, source_digest, source_uri
from rzenembed.data.schema import MEDIA_KINDS
from rzenembed.data.storage import UnsafeURIError, filesystem, resolve_media_uri
from rzenembed.data.version import DatasetVersion, InputRef
from rzenembed.prep.base import ShardJob, committed, execute, plan_step, reject

STEP = "ingest"
CODE_VERSION = "1"


class RowError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def run_ingest(
    cfg: PipelineConfig,
    source: SourceConfig,
    base: str | None = None,
    show_progress: bool = True,
) -> DatasetVersion:
    """Validate ``source`` into a new version (or return the committed one for the same input)."""
    uri = source_uri(source, base)
    section = {"source": source.model_dump(mode="json", exclude={"uri"}), "prep": _prep_knobs(cfg)}
    inputs = [InputRef(uri=uri, content_digest=source_digest(uri, cfg.storage.endpoint_url))]
    plan = plan_step(cfg, STEP, source.name, CODE_VERSION, digest_of(section), inputs)
    if (done := committed(plan, cfg)) is not None:
        return done
    params = {
        "source": source,
        "root": uri,
        "max_text_chars": cfg.prep.max_text_chars,
        "max_image_pixels": cfg.prep.max_image_pixels,
        "endpoint_url": cfg.storage.endpoint_url,
    }

    def jobs(staging: str) -> list[ShardJob]:
        return [
            ShardJob(
                name, staging, STEP, validate_rows, _Inline(rows), params, cfg.storage.endpoint_url
            )
            for name, rows in _chunks(
                iter_raw_rows(source, uri, cfg.storage.endpoint_url), cfg.prep.shard_rows
            )
        ]

    return execute(plan, cfg, jobs, media_root=uri, show_progress=show_progress)


def _prep_knobs(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "max_text_chars": cfg.prep.max_text_chars,
        "max_image_pixels": cfg.prep.max_image_pixels,
        "shard_rows": cfg.prep.shard_rows,
    }


class _Inline:
    """A picklable loader for rows the driver already read (raw rows travel by value)."""

    def __init__(self, rows: list[tuple[int, Any]]):
        self.rows = rows

    def __call__(self) -> list[tuple[int, Any]]:
        return self.rows


def _chunks(rows: Iterator[tuple[int, Any]], size: int) -> Iterator[tuple[str, list]]:
    chunk: list = []
    index = 0
    for item in rows:
        chunk.append(item)
        if len(chunk) == size:
            yield f"part-{index:05d}", chunk
            chunk, index = [], index + 1
    if chunk or index == 0:
        yield f"part-{index:05d}", chunk


def validate_rows(
    rows: list[tuple[int, Any]],
    shard: str,
    *,
    source: SourceConfig,
    root: str,
    max_text_chars: int,
    max_image_pixels: int,
    endpoint_url: str | None,
) -> tuple[list[dict], list[dict], dict[str, int]]:
    kept, rejected = [], []
    for position, raw in rows:
        try:
            row = normalise(raw, source)
            check_texts(row, max_text_chars)
            check_media(row, root, max_image_pixels, endpoint_url)
            kept.append(row)
        except RowError as err:
            shown = raw if isinstance(raw, dict) else {"value": raw}
            rejected.append(reject(STEP, shown, err.reason, str(err), shard, position))
    return kept, rejected, {}


# --------------------------------------------------------------------------- shape checks


def _side(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RowError("schema_invalid", f"{where} must be an object, got {type(value).__name__}")
    unknown = set(value) - {"instruction", "text", "media"}
    if unknown:
        raise RowError("schema_invalid", f"{where} has unknown fields {sorted(unknown)}")
    out = {"instruction": value.get("instruction") or "", "text": value.get("text") or ""}
    for key in ("instruction", "text"):
        if not isinstance(out[key], str):
            raise RowError("schema_invalid", f"{where}.{key} must be a string")
    out["media"] = [
        _media(m, f"{where}.media[{i}]") for i, m in enumerate(value.get("media") or [])
    ]
    return out


def _media(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("kind") not in MEDIA_KINDS:
        raise RowError("schema_invalid", f"{where} must have kind in {MEDIA_KINDS}")
    if not isinstance(value.get("uri"), str) or not value["uri"]:
        raise RowError("schema_invalid", f"{where}.uri must be a non-empty string")
    fields = ("kind", "uri", "start_s", "end_s", "timestamps", "frames")
    return {k: value.get(k) for k in fields}


def normalise(raw: Any, source: SourceConfig) -> dict[str, Any]:
    """The row in ``RECORD_SCHEMA`` shape, dataset and task group from the source config."""
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


def _sides(row: dict[str, Any]) -> list[tuple[str, dict]]:
    named = [("query", row["query"]), ("positive", row["positive"])]
    return named + [(f"negatives[{i}]", n) for i, n in enumerate(row["negatives"])]


def check_texts(row: dict[str, Any], max_chars: int) -> None:
    for where in ("query", "positive"):
        part = row[where]
        if not (part["text"].strip() or part["instruction"].strip() or part["media"]):
            raise RowError("text_empty", f"{where} has no text, instruction or media")
    for where, part in _sides(row):
        for key in ("text", "instruction"):
            if len(part[key]) > max_chars:
                raise RowError("text_too_long", f"{where}.{key}: {len(part[key])} > {max_chars}")


# --------------------------------------------------------------------------- media checks


def check_media(row: dict[str, Any], root: str, max_pixels: int, endpoint_url: str | None) -> None:
    for where, part in _sides(row):
        for i, item in enumerate(part["media"]):
            label = f"{where}.media[{i}] {item['uri']!r}"
            try:
                full = resolve_media_uri(root, item["uri"])
            except UnsafeURIError as exc:
                raise RowError("uri_escapes_root", f"{label}: {exc}") from None
            data = read_media(full, label, endpoint_url)
            try:
                if item["kind"] == "image":
                    media_ops.decode_image(data, max_pixels=max_pixels)
                else:
                    media_ops.probe_video(data)
            except media_ops.MediaError as exc:
                raise RowError(exc.reason, f"{label}: {exc}") from None


def read_media(uri: str, label: str, endpoint_url: str | None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise RowError("media_missing", f"{label}: file not found") from None
