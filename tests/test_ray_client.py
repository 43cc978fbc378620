"""A driver that reaches the cluster through Ray Client survives the head failing to start
its server process, and says where to look when the head keeps failing.

The head's proxy forks one server process per driver from a process full of gRPC threads,
and that child can die before it runs (its log says ``Kick failed: eventfd_write: Bad file
descriptor``; seen here in about one first connection in five, and in CI, where the whole
cluster run failed on it). So that every run of this test sees a failure, the head also runs
with a ``sitecustomize`` on its ``PYTHONPATH`` that makes one server process exit at once.
The driver is a separate process that hosts no Ray node. A failed attempt costs the driver
about half a minute (the proxy retries the dead server's log stream five times before it
answers), so the message after the last attempt is checked without a head.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from .ray_nodes import client_server_logs, free_port, start_node, stop_nodes

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).parent / "ray"
FAILED_STARTS = 1

SITECUSTOMIZE = """
import os, sys
if "--mode=specific-server" in sys.argv:
    log = os.environ["RZ_TEST_SERVER_STARTS"]
    failed = open(log).read().count("exit") if os.path.exists(log) else 0
    with open(log, "a") as out:
        out.write(f"{{os.getpid()}} {{'exit' if failed < {failures} else 'start'}}\\n")
    if failed < {failures}:
        os._exit(3)
"""

DRIVER = """
import logging, sys
import ray
from rzenembed.compute.connect import connect_client
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
address = sys.argv[1]
connect_client(address, attempts=4, pause_s=0.5)
print("ANSWER", ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=120))
"""


@pytest.fixture(scope="module")
def failing_head():
    """A one-CPU head whose first ``FAILED_STARTS`` Ray Client server processes die."""
    root = Path(tempfile.mkdtemp(prefix="rzc-", dir="/tmp"))
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(failures=FAILED_STARTS))
    port, client_port = free_port(), free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": str(root / "site"),
        "RZ_TEST_SERVER_STARTS": str(root / "server-starts"),
        # The proxy waits this long for a server to answer (30 s by default): enough for a
        # healthy one to start on two loaded cores, short for the one that died.
        "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "6",
    }
    env.pop("RAY_ADDRESS", None)
    head = root / "head"
    command = [
        *(str(RAY), "start", "--head", "--port", str(port)),
        *("--ray-client-server-port", str(client_port), "--include-dashboard=false"),
        *("--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"),
        *("--temp-dir", str(head)),
    ]
    try:
        start_node(command, env, head)
        driver_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH",)}
        yield f"ray://127.0.0.1:{client_port}", driver_env, root
    finally:
        stop_nodes([head])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def driver_output(failing_head) -> tuple[str, str]:
    address, env, _ = failing_head
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), address],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = client_server_logs(failing_head[2] / "head", tail=30000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs
    return done.stdout, logs


def test_the_driver_connects_after_failed_starts_and_runs_work(driver_output, failing_head):
    output, logs = driver_output
    lines = output.splitlines()
    print(logs)  # shown when the test fails: what the head said of each attempt
    assert "ANSWER 42" in lines, lines
    retries = [line for line in lines if line.startswith("LOG Ray Client at")]
    assert all(f"(attempt {n} of 4)" in line for n, line in enumerate(retries, 1)), retries
    # Every attempt but the last failed: the one whose server this test kills (recorded by
    # the head's own sitecustomize), any whose server died by itself, and, on a loaded
    # head, any whose wait for its server's channel timed out (no new server for those).
    proxy_log = next((failing_head[2] / "head").glob("session_*/logs/ray_client_server.err"))
    servers = proxy_log.read_text().count("SpecificServer started on port")
    starts = (failing_head[2] / "server-starts").read_text().split()[1::2]
    assert starts.count("exit") == FAILED_STARTS and starts[-1] == "start", starts
    assert len(retries) >= FAILED_STARTS, retries
    assert FAILED_STARTS + 1 <= servers <= len(retries) + 1, (len(retries), servers)


def test_the_last_failed_attempt_names_the_address_and_the_logs(monkeypatch):
    import ray

    from rzenembed.compute import connect as engine

    calls = []

    def refuse(**kwargs):
        calls.append(kwargs["address"])
        raise ConnectionAbortedError("Initialization failure from server:\nTraceback ...")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(ConnectionAbortedError) as raised:
        engine.connect_client("ray://head:10001", attempts=2, pause_s=0.0)
    assert calls == ["ray://head:10001"] * 2
    message = str(raised.value)
    assert message.startswith("Ray Client at ray://head:10001: the head could not start")
    assert "in 2 attempts" in message and "ray_client_server*.err" in message
    assert "Initialization failure from server" in message
