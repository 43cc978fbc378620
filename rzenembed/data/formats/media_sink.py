"""Where media that arrive inside data files (images in tar shards, image structs in
Parquet) are written: once, content-addressed, under the dataset's media root.

The file name is the sha256 of the bytes (``ab/abcdef....jpg``), so a worker that meets the
same image again, a rerun or another shard writing concurrently all name the same file,
and an existing file is never written twice. The records then point at these files like at
any other media, relative to the root the ingest version records as ``media_root``.
"""

from __future__ import annotations

import hashlib
import uuid

from rzenembed.data.media_fetch import remember
from rzenembed.data.storage import filesystem, resolve_media_uri

IMAGE_SUFFIXES = {b"\xff\xd8\xff": ".jpg", b"\x89PNG": ".png", b"RIFF": ".webp", b"GIF8": ".gif"}


def suffix_of(data: bytes, fallback: str = ".bin") -> str:
    """A file suffix from the bytes' signature (the declared name may lie)."""
    for magic, suffix in IMAGE_SUFFIXES.items():
        if data.startswith(magic):
            return suffix
    return fallback


class MediaSink:
    """Writes media bytes under ``root`` by content; returns their URI relative to it."""

    def __init__(self, root: str, endpoint_url: str | None = None):
        self.root = root
        self.endpoint_url = endpoint_url

    @staticmethod
    def address(data: bytes, suffix: str | None = None) -> str:
        """The relative URI ``data`` is stored under: its sha256, the suffix its bytes say."""
        digest = hashlib.sha256(data).hexdigest()
        return f"{digest[:2]}/{digest}{suffix or suffix_of(data)}"

    def put(self, data: bytes, suffix: str | None = None) -> str:
        relative = self.address(data, suffix)
        full = resolve_media_uri(self.root, relative)
        fs, path = filesystem(full, self.endpoint_url)
        # The one request kept before a write: a rerun (another shard of a changed source)
        # then uploads no image the store already has.
        if not fs.exists(path):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            _write_whole(fs, path, data)
        remember(full, data)  # ingest checks this image next: from memory, no GET
        return relative


def _write_whole(fs, path: str, data: bytes) -> None:
    """The file appears whole or not at all (another worker may be reading it already):
    an object-store PUT is; on a filesystem the bytes go to a temporary name first."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols:
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    temporary = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(temporary, "wb") as f:
        f.write(data)
    fs.mv(temporary, path)


class AddressOnlySink(MediaSink):
    """Names embedded media by the content address they would get and writes nothing: for
    looking at a source's first rows (``inspect-source``, ingest's media-root check)."""

    def __init__(self) -> None:
        super().__init__("")

    def put(self, data: bytes, suffix: str | None = None) -> str:
        return self.address(data, suffix)
