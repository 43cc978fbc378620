"""Clean: drop bad images and duplicates within a dataset.

Three passes, all on Ray:

1. *inspect* (per shard): decode every image once; reject corrupt/truncated images, images
   under ``prep.min_image_side`` and blurry ones (variance of the Laplacian under
   ``prep.blur_threshold``); compute each row's content hash (texts + media bytes) and the
   64-bit pHash of its images, and write the row's dedup keys (content hash; pHash bands)
   into key partitions. Only the bad rows go back to the driver.
2. *dedup* (per key partition, then a small resolve in the driver): exact duplicates share
   a content hash with an earlier kept row, near duplicates have an image within
   ``prep.phash_radius`` bits of an earlier kept row's image (``rzenembed.prep.dedup``: a
   distributed group-by on the keys, equal to the sequential rule ``decide`` below, which
   stays as the single-process reference).
3. *write* (per shard): keep or reject each row according to the decisions.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.engine import run_shards
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
from rzenembed.prep.dedup import (
    KEY_SCHEMA,
    ROW_BITS,
    Groups,
    find_groups,
    order_of,
    partition_keys,
    resolve,
    row_keys,
)
from rzenembed.prep.ingest import RowError, read_media

STEP = "clean"
CODE_VERSION = "1"


@dataclass
class RowFacts:
    """What the driver needs to decide about one row."""

    position: int
    reason: str | None
    detail: str
    content_hash: str
    phashes: list[int]


def run_clean(
    cfg: PipelineConfig, version: DatasetVersion, show_progress: bool = True
) -> DatasetVersion:
    """Clean ``version`` into a new version (or return the committed one)."""
    knobs = {
        k: getattr(cfg.prep, k)
        for k in ("min_image_side", "blur_threshold", "phash_radius", "max_image_pixels")
    }
    plan = plan_step(
        cfg, STEP, version.manifest.dataset, CODE_VERSION, digest_of(knobs), [version.ref()]
    )
    if (done := committed(plan, cfg)) is not None:
        return done
    root = media_root_of(version)
    endpoint = cfg.storage.endpoint_url
    writer = VersionWriter(plan.uri, RECORD_SCHEMA, endpoint)
    decisions = find_rejects(
        version, root, knobs, writer.staging_uri, cfg.prep.max_in_flight, endpoint, show_progress
    )

    def jobs(staging: str) -> list[ShardJob]:
        return per_shard_jobs(
            version, staging, STEP, apply_decisions, lambda i: {"decisions": decisions[i]}, endpoint
        )

    return execute(plan, cfg, jobs, media_root=root, show_progress=show_progress, writer=writer)


def partition_count(rows: int, shards: int) -> int:
    """Key partitions of the dedup group-by: about 200k rows' keys each, at most one per
    shard and at most 64 (files written = shards x partitions at most)."""
    return max(1, min(shards, 64, -(-rows // 200_000)))


def find_rejects(
    version: DatasetVersion,
    root: str,
    knobs: dict,
    scratch: str,
    in_flight: int | None,
    endpoint_url: str | None,
    show_progress: bool,
) -> list[dict[int, tuple[str, str]]]:
    """Per shard, {row position: (reason, detail)}: bad media from the inspection, then
    exact and near duplicates by the distributed group-by (``rzenembed.prep.dedup``). The
    keys go through partition files under ``scratch``; the driver gets only bad rows and
    duplicate candidates, never a record per row."""
    shards = version.manifest.shards
    partitions = partition_count(version.rows, len(shards))
    keys_uri = join(scratch, "_dedup-keys")
    inspect = [
        (version_shard_loader(version, s), root, knobs, endpoint_url, index, keys_uri, partitions)
        for index, s in enumerate(shards)
    ]
    bad = run_shards(
        _inspect_job,
        inspect,
        max_in_flight=in_flight,
        show_progress=show_progress,
    )
    reduce = [(keys_uri, p, knobs["phash_radius"], endpoint_url) for p in range(partitions)]
    groups = run_shards(
        _groups_job,
        reduce,
        max_in_flight=in_flight,
        show_progress=show_progress,
    )
    decisions = [dict(b) for b in bad]
    for order, (reason, earlier) in resolve(groups).items():
        shard, position = order >> ROW_BITS, order & ((1 << ROW_BITS) - 1)
        text = "same content as" if reason == "duplicate_exact" else "near"
        decisions[shard][position] = (reason, f"{text} {dedup.where(earlier)}")
    return decisions


def _inspect_job(job: tuple) -> dict[int, tuple[str, str]]:
    """Inspect one shard: its bad rows come back; its good rows' dedup keys go to one
    partition file each (``<keys>/p<partition>/<shard>.parquet``)."""
    loader, root, knobs, endpoint_url, index, keys_uri, partitions = job
    bad, keys = {}, []
    for position, row in enumerate(loader()):
        facts = inspect_row(position, row, root, knobs, endpoint_url)
        if facts.reason is not None:
            bad[position] = (facts.reason, facts.detail)
        else:
            keys += row_keys(
                order_of(index, position), facts.content_hash, facts.phashes, knobs["phash_radius"]
            )
    for part, table in enumerate(partition_keys(keys, partitions)):
        if table.num_rows:
            put_table(join(keys_uri, f"p{part:05d}"), f"{index:06d}.parquet", table, endpoint_url)
    return bad


def _groups_job(job: tuple) -> Groups:
    """One partition's exact groups and near edges, from every shard's file for it."""
    keys_uri, part, radius, endpoint_url = job
    fs, folder = filesystem(join(keys_uri, f"p{part:05d}"), endpoint_url)
    files = sorted(fs.glob(join(folder, "*.parquet"))) if fs.exists(folder) else []
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    return find_groups(pa.concat_tables(tables) if tables else KEY_SCHEMA.empty_table(), radius)


def _media_items(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Every media item of the row: query, positive, then negatives."""
    sides = [row["query"], row["positive"], *(row.get("negatives") or [])]
    return [m for s in sides for m in (s.get("media") or [])]


