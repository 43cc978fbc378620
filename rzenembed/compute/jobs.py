"""Long steps as Ray Jobs: submitted once, found again after a restart, results from storage.

A step that runs for hours (a preparation step, a training stage, merge, soup, an
evaluation) is one Ray Job on the cluster: ``python -m rzenembed.compute.job_main`` runs
the step's function as the job's driver, on a Ray node, and writes what it returns (or
the exception it raised) next to its inputs on the storage root::

    <storage.root>/_jobs/<submission id>/spec.pkl     the function and its arguments
                                          result.pkl   its return value
                                          error.pkl    or its exception and traceback

The submission id is the step's name and key (the run key of a training run, the cache key
of any other step) plus an attempt number: ``rzenembed-train-stage1-<key>-a1``. A Prefect
retry or a restarted worker pod computes the same key, lists the cluster's jobs and
*reattaches* to the latest attempt when it is pending, running or has succeeded; only
after a failed or stopped attempt is the next one submitted. The connection carries
nothing but status and logs: killing the submitting process leaves the job running.

While it waits, the runner streams the job's new log lines to ``log``, calls ``on_poll``
(the caller's progress) and asks ``cancelled()`` whether the flow run was cancelled: then
it stops the job. An interrupted wait (a signal, a crash of the caller) stops the job only
when ``cancelled()`` says so; a pod restart leaves it running for the next attempt to find.

The spec is a cloudpickle of library functions and plain values written by the pipeline
into its own storage root, read back by the pipeline's own jobs: the same trust as Ray's
own pickled tasks. Anyone who may write ``<root>/_jobs`` may already run code there.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rzenembed.compute.waiting import StepTimeout
from rzenembed.data.folders import exists, write_bytes
from rzenembed.data.storage import filesystem, join

logger = logging.getLogger(__name__)
# The environment variable a job's driver sets to its submission id (job_main): inside a
# job, every step runs in process (a job never submits another).
JOB_ENV = "RZENEMBED_JOB"
ACTIVE = ("PENDING", "RUNNING")
# Log lines shown again when a driver reattaches to a job that is already running.
REATTACH_TAIL_LINES = 20
# Submissions tried while a freshly started head has no job agent yet (about a minute).
SUBMIT_TRIES = 10
# How long a waiting step keeps asking a job server that does not answer, and how long
# one request may take.
UNREACHABLE_S = 300.0
REQUEST_TIMEOUT_S = 60.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class JobFailed(RuntimeError):
    """A step's job ended FAILED with no exception of its own to raise (its driver died)."""


class JobLost(ConnectionError):
    """A job that ended without an answer (its driver or node was lost): worth a retry."""


class StepCancelled(RuntimeError):
    """The step's job was stopped: the flow run was cancelled, or someone stopped it."""


@dataclass(frozen=True)
class JobSettings:
    """Where jobs go and what their drivers ask for."""

    address: str  # the head's job server, http://head:8265
    root: str  # storage.root: specs and results
    endpoint_url: str | None = None
    # What each job's driver asks (e.g. {"driver": 1}: the head declares the slots).
    entrypoint_resources: dict[str, float] = field(default_factory=dict)
    poll_s: float = 5.0
    python: str = "python"  # the interpreter on the cluster's image


