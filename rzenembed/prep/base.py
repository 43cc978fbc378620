"""What every data-preparation step shares: reason codes, rejects, sharded execution.

A step reads one or more committed versions and writes a new one. Per-shard work runs as
Ray tasks (``run_shards``) that write their output shards straight into the new version's
staging area; the driver only collects shard infos, reject counts and stats, then commits.

The output location is derived from the step, its code version, its config section and
the input digests (``version_id``), so a finished step is found again instead of redone.

A step is resumable shard by shard (``execute``): each finished shard task leaves a record
beside its output in the version's staging area, and a rerun of the same version (a Prefect
retry, a restarted job) runs only the shards without one. A shard whose task raises does not
stop the others: they finish and are kept. The step then fails naming the failed shards, or,
when their rows are within ``prep.shard_error_budget`` (a fraction of the step's input
rows), their rows become rejects (``shard_failed``, the error as the detail) and the
version is committed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from rzenembed.config import PipelineConfig
from rzenembed.data.engine import Failed, run_shards
from rzenembed.data.media_fetch import fetch_whole
from rzenembed.data.schema import RECORD_SCHEMA, REJECT_SCHEMA
from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import (
    DatasetVersion,
    InputRef,
    ShardInfo,
    VersionNotFoundError,
    VersionWriter,
    put_table,
    version_id,
    write_atomically,
)

# Every reason a row can be rejected for; docs/data.md lists the same table.
REASON_CODES: dict[str, str] = {
    "schema_invalid": "a field is missing or has the wrong type",
    "text_empty": "the query (or positive) has neither text, instruction nor media",
    "text_too_long": "a text exceeds prep.max_text_chars characters",
    "uri_escapes_root": "a media URI points outside the dataset root",
    "media_missing": "a referenced media file does not exist",
    "media_undecodable": "a media file is corrupt, truncated or not an image/video",
    "image_too_large": "an image header declares more than prep.max_image_pixels pixels",
    "image_too_small": "an image's shorter side is under prep.min_image_side pixels",
    "image_blurry": "the variance of the Laplacian is under prep.blur_threshold",
    "video_truncated": "a video's last frames cannot be decoded",
    "duplicate_exact": "the same example as an earlier kept row: query and positive texts "
    "(normalised) and media bytes",
    "duplicate_near": "under dedup example: the same texts and every query/positive image "
    "within prep.phash_radius bits (pHash) of an earlier kept row's; under dedup image: a "
    "query/positive image within the radius of an earlier kept row's",
    "eval_overlap": "the row copies an item of an evaluation set (an image within "
    "prep.phash_radius bits, or the same query text)",
    "video_too_short": "a video is shorter than the step's minimum length",
    "video_too_long": "a video is longer than the step's maximum length",
    "no_video": "the row has no video to split or package",
    "download_failed": "the crawler's status for the sample is not success (WebDataset)",
    "no_positive": "the source row has no usable positive (format importers)",
    "list_unparsable": "a stringified list (mmE5's neg_* columns) does not parse",
    "caption_empty": "the recaption model produced no text (the original row is kept)",
    "caption_too_long": "a generated caption exceeds prep.recaption.max_chars",
    "caption_repetitive": "too many repeated word 3-grams in a generated caption",
    "shard_failed": "the step's task raised on the row's shard (the error is the detail); "
    "only within prep.shard_error_budget, else the step fails",
}


def reject(
    step: str,
    row: dict[str, Any],
    reason: str,
    detail: str = "",
    shard: str = "",
    index: int | None = None,
) -> dict[str, Any]:
    """A reject row: the reason, a human detail, and the row itself (without raw bytes)."""
    if reason not in REASON_CODES:
        raise KeyError(f"unknown reason code {reason!r}")
    return {
        "id": _str_or_none(row.get("id")),
        "dataset": _str_or_none(row.get("dataset")),
        "step": step,
        "reason": reason,
        "detail": detail,
        "source_shard": shard,
        "source_row": index,
        "row_json": json.dumps(row, default=_json_default, sort_keys=True),
    }


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


@dataclass
class ShardResult:
    """What a per-shard task hands back to the driver (small: no rows)."""

    name: str
    rows_in: int
    data: ShardInfo
    rejects: ShardInfo | None
    reject_counts: dict[str, int]
    stats: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardResult:
        raw = json.loads(text)
        raw["data"] = ShardInfo(**raw["data"])
        raw["rejects"] = ShardInfo(**raw["rejects"]) if raw["rejects"] else None
        return cls(**raw)


@dataclass
class ShardJob:
    """Everything a Ray task needs to process one shard, all picklable."""

    name: str
    staging_uri: str
    step: str
    fn: Callable[..., tuple[list[dict], list[dict], dict[str, int]]]
    load: Callable[[], list[dict]]
    params: dict[str, Any]
    endpoint_url: str | None = None
    schema: pa.Schema = RECORD_SCHEMA


DONE_DIR = "done"  # in a resumable staging area: one record per finished shard


def run_shard_job(job: ShardJob) -> ShardResult:
    """Load a shard's rows, apply the step's function, write output and rejects to staging,
    then the shard's done record (last: a record always names complete outputs)."""
    result = _process_shard(job)
    fs, folder = filesystem(job.staging_uri, job.endpoint_url)
    fs.makedirs(join(folder, DONE_DIR), exist_ok=True)
    write_atomically(fs, join(folder, DONE_DIR, f"{job.name}.json"), result.to_json())
    return result


