"""Score an embedder on evaluation sets.

Candidates are embedded once per dataset and kept in a cache keyed by the model digest,
the dataset's candidates and the encoding settings, so evaluating the same model again
(another query set over the same corpus, a rerun after a crash, a report regenerated)
embeds only the queries. Sides go to the encoder raw (text, instruction, media URIs) and
the encoder reads their media where it embeds: an actor pool on its actors, in full
batches; a plain in-process encoder here, slice by slice, so a 100k-page corpus never sits
in memory as decoded images.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from rzenembed.compact import (
    Calibration,
    compact,
    comparable,
    grid,
    offered,
    variant_key,
)
from rzenembed.data.folders import write_bytes
from rzenembed.data.storage import filesystem, join
from rzenembed.evaluation.categories import category_of, main_metric
from rzenembed.evaluation.evalset import EvalDataset, discover, load_eval_folder
from rzenembed.evaluation.metrics import (
    DEFAULT_KS,
    mean_metrics,
    positional_metrics,
    rank_metrics,
)
from rzenembed.modeling.inputs import EmbedInput
from rzenembed.training.collate import MediaReader, to_input

ENCODE_SLICE = 256  # items read from storage and embedded per slice
SCORE_BLOCK = 1024  # queries scored against a global corpus per matrix product
FIRST_LISTED = "first_listed:"  # metrics under the positional tie convention
SCORE_FORMAT = 2  # stored dataset scores: 2 = with per-query values
# Compact variants of a stored score, by the variants asked for (a folder of their own:
# ``scores/`` holds dataset scores only, which progress watchers read as they appear).
COMPACT_SCORES = "compact-scores"


class ItemEncoder(Protocol):
    """Embeds inputs already decoded in this process (an ``RzenEmbedder``, a test table)."""

    def encode(self, items: Sequence[EmbedInput], batch_size: int = 16) -> torch.Tensor: ...


class SideEncoder(Protocol):
    """Embeds raw sides (the JSON dicts of an evaluation set: text, instruction, media
    URIs) and reads their media itself, so media are decoded where the embedding happens
    (an actor pool decodes on its actors) and the caller only ranks.

    ``media_root`` resolves the sides' relative media URIs; ``progress(n)`` is called as
    each ``n`` sides are embedded. Returns (len(sides), dim) float32 on CPU, in order."""

    def encode_sides(
        self,
        sides: Sequence[dict[str, Any]],
        media_root: str,
        max_frames: int,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor: ...


Encoder = ItemEncoder | SideEncoder  # what ``evaluate`` accepts


class LocalSides:
    """An ``ItemEncoder`` behind ``SideEncoder``: sides decoded here, ``ENCODE_SLICE`` at a
    time, so a large corpus never sits in memory as decoded pictures."""

    def __init__(self, encoder: ItemEncoder, endpoint_url: str | None = None):
        self.encoder = encoder
        self.endpoint_url = endpoint_url

    def encode_sides(
        self,
        sides: Sequence[dict[str, Any]],
        media_root: str,
        max_frames: int,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        reader = MediaReader(media_root, self.endpoint_url)
        parts = []
        for start in range(0, len(sides), ENCODE_SLICE):
            chunk = [to_input(s, reader, max_frames) for s in sides[start : start + ENCODE_SLICE]]
            parts.append(self.encoder.encode(chunk, batch_size))
            if progress is not None:
                progress(len(chunk))
        return torch.cat(parts) if parts else torch.empty(0, 0)


def side_encoder(encoder: Encoder, endpoint_url: str | None = None) -> SideEncoder:
    """``encoder`` itself when it takes raw sides, else a ``LocalSides`` around it."""
    if hasattr(encoder, "encode_sides"):
        return encoder  # type: ignore[return-value]
    return LocalSides(encoder, endpoint_url)  # type: ignore[arg-type]


@dataclass
class DatasetScore:
    """The scores of one dataset: its main metric and every metric, averaged over queries."""

    name: str
    category: str
    meta: str
    column: str
    ranking: str
    queries: int
    candidates: int
    metric: str
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    frames: int | None = None
    digest: str = ""  # dataset_digest: what the score was computed on
    provenance: dict[str, Any] = field(default_factory=dict)
    # The main metric of every query, in the set's order (rounded to 1e-6): what the
    # bootstrap intervals and the paired champion comparison resample (uncertainty.py).
    per_query: list[float] = field(default_factory=list)
    # Compact variants (``Variants``): "<dimension>/<precision>" -> the main metric's mean
    # ("score") and per-query values ("per_query"), from the same embedding pass.
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def first_listed(self) -> float | None:
        """The main score under the reference harness's positional tie convention."""
        return self.metrics.get(f"{FIRST_LISTED}{self.metric}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _encode(
    encoder: Encoder,
    sides: Sequence[dict],
    reader: MediaReader,
    max_frames: int,
    batch_size: int,
    desc: str,
    show_progress: bool,
) -> torch.Tensor:
    """``sides`` embedded by ``encoder`` as raw sides: ``reader`` names the media root
    (and store) only; nothing is decoded here unless ``encoder`` is a plain one."""
    if not sides:
        return torch.empty(0, 0)
    target = side_encoder(encoder, reader.endpoint_url)
    with tqdm(total=len(sides), desc=desc, disable=not show_progress, unit="item") as bar:
        return target.encode_sides(list(sides), reader.root, max_frames, batch_size, bar.update)


