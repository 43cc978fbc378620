"""Bootstrap intervals over queries and significance-gated promotion.

Intervals are checked against what they must be (the point score inside, the normal
approximation's width for a large sample, reproducible under the seed, narrower with more
queries); the paired comparison decides promotion on a real SQLite MLflow registry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rzenembed.config import TrackingConfig
from rzenembed.evaluation.report import build_report, levels, write_report
from rzenembed.evaluation.runner import DatasetScore
from rzenembed.evaluation.uncertainty import (
    SEED,
    paired_difference,
    report_intervals,
    resampled_means,
)
from rzenembed.tracking import Tracker


def score(name: str, category: str, meta: str, column: str, hits: list[float]) -> DatasetScore:
    """A dataset score whose per-query hit@1 values are ``hits``."""
    mean = float(np.mean(hits))
    return DatasetScore(
        name=name,
        category=category,
        meta=meta,
        column=column,
        ranking="local",
        queries=len(hits),
        candidates=10,
        metric="hit@1",
        score=mean,
        metrics={"hit@1": mean, "mrr": mean},
        per_query=list(hits),
    )


def hits(n: int, correct: int) -> list[float]:
    return [1.0] * correct + [0.0] * (n - correct)


def three_sets(scale: int = 1, shift: int = 0) -> list[DatasetScore]:
    """Two image datasets and one visual-document one; ``scale`` multiplies the queries
    (same proportions), ``shift`` adds correct queries to the first."""
    return [
        score("img-a", "image_retrieval", "Image", "RET", hits(30 * scale, 18 * scale + shift)),
        score("img-b", "image_classification", "Image", "CLS", hits(30 * scale, 9 * scale)),
        score("doc-a", "visdoc_ood", "VisDoc", "OOD", [0.25, 0.5, 1.0, 0.0] * 10 * scale),
    ]


def width(bounds: list[float]) -> float:
    return bounds[1] - bounds[0]


def test_every_level_has_an_interval_around_its_score_reproducible_under_the_seed():
    report = build_report(three_sets(), {"path": "m"})
    flat = levels(report)
    assert set(report["intervals"]) == set(flat)
    for level, (low, high) in report["intervals"].items():
        assert low <= flat[level] <= high, level
        assert 0.0 <= low < high <= 1.0, level
    again = build_report(three_sets(), {"path": "m"})
    assert again["intervals"] == report["intervals"]
    other_seed = report_intervals(report, seed=SEED + 1)
    assert other_seed != report["intervals"]
    # A dataset's interval does not depend on which other datasets are evaluated.
    alone = build_report(three_sets()[:1], {"path": "m"})
    assert alone["intervals"]["dataset:img-a"] == report["intervals"]["dataset:img-a"]
    assert report["confidence"]["level"] == 0.95 and report["confidence"]["resamples"] == 1000


def test_intervals_shrink_as_queries_grow_and_match_the_normal_width():
    small = build_report(three_sets(), {"path": "m"})["intervals"]
    large = build_report(three_sets(scale=16), {"path": "m"})["intervals"]
    for level in small:
        assert width(large[level]) < width(small[level]) / 2.5, level  # ~1/sqrt(16) = 1/4
    # 480 queries at 60% correct: 2 x 1.96 x sqrt(0.6 x 0.4 / 480) = 0.0877.
    expected = 2 * 1.96 * math.sqrt(0.6 * 0.4 / 480)
    assert width(large["dataset:img-a"]) == pytest.approx(expected, rel=0.1)
    # All is a mean over three datasets resampled on their own: its variance is the mean of
    # theirs over 3 (their normal variances by hand: 0.6x0.4/480, 0.3x0.7/480, and the
    # graded set's 0.1484375/1920 with values 0, 0.25, 0.5, 1).
    variances = [0.6 * 0.4 / 480, 0.3 * 0.7 / 480, 0.1484375 / 1920]
    assert width(large["All"]) == pytest.approx(2 * 1.96 * math.sqrt(sum(variances)) / 3, rel=0.1)


def test_resampling_a_constant_gives_a_point_and_big_sets_stay_in_bounded_memory():
    rng = np.random.default_rng(0)
    assert set(resampled_means([0.5] * 7, rng, 50)) == {0.5}
    draws = resampled_means(np.r_[np.ones(150_000), np.zeros(50_000)], rng, 40)
    assert draws.shape == (40,) and np.all(np.abs(draws - 0.75) < 0.01)
    with pytest.raises(ValueError, match="no query values"):
        resampled_means([], rng)


def test_the_paired_interval_is_narrower_than_two_separate_ones():
    """Two models that agree on most queries: the difference is judged on the queries
    where they differ, so its interval is far narrower than the two scores' intervals."""
    champion = build_report(three_sets(), {"path": "champion"})
    candidate = build_report(three_sets(shift=4), {"path": "candidate"})
    paired = paired_difference(candidate, champion, "dataset:img-a")
    assert paired["difference"] == pytest.approx(4 / 30)
    assert paired["queries"] == 30 and paired["low"] > 0  # 4 of 30 better, none worse
    # Unpaired, the difference of two independent means would have the width
    # sqrt(w1^2 + w2^2) of the two intervals (0.46 here); paired it is about half.
    ours, theirs = (r["intervals"]["dataset:img-a"] for r in (candidate, champion))
    unpaired = math.hypot(width(ours), width(theirs))
    assert paired["high"] - paired["low"] < 0.6 * unpaired
    everything = paired_difference(candidate, champion, "All")
    assert everything["difference"] == pytest.approx(4 / 30 / 3)
    # Not the same queries (another length), or no per-query scores: no pairing.
    other = build_report(three_sets(scale=2), {"path": "other"})
    assert paired_difference(candidate, other, "All") is None
    bare = json.loads(json.dumps(champion))
    for entry in bare["datasets"].values():
        entry["per_query"] = []
    assert paired_difference(candidate, bare, "All") is None
    assert report_intervals(bare) == {}


