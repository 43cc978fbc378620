"""Training tasks: stage 1, the stage-1 merge, stage 2 per mixture, each one Ray Train job.

The task waits on ``TorchTrainer.fit`` and shows its progress as a Prefect progress
artifact (read from the run's metrics file). The step metrics reach MLflow live when the
tracking server is remote (rank 0 logs them); with a local SQLite store they are posted
from the metrics file when the run ends, so only one process ever writes the file. A loss
and temperature chart is logged beside them.
"""

from __future__ import annotations

import contextvars
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from rzenembed.config import PipelineConfig
from rzenembed.data.folders import exists, read_text
from rzenembed.data.storage import is_remote, join
from rzenembed.modeling.digest import model_digest
from rzenembed.prep.mixture import StageManifest
from rzenembed.tracking import LineageRef, Tracker, flatten
from rzenembed.training.stages import (
    TrainResult,
    merge_step,
    run_dir,
    run_settings,
    run_training,
    total_steps,
)
from tasks.common import RETRIES, RunContext, as_ref, keyed, run_in_job, step_run, with_job


def _train_section(p: dict[str, Any]) -> dict[str, Any]:
    """What decides the run (``run_settings``, shared with the run key) plus where its
    outputs live (storage root, config name): a cached result is a set of URIs there."""
    cfg: PipelineConfig = p["cfg"]
    return {**run_settings(cfg, p["stage"]), "storage": cfg.storage.root, "name": cfg.name}


def _train_inputs(p: dict[str, Any]) -> list[str]:
    return [p["manifest"]["digest"], p["base"]["digest"]]


def base_model_ref(cfg: PipelineConfig) -> dict[str, Any]:
    """The configured base checkpoint as a lineage ref (digest of its weights)."""
    uri = cfg.model.name_or_path
    uri = uri if is_remote(uri) else str(Path(uri).resolve())
    digest = model_digest(uri, cfg.storage.endpoint_url, weights_only=True)
    return LineageRef("model", "base", uri, digest, extra={"digest_of": "weights"}).to_json()


def _live_metrics(cfg: PipelineConfig) -> bool:
    return cfg.tracking.tracking_uri.startswith(("http://", "https://", "databricks"))


