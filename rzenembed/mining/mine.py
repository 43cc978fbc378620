"""The ``mine`` step: one dataset version in, the same rows with mined negatives out.

Identity: a version per (input version, model digest, mining config, seed), cached like
every step (``rzenembed.prep.base.plan_step``); its manifest names the model that mined
it (``stats.mined_by``) and carries the report's figures.

Work, for one dataset:

1. *embed* every row's query and positive with the stage-1 model, shard by shard (only
   one shard's rows in memory); each shard's vectors are stored on the storage root under
   (model digest, dataset content digest) as it finishes: an interrupted pass resumes at
   the next shard, and mining again under other rules costs no pass;
2. *search* each query's ``top_k`` nearest positives (``search.top_k``);
3. *choose* by the rules (``rules.select_negatives``);
4. *write* each input shard again with its rows' mined negatives appended as references
   (``rzenembed.data.schema.mined_reference``: the chosen row's id, resolved by the training
   reader across the version's shards; no media copied), and the report beside them.

The pool is the dataset's own positives (a row's positive is the candidate the benchmark
would rank for a query of its kind).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from rzenembed.config import PipelineConfig, digest_of, embedding_settings
from rzenembed.data.folders import exists, read_bytes, write_bytes
from rzenembed.data.schema import RECORD_SCHEMA, mined_reference
from rzenembed.data.storage import join
from rzenembed.data.version import DatasetVersion, VersionWriter
from rzenembed.evaluation.runner import Encoder, side_encoder
from rzenembed.mining.report import REPORT_FILES, build_report, write_report_files
from rzenembed.mining.rules import Selection, query_seed, select_negatives
from rzenembed.mining.search import top_k
from rzenembed.prep.base import committed, media_root_of, plan_step, shard_name
from rzenembed.training.collate import item_key

STEP = "mine"
CODE_VERSION = "1"
EMBEDDINGS = "_mining"  # under the storage root: <model>/<dataset content>-<settings>/*.npz
JUDGE_CHUNK = 2048  # (query, negative) pairs whose rows are fetched and judged at once


@dataclass
class Mined:
    """A mined version and its report (``reused``: found committed, nothing ran)."""

    version: DatasetVersion
    report: dict[str, Any]
    reused: bool


@dataclass
class _Rows:
    """What mining keeps of every row: light, so a dataset of 100k rows is a few MB."""

    ids: list[str]
    groups: list[str | None]
    items: list[str]
    texts: list[str]


def mining_digest(cfg: PipelineConfig, model_digest: str) -> str:
    judge = cfg.mining.judge
    return digest_of(
        {
            "mining": cfg.mining,
            "model": model_digest,
            "seed": cfg.seed,
            "settings": embedding_settings(cfg.model),
            # The judge's model when it falls back to the recaption model.
            "judge_model": (judge.model or cfg.prep.recaption.model) if judge.enabled else None,
        }
    )


def _embeddings_uri(cfg: PipelineConfig, model_digest: str, version: DatasetVersion) -> str:
    key = f"{model_digest[:16]}/{version.content_digest[:16]}-{embedding_settings(cfg.model)[:8]}"
    return join(cfg.storage.root, EMBEDDINGS, key)


def embed_version(
    cfg: PipelineConfig,
    version: DatasetVersion,
    make_encoder: Callable[[], Encoder],
    model_digest: str,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, _Rows]:
    """Every row's query and positive vectors and the rows' light columns. Vectors are
    stored per shard under (model digest, dataset content digest) as each shard finishes,
    so an interrupted pass resumes at the first shard without them, and mining the same
    data again with other rules embeds nothing. ``make_encoder()`` is called only when some
    shard still needs embedding (loading a 7B model is not free)."""
    endpoint = cfg.storage.endpoint_url
    cache = _embeddings_uri(cfg, model_digest, version)
    root = media_root_of(version)
    frames, batch = cfg.model.video_frames, cfg.mining.batch_size
    rows = _Rows([], [], [], [])
    queries, positives = [], []
    target = None
    bar = tqdm(
        total=2 * version.rows,
        desc=f"mine/{version.manifest.dataset}: embedding",
        disable=not show_progress,
        unit="item",
    )
    with bar:
        for shard in version.manifest.shards:
            table = version.read_shard(shard, ["id", "query", "positive", "group_id"])
            part = table.to_pylist()
            rows.ids += [r["id"] for r in part]
            rows.groups += [r.get("group_id") for r in part]
            rows.items += [item_key(r["positive"]) for r in part]
            rows.texts += [(r["query"].get("text") or "")[:200] for r in part]
            if not part:  # a shard a filter emptied: nothing to embed, nothing to store
                continue
            stored = join(cache, f"{shard_name(shard)}.npz")
            if exists(stored, endpoint):
                arrays = np.load(io.BytesIO(read_bytes(stored, endpoint)))
                queries.append(arrays["queries"])
                positives.append(arrays["positives"])
                bar.update(2 * len(part))
                continue
            if target is None:
                target = side_encoder(make_encoder(), endpoint)
            vectors = {}
            for column in ("query", "positive"):
                sides = [r[column] for r in part]
                encoded = target.encode_sides(sides, root, frames, batch, bar.update)
                vectors[column] = encoded.numpy().astype(np.float32)
            buffer = io.BytesIO()
            np.savez(buffer, queries=vectors["query"], positives=vectors["positive"])
            write_bytes(stored, buffer.getvalue(), endpoint)
            queries.append(vectors["query"])
            positives.append(vectors["positive"])
    if not queries:
        empty = np.zeros((0, 1), dtype=np.float32)
        return empty, empty, rows
    return np.concatenate(queries), np.concatenate(positives), rows


def _normalised(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` (float32, owned here) made unit rows in place: no second copy of a pool."""
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


