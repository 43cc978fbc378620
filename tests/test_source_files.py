"""Which files of a source folder are data, as its format names them, and the file kinds
read as rows: img2dataset's metadata next to its tars is not data (reported, never read
as rows), gzipped JSONL and JSON arrays are read, a JSON array one element at a time."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from rzenembed.config import SourceConfig
from rzenembed.data.formats import format_names, get_format
from rzenembed.data.importers import (
    SourceError,
    list_source_files,
    plan_chunks,
    read_chunk,
    scan_data_file,
    source_digest,
)
from rzenembed.data.inspect import inspect_source
from rzenembed.data.raw_files import (
    BLOCK,
    READABLE_SUFFIXES,
    iter_file_rows,
    iter_json_array,
    parse_json,
)
from rzenembed.data.storage import filesystem

from . import format_fixtures
from .test_formats import image, ingest, reasons, text

FIXTURES = {
    "text-retrieval": format_fixtures.text_retrieval,
    "megapairs": format_fixtures.megapairs,
    "mmeb": format_fixtures.mmeb,
    "visdoc-parquet": format_fixtures.visdoc_parquet,
    "llava-video": format_fixtures.llava_video,
}


def names(paths: list[str]) -> list[str]:
    return [p.rsplit("/", 1)[-1] for p in paths]


def tar_samples(folder: Path) -> int:
    """Samples in the folder's tars, counted here: runs of members sharing a key."""
    count = 0
    for shard in folder.glob("*.tar"):
        with tarfile.open(shard) as tar:
            count += len({m.name.split(".", 1)[0] for m in tar})
    return count


# --------------------------------------------------------------------------- listing


def test_every_format_reads_only_suffixes_the_readers_know():
    for name in format_names():
        assert set(get_format(name).suffixes) <= set(READABLE_SUFFIXES), name
    for name in ("rzenembed", "jsonl", "mmeb", "text-retrieval", "megapairs", "llava-video"):
        assert {".jsonl", ".jsonl.gz", ".json"} <= set(get_format(name).suffixes), name
    assert get_format("webdataset").suffixes == (".tar",)


def test_img2dataset_metadata_next_to_the_tars_is_not_data(tmp_path):
    folder = tmp_path / "laion"
    format_fixtures.webdataset(folder)
    siblings = format_fixtures.img2dataset_siblings(folder)
    (folder / "README.md").write_text("downloaded with img2dataset\n")
    listing = list_source_files(str(folder), "webdataset")
    assert names(listing.data) == ["00000.tar", "00001.tar"]
    assert (
        names(listing.not_data)
        == sorted(siblings)
        == [
            "00000.parquet",
            "00000_stats.json",
            "00001.parquet",
            "00001_stats.json",
        ]
    )
    # The digest stays a function of the folder's content: a sibling's bytes count.
    before = source_digest(str(folder))
    stats = folder / "00001_stats.json"
    stats.write_text(stats.read_text().replace('"count": 2', '"count": 3'))
    assert source_digest(str(folder)) != before


@pytest.mark.parametrize(
    "fmt,expected", [("webdataset", "no .tar files"), ("visdoc-parquet", "no .parquet files")]
)
def test_a_folder_without_the_formats_files_is_a_clear_error(tmp_path, fmt, expected):
    folder = tmp_path / "llava"
    format_fixtures.llava_video(folder)
    with pytest.raises(SourceError, match=re.escape(f"{expected} for format '{fmt}'")):
        list_source_files(str(folder), fmt)
    with pytest.raises(SourceError, match=re.escape("no .jsonl, .jsonl.gz or .json files")):
        list_source_files(str(tmp_path / "llava" / "videos"), "llava-video")


def digest_as_before(folder: Path) -> str:
    """The source digest as it was computed before formats chose their files: the bytes of
    every top-level .jsonl/.parquet/.tar, and every other file's name and size unless its
    name ends so (at any depth)."""
    data = (".jsonl", ".parquet", ".tar")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(data)):
        digest.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    listing = sorted(
        (f"/{p.relative_to(folder).as_posix()}", p.stat().st_size)
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(data)
    )
    digest.update(json.dumps(listing).encode())
    return digest.hexdigest()


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_the_digest_of_a_source_of_the_other_formats_is_what_it_was(tmp_path, fmt):
    folder = tmp_path / fmt
    FIXTURES[fmt](folder)
    (folder / "README.md").write_text("how this folder was made\n")
    format_fixtures.write_jsonl(folder / "old" / "rows.jsonl", [{"id": "x"}])  # nested
    assert source_digest(str(folder)) == digest_as_before(folder)


