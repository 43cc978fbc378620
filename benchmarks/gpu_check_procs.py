"""How the GPU check starts and stops processes, so that it always exits.

Every process the check starts (the part runner, the collective's ranks, the benchmark) is a
``subprocess.Popen`` in a session of its own, so its whole tree (Ray's processes, a rank's
helpers) shares one process group. ``stop`` ends such a process when its part times out:
SIGTERM to the group and to every descendant seen, a grace period, then SIGKILL, then a
wait (``join``) until each is gone. ``Tracker`` remembers every descendant of the check
ever seen, so that nothing it started outlives it, and ``Watchdog`` ends the whole check
at its overall deadline whatever a part is doing: it prints what was still running, kills
it and leaves with ``os._exit`` (a blocked thread cannot keep the interpreter alive).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

import psutil

GRACE_S = 5.0  # between SIGTERM and SIGKILL, and again for the kill to land


def describe(proc: psutil.Process) -> str:
    """``pid N (name: first words of its command line)``, or ``pid N`` once it is gone."""
    try:
        words = " ".join(proc.cmdline())[:100] or proc.name()
        return f"pid {proc.pid} ({words})"
    except (psutil.Error, OSError):
        return f"pid {proc.pid}"


def tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants, parents first; empty when it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has ended: only its parent's wait is left)."""
    out = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            pass
    return out


def stop(popens: Iterable[subprocess.Popen], extra: Iterable[psutil.Process] = ()) -> list[str]:
    """Terminate, then kill, then join each of ``popens`` with its process group and its
    descendants, and ``extra``. Returns those that needed SIGKILL (still running
    ``GRACE_S`` after SIGTERM)."""
    popens = list(popens)
    own = os.getpgid(0)
    groups = set()
    procs = list(extra)
    for popen in popens:
        procs = tree(popen.pid) + procs
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(popen.pid))
    groups.discard(own)  # never signal the check's own group
    seen = {p.pid: p for p in procs}
    _signal(groups, list(seen.values()), signal.SIGTERM)
    psutil.wait_procs(alive(seen.values()), timeout=GRACE_S)
    for group in groups:  # members that appeared since the snapshot
        for proc in _group_members(group):
            seen.setdefault(proc.pid, proc)
    stubborn = alive(seen.values())
    killed = [describe(p) for p in stubborn]
    _signal(groups, stubborn, signal.SIGKILL)
    psutil.wait_procs(stubborn, timeout=GRACE_S)
    for popen in popens:
        try:
            popen.wait(timeout=GRACE_S)  # join: no zombie left behind
        except subprocess.TimeoutExpired:
            killed.append(f"pid {popen.pid} (still not gone after SIGKILL)")
    return killed


def _signal(groups: set[int], procs: list[psutil.Process], sig: int) -> None:
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def _group_members(group: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == group:
                members.append(proc)
        except (OSError, psutil.Error):
            pass
    return members


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    """``argv`` in a session of its own (its tree is one process group ``stop`` can end)."""
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


def wait(popens: list[subprocess.Popen], deadline: float, tracker: Tracker | None = None) -> bool:
    """Wait until every one of ``popens`` exited or ``deadline`` (``time.monotonic``) passed;
    True when all exited in time."""
    while time.monotonic() < deadline:
        if tracker is not None:
            tracker.sweep()
        if all(p.poll() is not None for p in popens):
            return True
        time.sleep(0.2)
    return all(p.poll() is not None for p in popens)


class Tracker:
    """Every descendant of this process seen by ``sweep``, to stop at the end."""

    def __init__(self) -> None:
        self.me = psutil.Process()
        self.seen: dict[tuple[int, float], psutil.Process] = {}
        self.lock = threading.Lock()

    def sweep(self) -> list[psutil.Process]:
        try:
            now = self.me.children(recursive=True)
        except psutil.Error:
            now = []
        with self.lock:
            for proc in now:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault((proc.pid, proc.create_time()), proc)
        return now

    def leftovers(self) -> list[psutil.Process]:
        self.sweep()
        with self.lock:
            return alive(self.seen.values())

    def stop_leftovers(self) -> list[str]:
        """Terminate, kill and reap whatever the check started that is still running."""
        left = self.leftovers()
        if not left:
            return []
        described = [describe(p) for p in left]
        stop([], left)
        for proc in left:  # reap our own children among them
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(proc.pid, os.WNOHANG)
        return described


class Watchdog:
    """Ends the process at ``deadline_s`` from now, whatever the main thread is doing.

    At the deadline it prints ``FAIL <part>: ... overall deadline ...`` naming the part that
    was running and the processes still alive, stops them (``Tracker``), calls
    ``on_expiry`` (it writes the results file), prints ``gpu-check: FAIL`` and leaves with
    ``os._exit(1)``. ``faulthandler`` backs it up: if even this thread cannot run (the GIL
    held by a stuck extension), the interpreter dumps every thread's stack and exits
    ``HARD_MARGIN_S`` later.
    """

    HARD_MARGIN_S = 60.0

    def __init__(
        self,
        deadline_s: float,
        tracker: Tracker,
        current: Callable[[], str],
        on_expiry: Callable[[], None] = lambda: None,
    ) -> None:
        self.deadline_s, self.tracker, self.current = deadline_s, tracker, current
        self.on_expiry = on_expiry
        self.done = threading.Event()
        self.fired = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gpu-check-watchdog", daemon=True)

    def start(self) -> Watchdog:
        faulthandler.dump_traceback_later(self.deadline_s + self.HARD_MARGIN_S, exit=True)
        self.thread.start()
        return self

    def cancel(self) -> None:
        self.hold()
        self.done.set()
        faulthandler.cancel_dump_traceback_later()

    def hold(self) -> None:
        """Once the deadline passed, block the calling thread until the watchdog exits, so
        that nothing else prints a verdict or ends the process first."""
        if self.fired.is_set():
            threading.Event().wait()

    def _run(self) -> None:
        if self.done.wait(self.deadline_s):
            return
        self.fired.set()
        running = [describe(p) for p in self.tracker.leftovers()]
        print(
            f"FAIL {self.current() or 'gpu-check'}: the check's overall deadline of "
            f"{self.deadline_s:.0f} s passed (timed out); still running: "
            f"{'; '.join(running) or 'no process'}",
            flush=True,
        )
        try:
            self.tracker.stop_leftovers()
            self.on_expiry()
        finally:
            print("gpu-check: FAIL (overall deadline)", flush=True)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