# A job's new log lines are fetched at most this often while it runs (and all of them when
# it ends), however often its status is polled: a status is a small answer from the GCS,
# a log the whole file read by a node's agent (at the simulated cluster's 0.5 s poll, the
# head's agent read every running job's whole log twice a second).
LOG_POLL_S = 5.0
# Whether the flow run was cancelled is asked at most this often (a read of the
# orchestrator's API, through a client of its own): a short status poll notices a job's end
# sooner without multiplying reads of Prefect's API (the simulated cluster's 0.5 s poll
# asked it twice a second per running job, a tenth of its server's CPU).
CANCEL_POLL_S = 5.0
_ENV_LOCK = threading.Lock()
# Ray's job client prefers these to the address it is given (a Prefect worker pod that
# keeps RAY_ADDRESS=ray://head:10001 for short calls would otherwise reach the job server
# through a Ray Client connection).
_OVERRIDING_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def job_client(address: str, timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
    """A ``JobSubmissionClient`` for exactly ``address``, sending the cluster's token
    (``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH`` names) when there is one: Ray
    adds it only where it decided at start-up that token authentication is on, and a
    process that used another Ray before (a local runtime) decided otherwise. Every request
    times out after ``timeout_s`` (Ray's client sets none: a half-open connection to a
    preempted head would block a waiting step for ever)."""
    from ray.job_submission import JobSubmissionClient

    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _ENV_LOCK:
        saved = {k: os.environ.pop(k) for k in _OVERRIDING_ENV if k in os.environ}
        try:
            client = JobSubmissionClient(address, headers=headers)
        finally:
            os.environ.update(saved)
    request = client._do_request
    client._do_request = functools.partial(request, timeout=(10.0, timeout_s))
    return client


def root_tag(root: str) -> str:
    """Eight hex digits of the storage root: two pipelines on one cluster with different
    roots never share a job (a job's answer lives under its root)."""
    return hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:8]


def submission_base(step: str, key: str, root: str = "") -> str:
    """``rzenembed-<step>-<key>[-<root tag>]``: letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{step}-{key}".lower()).strip("-")
    return f"rzenembed-{slug}" + (f"-{root_tag(root)}" if root else "")


def attempt_of(submission_id: str, base: str) -> int | None:
    """The attempt number of ``<base>-a<n>``; None for another step's job."""
    match = re.fullmatch(re.escape(base) + r"-a(\d+)", submission_id or "")
    return int(match.group(1)) if match else None


def _missing(error: BaseException) -> bool:
    """A job server's answer that the job does not exist (HTTP 404)."""
    return "status code 404" in str(error)


@dataclass
class Attached:
    """The job a step runs as, and whether this process submitted it or found it."""

    submission_id: str
    submitted: bool


# Concurrent jobs one process follows per job server: more would queue on the head's driver
# slots, where Ray fails a job that waits for its driver longer than 15 minutes.
_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}


def _slots(address: str, count: int) -> threading.BoundedSemaphore:
    with _ENV_LOCK:
        return _SLOTS.setdefault((address, count), threading.BoundedSemaphore(count))


