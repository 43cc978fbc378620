"""A stage's datasets as Parquet on the storage root, read row by row on demand.

A training rank never holds a dataset: it holds where each shard's rows start (one integer
per shard) and reads the rows of its slice of each step when the step needs them.

Reads
    A row index maps to a shard (binary search over the shards' first rows) and, through
    the shard's Parquet footer, to a row group. The row group's training columns are one
    byte range of the shard (their column chunks lie side by side), fetched with one
    ranged read (``rzenembed.data.storage.Storage``: on S3 one GET, no HEAD, no read-ahead,
    so a row costs its row group and nothing more) and decoded by Arrow. Row groups are
    kept in a small LRU cache bounded in bytes (``cache_bytes``), so rows that share a row
    group (sibling clips, small datasets, the same row drawn again, the next rows of a
    ``blocks`` shuffle) cost one read. Footers of recently used shards are kept, up to
    ``footer_bytes`` of serialized footer (a footer grows with row groups x columns); each
    is one suffix read of the shard, and the first fetch loads as many as the budget keeps
    on ``FOOTER_THREADS`` threads at once (``prefetch_footers``) instead of one by one as
    rows need them. Version shards are written with row groups of about
    ``ROW_GROUP_BYTES`` (``rzenembed.data.version.table_bytes``), which bounds what one row
    costs to read whatever the shard size.

Sibling references
    A negative whose ``ref`` names another row's id stands for that row's positive (clips
    of one video are each other's hard negatives; their frames are stored once, in their
    own row). References resolve inside the referencing row's shard: the step that creates
    them writes a video's clips into one shard, and later steps filter shards in place. A
    reference to a row no longer there (dropped by deduplication or the cap) leaves the
    slot empty; the stage manifest counts such references per dataset
    (``unresolved_negatives``). A *mined* reference (``rzenembed.data.schema.is_mined``)
    may name a row of any shard of the version: it is looked up in its own shard first,
    then in a version-wide id index (every shard's id column, read once, on the first
    mined reference that needs it: about 200 bytes a row, 20 MB for a dataset capped at
    100k rows). A mined reference to a row the version does not hold is an error naming
    both rows: the mining step wrote it from that very version, so it means corruption.

Memory
    Per dataset: the shard offsets (8 bytes a shard), footers up to ``footer_bytes``, the
    id index of up to ``id_index_cache`` shards (only datasets with references build them)
    and the row-group cache; only the offsets grow with the dataset. The sampler adds its
    epoch permutation, 4 bytes a row.
"""

from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.data.parquet_ranges import FOOTER_SAMPLE_BYTES, read_footer, read_row_groups
from rzenembed.data.schema import is_mined
from rzenembed.data.storage import Storage
from rzenembed.data.version import DatasetVersion, ShardInfo
from rzenembed.training.collate import SourceInfo

# What training reads of a record; lineage columns (segments, label) stay on storage.
TRAINING_COLUMNS = ["id", "query", "positive", "negatives", "group_id"]
DEFAULT_CACHE_BYTES = 64 * 2**20
DEFAULT_FOOTER_BYTES = 8 * 2**20  # serialized footer bytes kept (parsed, a few times more)
DEFAULT_ID_INDEX_CACHE = 64
FOOTER_THREADS = 16  # footers loaded at once by ``prefetch_footers``
NEGATIVE_CHOICES = ("given", "mined", "both")


class UnresolvedReference(LookupError):
    """A mined negative names a row its version does not hold."""


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


# --------------------------------------------------------------------------- dataset rows


@dataclass(frozen=True)
class _Footer:
    """A shard's Parquet footer, where each of its row groups starts and which training
    columns it has."""

    metadata: pq.FileMetaData
    bounds: np.ndarray  # int64, row groups + 1 entries: first row of each group, then rows
    columns: list[str]


