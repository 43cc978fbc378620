"""MMEB-V2 from its release layout: the table, the importer, the scores, honest selection."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rzenembed.config import TrackingConfig, load_config
from rzenembed.evaluation import evaluate, write_report
from rzenembed.evaluation.benchmark import benchmark_dataset, mmeb_v2
from rzenembed.evaluation.evalset import discover, load_eval_folder
from rzenembed.evaluation.leaderboard import aggregate, leaderboard_scores, main_scores
from rzenembed.evaluation.release import import_mmeb_v2, suite_skipped
from rzenembed.evaluation.release_fixture import (
    BREAKFAST_LABELS,
    COLORS,
    NAMES,
    SHARD,
    build_release_fixture,
)
from rzenembed.evaluation.report import build_report, levels
from rzenembed.evaluation.runner import DatasetScore, score_dataset
from rzenembed.tracking import EVAL_DIGEST_TAG, Tracker

WRITTEN = {
    "ImageNet-1K",
    "OK-VQA",
    "MSCOCO_t2i",
    "MSCOCO",
    "Breakfast",
    "NExTQA",
    "MSR-VTT",
    "QVHighlight",
    "MVBench",
    "MomentSeeker",
    "ViDoRe_arxivqa",
    "ViDoRe_esg_reports_human_labeled_v2",
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = build_release_fixture(tmp_path_factory.mktemp("mmeb") / "release", broken=True)
    out = tmp_path_factory.mktemp("sets")
    return root, import_mmeb_v2(root, out, release="fixture-1")


def one(imported, name):
    (dataset,) = load_eval_folder(imported[1].out / name)
    return dataset


def texts(dataset, ids):
    by_id = {c["cid"]: c["candidate"] for c in dataset.candidates}
    return [by_id[i]["text"] or by_id[i]["media"][0]["uri"] for i in ids]


# --------------------------------------------------------------------------- the table


def test_the_table_has_the_78_datasets_in_their_categories():
    table = mmeb_v2()
    assert Counter(d.modality for d in table) == {"image": 36, "video": 18, "visdoc": 24}
    sizes = Counter(d.category for d in table)
    assert [
        sizes[c]
        for c in ("image_classification", "image_qa", "image_retrieval", "visual_grounding")
    ] == [10, 10, 12, 4]
    assert [
        sizes[c]
        for c in ("video_classification", "video_qa", "video_retrieval", "video_moment_retrieval")
    ] == [5, 5, 5, 3]
    assert [
        sizes[c] for c in ("visdoc_vidore_v1", "visdoc_vidore_v2", "visdoc_visrag", "visdoc_ood")
    ] == [10, 4, 6, 4]
    assert {d.metric for d in table if d.modality == "visdoc"} == {"ndcg_linear@5"}
    assert {d.metric for d in table if d.modality != "visdoc"} == {"hit@1"}
    # Image rows carry their own instructions; every other dataset has the benchmark's.
    assert all(not d.query_instruction for d in table if d.modality == "image")
    assert all(d.query_instruction for d in table if d.modality != "image")
    breakfast = next(d for d in table if d.dataset == "Breakfast")
    assert breakfast.query_instruction.endswith("in the video. ")  # the trailing space kept
    assert breakfast.labels == 10 and breakfast.candidates == "global"


# --------------------------------------------------------------------------- the importer


def test_every_complete_dataset_is_written_and_the_broken_ones_are_skipped(imported):
    _, result = imported
    assert set(result.written) == WRITTEN
    incomplete = {k: v for k, v in result.skipped.items() if v["kind"] == "incomplete"}
    assert incomplete["DiDeMo"]["counts"] == {"missing_frames": 1}
    # The path looked for, from the release root, so a person can check the folder.
    assert "(e.g. video-tasks/frames/video_ret/DiDeMo/didemo_1/)" in incomplete["DiDeMo"]["reason"]
    assert incomplete["ViDoRe_docvqa"]["counts"] == {"qrel_to_absent_corpus_id": 1}
    assert "q1->999" in incomplete["ViDoRe_docvqa"]["reason"]
    assert set(incomplete) == {"DiDeMo", "ViDoRe_docvqa"}
    assert len(result.skipped) == 78 - len(WRITTEN)
    assert not (result.out / "DiDeMo").exists() and not (result.out / "ViDoRe_docvqa").exists()
    suite = json.loads((result.out / "suite.json").read_text())
    assert suite["release"] == "fixture-1" and suite["frames"] == 8
    assert suite_skipped([result.out / "MSR-VTT"]) == suite["skipped"]


# Where the reference loaders (TIGER-AI-Lab/VLM2Vec at 6e1e1d4, src/data/eval_dataset/)
# find each video and visual-document dataset's media, transcribed from their code: a row
# of the dataset's annotations, and the path the loader builds from it under the dataset's
# frame_root / image_root. Kept apart from mmeb_v2.csv so that a change to either shows.
def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _visrag(name):
    base, ext = os.path.splitext(name)
    return base[:50] + "_" + hashlib.md5(name.encode("utf-8")).hexdigest()[:8] + ext


_VIDORE = ({"corpus-id": "3041"}, lambda r: f"{r['corpus-id']}.png")  # vidore_dataset.py
_VISRAG = ({"corpus-id": "x" * 60 + ".v1.png"}, lambda r: _visrag(r["corpus-id"]))
REFERENCE_MEDIA = {
    # video_classification_datasets.py, ssv2_dataset.py: os.path.join(frame_root, video_id)
    **dict.fromkeys(
        ["K700", "HMDB51", "UCF101", "Breakfast", "SmthSmthV2"],
        ({"video_id": "-abc_000010_000020"}, lambda r: r["video_id"]),
    ),
    # mvbench_dataset.py: f'{frame_root}/{subset}/{video_filename}', the extension kept
    "MVBench": (
        {"subset": "action_sequence", "video": "ZS9XR.mp4"},
        lambda r: f"{r['subset']}/{r['video']}",
    ),
    "Video-MME": ({"videoID": "fFjv93ACGo8"}, lambda r: r["videoID"]),  # f'{frame_root}/{id}'
    "NExTQA": ({"video": "4010069381"}, lambda r: r["video"]),
    "EgoSchema": ({"video_idx": "001934bb-81bd"}, lambda r: r["video_idx"]),
    "ActivityNetQA": ({"video_name": "0a1b2c"}, lambda r: f"v_{r['video_name']}"),
    # didemo_dataset.py: splitext(basename(video)); the other retrieval sets: the id column
    "DiDeMo": ({"video": "test/1234@N00_5_x.mp4"}, lambda r: _stem(r["video"])),
    "MSR-VTT": (
        {"video_id": "video7020", "video": "TestVideo/video7020.mp4"},
        lambda r: r["video_id"],
    ),
    "MSVD": ({"video_id": "-4wsuPCjDBc_5_15"}, lambda r: r["video_id"]),
    "VATEX": ({"videoID": "G_QnnS8Hvng_000004_000014"}, lambda r: r["videoID"]),
    "YouCook2": ({"id": "xHr8X2Wpmno_0", "video_path": "val/xHr8X2Wpmno.mp4"}, lambda r: r["id"]),
    # moment_retrieval_datasets.py: the folder holding query/ and the clip folders
    **dict.fromkeys(
        ["QVHighlight", "Charades-STA"],
        ({"video_path": "videos/3MSZA.mp4"}, lambda r: _stem(r["video_path"])),
    ),
    # momentseeker_dataset.py: clips and video queries under video_frames/, flattened
    "MomentSeeker": (
        {"output_path": "movie101/77/10_20.mp4"},
        lambda r: os.path.join("video_frames", r["output_path"].replace("/", "_").split(".mp4")[0]),
    ),
    **{item.dataset: _VIDORE for item in mmeb_v2() if item.parser == "visdoc_vidore"},
    **{item.dataset: _VISRAG for item in mmeb_v2() if item.parser == "visdoc_visrag"},
}


def test_every_video_and_document_dataset_reads_media_where_the_reference_looks():
    checked = {item.dataset for item in mmeb_v2() if item.modality in ("video", "visdoc")}
    assert set(REFERENCE_MEDIA) == checked and len(checked) == 42
    for name, (row, reference) in REFERENCE_MEDIA.items():
        assert benchmark_dataset(name).media_of(row) == reference(row), name
    # MomentSeeker's image queries: os.path.join(frame_root, "", f"query_{input_frames}")
    row = {"input_frames": "images/q_7.jpg"}
    expected = os.path.join("", f"query_{row['input_frames']}")
    assert benchmark_dataset("MomentSeeker").media_of(row, rule=1) == expected
    with pytest.raises(KeyError, match="video_id"):
        benchmark_dataset("K700").media_of({"video": "x.mp4"})


def test_mvbench_and_momentseeker_are_read_from_the_release_as_the_reference_lays_it(imported):
    """The fixture release holds them where the reference looks; each query's media is
    found there (so both are written and scored, not skipped)."""
    root = imported[0].resolve()
    mvbench = one(imported, "MVBench")
    frame_root = root / benchmark_dataset("MVBench").media
    notes = root / "annotations/VLM2Vec/MVBench"
    rows = [
        {**row, "subset": task.name}
        for task in sorted(notes.iterdir())
        for row in pq.read_table(next(task.glob("train-*.parquet"))).to_pylist()
    ]
    assert len(rows) == len(mvbench.queries) == 3
    for row, query in zip(rows, mvbench.queries, strict=True):
        (frames,) = query["query"]["media"]
        expected = f"{frame_root}/{row['subset']}/{row['video']}"  # mvbench_dataset.py
        assert expected.endswith(".mp4") and os.path.isdir(expected)
        assert os.path.join(mvbench.media_root, frames["uri"]) == expected
    seeker = one(imported, "MomentSeeker")
    frame_root = str(root / benchmark_dataset("MomentSeeker").media)
    table = root / "annotations/VLM2Vec/MomentSeeker/data" / SHARD
    rows = pq.read_table(table).to_pylist()
    kinds = []
    for row, query in zip(rows, seeker.queries, strict=True):
        given = row["input_frames"]
        if given.endswith(".mp4"):
            name = given.split(".mp4")[0].replace("/", "_")
            expected = [os.path.join(frame_root, "video_frames", name)]
        elif given.endswith(".jpg"):
            expected = [os.path.join(frame_root, "", f"query_{given}")]
        else:
            expected = []
        kinds.append(query["query"]["media"][0]["kind"] if expected else "text")
        found = [os.path.join(seeker.media_root, m["uri"]) for m in query["query"]["media"]]
        assert found == expected and all(os.path.exists(p) for p in found)
        clips = [e["output_path"] for e in row["positive_frames"] + row["negative_frames"]]
        folders = [
            os.path.join(frame_root, "video_frames", c.replace("/", "_").split(".mp4")[0])
            for c in clips
        ]
        assert [
            os.path.join(seeker.media_root, t) for t in texts(seeker, query["candidate_ids"])
        ] == folders
        assert len(query["relevant_ids"]) == len(row["positive_frames"])
    assert kinds == ["text", "image", "frames"]


def test_image_classification_ranks_the_rows_labels_first_listed_relevant(imported):
    d = one(imported, "ImageNet-1K")
    q0 = d.queries[0]
    assert q0["query"]["instruction"] == "Represent the given image for classification"
    assert q0["query"]["media"][0]["uri"] == "ImageNet-1K/0.png"
    assert texts(d, q0["candidate_ids"]) == ["red", "green", "blue", "yellow"]
    assert texts(d, q0["relevant_ids"]) == ["red"]
    assert texts(d, d.queries[1]["relevant_ids"]) == ["green"]
    assert len(d.candidates) == 4  # one label list, embedded once
    assert d.meta["release"] == "fixture-1" and len(d.meta["annotations_digest"]) == 64


def test_text_to_image_candidates_are_named_by_image_path(imported):
    d = one(imported, "MSCOCO_t2i")
    q0 = d.queries[0]
    assert q0["query"]["media"] == [] and q0["query"]["text"] == "a white square on cyan"
    assert texts(d, q0["relevant_ids"]) == ["MSCOCO_t2i/0.png"]
    target = d.candidates[0]["candidate"]
    assert target["instruction"] == "Represent the given image."


def test_video_classification_ranks_the_whole_label_list(imported):
    d = one(imported, "Breakfast")
    assert [c["candidate"]["text"] for c in d.candidates] == BREAKFAST_LABELS
    assert all(q["candidate_ids"] == [] for q in d.queries) and d.ranking == "global"
    q1 = d.queries[1]
    assert texts(d, q1["relevant_ids"]) == ["coffee"]
    assert q1["query"]["media"][0] == {
        **q1["query"]["media"][0],
        "kind": "frames",
        "uri": "P01_cam01_coffee",
    }
    assert q1["query"]["instruction"].startswith("Recognize the breakfast type")


def test_the_larger_release_holds_only_new_looks_and_sample_world_rows(tmp_path):
    """30 queries per dataset (the demo's size): every dataset imports whole with 30
    queries, none of the small release's flat-colour rows (they would be hubs), no query
    text twice where the text names its target, and the sample-world rows (motions, pages,
    moments named in its words) in the benchmark's instructions."""
    small = import_mmeb_v2(build_release_fixture(tmp_path / "small"), tmp_path / "small-sets")
    large = import_mmeb_v2(
        build_release_fixture(tmp_path / "large", queries=30), tmp_path / "large-sets"
    )
    assert not large.skipped or all(v.get("kind") == "absent" for v in large.skipped.values())
    by_name = {d.name: d for folder in discover(large.out) for d in load_eval_folder(folder)}
    before = {d.name: d for folder in discover(small.out) for d in load_eval_folder(folder)}
    # The two reference-layout sets are in the small release only (they hold its looks).
    assert set(by_name) == set(before) - {"MVBench", "MomentSeeker"} and len(by_name) == 10
    for name, dataset in by_name.items():
        assert len(dataset.queries) == 30, name
    for name in ("MSCOCO_t2i", "MSR-VTT", "ViDoRe_arxivqa"):
        questions = [q["query"]["text"] for q in by_name[name].queries]
        assert len(set(questions)) == 30, name
        assert not set(questions) & {q["query"]["text"] for q in before[name].queries}, name
    assert all(" moves " in q["query"]["text"] for q in by_name["MSR-VTT"].queries)
    pages = by_name["ViDoRe_esg_reports_human_labeled_v2"]
    assert all(q["query"]["text"].startswith("How many ") for q in pages.queries)
    assert len(pages.candidates) == 30 and pages.ranking == "global"  # no flat pages
    moments = by_name["QVHighlight"]
    assert moments.queries[0]["query"]["text"].endswith("a yellow diamond")  # one local pool each
    assert len(moments.candidates) == 4 * 30  # each query's positive and three negatives
    assert len(by_name["MSR-VTT"].candidates) == 30 and by_name["MSR-VTT"].ranking == "global"
    with pytest.raises(ValueError, match="at least 3"):
        build_release_fixture(tmp_path / "none", queries=2)
    with pytest.raises(ValueError, match="at most 30"):
        build_release_fixture(tmp_path / "many", queries=31)


def test_a_short_label_list_is_reported_not_scored(tmp_path):
    root = build_release_fixture(tmp_path / "release")
    (root / "annotations/VLM2Vec/Breakfast/labels.txt").unlink()  # 3 labels from the rows
    result = import_mmeb_v2(root, tmp_path / "sets", datasets=["Breakfast"])
    assert result.skipped["Breakfast"]["counts"] == {"label_list": 1}
    assert "3 labels, the benchmark ranks 10" in result.skipped["Breakfast"]["reason"]


def test_video_qa_lists_the_options_and_the_answer(imported):
    d = one(imported, "NExTQA")
    q0 = d.queries[0]
    assert q0["query"]["text"] == (
        "what colour is the scene\nOptions:\n(A) cyan\n(B) pink\n(C) brown\n(D) gray\n(E) red"
    )
    assert q0["query"]["instruction"].startswith("Given a video and a question, select")
    assert texts(d, q0["candidate_ids"]) == ["cyan", "pink", "brown", "gray", "red"]
    assert texts(d, q0["relevant_ids"]) == ["cyan"]


def test_video_retrieval_is_text_to_every_video(imported):
    d = one(imported, "MSR-VTT")
    assert d.ranking == "global" and len(d.candidates) == 3
    q2 = d.queries[2]
    assert q2["query"]["media"] == []
    assert q2["query"]["text"] == "a white square on blue"
    assert texts(d, q2["relevant_ids"]) == ["video7002"]
    assert d.candidates[0]["candidate"]["instruction"] == (
        "Understand the content of the provided video."
    )


def test_moment_retrieval_ranks_the_videos_clips(imported):
    d = one(imported, "QVHighlight")
    q0 = d.queries[0]
    assert q0["query"]["media"][0]["uri"] == "clip_0/query"
    assert texts(d, q0["candidate_ids"]) == [
        "clip_0/negative_0",
        "clip_0/negative_1",
        "clip_0/negative_2",
        "clip_0/positive_0",
    ]
    assert texts(d, q0["relevant_ids"]) == ["clip_0/positive_0"]


def test_visual_documents_have_graded_qrels_over_the_whole_corpus(imported):
    d = one(imported, "ViDoRe_esg_reports_human_labeled_v2")
    q0 = d.queries[0]
    assert q0["candidate_ids"] == [] and len(d.candidates) == 4
    assert texts(d, q0["relevant_ids"]) == ["0.png", "1.png"]  # the score-0 qrel is dropped
    assert q0["relevance"] == [2.0, 1.0]
    assert d.media_root.endswith("visdoc-tasks/esg_reports_human_labeled_v2")
    # Pages only inside the corpus Parquet are written beside the set.
    arxiv = one(imported, "ViDoRe_arxivqa")
    assert arxiv.media_root == str(imported[1].out / "ViDoRe_arxivqa" / "pages")
    assert sorted(p.name for p in (imported[1].out / "ViDoRe_arxivqa/pages").iterdir()) == [
        "0.png",
        "1.png",
        "2.png",
        "3.png",
    ]


def test_graded_ndcg_at_5_matches_a_hand_computation(imported):
    d = one(imported, "ViDoRe_esg_reports_human_labeled_v2")
    # q0 ranks pages 1, 0, 2, 3 (relevance 1, 2, 0, 0); q1 and q2 rank their grade-2 page first.
    candidates = torch.eye(4)
    queries = torch.stack(
        [
            torch.tensor([0.9, 1.0, 0.1, 0.0]),
            torch.tensor([0.0, 1.0, 0.9, 0.0]),
            torch.tensor([0.0, 0.0, 1.0, 0.9]),
        ]
    )
    rows = score_dataset(queries, candidates, d)
    dcg = 1 / math.log2(2) + 2 / math.log2(3)
    ideal = 2 / math.log2(2) + 1 / math.log2(3)
    assert rows[0]["ndcg@5"] == pytest.approx(dcg / ideal)
    assert rows[1]["ndcg@5"] == pytest.approx(1.0) and rows[0]["hit@1"] == 1.0


class ColourEncoder:
    """One-hot of the named colour an input shows (its first picture's corner pixel) or
    names (its text); inputs with neither get a flat vector, so they tie."""

    def encode(self, items, batch_size=16):
        rows = []
        for item in items:
            pictures = item.video or item.images
            vector = np.full(len(NAMES), 0.01)
            if pictures:
                pixel = np.array(pictures[0].convert("RGB").getpixel((0, 0)), dtype=float)
                nearest = min(NAMES, key=lambda n: np.sum((np.array(COLORS[n]) - pixel) ** 2))
                vector[NAMES.index(nearest)] = 1
            else:
                words = [w.strip('?.,"') for w in item.text.split()]
                named = [w for w in words if w in COLORS]
                if named:
                    vector[NAMES.index(named[-1])] = 1
            rows.append(torch.tensor(vector, dtype=torch.float32))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def test_an_encoder_that_sees_the_colours_scores_every_set_as_expected(imported, tmp_path):
    _, result = imported
    scores = {s.name: s for s in evaluate(ColourEncoder(), result.out)}
    assert set(scores) == WRITTEN
    for name in WRITTEN - {"Breakfast"}:
        assert scores[name].metrics["hit@1"] == 1.0, name
    # Labels name no colour: all ten tie, so the exact Hit@1 is chance; the reference's
    # first-listed convention gives the first label (cereals) to every query: 1 of 3 right.
    assert scores["Breakfast"].score == pytest.approx(0.1)
    assert scores["Breakfast"].first_listed == pytest.approx(1 / 3)
    assert {s.frames for s in scores.values()} == {8}
    assert scores["ViDoRe_arxivqa"].provenance["release"] == "fixture-1"
    paths = write_report(
        list(scores.values()), tmp_path, {"path": "colours"}, skipped=suite_skipped([result.out])
    )
    markdown = paths["markdown"].read_text()
    looked_for = "video-tasks/frames/video_ret/DiDeMo/didemo_1/"
    assert f"| DiDeMo | missing_frames: 1 (e.g. {looked_for}) |" in markdown
    assert "Not in the imported release (64)" in markdown
    low, high = json.loads(paths["json"].read_text())["intervals"]["dataset:Breakfast"]
    assert low - 1e-9 <= 0.1 <= high + 1e-9  # every query scores 1/10 (ties): a point
    interval = f"[{100 * low:.1f}, {100 * high:.1f}]"
    assert (
        f"| Breakfast | Video CLS | global | 3 | 10 | 8 | hit@1 | **10.0** | {interval} | 33.3 |"
        in markdown
    )
    board = json.loads(paths["leaderboard"].read_text())
    # Each query's grade-2 page comes first; its grade-1 page ties with the two others.
    tied = (1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)) / 3
    expected = (2 + tied) / (2 + 1 / math.log2(3))
    assert board["metrics"]["visdoc"]["ViDoRe_arxivqa"]["ndcg_linear@5"] == pytest.approx(expected)
    assert board["metrics"]["video"]["Breakfast"]["num_data"] == 3
    assert "DiDeMo" in board["metadata"]["skipped"]


