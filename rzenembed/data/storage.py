"""Filesystem access through fsspec: the same code on a local folder and on ``s3://``.

S3 endpoints and credentials come from the environment or the standard AWS configuration
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ``~/.aws``...), never from a config file. A custom
endpoint (a local S3 server, MinIO) is taken from the ``endpoint_url`` argument (from
``storage.endpoint_url``) or from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.

Reads by byte range (``Storage``)
    Opening an S3 object as a file (``fs.open``, or pyarrow reading through the filesystem)
    costs one or two HEAD requests and reads through s3fs's read-ahead cache, whose 50 MiB
    blocks turn a 256 KiB Parquet row group into the rest of the shard. Readers that know
    which bytes they need (from a Parquet footer) ask ``Storage`` for exactly those ranges:
    one GET each, no HEAD, several ranges sent concurrently; a footer is one suffix-range
    GET. On a local disk the same calls are a seek and a read.
"""

from __future__ import annotations

import functools
import inspect
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec import AbstractFileSystem


class UnsafeURIError(ValueError):
    """A media URI that would escape its dataset root."""


def storage_options(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``uri``: only the S3 endpoint, credentials stay with botocore."""
    if not uri.startswith("s3://"):
        return {}
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def filesystem(uri: str, endpoint_url: str | None = None) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving ``uri`` and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri, endpoint_url))
    return fs, path


def shared_filesystem(protocol: str, endpoint_url: str | None = None) -> AbstractFileSystem:
    """One filesystem per (protocol, endpoint) in this process, built on first use: readers
    that run per row must not resolve a URI into a filesystem on every call."""
    return _filesystem_of_process(protocol, endpoint_url, os.getpid())


@functools.cache
def _filesystem_of_process(protocol: str, endpoint_url: str | None, pid: int) -> AbstractFileSystem:
    # Keyed by process id: a forked child must not reuse its parent's S3 client (the event
    # loop thread serving it stayed in the parent).
    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    return fsspec.filesystem(protocol, **options)


@dataclass(frozen=True)
class Storage:
    """A root folder on a filesystem (and the endpoint serving it), read by byte range."""

    fs: AbstractFileSystem
    root: str  # the root's path inside ``fs``
    endpoint_url: str | None = None

    @classmethod
    def at(cls, uri: str, endpoint_url: str | None = None) -> Storage:
        """The storage holding ``uri`` as its root; the filesystem is the process's shared
        one for that protocol and endpoint (``endpoint_url`` or the environment's)."""
        protocol = uri.split("://", 1)[0] if "://" in uri else "file"
        endpoint = storage_options(uri, endpoint_url).get("client_kwargs", {}).get("endpoint_url")
        _, root = filesystem(uri, endpoint_url)
        return cls(shared_filesystem(protocol, endpoint), root, endpoint)

    @property
    def is_local(self) -> bool:
        """Whether paths name local files (that Arrow can open and read natively)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocols

    def path(self, relative: str) -> str:
        """The path inside ``fs`` of ``relative`` (to the root)."""
        return join(self.root, relative)

    def read_ranges(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes ``[start, end)`` of each range of the file at ``path``, in order: one
        GET each on S3 (sent concurrently), no HEAD."""
        if len(ranges) == 1:
            start, end = ranges[0]
            return [self.fs.cat_file(path, start=start, end=end)]
        starts = [start for start, _ in ranges]
        ends = [end for _, end in ranges]
        return self.fs.cat_ranges([path] * len(ranges), starts, ends, on_error="raise")

    def read_tail(self, path: str, length: int) -> bytes:
        """The last ``length`` bytes of the file at ``path`` (the whole file when shorter):
        one suffix-range GET on S3, which needs no size, so no HEAD."""
        if length <= 0:
            raise ValueError(f"length must be > 0, got {length}")
        return self.fs.cat_file(path, start=-length)


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI with forward slashes (local or remote)."""
    return posixpath.join(uri.rstrip("/"), *parts) if parts else uri


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


ALLOWED_SCHEMES = ("file", "s3")  # what a dataset row or a client may name


def _split(uri: str) -> tuple[str, str]:
    """(scheme, path) of a URI; a plain path is ``file``."""
    scheme, sep, rest = uri.partition("://")
    return (scheme.lower(), rest) if sep else ("file", uri)


def resolve_media_uri(root: str, uri: str) -> str:
    """The full URI of a media file referenced by a record of the dataset at ``root``
    (or by a client, against one of its roots: ``allowed_location``).

    Relative URIs are resolved against the root; absolute ones must name the root's store.
    Refused (``UnsafeURIError``): an empty URI, a chained URL (``zip://a::s3://b``: fsspec
    would open the inner one through the outer), a scheme other than ``file`` and ``s3``,
    another store than the root's, and a path outside the root once normalised (``..``
    resolved: ``media/../media/a.png`` stays inside, ``../a.png`` does not); on a local
    disk also a path whose real path (symlinks followed) leaves the root's real path.
    The message never names the root: rejects must read the same on every store, and a
    client must learn nothing of the server's layout.
    """
    if not uri:
        raise UnsafeURIError("empty media URI")
    if "::" in uri:
        raise UnsafeURIError(f"media URI {uri!r} is a chained URL")
    base = root.rstrip("/")
    absolute = "://" in uri or uri.startswith("/")
    scheme, path = _split(uri if absolute else base + "/" + uri)
    root_scheme, root_path = _split(base)
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeURIError(f"media URI {uri!r} uses scheme {scheme!r}, not file or s3")
    if scheme != root_scheme:
        raise UnsafeURIError(f"media URI {uri!r} is on another store than the dataset root")
    normal, normal_root = posixpath.normpath(path), posixpath.normpath(root_path)
    if not _inside(normal, normal_root):
        raise UnsafeURIError(f"media URI {uri!r} escapes the dataset root")
    if scheme == "file":
        if not _inside(os.path.realpath(normal), os.path.realpath(normal_root)):
            raise UnsafeURIError(f"media URI {uri!r} leaves the dataset root through a link")
        return normal
    return f"{scheme}://{normal}"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


NOT_ALLOWED = "not an allowed location"


def allowed_location(location: str, roots: Sequence[str]) -> str:
    """The full URI of a location a client sent, when it lies under one of ``roots``
    (``resolve_media_uri``'s rules, the location taken as absolute); otherwise
    ``UnsafeURIError`` saying only that it is not an allowed location."""
    scheme, path = _split(location)
    absolute = location if scheme != "file" else path
    if scheme == "file" and not absolute.startswith("/"):
        raise UnsafeURIError(NOT_ALLOWED)
    for root in roots:
        try:
            return resolve_media_uri(root, absolute)
        except UnsafeURIError:
            continue
    raise UnsafeURIError(NOT_ALLOWED)


FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def natural_key(name: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: ``frame_2`` before ``frame_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def frame_files(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The image files of a folder of video frames, in natural order, as full URIs (a
    folder that does not exist or holds no image gives an empty list)."""
    fs, path = filesystem(uri, endpoint_url)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    frames = sorted(
        (n for n in names if n.lower().endswith(FRAME_SUFFIXES)),
        key=lambda n: natural_key(n.rsplit("/", 1)[-1]),
    )
    scheme = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return [f"{scheme}{n}" if scheme and not n.startswith(scheme) else n for n in frames]


def read_whole(fs: AbstractFileSystem, path: str) -> bytes:
    """A whole object in one request: a GET, no HEAD. s3fs asks for the size first (a HEAD)
    to split big objects into concurrent ranged GETs unless told to use one connection;
    media objects are small enough for one GET, and a HEAD would double the requests."""
    if "max_concurrency" in inspect.signature(fs.cat_file).parameters:
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)
