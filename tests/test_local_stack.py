"""The local stack's listener check (``infra/local/status``): a service of the stack that
listens beyond loopback is named, one on loopback is not. The stack itself is checked by
tests/test_service_stack.py (every listener of a running stack, after a deployed run)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .multiprocess import free_port

STACK_PY = Path(__file__).resolve().parents[1] / "infra" / "local" / "stack.py"


def load_stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", STACK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def listen(host: str, port: int) -> subprocess.Popen:
    """A process in a session of its own (as the stack starts each service) that listens."""
    code = (
        "import socket, time\n"
        f"s = socket.socket(); s.bind(({host!r}, {port})); s.listen(); time.sleep(120)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


def wait_listening(stack, pid: int) -> None:
    deadline = time.monotonic() + 30
    while not any(found[0] == pid for found in stack.listeners()):
        assert time.monotonic() < deadline, "the planted listener never listened"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("127.0.0.1", True), ("127.3.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
     ("0.0.0.0", False), ("::", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False)],
)  # fmt: skip
def test_loopback_addresses(address, expected):
    assert load_stack_module().is_loopback(address) is expected


def test_a_service_listening_beyond_loopback_is_named(tmp_path):
    local = load_stack_module()
    stack = local.Stack(tmp_path)
    exposed_port, private_port = free_port(), free_port()
    planted = listen("0.0.0.0", exposed_port)
    quiet = listen("127.0.0.1", private_port)
    try:
        stack.pid_file("ray-head").write_text(f"{planted.pid}\n")
        stack.pid_file("mlflow-server").write_text(f"{quiet.pid}\n")
        wait_listening(stack, planted.pid)
        wait_listening(stack, quiet.pid)
        assert [(p, a, port) for p, _, a, port in stack.exposed()] == [
            (planted.pid, "0.0.0.0", exposed_port)
        ]
        assert (quiet.pid, "127.0.0.1", private_port) in [
            (p, a, port) for p, _, a, port in stack.listeners()
        ]
    finally:
        for process in (planted, quiet):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
