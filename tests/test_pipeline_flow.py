"""full-pipeline on a real (temporary) Prefect API, local Ray and an MLflow SQLite store.

Five executions share one storage root: a complete run; the same config again (every step
a cache hit); a run with the ``doc-heavy`` stage-2 mixture reweighted whose training of
that mixture fails once (injected); its rerun, which finishes without redoing data prep,
stage 1 or the unchanged ``even`` mixture; and a retrain after one source changed, with a
gating margin no candidate can clear: only the mixture that contains the changed source
(``even``; ``doc-heavy`` leaves it out) trains again. Between the first two, the same
pipeline runs with Prefect's cache off (``refresh``): every step runs and finds its output
on the storage root by key (nothing trains again) and registering reuses the version (one
registered version, not two); and ``rzenembed verify`` checks the registered model's
lineage before and after one byte of one dataset shard is changed. (That another storage
root and another hash seed give the same digests is shown step by step, cheaper, by
test_prep_s3 for the data and test_reproducible_training for training and the soup.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

import tasks.training
from rzenembed.data.version import DatasetVersion
from rzenembed.prep.mixture import StageManifest
from rzenembed.tracking import Tracker, lineage, raw_sources

from .faults import FailOnce

# The module fixture runs a whole pipeline (3-6 minutes beside the other xdist worker):
# the first test's setup may pass the suite's 600 s per test on a slow machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SECRET = "rz-secret-7f3a9c1e55"
KEY_ID = "RZKEYID4242EXAMPLE"
DATA_STEPS = {"ingest", "clean", "split-clips", "cap", "merge-classification", "mixture"}
# The source the retrain changes; only the ``even`` mixture trains on it.
CHANGED_SOURCE = "sample-image-qa"
# The stage-2 setting the failed and resumed runs change: the ``doc-heavy`` mixture's weights
# (its manifest changes, the ``even`` mixture's does not).
REWEIGHTED = ["stage2.mixtures.1.datasets.sample-visdoc=8.0"]
# The pipeline's executions on one storage root, in the order the fixture runs them.
EXECUTIONS = [
    "first",
    "other_store",
    "fresh",
    "again",
    "again_retrain",
    "failed",
    "resumed",
    "retrain",
]


def published_scores(root: Path) -> Path:
    """A published MMEB-V2 score file (its shape, one dataset) for the report to stand beside."""
    path = root / "Published-2B.json"
    metrics = {"image": {"ImageNet-1K": {"hit@1": 0.5, "num_data": 1000}}}
    path.write_text(json.dumps({"metadata": {"model_name": "Published-2B"}, "metrics": metrics}))
    return path


def pipeline_config(corpus, model_dir, root: Path, data: str = "data") -> Path:
    sources = yaml.safe_load(corpus.sources_yaml.read_text())
    for source in sources:
        source["uri"] = str(corpus.root / source["uri"])
    stage2 = [s["name"] for s in sources if s["stage"] in ("stage2", "both")]
    common = {
        "global_batch_size": 4,
        "gradcache_chunk": None,
        "max_steps": 3,
        "checkpoint_every": 3,
        "hard_negatives": 0,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
    }
    cfg = {
        "name": "flowtest",
        "storage": {"root": str(root / data)},
        "sources": sources,
        "prep": {
            "shard_rows": 64,
            "cap_per_dataset": 25,
            "clip_seconds": 4.0,
            "long_video_min_s": 5.0,
            "long_video_max_s": 20.0,
        },
        "model": {
            "name_or_path": str(model_dir),
            "max_visual_tokens": 16,
            "video_frames": 4,
            "max_text_tokens": 64,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"false_negative_delta": None},
        "stage1": common,
        "stage2": {
            **common,
            "mixtures": [
                {"name": "even", "datasets": {n: 1.0 for n in stage2}},
                {
                    "name": "doc-heavy",
                    "datasets": {
                        n: (4.0 if n == "sample-visdoc" else 1.0)
                        for n in stage2
                        if n != CHANGED_SOURCE
                    },
                },
            ],
        },
        "eval": {
            "sets": [str(corpus.root / "eval")],
            "batch_size": 8,
            "reference_scores": [str(published_scores(root))],
            "calibration_rows": 32,  # int8 scored and served from a small sample
        },
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "flowtest"},
        # The two stage-2 mixtures train side by side (one CPU each of local Ray's two).
        "compute": {"num_workers": 1, "cpus_per_worker": 1, "concurrent_mixtures": 2},
    }
    path = root / f"pipeline-{data}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


class CopiedCorpus:
    def __init__(self, root: Path):
        self.root = root
        self.sources_yaml = root / "sources.yaml"


def copy_corpus(corpus, target: Path) -> CopiedCorpus:
    shutil.copytree(corpus.root, target)
    return CopiedCorpus(target)


def add_row(records: Path) -> None:
    """A new, valid row in a source: the first row's shape with a new id, question and
    image (a fresh image: a copy of an existing one would be cleaned away as a duplicate)."""
    import numpy as np
    from PIL import Image

    first = json.loads(records.read_text().splitlines()[0])
    pixels = np.random.default_rng(7).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(records.parent / "media" / "added.png")
    first["id"] = f"{first['id']}-added"
    first["query"]["text"] = first["query"]["text"] + " (asked again)"
    first["query"]["media"] = [{**first["query"]["media"][0], "uri": "media/added.png"}]
    with records.open("a") as f:
        f.write(json.dumps(first) + "\n")


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Task name -> the state names of its runs in that flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name)
    return out


def stage2_spans(flow_run_id) -> list[tuple]:
    """(start, end) of every stage-2 training task run in that flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return [(r.start_time, r.end_time) for r in runs if r.name.startswith("train-stage2-")]


