"""Clean: drop bad images, examples copied from the evaluation sets, and duplicate examples
within a dataset.

Three passes, all on Ray:

1. *inspect* (per shard): decode every image once; reject corrupt/truncated images, images
   under ``prep.min_image_side`` and blurry ones (variance of the Laplacian under
   ``prep.blur_threshold``); reject rows that copy an evaluation item (``eval_overlap``,
   ``rzenembed.prep.decontaminate``); compute each good row's dedup facts (content hash,
   text hash, the pHashes of its query and positive images) and write its dedup keys into
   key partitions. Only the bad rows go back to the driver.
2. *dedup* (per key partition, then a small resolve in the driver): duplicate examples by
   the source's ``dedup`` policy (``rzenembed.prep.dedup``: the rule, and the distributed
   group-by that equals its sequential reference ``dedup.decide``).
3. *write* (per shard): keep or reject each row according to the decisions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.engine import run_shards
from rzenembed.data.media_fetch import MediaFetcher, windows
from rzenembed.data.schema import RECORD_SCHEMA
from rzenembed.data.storage import filesystem, frame_files, join, resolve_media_uri
from rzenembed.data.version import DatasetVersion, VersionWriter, put_table
from rzenembed.prep import dedup
from rzenembed.prep.base import (
    ShardJob,
    committed,
    execute,
    media_root_of,
    per_shard_jobs,
    plan_step,
    reject,
    version_shard_loader,
)
from rzenembed.prep.decontaminate import EvalKeysRef, ensure_eval_keys, load_eval_keys, overlap
from rzenembed.prep.dedup import (
    KEY_SCHEMA,
    ROW_BITS,
    Groups,
    RowFacts,
    find_groups,
    normalise_text,
    order_of,
    partition_keys,
    resolve,
    row_keys,
)
from rzenembed.prep.ingest import RowError, media_uris, read_media

STEP = "clean"
CODE_VERSION = "2"  # 2: duplicates are examples (policy per source), eval decontamination


def dedup_policy(cfg: PipelineConfig, dataset: str) -> str:
    """The ``dedup`` policy of the source that produced ``dataset`` (``example`` for a
    dataset no source names)."""
    return next((s.dedup for s in cfg.sources if s.name == dataset), "example")


@dataclass(frozen=True)
class CleanKnobs:
    """Everything a clean task decides with (picklable; its digest names the version)."""

    min_image_side: int
    blur_threshold: float
    phash_radius: int
    max_image_pixels: int
    dedup: str
    eval_keys: EvalKeysRef | None
    decontaminate_min_chars: int

    def identity(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "eval_keys"}
        out["eval_keys"] = self.eval_keys.digest if self.eval_keys else None
        return out


def clean_knobs(
    cfg: PipelineConfig, dataset: str, eval_keys: EvalKeysRef | None = None
) -> CleanKnobs:
    prep = cfg.prep
    return CleanKnobs(
        prep.min_image_side,
        prep.blur_threshold,
        prep.phash_radius,
        prep.max_image_pixels,
        dedup_policy(cfg, dataset),
        eval_keys,
        prep.decontaminate_min_chars,
    )


def run_clean(
    cfg: PipelineConfig, version: DatasetVersion, show_progress: bool = True
) -> DatasetVersion:
    """Clean ``version`` into a new version (or return the committed one)."""
    eval_keys = ensure_eval_keys(cfg, show_progress)
    knobs = clean_knobs(cfg, version.manifest.dataset, eval_keys)
    digest = digest_of(knobs.identity())
    plan = plan_step(cfg, STEP, version.manifest.dataset, CODE_VERSION, digest, [version.ref()])
    if (done := committed(plan, cfg)) is not None:
        return done
    root = media_root_of(version)
    endpoint = cfg.storage.endpoint_url
    # resumable: the decisions are recomputed (deterministic), the finished shards reused
    writer = VersionWriter(plan.uri, RECORD_SCHEMA, endpoint, resume=True)
    decisions, overlaps = find_rejects(
        version, root, knobs, writer.staging_uri, cfg.prep.max_in_flight, endpoint, show_progress
    )

    def jobs(staging: str) -> list[ShardJob]:
        return per_shard_jobs(
            version, staging, STEP, apply_decisions, lambda i: {"decisions": decisions[i]}, endpoint
        )

    stats: dict[str, Any] = {"dedup": knobs.dedup}
    if eval_keys is not None:
        stats["decontaminated_against"] = {"digest": eval_keys.digest, "sets": eval_keys.sets}
        stats["eval_overlap"] = dict(sorted(overlaps.items()))
    return execute(
        plan, cfg, jobs, stats=stats, media_root=root, show_progress=show_progress, writer=writer
    )


def partition_count(rows: int, shards: int) -> int:
    """Key partitions of the dedup group-by: about 200k rows' keys each, at most one per
    shard and at most 64 (files written = shards x partitions at most)."""
    return max(1, min(shards, 64, -(-rows // 200_000)))


def find_rejects(
    version: DatasetVersion,
    root: str,
    knobs: CleanKnobs,
    scratch: str,
    in_flight: int | None,
    endpoint_url: str | None,
    show_progress: bool,
) -> tuple[list[dict[int, tuple[str, str]]], Counter]:
    """Per shard, {row position: (reason, detail)}: bad media and evaluation copies from
    the inspection, then duplicate examples by the distributed group-by
    (``rzenembed.prep.dedup``); and the evaluation copies counted per evaluation dataset.
    The keys go through partition files under ``scratch``; the driver gets only bad rows
    and duplicate candidates, never a record per row."""
    shards = version.manifest.shards
    partitions = partition_count(version.rows, len(shards))
    keys_uri = join(scratch, "_dedup-keys")
    inspect = [
        (version_shard_loader(version, s), root, knobs, endpoint_url, index, keys_uri, partitions)
        for index, s in enumerate(shards)
    ]
    inspected = run_shards(
        _inspect_job, inspect, max_in_flight=in_flight, show_progress=show_progress
    )
    decisions = [dict(bad) for bad, _ in inspected]
    overlaps = sum((counts for _, counts in inspected), Counter())
    radius = knobs.phash_radius

    def groups_of(only: set[int] | None) -> list[Groups]:
        jobs = [(keys_uri, p, radius, endpoint_url, only) for p in range(partitions)]
        return run_shards(_groups_job, jobs, max_in_flight=in_flight, show_progress=show_progress)

    for order, (reason, earlier) in resolve(groups_of(None), groups_of).items():
        shard, position = order >> ROW_BITS, order & ((1 << ROW_BITS) - 1)
        text = "same content as" if reason == "duplicate_exact" else "near"
        decisions[shard][position] = (reason, f"{text} {dedup.where(earlier)}")
    return decisions, overlaps


def _inspect_job(job: tuple) -> tuple[dict[int, tuple[str, str]], Counter]:
    """Inspect one shard: its bad rows come back (with evaluation copies counted per
    evaluation dataset); its good rows' dedup keys go to one partition file each
    (``<keys>/p<partition>/<shard>.parquet``)."""
    loader, root, knobs, endpoint_url, index, keys_uri, partitions = job
    eval_keys = None
    if knobs.eval_keys is not None:
        eval_keys = load_eval_keys(
            knobs.eval_keys.uri, knobs.phash_radius, knobs.decontaminate_min_chars, endpoint_url
        )
    bad, keys, overlaps = {}, [], Counter()
    fetcher = MediaFetcher(endpoint_url)
    for window in windows(list(enumerate(loader()))):
        # the window's media in one concurrent batch, each distinct object once
        fetcher.prefetch(uri for _, row in window for uri in inspected_uris(row, root))
        for position, row in window:
            facts, sides = inspect_row(position, row, root, knobs, endpoint_url, fetcher)
            if facts.reason is None and eval_keys is not None:
                found = overlap(row, sides, eval_keys)
                if found is not None:
                    overlaps[found[0]] += 1
                    facts.reason, facts.detail = "eval_overlap", found[1]
            if facts.reason is not None:
                bad[position] = (facts.reason, facts.detail)
            else:
                order = order_of(index, position)
                keys += row_keys(order, facts, knobs.dedup, knobs.phash_radius)
    for part, table in enumerate(partition_keys(keys, partitions)):
        if table.num_rows:
            put_table(join(keys_uri, f"p{part:05d}"), f"{index:06d}.parquet", table, endpoint_url)
    return bad, overlaps


def inspected_uris(row: dict, root: str) -> list[str]:
    """The media files ``inspect_row`` reads: the query's and positive's, and the
    negatives' images."""
    negatives = [
        {**n, "media": [m for m in n.get("media") or [] if m["kind"] == "image"]}
        for n in row.get("negatives") or []
    ]
    return media_uris({**row, "negatives": negatives}, root)


