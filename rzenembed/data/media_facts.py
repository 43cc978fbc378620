"""What clean needs to know about each media object, measured where its bytes already are.

Ingest reads and decodes every media object of a source to check it. Clean needs the same
bytes again (the exact-duplicate key covers them) and the decoded image (size, blur and
pHash checks): on an object store a second request per object, millions for MegaPairs, and
a second decode. So ingest records, for every object it checked, what clean uses: the
bytes' SHA-256, an image's upright size, the variance of its Laplacian and its pHash, a
video's duration. They go beside the version's shards, one small table per shard
(``media-facts/<shard>.parquet``, keyed by the object's full URI), and clean reads that
table instead of the media. Facts are measurements, not verdicts: clean applies its own
thresholds. A version without them (ingested by older code) and folders of frames are
cleaned from the bytes as before.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import pyarrow as pa
from PIL import Image

from rzenembed.data import media as media_ops
from rzenembed.data.media_fetch import fetch_whole
from rzenembed.data.storage import join

FACTS_FOLDER = "media-facts"
FACTS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("sha256", pa.string()),
        ("kind", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sharpness", pa.float64()),
        ("phash", pa.uint64()),
        ("duration_s", pa.float64()),
    ]
)


@dataclass(frozen=True)
class MediaFacts:
    """One media object's measurements (image fields None for a video and vice versa)."""

    sha256: str
    kind: str
    width: int | None = None
    height: int | None = None
    sharpness: float | None = None
    phash: int | None = None
    duration_s: float | None = None

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256)


def image_facts(data: bytes, image: Image.Image) -> MediaFacts:
    """Facts of a decoded image (``media.decode_image``'s upright RGB result)."""
    return MediaFacts(
        sha256=hashlib.sha256(data).hexdigest(),
        kind="image",
        width=image.width,
        height=image.height,
        sharpness=media_ops.laplacian_variance(image),
        phash=media_ops.perceptual_hash(image),
    )


def video_facts(data: bytes, duration_s: float) -> MediaFacts:
    return MediaFacts(hashlib.sha256(data).hexdigest(), "video", duration_s=duration_s)


def facts_path(shard: str) -> str:
    """Where a shard's facts lie, relative to the version (or its staging area)."""
    return f"{FACTS_FOLDER}/{shard}.parquet"


def facts_table(facts: dict[str, MediaFacts]) -> pa.Table:
    rows = [{"uri": uri, **asdict(f)} for uri, f in sorted(facts.items())]
    return pa.Table.from_pylist(rows, schema=FACTS_SCHEMA)


def read_facts(version_uri: str, shard: str, endpoint_url: str | None) -> dict[str, MediaFacts]:
    """A shard's facts by full URI: one GET; empty when the version has none (a version
    written before ingest recorded them, or by a step that does not)."""
    import pyarrow.parquet as pq

    (data,) = fetch_whole([join(version_uri, facts_path(shard))], endpoint_url)
    if isinstance(data, FileNotFoundError):
        return {}
    if isinstance(data, BaseException):
        raise data
    table = pq.read_table(pa.BufferReader(data))
    return {row.pop("uri"): MediaFacts(**row) for row in table.cast(FACTS_SCHEMA).to_pylist()}
