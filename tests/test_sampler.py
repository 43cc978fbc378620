"""The stage sampler: one dataset per step, permuted rows, rank slices, adaptive probabilities
and exact resume through a JSON checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import chi2

from rzenembed.training.sampler import (
    AdaptiveSettings,
    ProbabilityChange,
    StageSampler,
    StepPlan,
    adaptive_probabilities,
)

DATASETS = ["video", "image", "doc", "text"]
PROBABILITIES = [0.1, 0.2, 0.3, 0.4]
SIZES = [37, 100, 5, 64]


def make_sampler(seed: int = 7, adaptive: AdaptiveSettings | None = None, **kw) -> StageSampler:
    args = {
        "datasets": DATASETS,
        "probabilities": PROBABILITIES,
        "sizes": SIZES,
        "global_batch": 8,
        "seed": seed,
        "adaptive": adaptive,
    }
    return StageSampler(**{**args, **kw})


def run_plans(sampler: StageSampler, steps: range) -> list[StepPlan]:
    return [sampler.plan(step) for step in steps]


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def chi_square(counts: np.ndarray, probabilities: list[float]) -> float:
    expected = np.asarray(probabilities) / np.sum(probabilities) * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --------------------------------------------------------------------------- dataset draw


def test_each_plan_is_one_dataset_with_rows_in_range():
    sampler = make_sampler()
    for plan in run_plans(sampler, range(300)):
        size = SIZES[DATASETS.index(plan.dataset)]
        assert plan.indices.dtype == np.int64
        assert len(plan.indices) == 8
        assert plan.indices.min() >= 0 and plan.indices.max() < size


def test_dataset_frequencies_match_probabilities_chi_square():
    sampler = make_sampler(seed=3, global_batch=2)
    draws = [plan.dataset for plan in run_plans(sampler, range(20_000))]
    counts = np.array([draws.count(name) for name in DATASETS], dtype=float)
    critical = chi2.ppf(0.999, len(DATASETS) - 1)

    assert chi_square(counts, PROBABILITIES) < critical
    # The same test rejects a wrong vector, so it has the power to fail.
    assert chi_square(counts, [0.25, 0.25, 0.25, 0.25]) > critical
    assert chi_square(counts, [0.12, 0.2, 0.3, 0.38]) > critical


def test_zero_probability_dataset_is_never_drawn():
    sampler = make_sampler(probabilities=[0.0, 1.0, 0.0, 1.0])
    drawn = {plan.dataset for plan in run_plans(sampler, range(500))}
    assert drawn == {"image", "text"}


def test_weights_are_normalised():
    sampler = make_sampler(probabilities=[1, 2, 3, 4])
    assert sampler.probabilities == pytest.approx(dict(zip(DATASETS, PROBABILITIES, strict=True)))
    assert sum(sampler.probabilities.values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------- rows


def single_dataset_rows(size: int, global_batch: int, steps: int) -> tuple[np.ndarray, list]:
    sampler = StageSampler(["only"], [1.0], [size], global_batch=global_batch, seed=11)
    plans = run_plans(sampler, range(steps))
    return np.concatenate([p.indices for p in plans]), plans


def test_each_epoch_is_a_permutation_of_all_rows():
    size = 10
    stream, plans = single_dataset_rows(size, global_batch=4, steps=10)  # 40 rows = 4 epochs
    epochs = stream.reshape(4, size)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(size))
    assert len({tuple(e) for e in epochs.tolist()}) > 1  # epochs are reshuffled
    # A plan's epoch is the epoch its first row comes from.
    assert [p.epoch for p in plans] == [(4 * i) // size for i in range(10)]


def test_dataset_smaller_than_batch_spans_epochs():
    stream, plans = single_dataset_rows(size=3, global_batch=8, steps=3)  # 24 rows = 8 epochs
    for epoch in stream.reshape(8, 3):
        assert sorted(epoch.tolist()) == [0, 1, 2]
    assert [p.epoch for p in plans] == [0, 2, 5]


def test_cursor_advances_only_for_the_drawn_dataset():
    sampler = make_sampler()
    per_dataset: dict[str, list[int]] = {name: [] for name in DATASETS}
    for plan in run_plans(sampler, range(400)):
        per_dataset[plan.dataset].extend(plan.indices.tolist())
    for name, size in zip(DATASETS, SIZES, strict=True):
        rows = per_dataset[name]
        whole_epochs = len(rows) // size
        assert whole_epochs >= 1
        for e in range(whole_epochs):
            assert sorted(rows[e * size : (e + 1) * size]) == list(range(size))


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_plans_different_seed_differs():
    first = run_plans(make_sampler(seed=5), range(100))
    again = run_plans(make_sampler(seed=5), range(100))
    other = run_plans(make_sampler(seed=6), range(100))
    assert first == again
    assert [p.dataset for p in first] != [p.dataset for p in other]
    assert first != other


def test_plan_requires_consecutive_steps():
    sampler = make_sampler()
    with pytest.raises(ValueError, match="next step is 0"):
        sampler.plan(1)
    run_plans(sampler, range(3))
    with pytest.raises(ValueError, match="consecutively"):
        sampler.plan(0)
    with pytest.raises(ValueError, match="next step is 3"):
        sampler.plan(5)


def test_latest_step_can_be_asked_again_without_advancing():
    sampler = make_sampler()
    plan = sampler.plan(0)
    assert sampler.plan(0) == plan
    reference = run_plans(make_sampler(), range(5))
    assert [plan, *run_plans(sampler, range(1, 5))] == reference


# --------------------------------------------------------------------------- resume


def test_resume_from_json_state_continues_identically():
    sampler = make_sampler()
    run_plans(sampler, range(50))
    saved = json_round_trip(sampler.state_dict())
    uninterrupted = run_plans(sampler, range(50, 100))

    resumed = make_sampler()
    resumed.load_state_dict(saved)
    assert resumed.next_step == 50
    assert run_plans(resumed, range(50, 100)) == uninterrupted


@pytest.mark.parametrize("lookahead", [0, 1, 3])
def test_plans_made_ahead_travel_in_the_state_and_replay_exactly(lookahead):
    # A loader `lookahead` steps ahead: a checkpoint of step 18 is taken after plans up to
    # 19 + lookahead were committed; the resumed run asks for 19.. again.
    sampler = make_sampler(lookahead=lookahead)
    run_plans(sampler, range(20 + lookahead))
    saved = json_round_trip(sampler.state_dict())
    uninterrupted = run_plans(sampler, range(19, 60))

    resumed = make_sampler(lookahead=lookahead)
    resumed.load_state_dict(saved)
    assert resumed.next_step == 20 + lookahead
    assert run_plans(resumed, range(19, 60)) == uninterrupted
    again = make_sampler(lookahead=lookahead)
    again.load_state_dict(saved)
    with pytest.raises(ValueError, match="consecutively"):
        again.plan(18)  # trained before the checkpoint: no longer replayable


def test_lookahead_is_part_of_the_configuration():
    saved = json_round_trip(make_sampler(lookahead=2).state_dict())
    with pytest.raises(ValueError, match="lookahead"):
        make_sampler(lookahead=1).load_state_dict(saved)
    with pytest.raises(ValueError, match="lookahead"):
        make_sampler(lookahead=-1)


def test_state_from_another_configuration_is_refused():
    saved = json_round_trip(make_sampler(seed=1).state_dict())
    with pytest.raises(ValueError, match="seed"):
        make_sampler(seed=2).load_state_dict(saved)
    with pytest.raises(ValueError, match="global_batch"):
        make_sampler(seed=1, global_batch=16).load_state_dict(saved)
    with pytest.raises(ValueError, match="adaptive"):
        make_sampler(seed=1, adaptive=AdaptiveSettings()).load_state_dict(saved)


# --------------------------------------------------------------------------- rank slices


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_slices_partition_the_batch_in_order(world_size):
    sampler = make_sampler()
    plan = sampler.plan(0)
    slices = [sampler.rank_slice(plan, rank, world_size) for rank in range(world_size)]
    assert all(len(s) == 8 // world_size for s in slices)
    np.testing.assert_array_equal(np.concatenate(slices), plan.indices)


@pytest.mark.parametrize(("rank", "world_size"), [(0, 3), (0, 0), (2, 2), (-1, 2)])
def test_bad_rank_or_world_size_raises(rank, world_size):
    sampler = make_sampler()
    plan = sampler.plan(0)
    with pytest.raises(ValueError, match=r"world_size|rank"):
        sampler.rank_slice(plan, rank, world_size)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"probabilities": [0.1, 0.2, 0.3]}, "3 probabilities for 4 datasets"),
        ({"sizes": [1, 2, 3]}, "3 sizes for 4 datasets"),
        ({"probabilities": [0.1, -0.2, 0.3, 0.4]}, "finite and >= 0"),
        ({"probabilities": [0.1, float("nan"), 0.3, 0.4]}, "finite and >= 0"),
        ({"probabilities": [0.1, float("inf"), 0.3, 0.4]}, "finite and >= 0"),
        ({"probabilities": [0, 0, 0, 0]}, "all be 0"),
        ({"sizes": [37, 0, 5, 64]}, "sizes must be integers > 0"),
        ({"datasets": ["a", "a", "b", "c"]}, "unique"),
        ({"datasets": [], "probabilities": [], "sizes": []}, "at least one dataset"),
        ({"global_batch": 0}, "global_batch"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_configuration_raises(override, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**override)


@pytest.mark.parametrize(
    "settings",
    [
        {"every": 0},
        {"ema": 1.0},
        {"strength": -1.0},
        {"min_factor": 1.5},
        {"max_factor": 0.9},
    ],
)
def test_invalid_adaptive_settings_raise(settings):
    with pytest.raises(ValueError, match="adaptive"):
        AdaptiveSettings(**settings)


# --------------------------------------------------------------------------- adaptive


def simulated_loss(dataset: str, seen: dict[str, int]) -> float:
    """'fast' halves its loss every 10 of its steps; 'slow' stays flat (with noise)."""
    seen[dataset] = seen.get(dataset, 0) + 1
    noise = 0.01 * np.sin(seen[dataset])
    if dataset == "fast":
        return 2.0 * 0.5 ** (seen[dataset] / 10) + noise
    return 2.0 + noise


def adaptive_run(sampler: StageSampler, steps: range, seen: dict[str, int]):
    changes_by_step = {}
    for step in steps:
        plan = sampler.plan(step)
        if plan.dataset == "never":  # a dataset whose losses never reach the sampler
            continue
        changes = sampler.observe(step, plan.dataset, simulated_loss(plan.dataset, seen))
        changes_by_step[step] = changes
    return changes_by_step


def make_adaptive(settings: AdaptiveSettings | None) -> StageSampler:
    return StageSampler(
        ["fast", "slow", "never"], [0.4, 0.4, 0.2], [50, 50, 50], 4, seed=0, adaptive=settings
    )


def test_adaptive_moves_probability_to_the_slow_dataset_within_bounds():
    settings = AdaptiveSettings(every=10, min_factor=0.5, max_factor=1.5)
    sampler = make_adaptive(settings)
    base = sampler.base_probabilities
    changes_by_step = adaptive_run(sampler, range(200), seen={})

    probabilities = sampler.probabilities
    assert probabilities["slow"] > base["slow"]
    assert probabilities["fast"] < base["fast"]
    assert probabilities["never"] == pytest.approx(base["never"], abs=1e-12)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-12)
    for name, p in probabilities.items():
        assert 0.5 * base[name] - 1e-12 <= p <= 1.5 * base[name] + 1e-12

    # Updates fall on the first observed step at or after 9, 19, 29, ... (steps of "never"
    # are not observed); only those steps may report changes.
    observed = sorted(changes_by_step)
    due = {min((s for s in observed if s >= b), default=None) for b in range(9, 200, 10)}
    changed = {s for s, changes in changes_by_step.items() if changes}
    assert changed and changed <= due
    first = changes_by_step[min(changed)]
    assert all(isinstance(c, ProbabilityChange) and c.step == min(changed) for c in first)
    assert {c.dataset for c in first} == {"fast", "slow"}
    assert all(c.new != c.old for c in first)


def test_static_mode_never_changes_probabilities():
    sampler = make_adaptive(None)
    base = sampler.probabilities
    changes_by_step = adaptive_run(sampler, range(200), seen={})
    assert all(changes == [] for changes in changes_by_step.values())
    assert sampler.probabilities == base


def test_observe_checks_its_arguments():
    sampler = make_adaptive(AdaptiveSettings())
    with pytest.raises(ValueError, match="before plan"):
        sampler.observe(0, "fast", 1.0)
    sampler.plan(0)
    with pytest.raises(ValueError, match="unknown dataset"):
        sampler.observe(0, "nope", 1.0)
    with pytest.raises(ValueError, match="poison"):
        sampler.observe(0, "fast", float("nan"))
    sampler.plan(1)
    sampler.observe(1, "fast", 1.0)
    with pytest.raises(ValueError, match="at most once"):
        sampler.observe(1, "fast", 1.0)


def test_adaptive_state_survives_json_round_trip():
    settings = AdaptiveSettings(every=5)
    sampler, seen = make_adaptive(settings), {}
    adaptive_plans(sampler, range(60), seen)
    assert sampler.probabilities != sampler.base_probabilities  # the run really adapted
    saved = json_round_trip(sampler.state_dict())
    seen_at_save = dict(seen)
    uninterrupted = adaptive_plans(sampler, range(60, 160), seen)

    resumed = make_and_load(settings, saved)
    assert adaptive_plans(resumed, range(60, 160), seen_at_save) == uninterrupted
    assert resumed.probabilities == sampler.probabilities


def adaptive_plans(sampler: StageSampler, steps: range, seen: dict[str, int]) -> list[StepPlan]:
    plans = []
    for step in steps:
        plan = sampler.plan(step)
        plans.append(plan)
        if plan.dataset != "never":
            sampler.observe(step, plan.dataset, simulated_loss(plan.dataset, seen))
    return plans


def make_and_load(settings: AdaptiveSettings, state: dict) -> StageSampler:
    sampler = make_adaptive(settings)
    sampler.load_state_dict(state)
    return sampler


def test_adaptive_rule_bounds_hold_exactly_at_extreme_strength():
    base = np.array([0.25, 0.25, 0.25, 0.25])
    settings = AdaptiveSettings(strength=1e6, min_factor=0.8, max_factor=1.1)
    result = adaptive_probabilities(base, [0.9, 0.5, 0.0, None], settings)
    assert result.sum() == pytest.approx(1.0, abs=1e-12)
    assert result[3] == pytest.approx(0.25, abs=1e-12)  # never observed: base share
    assert np.all(result >= 0.8 * base - 1e-12) and np.all(result <= 1.1 * base + 1e-12)
    # Water-filling in order of slowness: the slowest two reach the upper bound, the fastest
    # stays at its lower bound, and the observed group keeps its base mass of 0.75.
    np.testing.assert_allclose(result[:3], [0.2, 0.275, 0.275], atol=1e-12)
