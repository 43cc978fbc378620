"""Raw data files: how the bytes of one file of a source folder become raw rows.

This module knows file kinds, not source formats (``rzenembed.data.formats`` maps raw rows
to records): JSON Lines (``.jsonl``), gzipped JSON Lines (``.jsonl.gz``), a JSON array of
records (``.json``), Parquet, and WebDataset tars (``.tar``, one raw row per sample:
``{"__key__": key, extension: bytes, ...}``). Everything streams: a file is read block by
block, a JSON array one element at a time, and no file is ever held whole.

Ingest reads a file twice, on workers: a *scan* counts its rows, hashes its bytes (the
source digest is over the files' bytes, compressed or not) and notes where each chunk of
rows starts; a *chunk read* then fetches one chunk's rows. Where a chunk starts depends on
the kind:

- ``.jsonl``, ``.json``, ``.tar``: a byte offset (``starts_are_offsets``); a chunk read
  seeks straight there.
- ``.parquet``: a row index; a chunk read reads only the row groups that hold its rows.
- ``.jsonl.gz``: a row index; gzip cannot seek, so a chunk read decompresses the file from
  its start and skips the rows before its own. The last chunk of a file of N rows thus
  reads all N, and a file of K chunks costs about K/2 decompressions of itself in all:
  cheap for the files this format is used for (a few hundred MB), a reason to split or
  decompress a huge one.

A malformed row (a line or array element that is not JSON, bytes that are not UTF-8) is
read as ``{"__unparsable__": <its start>, "__error__": <why>}``, which ingest rejects as
``schema_invalid``; a file that cannot be read at all raises ``SourceError``: a ``.json``
file whose top level is not an array (or that has content after the array), a corrupt
gzip stream.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json")  # JSON Lines, gzipped, a JSON array
READABLE_SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".tar")
BLOCK = 1 << 20
# What one read of a shard's rows asks an object store for at a time. s3fs's default is a
# 50 MiB read-ahead: every shard task of a 60 MB JSONL file pulled most of the file from its
# offset, 50 tasks 2.5 GB for 60 MB of rows.
SHARD_READ_BLOCK = 4 << 20


class SourceError(ValueError):
    """A source that cannot be read at all (missing folder, no data files, a data file
    that is not what its name says)."""


def unparsable(data: bytes, error: Exception | str) -> dict[str, str]:
    """The raw row of a line or element that is not JSON: ingest rejects it, naming why."""
    return {"__unparsable__": data[:200].decode("utf-8", "replace"), "__error__": str(error)}


def parse_json(data: bytes) -> Any:
    """One JSON line or array element; bytes that are not UTF-8 are unparsable too."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return unparsable(data, exc)


class HashingReader:
    """A read-only file wrapper that hashes what passes through it (a scan hashes the bytes
    it reads anyway, instead of reading the file twice)."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> str:
        """Read what is left; the sha256 of the whole file."""
        while self.read(BLOCK):
            pass
        return self.sha256.hexdigest()


def starts_are_offsets(path: str) -> bool:
    """Whether a scan's chunk starts are byte offsets (else row indices)."""
    return path.endswith((".jsonl", ".json", ".tar"))


# --------------------------------------------------------------------------- whole files


def iter_file_rows(fs: AbstractFileSystem, path: str) -> Iterator[Any]:
    """Every raw row of one data file, in order, streamed."""
    if path.endswith(".parquet"):
        # By path through the filesystem (see DatasetVersion.read_shard for why).
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with fs.open(path, "rb") as raw:
        if path.endswith(".tar"):
            yield from iter_samples(raw)
        elif path.endswith(".json"):
            for _, element in iter_json_array(raw, path):
                yield parse_json(element)
        else:
            for line in _jsonl_lines(raw, path):
                yield parse_json(line)


def scan_file(fs: AbstractFileSystem, path: str, chunk_rows: int) -> tuple[int, str, list[int]]:
    """(rows, sha256 of the file's bytes, where every chunk of ``chunk_rows`` rows starts)
    in one streaming pass; blank JSONL lines are not rows."""
    if path.endswith(".parquet"):
        rows = pq.ParquetFile(path, filesystem=fs).metadata.num_rows
        return rows, _sha256(fs, path), list(range(0, rows, chunk_rows))
    with fs.open(path, "rb") as raw:
        if path.endswith(".tar"):
            return scan_tar(raw, chunk_rows)
        reader = HashingReader(raw)
        if path.endswith(".json"):
            offsets = (offset for offset, _ in iter_json_array(reader, path))
        elif path.endswith(".jsonl.gz"):
            offsets = (index for index, _ in enumerate(_jsonl_lines(reader, path)))
        else:
            offsets = _line_offsets(reader)
        starts, rows = [], 0
        for rows, offset in enumerate(offsets, start=1):
            if (rows - 1) % chunk_rows == 0:
                starts.append(offset)
        return rows, reader.drain(), starts


