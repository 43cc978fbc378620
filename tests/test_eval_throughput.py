"""Evaluation throughput: the coordinator only ranks, actors decode and get full batches.

The actor pool runs on the session's local Ray (2 CPUs: two one-CPU actors) over the
sample corpus's four evaluation sets (images, text, videos), with ``eval.batch_size`` 4 so
that every side spans several calls and most end with a short one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from rzenembed.config import config_from_dict
from rzenembed.evaluation import evaluate
from rzenembed.evaluation.evalset import load_eval_folder
from rzenembed.evaluation.step import _evaluate_task, _score_with_actors
from rzenembed.training.collate import MediaReader

BATCH = 4


def pool_config(model_dir, root):
    return config_from_dict(
        {
            "model": {"name_or_path": str(model_dir), "max_visual_tokens": 16, "video_frames": 2},
            "storage": {"root": str(root)},
            "compute": {"eval_actors": 2, "step_cpus": 1},
            "eval": {"batch_size": BATCH},
        }
    )


def sides_of(sets):
    """Each dataset's two sides (candidates, queries) as lists of raw sides."""
    for folder in sets:
        for dataset in load_eval_folder(folder):
            yield [c["candidate"] for c in dataset.candidates]
            yield [q["query"] for q in dataset.queries]


def expected_call_sizes(sets, batch: int) -> Counter:
    """Full calls of ``batch`` sides, plus one short call per side that does not divide."""
    sizes: Counter = Counter()
    for sides in sides_of(sets):
        sizes[batch] += len(sides) // batch
        if len(sides) % batch:
            sizes[len(sides) % batch] += 1
    return sizes


def count_decodes(monkeypatch) -> Counter:
    """Calls to ``MediaReader.image`` / ``frames`` in this process (the coordinator),
    counted around the real methods."""
    calls: Counter = Counter()
    for name in ("image", "frames"):
        real = getattr(MediaReader, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(MediaReader, name, counted)
    return calls


@pytest.fixture(scope="module")
def pool_run(ray_local, tiny_model_dir, sample_corpus, tmp_path_factory):
    """One evaluation through the actor pool, with the coordinator's decodes counted."""
    root = tmp_path_factory.mktemp("throughput")
    cfg = pool_config(tiny_model_dir, root / "runs")
    sets = [str(folder) for folder in sample_corpus.eval_folders]
    model = {"uri": str(tiny_model_dir), "digest": "tiny-throughput"}
    cache = str(root / "cache")
    actors: list[dict] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        decodes = count_decodes(monkeypatch)
        scores = _score_with_actors(cfg, model, sets, cache, actors)
    return {
        "cfg": cfg,
        "sets": sets,
        "model": model,
        "cache": cache,
        "root": root,
        "scores": scores,
        "actors": actors,
        "decodes": decodes,
    }


def test_the_coordinator_decodes_nothing_and_the_actors_decode_every_media_item(pool_run):
    media = sum(len(s.get("media") or []) for sides in sides_of(pool_run["sets"]) for s in sides)
    assert media == 39  # 12 + 15 + 6 images and 6 videos over the four sets
    assert sum(pool_run["decodes"].values()) == 0
    assert len(pool_run["actors"]) == 2
    assert sum(a["media_decoded"] for a in pool_run["actors"]) == media


def test_every_call_but_the_last_of_a_side_carries_a_full_batch(pool_run):
    sizes: Counter = Counter()
    for actor in pool_run["actors"]:
        sizes.update({int(k): v for k, v in actor["call_sizes"].items()})
    expected = expected_call_sizes(pool_run["sets"], BATCH)
    assert sizes == expected
    assert expected[BATCH] == 15 and sum(expected.values()) - expected[BATCH] == 6
    # Both actors embedded: calls went to the least-loaded one, not all to the first.
    assert all(a["sides"] > 0 for a in pool_run["actors"])
    assert sum(a["sides"] for a in pool_run["actors"]) == 73


def test_pool_scores_equal_the_in_process_scores(pool_run, tiny_model_dir):
    from rzenembed.modeling import ModelCard, RzenEmbedder

    cfg = pool_run["cfg"]
    config = None if ModelCard.exists(tiny_model_dir) else cfg.model
    embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=config)
    here = evaluate(embedder, pool_run["sets"], batch_size=BATCH, max_frames=cfg.model.video_frames)
    pool = {s.name: s for s in pool_run["scores"]}
    assert set(pool) == {s.name for s in here} and len(here) == 4
    for score in here:
        assert set(pool[score.name].metrics) == set(score.metrics)
        for metric, value in score.metrics.items():
            assert pool[score.name].metrics[metric] == pytest.approx(value, abs=1e-5), metric


