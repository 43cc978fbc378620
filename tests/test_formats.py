"""Source formats: each published layout ingested as it is, converted records checked field
by field, every planted bad row a reject with its reason (rows in = out + rejects)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rzenembed.config import config_from_dict
from rzenembed.data.formats import format_names, get_format
from rzenembed.data.formats.mmeb import ListUnparsable, cell_list
from rzenembed.data.importers import SourceError
from rzenembed.data.storage import filesystem
from rzenembed.prep.ingest import run_ingest

from . import format_fixtures

pytestmark = pytest.mark.slow


def ingest(root: Path, folder: Path, fmt: str, endpoint: str | None = None, **options):
    source = {"name": "src", "uri": str(folder), "format": fmt, "task_group": "text_retrieval"}
    if "task_group" in options:
        source["task_group"] = options.pop("task_group")
    cfg = config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "storage": {"root": str(root), "endpoint_url": endpoint},
            "sources": [{**source, **options}],
            "prep": {"shard_rows": 4},
        }
    )
    version = run_ingest(cfg, cfg.sources[0], show_progress=False)
    records = {r["id"]: r for r in version.read_table().to_pylist()}
    rejects = version.read_rejects().to_pylist()
    return version, records, rejects


def text(value: str, instruction: str = "", media: list | None = None) -> dict:
    """A side as it reads back from a version."""
    return {"instruction": instruction, "text": value, "media": media or [], "ref": None}


def image(uri: str) -> dict:
    return {
        "kind": "image",
        "uri": uri,
        "start_s": None,
        "end_s": None,
        "timestamps": None,
        "frames": None,
    }


def reasons(rejects: list[dict]) -> dict[int, str]:
    return {r["source_row"]: r["reason"] for r in rejects}


def test_every_format_is_registered_with_its_fields():
    assert set(format_names()) == {
        "rzenembed",
        "jsonl",
        "mmeb",
        "text-retrieval",
        "megapairs",
        "webdataset",
        "visdoc-parquet",
        "llava-video",
    }
    assert "positive_passages" in get_format("text-retrieval").fields
    with pytest.raises(ValueError, match="known:"):
        get_format("webdataset-v9")


def test_text_retrieval_in_its_three_shapes(ray_local, tmp_path):
    folder = tmp_path / "text"
    format_fixtures.text_retrieval(folder)
    version, records, rejects = ingest(
        tmp_path / "store", folder, "text-retrieval", query_instruction="Find the passage."
    )
    # Files in name order: bge.jsonl (rows 0-3), pairs.jsonl (4), tevatron.jsonl (5-6),
    # triplets.parquet (7-8).
    q = "Find the passage."
    assert records["src-00000000"]["query"] == text("what is the capital of france", q)
    assert records["src-00000000"]["positive"] == text("Paris is the capital of France.")
    assert records["src-00000000"]["negatives"] == [
        text("Berlin is in Germany."),
        text("Rome\nCapital of Italy."),
    ]
    assert records["src-00000004"]["positive"] == text("four")
    assert records["src-00000004"]["negatives"] == []
    assert records["q17"]["query"] == text("how do bees fly", q)
    assert records["q17"]["positive"] == text("Bees\nBees beat their wings fast.")
    assert records["q17"]["negatives"] == [
        text("Birds fly with feathers."),
        text("Planes\nPlanes use jet engines."),
    ]
    assert records["src-00000007"]["query"] == text("red fruit", q)
    assert records["src-00000007"]["negatives"] == [text("a banana"), text("a cherry")]
    assert records["src-00000008"]["positive"] == text("a lime")
    assert sorted(records) == ["q17", *(f"src-0000000{k}" for k in (0, 4, 7, 8))]
    assert reasons(rejects) == {
        1: "text_empty",
        2: "no_positive",
        3: "schema_invalid",
        6: "schema_invalid",
    }
    assert "expected {query, pos" in next(r["detail"] for r in rejects if r["source_row"] == 6)
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 9


def test_text_retrieval_further_positives_as_rows_and_fewer_negatives(ray_local, tmp_path):
    folder = tmp_path / "text"
    format_fixtures.text_retrieval(folder)
    version, records, rejects = ingest(
        tmp_path / "store", folder, "text-retrieval", extra_positives="rows", max_negatives=1
    )
    assert records["src-00000000#pos1"]["positive"] == text("France's capital is Paris.")
    assert records["src-00000000#pos1"]["query"] == records["src-00000000"]["query"]
    assert records["src-00000000"]["negatives"] == [text("Berlin is in Germany.")]
    stats = version.manifest.stats
    assert stats["extra_records"] == 1
    assert stats["rows_in"] == len(records) + len(rejects) == 10  # 9 raw rows + 1 extra


def test_megapairs_with_a_seeded_instruction_and_hard_negative_images(ray_local, tmp_path):
    folder = tmp_path / "megapairs"
    format_fixtures.megapairs(folder)
    version, records, rejects = ingest(tmp_path / "store", folder, "megapairs")
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 6
    first = records["src-00000000"]
    # blake2b("0:0") picks the second of the three texts (seed 0, row 0).
    assert first["query"] == text("the same scene at night", media=[image("images/img0.png")])
    assert first["positive"] == text("", media=[image("images/img1.png")])
    assert first["negatives"] == [
        text("", media=[image(f"images/img{k}.png")]) for k in (0, 2, 3)
    ]  # the query image itself first: the paper's mandatory hard negative
    assert records["src-00000001"]["query"]["text"] == "a single text"
    assert records["src-00000001"]["negatives"] == []
    assert reasons(rejects) == {
        2: "media_missing",
        3: "media_undecodable",
        4: "uri_escapes_root",
        5: "text_empty",
    }
    _, again, _ = ingest(
        tmp_path / "store2", folder, "megapairs", seed=1, query_image_negative=False
    )
    assert again["src-00000000"]["query"]["text"] == "make it red"
    assert [n["media"][0]["uri"] for n in again["src-00000000"]["negatives"]] == [
        "images/img2.png",
        "images/img3.png",
    ]


def test_mmeb_splits_and_mme5_stringified_lists(ray_local, tmp_path):
    folder = tmp_path / "mmeb"
    format_fixtures.mmeb(folder)
    version, records, rejects = ingest(tmp_path / "store", folder, "mmeb")
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 5
    # diverse_instruction.jsonl (row 0), mme5_synthetic.jsonl (1-3), original.jsonl (4).
    assert records["src-00000000"]["query"] == text(
        "Which object does the picture show?", media=[image("images/m0.png")]
    )
    assert records["src-00000004"]["query"] == text(
        "Represent the given image for classification", media=[image("images/m0.png")]
    )
    synthetic = records["src-00000001"]
    assert synthetic["query"] == text("Find an image that matches: a warm sunset")
    assert synthetic["positive"] == text(
        "Represent the given image.", media=[image("images/m1.png")]
    )
    assert synthetic["negatives"] == [
        text("Represent the given image.", media=[image("images/m2.png")]),
        text("a cold morning"),
    ]
    assert reasons(rejects) == {2: "list_unparsable", 3: "list_unparsable"}


def test_stringified_lists_are_parsed_as_literals_never_run():
    assert cell_list("['a', \"b\"]") == ["a", "b"]
    assert cell_list('["a", "b"]') == ["a", "b"]
    assert cell_list("plain text") == ["plain text"] and cell_list("") == []
    assert cell_list(["x", None]) == ["x", ""]
    for bad in ("[__import__('os').system('echo owned')]", "['unclosed", "[1, 2]", 7):
        with pytest.raises(ListUnparsable):
            cell_list(bad)


def test_text_retrieval_from_s3(ray_local, s3_endpoint, tmp_path):
    folder = tmp_path / "text"
    format_fixtures.text_retrieval(folder)
    fs, _ = filesystem("s3://rzenembed-formats", s3_endpoint)
    fs.put(str(folder), "rzenembed-formats/text", recursive=True)
    local_version, local, _ = ingest(tmp_path / "store", folder, "text-retrieval")
    remote_version, remote, rejects = ingest(
        "s3://rzenembed-formats/text-store",
        "s3://rzenembed-formats/text",
        "text-retrieval",
        endpoint=s3_endpoint,
    )
    assert remote == local and len(rejects) == 4
    assert remote_version.content_digest == local_version.content_digest


def sha_uri(data: bytes, suffix: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"{digest[:2]}/{digest}{suffix}"


def test_webdataset_shards_as_img2dataset_writes_them(ray_local, tmp_path):
    folder = tmp_path / "laion"
    format_fixtures.webdataset(folder)
    version, records, rejects = ingest(
        tmp_path / "store", folder, "webdataset", query_instruction="Find the image."
    )
    red = sha_uri(format_fixtures._jpeg((200, 30, 30)), ".jpg")
    assert records["000000000"]["query"] == text("a red square on white", "Find the image.")
    assert records["000000000"]["positive"] == text("", media=[image(red)])
    green = sha_uri(format_fixtures._png((30, 200, 30)), ".png")
    assert records["000000003"]["query"]["text"] == "a green square, from the json"
    assert records["000000003"]["positive"]["media"] == [image(green)]
    assert records["000010000"]["query"]["text"] == "a blue square"
    assert sorted(records) == ["000000000", "000000003", "000010000"]
    assert reasons(rejects) == {
        1: "download_failed",
        2: "media_undecodable",
        4: "media_missing",
        6: "text_empty",
    }
    failed = next(r for r in rejects if r["reason"] == "download_failed")
    assert "timeout" in failed["detail"] and failed["id"] == "000000001"
    media_root = Path(version.manifest.stats["media_root"])
    assert media_root == tmp_path / "store" / "_media" / "src"
    assert (media_root / red).read_bytes() == format_fixtures._jpeg((200, 30, 30))
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 7


def test_visual_document_parquet_with_embedded_pages(ray_local, tmp_path):
    folder = tmp_path / "visdoc"
    format_fixtures.visdoc_parquet(folder)
    version, records, rejects = ingest(
        tmp_path / "store", folder, "visdoc-parquet", page_answers=True
    )
    # 6 raw rows; the three colpali rows with a page and a query also give page + query ->
    # answer (the broken page's two records are both rejected): 9 records in
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 9
    assert version.manifest.stats["extra_records"] == 3
    page = sha_uri(format_fixtures._png((240, 240, 240), (96, 128)), ".png")
    first, second = records["src-00000000"], records["src-00000001"]
    assert first["query"] == text("What is the revenue in 2020?")
    assert first["positive"] == text("", media=[image(page)])
    assert second["positive"] == first["positive"]  # one page, stored once, two queries
    assert first["group_id"] == f"page:{page}"
    answer = records["src-00000000#answer"]
    assert answer["query"] == text("What is the revenue in 2020?", media=[image(page)])
    assert answer["positive"] == text("12 million")
    assert records["src-00000005"]["query"]["text"] == "Which chart shows rainfall?"
    assert "src-00000005#answer" not in records  # VisRAG rows have no answer
    assert reasons(rejects) == {2: "media_missing", 3: "text_empty", 4: "media_undecodable"}


@pytest.mark.parametrize("group", ["video_qa", "video_retrieval"])
def test_llava_video_conversations_with_mp4s_and_frame_folders(ray_local, tmp_path, group):
    folder = tmp_path / "llava"
    format_fixtures.llava_video(folder)
    version, records, rejects = ingest(tmp_path / "store", folder, "llava-video", task_group=group)
    assert version.manifest.stats["rows_in"] == len(records) + len(rejects) == 5
    # ingest stamps a whole video's length on its item (the fixture's mp4: 3 s)
    clip = {**image("videos/clip.mp4"), "kind": "video", "start_s": 0.0, "end_s": 3.0}
    frames = {**image("frames/v2"), "kind": "frames"}
    if group == "video_qa":  # (video + question) -> answer
        assert records["r0"]["query"] == text("Describe the video.", media=[clip])
        assert records["r0"]["positive"] == text("A square fades from black to grey.")
        assert records["r1"]["query"] == text("What colour is it at the end?", media=[frames])
    else:  # caption -> video
        assert records["r0"]["query"] == text("A square fades from black to grey.")
        assert records["r0"]["positive"] == text("", media=[clip])
    assert reasons(rejects) == {2: "media_missing", 3: "schema_invalid", 4: "media_missing"}


def test_a_frame_folder_is_read_in_natural_order(tmp_path):
    from rzenembed.training.collate import MediaReader

    folder = tmp_path / "llava"
    format_fixtures.llava_video(folder)
    frames = MediaReader(str(folder)).frames({"kind": "frames", "uri": "frames/v2"}, 3)
    # frame_1, frame_5 (linspace 0..9 in 3: 0, 4.5 -> 4, 9), frame_10: red 20, 100, 200
    assert [f.getpixel((3, 3))[0] for f in frames] == pytest.approx([20, 100, 200], abs=6)


@pytest.mark.parametrize("fmt", ["webdataset", "visdoc-parquet"])
def test_embedded_media_formats_from_s3(ray_local, s3_endpoint, tmp_path, fmt):
    folder = tmp_path / fmt
    (format_fixtures.webdataset if fmt == "webdataset" else format_fixtures.visdoc_parquet)(folder)
    fs, _ = filesystem("s3://rzenembed-formats", s3_endpoint)
    fs.put(str(folder), f"rzenembed-formats/{fmt}", recursive=True)
    local_version, local, local_rejects = ingest(tmp_path / "store", folder, fmt)
    remote_version, remote, rejects = ingest(
        f"s3://rzenembed-formats/{fmt}-store",
        f"s3://rzenembed-formats/{fmt}",
        fmt,
        endpoint=s3_endpoint,
    )
    assert remote == local and reasons(rejects) == reasons(local_rejects)
    assert remote_version.content_digest == local_version.content_digest
    media_root = remote_version.manifest.stats["media_root"]
    assert media_root == f"s3://rzenembed-formats/{fmt}-store/_media/src"
    uri = next(iter(remote.values()))["positive"]["media"][0]["uri"]
    assert fs.exists(f"{media_root}/{uri}")


FIXTURES = {
    "text-retrieval": format_fixtures.text_retrieval,
    "megapairs": format_fixtures.megapairs,
    "mmeb": format_fixtures.mmeb,
    "webdataset": format_fixtures.webdataset,
    "visdoc-parquet": format_fixtures.visdoc_parquet,
    "llava-video": format_fixtures.llava_video,
}


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_inspect_source_converts_the_first_rows_and_writes_nothing(tmp_path, capsys, fmt):
    from rzenembed.cli import main

    folder = tmp_path / fmt
    FIXTURES[fmt](folder)
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["inspect-source", "--format", fmt, "--rows", "50", str(folder)]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines() if not line.startswith("#")]
    assert records and all({"id", "query", "positive", "negatives"} <= set(r) for r in records)
    assert "rejects" in out and sorted(p for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    "fmt,other",
    [
        ("megapairs", "text-retrieval"),
        ("mmeb", "megapairs"),
        ("llava-video", "mmeb"),
        ("text-retrieval", "llava-video"),
        ("visdoc-parquet", "text-retrieval"),
    ],
)
def test_inspect_source_names_the_expected_fields_for_another_layout(tmp_path, capsys, fmt, other):
    from rzenembed.cli import main

    folder = tmp_path / other
    FIXTURES[other](folder)
    if fmt == "visdoc-parquet":  # its files are Parquet: the triplets file is another layout
        for path in folder.glob("*.jsonl"):
            path.unlink()
    assert main(["inspect-source", "--format", fmt, str(folder)]) != 0
    error = capsys.readouterr().err
    assert f"does not look like format {fmt!r}" in error
    assert get_format(fmt).fields in error


def test_inspect_source_on_a_folder_without_the_formats_files(tmp_path, capsys):
    from rzenembed.cli import main

    folder = tmp_path / "text"
    format_fixtures.text_retrieval(folder)
    assert main(["inspect-source", "--format", "webdataset", str(folder)]) == 2
    assert "no .tar files" in capsys.readouterr().err


def test_media_paths_are_checked_against_the_media_root_once_before_the_run(ray_local, tmp_path):
    # MMEB-train's layout: rows in <root>/<subset>/, paths "images/..." from <root>.
    root = tmp_path / "MMEB-train"
    format_fixtures.mmeb(root / "ImageNet_1K")
    (root / "ImageNet_1K" / "images").rename(root / "images")
    with pytest.raises(SourceError, match=r"expected a folder 'images/' there.*media_root"):
        ingest(tmp_path / "store", root / "ImageNet_1K", "mmeb")
    _, records, rejects = ingest(
        tmp_path / "store", root / "ImageNet_1K", "mmeb", media_root=str(root)
    )
    assert len(records) == 3 and reasons(rejects) == {2: "list_unparsable", 3: "list_unparsable"}


@pytest.mark.parametrize("policy", ["add", "replace"])
def test_webdataset_recaptions_from_a_side_folder_follow_the_policy(ray_local, tmp_path, policy):
    from rzenembed.prep.prepare import prepare_source

    format_fixtures.webdataset(tmp_path / "raw" / "laion")
    format_fixtures.write_jsonl(
        tmp_path / "raw" / "laion-captions" / "captions.jsonl",
        [
            {"key": "000000000", "caption": "A bright red square centred on a white page."},
            {"key": "999", "caption": "a key no sample has"},
        ],
    )
    cfg = config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "data_root": str(tmp_path / "raw"),
            "storage": {"root": str(tmp_path / "store")},
            "sources": [
                {
                    "name": "laion",
                    "uri": "laion",
                    "format": "webdataset",
                    "stage": "stage1",
                    "task_group": "image_retrieval",
                    "recaption": True,
                    "captions": "laion-captions",
                }
            ],
            "prep": {"shard_rows": 4, "recaption": {"policy": policy}},
        }
    )
    steps = prepare_source(cfg, cfg.sources[0], show_progress=False)
    rows = {r["id"]: r for r in steps["recaption"].read_table().to_pylist()}
    new = "A bright red square centred on a white page."
    if policy == "add":
        assert rows["000000000"]["query"]["text"] == "a red square on white"
        assert rows["000000000#recaption"]["query"]["text"] == new
        assert rows["000000000#recaption"]["positive"] == rows["000000000"]["positive"]
    else:
        assert rows["000000000"]["query"]["text"] == new and "000000000#recaption" not in rows
    assert rows["000010000"]["query"]["text"] == "a blue square"  # no caption: unchanged
    captioner = steps["recaption"].manifest.stats["captioner"]
    assert captioner["kind"] == "source" and captioner["path"].endswith("laion-captions")
