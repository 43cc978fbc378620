"""The per-worker training loop, shared by both stages (run by Ray Train's TorchTrainer).

Each global step: the sampler picks one dataset and its global batch (all ranks agree);
this rank collates its slice, GradCache computes the gradients (negatives gathered across
ranks inside the loss), gradients of the trainable parameters are averaged across ranks in
one flat all-reduce, clipped, and AdamW steps. Dropout randomness is seeded from
(seed, step, rank) at the start of every step, so a resumed run draws exactly what an
uninterrupted one would without carrying RNG state around.

Gradients are averaged by hand instead of through DDP: a text-only batch leaves the vision
LoRA factors without gradient, which DDP treats as an error unless it searches the graph
for unused parameters on every step; a flat all-reduce of the (small) LoRA gradients does
the same job deterministically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from rzenembed.config import PipelineConfig, StageConfig
from rzenembed.data.folders import is_published, publish_folder, write_text
from rzenembed.data.storage import is_remote, join
from rzenembed.data.version import DatasetVersion
from rzenembed.losses import make_loss
from rzenembed.modeling import RzenEmbedder
from rzenembed.modeling.digest import digests_of
from rzenembed.modeling.embedder import ThreadLocalPreparer
from rzenembed.prep.mixture import StageManifest, profile_negatives
from rzenembed.runtime import Runtime, activated, check_collective, train_worker_runtime
from rzenembed.training.collate import TrainBatch, collate
from rzenembed.training.gradcache import (
    ContrastiveBatch,
    gradcache_step,
    plain_step,
    prepare_batch,
)
from rzenembed.training.loader import StepLoader
from rzenembed.training.metrics import (
    JsonlLogger,
    MaskingWatch,
    MetricsLogger,
    MlflowLogger,
    MultiLogger,
)
from rzenembed.training.optim import build_optimizer, build_scheduler
from rzenembed.training.rows import DEFAULT_CACHE_BYTES, DatasetRows
from rzenembed.training.sampler import AdaptiveSettings, StageSampler, StepPlan

log = logging.getLogger(__name__)
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_WEIGHTS = "trainable.pt"
CHECKPOINT_OPTIM = "optimizer.pt"


@dataclass
class RunSpec:
    """Everything a worker needs, JSON-able so it travels in ``train_loop_config``."""

    cfg: dict[str, Any]
    stage: str  # "stage1" | "stage2"
    mixture: str
    stage_manifest: str
    base_model: str
    output_dir: str
    total_steps: int
    mlflow_run_id: str | None = None
    # Callables ``(trainer, step)`` run on every rank before each step, after its batch is
    # ready: profilers, custom checks (the resilience tests use one to kill a worker).
    step_callbacks: list[Any] = field(default_factory=list)

    @property
    def config(self) -> PipelineConfig:
        return PipelineConfig.model_validate(self.cfg)

    @property
    def stage_config(self) -> StageConfig:
        return getattr(self.config, self.stage)


class TrainModule(nn.Module):
    """The embedder and the loss (which owns the temperatures) as one module."""

    def __init__(self, embedder: RzenEmbedder, loss: nn.Module):
        super().__init__()
        self.embedder = embedder
        self.loss = loss

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- distributed


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[nn.Parameter]) -> int:
    """Average the gradients of ``params`` over ranks with one flat all-reduce.

    A parameter that received no gradient on any rank this step (the vision LoRA on a
    text-only batch) keeps ``grad = None``, so the optimizer skips it: no weight decay and
    no momentum drift on towers the step did not use. One that has a gradient on some ranks
    only gets zeros from the others. Returns how many parameters were skipped.
    """
    _, size = world()
    device = params[0].device if params else torch.device("cpu")
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=device)
    if size > 1:
        dist.all_reduce(check_collective(used, "average_gradients: used"), op=dist.ReduceOp.MAX)
    active = [p for p, flag in zip(params, used.tolist(), strict=True) if flag]
    for param, flag in zip(params, used.tolist(), strict=True):
        if not flag:
            param.grad = None
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in active]
    if size > 1 and active:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(check_collective(flat, "average_gradients"))
        flat /= size
        grads = list(torch.split(flat, [g.numel() for g in grads]))
    for param, grad in zip(active, grads, strict=True):
        param.grad = grad.view_as(param)
    return len(params) - len(active)


def global_mean(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of ``value`` over ranks (a tensor on ``device``: NCCL reduces on the GPU)."""
    _, size = world()
    if size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(check_collective(tensor, "global_mean"))
    return float(tensor.item()) / size