def _vectors_key(model_digest: str, sides: list[dict], media_root: str, max_frames: int) -> str:
    with_media = any(side.get("media") for side in sides)
    root = media_root if with_media else None  # text alone does not depend on it
    payload = json.dumps([model_digest, root, max_frames, sides], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def candidate_cache_key(model_digest: str, dataset: EvalDataset, max_frames: int) -> str:
    """What candidate vectors depend on: the model, the media root, the frame count and
    each candidate's content (not its id or dataset), so two datasets over one corpus
    share their vectors."""
    sides = [c["candidate"] for c in dataset.candidates]
    return _vectors_key(model_digest, sides, dataset.media_root, max_frames)


def _candidate_cache_uri(
    cache_dir: str, model_digest: str, dataset: EvalDataset, frames: int
) -> str:
    return join(cache_dir, f"{candidate_cache_key(model_digest, dataset, frames)}.pt")


def _query_cache_uri(cache_dir: str, model_digest: str, dataset: EvalDataset, frames: int) -> str:
    """Where a dataset's query vectors are kept (``queries/`` beside the candidates'): a
    score asked for again at other sizes or precisions is ranked from them, not embedded."""
    sides = [q["query"] for q in dataset.queries]
    key = _vectors_key(model_digest, sides, dataset.media_root, frames)
    return join(cache_dir, "queries", f"{key}.pt")


def _load_vectors(uri: str, endpoint_url: str | None) -> torch.Tensor | None:
    fs, path = filesystem(uri, endpoint_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), weights_only=True)


def _save_vectors(uri: str, vectors: torch.Tensor, endpoint_url: str | None) -> None:
    buffer = io.BytesIO()
    torch.save(vectors, buffer)
    write_bytes(uri, buffer.getvalue(), endpoint_url)  # whole or not at all


def _cached_encode(
    encoder: Encoder,
    sides: Sequence[dict],
    reader: MediaReader,
    max_frames: int,
    batch_size: int,
    desc: str,
    show_progress: bool,
    uri: str | None,
    endpoint_url: str | None,
) -> torch.Tensor:
    """``sides``' vectors from the cache at ``uri`` (a local folder or a URI on the storage
    root, so every node shares it), or embedded and stored there; no cache when None."""
    vectors = None if uri is None else _load_vectors(uri, endpoint_url)
    if vectors is None:
        vectors = _encode(encoder, sides, reader, max_frames, batch_size, desc, show_progress)
        if uri is not None:
            _save_vectors(uri, vectors, endpoint_url)
    return vectors


def _gains(query: dict[str, Any], index: dict[str, int], size: int) -> np.ndarray:
    """Gains over ``size`` candidates at ``index``'s positions: the query's graded
    relevance (visual documents) or 1 for each relevant id, 0 elsewhere."""
    grades = query.get("relevance") or [1.0] * len(query["relevant_ids"])
    gains = np.zeros(size)
    gains[[index[c] for c in query["relevant_ids"]]] = grades
    return gains


def score_dataset(
    query_vectors: torch.Tensor,
    candidate_vectors: torch.Tensor,
    dataset: EvalDataset,
    ks: Sequence[int] = DEFAULT_KS,
    ndcg_k: int = 5,
) -> list[dict[str, float]]:
    """Per-query metrics; local queries rank their own list, global ones the whole corpus.
    Each row also has the positional-tie values (``first_listed:hit@1``, ...)."""
    index = {c["cid"]: i for i, c in enumerate(dataset.candidates)}
    rows: list[dict[str, float] | None] = [None] * len(dataset.queries)

    def metrics(scores: np.ndarray, gains: np.ndarray) -> dict[str, float]:
        out = rank_metrics(scores, gains, ks, ndcg_k)
        positional = positional_metrics(scores, gains, ndcg_k)
        out.update({f"{FIRST_LISTED}{k}": v for k, v in positional.items()})
        return out

    global_rows = []
    for qi, query in enumerate(dataset.queries):
        if query["candidate_ids"]:
            listed = query["candidate_ids"]
            scores = (candidate_vectors[[index[c] for c in listed]] @ query_vectors[qi]).numpy()
            local = {c: i for i, c in enumerate(listed)}
            rows[qi] = metrics(scores, _gains(query, local, len(listed)))
        else:
            global_rows.append(qi)
    for start in range(0, len(global_rows), SCORE_BLOCK):
        block = global_rows[start : start + SCORE_BLOCK]
        matrix = (query_vectors[block] @ candidate_vectors.T).numpy()
        for row, qi in zip(matrix, block, strict=True):
            rows[qi] = metrics(row, _gains(dataset.queries[qi], index, len(index)))
    return [r for r in rows if r is not None]


