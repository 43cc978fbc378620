"""Clean: drop bad images and duplicates within a dataset.

Two passes over the shards, both on Ray:

1. *inspect* (per shard): decode every image once; reject corrupt/truncated images, images
   under ``prep.min_image_side`` and blurry ones (variance of the Laplacian under
   ``prep.blur_threshold``); compute each row's content hash (texts + media bytes) and the
   64-bit pHash of its images. Only these small facts go back to the driver.
2. *decide* (driver): walk rows in dataset order; a row whose content hash was seen is an
   exact duplicate, a row with an image within ``prep.phash_radius`` bits of an earlier
   kept row's image is a near duplicate. Near duplicates are found with multi-index
   hashing: split the 64 bits into radius + 1 bands; two hashes within the radius agree
   exactly on at least one band (pigeonhole), so only rows sharing a band are compared.
3. *write* (per shard): keep or reject each row according to the decisions.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.fanout import map_shards
from rzenembed.data.storage import resolve_media_uri
from rzenembed.data.version import DatasetVersion
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
    shards = version.manifest.shards
    inspect_jobs = [
        (version_shard_loader(version, s), root, knobs, cfg.storage.endpoint_url) for s in shards
    ]
    facts = map_shards(
        _inspect_job,
        inspect_jobs,
        max_in_flight=cfg.prep.max_in_flight,
        desc="clean/inspect",
        show_progress=show_progress,
    )
    decisions = decide(facts, cfg.prep.phash_radius)

    def jobs(staging: str) -> list[ShardJob]:
        return per_shard_jobs(
            version,
            staging,
            STEP,
            apply_decisions,
            lambda i: {"decisions": decisions[i]},
            cfg.storage.endpoint_url,
        )

    return execute(plan, cfg, jobs, media_root=root, show_progress=show_progress)


def _inspect_job(job: tuple) -> list[RowFacts]:
    loader, root, knobs, endpoint_url = job
    return [inspect_row(i, row, root, knobs, endpoint_url) for i, row in enumerate(loader())]


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
    for uri in (m["uri"] for m in items):
        try:
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


def _bands(value: int, count: int) -> list[tuple[int, int]]:
    """(band index, band value) of a 64-bit hash cut into ``count`` nearly equal bands."""
    edges = [round(64 * i / count) for i in range(count + 1)]
    return [
        (i, (value >> lo) & ((1 << (hi - lo)) - 1))
        for i, (lo, hi) in enumerate(itertools.pairwise(edges))
    ]


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