def _groups_job(job: tuple) -> Groups:
    """One partition's exact groups and near edges (or, with ``only``, the complete edges of
    those rows), from every shard's file for it."""
    keys_uri, part, radius, endpoint_url, only = job
    fs, folder = filesystem(join(keys_uri, f"p{part:05d}"), endpoint_url)
    files = sorted(fs.glob(join(folder, "*.parquet"))) if fs.exists(folder) else []
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    table = pa.concat_tables(tables) if tables else KEY_SCHEMA.empty_table()
    return find_groups(table, radius, only=only)


SIDES = ("query", "positive")


def inspect_row(
    position: int,
    row: dict,
    root: str,
    knobs: CleanKnobs,
    endpoint_url: str | None,
    fetcher: MediaFetcher | None = None,
) -> tuple[RowFacts, dict[str, list[int]]]:
    """The row's dedup facts (or its bad-media reason) and the pHashes of its query and
    positive images. Every image is checked, negatives included (a broken negative breaks
    the row's batch); only the query and positive make the row's identity."""
    texts = [normalise_text(row[s][k]) for s in SIDES for k in ("instruction", "text")]
    blobs: list[bytes] = []  # query and positive media, for the content hash
    other: list[bytes] = []  # their non-image media, for the text hash
    phashes: dict[str, list[int]] = {s: [] for s in SIDES}
    sides = [(s, row[s]) for s in SIDES] + [("negative", n) for n in row.get("negatives") or []]
    for side, part in sides:
        for item in part.get("media") or []:
            if side == "negative" and item["kind"] != "image":
                continue  # checked at ingest; a negative video is not part of the identity
            try:
                data = _media_bytes(item, root, endpoint_url, fetcher)
            except RowError as err:
                return RowFacts(position, err.reason, str(err), "", []), phashes
            if side != "negative":
                blobs.extend(data)
                if item["kind"] != "image":
                    other.extend(data)
            if item["kind"] != "image":
                continue
            reason, detail, phash = _check_image(data[0], item["uri"], knobs)
            if reason is not None:
                return RowFacts(position, reason, detail, "", []), phashes
            if side != "negative":
                phashes[side].append(phash)
    counts = [str(len(phashes[s])) for s in SIDES]
    facts = RowFacts(
        position,
        None,
        "",
        media_ops.content_hash(texts, blobs),
        phashes["query"] + phashes["positive"],
        media_ops.content_hash(texts + counts, other),
    )
    return facts, phashes


