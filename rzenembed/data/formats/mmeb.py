"""MMEB-train (VLM2Vec) and mmE5-synthetic rows.

Columns ``qry, qry_image_path, pos_text, pos_image_path`` and optionally ``neg_text,
neg_image_path``; an empty string means absent. Both the ``original`` and the
``diverse_instruction`` splits have these columns (they differ in the instruction written
into ``qry``, which is kept as it comes). The backbone-specific image token ``<|image_1|>``
is removed from the texts: the project's prompt template places the image.

mmE5-synthetic writes several hard negatives as *stringified lists* in ``neg_text`` and
``neg_image_path`` (``"['a', 'b']"``). They are parsed as JSON or as Python literals
(``ast.literal_eval``: literals only, never code); a cell that starts like a list but does
not parse is a ``list_unparsable`` reject. Texts and images pair up by position; negatives
are kept up to ``sources[].max_negatives``. MMEB rows have no id: it is made from the
dataset name and the row's position, stable for a given file.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import JSONL_SUFFIXES, SourceFormat, rejected
from rzenembed.data.schema import media, side

FIELDS = "qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]"
MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"


def mmeb_side(text: Any, image_path: Any) -> dict:
    """One side of an MMEB row (train or eval): the image placeholder removed from the text."""
    text = text if isinstance(text, str) else ""
    text = " ".join(text.replace(MMEB_IMAGE_PLACEHOLDER, " ").split())
    items = [media("image", image_path)] if isinstance(image_path, str) and image_path else []
    return side(text=text, media_items=items)


def from_mmeb(raw: Any, dataset: str, position: int) -> Any:
    """Map one MMEB (VLM2Vec) training row onto the record shape, without the negatives'
    list parsing of ``convert`` (one ``neg_text``/``neg_image_path`` pair at most)."""
    if not isinstance(raw, dict) or "__unparsable__" in raw:
        return raw
    negatives = []
    if raw.get("neg_text") or raw.get("neg_image_path"):
        negatives.append(mmeb_side(raw.get("neg_text"), raw.get("neg_image_path")))
    return {
        "id": f"{dataset}-{position:08d}",
        "query": mmeb_side(raw.get("qry"), raw.get("qry_image_path")),
        "positive": mmeb_side(raw.get("pos_text"), raw.get("pos_image_path")),
        "negatives": negatives,
    }


class ListUnparsable(ValueError):
    """A cell that looks like a stringified list but is not one."""


def cell_list(value: Any) -> list[str]:
    """A ``neg_*`` cell as a list of strings: a real list, a stringified list, one string
    (an empty string is no item)."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [v if isinstance(v, str) else "" for v in value]
    if not isinstance(value, str):
        raise ListUnparsable(f"expected a string or a list, got {type(value).__name__}")
    text = value.strip()
    if not text.startswith("["):
        return [text] if text else []
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
            return parsed
    raise ListUnparsable(f"not a list of strings: {text[:80]!r}")


def convert(raw: Any, source: SourceConfig, position: int, sink: Any = None) -> list[Any]:
    if not isinstance(raw, dict) or "qry" not in raw or "pos_text" not in raw:
        return [rejected("schema_invalid", f"not an MMEB row; expected {FIELDS}", raw)]
    try:
        texts, images = cell_list(raw.get("neg_text")), cell_list(raw.get("neg_image_path"))
    except ListUnparsable as err:
        return [rejected("list_unparsable", f"neg_text/neg_image_path: {err}", raw)]
    count = max(len(texts), len(images))
    texts += [""] * (count - len(texts))
    images += [""] * (count - len(images))
    negatives = [mmeb_side(t, i) for t, i in zip(texts, images, strict=True) if t or i]
    return [
        {
            "id": f"{source.name}-{position:08d}",
            "query": mmeb_side(raw.get("qry"), raw.get("qry_image_path")),
            "positive": mmeb_side(raw.get("pos_text"), raw.get("pos_image_path")),
            "negatives": negatives[: source.max_negatives],
        }
    ]


FORMAT = SourceFormat(
    "mmeb",
    (*JSONL_SUFFIXES, ".parquet"),
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and "qry" in raw and "pos_text" in raw,
)
