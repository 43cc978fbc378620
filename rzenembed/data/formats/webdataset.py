"""WebDataset shards as img2dataset writes them (LAION and other image-text crawls).

A shard is ``NNNNN.tar`` holding, per sample, ``KEY.jpg`` (or ``.png``/``.webp``),
``KEY.txt`` (the caption) and ``KEY.json`` (``url``, ``caption``, ``key``, ``status``,
``width``, ``height``, ...), members of one sample next to each other. A sample becomes
one record: the caption is the query (``sources[].query_instruction``), the image the
positive. Its bytes are written once into the dataset's media folder, content-addressed
(``MediaSink``), and checked there like any other image. A sample whose ``status`` is not
``success`` is a ``download_failed`` reject; one without image bytes ``media_missing``;
one without caption ``text_empty``.

Only the tars are data: img2dataset's ``NNNNN.parquet`` (its metadata table: key, url,
caption, status, ...) and ``NNNNN_stats.json`` next to them are not read as rows (ingest
and ``inspect-source`` report them as not data). Tars are read by ``raw_files`` (a sample
is ``{"__key__": key, extension: bytes, ...}``), streaming: a scan (one pass per tar, on a
worker) counts samples, hashes the bytes and notes the byte offset where every chunk's
first sample starts, so a shard task seeks straight to its samples.
"""

from __future__ import annotations

import json
from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import SourceFormat, rejected
from rzenembed.data.formats.media_sink import MediaSink
from rzenembed.data.schema import media, side

FIELDS = "tar shards of KEY.jpg|png|webp, KEY.txt, KEY.json {url, caption, key, status, ...}"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def _text(data: Any) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace").strip()
    return str(data or "").strip()


def convert(
    raw: Any, source: SourceConfig, position: int, sink: MediaSink | None = None
) -> list[Any]:
    if not isinstance(raw, dict) or "__key__" not in raw:
        return [rejected("schema_invalid", f"not a WebDataset sample; expected {FIELDS}", raw)]
    try:
        meta = json.loads(raw["json"]) if raw.get("json") else {}
    except (ValueError, UnicodeDecodeError) as err:
        return [rejected("schema_invalid", f"{raw['__key__']}.json: {err}", _shown(raw))]
    meta = meta if isinstance(meta, dict) else {}
    row_id = str(meta.get("key") or raw["__key__"])
    status = meta.get("status", "success")
    if status != "success":
        detail = f"status {status!r}: {meta.get('error_message') or ''}".strip()
        return [rejected("download_failed", detail, {"id": row_id, **_shown(raw)})]
    image = next((raw[e] for e in IMAGE_EXTENSIONS if raw.get(e)), None)
    if image is None:
        return [rejected("media_missing", "the sample has no image", {"id": row_id, **_shown(raw)})]
    caption = _text(raw.get("txt")) or _text(meta.get("caption"))
    if not caption:
        return [rejected("text_empty", "the sample has no caption", {"id": row_id})]
    if sink is None:
        raise RuntimeError("the webdataset format needs a media sink (its images are embedded)")
    uri = sink.put(image)
    return [
        {
            "id": row_id,
            "query": side(caption, source.query_instruction),
            "positive": side("", source.positive_instruction, [media("image", uri)]),
            "negatives": [],
        }
    ]


def _shown(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample without its bytes (a reject keeps the row, not the image)."""
    return {k: (v if not isinstance(v, bytes) else f"<{len(v)} bytes>") for k, v in raw.items()}


FORMAT = SourceFormat(
    "webdataset",
    (".tar",),
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and "__key__" in raw,
    embeds_media=True,
    max_chunk_rows=512,
)
