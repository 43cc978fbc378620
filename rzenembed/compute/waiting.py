"""Waiting on Ray work: a progress line while it runs, ``StepTimeout`` when it runs over.

Tasks and actor calls time out alike: Ray refuses to force-cancel an actor call
(``ValueError``), so an actor call is cancelled without force (its actor is killed by
whoever owns it) and the caller still sees ``StepTimeout``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


class StepTimeout(TimeoutError):
    """Ray work that did not finish within its step's ``compute.step_timeout_s``."""


def cancel(refs: list[Any]) -> None:
    """Cancel running work: tasks with force (their worker is killed, a stuck CUDA call
    included), actor calls without (Ray allows no more; the actor's owner kills it)."""
    import ray

    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except ValueError:  # an actor call: "force=True is not supported for actor tasks"
            ray.cancel(ref)


def wait_for(
    refs: Any,
    what: str,
    timeout_s: float | None = None,
    report_every_s: float = 60.0,
) -> Any:
    """``ray.get(refs)`` (one ref or a list) with a progress line every ``report_every_s``
    (how many are done, how long it has been) and, with ``timeout_s``, a ``StepTimeout``
    naming the work when it runs over; the refs are cancelled then."""
    import ray

    many = isinstance(refs, list)
    pending = list(refs) if many else [refs]
    total, started = len(pending), time.monotonic()
    while pending:
        budget = report_every_s
        if timeout_s is not None:
            left = timeout_s - (time.monotonic() - started)
            if left <= 0:
                cancel(pending)
                raise StepTimeout(
                    f"{what}: {total - len(pending)} of {total} done after {timeout_s:g} s "
                    "(compute.step_timeout_s); cancelled the rest"
                )
            budget = min(budget, left)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=budget)
        if pending:
            logger.info(
                "%s: %d of %d done after %.0f s",
                what,
                total - len(pending),
                total,
                time.monotonic() - started,
            )
    return ray.get(refs)


class ProgressClock:
    """Time since the last finished call: a progress line every ``report_every_s`` and,
    past ``timeout_s`` without progress, the running calls cancelled and ``StepTimeout``."""

    def __init__(self, what: str, timeout_s: float | None, report_every_s: float):
        self.what = what
        self.timeout_s = timeout_s
        self.report_every_s = report_every_s
        self.started = self.last = self.reported = time.monotonic()
        self.done = 0

    def budget(self) -> float:
        """How long the next wait may block before a report or the timeout is due."""
        now = time.monotonic()
        budget = self.report_every_s - (now - self.reported)
        if self.timeout_s is not None:
            budget = min(budget, self.timeout_s - (now - self.last))
        return max(budget, 0.0)

    def progressed(self) -> None:
        self.done += 1
        self.last = time.monotonic()

    def stalled(self, running: list[Any], total: int) -> None:
        """Nothing finished within the budget: fail past the timeout, else report."""
        now = time.monotonic()
        if self.timeout_s is not None and now - self.last >= self.timeout_s:
            cancel(running)
            raise StepTimeout(
                f"{self.what}: {self.done} of {total} calls done, none finished in the last "
                f"{self.timeout_s:g} s (compute.step_timeout_s); cancelled the rest"
            )
        self.reported = now
        logger.info(
            "%s: %d of %d calls done after %.0f s",
            self.what,
            self.done,
            total,
            now - self.started,
        )
