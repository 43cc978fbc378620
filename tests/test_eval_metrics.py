"""Ranking metrics against hand-computed values, ties and several relevant items included."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rzenembed.evaluation.metrics import mean_metrics, rank_metrics

D1, D2, D3, D4 = 1 / math.log2(3), 1 / math.log2(4), 1 / math.log2(5), 1 / math.log2(6)


def test_distinct_scores_two_relevant():
    m = rank_metrics([0.9, 0.8, 0.7, 0.1], [0, 1, 0, 1], ks=(1, 2, 5))
    assert m["hit@1"] == 0 and m["hit@2"] == 1 and m["hit@5"] == 1
    assert m["recall@1"] == 0 and m["recall@2"] == 0.5 and m["recall@5"] == 1
    assert m["mrr"] == pytest.approx(1 / 2)
    assert m["ndcg@5"] == pytest.approx((D1 + D3) / (1 + D1))


def test_a_relevant_candidate_tied_at_the_top_counts_by_its_share():
    m = rank_metrics([0.5, 0.5, 0.5, 0.1], [1, 0, 0, 0], ks=(1, 5))
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["hit@5"] == 1
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + D1 + D2) / 3)


def test_list_order_never_changes_a_score_under_ties():
    first = rank_metrics([0.5, 0.5, 0.5, 0.5], [1, 0, 0, 0])
    last = rank_metrics([0.5, 0.5, 0.5, 0.5], [0, 0, 0, 1])
    assert first == last
    assert first["hit@1"] == pytest.approx(0.25)  # chance, not 1.0 as argmax would give


def test_two_relevant_in_a_tie_below_a_wrong_top_candidate():
    m = rank_metrics([0.9, 0.5, 0.5, 0.5], [0, 1, 1, 0], ks=(1, 2, 5))
    assert m["hit@1"] == 0
    assert m["hit@2"] == pytest.approx(2 / 3)  # the 2nd slot holds one of 3, 2 relevant
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["mrr"] == pytest.approx(2 / 3 * 1 / 2 + 1 / 3 * 1 / 3)
    assert m["ndcg@5"] == pytest.approx(2 / 3 * (D1 + D2 + D3) / (1 + D1))


def test_ndcg_uses_linear_gain_and_log2_discount():
    m = rank_metrics([3.0, 2.0, 1.0], [1, 2, 0])
    assert m["ndcg@5"] == pytest.approx((1 + 2 * D1) / (2 + 1 * D1))
    exponential = (1 + 3 * D1) / (3 + 1 * D1)
    assert m["ndcg@5"] != pytest.approx(exponential)


def test_ndcg_cuts_at_k():
    scores = [6, 5, 4, 3, 2, 1.0]
    assert rank_metrics(scores, [0, 0, 0, 0, 0, 1])["ndcg@5"] == 0
    assert rank_metrics(scores, [0, 0, 0, 0, 1, 0])["ndcg@5"] == pytest.approx(D4 / 1)


def test_a_large_tie_is_exact_and_fast():
    scores = np.zeros(100_000)
    relevance = np.zeros(100_000)
    relevance[[3, 70_000]] = 1
    m = rank_metrics(scores, relevance)
    assert m["hit@1"] == pytest.approx(2 / 100_000)
    assert m["recall@10"] == pytest.approx(10 / 100_000)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="at least one relevant"):
        rank_metrics([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="equal 1-d"):
        rank_metrics([0.1, 0.2], [1])
    with pytest.raises(ValueError, match="finite"):
        rank_metrics([math.nan, 0.2], [1, 0])


def test_mean_over_queries():
    rows = [rank_metrics([1, 0], [1, 0]), rank_metrics([1, 0], [0, 1])]
    assert mean_metrics(rows)["hit@1"] == 0.5
    assert mean_metrics(rows)["mrr"] == pytest.approx(0.75)


def test_the_first_listed_convention_gives_a_tie_to_the_earlier_candidate():
    from rzenembed.evaluation.metrics import positional_metrics

    scores, gains = [0.5, 0.9, 0.9, 0.1], [0, 0, 1, 0]
    assert rank_metrics(scores, gains)["hit@1"] == 0.5  # the tie, averaged over both orders
    first = positional_metrics(scores, gains, ndcg_k=2)
    assert first["hit@1"] == 0.0  # candidate 1 is listed before the relevant candidate 2
    assert first["ndcg@2"] == pytest.approx((1 / np.log2(3)) / 1.0)
    assert positional_metrics([0.9, 0.9, 0.1], [0, 1, 0])["hit@1"] == 0.0
    assert positional_metrics([0.9, 0.9, 0.1], [1, 0, 0])["hit@1"] == 1.0
