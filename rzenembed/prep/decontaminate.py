"""Decontamination: no training row may copy an item of the evaluation sets.

A training row is rejected ``eval_overlap`` when its query or positive image is within
``prep.phash_radius`` bits (64-bit pHash) of an image of an evaluation item, or when its
query text equals, after ``normalise_text``, the text of an evaluation item that carries no
image (a retrieval caption, a text query, a text candidate) and is at least
``prep.decontaminate_min_chars`` characters long. The detail names the evaluation set,
dataset and item; the clean step counts the rejects per (source, evaluation dataset).

Why only image-less items match by text: an evaluation item with an image is identified by
its image, and its text is a question or an instruction about that image ("What is the man
holding?"), which many unrelated training rows share over other pictures. Why a minimum
length: short texts (label names, "yes") are shared by unrelated rows, not copied.

The evaluation sets' keys (every image's pHash, every image-less item's normalised text,
with the item they come from) are built once per content of the sets (``eval_keys_digest``)
by one Ray task per evaluation dataset, and stored as one Parquet file under
``<storage.root>/_eval-keys/``; every later clean step, on any node, reads that file.
Videos and frame folders of evaluation items are not hashed (their frames are not
compared with training clips).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rzenembed.config import PipelineConfig
from rzenembed.data import media as media_ops
from rzenembed.data.engine import run_shards
from rzenembed.data.storage import filesystem, is_remote, join
from rzenembed.data.version import put_table
from rzenembed.prep.dedup import bands, normalise_text

CODE_VERSION = "1"
KEYS_FOLDER = "_eval-keys"
KEY_SCHEMA = pa.schema(
    [
        ("set", pa.string()),
        ("dataset", pa.string()),
        ("item", pa.string()),
        ("text", pa.string()),  # normalised text of an image-less item, else null
        ("phash", pa.uint64()),  # the pHash of one image of the item, else null
    ]
)


def decontamination_sets(cfg: PipelineConfig) -> list[str]:
    """The evaluation set folders training rows are checked against (``prep.decontaminate``,
    by default ``eval.sets``)."""
    sets = cfg.prep.decontaminate if cfg.prep.decontaminate is not None else cfg.eval.sets
    return sorted(dict.fromkeys(sets))


TABLE_STEMS = ("queries", "candidates", "evalset")


@dataclass(frozen=True)
class EvalSetRef:
    """One evaluation set folder: the name details give it (its folder's name) and where
    it is (a local folder, or a folder on the storage root that workers stage)."""

    name: str
    uri: str


def set_refs(sets: list[str], endpoint_url: str | None = None) -> list[EvalSetRef]:
    """Every evaluation set folder under the configured locations, in a stable order: a
    location that is a set, or a folder of sets (local or on the storage root)."""
    from rzenembed.evaluation.evalset import EvalSetError, discover

    try:
        found = [ref for location in sets for ref in _refs_at(location, endpoint_url, discover)]
    except EvalSetError as error:
        raise EvalSetError(
            f"decontamination: {error}; training rows are checked against the evaluation "
            "sets before training (prep.decontaminate, by default eval.sets): import them "
            "first, or set prep.decontaminate to the sets that exist ([] turns it off)"
        ) from None
    return sorted(set(found), key=lambda ref: ref.uri)


def _refs_at(location: str, endpoint_url: str | None, discover) -> list[EvalSetRef]:
    from rzenembed.evaluation.evalset import EvalSetError

    if not is_remote(location):
        return [EvalSetRef(f.name, str(f.resolve())) for f in discover(location)]
    fs, path = filesystem(location, endpoint_url)
    if fs.glob(join(path, "queries.*")):
        return [EvalSetRef(path.rstrip("/").rsplit("/", 1)[-1], location.rstrip("/"))]
    tables = sorted(fs.glob(join(path, "*", "queries.*")))
    if not tables:
        raise EvalSetError(f"{location} holds no evaluation set (no queries.jsonl/.parquet)")
    folders = sorted({t.rsplit("/", 1)[0] for t in tables})
    scheme = location.split("://", 1)[0]
    return [EvalSetRef(f.rsplit("/", 1)[-1], f"{scheme}://{f}") for f in folders]


def eval_keys_digest(refs: list[EvalSetRef], endpoint_url: str | None = None) -> str:
    """What the keys depend on: each set's name and its tables and ``evalset.json`` (their
    bytes for a local folder; names, sizes and ETags on an object store, so the Prefect
    worker reads nothing). Media are named by the tables; a media file replaced under the
    same name is not seen."""
    digest = hashlib.sha256(f"eval-keys {CODE_VERSION}\n".encode())
    for ref in refs:
        digest.update(f"{ref.name}\n".encode())
        for line in _table_identities(ref, endpoint_url):
            digest.update(f"{line}\n".encode())
    return digest.hexdigest()


def _table_identities(ref: EvalSetRef, endpoint_url: str | None) -> list[str]:
    if not is_remote(ref.uri):
        folder = Path(ref.uri)
        return [
            f"{p.name} {_file_sha256(p)}"
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name.split(".")[0] in TABLE_STEMS
        ]
    fs, path = filesystem(ref.uri, endpoint_url)
    listed = fs.ls(path, detail=True, refresh=True)
    return [
        f"{e['name'].rsplit('/', 1)[-1]} {e.get('size')} {e.get('ETag') or e.get('mtime')}"
        for e in sorted(listed, key=lambda e: e["name"])
        if e.get("type") != "directory"
        and e["name"].rsplit("/", 1)[-1].split(".")[0] in TABLE_STEMS
    ]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EvalKeysRef:
    """Where the keys of a group of evaluation sets are stored, and what they came from."""

    uri: str
    digest: str
    sets: list[str] = field(default_factory=list)  # the set folders (local paths or URIs)


def ensure_eval_keys(cfg: PipelineConfig, show_progress: bool = True) -> EvalKeysRef | None:
    """The stored keys of the configured decontamination sets, built when missing (None
    when decontamination is off or no set is configured)."""
    sets = decontamination_sets(cfg)
    if not sets:
        return None
    endpoint = cfg.storage.endpoint_url
    refs = set_refs(sets, endpoint)
    digest = eval_keys_digest(refs, endpoint)
    uri = join(cfg.storage.root, KEYS_FOLDER, f"{digest}.parquet")
    fs, path = filesystem(uri, endpoint)
    if not fs.exists(path):
        jobs = [(ref, endpoint, cfg.prep.max_image_pixels) for ref in refs]
        tables = run_shards(
            _keys_job, jobs, max_in_flight=cfg.prep.max_in_flight, show_progress=show_progress
        )
        table = pa.concat_tables(tables) if tables else KEY_SCHEMA.empty_table()
        folder_uri, name = uri.rsplit("/", 1)
        put_table(folder_uri, name, table, endpoint)
    return EvalKeysRef(uri, digest, [ref.uri for ref in refs])


def _keys_job(job: tuple[EvalSetRef, str | None, int]) -> pa.Table:
    """The keys of one evaluation set: every dataset's queries' and candidates' images and
    texts (a set on the storage root is staged on this node first)."""
    from rzenembed.data.folders import stage_folder
    from rzenembed.evaluation.evalset import load_eval_folder

    ref, endpoint_url, max_pixels = job
    local = stage_folder(ref.uri, endpoint_url) if is_remote(ref.uri) else Path(ref.uri)
    rows = []
    for dataset in load_eval_folder(local):
        items = [(q["qid"], q["query"]) for q in dataset.queries]
        items += [(c["cid"], c["candidate"]) for c in dataset.candidates]
        for item, side in items:
            for text, phash in item_keys(side, dataset.media_root, max_pixels):
                rows.append((ref.name, dataset.name, item, text, phash))
    columns = list(zip(*rows, strict=True)) if rows else [[] for _ in KEY_SCHEMA.names]
    return pa.table(dict(zip(KEY_SCHEMA.names, columns, strict=True)), schema=KEY_SCHEMA)


def item_keys(side: dict[str, Any], media_root: str, max_pixels: int) -> list[tuple]:
    """(text, pHash) keys of one evaluation item: one per image, or its normalised text
    when it has no image. An image that cannot be read gives no key (the evaluation itself
    reports it)."""
    images = [m for m in side.get("media") or [] if m.get("kind") == "image"]
    if not images:
        text = normalise_text(side.get("text") or "")
        return [(text, None)] if text else []
    keys = []
    for item in images:
        path = Path(media_root, item["uri"])
        try:
            image = media_ops.decode_image(path.read_bytes(), max_pixels=max_pixels)
        except (OSError, media_ops.MediaError):
            continue
        keys.append((None, media_ops.perceptual_hash(image)))
    return keys


# --------------------------------------------------------------------------- matching


class EvalKeys:
    """The keys in memory, indexed for lookups: texts in a dict, pHashes by band."""

    def __init__(self, table: pa.Table, radius: int, min_chars: int):
        self.radius, self.min_chars = radius, min_chars
        sets, names = table.column("set").to_pylist(), table.column("dataset").to_pylist()
        items = table.column("item").to_pylist()
        self.datasets = [f"{s}/{d}" for s, d in zip(sets, names, strict=True)]
        self.labels = [f"{s} / {d} item {i}" for s, d, i in zip(sets, names, items, strict=True)]
        self.texts: dict[str, int] = {}
        for index, text in enumerate(table.column("text").to_pylist()):
            if text and len(text) >= min_chars:
                self.texts.setdefault(text, index)
        phash = table.column("phash")
        self.image_rows = np.flatnonzero(phash.is_valid().to_numpy(zero_copy_only=False))
        self.hashes = phash.fill_null(0).to_numpy()[self.image_rows].astype(np.uint64)
        self._bands = [_band_index(self.hashes, band, radius + 1) for band in range(radius + 1)]

    def text_match(self, text: str) -> int | None:
        """The key row of an evaluation item whose text equals ``text`` (normalised)."""
        normal = normalise_text(text)
        return self.texts.get(normal) if len(normal) >= self.min_chars else None

    def image_match(self, phash: int) -> tuple[int, int] | None:
        """(key row, distance) of the nearest evaluation image within the radius."""
        found = [
            order[np.searchsorted(values, value) : np.searchsorted(values, value, "right")]
            for (values, order), (_, value) in zip(
                self._bands, bands(phash, self.radius + 1), strict=True
            )
        ]
        positions = np.unique(np.concatenate(found))
        if not len(positions):
            return None
        distance = np.bitwise_count(self.hashes[positions] ^ np.uint64(phash))
        best = int(np.argmin(distance))
        if distance[best] > self.radius:
            return None
        return int(self.image_rows[positions[best]]), int(distance[best])


def _band_index(hashes: np.ndarray, band: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """One band of every hash, sorted, and where each came from: a lookup is two binary
    searches, and the index costs 16 bytes per hash and band (a dict of lists would cost
    ten times that in every worker process)."""
    low, high = _band_edges(band, count)
    width = high - low
    values = (hashes >> np.uint64(low)) & np.uint64((1 << width) - 1)
    order = np.argsort(values, kind="stable")
    return values[order], order


def _band_edges(band: int, count: int) -> tuple[int, int]:
    """The bit range of band ``band`` of ``count``, as ``dedup.bands`` cuts it."""
    return round(64 * band / count), round(64 * (band + 1) / count)


@lru_cache(maxsize=2)
def load_eval_keys(
    uri: str, radius: int, min_chars: int, endpoint_url: str | None = None
) -> EvalKeys:
    """The stored keys, read once per process (every shard task of a node reuses them)."""
    fs, path = filesystem(uri, endpoint_url)
    return EvalKeys(pq.read_table(path, filesystem=fs), radius, min_chars)


def overlap(
    row: dict[str, Any], phashes: dict[str, list[int]], keys: EvalKeys
) -> tuple[str, str] | None:
    """(evaluation dataset, detail) when the row copies an evaluation item, else None.
    ``phashes``: the pHashes of the row's ``query`` and ``positive`` images."""
    match = keys.text_match(row["query"]["text"])
    if match is not None:
        return keys.datasets[match], f"query text equals eval set {keys.labels[match]}"
    for side in ("query", "positive"):
        for phash in phashes.get(side, ()):
            found = keys.image_match(phash)
            if found is not None:
                key, distance = found
                detail = f"{side} image within {distance} bits of eval set {keys.labels[key]}"
                return keys.datasets[key], detail
    return None
