"""Where a step runs: in this process, or as a Ray Job on the cluster; and the Ray tasks a
step starts for its model work.

``run_step`` is the one decision. With a job server configured (``compute.job_address`` or
``RZENEMBED_JOB_ADDRESS``: ``http://head:8265``) the step's function runs as a Ray Job
(``rzenembed.compute.jobs``) and this process only submits, follows and reads the result
from storage: the Prefect worker pod holds no Ray connection at all. Without one (the
embedded default, a driver on a Ray node) and inside a job, it runs here.

``submit_on_ray`` / ``on_ray`` run a step's model work (merge, soup) as a Ray task with
the step's resources (``compute.step_gpus``, ``step_cpus``, ``step_resources``), admitted
first on what the cluster has free.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from rzenembed.compute.admission import admit_for
from rzenembed.compute.connect import ensure_ray
from rzenembed.compute.jobs import JOB_ENV, JobRunner, JobSettings
from rzenembed.compute.waiting import wait_for
from rzenembed.config import PipelineConfig

T = TypeVar("T")
JOB_ADDRESS_ENV = "RZENEMBED_JOB_ADDRESS"


def inside_job() -> str | None:
    """The submission id of the Ray Job this process is the driver of, if any."""
    return os.environ.get(JOB_ENV) or None


def job_address(cfg: PipelineConfig) -> str | None:
    """The job server long steps go to; None where they run in this process (no server
    configured, or this process already is a step's job)."""
    if inside_job():
        return None
    return cfg.compute.job_address or os.environ.get(JOB_ADDRESS_ENV) or None


@dataclass(frozen=True)
class Ran(Generic[T]):
    """A step's result and the Ray Job that computed it (None: computed in this process)."""

    value: T
    job: str | None = None
    # Whether this process found the job already running or finished (a retry, a
    # restarted worker) rather than submitting it.
    reattached: bool = False


def run_step(
    cfg: PipelineConfig,
    step: str,
    key: str,
    fn: Callable[..., T],
    *args: Any,
    timeout_s: float | None = None,
    on_poll: Callable[[], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    fresh: bool = False,
    **kwargs: Any,
) -> Ran[T]:
    """``fn(*args, **kwargs)`` where the step belongs (see the module docstring). ``key``
    names the step's work (its run or cache key): a retried step with the same key finds
    its job again. ``timeout_s`` bounds a job's run; ``on_poll`` runs at every poll of a
    job (progress); ``cancelled`` says whether the flow run was cancelled (the job is
    stopped then); ``log`` receives the job's log lines; ``fresh`` submits a new attempt
    even when one with this key succeeded (the step itself may still return an output it
    finds published, as training, merge, soup and evaluation do)."""
    address = job_address(cfg)
    if address is None:
        return Ran(fn(*args, **kwargs))
    settings = JobSettings(
        address=address,
        root=cfg.storage.root,
        endpoint_url=cfg.storage.endpoint_url,
        entrypoint_resources=dict(cfg.compute.driver_resources),
        poll_s=cfg.compute.job_poll_s,
    )
    runner = JobRunner(settings, log=log, cancelled=cancelled)
    value, job = runner.run(
        step,
        key,
        fn,
        args,
        kwargs,
        timeout_s=timeout_s,
        on_poll=on_poll,
        fresh=fresh,
        concurrency=cfg.compute.max_jobs,
    )
    return Ran(value, job.submission_id, reattached=not job.submitted)


# --------------------------------------------------------------------------- model tasks


def step_gpus(cfg: PipelineConfig) -> float:
    compute = cfg.compute
    if compute.step_gpus is not None:
        return compute.step_gpus
    return 1.0 if compute.use_gpu else 0.0


def step_bundle(cfg: PipelineConfig, gpus: float | None = None, cpus: float | None = None):
    """What one model task or evaluation actor asks for: GPUs, CPUs and
    ``compute.step_resources`` (e.g. ``{"pipeline": 1}``, so it lands on a training node,
    never on a serving one). A task with no GPU asks for no custom resource."""
    gpus = step_gpus(cfg) if gpus is None else gpus
    cpus = cfg.compute.step_cpus if cpus is None else cpus
    custom = dict(cfg.compute.step_resources) if gpus else {}
    return gpus, cpus, custom


def submit_on_ray(
    cfg: PipelineConfig,
    fn: Callable[..., Any],
    *args: Any,
    gpus: float | None = None,
    cpus: float | None = None,
    **kwargs: Any,
) -> Any:
    """Start ``fn(*args, **kwargs)`` as a Ray task with the step's resources, once they
    are free (``admission``); its ref."""
    import ray

    ensure_ray(address=cfg.compute.ray_address)
    num_gpus, num_cpus, custom = step_bundle(cfg, gpus, cpus)
    name = getattr(fn, "__name__", "step").strip("_")
    admit_for(cfg.compute, f"the {name} task", 1, {"GPU": num_gpus, "CPU": num_cpus, **custom})
    options = {"num_gpus": num_gpus, "num_cpus": num_cpus, "max_retries": 0}
    if custom:
        options["resources"] = custom
    return ray.remote(fn).options(**options).remote(*args, **kwargs)


def on_ray(cfg: PipelineConfig, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``submit_on_ray``, waited for (a progress line every minute, cancelled after
    ``compute.step_timeout_s``): the task's result."""
    name = getattr(fn, "__name__", "step").strip("_")
    return wait_for(submit_on_ray(cfg, fn, *args, **kwargs), name, cfg.compute.step_timeout_s)
