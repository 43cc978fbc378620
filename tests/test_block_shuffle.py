"""The sampler's ``blocks`` shuffle: blocks of consecutive rows (row groups) in a seeded
order, rows mixed within windows of ``shuffle_window`` blocks; every property of the
``rows`` shuffle kept (each row once an epoch, determinism, exact resume)."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest

from rzenembed.config import StageConfig
from rzenembed.prep.mixture import StageDataset, StageManifest
from rzenembed.training.loop import build_sampler
from rzenembed.training.rows import DatasetRows
from rzenembed.training.sampler import (
    StageSampler,
    StepPlan,
    block_bounds_of,
    block_permutation,
    epoch_permutation,
)

DATASETS = ["video", "text"]
BLOCKS = [[3, 1, 4, 1, 5, 9, 2, 6], [7, 7, 7, 7, 2]]  # 31 and 30 rows
SIZES = [sum(b) for b in BLOCKS]


def make_sampler(seed: int = 7, **kw) -> StageSampler:
    args = {
        "datasets": DATASETS,
        "probabilities": [0.5, 0.5],
        "sizes": SIZES,
        "global_batch": 8,
        "seed": seed,
        "shuffle": "blocks",
        "shuffle_window": 3,
        "blocks": BLOCKS,
    }
    return StageSampler(**{**args, **kw})


def single_dataset(**kw) -> StageSampler:
    """One dataset of 31 rows (the first blocks): step s reads rows 8s .. 8s + 7."""
    return make_sampler(datasets=["only"], probabilities=[1.0], sizes=[31], blocks=BLOCKS[:1], **kw)


def run_plans(sampler: StageSampler, steps: range) -> list[StepPlan]:
    return [sampler.plan(step) for step in steps]


def rows_of(plans: list[StepPlan], dataset: str) -> list[int]:
    return [i for p in plans if p.dataset == dataset for i in p.indices.tolist()]


def block_of(blocks: list[int]) -> np.ndarray:
    """The block of every row."""
    return np.repeat(np.arange(len(blocks)), blocks)


def windows(order: list[int], blocks: list[int], window: int) -> list[set[int]]:
    """Cut an epoch's order into windows: the shortest prefixes that hold exactly ``window``
    whole blocks (the last window may hold fewer). Fails if rows of a block are split
    between windows or a window mixes more than ``window`` blocks."""
    owner = block_of(blocks)
    found, open_blocks, seen = [], set(), 0
    for position, row in enumerate(order):
        open_blocks.add(int(owner[row]))
        seen += 1
        assert len(open_blocks) <= window, f"window at {position} mixes {open_blocks}"
        whole = sum(blocks[b] for b in open_blocks) == seen
        if whole and (len(open_blocks) == window or position == len(order) - 1):
            found.append(open_blocks)
            open_blocks, seen = set(), 0
    assert not open_blocks, "the epoch ended inside a window"
    return found


# --------------------------------------------------------------------------- the order


def test_each_epoch_visits_every_row_once_in_windows_of_whole_blocks():
    plans = run_plans(make_sampler(), range(60))
    for name, blocks in zip(DATASETS, BLOCKS, strict=True):
        stream = rows_of(plans, name)
        size = sum(blocks)
        epochs = len(stream) // size
        assert epochs >= 4
        orders = [stream[e * size : (e + 1) * size] for e in range(epochs)]
        for order in orders:
            assert sorted(order) == list(range(size))
            found = windows(order, blocks, window=3)
            # ceil(blocks / window) windows, together every block once.
            assert len(found) == -(-len(blocks) // 3)
            assert sorted(b for w in found for b in w) == list(range(len(blocks)))
        assert len({tuple(o) for o in orders}) == epochs  # reshuffled every epoch


def test_window_of_one_block_keeps_each_block_together():
    bounds = block_bounds_of(BLOCKS[0], SIZES[0])
    order = block_permutation(5, 0, 0, bounds, window=1).tolist()
    owner = block_of(BLOCKS[0])
    runs = [sorted(run) for _, run in itertools.groupby(order, key=lambda row: owner[row])]
    # 8 runs, one per block, each exactly the block's rows (in some order).
    starts = bounds.tolist()
    assert sorted(runs) == [list(range(starts[b], starts[b + 1])) for b in range(8)]
    assert [owner[run[0]] for run in runs] != list(range(8))  # the blocks are permuted


def test_window_over_every_block_is_a_full_row_shuffle_of_the_blocks():
    bounds = block_bounds_of(BLOCKS[1], SIZES[1])
    order = block_permutation(5, 1, 3, bounds, window=100)
    assert sorted(order.tolist()) == list(range(30))
    assert not np.array_equal(order, np.arange(30))


def test_rows_mode_is_unchanged_by_the_option():
    # The default is the uniform permutation the sampler always drew (runs stay comparable).
    sampler = StageSampler(["only"], [1.0], [10], global_batch=5, seed=11)
    first, second = sampler.plan(0), sampler.plan(1)
    expected = epoch_permutation(11, 0, 0, 10)
    assert first.indices.tolist() == expected[:5].tolist()
    assert second.indices.tolist() == expected[5:].tolist()


def test_a_batch_crossing_the_epoch_boundary_continues_in_the_next_epochs_order():
    plans = run_plans(single_dataset(), range(8))  # 64 rows: epochs 0, 1 and two rows of 2
    bounds = block_bounds_of(BLOCKS[0], 31)
    expected = np.concatenate([block_permutation(7, 0, e, bounds, 3) for e in range(3)])[:64]
    assert np.concatenate([p.indices for p in plans]).tolist() == expected.tolist()
    assert [p.epoch for p in plans] == [(8 * s) // 31 for s in range(8)]


def test_dataset_smaller_than_the_batch_spans_epochs():
    sampler = make_sampler(
        datasets=["tiny"], probabilities=[1.0], sizes=[3], blocks=[[2, 1]], global_batch=8
    )
    stream = np.concatenate([p.indices for p in run_plans(sampler, range(3))])
    for epoch in stream.reshape(8, 3):
        assert sorted(epoch.tolist()) == [0, 1, 2]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_plans_other_seed_or_window_differs():
    first = run_plans(make_sampler(seed=5), range(40))
    assert first == run_plans(make_sampler(seed=5), range(40))
    assert first != run_plans(make_sampler(seed=6), range(40))
    assert first != run_plans(make_sampler(seed=5, shuffle_window=1), range(40))


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("checkpoint_step", [1, 2, 3, 7, 11])
@pytest.mark.parametrize("lookahead", [0, 2])
def test_resume_mid_epoch_and_across_the_boundary_replays_exactly(checkpoint_step, lookahead):
    # 8 rows a step on 31 rows: step 3 (rows 24..31) and step 7 (56..63) cross an epoch
    # boundary; checkpoints after steps 1 and 11 are mid-epoch, 2 right before a crossing
    # batch, 3 right after one. The loader has planned `lookahead` steps past the checkpoint.
    sampler = single_dataset(lookahead=lookahead)
    run_plans(sampler, range(checkpoint_step + 1 + lookahead))
    saved = json.loads(json.dumps(sampler.state_dict()))
    uninterrupted = run_plans(sampler, range(checkpoint_step + 1, 30))

    resumed = single_dataset(lookahead=lookahead)
    resumed.load_state_dict(saved)
    assert run_plans(resumed, range(checkpoint_step + 1, 30)) == uninterrupted


def test_resume_with_two_datasets_replays_exactly():
    sampler = make_sampler(lookahead=1)
    run_plans(sampler, range(13))
    saved = json.loads(json.dumps(sampler.state_dict()))
    uninterrupted = run_plans(sampler, range(12, 60))
    resumed = make_sampler(lookahead=1)
    resumed.load_state_dict(saved)
    assert run_plans(resumed, range(12, 60)) == uninterrupted


def test_a_state_from_another_shuffle_is_refused():
    blocks_state = json.loads(json.dumps(make_sampler().state_dict()))
    rows_state = json.loads(json.dumps(make_sampler(shuffle="rows", blocks=None).state_dict()))
    with pytest.raises(ValueError, match="shuffle"):
        make_sampler(shuffle="rows", blocks=None).load_state_dict(blocks_state)
    with pytest.raises(ValueError, match="shuffle"):
        make_sampler().load_state_dict(rows_state)
    with pytest.raises(ValueError, match="shuffle"):
        make_sampler(shuffle_window=4).load_state_dict(blocks_state)
    other_blocks = [[3, 1, 4, 1, 5, 9, 8], BLOCKS[1]]  # same rows, other row groups
    with pytest.raises(ValueError, match="shuffle"):
        make_sampler(blocks=other_blocks).load_state_dict(blocks_state)


def test_a_state_saved_before_shuffle_modes_loads_as_rows():
    sampler = make_sampler(shuffle="rows", blocks=None)
    run_plans(sampler, range(5))
    state = json.loads(json.dumps(sampler.state_dict()))
    del state["config"]["shuffle"]
    uninterrupted = run_plans(sampler, range(5, 20))
    resumed = make_sampler(shuffle="rows", blocks=None)
    resumed.load_state_dict(state)
    assert run_plans(resumed, range(5, 20)) == uninterrupted
    with pytest.raises(ValueError, match="shuffle"):
        make_sampler().load_state_dict(state)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"shuffle": "pages"}, "shuffle must be one of"),
        ({"shuffle_window": 0}, "shuffle_window"),
        ({"blocks": None}, "needs the block sizes"),
        ({"blocks": BLOCKS[:1]}, "needs the block sizes"),
        ({"blocks": [[3, 1, 4], BLOCKS[1]]}, "add up to"),
        ({"blocks": [[*BLOCKS[0][:-1], 0, 6], BLOCKS[1]]}, "must be > 0"),
        ({"shuffle": "rows"}, "only apply to shuffle='blocks'"),
    ],
)
def test_invalid_block_settings_raise(override, message):
    with pytest.raises(ValueError, match=message):
        make_sampler(**override)


# --------------------------------------------------------------------------- the loop


def test_the_training_loop_takes_blocks_from_the_row_groups(tmp_path):
    from .test_rows import text_rows, write_version

    version = write_version(str(tmp_path / "v"), [text_rows(0), text_rows(1)[:100]])
    rows = DatasetRows(version, "text_retrieval", max_negatives=2)
    manifest = StageManifest(
        "stage1", "m", [StageDataset("lazy", version.uri, "d", len(rows), "text_retrieval", 1.0)]
    )
    stage = StageConfig(shuffle="blocks", shuffle_window=2, global_batch_size=16, prefetch=0)
    sampler = build_sampler(SimpleNamespace(stage_config=stage), manifest, {"lazy": rows})

    sizes = rows.row_group_sizes()
    assert sizes.sum() == 250 and len(sizes) >= 4  # ~85 rows a 256 KiB row group
    shuffle = sampler.state_dict()["config"]["shuffle"]
    assert (shuffle["mode"], shuffle["window"], shuffle["blocks"][0]["count"]) == (
        "blocks",
        2,
        len(sizes),
    )
    stream = np.concatenate([sampler.plan(s).indices for s in range(16)])[:250]
    windows(stream.tolist(), sizes.tolist(), window=2)
    with pytest.raises(ValueError, match="needs the stage's sources"):
        build_sampler(SimpleNamespace(stage_config=stage), manifest)
