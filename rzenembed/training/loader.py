"""Each step's data, read and processed off the critical path, in a replayable order.

``StepLoader`` keeps up to ``depth`` steps ready beyond the one training: while step ``s``
computes, one background thread builds the batches of ``s + 1 .. s + depth`` (reading rows
and media, running the processor), in step order.

Planning stays on the training thread, in a fixed order: the plan of step ``t`` is made
right after the loss of step ``t - depth - 1`` has been observed (``advance``), or when
the loader starts. Under adaptive sampling a probability update observed at step ``u``
therefore first applies to step ``u + 1 + depth``: a fixed boundary that does not depend on
thread timing, so a rerun or a resumed run draws the same datasets. The sampler keeps the
plans made ahead in its state (``StageSampler(lookahead=depth)``), so a checkpoint taken
after ``advance(s)`` resumes at ``s + 1`` with exactly those plans.

With ``depth`` 0 nothing runs in the background: ``next(s)`` plans and builds step ``s``
when it is asked for (the update boundary is then ``u + 1``).

``next`` reports how long the training thread waited for the batch: the step's data wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

from rzenembed.training.sampler import StepPlan

T = TypeVar("T")


class StepLoader(Generic[T]):
    """Builds ``build(plan)`` for steps ``first .. total_steps - 1``, ``depth`` ahead."""

    def __init__(
        self,
        plan: Callable[[int], StepPlan],
        build: Callable[[StepPlan], T],
        total_steps: int,
        depth: int,
    ):
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self._plan, self._build = plan, build
        self.total_steps, self.depth = total_steps, depth
        self._pending: dict[int, Future[T]] = {}
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-loader") if depth else None
        )

    def start(self, first: int) -> None:
        """Plan and start building ``first .. first + depth``."""
        if self._pool is None:
            return
        for step in range(first, min(first + self.depth + 1, self.total_steps)):
            self._submit(step)

    def next(self, step: int) -> tuple[T, float]:
        """Step ``step``'s batch and the seconds the caller waited for it."""
        started = time.perf_counter()
        if self._pool is None:
            batch = self._build(self._plan(step))
            return batch, time.perf_counter() - started
        future = self._pending.pop(step, None)
        if future is None:
            raise RuntimeError(f"step {step} was never scheduled (start/advance out of order)")
        batch = future.result()
        return batch, time.perf_counter() - started

    def advance(self, step: int) -> None:
        """Step ``step`` is done and its loss observed: plan the step ``depth + 1`` ahead."""
        following = step + self.depth + 1
        if self._pool is not None and following < self.total_steps:
            self._submit(following)

    def _submit(self, step: int) -> None:
        assert self._pool is not None
        self._pending[step] = self._pool.submit(self._build, self._plan(step))

    def close(self) -> None:
        """Stop building; batches not yet asked for are dropped."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> StepLoader[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