def read_rows(
    fs: AbstractFileSystem, path: str, offset: int | None, row: int, count: int
) -> list[Any]:
    """Rows ``[row, row + count)`` of one data file: from byte ``offset`` where a scan noted
    one (``starts_are_offsets``), else by row index."""
    if path.endswith(".parquet"):
        return _parquet_rows(fs, path, row, count)
    with fs.open(path, "rb", block_size=SHARD_READ_BLOCK) as raw:
        if path.endswith(".tar"):
            raw.seek(offset or 0)
            return list(itertools.islice(iter_samples(raw), count))
        if path.endswith(".json"):
            raw.seek(offset or 0)
            elements = iter_json_array(raw, path, start=offset)
            return [parse_json(e) for _, e in itertools.islice(elements, count)]
        if path.endswith(".jsonl.gz"):
            lines = itertools.islice(_jsonl_lines(raw, path), row, row + count)
            return [parse_json(line) for line in lines]
        raw.seek(offset or 0)
        return [parse_json(line) for line in itertools.islice(_jsonl_lines(raw, path), count)]


def _sha256(fs: AbstractFileSystem, path: str) -> str:
    with fs.open(path, "rb") as raw:
        return HashingReader(raw).drain()


def _parquet_rows(fs: AbstractFileSystem, path: str, row: int, count: int) -> list[Any]:
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


# --------------------------------------------------------------------------- JSON Lines


def _jsonl_lines(raw: BinaryIO | HashingReader, path: str) -> Iterator[bytes]:
    """The non-blank lines of a JSONL file (decompressed for ``.jsonl.gz``), as bytes: a
    line that is not UTF-8 is a reject, not a crash."""
    if not path.endswith(".gz"):
        yield from (line for line in raw if line.strip())
        return
    with _readable_gzip(path), gzip.GzipFile(fileobj=raw, mode="rb") as lines:
        yield from (line for line in lines if line.strip())


@contextmanager
def _readable_gzip(path: str) -> Iterator[None]:
    """A corrupt or truncated gzip stream is the file's fault: a ``SourceError`` naming it."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise SourceError(f"{path}: not a readable gzip file: {exc}") from None


def _line_offsets(raw: HashingReader) -> Iterator[int]:
    """The byte offset of every non-blank line of a plain JSONL file."""
    offset = 0
    for line in _lines(raw):
        if line.strip():
            yield offset
        offset += len(line)


def _lines(raw: HashingReader) -> Iterator[bytes]:
    """The lines of a stream that only has ``read`` (the hashing wrapper), block by block."""
    pending = b""
    while block := raw.read(BLOCK):
        lines = (pending + block).split(b"\n")
        pending = lines.pop()
        yield from (line + b"\n" for line in lines)
    if pending:
        yield pending


# --------------------------------------------------------------------------- JSON arrays

# A whole string (escapes included), a structural character, or the opening quote of a
# string that does not end within the buffer.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},"]', re.DOTALL)
_SPACE = b" \t\r\n"
_BOM = b"\xef\xbb\xbf"


class _Blocks:
    """A window on a stream: ``buf[pos:]`` is what is read and not yet consumed; ``base``
    is the file offset of ``buf[0]``. The window only grows while an element is
    incomplete, so it holds at most about twice the largest element (or one block)."""

    def __init__(self, raw: BinaryIO | HashingReader, base: int):
        self.raw, self.base = raw, base
        self.buf, self.pos, self.eof = b"", 0, False

    def more(self) -> bool:
        """Read another block (at least as long as what is pending, so an element that
        spans many blocks costs linear time); False at the end of the stream."""
        if self.eof:
            return False
        data = self.raw.read(max(BLOCK, len(self.buf) - self.pos))
        if not data:
            self.eof = True
            return False
        self.buf, self.base, self.pos = self.buf[self.pos :] + data, self.base + self.pos, 0
        return True

    def next_byte(self) -> bytes:
        """The next byte that is not whitespace, not consumed; ``b""`` at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    @property
    def offset(self) -> int:
        return self.base + self.pos


