"""From stored records to what the embedder and the loss consume.

A training step gets rows of one dataset; each row's query, positive and hard negatives
become ``EmbedInput``s (images read from the dataset's media root, inline video frames
decoded from their JPEG bytes, a bare video URI decoded with decord at its time range),
and the ids the loss uses to keep false negatives out:

- ``positive_ids`` / ``negative_ids``: a content id of each candidate item (its text and
  media), so two rows whose positives are the same item (the same label text, the same
  page) never push each other away;
- ``group_ids``: the row's group (e.g. ``label:circle`` in merged classification), for
  datasets whose groups mean "the same item". Groups of clips (``siblings``) are meant to
  be hard negatives, so they are not used for masking.
"""

from __future__ import annotations

import hashlib
import io
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from rzenembed.data import media as media_ops
from rzenembed.data.storage import filesystem, frame_files, read_whole, resolve_media_uri
from rzenembed.modeling.inputs import EmbedInput

NO_ID = -1


def stable_id(text: str) -> int:
    """A 63-bit id of ``text`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def item_key(side: dict[str, Any]) -> str:
    """What identifies an item: its texts and the media it shows (URI and time range)."""
    media = [
        f"{m['kind']}:{m['uri']}:{m.get('start_s')}:{m.get('end_s')}"
        for m in side.get("media") or []
    ]
    return "\x1f".join([side.get("instruction") or "", side.get("text") or "", *media])


@dataclass(frozen=True)
class SourceInfo:
    """What collation needs to know about a row's dataset (not its rows)."""

    name: str
    task_group: str
    media_root: str
    group_semantics: str
    max_negatives: int  # the most hard negatives any row of the dataset has
    endpoint_url: str | None = None


@dataclass
class TrainBatch:
    """One rank's share of a step: inputs and the loss's ids."""

    dataset: str
    task_group: str
    queries: list[EmbedInput]
    positives: list[EmbedInput]
    negatives: list[EmbedInput]  # the real ones, flattened query-major
    num_negatives: int  # K: the same on every rank of a step
    positive_ids: torch.Tensor  # (b,)
    negative_ids: torch.Tensor | None  # (b, K), NO_ID in padded slots
    group_ids: torch.Tensor  # (b,)
    row_ids: list[str]  # one per row: the batch's size even once its inputs are dropped
    plan_digest: str = ""  # of the step's global plan (dataset + row indices), for checks
    negative_mask: torch.Tensor | None = None  # (b, K) bool: True = a real negative

    def drop_inputs(self) -> None:
        """Forget the decoded images and frames once the processor has run over them: a
        prefetched step then holds only its processor outputs."""
        self.queries, self.positives, self.negatives = [], [], []

    @property
    def padded_fraction(self) -> float:
        """Share of this rank's K negative slots that hold no real negative."""
        if self.negative_mask is None or self.negative_mask.numel() == 0:
            return 0.0
        return 1.0 - float(self.negative_mask.float().mean())


class MediaReader:
    """Reads media of one dataset: one GET per object (``cat_file``: no HEAD before it).
    ``remember``: keep what was read, so an object several sides share (one batch's rows
    asking about one picture) is fetched once; for short-lived readers only."""

    def __init__(self, root: str, endpoint_url: str | None = None, remember: bool = False):
        self.root = root
        self.endpoint_url = endpoint_url
        self._seen: dict[str, Future[bytes]] | None = {} if remember else None
        self._lock = threading.Lock()

    def read(self, uri: str) -> bytes:
        if self._seen is None:
            return self._fetch(uri)
        with self._lock:  # sides are read on a thread pool: the first asker fetches
            found = self._seen.get(uri)
            first = found is None
            if first:
                found = self._seen[uri] = Future()
        if first:
            try:
                found.set_result(self._fetch(uri))
            except BaseException as error:
                found.set_exception(error)
        return found.result()

    def _fetch(self, uri: str) -> bytes:
        fs, path = filesystem(resolve_media_uri(self.root, uri), self.endpoint_url)
        return read_whole(fs, path)

    def image(self, uri: str) -> Image.Image:
        with Image.open(io.BytesIO(self.read(uri))) as image:
            return image.convert("RGB")

    def _image_at(self, full_uri: str) -> Image.Image:
        fs, path = filesystem(full_uri, self.endpoint_url)
        with Image.open(io.BytesIO(read_whole(fs, path))) as image:
            return image.convert("RGB")

    def frames(self, item: dict[str, Any], max_frames: int) -> list[Image.Image]:
        if item.get("frames"):
            return [Image.open(io.BytesIO(b)).convert("RGB") for b in item["frames"]]
        if item.get("kind") == "frames":  # a folder of frame images: evenly spaced ones
            files = frame_files(resolve_media_uri(self.root, item["uri"]), self.endpoint_url)
            if not files:
                raise FileNotFoundError(f"no frame images in {item['uri']!r}")
            count = min(max_frames, len(files))
            picks = np.linspace(0, len(files) - 1, num=count).round().astype(int)
            return [self._image_at(files[i]) for i in picks]
        data = self.read(item["uri"])
        info = media_ops.probe_video(data)
        start = item.get("start_s") or 0.0
        end = item.get("end_s") or info.duration_s
        return media_ops.decode_frames(data, media_ops.frame_timestamps(start, end, max_frames))


