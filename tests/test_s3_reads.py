"""Training rows read from S3 by byte range: what ``DatasetRows`` fetches, counted on the wire.

A TCP proxy in front of the session's moto server (server mode, loopback) counts every
byte the server sends back (HTTP headers included) and every request line the client
sends. The reads must fetch their row groups' column chunks and nothing else: one GET per
row group (no HEAD, no read-ahead), one suffix GET per footer.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow.parquet as pq
import pytest

from rzenembed.data.parquet_ranges import KnownRanges, merged_ranges, read_footer
from rzenembed.data.schema import RECORD_SCHEMA, media, record, records_table, side
from rzenembed.data.storage import Storage, filesystem
from rzenembed.data.version import VersionWriter
from rzenembed.training.rows import TRAINING_COLUMNS, DatasetRows

from .s3_proxy import CountingProxy

BUCKET = "rzenembed-s3-reads"
SHARDS, ROWS_PER_SHARD = 3, 40
FRAME_BYTES = 8 * 2**10  # four frames a row: ~32 KiB, so a 256 KiB row group holds ~7 rows


def clip_rows(shard: int, rng: np.random.Generator) -> list[dict]:
    return [
        record(
            f"s{shard}-r{i}",
            "clips",
            "video_retrieval",
            side(f"caption {shard}.{i}"),
            side(media_items=[media("frames", frames=[rng.bytes(FRAME_BYTES) for _ in range(4)])]),
            [side(f"other caption {shard}.{i}")],
        )
        for i in range(ROWS_PER_SHARD)
    ]


@pytest.fixture(scope="module")
def remote(s3_endpoint):
    """A committed version of ``SHARDS`` shards on S3, written directly to moto."""
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    rng = np.random.default_rng(0)
    writer = VersionWriter(f"s3://{BUCKET}/clips", RECORD_SCHEMA, s3_endpoint)
    for k in range(SHARDS):
        writer.write_shard(f"part-{k:05d}", records_table(clip_rows(k, rng)))
    return writer.commit(
        dataset="clips", step="test", config_digest="c", code_version="1", inputs=[]
    )


@pytest.fixture()
def proxy(s3_endpoint):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    return CountingProxy((host, int(port)))


def footers_of(version, endpoint: str) -> list[pq.FileMetaData]:
    """Each shard's footer, read directly from moto (not through the code under test)."""
    footers = []
    for uri in version.shard_uris():
        fs, path = filesystem(uri, endpoint)
        footers.append(pq.read_metadata(path, filesystem=fs))
    return footers


def touched_groups(footers: list[pq.FileMetaData], indices: list[int]) -> set[tuple[int, int]]:
    touched = set()
    for index in indices:
        shard, row = divmod(index, ROWS_PER_SHARD)
        bounds = np.cumsum(
            [0]
            + [footers[shard].row_group(g).num_rows for g in range(footers[shard].num_row_groups)]
        )
        touched.add((shard, int(np.searchsorted(bounds, row, side="right")) - 1))
    return touched


def compressed_bytes(group: pq.RowGroupMetaData, columns: set[str] | None = None) -> int:
    chunks = [group.column(c) for c in range(group.num_columns)]
    return sum(
        c.total_compressed_size
        for c in chunks
        if columns is None or c.path_in_schema.split(".")[0] in columns
    )


def file_bytes(footer: pq.FileMetaData, columns: set[str] | None = None) -> int:
    """``compressed_bytes`` over every row group of a file."""
    return sum(compressed_bytes(footer.row_group(g), columns) for g in range(footer.num_row_groups))