# --------------------------------------------------------------------------- aggregation


def test_aggregation_matches_a_hand_computation_on_a_score_file(tmp_path):
    scores = {
        "metadata": {"model_name": "hand"},
        "metrics": {
            "image": {
                "ImageNet-1K": {"hit@1": 0.8},
                "N24News": {"hit@1": 0.6},
                "OK-VQA": {"hit@1": 0.5},
            },
            "video": {"MSR-VTT": {"hit@1": 0.3}},
            "visdoc": {
                "ViDoRe_arxivqa": {"ndcg_linear@5": 0.9, "hit@1": 0.1},
                "VisRAG_ChartQA": {"ndcg_linear@5": 0.7},
            },
        },
    }
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(scores))
    got = aggregate(main_scores(path))
    assert got["Image/CLS"] == pytest.approx(0.7) and got["Image/QA"] == pytest.approx(0.5)
    assert got["Image"] == pytest.approx(1.9 / 3) and got["Video"] == pytest.approx(0.3)
    assert got["VisDoc/ViDoRe-V1"] == pytest.approx(0.9) and got["VisDoc"] == pytest.approx(0.8)
    # Overall is the mean over the six datasets, not over the three modalities (0.578).
    assert got["All"] == pytest.approx(3.8 / 6)


def _score(name, category, meta, column, metric, value):
    return DatasetScore(
        name=name,
        category=category,
        meta=meta,
        column=column,
        ranking="local",
        queries=10,
        candidates=5,
        metric=metric,
        score=value,
        metrics={metric: value, "hit@1": value, "mrr": value},
        digest=name,
    )


