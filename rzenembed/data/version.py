"""Dataset versions: immutable folders of Parquet shards committed by a manifest.

Layout of a version at ``URI``::

    URI/data/part-00000.parquet ...     the records (or eval tables under their own names)
    URI/rejects/part-00000.parquet ...  rows the step did not pass on, with reason codes
    URI/manifest.json                   written last: its presence commits the version

Shards are first written under ``URI/_staging-<token>/`` and moved into place only when
the step has produced all of them; the manifest comes after. A step killed at any point
leaves no manifest, so readers never see a half-written version, and a rerun clears the
staging area and writes the version again.

The location of a step's output is derived from what determines it (step name, step code
version, config digest, input digests), so rerunning a finished step finds its committed
version instead of recomputing it, and the same inputs always give the same content digest.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.data.parquet_ranges import read_columns
from rzenembed.data.schema import REJECT_SCHEMA, SCHEMA_VERSION
from rzenembed.data.storage import Storage, filesystem, is_remote, join, read_whole

MANIFEST = "manifest.json"
DATA_DIR = "data"
REJECTS_DIR = "rejects"


class VersionNotFoundError(FileNotFoundError):
    """No committed version (no manifest) at a URI."""


@dataclass
class ShardInfo:
    path: str  # relative to the version folder
    rows: int
    sha256: str


@dataclass
class InputRef:
    """A version (or raw source) a step read, as recorded in its output's manifest."""

    uri: str
    content_digest: str
    rows: int | None = None


@dataclass
class Manifest:
    dataset: str
    step: str
    version_id: str
    rows: int
    shards: list[ShardInfo]
    reject_shards: list[ShardInfo]
    rejected: int
    reject_counts: dict[str, int]
    content_digest: str
    config_digest: str
    code_version: str
    inputs: list[InputRef]
    stats: dict[str, Any] = field(default_factory=dict)
    schema: str = "record"
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        data["shards"] = [ShardInfo(**s) for s in data["shards"]]
        data["reject_shards"] = [ShardInfo(**s) for s in data["reject_shards"]]
        data["inputs"] = [InputRef(**i) for i in data["inputs"]]
        return cls(**data)


def version_id(step: str, code_version: str, config_digest: str, inputs: list[InputRef]) -> str:
    """A short, deterministic id for what a step produces from these inputs (and under
    which record schema and shard layout: ``SCHEMA_VERSION``)."""
    digests = sorted(i.content_digest for i in inputs)
    schema = f"schema-{SCHEMA_VERSION}"
    key = json.dumps([step, code_version, config_digest, digests, schema], separators=(",", ":"))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# Target in-memory size of one Parquet row group. Training reads single rows by row group
# (``rzenembed.training.rows``), so this bounds what reading one row costs: about 500 text
# rows or two clips of inline frames per group.
ROW_GROUP_BYTES = 256 * 2**10


