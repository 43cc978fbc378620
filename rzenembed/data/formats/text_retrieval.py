"""Text retrieval sets as they are published, in their three common shapes.

1. ``{query, pos: [...], neg: [...]}`` (FlagEmbedding / BGE style): items are strings or
   ``{title, text}`` objects; score fields (``pos_scores``, ``neg_scores``, ...) ignored.
2. ``{query_id, query, positive_passages: [{docid, title, text}], negative_passages}``
   (Tevatron style).
3. Column-ordered pairs and triplets: ``anchor, positive, negative...`` (sentence-
   transformers; ``negative``, ``negative_1``, ``negative_2``... in name order) or
   ``query, answer``.

The shape is recognised per row from its keys. A row becomes one record per (query, first
positive); further positives are dropped (``sources[].extra_positives: drop``, the default:
two rows with the same query in one batch would be each other's false negatives) or become
extra records (``rows``). Negatives are kept up to ``sources[].max_negatives`` in their
published order. A title is joined to its passage as ``title\\ntext``.
"""

from __future__ import annotations

from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import JSONL_SUFFIXES, SourceFormat, rejected
from rzenembed.data.schema import side

FIELDS = (
    "{query, pos: [...], neg: [...]} or {query_id, query, positive_passages: [{docid, title, "
    "text}], negative_passages} or columns anchor, positive, negative... / query, answer"
)


def passage(item: Any) -> str | None:
    """A passage's text: a string, or ``title`` and ``text`` of an object."""
    if isinstance(item, str):
        return item.strip() or None
    if isinstance(item, dict):
        text = str(item.get("text") or "").strip()
        title = str(item.get("title") or "").strip()
        joined = f"{title}\n{text}" if title and text else (text or title)
        return joined or None
    return None


def _shape(raw: dict[str, Any]) -> tuple[Any, list[Any], list[Any]] | None:
    """(query, positives, negatives) of a row in any of the three shapes, or None."""
    if "pos" in raw:
        return raw.get("query"), _as_list(raw.get("pos")), _as_list(raw.get("neg"))
    if "positive_passages" in raw:
        return (
            raw.get("query"),
            _as_list(raw.get("positive_passages")),
            _as_list(raw.get("negative_passages")),
        )
    if "anchor" in raw and "positive" in raw:
        negatives = [raw[k] for k in sorted(raw, key=_negative_order) if _is_negative(k)]
        return raw.get("anchor"), [raw.get("positive")], negatives
    if "query" in raw and "answer" in raw:
        return raw.get("query"), [raw.get("answer")], []
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _is_negative(key: str) -> bool:
    return key == "negative" or key.startswith("negative_")


def _negative_order(key: str) -> tuple[int, str]:
    suffix = key.removeprefix("negative").lstrip("_")
    return (int(suffix), key) if suffix.isdigit() else (0 if not suffix else 1 << 30, key)


def convert(raw: Any, source: SourceConfig, position: int, sink: Any = None) -> list[Any]:
    shape = _shape(raw) if isinstance(raw, dict) else None
    if shape is None:
        return [rejected("schema_invalid", f"not a text retrieval row; expected {FIELDS}", raw)]
    query, positives, negatives = shape
    query_text = passage(query)
    if query_text is None:
        return [rejected("text_empty", "the query is empty", raw)]
    kept = [p for p in (passage(item) for item in positives) if p is not None]
    if not kept:
        return [rejected("no_positive", "no non-empty positive passage", raw)]
    negative_texts = [n for n in (passage(item) for item in negatives) if n is not None]
    negative_sides = [
        side(text, source.positive_instruction) for text in negative_texts[: source.max_negatives]
    ]
    base = str(raw.get("query_id") or raw.get("id") or f"{source.name}-{position:08d}")
    count = len(kept) if source.extra_positives == "rows" else 1
    return [
        {
            "id": base if k == 0 else f"{base}#pos{k}",
            "query": side(query_text, source.query_instruction),
            "positive": side(kept[k], source.positive_instruction),
            "negatives": negative_sides,
        }
        for k in range(count)
    ]


FORMAT = SourceFormat(
    "text-retrieval",
    (*JSONL_SUFFIXES, ".parquet"),
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and _shape(raw) is not None,
)