def test_footers_load_with_one_get_each_and_no_head(remote, proxy, s3_endpoint):
    footers = footers_of(remote, s3_endpoint)
    assert all(f.num_row_groups >= 4 for f in footers)  # ~7 rows of ~32 KiB a row group
    rows = DatasetRows.open(remote.uri, "video_retrieval", 1, endpoint_url=proxy.endpoint)
    proxy.reset()
    assert rows.prefetch_footers() == SHARDS
    assert proxy.requests == {"GET": SHARDS}
    # Each GET is a 64 KiB suffix of a ~1.3 MiB shard (1 KiB allowed for HTTP headers).
    footer_bytes = sum(f.serialized_size for f in footers)
    assert footer_bytes < proxy.fetched <= SHARDS * (64 * 2**10 + 1024)


def test_footer_prefetch_stops_at_the_footer_budget(remote, proxy, s3_endpoint):
    largest = max(f.serialized_size for f in footers_of(remote, s3_endpoint))
    rows = DatasetRows.open(
        remote.uri, "video_retrieval", 1, endpoint_url=proxy.endpoint, footer_bytes=largest * 5 // 2
    )
    proxy.reset()
    assert rows.prefetch_footers() == 2  # room for two of the three footers: two requests
    assert proxy.requests == {"GET": 2}
    small = DatasetRows.open(
        remote.uri, "video_retrieval", 1, endpoint_url=proxy.endpoint, footer_bytes=100
    )
    proxy.reset()
    assert small.prefetch_footers() == 0  # none fits: the first one tells, no more are read
    assert proxy.requests == {"GET": 1}


def test_a_footer_longer_than_the_sample_takes_a_second_get(remote, proxy):
    storage = Storage.at(remote.uri, proxy.endpoint)
    proxy.reset()
    metadata = read_footer(storage, storage.path(remote.manifest.shards[0].path), sample=64)
    assert metadata.num_rows == ROWS_PER_SHARD
    assert proxy.requests == {"GET": 2}


def test_random_rows_fetch_their_row_groups_and_no_more(remote, proxy, s3_endpoint):
    footers = footers_of(remote, s3_endpoint)
    everything = remote.read_table(columns=TRAINING_COLUMNS).to_pylist()
    rows = DatasetRows.open(remote.uri, "video_retrieval", 1, endpoint_url=proxy.endpoint)
    rows.prefetch_footers()  # counted above; here only the rows
    indices = random.Random(3).sample(range(SHARDS * ROWS_PER_SHARD), 12)
    touched = touched_groups(footers, indices)
    proxy.reset()
    with ThreadPoolExecutor(4) as pool:
        assert rows.fetch(indices, pool=pool) == [everything[i] for i in indices]

    groups = [footers[s].row_group(g) for s, g in touched]
    compressed = sum(compressed_bytes(g) for g in groups)
    training = sum(compressed_bytes(g, set(TRAINING_COLUMNS)) for g in groups)
    assert 2 <= len(touched) < len(indices)  # some rows share a row group: read once
    assert proxy.requests == {"GET": len(touched)}  # one ranged GET a row group, no HEAD
    # The footers are already cached, so no allowance beyond the HTTP headers is needed.
    assert training <= proxy.fetched <= 2 * compressed


def test_sibling_references_read_only_the_id_column(s3_endpoint, proxy):
    # Resolving a reference reads the shard's ids: the id column chunks, not the shard.
    from .test_rows import clip_rows as sibling_clips
    from .test_rows import text_rows, write_version

    version = write_version(
        f"s3://{BUCKET}/siblings", [text_rows(0)[:5], sibling_clips()], s3_endpoint
    )
    rows = DatasetRows.open(version.uri, "video_retrieval", 2, endpoint_url=proxy.endpoint)
    rows.prefetch_footers()
    proxy.reset()
    first = rows.fetch([5])[0]
    assert [n["text"] for n in first["negatives"]] == ["clip 1 frames", "clip 2 frames"]
    # The row's group, then the ids (one range: the shard has one row group).
    assert proxy.requests == {"GET": 2}