def _group_of(footer: _Footer, row: int) -> tuple[int, int]:
    """(row group, row within it) of row ``row`` of the shard of ``footer``."""
    group = int(np.searchsorted(footer.bounds, row, side="right")) - 1
    return group, row - int(footer.bounds[group])


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
        negatives: str = "both",
    ):
        """``negatives``: which of a row's negatives to train on: ``given`` (the dataset's
        own and sibling references), ``mined`` (mined references only) or ``both``."""
        if negatives not in NEGATIVE_CHOICES:
            raise ValueError(f"negatives must be one of {NEGATIVE_CHOICES}, got {negatives!r}")
        self.negatives = negatives
        self._version_index: dict[str, tuple[int, int]] | None = None
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
        self._storage = Storage.at(version.uri, self.endpoint_url)
        self._footer_sample = FOOTER_SAMPLE_BYTES
        self._prefetch_lock = threading.Lock()
        self._prefetched = False

    @classmethod
    def open(
        cls,
        uri: str,
        task_group: str,
        max_negatives: int,
        endpoint_url: str | None = None,
        negatives: str = "both",
        **cache: int,
    ) -> DatasetRows:
        version = DatasetVersion.open(uri, endpoint_url)
        return cls(version, task_group, max_negatives, negatives=negatives, **cache)

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

        The footers and then the row groups they need are read once each, concurrently on
        ``pool`` when one is given (an object store answers many requests in parallel, one
        at a time slowly). The footers are held for the whole call, so one evicted from the
        footer cache by the others is not read again. The first call loads the shards'
        footers first (``prefetch_footers``).
        """
        self._prefetch_once()
        run = pool.map if pool is not None else map
        located = [self._locate(int(i)) for i in indices]
        shards = sorted({shard for shard, _ in located})
        footers = dict(zip(shards, run(self._footer, shards), strict=True))
        places = [(shard, *_group_of(footers[shard], row)) for shard, row in located]
        needed = sorted({(shard, group) for shard, group, _ in places})
        tables = dict(
            zip(needed, run(lambda key: self._group(key, footers[key[0]]), needed), strict=True)
        )
        rows = [tables[(s, g)].slice(offset, 1).to_pylist()[0] for s, g, offset in places]
        # Mined negatives name rows anywhere in the version (random row groups of other
        # shards): their groups are read here, concurrently like the rows' own, so resolving
        # them below finds them in the cache instead of reading one after another.
        targets = self._mined_targets(located, rows)
        if targets:
            more = sorted({shard for shard, _ in targets} - set(footers))
            footers.update(zip(more, run(self._footer, more), strict=True))
            groups = {(shard, _group_of(footers[shard], at)[0]) for shard, at in targets}
            missing = sorted(groups - set(tables))
            list(run(lambda key: self._group(key, footers[key[0]]), missing))
        return [
            self._resolved(shard, row, position)
            for (shard, position), row in zip(located, rows, strict=True)
        ]

    def _mined_targets(
        self, located: list[tuple[int, int]], rows: list[dict[str, Any]]
    ) -> list[tuple[int, int]]:
        """(shard, position) of every mined negative the rows will resolve."""
        out = []
        for (shard, _), row in zip(located, rows, strict=True):
            mined = [n["ref"] for n in self._chosen(row) if is_mined(n)]
            if not mined:
                continue
            index = self._id_index.get(shard, lambda shard=shard: self._ids_of(shard))
            for ref in mined:
                at = index.get(ref)
                out.append((shard, at) if at is not None else self._anywhere(ref, row["id"]))
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.fetch([index])[0]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of {self.name} ({len(self)} rows)")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, index - int(self._starts[shard])

    def _group(self, key: tuple[int, int], footer: _Footer) -> pa.Table:
        shard, group = key
        return self._groups.get(key, lambda: self._read_group(shard, group, footer))

    def _row(self, shard: int, row: int) -> dict[str, Any]:
        footer = self._footer(shard)
        group, offset = _group_of(footer, row)
        return self._group((shard, group), footer).slice(offset, 1).to_pylist()[0]

    def _path(self, shard: int) -> str:
        return self._storage.path(self._shards[shard].path)

    def _footer(self, shard: int) -> _Footer:
        return self._footers.get(shard, lambda: self._load_footer(shard))

    def _load_footer(self, shard: int) -> _Footer:
        metadata = read_footer(self._storage, self._path(shard), self._footer_sample)
        # Shards written alike have footers of about one size: ask for it next time.
        self._footer_sample = max(self._footer_sample, metadata.serialized_size * 9 // 8 + 64)
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        names = set(metadata.schema.to_arrow_schema().names)
        columns = [c for c in TRAINING_COLUMNS if c in names]
        return _Footer(metadata, np.cumsum([0, *sizes]).astype(np.int64), columns)

    def _metadata(self, shard: int) -> pq.FileMetaData:
        return self._footer(shard).metadata

    def _read_group(self, shard: int, group: int, footer: _Footer) -> pa.Table:
        return read_row_groups(
            self._storage, self._path(shard), footer.metadata, [group], footer.columns
        )

    # ------------------------------------------------------------------ footers

    def prefetch_footers(self, threads: int = FOOTER_THREADS) -> int:
        """Load the shards' footers ahead of the reads, ``threads`` at a time (one request
        each on an object store, where one by one they would take a round trip each), as
        many as the ``footer_bytes`` budget keeps; returns how many are cached.

        The first shard's footer is read alone: its size tells how many fit, and is the
        guess at the others' size, so each of them costs one request."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if self._shards:
            first = self._footer(0).metadata.serialized_size
            fit = min(len(self._shards), self._footers.max_size // max(1, first))
            with ThreadPoolExecutor(threads, thread_name_prefix="footers") as pool:
                list(pool.map(self._footer, range(1, fit)))
        self._prefetched = True
        return len(self._footers)

    def _group_sizes(self, shard: int) -> np.ndarray:
        return np.diff(self._footer(shard).bounds)

    def _prefetch_once(self) -> None:
        if self._prefetched:
            return
        with self._prefetch_lock:
            if not self._prefetched:
                self.prefetch_footers()

    def row_group_sizes(self, threads: int = FOOTER_THREADS) -> np.ndarray:
        """Rows in each row group of the dataset, shards in manifest order (int64): the
        blocks of the sampler's ``blocks`` shuffle. Reads every footer, ``threads`` at a
        time; those the ``footer_bytes`` budget holds stay cached for the reads."""
        self._prefetch_once()
        with ThreadPoolExecutor(threads, thread_name_prefix="footers") as pool:
            sizes = list(pool.map(self._group_sizes, range(len(self._shards))))
        return np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)

    # ------------------------------------------------------------------ references

    def _resolved(self, shard: int, row: dict[str, Any], position: int) -> dict[str, Any]:
        negatives = self._chosen(row)
        if not any(n.get("ref") for n in negatives):
            return {**row, "negatives": negatives}
        index = self._id_index.get(shard, lambda: self._ids_of(shard))
        resolved = []
        for negative in negatives:
            ref = negative.get("ref")
            if not ref:
                resolved.append(negative)
            elif (target := index.get(ref)) is not None:
                if target != position:
                    resolved.append(self._row(shard, target)["positive"])
            elif is_mined(negative):
                elsewhere, at = self._anywhere(ref, row["id"])
                resolved.append(self._row(elsewhere, at)["positive"])
        return {**row, "negatives": resolved}

    def _chosen(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """The row's negatives this dataset's choice keeps: ``given`` or ``mined`` alone,
        or ``both`` interleaved (one of each in turn, which kind first decided by the row's
        id), so that a step's K slots, filled from the front, hold both kinds across the
        dataset even when K is 1."""
        every = row.get("negatives") or []
        mined = [n for n in every if is_mined(n)]
        given = [n for n in every if not is_mined(n)]
        if self.negatives != "both":
            return mined if self.negatives == "mined" else given
        first, second = (
            (mined, given) if zlib.crc32(str(row["id"]).encode()) % 2 else (given, mined)
        )
        out = []
        for k in range(max(len(first), len(second))):
            out += first[k : k + 1] + second[k : k + 1]
        return out

    def _anywhere(self, ref: str, row_id: str) -> tuple[int, int]:
        """(shard, position) of row ``ref`` anywhere in the version (mined references)."""
        with self._prefetch_lock:
            if self._version_index is None:
                index: dict[str, tuple[int, int]] = {}
                for shard in range(len(self._shards)):
                    for key, at in self._ids_of(shard).items():
                        index.setdefault(key, (shard, at))
                self._version_index = index
        place = self._version_index.get(ref)
        if place is None:
            raise UnresolvedReference(
                f"{self.name}: row {row_id!r} has a mined negative naming row {ref!r}, which "
                f"is not in the version at {self.version.uri}"
            )
        return place

    def _ids_of(self, shard: int) -> dict[str, int]:
        metadata = self._metadata(shard)
        groups = range(metadata.num_row_groups)
        table = read_row_groups(self._storage, self._path(shard), metadata, groups, ["id"])
        return {row_id: position for position, row_id in enumerate(table.column("id").to_pylist())}