def _media_bytes(
    item: dict[str, Any], root: str, endpoint_url: str | None, fetcher: MediaFetcher | None
) -> list[bytes]:
    """The bytes of a media item: one file, or every frame of a folder of frames."""
    uri = item["uri"]
    full = resolve_media_uri(root, uri)
    if item["kind"] == "frames" and not item.get("frames"):  # a folder of frames
        return _frame_folder_bytes(full, uri, endpoint_url)
    return [read_media(full, uri, endpoint_url, fetcher)]


def _frame_folder_bytes(full: str, uri: str, endpoint_url: str | None) -> list[bytes]:
    """Every frame file of a folder of frames, in natural order (the row's content)."""
    files = frame_files(full, endpoint_url)
    if not files:
        raise RowError("media_missing", f"{uri}: no frame images in the folder")
    return [read_media(file, uri, endpoint_url) for file in files]


def _check_image(data: bytes, uri: str, knobs: CleanKnobs) -> tuple[str | None, str, int | None]:
    try:
        image = media_ops.decode_image(
            data, max_pixels=knobs.max_image_pixels, min_side=knobs.min_image_side
        )
    except media_ops.MediaError as exc:
        return exc.reason, f"{uri}: {exc}", None
    sharpness = media_ops.laplacian_variance(image)
    if sharpness < knobs.blur_threshold:
        return "image_blurry", f"{uri}: Laplacian variance {sharpness:.2f}", None
    return None, "", media_ops.perceptual_hash(image)


def apply_decisions(
    rows: list[dict], shard: str, *, decisions: dict[int, tuple[str, str]]
) -> tuple[list[dict], list[dict], dict[str, int]]:
    kept, rejected = [], []
    for position, row in enumerate(rows):
        if position in decisions:
            reason, detail = decisions[position]
            rejected.append(reject(STEP, row, reason, detail, shard, position))
        else:
            kept.append(row)
    return kept, rejected, {}
