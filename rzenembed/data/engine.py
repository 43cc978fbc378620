"""The execution engine of data preparation: Ray Data.

Every preparation step is a picklable per-shard function (read a shard or a chunk of a raw
file, process it, write its output shard into the version's staging area, return a small
summary). ``run_shards`` runs such a function over its items as one Ray Data dataset: one
block per item, mapped by Ray Data's streaming executor, which schedules the tasks on the
cluster's CPUs, applies back-pressure and reschedules tasks lost with a node. A transient
error inside a task (an ``OSError`` from a flaky store) is retried in place; any other
exception is raised in the driver as itself. Concurrency follows the cluster's resources;
``prep.max_in_flight`` only caps it when set. The summaries come back in input order; rows
never do.

Ray Data's executor runs in the driver, which must be on a Ray node: this process when
Ray runs locally, or a step's Ray Job on a cluster (``rzenembed.compute``). Through Ray
Client a map is refused with what to set instead.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from rzenembed.compute.connect import ensure_ray, refuse_client

T = TypeVar("T")

# Set (to anything) to keep Ray Data's own INFO lines on the terminal (``--verbose``).
VERBOSE_ENV = "RZENEMBED_VERBOSE"

# Exceptions that mean "try again" (a flaky store, a dropped connection), not "bad input".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


def _configure(show_progress: bool) -> None:
    """Ray Data settings for shard jobs. Operator resource reservation is off: it holds CPUs
    back for the (trivial) input operator, which ran these one-block-per-shard maps at about
    1.4 of 2 CPUs (measured: 20 x 0.5 s tasks took 6.9 s with it, 5.2 s without)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    context.op_resource_reservation_enabled = False
    _quiet_console()


def _quiet_console() -> None:
    """Ray Data's INFO lines (each dataset's start, execution plan and end: most of what a
    demo printed) go only to its log file in the Ray session's log folder (``ray-data.log``,
    its own file handler, untouched); the terminal keeps Ray Data's warnings and the progress
    bars. ``RZENEMBED_VERBOSE`` keeps everything on the terminal."""
    if os.environ.get(VERBOSE_ENV):
        return
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setLevel(logging.WARNING)


class _Apply:
    """The per-row function Ray Data runs: unpickle the item, call ``fn`` (again, after a
    short pause, on a transient error, up to ``retries`` times), pickle the result. Any
    other exception comes back as the result, pickled, so the driver raises it as itself
    (Ray Data would turn it into a generic ``UserCodeException``)."""

    def __init__(self, fn: Callable[[Any], Any], retries: int):
        self.fn, self.retries = fn, retries

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        import time

        item = pickle.loads(row["item"])
        for attempt in range(self.retries + 1):
            try:
                result = self.fn(item)
                return {"index": row["index"], "result": pickle.dumps(result), "error": b""}
            except TRANSIENT_ERRORS:
                if attempt == self.retries:
                    raise
                time.sleep(min(2.0, 0.2 * 2**attempt))
            except Exception as exc:
                return {"index": row["index"], "result": b"", "error": _pickled(exc)}
        raise AssertionError("unreachable")


def _pickled(exc: Exception) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:  # an exception that does not pickle: keep its type name and message
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


class Failed:
    """What ``run_shards(..., errors="return")`` gives for an item whose task raised: the
    exception, to be handled (or raised) by the caller, which still gets every other
    item's result."""

    def __init__(self, error: BaseException):
        self.error = error

    def __repr__(self) -> str:
        return f"Failed({self.error!r})"


def run_shards(
    fn: Callable[..., T],
    items: Sequence[Any],
    *,
    max_in_flight: int | None = None,
    retries: int = 3,
    num_cpus: float = 1,
    show_progress: bool = True,
    errors: str = "raise",
) -> list[T]:
    """``fn(item)`` for every item as a Ray Data map, one block per item; results in the
    order of ``items``.

    A task that raises one of ``TRANSIENT_ERRORS`` is retried up to ``retries`` times; any
    other exception (bad input is the step's business, recorded as rejects, so an exception
    here is a bug) comes back with the task's result and is raised here as itself, the first
    in input order, once the map has finished; with ``errors="return"`` it is returned in
    the item's place as ``Failed`` (a step that keeps what its other shards did).
    """
    if max_in_flight is not None and max_in_flight <= 0:
        raise ValueError(f"max_in_flight must be > 0 or None, got {max_in_flight}")
    if errors not in ("raise", "return"):
        raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
    return _map(
        items,
        show_progress,
        _Apply(fn, retries),
        raise_errors=errors == "raise",
        num_cpus=num_cpus,
        pool=("tasks", max_in_flight),
    )


class _ActorApply:
    """A Ray Data actor: builds ``worker_cls(*init_args)`` once (a model on the actor's GPU)
    and calls its ``run(item)`` for every row it is given."""

    def __init__(self, worker_cls: type, init_args: tuple):
        self.worker = worker_cls(*init_args)
        self.apply = _Apply(self.worker.run, 0)

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return self.apply(row)


def run_on_actors(
    worker_cls: type,
    init_args: tuple,
    items: Sequence[Any],
    *,
    actors: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    resources: dict[str, float] | None = None,
    show_progress: bool = True,
) -> list[Any]:
    """``worker.run(item)`` for every item on a pool of ``actors`` Ray Data actors (each
    with ``num_gpus`` and custom ``resources``), results in input order; errors raised as
    themselves."""
    return _map(
        items,
        show_progress,
        _ActorApply,
        fn_constructor_args=(worker_cls, init_args),
        pool=("actors", max(1, min(actors, len(items)))),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        **({"resources": dict(resources)} if resources else {}),
    )


def _map(
    items: Sequence[Any],
    show_progress: bool,
    udf: Any,
    raise_errors: bool = True,
    pool: tuple[str, int | None] = ("tasks", None),
    **map_args: Any,
) -> list[Any]:
    """Items pickled into a one-block-per-item dataset, ``udf`` mapped over it, the results
    unpickled in input order (the first error, in input order, raised; or each returned
    as ``Failed``). ``pool``: ("tasks", at most N at once, None for no bound) or
    ("actors", a fixed pool of N), as Ray Data's compute strategy."""
    if not items:
        return []
    ensure_ray()
    refuse_client("a Ray Data map")
    import ray.data

    _configure(show_progress)
    rows = [{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    kind, size = pool
    size = None if size is None else min(size, len(items))  # Ray Data warns at more
    compute = (
        ray.data.ActorPoolStrategy(size=size)
        if kind == "actors"
        else ray.data.TaskPoolStrategy(size=size)
    )
    mapped = dataset.map(udf, compute=compute, **map_args)
    out = sorted(mapped.take_all(), key=lambda row: row["index"])
    if raise_errors:
        for row in out:
            if row["error"]:
                raise pickle.loads(row["error"])
    return [
        Failed(pickle.loads(row["error"])) if row["error"] else pickle.loads(row["result"])
        for row in out
    ]
