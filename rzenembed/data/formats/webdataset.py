"""WebDataset shards as img2dataset writes them (LAION and other image-text crawls).

A shard is ``NNNNN.tar`` holding, per sample, ``KEY.jpg`` (or ``.png``/``.webp``),
``KEY.txt`` (the caption) and ``KEY.json`` (``url``, ``caption``, ``key``, ``status``,
``width``, ``height``, ...), members of one sample next to each other. A sample becomes
one record: the caption is the query (``sources[].query_instruction``), the image the
positive. Its bytes are written once into the dataset's media folder, content-addressed
(``MediaSink``), and checked there like any other image. A sample whose ``status`` is not
``success`` is a ``download_failed`` reject; one without image bytes ``media_missing``;
one without caption ``text_empty``.

Reading streams: a scan (one pass per tar, on a worker) counts samples, hashes the bytes
and notes the byte offset where every chunk's first sample starts, so a shard task seeks
straight to its samples.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from rzenembed.config import SourceConfig
from rzenembed.data.formats import SourceFormat, rejected
from rzenembed.data.formats.media_sink import MediaSink
from rzenembed.data.schema import media, side

FIELDS = "tar shards of KEY.jpg|png|webp, KEY.txt, KEY.json {url, caption, key, status, ...}"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the key is the path up to the first dot of the file
    name, the extension what follows it (WebDataset's convention)."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


class _Hashing:
    """A read-only file wrapper that hashes what passes through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha256 = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.sha256.hexdigest()


def scan_tar(raw: BinaryIO, chunk_rows: int) -> tuple[int, str, list[int]]:
    """(samples, sha256 of the file, byte offset of every chunk's first member)."""
    reader = _Hashing(raw)
    samples, starts, current = 0, [], None
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            if not member.isfile():
                continue
            key, _ = sample_key(member.name)
            if key != current:
                if samples % chunk_rows == 0:
                    starts.append(member.offset)
                samples, current = samples + 1, key
    return samples, reader.drain(), starts


def iter_samples(raw: BinaryIO) -> Iterator[dict[str, Any]]:
    """The samples of a tar read from ``raw``'s position on: ``{"__key__": key,
    extension: bytes, ...}``, one per run of members sharing a key."""
    sample: dict[str, Any] | None = None
    with tarfile.open(fileobj=raw, mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            if not member.isfile():
                continue
            key, extension = sample_key(member.name)
            if sample is not None and sample["__key__"] != key:
                yield sample
                sample = None
            if sample is None:
                sample = {"__key__": key}
            handle = tar.extractfile(member)
            sample[extension] = handle.read() if handle is not None else b""
    if sample is not None:
        yield sample


def read_samples(raw: BinaryIO, offset: int, count: int) -> list[dict[str, Any]]:
    """``count`` samples starting at the member header at ``offset``."""
    raw.seek(offset)
    return list(itertools.islice(iter_samples(raw), count))


def _text(data: Any) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace").strip()
    return str(data or "").strip()


def convert(
    raw: Any, source: SourceConfig, position: int, sink: MediaSink | None = None
) -> list[Any]:
    if not isinstance(raw, dict) or "__key__" not in raw:
        return [rejected("schema_invalid", f"not a WebDataset sample; expected {FIELDS}", raw)]
    try:
        meta = json.loads(raw["json"]) if raw.get("json") else {}
    except (ValueError, UnicodeDecodeError) as err:
        return [rejected("schema_invalid", f"{raw['__key__']}.json: {err}", _shown(raw))]
    meta = meta if isinstance(meta, dict) else {}
    row_id = str(meta.get("key") or raw["__key__"])
    status = meta.get("status", "success")
    if status != "success":
        detail = f"status {status!r}: {meta.get('error_message') or ''}".strip()
        return [rejected("download_failed", detail, {"id": row_id, **_shown(raw)})]
    image = next((raw[e] for e in IMAGE_EXTENSIONS if raw.get(e)), None)
    if image is None:
        return [rejected("media_missing", "the sample has no image", {"id": row_id, **_shown(raw)})]
    caption = _text(raw.get("txt")) or _text(meta.get("caption"))
    if not caption:
        return [rejected("text_empty", "the sample has no caption", {"id": row_id})]
    if sink is None:
        raise RuntimeError("the webdataset format needs a media sink (its images are embedded)")
    uri = sink.put(image)
    return [
        {
            "id": row_id,
            "query": side(caption, source.query_instruction),
            "positive": side("", source.positive_instruction, [media("image", uri)]),
            "negatives": [],
        }
    ]


def _shown(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample without its bytes (a reject keeps the row, not the image)."""
    return {k: (v if not isinstance(v, bytes) else f"<{len(v)} bytes>") for k, v in raw.items()}


FORMAT = SourceFormat(
    "webdataset",
    (".tar",),
    FIELDS,
    convert,
    lambda raw: isinstance(raw, dict) and "__key__" in raw,
    embeds_media=True,
    max_chunk_rows=512,
)
