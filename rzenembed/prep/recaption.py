"""Recaption: rewrite image captions with a vision-language model, keeping the originals.

Stage 1 of the recipe trains on image-text pairs whose captions were rewritten by a strong
captioner into longer, more precise descriptions (RECIPE.md). This step runs after
``clean`` and before ``cap`` for sources with ``recaption: true``.

A row is captionable when one side is a caption (text, no media) and the other side is one
image without text. For each, the captioner (any supported Qwen-VL folder, ``generate`` with
``prep.recaption`` settings) writes a new description, and the policy decides the output:

``add``           the original row, plus a new row ``<id>#recaption`` with the new caption;
                  both get the same ``group_id`` so they are never each other's negatives
``replace``       the row with its caption replaced
``both-in-one``   the row with ``join`` applied (default: "{original} {generated}")

New captions come from the captioner, or from captions produced elsewhere
(``sources[].captions``: a folder of ``key``/``caption`` rows, ``key`` the row's id, e.g.
img2dataset's sample key), under the same policy and guards.

A generated caption that is empty, longer than ``max_chars`` or repetitive (the share of
repeated word 3-grams above ``max_repeat_ratio``) is rejected with a reason code
(``caption_empty``, ``caption_too_long``, ``caption_repetitive``) and the original row is
kept as it was. Every generated caption that does not take its original's place (kept
under ``add``, or rejected) counts as an added row, so rows in + added = rows out +
rejected. Rows that are not captionable pass through unchanged.

Work runs on Ray actors that each load the captioner once (GPU actors with
``gpus_per_actor``) and take shards from a bounded queue. Each finished shard is written to
a work area keyed by the step's version id (``<storage.root>/_work/recaption/<id>/``), so an
interrupted run resumes with the shards that are missing; the version is committed from
the work area and the work area removed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rzenembed.config import PipelineConfig, RecaptionConfig, digest_of
from rzenembed.data.schema import RECORD_SCHEMA, REJECT_SCHEMA
from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import (
    DatasetVersion,
    ShardInfo,
    VersionWriter,
    put_table,
    write_atomically,
)
from rzenembed.prep.base import (
    committed,
    media_root_of,
    plan_step,
    reject,
    shard_name,
    version_shard_loader,
)

STEP = "recaption"
CODE_VERSION = "1"
SUFFIX = "#recaption"
# A side-file captions folder is listed like a source of this format: its JSONL files
# (plain, gzipped, JSON arrays) and Parquet files are read; the rest is not.
CAPTIONS_FORMAT = "jsonl"


# --------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Slot:
    """Which side of a row is the caption and which is the image."""

    text_side: str
    image_side: str


def caption_slot(row: dict[str, Any]) -> Slot | None:
    """The caption and image sides of a captionable row, else None."""
    for text_side, image_side in (("query", "positive"), ("positive", "query")):
        text, image = row.get(text_side) or {}, row.get(image_side) or {}
        media = image.get("media") or []
        if (
            (text.get("text") or "").strip()
            and not (text.get("media") or [])
            and len(media) == 1
            and media[0].get("kind") == "image"
            and not (image.get("text") or "").strip()
        ):
            return Slot(text_side, image_side)
    return None


def repeat_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (0 for texts under n + 1 words)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def check_caption(text: str, settings: RecaptionConfig) -> tuple[str, str] | None:
    """(reason, detail) when a generated caption must not be used, else None."""
    if not text.strip():
        return "caption_empty", "the captioner produced no text"
    if len(text) > settings.max_chars:
        return "caption_too_long", f"{len(text)} characters > {settings.max_chars}"
    ratio = repeat_ratio(text)
    if ratio > settings.max_repeat_ratio:
        return "caption_repetitive", f"{ratio:.2f} of word 3-grams repeat"
    return None


def apply_policy(
    rows: Sequence[dict[str, Any]],
    captions: dict[int, str],
    settings: RecaptionConfig,
    shard: str,
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Output rows, rejects and counts for a shard, given the generated caption per row."""
    kept: list[dict] = []
    rejected: list[dict] = []
    stats = {"captionable": 0, "captioned": 0, "rows_added": 0}
    for index, row in enumerate(rows):
        slot = caption_slot(row)
        if slot is None or index not in captions:
            kept.append(row)
            continue
        stats["captionable"] += 1
        generated = " ".join(captions[index].split())
        original = row[slot.text_side]["text"]
        candidate = _with_caption(row, slot, generated, settings, original)
        problem = check_caption(generated, settings)
        if problem is not None:
            rejected.append(reject(STEP, candidate, *problem, shard=shard, index=index))
            kept.append(row)
            stats["rows_added"] += 1  # the rejected candidate is the extra row
            continue
        stats["captioned"] += 1
        if settings.policy == "add":
            group = row.get("group_id") or f"recaption:{row['id']}"
            kept.append({**row, "group_id": group})
            kept.append({**candidate, "group_id": group})
            stats["rows_added"] += 1
        else:
            kept.append(candidate)
    return kept, rejected, stats


