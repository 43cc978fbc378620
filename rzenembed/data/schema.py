"""Arrow schemas of the pipeline's tables: training records, evaluation sets, rejects.

A training record is one (query, positive, negatives) example. Each side carries an
instruction, a text and a list of media items; a media item points at an image, a video
(optionally a time range of it) or a list of frames sampled from a video. Frames may be
stored inline as encoded images (see docs/data.md for why and when).

``group_id`` ties together items that must never be each other's negative (identical
label texts in merged classification, the same document); ``negatives`` may list siblings
explicitly as hard negatives (clips of one video).

A negative may be a *reference* (``ref``: another row's id) standing for that row's
positive. Two kinds: a sibling reference (``reference``) resolves inside its own shard and
leaves the slot empty when the row is gone (the cap and dedup count those); a mined
reference (``mined_reference``, its instruction ``MINED``) was chosen by the mining step
from anywhere in the version, resolves across the version's shards, and a missing target
is an error.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: sides gained ``ref`` (sibling negatives by row id)

MEDIA_KINDS = ("image", "video", "frames")

MEDIA_TYPE = pa.struct(
    [
        pa.field("kind", pa.string(), nullable=False),
        # Relative to the dataset root (never escaping it) or absolute file:// / s3:// URI.
        pa.field("uri", pa.string()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        # Frame times in seconds from the start of the video (kind == "frames").
        pa.field("timestamps", pa.list_(pa.float64())),
        # Encoded images (JPEG/PNG) stored inline: frames sampled at prep time.
        pa.field("frames", pa.list_(pa.binary())),
    ]
)

# Timestamped, captioned parts of a long video (input of clip splitting).
SEGMENT_TYPE = pa.struct(
    [
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("text", pa.string()),
    ]
)

SIDE_TYPE = pa.struct(
    [
        pa.field("instruction", pa.string()),
        pa.field("text", pa.string()),
        pa.field("media", pa.list_(MEDIA_TYPE)),
        # A negative that is another row's positive: that row's id, in the same shard
        # (sibling clips; the frames are stored once, in their own row).
        pa.field("ref", pa.string()),
    ]
)

RECORD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("task_group", pa.string(), nullable=False),
        pa.field("query", SIDE_TYPE, nullable=False),
        pa.field("positive", SIDE_TYPE, nullable=False),
        pa.field("negatives", pa.list_(SIDE_TYPE)),
        pa.field("group_id", pa.string()),
        pa.field("label", pa.string()),
        pa.field("segments", pa.list_(SEGMENT_TYPE)),
    ],
    metadata={b"rzenembed.schema": b"record", b"rzenembed.schema_version": b"2"},
)

# An evaluation set has two tables. Queries list their candidates ("local" ranking, as for
# MMEB image tasks) or leave candidate_ids empty to be ranked against every candidate of
# their dataset ("global", as for visual documents); relevant_ids are the correct ones.
EVAL_QUERY_SCHEMA = pa.schema(
    [
        pa.field("qid", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("query", SIDE_TYPE, nullable=False),
        pa.field("candidate_ids", pa.list_(pa.string())),
        pa.field("relevant_ids", pa.list_(pa.string()), nullable=False),
    ],
    metadata={b"rzenembed.schema": b"eval-query", b"rzenembed.schema_version": b"1"},
)

EVAL_CANDIDATE_SCHEMA = pa.schema(
    [
        pa.field("cid", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("candidate", SIDE_TYPE, nullable=False),
    ],
    metadata={b"rzenembed.schema": b"eval-candidate", b"rzenembed.schema_version": b"1"},
)

# Every input row a step does not pass on lands here, with a reason code (docs/data.md).
REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("dataset", pa.string()),
        pa.field("step", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("source_shard", pa.string()),
        pa.field("source_row", pa.int64()),
        # The rejected row itself as JSON (media bytes left out), so nothing is lost.
        pa.field("row_json", pa.string()),
    ],
    metadata={b"rzenembed.schema": b"reject", b"rzenembed.schema_version": b"1"},
)


def media(
    kind: str,
    uri: str | None = None,
    start_s: float | None = None,
    end_s: float | None = None,
    timestamps: list[float] | None = None,
    frames: list[bytes] | None = None,
) -> dict[str, Any]:
    """A media item as a plain dict matching ``MEDIA_TYPE``."""
    if kind not in MEDIA_KINDS:
        raise ValueError(f"media kind must be one of {MEDIA_KINDS}, got {kind!r}")
    return {
        "kind": kind,
        "uri": uri,
        "start_s": start_s,
        "end_s": end_s,
        "timestamps": timestamps,
        "frames": frames,
    }


def side(
    text: str = "",
    instruction: str = "",
    media_items: list[dict] | None = None,
    ref: str | None = None,
) -> dict:
    """One side of a record (query, positive or a negative) as a plain dict; ``ref`` makes
    a negative stand for the positive of the row with that id (the key is left out when
    there is none: rows read back from Parquet then have it as None)."""
    out = {"instruction": instruction, "text": text, "media": list(media_items or [])}
    if ref is not None:
        out["ref"] = ref
    return out


def reference(row_id: str) -> dict:
    """A negative that stands for the positive of row ``row_id`` of the same shard."""
    return side(text="", instruction="", ref=row_id)


# The instruction of a mined reference (a reference's own fields are never embedded: it is
# replaced by its target's positive, so the field can say where the reference came from).
MINED = "rzenembed:mined"


def mined_reference(row_id: str) -> dict:
    """A negative the mining step chose: the positive of row ``row_id``, in any shard of
    the same version."""
    return side(text="", instruction=MINED, ref=row_id)


def is_mined(negative: dict) -> bool:
    return bool(negative.get("ref")) and negative.get("instruction") == MINED


def record(
    id: str,
    dataset: str,
    task_group: str,
    query: dict,
    positive: dict,
    negatives: list[dict] | None = None,
    group_id: str | None = None,
    label: str | None = None,
    segments: list[dict] | None = None,
) -> dict[str, Any]:
    """A training record as a plain dict matching ``RECORD_SCHEMA``."""
    return {
        "id": id,
        "dataset": dataset,
        "task_group": task_group,
        "query": query,
        "positive": positive,
        "negatives": list(negatives or []),
        "group_id": group_id,
        "label": label,
        "segments": segments,
    }


def records_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