def _process_shard(job: ShardJob) -> ShardResult:
    rows = job.load()
    kept, rejected, stats = job.fn(rows, job.name, **job.params)
    dropped, added = stats.get("dropped_by_cap", 0), stats.get("rows_added", 0)
    if len(kept) + len(rejected) + dropped != len(rows) + added:
        raise AssertionError(
            f"{job.step} shard {job.name}: {len(rows)} rows in + {added} added != "
            f"{len(kept)} out + {len(rejected)} rejected + {dropped} dropped: rows were lost"
        )
    data = put_table(
        job.staging_uri,
        f"data/{job.name}.parquet",
        pa.Table.from_pylist(kept, schema=job.schema),
        job.endpoint_url,
    )
    reject_info = None
    if rejected:
        table = pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA)
        reject_info = put_table(
            job.staging_uri, f"rejects/{job.name}.parquet", table, job.endpoint_url
        )
    counts = dict(Counter(r["reason"] for r in rejected))
    return ShardResult(job.name, len(rows), data, reject_info, counts, stats)


@dataclass
class StepPlan:
    """Identity and location of a step's output version."""

    step: str
    dataset: str
    uri: str
    config_digest: str
    code_version: str
    inputs: list[InputRef]


def plan_step(
    cfg: PipelineConfig,
    step: str,
    dataset: str,
    code_version: str,
    config_digest: str,
    inputs: list[InputRef],
) -> StepPlan:
    vid = version_id(step, code_version, config_digest, inputs)
    uri = join(cfg.storage.root, dataset, step, vid)
    return StepPlan(step, dataset, uri, config_digest, code_version, inputs)


def committed(plan: StepPlan, cfg: PipelineConfig) -> DatasetVersion | None:
    """The step's output if it was already committed (a cache hit), else None."""
    try:
        return DatasetVersion.open(plan.uri, cfg.storage.endpoint_url)
    except VersionNotFoundError:
        return None