def _with_caption(
    row: dict, slot: Slot, generated: str, settings: RecaptionConfig, original: str
) -> dict:
    text = generated
    new_id = row["id"]
    if settings.policy == "both-in-one":
        text = settings.join.format(original=original, generated=generated)
    elif settings.policy == "add":
        new_id = f"{row['id']}{SUFFIX}"
    side = {**row[slot.text_side], "text": text}
    return {**row, "id": new_id, slot.text_side: side}


# --------------------------------------------------------------------------- the captioner


class Captioner:
    """A Qwen-VL generation model (any family in ``backbones.py``) and its processor, loaded
    once per actor."""

    def __init__(self, path: str, settings: RecaptionConfig, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor

        from rzenembed.modeling.backbones import backbone_of_folder

        self.settings = settings
        self.device = device
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                 "float16": torch.float16}[settings.dtype]  # fmt: skip
        model_cls = backbone_of_folder(path).model_cls  # any supported family captions
        self.model = model_cls.from_pretrained(path, dtype=dtype).to(device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # generation continues on the right
        unit = self.processor.image_processor.patch_size * self.processor.image_processor.merge_size
        self.processor.image_processor.size = {
            "shortest_edge": 4 * unit * unit,
            "longest_edge": settings.max_visual_tokens * unit * unit,
        }

    def caption(self, images: Sequence[Any]) -> list[str]:
        """One generated description per image, in order (batched)."""
        import torch

        s = self.settings
        out: list[str] = []
        for start in range(0, len(images), s.batch_size):
            batch = list(images[start : start + s.batch_size])
            message = [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.prompt}]}
            ]
            prompt = self.processor.apply_chat_template(message, add_generation_prompt=True)
            inputs = self.processor(text=[prompt] * len(batch), images=batch, padding=True,
                                    return_tensors="pt").to(self.device)  # fmt: skip
            torch.manual_seed(s.seed + start)  # sampled captions are reproducible too
            random.seed(s.seed + start)
            with torch.inference_mode():
                generated = self.model.generate(
                    **inputs, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
                    temperature=s.temperature if s.do_sample else None,
                    top_p=s.top_p if s.do_sample else None,
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )  # fmt: skip
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            out += self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return out


@dataclass
class ShardTask:
    name: str
    load: Callable[[], list[dict]]
    media_root: str
    work_uri: str
    endpoint_url: str | None


class CaptionWorker:
    """The Ray actor body: one captioner, many shards."""

    def __init__(self, path: str, settings: dict[str, Any]):
        from rzenembed.runtime import task_device

        self.settings = RecaptionConfig.model_validate(settings)
        # The GPU Ray assigned to this actor (gpus_per_actor), else the CPU.
        device = str(task_device(self.settings.gpus_per_actor > 0))
        self.captioner = Captioner(path, self.settings, device)

    def run(self, task: ShardTask) -> dict[str, Any]:
        return caption_shard(task, self.captioner)


class CaptionLookup:
    """Captions produced elsewhere (``sources[].captions``): a folder of JSONL (plain,
    gzipped or a JSON array) or Parquet files with ``key`` and ``caption``, loaded once per
    actor; a row's caption is the one under its id. Rows without one pass through
    unchanged."""

    def __init__(self, uri: str, settings: RecaptionConfig, endpoint_url: str | None = None):
        from rzenembed.data.importers import list_source_files
        from rzenembed.data.raw_files import iter_file_rows

        self.settings = settings
        fs, _ = filesystem(uri, endpoint_url)
        self.by_key: dict[str, str] = {}
        for file in list_source_files(uri, CAPTIONS_FORMAT, endpoint_url).data:
            for row in iter_file_rows(fs, file):
                if isinstance(row, dict) and row.get("key") is not None and row.get("caption"):
                    self.by_key[str(row["key"])] = str(row["caption"])


class LookupWorker:
    """The Ray actor body for side-file captions: the lookup, many shards (no model)."""

    def __init__(self, uri: str, settings: dict[str, Any], endpoint_url: str | None):
        self.lookup = CaptionLookup(uri, RecaptionConfig.model_validate(settings), endpoint_url)

    def run(self, task: ShardTask) -> dict[str, Any]:
        return caption_shard(task, self.lookup)


