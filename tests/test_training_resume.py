"""Checkpoints and resume: a stopped run continues where it stopped with the same data
order, and a killed worker is recovered by Ray Train from the last checkpoint.

One run shows both: stopped at step 4 (a worker killed, no restart allowed), it is started
again and resumes from the checkpoint of step 2; with one restart allowed, a worker killed
again at step 7 is recovered from the checkpoint of step 5."""

from __future__ import annotations

from pathlib import Path

import pytest

from rzenembed.config import StageConfig
from rzenembed.training.metrics import read_jsonl
from rzenembed.training.stages import run_training

from .faults import KillOnce, by_value

pytestmark = pytest.mark.slow
STEPS, EVERY = 8, 3  # checkpoints after steps 2, 5 and 7


# Adaptive sampling that moves probabilities every 2 steps: updates observed at steps 1, 3
# and 5 apply from steps 4, 6 and 8 with the loader 2 steps ahead (prefetch 2).
ADAPTIVE = {"sampling": "adaptive", "adaptive": {"every": 2, "strength": 3.0}, "prefetch": 2}


def adaptive_config(cfg):
    """``cfg`` (``training_config``: two workers) with this module's adaptive stage 1."""
    stage1 = {**cfg.stage1.model_dump(), "max_steps": STEPS, "checkpoint_every": EVERY}
    return cfg.model_copy(update={"stage1": StageConfig.model_validate({**stage1, **ADAPTIVE})})


@pytest.fixture(scope="module")
def setup(adaptive_stage1, tmp_path_factory):
    """An adaptive stage-1 run (the harder case: the sampler's state and its look-ahead
    must resume too) and its uninterrupted reference: the session's ``adaptive_stage1``
    (test_training's stage 1 too)."""
    cfg, data, reference = adaptive_stage1
    root = tmp_path_factory.mktemp("resume")  # the interrupted run and the kill markers
    by_value()  # the workers receive KillOnce by value
    assert cfg.stage1.prefetch == 2  # the loader works ahead in every test here
    assert cfg.compute.num_workers == 2
    rows = read_jsonl(reference.metrics_uri)
    moved = [row["step"] for row in rows if row.get("sampling_changes")]
    assert moved, "the probabilities never moved: the tests would not exercise adaptive resume"
    cfg = cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"root": str(root / "versions")})}
    )
    return cfg, data, root, rows


def train_killing_at(cfg, data, step: int, marker: Path):
    """Stage 1 of ``cfg`` with one worker killed at ``step`` (once: ``marker`` remembers)."""
    return run_training(
        cfg,
        "stage1",
        data.stages["stage1"],
        cfg.model.name_or_path,
        "all",
        step_callbacks=[KillOnce(step, marker)],
    )


@pytest.fixture(scope="module")
def interrupted(setup):
    """The run stopped at step 4, then started again with one restart allowed and a worker
    killed at step 7: its result and its metrics rows, in the order they were written."""
    cfg, data, root, _ = setup
    stopped = cfg.model_copy(update={"name": "stopped"})
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death
        train_killing_at(stopped, data, 4, root / "stopped-marker")
    # The same run (max_failures is not part of its key): it resumes from step 2's checkpoint.
    again = stopped.model_copy(
        update={"compute": stopped.compute.model_copy(update={"max_failures": 1})}
    )
    result = train_killing_at(again, data, 7, root / "killed-marker")
    return result, read_jsonl(result.metrics_uri)


def last_per_step(rows: list[dict]) -> dict[int, dict]:
    return {row["step"]: row for row in rows}


def assert_same_as_reference(rows: list[dict], reference: list[dict], from_step: int) -> None:
    ours, ref = last_per_step(rows), last_per_step(reference)
    assert sorted(ours) == list(range(STEPS))
    for step in range(from_step, STEPS):
        assert ours[step]["batch"] == ref[step]["batch"], step
        assert ours[step]["dataset"] == ref[step]["dataset"], step
        assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-5), step
        assert ours[step]["probabilities"] == pytest.approx(ref[step]["probabilities"]), step


def test_a_stopped_run_resumes_with_the_same_batches_and_probabilities(setup, interrupted):
    *_, reference = setup
    _, rows = interrupted
    steps = [row["step"] for row in rows]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == [0, 1, 2, 3]  # stopped before step 4
    assert steps[restart] == 3  # after the checkpoint of step 2, not from 0
    assert steps.count(3) == 2 and steps[-1] == STEPS - 1
    assert_same_as_reference(rows, reference, from_step=3)


def test_a_killed_worker_is_recovered_from_the_last_checkpoint(setup, interrupted):
    *_, reference = setup
    result, rows = interrupted
    steps = [row["step"] for row in rows]
    # After the restart at 3: steps 3..6, the kill at 7, then 6.. again (checkpoint of 5).
    assert steps[steps.index(3) + 1 :] == [3, 4, 5, 6, 6, 7]
    assert steps.count(6) == 2 and steps[-1] == STEPS - 1  # steps 6.. ran twice
    assert (Path(result.adapter_uri) / "rzenembed.json").is_file()
    assert_same_as_reference(rows, reference, from_step=6)
