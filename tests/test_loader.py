"""The step loader: plans in a fixed order relative to the observed steps, builds ahead on
its own thread, reports the wait, and hands errors to the step that asked."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from rzenembed.training.loader import StepLoader
from rzenembed.training.sampler import StepPlan


class Recorder:
    """A fake sampler and builder that log what happened, in order."""

    def __init__(self, slow_step: int | None = None, failing_step: int | None = None):
        self.events: list[str] = []
        self.threads: set[str] = set()
        self.slow_step, self.failing_step = slow_step, failing_step

    def plan(self, step: int) -> StepPlan:
        self.events.append(f"plan {step}")
        return StepPlan(step, "d", np.array([step]), 0)

    def build(self, plan: StepPlan) -> int:
        self.threads.add(threading.current_thread().name)
        if plan.step == self.slow_step:
            time.sleep(0.3)
        if plan.step == self.failing_step:
            raise OSError(f"store down at step {plan.step}")
        return plan.step * 10


def run(recorder: Recorder, depth: int, total: int = 6, first: int = 0) -> list[int]:
    got = []
    with StepLoader(recorder.plan, recorder.build, total, depth) as loader:
        loader.start(first)
        for step in range(first, total):
            batch, _ = loader.next(step)
            got.append(batch)
            recorder.events.append(f"observe {step}")
            loader.advance(step)
    return got


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_step_t_is_planned_right_after_step_t_minus_depth_minus_1_is_observed(depth):
    recorder = Recorder()
    assert run(recorder, depth) == [0, 10, 20, 30, 40, 50]
    events = recorder.events
    for step in range(6):
        position = events.index(f"plan {step}")
        if step <= depth:  # planned when the loader starts
            assert position == step
        else:
            assert events[position - 1] == f"observe {step - depth - 1}"
    assert (recorder.threads == {"MainThread"}) == (depth == 0)


def test_a_resumed_loader_plans_from_its_first_step():
    recorder = Recorder()
    assert run(recorder, depth=2, first=3) == [30, 40, 50]
    assert recorder.events[:3] == ["plan 3", "plan 4", "plan 5"]


def test_the_wait_is_what_the_caller_blocked():
    recorder = Recorder(slow_step=1)
    with StepLoader(recorder.plan, recorder.build, 3, depth=1) as loader:
        loader.start(0)
        _, waited_first = loader.next(0)
        _, waited_slow = loader.next(1)
    assert waited_slow >= 0.2 > waited_first


def test_a_failed_build_is_raised_by_the_step_that_needs_it():
    recorder = Recorder(failing_step=2)
    with pytest.raises(OSError, match="step 2"):
        run(recorder, depth=2)
    assert "observe 1" in recorder.events and "observe 2" not in recorder.events