def step_seed(seed: int, step: int, rank: int) -> int:
    key = f"{seed}:{step}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


# --------------------------------------------------------------------------- setup


def build_model(spec: RunSpec, runtime: Runtime) -> TrainModule:
    """Base model + fresh LoRA adapters + loss, on the runtime's device (the temperatures
    live in the loss module and move with it). The adapters' random initialisation is
    seeded from the stage seed, so every rank starts from identical weights (gradients are
    averaged, never the weights) and a rerun starts from the same point."""
    cfg = spec.config
    embedder = RzenEmbedder.from_pretrained(
        spec.base_model, config=cfg.model, endpoint_url=cfg.storage.endpoint_url
    )
    torch.manual_seed(spec.stage_config.seed)
    embedder.apply_lora(cfg.lora)
    module = TrainModule(embedder, make_loss(cfg.loss))
    runtime.place(module)
    return module


def load_sources(
    manifest: StageManifest, endpoint_url: str | None, cache_bytes: int = DEFAULT_CACHE_BYTES
) -> dict[str, DatasetRows]:
    """The stage's datasets, opened for reading by row (nothing of their rows is loaded).
    A manifest written before it recorded ``max_negatives`` gets it from one scan here."""
    sources = {}
    for d in manifest.datasets:
        version = DatasetVersion.open(d.uri, endpoint_url)
        most = d.max_negatives
        if most is None:  # no Ray jobs from inside a training worker: read it here
            most = profile_negatives(version, in_process=True).most(d.negatives)
        sources[d.dataset] = DatasetRows(
            version, d.task_group, most, cache_bytes=cache_bytes, negatives=d.negatives
        )
    return sources


def build_sampler(
    spec: RunSpec, manifest: StageManifest, sources: dict[str, DatasetRows] | None = None
) -> StageSampler:
    """The stage's sampler; ``shuffle: blocks`` takes its blocks from the row groups of
    ``sources`` (every rank reads the same footers, so all agree on them)."""
    stage = spec.stage_config
    adaptive = None
    if stage.sampling == "adaptive":
        adaptive = AdaptiveSettings(**stage.adaptive.model_dump())
    blocks = None
    if stage.shuffle == "blocks":
        if sources is None:
            raise ValueError("shuffle: blocks needs the stage's sources (their row groups)")
        blocks = [sources[d.dataset].row_group_sizes() for d in manifest.datasets]
    return StageSampler(
        datasets=[d.dataset for d in manifest.datasets],
        probabilities=[d.probability for d in manifest.datasets],
        sizes=[d.rows for d in manifest.datasets],
        global_batch=stage.global_batch_size,
        seed=stage.seed,
        adaptive=adaptive,
        lookahead=stage.prefetch,
        shuffle=stage.shuffle,
        shuffle_window=stage.shuffle_window,
        blocks=blocks,
    )


def build_logger(spec: RunSpec) -> MetricsLogger:
    uri = join(spec.output_dir, "metrics.jsonl")
    if is_remote(uri):  # written locally, published at checkpoints and at the end
        local = Path(tempfile.mkdtemp(prefix="rzenembed-metrics-")) / "metrics.jsonl"
        jsonl = JsonlLogger(local, publish_uri=uri, endpoint_url=spec.config.storage.endpoint_url)
    else:
        jsonl = JsonlLogger(uri)
    loggers: list[MetricsLogger] = [jsonl]
    tracking = spec.config.tracking
    if spec.mlflow_run_id is not None:
        loggers.append(
            MlflowLogger(
                tracking.tracking_uri, tracking.experiment, spec.mixture, spec.mlflow_run_id
            )
        )
    return MultiLogger(loggers)


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    folder: Path, module: TrainModule, optimizer, scheduler, sampler_state: dict, step: int
) -> None:
    torch.save(module.trainable_state(), folder / CHECKPOINT_WEIGHTS)
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
        folder / CHECKPOINT_OPTIM,
    )
    state = {"step": step, "sampler": sampler_state}
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state))