def execute(
    plan: StepPlan,
    cfg: PipelineConfig,
    jobs_for: Callable[[str], list[ShardJob]],
    stats: dict[str, Any] | None = None,
    media_root: str | None = None,
    show_progress: bool = True,
    writer: VersionWriter | None = None,
    side_folders: tuple[str, ...] = (),
) -> DatasetVersion:
    """Run the shard jobs on Ray, then commit the version with summed counts and stats
    (into ``writer``'s staging area when a step already opened one for scratch work);
    ``side_folders``: staged folders of per-shard side tables the shard jobs wrote,
    committed with the shards (``VersionWriter.commit``)."""
    endpoint = cfg.storage.endpoint_url
    writer = writer or VersionWriter(plan.uri, RECORD_SCHEMA, endpoint, resume=True)
    jobs = jobs_for(writer.staging_uri)
    finished = finished_shards(writer.staging_uri, {j.name for j in jobs}, endpoint)
    pending = [j for j in jobs if j.name not in finished]
    outcomes = run_shards(
        run_shard_job,
        pending,
        max_in_flight=cfg.prep.max_in_flight,
        show_progress=show_progress,
        errors="return",
    )
    failed = [(j, o.error) for j, o in zip(pending, outcomes, strict=True) if isinstance(o, Failed)]
    results = [*finished.values(), *(o for o in outcomes if not isinstance(o, Failed))]
    if failed:
        results += reject_failed_shards(plan, cfg, failed, results, show_progress)
    totals: Counter[str] = Counter()
    for result in sorted(results, key=lambda r: r.name):
        writer.add_shard_info(result.name, result.data, result.rejects, result.reject_counts)
        totals.update(result.stats)
        totals["rows_in"] += result.rows_in
    if finished:
        totals["shards_reused"] = len(finished)
    if failed:
        totals["shards_failed"] = len(failed)
    merged = {**dict(totals), **(stats or {})}
    if media_root is not None:
        merged["media_root"] = media_root
    return writer.commit(
        dataset=plan.dataset,
        step=plan.step,
        config_digest=plan.config_digest,
        code_version=plan.code_version,
        inputs=plan.inputs,
        stats=merged,
        side_folders=side_folders,
    )


def finished_shards(
    staging_uri: str, names: set[str], endpoint_url: str | None
) -> dict[str, ShardResult]:
    """The done records an earlier run of this version left, by shard name, whose outputs
    are all still staged (a commit interrupted while moving shards leaves records without
    them). One listing of the staging area, the records read in one concurrent batch."""
    fs, folder = filesystem(staging_uri, endpoint_url)
    try:
        staged = {p[len(folder.rstrip("/")) + 1 :] for p in fs.find(folder)}
    except FileNotFoundError:
        return {}
    records = [
        p
        for p in sorted(staged)
        if p.startswith(f"{DONE_DIR}/") and p[len(DONE_DIR) + 1 :].removesuffix(".json") in names
    ]
    texts = fetch_whole([join(staging_uri, p) for p in records], endpoint_url)
    for text in texts:
        if isinstance(text, BaseException):
            raise text
    results = [ShardResult.from_json(text.decode()) for text in texts]
    return {
        r.name: r
        for r in results
        if r.data.path in staged and (r.rejects is None or r.rejects.path in staged)
    }


class ShardsFailed(RuntimeError):
    """Shard tasks of a step raised, beyond its error budget; the finished shards are kept
    for a rerun, which redoes only these."""


def reject_failed_shards(
    plan: StepPlan,
    cfg: PipelineConfig,
    failed: list[tuple[ShardJob, BaseException]],
    results: list[ShardResult],
    show_progress: bool,
) -> list[ShardResult]:
    """The rows of failed shards as ``shard_failed`` rejects, when they fit the error budget
    (a fraction of the step's input rows); else ``ShardsFailed`` naming them. These results
    leave no done record: a rerun tries the shards again."""
    budget = cfg.prep.shard_error_budget
    names = ", ".join(job.name for job, _ in failed[:5]) + (" ..." if len(failed) > 5 else "")
    first = failed[0][1]
    summary = (
        f"{plan.step} of {plan.dataset}: {len(failed)} of {len(failed) + len(results)} shard "
        f"tasks raised ({names}); first error: {type(first).__name__}: {first}"
    )
    if budget <= 0:
        raise ShardsFailed(
            f"{summary}. The {len(results)} finished shards are kept: a rerun redoes only "
            "the failed ones (prep.shard_error_budget lets a fraction of rows be rejected "
            "instead)"
        ) from first
    jobs = [_RejectJob(job, f"{type(error).__name__}: {error}"[:2000]) for job, error in failed]
    rejected = run_shards(
        _reject_shard, jobs, max_in_flight=cfg.prep.max_in_flight, show_progress=show_progress
    )
    bad = sum(r.rows_in for r in rejected)
    total = bad + sum(r.rows_in for r in results)
    if bad > budget * total:
        raise ShardsFailed(
            f"{summary}. Their {bad} rows are {bad / max(total, 1):.1%} of {total}, over "
            f"prep.shard_error_budget ({budget:.1%}); the finished shards are kept for a rerun"
        ) from first
    return rejected


