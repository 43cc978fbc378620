"""The local service stack on loopback: Prefect server + process work pool + worker, an
MLflow server and a Ray head. ``up`` is idempotent, ``down`` stops exactly what ``up``
started (each service runs in its own process group, recorded in a pid file), ``status``
shows what runs.

    infra/local/up      [--state DIR] [--prefect-port 4200] [--mlflow-port 5000]
                        [--ray-port 6379] [--ray-cpus N] [--mlflow-backend URI]
    infra/local/status  [--state DIR]
    infra/local/down    [--state DIR]
    source runs/stack/env.sh     # PREFECT_API_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS

State (pid files, logs, the Prefect and MLflow databases, MLflow artifacts) lives under
``--state`` (default ``runs/stack``). The MLflow backend is SQLite there unless
``--mlflow-backend`` names another store, e.g. ``postgresql://user:pass@host/mlflow``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "local-process"
CLUSTER_POOL = "cluster-process"
SERVICES = ("prefect-server", "mlflow-server", "ray-head", "prefect-worker")
# Ray turns a node address of 127.0.0.1 into the machine's own address (so that other nodes
# can reach it) and then listens on every interface: GCS, raylet, object manager, Ray
# Client server, dashboard and runtime-env agents. With Ray's single-node switch off
# ("clusters" is its name for Windows/macOS, read when ray is imported) a node keeps
# 127.0.0.1 and every listener binds there. The stack is one node; a second node could not
# join it, which is the point.
LOOPBACK_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def is_loopback(address: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4 loopback address mapped into IPv6 (::ffff:127.0.0.1, as
    a dual-stack gRPC server reports it); never the wildcard addresses."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ", 1)[-1].startswith("Z"))


def beyond_loopback(listeners: list[tuple[int, str, str, int]]) -> list[tuple[int, str, str, int]]:
    """The (pid, name, address, port) listeners that another machine could reach."""
    return [x for x in listeners if not is_loopback(x[2])]


class Stack:
    def __init__(self, state: Path):
        self.state = state.resolve()
        self.settings_file = self.state / "stack.json"

    def pid_file(self, name: str) -> Path:
        return self.state / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        path = self.pid_file(name)
        if not path.is_file():
            return None
        pid = int(path.read_text().strip())
        return pid if _alive(pid) else None

    def settings(self) -> dict:
        return json.loads(self.settings_file.read_text()) if self.settings_file.is_file() else {}

    def env(self, s: dict) -> dict[str, str]:
        return {
            "PREFECT_API_URL": f"http://127.0.0.1:{s['prefect_port']}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{s['mlflow_port']}",
            "RAY_ADDRESS": f"127.0.0.1:{s['ray_port']}",
            # The head and every driver that joins it use Ray's token authentication
            # (token in ~/.ray/auth_token); a driver with another mode is refused.
            "RAY_AUTH_MODE": "token",
            # A single-node runtime: Ray keeps 127.0.0.1 as the node's address (see
            # LOOPBACK_RAY) in the drivers that join the head as well.
            **LOOPBACK_RAY,
        }

    def base_env(self, s: dict) -> dict[str, str]:
        from rzenembed.telemetry import telemetry_off

        env = telemetry_off(dict(os.environ))  # off unless the environment turns it on
        env.update({
            "PREFECT_HOME": str(self.state / "prefect"),
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
            "PREFECT_LOCAL_STORAGE_PATH": str(self.state / "prefect" / "storage"),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_AUTH_MODE": "token",
            **LOOPBACK_RAY,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        })  # fmt: skip
        return env

    # ---------------------------------------------------------------- start

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        if self.pid(name):
            print(f"{name}: already running (pid {self.pid(name)})")
            return
        log = open(self.state / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        self.pid_file(name).write_text(f"{process.pid}\n")
        print(f"{name}: started (pid {process.pid}, log {self.state / f'{name}.log'})")

    def wait_http(self, name: str, url: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pid(name):
                raise RuntimeError(f"{name} exited; see {self.state / f'{name}.log'}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{name} did not answer {url} within {timeout:.0f} s")

    def wait_port(self, name: str, port: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pid(name):
                raise RuntimeError(f"{name} exited; see {self.state / f'{name}.log'}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(1)
        raise TimeoutError(f"{name} did not open port {port} within {timeout:.0f} s")

    def up(self, args: argparse.Namespace) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        s = self.settings() if any(self.pid(n) for n in SERVICES) else {}
        s = s or {
            "prefect_port": args.prefect_port, "mlflow_port": args.mlflow_port,
            "ray_port": args.ray_port, "ray_cpus": args.ray_cpus,
            "mlflow_backend": args.mlflow_backend
            or f"sqlite:///{self.state / 'mlflow.db'}",
        }  # fmt: skip
        self.settings_file.write_text(json.dumps(s, indent=2) + "\n")
        env = self.base_env(s)
        self.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host",
                   "127.0.0.1", "--port", str(s["prefect_port"])], env)  # fmt: skip
        self.start("mlflow-server", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(s["mlflow_port"]),
            "--backend-store-uri", s["mlflow_backend"],
            "--artifacts-destination", str(self.state / "mlartifacts"), "--workers", "1",
        ], env)  # fmt: skip
        from rzenembed.compute.connect import local_node_env

        # On SIGTERM a Ray node first drains (up to 30 s) so that Serve proxies can move
        # traffic to other nodes; this stack has one node and `down` stops it whole. The
        # drain would wait for the GCS, which the same SIGTERM stops, or for Ray Data's
        # detached actors to let go: `down` took 31 s for the head alone (3.5 s without).
        # The node has no dashboard: its agent gathers per-process statistics once a minute,
        # not every 5 s (rzenembed.compute.connect.local_node_env).
        head_env = local_node_env({**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        self.start("ray-head", self.ray_head_command(s), head_env)
        urls = self.env(s)
        self.wait_http("prefect-server", f"{urls['PREFECT_API_URL']}/health")
        self.wait_http("mlflow-server", f"{urls['MLFLOW_TRACKING_URI']}/health")
        self.wait_port("ray-head", s["ray_port"])
        worker_env = {**env, **urls}
        # Both pools of prefect.yaml exist, so `prefect deploy --all` succeeds here; only
        # `local-process` gets a worker (runs of the cluster deployment wait for a cluster's).
        for pool in (POOL, CLUSTER_POOL):
            subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type",
                            "process", "--overwrite"], env=worker_env, cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
        self.start("prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL,
                   "--name", "local-worker"], worker_env)  # fmt: skip
        lines = [f"export {k}={v}" for k, v in urls.items()]
        (self.state / "env.sh").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        print(f"# source {self.state / 'env.sh'}")

    # ---------------------------------------------------------------- stop

    def down(self) -> None:
        for name in reversed(SERVICES):
            path = self.pid_file(name)
            if not path.is_file():
                continue
            pid = int(path.read_text().strip())
            if _alive(pid):
                self._stop_group(name, pid)
            path.unlink()
            if name == "ray-head":
                self._forget_ray_head()
        print("stack stopped")

    @staticmethod
    def ray_head_command(s: dict) -> list[str]:
        """``ray start`` for the stack's one node: loopback, the given CPUs, the endpoint's
        ``serving`` slots (as a local runtime declares them: a served champion never holds
        a CPU the scheduled retraining needs), no dashboard, no Ray metrics."""
        from rzenembed.compute.connect import LOCAL_SERVING_SLOTS, LOCAL_SYSTEM_CONFIG

        return [
            *(str(BIN / "ray"), "start", "--head", "--block"),
            *("--node-ip-address", "127.0.0.1", "--port", str(s["ray_port"])),
            *("--num-cpus", str(s["ray_cpus"])),
            *("--resources", json.dumps({"serving": LOCAL_SERVING_SLOTS})),
            *("--include-dashboard=false", "--disable-usage-stats"),
            # No Ray metrics for a Prometheus the stack does not run (connect.py says why).
            *("--system-config", json.dumps(LOCAL_SYSTEM_CONFIG)),
        ]

    def _forget_ray_head(self) -> None:
        """Ray remembers the last head it started in /tmp/ray/ray_current_cluster; a
        stopped head must not be found there by a later `ray.init()` (nor by the Ray
        state API, which would wait 40 s for its GCS). Ray writes the machine's address
        there, not the 127.0.0.1 the head was given, so the port identifies the head."""
        marker = Path("/tmp/ray/ray_current_cluster")
        port = str(self.settings().get("ray_port"))
        if marker.is_file() and marker.read_text().strip().rsplit(":", 1)[-1] == port:
            marker.unlink()

    def _stop_group(self, name: str, pid: int) -> None:
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:
            return
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.5)
        if _group_alive(group):
            os.killpg(group, signal.SIGKILL)
            time.sleep(1)
        print(f"{name}: stopped (process group {group})")

    def listeners(self) -> list[tuple[int, str, str, int]]:
        """Every TCP socket the stack's processes listen on, as (pid, process name,
        address, port): the running services' process groups, children included."""
        import psutil

        groups = {os.getpgid(pid) for name in SERVICES if (pid := self.pid(name))}
        found = []
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status != psutil.CONN_LISTEN or conn.pid is None:
                continue
            try:
                if os.getpgid(conn.pid) not in groups:
                    continue
                name = psutil.Process(conn.pid).name()
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
            found.append((conn.pid, name, conn.laddr.ip, conn.laddr.port))
        return sorted(found)

    def status(self) -> int:
        s = self.settings()
        running = 0
        for name in SERVICES:
            pid = self.pid(name)
            running += bool(pid)
            print(f"{name:<16} {'running, pid ' + str(pid) if pid else 'stopped'}")
        if s and running:
            for key, value in self.env(s).items():
                print(f"{key}={value}")
            found = self.listeners()
            exposed = beyond_loopback(found)
            for pid, name, address, port in exposed:
                print(f"EXPOSED: {name} (pid {pid}) listens on {address}:{port}")
            if not exposed:
                print(f"listening: {len(found)} sockets, all on loopback")
            running -= bool(exposed)  # a service reachable from the network is not healthy
        return 0 if running == len(SERVICES) else 1


def _group_alive(group: int) -> bool:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == group and _alive(int(entry.name)):
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state", default=os.environ.get("RZENEMBED_STACK", "runs/stack"))
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--mlflow-backend", help="MLflow backend store URI (default SQLite)")
    args = parser.parse_args(argv)
    stack = Stack(Path(args.state))
    if args.command == "up":
        stack.up(args)
        return 0
    if args.command == "down":
        stack.down()
        return 0
    return stack.status()


if __name__ == "__main__":
    raise SystemExit(main())