def inspect_row(
    position: int, row: dict, root: str, knobs: dict, endpoint_url: str | None
) -> RowFacts:
    texts = [
        row["query"]["instruction"],
        row["query"]["text"],
        row["positive"]["instruction"],
        row["positive"]["text"],
    ]
    items = _media_items(row)
    images = {m["uri"] for m in items if m["kind"] == "image"}
    blobs, phashes, reason, detail = [], [], None, ""
    for item in items:
        uri = item["uri"]
        try:
            if item["kind"] == "frames" and not item.get("frames"):  # a folder of frames
                blobs.extend(_frame_folder_bytes(resolve_media_uri(root, uri), uri, endpoint_url))
                continue
            data = read_media(resolve_media_uri(root, uri), uri, endpoint_url)
        except RowError as err:
            return RowFacts(position, err.reason, str(err), "", [])
        blobs.append(data)
        if uri not in images or reason is not None:
            continue
        reason, detail, phash = _check_image(data, uri, knobs)
        if phash is not None:
            phashes.append(phash)
    return RowFacts(position, reason, detail, media_ops.content_hash(texts, blobs), phashes)


def _frame_folder_bytes(full: str, uri: str, endpoint_url: str | None) -> list[bytes]:
    """Every frame file of a folder of frames, in natural order (the row's content)."""
    files = frame_files(full, endpoint_url)
    if not files:
        raise RowError("media_missing", f"{uri}: no frame images in the folder")
    return [read_media(file, uri, endpoint_url) for file in files]


def _check_image(data: bytes, uri: str, knobs: dict) -> tuple[str | None, str, int | None]:
    try:
        image = media_ops.decode_image(
            data, max_pixels=knobs["max_image_pixels"], min_side=knobs["min_image_side"]
        )
    except media_ops.MediaError as exc:
        return exc.reason, f"{uri}: {exc}", None
    sharpness = media_ops.laplacian_variance(image)
    if sharpness < knobs["blur_threshold"]:
        return "image_blurry", f"{uri}: Laplacian variance {sharpness:.2f}", None
    return None, "", media_ops.perceptual_hash(image)


_bands = dedup.bands  # the same cut of a pHash into bands as the group-by's


def decide(facts: list[list[RowFacts]], radius: int) -> list[dict[int, tuple[str, str]]]:
    """Per shard, {row position: (reason, detail)} for every row to reject."""
    decisions: list[dict[int, tuple[str, str]]] = [{} for _ in facts]
    seen_content: dict[str, str] = {}
    band_index: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)
    for shard, rows in enumerate(facts):
        for row in rows:
            where = f"shard {shard} row {row.position}"
            if row.reason is not None:
                decisions[shard][row.position] = (row.reason, row.detail)
            elif row.content_hash in seen_content:
                decisions[shard][row.position] = (
                    "duplicate_exact",
                    f"same content as {seen_content[row.content_hash]}",
                )
            elif (match := _near_match(row.phashes, band_index, radius)) is not None:
                decisions[shard][row.position] = ("duplicate_near", f"near {match}")
            else:
                seen_content[row.content_hash] = where
                for phash in row.phashes:
                    for band in _bands(phash, radius + 1):
                        band_index[band].append((phash, where))
    return decisions


def _near_match(phashes: list[int], index: dict, radius: int) -> str | None:
    for phash in phashes:
        for band in _bands(phash, radius + 1):
            for other, where in index.get(band, ()):
                if media_ops.hamming(phash, other) <= radius:
                    return where
    return None


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