def test_leaderboard_json_round_trips_to_the_reports_levels():
    scores = [
        _score("ImageNet-1K", "image_classification", "Image", "CLS", "hit@1", 0.7),
        _score("MSCOCO", "visual_grounding", "Image", "GD", "hit@1", 0.4),
        _score("MSR-VTT", "video_retrieval", "Video", "RET", "hit@1", 0.25),
        _score("ViDoRe_arxivqa", "visdoc_vidore_v1", "VisDoc", "ViDoRe-V1", "ndcg@5", 0.6),
        _score("my-own-set", "image_retrieval", "Image", "RET", "hit@1", 0.9),  # not MMEB-V2
    ]
    report = build_report(scores, {"path": "m"})
    board = leaderboard_scores(report, "m")
    assert "my-own-set" not in json.dumps(board)
    assert board["metrics"]["visdoc"]["ViDoRe_arxivqa"]["ndcg_linear@5"] == 0.6
    back = aggregate(main_scores(json.loads(json.dumps(board))))
    mine = build_report(scores[:4], {"path": "m"})
    assert back == pytest.approx(
        {k: v for k, v in levels(mine).items() if not k.startswith("dataset:")}
    )


# --------------------------------------------------------------------------- honest selection


def test_greedy_souping_refuses_to_select_on_a_reported_set(tmp_path):
    with pytest.raises(ValueError, match="name the validation sets"):
        load_config("configs/tiny.yaml", ["soup.method=greedy"])
    with pytest.raises(ValueError, match=r"also in eval\.sets"):
        load_config(
            "configs/tiny.yaml",
            ["soup.method=greedy", "soup.validation_sets=['./runs/sample-corpus/eval/']"],
        )


