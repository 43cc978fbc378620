"""What every pipeline task shares: the cache key, retries, the MLflow child run, refs.

A task's cache key is its step name, the digests of its inputs, the config section that
decides its output and the code version: the same inputs and settings never run twice
(Prefect reports the task "Cached"), whatever the parent run or the time. Transient
failures (IO, a lost Ray worker) are retried; bad input is not (it raises a ValueError,
or is rejected and counted by the step itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from rzenembed.compute.steps import Ran, run_step
from rzenembed.config import PipelineConfig, digest_of
from rzenembed.identity import source_digest
from rzenembed.tracking import LineageRef, Tracker

REPO_ROOT = Path(__file__).resolve().parent.parent
# The code that decides what a step produces: the library, and the tasks and flows that
# call it (a changed task can change what it passes to the library).
CODE_FOLDERS = ("rzenembed", "tasks", "flows")


@cache
def code_version() -> str:
    """Digest of the library's, tasks' and flows' source: a change in any of them
    invalidates every cached step."""
    return source_digest(REPO_ROOT, CODE_FOLDERS)


@dataclass
class RunContext:
    """Where a task reports: the MLflow parent run of this pipeline execution.

    Not part of any cache key: a step done for one execution is reused by the next.
    """

    parent_run_id: str | None = None

    def tracker(self, cfg: PipelineConfig) -> Tracker:
        return Tracker(cfg.tracking)


def step_cache_key(step: str, section: Any, inputs: list[str]) -> str:
    payload = json.dumps([step, digest_of(section), sorted(inputs), code_version()])
    return f"rzenembed-{step}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"


def keyed(step: str, section_fn, inputs_fn):
    """A Prefect ``cache_key_fn`` from a step name, the config section, input digests and
    the tracking store: a step cached for one MLflow store runs again for another, finds its
    output on the storage root by key (nothing is recomputed) and writes its run, metrics
    and lineage into that store, so every store that shows a model shows how it was made."""

    def key(_context, parameters: dict[str, Any]) -> str:
        section = section_fn(parameters)
        cfg = parameters.get("cfg")
        if cfg is not None:
            section = {"section": section, "tracking_store": cfg.tracking.tracking_uri}
        return step_cache_key(step, section, inputs_fn(parameters))

    return key


def running_task_key() -> str:
    """The cache key of the task running now (its transaction's key): what names the
    task's Ray Job, so a retry or a rerun of the same work finds the same job."""
    from prefect.transactions import get_transaction

    transaction = get_transaction()
    if transaction is None or not transaction.key:
        raise RuntimeError("no cache key: run_in_job is for tasks with a cache_key_fn")
    return transaction.key.removeprefix("rzenembed-")


def _refreshing() -> bool:
    """Whether the running task was asked to recompute (``refresh=True``)."""
    from prefect.context import TaskRunContext

    context = TaskRunContext.get()
    return bool(context is not None and context.task.refresh_cache)


def flow_run_cancelled() -> bool:
    """Whether the flow run this task belongs to is being cancelled (or was): a step's
    Ray Job is stopped then, and only then."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return False
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def run_in_job(
    cfg: PipelineConfig,
    step: str,
    fn: Callable[..., Any],
    *args: Any,
    key: str | None = None,
    timeout_s: float | None = None,
    on_poll: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Ran:
    """``fn(*args, **kwargs)`` through ``rzenembed.compute.run_step``: a Ray Job named by
    ``key`` (default: this task's cache key) when a job server is configured, else here.
    The job's log lines go to the task's log; a cancelled flow run stops the job; a task
    run with ``refresh`` submits a new attempt instead of reusing a finished one."""
    from prefect import get_run_logger

    logger = get_run_logger()
    return run_step(
        cfg,
        step,
        key or running_task_key().removeprefix(f"{step}-"),
        fn,
        *args,
        timeout_s=timeout_s,
        on_poll=on_poll,
        cancelled=flow_run_cancelled,
        log=logger.info,
        fresh=_refreshing(),
        **kwargs,
    )


def with_job(ref: dict[str, Any], ran: Ran) -> dict[str, Any]:
    """A lineage ref naming the Ray Job that computed it (none when computed in process)."""
    if ran.job:
        ref["extra"] = {**ref.get("extra", {}), "job": ran.job}
    return ref


def is_transient(exc: BaseException) -> bool:
    """IO and lost-worker errors are worth a retry; anything else is not (a step that ran
    past compute.step_timeout_s would only run past it again)."""
    from rzenembed.compute.waiting import StepTimeout

    if isinstance(exc, ValueError | TypeError | KeyError | NotImplementedError | StepTimeout):
        return False
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    module = type(exc).__module__
    return module.startswith("ray.") and "TaskError" not in type(exc).__name__


def retry_transient(_task, _task_run, state) -> bool:
    try:
        state.result()
    except BaseException as exc:  # the failure the state carries
        return is_transient(exc)
    return False


RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_transient}


@contextmanager
def step_run(
    cfg: PipelineConfig, ctx: RunContext, step: str, name: str, section: Mapping[str, Any]
) -> Iterator[tuple[Tracker, str]]:
    """An MLflow child run for one step: FINISHED when the body returns, FAILED if it raises."""
    tracker = ctx.tracker(cfg)
    run_id = tracker.start_step(ctx.parent_run_id, step, name, section)
    try:
        yield tracker, run_id
    except BaseException:
        tracker.end(run_id, failed=True)
        raise
    tracker.end(run_id)


def version_ref(version, name: str | None = None, run_id: str | None = None) -> dict[str, Any]:
    """A dataset version as a lineage ref dict (what data tasks return)."""
    manifest = version.manifest
    ref = LineageRef(
        kind="dataset", name=name or f"{manifest.dataset}/{manifest.step}", uri=version.uri,
        digest=version.content_digest, run_id=run_id,
        extra={"rows": manifest.rows, "rejected": manifest.rejected,
               "reject_counts": dict(manifest.reject_counts), "dataset": manifest.dataset,
               "step": manifest.step},
    )  # fmt: skip
    if "eval_overlap" in manifest.stats:
        ref.extra["eval_overlap"] = dict(manifest.stats["eval_overlap"])
    return ref.to_json()


def eval_sets_ref(against: Mapping[str, Any]) -> LineageRef:
    """The evaluation sets a clean step decontaminated against (the version's
    ``decontaminated_against`` stat), as a lineage input."""
    return LineageRef(
        kind="eval-sets",
        name="decontamination",
        uri=",".join(against["sets"]),
        digest=against["digest"],
        extra={"sets": list(against["sets"])},
    )


def as_ref(data: Mapping[str, Any]) -> LineageRef:
    return LineageRef.from_json(data)
