"""A stage's datasets as Parquet on the storage root, read row by row on demand.

A training rank never holds a dataset: it holds where each shard's rows start (one integer
per shard) and reads the rows of its slice of each step when the step needs them.

Reads
    A row index maps to a shard (binary search over the shards' first rows) and, through
    the shard's Parquet footer, to a row group. The row group is read through Arrow with
    only the training columns and kept in a small LRU cache bounded in bytes
    (``cache_bytes``), so rows that share a row group (sibling clips, small datasets, the
    same row drawn again) cost one read. Footers of recently used shards are kept, up to
    ``footer_bytes`` of serialized footer (a footer grows with row groups x columns).
    Version shards are written with row groups of about ``ROW_GROUP_BYTES``
    (``rzenembed.data.version.table_bytes``), which bounds what one row costs to read
    whatever the shard size.

Sibling references
    A negative whose ``ref`` names another row's id stands for that row's positive (clips
    of one video are each other's hard negatives; their frames are stored once, in their
    own row). References resolve inside the referencing row's shard: the step that creates
    them writes a video's clips into one shard, and later steps filter shards in place. A
    reference to a row no longer there (dropped by deduplication or the cap) leaves the
    slot empty; the stage manifest counts such references per dataset
    (``unresolved_negatives``).

Memory
    Per dataset: the shard offsets (8 bytes a shard), footers up to ``footer_bytes``, the
    id index of up to ``id_index_cache`` shards (only datasets with references build them)
    and the row-group cache; only the offsets grow with the dataset. The sampler adds its
    epoch permutation, 4 bytes a row.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import DatasetVersion, ShardInfo
from rzenembed.training.collate import SourceInfo

# What training reads of a record; lineage columns (segments, label) stay on storage.
TRAINING_COLUMNS = ["id", "query", "positive", "negatives", "group_id"]
DEFAULT_CACHE_BYTES = 64 * 2**20
DEFAULT_FOOTER_BYTES = 8 * 2**20  # serialized footer bytes kept (parsed, a few times more)
DEFAULT_ID_INDEX_CACHE = 64


class LruCache:
    """A thread-safe LRU cache bounded by the summed ``size`` of its values.

    A value larger than the whole budget is returned to the caller but not kept. Loading
    happens outside the lock (two threads may read the same entry once each; both get
    equal values), so a slow read never blocks hits on other entries.
    """

    def __init__(self, max_size: int, size: Callable[[Any], int] = lambda _: 1):
        if max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        self.max_size = max_size
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.total = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        value = load()
        size = self._size(value)
        with self._lock:
            if size <= self.max_size and key not in self._entries:
                self._entries[key] = (value, size)
                self.total += size
                while self.total > self.max_size:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self.total -= dropped
        return value

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class _Footer:
    """A shard's Parquet footer and where each of its row groups starts."""

    metadata: pq.FileMetaData
    bounds: np.ndarray  # int64, row groups + 1 entries: first row of each group, then rows


