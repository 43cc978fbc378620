"""Model folders on the storage root: published atomically, readable from any node.

Adapters, merged and souped models, and evaluation reports are folders under
``storage.root`` (a local path or ``s3://``). A step writes its folder on local disk
first, then ``publish_folder`` copies it to its URI and commits it:

- **Commit marker.** ``_COMMITTED.json`` is written last and lists every file with its
  size, plus the folder's content digests (``digest``, ``weights_digest``).
  A folder without the marker is not there: a crash mid-upload leaves nothing a reader
  would take, and a rerun publishes again. On a local disk the folder is assembled under
  a temporary sibling name and renamed into place.
- **Staging.** ``stage_folder`` gives a local copy of a folder: a local URI is used where
  it is; a remote one is downloaded once into a cache keyed by its content digest (from
  the marker; a folder written by someone else, a base model put on S3 by hand, is keyed
  by its listing: names, sizes, ETags) and reused by every later call on that machine.
  A GPU worker loading the merged stage-1 model therefore reads it from S3 once, never
  from another node's disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from rzenembed.data.storage import filesystem, is_remote, join

COMMIT_FILE = "_COMMITTED.json"
CACHE_ENV = "RZENEMBED_CACHE"


class FolderNotPublishedError(FileNotFoundError):
    """No committed folder at a URI."""


def cache_root() -> Path:
    """Where remote folders are staged on this machine (``RZENEMBED_CACHE`` or
    ``~/.cache/rzenembed/staged``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rzenembed" / "staged")


def _listing(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of the folder with its size. Sizes, not hashes: the marker's digests
    (``digest``, ``weights_digest``) already identify the content, and hashing every file
    again would read a multi-GB model twice at each publish."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMMIT_FILE)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size} for p in files}


def publish_folder(
    local: str | Path, uri: str, endpoint_url: str | None = None, **info: Any
) -> dict[str, Any]:
    """Copy the finished local folder ``local`` to ``uri`` and commit it; returns the
    marker (file list and ``info``, e.g. the folder's digests). Publishing over a
    committed folder is refused: published folders are immutable."""
    local = Path(local)
    marker = {"files": _listing(local), **info}
    text = json.dumps(marker, indent=2, sort_keys=True) + "\n"
    if is_published(uri, endpoint_url):
        raise FileExistsError(f"{uri} is already published; published folders are immutable")
    if not is_remote(uri):
        target = Path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            shutil.copytree(local, staging, dirs_exist_ok=True)
            (staging / COMMIT_FILE).write_text(text)
            if target.exists():  # an uncommitted leftover of a crashed run
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return marker
    fs, path = filesystem(uri, endpoint_url)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # an uncommitted leftover
    for name in marker["files"]:
        fs.put_file(str(local / name), join(path, name))
    with fs.open(join(path, COMMIT_FILE), "w") as f:  # the commit point
        f.write(text)
    return marker


def published_info(uri: str, endpoint_url: str | None = None) -> dict[str, Any] | None:
    """The commit marker of the folder at ``uri``, or None when it is not committed."""
    fs, path = filesystem(uri, endpoint_url)
    marker = join(path, COMMIT_FILE)
    if not fs.exists(marker):
        return None
    with fs.open(marker, "r") as f:
        return json.loads(f.read())


def is_published(uri: str, endpoint_url: str | None = None) -> bool:
    return published_info(uri, endpoint_url) is not None


def listing_digest(uri: str, endpoint_url: str | None = None) -> str:
    """A digest of a folder's listing (names, sizes, ETags or mtimes), for folders the
    pipeline did not publish."""
    fs, path = filesystem(uri, endpoint_url)
    found = fs.find(path, detail=True)
    if not found:
        raise FolderNotPublishedError(f"no folder at {uri}")
    rows = sorted(
        (p[len(path) :], i.get("size"), str(i.get("ETag") or i.get("mtime") or ""))
        for p, i in found.items()
    )
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def stage_folder(uri: str, endpoint_url: str | None = None, cache: Path | None = None) -> Path:
    """A local folder holding the folder at ``uri`` (downloaded once per content)."""
    if not is_remote(uri):
        folder = Path(uri)
        if not folder.is_dir():
            raise FolderNotPublishedError(f"model folder not found: {uri}")
        return folder
    info = published_info(uri, endpoint_url)
    key = (info or {}).get("digest") or listing_digest(uri, endpoint_url)
    target = (cache or cache_root()) / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        download_folder(uri, partial, endpoint_url, info)
        try:
            partial.rename(target)
        except OSError:  # another process staged it first
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def download_folder(
    uri: str, target: Path, endpoint_url: str | None = None, info: dict[str, Any] | None = None
) -> Path:
    """Copy every file of the remote folder at ``uri`` (the marker's list when committed)
    into the local folder ``target``."""
    fs, path = filesystem(uri, endpoint_url)
    names = (
        list(info["files"])
        if info
        else [p[len(path) :].lstrip("/") for p in fs.find(path) if not p.endswith(COMMIT_FILE)]
    )
    for name in names:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(join(path, name), str(target / name))
    return target


def read_text(uri: str, endpoint_url: str | None = None) -> str:
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


def write_text(uri: str, text: str, endpoint_url: str | None = None) -> None:
    """Write a small text file whole (a temporary name and a rename locally; one PUT on S3)."""
    from rzenembed.data.version import write_atomically

    fs, path = filesystem(uri, endpoint_url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    write_atomically(fs, path, text)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    fs, path = filesystem(uri, endpoint_url)
    return fs.exists(path)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Write a file whole: locally under a temporary name renamed into place (a crash never
    leaves a truncated file); on S3 one PUT."""
    fs, path = filesystem(uri, endpoint_url)
    parent = path.rsplit("/", 1)[0]
    if not is_remote(uri):
        Path(parent).mkdir(parents=True, exist_ok=True)
        partial = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        Path(partial).write_bytes(data)
        os.replace(partial, path)
        return
    with fs.open(path, "wb") as f:
        f.write(data)