@dataclass
class _RejectJob:
    job: ShardJob
    detail: str


def _reject_shard(item: _RejectJob) -> ShardResult:
    """Every row of a failed shard as a ``shard_failed`` reject, an empty data shard."""
    job = item.job
    rows = job.load()
    rejected = [
        reject(job.step, row, "shard_failed", item.detail, job.name, i)
        for i, row in enumerate(rows)
    ]
    data = put_table(
        job.staging_uri, f"data/{job.name}.parquet", job.schema.empty_table(), job.endpoint_url
    )
    table = pa.Table.from_pylist(rejected, schema=REJECT_SCHEMA)
    info = put_table(job.staging_uri, f"rejects/{job.name}.parquet", table, job.endpoint_url)
    return ShardResult(job.name, len(rows), data, info, {"shard_failed": len(rows)}, {})


def shard_name(shard: ShardInfo) -> str:
    """``part-00003`` for ``data/part-00003.parquet``: output shards keep input names."""
    return shard.path.rsplit("/", 1)[-1].removesuffix(".parquet")


def per_shard_jobs(
    version: DatasetVersion,
    staging: str,
    step: str,
    fn: Callable[..., tuple[list[dict], list[dict], dict[str, int]]],
    params: dict[str, Any] | Callable[[int], dict[str, Any]],
    endpoint_url: str | None,
    rows_per_job: int | None = None,
) -> list[ShardJob]:
    """One job per shard of ``version`` (``params`` may depend on the shard's position),
    or, with ``rows_per_job``, one per slice of that many rows of each shard, writing
    ``<shard>-000``, ``<shard>-001``...: for steps whose output rows are much larger than
    their input (video clips with their frames), so output shards and the memory of one
    task stay bounded."""
    jobs = []
    for i, shard in enumerate(version.manifest.shards):
        step_rows = rows_per_job or max(shard.rows, 1)
        slices = range(0, max(shard.rows, 1), step_rows)
        for k, start in enumerate(slices):
            name = shard_name(shard) if rows_per_job is None else f"{shard_name(shard)}-{k:03d}"
            jobs.append(
                ShardJob(
                    name,
                    staging,
                    step,
                    fn,
                    version_shard_loader(version, shard, start, step_rows),
                    params(i) if callable(params) else params,
                    endpoint_url,
                )
            )
    return jobs


def version_shard_loader(
    version: DatasetVersion, shard: ShardInfo, start: int = 0, count: int | None = None
) -> Callable[[], list[dict]]:
    """A picklable loader of one shard of ``version`` (or rows ``[start, start + count)``
    of it) as Python rows."""
    return _ShardLoader(version.uri, shard, version.endpoint_url, start, count)


@dataclass
class _ShardLoader:
    uri: str
    shard: ShardInfo
    endpoint_url: str | None
    start: int = 0
    count: int | None = None

    def __call__(self) -> list[dict]:
        version = DatasetVersion.open(self.uri, self.endpoint_url)
        table = version.read_shard(self.shard)
        if self.start or self.count is not None:
            table = table.slice(self.start, self.count)
        return table.to_pylist()


def media_root_of(version: DatasetVersion) -> str:
    root = version.manifest.stats.get("media_root")
    if not root:
        raise ValueError(f"{version.uri}: manifest names no media_root")
    return str(root)
