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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from rzenembed.config import SourceConfig
from rzenembed.data.schema import media, side
from rzenembed.data.storage import filesystem

MMEB_IMAGE_PLACEHOLDER = "<|image_1|>"
RAW_SUFFIXES = (".jsonl", ".parquet", ".tar")


class SourceError(ValueError):
    """A source that cannot be read at all (missing folder, no data files)."""


def source_files(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The data files of a raw source folder, sorted, as full paths on its filesystem."""
    fs, path = filesystem(uri, endpoint_url)
    if not fs.exists(path):
        raise SourceError(f"source folder not found: {uri}")
    files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(RAW_SUFFIXES))
    if not files:
        raise SourceError(f"{uri}: no *.jsonl, *.parquet or *.tar files")
    return files


def media_listing(uri: str, endpoint_url: str | None = None) -> list[tuple[str, int]]:
    """(relative path, size) of every file of the source folder that is not a data file."""
    fs, path = filesystem(uri, endpoint_url)
    return sorted(
        (p[len(path) :], info.get("size", 0))
        for p, info in fs.find(path, detail=True).items()
        if not p.endswith(RAW_SUFFIXES)
    )


def combine_source_digest(files: list[tuple[str, str]], media: list[tuple[str, int]]) -> str:
    """The source's digest from its data files' (name, sha256) in order and its media
    listing. Per-file digests can be computed anywhere (workers, in parallel); the result
    does not depend on where."""
    digest = hashlib.sha256()
    for name, file_sha in files:
        digest.update(f"{name}\0{file_sha}\n".encode())
    digest.update(json.dumps(media).encode())
    return digest.hexdigest()


def file_sha256(uri: str, endpoint_url: str | None = None) -> str:
    fs, path = filesystem(uri, endpoint_url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_file_uris(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The source's data files as URIs (``s3://...`` on S3, plain paths locally), sorted."""
    remote = "://" in uri and not uri.startswith("file://")
    scheme = uri.split("://", 1)[0] + "://" if remote else ""
    return [f"{scheme}{f}" for f in source_files(uri, endpoint_url)]


def source_digest(uri: str, endpoint_url: str | None = None) -> str:
    """sha256 over the source's data files' contents and its media listing (names + sizes).

    Media bytes are not hashed here (they are read at ingest anyway); a changed media file
    of the same size is caught by the content hashes of the clean step. Ingest computes the
    same value from the per-file digests its scan tasks take (``combine_source_digest``).
    """
    files = [
        (f.rsplit("/", 1)[-1], file_sha256(f, endpoint_url))
        for f in data_file_uris(uri, endpoint_url)
    ]
    return combine_source_digest(files, media_listing(uri, endpoint_url))


def source_listing_digest(uri: str, endpoint_url: str | None = None) -> str:
    """A cheap identity of a source from its listing alone (every file's name, size and
    ETag or modification time), for cache keys: no byte is read."""
    fs, path = filesystem(uri, endpoint_url)
    if not fs.exists(path):
        raise SourceError(f"source folder not found: {uri}")
    rows = sorted(
        (p[len(path) :], i.get("size", 0), str(i.get("ETag") or i.get("mtime") or ""))
        for p, i in fs.find(path, detail=True).items()
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --------------------------------------------------------------------------- streaming


@dataclass
class FileScan:
    """One data file, scanned on a worker: its row count, its sha256, and where each of its
    chunks of ``chunk_rows`` rows starts (byte offsets for JSONL, row indices for Parquet)."""

    path: str
    rows: int
    sha256: str
    starts: list[int]


@dataclass
class RowChunk:
    """Rows ``[row, row + count)`` of one data file, the first at global ``position``."""

    name: str
    path: str
    row: int
    count: int
    position: int
    offset: int | None = None  # JSONL: byte offset of the chunk's first line


def scan_data_file(path: str, endpoint_url: str | None, chunk_rows: int) -> FileScan:
    """Count a data file's rows (blank JSONL lines are not rows) and hash its bytes in one
    streaming pass; note where every chunk of ``chunk_rows`` rows begins."""
    fs, _ = filesystem(path, endpoint_url)
    full = fs._strip_protocol(path)
    if full.endswith(".tar"):  # WebDataset: samples, and the byte offset of each chunk
        from rzenembed.data.formats.webdataset import scan_tar

        with fs.open(full, "rb") as f:
            rows, sha256, starts = scan_tar(f, chunk_rows)
        return FileScan(path, rows, sha256, starts)
    if full.endswith(".parquet"):
        meta = pq.ParquetFile(full, filesystem=fs).metadata
        rows = meta.num_rows
        return FileScan(
            path, rows, file_sha256(path, endpoint_url), list(range(0, rows, chunk_rows))
        )
    h, rows, offset, starts = hashlib.sha256(), 0, 0, []
    with fs.open(full, "rb") as f:
        for line in f:
            h.update(line)
            if line.strip():
                if rows % chunk_rows == 0:
                    starts.append(offset)
                rows += 1
            offset += len(line)
    return FileScan(path, rows, h.hexdigest(), starts)


def plan_chunks(scans: list[FileScan], chunk_rows: int) -> list[RowChunk]:
    """Shards of at most ``chunk_rows`` rows in file order, named ``part-00000`` on, never
    crossing a file; positions count rows across files. An empty source gets one empty
    chunk (its version then has one empty shard)."""
    chunks, position = [], 0
    for scan in scans:
        for k, start in enumerate(scan.starts):
            row = k * chunk_rows
            count = min(chunk_rows, scan.rows - row)
            offset = None if scan.path.endswith(".parquet") else start  # JSONL, tar: bytes
            chunks.append(
                RowChunk(f"part-{len(chunks):05d}", scan.path, row, count, position + row, offset)
            )
        position += scan.rows
    if not chunks:
        chunks.append(RowChunk("part-00000", "", 0, 0, 0))
    return chunks


def read_chunk(
    source: SourceConfig,
    chunk: RowChunk,
    endpoint_url: str | None = None,
    media_root: str | None = None,
) -> list[tuple[int, Any]]:
    """(position, record) of the chunk's rows, read straight from its file (on a worker)
    and converted by the source's format; ``media_root``: where a format that embeds media
    writes them."""
    from rzenembed.data.formats import convert
    from rzenembed.data.formats.media_sink import MediaSink

    if chunk.count == 0:
        return []
    raws = _read_file_rows(chunk, endpoint_url)
    sink = MediaSink(media_root, endpoint_url) if media_root else None
    out = []
    for i, raw in enumerate(raws):
        position = chunk.position + i
        out.extend((position, row) for row in convert(source, raw, position, sink))
    return out


def _read_file_rows(chunk: RowChunk, endpoint_url: str | None) -> list[Any]:
    fs, _ = filesystem(chunk.path, endpoint_url)
    full = fs._strip_protocol(chunk.path)
    if full.endswith(".parquet"):
        return _parquet_rows(fs, full, chunk.row, chunk.count)
    if full.endswith(".tar"):
        from rzenembed.data.formats.webdataset import read_samples

        with fs.open(full, "rb") as f:
            return read_samples(f, chunk.offset or 0, chunk.count)
    return _jsonl_rows(fs, full, chunk.offset or 0, chunk.count)


def _jsonl_rows(fs, path: str, offset: int, count: int) -> list[Any]:
    rows: list[Any] = []
    with fs.open(path, "rb") as f:
        f.seek(offset)
        for line in f:
            if not line.strip():
                continue
            rows.append(_parse_line(line))
            if len(rows) == count:
                break
    return rows


def _parse_line(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {"__unparsable__": line[:200].decode("utf-8", "replace"), "__error__": str(exc)}


def _parquet_rows(fs, path: str, row: int, count: int) -> list[Any]:
    """Rows ``[row, row + count)`` of a Parquet file, reading only the row groups that hold
    them."""
    pf = pq.ParquetFile(path, filesystem=fs)
    groups, first, seen = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if seen + n > row and seen < row + count:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    table = pf.read_row_groups(groups) if groups else pf.schema_arrow.empty_table()
    return table.slice(row - (first or 0), count).to_pylist()


def iter_raw_rows(
    source: SourceConfig, uri: str, endpoint_url: str | None = None, sink: Any = None
) -> Iterator[tuple[int, Any]]:
    """(position, record) for every row of the source, in file then line order."""
    from rzenembed.data.formats import convert

    fs, _ = filesystem(uri, endpoint_url)
    position = 0
    for file in source_files(uri, endpoint_url):
        for raw in rows_of_file(fs, file):
            for row in convert(source, raw, position, sink):
                yield position, row
            position += 1


def rows_of_file(fs, file: str) -> Iterator[Any]:
    """Every raw row of one data file of a source (JSONL, JSON, Parquet or a WebDataset
    tar), streamed; ingest, ``inspect-source`` and side-file recaptions all read this way."""
    if file.endswith(".tar"):
        from rzenembed.data.formats.webdataset import iter_samples

        with fs.open(file, "rb") as f:
            yield from iter_samples(f)
        return
    if file.endswith(".parquet"):
        # By path through the filesystem (see DatasetVersion.read_shard for why).
        for batch in pq.ParquetFile(file, filesystem=fs).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with fs.open(file, "rb") as f:  # bytes: a line that is not UTF-8 is a reject, not a crash
        for line in f:
            if line.strip():
                yield _parse_line(line)


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


def source_uri(source: SourceConfig, base: str | None = None, data_root: str | None = None) -> str:
    """A source's URI: relative local paths resolve under ``data_root`` (``PipelineConfig.
    data_root``; itself relative to ``base``) or ``base``, and are made absolute (versions
    record it as their media root, and Ray workers do not share the driver's working
    directory)."""
    from rzenembed.config import data_location

    return data_location(data_root, source.uri, base)


def source_media_root(
    source: SourceConfig, base: str | None = None, data_root: str | None = None
) -> str:
    """Where ``source``'s media paths start: ``sources[].media_root`` or the folder itself."""
    from rzenembed.config import data_location

    if source.media_root:
        return data_location(data_root, source.media_root, base)
    return source_uri(source, base, data_root)
