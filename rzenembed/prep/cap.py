"""Cap: keep at most N rows of a dataset, chosen by a seeded hash ranking.

Taking the first N rows would bias toward whatever order the source was written in.
Instead every row gets the rank ``blake2b(seed, id)`` and the N smallest ranks are kept:
the same input and seed always select the same rows, another seed selects others, and a
row's fate does not depend on its position.

Memory is O(N), not O(input): the driver streams only the id column, shard by shard,
keeping the N best ranks in a bounded max-heap; then Ray tasks filter each shard against
the selected ids. Dropped rows are not copied into rejects (the input version keeps them);
they are counted in the manifest as ``dropped_by_cap``.
"""

from __future__ import annotations

import hashlib
import heapq

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data.version import DatasetVersion
from rzenembed.prep.base import (
    ShardJob,
    committed,
    execute,
    media_root_of,
    per_shard_jobs,
    plan_step,
)

STEP = "cap"
CODE_VERSION = "1"


def rank(seed: int, row_id: str) -> int:
    """A 64-bit pseudo-random rank of ``row_id`` under ``seed``."""
    digest = hashlib.blake2b(row_id.encode(), digest_size=8, key=str(seed).encode())
    return int.from_bytes(digest.digest(), "big")


def select_ids(version: DatasetVersion, limit: int, seed: int) -> set[str]:
    """The ids of the ``limit`` lowest-ranked rows, reading only the id column."""
    heap: list[tuple[int, str]] = []  # max-heap of the best ranks via negation
    for table in version.iter_tables(columns=["id"]):
        for row_id in table.column("id").to_pylist():
            item = (-rank(seed, row_id), row_id)
            if len(heap) < limit:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
    return {row_id for _, row_id in heap}


def cap_limit(cfg: PipelineConfig, dataset: str) -> int:
    for source in cfg.sources:
        if source.name == dataset and source.cap is not None:
            return source.cap
    return cfg.prep.cap_per_dataset


def run_cap(
    cfg: PipelineConfig,
    version: DatasetVersion,
    limit: int | None = None,
    show_progress: bool = True,
) -> DatasetVersion:
    """Cap ``version`` to ``limit`` rows (default: the source's cap or prep.cap_per_dataset)."""
    dataset = version.manifest.dataset
    limit = limit or cap_limit(cfg, dataset)
    section = {"limit": limit, "seed": cfg.prep.seed}
    plan = plan_step(cfg, STEP, dataset, CODE_VERSION, digest_of(section), [version.ref()])
    if (done := committed(plan, cfg)) is not None:
        return done
    keep = select_ids(version, limit, cfg.prep.seed) if version.rows > limit else None

    def jobs(staging: str) -> list[ShardJob]:
        return per_shard_jobs(
            version, staging, STEP, keep_selected, {"keep": keep}, cfg.storage.endpoint_url
        )

    stats = {"cap_limit": limit, "seed": cfg.prep.seed}
    return execute(
        plan, cfg, jobs, stats=stats, media_root=media_root_of(version), show_progress=show_progress
    )


def keep_selected(rows: list[dict], shard: str, *, keep: set[str] | None):
    """Rows whose id was selected; the rest are counted as dropped, not rejected."""
    if keep is None:
        return rows, [], {"dropped_by_cap": 0}
    kept = [row for row in rows if row["id"] in keep]
    return kept, [], {"dropped_by_cap": len(rows) - len(kept)}
