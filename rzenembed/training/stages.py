"""The two training stages as Ray Train jobs.

``run_stage1(cfg, manifest)`` trains LoRA adapters on the base model over the stage-1 data
manifest. ``run_stage2(cfg, manifest, stage1_model, mixture)`` starts from the stage-1
weights (the stage-1 adapter merged into the base and saved as a model folder by
``merge_stage1``) with fresh adapters, one run per stage-2 data mixture.

A run is named ``<config name>-<stage>-<mixture>`` and keeps its Ray Train state under
``<storage.root>/_train``; calling the same run again resumes from its last checkpoint, and
a run whose adapter already exists is not retrained. ``compute.max_failures`` lets Ray
restart the worker group from the last checkpoint when a worker is lost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rzenembed.config import MixtureConfig, PipelineConfig, StageConfig, digest_of
from rzenembed.data.storage import is_remote, join
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.modeling.digest import weights_digest
from rzenembed.prep.mixture import StageManifest
from rzenembed.training.loop import RunSpec, train_loop_per_worker


@dataclass
class TrainResult:
    stage: str
    mixture: str
    adapter_dir: Path
    metrics_path: Path
    steps: int
    run_name: str


def total_steps(stage: StageConfig, manifest: StageManifest) -> int:
    """``max_steps`` when set, else the epochs over the manifest's rows in global batches."""
    if stage.max_steps is not None:
        return stage.max_steps
    rows = sum(d.rows for d in manifest.datasets)
    return max(1, math.ceil(stage.epochs * rows / stage.global_batch_size))


def output_root(cfg: PipelineConfig, output_dir: str | Path | None) -> Path:
    if output_dir is not None:
        return Path(output_dir)
    if is_remote(cfg.storage.root):
        raise ValueError("a remote storage root needs an explicit local output_dir")
    return Path(cfg.storage.root) / "_models" / cfg.name


def run_settings(cfg: PipelineConfig, stage_name: str) -> dict:
    """The settings that decide a run's result besides its data and base weights: the stage
    section (without the mixture list), the model settings (without the base's folder,
    which the base digest stands for), LoRA, loss and the worker count. The run key and
    the training task's cache key both start from this one definition."""
    stage = getattr(cfg, stage_name).model_dump(mode="json")
    stage.pop("mixtures", None)
    model = cfg.model.model_dump(mode="json")
    model.pop("name_or_path")
    return {"stage": stage_name, "settings": stage, "model": model,
            "lora": cfg.lora.model_dump(mode="json"), "loss": cfg.loss.model_dump(mode="json"),
            "workers": cfg.compute.num_workers}  # fmt: skip


def run_key(
    cfg: PipelineConfig, stage_name: str, manifest: StageManifest, base_model: str | Path
) -> str:
    """What decides a run's result: ``run_settings``, the data (manifest digest) and the
    base weights (their digest, not their folder). A run with another key trains afresh in
    its own folder instead of reusing a finished adapter."""
    section = {**run_settings(cfg, stage_name), "manifest": manifest.digest,
               "base": weights_digest(base_model)}  # fmt: skip
    return digest_of(section)[:12]


def run_dir(
    cfg: PipelineConfig, stage_name: str, manifest: StageManifest, base_model: str | Path,
    mixture: str, output_dir: str | Path | None = None,
) -> Path:  # fmt: skip
    """The folder of a run: ``<output>/<stage>/<mixture>-<run key>``."""
    key = run_key(cfg, stage_name, manifest, base_model)
    return output_root(cfg, output_dir) / stage_name / f"{mixture}-{key}"


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
    output_dir: str | Path | None = None,
    mlflow_run_id: str | None = None,
    step_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train one stage/mixture on Ray Train (or return the finished adapter).

    ``step_callbacks``: picklable callables ``(trainer, step)`` each worker runs before
    every step (see ``RunSpec``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rzenembed.data.fanout import ensure_ray

    stage: StageConfig = getattr(cfg, stage_name)
    _validate_batch(stage, cfg.compute.num_workers)
    out = run_dir(cfg, stage_name, manifest, base_model, mixture, output_dir)
    run_name = f"{cfg.name}-{stage_name}-{out.name}"
    steps = total_steps(stage, manifest)
    result = TrainResult(
        stage_name, mixture, out / "adapter", out / "metrics.jsonl", steps, run_name
    )
    if ModelCard.exists(result.adapter_dir):
        return result
    ensure_ray(address=cfg.compute.ray_address)
    spec = RunSpec(
        cfg=cfg.model_dump(mode="json"),
        stage=stage_name,
        mixture=mixture,
        stage_manifest=manifest.uri,
        base_model=str(Path(base_model).resolve()),
        output_dir=str(out.resolve()),
        total_steps=steps,
        mlflow_run_id=mlflow_run_id,
        step_callbacks=list(step_callbacks or []),
    )
    backend = cfg.compute.backend
    if backend == "auto":
        backend = "nccl" if cfg.compute.use_gpu else "gloo"
    resources = {"CPU": cfg.compute.cpus_per_worker}
    if cfg.compute.use_gpu:
        resources["GPU"] = cfg.compute.gpus_per_worker or 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=vars(spec),
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.compute.num_workers,
            use_gpu=cfg.compute.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=_train_storage(cfg),
            failure_config=FailureConfig(max_failures=cfg.compute.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    return result


def _train_storage(cfg: PipelineConfig) -> str:
    root = cfg.storage.root
    return join(root, "_train") if is_remote(root) else str((Path(root) / "_train").resolve())


def run_stage1(
    cfg: PipelineConfig, manifest: StageManifest, output_dir: str | Path | None = None
) -> TrainResult:
    return run_training(cfg, "stage1", manifest, cfg.model.name_or_path, "all", output_dir)


def merge_stage1(cfg: PipelineConfig, stage1: TrainResult) -> Path:
    """The stage-1 adapter merged into its base, saved as a standalone model folder."""
    target = stage1.adapter_dir.parent / "merged"
    if ModelCard.exists(target):
        return target
    embedder = RzenEmbedder.from_pretrained(stage1.adapter_dir, config=cfg.model)
    card = ModelCard.load(stage1.adapter_dir)
    embedder.merge_lora().save_pretrained(target, extra={**card.extra, "merged": True})
    return target


def run_stage2(
    cfg: PipelineConfig,
    manifest: StageManifest,
    stage1_model: str | Path,
    mixture: MixtureConfig,
    output_dir: str | Path | None = None,
) -> TrainResult:
    return run_training(cfg, "stage2", manifest, stage1_model, mixture.name, output_dir)
