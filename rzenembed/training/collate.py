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
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from rzenembed.data import media as media_ops
from rzenembed.data.storage import filesystem, resolve_media_uri
from rzenembed.data.version import DatasetVersion
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


@dataclass
class DatasetRows:
    """One dataset version held in memory for sampling by row index."""

    name: str
    rows: list[dict[str, Any]]
    media_root: str
    group_semantics: str
    task_group: str
    endpoint_url: str | None = None

    @classmethod
    def load(cls, version: DatasetVersion, task_group: str) -> DatasetRows:
        stats = version.manifest.stats
        return cls(
            name=version.manifest.dataset,
            rows=version.read_table().to_pylist(),
            media_root=str(stats.get("media_root", "")),
            group_semantics=str(stats.get("group_semantics", "same-item")),
            task_group=task_group,
            endpoint_url=version.endpoint_url,
        )

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class TrainBatch:
    """One rank's share of a step: inputs and the loss's ids."""

    dataset: str
    task_group: str
    queries: list[EmbedInput]
    positives: list[EmbedInput]
    negatives: list[EmbedInput]  # flattened, num_negatives per query
    num_negatives: int
    positive_ids: torch.Tensor  # (b,)
    negative_ids: torch.Tensor | None  # (b, K)
    group_ids: torch.Tensor  # (b,)
    row_ids: list[str]
    plan_digest: str = ""  # of the step's global plan (dataset + row indices), for checks


class MediaReader:
    """Reads media of one dataset; caches open filesystems per process."""

    def __init__(self, root: str, endpoint_url: str | None = None):
        self.root = root
        self.endpoint_url = endpoint_url

    def read(self, uri: str) -> bytes:
        fs, path = filesystem(resolve_media_uri(self.root, uri), self.endpoint_url)
        with fs.open(path, "rb") as f:
            return f.read()

    def image(self, uri: str) -> Image.Image:
        with Image.open(io.BytesIO(self.read(uri))) as image:
            return image.convert("RGB")

    def frames(self, item: dict[str, Any], max_frames: int) -> list[Image.Image]:
        if item.get("frames"):
            return [Image.open(io.BytesIO(b)).convert("RGB") for b in item["frames"]]
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


def collate(
    rows: list[dict[str, Any]], source: DatasetRows, hard_negatives: int, max_frames: int
) -> TrainBatch:
    """Inputs and ids for ``rows`` of ``source``; K = the fewest negatives any row has,
    capped at ``hard_negatives``, so the negatives form a (b, K) block."""
    reader = MediaReader(source.media_root, source.endpoint_url)
    k = min([hard_negatives, *(len(r.get("negatives") or []) for r in rows)]) if rows else 0
    negatives = [n for r in rows for n in (r.get("negatives") or [])[:k]]
    mask_groups = source.group_semantics != "siblings"
    return TrainBatch(
        dataset=source.name,
        task_group=source.task_group,
        queries=[to_input(r["query"], reader, max_frames) for r in rows],
        positives=[to_input(r["positive"], reader, max_frames) for r in rows],
        negatives=[to_input(n, reader, max_frames) for n in negatives],
        num_negatives=k,
        positive_ids=torch.tensor([stable_id(item_key(r["positive"])) for r in rows]),
        negative_ids=(
            torch.tensor([stable_id(item_key(n)) for n in negatives]).view(len(rows), k)
            if k
            else None
        ),
        group_ids=torch.tensor(
            [stable_id(r["group_id"]) if mask_groups and r.get("group_id") else NO_ID for r in rows]
        ),
        row_ids=[r["id"] for r in rows],
    )