# What judges (query side, candidate side) pairs of a dataset: P(relevant) for each, given
# the pairs and the dataset's media root (``judge.RelevanceJudge`` here or in a GPU task).
Judge = Callable[[list[tuple[dict[str, Any], dict[str, Any]]], str], list[float]]


def mine_version(
    cfg: PipelineConfig,
    version: DatasetVersion,
    make_encoder: Callable[[], Encoder],
    model: dict[str, str],
    show_progress: bool = True,
    judge: Judge | None = None,
) -> Mined:
    """Mine ``version`` with the model ``{"uri", "digest"}``; ``make_encoder()`` gives what
    embeds with it, called only when the version was not mined already. ``judge`` (needed
    when ``mining.judge.enabled``) drops drawn negatives it finds relevant."""
    endpoint = cfg.storage.endpoint_url
    dataset = version.manifest.dataset
    plan = plan_step(
        cfg,
        STEP,
        dataset,
        CODE_VERSION,
        mining_digest(cfg, model["digest"]),
        [version.ref()],
    )
    found = committed(plan, cfg)
    if found is not None:
        return Mined(found, found.manifest.stats["mining"], reused=True)
    queries, pool, rows = embed_version(cfg, version, make_encoder, model["digest"], show_progress)
    queries, pool = _normalised(queries), _normalised(pool)
    if len(pool) == 0:  # no rows: nothing to mine, the version is written as it is
        candidates, scores, kind = np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32), "none"
    else:
        scores, candidates, kind = top_k(queries, pool, cfg.mining.top_k, cfg.mining.exact_limit)
    selection = select_negatives(
        queries,
        pool,
        candidates,
        scores,
        positive_of=range(len(rows.ids)),
        query_ids=rows.ids,
        pool_items=rows.items,
        pool_groups=rows.groups,
        query_groups=rows.groups,
        cfg=cfg.mining,
        seed=cfg.seed,
    )
    if cfg.mining.judge.enabled:
        if judge is None:
            raise ValueError("mining.judge.enabled: no judge given to mine_version")
        _apply_judge(version, selection, judge, cfg.mining.judge.threshold, cfg.mining.negatives)
    random_scores = _random_candidates(queries, pool, rows.ids, cfg.seed)
    report = build_report(
        dataset,
        selection,
        random_scores,
        rows.ids,
        rows.texts,
        index=kind,
        mining=cfg.mining.model_dump(mode="json"),
        model=model,
    )
    writer = VersionWriter(plan.uri, RECORD_SCHEMA, endpoint)
    _write_shards(writer, version, selection, rows.ids)
    write_report_files(report, join(writer.staging_uri, "report"), endpoint)
    mined = writer.commit(
        dataset=dataset,
        step=STEP,
        config_digest=plan.config_digest,
        code_version=CODE_VERSION,
        inputs=plan.inputs,
        stats={
            **{k: v for k, v in version.manifest.stats.items() if k in _KEPT_STATS},
            "mined_by": model,
            "mining": {k: v for k, v in report.items() if k != "distributions"},
        },
        side_folders=("report",),
    )
    return Mined(mined, report, reused=False)