@pytest.fixture
def tracker(tmp_path):
    tracker = Tracker(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 8)
    model_id = tracker.log_model(run, "m", folder, "souped-model", {}, {}, upload=False)

    def register(digest: str) -> str:
        return tracker.register(model_id, run, digest, {})[0]

    tracker.new_version = register
    return tracker


def test_significant_gating_refuses_a_candidate_whose_paired_interval_includes_zero(tracker):
    champion_report = build_report(three_sets(), {"path": "champion"})
    first = tracker.new_version("a" * 64)
    assert tracker.promote_if_better(first, "All", champion_report["all"]["score"])["promoted"]

    def paired_with(candidate_report):
        return lambda version: paired_difference(candidate_report, champion_report, "All")

    # Better on two queries of img-a, worse on one of img-b: a higher mean, not a
    # significant one.
    noisy = three_sets(shift=2)
    noisy[1] = score("img-b", "image_classification", "Image", "CLS", hits(30, 8))
    noisy_report = build_report(noisy, {"path": "noisy"})
    assert noisy_report["all"]["score"] > champion_report["all"]["score"]
    second = tracker.new_version("b" * 64)
    kept = tracker.promote_if_better(
        second, "All", noisy_report["all"]["score"], paired=paired_with(noisy_report)
    )
    assert not kept["promoted"] and kept["gating"] == "significant"
    assert kept["paired"]["low"] < 0 < kept["paired"]["high"]
    low, high = (f"{100 * kept['paired'][k]:+.1f}" for k in ("low", "high"))
    assert f"[{low}, {high}] points" in kept["refused"]
    assert "does not lie above 0 (eval.gating: significant)" in kept["refused"]
    assert str(tracker.champion().version) == first
    # The same candidate under mean gating moves the champion.
    assert tracker.promote_if_better(second, "All", noisy_report["all"]["score"])["promoted"]
    tracker.client.set_registered_model_alias(tracker.cfg.registered_model, "champion", first)
    # Better on eight queries of img-a and worse nowhere: significant.
    clear_report = build_report(three_sets(shift=8), {"path": "clear"})
    third = tracker.new_version("c" * 64)
    moved = tracker.promote_if_better(
        third, "All", clear_report["all"]["score"], paired=paired_with(clear_report)
    )
    assert moved["promoted"] and moved["paired"]["low"] > 0 and moved["refused"] is None
    # A margin is required of the interval's lower end, not only of the mean.
    champion_report = clear_report
    better = build_report(three_sets(shift=12), {"path": "better"})  # 4 more of 30
    expected = paired_difference(better, clear_report, "All")
    margin = expected["low"] + 0.001
    assert expected["difference"] > margin
    fourth = tracker.new_version("d" * 64)
    short = tracker.promote_if_better(
        fourth, "All", better["all"]["score"], margin, paired=paired_with(better)
    )
    assert not short["promoted"] and short["paired"] == expected
    assert str(tracker.champion().version) == third


def test_a_champion_without_per_query_scores_falls_back_to_the_means(tracker):
    first = tracker.new_version("a" * 64)
    tracker.promote_if_better(first, "All", 0.5)
    second = tracker.new_version("b" * 64)
    decision = tracker.promote_if_better(second, "All", 0.6, paired=lambda version: None)
    assert decision["promoted"] and decision["gating"].startswith("mean (the champion's report")


def test_reports_show_intervals_beside_the_scores(tmp_path):
    paths = write_report(three_sets(), tmp_path, {"path": "m", "name": "m"})
    report = json.loads(paths["json"].read_text())
    low, high = report["intervals"]["All"]
    markdown = paths["markdown"].read_text()
    assert "95% interval" in markdown and f"[{100 * low:.1f}, {100 * high:.1f}]" in markdown
    assert report["datasets"]["img-a"]["per_query"] == hits(30, 18)
    board = json.loads(paths["leaderboard"].read_text())
    assert board["intervals"]["All"] == [low, high] and "metrics" in board
