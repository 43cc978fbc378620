"""The generated sample corpus: deterministic, complete, valid except where planted.

The preparation steps test their rejects against this corpus, so these tests pin down
what it promises: every task group, every reason code exactly where ``SampleCorpus`` says,
valid media everywhere else, evaluation sets disjoint from training data.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path

import decord
import numpy as np
import pyarrow as pa
import pytest
import yaml
from PIL import Image
from scipy.fft import dctn

from rzenembed.config import TASK_GROUPS, SourceConfig
from rzenembed.data.sample import REASON_CODES, SampleCorpus, build_sample_corpus
from rzenembed.data.schema import (
    EVAL_CANDIDATE_SCHEMA,
    EVAL_QUERY_SCHEMA,
    RECORD_SCHEMA,
    records_table,
)
from rzenembed.prep.dedup import normalise_text

NEAR_DUPLICATE_RADIUS = 4  # PrepConfig.phash_radius default
BLUR_THRESHOLD = 10.0  # PrepConfig.blur_threshold default
MISSING_ON_PURPOSE = {"media_missing", "uri_escapes_root"}


def _build(folder: Path, seed: int) -> SampleCorpus:
    start = time.perf_counter()
    corpus = build_sample_corpus(folder, seed=seed)
    print(f"sample corpus (seed {seed}) built in {time.perf_counter() - start:.1f} s")
    return corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> SampleCorpus:
    return _build(tmp_path_factory.mktemp("sample-a") / "corpus", seed=0)


@pytest.fixture(scope="module")
def corpus_again(tmp_path_factory) -> SampleCorpus:
    return _build(tmp_path_factory.mktemp("sample-b") / "corpus", seed=0)


# --------------------------------------------------------------------------- helpers


def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _records(corpus: SampleCorpus) -> dict[str, list[dict]]:
    return {
        info.name: _jsonl(info.folder / "records.jsonl")
        for info in corpus.datasets
        if info.format == "rzenembed"
    }


def _sides(row: dict) -> list[dict]:
    return [row["query"], row["positive"], *row["negatives"]]


def _media_paths(folder: Path, row: dict) -> list[Path]:
    return [folder / item["uri"] for s in _sides(row) for item in s["media"]]


def _laplacian_variance(image: Image.Image) -> float:
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    kernel_sum = (
        np.roll(grey, 1, 0) + np.roll(grey, -1, 0) + np.roll(grey, 1, 1) + np.roll(grey, -1, 1)
    )
    return float((kernel_sum - 4 * grey)[1:-1, 1:-1].var())


def _phash(image: Image.Image) -> int:
    small = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    low = dctn(small, type=2)[:8, :8].ravel()
    return sum(1 << i for i, bit in enumerate(low > np.median(low)) if bit)


def _distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def _open(path: Path) -> Image.Image:
    image = Image.open(path)
    image.load()
    return image


def _video_frames_digest(path: Path) -> str:
    reader = decord.VideoReader(str(path))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    return hashlib.sha256(frames.tobytes()).hexdigest()


def _valid_image_paths(corpus: SampleCorpus) -> dict[str, list[Path]]:
    """Every image a non-planted training row points at, by dataset (MMEB included)."""
    found: dict[str, list[Path]] = {}
    for name, rows in _records(corpus).items():
        folder = corpus.dataset(name).folder
        for row in rows:
            if row["id"] not in corpus.planted:
                found.setdefault(name, []).extend(
                    p for p in _media_paths(folder, row) if p.suffix != ".mp4"
                )
    mmeb = corpus.dataset("sample-mmeb-vqa")
    found[mmeb.name] = [
        mmeb.folder / r["qry_image_path"] for r in _jsonl(mmeb.folder / "train.jsonl")
    ]
    return found


def _eval_image_paths(corpus: SampleCorpus) -> list[Path]:
    return [p for folder in corpus.eval_folders for p in folder.rglob("*") if p.suffix == ".png"]


# --------------------------------------------------------------------------- determinism


def test_same_seed_writes_the_same_files(corpus, corpus_again):
    first, second = _files(corpus.root), _files(corpus_again.root)
    assert first.keys() == second.keys()
    for relative, path in first.items():
        if path.suffix != ".mp4":
            assert _sha(path) == _sha(second[relative]), relative


def test_same_seed_decodes_to_the_same_video_frames(corpus, corpus_again):
    assert corpus.video_seconds
    for relative in corpus.video_seconds:
        first = _video_frames_digest(corpus.root / relative)
        assert first == _video_frames_digest(corpus_again.root / relative), relative


def test_same_seed_writes_the_same_video_bytes(corpus, corpus_again):
    # x264's default CRF rate control was not repeatable; the corpus encodes at a fixed QP.
    for relative in corpus.video_seconds:
        assert _sha(corpus.root / relative) == _sha(corpus_again.root / relative), relative


def test_another_seed_gives_another_corpus(corpus, tmp_path):
    other = _build(tmp_path / "corpus", seed=1)
    ours, theirs = _files(corpus.root), _files(other.root)
    for relative in ("sample-captions/records.jsonl", "sample-shapes-a/media/img_0000.png"):
        assert _sha(ours[relative]) != _sha(theirs[relative])


# --------------------------------------------------------------------------- coverage


def test_every_task_group_is_covered(corpus):
    assert {info.task_group for info in corpus.datasets} == set(TASK_GROUPS)
    assert all(10 <= info.rows <= 60 for info in corpus.datasets)


def test_sources_yaml_is_valid_config(corpus):
    entries = yaml.safe_load(corpus.sources_yaml.read_text())
    assert [e["name"] for e in entries] == [info.name for info in corpus.datasets]
    for entry in entries:
        source = SourceConfig(**entry)
        assert (corpus.root / source.uri).is_dir()
    formats = {e["format"] for e in entries}
    assert formats == {"rzenembed", "mmeb"}


def test_classification_sets_share_label_names(corpus):
    labels = {}
    for name in ("sample-shapes-a", "sample-shapes-b", "sample-digits"):
        info = corpus.dataset(name)
        assert info.classification and info.task_group == "image_classification"
        rows = _records(corpus)[name]
        assert all(row["label"] == row["positive"]["text"] for row in rows)
        labels[name] = {row["label"] for row in rows}
    assert {"circle", "square"} <= labels["sample-shapes-a"] & labels["sample-shapes-b"]
    assert labels["sample-digits"] == {
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    }  # fmt: skip


def test_long_videos_have_contiguous_segments(corpus):
    rows = _records(corpus)["sample-long-videos"]
    for row in rows:
        segments = row["segments"]
        assert 3 <= len(segments) <= 4
        assert segments[0]["start_s"] == 0.0
        for before, after in itertools.pairwise(segments):
            assert before["end_s"] == after["start_s"]
        relative = f"sample-long-videos/{row['positive']['media'][0]['uri']}"
        assert corpus.video_seconds[relative] == pytest.approx(segments[-1]["end_s"])
        assert 8.0 <= segments[-1]["end_s"] <= 12.0
        assert row["query"]["text"] == ", then ".join(s["text"] for s in segments)


# --------------------------------------------------------------------------- rows and media


def test_every_reason_code_is_planted_where_described(corpus):
    assert set(corpus.planted.values()) == set(REASON_CODES)
    ids = {row["id"] for rows in _records(corpus).values() for row in rows}
    assert set(corpus.planted) <= ids


def test_records_parse_and_match_the_schema(corpus):
    all_ids = []
    for name, rows in _records(corpus).items():
        info = corpus.dataset(name)
        assert len(rows) == info.rows
        assert all(list(row) == RECORD_SCHEMA.names for row in rows)
        assert all(row["dataset"] == name and row["task_group"] == info.task_group for row in rows)
        assert records_table(rows).num_rows == info.rows
        all_ids.extend(row["id"] for row in rows)
    assert len(all_ids) == len(set(all_ids))


def test_media_uris_are_relative_and_exist_unless_planted(corpus):
    for name, rows in _records(corpus).items():
        folder = corpus.dataset(name).folder
        for row in rows:
            for item in (i for s in _sides(row) for i in s["media"]):
                assert item["frames"] is None and "://" not in item["uri"]
                assert not item["uri"].startswith("/")
                exists = (folder / item["uri"]).is_file()
                assert exists != (corpus.planted.get(row["id"]) in MISSING_ON_PURPOSE), row["id"]
    assert not (corpus.root / "outside.png").exists()


def test_nothing_is_written_outside_the_output_folder(corpus):
    assert [p.name for p in corpus.root.parent.iterdir()] == [corpus.root.name]


def test_mmeb_rows_have_the_vlm2vec_fields(corpus):
    info = corpus.dataset("sample-mmeb-vqa")
    rows = _jsonl(info.folder / "train.jsonl")
    assert len(rows) == info.rows
    keys = {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"}
    for row in rows:
        assert set(row) == keys
        assert row["qry"].startswith("<|image_1|> ") and row["pos_text"]
        assert (info.folder / row["qry_image_path"]).is_file()
        assert row["pos_text"] != row["neg_text"]


def test_valid_images_are_decodable_large_and_sharp(corpus):
    paths = [p for group in _valid_image_paths(corpus).values() for p in group]
    paths += _eval_image_paths(corpus)
    assert len(paths) > 300
    for path in paths:
        image = _open(path)
        assert min(image.size) >= 32, path
        assert _laplacian_variance(image) > BLUR_THRESHOLD, path


def _planted_row(corpus: SampleCorpus, reason: str) -> tuple[Path, dict]:
    (row_id,) = [row for row, why in corpus.planted.items() if why == reason]
    name = row_id.rsplit("-", 1)[0]
    (row,) = [row for row in _records(corpus)[name] if row["id"] == row_id]
    return corpus.dataset(name).folder, row


def test_planted_broken_media(corpus):
    folder, row = _planted_row(corpus, "media_undecodable")
    with pytest.raises(OSError):
        _open(_media_paths(folder, row)[0])
    folder, row = _planted_row(corpus, "image_too_small")
    assert _open(_media_paths(folder, row)[0]).size == (12, 12)
    folder, row = _planted_row(corpus, "image_blurry")
    blurry = _open(_media_paths(folder, row)[0])
    assert min(blurry.size) >= 32 and _laplacian_variance(blurry) < BLUR_THRESHOLD
    folder, row = _planted_row(corpus, "uri_escapes_root")
    assert row["positive"]["media"][0]["uri"] == "../outside.png"
    folder, row = _planted_row(corpus, "text_empty")
    assert row["query"] == {"instruction": "", "text": "", "media": []}


def _row_by_id(corpus: SampleCorpus, row_id: str) -> tuple[Path, dict]:
    name = row_id.rsplit("-", 1)[0]
    (row,) = [row for row in _records(corpus)[name] if row["id"] == row_id]
    return corpus.dataset(name).folder, row


def test_planted_duplicates_copy_their_originals(corpus):
    folder, exact = _planted_row(corpus, "duplicate_exact")
    _, original = _row_by_id(corpus, corpus.dataset("sample-captions").duplicate_of[exact["id"]])
    assert exact["query"] == original["query"] and exact["id"] != original["id"]
    exact_media, original_media = _media_paths(folder, exact), _media_paths(folder, original)
    assert [_sha(p) for p in exact_media] == [_sha(p) for p in original_media]

    folder, near = _planted_row(corpus, "duplicate_near")
    _, original = _row_by_id(corpus, corpus.dataset("sample-captions").duplicate_of[near["id"]])
    assert near["query"]["text"] != original["query"]["text"]
    assert normalise_text(near["query"]["text"]) == normalise_text(original["query"]["text"])
    near_path, original_path = _media_paths(folder, near)[0], _media_paths(folder, original)[0]
    assert _sha(near_path) != _sha(original_path)
    assert _distance(_phash(_open(near_path)), _phash(_open(original_path))) <= 1


def test_planted_copies_copy_evaluation_items(corpus):
    """One row's positive is an evaluation picture re-encoded, one row's query an evaluation
    caption re-typed: what decontamination must find."""
    info = corpus.dataset("sample-captions")
    assert set(info.copies_eval) == {r for r, why in info.planted.items() if why == "eval_overlap"}
    retrieval = next(e for e in corpus.eval_sets if e.name == "eval-image-retrieval")
    queries, candidates = _eval_tables(retrieval.folder)
    items = {q["qid"]: q["query"] for q in queries} | {c["cid"]: c["candidate"] for c in candidates}
    for row_id, item_id in info.copies_eval.items():
        _, row = _row_by_id(corpus, row_id)
        copied = items[item_id]
        if copied["media"]:
            mine = _media_paths(info.folder, row)[0]
            theirs = retrieval.folder / copied["media"][0]["uri"]
            assert _sha(mine) != _sha(theirs)
            assert _distance(_phash(_open(mine)), _phash(_open(theirs))) <= 1
        else:
            assert row["query"]["text"] != copied["text"]
            assert normalise_text(row["query"]["text"]) == normalise_text(copied["text"])


def test_no_accidental_duplicates(corpus):
    for name, paths in _valid_image_paths(corpus).items():
        if not paths:
            continue
        digests = [_sha(p) for p in paths]
        assert len(set(digests)) == len(digests), name
        hashes = [_phash(_open(p)) for p in paths]
        closest = min(_distance(a, b) for a, b in itertools.combinations(hashes, 2))
        assert closest > NEAR_DUPLICATE_RADIUS + 2, name
    for name, rows in _records(corpus).items():
        folder = corpus.dataset(name).folder
        contents = [
            (json.dumps([s["text"] for s in _sides(row)]), *map(_sha, _media_paths(folder, row)))
            for row in rows
            if row["id"] not in corpus.planted
        ]
        assert len(set(contents)) == len(contents), name
    for name in ("sample-text-pairs", "sample-captions", "sample-visdoc", "sample-video-clips"):
        rows = _records(corpus)[name]
        texts = [row["query"]["text"] for row in rows if row["id"] not in corpus.planted]
        assert len(set(texts)) == len(texts), name


def test_videos_decode_with_the_expected_length(corpus):
    assert len(corpus.video_seconds) >= 20
    for relative, seconds in corpus.video_seconds.items():
        reader = decord.VideoReader(str(corpus.root / relative))
        assert len(reader) / reader.get_avg_fps() == pytest.approx(seconds, abs=0.2), relative


def test_truncated_video_cannot_be_opened(corpus):
    # The MP4 index (moov) is written last, so the first half of the file has none.
    folder, row = _planted_row(corpus, "video_truncated")
    path = _media_paths(folder, row)[0]
    assert path.stat().st_size > 500
    with pytest.raises(RuntimeError):
        decord.VideoReader(str(path))


# --------------------------------------------------------------------------- eval sets


def _eval_tables(folder: Path) -> tuple[list[dict], list[dict]]:
    return _jsonl(folder / "queries.jsonl"), _jsonl(folder / "candidates.jsonl")


def test_eval_sets_match_their_schemas(corpus):
    categories = {}
    for info in corpus.eval_sets:
        queries, candidates = _eval_tables(info.folder)
        pa.Table.from_pylist(queries, schema=EVAL_QUERY_SCHEMA)
        pa.Table.from_pylist(candidates, schema=EVAL_CANDIDATE_SCHEMA)
        cids = {c["cid"] for c in candidates}
        for query in queries:
            assert query["relevant_ids"] and set(query["relevant_ids"]) <= cids
            assert set(query["candidate_ids"]) <= cids
            assert set(query["relevant_ids"]) <= set(query["candidate_ids"] or cids)
            assert bool(query["candidate_ids"]) == (info.ranking == "local")
        for side in [q["query"] for q in queries] + [c["candidate"] for c in candidates]:
            assert all((info.folder / item["uri"]).is_file() for item in side["media"])
        categories[info.category] = info.ranking
    assert categories["image_classification"] == "local"
    assert categories["image_retrieval"] == "local"
    assert categories["visdoc_ood"] == "global"
    assert "video_retrieval" in categories


def test_eval_is_disjoint_from_train(corpus):
    train_ids = {row["id"] for rows in _records(corpus).values() for row in rows}
    for info in corpus.eval_sets:
        queries, candidates = _eval_tables(info.folder)
        eval_ids = {q["qid"] for q in queries} | {c["cid"] for c in candidates}
        assert not train_ids & eval_ids
    train_media = [
        p
        for info in corpus.datasets
        for p in info.folder.rglob("*")
        if p.suffix in (".png", ".jpg")
    ]
    eval_media = [p for folder in corpus.eval_folders for p in folder.rglob("*") if p.is_file()]
    train_digests = {_sha(p) for p in train_media} | {
        _sha(corpus.root / v) for v in corpus.video_seconds if not v.startswith("eval/")
    }
    assert not train_digests & {_sha(p) for p in eval_media}
    train_hashes = [
        _phash(_open(p)) for group in _valid_image_paths(corpus).values() for p in group
    ]
    for path in _eval_image_paths(corpus):
        code = _phash(_open(path))
        assert min(_distance(code, other) for other in train_hashes) > NEAR_DUPLICATE_RADIUS


def test_corpus_is_small(corpus):
    total = sum(p.stat().st_size for p in _files(corpus.root).values())
    print(f"sample corpus: {total / 1e6:.2f} MB in {len(_files(corpus.root))} files")
    assert total < 8_000_000


def test_corpus_json_describes_the_build(corpus):
    described = json.loads((corpus.root / "corpus.json").read_text())
    assert described == json.loads(json.dumps(corpus.to_json()))
    assert str(corpus.root) not in (corpus.root / "corpus.json").read_text()


def test_scale_multiplies_the_image_rows_and_image_eval_queries(corpus, tmp_path):
    scaled = build_sample_corpus(tmp_path / "scaled", seed=0, scale=3)
    rows = {d.name: d.rows for d in scaled.datasets}
    base = {d.name: d.rows for d in corpus.datasets}
    copies = {d.name: len(d.copies_eval) for d in corpus.datasets}
    for name in ("sample-captions", "sample-composed", "sample-shapes-a", "sample-shapes-b"):
        assert rows[name] - copies[name] == 3 * (base[name] - copies[name])
    for name in ("sample-visdoc", "sample-long-videos", "sample-digits"):
        assert rows[name] == base[name]
    # Planted rows keep their ids and reasons: the preparation tests' expectations hold.
    assert scaled.planted == corpus.planted
    queries = {e.name: (e.queries, e.candidates) for e in scaled.eval_sets}
    assert queries["eval-image-retrieval"] == (30, 45)
    assert queries["eval-shapes-classification"] == (36, 6)
    assert queries["eval-visdoc"] == (12, 6)
    assert json.loads((scaled.root / "corpus.json").read_text())["scale"] == 3


def test_scale_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale must be a positive integer, got 0"):
        build_sample_corpus(tmp_path / "none", scale=0)
    assert not (tmp_path / "none").exists()
