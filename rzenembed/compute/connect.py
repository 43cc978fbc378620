"""How a process reaches Ray: join a cluster by address, connect as a Ray Client, or start
a local runtime once.

An address is either a GCS address (``head:6379``: the process runs on a machine that
hosts a Ray node) or a Ray Client address (``ray://head:10001``: a process anywhere).
Ray Client is for short calls only (deploying the endpoint, reading the cluster's
resources): Ray ends a client's workload after a 30 s disconnect, so a long step never
runs through it; on a cluster, long steps are Ray Jobs (``rzenembed.compute.jobs``).

A local runtime declares ``serving`` slots beside its CPUs: endpoint replicas ask for one
(``serve.resources``) instead of a CPU, so the endpoint never holds what training needs,
as on a cluster where serving has its own nodes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
# Connections tried when the head fails to start a Ray Client server for this driver.
CLIENT_ATTEMPTS = 4
# How long a failed connection attempt waits for each of its stream threads (see
# ``abandoned_streams``); they end once the attempt's channel is closed.
FAILED_ATTEMPT_WAIT_S = 1.0
# One connecting thread at a time swaps Ray's close methods (``abandoned_streams``).
_STREAMS_PATCHED = threading.Lock()
# Serving slots of a local runtime (one per endpoint replica, see the module docstring).
LOCAL_SERVING_SLOTS = 8
# Every Ray node's agent gathers per-process statistics (psutil over every worker, its
# memory maps included) every REPORTER_UPDATE_INTERVAL_MS (Ray's default 5 s) for Ray's
# dashboard. A local runtime has no dashboard to show them, and beside a training or an
# endpoint (workers holding torch) the gathering cost about a quarter of a core
# (docs/PERFORMANCE.md, "The test suite", tenth session). Local runtimes and the local
# stack's node gather once a minute; a cluster keeps Ray's default, for its dashboard.
LOCAL_REPORTER_INTERVAL_MS = "60000"
# Every worker of a node also exports Ray's own metrics to the node's agent every few
# seconds, which ingests them point by point for a Prometheus that a local runtime does not
# have (half of a local agent's work while training ran). Local runtimes and the local
# stack's node collect none; a cluster keeps them.
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False}
REPORTER_INTERVAL_ENV = "REPORTER_UPDATE_INTERVAL_MS"


def local_node_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for the processes of a local Ray node (``ray start`` or ``ray.init``): the
    agent's statistics interval of a node without a dashboard, unless set already."""
    return {REPORTER_INTERVAL_ENV: LOCAL_REPORTER_INTERVAL_MS, **env}


@contextmanager
def local_node_environment() -> Iterator[None]:
    """``os.environ`` as ``local_node_env`` gives it while a local runtime starts (its
    raylet and agent take the starting process's environment), then as it was: the
    setting reaches the node's processes, not this process's other children."""
    added = {k: v for k, v in local_node_env({}).items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


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
        from ray._private import ray_constants

        # A local runtime is one node, so it keeps the node address 127.0.0.1 and every
        # listener (GCS, raylet, workers, agents) binds to loopback; with Ray's cluster
        # switch on (its Linux default) it takes the machine's address and listens on every
        # interface. The module constant, for this start only, not
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: in the environment it would reach `ray start`
        # processes started from here (a node started with it cannot join a cluster), and
        # left off, a later driver of a real cluster in this process would give 127.0.0.1.
        switch = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            with local_node_environment():
                ray.init(
                    # "local": always a fresh runtime for this process, never a cluster that a
                    # stale /tmp/ray/ray_current_cluster file points at.
                    address="local",
                    num_cpus=num_cpus or os.cpu_count() or 1,
                    resources={"serving": LOCAL_SERVING_SLOTS},
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    _system_config=LOCAL_SYSTEM_CONFIG,
                )
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = switch


def connect_client(address: str, attempts: int = CLIENT_ATTEMPTS, pause_s: float = 2.0) -> None:
    """Connect through Ray Client, trying again when the head's proxy fails to start this
    client's server process (``ConnectionAbortedError``: "Starting Ray client server
    failed"). The proxy forks that process from a busy multi-threaded server, and on a
    loaded head a start can fail once and succeed on the next connection, which gets a new
    process on a new port. A head that cannot be reached at all (``ConnectionError`` after
    Ray's own connect timeout) is not tried again: waiting longer would not help."""
    import ray

    for attempt in range(1, attempts + 1):
        started = time.monotonic()
        try:
            with abandoned_streams():
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
                "(attempt %d of %d, %.1f s); connecting again in %.0f s",
                address,
                attempt,
                attempts,
                time.monotonic() - started,
                pause_s * attempt,
            )
            time.sleep(pause_s * attempt)


@contextmanager
def abandoned_streams(wait_s: float = FAILED_ATTEMPT_WAIT_S) -> Iterator[None]:
    """While connecting: a failed attempt's clean-up waits at most ``wait_s`` for each of its
    two stream threads instead of until the head's proxy lets the streams go.

    A Ray Client connection opens a data stream and a log stream to the head's proxy. When
    the proxy fails to start this client's server, it answers the data stream's first
    request with the failure, then keeps that stream open for the client's reconnect grace
    period (``RAY_CLIENT_RECONNECT_GRACE_PERIOD``, 30 s by default) and the log stream while
    it retries the dead server's channel (5 tries of ``RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S``
    + 2 s). Ray's clean-up of the failed attempt joins both threads with no timeout: half a
    minute or more per failed attempt, for nothing. Closing the attempt's channel, the next
    step of that clean-up, cancels both streams and ends both threads (daemons), so nothing
    is left behind. Ray's own ``close`` still runs; only its unbounded joins are bounded,
    and only inside this block (one thread's block at a time: the methods are the class's)."""
    from ray.util.client.dataclient import DataClient
    from ray.util.client.logsclient import LogstreamClient

    def bounded(ray_close, thread_attribute: str):
        def close(self) -> None:
            thread = getattr(self, thread_attribute)
            setattr(self, thread_attribute, None)  # Ray's close joins no thread
            try:
                ray_close(self)
            finally:
                setattr(self, thread_attribute, thread)
            if thread is not None:
                thread.join(timeout=wait_s)

        return close

    with _STREAMS_PATCHED:
        saved = [(DataClient, DataClient.close), (LogstreamClient, LogstreamClient.close)]
        DataClient.close = bounded(DataClient.close, "data_thread")
        LogstreamClient.close = bounded(LogstreamClient.close, "log_thread")
        try:
            yield
        finally:
            for cls, ray_close in saved:
                cls.close = ray_close


def is_ray_client() -> bool:
    """Whether this process reaches Ray through Ray Client (it hosts no Ray node)."""
    from ray.util.client import ray as client

    return client.is_connected()


class LongStepThroughClient(RuntimeError):
    """Long work (Ray Data, Ray Train) asked for through a Ray Client connection."""


def refuse_client(what: str) -> None:
    """Raise when this process is a Ray Client: ``what`` (a Ray Data map, a Ray Train run)
    must be driven from a Ray node, and on a cluster that means a Ray Job."""
    if is_ray_client():
        raise LongStepThroughClient(
            f"{what} cannot be driven through Ray Client (ray://): Ray ends a client's "
            "work after a 30 s disconnect. Set compute.job_address (or "
            "RZENEMBED_JOB_ADDRESS) to the head's job server, e.g. http://head:8265, so "
            "that long steps run as Ray Jobs (docs/operations.md)."
        )