def _captions(
    rows: list[dict], todo: list[tuple[int, Slot]], captioner: Captioner | CaptionLookup, task
) -> dict[int, str]:
    """Row index -> new caption, from the model (images read and captioned) or the lookup."""
    if isinstance(captioner, CaptionLookup):
        found = ((i, captioner.by_key.get(str(rows[i]["id"]))) for i, _ in todo)
        return {i: text for i, text in found if text is not None}
    from rzenembed.training.collate import MediaReader

    reader = MediaReader(task.media_root, task.endpoint_url)
    images = [reader.image(rows[i][slot.image_side]["media"][0]["uri"]) for i, slot in todo]
    texts = captioner.caption(images) if images else []
    return {i: text for (i, _), text in zip(todo, texts, strict=True)}


def caption_shard(task: ShardTask, captioner: Captioner | CaptionLookup) -> dict[str, Any]:
    """Caption one shard and write its rows, rejects and counts to the work area."""
    rows = task.load()
    todo = [(i, caption_slot(r)) for i, r in enumerate(rows)]
    todo = [(i, slot) for i, slot in todo if slot is not None]
    captions = _captions(rows, todo, captioner, task)
    kept, rejected, stats = apply_policy(rows, captions, captioner.settings, task.name)
    if len(kept) + len(rejected) != len(rows) + stats["rows_added"]:
        raise AssertionError(f"recaption shard {task.name}: rows were lost")
    data = put_table(
        task.work_uri,
        f"{task.name}.parquet",
        pa.Table.from_pylist(kept, schema=RECORD_SCHEMA),
        task.endpoint_url,
    )
    rejects = None
    if rejected:
        rejects = put_table(task.work_uri, f"{task.name}.rejects.parquet",
                            pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA),
                            task.endpoint_url)  # fmt: skip
    result = {"name": task.name, "rows_in": len(rows), "rows": data.rows,
              "sha256": data.sha256, "rejected": 0 if rejects is None else rejects.rows,
              "rejects_sha256": None if rejects is None else rejects.sha256, "stats": stats,
              "reject_counts": _counts(rejected)}  # fmt: skip
    # The marker is written last: a shard without it is redone on rerun.
    fs, path = filesystem(join(task.work_uri, f"{task.name}.done.json"), task.endpoint_url)
    write_atomically(fs, path, json.dumps(result))
    return result


def _moved(
    fs,
    work: str,
    writer: VersionWriter,
    name: str,
    rel: str,
    rows: int,
    sha256: str | None,
    endpoint_url: str | None,
) -> ShardInfo:
    """Copy one work file into the writer's staging area as ``rel``; its shard info."""
    from rzenembed.data.importers import file_sha256

    source = join(filesystem(work, endpoint_url)[1], name)
    target = join(filesystem(writer.staging_uri, endpoint_url)[1], rel)
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    fs.copy(source, target)
    digest = sha256 or file_sha256(join(work, name), endpoint_url)  # older work areas
    return ShardInfo(rel, rows, digest)


def read_table(uri: str, endpoint_url: str | None) -> pa.Table:
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, endpoint_url)
    return pq.read_table(path, filesystem=fs)


