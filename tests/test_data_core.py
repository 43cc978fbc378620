"""Dataset versions, storage paths and importers, without Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rzenembed.config import SourceConfig
from rzenembed.data.importers import from_mmeb, iter_raw_rows, source_digest
from rzenembed.data.schema import RECORD_SCHEMA, media, record, records_table, side
from rzenembed.data.storage import UnsafeURIError, resolve_media_uri
from rzenembed.data.version import (
    MANIFEST,
    DatasetVersion,
    InputRef,
    VersionNotFoundError,
    VersionWriter,
)


@pytest.mark.parametrize(
    ("root", "uri", "expected"),
    [
        ("/data/src", "media/a.png", "/data/src/media/a.png"),
        ("/data/src/", "./media/../media/a.png", "/data/src/media/a.png"),
        ("/data/src", "/data/src/media/a.png", "/data/src/media/a.png"),
        ("s3://bucket/src", "media/a.png", "s3://bucket/src/media/a.png"),
        ("s3://bucket/src", "s3://bucket/src/x/y.mp4", "s3://bucket/src/x/y.mp4"),
    ],
)
def test_media_uris_resolve_inside_the_root(root, uri, expected):
    assert resolve_media_uri(root, uri) == expected


@pytest.mark.parametrize(
    ("root", "uri"),
    [
        ("/data/src", "../outside.png"),
        ("/data/src", "media/../../outside.png"),
        ("/data/src", "/etc/passwd"),
        ("/data/src", "/data/src-other/a.png"),
        ("s3://bucket/src", "s3://other/src/a.png"),
        ("s3://bucket/src", "file:///data/src/a.png"),
        ("/data/src", ""),
    ],
)
def test_media_uris_escaping_the_root_are_refused(root, uri):
    with pytest.raises(UnsafeURIError):
        resolve_media_uri(root, uri)


def small_table(n: int, prefix: str = "r") -> pa.Table:
    return records_table(
        [record(f"{prefix}{i}", "d", "image_qa", side(f"q{i}"), side(f"p{i}")) for i in range(n)]
    )


def commit(writer: VersionWriter) -> DatasetVersion:
    return writer.commit(
        dataset="d",
        step="test",
        config_digest="c",
        code_version="1",
        inputs=[InputRef("src", "abc")],
    )


def test_version_is_committed_only_by_its_manifest(tmp_path):
    uri = str(tmp_path / "d" / "test" / "v1")
    writer = VersionWriter(uri, RECORD_SCHEMA)
    writer.write_shard("part-00000", small_table(3))
    assert not DatasetVersion.exists(uri)
    with pytest.raises(VersionNotFoundError):
        DatasetVersion.open(uri)
    version = commit(writer)
    assert DatasetVersion.exists(uri)
    reopened = DatasetVersion.open(uri)
    assert reopened.rows == 3 == version.rows
    assert reopened.read_table().column("id").to_pylist() == ["r0", "r1", "r2"]
    assert not any(
        p.name.startswith("_staging") for p in (tmp_path / "d" / "test" / "v1").iterdir()
    )
    manifest = json.loads((tmp_path / "d" / "test" / "v1" / MANIFEST).read_text())
    assert manifest["rows"] == 3 and manifest["inputs"][0]["content_digest"] == "abc"
    assert manifest["shards"][0]["path"] == "data/part-00000.parquet"


def test_interrupted_write_leaves_nothing_committed_and_a_rerun_succeeds(tmp_path):
    uri = str(tmp_path / "v")
    crashed = VersionWriter(uri, RECORD_SCHEMA)
    crashed.write_shard("part-00000", small_table(2))  # then the process "dies"
    assert not DatasetVersion.exists(uri)
    rerun = VersionWriter(uri, RECORD_SCHEMA)  # clears the stale staging area
    rerun.write_shard("part-00000", small_table(2))
    version = commit(rerun)
    assert version.rows == 2
    assert [p.name for p in (tmp_path / "v").iterdir() if p.name.startswith("_staging")] == []


def test_committed_versions_are_immutable(tmp_path):
    uri = str(tmp_path / "v")
    writer = VersionWriter(uri, RECORD_SCHEMA)
    writer.write_shard("part-00000", small_table(1))
    commit(writer)
    with pytest.raises(FileExistsError, match="immutable"):
        VersionWriter(uri, RECORD_SCHEMA)


def test_same_content_gives_the_same_digest(tmp_path):
    digests = []
    for name in ("a", "b"):
        writer = VersionWriter(str(tmp_path / name), RECORD_SCHEMA)
        writer.write_shard("part-00000", small_table(4))
        digests.append(commit(writer).content_digest)
    writer = VersionWriter(str(tmp_path / "c"), RECORD_SCHEMA)
    writer.write_shard("part-00000", small_table(4, prefix="x"))
    assert digests[0] == digests[1] != commit(writer).content_digest


def test_mmeb_rows_map_onto_records_golden():
    raw = {
        "qry": "<|image_1|> Represent the given image with the following question: What is it?",
        "qry_image_path": "images/cat.jpg",
        "pos_text": "A cat.",
        "pos_image_path": "",
        "neg_text": "A dog.",
        "neg_image_path": "",
    }
    assert from_mmeb(raw, "vqa", 7) == {
        "id": "vqa-00000007",
        "query": {
            "instruction": "",
            "text": "Represent the given image with the following question: What is it?",
            "media": [media("image", "images/cat.jpg")],
        },
        "positive": {"instruction": "", "text": "A cat.", "media": []},
        "negatives": [{"instruction": "", "text": "A dog.", "media": []}],
    }
    retrieval = {
        "qry": "Find the photo of a red car",
        "qry_image_path": "",
        "pos_text": "<|image_1|> Represent the given image.",
        "pos_image_path": "images/car.png",
    }
    mapped = from_mmeb(retrieval, "ret", 0)
    assert mapped["negatives"] == []
    assert mapped["positive"] == {
        "instruction": "",
        "text": "Represent the given image.",
        "media": [media("image", "images/car.png")],
    }


def test_importer_reads_jsonl_and_parquet_in_file_order(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"id": "1"}) + "\n\n" + "{not json\n" + json.dumps({"id": "2"}) + "\n"
    )
    table = pa.table({"id": ["3", "4"]})
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "b.parquet")
    (tmp_path / "media").mkdir()
    source = SourceConfig(name="s", uri=str(tmp_path), task_group="image_qa")
    rows = list(iter_raw_rows(source, str(tmp_path)))
    assert [p for p, _ in rows] == [0, 1, 2, 3, 4]  # the blank line is skipped
    assert rows[0][1] == {"id": "1"} and "__unparsable__" in rows[1][1]
    assert [r["id"] for _, r in rows[2:]] == ["2", "3", "4"]
    before = source_digest(str(tmp_path))
    (tmp_path / "media" / "x.png").write_bytes(b"12")
    assert source_digest(str(tmp_path)) != before
