"""Visual-document training sets as Parquet with the page images embedded.

``vidore/colpali_train_set`` (``query, image {bytes, path}, image_filename, answer, ...``)
and ``VisRAG-Ret-Train-In-domain-data`` (``query, image {bytes, path}, source``): a row
becomes query -> page. The page bytes are written once into the dataset's media folder,
content-addressed (``MediaSink``; many queries share a page, which is then stored once),
and checked there like any other image. With ``sources[].page_answers`` a row that has an
``answer`` also gives a second record, page + query -> answer (visual document QA).
A row without image bytes is ``media_missing``; an empty query ``text_empty``.
"""

from __future__ import annotations

from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import SourceFormat, rejected
from rzenembed.data.formats.media_sink import MediaSink
from rzenembed.data.schema import media, side

FIELDS = "query, image {bytes, path}[, image_filename, answer, source]"


def convert(
    raw: Any, source: SourceConfig, position: int, sink: MediaSink | None = None
) -> list[Any]:
    if not isinstance(raw, dict) or "query" not in raw or "image" not in raw:
        return [rejected("schema_invalid", f"not a visual-document row; expected {FIELDS}", raw)]
    shown = {k: v for k, v in raw.items() if k != "image"}
    image = raw.get("image")
    data = image.get("bytes") if isinstance(image, dict) else image
    if not isinstance(data, bytes | bytearray) or not data:
        return [rejected("media_missing", "the row has no image bytes", shown)]
    query = str(raw.get("query") or "").strip()
    if not query:
        return [rejected("text_empty", "the query is empty", shown)]
    if sink is None:
        raise RuntimeError("the visdoc-parquet format needs a media sink (pages are embedded)")
    page = [media("image", sink.put(bytes(data)))]
    row_id = str(raw.get("id") or f"{source.name}-{position:08d}")
    records = [
        {
            "id": row_id,
            "query": side(query, source.query_instruction),
            "positive": side("", source.positive_instruction, page),
            "negatives": [],
            "group_id": f"page:{page[0]['uri']}",
        }
    ]
    answer = str(raw.get("answer") or "").strip()
    if source.page_answers and answer:
        records.append(
            {
                "id": f"{row_id}#answer",
                "query": side(query, source.query_instruction, page),
                "positive": side(answer, ""),
                "negatives": [],
            }
        )
    return records


FORMAT = SourceFormat(
    "visdoc-parquet",
    (".parquet",),
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and "query" in raw and "image" in raw,
    embeds_media=True,
    max_chunk_rows=256,
)