def restore_checkpoint(folder: Path, module: TrainModule, optimizer, scheduler, sampler) -> int:
    """Load a checkpoint written by ``save_checkpoint``; returns the next step to run.

    Tensors are loaded straight onto this rank's device (the device of the module's
    parameters): without ``map_location`` every rank would first materialise rank 0's saved
    optimizer state on the device it was saved from, GPU 0, eight copies at once."""
    device = next(module.parameters()).device
    weights = torch.load(folder / CHECKPOINT_WEIGHTS, map_location=device, weights_only=True)
    missing = set(module.trainable_state()) - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable tensors: {sorted(missing)[:5]}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    states = torch.load(folder / CHECKPOINT_OPTIM, map_location=device, weights_only=False)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    state = json.loads((folder / CHECKPOINT_STATE).read_text())
    sampler.load_state_dict(state["sampler"])
    return int(state["step"]) + 1


# --------------------------------------------------------------------------- the loop


@dataclass
class LoadedStep:
    """One step's data as the loader hands it over: ids and inputs, processor outputs."""

    step: int
    batch: TrainBatch
    prepared: ContrastiveBatch
    load_s: float  # what building it took in the loader (read, decode, process)


def each_tensor(batch: ContrastiveBatch, fn) -> ContrastiveBatch:
    """The batch with ``fn`` applied to every tensor of every prepared chunk."""

    def chunks(side):
        return [{k: fn(v) for k, v in chunk.items()} for chunk in side]

    return ContrastiveBatch(
        queries=chunks(batch.queries),
        positives=chunks(batch.positives),
        negatives=chunks(batch.negatives) if batch.negatives else None,
        num_negatives=batch.num_negatives,
        negative_mask=batch.negative_mask,
    )


def held_in_model_dtype(batch: ContrastiveBatch, dtype: torch.dtype) -> ContrastiveBatch:
    """Processor outputs held between loading and the step in the model's half dtype when
    it has one: pixel values are float32 and the vision tower's first operation casts them
    to its weights' dtype anyway, so this halves what prefetched steps hold, losslessly."""
    if dtype not in (torch.bfloat16, torch.float16):
        return batch
    return each_tensor(batch, lambda v: v.to(dtype) if v.is_floating_point() else v)


def pinned(batch: ContrastiveBatch) -> ContrastiveBatch:
    """Prepared chunks in page-locked host memory: the embedder's ``.to(device,
    non_blocking=True)`` then copies them while the GPU still computes."""
    return each_tensor(batch, lambda v: v.pin_memory())


