"""``make demo`` rebuilds what an older release of the code built: a sample corpus or an
MMEB-V2 fixture with another version stamp is replaced, a current one is kept (its files
untouched)."""

from __future__ import annotations

import json

from flows.demo import (
    FIXTURE_STAMP,
    MMEB_V2_QUERIES,
    corpus_is_current,
    ensure_inputs,
    fixture_is_current,
)
from rzenembed.data.sample import SAMPLE_VERSION
from rzenembed.evaluation.release_fixture import FIXTURE_VERSION


def test_the_version_and_scale_decide_whether_a_corpus_is_current(tmp_path):
    assert not corpus_is_current(tmp_path, 10)  # nothing there
    (tmp_path / "corpus.json").write_text(json.dumps({"scale": 10}))  # before versions
    assert not corpus_is_current(tmp_path, 10)
    (tmp_path / "corpus.json").write_text(json.dumps({"version": SAMPLE_VERSION, "scale": 10}))
    assert corpus_is_current(tmp_path, 10) and not corpus_is_current(tmp_path, 1)
    (tmp_path / "corpus.json").write_text("{not json")
    assert not corpus_is_current(tmp_path, 10)


def test_a_fixture_needs_its_suite_and_a_stamp_of_this_version_and_size(tmp_path):
    (tmp_path / "suite.json").write_text("{}")
    assert not fixture_is_current(tmp_path)  # imported before stamps existed
    stamp = {"version": FIXTURE_VERSION, "queries": MMEB_V2_QUERIES}
    (tmp_path / FIXTURE_STAMP).write_text(json.dumps(stamp))
    assert fixture_is_current(tmp_path)
    (tmp_path / FIXTURE_STAMP).write_text(json.dumps({**stamp, "version": FIXTURE_VERSION - 1}))
    assert not fixture_is_current(tmp_path)


def test_an_older_build_is_replaced_and_a_current_one_kept(tmp_path, tiny_model_dir):
    corpus, sets = tmp_path / "corpus", tmp_path / "corpus" / "mmeb-v2"
    config = tmp_path / "demo.yaml"
    config.write_text(
        f"sources: [{{name: sample-captions, uri: {corpus}/sample-captions, "
        "task_group: image_retrieval}]\n"
        f"model: {{name_or_path: {tiny_model_dir}}}\n"
        f"eval: {{sets: [{sets}]}}\n"
    )
    corpus.mkdir()
    (corpus / "corpus.json").write_text(json.dumps({"version": 1, "scale": 1}))
    (corpus / "left-over.txt").write_text("from an older build")
    ensure_inputs(str(config), [], scale=1)
    described = json.loads((corpus / "corpus.json").read_text())
    assert described["version"] == SAMPLE_VERSION and not (corpus / "left-over.txt").exists()
    assert fixture_is_current(sets) and (corpus / "sample-captions" / "records.jsonl").is_file()
    built = {p: p.stat().st_mtime_ns for p in [corpus / "corpus.json", sets / "suite.json"]}
    ensure_inputs(str(config), [], scale=1)  # current: nothing is written again
    assert {p: p.stat().st_mtime_ns for p in built} == built
