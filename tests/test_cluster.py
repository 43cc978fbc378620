"""full-pipeline on a two-node Ray cluster on this machine with everything on S3.

A head and a second node (``ray start`` on 127.0.0.1, each with its own temporary
directory and staging cache, Ray's token authentication on) each declare one ``trainer``
slot, so the two training workers land on different nodes. The head declares the
``driver`` slots every step's Ray Job asks for (as the KubeRay head does) and runs the job
server on loopback; the second node declares the ``serving`` slots. Raw sources, the base
model and the evaluation sets are on a local S3 server (moto), and so is ``storage.root``.

The Prefect worker is a separate driver process that hosts no Ray node: every step is a
Ray Job it submits to the head's job server, as a Prefect worker pod of KubeRay does (only
serving the champion afterwards uses Ray Client). The first driver is killed while stage-1
training runs; a second driver runs the same flow, finds the finished steps in Prefect's
cache and *reattaches* to the running training job: one training job, one adapter.
The head's Ray Client proxy fails to start the server process of the first client that
connects (serving's): a ``sitecustomize`` on the head's ``PYTHONPATH`` makes that process
exit at once, as a server forked from the busy proxy sometimes dies by itself (its log says
``Kick failed: eventfd_write: Bad file descriptor``; it once failed a whole CI run). The
driver connects again and serves. Afterwards the cluster is stopped and both nodes'
temporary directories and caches are deleted; ``rzenembed verify`` then recomputes every
digest on the registered model's lineage from S3 alone: nothing the pipeline needs was left
on a node's disk.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from rzenembed.compute.jobs import job_client
from rzenembed.data.storage import filesystem

from .ray_nodes import agent_ports, client_server_logs, free_port, start_node, stop_nodes

# The module fixture runs a whole pipeline (3-6 minutes beside the other xdist worker):
# the first test's setup may pass the suite's 600 s per test on a slow machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"
BUCKET = "rzenembed-cluster"
# One source per path through preparation that the cluster must show: stage-2 rows with
# shipped negatives, and videos split into sibling clips that feed both stages (stage 1
# trains on them alone). Every step of each is a Ray Job, so each source costs a few job
# starts; a third (stage-1 captions) showed nothing new and cost about a minute.
SOURCES = ("sample-mmeb-vqa", "sample-video-clips")
# The source whose pictures the served query points at.
PICTURES = "sample-mmeb-vqa"
# Ray Client server processes the head lets die at start (the first ones asked for).
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


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_endpoint):
    """Head + second node on loopback; yields (the Ray Client address, the job server's
    address, env for drivers, node dirs)."""
    import ray

    ray.shutdown()  # this process's local runtime; later tests start a fresh one
    # Ray puts unix sockets under each node's temp dir and a socket path may not exceed 107
    # bytes: pytest's own temp dirs (pytest-of-USER/pytest-NNN/...) are too long once NNN or
    # the session's pid has one more digit, so the nodes live in a short dir of their own.
    root = Path(tempfile.mkdtemp(prefix="rz-", dir="/tmp"))
    port, client_port, jobs_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
        "AWS_ENDPOINT_URL": s3_endpoint,
        # A job's driver runs `python`: this interpreter's, as the image's on a cluster.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)  # the tests' "no state API" address (conftest)
    env.pop("MLFLOW_TRACKING_URI", None)  # the run tracks to its own SQLite file
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE.format(failures=FAILED_STARTS))
    head_only = {
        "PYTHONPATH": str(root / "site"),
        "RZ_TEST_SERVER_STARTS": str(root / "server-starts"),
        # The proxy waits this long for a server to answer (30 s by default): enough for a
        # healthy one to start on two loaded cores, short for the one that died.
        "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "6",
    }
    nodes = {name: root / name for name in ("head", "node-b")}
    caches = {name: root / f"cache-{name}" for name in nodes}
    common = [
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "1",
        "--disable-usage-stats",
    ]
    try:
        for name, args in (
            (
                "head",
                [
                    "--head",
                    "--port",
                    str(port),
                    "--ray-client-server-port",
                    str(client_port),
                    *("--dashboard-host", "127.0.0.1", "--dashboard-port", str(jobs_port)),
                    *("--resources", json.dumps({"trainer": 1, "driver": 8})),
                ],
            ),
            (
                "node-b",
                [
                    *("--address", f"127.0.0.1:{port}"),
                    *("--resources", json.dumps({"trainer": 1, "serving": 4})),
                ],
            ),
        ):
            node_env = {**env, "RZENEMBED_CACHE": str(caches[name])}
            if name == "head":
                node_env.update(head_only)
            command = [str(RAY), "start", *args, *common, *agent_ports()]
            start_node([*command, "--temp-dir", str(nodes[name])], node_env, nodes[name])
        yield (
            f"ray://127.0.0.1:{client_port}",
            f"http://127.0.0.1:{jobs_port}",
            env,
            [*nodes.values(), *caches.values()],
            root / "server-starts",
        )
    finally:
        stop_nodes(list(nodes.values()))
        shutil.rmtree(root, ignore_errors=True)


def upload_inputs(s3, corpus, model_dir) -> None:
    for name in SOURCES:
        s3.put(str(corpus.root / name), f"{BUCKET}/corpus/{name}", recursive=True)
    s3.put(str(corpus.root / "eval"), f"{BUCKET}/corpus/eval", recursive=True)
    s3.put(str(model_dir), f"{BUCKET}/models/tiny", recursive=True)


def cluster_config(corpus, root: Path, address: str, jobs: str, endpoint: str) -> Path:
    sources = [s for s in yaml.safe_load(corpus.sources_yaml.read_text()) if s["name"] in SOURCES]
    for source in sources:
        source["uri"] = f"s3://{BUCKET}/corpus/{source['name']}"
    stage2 = [s["name"] for s in sources if s["stage"] in ("stage2", "both")]
    common = {
        "global_batch_size": 4,
        "gradcache_chunk": 2,
        "max_steps": 3,
        "checkpoint_every": 2,
        "hard_negatives": 2,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
    }
    cfg = {
        "name": "cluster",
        "storage": {"root": f"s3://{BUCKET}/store", "endpoint_url": endpoint},
        "sources": sources,
        "prep": {
            "shard_rows": 32,
            "cap_per_dataset": 16,
            "clip_seconds": 4.0,
            "long_video_min_s": 5.0,
            "long_video_max_s": 20.0,
        },
        "model": {
            "name_or_path": f"s3://{BUCKET}/models/tiny",
            "max_visual_tokens": 16,
            "video_frames": 2,
            "max_text_tokens": 64,
        },
        "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
        "loss": {"false_negative_delta": None},
        "stage1": common,
        "stage2": {**common, "mixtures": [{"name": "even", "datasets": {n: 1.0 for n in stage2}}]},
        "eval": {"sets": [f"s3://{BUCKET}/corpus/eval/eval-image-retrieval"], "batch_size": 8},
        "tracking": {
            "tracking_uri": f"sqlite:///{root}/mlflow.db",
            "experiment": "cluster",
            "upload_models": False,
        },
        "compute": {
            "ray_address": address,  # short calls only: serving the champion
            "job_address": jobs,  # every step: a Ray Job
            "driver_resources": {"driver": 1},
            "job_poll_s": 0.5,
            "num_workers": 2,
            "cpus_per_worker": 1,
            "resources_per_worker": {"trainer": 1},
            "step_cpus": 0.5,
        },
    }
    path = root / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


DRIVER = """
import json, sys
from flows.pipeline import full_pipeline
state = full_pipeline(sys.argv[1], return_state=True)
out = state.result() if state.is_completed() else {"failed": state.message}
if state.is_completed():  # serve the champion from S3 on the cluster, and query it
    import requests
    from ray import serve
    from rzenembed.compute.connect import ensure_ray
    from rzenembed.config import load_config, resolve_paths
    from rzenembed.serving.follow import RegistryFollower
    cfg = resolve_paths(load_config(sys.argv[1], sys.argv[2:-1]))
    ensure_ray(cfg.compute.ray_address)  # the pipeline itself needed no Ray connection
    RegistryFollower(cfg, "models:/rzenembed@champion").start()
    url = f"http://127.0.0.1:{cfg.serve.port}"
    image = cfg.serve.media_roots[0] + "/" + sys.argv[-1].split("=", 1)[1]
    body = {"input": ["a red circle", {"image": image, "text": "what is it"}]}
    answer = requests.post(url + "/v1/embeddings", json=body, timeout=120)
    out["serve"] = {"status": answer.status_code, "body": answer.json(),
                    "models": requests.get(url + "/v1/models", timeout=60).json()}
    serve.shutdown()