class _Progress:
    """Polls the run's metrics file (a URI on the storage root), moves a Prefect progress
    artifact and repeats the loop's warnings (e.g. masking that removes most negatives) in
    the Prefect log (best effort). On a remote root the file is published at every
    checkpoint, so progress moves in checkpoint steps."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None,
        total: int,
        label: str,
        interval_s: float = 5.0,
    ):
        self.uri, self.endpoint_url, self.total, self.label = uri, endpoint_url, total, label
        self.interval_s = interval_s
        self.logger = get_run_logger()  # taken here: the poller thread has no run context
        self.warned: set[int] = set()
        self.artifact = create_progress_artifact(0.0, description=f"training {label}")
        self.stop = threading.Event()
        # The poller runs in a copy of this thread's context: the Prefect settings in force
        # here (an API URL set for this run only, as a test or an embedding program does)
        # are context variables, and without them the thread's artifact updates would start
        # a temporary server of their own and update nothing the run shows.
        context = contextvars.copy_context()
        self.thread = threading.Thread(
            target=context.run, args=(self._run,), daemon=True, name="training-progress"
        )
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.update()

    def update(self) -> None:
        try:
            rows = read_metrics(self.uri, self.endpoint_url)
            for row in rows:
                if row.get("warning") and row["step"] not in self.warned:
                    self.warned.add(row["step"])
                    self.logger.warning("%s: %s", self.label, row["warning"])
            steps = len(rows)
            update_progress_artifact(self.artifact, 100.0 * min(steps, self.total) / self.total)
        except Exception:  # progress is cosmetic; never fail training for it
            pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.update()


def read_metrics(uri: str, endpoint_url: str | None) -> list[dict[str, Any]]:
    """The rows of a run's metrics file on the storage root ([] before the first)."""
    if not exists(uri, endpoint_url):
        return []
    text = read_text(uri, endpoint_url)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def post_metrics(tracker: Tracker, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Step metrics to MLflow (last line wins per step)."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in rows:
        by_step[int(row["step"])] = row
    out = []
    for step, row in sorted(by_step.items()):
        numeric = {k: v for k, v in flatten(row).items() if k not in ("step", "dataset", "batch")}
        for key, value in numeric.items():
            try:
                out.append((key.replace(".", "/"), float(value), step))
            except ValueError:
                continue
    tracker.log_metrics(run_id, out)


def loss_summary(label: str, rows: list[dict[str, Any]], trained_now: bool = True) -> str:
    """One line a person reads: the run's steps and its loss at the start and the end
    (each the mean over a tenth of the run, at least one step; a step written twice, as
    after a resume, counts once: its last line)."""
    by_step = {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}
    losses = [by_step[step] for step in sorted(by_step)]
    if not losses:
        return f"{label}: no steps recorded"
    tenth = max(1, len(losses) // 10)
    first, last = sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth
    how = "trained" if trained_now else "found already trained"
    return f"{label}: {how}, {len(losses)} steps, loss {first:.3f} -> {last:.3f}"


def plot_training(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Loss and per-task temperature curves as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot(steps, [r["loss"] for r in rows], color="#2f6db3", lw=1)
    left.set(title=f"{title}: loss", xlabel="step", ylabel="loss")
    tasks = sorted({k for r in rows for k in r.get("temperature", {})})
    seen = {k for r in rows for k in r.get("per_task_loss", {})}
    for name in [t for t in tasks if t in seen] or tasks:
        right.plot(steps, [r.get("temperature", {}).get(name) for r in rows], lw=1, label=name)
    right.set(title="temperature per task", xlabel="step", ylabel="tau")
    if tasks:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _train(
    cfg: PipelineConfig, stage: str, mixture: str, manifest: dict[str, Any],
    base: dict[str, Any], ctx: RunContext,
) -> dict[str, Any]:  # fmt: skip
    section = _train_section({"cfg": cfg, "stage": stage})
    label = f"{stage}/{mixture}"
    with step_run(cfg, ctx, stage, f"train {label}", section) as (tracker, run_id):
        stage_manifest = StageManifest.load(manifest["uri"], cfg.storage.endpoint_url)
        live = _live_metrics(cfg)
        steps = total_steps(getattr(cfg, stage), stage_manifest)
        progress = None
        result: TrainResult | None = None
        endpoint = cfg.storage.endpoint_url
        try:
            folder = run_dir(cfg, stage, stage_manifest, base["uri"], mixture)
            progress = _Progress(join(folder, "metrics.jsonl"), endpoint, steps, label)
            # The job is named by the config and the run's key (its folder's name; the job
            # runner adds the storage root's tag): a retry or a restarted worker finds the
            # running training instead of starting another.
            key = f"{cfg.name}-{folder.rstrip('/').rsplit('/', 1)[-1]}"
            ran = run_in_job(cfg, f"train-{stage}", run_training, cfg, stage, stage_manifest,
                             base["uri"], mixture, mlflow_run_id=run_id if live else None,
                             key=key)  # fmt: skip
            result = ran.value
        finally:
            if progress is not None:
                progress.close()
        rows = read_metrics(result.metrics_uri, endpoint)
        print(loss_summary(label, rows, result.trained_now))
        # Live metrics went to the MLflow run of the attempt that submitted the job: a run
        # that found the job (a retry, a restarted worker) or found the adapter already
        # trained (another tracking store, a refresh) posts them from the file.
        if not live or ran.reattached or not result.trained_now:
            post_metrics(tracker, run_id, rows)
        with tempfile.TemporaryDirectory() as tmp:
            chart = plot_training(rows, Path(tmp) / "metrics.png", label)
            tracker.log_file(run_id, chart, "charts")
            metrics_file = Path(tmp) / "metrics.jsonl"
            metrics_file.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            tracker.log_file(run_id, metrics_file)
        card = json.loads(read_text(join(result.adapter_uri, "rzenembed.json"), endpoint))
        digest = model_digest(result.adapter_uri, endpoint)
        model_id = tracker.log_model(
            run_id, f"adapter-{stage}-{mixture}", result.adapter_uri, "lora-adapter",
            params={"stage": stage, "mixture": mixture, "steps": result.steps},
            tags={"rzenembed.digest": digest, "rzenembed.stage": stage,
                  "rzenembed.mixture": mixture,
                  "rzenembed.manifest_digest": stage_manifest.digest},
            upload=cfg.tracking.upload_models, endpoint_url=endpoint,
        )  # fmt: skip
        out = LineageRef(
            "adapter", label, result.adapter_uri, digest, run_id, model_id,
            extra={"stage": stage, "mixture": mixture, "steps": result.steps,
                   "metrics": result.metrics_uri,
                   "temperatures": card["extra"].get("temperatures", {})},
        ).to_json()  # fmt: skip
        out = with_job(out, ran)
        tracker.record_lineage(run_id, stage, [as_ref(manifest), as_ref(base)], [as_ref(out)])
    return out


@task(name="train-stage1", persist_result=True,
      cache_key_fn=keyed("train-stage1", lambda p: _train_section({**p, "stage": "stage1"}),
                         _train_inputs), **RETRIES)  # fmt: skip
def train_stage1(
    cfg: PipelineConfig, manifest: dict[str, Any], base: dict[str, Any], ctx: RunContext
) -> dict[str, Any]:
    """Stage 1: fresh LoRA on the base model, over the stage-1 manifest."""
    return _train(cfg, "stage1", "all", manifest, base, ctx)


@task(
    name="merge-stage1",
    persist_result=True,
    cache_key_fn=keyed(
        "merge-stage1",
        lambda p: {
            "model": p["cfg"].model.model_dump(mode="json", exclude={"name_or_path"}),
            "storage": p["cfg"].storage.root,
        },
        lambda p: [p["adapter"]["digest"]],
    ),
    **RETRIES,
)
def merge_stage1_model(
    cfg: PipelineConfig, adapter: dict[str, Any], ctx: RunContext
) -> dict[str, Any]:
    """The stage-1 adapter folded into its base (a Ray task): the base of every stage-2 run."""
    section = {"model": cfg.model.model_dump(mode="json")}
    with step_run(cfg, ctx, "merge-stage1", "merge stage1", section) as (tracker, run_id):
        ran = run_in_job(cfg, "merge-stage1", merge_step, cfg, adapter["uri"])
        merged = ran.value
        digest = model_digest(merged, cfg.storage.endpoint_url)
        model_id = tracker.log_model(
            run_id, "stage1-merged", merged, "merged-model", params={"stage": "stage1"},
            tags={"rzenembed.digest": digest}, upload=False,
        )  # fmt: skip
        out = LineageRef("model", "stage1-merged", merged, digest, run_id, model_id).to_json()
        out = with_job(out, ran)
        tracker.record_lineage(run_id, "merge-stage1", [as_ref(adapter)], [as_ref(out)])
    return out


@task(name="train-stage2", persist_result=True,
      cache_key_fn=keyed("train-stage2",
                         lambda p: {**_train_section({**p, "stage": "stage2"}),
                                    "mixture": p["mixture"]},
                         _train_inputs), **RETRIES)  # fmt: skip
def train_stage2(
    cfg: PipelineConfig, mixture: str, manifest: dict[str, Any], base: dict[str, Any],
    ctx: RunContext,
) -> dict[str, Any]:  # fmt: skip
    """Stage 2 for one mixture: fresh LoRA on the merged stage-1 model."""
    return _train(cfg, "stage2", mixture, manifest, base, ctx)