# --------------------------------------------------------------------------- JSON arrays


class CountingReader:
    """A binary file that records how much was read from it, and the largest single read."""

    def __init__(self, raw: io.BufferedIOBase):
        self.raw, self.total, self.largest = raw, 0, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        self.largest = max(self.largest, len(data))
        return data


def test_a_json_array_is_streamed_one_element_at_a_time(tmp_path):
    path = tmp_path / "big.json"
    rows = [{"id": f"r{i}", "text": "x" * 200, "tags": ["a,b", "]"]} for i in range(20_000)]
    path.write_text(json.dumps(rows))
    size = path.stat().st_size
    assert size > 4 * BLOCK
    with path.open("rb") as f:
        reader = CountingReader(f)
        elements = iter_json_array(reader, str(path))
        _, first = next(elements)
        assert parse_json(first) == rows[0]
        assert reader.total <= BLOCK  # the first row came back after one block, of many
        rest = [parse_json(element) for _, element in elements]
    assert rest == rows[1:]
    assert reader.total == size and reader.largest == BLOCK  # block by block to the end


def test_an_element_larger_than_a_block_is_read_whole(tmp_path):
    path = tmp_path / "big.json"
    rows = [{"id": "small"}, {"id": "big", "text": "y" * (3 * BLOCK)}, {"id": "after"}]
    path.write_text(json.dumps(rows, indent=2))
    with path.open("rb") as f:
        reader = CountingReader(f)
        read = [parse_json(e) for _, e in iter_json_array(reader, str(path))]
    assert read == rows
    assert reader.largest <= 2 * len(rows[1]["text"])  # reads grow with the element


def write_rows(path: Path, lines: list[str]) -> None:
    """``lines`` (JSON texts, some malformed) as the file kind its name says."""
    if path.name.endswith(".json"):
        path.write_text("[\n  " + ",\n  ".join(lines) + "\n]\n")
    elif path.name.endswith(".jsonl.gz"):
        with gzip.open(path, "wt") as f:
            f.write("\n\n".join(lines) + "\n")  # blank lines are not rows
    else:
        path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz", "rows.json"])
def test_chunks_read_exactly_the_rows_of_the_whole_file(tmp_path, name):
    lines = [json.dumps({"id": f"r{i}", "text": 'tricky ,]}" text'}) for i in range(10)]
    lines.insert(4, '{"id": "broken", "text": }')  # not JSON: a row that is a reject later
    path = tmp_path / name
    write_rows(path, lines)
    scan = scan_data_file(str(path), None, 3)
    assert scan.rows == 11
    assert scan.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the file's bytes
    fs, _ = filesystem(str(path))
    whole = list(iter_file_rows(fs, str(path)))
    assert len(whole) == 11 and "__unparsable__" in whole[4]
    assert [r["id"] for r in whole if "id" in r] == [f"r{i}" for i in range(10)]
    source = SourceConfig(name="s", uri=str(tmp_path), task_group="text_retrieval")
    chunks = plan_chunks([scan], 3)
    assert [c.count for c in chunks] == [3, 3, 3, 2]
    assert [row for c in chunks for _, row in read_chunk(source, c)] == whole


