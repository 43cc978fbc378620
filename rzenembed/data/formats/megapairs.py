"""MegaPairs: composed image retrieval triplets mined from web images.

A row is ``{q_img, q_text: [...], t_img, hns: [...]}``: a query image with several
instruction texts that each describe how the target differs, the target image and hard
negative images, paths relative to the source folder. One record per row: the query is the
query image with one ``q_text`` chosen by a seeded draw (``prep.seed``, the row's position:
the same choice on every rerun), the positive the target image, the negatives the ``hns``
images up to ``sources[].max_negatives``. MegaPairs lists the query image itself as the
first hard negative (a model must not return the query); it is kept unless
``sources[].query_image_negative`` is false.
"""

from __future__ import annotations

import hashlib
from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import JSONL_SUFFIXES, SourceFormat, rejected
from rzenembed.data.schema import media, side

FIELDS = "{q_img, q_text: [...], t_img, hns: [...]} (image paths relative to the source folder)"


def choose(options: list[str], seed: int, position: int) -> str:
    """One of ``options``, the same for a given (seed, position) in every process."""
    key = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return options[int.from_bytes(key, "big") % len(options)]


def _image(path: Any) -> dict[str, Any] | None:
    return media("image", path) if isinstance(path, str) and path.strip() else None


def convert(raw: Any, source: SourceConfig, position: int, sink: Any = None) -> list[Any]:
    if not isinstance(raw, dict) or "q_img" not in raw or "t_img" not in raw:
        return [rejected("schema_invalid", f"not a MegaPairs row; expected {FIELDS}", raw)]
    texts = raw.get("q_text")
    texts = [texts] if isinstance(texts, str) else list(texts or [])
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    query_image, target = _image(raw.get("q_img")), _image(raw.get("t_img"))
    if query_image is None or not texts:
        return [rejected("text_empty", "the query needs its image and a q_text", raw)]
    if target is None:
        return [rejected("no_positive", "t_img is empty", raw)]
    negatives = [_image(path) for path in raw.get("hns") or []]
    negatives = [n for n in negatives if n is not None]
    if not source.query_image_negative:
        negatives = [n for n in negatives if n["uri"] != query_image["uri"]]
    instruction = source.positive_instruction
    return [
        {
            "id": str(raw.get("id") or f"{source.name}-{position:08d}"),
            "query": side(
                choose(texts, source.seed, position), source.query_instruction, [query_image]
            ),
            "positive": side("", instruction, [target]),
            "negatives": [side("", instruction, [n]) for n in negatives[: source.max_negatives]],
        }
    ]


FORMAT = SourceFormat(
    "megapairs",
    (*JSONL_SUFFIXES, ".parquet"),
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and "q_img" in raw and "t_img" in raw,
)
