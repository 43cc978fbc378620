"""int8/uint8 ranges for a model, calibrated on a sample of the data it was trained on.

Quantised codes map each component's range onto 256 levels (``rzenembed.compact``); the
range must come from data the model will embed, and not from the evaluation sets (their
scores would then measure codes fitted to them). A souped model's card names the stage
manifests its adapters trained on (``soup.adapters[].stage_manifest``), an adapter's its
own; a seeded draw of ``eval.calibration_rows`` rows across their datasets (each dataset
in proportion to its rows, at least one row, from a few of its shards) is embedded,
queries and positives both, and the per-component minimum and maximum of every nested
prefix are the ranges. They are written beside the weights as ``quantization.json``
(outside the model's content digest: the float vectors do not depend on them) and recorded
with the registered version.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rzenembed.compact import CALIBRATION_FILE, Calibration, calibrate, read_calibration
from rzenembed.config import PipelineConfig, embedding_settings
from rzenembed.data.folders import write_bytes
from rzenembed.data.storage import join
from rzenembed.data.version import DatasetVersion
from rzenembed.evaluation.runner import Encoder, side_encoder
from rzenembed.prep.base import media_root_of
from rzenembed.prep.mixture import StageManifest


def training_manifests(extra: Mapping[str, Any]) -> list[str]:
    """The stage manifests a model card says the model was trained on: its souped
    adapters' (those kept) or, for an adapter or a merged model, its own."""
    soup = extra.get("soup")
    if soup:
        found = [a.get("stage_manifest") for a in soup.get("adapters", []) if a.get("kept")]
    else:
        found = [extra.get("stage_manifest")]
    return sorted({uri for uri in found if uri})


def _quotas(sizes: Sequence[int], total: int) -> list[int]:
    """``total`` rows shared in proportion to ``sizes``, at least one per non-empty set and
    never more than a set has."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    return [min(n, max(1, round(total * n / whole))) if n else 0 for n in sizes]


SHARD_ROWS_DRAWN = 32  # rows drawn per shard read, at most: a few shards per dataset
READS_AT_ONCE = 16  # shard reads in flight (object-store latency, not bandwidth, bounds it)


def _drawn(version: DatasetVersion, quota: int, rng: np.random.Generator) -> dict[int, list[int]]:
    """Shard index -> row offsets in it: ``quota`` rows drawn without replacement from
    ``ceil(quota / SHARD_ROWS_DRAWN)`` shards chosen at random (never one read per row: on
    an object store a row spread over a 5M-row version would be a GET each)."""
    shards = [i for i, shard in enumerate(version.manifest.shards) if shard.rows]
    chosen = rng.permutation(shards)[: max(1, -(-quota // SHARD_ROWS_DRAWN))]
    pool = [(int(i), r) for i in sorted(chosen) for r in range(version.manifest.shards[i].rows)]
    picks = rng.choice(len(pool), size=min(quota, len(pool)), replace=False)
    out: dict[int, list[int]] = {}
    for k in sorted(picks):
        shard, row = pool[k]
        out.setdefault(shard, []).append(row)
    return out


def calibration_sides(
    manifests: Sequence[str], rows: int, seed: int, endpoint_url: str | None = None
) -> list[tuple[str, list[dict[str, Any]]]]:
    """(media root, sides) per dataset version: the query and positive of ``rows`` rows
    drawn (seeded, without replacement) across every dataset the manifests name, each in
    proportion to its rows. Only a few shards per dataset are read, only those two
    columns, ``READS_AT_ONCE`` at a time."""
    versions: dict[str, int] = {}
    for uri in manifests:
        for dataset in StageManifest.load(uri, endpoint_url).datasets:
            versions.setdefault(dataset.uri, dataset.rows)
    order = sorted(versions)
    rng = np.random.default_rng(seed)
    plans = []
    for uri, quota in zip(order, _quotas([versions[u] for u in order], rows), strict=True):
        if quota:
            version = DatasetVersion.open(uri, endpoint_url)
            plans.append((version, _drawn(version, quota, rng)))

    def read(job: tuple[DatasetVersion, int, list[int]]) -> list[dict[str, Any]]:
        version, index, offsets = job
        table = version.read_shard(version.manifest.shards[index], ["query", "positive"])
        picked = table.take(offsets).to_pylist()
        return [side for row in picked for side in (row["query"], row["positive"])]

    jobs = [(v, i, offsets) for v, drawn in plans for i, offsets in drawn.items()]
    with ThreadPoolExecutor(READS_AT_ONCE) as pool:
        parts = iter(list(pool.map(read, jobs)))
    out = []
    for version, drawn in plans:
        sides = [side for _ in drawn for side in next(parts)]
        out.append((media_root_of(version), sides))
    return out


def calibration_source(cfg: PipelineConfig, manifests: Sequence[str], model_digest: str) -> dict:
    """What a calibration depends on (kept in the file: a rerun reuses a matching one)."""
    return {
        "model_digest": model_digest,
        "stage_manifests": list(manifests),
        "rows": cfg.eval.calibration_rows,
        "seed": cfg.seed,
        "settings": embedding_settings(cfg.model),
    }


def calibrate_model(
    cfg: PipelineConfig,
    encoder: Encoder,
    model_uri: str,
    model_digest: str,
    extra: Mapping[str, Any],
    dims: Sequence[int],
) -> Calibration | None:
    """The model's calibration at ``dims`` (and its full size): the one stored in its
    folder when it was made from the same sample, else computed with ``encoder`` and
    written there. None when calibration is off (``eval.calibration_rows: 0``) or the card
    names no training data (int8/uint8 are then neither scored nor served)."""
    endpoint = cfg.storage.endpoint_url
    manifests = training_manifests(extra)
    if cfg.eval.calibration_rows == 0 or not manifests:
        return None
    source = calibration_source(cfg, manifests, model_digest)
    stored = read_calibration(model_uri, endpoint)
    if stored is not None and stored.source == source and set(dims) <= set(stored.dimensions):
        return stored
    target = side_encoder(encoder, endpoint)
    sample = calibration_sides(manifests, cfg.eval.calibration_rows, cfg.seed, endpoint)
    frames, batch = cfg.model.video_frames, cfg.eval.batch_size
    parts = [target.encode_sides(sides, root, frames, batch).numpy() for root, sides in sample]
    vectors = np.concatenate(parts).astype(np.float32)
    calibration = calibrate(vectors, dims, source)
    write_bytes(join(model_uri, CALIBRATION_FILE), calibration.dumps().encode(), endpoint)
    return calibration