class JobRunner:
    """Runs one step's function as a Ray Job and waits for its result (see the module
    docstring). ``log`` receives the job's log lines and the runner's own notes;
    ``cancelled`` says whether the flow run was cancelled."""

    def __init__(
        self,
        settings: JobSettings,
        log: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        client: Any = None,
    ):
        self.settings = settings
        self.log = log or logger.info
        self.cancelled = cancelled
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = job_client(self.settings.address)
        return self._client

    def folder(self, submission_id: str) -> str:
        return join(self.settings.root, "_jobs", submission_id)

    def _ask(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()`` against the job server, asked again for ``UNREACHABLE_S`` while the
        server does not answer (a head restarting, a network blip); a 404 is an answer."""
        since = time.monotonic()
        while True:
            try:
                return call()
            except (ConnectionError, OSError, RuntimeError) as error:
                if _missing(error):
                    raise
                if time.monotonic() - since > UNREACHABLE_S:
                    raise JobLost(
                        f"{what}: the job server at {self.settings.address} did not answer "
                        f"for {UNREACHABLE_S:g} s ({error}); a rerun of this step finds its "
                        "job again if it still runs"
                    ) from error
                logger.warning("%s: job server not answering (%s); asking again", what, error)
                time.sleep(self.settings.poll_s)

    def _info(self, step: str, submission_id: str) -> Any:
        """The job's details; ``JobLost`` when the job server no longer knows it (its head
        restarted without GCS fault tolerance: the job is gone, a retry submits anew)."""
        try:
            return self._ask(step, lambda: self.client.get_job_info(submission_id))
        except RuntimeError as error:
            if _missing(error):
                raise JobLost(
                    f"{step}: the job server no longer knows Ray Job {submission_id} (its "
                    "head restarted?); a retry of this step submits a new attempt"
                ) from error
            raise

    # ----------------------------------------------------------------- submit or find

    def latest(self, base: str) -> tuple[int, Any]:
        """The step's latest attempt (its number and details; ``(0, None)`` for none),
        found by asking for ``<base>-a1``, ``-a2``... in turn: a cluster's job table holds
        every job ever run, and listing it all on every step would not scale."""
        number, found = 0, None
        while True:
            candidate = f"{base}-a{number + 1}"
            try:
                info = self._ask(candidate, lambda c=candidate: self.client.get_job_info(c))
            except RuntimeError as error:
                if _missing(error):
                    return number, found
                raise
            number, found = number + 1, info

    def attach(
        self,
        step: str,
        key: str,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
        fresh: bool = False,
    ) -> Attached:
        """The step's latest job when it is pending, running or succeeded with its answer
        on storage (``fresh``: not when it succeeded); else a new attempt, submitted with
        ``fn(*args, **kwargs)``. Nothing is submitted for a cancelled flow run."""
        base = submission_base(step, key, self.settings.root)
        latest, info = self.latest(base)
        if info is not None:
            sid, status = info.submission_id, str(info.status.value)
            answered = status == "SUCCEEDED" and self._has(sid, "result.pkl")
            if status in ACTIVE or (answered and not fresh):
                return Attached(sid, submitted=False)
            why = "succeeded but its result.pkl is gone" if status == "SUCCEEDED" else status
            self.log(f"{step}: Ray Job {sid} {why}; submitting attempt {latest + 1}")
        if self._cancel_requested():
            raise StepCancelled(f"{step}: the flow run was cancelled; nothing submitted")
        return self._submit(f"{base}-a{latest + 1}", step, key, fn, args, kwargs)

    def _has(self, submission_id: str, name: str) -> bool:
        return exists(join(self.folder(submission_id), name), self.settings.endpoint_url)

    def _submit(
        self,
        submission_id: str,
        step: str,
        key: str,
        fn: Callable[..., Any],
        args: tuple,
        kwargs: dict,
    ) -> Attached:
        import cloudpickle

        folder, endpoint = self.folder(submission_id), self.settings.endpoint_url
        # A job table lost with its head starts numbering again: an earlier attempt's
        # answer under the same name must not pass for this one's.
        fs, path = filesystem(folder, endpoint)
        for stale in ("result.pkl", "error.pkl"):
            if fs.exists(f"{path}/{stale}"):
                fs.rm(f"{path}/{stale}")
        spec = {"fn": fn, "args": args, "kwargs": kwargs, "step": step, "key": key}
        write_bytes(join(folder, "spec.pkl"), cloudpickle.dumps(spec), endpoint)
        command = [self.settings.python, "-m", "rzenembed.compute.job_main", join(folder)]
        if endpoint:
            command += ["--endpoint-url", endpoint]
        for attempt in range(SUBMIT_TRIES):
            try:
                self.client.submit_job(
                    entrypoint=" ".join(_quote(part) for part in command),
                    submission_id=submission_id,
                    metadata={"rzenembed.step": step, "rzenembed.key": key},
                    entrypoint_num_cpus=0,
                    entrypoint_resources=dict(self.settings.entrypoint_resources) or None,
                )
                return Attached(submission_id, submitted=True)
            except RuntimeError as error:
                # Another driver submitted the same attempt a moment ago: follow that one.
                if "already exists" in str(error):
                    return Attached(submission_id, submitted=False)
                # A head that has just started has no job agent yet.
                if "No available agent" not in str(error) or attempt == SUBMIT_TRIES - 1:
                    raise
                time.sleep(min(10.0, 1.0 + attempt))
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- wait

    def run(
        self,
        step: str,
        key: str,
        fn: Callable[..., Any],
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        timeout_s: float | None = None,
        on_poll: Callable[[], None] | None = None,
        fresh: bool = False,
        concurrency: int | None = None,
    ) -> tuple[Any, Attached]:
        """``fn(*args, **kwargs)`` as the step's job (submitted or found): its result and
        the job. At most ``concurrency`` steps of this process hold a job at once."""
        slots = _slots(self.settings.address, concurrency) if concurrency else None
        if slots is not None and not slots.acquire(blocking=False):
            self.log(f"{step}: waiting for one of {concurrency} job slots (compute.max_jobs)")
            slots.acquire()
        try:
            job = self.attach(step, key, fn, args, kwargs or {}, fresh)
            verb = "submitted" if job.submitted else "reattached to"
            self.log(f"{step}: {verb} Ray Job {job.submission_id} at {self.settings.address}")
            status = self.follow(job, step, timeout_s, on_poll)
            return self.outcome(job.submission_id, status), job
        finally:
            if slots is not None:
                slots.release()

    def follow(
        self,
        job: Attached,
        step: str,
        timeout_s: float | None = None,
        on_poll: Callable[[], None] | None = None,
    ) -> str:
        """Wait until the job ends (its final status), streaming its logs; stop it on a
        cancelled flow run (asked every ``CANCEL_POLL_S`` at most) or past ``timeout_s``
        (counted from the job's start)."""
        logs = _LogCursor(tail_first=not job.submitted)
        sid = job.submission_id
        last_logs = 0.0
        last_cancel_check = -float("inf")
        try:
            while True:
                info = self._info(step, sid)
                status = str(info.status.value)
                if status in ACTIVE or job.submitted or logs.offset:
                    # The whole log comes back each time, read from its file by the agent
                    # of the driver's node: every LOG_POLL_S at most early on, then less
                    # often (a log of a day's training is large).
                    every = max(self.settings.poll_s, LOG_POLL_S) if logs.offset < 2**20 else 60.0
                    if status not in ACTIVE or time.monotonic() - last_logs >= every:
                        text = self._ask(step, lambda: self.client.get_job_logs(sid))
                        self._emit(logs.new_lines(text))
                        last_logs = time.monotonic()
                elif not logs.offset:  # found finished: one line, not its whole history
                    logs.offset = 1
                    self.log(f"{step}: Ray Job {sid} had finished ({status}); its log: "
                             f"ray job logs {sid}")  # fmt: skip
                if on_poll is not None:
                    _quietly(on_poll)
                if status not in ACTIVE:
                    return status
                now = time.monotonic()
                if now - last_cancel_check >= max(self.settings.poll_s, CANCEL_POLL_S):
                    last_cancel_check = now
                    if self._cancel_requested():
                        self._stop(sid, "the flow run was cancelled")
                        raise StepCancelled(f"{step}: the flow run was cancelled; stopped {sid}")
                started = (info.start_time or 0) / 1000.0
                if timeout_s is not None and started and time.time() - started > timeout_s:
                    self._stop(sid, f"it ran past compute.step_timeout_s = {timeout_s:g} s")
                    raise StepTimeout(
                        f"{step}: Ray Job {sid} not done after {timeout_s:g} s "
                        "(compute.step_timeout_s); stopped"
                    )
                time.sleep(self.settings.poll_s)
        except (StepCancelled, StepTimeout, JobLost):
            raise
        except BaseException:
            if self._cancel_requested():
                self._stop(sid, "the flow run was cancelled")
            else:
                self.log(
                    f"{step}: stopped waiting; Ray Job {sid} keeps running and a rerun of "
                    "this step reattaches to it"
                )
            raise

    def outcome(self, submission_id: str, status: str) -> Any:
        """What a finished job answered: its result, or its exception raised here."""
        import cloudpickle

        folder, endpoint = self.folder(submission_id), self.settings.endpoint_url
        if status == "SUCCEEDED":
            if not exists(join(folder, "result.pkl"), endpoint):
                raise JobLost(f"Ray Job {submission_id} succeeded but wrote no result.pkl")
            return cloudpickle.loads(_read(join(folder, "result.pkl"), endpoint))
        if status == "STOPPED":
            if self._cancel_requested():
                raise StepCancelled(f"Ray Job {submission_id} was stopped")
            # Stopped by someone else (another flow run following the same job was
            # cancelled, `ray job stop`): worth a retry, which submits the next attempt.
            raise JobLost(f"Ray Job {submission_id} was stopped, not by this flow run")
        if exists(join(folder, "error.pkl"), endpoint):
            try:
                error, trace = cloudpickle.loads(_read(join(folder, "error.pkl"), endpoint))
            except Exception as unreadable:  # an exception that pickles but cannot load
                raise JobFailed(
                    f"Ray Job {submission_id} failed; its error could not be read here "
                    f"({unreadable}); `ray job logs {submission_id}` shows it"
                ) from unreadable
            error.add_note(f"raised in Ray Job {submission_id}:\n{trace}")
            raise error
        logs = self._ask(submission_id, lambda: self.client.get_job_logs(submission_id))
        tail = "\n".join(_clean(logs).splitlines()[-30:])
        info = self._ask(submission_id, lambda: self.client.get_job_info(submission_id))
        raise JobLost(
            f"Ray Job {submission_id} ended {status} without an answer ({info.message}); "
            f"its last log lines:\n{tail}"
        )

    def _cancel_requested(self) -> bool:
        if self.cancelled is None:
            return False
        try:
            return bool(self.cancelled())
        except Exception:  # the orchestrator unreachable: never stop a job on a guess
            logger.warning("could not read whether the flow run was cancelled", exc_info=True)
            return False

    def _stop(self, submission_id: str, why: str, wait_s: float = 60.0) -> None:
        """Stop the job and wait (a bounded while) until it has ended: the caller may
        report the step cancelled only once its work is gone. A job server that does not
        answer is logged, never raised: the caller's own error (the cancel, a signal)
        is what the step ends with."""
        self.log(f"stopping Ray Job {submission_id}: {why}")
        try:
            self.client.stop_job(submission_id)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                if str(self.client.get_job_status(submission_id).value) not in ACTIVE:
                    return
                time.sleep(0.5)
            self.log(f"Ray Job {submission_id} still running {wait_s:g} s after the stop")
        except Exception as error:
            self.log(f"could not stop Ray Job {submission_id} ({error}); `ray job stop` it")

    def _emit(self, lines: list[str]) -> None:
        for line in lines:
            self.log(line)


class _LogCursor:
    """The part of a job's log not shown yet, in whole lines. A reattached driver shows
    the last ``REATTACH_TAIL_LINES`` lines first, not the whole history."""

    def __init__(self, tail_first: bool):
        self.offset = 0
        self.tail_first = tail_first

    def new_lines(self, text: str) -> list[str]:
        complete = text[: text.rfind("\n") + 1]
        new = complete[self.offset :]
        self.offset = len(complete)
        lines = [_clean(line) for line in new.splitlines() if line.strip()]
        if self.tail_first:
            self.tail_first = False
            if len(lines) > REATTACH_TAIL_LINES:
                skipped = len(lines) - REATTACH_TAIL_LINES
                lines = [f"({skipped} earlier log lines)", *lines[-REATTACH_TAIL_LINES:]]
        return lines


def _clean(text: str) -> str:
    return _ANSI.sub("", text)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # progress is cosmetic; never fail a step for it
        logger.debug("progress callback failed", exc_info=True)


def _read(uri: str, endpoint_url: str | None) -> bytes:
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "rb") as f:
        return f.read()


def _quote(part: str) -> str:
    import shlex

    return shlex.quote(part)
