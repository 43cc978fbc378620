"""Importers: a raw source folder -> raw rows, converted by its format into the record
shape (not yet validated), and the folder's identity (its digest).

What a folder holds, as its format sees it (``list_source_files``, the one place that
lists a source's data files; ingest, ``inspect-source``, the media-root check and
side-file captions all go through it):

- *data files*: the top-level files with one of the format's ``suffixes`` (``.tar`` for
  ``webdataset``; JSON Lines, gzipped or not, JSON arrays and Parquet for the others), read
  as rows in name order;
- *not data*: the other top-level files with a suffix some format reads
  (``raw_files.READABLE_SUFFIXES``), such as img2dataset's ``NNNNN.parquet`` and
  ``NNNNN_stats.json`` next to its tars: never read as rows, reported by
  ``inspect-source``;
- everything else (media, READMEs, files in subfolders): the media listing.

The source digest is a function of the folder's content alone, whatever the format: the
sha256 of every top-level file with a readable suffix (data or not), in name order, and
the media listing's names and sizes. Files in subfolders named like data files
(``.jsonl``, ``.parquet``, ``.tar``) are in neither part, as they always were, so the
digests of existing sources hold.

Rows are yielded as plain dicts with their position, so a malformed line becomes a
``schema_invalid`` reject downstream instead of stopping the import.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fsspec import AbstractFileSystem

from rzenembed.config import SourceConfig, data_location
from rzenembed.data.formats import REJECT_KEY, convert, get_format
from rzenembed.data.formats.media_sink import AddressOnlySink, MediaSink
from rzenembed.data.raw_files import (
    READABLE_SUFFIXES,
    SourceError,
    iter_file_rows,
    read_rows,
    scan_file,
    starts_are_offsets,
)
from rzenembed.data.storage import filesystem

# Files in subfolders with these suffixes were never in the media listing (see above).
UNLISTED_NESTED_SUFFIXES = (".jsonl", ".parquet", ".tar")


@dataclass(frozen=True)
class SourceFiles:
    """A source folder's top-level files that some format reads, as one format sees them
    (full paths on the folder's filesystem, sorted)."""

    data: list[str]  # read as rows
    not_data: list[str]  # a readable suffix, but not one of the format's


def list_source_files(uri: str, fmt: str, endpoint_url: str | None = None) -> SourceFiles:
    """The source's data files for format ``fmt`` and the files it leaves as not data;
    ``SourceError`` when the folder is missing or holds no data file of the format."""
    suffixes = get_format(fmt).suffixes
    fs, path = filesystem(uri, endpoint_url)
    content = _readable_files(fs, path, uri)
    data = [p for p in content if p.endswith(suffixes)]
    if not data:
        raise SourceError(f"{uri}: no {_either(suffixes)} files for format {fmt!r}")
    return SourceFiles(data, [p for p in content if not p.endswith(suffixes)])


def _readable_files(fs: AbstractFileSystem, path: str, uri: str) -> list[str]:
    """The top-level files with a suffix some format reads, sorted."""
    if not fs.exists(path):
        raise SourceError(f"source folder not found: {uri}")
    entries = fs.ls(path, detail=True, refresh=True)
    return sorted(
        e["name"]
        for e in entries
        if e.get("type") == "file" and e["name"].endswith(READABLE_SUFFIXES)
    )


def _either(suffixes: tuple[str, ...]) -> str:
    """``.a``, ``.a or .b``, ``.a, .b or .c``: the suffixes for an error message."""
    *rest, last = suffixes
    return f"{', '.join(rest)} or {last}" if rest else last


def file_uris(uri: str, paths: list[str]) -> list[str]:
    """Paths of a source's filesystem as URIs (``s3://...`` on S3, plain paths locally)."""
    remote = "://" in uri and not uri.startswith("file://")
    scheme = uri.split("://", 1)[0] + "://" if remote else ""
    return [f"{scheme}{p}" for p in paths]


def data_file_uris(uri: str, fmt: str, endpoint_url: str | None = None) -> list[str]:
    """The source's data files for format ``fmt`` as URIs, sorted."""
    return file_uris(uri, list_source_files(uri, fmt, endpoint_url).data)


def media_listing(uri: str, endpoint_url: str | None = None) -> list[tuple[str, int]]:
    """(relative path, size) of every file of the source folder whose bytes the digest
    does not hash (see the module's docstring)."""
    fs, path = filesystem(uri, endpoint_url)
    hashed = set(_readable_files(fs, path, uri))
    return sorted(
        (p[len(path) :], info.get("size", 0))
        for p, info in fs.find(path, detail=True).items()
        if p not in hashed and not p.endswith(UNLISTED_NESTED_SUFFIXES)
    )


def combine_source_digest(files: list[tuple[str, str]], media: list[tuple[str, int]]) -> str:
    """The source's digest from its hashed files' (name, sha256) in name order and its
    media listing. Per-file digests can be computed anywhere (workers, in parallel); the
    result does not depend on where."""
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


def source_digest(uri: str, endpoint_url: str | None = None) -> str:
    """sha256 over the contents of the source's top-level files with a readable suffix
    (whatever its format reads of them) and its media listing (names + sizes).

    Media bytes are not hashed here (they are read at ingest anyway); a changed media file
    of the same size is caught by the content hashes of the clean step. Ingest computes the
    same value from the per-file digests its scan tasks take (``combine_source_digest``).
    """
    fs, path = filesystem(uri, endpoint_url)
    hashed = file_uris(uri, _readable_files(fs, path, uri))
    if not hashed:
        raise SourceError(f"{uri}: no {_either(READABLE_SUFFIXES)} files")
    files = [(f.rsplit("/", 1)[-1], file_sha256(f, endpoint_url)) for f in hashed]
    return combine_source_digest(files, media_listing(uri, endpoint_url))


def source_listing_digest(uri: str, endpoint_url: str | None = None) -> str:
    """A cheap identity of a source for "has it changed?": the name, size and ETag (or
    modification time) of its top-level files with a readable suffix, from one listing of
    the folder. No byte is read and the media objects are not listed (millions for a web
    crawl): a media object replaced while every data file stays the same is not noticed
    here (the full identity, ``source_digest``, lists them; refresh the ingest to use it)."""
    fs, path = filesystem(uri, endpoint_url)
    try:  # refresh: a long-lived process must not answer from its cached listing
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        raise SourceError(f"source folder not found: {uri}") from None
    rows = sorted(
        (e["name"][len(path) :], e.get("size", 0), str(e.get("ETag") or e.get("mtime") or ""))
        for e in entries
        if e.get("type") == "file" and e["name"].endswith(READABLE_SUFFIXES)
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --------------------------------------------------------------------------- streaming


@dataclass
class FileScan:
    """One data file, scanned on a worker: its row count, its sha256, and where each of its
    chunks of ``chunk_rows`` rows starts (byte offsets for JSONL, JSON arrays and tars, row
    indices for Parquet and gzipped JSONL: ``raw_files.starts_are_offsets``)."""

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
    offset: int | None = None  # byte offset of the chunk's first row, where there is one


def scan_data_file(path: str, endpoint_url: str | None, chunk_rows: int) -> FileScan:
    """Count a data file's rows (blank JSONL lines are not rows) and hash its bytes in one
    streaming pass; note where every chunk of ``chunk_rows`` rows begins."""
    fs, _ = filesystem(path, endpoint_url)
    rows, sha256, starts = scan_file(fs, fs._strip_protocol(path), chunk_rows)
    return FileScan(path, rows, sha256, starts)


def plan_chunks(scans: list[FileScan], chunk_rows: int) -> list[RowChunk]:
    """Shards of at most ``chunk_rows`` rows in file order, named ``part-00000`` on, never
    crossing a file; positions count rows across files. An empty source gets one empty
    chunk (its version then has one empty shard)."""
    chunks, position = [], 0
    for scan in scans:
        for k, start in enumerate(scan.starts):
            row = k * chunk_rows
            count = min(chunk_rows, scan.rows - row)
            offset = start if starts_are_offsets(scan.path) else None
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
    if chunk.count == 0:
        return []
    fs, _ = filesystem(chunk.path, endpoint_url)
    full = fs._strip_protocol(chunk.path)
    raws = read_rows(fs, full, chunk.offset, chunk.row, chunk.count)
    sink = MediaSink(media_root, endpoint_url) if media_root else None
    out = []
    for i, raw in enumerate(raws):
        position = chunk.position + i
        out.extend((position, row) for row in convert(source, raw, position, sink))
    return out


def iter_raw_rows(
    source: SourceConfig, uri: str, endpoint_url: str | None = None, sink: Any = None
) -> Iterator[tuple[int, Any]]:
    """(position, record) for every row of the source, in file then line order."""
    fs, _ = filesystem(uri, endpoint_url)
    position = 0
    for file in list_source_files(uri, source.format, endpoint_url).data:
        for raw in iter_file_rows(fs, file):
            for row in convert(source, raw, position, sink):
                yield position, row
            position += 1


def first_raw_rows(fs: AbstractFileSystem, files: list[str], rows: int) -> Iterator[Any]:
    """The first ``rows`` raw rows of ``files``, in file then row order, streamed."""
    return itertools.islice((r for f in files for r in iter_file_rows(fs, f)), rows)


def first_media_paths(
    source: SourceConfig, uri: str, rows: int, endpoint_url: str | None = None
) -> list[str]:
    """The media paths the first ``rows`` rows of ``source`` name (converted by its format;
    rows a format rejects name none)."""
    files = list_source_files(uri, source.format, endpoint_url).data
    fs, _ = filesystem(uri, endpoint_url)
    paths: list[str] = []
    for position, raw in enumerate(first_raw_rows(fs, files, rows)):
        for record in convert(source, raw, position, AddressOnlySink()):
            if not isinstance(record, dict) or REJECT_KEY in record:
                continue
            for key in ("query", "positive"):
                side = record.get(key)
                if isinstance(side, dict):
                    paths += [m["uri"] for m in side.get("media") or [] if m.get("uri")]
    return paths


def source_uri(source: SourceConfig, base: str | None = None, data_root: str | None = None) -> str:
    """A source's URI: relative local paths resolve under ``data_root`` (``PipelineConfig.
    data_root``; itself relative to ``base``) or ``base``, and are made absolute (versions
    record it as their media root, and Ray workers do not share the driver's working
    directory)."""
    return data_location(data_root, source.uri, base)


def source_media_root(
    source: SourceConfig, base: str | None = None, data_root: str | None = None
) -> str:
    """Where ``source``'s media paths start: ``sources[].media_root`` or the folder itself."""
    if source.media_root:
        return data_location(data_root, source.media_root, base)
    return source_uri(source, base, data_root)
