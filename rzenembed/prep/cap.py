"""Cap: keep at most N rows of a dataset, chosen by a seeded hash ranking.

Taking the first N rows would bias toward whatever order the source was written in.
Instead every row gets the rank ``blake2b(seed, id)`` and the N smallest ranks are kept
(ties, which a 64-bit hash practically never has, go to the smaller id): the same input
and seed always select the same rows, another seed selects others, and a row's fate does
not depend on its position.

All row work happens on the workers, in Arrow:

1. *rank* (per shard): read the id column, rank it, return the shard's N smallest ranks
   (numbers only, no ids);
2. *threshold* (driver): the N-th smallest rank ``T``, merging a few shards' winners at a
   time (memory O(N), not O(rows));
3. *filter* (per shard): keep rows with rank <= ``T`` through an Arrow filter; the shard
   never becomes Python rows and no id set travels to the tasks. Should more than N rows
   share ranks <= ``T`` (rows tied at ``T``: practically never with 64-bit ranks, but a
   repeated id does it), the shards holding ``T`` are filtered again keeping only the tied
   rows that fit, first by (id, shard, row).

*Whole videos.* A dataset whose rows share groups of siblings (clips of one video, with each
other as hard negatives) and a video source before its clip split are capped by *group*:
every row ranks by ``blake2b(seed, group)`` (its ``group_id``, or its id when it has none),
a group counts as many rows as it has (before the split: as many clips as the split will
cut from the video, from its segments or its length stamped at ingest), and the groups are
kept in rank order while their count fits the cap. A video and its clips stay or go
together, no sibling reference is left dangling (the filter counts references to rows it
dropped and fails the step on any), and the split decodes only the kept videos
(``rzenembed.prep.prepare.source_steps`` runs the cap first). Groups are never cut, so the
cap keeps between ``N - largest group + 1`` and ``N`` rows.

Which cap applies (``cap_limit``): a source's own ``cap``, else ``prep.cap_per_dataset``
(100k, the paper's stage-2 rule) for stage-2 sources and those used in both stages, else
``prep.stage1_cap_per_dataset`` (default none: stage 1 trains on everything, as in the
paper). An uncapped dataset, or one already within its cap, is committed as byte copies
of its input's data shards: the same shard digests, no decoding. Dropped rows are not copied into
rejects (the input version keeps them); they are counted as ``dropped_by_cap``.
"""

from __future__ import annotations

import hashlib
import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data.engine import run_shards
from rzenembed.data.schema import RECORD_SCHEMA
from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import DatasetVersion, ShardInfo, VersionWriter, put_table
from rzenembed.prep.base import committed, media_root_of, plan_step, shard_name

STEP = "cap"
CODE_VERSION = "3"  # 3: whole groups (videos) for sibling datasets and video sources


def rank(seed: int, row_id: str) -> int:
    """A 64-bit pseudo-random rank of ``row_id`` under ``seed``."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "big")


def rank_ids(seed: int, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``rank`` of every id, as a uint64 array."""
    key = str(seed).encode()
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8, key=key).digest(), "big")
            for i in ids.to_pylist()
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def select_ids(version: DatasetVersion, limit: int, seed: int) -> set[str]:
    """The ids of the ``limit`` lowest (rank, id) pairs, streamed through a bounded heap in
    one process: the reference the distributed selection is checked against (tests,
    benchmark)."""
    pairs = (
        (rank(seed, i), i)
        for table in version.iter_tables(columns=["id"])
        for i in table.column("id").to_pylist()
    )
    return {row_id for _, row_id in heapq.nsmallest(limit, pairs)}


def cap_limit(cfg: PipelineConfig, dataset: str) -> int | None:
    """The cap of ``dataset`` (None: uncapped); see the module docstring."""
    for source in cfg.sources:
        if source.name == dataset:
            if source.cap is not None:
                return source.cap
            if source.stage == "stage1":
                return cfg.prep.stage1_cap_per_dataset
            return cfg.prep.cap_per_dataset
    return cfg.prep.cap_per_dataset  # merged classification and other derived datasets


@dataclass(frozen=True)
class Grouping:
    """How a grouped cap counts: rows rank by their group, and before a clip split a video
    row counts as its clips (``clip_knobs``: the split's clip_seconds and clip_min_s)."""

    clip_knobs: dict[str, float] | None = None


