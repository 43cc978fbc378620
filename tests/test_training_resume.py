"""Checkpoints and resume: a stopped run continues where it stopped with the same data
order, and a killed worker is recovered by Ray Train from the last checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from rzenembed.config import StageConfig
from rzenembed.prep.prepare import prepare_all
from rzenembed.training.metrics import read_jsonl
from rzenembed.training.stages import run_stage1

from .faults import KillOnce, by_value
from .test_training import training_config

pytestmark = pytest.mark.slow
STEPS, EVERY = 8, 3  # checkpoints after steps 2, 5 and 7


# Adaptive sampling that moves probabilities every 2 steps: updates observed at steps 1, 3
# and 5 apply from steps 4, 6 and 8 with the loader 2 steps ahead (prefetch 2).
ADAPTIVE = {"sampling": "adaptive", "adaptive": {"every": 2, "strength": 3.0}, "prefetch": 2}


@pytest.fixture(scope="module")
def setup(ray_local, sample_corpus, tiny_model_dir, tmp_path_factory):
    """An adaptive stage-1 run (the harder case: the sampler's state and its look-ahead
    must resume too) and its uninterrupted reference."""
    root = tmp_path_factory.mktemp("resume")
    by_value()  # the workers receive KillOnce by value
    cfg = training_config(
        sample_corpus,
        str(root / "versions"),
        tiny_model_dir,
        max_steps=STEPS,
        checkpoint_every=EVERY,
    )
    stage1 = StageConfig.model_validate({**cfg.stage1.model_dump(), **ADAPTIVE})
    cfg = cfg.model_copy(update={"stage1": stage1})
    assert cfg.stage1.prefetch == 2  # the loader works ahead in every test here
    data = prepare_all(cfg, base=str(sample_corpus.root), show_progress=False)
    reference = run_stage1(cfg.model_copy(update={"name": "reference"}), data.stages["stage1"])
    rows = read_jsonl(reference.metrics_uri)
    moved = [row["step"] for row in rows if row.get("sampling_changes")]
    assert moved, "the probabilities never moved: the tests would not exercise adaptive resume"
    return cfg, data, root, rows


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


def test_a_stopped_run_resumes_with_the_same_batches_and_probabilities(setup):
    from rzenembed.training.stages import run_training

    cfg, data, root, reference = setup
    stopped = cfg.model_copy(update={"name": "stopped"})
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker's death
        run_training(
            stopped,
            "stage1",
            data.stages["stage1"],
            stopped.model.name_or_path,
            "all",
            step_callbacks=[KillOnce(4, root / "stopped-marker")],
        )
    rows = read_jsonl(run_stage1(stopped, data.stages["stage1"]).metrics_uri)
    steps = [row["step"] for row in rows]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == 3  # after the checkpoint of step 2, not from 0
    assert steps.count(3) == 2 and steps[-1] == STEPS - 1
    assert_same_as_reference(rows, reference, from_step=3)


def test_a_killed_worker_is_recovered_from_the_last_checkpoint(setup):
    from rzenembed.training.stages import run_training

    cfg, data, root, reference = setup
    cfg = cfg.model_copy(
        update={"name": "killed", "compute": cfg.compute.model_copy(update={"max_failures": 1})}
    )
    result = run_training(
        cfg,
        "stage1",
        data.stages["stage1"],
        cfg.model.name_or_path,
        "all",
        step_callbacks=[KillOnce(7, root / "killed-marker")],
    )
    rows = read_jsonl(result.metrics_uri)
    steps = [row["step"] for row in rows]
    assert steps.count(6) == 2 and steps[-1] == STEPS - 1  # steps 6.. ran twice
    assert (Path(result.adapter_uri) / "rzenembed.json").is_file()
    assert_same_as_reference(rows, reference, from_step=6)