def artifacts(flow_run_id) -> dict[str, str]:
    """That flow run's artifacts (asked by its id: the session's server holds every other
    test's too, more than one page)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {a.key or a.type: a.data for a in found if a.flow_run_id == flow_run_id}


@pytest.fixture(autouse=True)
def on_the_suites_api(prefect_api):
    """Every test here reads states and results through the suite's Prefect API (without
    one, the first read would start a temporary server in this process)."""
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        yield


@pytest.fixture(scope="module")
def runs(ray_local, prefect_api, sample_corpus, tiny_model_dir, tmp_path_factory):
    from flows.pipeline import full_pipeline, retrain

    root = tmp_path_factory.mktemp("pipeline")
    corpus = copy_corpus(sample_corpus, root / "corpus")  # the retrain edits a source
    config = pipeline_config(corpus, tiny_model_dir, root)
    saved = {k: os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")}
    os.environ.update({"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": KEY_ID})
    changed = REWEIGHTED
    out = {"root": root, "config": config}
    try:
        with temporary_settings(
            {PREFECT_API_URL: prefect_api, PREFECT_LOCAL_STORAGE_PATH: root / "prefect-results"}
        ):
            out["first"] = full_pipeline(str(config), return_state=True)
            # The same work into a second MLflow store (as the local stack's server after
            # the demo's file): every step finds its output by key and writes its run there.
            other = [f"tracking.tracking_uri=sqlite:///{root}/mlflow-other.db"]
            out["other_store"] = full_pipeline(str(config), other, return_state=True)
            out["fresh"] = full_pipeline(str(config), refresh=True, return_state=True)
            out["verify"] = verify_before_and_after_a_changed_byte(config, out["first"])
            out["again"] = full_pipeline(str(config), return_state=True)
            # The scheduled retraining with nothing changed: every step, register included,
            # is a cache hit, so its decision is the refreshed run's, reported as reused.
            out["again_retrain"] = retrain(str(config), return_state=True)
            # Stage 2 of the reweighted mixture fails once (``even`` is a cache hit and never
            # calls run_training; the tasks run in this process, so a patch reaches them).
            with pytest.MonkeyPatch.context() as patch:
                failing = FailOnce(
                    tasks.training.run_training,
                    root / "fault-marker",
                    lambda cfg, stage, *a, **k: stage == "stage2",
                )
                patch.setattr(tasks.training, "run_training", failing)
                out["failed"] = full_pipeline(str(config), changed, return_state=True)
                out["resumed"] = full_pipeline(str(config), changed, return_state=True)
            add_row(corpus.root / CHANGED_SOURCE / "records.jsonl")
            gated = [*changed, "eval.min_improvement=1.0"]  # no candidate can clear it
            out["retrain"] = retrain(str(config), gated, return_state=True)
            out["first_stage2_spans"] = stage2_spans(out["first"].state_details.flow_run_id)
            for name in EXECUTIONS:
                state = out[name]
                out[f"{name}_tasks"] = task_states(state.state_details.flow_run_id)
                out[f"{name}_artifacts"] = artifacts(state.state_details.flow_run_id)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return out


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    from rzenembed.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def verify_before_and_after_a_changed_byte(config: Path, first) -> dict:
    """``rzenembed verify`` on the registered model; then one byte of one shard of the
    cleaned caption dataset is flipped, verified again, and put back."""
    from rzenembed.config import load_config

    tracking = load_config(config).tracking.tracking_uri
    argv = ["verify", "models:/rzenembed@champion", "--tracking-uri", tracking]
    out = {"clean": run_cli(argv)}
    version = DatasetVersion.open(
        first.result()["data"]["versions"]["sample-captions"]["clean"]["uri"]
    )
    shard = Path(version.uri) / version.manifest.shards[0].path
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x01
    original = shard.read_bytes()
    shard.write_bytes(bytes(data))
    try:
        out["changed"] = run_cli(argv)
        out["changed_json"] = run_cli([*argv, "--json"])
    finally:
        shard.write_bytes(original)
    out["restored"] = run_cli(argv)
    out["shard"] = (version.uri, version.manifest.shards[0].path)
    return out


def tracker_for(runs) -> Tracker:
    from rzenembed.config import load_config

    return Tracker(load_config(runs["config"]).tracking)


def test_the_first_run_registers_a_champion(runs):
    state = runs["first"]
    assert state.is_completed(), state.message
    result = state.result()
    # The registration run carries the lineage drawn as one picture, each input once.
    client = MlflowClient(tracking_uri=tracker_for(runs).cfg.tracking_uri)
    picture = client.download_artifacts(result["registered"]["run_id"], "lineage/lineage.svg")
    svg = Path(picture).read_text()
    assert svg.startswith("<svg") and svg.count("eval-sets: decontamination") == 1
    assert all(f"raw: {s}" in svg for s in ("sample-captions", "sample-visdoc"))
    assert result["model_uri"] == "models:/rzenembed/1"
    decision = result["registered"]["extra"]["decision"]
    assert decision["promoted"] and decision["champion_version"] is None  # the first model
    client = MlflowClient(tracking_uri=tracker_for(runs).cfg.tracking_uri)
    first = client.get_model_version("rzenembed", "1")
    assert float(first.tags["rzenembed.score.All"]) == decision["candidate_score"]
    # The later runs registered v2; the champion is whichever scored higher.
    champion = client.get_model_version_by_alias("rzenembed", "champion")
    second = client.get_model_version("rzenembed", "2")
    scores = {v.version: float(v.tags["rzenembed.score.All"]) for v in (first, second)}
    assert champion.version == max(scores, key=lambda v: (scores[v], -int(v)))


def test_lineage_shows_the_rows_decontamination_removed(runs):
    """The sample corpus plants two copies of evaluation items in its captions: the clean
    step's lineage names the evaluation sets it checked and ``rzenembed lineage`` prints
    how many rows each evaluation dataset lost."""
    from rzenembed.config import load_config

    tracking = load_config(runs["config"]).tracking.tracking_uri
    code, out, _ = run_cli(["lineage", "models:/rzenembed@champion", "--tracking-uri", tracking])
    assert code == 0
    captions = [line for line in out.splitlines() if "sample-captions/clean" in line]
    assert captions and all(
        line.endswith("| eval_overlap: eval-image-retrieval/eval-image-retrieval 2")
        for line in captions
    )
    assert "eval-sets decontamination" in out


def test_lineage_reaches_every_raw_dataset_with_manifest_digests(runs):
    from rzenembed.config import load_config

    cfg = load_config(runs["config"])
    tree = lineage(tracker_for(runs), "models:/rzenembed@champion")
    reached = {ref.name: ref for ref in raw_sources(tree)}
    assert set(reached) == {s.name for s in cfg.sources}
    data = runs["first"].result()["data"]
    for name, steps in data["versions"].items():
        manifest = DatasetVersion.open(steps["ingest"]["uri"]).manifest
        assert reached[name].digest == manifest.inputs[0].content_digest
        assert reached[name].uri == manifest.inputs[0].uri

    def walk(node):
        yield node
        for child in node.children:
            yield from walk(child)

    nodes = list(walk(tree))
    for node in nodes:
        if node.ref.kind == "dataset":
            assert node.ref.digest == DatasetVersion.open(node.ref.uri).content_digest
        if node.ref.kind == "stage-manifest":
            assert node.ref.digest == StageManifest.load(node.ref.uri).digest
    assert {n.step for n in nodes if n.step} >= DATA_STEPS | {
        "stage1",
        "merge-stage1",
        "mine",
        "stage2",
        "soup",
    }


def test_stage2_trains_on_the_versions_mined_by_the_stage1_model(runs):
    """The mine step sits between the stages: every stage-2 dataset mined with the merged
    stage-1 model, and the stage-2 manifests name the mined versions."""
    result = runs["first"].result()
    mined = result["data"]["mined"]
    merged = result["trained"]["merged"]
    assert set(mined) == set(result["data"]["stage2_finals"])
    for name, ref in mined.items():
        version = DatasetVersion.open(ref["uri"])
        assert version.manifest.step == "mine" and version.manifest.dataset == name
        assert version.manifest.stats["mined_by"]["digest"] == merged["digest"]
        assert version.manifest.inputs[0].uri == result["data"]["stage2_finals"][name]["uri"]
    for mixture in ("even", "doc-heavy"):
        manifest = StageManifest.load(result["data"]["stages"][f"stage2/{mixture}"]["uri"])
        assert all("/mine/" in d.uri for d in manifest.datasets), manifest.datasets


def test_every_step_has_a_child_run_under_one_parent(runs):
    parent = runs["first"].result()["mlflow_parent_run_id"]
    client = MlflowClient(tracking_uri=tracker_for(runs).cfg.tracking_uri)
    experiment = client.get_experiment_by_name("flowtest").experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=500
    )
    steps = {run.data.tags["rzenembed.step"] for run in children}
    assert steps == DATA_STEPS | {
        "stage1",
        "merge-stage1",
        "mine",
        "stage2",
        "soup",
        "evaluate",
        "register",
    }
    assert all(run.info.status == "FINISHED" for run in children)
    stage2 = [r for r in children if r.data.tags["rzenembed.step"] == "stage2"]
    assert len(stage2) == 2
    history = client.get_metric_history(stage2[0].info.run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2]


def test_the_evaluation_report_is_an_artifact(runs):
    report = runs["first"].result()["report"]
    assert Path(report["uri"]).is_file() and Path(report["extra"]["png"]).is_file()
    markdown = runs["first_artifacts"]["evaluation-report"]
    assert "Summary (MMEB-V2 layout)" in markdown
    # eval.reference_scores: the sample corpus's sets are not the benchmark's, so the
    # section says there is nothing in common rather than inventing a comparison.
    assert "### Published-2B" in markdown and "No dataset was scored on both sides." in markdown
    assert "data-counts" in runs["first_artifacts"]
    client = MlflowClient(tracking_uri=tracker_for(runs).cfg.tracking_uri)
    files = {f.path for f in client.list_artifacts(report["run_id"], "report")}
    assert files == {
        "report/report.json",
        "report/report.md",
        "report/report.png",
        "report/leaderboard.json",
        "report/comparison.png",
        "report/dimensions.png",  # the full size at float, int8 and binary
    }
    # One artifact per finished dataset, for the model and the untrained baseline.
    finished = {k for k in runs["first_artifacts"] if k.startswith("eval-")}
    assert {"eval-model-eval-shapes-classification", "eval-baseline-eval-visdoc"} <= finished


def test_the_two_stage2_mixtures_trained_side_by_side(runs):
    """``compute.concurrent_mixtures: 2``: the second mixture started before the first
    ended, and both finished with their own adapter."""
    spans = runs["first_stage2_spans"]
    assert len(spans) == 2 and all(start and end for start, end in spans), spans
    assert max(start for start, _ in spans) < min(end for _, end in spans), spans
    adapters = [a["uri"] for a in runs["first"].result()["trained"]["stage2"]]
    assert len(set(adapters)) == 2 and all(Path(a).is_dir() for a in adapters), adapters


def test_an_unchanged_second_run_redoes_no_step(runs):
    assert runs["again"].is_completed()
    tasks = runs["again_tasks"]
    assert set(tasks) >= DATA_STEPS
    assert all(state == "Cached" for states in tasks.values() for state in states), tasks


def test_a_run_failed_in_stage2_resumes_without_redoing_data_or_stage1(runs):
    assert runs["failed"].is_failed()
    failed = runs["failed_tasks"]
    assert sorted(failed["train-stage2"]) == ["Cached", "Failed"]  # even, doc-heavy
    resumed = runs["resumed_tasks"]
    assert runs["resumed"].is_completed(), runs["resumed"].message
    for step in [*DATA_STEPS, "train-stage1", "merge-stage1"]:
        assert set(resumed[step]) == {"Cached"}, (step, resumed[step])
    # The unchanged mixture is the first run's adapter; only the reweighted one trained.
    assert sorted(resumed["train-stage2"]) == ["Cached", "Completed"]
    first = runs["first"].result()["trained"]["stage2"]
    again = runs["resumed"].result()["trained"]["stage2"]
    assert [a["extra"]["mixture"] for a in again] == ["even", "doc-heavy"]
    assert [a["uri"] == b["uri"] for a, b in zip(first, again, strict=True)] == [True, False]
    assert runs["resumed"].result()["model_uri"] == "models:/rzenembed/2"


def test_a_cached_registration_is_reported_as_reused_never_as_a_new_decision(runs):
    """The refreshed run made the last decision (v1 already the champion); the unchanged
    run and the unchanged retraining after it get that registration from Prefect's cache
    and say so, naming the run and time, instead of replaying "champion moved"."""
    from flows.pipeline import decision_text

    fresh = str(runs["fresh"].state_details.flow_run_id)
    assert set(runs["again_retrain_tasks"]["register"]) == {"Cached"}
    for name in ("again", "again_retrain"):
        state = runs[name]
        assert state.is_completed(), state.message
        registered = state.result()["registered"]
        assert registered["extra"]["decided"]["flow_run"] == fresh
        said = decision_text(registered, str(state.state_details.flow_run_id))
        assert said.startswith(f"registration reused from flow run {fresh} at "), said
        assert said.endswith("nothing was decided or moved in this run"), said
    artifact = runs["again_retrain_artifacts"]["retraining"]
    assert f"Registration reused from flow run {fresh} at " in artifact, artifact
    assert "Champion moved" not in artifact and "Champion stays" not in artifact, artifact
    # In the run that made it, a decision reads as made there.
    first = runs["first"]
    made = decision_text(first.result()["registered"], str(first.state_details.flow_run_id))
    assert made == "champion moved here"


def test_a_second_tracking_store_gets_every_run_with_its_metrics_and_lineage(runs):
    """The first run's work, run again with another MLflow store: no step is a cache hit
    (the store is part of each step's key), nothing trains again (the same adapters), and
    the second store holds the registered model, every raw source in its lineage and the
    training runs' loss curves (posted from the metrics files, as nothing logged live)."""
    from rzenembed.config import load_config

    state = runs["other_store"]
    assert state.is_completed(), state.message
    tasks = runs["other_store_tasks"]
    assert set(tasks) >= DATA_STEPS | {"train-stage1", "train-stage2", "soup", "register"}
    assert all(s == "Completed" for states in tasks.values() for s in states), tasks
    first, other = runs["first"].result(), state.result()
    assert [a["uri"] for a in other["trained"]["stage2"]] == [
        a["uri"] for a in first["trained"]["stage2"]
    ]
    assert other["model"]["digest"] == first["model"]["digest"]
    store = f"sqlite:///{runs['root']}/mlflow-other.db"
    cfg = load_config(runs["config"], [f"tracking.tracking_uri={store}"])
    tree = lineage(Tracker(cfg.tracking), "models:/rzenembed@champion")
    assert {ref.name for ref in raw_sources(tree)} == {s.name for s in cfg.sources}
    client = MlflowClient(tracking_uri=store)
    adapters = [first["trained"]["stage1"], *first["trained"]["stage2"]]
    for adapter in [*other["trained"]["stage2"], other["trained"]["stage1"]]:
        history = client.get_metric_history(adapter["run_id"], "loss")
        assert sorted(m.step for m in history) == [0, 1, 2], adapter["name"]
    assert {a["run_id"] for a in adapters}.isdisjoint(
        a["run_id"] for a in [other["trained"]["stage1"], *other["trained"]["stage2"]]
    )


def test_secrets_appear_nowhere_in_the_mlflow_store(runs):
    root = runs["root"]
    stores = [root / "mlflow.db", *(p for p in (root / "mlartifacts").rglob("*") if p.is_file())]
    assert len(stores) > 20
    for path in stores:
        data = path.read_bytes()
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, path


def test_a_retrain_reprocesses_only_the_changed_source_and_keeps_the_champion(runs):
    state = runs["retrain"]
    assert state.is_completed(), state.message
    result = state.result()
    tasks = runs["retrain_tasks"]
    ingest = tasks["ingest"]
    assert sorted(ingest).count("Completed") == 1 and ingest.count("Cached") == len(ingest) - 1
    assert "train-stage1" not in tasks  # stage 2 started from the champion's stage-1 model
    # Only the mixture that trains on the changed source trains again.
    assert sorted(tasks["train-stage2"]) == ["Cached", "Completed"]
    before = runs["resumed"].result()["trained"]["stage2"]
    after = result["trained"]["stage2"]
    assert [a["extra"]["mixture"] for a in after] == ["even", "doc-heavy"]
    assert [a["uri"] == b["uri"] for a, b in zip(before, after, strict=True)] == [False, True]
    assert result["model_uri"] == "models:/rzenembed/3"
    decision = result["registered"]["extra"]["decision"]
    assert not decision["promoted"] and decision["min_improvement"] == 1.0
    client = MlflowClient(tracking_uri=tracker_for(runs).cfg.tracking_uri)
    champion = client.get_model_version_by_alias("rzenembed", "champion")
    assert str(champion.version) == decision["champion_version"] != "3"
    assert "Champion stays where it was" in runs["retrain_artifacts"]["retraining"]
    merged = runs["resumed"].result()["trained"]["merged"]
    assert result["trained"]["merged"]["uri"] == merged["uri"]


def test_a_refreshed_run_redoes_no_work_and_reuses_the_registered_version(runs):
    first, fresh = runs["first"].result(), runs["fresh"].result()
    assert runs["fresh"].is_completed(), runs["fresh"].message
    tasks = runs["fresh_tasks"]
    assert set(tasks) >= DATA_STEPS | {"train-stage1", "train-stage2", "soup", "register"}
    # Every step ran (the cache was off) and found its output by key: the same folders.
    assert all(state == "Completed" for states in tasks.values() for state in states), tasks
    for a, b in zip(first["trained"]["stage2"], fresh["trained"]["stage2"], strict=True):
        assert (a["uri"], a["digest"]) == (b["uri"], b["digest"])
    assert (fresh["model"]["uri"], fresh["model"]["digest"]) == (
        first["model"]["uri"],
        first["model"]["digest"],
    )
    assert fresh["report"]["digest"] == first["report"]["digest"]
    assert fresh["model_uri"] == first["model_uri"] == "models:/rzenembed/1"
    assert fresh["registered"]["extra"]["reused"] is True
    assert fresh["registered"]["extra"]["decision"]["already_champion"] is True
    client = MlflowClient(tracking_uri=tracker_for(runs).cfg.tracking_uri)
    v1 = client.get_model_version("rzenembed", "1")
    assert len(json.loads(v1.tags["rzenembed.registered_by"])) == 2


def test_verify_passes_then_names_the_changed_shard(runs):
    checks = runs["verify"]
    code, text, err = checks["clean"]
    assert code == 0, text + err
    assert "[CHANGED]" not in text and "[MISSING]" not in text
    summary = text.strip().splitlines()[-1]
    assert summary.startswith("# ") and " 0 CHANGED, 0 MISSING" in summary
    kinds = {
        line.split("] ", 1)[1].split(" ", 1)[0] for line in text.splitlines() if "[OK]" in line
    }
    assert kinds >= {"registered-model", "adapter", "model", "stage-manifest", "dataset", "raw"}
    code, text, err = checks["changed"]
    uri, shard = checks["shard"]
    assert code == 1
    changed = [line for line in text.splitlines() if "[CHANGED]" in line]
    assert changed and all(uri in line for line in changed), changed
    assert f"shard {shard} changed" in changed[0]
    assert f"CHANGED: dataset sample-captions/clean at {uri}" in err
    tree = json.loads(checks["changed_json"][1])
    assert tree["ok"] is False and tree["counts"]["CHANGED"] >= 1
    assert checks["restored"][0] == 0