def grouping(cfg: PipelineConfig, version: DatasetVersion) -> Grouping | None:
    """The grouped cap for sibling datasets and for a source's videos before their split;
    None: rows are capped one by one."""
    for source in cfg.sources:
        before_split = source.video == "split-clips" and version.manifest.step != "split-clips"
        if source.name == version.manifest.dataset and before_split:
            knobs = {"clip_seconds": cfg.prep.clip_seconds, "clip_min_s": cfg.prep.clip_min_s}
            return Grouping(clip_knobs=knobs)
    if version.manifest.stats.get("group_semantics") == "siblings":
        return Grouping()
    return None


GROUP_COLUMNS = ["id", "group_id", "query", "positive", "segments"]


def group_ranks(table: pa.Table, seed: int, how: Grouping) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the rank of its group, and how many rows it stands for (its clips before a
    split, else 1)."""
    ids, groups = table.column("id").to_pylist(), table.column("group_id").to_pylist()
    keys = pa.array([g or i for i, g in zip(ids, groups, strict=True)], pa.string())
    if how.clip_knobs is None:
        return rank_ids(seed, keys), np.ones(len(keys), np.int64)
    weights = np.fromiter(
        (clip_count(row, how.clip_knobs) for row in table.select(GROUP_COLUMNS[2:]).to_pylist()),
        dtype=np.int64,
        count=table.num_rows,
    )
    return rank_ids(seed, keys), weights


def clip_count(row: dict[str, Any], knobs: dict[str, float]) -> int:
    """The clips the split will cut from the row's video: its segments, else windows over the
    length ingest stamped on the video item (``end_s``). A video without either counts one."""
    from rzenembed.data.record_checks import RowError
    from rzenembed.prep.video import clip_windows, find_video

    try:
        _, video = find_video(row)
    except RowError:  # no video: the split rejects the row, which counts as one here
        video = None
    whole = video is not None and not video.get("start_s")  # a range of it: not its length
    length = video.get("end_s") if whole else None
    if not row.get("segments") and length is None:
        return 1
    if length is None:  # segments without a known length: each segment's own end
        length = max(s["end_s"] for s in row["segments"])
    windows = clip_windows(length, row.get("segments"), knobs["clip_seconds"], knobs["clip_min_s"])
    return len(windows)


def _shard_groups(job: tuple[str, ShardInfo, str | None, int, int, Grouping]):
    """(group ranks, rows they stand for) of one shard, smallest ranks first, only as many
    groups as could fit under the cap (a group's count here is at most its total)."""
    uri, shard, endpoint, seed, limit, how = job
    columns = GROUP_COLUMNS if how.clip_knobs is not None else GROUP_COLUMNS[:2]
    table = DatasetVersion.open(uri, endpoint).read_shard(shard, columns=columns)
    ranks, weights = group_ranks(table, seed, how)
    return fitting_groups(ranks, weights, limit)


def fitting_groups(
    ranks: np.ndarray, weights: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows summed per group rank, ascending, cut after the groups whose running total fits
    ``limit``. Cutting partial sums is safe: a group's total is at least any part of it."""
    unique, inverse = np.unique(ranks, return_inverse=True)
    totals = np.bincount(inverse, weights=weights, minlength=len(unique)).astype(np.int64)
    fits = int(np.searchsorted(np.cumsum(totals), limit, side="right"))
    return unique[:fits], totals[:fits]


def group_threshold(
    version: DatasetVersion,
    limit: int,
    seed: int,
    how: Grouping,
    in_flight: int | None,
    show_progress: bool,
) -> Threshold:
    """Keep the groups ranked up to the last one whose running row count fits ``limit``
    (none at all when the first group alone is larger)."""
    jobs = [
        (version.uri, s, version.endpoint_url, seed, limit, how) for s in version.manifest.shards
    ]
    ranks, weights = np.empty(0, np.uint64), np.empty(0, np.int64)
    group = 2 * (in_flight or 8)
    for start in range(0, len(jobs), group):
        batch = jobs[start : start + group]
        parts = run_shards(
            _shard_groups, batch, max_in_flight=in_flight, show_progress=show_progress
        )
        ranks = np.concatenate([ranks, *(p[0] for p in parts)])
        weights = np.concatenate([weights, *(p[1] for p in parts)])
        ranks, weights = fitting_groups(ranks, weights, limit)
    if not len(ranks):
        return Threshold(0, at_rank={})  # nothing ranks below 0 and no row is listed
    return Threshold(int(ranks[-1]))


@dataclass
class Threshold:
    """Keep a row when its rank is below ``rank``, or equal to it and (when ``at_rank`` is
    given, i.e. a tie straddles the cut) its (shard, row) position is listed."""

    rank: int
    at_rank: dict[str, list[int]] | None = None


def _shard_ranks(job: tuple[str, ShardInfo, str | None, int, int]) -> np.ndarray:
    uri, shard, endpoint, seed, limit = job
    version = DatasetVersion.open(uri, endpoint)
    ranks = rank_ids(seed, version.read_shard(shard, columns=["id"]).column("id"))
    if len(ranks) > limit:
        ranks = np.partition(ranks, limit - 1)[:limit]
    return ranks


def _ties_at(job: tuple[str, ShardInfo, str | None, int, int]) -> list[tuple[str, str, int]]:
    """(id, shard, row) of every row of one shard ranked exactly ``value``."""
    uri, shard, endpoint, seed, value = job
    version = DatasetVersion.open(uri, endpoint)
    ids = version.read_shard(shard, columns=["id"]).column("id")
    hits = np.flatnonzero(rank_ids(seed, ids) == np.uint64(value))
    return [(ids[int(i)].as_py(), shard_name(shard), int(i)) for i in hits]


def threshold(
    version: DatasetVersion, limit: int, seed: int, in_flight: int | None, show_progress: bool
) -> Threshold:
    """The rank of the ``limit``-th lowest row, computed on the workers: keep every row
    ranked below it or at it (exactly ``limit`` rows unless several rows share that rank,
    which ``run_cap`` detects from the filter's counts and settles by id)."""
    shards = version.manifest.shards
    jobs = [(version.uri, s, version.endpoint_url, seed, limit) for s in shards]
    # The driver keeps only the best `limit` ranks seen so far, merging a group of shards'
    # winners at a time: memory O(limit + group x shard), not O(rows).
    best = np.empty(0, np.uint64)
    group = 2 * (in_flight or 8)  # shards whose winners are merged at once
    for start in range(0, len(jobs), group):
        parts = run_shards(
            _shard_ranks,
            jobs[start : start + group],
            max_in_flight=in_flight,
            show_progress=show_progress,
        )
        best = np.concatenate([best, *parts])
        if len(best) > limit:
            best = np.partition(best, limit - 1)[:limit]
    return Threshold(int(best.max()))


def settle_tie(
    version: DatasetVersion, seed: int, value: int, room: int, in_flight: int | None
) -> dict[str, list[int]]:
    """Which rows ranked exactly ``value`` fit in the ``room`` left below the cap: the first
    by (id, shard, row), so the choice is deterministic even for repeated ids. Only needed
    when a tie straddles the cut, which 64-bit ranks practically never produce."""
    jobs = [(version.uri, s, version.endpoint_url, seed, value) for s in version.manifest.shards]
    found = run_shards(_ties_at, jobs, max_in_flight=in_flight, show_progress=False)
    chosen: dict[str, list[int]] = {}
    for _, shard, row in sorted(t for ties in found for t in ties)[:room]:
        chosen.setdefault(shard, []).append(row)
    return chosen


@dataclass
class _FilterJob:
    uri: str
    shard: ShardInfo
    endpoint_url: str | None
    staging_uri: str
    seed: int
    rule: Threshold | None  # None: keep every row (a byte copy)
    grouped: Grouping | None = None  # rank rows by their group (see ``grouping``)


def _filter_shard(job: _FilterJob) -> tuple[str, ShardInfo, int, int, int]:
    """(name, written shard, rows in, rows dropped, rows kept at the threshold rank); rows
    stay Arrow throughout."""
    name = shard_name(job.shard)
    if job.rule is None:
        fs, src = filesystem(join(job.uri, job.shard.path), job.endpoint_url)
        _, dst = filesystem(join(job.staging_uri, job.shard.path), job.endpoint_url)
        fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        fs.copy(src, dst)
        return name, job.shard, job.shard.rows, 0, 0, 0
    table = DatasetVersion.open(job.uri, job.endpoint_url).read_shard(job.shard)
    if job.grouped is not None:
        ranks = group_ranks(table.select(["id", "group_id"]), job.seed, Grouping())[0]
    else:
        ranks = rank_ids(job.seed, table.column("id"))
    at = ranks == np.uint64(job.rule.rank)
    if job.rule.at_rank is not None:  # a tie straddles the cut: only the listed rows
        listed = np.zeros(len(at), dtype=bool)
        listed[job.rule.at_rank.get(name, [])] = True
        at &= listed
    kept = table.filter(pa.array((ranks < np.uint64(job.rule.rank)) | at))
    dangling = dangling_references(kept)
    if job.grouped is not None and dangling:
        raise RuntimeError(
            f"cap of {job.uri} shard {name}: {dangling} sibling references point at dropped "
            "rows though whole groups were kept (a group split across shards?)"
        )
    info = put_table(job.staging_uri, job.shard.path, kept, job.endpoint_url)
    return name, info, table.num_rows, table.num_rows - kept.num_rows, int(at.sum()), dangling


def dangling_references(table: pa.Table) -> int:
    """Negatives that refer to a row (``ref``: a sibling in the same shard) not in ``table``."""
    ids = set(table.column("id").to_pylist())
    return sum(
        1
        for negatives in table.column("negatives").to_pylist()
        for negative in negatives or []
        if negative.get("ref") and negative["ref"] not in ids
    )


def run_cap(
    cfg: PipelineConfig,
    version: DatasetVersion,
    limit: int | None = None,
    show_progress: bool = True,
) -> DatasetVersion:
    """Cap ``version`` to ``limit`` rows (default: ``cap_limit`` of its dataset)."""
    dataset = version.manifest.dataset
    limit = limit if limit is not None else cap_limit(cfg, dataset)
    section = {"limit": limit, "seed": cfg.prep.seed}
    plan = plan_step(cfg, STEP, dataset, CODE_VERSION, digest_of(section), [version.ref()])
    if (done := committed(plan, cfg)) is not None:
        return done
    in_flight = cfg.prep.max_in_flight
    how = grouping(cfg, version)
    rule = None
    if how is not None and limit is not None and (how.clip_knobs or version.rows > limit):
        rule = group_threshold(version, limit, cfg.prep.seed, how, in_flight, show_progress)
    elif limit is not None and version.rows > limit:
        rule = threshold(version, limit, cfg.prep.seed, in_flight, show_progress)
    writer = VersionWriter(plan.uri, RECORD_SCHEMA, cfg.storage.endpoint_url)
    jobs = [
        _FilterJob(
            version.uri, s, version.endpoint_url, writer.staging_uri, cfg.prep.seed, rule, how
        )
        for s in version.manifest.shards
    ]
    results = run_shards(_filter_shard, jobs, max_in_flight=in_flight, show_progress=show_progress)
    kept = sum(r[2] - r[3] for r in results)
    if (
        how is None and rule is not None and kept > limit
    ):  # rows tied at the threshold rank: settle them
        below = kept - sum(r[4] for r in results)
        chosen = settle_tie(version, cfg.prep.seed, rule.rank, limit - below, in_flight)
        rule = Threshold(rule.rank, chosen)
        redo = [j for j, r in zip(jobs, results, strict=True) if r[4]]
        for job in redo:
            job.rule = rule
        again = {
            r[0]: r
            for r in run_shards(_filter_shard, redo, max_in_flight=in_flight, show_progress=False)
        }
        results = [again.get(r[0], r) for r in results]
    stats: dict[str, Any] = {
        "cap_limit": limit,
        "seed": cfg.prep.seed,
        "rows_in": 0,
        "dropped_by_cap": 0,
        "dangling_references": 0,
        "media_root": media_root_of(version),
    }
    if how is not None:
        stats["capped_by"] = "clips of whole videos" if how.clip_knobs else "whole groups"
    for name, info, rows_in, dropped, _, dangling in results:
        writer.add_shard_info(name, info)
        stats["rows_in"] += rows_in
        stats["dropped_by_cap"] += dropped
        stats["dangling_references"] += dangling
    if "group_semantics" in version.manifest.stats:  # clips stay each other's negatives
        stats["group_semantics"] = version.manifest.stats["group_semantics"]
    return writer.commit(
        dataset=plan.dataset,
        step=plan.step,
        config_digest=plan.config_digest,
        code_version=plan.code_version,
        inputs=plan.inputs,
        stats=stats,
    )
