"""Scoring evaluation sets (local and global), the candidate cache, checks, reports, MMEB."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from rzenembed.evaluation import EvalSetError, evaluate, import_mmeb_eval, write_report
from rzenembed.evaluation.evalset import load_eval_folder
from rzenembed.evaluation.report import build_report


class TextKeyEncoder:
    """Embeds an input by looking its text up in a table, so rankings have known answers;
    counts what it embeds."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.encoded: list[str] = []

    def encode(self, items, batch_size=16):
        self.encoded += [item.text for item in items]
        rows = [torch.tensor(self.table[item.text], dtype=torch.float32) for item in items]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def side(text):
    return {"instruction": "", "text": text, "media": []}


def write_set(folder, queries, candidates, category="image_retrieval", dataset="d"):
    folder.mkdir(parents=True)
    rows = [
        {"qid": q, "dataset": dataset, "category": category, "query": side(q),
         "candidate_ids": listed, "relevant_ids": relevant}
        for q, listed, relevant in queries
    ]  # fmt: skip
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "candidates.jsonl").write_text(
        "".join(
            json.dumps({"cid": c, "dataset": dataset, "candidate": side(c)}) + "\n"
            for c in candidates
        )
    )
    return folder


TABLE = {"q1": [1, 0], "q2": [0, 1], "a": [1, 0.1], "b": [0.1, 1], "c": [0, 1]}


def test_local_lists_restrict_the_ranking(tmp_path):
    folder = write_set(tmp_path / "s", [("q1", ["a", "b"], ["a"]), ("q2", ["a", "b"], ["a"])],
                       ["a", "b", "c"])  # fmt: skip
    (score,) = evaluate(TextKeyEncoder(TABLE), folder)
    assert (score.queries, score.ranking, score.metric) == (2, "local", "hit@1")
    assert score.score == 0.5  # q1 hits; q2's list has b closer than the relevant a
    assert score.metrics["mrr"] == pytest.approx((1 + 1 / 2) / 2)


def test_empty_candidate_lists_rank_against_the_whole_dataset(tmp_path):
    folder = write_set(tmp_path / "s", [("q1", [], ["a"]), ("q2", [], ["b"])], ["a", "b", "c"],
                       category="visdoc_ood")  # fmt: skip
    (score,) = evaluate(TextKeyEncoder(TABLE), folder)
    # q2's nearest over the whole corpus is c, not the relevant b (rank 2)
    assert (score.ranking, score.metric) == ("global", "ndcg@5")
    assert score.metrics["hit@1"] == 0.5
    assert score.metrics["mrr"] == pytest.approx(0.75)


def test_candidates_are_embedded_once_per_model_digest_and_shared_between_datasets(tmp_path):
    folder = write_set(tmp_path / "s", [("q1", [], ["a"])], ["a", "b", "c"])
    encoder = TextKeyEncoder(TABLE)
    cache = tmp_path / "cache"
    first = evaluate(encoder, folder, model_digest="m1", cache_dir=cache)
    assert encoder.encoded == ["a", "b", "c", "q1"]
    resumed = []
    again = evaluate(
        encoder,
        folder,
        model_digest="m1",
        cache_dir=cache,
        on_dataset=lambda score, was_stored: resumed.append(was_stored),
    )
    assert encoder.encoded[4:] == [] and resumed == [True]  # the finished score is reused
    assert again[0].metrics == first[0].metrics
    # Another dataset (other name, other queries) over the same corpus: only its queries.
    other = write_set(tmp_path / "o", [("q2", [], ["b"])], ["a", "b", "c"], dataset="other")
    evaluate(encoder, other, model_digest="m1", cache_dir=cache)
    assert encoder.encoded[4:] == ["q2"]
    evaluate(encoder, folder, model_digest="m2", cache_dir=cache)
    assert encoder.encoded[5:] == ["a", "b", "c", "q1"]  # another model: embedded again
    assert len(list(cache.glob("*.pt"))) == 2
    assert len(list((cache / "scores").glob("*.json"))) == 3


@pytest.mark.parametrize(
    ("queries", "message"),
    [
        ([("q1", ["a", "zz"], ["a"])], r"q1 names unknown candidates \['zz'\]"),
        ([("q1", ["a", "b"], [])], "q1 has no relevant candidate"),
        ([("q1", ["a", "b"], ["c"])], "q1 has relevant candidates outside its own list"),
    ],
)
def test_broken_sets_are_refused_with_the_query_named(tmp_path, queries, message):
    folder = write_set(tmp_path / "s", queries, ["a", "b", "c"])
    with pytest.raises(EvalSetError, match=message):
        load_eval_folder(folder)


def test_an_unknown_category_is_refused(tmp_path):
    folder = write_set(tmp_path / "s", [("q1", [], ["a"])], ["a"], category="vibes")
    with pytest.raises(ValueError, match="unknown evaluation category 'vibes'"):
        evaluate(TextKeyEncoder(TABLE), folder)


def test_a_folder_without_sets_is_refused(tmp_path):
    with pytest.raises(EvalSetError, match="holds no evaluation set"):
        evaluate(TextKeyEncoder(TABLE), tmp_path)