print("RESULT " + json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def run(cluster, s3, s3_endpoint, prefect_api, sample_corpus, tiny_model_dir, tmp_path_factory):
    address, jobs, env, node_dirs, server_starts = cluster
    root = tmp_path_factory.mktemp("cluster-run")
    upload_inputs(s3, sample_corpus, tiny_model_dir)
    config = cluster_config(sample_corpus, root, address, jobs, s3_endpoint)
    driver_env = {
        **env,
        "PREFECT_HOME": str(root / "prefect"),
        # Both drivers report to one Prefect API, as worker pods report to the server.
        "PREFECT_API_URL": prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "RZENEMBED_CACHE": str(root / "cache-driver"),
    }
    image = next(p for p in s3.find(f"{BUCKET}/corpus/{PICTURES}") if p.endswith(".png"))
    serving = [
        f"serve.port={free_port()}",
        "serve.num_cpus=0",
        "serve.auth=none",  # loopback only
        "serve.api_num_cpus=0",
        f"serve.media_roots=['s3://{BUCKET}/corpus']",
        f"image={image.split('/corpus/', 1)[1]}",  # read by the driver, not a key
    ]
    command = [sys.executable, "-c", DRIVER, str(config), *serving[:-1], serving[-1]]
    # The first driver is killed (SIGKILL, its whole process group) while stage 1 trains.
    first_log = root / "first-driver.log"
    first = subprocess.Popen(
        command,
        cwd=REPO,
        env=driver_env,
        stdout=first_log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        training = wait_for_job(jobs, env, "rzenembed-train-stage1-", first, first_log)
        result_file = f"{BUCKET}/store/_jobs/{training}/result.pkl"
        unfinished_when_killed = not s3.exists(result_file)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    done = subprocess.run(
        command,
        cwd=REPO,
        env=driver_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if "failed" in result:  # what the head said, before its logs are deleted
        result["head_logs"] = client_server_logs(node_dirs[0])
    with cluster_token(env):
        listed = job_client(jobs).list_jobs()
    # Where each job's driver ran: the node whose logs hold its driver log.
    drivers = {
        node.name: sorted(p.name for p in node.glob("session_*/logs/job-driver-*.log"))
        for node in node_dirs[:2]
    }
    proxy_log = next(node_dirs[0].glob("session_*/logs/ray_client_server.err"))
    job_record = {
        "server_starts": server_starts.read_text().split()[1::2],
        "client_servers": proxy_log.read_text().count("SpecificServer started on port"),
        # Submitted jobs (a Ray Client driver, as serving's, is listed without an id).
        "jobs": {j.submission_id: j.status.value for j in listed if j.submission_id},
        "drivers": drivers,
        "killed_during": training,
        "unfinished_when_killed": unfinished_when_killed,
        "second_driver_log": (done.stdout + done.stderr)[-40000:],
    }
    # Nothing on a node's disk may matter from here on.
    stop_nodes([d for d in node_dirs if "cache" not in d.name])
    for folder in [*node_dirs, root / "cache-driver"]:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "result": result,
        "config": config,
        "root": root,
        "env": driver_env,
        **job_record,
    }


@contextmanager
def cluster_token(env: dict[str, str]):
    """This process as a client of the cluster's job server: its token in the environment
    (Ray's job client reads it there), for the block."""
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update({k: env[k] for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_job(
    address: str, env: dict[str, str], prefix: str, driver, log: Path, limit_s=900
) -> str:
    """The id of the first job named ``prefix...`` once it runs (the driver still alive)."""
    deadline = time.monotonic() + limit_s
    with cluster_token(env):
        client = job_client(address)
        while time.monotonic() < deadline:
            for job in client.list_jobs():
                if job.submission_id.startswith(prefix) and job.status.value == "RUNNING":
                    return job.submission_id
            if driver.poll() is not None:
                raise AssertionError(
                    f"the first driver ended ({driver.returncode}) before {prefix}* ran:\n"
                    + log.read_text()[-6000:]
                )
            time.sleep(1)
    raise AssertionError(f"no job {prefix}* ran within {limit_s} s")


def uris(value) -> list[str]:
    """Every URI-looking string in a JSON value."""
    if isinstance(value, dict):
        return [u for v in value.values() for u in uris(v)]
    if isinstance(value, list):
        return [u for v in value for u in uris(v)]
    return [value] if isinstance(value, str) and ("://" in value or value.startswith("/")) else []


def test_the_cluster_run_registers_a_model_whose_outputs_are_all_on_s3(run):
    result = run["result"]
    assert "failed" not in result, result
    assert result["model_uri"] == "models:/rzenembed/1"
    outputs = {k: result[k] for k in ("model", "report", "trained", "data")}
    found = [u for u in uris(outputs) if not u.startswith(("models:/", "sqlite:"))]
    assert found and all(u.startswith(f"s3://{BUCKET}/") for u in found), [
        u for u in found if not u.startswith(f"s3://{BUCKET}/")
    ]
    assert result["model"]["uri"].startswith(f"s3://{BUCKET}/store/_models/cluster/soup-")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run['root']}/mlflow.db")
    version = client.get_model_version("rzenembed", "1")
    model = client.get_logged_model(version.tags["rzenembed.model_id"])
    assert model.tags["rzenembed.folder"] == result["model"]["uri"]


def test_every_checkpoint_is_on_s3_and_the_workers_ran_on_two_nodes(run, s3):
    trained = run["result"]["trained"]
    adapters = [trained["stage1"], *trained["stage2"]]
    checkpoints = [p for p in s3.find(f"{BUCKET}/store/_train") if "/checkpoint_" in p]
    assert {p.split("/_train/")[1].split("/")[0] for p in checkpoints} == {
        f"cluster-{a['extra']['stage']}-{a['uri'].rstrip('/').split('/')[-2]}" for a in adapters
    }
    for adapter in adapters:
        run_folder = adapter["uri"].removeprefix("s3://").rsplit("/", 1)[0]
        workers = [json.loads(s3.cat(p)) for p in s3.find(f"{run_folder}/workers")]
        assert sorted(w["rank"] for w in workers) == [0, 1]
        assert len({w["node_id"] for w in workers}) == 2, workers
        assert {w["backend"] for w in workers} == {"gloo"}


def test_padded_negatives_were_trained_across_the_two_workers(run, s3):
    stage2 = run["result"]["trained"]["stage2"][0]
    text = s3.cat(stage2["extra"]["metrics"].removeprefix("s3://")).decode()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {r["negatives_per_query"] for r in rows} <= {0, 1, 2}
    assert all("padded_negatives" in r and "masked_fraction" in r for r in rows)


def test_the_champion_is_served_on_the_cluster_from_s3(run):
    served = run["result"]["serve"]
    assert served["status"] == 200, served
    body, (listed,) = served["body"], served["models"]["data"]
    assert len(body["data"]) == 2 and len(body["data"][0]["embedding"]) == listed["dimensions"]
    assert body["rzenembed"]["version"] == listed["version"] == "1"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run['root']}/mlflow.db")
    version = client.get_model_version("rzenembed", "1")
    assert body["rzenembed"]["digest"] == version.tags["rzenembed.digest"]
    assert len(listed["node"]) == 56 and listed["device"] == "cpu"  # a Ray node id


def test_serving_connected_again_after_the_head_failed_to_start_its_client_server(run):
    """Serving's Ray Client connection found its server dead (planted by the head's
    ``sitecustomize``), said so with the attempt number, and connected again: the champion
    was served (the test above)."""
    lines = run["second_driver_log"].splitlines()
    retries = [line for line in lines if "Ray Client at ray://" in line and "(attempt " in line]
    assert retries and all(f"(attempt {n} of 4, " in r for n, r in enumerate(retries, 1)), retries
    # A failed attempt ends with the proxy's answer (after its 6 s wait for the dead
    # server's channel), not when the proxy lets its streams go: the data stream after the
    # 30 s reconnect grace, the log stream after 5 x (6 + 2) s of retries
    # (rzenembed.compute.connect.abandoned_streams).
    took = [float(re.search(r"of 4, ([\d.]+) s\)", r).group(1)) for r in retries]
    assert max(took) < 20, retries
    # Every attempt but the last failed: the planted one, any whose server died by itself
    # and, on a loaded head, any whose wait for its server's channel timed out.
    starts = run["server_starts"]
    assert starts.count("exit") == FAILED_STARTS and starts[-1] == "start", starts
    assert len(retries) >= FAILED_STARTS, retries
    assert FAILED_STARTS + 1 <= run["client_servers"] <= len(retries) + 1, run


def test_verify_passes_from_s3_alone_after_the_nodes_are_gone(run, s3_endpoint, tmp_path):
    env = {**run["env"], "RZENEMBED_CACHE": str(tmp_path / "fresh-cache")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rzenembed.cli",
            "verify",
            "models:/rzenembed/1",
            "--tracking-uri",
            f"sqlite:///{run['root']}/mlflow.db",
            "--endpoint-url",
            s3_endpoint,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "0 CHANGED, 0 MISSING" in done.stdout
    assert "[OK] raw sample-video-clips" in done.stdout


def test_a_killed_driver_is_replaced_by_one_that_reattaches_to_the_training_job(run, s3):
    """The first driver died while stage 1 trained as a Ray Job; the second found the job by
    its step's key and followed it: one training job ran (and finished once), one adapter
    was published, and the flow's result names the job."""
    training = run["killed_during"]
    assert run["unfinished_when_killed"], "stage 1 had already finished when the driver died"
    stage1_jobs = {k: v for k, v in run["jobs"].items() if k.startswith("rzenembed-train-stage1-")}
    assert stage1_jobs == {training: "SUCCEEDED"}
    assert f"reattached to Ray Job {training}" in run["second_driver_log"]
    adapter = run["result"]["trained"]["stage1"]
    assert adapter["extra"]["job"] == training
    run_folders = {
        p.split("/stage1/")[1].split("/")[0]
        for p in s3.find(f"{BUCKET}/store/_models/cluster/stage1")
    }
    assert len(run_folders) == 1 and adapter["uri"].rstrip("/").split("/")[-2] in run_folders
    trains = {p.split("/_train/")[1].split("/")[0] for p in s3.find(f"{BUCKET}/store/_train")}
    assert len([t for t in trains if "-stage1-" in t]) == 1
    # Every step ran as a job and every job but the failed-over ones succeeded.
    assert set(run["jobs"].values()) == {"SUCCEEDED"}, run["jobs"]


def test_every_job_driver_ran_on_the_node_that_declares_the_driver_slots(run):
    """Drivers (and the evaluation coordinator, which is the evaluation job's driver) are
    placed by the ``driver`` resource, which only the head declares, never by chance."""
    on_head = {
        name.removeprefix("job-driver-").removesuffix(".log") for name in run["drivers"]["head"]
    }
    assert run["drivers"]["node-b"] == []
    assert on_head == set(run["jobs"]), (on_head, set(run["jobs"]))
    assert any(job.startswith("rzenembed-evaluate-") for job in on_head)