def test_a_second_evaluation_of_the_same_baseline_reuses_its_stored_scores(pool_run, monkeypatch):
    """The coordinator task itself, baseline and model both the model just scored: every
    dataset resumes from the stored scores, so no actor starts and nothing is decoded."""
    decodes = count_decodes(monkeypatch)
    model = pool_run["model"]
    out_uri = str(pool_run["root"] / "report")
    out = _evaluate_task(
        pool_run["cfg"],
        {"baseline": model, "model": model},
        pool_run["sets"],
        out_uri,
        pool_run["cache"],
    )
    assert out["baseline"]["actors"] == [] and out["model"]["actors"] == []
    assert sum(decodes.values()) == 0
    stored = {s.name: s.score for s in pool_run["scores"]}
    reported = {k: d["score"] for k, d in out["baseline"]["report"]["datasets"].items()}
    assert reported == pytest.approx(stored, abs=1e-12)


def test_actors_read_a_remote_set_from_their_own_staged_copy(pool_run, s3_endpoint, tmp_path):
    """The coordinator's copy of an S3 set holds its tables but no media (as when the
    actors run on other nodes): the actors stage the set themselves and read from there,
    with the scores of the local run."""
    import shutil

    from rzenembed.data.folders import publish_folder
    from rzenembed.data.storage import filesystem

    source = Path(pool_run["sets"][0])
    fs, _ = filesystem("s3://rz-throughput", s3_endpoint)
    fs.mkdir("rz-throughput")
    uri = f"s3://rz-throughput/{source.name}"
    publish_folder(source, uri, s3_endpoint)
    coordinator = tmp_path / "coordinator-copy"
    shutil.copytree(source, coordinator, ignore=shutil.ignore_patterns("media"))
    cfg = pool_run["cfg"]
    cfg = cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"endpoint_url": s3_endpoint})}
    )
    model = {"uri": pool_run["model"]["uri"], "digest": "tiny-remote-set"}
    actors: list[dict] = []
    (score,) = _score_with_actors(
        cfg, model, [str(coordinator)], str(tmp_path / "cache"), actors, [uri]
    )
    assert sum(a["media_decoded"] for a in actors) == 12
    local = {s.name: s for s in pool_run["scores"]}[score.name]
    assert score.metrics == pytest.approx(local.metrics, abs=1e-5)


def test_the_model_is_embedded_by_the_actors_that_embedded_the_baseline(pool_run):
    """Baseline and model of one evaluation share the actor processes: the model is loaded
    in place of the baseline (no new actor), and its scores are what a fresh actor gives
    (the same weights under another digest score exactly as the pool run did)."""
    baseline = {"uri": pool_run["model"]["uri"], "digest": "tiny-as-baseline"}
    model = {"uri": pool_run["model"]["uri"], "digest": "tiny-as-model"}
    out = _evaluate_task(
        pool_run["cfg"],
        {"baseline": baseline, "model": model},
        pool_run["sets"],
        str(pool_run["root"] / "report-shared"),
        pool_run["cache"],
    )
    first, second = out["baseline"]["actors"], out["model"]["actors"]
    assert len(first) == len(second) == 2
    assert sorted(a["pid"] for a in first) == sorted(a["pid"] for a in second)
    # each role's counters are its own: every side embedded once per role
    assert sum(a["sides"] for a in first) == sum(a["sides"] for a in second) == 73
    expected = {s.name: s.score for s in pool_run["scores"]}
    for role in ("baseline", "model"):
        scores = {k: v["score"] for k, v in out[role]["report"]["datasets"].items()}
        assert scores == pytest.approx(expected, abs=1e-6), role
