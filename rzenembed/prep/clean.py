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

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.engine import run_shards
from rzenembed.data.media_facts import MediaFacts, image_facts, read_facts
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
    shard_name,
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
# 2: duplicates are examples (policy per source), eval decontamination; 3: media judged from
# ingest's facts (the exact-duplicate key covers the media's SHA-256s, not their bytes)
CODE_VERSION = "3"


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


def partition_count(rows: int, shards: int, slots: int = 1) -> int:
    """Key partitions of the dedup group-by: about 200k rows' keys each, but at least as
    many as the cluster has task slots (an MMEB dataset of 25 shards and 100k rows groups
    on 25 slots, not one), at most one per shard and at most 64 (files written = shards x
    partitions at most). The decisions do not depend on it (``rzenembed.prep.dedup``)."""
    return max(1, min(shards, 64, max(slots, -(-rows // 200_000))))


def cluster_slots() -> int:
    """The CPUs of the cluster's live nodes: how many group-by tasks can run at once (on
    the Ray the step's maps will run on)."""
    from rzenembed.compute.admission import live_nodes
    from rzenembed.compute.connect import ensure_ray

    ensure_ray()
    return int(sum(node.get("CPU", 0.0) for node in live_nodes())) or 1


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
    partitions = partition_count(version.rows, len(shards), cluster_slots())
    keys_uri = join(scratch, "_dedup-keys")
    inspect = [
        (
            version_shard_loader(version, s),
            root,
            knobs,
            endpoint_url,
            index,
            keys_uri,
            partitions,
            (version.uri, shard_name(s)),  # where ingest's facts of the shard's media lie
        )
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
    loader, root, knobs, endpoint_url, index, keys_uri, partitions, (facts_of, shard) = job
    facts = read_facts(facts_of, shard, endpoint_url)  # one GET; then no media read for them
    eval_keys = None
    if knobs.eval_keys is not None:
        eval_keys = load_eval_keys(
            knobs.eval_keys.uri, knobs.phash_radius, knobs.decontaminate_min_chars, endpoint_url
        )
    bad, keys, overlaps = {}, [], Counter()
    fetcher = MediaFetcher(endpoint_url)
    for window in windows(list(enumerate(loader()))):
        # the window's media in one concurrent batch, each distinct object once
        # (objects ingest measured are not fetched at all)
        fetcher.prefetch(
            uri for _, row in window for uri in inspected_uris(row, root) if uri not in facts
        )
        for position, row in window:
            row_facts, sides = inspect_row(position, row, root, knobs, endpoint_url, fetcher, facts)
            if row_facts.reason is None and eval_keys is not None:
                found = overlap(row, sides, eval_keys)
                if found is not None:
                    overlaps[found[0]] += 1
                    row_facts.reason, row_facts.detail = "eval_overlap", found[1]
            if row_facts.reason is not None:
                bad[position] = (row_facts.reason, row_facts.detail)
            else:
                order = order_of(index, position)
                keys += row_keys(order, row_facts, knobs.dedup, knobs.phash_radius)
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
    facts: dict[str, MediaFacts] | None = None,
) -> tuple[RowFacts, dict[str, list[int]]]:
    """The row's dedup facts (or its bad-media reason) and the pHashes of its query and
    positive images. Every image is checked, negatives included (a broken negative breaks
    the row's batch); only the query and positive make the row's identity. An object in
    ``facts`` (measured at ingest) is judged from them; any other is read and measured."""
    texts = [normalise_text(row[s][k]) for s in SIDES for k in ("instruction", "text")]
    digests: list[bytes] = []  # of the query and positive media, for the content hash
    other: list[bytes] = []  # of their non-image media, for the text hash
    phashes: dict[str, list[int]] = {s: [] for s in SIDES}
    sides = [(s, row[s]) for s in SIDES] + [("negative", n) for n in row.get("negatives") or []]
    for side, part in sides:
        for item in part.get("media") or []:
            if side == "negative" and item["kind"] != "image":
                continue  # checked at ingest; a negative video is not part of the identity
            try:
                measured = _measure(item, root, knobs, endpoint_url, fetcher, facts or {})
            except RowError as err:
                return RowFacts(position, err.reason, str(err), "", []), phashes
            if side != "negative":
                digests.extend(m.digest for m in measured)
                if item["kind"] != "image":
                    other.extend(m.digest for m in measured)
            if item["kind"] != "image":
                continue
            reason, detail = _judge_image(measured[0], item["uri"], knobs)
            if reason is not None:
                return RowFacts(position, reason, detail, "", []), phashes
            if side != "negative":
                phashes[side].append(measured[0].phash)
    counts = [str(len(phashes[s])) for s in SIDES]
    row_facts = RowFacts(
        position,
        None,
        "",
        media_ops.content_hash(texts, digests),
        phashes["query"] + phashes["positive"],
        media_ops.content_hash(texts + counts, other),
    )
    return row_facts, phashes


def _measure(
    item: dict[str, Any],
    root: str,
    knobs: CleanKnobs,
    endpoint_url: str | None,
    fetcher: MediaFetcher | None,
    facts: dict[str, MediaFacts],
) -> list[MediaFacts]:
    """The facts of a media item: its object's (from ``facts``, or read and measured
    here), or every frame's of a folder of frames (their digests, in natural order)."""
    uri = item["uri"]
    full = resolve_media_uri(root, uri)
    if item["kind"] == "frames" and not item.get("frames"):  # a folder of frames
        files = frame_files(full, endpoint_url)
        if not files:
            raise RowError("media_missing", f"{uri}: no frame images in the folder")
        return [_digest_only(read_media(f, uri, endpoint_url), "frame") for f in files]
    if full in facts:
        return [facts[full]]
    data = read_media(full, uri, endpoint_url, fetcher)
    if item["kind"] != "image":
        return [_digest_only(data, item["kind"])]
    try:
        image = media_ops.decode_image(data, max_pixels=knobs.max_image_pixels)
    except media_ops.MediaError as exc:
        raise RowError(exc.reason, f"{uri}: {exc}") from None
    return [image_facts(data, image)]


def _digest_only(data: bytes, kind: str) -> MediaFacts:
    return MediaFacts(hashlib.sha256(data).hexdigest(), kind)


def _judge_image(facts: MediaFacts, uri: str, knobs: CleanKnobs) -> tuple[str | None, str]:
    """Clean's verdict on a decoded image from its facts (the same reasons and details
    whether ingest or this step measured it)."""
    width, height = facts.width or 0, facts.height or 0
    if width * height > knobs.max_image_pixels:
        large = media_ops.IMAGE_TOO_LARGE
        return large, f"{uri}: {large}: {width}x{height} > {knobs.max_image_pixels} pixels"
    if min(width, height) < knobs.min_image_side:
        small = media_ops.IMAGE_TOO_SMALL
        return small, f"{uri}: {small}: {width}x{height} < {knobs.min_image_side} px"
    if (facts.sharpness or 0.0) < knobs.blur_threshold:
        return "image_blurry", f"{uri}: Laplacian variance {facts.sharpness:.2f}"
    return None, ""


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