def row_group_rows(table: pa.Table, target_bytes: int = ROW_GROUP_BYTES) -> int:
    """Rows per row group so that a group holds about ``target_bytes`` of ``table``'s data
    (at least one row); depends only on the table, so equal tables split equally."""
    if table.num_rows == 0:
        return 1
    per_row = max(1, table.nbytes // table.num_rows)
    return max(1, min(table.num_rows, target_bytes // per_row))


def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes of ``table`` with fixed writer settings, so equal tables give equal bytes."""
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        write_statistics=True,
        store_schema=True,
        row_group_size=row_group_rows(table),
    )
    return sink.getvalue()


def content_digest(shards: list[ShardInfo], reject_shards: list[ShardInfo]) -> str:
    key = json.dumps(
        [[s.path, s.sha256] for s in shards] + [[s.path, s.sha256] for s in reject_shards],
        separators=(",", ":"),
    )
    return hashlib.sha256(key.encode()).hexdigest()


def put_table(
    folder_uri: str, rel_path: str, table: pa.Table, endpoint_url: str | None = None
) -> ShardInfo:
    """Write ``table`` as Parquet at ``folder_uri/rel_path``; usable from any process."""
    payload = table_bytes(table)
    fs, folder = filesystem(folder_uri, endpoint_url)
    parent = rel_path.rsplit("/", 1)[0] if "/" in rel_path else ""
    fs.makedirs(join(folder, parent) if parent else folder, exist_ok=True)
    # Whole or absent: a reader on another process (two clean steps sharing the
    # decontamination keys) must never open a file still being written.
    write_atomically(fs, join(folder, rel_path), payload)
    return ShardInfo(rel_path, table.num_rows, hashlib.sha256(payload).hexdigest())


def write_atomically(fs, path: str, content: str | bytes) -> None:
    """Make ``path`` appear whole or not at all: an object-store PUT already is; on a
    filesystem the content goes to a temporary name first and is renamed into place."""
    mode = "wb" if isinstance(content, bytes) else "w"
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols:
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(temporary, mode) as f:
            f.write(content)
        fs.mv(temporary, path)
    else:
        with fs.open(path, mode) as f:
            f.write(content)


class DatasetVersion:
    """A committed version: its manifest and readers for its shards and rejects."""

    def __init__(self, uri: str, manifest: Manifest, endpoint_url: str | None = None):
        self.uri = uri
        self.manifest = manifest
        self.endpoint_url = endpoint_url

    @classmethod
    def open(cls, uri: str, endpoint_url: str | None = None) -> DatasetVersion:
        fs, path = filesystem(uri, endpoint_url)
        try:  # one GET: no existence check first (a HEAD) on an object store
            text = read_whole(fs, join(path, MANIFEST)).decode()
        except FileNotFoundError:
            raise VersionNotFoundError(
                f"no committed dataset version at {uri} (no {MANIFEST})"
            ) from None
        return cls(uri, Manifest.from_json(text), endpoint_url)

    @staticmethod
    def exists(uri: str, endpoint_url: str | None = None) -> bool:
        fs, path = filesystem(uri, endpoint_url)
        return fs.exists(join(path, MANIFEST))

    @property
    def rows(self) -> int:
        return self.manifest.rows

    @property
    def content_digest(self) -> str:
        return self.manifest.content_digest

    def ref(self) -> InputRef:
        return InputRef(uri=self.uri, content_digest=self.content_digest, rows=self.rows)

    def shard_uris(self) -> list[str]:
        return [join(self.uri, s.path) for s in self.manifest.shards]

    def read_shard(self, shard: ShardInfo, columns: list[str] | None = None) -> pa.Table:
        """A shard, or ``columns`` of it. On an object store some columns are read by range
        (the footer, then their column chunks): through a file object they would cost
        whatever its read-ahead pulls, most of a video shard for its ids."""
        fs, path = filesystem(join(self.uri, shard.path), self.endpoint_url)
        if columns is not None and is_remote(self.uri):
            return read_columns(Storage.at(self.uri, self.endpoint_url), path, columns)
        # By path through the filesystem, not from an open Python file object: pyarrow reading
        # from file objects aborted some processes at interpreter exit.
        return pq.read_table(path, columns=columns, filesystem=fs)

    def iter_tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for shard in self.manifest.shards:
            yield self.read_shard(shard, columns)

    def read_table(self, columns: list[str] | None = None) -> pa.Table:
        tables = list(self.iter_tables(columns))
        return pa.concat_tables(tables) if tables else pa.table({})

    def read_rejects(self) -> pa.Table:
        tables = [self.read_shard(s) for s in self.manifest.reject_shards]
        return pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table()


# The staging folder of a resumable writer: a rerun of the same version finds it again.
RESUMABLE_STAGING = "_staging"


class VersionWriter:
    """Writes one version: shards into staging, then ``commit`` moves them and writes the
    manifest. Shard names are given by the caller so output does not depend on timing."""

    def __init__(
        self, uri: str, schema: pa.Schema, endpoint_url: str | None = None, resume: bool = False
    ):
        """``resume``: stage under a fixed name and keep what an interrupted earlier run
        of the same version staged there (its finished shards, ``prep.base.execute``);
        otherwise every writer stages afresh and an earlier run's leftovers are removed."""
        self.uri = uri
        self.schema = schema
        self.endpoint_url = endpoint_url
        self.fs, self.path = filesystem(uri, endpoint_url)
        token = RESUMABLE_STAGING if resume else f"_staging-{uuid.uuid4().hex[:12]}"
        self.staging = join(self.path, token)
        self.staging_uri = join(uri, token)  # what other processes write shards under
        self._shards: dict[str, ShardInfo] = {}
        self._rejects: dict[str, ShardInfo] = {}
        self._reject_counts: Counter[str] = Counter()
        self.clear_stale_staging(keep=token if resume else None)

    def clear_stale_staging(self, keep: str | None = None) -> None:
        """Remove what an interrupted earlier run left behind (never a committed version;
        ``keep``: a staging folder a resumed run reuses)."""
        if not self.fs.exists(self.path):
            return
        if self.fs.exists(join(self.path, MANIFEST)):
            raise FileExistsError(
                f"{self.uri} is already a committed version; versions are immutable"
            )
        if keep is None:
            self.fs.rm(self.path, recursive=True)
            return
        stale = [
            p
            for p in self.fs.ls(self.path, detail=False)
            if p.rstrip("/").rsplit("/", 1)[-1] != keep
        ]
        if stale:
            self.fs.rm(stale, recursive=True)

    def _put(self, rel_path: str, table: pa.Table) -> ShardInfo:
        return put_table(self.staging_uri, rel_path, table, self.endpoint_url)

    def write_shard(self, name: str, table: pa.Table) -> ShardInfo:
        """Write a data shard (``name`` like ``part-00003``); the table must match the schema."""
        table = table.cast(self.schema) if table.schema != self.schema else table
        info = self._put(f"{DATA_DIR}/{name}.parquet", table)
        self._shards[name] = info
        return info

    def write_rejects(self, name: str, table: pa.Table) -> ShardInfo | None:
        if table.num_rows == 0:
            return None
        table = table.cast(REJECT_SCHEMA) if table.schema != REJECT_SCHEMA else table
        info = self._put(f"{REJECTS_DIR}/{name}.parquet", table)
        self._rejects[name] = info
        self._reject_counts.update(table.column("reason").to_pylist())
        return info

    def add_shard_info(
        self,
        name: str,
        info: ShardInfo,
        rejects: ShardInfo | None = None,
        reject_counts: dict[str, int] | None = None,
    ) -> None:
        """Record shards written by other processes into this writer's staging area."""
        self._shards[name] = info
        if rejects is not None:
            self._rejects[name] = rejects
        self._reject_counts.update(reject_counts or {})

    def commit(
        self,
        *,
        dataset: str,
        step: str,
        config_digest: str,
        code_version: str,
        inputs: list[InputRef],
        stats: dict[str, Any] | None = None,
        schema_name: str = "record",
        side_folders: Sequence[str] = (),
    ) -> DatasetVersion:
        """Move the staged shards into place, then write the manifest (the commit point).
        ``side_folders``: staged folders of derived per-shard tables (e.g. ingest's media
        facts) moved along, outside the manifest and its digest."""
        shards = [self._shards[k] for k in sorted(self._shards)]
        rejects = [self._rejects[k] for k in sorted(self._rejects)]
        sides = [p for folder in side_folders for p in self._staged_files(folder)]
        self._move_into_place([info.path for info in shards + rejects] + sides)
        if self.fs.exists(self.staging):
            self.fs.rm(self.staging, recursive=True)
        manifest = Manifest(
            dataset=dataset,
            step=step,
            version_id=self.path.rstrip("/").rsplit("/", 1)[-1],
            rows=sum(s.rows for s in shards),
            shards=shards,
            reject_shards=rejects,
            rejected=sum(s.rows for s in rejects),
            reject_counts=dict(sorted(self._reject_counts.items())),
            content_digest=content_digest(shards, rejects),
            config_digest=config_digest,
            code_version=code_version,
            inputs=inputs,
            stats=dict(stats or {}),
            schema=schema_name,
        )
        write_atomically(self.fs, join(self.path, MANIFEST), manifest.to_json())
        return DatasetVersion(self.uri, manifest, self.endpoint_url)

    def _staged_files(self, folder: str) -> list[str]:
        """Files under ``folder`` of the staging area, relative to it (one listing)."""
        base = join(self.staging, folder)
        if not self.fs.exists(base):
            return []
        names = self.fs.ls(base, detail=False, refresh=True)
        return [f"{folder}/{name.rstrip('/').rsplit('/', 1)[-1]}" for name in sorted(names)]

    def _move_into_place(self, paths: list[str]) -> None:
        """Staged shards to their final names. On an object store a move is a copy and a
        delete: all copies go in one concurrent batch and the deletes in bulk requests,
        not two requests per shard one after another (LAION's 3.9k shards: minutes)."""
        sources = [join(self.staging, p) for p in paths]
        targets = [join(self.path, p) for p in paths]
        if not paths:
            return
        if is_remote(self.uri):
            self.fs.copy(sources, targets)
            self.fs.rm(sources)
            return
        for folder in {t.rsplit("/", 1)[0] for t in targets}:
            self.fs.makedirs(folder, exist_ok=True)
        for source, target in zip(sources, targets, strict=True):
            self.fs.mv(source, target)
