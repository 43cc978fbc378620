"""Shared fixtures: the tiny offline Qwen2-VL model is built once per test session."""

from __future__ import annotations

import os

# `make test` runs two pytest-xdist workers (tests/xdist_layout.py); each gets a Prefect
# home of its own, so that two processes never migrate or write one SQLite database.
if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get("PREFECT_HOME"):
    os.environ["PREFECT_HOME"] = os.path.join(
        os.environ["PREFECT_HOME"], os.environ["PYTEST_XDIST_WORKER"]
    )
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two workers share two cores, and every Ray worker computes on one thread already (Ray
# sets it, and a training rank sets its own). A test process or a driver it starts
# computing on torch's default of one thread per core would have its OpenMP threads spin,
# waiting for a core that the other worker holds: in-process torch tests two by two took
# 24% fewer CPU-seconds and 25% less time with one thread (docs/PERFORMANCE.md, "The test
# suite"). Set before anything here imports torch, and inherited by every child process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Dummy credentials for the local S3 server (moto); set before Ray starts so its workers
# inherit them. Real credentials are never needed by the tests.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default) and only notices at a poll that training finished: about 3 s at the end of every
# fit, whose tests here train for seconds (measured: 12.4 s -> 9.2 s per 3-step fit). A poll
# that does not answer within the interval is not an error (it is awaited at the next one).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Every Ray Train fit starts a PlacementGroupCleaner that asks the Ray state API, every
# second, whether the fit's controller lives. With no address given, the state API finds
# its cluster through /tmp/ray/ray_current_cluster, the last head started with `ray start`
# on the machine: a stale one (a stopped head) blocks each query 40 s and the fit's end
# waits 12 s for the cleaner to stop; another live cluster's dashboard would answer that
# the controller does not exist, and the cleaner would remove the fit's placement group.
# The tests' local runtimes serve no state API (no dashboard): an address where nothing
# listens makes the query fail at once, as it does when no stale marker is there.
os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
# Every worker group of a fit also starts a PreemptionWatcher actor (a process of its own,
# about 3 CPU-seconds of imports here) that polls for node preemption notices; the tests'
# local nodes are never preempted. Clusters keep Ray's default (on).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Each Ray node's log monitor globs its session's log folder every 0.1 s while it holds
# fewer than RAY_LOG_MONITOR_MANY_FILES_THRESHOLD files (1000); a session here writes
# hundreds (one pair per worker process), and the glob was the session head's costliest
# background process (about 57 CPU-seconds over a suite run). With 0 it looks for new files
# every LOG_NAME_UPDATE_INTERVAL_S (0.5 s by default). Nothing here reads worker output
# through the driver (log_to_driver is off; job logs are read from their files).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

import numpy as np
import pytest
from PIL import Image

from rzenembed.config import ModelConfig

SHARED_PREFECT = pytest.StashKey()


def pytest_configure(config):
    """On the xdist controller: start the suite's Prefect server before the workers start,
    so that both share it (tests/prefect_server.py says why)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    from .prefect_server import start_shared

    config.stash[SHARED_PREFECT] = start_shared()


def pytest_unconfigure(config):
    server = config.stash.get(SHARED_PREFECT, None)
    if server is not None:
        from .prefect_server import stop_shared

        stop_shared(server)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """On an xdist worker: units longest first, as the scheduler below hands them out."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        from .xdist_layout import ordered

        items[:] = ordered(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Modules and groups as units, in the order the workers collected them
    (tests/xdist_layout.py says why)."""
    from .xdist_layout import UnitScheduling

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_family_dir(tmp_path_factory):
    """``tiny_family_dir(family)``: the tiny model of a backbone family, built once."""
    from rzenembed.modeling.tiny import build_tiny_model

    built = {}

    def get(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp("tiny" if family == "qwen2-vl" else family)
            built[family] = build_tiny_model(folder / "model", seed=0, family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_family_dir):
    return tiny_family_dir("qwen2-vl")


def tiny_config_for(model_dir) -> ModelConfig:
    return ModelConfig(
        name_or_path=str(model_dir), max_visual_tokens=64, video_frames=4, max_text_tokens=128
    )


@pytest.fixture(scope="session")
def tiny_model_config(tiny_model_dir) -> ModelConfig:
    return ModelConfig(
        name_or_path=str(tiny_model_dir),
        max_visual_tokens=64,
        video_frames=4,
        max_text_tokens=128,
    )


@pytest.fixture()
def tiny_embedder(tiny_model_dir, tiny_model_config):
    from rzenembed.modeling import RzenEmbedder

    return RzenEmbedder.from_pretrained(tiny_model_dir, config=tiny_model_config)


def random_image(seed: int, size: tuple[int, int] = (84, 112)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 255, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


@pytest.fixture()
def image_factory():
    return random_image


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray runtime for the session: 2 CPUs, no dashboard."""
    import ray

    from rzenembed.compute.connect import ensure_ray

    ensure_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    from rzenembed.data.sample import build_sample_corpus

    return build_sample_corpus(tmp_path_factory.mktemp("corpus") / "sample", seed=0)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 server (moto in server mode) on loopback, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def prepared_for_training(ray_local, sample_corpus, tiny_model_dir, tmp_path_factory):
    """The sample corpus prepared once (``test_training.training_config``) for the training
    tests and the family tests, which train the other backbones on the same manifests."""
    from rzenembed.prep.prepare import prepare_all

    from .test_training import training_config

    root = tmp_path_factory.mktemp("train")
    cfg = training_config(sample_corpus, str(root / "versions"), tiny_model_dir)
    return cfg, prepare_all(cfg, base=str(sample_corpus.root), show_progress=False)


@pytest.fixture(scope="session")
def adaptive_stage1(prepared_for_training):
    """Stage 1 with adaptive sampling (``test_training_resume.adaptive_config``: two workers,
    8 steps) on the prepared sample corpus, trained once: test_training's stage 1 and the
    uninterrupted reference of the resume tests. Returns (config, prepared data, result)."""
    from rzenembed.training.stages import run_stage1

    from .test_training_resume import adaptive_config

    cfg, data = prepared_for_training
    cfg = adaptive_config(cfg).model_copy(update={"name": "adaptive"})
    return cfg, data, run_stage1(cfg, data.stages["stage1"])


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The suite's one Prefect API server (tests/prefect_server.py), as a deployment has
    one: the flows the suite runs in this process and the drivers it starts as processes
    (the demo, cluster and job drivers) all report to it, instead of each migrating a fresh
    database and starting a temporary server of its own (13 to 27 s apiece on two cores).
    Under xdist the controller started it for both workers; alone, this fixture starts it.
    Yields the API URL; flow runs are told apart by their ids, never by being alone on the
    server."""
    from .prefect_server import SHARED_API_ENV, PrefectServer, wait_until_healthy
    from .ray_nodes import free_port

    shared = os.environ.get(SHARED_API_ENV)
    if shared:
        wait_until_healthy(shared)
        yield shared
        return
    server = PrefectServer(tmp_path_factory.mktemp("prefect-api"), free_port())
    try:
        wait_until_healthy(server.url, server)
        yield server.url
    finally:
        server.stop()
