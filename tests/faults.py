"""Fault injection for the resilience tests; nothing here ships in the library.

``KillOnce`` is a training step callback (``run_training(step_callbacks=[...])``): the
last rank kills its own process at one step, once (a marker file remembers it). It travels
to the Ray Train workers pickled by value (``by_value``), since the workers import the
library but not the tests.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any


def by_value() -> None:
    """Let Ray pickle this module's callables by value for its workers."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class KillOnce:
    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, str(marker)

    def __call__(self, trainer: Any, step: int) -> None:
        if step != self.step or trainer.rank != trainer.world_size - 1:
            return
        marker = Path(self.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(step))
        # The controller registers reported checkpoints asynchronously; give it time to
        # record the last one, so that the test knows which checkpoint recovery starts from.
        time.sleep(3.0)
        os.kill(os.getpid(), signal.SIGKILL)


class FailOnce:
    """Wraps a function so that its first call with ``when(*args)`` true raises."""

    def __init__(self, fn: Any, marker: Path, when: Any):
        self.fn, self.marker, self.when = fn, Path(marker), when

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.when(*args, **kwargs) and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text("failed once")
            raise RuntimeError(f"injected failure ({self.marker})")
        return self.fn(*args, **kwargs)