def test_one_filesystem_per_protocol_and_endpoint(s3_endpoint, tmp_path):
    first = Storage.at(f"s3://{BUCKET}/a", s3_endpoint)
    second = Storage.at(f"s3://{BUCKET}/b/c", s3_endpoint)
    assert first.fs is second.fs
    assert (first.root, second.root) == (f"{BUCKET}/a", f"{BUCKET}/b/c")
    assert Storage.at(str(tmp_path)).fs is Storage.at(str(tmp_path / "x")).fs
    assert Storage.at(str(tmp_path)).fs is not first.fs


def test_ranges_merge_across_small_gaps_only():
    ranges = [(100, 200), (0, 50), (60, 80), (1000, 1100), (150, 300)]
    assert merged_ranges(ranges, gap=9) == [(0, 50), (60, 80), (100, 300), (1000, 1100)]
    assert merged_ranges(ranges, gap=10) == [(0, 80), (100, 300), (1000, 1100)]
    assert merged_ranges(ranges, gap=700) == [(0, 1100)]


def test_known_ranges_serve_fetched_bytes_and_refuse_the_rest():
    source = KnownRanges([(10, b"abcdef"), (100, b"xyz")])
    source.seek(12)
    assert source.read(3) == b"cde"
    assert source.seek(0, 2) == 103  # the end of the last range stands for the size
    source.seek(101)
    assert source.read(2) == b"yz"
    source.seek(14)
    with pytest.raises(ValueError, match="not fetched"):
        source.read(4)
    source.seek(5)
    with pytest.raises(ValueError, match="not fetched"):
        source.read(1)


def test_a_shard_of_a_large_jsonl_file_fetches_its_rows_not_the_file(remote, proxy, s3_endpoint):
    """Ingest's shard tasks read their rows from a byte offset: on S3 they fetch about
    their own rows and at most two read blocks more, not s3fs's 50 MiB read-ahead each."""
    from rzenembed.data.raw_files import SHARD_READ_BLOCK, read_rows

    line = b'{"id": "%06d", "text": "' + b"x" * 8000 + b'"}\n'
    data = b"".join(line.replace(b"%06d", b"%06d" % i) for i in range(3000))  # about 24 MB
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    path = f"{BUCKET}/big/records.jsonl"
    fs.pipe_file(path, data)
    offset = data.index(b'"id": "001500"') - 1
    through, _ = filesystem(f"s3://{BUCKET}", proxy.endpoint)
    proxy.reset()
    rows = read_rows(through, path, offset, 1500, 100)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(1500, 1600)]
    # the rest of the file from the offset is 12 MB; its rows and read-ahead: about 8 MB
    assert proxy.fetched < 100 * len(line) + 2 * SHARD_READ_BLOCK + 64 * 1024, proxy.fetched


def test_a_data_step_reads_the_columns_it_asks_for_and_not_the_frames(remote, proxy, s3_endpoint):
    """``read_shard(columns=...)`` on S3 (the cap's ids, the mixture's negatives): the
    footer and those columns' chunks, never the frames beside them."""
    from rzenembed.data.version import DatasetVersion

    version = DatasetVersion.open(remote.uri, proxy.endpoint)
    (footer, *_) = footers_of(remote, s3_endpoint)
    shard = version.manifest.shards[0]
    proxy.reset()
    table = version.read_shard(shard, columns=["id", "negatives"])
    assert table.column("id").to_pylist() == [f"s0-r{i}" for i in range(ROWS_PER_SHARD)]
    assert table.column("negatives")[0].as_py()[0]["text"] == "other caption 0.0"
    wanted, whole = file_bytes(footer, {"id", "negatives"}), file_bytes(footer)
    assert "HEAD" not in proxy.requests
    # A 64 KiB footer read, then the two columns (merged where close): a small part of the
    # ~1.3 MiB shard, whose frames alone are ~1.25 MiB.
    assert proxy.fetched < 64 * 2**10 + 3 * wanted + 16 * 2**10 < whole / 4, (proxy.fetched, whole)