def _element_end(buf: bytes, start: int) -> int | None:
    """Where the array element starting at ``start`` ends: the index of the ``,`` or ``]``
    after it at its own depth (strings skipped whole), or None when ``buf`` ends first.
    Brackets are only counted, not matched, so a malformed element still ends somewhere
    and the elements after it are read."""
    depth = 0
    for token in _TOKEN.finditer(buf, start):
        mark = token.group()
        if len(mark) > 1:
            continue  # a whole string
        if mark == b'"':
            return None  # a string cut off by the end of the buffer
        if mark in b"[{":
            depth += 1
        elif mark == b"]" and depth == 0:
            return token.start()
        elif mark in b"]}":
            depth = max(depth - 1, 0)
        elif depth == 0:  # a comma between elements
            return token.start()
    return None


def iter_json_array(
    raw: BinaryIO | HashingReader, name: str, start: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """(byte offset, bytes) of every element of the JSON array ``raw`` holds, in order:
    each element is read whole, the array never. ``start``: the stream is positioned at
    that element's offset (a scan's chunk start) instead of at the file's beginning.

    An element is not parsed here (``parse_json`` does, so a malformed one is a reject);
    an empty one (``[1,,2]``, a trailing comma) is a row too, and a malformed one. A file
    cut off inside the array ends with its last, incomplete element. A top level that is
    not an array, or content after the array's closing bracket, raises ``SourceError``."""
    blocks = _Blocks(raw, start or 0)
    if start is None:
        _open_array(blocks, name)
    first = start is None
    while True:
        mark = blocks.next_byte()
        if not mark:
            return  # no closing bracket: a truncated file
        if first and mark == b"]":
            blocks.pos += 1
            _check_nothing_follows(blocks, name)
            return
        first = False
        offset = blocks.offset
        while (end := _element_end(blocks.buf, blocks.pos)) is None and blocks.more():
            pass
        stop = len(blocks.buf) if end is None else end
        yield offset, blocks.buf[blocks.pos : stop].strip(_SPACE)
        if end is None:
            return
        blocks.pos = end + 1
        if blocks.buf[end : end + 1] == b"]":
            _check_nothing_follows(blocks, name)
            return


def _open_array(blocks: _Blocks, name: str) -> None:
    """Consume the array's opening bracket (after a UTF-8 byte order mark, if any)."""
    while len(blocks.buf) < len(_BOM) and blocks.more():
        pass
    if blocks.buf.startswith(_BOM):
        blocks.pos = len(_BOM)
    mark = blocks.next_byte()
    if mark != b"[":
        raise SourceError(
            f"{name}: a .json data file must hold one JSON array of records; its top level "
            f"is {_kind_of(mark)} (a file of one JSON object per line is named .jsonl)"
        )
    blocks.pos += 1


def _check_nothing_follows(blocks: _Blocks, name: str) -> None:
    if blocks.next_byte():
        raise SourceError(
            f"{name}: content after the JSON array's closing bracket (byte {blocks.offset})"
        )


def _kind_of(mark: bytes) -> str:
    kinds = {b"": "missing (the file is empty)", b"{": "an object", b'"': "a string"}
    return kinds.get(mark, f"not an array (it starts with {mark.decode('latin-1')!r})")


# --------------------------------------------------------------------------- WebDataset tars


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the key is the path up to the first dot of the file
    name, the extension what follows it (WebDataset's convention)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def scan_tar(raw: BinaryIO, chunk_rows: int) -> tuple[int, str, list[int]]:
    """(samples, sha256 of the file, byte offset of every chunk's first member)."""
    reader = HashingReader(raw)
    samples, starts, current = 0, [], None
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            if not member.isfile():
                continue
            key, _ = sample_key(member.name)
            if key != current:
                if samples % chunk_rows == 0:
                    starts.append(member.offset)
                samples, current = samples + 1, key
    return samples, reader.drain(), starts


def iter_samples(raw: BinaryIO) -> Iterator[dict[str, Any]]:
    """The samples of a tar read from ``raw``'s position on: ``{"__key__": key,
    extension: bytes, ...}``, one per run of members sharing a key."""
    sample: dict[str, Any] | None = None
    with tarfile.open(fileobj=raw, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            if not member.isfile():
                continue
            key, extension = sample_key(member.name)
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            handle = tar.extractfile(member)
            sample[extension] = handle.read() if handle is not None else b""
    if sample is not None:
        yield sample
