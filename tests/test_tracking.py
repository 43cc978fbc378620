"""Secrets never reach MLflow; params flatten; the tracker against a real SQLite store."""

from __future__ import annotations

import json
import os

import pytest

from rzenembed.config import TrackingConfig
from rzenembed.tracking import (
    REDACTED,
    LineageRef,
    Tracker,
    flatten,
    is_secret_name,
    lineage,
    raw_sources,
    redact,
    secret_values,
)


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("AWS_SECRET_ACCESS_KEY", True), ("AWS_ACCESS_KEY_ID", True), ("HF_TOKEN", True),
        ("MLFLOW_TRACKING_PASSWORD", True), ("api_key", True), ("private-key", True),
        ("TOKENIZERS_PARALLELISM", False), ("key_frames", False), ("hardness_alpha", False),
        ("endpoint_url", False),
    ],
)  # fmt: skip
def test_secret_names_are_whole_words(name, secret):
    assert is_secret_name(name) is secret


def test_secret_values_come_from_secret_env_names_only():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "TOKENIZERS_PARALLELISM": "false",
           "HF_TOKEN": "false", "HOME": "/root"}  # fmt: skip
    assert secret_values(env) == ["s3cr3t-value"]


def test_redact_masks_keys_urls_and_env_values():
    data = {
        "storage": {"endpoint_url": "http://alice:pa55@minio:9000", "root": "s3://b/x"},
        "password": "hunter2",
        "note": "the key is s3cr3t-value, keep it",
        "list": ["s3cr3t-value", 3, None],
        "token": None,
    }
    out = redact(data, secrets=["s3cr3t-value"])
    assert out["storage"] == {"endpoint_url": f"http://{REDACTED}@minio:9000", "root": "s3://b/x"}
    assert out["password"] == REDACTED
    assert out["note"] == f"the key is {REDACTED}, keep it"
    assert out["list"] == [REDACTED, 3, None]
    assert out["token"] is None  # nothing to hide


def test_flatten_for_params():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}}) == {
        "a.b": "1", "a.c": "[1, 2]", "d": "x", "e": "{}",
    }  # fmt: skip


def test_a_lineage_walk_over_real_runs(tmp_path, monkeypatch):
    """Raw -> dataset -> adapter -> registered model, recorded and walked back."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "walk-secret-123")
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    tracker = Tracker(cfg)
    parent = tracker.client.create_run(tracker.experiment_id).info.run_id
    ingest = tracker.start_step(parent, "ingest", "ingest a", {"uri": "s3://k:walk-secret-123@b"})
    raw = LineageRef("raw", "a", "/data/a", "d" * 64)
    version = LineageRef("dataset", "a/ingest", "/v/a", "e" * 64, ingest)
    tracker.record_lineage(ingest, "ingest", [raw], [version])
    train = tracker.start_step(parent, "stage1", "train", {"lr": 1e-3})
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 8)
    model_id = tracker.log_model(train, "adapter", folder, "lora-adapter", {}, {
        "rzenembed.digest": "f" * 64})  # fmt: skip
    tracker.record_lineage(train, "stage1", [version], [])
    version_number, reused = tracker.register(model_id, train, "f" * 64, {})
    assert not reused
    decision = tracker.promote_if_better(version_number, "All", 0.5)
    assert decision["promoted"] and decision["champion_version"] is None
    tree = lineage(tracker, "models:/rzenembed@champion")
    assert tree.step == "stage1" and tree.ref.digest == "f" * 64
    assert [(r.name, r.digest) for r in raw_sources(tree)] == [("a", "d" * 64)]
    assert tree.children[0].ref.run_id == ingest and tree.children[0].step == "ingest"
    params = tracker.client.get_run(ingest).data.params
    assert params["uri"] == f"s3://{REDACTED}@b"
    second, reused = tracker.register(model_id, train, "a" * 64, {})
    assert (second, reused) == ("2", False)
    worse = tracker.promote_if_better(second, "All", 0.4)
    assert not worse["promoted"] and worse["champion_score"] == 0.5
    assert str(tracker.champion().version) == version_number


def test_registering_the_same_digest_again_reuses_its_version(tmp_path):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t")
    tracker = Tracker(cfg)
    runs = [tracker.client.create_run(tracker.experiment_id).info.run_id for _ in range(3)]
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0" * 8)
    models = [tracker.log_model(r, "souped", folder, "souped-model", {}, {}) for r in runs]
    before = os.environ.get("MLFLOW_TRACKING_URI")
    assert tracker.register(models[0], runs[0], "1" * 64, {}) == ("1", False)
    # Registering must not leave its store as the process's (and children's) tracking URI:
    # the flows read MLFLOW_TRACKING_URI as the service stack's server.
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    assert tracker.promote_if_better("1", "All", 0.5)["promoted"]
    assert tracker.register(models[1], runs[1], "2" * 64, {}) == ("2", False)
    # A rerun elsewhere produced the first model again: same digest, same version.
    assert tracker.register(models[2], runs[2], "1" * 64, {}) == ("1", True)
    client = tracker.client
    assert len(client.search_model_versions("name = 'rzenembed'")) == 2
    first = client.get_model_version("rzenembed", "1")
    assert json.loads(first.tags["rzenembed.registered_by"]) == [runs[0], runs[2]]
    assert first.tags["rzenembed.model_id"] == models[0]  # it keeps its first LoggedModel
    assert client.get_run(runs[2]).data.tags["rzenembed.registered_version"] == "rzenembed/1"
    assert str(client.get_model_version_by_alias("rzenembed", "candidate").version) == "1"
    decision = tracker.promote_if_better("1", "All", 0.5)
    assert decision["promoted"] and decision["already_champion"]
    assert str(tracker.champion().version) == "1"
    assert b"walk-secret-123" not in (tmp_path / "mlflow.db").read_bytes()
