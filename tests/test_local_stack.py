"""The local stack's listener check (``infra/local/status``): the sockets its services listen
on are found through their process groups, and one on any address but loopback is named.
Nothing here listens beyond loopback: the exposed listener is planted in the list the check
reads. The stack itself is checked by tests/test_service_stack.py (every listener of a
running stack, after a deployed run)."""

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
LOOPBACK_FORMS = ["127.0.0.1", "127.3.0.1", "::1", "::ffff:127.0.0.1"]
# Addresses as a listener reports them, never bound here.
REACHABLE_FORMS = ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]


def load_stack_module():
    spec = importlib.util.spec_from_file_location("local_stack", STACK_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def listen_on_loopback(port: int) -> subprocess.Popen:
    """A process in a session of its own (as the stack starts each service) that listens."""
    code = (
        "import socket, time\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(120)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], start_new_session=True)


@pytest.mark.parametrize("address", LOOPBACK_FORMS)
def test_loopback_forms_are_loopback(address):
    assert load_stack_module().is_loopback(address)


@pytest.mark.parametrize("address", REACHABLE_FORMS)
def test_wildcard_and_machine_addresses_are_not(address):
    assert not load_stack_module().is_loopback(address)


def test_the_stack_finds_its_services_listeners_and_names_a_planted_exposed_one(tmp_path):
    local = load_stack_module()
    stack = local.Stack(tmp_path)
    port = free_port()
    service = listen_on_loopback(port)
    try:
        stack.pid_file("mlflow-server").write_text(f"{service.pid}\n")
        deadline = time.monotonic() + 30
        while not (found := stack.listeners()):
            assert time.monotonic() < deadline, "the service never listened"
            time.sleep(0.2)
        assert [(pid, address, p) for pid, _, address, p in found] == [
            (service.pid, "127.0.0.1", port)
        ]
        assert local.beyond_loopback(found) == []
        planted = (service.pid + 1, "gcs_server", "0.0.0.0", 6379)
        assert local.beyond_loopback([*found, planted]) == [planted]
    finally:
        os.killpg(service.pid, signal.SIGKILL)
        service.wait()


def test_the_in_process_ray_runtime_listens_on_loopback_only(ray_local):
    """The runtime ``make demo`` and the flows start in their own process (``ensure_ray``
    without an address): its GCS, raylet, workers and agents, all descendants of this
    process, listen on loopback only."""
    import psutil
    import ray

    @ray.remote
    def worker_pid() -> int:
        return os.getpid()

    ray.get(worker_pid.remote())  # a worker is up and listening too
    ours = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    listeners = [
        (conn.pid, conn.laddr.ip)
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.pid in ours
    ]
    names = {psutil.Process(pid).name() for pid, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, names  # the check sees Ray's own servers
    stack = load_stack_module()
    assert [x for x in listeners if not stack.is_loopback(x[1])] == []


def raylet_environments(pids) -> list[dict[str, str]]:
    """The environments of the raylets among ``pids``: a node's agent is the raylet's child
    and inherits its environment (the agent's own cannot be read back: it rewrites its
    command line over it, naming itself ``ray::DashboardAgent``)."""
    import psutil

    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            argv = proc.cmdline()
            if argv and argv[0].endswith("/raylet"):
                found.append(proc.environ())
        except psutil.Error:
            pass
    return found


def gcs_system_configs(pids) -> list[dict]:
    """The system configs the GCS servers among ``pids`` were started with (Ray hands them
    to every process of the node; a GCS names them on its command line)."""
    import base64
    import json

    import psutil

    found = []
    for pid in pids:
        try:
            argv = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if argv and argv[0].endswith("/gcs_server"):
            (config,) = [a.split("=", 1)[1] for a in argv if a.startswith("--config_list=")]
            found.append(json.loads(base64.b64decode(config)))
    return found


def test_the_in_process_runtime_gathers_process_statistics_once_a_minute(ray_local):
    """A local runtime has no dashboard: its agent's statistics interval is a minute (Ray's
    5 s default cost a quarter of a core beside training), and the setting was this
    process's only while the runtime started."""
    import psutil

    from rzenembed.compute.connect import LOCAL_REPORTER_INTERVAL_MS, REPORTER_INTERVAL_ENV

    nodes = raylet_environments(p.pid for p in psutil.Process().children(recursive=True))
    assert nodes, "no raylet among this process's descendants"
    assert {env.get(REPORTER_INTERVAL_ENV) for env in nodes} == {LOCAL_REPORTER_INTERVAL_MS}
    assert os.environ.get(REPORTER_INTERVAL_ENV) is None


def test_the_in_process_runtime_collects_no_ray_metrics(ray_local):
    """Nothing scrapes a local runtime's Ray metrics: its processes export none."""
    import psutil

    (config,) = gcs_system_configs(p.pid for p in psutil.Process().children(recursive=True))
    assert config["enable_metrics_collection"] is False
