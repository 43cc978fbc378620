"""Training rows read lazily from Parquet: by row group, through a bounded cache, with
sibling negatives resolved by row id; locally and on S3."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from rzenembed.data.schema import RECORD_SCHEMA, record, records_table, reference, side
from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import ROW_GROUP_BYTES, VersionWriter, row_group_rows
from rzenembed.training.rows import TRAINING_COLUMNS, DatasetRows, LruCache

SHARDS, ROWS_PER_SHARD = 3, 150
FILLER = "x" * 3000  # about 3 KB a row: a 256 KiB row group holds ~85 rows


def text_rows(shard: int) -> list[dict]:
    return [
        record(
            f"s{shard}-r{i}",
            "lazy",
            "text_retrieval",
            side(f"query {shard}.{i} {FILLER}"),
            side(f"answer {shard}.{i}"),
            [side(f"wrong {shard}.{i}.{j}") for j in range(i % 3)],
        )
        for i in range(ROWS_PER_SHARD)
    ]


def write_version(uri: str, shards: list[list[dict]], endpoint: str | None = None):
    writer = VersionWriter(uri, RECORD_SCHEMA, endpoint)
    for k, rows in enumerate(shards):
        writer.write_shard(f"part-{k:05d}", records_table(rows))
    return writer.commit(
        dataset="lazy",
        step="test",
        config_digest="c",
        code_version="1",
        inputs=[],
        stats={"media_root": "", "group_semantics": "siblings"},
    )


def training_view(row: dict) -> dict:
    return {k: row[k] for k in TRAINING_COLUMNS}


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    return write_version(str(root / "v"), [text_rows(k) for k in range(SHARDS)])


def test_shards_are_written_in_row_groups_of_bounded_size(version):
    fs, path = filesystem(join(version.uri, version.manifest.shards[0].path))
    metadata = pq.ParquetFile(path, filesystem=fs).metadata
    sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
    assert metadata.num_row_groups >= 2 and sum(sizes) == ROWS_PER_SHARD
    table = records_table(text_rows(0))
    assert sizes[0] == row_group_rows(table) == ROW_GROUP_BYTES // (table.nbytes // table.num_rows)


def test_rows_at_any_index_equal_the_table(version):
    everything = [training_view(r) for r in version.read_table().to_pylist()]
    rows = DatasetRows(version, "text_retrieval", max_negatives=2, cache_bytes=2**20)
    assert len(rows) == SHARDS * ROWS_PER_SHARD
    indices = [*random.Random(0).sample(range(len(rows)), 60), 0, len(rows) - 1, 5, 5]
    assert rows.fetch(indices) == [everything[i] for i in indices]
    with ThreadPoolExecutor(4) as pool:  # row groups read concurrently: the same rows
        assert rows.fetch(indices[::-1], pool=pool) == [everything[i] for i in indices[::-1]]
    assert rows[ROWS_PER_SHARD] == everything[ROWS_PER_SHARD]  # first row of shard 1
    with pytest.raises(IndexError):
        rows.fetch([len(rows)])


def test_the_row_group_cache_stays_within_its_byte_budget(version):
    budget = 400_000  # room for one ~256 KiB group, not two
    rows = DatasetRows(version, "text_retrieval", max_negatives=2, cache_bytes=budget)
    rows.fetch([0, 1, 2])  # one group, read once
    rows.fetch([3])  # the same group again: from the cache
    assert (rows.cache.misses, rows.cache.hits) == (1, 1)
    rows.fetch(list(range(0, len(rows), 7)))
    assert 0 < rows.cache.total <= budget and len(rows.cache) == 1


def test_lru_cache_evicts_least_recently_used_and_skips_oversized_values():
    cache = LruCache(10, size=len)
    loads: list[str] = []

    def load(value):
        return lambda: loads.append(value) or value

    cache.get("a", load("aaaa"))
    cache.get("b", load("bbbb"))
    cache.get("a", load("aaaa"))  # a is now the most recent
    cache.get("c", load("cccc"))  # 12 > 10: b goes
    cache.get("a", load("aaaa"))
    cache.get("b", load("bbbb"))
    assert loads == ["aaaa", "bbbb", "cccc", "bbbb"]
    assert cache.get("big", load("x" * 11)) == "x" * 11 and "big" not in cache._entries


def clip_rows() -> list[dict]:
    """Three clips of one video: each lists its siblings by reference, one reference
    points at a clip that is gone (dropped by an earlier step)."""
    clips = [
        record(
            f"v#clip{k}",
            "clips",
            "video_retrieval",
            side(f"caption {k}"),
            side(f"clip {k} frames"),
            group_id="video:v",
        )
        for k in range(3)
    ]
    clips[0]["negatives"] = [reference("v#clip1"), reference("v#clip2")]
    clips[1]["negatives"] = [reference("v#clip0"), reference("v#clip9")]
    clips[2]["negatives"] = [reference("v#clip1")]
    return clips


def test_sibling_references_resolve_to_the_siblings_positives(tmp_path):
    version = write_version(str(tmp_path / "clips"), [text_rows(0)[:5], clip_rows()])
    rows = DatasetRows(version, "video_retrieval", max_negatives=2)
    first, second, third = rows.fetch([5, 6, 7])
    positives = [r["positive"] for r in rows.fetch([5, 6, 7])]
    assert first["negatives"] == [positives[1], positives[2]]
    assert second["negatives"] == [positives[0]]  # clip9 is gone: its slot stays empty
    assert third["negatives"] == [positives[1]]
    assert rows.fetch([0])[0]["negatives"] == text_rows(0)[0]["negatives"]


def test_stage_manifest_records_most_negatives_and_unresolved_references(tmp_path, ray_local):
    from rzenembed.prep.mixture import profile_negatives

    version = write_version(str(tmp_path / "clips"), [text_rows(0)[:5], clip_rows()])
    profile = profile_negatives(version)
    assert (profile.both, profile.given, profile.mined, profile.unresolved) == (2, 2, 0, 1)


def test_rows_read_from_s3(s3_endpoint, version):
    uri = "s3://rzenembed-rows/lazy-rows/v"
    shards = [text_rows(k) for k in range(SHARDS)]
    remote = write_version(uri, shards, s3_endpoint)
    rows = DatasetRows.open(remote.uri, "text_retrieval", 2, endpoint_url=s3_endpoint)
    indices = [3, ROWS_PER_SHARD + 100, 2 * ROWS_PER_SHARD + 149]
    everything = [training_view(r) for r in version.read_table().to_pylist()]
    assert rows.fetch(indices) == [everything[i] for i in indices]
