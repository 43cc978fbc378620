"""The service path end to end: infra/local/up on loopback, `prefect deploy --all`,
`prefect deployment run full-pipeline/local`, the MLflow server queried over HTTP, and
infra/local/down leaving no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from rzenembed.config import load_config

from .multiprocess import free_port
from .test_pipeline_flow import pipeline_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"


def sh(argv: list[str], env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def mlflow_get(base: str, path: str, **params: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def in_group(entry: Path, group: int) -> bool:
    """Whether the live (not zombie) process at ``/proc/<pid>`` is in process ``group``."""
    try:
        stat = (entry / "stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(") ", 1)[-1].split()
    return fields[0] != "Z" and int(fields[2]) == group


def group_alive(group: int) -> bool:
    return any(e.name.isdigit() and in_group(e, group) for e in Path("/proc").iterdir())


# A stage-1 and a stage-2 source: this test is about the services a run goes through
# (test_pipeline_flow prepares all thirteen sources and trains and soups two mixtures).
SERVICE_SOURCES = ("sample-captions", "sample-image-qa")


def services_config(config: Path) -> Path:
    """The pipeline test's config with two sources and one stage-2 mixture."""
    data = yaml.safe_load(config.read_text())
    data["sources"] = [s for s in data["sources"] if s["name"] in SERVICE_SOURCES]
    stage2 = [s["name"] for s in data["sources"] if s["stage"] in ("stage2", "both")]
    data["stage2"]["mixtures"] = [{"name": "even", "datasets": {n: 1.0 for n in stage2}}]
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory, sample_corpus, tiny_model_dir):
    root = tmp_path_factory.mktemp("service")
    state = root / "stack"
    ports = [free_port() for _ in range(3)]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API", "MLFLOW_", "RAY_ADDRESS"))}  # fmt: skip
    # The worker looks for scheduled runs every 10 s by default; the test waits on one.
    env["PREFECT_WORKER_QUERY_SECONDS"] = "1"
    up = [
        str(ROOT / "infra/local/up"),
        "--state",
        str(state),
        "--prefect-port",
        str(ports[0]),
        "--mlflow-port",
        str(ports[1]),
        "--ray-port",
        str(ports[2]),
        "--ray-cpus",
        "2",
    ]
    groups: list[int] = []
    try:
        sh(up, env, timeout=400)
        sh(up, env, timeout=120)  # idempotent: a second `up` starts nothing new
        groups = [
            int((state / f"{n}.pid").read_text())
            for n in ("prefect-server", "mlflow-server", "ray-head", "prefect-worker")
        ]
        exported = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (state / "env.sh").read_text().splitlines()
        )
        yield {
            "root": root,
            "state": state,
            "env": {**env, **exported},
            "urls": exported,
            "config": services_config(pipeline_config(sample_corpus, tiny_model_dir, root)),
            "groups": groups,
        }
    finally:  # a failed test must not leave servers behind either
        subprocess.run([str(ROOT / "infra/local/down"), "--state", str(state)], cwd=ROOT,
                       env=env, timeout=180, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def deployed_run(stack):
    env = stack["env"]
    sh([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], env, timeout=300)
    params = json.dumps({"config_path": str(stack["config"]), "overrides": []})
    out = sh([str(BIN / "prefect"), "deployment", "run", "full-pipeline/local", "--params",
              params], env)  # fmt: skip
    flow_run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
    api = {PREFECT_API_URL: stack["urls"]["PREFECT_API_URL"]}
    with temporary_settings(api), get_client(sync_client=True) as client:
        deadline = time.monotonic() + 900
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                break
            assert time.monotonic() < deadline, "the deployed flow run did not finish"
            time.sleep(1)
        retraining = client.read_deployment_by_name("retrain/scheduled-retraining")
    return run, retraining


def test_the_deployed_pipeline_completes(deployed_run, stack):
    run, _ = deployed_run
    log = (stack["state"] / "prefect-worker.log").read_text()[-3000:]
    assert run.state.name == "Completed", log


def test_the_mlflow_server_holds_the_model_aliases_and_lineage(deployed_run, stack):
    base = stack["urls"]["MLFLOW_TRACKING_URI"]
    model = mlflow_get(base, "registered-models/get", name="rzenembed")["registered_model"]
    aliases = {a["alias"]: a["version"] for a in model.get("aliases", [])}
    assert aliases == {"candidate": "1", "champion": "1"}
    out = sh([str(BIN / "rzenembed"), "lineage", "models:/rzenembed@champion",
              "--tracking-uri", base, "--json"], stack["env"])  # fmt: skip
    tree = json.loads(out)

    def raws(node):
        found = [node["name"]] if node["kind"] == "raw" else []
        return found + [n for child in node["inputs"] for n in raws(child)]

    sources = {s.name for s in load_config(stack["config"]).sources}
    assert set(raws(tree)) == sources


def test_the_retraining_deployment_carries_its_schedule(deployed_run):
    _, retraining = deployed_run
    crons = [s.schedule.cron for s in retraining.schedules]
    assert crons == ["0 3 * * 1"]
    assert all(s.active for s in retraining.schedules)


def stack_status(state: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``infra/local/status`` as a person runs it (its exit code is the answer)."""
    argv = [str(ROOT / "infra/local/status"), "--state", str(state)]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)


def test_every_listener_of_the_stack_is_on_loopback(stack, deployed_run):
    """After a deployed run (Ray's workers, agents and client server all started), every
    socket the stack's process groups listen on is on loopback; `status` says so."""
    done = stack_status(stack["state"], stack["env"])
    assert "EXPOSED" not in done.stdout and done.returncode == 0, done.stdout
    counted = int(done.stdout.split("listening: ", 1)[1].split()[0])
    # Prefect, MLflow, and Ray's GCS, raylet (two), client server and agents at least.
    assert counted >= 7, done.stdout


def test_the_stack_node_gathers_process_statistics_once_a_minute(stack, deployed_run):
    """The stack's Ray node has no dashboard: its agent gathers per-process statistics
    once a minute, not every 5 s, and its processes export no Ray metrics."""
    from rzenembed.compute.connect import LOCAL_REPORTER_INTERVAL_MS, REPORTER_INTERVAL_ENV

    from .test_local_stack import gcs_system_configs, raylet_environments

    head = int((stack["state"] / "ray-head.pid").read_text())
    group = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and in_group(p, head)]
    nodes = raylet_environments(group)
    assert nodes, "no raylet in the stack's ray-head process group"
    assert {env.get(REPORTER_INTERVAL_ENV) for env in nodes} == {LOCAL_REPORTER_INTERVAL_MS}
    (config,) = gcs_system_configs(group)  # and it collects no Ray metrics
    assert config["enable_metrics_collection"] is False


def test_down_leaves_no_process_behind(stack, deployed_run):
    """Runs last: stop the stack and check every process group it started is gone."""
    state, env = stack["state"], stack["env"]
    status = stack_status(state, env)
    assert status.returncode == 0, status.stdout  # all four services were up
    sh([str(ROOT / "infra/local/down"), "--state", str(state)], env, timeout=180)
    alive = [g for g in stack["groups"] if group_alive(g)]
    assert alive == []
    assert not list(state.glob("*.pid"))
    status = stack_status(state, env)
    assert status.returncode == 1 and status.stdout.count("stopped") == 4
