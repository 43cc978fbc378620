"""Parquet files on the storage root read by byte range: a footer with one suffix read, then
only the column chunks of the row groups and columns asked for (one GET each on S3, sent
concurrently; chunks close together merged), decoded by Arrow as if from the whole file.

Reading a few columns through a filesystem's file object instead pulls whatever its
read-ahead decides (s3fs: 50 MiB a read): for the ``id`` and ``negatives`` of a video shard
that is most of the file, frames included. Training's row reads (``rzenembed.training.rows``)
and the column-only reads of the data steps (``DatasetVersion.read_shard``) both go through
here.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.data.storage import Storage

# First guess at a footer's size (pyarrow's own); once a shard's footer is known, the next
# reads ask for that size plus an eighth, so shards written alike cost one request each.
FOOTER_SAMPLE_BYTES = 64 * 2**10
# Column chunks this close together are fetched as one range: a request costs more than
# this many bytes of transfer (fsspec's ``open_parquet_file`` merges at the same gap).
MERGE_GAP_BYTES = 64 * 2**10
_PARQUET_MAGIC = b"PAR1"
_FOOTER_TRAILER = 8  # footer length (4 bytes, little-endian) and the magic


def footer_length(tail: bytes) -> int:
    """The length of the footer a Parquet file's last bytes announce (trailer excluded)."""
    if len(tail) < _FOOTER_TRAILER or tail[-4:] != _PARQUET_MAGIC:
        raise ValueError("not a Parquet file: no PAR1 magic at its end")
    return int.from_bytes(tail[-_FOOTER_TRAILER:-4], "little")


def read_footer(storage: Storage, path: str, sample: int = FOOTER_SAMPLE_BYTES) -> pq.FileMetaData:
    """The footer of the Parquet file at ``path``: one suffix read of ``sample`` bytes, and a
    second, of exactly the footer, when it is longer than that."""
    tail = storage.read_tail(path, max(sample, _FOOTER_TRAILER))
    needed = footer_length(tail) + _FOOTER_TRAILER
    if needed > len(tail):
        tail = storage.read_tail(path, needed)
    # Arrow parses a footer from any buffer that ends like the file: offsets stay absolute.
    return pq.read_metadata(pa.BufferReader(tail[-needed:]))


def column_chunk_range(column: pq.ColumnChunkMetaData) -> tuple[int, int]:
    """``[start, end)`` of a column chunk in its file, computed as Arrow's reader does."""
    start = column.data_page_offset
    dictionary = column.dictionary_page_offset
    if column.has_dictionary_page and dictionary is not None and 0 < dictionary < start:
        start = dictionary
    return start, start + column.total_compressed_size


def chunk_ranges(
    metadata: pq.FileMetaData, groups: Iterable[int], columns: Sequence[str]
) -> list[tuple[int, int]]:
    """The byte ranges of ``columns`` (top-level names) in row groups ``groups``, merged
    where less than ``MERGE_GAP_BYTES`` apart."""
    wanted = set(columns)
    ranges = []
    for group in groups:
        row_group = metadata.row_group(group)
        for c in range(row_group.num_columns):
            chunk = row_group.column(c)
            if chunk.path_in_schema.split(".", 1)[0] in wanted:
                ranges.append(column_chunk_range(chunk))
    return merged_ranges(ranges, MERGE_GAP_BYTES)


def merged_ranges(ranges: Iterable[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """``ranges`` sorted, with those that overlap or lie within ``gap`` bytes joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


class KnownRanges:
    """A read-only file of which only some byte ranges were fetched: Arrow reads row groups
    from it as from the whole file. Arrow asks only for the column chunks the ranges were
    computed from (the same footer), so a read outside them is a bug and raises."""

    def __init__(self, parts: Sequence[tuple[int, bytes]]):
        self._parts = sorted(parts)
        self._starts = [start for start, _ in self._parts]
        self._end = max((start + len(data) for start, data in self._parts), default=0)
        self._position = 0
        self.closed = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, self._end)[whence]
        self._position = base + offset
        return self._position

    def read(self, size: int = -1) -> memoryview:
        index = bisect.bisect_right(self._starts, self._position) - 1
        start, data = self._parts[index] if index >= 0 else (0, b"")
        size = self._end - self._position if size < 0 else size
        if index < 0 or self._position + size > start + len(data):
            raise ValueError(f"bytes {self._position}..{self._position + size} were not fetched")
        offset = self._position - start
        self._position += size
        return memoryview(data)[offset : offset + size]

    def close(self) -> None:
        self.closed = True


def read_row_groups(
    storage: Storage,
    path: str,
    metadata: pq.FileMetaData,
    groups: Sequence[int],
    columns: Sequence[str],
) -> pa.Table:
    """Row groups ``groups`` (in order) of the Parquet file at ``path``, ``columns`` only,
    fetching only their column chunks' bytes. A local file is read by Arrow itself, which
    asks the OS for the same chunks without copying them through Python."""
    if storage.is_local:
        with pa.OSFile(path) as source:
            return _decoded(source, metadata, groups, columns)
    ranges = chunk_ranges(metadata, groups, columns)
    data = storage.read_ranges(path, ranges)
    source = KnownRanges([(start, part) for (start, _), part in zip(ranges, data, strict=True)])
    return _decoded(source, metadata, groups, columns)


def _decoded(
    source: Any, metadata: pq.FileMetaData, groups: Sequence[int], columns: Sequence[str]
) -> pa.Table:
    with pq.ParquetFile(source, metadata=metadata, pre_buffer=False) as handle:
        return handle.read_row_groups(list(groups), columns=list(columns))


def read_columns(storage: Storage, path: str, columns: Sequence[str]) -> pa.Table:
    """``columns`` of every row group of the Parquet file at ``path`` (inside ``storage``'s
    filesystem): the footer, then those columns' chunks only."""
    metadata = read_footer(storage, path)
    return read_row_groups(storage, path, metadata, range(metadata.num_row_groups), columns)