def _apply_judge(
    version: DatasetVersion, selection: Selection, judge: Judge, threshold: float, negatives: int
) -> None:
    """Ask ``judge`` about every drawn (query, negative) pair; drop those at or above
    ``threshold`` from ``selection`` and count them."""
    asked = [(i, c) for i, chosen in enumerate(selection.chosen) for c in chosen]
    if not asked:
        return
    from rzenembed.training.rows import DatasetRows

    rows = DatasetRows(version, "judge", 0, negatives="given")
    root = media_root_of(version)
    dropped: set[tuple[int, int]] = set()
    for start in range(0, len(asked), JUDGE_CHUNK):  # bounded: the rows of one chunk in memory
        part = asked[start : start + JUDGE_CHUNK]
        needed = sorted({i for i, _ in part} | {c for _, c in part})
        fetched = dict(zip(needed, rows.fetch(needed), strict=True))
        pairs = [(fetched[i]["query"], fetched[c]["positive"]) for i, c in part]
        verdicts = judge(pairs, root)
        dropped |= {pair for pair, p in zip(part, verdicts, strict=True) if p >= threshold}
    for i, chosen in enumerate(selection.chosen):
        kept = [k for k, c in enumerate(chosen) if (i, c) not in dropped]
        selection.chosen[i] = [chosen[k] for k in kept]
        selection.scores[i] = [selection.scores[i][k] for k in kept]
    selection.removed["judged_relevant"] += len(dropped)
    selection.short = sum(len(c) < negatives for c in selection.chosen)


def local_judge(cfg: PipelineConfig) -> Judge:
    """A ``Judge`` running here (on this process's device): the model loaded once, at the
    first call."""
    loaded: list[Any] = []

    def judge(pairs: list[tuple[dict[str, Any], dict[str, Any]]], media_root: str) -> list[float]:
        from rzenembed.mining.judge import RelevanceJudge
        from rzenembed.runtime import task_device
        from rzenembed.training.collate import MediaReader, to_input

        settings = cfg.mining.judge
        if not loaded:
            path = settings.model or cfg.prep.recaption.model
            if not path:
                raise ValueError("mining.judge: name the model (or prep.recaption.model)")
            loaded.append(RelevanceJudge(path, settings, str(task_device(want_gpu=True))))
        reader = MediaReader(media_root, cfg.storage.endpoint_url, remember=True)
        frames = cfg.model.video_frames
        inputs = [(to_input(q, reader, frames), to_input(c, reader, frames)) for q, c in pairs]
        return loaded[0].relevance(inputs)

    return judge


# Input statistics that still describe the mined rows (where media live, what groups mean).
_KEPT_STATS = ("media_root", "group_semantics", "task_group")


def _random_candidates(
    queries: np.ndarray, pool: np.ndarray, ids: list[str], seed: int
) -> np.ndarray:
    """Each query's score for one random other pool entry: an in-batch negative drawn
    uniformly, the baseline mined negatives must beat."""
    if len(pool) < 2:
        return np.zeros(0)
    picks = np.array(
        [
            (i + 1 + int(query_seed(seed + 1, row_id).integers(len(pool) - 1))) % len(pool)
            for i, row_id in enumerate(ids)
        ]
    )
    return np.einsum("nd,nd->n", queries, pool[picks])


def _write_shards(
    writer: VersionWriter, version: DatasetVersion, selection: Selection, ids: list[str]
) -> None:
    start = 0
    for shard in version.manifest.shards:
        table = version.read_shard(shard)
        negatives = table.column("negatives").to_pylist()
        for offset in range(table.num_rows):
            chosen = selection.chosen[start + offset]
            given = negatives[offset] or []
            negatives[offset] = [*given, *(mined_reference(ids[c]) for c in chosen)]
        column = pa.array(negatives, type=RECORD_SCHEMA.field("negatives").type)
        table = table.set_column(table.schema.get_field_index("negatives"), "negatives", column)
        writer.write_shard(shard_name(shard), table)
        start += table.num_rows


__all__ = ["REPORT_FILES", "Mined", "embed_version", "mine_version"]
