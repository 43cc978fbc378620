"""Fan-out of per-shard work as Ray tasks: bounded concurrency, progress, retries.

Data steps are embarrassingly parallel over shards. ``map_shards`` submits one Ray task
per item, keeps at most ``max_in_flight`` running (so a 10k-shard dataset does not flood
the scheduler or the object store), retries a task on transient IO errors, shows a
progress bar, and returns the results in input order.

Ray is joined when an address is given (``compute.ray_address`` or ``RAY_ADDRESS``) and
started locally otherwise, with an explicit CPU count and no dashboard.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

# Exceptions that mean "try again" (a flaky store, a dropped connection), not "bad input".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the configured Ray cluster, or start a local one once per process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            # "local": always a fresh runtime for this process, never a cluster that a
            # stale /tmp/ray/ray_current_cluster file points at.
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )


def map_shards(
    fn: Callable[..., T],
    items: Sequence[Any],
    *,
    max_in_flight: int = 4,
    retries: int = 3,
    num_cpus: float = 1,
    desc: str = "shards",
    show_progress: bool = True,
) -> list[T]:
    """Run ``fn(item)`` for every item as Ray tasks; results in the order of ``items``.

    A task that raises one of ``TRANSIENT_ERRORS`` is retried up to ``retries`` times by
    Ray; any other exception (bad input is the step's business, recorded as rejects, so an
    exception here is a bug) is raised here after the other tasks are cancelled.
    """
    import ray

    if max_in_flight <= 0:
        raise ValueError(f"max_in_flight must be > 0, got {max_in_flight}")
    ensure_ray()
    remote = ray.remote(
        num_cpus=num_cpus, max_retries=retries, retry_exceptions=list(TRANSIENT_ERRORS)
    )(fn)
    results: list[Any] = [None] * len(items)
    pending: dict[Any, int] = {}
    next_item = 0
    with tqdm(total=len(items), desc=desc, disable=not show_progress, unit="shard") as bar:
        while next_item < len(items) or pending:
            while next_item < len(items) and len(pending) < max_in_flight:
                pending[remote.remote(items[next_item])] = next_item
                next_item += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                results[index] = ray.get(done[0])
            except Exception:
                for ref in pending:
                    ray.cancel(ref)
                raise
            bar.update(1)
    return results