class Trainer:
    """State and steps of one worker's run."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.cfg = spec.config
        self.stage = spec.stage_config
        self.rank, self.world_size = world()
        self.runtime = train_worker_runtime(self.cfg.model, self.cfg.compute)
        self.manifest = StageManifest.load(spec.stage_manifest, self.cfg.storage.endpoint_url)
        compute = self.cfg.compute
        self.sources = load_sources(
            self.manifest, self.cfg.storage.endpoint_url, compute.loader_cache_mb * 2**20
        )
        self.reads = ThreadPoolExecutor(compute.loader_threads, thread_name_prefix="media")
        self.processing = (
            ThreadPoolExecutor(compute.loader_workers, thread_name_prefix="processor")
            if compute.loader_workers
            else None
        )
        self.module = build_model(spec, self.runtime)
        self.preparer = ThreadLocalPreparer(self.module.embedder)  # for the processor pool
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.module, self.stage.optim)
        self.scheduler = build_scheduler(self.optimizer, self.stage.optim, spec.total_steps)
        self.sampler = build_sampler(spec, self.manifest, self.sources)
        self.start_step = 0

    def load_step(self, plan: StepPlan) -> LoadedStep:
        """This rank's rows of ``plan`` read, their media read and decoded, and (when the
        loader works ahead) run through the processor; called on the loader's thread.

        With ``prefetch`` 0 the chunks stay raw and are processed when embedded, so host
        memory stays flat in the global batch; ahead of time they are processed once here
        and held until the step runs (``prefetch`` steps' worth of processor outputs)."""
        started = time.perf_counter()
        source = self.sources[plan.dataset]
        indices = self.sampler.rank_slice(plan, self.rank, self.world_size)
        batch = collate(
            source.fetch(indices, pool=self.reads),
            source.info,
            self.stage.hard_negatives,
            self.cfg.model.video_frames,
            reads=self.reads,
        )
        key = plan.dataset.encode() + plan.indices.astype("int64").tobytes()
        batch.plan_digest = hashlib.blake2b(key, digest_size=8).hexdigest()
        prepared = prepare_batch(
            self.module.embedder if self.processing is None else self.preparer,
            batch.queries,
            batch.positives,
            batch.negatives,
            batch.num_negatives,
            self.stage.gradcache_chunk,
            lazy=self.stage.prefetch == 0 and bool(self.stage.gradcache_chunk),
            negative_mask=batch.negative_mask,
            pool=self.processing,
        )
        if self.stage.prefetch:
            prepared = held_in_model_dtype(prepared, self.module.embedder.hf_model.dtype)
            if self.runtime.device.type == "cuda":  # copied to the GPU without a sync
                prepared = pinned(prepared)
            batch.drop_inputs()
        return LoadedStep(plan.step, batch, prepared, time.perf_counter() - started)

    def loader(self) -> StepLoader[LoadedStep]:
        return StepLoader(
            self.sampler.plan, self.load_step, self.spec.total_steps, self.stage.prefetch
        )

    def train_step(self, step: int, loaded: LoadedStep) -> dict[str, Any]:
        torch.manual_seed(step_seed(self.stage.seed, step, self.rank))
        self.module.train()
        batch, prepared = loaded.batch, loaded.prepared
        embedder, loss_module = self.module.embedder, self.module.loss
        task = loss_module.task_index([batch.task_group] * len(batch.row_ids))

        def loss_fn(q, p, n):
            return loss_module(
                q,
                p,
                task,
                negatives=n,
                positive_ids=batch.positive_ids,
                negative_ids=batch.negative_ids,
                group_ids=batch.group_ids,
                negative_mask=batch.negative_mask,
            )

        tokens = 0

        def embed(inputs):
            nonlocal tokens
            if torch.is_grad_enabled():  # each chunk is embedded once with a graph
                tokens += int(inputs["attention_mask"].sum())
            with self.runtime.autocast():
                return embedder(**inputs).float()

        started = time.perf_counter()
        if self.stage.gradcache_chunk:
            out = gradcache_step(embed, prepared, loss_fn)
        else:
            out = plain_step(embed, prepared, loss_fn)
        skipped = average_gradients(self.params)
        max_norm = self.stage.optim.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        metrics = self._metrics(batch, out, grad_norm, elapsed, tokens)
        metrics["params_without_grad"] = skipped
        # Processor time inside the step (prefetch 0 processes chunks when they are embedded)
        # is data time spent on the training thread, not compute.
        processing = sum(getattr(c, "prepare_s", 0.0) for c in prepared.chunks())
        metrics["step_s"] = elapsed - processing
        metrics["process_in_step_s"] = processing
        metrics["load_s"] = loaded.load_s
        return metrics

    def _metrics(self, batch, out, grad_norm, elapsed, tokens) -> dict[str, Any]:
        device = self.params[0].device if self.params else "cpu"
        loss = global_mean(float(out["loss"]), device)
        samples = len(batch.row_ids) * self.world_size
        masked = global_mean(float(out.get("masked_fraction", 0.0)), device)
        return {
            "loss": loss,
            "per_task_loss": {k: float(v) for k, v in out.get("per_task_loss", {}).items()},
            # Nested dimensions (loss.matryoshka): each prefix's loss, the whole batch's.
            **(
                {"per_dim_loss": {str(d): global_mean(float(v), device) for d, v in nested.items()}}
                if (nested := out.get("per_dim_loss"))
                else {}
            ),
            "temperature": {k: float(v) for k, v in out.get("temperatures", {}).items()},
            "masked_fraction": masked,
            "negatives_per_query": batch.num_negatives,
            "padded_negatives": global_mean(batch.padded_fraction, device),
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_s": samples / elapsed,
            "tokens_per_s": tokens * self.world_size / elapsed,
            "dataset": batch.dataset,
            "batch": batch.plan_digest,
        }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for ``TorchTrainer``: run (or resume) one stage/mixture."""
    import ray.train

    spec = RunSpec(**config)
    torch.set_num_threads(max(1, int(os.environ.get("RZENEMBED_TORCH_THREADS", "1"))))
    trainer = Trainer(spec)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.start_step = restore_checkpoint(
                Path(folder), trainer.module, trainer.optimizer, trainer.scheduler, trainer.sampler
            )
    record_worker(trainer)
    with activated(trainer.runtime):
        run_steps(trainer)


def record_worker(trainer: Trainer) -> None:
    """``<run>/workers/rank<N>.json`` on the storage root: where each rank ran (node, host,
    device, backend, autocast), for the user and for the cluster test."""
    import socket

    import ray

    runtime = trainer.runtime
    info = {
        "rank": trainer.rank,
        "world_size": trainer.world_size,
        "node_id": ray.get_runtime_context().get_node_id(),
        "host": socket.gethostname(),
        "device": str(runtime.device),
        "backend": runtime.backend,
        "autocast": None if runtime.autocast_dtype is None else str(runtime.autocast_dtype),
        "start_step": trainer.start_step,
    }
    uri = join(trainer.spec.output_dir, "workers", f"rank{trainer.rank}.json")
    write_text(
        uri, json.dumps(info, indent=2, sort_keys=True) + "\n", trainer.cfg.storage.endpoint_url
    )


def run_steps(trainer: Trainer) -> None:
    """Steps from ``start_step`` to the end; the loader (``rzenembed.training.loader``)
    prepares ``stage.prefetch`` steps ahead while each step computes, under static and
    adaptive sampling alike. The sampler state saved with a checkpoint is taken after the
    step's loss was observed and the loader planned ahead, so a resumed run replays the
    plans already made. ``data_wait_s`` is how long the step waited for its data."""
    from tqdm.auto import tqdm

    spec, every = trainer.spec, trainer.stage.checkpoint_every
    adaptive = trainer.stage.sampling == "adaptive"
    logger = build_logger(spec) if trainer.rank == 0 else None
    bar = tqdm(
        total=spec.total_steps,
        initial=trainer.start_step,
        desc=f"{spec.stage}/{spec.mixture}",
        disable=trainer.rank != 0,
    )
    watch = MaskingWatch()
    with trainer.loader() as loader:
        loader.start(trainer.start_step)
        for step in range(trainer.start_step, spec.total_steps):
            loaded, waited = loader.next(step)
            for callback in spec.step_callbacks:
                callback(trainer, step)
            metrics = trainer.train_step(step, loaded)
            record_data_wait(metrics, waited)
            record_slowest_rank(metrics, trainer)
            if adaptive and math.isfinite(metrics["loss"]):  # a NaN would poison the averages
                changes = trainer.sampler.observe(step, loaded.batch.dataset, metrics["loss"])
                if changes:
                    metrics["sampling_changes"] = [vars(c) for c in changes]
            loader.advance(step)
            if (warning := watch.observe(step, metrics["masked_fraction"])) is not None:
                metrics["warning"] = warning
                if trainer.rank == 0:
                    log.warning("%s", warning)
            if logger is not None:
                logger.log(step, {**metrics, "probabilities": dict(trainer.sampler.probabilities)})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", dataset=loaded.batch.dataset)
            if (step + 1) % every == 0 or step + 1 == spec.total_steps:
                report(trainer, step, metrics, trainer.sampler.state_dict())
                if logger is not None:
                    logger.sync()
    bar.close()
    if logger is not None:
        logger.close()
    if trainer.rank == 0:
        save_adapter(trainer)


def record_data_wait(metrics: dict[str, Any], waited: float) -> None:
    """``data_wait_s``: the training thread's time on data instead of compute (waiting for
    the loader, plus running the processor when chunks are processed in the step), and
    its share of the step (``data_wait_fraction``)."""
    data = waited + metrics.get("process_in_step_s", 0.0)
    metrics["data_wait_s"] = data
    metrics["data_wait_fraction"] = data / max(data + metrics["step_s"], 1e-12)


def record_slowest_rank(metrics: dict[str, Any], trainer: Trainer) -> None:
    """Every rank's ``data_wait_s`` (one small all-reduce), so rank 0's log shows a starved
    rank: ``data_wait_by_rank``, the slowest rank and its share of the step."""
    device = trainer.params[0].device if trainer.params else torch.device("cpu")
    waits = per_rank(metrics["data_wait_s"], device)
    slowest = max(range(len(waits)), key=waits.__getitem__)
    metrics["data_wait_by_rank"] = waits
    metrics["data_wait_slowest_rank"] = slowest
    metrics["data_wait_max_s"] = waits[slowest]
    metrics["data_wait_max_fraction"] = waits[slowest] / max(
        waits[slowest] + metrics["step_s"], 1e-12
    )


def per_rank(value: float, device: torch.device | str = "cpu") -> list[float]:
    """``value`` of every rank, in rank order (this rank's alone without a process group)."""
    rank, world_size = world()
    if world_size == 1:
        return [value]
    values = torch.zeros(world_size, dtype=torch.float64, device=device)
    values[rank] = value
    dist.all_reduce(check_collective(values, "per_rank"))
    return values.tolist()


def report(trainer: Trainer, step: int, metrics: dict[str, Any], sampler_state: dict) -> None:
    """A checkpoint through ``ray.train.report`` (every rank reports; rank 0 carries it)."""
    import ray.train

    scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    scalars["step"] = step
    if trainer.rank != 0:
        ray.train.report(scalars, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(
            Path(folder), trainer.module, trainer.optimizer, trainer.scheduler, sampler_state, step
        )
        ray.train.report(scalars, checkpoint=ray.train.Checkpoint.from_directory(folder))


def save_adapter(trainer: Trainer) -> str:
    """Rank 0 writes the adapter locally, then publishes it to ``<run>/adapter`` on the
    storage root (commit marker last), where every other node and the pipeline read it."""
    spec = trainer.spec
    extra = {
        "stage": spec.stage,
        "mixture": spec.mixture,
        "stage_manifest": spec.stage_manifest,
        "manifest_digest": trainer.manifest.digest,
        "temperatures": trainer.module.loss.temperature_dict(),
        "steps": spec.total_steps,
    }
    nested = spec.config.loss.matryoshka
    if nested is not None:  # the sizes a user may cut the embedding to (compact.prefix)
        extra["matryoshka"] = nested.model_dump(mode="json")
    uri = join(spec.output_dir, "adapter")
    endpoint = spec.config.storage.endpoint_url
    work = Path(tempfile.mkdtemp(prefix="rzenembed-adapter-"))
    try:
        folder = trainer.module.embedder.save_pretrained(work / "adapter", extra=extra)
        if not is_published(uri, endpoint):  # a restarted group may have published it
            publish_folder(folder, uri, endpoint, **digests_of(folder))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return uri
