"""Merge classification: several classification datasets become one.

A classification dataset with few classes fills a single-dataset batch with false
negatives (many queries share a label). The recipe merges all classification sets into one
dataset with a unified label-text space: label texts are normalised (Unicode NFKC, case
folded, whitespace collapsed), every row's positive becomes the canonical spelling of its
label (the first spelling met, in input order), and rows with the same normalised label
share ``group_id = "label:<normalised>"`` so the loss never treats them as each other's
negatives. Ids are prefixed with the source dataset so they stay unique, and media URIs
are rewritten relative to the common folder of the sources' media roots.
"""

from __future__ import annotations

import posixpath
import unicodedata
from typing import Any

from rzenembed.config import PipelineConfig, digest_of
from rzenembed.data.version import DatasetVersion
from rzenembed.prep.base import (
    ShardJob,
    committed,
    execute,
    media_root_of,
    plan_step,
    reject,
    version_shard_loader,
)

STEP = "merge-classification"
CODE_VERSION = "1"
TASK_GROUP = "image_classification"


def normalise_label(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def common_root(roots: list[str]) -> str:
    """The deepest folder containing every root (all on one store)."""
    schemes = {r.partition("://")[0] if "://" in r else "" for r in roots}
    if len(schemes) != 1:
        raise ValueError(f"classification sources live on different stores: {roots}")
    scheme = schemes.pop()
    paths = [r.partition("://")[2] if scheme else r for r in roots]
    common = posixpath.commonpath(paths) if len(paths) > 1 else paths[0]
    if paths[0].startswith("/") and not common.startswith("/"):
        common = "/" + common
    return f"{scheme}://{common}" if scheme else common


def _label_of(row: dict[str, Any]) -> str:
    return row.get("label") or row["positive"].get("text") or ""


def canonical_labels(versions: list[DatasetVersion]) -> dict[str, str]:
    """normalised label -> first spelling met, reading only the label columns."""
    spelling: dict[str, str] = {}
    for version in versions:
        for table in version.iter_tables(columns=["label", "positive"]):
            for row in table.to_pylist():
                text = _label_of(row)
                if text.strip():
                    spelling.setdefault(normalise_label(text), text.strip())
    return spelling


def run_merge_classification(
    cfg: PipelineConfig, versions: list[DatasetVersion], show_progress: bool = True
) -> DatasetVersion:
    """Merge classification ``versions`` into ``prep.classification_dataset``."""
    if not versions:
        raise ValueError("merge classification needs at least one input version")
    versions = sorted(versions, key=lambda v: v.manifest.dataset)
    name = cfg.prep.classification_dataset
    inputs = [v.ref() for v in versions]
    plan = plan_step(cfg, STEP, name, CODE_VERSION, digest_of({"name": name}), inputs)
    if (done := committed(plan, cfg)) is not None:
        return done
    roots = [media_root_of(v) for v in versions]
    root = common_root(roots)
    labels = canonical_labels(versions)

    def jobs(staging: str) -> list[ShardJob]:
        out = []
        for version, source_root in zip(versions, roots, strict=True):
            prefix = posixpath.relpath(
                source_root.partition("://")[2] or source_root, root.partition("://")[2] or root
            )
            for shard in version.manifest.shards:
                stem = shard.path.rsplit("/", 1)[-1].removesuffix(".parquet")
                params = {"merged": name, "labels": labels, "media_prefix": prefix}
                out.append(
                    ShardJob(
                        f"{version.manifest.dataset}-{stem}",
                        staging,
                        STEP,
                        merge_rows,
                        version_shard_loader(version, shard),
                        params,
                        cfg.storage.endpoint_url,
                    )
                )
        return out

    return execute(plan, cfg, jobs, media_root=root, show_progress=show_progress)


def _rebase(side: dict[str, Any], prefix: str, source: str = "") -> dict[str, Any]:
    media = [
        {**m, "uri": posixpath.normpath(posixpath.join(prefix, m["uri"]))}
        for m in side.get("media") or []
    ]
    out = {**side, "media": media}
    if side.get("ref"):  # a reference names a row of the same source: its id is renamed too
        out["ref"] = f"{source}/{side['ref']}"
    return out


def merge_rows(
    rows: list[dict], shard: str, *, merged: str, labels: dict[str, str], media_prefix: str
):
    kept, rejected, per_source = [], [], {}
    for position, row in enumerate(rows):
        text = _label_of(row)
        if not text.strip():
            rejected.append(reject(STEP, row, "schema_invalid", "no label text", shard, position))
            continue
        key = normalise_label(text)
        source = row["dataset"]
        per_source[f"source_rows/{source}"] = per_source.get(f"source_rows/{source}", 0) + 1
        kept.append(
            {
                **row,
                "id": f"{source}/{row['id']}",
                "dataset": merged,
                "task_group": TASK_GROUP,
                "query": _rebase(row["query"], media_prefix),
                "positive": {**_rebase(row["positive"], media_prefix), "text": labels[key]},
                "negatives": [_rebase(n, media_prefix, source) for n in row.get("negatives") or []],
                "label": labels[key],
                "group_id": f"label:{key}",
            }
        )
    return kept, rejected, per_source