@dataclass
class Variants:
    """The compact forms scored beside the full float vectors: every prefix in ``dims``
    (below the full size) and the full size, at each of ``precisions``; int8/uint8 only
    with a ``calibration`` (its ranges are the ones the endpoint codes with)."""

    dims: list[int]
    precisions: list[str]
    calibration: Calibration | None = None

    def usable_precisions(self) -> list[str]:
        return offered(self.precisions, self.calibration)

    def digest(self) -> str:
        """What the variant scores depend on besides the model and the data."""
        ranges = None if self.calibration is None else self.calibration.dumps()
        payload = json.dumps([self.dims, self.usable_precisions(), ranges])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def variant_scores(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    dataset: EvalDataset,
    variants: Variants,
    metric: str,
    ndcg_k: int,
) -> dict[str, dict[str, Any]]:
    """The main metric of every (dimension, precision) of ``variants``: both sides cut,
    renormalised and coded as the endpoint codes them, ranked as a store ranks the codes
    (``compact.comparable``), ties exact as everywhere else."""
    full = int(queries.shape[1])
    out = {}
    for dim, precision in grid(variants.dims, full, variants.usable_precisions()):
        sides = [
            torch.from_numpy(
                comparable(compact(v.numpy(), dim, precision, variants.calibration), precision, dim)
            )
            for v in (queries, candidates)
        ]
        rows = score_dataset(sides[0], sides[1], dataset, ndcg_k=ndcg_k)
        values = [round(float(row[metric]), 6) for row in rows]
        out[variant_key(dim, precision)] = {
            "score": float(np.mean([row[metric] for row in rows])),
            "per_query": values,
        }
    return out


