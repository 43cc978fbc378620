"""Ray nodes started with ``ray start`` for tests that need a real head (Ray Client, two
nodes): free loopback ports, start with retries, and stop exactly one test's nodes."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_processes(marker: str) -> list[int]:
    """Pids of the processes whose command line names ``marker`` (a node's temp dir)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_nodes(temp_dirs: list[Path]) -> None:
    """Kill exactly this cluster's processes (``ray stop`` would stop every Ray here): those
    that name a node's temp dir and everything they started. A node's agents retitle
    themselves (``ray::DashboardAgent``) and name no folder: killed by name alone they were
    left behind, parentless, for a minute or two, some spinning a core (about 90
    CPU-seconds a suite)."""
    import psutil

    for _ in range(3):
        found: dict[int, psutil.Process] = {}
        for pid in (pid for d in temp_dirs for pid in node_processes(str(d))):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc = psutil.Process(pid)
                found[pid] = proc
                found.update((c.pid, c) for c in proc.children(recursive=True))
        if not found:
            return
        for proc in found.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        time.sleep(1)


def start_node(command: list[str], env: dict[str, str], temp_dir: Path, tries: int = 3) -> None:
    """``ray start``, tried again when it exits non-zero: on two loaded cores a joining
    node can time out waiting for a head that is still starting. The last failure raises
    with Ray's own output, so a CI log says why. Nobody looks at a test node's dashboard:
    its agent gathers per-process statistics once a minute, as a local runtime's does
    (``rzenembed.compute.connect.local_node_env``), not every 5 s; and a head starts its
    cluster without Ray's metrics (nothing here scrapes them), as the local stack's does."""
    import json

    from rzenembed.compute.connect import LOCAL_SYSTEM_CONFIG, local_node_env

    env = local_node_env(env)
    if "--head" in command and "--system-config" not in command:
        command = [*command, "--system-config", json.dumps(LOCAL_SYSTEM_CONFIG)]
    for attempt in range(1, tries + 1):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode == 0:
            return
        print(f"ray start (try {attempt}) exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        stop_nodes([temp_dir])
        time.sleep(5 * attempt)
    raise RuntimeError(
        f"ray start failed {tries} times: {' '.join(command)}\n{done.stdout}\n{done.stderr}"
    )


def client_server_logs(temp_dir: Path, tail: int = 3000) -> str:
    """The end of every Ray Client server log of a head (the proxy's and each driver's
    server's), for a failure message: they say why a driver could not connect."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/ray_client_server*"))
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}" for p in logs)


def head_with_job_server(
    root: Path,
    env: dict[str, str],
    *,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
) -> tuple[int, int]:
    """A head on loopback with its job server (the dashboard) on loopback too, whose job
    drivers find this interpreter's ``python`` first on their PATH (the image's ``python``
    on a real cluster). Returns (GCS port, job server port); stop it with
    ``stop_nodes([root / "head"])``."""
    import json
    import sys

    port, dashboard = free_port(), free_port()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    command = [
        *(str(Path(bin_dir) / "ray"), "start", "--head", "--port", str(port)),
        *("--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1"),
        *("--dashboard-port", str(dashboard), "--num-cpus", str(num_cpus)),
        *("--resources", json.dumps(resources or {}), "--disable-usage-stats"),
        *("--temp-dir", str(root / "head")),
        *agent_ports(),
    ]
    start_node(command, env, root / "head")
    return port, dashboard


def agent_ports() -> list[str]:
    """Free ports for a node's agents: their defaults (52365 for the dashboard agent, which
    the job server needs) are fixed, and any other Ray on the machine may hold them."""
    return [
        *("--dashboard-agent-listen-port", str(free_port())),
        *("--dashboard-agent-grpc-port", str(free_port())),
        *("--runtime-env-agent-port", str(free_port())),
        *("--metrics-export-port", str(free_port())),
    ]
