"""The pipeline's configuration tree: pydantic models, YAML loading, dotted overrides.

One ``PipelineConfig`` describes a whole run, from storage and source datasets to the
registered model. Every model forbids unknown keys, so a typo fails loudly instead of
silently falling back to a default. Errors are raised as ``ConfigError`` whose message
names the field path, the value given and what was expected.

Secrets never live here: storage credentials come from the environment or the standard
AWS configuration, never from a config file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rzenembed.prompts import TEMPLATES, template_names

TASK_GROUPS: tuple[str, ...] = (
    "image_classification",
    "image_qa",
    "image_retrieval",
    "visual_grounding",
    "visdoc_retrieval",
    "video_retrieval",
    "video_qa",
    "text_retrieval",
)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names field, value and expectation."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------- storage, data


class StorageConfig(Strict):
    """Where dataset versions, checkpoints and models are written (local path or s3://)."""

    root: str = "runs/data"
    # Endpoint for S3-compatible stores (a local S3 server, MinIO); credentials are read
    # from the environment / AWS config, never from here.
    endpoint_url: str | None = None


class SourceConfig(Strict):
    """One raw dataset to prepare."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    uri: str = Field(min_length=1)
    # How the folder's rows read (rzenembed/data/formats; docs/data.md, "Source formats").
    format: Literal[
        "rzenembed",
        "jsonl",
        "mmeb",
        "text-retrieval",
        "megapairs",
        "webdataset",
        "visdoc-parquet",
        "llava-video",
    ] = "rzenembed"
    task_group: str
    stage: Literal["stage1", "stage2", "both"] = "stage2"
    classification: bool = False
    cap: int | None = Field(default=None, gt=0)
    # Rewrite image captions with prep.recaption.model (after clean, before cap).
    recaption: bool = False
    # Video sources: cut long videos into clips, package 1-3 minute videos whole, or (video
    # QA, captions) sample every video's frames once at preparation ("frames"), so training
    # never decodes an mp4; "none" leaves videos to be decoded at training time.
    video: Literal["none", "split-clips", "package-long", "frames"] = "none"
    # Format importers: instructions for rows that bring none (MMEB rows bring their own),
    # hard negatives kept per row, what to do with a query's further positives (extra
    # records could be each other's false negatives in one batch, so they are dropped by
    # default), MegaPairs' query image as its first hard negative, the seed of any choice.
    query_instruction: str = ""
    positive_instruction: str = ""
    max_negatives: int = Field(default=8, ge=0)
    extra_positives: Literal["drop", "rows"] = "drop"
    query_image_negative: bool = True
    page_answers: bool = False  # visdoc-parquet: also page + query -> answer records
    # Where the rows' media paths start from, when not the source folder itself (MMEB-train
    # rows name "images/<subset>/..." from the download's top folder); relative paths
    # resolve like ``uri``.
    media_root: str | None = None
    # With ``recaption: true``: captions produced elsewhere, a folder of JSONL/Parquet files
    # with ``key`` (the row's id) and ``caption``, used instead of ``prep.recaption.model``
    # under the same policy (add / replace / both-in-one). Relative paths resolve like ``uri``.
    captions: str | None = None
    # What clean counts as one example too many (docs/data.md, "Deduplication"): ``example``
    # (the default) removes repeated examples (same normalised texts, query and positive
    # media identical or near-identical) and keeps rows that only share an image (VQA
    # questions on one picture, COCO's five captions, several queries on one page);
    # ``image`` (web caption crawls such as LAION) also removes a row whose query or
    # positive image is near-identical to an earlier kept row's, whatever the texts;
    # ``off`` keeps duplicates (bad media are still rejected).
    dedup: Literal["example", "image", "off"] = "example"
    seed: int = 0

    @field_validator("task_group")
    @classmethod
    def _known_group(cls, value: str) -> str:
        if value not in TASK_GROUPS:
            raise ValueError(f"expected one of {', '.join(TASK_GROUPS)}")
        return value


class RecaptionConfig(Strict):
    """The recaption step (sources with ``recaption: true``); see docs/data.md."""

    model: str | None = None  # the captioning model folder (any supported Qwen-VL family)
    policy: Literal["add", "replace", "both-in-one"] = "add"
    prompt: str = (
        "Describe this image in one or two precise sentences: the objects, their colours "
        "and where they are."
    )
    join: str = "{original} {generated}"  # the both-in-one text
    max_new_tokens: int = Field(default=64, gt=0)
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(default=8, gt=0)
    max_visual_tokens: int = Field(default=256, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    actors: int = Field(default=1, gt=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    max_chars: int = Field(default=1000, gt=0)
    max_repeat_ratio: float = Field(default=0.5, ge=0, le=1)

    @field_validator("join")
    @classmethod
    def _join_names_both(cls, value: str) -> str:
        if "{original}" not in value or "{generated}" not in value:
            raise ValueError("join must contain {original} and {generated}")
        return value


class PrepConfig(Strict):
    """Thresholds of the data-preparation steps."""

    shard_rows: int = Field(default=2048, gt=0)
    seed: int = 0
    cap_per_dataset: int = Field(default=100_000, gt=0)  # stage-2 datasets (the paper's rule)
    stage1_cap_per_dataset: int | None = Field(default=None, gt=0)  # stage-1 sources: uncapped
    max_text_chars: int = Field(default=8192, gt=0)
    max_image_pixels: int = Field(default=64_000_000, gt=0)
    min_image_side: int = Field(default=32, gt=0)
    blur_threshold: float = Field(default=10.0, ge=0)
    phash_radius: int = Field(default=4, ge=0, le=64)
    clip_seconds: float = Field(default=10.0, gt=0)
    long_video_min_s: float = Field(default=60.0, gt=0)
    long_video_max_s: float = Field(default=180.0, gt=0)
    clip_min_s: float = Field(default=1.0, gt=0)
    clip_hard_negatives: int = Field(default=2, ge=0)
    frame_jpeg_quality: int = Field(default=90, ge=10, le=100)
    # Video steps write one output shard per this many source videos: clips carry their
    # frames, so a shard of 2048 long videos would hold GBs (and footers of thousands of
    # row groups); 64 videos of ~10 clips give shards of about 200 MB.
    videos_per_shard: int = Field(default=64, gt=0)
    classification_dataset: str = Field(default="classification-merged", min_length=1)
    mixture_temperature: float = Field(default=1.0, gt=0)
    # Per-step cap on concurrent shard tasks; None: as many as the cluster's CPUs allow.
    max_in_flight: int | None = Field(default=None, gt=0)
    # The largest fraction of a step's input rows that shard tasks which raised may turn
    # into ``shard_failed`` rejects; 0: any such shard fails the step (once the others are
    # done: they are kept, and a rerun redoes only the failed shards).
    shard_error_budget: float = Field(default=0.0, ge=0, le=1)
    recaption: RecaptionConfig = RecaptionConfig()
    # Evaluation set folders (or folders of sets) whose items no training row may copy
    # (docs/data.md, "Decontamination"); None: the configured ``eval.sets``; []: off.
    # Relative paths resolve like ``eval.sets``.
    decontaminate: list[str] | None = None
    # A training query matches an evaluation item by text only when the text has at least
    # this many characters after normalisation (short label names and answers such as
    # "dog" or "yes" are shared by unrelated rows, not copied from the benchmark).
    decontaminate_min_chars: int = Field(default=16, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _frames_from_the_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "frames_per_clip" in data:
            raise ValueError(
                "prep.frames_per_clip is gone: model.video_frames sets the frames of a video "
                "for preparation, training and evaluation alike (docs/data.md, 'One video "
                "budget'); move the value there"
            )
        return data


# --------------------------------------------------------------------------- model


class ModelConfig(Strict):
    """The backbone and how inputs reach it."""

    name_or_path: str = Field(min_length=1)
    # The backbone family (modeling/backbones.py). "auto": whatever the folder's config.json
    # says; a named family is checked against the folder when it loads, and picks the
    # tiny model the demo builds.
    family: Literal["auto", "qwen2-vl", "qwen2.5-vl", "qwen3-vl"] = "auto"
    template: str = "rzenembed-paper"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] = "sdpa"
    min_visual_tokens: int = Field(default=4, gt=0)
    max_visual_tokens: int = Field(default=1280, gt=0)
    video_frames: int = Field(default=8, gt=0)
    max_text_tokens: int = Field(default=2048, gt=0)
    gradient_checkpointing: bool = False
    padding_side: Literal["left", "right"] = "right"

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        if value not in TEMPLATES:
            raise ValueError(f"expected one of {', '.join(template_names())}")
        return value

    @model_validator(mode="after")
    def _token_range(self) -> ModelConfig:
        if self.min_visual_tokens > self.max_visual_tokens:
            raise ValueError("min_visual_tokens must not exceed max_visual_tokens")
        return self


class LoraConfig(Strict):
    """LoRA on the linear layers of the vision encoder and/or the LLM (never the LM head).
    Both stages always train LoRA adapters: the recipe has no full fine-tuning path."""

    r: int = Field(default=64, gt=0)
    alpha: float = Field(default=128.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    vision: bool = True
    llm: bool = True

    @model_validator(mode="after")
    def _some_target(self) -> LoraConfig:
        if not (self.vision or self.llm):
            raise ValueError("LoRA targets neither vision nor llm; set at least one")
        return self


# --------------------------------------------------------------------------- loss


class TemperatureConfig(Strict):
    """Per-task temperature tau = exp(theta); learnable or fixed at ``init``."""

    learnable: bool = True
    init: float = Field(default=0.02, gt=0)
    min: float = Field(default=0.005, gt=0)
    max: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> TemperatureConfig:
        if not self.min <= self.init <= self.max:
            raise ValueError(
                f"expected min <= init <= max, got {self.min}, {self.init}, {self.max}"
            )
        return self


class MatryoshkaConfig(Strict):
    """Nested dimensions (Matryoshka representation learning): the loss on each prefix of
    the embedding, renormalised, summed with ``weights`` (default: all 1)."""

    dims: list[int] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _increasing_positive_dims(self) -> MatryoshkaConfig:
        if any(d <= 0 for d in self.dims) or sorted(set(self.dims)) != self.dims:
            raise ValueError(f"loss.matryoshka.dims must increase and be > 0: {self.dims}")
        if self.weights is not None:
            if len(self.weights) != len(self.dims):
                raise ValueError(
                    f"loss.matryoshka.weights has {len(self.weights)} entries for "
                    f"{len(self.dims)} dims"
                )
            if any(w < 0 for w in self.weights) or not any(w > 0 for w in self.weights):
                raise ValueError("loss.matryoshka.weights must be >= 0 with one > 0")
        return self


class LossConfig(Strict):
    """The RzenEmbed contrastive loss; each refinement can be switched off for ablations."""

    hardness_alpha: float = Field(default=9.0, ge=0)
    false_negative_delta: float | None = Field(default=0.95, gt=0, le=1)
    false_negative_rule: Literal["relative", "absolute"] = "relative"
    temperature: TemperatureConfig = TemperatureConfig()
    task_groups: list[str] = Field(default_factory=lambda: list(TASK_GROUPS), min_length=1)
    gather_across_ranks: bool = True
    # Nested dimensions (off in the paper configs): see MatryoshkaConfig.
    matryoshka: MatryoshkaConfig | None = None

    @field_validator("task_groups")
    @classmethod
    def _unique_groups(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("task groups must be unique")
        return value


# --------------------------------------------------------------------------- training


class OptimConfig(Strict):
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)


class AdaptiveConfig(Strict):
    """How ``sampling: adaptive`` moves probability toward slowly converging datasets
    (the rule is in ``rzenembed.training.sampler``; docs/training.md)."""

    every: int = Field(default=20, gt=0)  # update probabilities every N global steps
    ema: float = Field(default=0.9, ge=0, lt=1)  # decay of the per-dataset loss EMA
    strength: float = Field(default=1.0, ge=0)  # 0 = never move
    min_factor: float = Field(default=0.5, ge=0, le=1)  # p_i >= min_factor * base_i
    max_factor: float = Field(default=2.0, ge=1)  # p_i <= max_factor * base_i


class StageConfig(Strict):
    """One training stage (shared shape of stage 1 and every stage-2 mixture)."""

    epochs: float = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    global_batch_size: int = Field(default=768, gt=0)
    gradcache_chunk: int | None = Field(default=32, gt=0)
    hard_negatives: int = Field(default=1, ge=0)
    sampling: Literal["static", "adaptive"] = "static"
    adaptive: AdaptiveConfig = AdaptiveConfig()
    checkpoint_every: int = Field(default=500, gt=0)
    seed: int = 0
    # Steps the loader prepares ahead of the one training (0: each step's data is read and
    # processed when the step starts). Under adaptive sampling a probability update seen
    # at step s applies from step s + 1 + prefetch, so the value is part of a run's identity.
    prefetch: int = Field(default=2, ge=0)
    # How an epoch's rows are ordered (docs/configuration.md, "Shuffling"): ``rows`` is a
    # uniform permutation of the dataset's rows (exact; each row read from storage on its
    # own); ``blocks`` permutes row-group-sized blocks and shuffles rows within a window of
    # ``shuffle_window`` blocks, so reads from an object store fetch whole row groups that
    # the next steps use.
    shuffle: Literal["rows", "blocks"] = "rows"
    shuffle_window: int = Field(default=16, gt=0)
    optim: OptimConfig = OptimConfig()


class MixtureConfig(Strict):
    """A stage-2 data mixture: dataset name -> relative sampling weight."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    datasets: dict[str, float] = Field(min_length=1)
    # Which hard negatives its rows train on: the ones a dataset ships (and sibling clips),
    # the ones mined with the stage-1 model (``mining``), or both. ``both`` is mined alone
    # where a dataset ships none. Stage 2's ``hard_negatives`` K stays the limit per step.
    negatives: Literal["given", "mined", "both"] = "both"

    @field_validator("datasets")
    @classmethod
    def _positive_weights(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v > 0}
        if bad:
            raise ValueError(f"mixture weights must be > 0, got {bad}")
        return value


class Stage2Config(StageConfig):
    mixtures: list[MixtureConfig] = Field(default_factory=list)

    @field_validator("mixtures")
    @classmethod
    def _unique_names(cls, value: list[MixtureConfig]) -> list[MixtureConfig]:
        names = [m.name for m in value]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture names must be unique, got {names}")
        return value


# --------------------------------------------------------------------------- soup, eval


class JudgeConfig(Strict):
    """The optional relevance judge of mined negatives (``rzenembed.mining.judge``)."""

    enabled: bool = False
    # A Qwen-VL generation model folder; None: the recaption model (prep.recaption.model).
    model: str | None = None
    prompt: str = "Does the candidate also correctly answer or match the query? Answer yes or no."
    # A mined candidate the judge gives P(yes) at or above this is dropped.
    threshold: float = Field(default=0.5, ge=0, le=1)
    batch_size: int = Field(default=8, gt=0)
    max_visual_tokens: int = Field(default=256, gt=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class MiningConfig(Strict):
    """Hard negatives mined with the stage-1 model (``rzenembed.mining``): each query's
    top ``top_k`` of its dataset's pool, filtered, then ``negatives`` drawn from a window."""

    # Mine every stage-2 dataset between the stages (full-pipeline, retrain); off: stage 2
    # trains on the negatives the datasets ship.
    enabled: bool = True

    # Candidates retrieved per query (by the ANN index) before any rule.
    top_k: int = Field(default=50, gt=0)
    # Negatives kept per query (stage 2's hard_negatives K stays the per-step limit).
    negatives: int = Field(default=4, ge=1)
    # The first survivors to pass over (the closest are the likeliest false negatives).
    skip_first: int = Field(default=0, ge=0)
    # Draw from survivors ranked [window[0], window[1]) after the skip (seeded per query).
    window: tuple[int, int] = (0, 20)
    # TopK-PercPos: drop a candidate scoring above percpos x the positive's score (None: off).
    percpos: float | None = Field(default=0.95, gt=0)
    # A candidate this close (cosine) to the query's positive is the same item, re-encoded.
    near_duplicate: float = Field(default=0.98, gt=0, le=1)
    # Exact search (FAISS flat inner product) up to this pool size, IVF beyond.
    exact_limit: int = Field(default=300_000, gt=0)
    batch_size: int = Field(default=16, gt=0)
    judge: JudgeConfig = JudgeConfig()

    @model_validator(mode="after")
    def _window_holds_the_negatives(self) -> MiningConfig:
        low, high = self.window
        if not 0 <= low < high:
            raise ValueError(
                f"mining.window must be [low, high) with 0 <= low < high: {self.window}"
            )
        if high - low < self.negatives:
            raise ValueError(
                f"mining.window {list(self.window)} holds fewer ranks than mining.negatives "
                f"({self.negatives})"
            )
        return self


class SoupConfig(Strict):
    method: Literal["delta", "factors", "greedy"] = "delta"
    weights: dict[str, float] | None = None
    normalize: bool = True
    # Greedy souping selects adapters on these evaluation sets (validation splits): never
    # on a set that is also reported (``eval.sets``), or the reported score is optimistic.
    validation_sets: list[str] = Field(default_factory=list)


class EvalConfig(Strict):
    # Evaluation set folders (or folders of sets); relative paths resolve like sources.
    sets: list[str] = Field(default_factory=list)
    datasets: list[str] = Field(default_factory=list)
    batch_size: int = Field(default=16, gt=0)
    champion_metric: str = "all"
    # A candidate becomes champion only when it beats the champion by more than this.
    min_improvement: float = Field(default=0.0, ge=0)
    # significant: also the paired bootstrap over the same queries (candidate minus
    # champion) must lie above min_improvement at 95%; mean: the two means decide.
    gating: Literal["mean", "significant"] = "significant"
    ndcg_k: int = Field(default=5, gt=0)
    # When the champion was scored on other evaluation sets than the candidate (another
    # release, an added dataset), score the champion again on the candidate's sets before
    # comparing; off: refuse to move ``champion`` and say why.
    rescore_champion: bool = True
    # Published MMEB-V2 score files (paths or s3:// URIs, e.g. VLM2Vec's
    # experiments/public/all_scores/*/<model>.json): every evaluation report puts the model
    # beside them (report.md's "Beside published models", comparison.png).
    reference_scores: list[str] = Field(default_factory=list)
    # Nested dimensions scored besides the full size (one embedding pass; each a prefix,
    # renormalised). None: the sizes the model was trained for (its card's matryoshka dims).
    dimensions: list[int] | None = None
    # Precisions scored at every dimension (rzenembed.compact): how much the compact codes
    # an endpoint serves lose. uint8 and ubinary rank as int8 and binary (the same codes
    # offset by 128), so they are not listed by default.
    precisions: list[Literal["float", "int8", "uint8", "binary", "ubinary"]] = Field(
        default_factory=lambda: ["float", "int8", "binary"], min_length=1
    )
    # Rows of the model's own training data whose embeddings calibrate the int8/uint8
    # ranges (rzenembed.evaluation.calibration); 0: no calibration, no int8/uint8.
    calibration_rows: int = Field(default=1024, ge=0)

    @field_validator("dimensions")
    @classmethod
    def _positive_dimensions(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(d <= 0 for d in value):
            raise ValueError(f"eval.dimensions must be > 0: {value}")
        return None if value is None else sorted(set(value))


class TrackingConfig(Strict):
    tracking_uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "rzenembed"
    registered_model: str = "rzenembed"
    # None: beside a SQLite file (<db folder>/mlartifacts), else the server's default.
    artifact_location: str | None = None
    # Upload model folders as LoggedModel artifacts (off: the LoggedModel names the folder).
    upload_models: bool = True


class AutoscaleNodes(Strict):
    """One node shape the cluster's autoscaler can add, and how many at most (a KubeRay
    worker group's Ray resources and its ``maxReplicas`` minus what runs now)."""

    resources: dict[str, float] = Field(min_length=1)
    max_nodes: int = Field(gt=0)


class ComputeConfig(Strict):
    # Ray for short calls and for drivers on a Ray node: a GCS address (head:6379) or a
    # Ray Client address (ray://head:10001); None: RAY_ADDRESS, else a local runtime.
    ray_address: str | None = None
    # The head's job server (http://head:8265; else RZENEMBED_JOB_ADDRESS): long steps run
    # as Ray Jobs that outlive this process, found again by their step's key after a
    # retry or a restart (rzenembed/compute/jobs.py). None: steps run in this process.
    job_address: str | None = None
    # What each job's driver asks for (e.g. {"driver": 1}: the head declares the slots, so
    # drivers and evaluation coordinators run there and never hold a GPU node's CPUs).
    driver_resources: dict[str, float] = Field(default_factory=dict)
    # How often a waiting step polls its job's status and logs.
    job_poll_s: float = Field(default=5.0, gt=0)
    # Steps of one flow run that hold a Ray Job at once; the others wait for a slot (the
    # head's driver slots bound the cluster's; Ray fails a job whose driver waits for one
    # longer than 15 minutes). Keep it below the head's `driver` slots.
    max_jobs: int = Field(default=8, gt=0)
    # The cluster's shape in one number: GPUs to train on. Sets num_workers and eval_actors
    # to it, one GPU per worker and per model step (use_gpu, gpus_per_worker, step_gpus);
    # the stage's global batch stays, each rank's share grows as GPUs shrink (docs/
    # operations.md, "Cluster shapes"). A key set beside it must agree with it.
    gpus: int | None = Field(default=None, gt=0)
    num_workers: int = Field(default=1, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    # Custom Ray resources each training worker needs (e.g. {"trainer": 1} on nodes that
    # declare one such slot: one worker per node).
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(default=0, ge=-1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # The model steps outside training (stage-1 merge, soup, evaluation) run as Ray tasks
    # and actors with these resources; None: 1 GPU each when use_gpu, else none.
    step_gpus: float | None = Field(default=None, ge=0)
    step_cpus: float = Field(default=1.0, ge=0)
    # Custom Ray resources a model step or evaluation actor with a GPU asks besides it
    # (e.g. {"pipeline": 1}: only training nodes declare it, so none lands on a serving
    # node).
    step_resources: dict[str, float] = Field(default_factory=dict)
    # Evaluation embeds with this many actors (one per GPU), each a slice of the items.
    eval_actors: int = Field(default=1, gt=0)
    # Stage-2 mixtures trained at the same time, each its own group of num_workers workers:
    # 1 trains them one after another; set it to how many such groups the cluster holds at
    # once (two 8-GPU mixtures on 16 GPUs: 2). Scheduling only: no run or cache key holds it.
    concurrent_mixtures: int = Field(default=1, gt=0)
    # Threads each training rank's loader reads media with (object-store requests overlap).
    loader_threads: int = Field(default=8, gt=0)
    # Threads that run the processor over a step's chunks at once (image decode, resize
    # and patching release the GIL); 0: one chunk after another on the loader's thread.
    # Pays only with spare cores: keep it under cpus_per_worker (the training thread needs
    # one); the cluster configs use 6 of their 8.
    loader_workers: int = Field(default=0, ge=0)
    # Bytes of Parquet row groups each training rank keeps in its row cache.
    loader_cache_mb: int = Field(default=64, ge=0)
    # Before a training run, an actor pool or a GPU task, what it asks is packed onto what
    # the cluster has free (rzenembed/compute/admission.py): a request no node set (grown
    # by the nodes listed here) can ever hold fails at once; one that waits for resources
    # held by others (an endpoint, another run) or for the autoscaler fails after
    # wait_timeout_s naming who holds them. Ray Train's worker-group start uses the same
    # timeout.
    autoscale: list[AutoscaleNodes] = Field(default_factory=list)
    wait_timeout_s: float = Field(default=600.0, gt=0)
    # Ray Train controller failures (e.g. a worker group that could not start within
    # wait_timeout_s) tolerated before a run fails; Ray's own default retries forever.
    controller_failure_limit: int = Field(default=3, ge=0)
    # How long one model step's Ray work (merge, soup, an evaluation's coordinator and its
    # actors' calls) may run before it is cancelled and the step fails; None: no limit
    # (a progress line every minute either way).
    step_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("job_address")
    @classmethod
    def _job_server_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"job_address {value!r} must be the job server's http(s) URL, e.g. "
                "http://head:8265 (ray:// addresses go to ray_address)"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _shape_from_gpus(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("gpus") is None:
            return data
        gpus = data["gpus"]
        derived = {
            "num_workers": gpus,
            "eval_actors": gpus,
            "use_gpu": True,
            "gpus_per_worker": 1,
            "step_gpus": 1,
        }
        clashes = [f"{k} {data[k]!r}" for k, v in derived.items() if data.get(k) not in (None, v)]
        if clashes:
            raise ValueError(
                f"gpus {gpus} sets num_workers and eval_actors to {gpus} and one GPU per "
                f"worker and step; {', '.join(clashes)} contradicts it (set one or the other)"
            )
        return {**data, **derived}


class ServeLimits(Strict):
    """What one embeddings request may carry; anything larger is answered 413."""

    max_items: int = Field(default=256, gt=0)
    max_text_chars: int = Field(default=32_768, gt=0)
    max_image_bytes: int = Field(default=20 * 2**20, gt=0)  # one encoded image
    max_image_pixels: int = Field(default=40_000_000, gt=0)  # width x height, before decoding
    max_video_frames: int = Field(default=64, gt=0)
    max_request_bytes: int = Field(default=100 * 2**20, gt=0)  # the whole JSON body, as read
    max_images_per_item: int = Field(default=16, gt=0)
    # Declared pixels of every image and frame of one request together (a 117 KB white PNG
    # can declare 36M pixels): bounds what one request can make the server decode.
    max_request_pixels: int = Field(default=200_000_000, gt=0)
    # Images are decoded at reduced scale (JPEG draft, integer reduction) down to no fewer
    # than this many pixels: the model never sees more (1280 visual tokens x 28 x 28), so
    # the server does not hold more. 0: decode at full size.
    decode_max_pixels: int = Field(default=1280 * 28 * 28, ge=0)


class ServeAutoscaling(Strict):
    """Ray Serve autoscaling of the model replicas (one GPU each on a cluster)."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    # Requests (each up to ``max_batch_size`` items) a replica should hold at once.
    target_ongoing_requests: float = Field(default=4.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> ServeAutoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})"
            )
        return self


class ServeConfig(Strict):
    """The embeddings endpoint (``rzenembed serve``): what it serves, where, and how."""

    # None: models:/<tracking.registered_model>@champion. Any models:/ URI or model folder.
    model_uri: str | None = None
    app_name: str = Field(default="rzenembed", pattern=r"^[A-Za-z0-9_.-]+$")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, gt=0, lt=65536)
    route_prefix: str = Field(default="/", pattern=r"^/")
    # Dynamic batching: items (not requests) per forward pass, and how long a batch waits.
    max_batch_size: int = Field(default=16, gt=0)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    replicas: int = Field(default=1, gt=0)
    autoscaling: ServeAutoscaling | None = None  # set: it decides the replica count
    num_gpus: float = Field(default=0.0, ge=0)
    num_cpus: float = Field(default=0.0, ge=0)
    # Serving has a resource of its own, so the endpoint never holds what training and
    # evaluation need: each model replica asks `resources`, each HTTP front
    # `api_resources`. Local runtimes declare `serving` slots; on a cluster only the
    # serving nodes do (infra/k8s/raycluster.yaml). {}: replicas compete for CPUs/GPUs.
    resources: dict[str, float] = Field(default_factory=lambda: {"serving": 1.0})
    # The HTTP front (validation, decoding): two, so that one replica's restart (a node
    # lost, a settings change) never leaves the endpoint without a front.
    api_replicas: int = Field(default=2, gt=0)
    api_num_cpus: float = Field(default=0.0, ge=0)
    api_resources: dict[str, float] = Field(default_factory=lambda: {"serving": 0.5})
    # None: the dtype the model was saved with (bfloat16 is the usual choice on GPUs).
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # How often the alias is looked up; a moved alias rolls the replicas to its version.
    poll_interval_s: float = Field(default=30.0, gt=0)
    # A rollout starts this share of new replicas before stopping old ones: 100 needs room
    # for a second set during the switch and drops nothing; 0 replaces replicas in place
    # (requests wait while a lone replica reloads).
    max_surge_percent: int = Field(default=100, ge=0, le=100)
    # A rollout that does not serve within this long is reported (the old version serves on).
    rollout_timeout_s: float = Field(default=1800.0, gt=0)
    # Folders or URIs an image given by location may come from (storage.root always may).
    media_roots: list[str] = Field(default_factory=list)
    # Images given by location (under storage.root or media_roots); false: base64 and data
    # URLs only, for an endpoint open to clients that should see no server storage.
    allow_locations: bool = True
    # API keys: "keys" needs a keys file of key hashes (api_keys_file, or the environment's
    # RZENEMBED_API_KEYS_FILE; `rzenembed api-key new FILE` makes keys) and checks
    # `Authorization: Bearer` on every route but /healthz; "none" only where the network is
    # closed (the local demo says so).
    auth: Literal["keys", "none"] = "keys"
    api_keys_file: str | None = None
    # Back-pressure: an HTTP replica holds at most this many requests; more are answered
    # 429 with Retry-After (a client backs off instead of timing out in a queue).
    max_queued_requests: int = Field(default=64, gt=0)
    # A request not answered within this long is answered 504.
    request_timeout_s: float = Field(default=60.0, gt=0)
    # /ready answers 503 when no model replica answers within this long.
    ready_timeout_s: float = Field(default=5.0, gt=0)
    limits: ServeLimits = ServeLimits()


class PipelineConfig(Strict):
    """The root: everything one pipeline execution needs."""

    name: str = Field(default="rzenembed", min_length=1)
    seed: int = 0
    # The folder relative source URIs (and media roots) start from: downloads live under
    # one root a user sets in one place. None: the config's base (the working directory).
    data_root: str | None = None
    storage: StorageConfig = StorageConfig()
    sources: list[SourceConfig] = Field(default_factory=list)
    prep: PrepConfig = PrepConfig()
    model: ModelConfig
    lora: LoraConfig = LoraConfig()
    loss: LossConfig = LossConfig()
    stage1: StageConfig = StageConfig()
    stage2: Stage2Config = Stage2Config()
    mining: MiningConfig = MiningConfig()
    soup: SoupConfig = SoupConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    compute: ComputeConfig = ComputeConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _selection_apart_from_reporting(self) -> PipelineConfig:
        """Greedy souping needs validation sets, and none of them may be reported."""
        if self.soup.method == "greedy" and not self.soup.validation_sets:
            raise ValueError(
                "soup.method greedy selects adapters on held-out data: name the validation "
                "sets in soup.validation_sets (not the sets in eval.sets)"
            )
        reported = {_normalised(s) for s in self.eval.sets}
        shared = sorted(s for s in self.soup.validation_sets if _normalised(s) in reported)
        if shared:
            raise ValueError(
                f"soup.validation_sets {shared} are also in eval.sets: a set that selects the "
                f"soup cannot also report its score; use a validation split"
            )
        return self

    @model_validator(mode="after")
    def _mixtures_name_sources(self) -> PipelineConfig:
        known = {s.name for s in self.sources}
        if not known:
            return self
        for mixture in self.stage2.mixtures:
            unknown = sorted(set(mixture.datasets) - known)
            if unknown:
                raise ValueError(
                    f"stage2 mixture {mixture.name!r} names unknown datasets {unknown}; "
                    f"configured sources: {sorted(known)}"
                )
        return self

    def source(self, name: str) -> SourceConfig:
        """The configured source called ``name``."""
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(f"no source {name!r}; configured: {[s.name for s in self.sources]}")


# --------------------------------------------------------------------------- loading


def _is_local_relative(uri: str) -> bool:
    return "://" not in uri and not uri.startswith("/")


def data_location(data_root: str | None, uri: str, base: str | Path | None = None) -> str:
    """Where a source's relative ``uri`` points: under ``data_root`` when one is set (itself
    relative to ``base`` when relative), else under ``base``; absolute URIs as they are."""
    if not _is_local_relative(uri):
        return uri
    root = str(Path(base or Path.cwd()).resolve())
    if data_root:
        root = data_root if not _is_local_relative(data_root) else str(Path(root) / data_root)
    return f"{root.rstrip('/')}/{uri}" if "://" in root else str(Path(root) / uri)


def resolve_paths(cfg: PipelineConfig, base: str | Path | None = None) -> PipelineConfig:
    """A copy with every relative local path (storage root, source URIs, the model folder
    when it exists there, evaluation sets, a SQLite tracking file) made absolute against
    ``base`` (default: the current directory). Ray workers start in other directories, and
    lineage records should name files unambiguously."""
    root = Path(base or Path.cwd()).resolve()

    def fix(uri: str) -> str:
        return str(root / uri) if _is_local_relative(uri) else uri

    data = cfg.model_dump(mode="json")
    data["storage"]["root"] = fix(data["storage"]["root"])
    if data["data_root"]:
        data["data_root"] = fix(data["data_root"])
    for source in data["sources"]:
        source["uri"] = data_location(data["data_root"], source["uri"], root)
        for key in ("media_root", "captions"):
            if source[key]:
                source[key] = data_location(data["data_root"], source[key], root)
    model = data["model"]["name_or_path"]
    if _is_local_relative(model) and (root / model).exists():
        data["model"]["name_or_path"] = str(root / model)
    data["eval"]["sets"] = [fix(s) for s in data["eval"]["sets"]]
    if data["prep"]["decontaminate"] is not None:
        data["prep"]["decontaminate"] = [fix(s) for s in data["prep"]["decontaminate"]]
    uri = data["tracking"]["tracking_uri"]
    if uri.startswith("sqlite:///") and _is_local_relative(uri.removeprefix("sqlite:///")):
        data["tracking"]["tracking_uri"] = f"sqlite:///{root / uri.removeprefix('sqlite:///')}"
    return PipelineConfig.model_validate(data)


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {err['input']!r}); check the spelling")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: got {err.get('input')!r}; {message}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    """Build a ``PipelineConfig`` from plain data, raising ``ConfigError`` on any problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"<root>: got {type(data).__name__}; expected a mapping")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def parse_override(override: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into a key path and a YAML-parsed value."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"override {override!r}: empty component in key path {key!r}")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``value`` at ``path`` inside ``data``; list items are addressed by index."""
    node: Any = data
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"{where}: cannot descend into a {type(node).__name__}")
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, ".".join(path))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(path)}: cannot set a key on a {type(node).__name__}")


def _index(part: str, node: list[Any], where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: got index {part!r}; expected 0..{len(node) - 1}")
    return int(part)


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config, apply ``KEY.PATH=VALUE`` overrides in order, validate."""
    return config_from_dict(_read_yaml(Path(path), ()), overrides)


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's mapping; ``extends: OTHER.yaml`` (beside it) is read first and this
    file's keys laid over it: mappings merged key by key, anything else replaced (a named
    variant of a config states only what differs)."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: 'extends' comes back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    parent = data.pop("extends", None)
    if parent is None:
        return data
    base = _read_yaml(path.parent / str(parent), (*seen, path.resolve()))
    return _laid_over(base, data)


def _laid_over(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        both = isinstance(below, dict) and isinstance(value, dict)
        out[key] = _laid_over(below, value) if both else value
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> PipelineConfig:
    data = json.loads(json.dumps(data))  # a private copy that overrides may mutate
    for override in overrides or []:
        apply_override(data, *parse_override(override))
    return validate_config(data)


def config_digest(cfg: BaseModel) -> str:
    """A stable sha256 of a config (section), used for caching and provenance."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def embedding_settings(model: ModelConfig) -> str:
    """What vectors depend on besides the weights and the inputs: how inputs reach the
    model (dtype, visual and text budgets, frames, template), never where it lives. Keys
    stored embeddings and calibrations."""
    return digest_of(model.model_copy(update={"name_or_path": "-"}))


def digest_of(value: Any) -> str:
    """sha256 of any JSON-able value (pydantic models are dumped first), canonically encoded."""

    def plain(v: Any) -> Any:
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json")
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    canonical = json.dumps(plain(value), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _normalised(uri: str) -> str:
    """A set's location compared as written, without ``./`` or trailing slashes."""
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.normpath(uri)