def _counts(rejected: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rejected:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return counts


# --------------------------------------------------------------------------- the step


def captioner_path(cfg: PipelineConfig) -> str:
    path = cfg.prep.recaption.model
    if not path:
        raise ValueError("prep.recaption.model is not set: name the captioning model folder")
    return path


def captions_source(cfg: PipelineConfig, captions: str | None) -> tuple[str, str, str]:
    """(kind, location, digest) of where new captions come from: the side-file folder
    (``source``, its content digest) or the captioning model (``model``, its weights)."""
    if captions:
        from rzenembed.data.importers import source_digest

        return "source", captions, source_digest(captions, cfg.storage.endpoint_url)
    from rzenembed.modeling.digest import weights_digest

    path = captioner_path(cfg)
    return "model", path, weights_digest(path)


def run_recaption(
    cfg: PipelineConfig,
    version: DatasetVersion,
    show_progress: bool = True,
    stop_after: int | None = None,
    captions: str | None = None,
) -> DatasetVersion:
    """Recaption ``version`` (or return the committed result).

    ``captions``: a folder of captions produced elsewhere (``sources[].captions``, resolved)
    used instead of the model. ``stop_after`` (tests) stops after that many newly captioned
    shards without committing, as an interrupted run would.
    """
    settings = cfg.prep.recaption
    kind, path, model_digest = captions_source(cfg, captions)
    section = {"settings": settings.model_dump(mode="json", exclude={"model", "actors",
               "gpus_per_actor"}), "captioner": model_digest}  # fmt: skip
    plan = plan_step(cfg, STEP, version.manifest.dataset, CODE_VERSION, digest_of(section),
                     [version.ref()])  # fmt: skip
    if (done := committed(plan, cfg)) is not None:
        return done
    root = media_root_of(version)
    version_id = plan.uri.rstrip("/").rsplit("/", 1)[-1]
    work = join(cfg.storage.root, "_work", STEP, f"{version.manifest.dataset}-{version_id}")
    tasks = [
        ShardTask(shard_name(s), version_shard_loader(version, s), root, work,
                  cfg.storage.endpoint_url)
        for s in version.manifest.shards
    ]  # fmt: skip
    results = _finished(work, cfg.storage.endpoint_url)
    missing = [t for t in tasks if t.name not in results]
    resumed = len(tasks) - len(missing)
    if stop_after is not None:
        missing = missing[:stop_after]
    endpoint = cfg.storage.endpoint_url
    placed = dict(cfg.compute.step_resources)  # a GPU captioner on a training node
    for result in _run_actors(missing, path, settings, show_progress, kind, endpoint, placed):
        results[result["name"]] = result
    if stop_after is not None:
        return None  # type: ignore[return-value]  # interrupted on purpose
    stats = {
        "captioner": {"path": path, "digest": model_digest, "kind": kind},
        "policy": settings.policy,
        "media_root": root,
        "shards_resumed": resumed,
        "shards_captioned": len(tasks) - resumed,
    }
    out = _commit(plan, cfg, tasks, results, work, stats)
    fs, work_path = filesystem(work, cfg.storage.endpoint_url)
    fs.rm(work_path, recursive=True)
    return out


def _finished(work: str, endpoint_url: str | None) -> dict[str, dict]:
    fs, path = filesystem(work, endpoint_url)
    if not fs.exists(path):
        return {}
    done = {}
    for file in sorted(fs.glob(join(path, "*.done.json"))):
        with fs.open(file, "r") as f:
            result = json.loads(f.read())
        done[result["name"]] = result
    return done


def _run_actors(
    tasks: list[ShardTask],
    path: str,
    settings: RecaptionConfig,
    show_progress: bool,
    kind: str = "model",
    endpoint_url: str | None = None,
    resources: dict[str, float] | None = None,
):
    """The shard results, captioned by a Ray Data actor pool (``settings.actors`` actors with
    ``settings.gpus_per_actor`` GPUs each); each actor loads the captioner once (the
    side-file lookup, on CPU, when the captions come from a folder). A GPU actor also asks
    ``resources`` (``compute.step_resources``), so it never takes a serving node's GPU."""
    from rzenembed.data.engine import run_on_actors

    dumped = settings.model_dump(mode="json")
    if kind == "source":
        worker, args, gpus = LookupWorker, (path, dumped, endpoint_url), 0.0
    else:
        worker, args, gpus = CaptionWorker, (path, dumped), settings.gpus_per_actor
    return run_on_actors(
        worker,
        args,
        tasks,
        actors=settings.actors,
        num_cpus=1,
        num_gpus=gpus,
        resources=resources if gpus else None,
        show_progress=show_progress,
    )


def _commit(plan, cfg: PipelineConfig, tasks, results, work: str, stats) -> DatasetVersion:
    """Move the finished shards from the work area into the version (store-side copies; no
    shard passes through the driver), then commit."""
    endpoint = cfg.storage.endpoint_url
    writer = VersionWriter(plan.uri, RECORD_SCHEMA, endpoint)
    fs, _ = filesystem(work, endpoint)
    totals: dict[str, int] = {}
    for task in tasks:
        result = results[task.name]
        data = _moved(
            fs,
            work,
            writer,
            f"{task.name}.parquet",
            f"data/{task.name}.parquet",
            result["rows"],
            result.get("sha256"),
            endpoint,
        )
        rejects = None
        if result["rejected"]:
            rejects = _moved(
                fs,
                work,
                writer,
                f"{task.name}.rejects.parquet",
                f"rejects/{task.name}.parquet",
                result["rejected"],
                result.get("rejects_sha256"),
                endpoint,
            )
        writer.add_shard_info(task.name, data, rejects, result["reject_counts"])
        for key, value in {**result["stats"], "rows_in": result["rows_in"]}.items():
            totals[key] = totals.get(key, 0) + value
    return writer.commit(
        dataset=plan.dataset, step=plan.step, config_digest=plan.config_digest,
        code_version=plan.code_version, inputs=plan.inputs, stats={**totals, **stats},
    )  # fmt: skip