def dataset_digest(dataset: EvalDataset, max_frames: int) -> str:
    """The content a dataset's score depends on (queries, candidates, media, frames)."""
    payload = json.dumps(
        [dataset.name, dataset.media_root, max_frames, dataset.queries, dataset.candidates],
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _variants_from_cache(
    score: DatasetScore,
    dataset: EvalDataset,
    frames: int,
    variants: Variants,
    cache: str,
    model_digest: str,
    ndcg_k: int,
    endpoint_url: str | None,
) -> dict[str, Any] | None:
    """A stored score's variants ranked from its cached query and candidate vectors (None
    when either is gone: then the dataset is scored again)."""
    candidates = _load_vectors(
        _candidate_cache_uri(cache, model_digest, dataset, frames), endpoint_url
    )
    queries = _load_vectors(_query_cache_uri(cache, model_digest, dataset, frames), endpoint_url)
    if candidates is None or queries is None:
        return None
    return variant_scores(queries, candidates, dataset, variants, score.metric, ndcg_k)


def _stored_json(uri: str | None, endpoint_url: str | None) -> Any:
    """The JSON stored at ``uri``; None when there is no such file (or no ``uri``)."""
    if uri is None:
        return None
    fs, path = filesystem(uri, endpoint_url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def _stored_score(uri: str | None, endpoint_url: str | None) -> DatasetScore | None:
    stored = _stored_json(uri, endpoint_url)
    return None if stored is None else DatasetScore(**stored)


def score_one(
    encoder: Encoder,
    dataset: EvalDataset,
    max_frames: int,
    batch_size: int,
    ndcg_k: int,
    cache: str | None,
    model_digest: str | None,
    show_progress: bool,
    endpoint_url: str | None,
    digest: str,
    variants: Variants | None = None,
) -> DatasetScore:
    """Embed one dataset (candidates and queries through the cache) and score it, and its
    compact ``variants`` from the same vectors; ``digest`` is its ``dataset_digest``
    (recorded in the score)."""
    reader = MediaReader(dataset.media_root)
    candidate_uri, query_uri = None, None
    if cache is not None and model_digest is not None:
        candidate_uri = _candidate_cache_uri(cache, model_digest, dataset, max_frames)
        query_uri = _query_cache_uri(cache, model_digest, dataset, max_frames)
    candidates = _cached_encode(
        encoder,
        [c["candidate"] for c in dataset.candidates],
        reader,
        max_frames,
        batch_size,
        f"{dataset.name} candidates",
        show_progress,
        candidate_uri,
        endpoint_url,
    )
    queries = _cached_encode(
        encoder,
        [q["query"] for q in dataset.queries],
        reader,
        max_frames,
        batch_size,
        f"{dataset.name} queries",
        show_progress,
        query_uri,
        endpoint_url,
    )
    rows = score_dataset(queries, candidates, dataset, ndcg_k=ndcg_k)
    metrics = mean_metrics(rows)
    category = category_of(dataset.category)
    metric = main_metric(dataset.category, ndcg_k)
    return DatasetScore(
        name=dataset.name,
        category=dataset.category,
        meta=category.meta,
        column=category.column,
        ranking=dataset.ranking,
        queries=len(dataset.queries),
        candidates=len(dataset.candidates),
        metric=metric,
        score=metrics[metric],
        metrics=metrics,
        frames=max_frames,
        digest=digest,
        provenance=dataset.provenance,
        per_query=[round(float(row[metric]), 6) for row in rows],
        variants=(
            {}
            if variants is None
            else variant_scores(queries, candidates, dataset, variants, metric, ndcg_k)
        ),
    )


def evaluate(
    encoder: Encoder,
    eval_paths: Sequence[str | Path] | str | Path,
    *,
    model_digest: str | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    max_frames: int | None = None,
    ndcg_k: int = 5,
    datasets: Sequence[str] = (),
    show_progress: bool = False,
    endpoint_url: str | None = None,
    on_dataset: Callable[[DatasetScore, bool], None] | None = None,
    variants: Variants | None = None,
) -> list[DatasetScore]:
    """Score ``encoder`` on every dataset found under ``eval_paths`` (see ``discover``).

    ``datasets`` keeps only the named datasets (all when empty). A set that records its
    frames per video (an imported benchmark: 8) is embedded with that many; others with
    ``max_frames``, by default the embedder's configured count (4 for a plain encoder).

    With ``cache_dir`` and ``model_digest``, every finished dataset's score is stored under
    ``cache_dir/scores/`` keyed by the model and the dataset's content, so a rerun after a
    crash resumes at the first unfinished dataset. ``on_dataset(score, resumed)`` is called
    as each dataset finishes (progress reporting). ``variants``: the nested dimensions and
    precisions to score beside the full float vectors (no second embedding pass).
    """
    if isinstance(eval_paths, str | Path):
        eval_paths = [eval_paths]
    if max_frames is None:
        cfg = getattr(encoder, "cfg", None)
        max_frames = int(getattr(cfg, "video_frames", 4))
    cache = str(cache_dir) if cache_dir is not None else None
    folders = [folder for path in eval_paths for folder in discover(path)]
    found = [d for folder in folders for d in load_eval_folder(folder)]
    chosen = [d for d in found if not datasets or d.name in datasets]
    missing = sorted(set(datasets) - {d.name for d in found})
    if missing:
        raise ValueError(f"evaluation datasets not found: {missing}")
    results = []
    for dataset in tqdm(chosen, desc="datasets", unit="dataset", disable=not show_progress):
        frames = dataset.frames or max_frames
        digest = dataset_digest(dataset, frames)
        stored, stored_variants = None, None
        if cache is not None and model_digest is not None:
            # SCORE_FORMAT: a stored score of an older shape (no per-query values) is redone.
            payload = f"{model_digest}:{ndcg_k}:{digest}:{SCORE_FORMAT}"
            key = hashlib.sha256(payload.encode()).hexdigest()
            stored = join(cache, "scores", f"{model_digest[:16]}-{key}.json")
            if variants is not None:  # beside it, not in it: one score, any set of variants
                name = f"{model_digest[:16]}-{key}-{variants.digest()}.json"
                stored_variants = join(cache, COMPACT_SCORES, name)
        score = _stored_score(stored, endpoint_url)
        if score is not None and variants is not None:
            found = _stored_json(stored_variants, endpoint_url)
            if found is None:  # other sizes or precisions: ranked from the cached vectors
                found = _variants_from_cache(
                    score, dataset, frames, variants, cache, model_digest, ndcg_k, endpoint_url
                )
                if found is not None:
                    write_bytes(stored_variants, json.dumps(found).encode(), endpoint_url)
            score = None if found is None else replace(score, variants=found)
        resumed = score is not None
        if score is None:
            score = score_one(
                encoder,
                dataset,
                frames,
                batch_size,
                ndcg_k,
                cache,
                model_digest,
                show_progress,
                endpoint_url,
                digest,
                variants,
            )
            if stored is not None:
                plain = replace(score, variants={})
                write_bytes(stored, json.dumps(plain.to_json()).encode(), endpoint_url)
            if stored_variants is not None:
                write_bytes(stored_variants, json.dumps(score.variants).encode(), endpoint_url)
        results.append(score)
        if on_dataset is not None:
            on_dataset(score, resumed)
    return results
