"""Source formats: how a downloaded dataset's rows become training records.

Each format is one ``SourceFormat`` (``base``) registered under the name a source's
``format:`` takes (``SourceConfig.format``). A format reads the source folder's top-level
files with its ``suffixes`` (``rzenembed.data.importers.list_source_files``; the bytes
become raw rows in ``rzenembed.data.raw_files``: JSON Lines, gzipped or not, JSON arrays,
Parquet, WebDataset tars) through the streaming ingest (files scanned on workers, chunks
read straight from them) and maps every raw row to zero or more rows in the record shape
(``convert``). A raw row it cannot use becomes a ``rejected(...)`` marker that
ingest records as a reject with the reason, never an exception; rows in = records out +
rejects, where a raw row that expands into several records (further positives kept as
rows) counts once per record and is noted in the version's ``rows_added`` stat.

Formats (docs/data.md has the table with fields and an example row of each):

- ``rzenembed`` / ``jsonl``: the project's own record layout, unchanged;
- ``mmeb``: MMEB-train and mmE5-synthetic (``qry``, ``qry_image_path``, ``pos_*``,
  ``neg_*``; mmE5's stringified lists in ``neg_*`` parsed as JSON or Python literals);
- ``text-retrieval``: text retrieval JSONL/Parquet in its three common shapes;
- ``megapairs``: MegaPairs triplets with hard-negative images;
- ``webdataset``: img2dataset tar shards (LAION and other crawls), images embedded;
- ``visdoc-parquet``: visual-document training sets as Parquet with page images embedded
  (``vidore/colpali_train_set``, ``VisRAG-Ret-Train-In-domain-data``);
- ``llava-video``: video caption and QA sets in the LLaVA conversation layout (LLaVA-Hound,
  VideoChat-Flash), videos as mp4 files or folders of frames.
"""

from __future__ import annotations

from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats.base import JSONL_SUFFIXES, REJECT_KEY, SourceFormat, rejected

__all__ = [
    "JSONL_SUFFIXES",
    "REJECT_KEY",
    "SourceFormat",
    "convert",
    "format_names",
    "get_format",
    "rejected",
]


def _native(raw: Any, source: SourceConfig, position: int, sink: Any = None) -> list[Any]:
    return [raw]


def _registry() -> dict[str, SourceFormat]:
    from rzenembed.data.formats import (
        llava_video,
        megapairs,
        mmeb,
        text_retrieval,
        visdoc_parquet,
        webdataset,
    )

    native_fields = "id, query {instruction, text, media}, positive, negatives (the record layout)"
    native = [
        SourceFormat(name, (*JSONL_SUFFIXES, ".parquet"), native_fields, _native, _is_native)
        for name in ("rzenembed", "jsonl")
    ]
    others = [
        mmeb.FORMAT,
        text_retrieval.FORMAT,
        megapairs.FORMAT,
        webdataset.FORMAT,
        visdoc_parquet.FORMAT,
        llava_video.FORMAT,
    ]
    return {f.name: f for f in [*native, *others]}


def _is_native(raw: Any) -> bool:
    return isinstance(raw, dict) and "query" in raw and "positive" in raw


_FORMATS: dict[str, SourceFormat] | None = None


def get_format(name: str) -> SourceFormat:
    """The registered format called ``name``; a clear error lists the known ones."""
    global _FORMATS
    if _FORMATS is None:
        _FORMATS = _registry()
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown source format {name!r}; known: {sorted(_FORMATS)}") from None


def format_names() -> list[str]:
    get_format("rzenembed")
    assert _FORMATS is not None
    return sorted(_FORMATS)


def convert(source: SourceConfig, raw: Any, position: int, sink: Any = None) -> list[Any]:
    """Records (or reject markers) for one raw row of ``source``; an unparsable line is
    passed through for ingest to reject. ``sink``: where embedded media are written."""
    if isinstance(raw, dict) and "__unparsable__" in raw:
        return [raw]
    return get_format(source.format).convert(raw, source, position, sink)