def test_report_levels_and_deltas(tmp_path):
    one = write_set(tmp_path / "one", [("q1", ["a", "b"], ["a"])], ["a", "b"], dataset="one")
    two = write_set(tmp_path / "two", [("q2", ["a", "b"], ["a"])], ["a", "b"], dataset="two",
                    category="image_classification")  # fmt: skip
    docs = write_set(tmp_path / "docs", [("q1", [], ["a"])], ["a", "b"], dataset="docs",
                     category="visdoc_ood")  # fmt: skip
    scores = evaluate(TextKeyEncoder(TABLE), [one, two, docs])
    report = build_report(scores, {"path": "m"})
    assert report["categories"]["Image/RET"]["score"] == 1.0
    assert report["categories"]["Image/CLS"]["score"] == 0.0
    assert report["meta"]["Image"] == {"score": 0.5, "datasets": 2}
    assert report["meta"]["VisDoc"]["score"] == 1.0
    assert report["all"] == {"score": pytest.approx(2 / 3), "datasets": 3}
    previous = build_report(scores[:1], {"path": "old"})
    later = build_report(scores, {"path": "m"}, previous)
    assert later["delta"] == {"All": pytest.approx(2 / 3 - 1), "Image": -0.5, "Image/RET": 0.0,
                              "dataset:one": 0.0}  # fmt: skip


def test_tiny_model_report_on_the_sample_eval_split(tiny_embedder, sample_corpus, tmp_path):
    scores = evaluate(tiny_embedder, sample_corpus.root / "eval", batch_size=8,
                      model_digest="tiny", cache_dir=tmp_path / "cache")  # fmt: skip
    assert {s.name for s in scores} == {e.name for e in sample_corpus.eval_sets}
    first = write_report(scores, tmp_path / "first", {"path": "tiny"})
    paths = write_report(scores, tmp_path / "report", {"path": "tiny"}, previous=first["json"])
    report = json.loads(paths["json"].read_text())
    assert set(report["meta"]) == {"Image", "Video", "VisDoc"}
    assert set(report["categories"]) == {"Image/CLS", "Image/RET", "Video/RET", "VisDoc/OOD"}
    assert len(report["datasets"]) == 4 and report["all"]["datasets"] == 4
    assert report["delta"]["All"] == 0
    markdown = paths["markdown"].read_text()
    for text in ("Image CLS", "**Image**", "**Video**", "**VisDoc**", "**All**", "Δ vs previous",
                 "eval-visdoc", "VisDoc | OOD"):  # fmt: skip
        assert text in markdown
    with Image.open(paths["png"]) as chart:
        assert chart.format == "PNG" and chart.width > 300


MMEB_ROWS = [
    {"qry_text": "<|image_1|>\nRepresent the given image for classification",
     "qry_img_path": "imgs/q0.png", "tgt_text": ["circle", "square", "star"],
     "tgt_img_path": ["", "", ""]},
    {"qry_text": "<|image_1|>\nRepresent the given image for classification",
     "qry_img_path": "imgs/q1.png", "tgt_text": ["star", "circle", "square"],
     "tgt_img_path": ["", "", ""]},
    {"qry_text": "Find the picture of a red circle", "qry_img_path": "",
     "tgt_text": ["<|image_1|>", "<|image_1|>"], "tgt_img_path": ["imgs/q0.png", "imgs/q1.png"]},
]  # fmt: skip


def test_mmeb_eval_import_golden(tmp_path):
    out = import_mmeb_eval(MMEB_ROWS, "mini-mmeb", "image_classification", tmp_path / "set",
                           media_root=tmp_path / "media")  # fmt: skip
    queries = [json.loads(x) for x in (out / "queries.jsonl").read_text().splitlines()]
    candidates = [json.loads(x) for x in (out / "candidates.jsonl").read_text().splitlines()]
    label = lambda t: {"instruction": "", "text": t, "media": []}  # noqa: E731
    image = lambda u: {"instruction": "", "text": "", "media": [  # noqa: E731
        {"kind": "image", "uri": u, "start_s": None, "end_s": None, "timestamps": None,
         "frames": None}]}  # fmt: skip
    assert [c["candidate"] for c in candidates] == [
        label("circle"), label("square"), label("star"), image("imgs/q0.png"), image("imgs/q1.png"),
    ]  # fmt: skip
    cid = [c["cid"] for c in candidates]
    assert cid[0] == "mini-mmeb-c000000"
    assert [(q["candidate_ids"], q["relevant_ids"]) for q in queries] == [
        ([cid[0], cid[1], cid[2]], [cid[0]]),
        ([cid[2], cid[0], cid[1]], [cid[2]]),
        ([cid[3], cid[4]], [cid[3]]),
    ]
    assert queries[0]["query"] == {
        **image("imgs/q0.png"),
        "text": "Represent the given image for classification",
    }
    assert queries[2]["query"] == label("Find the picture of a red circle")
    meta = json.loads((out / "evalset.json").read_text())
    assert meta["media_root"] == str((tmp_path / "media").resolve())


def test_evaluation_runs_on_an_imported_mmeb_set(tiny_embedder, tmp_path):
    media = tmp_path / "media" / "imgs"
    media.mkdir(parents=True)
    Image.new("RGB", (56, 56), (220, 30, 30)).save(media / "q0.png")
    Image.new("RGB", (56, 56), (30, 30, 220)).save(media / "q1.png")
    out = import_mmeb_eval(MMEB_ROWS, "mini-mmeb", "image_classification", tmp_path / "set",
                           media_root=tmp_path / "media")  # fmt: skip
    (score,) = evaluate(tiny_embedder, out)
    assert (score.name, score.queries, score.candidates) == ("mini-mmeb", 3, 5)
    assert 0 <= score.score <= 1


def test_mmeb_rows_with_mismatched_lists_are_refused(tmp_path):
    bad = [{"qry_text": "q", "tgt_text": ["a", "b"], "tgt_img_path": ["x.png"]}]
    with pytest.raises(EvalSetError, match="row 0 of m: tgt_text and tgt_img_path"):
        import_mmeb_eval(bad, "m", "image_retrieval", tmp_path / "set", tmp_path)