def test_malformed_elements_are_rows_and_a_cut_off_array_ends_with_its_last(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"id": "a"},, {"id": "b"}, {"id": [}, {"id": "c"}')  # cut off
    fs, _ = filesystem(str(path))
    rows = list(iter_file_rows(fs, str(path)))
    assert rows[0] == {"id": "a"} and rows[2] == {"id": "b"}
    assert "__unparsable__" in rows[1]  # the empty element between two commas
    # unbalanced brackets: the element runs on to the end of the file
    assert len(rows) == 4 and rows[3]["__unparsable__"].startswith('{"id": [}')


@pytest.mark.parametrize(
    "content,expected",
    [
        ('{"data": [{"id": "a"}]}', "its top level is an object"),
        ("", "the file is empty"),
        ('{"id": "a"}\n{"id": "b"}\n', "named .jsonl"),
        ('[{"id": "a"}] [{"id": "b"}]', "content after the JSON array's closing bracket"),
    ],
)
def test_a_json_file_that_is_not_one_array_is_refused_naming_it(tmp_path, content, expected):
    folder = tmp_path / "llava"
    format_fixtures.llava_video(folder)
    (folder / "annotations.json").write_text(content)  # read before train.jsonl
    with pytest.raises(SourceError, match=rf"annotations\.json: .*{re.escape(expected)}"):
        inspect_source(str(folder), "llava-video", rows=50)
    with pytest.raises(SourceError, match=re.escape(expected)):
        scan_data_file(str(folder / "annotations.json"), None, 4)


def test_a_corrupt_gzip_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    write_rows(path, [json.dumps({"id": f"r{i}"}) for i in range(100)])
    path.write_bytes(path.read_bytes()[:-20])  # cut off
    with pytest.raises(SourceError, match=re.escape("rows.jsonl.gz: not a readable gzip file")):
        scan_data_file(str(path), None, 4)


# --------------------------------------------------------------------------- ingest


@pytest.mark.slow
def test_img2dataset_folders_ingest_the_tars_samples_only(ray_local, tmp_path, capsys):
    from rzenembed.cli import main

    folder = tmp_path / "laion"
    format_fixtures.webdataset(folder)
    siblings = format_fixtures.img2dataset_siblings(folder)
    version, records, rejects = ingest(tmp_path / "store", folder, "webdataset")
    samples = tar_samples(folder)
    assert samples == 7
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == samples
    assert sorted(records) == ["000000000", "000000003", "000010000"]
    assert "schema_invalid" not in set(reasons(rejects).values())
    assert version.manifest.inputs[0].content_digest == source_digest(str(folder))

    report = inspect_source(str(folder), "webdataset", rows=50)
    assert report.rows_read == samples and report.not_data == 4
    assert report.not_data_names == sorted(siblings)
    assert main(["inspect-source", "--format", "webdataset", "--rows", "50", str(folder)]) == 0
    out = capsys.readouterr().out
    assert (
        "# not data for 'webdataset', ignored: 4 files "
        "(00000.parquet, 00000_stats.json, 00001.parquet, 00001_stats.json)"
    ) in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [format_fixtures.llava_video_json_array, format_fixtures.llava_video_jsonl_gz]
)
def test_llava_rows_from_a_json_array_or_gzipped_jsonl(ray_local, tmp_path, layout):
    folder = tmp_path / "llava"
    layout(folder)
    version, records, rejects = ingest(
        tmp_path / "store", folder, "llava-video", task_group="video_qa"
    )
    # six rows in shards of four: the second shard starts inside the file
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 6
    # ingest stamps a whole video's length on its item (the fixture's mp4: 3 s)
    clip = {**image("videos/clip.mp4"), "kind": "video", "start_s": 0.0, "end_s": 3.0}
    frames = {**image("frames/v2"), "kind": "frames"}
    assert sorted(records) == ["r0", "r1"]
    assert records["r0"]["query"] == text("Describe the video.", media=[clip])
    assert records["r0"]["positive"] == text("A square fades from black to grey.")
    assert records["r1"]["query"] == text("What colour is it at the end?", media=[frames])
    # the malformed row at position 2, then the fixture's bad rows one position later
    assert reasons(rejects) == {
        2: "schema_invalid",
        3: "media_missing",
        4: "schema_invalid",
        5: "media_missing",
    }
    malformed = next(r for r in rejects if r["source_row"] == 2)
    assert "not a JSON object" in malformed["detail"]
    assert version.manifest.inputs[0].content_digest == source_digest(str(folder))


def test_the_digest_follows_the_bytes_of_json_and_gzipped_files(tmp_path):
    folder = tmp_path / "llava"
    format_fixtures.llava_video_json_array(folder)
    format_fixtures.write_jsonl(folder / "more.jsonl", [{"id": "x"}])
    with gzip.open(folder / "more.jsonl.gz", "wt") as f:
        f.write('{"id": "y"}\n')
    before = source_digest(str(folder))
    rows = (folder / "train.json").read_text()
    (folder / "train.json").write_text(rows.replace("Red.", "Rot."))  # same size
    assert source_digest(str(folder)) != before
    with gzip.open(folder / "more.jsonl.gz", "wt") as f:
        f.write('{"id": "z"}\n')
    assert source_digest(str(folder)) != before