def test_greedy_souping_refuses_a_copy_of_a_reported_set(imported, tmp_path):
    from tasks.model import validation_set_paths

    sets = imported[1].out
    copy = tmp_path / "validation"
    shutil.copytree(sets / "MSR-VTT", copy / "MSR-VTT")
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"eval.sets=['{sets / 'MSR-VTT'}']",
            "soup.method=greedy",
            f"soup.validation_sets=['{copy}']",
        ],
    )
    with pytest.raises(ValueError, match="same content as the reported set"):
        validation_set_paths(cfg, None)
    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"eval.sets=['{sets / 'MSR-VTT'}']",
            "soup.method=greedy",
            f"soup.validation_sets=['{sets / 'NExTQA'}']",
        ],
    )
    assert validation_set_paths(cfg, None) == [str(sets / "NExTQA")]


def test_champion_gating_rescores_or_refuses_when_the_evaluation_sets_changed(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="t"))
    name = tracker.cfg.registered_model
    tracker.client.create_registered_model(name)
    versions = [
        str(tracker.client.create_model_version(name, source=str(tmp_path)).version)
        for _ in range(3)
    ]
    first = tracker.promote_if_better(versions[0], "All", 0.5, evaluation_digest="sets-1")
    assert first["promoted"]
    # v2 scored on other sets: without re-scoring the champion stays, and says why.
    refused = tracker.promote_if_better(versions[1], "All", 0.6, evaluation_digest="sets-2")
    assert not refused["promoted"] and "other evaluation sets" in refused["refused"]
    assert str(tracker.champion().version) == versions[0]
    # With re-scoring, the champion's score on the new sets is what v2 must beat.
    calls = []

    def rescore(version):
        calls.append(str(version.version))
        return 0.4

    moved = tracker.promote_if_better(
        versions[1], "All", 0.6, evaluation_digest="sets-2", rescore=rescore
    )
    assert calls == [versions[0]] and moved["champion_rescored"] and moved["promoted"]
    assert moved["champion_score"] == 0.4
    champion = tracker.client.get_model_version(name, versions[0])
    assert champion.tags[EVAL_DIGEST_TAG] == "sets-2"
    # Same sets as the champion: compared directly, no re-scoring.
    kept = tracker.promote_if_better(
        versions[2], "All", 0.55, evaluation_digest="sets-2", rescore=rescore
    )
    assert calls == [versions[0]] and not kept["promoted"] and kept["champion_score"] == 0.6


