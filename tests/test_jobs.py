"""Long steps as Ray Jobs on a real head with its job server on loopback (token
authentication on, as on a cluster): a step's job answers through the storage root, is
found again by its key instead of submitted twice, raises its own exception, outlives a
driver that stops waiting, and is stopped when (and only when) its flow run is cancelled.

The full pipeline's jobs, a driver killed mid-training and the placement of job drivers
on the node that declares their resource are in test_cluster.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import pytest

from rzenembed.compute.jobs import (
    CANCEL_POLL_S,
    LOG_POLL_S,
    JobLost,
    JobRunner,
    JobSettings,
    StepCancelled,
    job_client,
    submission_base,
)
from rzenembed.compute.steps import run_step
from rzenembed.config import config_from_dict

from .ray_nodes import head_with_job_server, node_processes, stop_nodes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def job_server():
    """(job server URL, environment with the cluster's token, a storage root)."""
    root = Path(tempfile.mkdtemp(prefix="rzj-", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the tests' "no state API" address (conftest)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        _, dashboard = head_with_job_server(root, env, num_cpus=1, resources={"driver": 4})
        # This process is a client of the job server: it sends the cluster's token.
        os.environ.update({k: env[k] for k in saved})
        yield f"http://127.0.0.1:{dashboard}", env, root / "store"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_nodes([root])  # the head and any job driver still running
        shutil.rmtree(root, ignore_errors=True)


# The step functions below travel to the jobs by value: the jobs' drivers import the
# library, not the tests.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def job_config(address: str, store: Path) -> dict:
    return {
        "model": {"name_or_path": "unused"},
        "storage": {"root": str(store)},
        "compute": {"job_address": address, "driver_resources": {"driver": 1}, "job_poll_s": 0.5},
    }


def _square_all(values: list[int]) -> list[int]:
    from rzenembed.data.engine import run_shards

    return run_shards(_square, values, show_progress=False)


def _square(value: int) -> int:
    return value * value


def _refuse(value: int) -> None:
    raise ValueError(f"row {value} has no query")


def _nap_then(seconds: float, value: str) -> str:
    time.sleep(seconds)
    return value


def jobs_named(address: str, prefix: str) -> list:
    jobs = job_client(address).list_jobs()
    return [job for job in jobs if job.submission_id.startswith(prefix)]


def test_a_step_runs_as_a_job_is_found_again_by_its_key_and_raises_its_own_error(job_server):
    address, _, store = job_server
    cfg = config_from_dict(job_config(address, store))
    lines: list[str] = []
    ran = run_step(cfg, "square", "k1", _square_all, [1, 2, 3], log=lines.append)
    square = submission_base("square", "k1", str(store))
    assert square.startswith("rzenembed-square-k1-")  # and the storage root's tag
    assert (ran.value, ran.job, ran.reattached) == ([1, 4, 9], f"{square}-a1", False)
    folder = store / "_jobs" / ran.job
    assert (folder / "spec.pkl").is_file() and (folder / "result.pkl").is_file()
    assert lines[0] == f"square: submitted Ray Job {ran.job} at {address}"
    assert any("rzenembed job: square done" in line for line in lines)  # its log, streamed
    # The same key again (a Prefect retry, a restarted worker): the finished job answers.
    again: list[str] = []
    found = run_step(cfg, "square", "k1", _square_all, [1, 2, 3], log=again.append)
    assert (found.value, found.job, found.reattached) == ([1, 4, 9], ran.job, True)
    assert again[0].startswith(f"square: reattached to Ray Job {square}-a1")
    assert len(jobs_named(address, "rzenembed-square-k1-")) == 1
    # A forced recompute submits the next attempt.
    assert run_step(cfg, "square", "k1", _square_all, [2], fresh=True).value == [4]
    assert len(jobs_named(address, "rzenembed-square-k1-")) == 2
    # The job's exception, raised here as itself, naming the job.
    with pytest.raises(ValueError, match="row 7 has no query") as raised:
        run_step(cfg, "refuse", "k2", _refuse, 7)
    refuse = submission_base("refuse", "k2", str(store))
    assert f"raised in Ray Job {refuse}-a1" in raised.value.__notes__[0]
    # A failed attempt is not reattached to: the next run submits attempt 2.
    with pytest.raises(ValueError):
        run_step(cfg, "refuse", "k2", _refuse, 8)
    assert {j.submission_id for j in jobs_named(address, "rzenembed-refuse-k2-")} == {
        f"{refuse}-a1",
        f"{refuse}-a2",
    }
    # Another storage root: another job, never the first root's answer.
    other = config_from_dict(job_config(address, store.parent / "other-store"))
    assert run_step(other, "square", "k1", _square_all, [3]).value == [9]
    assert len(jobs_named(address, "rzenembed-square-k1-")) == 3


def test_a_driver_that_stops_waiting_leaves_the_job_running_for_the_next_to_find(job_server):
    address, _, store = job_server
    settings = JobSettings(address, str(store), entrypoint_resources={"driver": 1}, poll_s=0.5)
    first = JobRunner(settings, log=lambda line: None, cancelled=lambda: False)
    job = first.attach("nap", "k3", _nap_then, (6.0, "rested"), {})
    assert job.submitted

    def interrupt() -> None:  # the worker pod goes away while it waits
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        first.follow(job, "nap", on_poll=interrupt)
    assert first.client.get_job_status(job.submission_id).value in ("PENDING", "RUNNING")
    lines: list[str] = []
    asked = {"status": 0, "logs": 0, "cancelled": 0}
    second = JobRunner(settings, log=lines.append, cancelled=lambda: count("cancelled") or False)
    for name, key in (("get_job_info", "status"), ("get_job_logs", "logs")):
        ask = getattr(second.client, name)
        setattr(second.client, name, lambda *a, _ask=ask, _key=key: count(_key) or _ask(*a))

    def count(key: str) -> None:
        asked[key] += 1

    started = time.monotonic()
    value, found = second.run("nap", "k3", _nap_then, (6.0, "rested"))
    waited = time.monotonic() - started
    assert (value, found.submission_id, found.submitted) == ("rested", job.submission_id, False)
    assert lines[0].startswith(f"nap: reattached to Ray Job {job.submission_id}")
    assert any("rzenembed job: nap done" in line for line in lines)  # its log's end, streamed
    # The status every poll_s; the whole log at most every LOG_POLL_S, and once at the end;
    # whether the flow run was cancelled (Prefect's API) at most every CANCEL_POLL_S.
    assert asked["status"] >= 3, (asked, waited)
    assert asked["logs"] <= 2 + waited // LOG_POLL_S, (asked, waited)
    assert 1 <= asked["cancelled"] <= 1 + waited // CANCEL_POLL_S, (asked, waited)
    assert len(jobs_named(address, "rzenembed-nap-k3-")) == 1


def test_a_runner_told_of_a_cancelled_flow_run_stops_the_job(job_server):
    address, _, store = job_server
    settings = JobSettings(address, str(store), entrypoint_resources={"driver": 1}, poll_s=0.5)
    polls = []
    runner = JobRunner(settings, log=lambda line: None, cancelled=lambda: len(polls) >= 2)
    started = time.monotonic()
    nap = submission_base("nap", "k4", str(store))
    with pytest.raises(StepCancelled, match=f"stopped {nap}-a1"):
        runner.run("nap", "k4", _nap_then, (120.0, "never"), on_poll=lambda: polls.append(1))
    assert time.monotonic() - started < 60
    # Stopped and ended before the step says so.
    assert runner.client.get_job_status(f"{nap}-a1").value == "STOPPED"
    # A flow run that finds its job stopped by someone else is told to try again (a
    # retry submits the next attempt), not that it was cancelled.
    bystander = JobRunner(settings, log=lambda line: None, cancelled=lambda: False)
    with pytest.raises(JobLost, match="was stopped, not by this flow run"):
        bystander.outcome(f"{nap}-a1", "STOPPED")


def test_cancelling_the_flow_run_stops_its_job(job_server, prefect_api, tmp_path):
    """A real flow run in a separate driver process, cancelled through the Prefect API:
    the task's waiter sees the cancellation and stops the job; the driver ends."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    address, env, store = job_server
    config = json.dumps(job_config(address, store))
    key = f"cancel-{secrets.token_hex(4)}"
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        api = prefect_api
        driver = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.job_flows import sleepy_flow; "
             "sleepy_flow(sys.argv[1], 300.0, sys.argv[2])", config, key],
            cwd=REPO,
            env={**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        try:
            job = _wait_for_running(address, f"rzenembed-sleepy-{key}", driver)
            with get_client(sync_client=True) as client:
                sleepy = FlowFilter(name=FlowFilterName(any_=["sleepy-flow"]))  # not others'
                runs = client.read_flow_runs(flow_filter=sleepy)
                (run,) = [r for r in runs if r.parameters.get("key") == key]
                client.set_flow_run_state(run.id, Cancelling(), force=True)
            output, _ = driver.communicate(timeout=120)
        finally:
            driver.kill()
    assert job_client(address).get_job_status(job).value == "STOPPED", output
    assert f"stopping Ray Job {job}: the flow run was cancelled" in output


def test_stopping_the_head_leaves_none_of_its_processes(job_server):
    """Last in this module: the head is stopped the way every test node is, and nothing it
    started lives on (its agents retitle themselves and name no folder: once, they outlived
    it by a minute or two, some spinning a core)."""
    import psutil

    _, _, store = job_server
    head = store.parent / "head"
    started = []
    for pid in node_processes(str(head)):
        proc = psutil.Process(pid)
        started += [proc, *proc.children(recursive=True)]
    titles = {" ".join(p.cmdline())[:40] for p in started}
    assert any("DashboardAgent" in t for t in titles), titles  # the retitled ones are seen
    stop_nodes([head])
    alive = []
    for proc in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(" ".join(proc.cmdline())[:80])
    assert alive == []


def _wait_for_running(address: str, prefix: str, driver: subprocess.Popen) -> str:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        running = [j for j in jobs_named(address, prefix) if j.status.value == "RUNNING"]
        if running:
            return running[0].submission_id
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        time.sleep(1)
    raise AssertionError(f"no running job {prefix}*")
