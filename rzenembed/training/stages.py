"""The two training stages as Ray Train jobs.

``run_stage1(cfg, manifest)`` trains LoRA adapters on the base model over the stage-1 data
manifest. ``run_stage2(cfg, manifest, stage1_model, mixture)`` starts from the stage-1
weights (the stage-1 adapter merged into the base and published as a model folder by
``merge_stage1``) with fresh adapters, one run per stage-2 data mixture.

Every output is a URI under ``storage.root`` (a local path or ``s3://``), readable from
any node: the run's folder ``<root>/_models/<config name>/<stage>/<mixture>-<key>/`` holds
the published ``adapter/`` and ``metrics.jsonl``; Ray Train keeps its checkpoints under
``<root>/_train`` through its storage filesystem. Calling the same run again resumes from
its last checkpoint, and a run whose adapter is published is not retrained.
``compute.max_failures`` lets Ray restart the worker group from the last checkpoint when a
worker is lost.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rzenembed.config import MixtureConfig, PipelineConfig, StageConfig, digest_of
from rzenembed.data.folders import is_published, publish_folder, stage_folder
from rzenembed.data.storage import filesystem, is_remote, join
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.modeling.digest import digests_of, model_digest
from rzenembed.prep.mixture import StageManifest
from rzenembed.runtime import task_runtime
from rzenembed.training.loop import RunSpec, train_loop_per_worker

WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass
class TrainResult:
    stage: str
    mixture: str
    adapter_uri: str
    metrics_uri: str
    steps: int
    run_name: str
    # False when the adapter was already published under this run's key (nothing trained
    # now, so no metrics were logged live: the caller posts them from the metrics file).
    trained_now: bool = True


def total_steps(stage: StageConfig, manifest: StageManifest) -> int:
    """``max_steps`` when set, else the epochs over the manifest's rows in global batches."""
    if stage.max_steps is not None:
        return stage.max_steps
    rows = sum(d.rows for d in manifest.datasets)
    return max(1, math.ceil(stage.epochs * rows / stage.global_batch_size))


def output_root(cfg: PipelineConfig) -> str:
    """Where a config's models live: ``<storage.root>/_models/<config name>``."""
    return join(cfg.storage.root, "_models", cfg.name)


def run_settings(cfg: PipelineConfig, stage_name: str) -> dict:
    """The settings that decide a run's result besides its data and base weights: the stage
    section (without the mixture list), the model settings (without the base's folder,
    which the base digest stands for), LoRA, loss and the worker count. The run key and
    the training task's cache key both start from this one definition."""
    stage = getattr(cfg, stage_name).model_dump(mode="json")
    stage.pop("mixtures", None)
    model = cfg.model.model_dump(mode="json")
    model.pop("name_or_path")
    return {
        "stage": stage_name,
        "settings": stage,
        "model": model,
        "lora": cfg.lora.model_dump(mode="json"),
        "loss": cfg.loss.model_dump(mode="json"),
        "workers": cfg.compute.num_workers,
    }


def run_key(
    cfg: PipelineConfig, stage_name: str, manifest: StageManifest, base_model: str | Path
) -> str:
    """What decides a run's result: ``run_settings``, the data (manifest digest) and the
    base weights (their digest, not their folder). A run with another key trains afresh in
    its own folder instead of reusing a finished adapter."""
    section = {
        **run_settings(cfg, stage_name),
        "manifest": manifest.digest,
        "base": model_digest(str(base_model), cfg.storage.endpoint_url, weights_only=True),
    }
    return digest_of(section)[:12]


def run_dir(
    cfg: PipelineConfig,
    stage_name: str,
    manifest: StageManifest,
    base_model: str | Path,
    mixture: str,
) -> str:
    """The URI of a run's folder: ``<output root>/<stage>/<mixture>-<run key>``."""
    key = run_key(cfg, stage_name, manifest, base_model)
    return join(output_root(cfg), stage_name, f"{mixture}-{key}")


def _validate_batch(stage: StageConfig, workers: int) -> None:
    if stage.global_batch_size % workers:
        raise ValueError(
            f"global_batch_size {stage.global_batch_size} must divide by "
            f"compute.num_workers {workers}"
        )


