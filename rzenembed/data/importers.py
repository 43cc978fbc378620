"""Importers: raw source datasets -> rows in the record shape (not yet validated).

Formats (``sources[].format``):

- ``rzenembed`` / ``jsonl``: the project's own format, ``*.jsonl`` files (one record per
  line) or ``*.parquet`` files with the record columns, media URIs relative to the folder.
- ``mmeb``: the MMEB training format used by VLM2Vec: ``qry``, ``qry_image_path``,
  ``pos_text``, ``pos_image_path`` and optional ``neg_text``, ``neg_image_path``; the
  ``<|image_1|>`` placeholder marks where the image went in the text and is removed (the
  prompt template places the image). MMEB rows have no id; one is made from the dataset
  name and the row number, so it is stable for a given file.

Rows are yielded as plain dicts with their position, so a malformed line becomes a
``schema_invalid`` reject downstream instead of stopping the import.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from rzenembed.config import SourceConfig
from rzenembed.data.schema import media, side
from rzenembed.data.storage import filesystem, join

MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
RAW_SUFFIXES = (".jsonl", ".parquet")


class SourceError(ValueError):
    """A source that cannot be read at all (missing folder, no data files)."""


def source_files(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The data files of a raw source folder, sorted, as full paths on its filesystem."""
    fs, path = filesystem(uri, endpoint_url)
    if not fs.exists(path):
        raise SourceError(f"source folder not found: {uri}")
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(RAW_SUFFIXES))
    if not files:
        raise SourceError(f"{uri}: no *.jsonl or *.parquet files")
    return files


def source_digest(uri: str, endpoint_url: str | None = None) -> str:
    """sha256 over the source's data files' bytes and its media listing (names + sizes).

    Media bytes are not hashed here (they are read at ingest anyway); a changed media file
    of the same size is caught by the content hashes of the clean step.
    """
    fs, path = filesystem(uri, endpoint_url)
    digest = hashlib.sha256()
    for file in source_files(uri, endpoint_url):
        digest.update(file.rsplit("/", 1)[-1].encode())
        with fs.open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    media_listing = sorted(
        (p[len(path) :], info.get("size", 0))
        for p, info in fs.find(path, detail=True).items()
        if not p.endswith(RAW_SUFFIXES)
    )
    digest.update(json.dumps(media_listing).encode())
    return digest.hexdigest()


def iter_raw_rows(
    source: SourceConfig, uri: str, endpoint_url: str | None = None
) -> Iterator[tuple[int, Any]]:
    """(position, row) for every row of the source, in file then line order."""
    fs, _ = filesystem(uri, endpoint_url)
    position = 0
    for file in source_files(uri, endpoint_url):
        for raw in _rows_of_file(fs, file):
            row = from_mmeb(raw, source.name, position) if source.format == "mmeb" else raw
            yield position, row
            position += 1


def _rows_of_file(fs, file: str) -> Iterator[Any]:
    if file.endswith(".parquet"):
        # By path through the filesystem (see DatasetVersion.read_shard for why).
        for batch in pq.ParquetFile(file, filesystem=fs).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with fs.open(file, "r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                yield {"__unparsable__": line[:200], "__error__": str(exc)}


def mmeb_side(text: Any, image_path: Any) -> dict:
    """One side of an MMEB row (train or eval): the image placeholder removed from the text."""
    text = text if isinstance(text, str) else ""
    text = " ".join(text.replace(MMEB_IMAGE_PLACEHOLDER, " ").split())
    items = [media("image", image_path)] if isinstance(image_path, str) and image_path else []
    return side(text=text, media_items=items)


def from_mmeb(raw: Any, dataset: str, position: int) -> Any:
    """Map one MMEB (VLM2Vec) training row onto the record shape."""
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


def source_uri(source: SourceConfig, base: str | None = None) -> str:
    """A source's URI, resolved against ``base`` when it is a relative local path; a local
    path is made absolute (versions record it as their media root, and Ray workers do not
    share the driver's working directory)."""
    if "://" in source.uri:
        return source.uri
    if base is None or source.uri.startswith("/"):
        return os.path.abspath(source.uri)
    uri = join(base, source.uri)
    return uri if "://" in uri else os.path.abspath(uri)
