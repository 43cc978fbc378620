"""The suite's one Prefect API server: ``prefect server start`` on loopback with its own
home and SQLite database, shared by every flow the tests run in their processes and by the
drivers they start (the demo, cluster and job drivers).

Under ``make test`` the xdist controller starts it before the workers exist and hands its
URL to both through ``SHARED_API_ENV`` (the workers inherit the controller's environment):
one server instead of one per worker. Idle, a server costs about 3 CPU-seconds a minute
here (its background services poll every quarter second), and each start migrates a fresh
database (15-40 s on two loaded cores), so a second one cost the suite about 80
CPU-seconds and a worker's wait. A serial run (no xdist) starts it from the session
fixture instead, on first use."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

# The URL of a server the xdist controller started for its workers, and its log.
SHARED_API_ENV = "RZENEMBED_TEST_PREFECT_API"
SHARED_LOG_ENV = "RZENEMBED_TEST_PREFECT_LOG"
START_TIMEOUT_S = 180


class PrefectServer:
    """A ``prefect server start`` process in a session of its own (so stopping it stops
    the uvicorn it runs), writing to ``home/server.log``."""

    def __init__(self, home: Path, port: int):
        self.home = home
        self.url = f"http://127.0.0.1:{port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="false",
        )
        prefect = Path(sys.executable).parent / "prefect"
        with (home / "server.log").open("w") as log:
            self.process = subprocess.Popen(
                [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_until_healthy(url: str, server: PrefectServer | None = None) -> None:
    """Return once ``url``'s health check answers; raise with the server's log when it
    exited or did not answer within ``START_TIMEOUT_S`` (a shared server's log is found
    through ``SHARED_LOG_ENV``)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        exited = server is not None and server.process.poll() is not None
        if exited or time.monotonic() > deadline:
            log = server.home / "server.log" if server else Path(os.environ[SHARED_LOG_ENV])
            said = log.read_text()[-4000:] if log.exists() else ""
            raise RuntimeError(f"the Prefect server at {url} did not start:\n{said}")
        time.sleep(0.5)


def start_shared() -> PrefectServer:
    """On the xdist controller: start the server (without waiting for it: the workers
    start meanwhile, and wait on first use) and export its URL for the workers."""
    from .ray_nodes import free_port

    home = Path(tempfile.mkdtemp(prefix="rz-prefect-api-"))
    server = PrefectServer(home, free_port())
    os.environ[SHARED_API_ENV] = server.url
    os.environ[SHARED_LOG_ENV] = str(home / "server.log")
    return server


def stop_shared(server: PrefectServer) -> None:
    server.stop()
    os.environ.pop(SHARED_API_ENV, None)
    os.environ.pop(SHARED_LOG_ENV, None)
    shutil.rmtree(server.home, ignore_errors=True)