def run_training(
    cfg: PipelineConfig,
    stage_name: str,
    manifest: StageManifest,
    base_model: str | Path,
    mixture: str,
    mlflow_run_id: str | None = None,
    step_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one stage/mixture on Ray Train (or return the published adapter).

    ``base_model`` is a local folder or a URI on the storage root. ``step_callbacks``:
    picklable callables ``(trainer, step)`` each worker runs before every step (see
    ``RunSpec``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rzenembed.compute.admission import admit_for
    from rzenembed.compute.connect import ensure_ray, refuse_client
    from rzenembed.runtime import backend_for

    stage: StageConfig = getattr(cfg, stage_name)
    _validate_batch(stage, cfg.compute.num_workers)
    base = _absolute(str(base_model))
    out = run_dir(cfg, stage_name, manifest, base, mixture)
    run_name = f"{cfg.name}-{stage_name}-{out.rstrip('/').rsplit('/', 1)[-1]}"
    steps = total_steps(stage, manifest)
    result = TrainResult(
        stage_name, mixture, join(out, "adapter"), join(out, "metrics.jsonl"), steps, run_name
    )
    if is_published(result.adapter_uri, cfg.storage.endpoint_url):
        return replace(result, trained_now=False)
    ensure_ray(address=cfg.compute.ray_address)
    refuse_client(f"{stage_name} training (Ray Train)")
    spec = RunSpec(
        cfg=cfg.model_dump(mode="json"),
        stage=stage_name,
        mixture=mixture,
        stage_manifest=manifest.uri,
        base_model=base,
        output_dir=out,
        total_steps=steps,
        mlflow_run_id=mlflow_run_id,
        step_callbacks=list(step_callbacks or []),
    )
    resources = {"CPU": cfg.compute.cpus_per_worker, **cfg.compute.resources_per_worker}
    if cfg.compute.use_gpu:
        resources["GPU"] = cfg.compute.gpus_per_worker or 1
    admit_for(cfg.compute, f"{stage_name} training", cfg.compute.num_workers, resources)
    # Ray Train V2 retries a worker group that cannot start, forever by default: each
    # start may take wait_timeout_s, and controller_failure_limit of them fail the run.
    # Ray Train reads the start timeout from the driver's environment and passes it on.
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = f"{cfg.compute.wait_timeout_s:g}"
    path, storage_fs = train_storage(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=vars(spec),
        torch_config=TorchConfig(backend=backend_for(cfg.compute)),
        scaling_config=ScalingConfig(
            num_workers=cfg.compute.num_workers,
            use_gpu=cfg.compute.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(
                max_failures=cfg.compute.max_failures,
                controller_failure_limit=cfg.compute.controller_failure_limit,
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    return result


def _absolute(uri: str) -> str:
    return uri if is_remote(uri) else str(Path(uri).resolve())


def train_storage(cfg: PipelineConfig) -> tuple[str, Any]:
    """Ray Train's checkpoint location ``<root>/_train`` and the filesystem it goes through:
    a local folder as a plain path; a remote root through its fsspec filesystem (the S3
    endpoint of ``storage.endpoint_url`` included), so every node writes and reads the
    checkpoints on the storage root."""
    root = cfg.storage.root
    if not is_remote(root):
        return str((Path(root) / "_train").resolve()), None
    import pyarrow.fs

    fs, path = filesystem(join(root, "_train"), cfg.storage.endpoint_url)
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def run_stage1(cfg: PipelineConfig, manifest: StageManifest) -> TrainResult:
    return run_training(cfg, "stage1", manifest, cfg.model.name_or_path, "all")


def merge_step(cfg: PipelineConfig, adapter_uri: str) -> str:
    """The stage-1 merge as a Ray task with the step's resources (a GPU on a cluster),
    admitted on what is free and bounded by ``compute.step_timeout_s``; the merged
    model's URI."""
    from rzenembed.compute.steps import on_ray

    return on_ray(cfg, merge_stage1, cfg, adapter_uri)


def merge_stage1(cfg: PipelineConfig, adapter_uri: str) -> str:
    """The stage-1 adapter merged into its base, published as a standalone model folder
    beside the adapter (``<run>/merged``); returns its URI. Runs wherever it is called (a
    Ray task in the pipeline), on the device the runtime picks there."""
    target = join(adapter_uri.rstrip("/").rsplit("/", 1)[0], "merged")
    endpoint = cfg.storage.endpoint_url
    if is_published(target, endpoint):
        return target
    runtime = task_runtime(cfg.model, cfg.compute)
    embedder = RzenEmbedder.from_pretrained(
        adapter_uri, config=cfg.model, device=runtime.device, endpoint_url=endpoint
    )
    card = ModelCard.load(stage_folder(adapter_uri, endpoint))  # staged by the load above
    work = Path(tempfile.mkdtemp(prefix="rzenembed-merge-"))
    try:
        folder = embedder.merge_lora().save_pretrained(
            work / "merged", extra={**card.extra, "merged": True}
        )
        publish_folder(folder, target, endpoint, **digests_of(folder))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def run_stage2(
    cfg: PipelineConfig, manifest: StageManifest, stage1_model: str | Path, mixture: MixtureConfig
) -> TrainResult:
    return run_training(cfg, "stage2", manifest, stage1_model, mixture.name)
