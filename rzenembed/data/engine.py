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

Ray is joined when an address is given (``compute.ray_address`` or ``RAY_ADDRESS``) and
started locally otherwise, with an explicit CPU count and no dashboard. An address is either
a GCS address (``head:6379``: the driver must run on a machine that hosts a Ray node) or a
Ray Client address (``ray://head:10001``: a driver anywhere, such as a Prefect worker pod).
Ray Data and Ray Train need a driver on a Ray node; through Ray Client, ``in_cluster`` runs
such work as a Ray task on the cluster (zero CPUs: it only coordinates) and hands back its
result.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)
# Connections tried when the head fails to start a Ray Client server for this driver.
CLIENT_ATTEMPTS = 4

# Exceptions that mean "try again" (a flaky store, a dropped connection), not "bad input".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, TimeoutError, ConnectionError)


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the configured Ray cluster, or start a local one once per process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        connect_client(address)
    elif address:
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


def connect_client(address: str, attempts: int = CLIENT_ATTEMPTS, pause_s: float = 2.0) -> None:
    """Connect through Ray Client, trying again when the head's proxy fails to start this
    client's server process (``ConnectionAbortedError``: "Starting Ray client server
    failed"). The proxy forks that process from a busy multi-threaded server, and on a
    loaded head a start can fail once and succeed on the next connection, which gets a new
    process on a new port. A head that cannot be reached at all (``ConnectionError`` after
    Ray's own connect timeout) is not tried again: waiting longer would not help."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except ConnectionAbortedError as error:
            ray.shutdown()
            if attempt == attempts:
                raise ConnectionAbortedError(
                    f"Ray Client at {address}: the head could not start a server for this "
                    f"driver in {attempts} attempts; the head's logs "
                    f"(ray_client_server*.err) say why. Last error: {error}"
                ) from error
            log.warning(
                "Ray Client at %s: the head failed to start this driver's server "
                "(attempt %d of %d); connecting again in %.0f s",
                address,
                attempt,
                attempts,
                pause_s * attempt,
            )
            time.sleep(pause_s * attempt)


def is_ray_client() -> bool:
    """Whether this process reaches Ray through Ray Client (it hosts no Ray node)."""
    from ray.util.client import ray as client

    return client.is_connected()


def in_cluster(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` where Ray Data and Ray Train can drive work: in this process
    when it runs on a Ray node (or Ray runs locally); through Ray Client, as a zero-CPU Ray
    task on the cluster, its result (or its exception) brought back."""
    if not is_ray_client():
        return fn(*args, **kwargs)
    import ray

    task = ray.remote(fn).options(num_cpus=0, max_retries=0)
    return ray.get(task.remote(*args, **kwargs))


def _configure(show_progress: bool) -> None:
    """Ray Data settings for shard jobs. Operator resource reservation is off: it holds CPUs
    back for the (trivial) input operator, which ran these one-block-per-shard maps at about
    1.4 of 2 CPUs (measured: 20 x 0.5 s tasks took 6.9 s with it, 5.2 s without)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress
    context.op_resource_reservation_enabled = False


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


def run_shards(
    fn: Callable[..., T],
    items: Sequence[Any],
    *,
    max_in_flight: int | None = None,
    retries: int = 3,
    num_cpus: float = 1,
    show_progress: bool = True,
) -> list[T]:
    """``fn(item)`` for every item as a Ray Data map, one block per item; results in the
    order of ``items``.

    A task that raises one of ``TRANSIENT_ERRORS`` is retried up to ``retries`` times; any
    other exception (bad input is the step's business, recorded as rejects, so an exception
    here is a bug) comes back with the task's result and is raised here as itself, the first
    in input order, once the map has finished.
    """
    if max_in_flight is not None and max_in_flight <= 0:
        raise ValueError(f"max_in_flight must be > 0 or None, got {max_in_flight}")
    return _map(
        items, show_progress, _Apply(fn, retries), num_cpus=num_cpus, concurrency=max_in_flight
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
    show_progress: bool = True,
) -> list[Any]:
    """``worker.run(item)`` for every item on a pool of ``actors`` Ray Data actors (each
    with ``num_gpus``), results in input order; errors raised as themselves."""
    return _map(
        items,
        show_progress,
        _ActorApply,
        fn_constructor_args=(worker_cls, init_args),
        concurrency=max(1, min(actors, len(items))),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def _map(items: Sequence[Any], show_progress: bool, udf: Any, **map_args: Any) -> list[Any]:
    """Items pickled into a one-block-per-item dataset, ``udf`` mapped over it, the results
    unpickled in input order (the first error, in input order, raised)."""
    if not items:
        return []
    ensure_ray()
    if is_ray_client():  # Ray Data's executor runs on a Ray node, not in a client
        return in_cluster(_map, items, show_progress, udf, **map_args)
    import ray.data

    _configure(show_progress)
    rows = [{"index": i, "item": pickle.dumps(item)} for i, item in enumerate(items)]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    out = sorted(dataset.map(udf, **map_args).take_all(), key=lambda row: row["index"])
    for row in out:
        if row["error"]:
            raise pickle.loads(row["error"])
    return [pickle.loads(row["result"]) for row in out]