def test_the_import_command_names_written_and_skipped_datasets(tmp_path, capsys):
    from rzenembed.cli import main

    assert main(["mmeb-v2-fixture", str(tmp_path / "release"), "--broken"]) == 0
    code = main(
        [
            "import-mmeb-v2",
            str(tmp_path / "release"),
            str(tmp_path / "sets"),
            "--release",
            "v-test",
            "--dataset",
            "MSR-VTT",
            "--dataset",
            "DiDeMo",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "MSR-VTT: 3 queries, 3 candidates" in out
    assert (
        "SKIPPED DiDeMo: missing_frames: 1 (e.g. video-tasks/frames/video_ret/DiDeMo/didemo_1/)"
        in out
    )
    assert "1 sets written" in out and "1 skipped" in out
    assert json.loads((tmp_path / "sets/MSR-VTT/evalset.json").read_text())["release"] == "v-test"


# --------------------------------------------------------------------------- the other parsers


def _release_with(tmp_path, dataset, rows, folders, relative="data", image=None):
    """A release holding one dataset: its rows and the frame folders they name."""
    from rzenembed.evaluation.benchmark import benchmark_dataset
    from rzenembed.evaluation.release_fixture import _frames, _save, _table, picture

    root = tmp_path / "release"
    item = benchmark_dataset(dataset)
    _table(root, item.annotations, f"{relative}/{item.split}-00000-of-00001.parquet", rows)
    for folder in folders:
        _frames(root / item.media / folder, "red")
    if image:
        _save(picture("blue"), root / item.media / image)
    result = import_mmeb_v2(root, tmp_path / "sets", datasets=[dataset])
    assert result.skipped == {}, result.skipped
    (loaded,) = load_eval_folder(tmp_path / "sets" / dataset)
    return loaded


def test_mvbench_reads_every_task_folder_and_letters_its_options(tmp_path):
    rows = [
        {
            "question": "what moves",
            "video": "clip.mp4",
            "candidates": ["a cat", "a dog"],
            "answer": "a dog",
        }
    ]
    d = _release_with(tmp_path, "MVBench", rows, ["action_sequence/clip.mp4"], "action_sequence")
    q = d.queries[0]
    assert q["query"]["text"] == "what moves\nOptions:\n(A) a cat\n(B) a dog"
    assert texts(d, q["candidate_ids"]) == ["(A) a cat", "(B) a dog"]
    assert texts(d, q["relevant_ids"]) == ["(B) a dog"]
    assert q["query"]["media"][0]["uri"] == "action_sequence/clip.mp4"


def test_video_mme_and_egoschema_cut_option_letters(tmp_path):
    rows = [
        {
            "question": "who?",
            "videoID": "v1",
            "options": ["A. a man.", "B. a woman"],
            "answer": "B",
            "question_id": "1",
        }
    ]
    d = _release_with(tmp_path / "mme", "Video-MME", rows, ["v1"])
    q = d.queries[0]
    assert q["query"]["text"] == "who?\nA. a man.\nB. a woman"
    assert texts(d, q["candidate_ids"]) == ["a man", "a woman"]
    assert texts(d, q["relevant_ids"]) == ["a woman"]
    rows = [
        {
            "question": "what is c doing?",
            "video_idx": "e1",
            "answer": 0,
            "option": ["A. cooking.", "B. reading"],
            "question_idx": "1",
        }
    ]
    d = _release_with(tmp_path / "ego", "EgoSchema", rows, ["e1"], "Subset")
    q = d.queries[0]
    assert q["query"]["text"] == "what is c doing?A. cooking. B. reading"
    assert texts(d, q["relevant_ids"]) == ["cooking"]


def test_activitynet_qa_is_yes_or_no_and_smthsmth_keeps_its_first_rows(tmp_path):
    rows = [{"video_name": "abc", "question": "is it raining", "answer": "no", "question_id": "1"}]
    d = _release_with(tmp_path / "anet", "ActivityNetQA", rows, ["v_abc"])
    q = d.queries[0]
    assert q["query"]["text"] == "is it raining? (A) yes; (B) no."
    assert texts(d, q["candidate_ids"]) == ["yes", "no"] and texts(d, q["relevant_ids"]) == ["no"]
    rows = [
        {"video_id": str(i), "pos_text": f"move {i}", "neg_text": ["pick", f"move {i}"]}
        for i in range(1003)
    ]
    d = _release_with(tmp_path / "ssv2", "SmthSmthV2", rows, [str(i) for i in range(1000)])
    assert len(d.queries) == 1000  # the first 1,000 rows, as the benchmark
    assert texts(d, d.queries[5]["candidate_ids"]) == ["move 5", "pick"]


def test_momentseeker_queries_follow_their_input_kind(tmp_path):
    clip = {"output_path": "vid/0_5.mp4"}
    rows = [
        {
            "query": "jump",
            "positive_frames": [clip],
            "negative_frames": [{"output_path": "vid/5_9.mp4"}],
            "input_frames": "",
        },
        {
            "query": "land",
            "positive_frames": [clip],
            "negative_frames": [],
            "input_frames": "q/1.jpg",
        },
        {
            "query": "run",
            "positive_frames": [clip],
            "negative_frames": [],
            "input_frames": "vid/0_5.mp4",
        },
    ]
    folders = ["video_frames/vid_0_5", "video_frames/vid_5_9"]
    d = _release_with(tmp_path, "MomentSeeker", rows, folders, image="query_q/1.jpg")
    text_only, with_image, with_clip = d.queries
    assert text_only["query"]["media"] == []
    assert text_only["query"]["instruction"] == "Find the clip that corresponds to the given text:"
    assert texts(d, text_only["candidate_ids"]) == folders
    assert texts(d, text_only["relevant_ids"]) == folders[:1]
    assert with_image["query"]["media"][0] == {
        **with_image["query"]["media"][0],
        "kind": "image",
        "uri": "query_q/1.jpg",
    }
    assert with_clip["query"]["media"][0]["uri"] == "video_frames/vid_0_5"


def test_visrag_pages_are_named_by_the_benchmarks_hash(tmp_path):
    import hashlib

    from rzenembed.evaluation.release_fixture import _save, _table, picture

    root = tmp_path / "release"
    name = "a-very-long-page-name-that-goes-on-and-on-past-fifty-chars.png"
    base, ext = os.path.splitext(name)  # visrag_dataset.py: the stem is cut, not the name
    page = f"{base[:50]}_{hashlib.md5(name.encode()).hexdigest()[:8]}{ext}"
    _save(picture("red"), root / "visdoc-tasks/VisRAG_ChartQA" / page)
    repo = "openbmb/VisRAG-Ret-Test-ChartQA"
    _table(root, repo, "corpus/train-00000-of-00001.parquet", [{"corpus-id": name, "image": None}])
    _table(root, repo, "queries/train-00000-of-00001.parquet", [{"query-id": "1", "query": "q"}])
    _table(
        root,
        repo,
        "qrels/train-00000-of-00001.parquet",
        [{"query-id": "1", "corpus-id": name, "score": 1}],
    )
    result = import_mmeb_v2(root, tmp_path / "sets", datasets=["VisRAG_ChartQA"])
    assert result.skipped == {}
    (d,) = load_eval_folder(tmp_path / "sets/VisRAG_ChartQA")
    assert texts(d, d.queries[0]["relevant_ids"]) == [page]