def to_input(side: dict[str, Any], reader: MediaReader, max_frames: int) -> EmbedInput:
    """An ``EmbedInput`` for one side of a record."""
    images, video = [], None
    for item in side.get("media") or []:
        if item["kind"] == "image":
            images.append(reader.image(item["uri"]))
        else:
            video = reader.frames(item, max_frames)
    return EmbedInput(
        text=side.get("text") or "",
        instruction=side.get("instruction") or "",
        images=images,
        video=video,
    )


def negatives_per_step(source: SourceInfo, hard_negatives: int) -> int:
    """K for every step on ``source``: the configured ``hard_negatives``, capped by the most
    negatives any row of the dataset has. It depends only on the config and the dataset, so
    every rank computes the same K whatever rows its slice holds (the loss gathers
    ``(b, K, D)`` blocks across ranks and needs equal shapes)."""
    return min(hard_negatives, source.max_negatives)


def collate(
    rows: list[dict[str, Any]],
    source: SourceInfo,
    hard_negatives: int,
    max_frames: int,
    reads: ThreadPoolExecutor | None = None,
) -> TrainBatch:
    """Inputs and ids for ``rows`` of ``source``, with K = ``negatives_per_step`` negative
    slots per row. A row with fewer negatives keeps all it has; its remaining slots are
    padded (``negative_mask`` False, id ``NO_ID``): nothing is embedded for them and the loss
    leaves them out, so no row's negatives are dropped because another row has fewer.

    With ``reads``, the sides' media are read and decoded on that pool concurrently (one
    object store request per media item would otherwise run one after another); the
    result is the same either way."""
    reader = MediaReader(source.media_root, source.endpoint_url, remember=True)
    k = negatives_per_step(source, hard_negatives)
    kept = [(r.get("negatives") or [])[:k] for r in rows]
    negatives = [n for row_negatives in kept for n in row_negatives]
    mask = torch.tensor([[j < len(n) for j in range(k)] for n in kept], dtype=torch.bool)
    negative_ids = torch.tensor(
        [[stable_id(item_key(n[j])) if j < len(n) else NO_ID for j in range(k)] for n in kept],
        dtype=torch.long,
    )
    mask_groups = source.group_semantics != "siblings"
    sides = [r["query"] for r in rows] + [r["positive"] for r in rows] + negatives

    def convert(side: dict[str, Any]) -> EmbedInput:
        return to_input(side, reader, max_frames)

    inputs = list(reads.map(convert, sides) if reads is not None else map(convert, sides))
    b = len(rows)
    return TrainBatch(
        dataset=source.name,
        task_group=source.task_group,
        queries=inputs[:b],
        positives=inputs[b : 2 * b],
        negatives=inputs[2 * b :],
        num_negatives=k,
        positive_ids=torch.tensor([stable_id(item_key(r["positive"])) for r in rows]),
        negative_ids=negative_ids.view(len(rows), k) if k else None,
        group_ids=torch.tensor(
            [stable_id(r["group_id"]) if mask_groups and r.get("group_id") else NO_ID for r in rows]
        ),
        row_ids=[r["id"] for r in rows],
        negative_mask=mask.view(len(rows), k) if k else None,
    )
