"""Dataset versions, storage paths and importers, without Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from rzenembed.config import SourceConfig
from rzenembed.data.formats.mmeb import from_mmeb
from rzenembed.data.importers import iter_raw_rows, source_digest
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


def test_streaming_chunks_read_exactly_what_the_sequential_importer_reads(tmp_path):
    """Scan per file, chunks that never cross a file, reads from byte offsets / row groups:
    the same (position, row) pairs as ``iter_raw_rows``, MMEB ids from global positions."""
    import pyarrow.parquet as pq

    from rzenembed.data.importers import (
        combine_source_digest,
        data_file_uris,
        media_listing,
        plan_chunks,
        read_chunk,
        scan_data_file,
    )

    lines = [json.dumps({"qry": f"q{i}", "pos_text": f"p{i}"}) for i in range(7)]
    lines.insert(2, "")  # a blank line is not a row
    lines.insert(4, "{not json")  # an unparsable row stays a row (a reject later)
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"qry": "caf\xe9"}\n' + b'{"qry": "ok"}\n')  # bad UTF-8
    table = pa.table({"qry": [f"t{i}" for i in range(5)], "pos_text": ["x"] * 5})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    source = SourceConfig(name="m", uri=str(tmp_path), task_group="image_qa", format="mmeb")
    files = data_file_uris(str(tmp_path), "mmeb")
    scans = [scan_data_file(f, None, 3) for f in files]
    assert [s.rows for s in scans] == [8, 2, 5]
    chunks = plan_chunks(scans, 3)
    assert [(c.name, c.path.rsplit("/", 1)[-1], c.count) for c in chunks] == [
        ("part-00000", "a.jsonl", 3),
        ("part-00001", "a.jsonl", 3),
        ("part-00002", "a.jsonl", 2),
        ("part-00003", "b.jsonl", 2),
        ("part-00004", "c.parquet", 3),
        ("part-00005", "c.parquet", 2),
    ]
    streamed = [pair for c in chunks for pair in read_chunk(source, c)]
    sequential = list(iter_raw_rows(source, str(tmp_path)))
    assert [p for p, _ in streamed] == list(range(15))
    assert streamed[:8] == sequential[:8] and streamed[10:] == sequential[10:]
    assert "__unparsable__" in streamed[8][1]  # invalid UTF-8: a reject, not a crash
    assert streamed[12][1]["id"] == "m-00000012"  # MMEB ids from the global position
    named = [(f.rsplit("/", 1)[-1], s.sha256) for f, s in zip(files, scans, strict=True)]
    assert combine_source_digest(named, media_listing(str(tmp_path))) == source_digest(
        str(tmp_path)
    )


def test_an_empty_source_gets_one_empty_shard(tmp_path):
    from rzenembed.data.importers import plan_chunks, scan_data_file

    (tmp_path / "a.jsonl").write_text("\n\n")
    scan = scan_data_file(str(tmp_path / "a.jsonl"), None, 4)
    assert scan.rows == 0
    assert [(c.name, c.count) for c in plan_chunks([scan], 4)] == [("part-00000", 0)]


def test_a_table_written_for_other_processes_never_appears_half_written(tmp_path, monkeypatch):
    """Two clean steps share the decontamination keys: the one that finds the file must
    read it whole. While the bytes are being written, the final name must not exist."""
    import fsspec.implementations.local as local

    from rzenembed.data.version import put_table

    seen_while_writing = []
    real_open = local.LocalFileSystem.open

    class Watched:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def write(self, data):
            seen_while_writing.append((tmp_path / "keys" / "k.parquet").exists())
            return self.f.write(data)

    def watched_open(self, path, mode="rb", **kwargs):
        handle = real_open(self, path, mode, **kwargs)
        return Watched(handle.__enter__()) if "w" in mode else handle

    monkeypatch.setattr(local.LocalFileSystem, "open", watched_open)
    table = pa.table({"x": list(range(1000))})
    put_table(str(tmp_path / "keys"), "k.parquet", table)
    assert seen_while_writing == [False]
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "keys" / "k.parquet").equals(table)
    assert [p.name for p in (tmp_path / "keys").iterdir()] == ["k.parquet"]