class DatasetRows:
    """One dataset version, sampled by row index without loading it.

    ``fetch(indices)`` returns the rows as dicts (training columns only) with sibling
    references resolved; ``rows[i]`` is ``fetch([i])[0]``.
    """

    def __init__(
        self,
        version: DatasetVersion,
        task_group: str,
        max_negatives: int,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        footer_bytes: int = DEFAULT_FOOTER_BYTES,
        id_index_cache: int = DEFAULT_ID_INDEX_CACHE,
    ):
        stats = version.manifest.stats
        self.version = version
        self.name = version.manifest.dataset
        self.task_group = task_group
        self.media_root = str(stats.get("media_root", ""))
        self.group_semantics = str(stats.get("group_semantics", "same-item"))
        self.endpoint_url = version.endpoint_url
        self.max_negatives = int(max_negatives)
        self._shards: list[ShardInfo] = list(version.manifest.shards)
        counts = np.array([s.rows for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._footers = LruCache(footer_bytes, size=lambda footer: footer.metadata.serialized_size)
        self._groups = LruCache(cache_bytes, size=lambda table: table.nbytes)
        self._id_index = LruCache(id_index_cache)
        self._fs = None

    @classmethod
    def open(
        cls,
        uri: str,
        task_group: str,
        max_negatives: int,
        endpoint_url: str | None = None,
        **cache: int,
    ) -> DatasetRows:
        return cls(DatasetVersion.open(uri, endpoint_url), task_group, max_negatives, **cache)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def info(self) -> SourceInfo:
        return SourceInfo(
            self.name,
            self.task_group,
            self.media_root,
            self.group_semantics,
            self.max_negatives,
            self.endpoint_url,
        )

    @property
    def cache(self) -> LruCache:
        """The row-group cache (for its size and hit counts)."""
        return self._groups

    # ------------------------------------------------------------------ reading

    def fetch(self, indices: Sequence[int], pool: Executor | None = None) -> list[dict[str, Any]]:
        """The rows at ``indices`` (in that order, repeats allowed), references resolved.

        The row groups they live in are read once each, concurrently on ``pool`` when one
        is given (an object store answers many requests in parallel, one at a time slowly).
        """
        located = [self._locate(int(i)) for i in indices]
        places = [(shard, *self._group_of(shard, row)) for shard, row in located]
        needed = sorted({(shard, group) for shard, group, _ in places})
        run = pool.map if pool is not None else map
        tables = dict(zip(needed, run(self._group, needed), strict=True))
        rows = [tables[(s, g)].slice(offset, 1).to_pylist()[0] for s, g, offset in places]
        return [
            self._resolved(shard, row, position)
            for (shard, position), row in zip(located, rows, strict=True)
        ]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.fetch([index])[0]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {self.name} ({len(self)} rows)")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _group_of(self, shard: int, row: int) -> tuple[int, int]:
        """(row group, row within it) of row ``row`` of ``shard``."""
        bounds = self._footer(shard).bounds
        group = int(np.searchsorted(bounds, row, side="right")) - 1
        return group, row - int(bounds[group])

    def _group(self, key: tuple[int, int]) -> pa.Table:
        shard, group = key
        return self._groups.get(key, lambda: self._read_group(shard, group))

    def _row(self, shard: int, row: int) -> dict[str, Any]:
        group, offset = self._group_of(shard, row)
        return self._group((shard, group)).slice(offset, 1).to_pylist()[0]

    def _filesystem(self):
        if self._fs is None:
            self._fs = filesystem(self.version.uri, self.endpoint_url)[0]
        return self._fs

    def _path(self, shard: int) -> str:
        return filesystem(join(self.version.uri, self._shards[shard].path), self.endpoint_url)[1]

    def _open(self, shard: int, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
        return pq.ParquetFile(self._path(shard), metadata=metadata, filesystem=self._filesystem())

    def _footer(self, shard: int) -> _Footer:
        def load() -> _Footer:
            with self._open(shard) as handle:
                metadata = handle.metadata
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            return _Footer(metadata, np.cumsum([0, *sizes]).astype(np.int64))

        return self._footers.get(shard, load)

    def _metadata(self, shard: int) -> pq.FileMetaData:
        return self._footer(shard).metadata

    def _read_group(self, shard: int, group: int) -> pa.Table:
        with self._open(shard, self._metadata(shard)) as handle:
            names = set(handle.schema_arrow.names)
            columns = [c for c in TRAINING_COLUMNS if c in names]
            return handle.read_row_group(group, columns=columns)

    # ------------------------------------------------------------------ references

    def _resolved(self, shard: int, row: dict[str, Any], position: int) -> dict[str, Any]:
        negatives = row.get("negatives") or []
        if not any(n.get("ref") for n in negatives):
            return row
        index = self._id_index.get(shard, lambda: self._ids_of(shard))
        resolved = []
        for negative in negatives:
            ref = negative.get("ref")
            if not ref:
                resolved.append(negative)
            elif (target := index.get(ref)) is not None and target != position:
                resolved.append(self._row(shard, target)["positive"])
        return {**row, "negatives": resolved}

    def _ids_of(self, shard: int) -> dict[str, int]:
        with self._open(shard, self._metadata(shard)) as handle:
            ids = handle.read(columns=["id"]).column("id").to_pylist()
        return {row_id: position for position, row_id in enumerate(ids)}
