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
  it is; a remote one is downloaded once per node into a cache keyed by its content digest
  (from the marker; a folder written by someone else, a base model put on S3 by hand, is
  keyed by its listing: names, sizes, ETags) and reused by every later call on that node.
  Eight ranks and eight evaluation actors of one node asking at once take a per-node file
  lock: one downloads, the others wait (a line every 30 s) and then use its copy. The
  download goes to a temporary folder, every file is checked against the marker (size, and
  sha256 for folders published with hashes) and only then renamed into place; a mismatch
  is an error naming the files. Each download appends a line to ``fetch.log`` in the cache.
  A cache hit compares every file's size and modification time with what was verified; a
  file changed since (a corrupted cache) is reported by name and the folder staged again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rzenembed.data.storage import filesystem, is_remote, join, read_whole

COMMIT_FILE = "_COMMITTED.json"
CACHE_ENV = "RZENEMBED_CACHE"
FETCH_LOG = "fetch.log"  # one JSON line per download into a node's cache
logger = logging.getLogger(__name__)


class FolderNotPublishedError(FileNotFoundError):
    """No committed folder at a URI."""


def cache_root() -> Path:
    """Where remote folders are staged on this machine (``RZENEMBED_CACHE`` or
    ``~/.cache/rzenembed/staged``)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rzenembed" / "staged")


def _listing(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of the folder with its size and sha256: what a node that stages the
    folder checks its download against (reading a freshly written local folder once more
    costs seconds per GB; a corrupted download found only at load time costs a run)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMMIT_FILE)
    return {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in files
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


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


class StagingError(OSError):
    """A downloaded folder that does not match what was published."""


def stage_folder(uri: str, endpoint_url: str | None = None, cache: Path | None = None) -> Path:
    """A local folder holding the folder at ``uri`` (downloaded once per content and node,
    verified)."""
    if not is_remote(uri):
        folder = Path(uri)
        if not folder.is_dir():
            raise FolderNotPublishedError(f"model folder not found: {uri}")
        return folder
    info = published_info(uri, endpoint_url)
    key = (info or {}).get("digest") or listing_digest(uri, endpoint_url)
    root = cache or cache_root()
    target = root / key
    if target.is_dir() and not _changed_since_verified(root, key):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _node_lock(root / f".{key}.lock", uri):
        if target.is_dir():
            changed = _changed_since_verified(root, key)
            if not changed:
                return target  # staged by another process while this one waited
            logger.warning(
                "staged copy of %s in %s changed since it was verified (%s): staging it again",
                uri,
                target,
                ", ".join(changed),
            )
            shutil.rmtree(target)
        _download_verified(uri, root, key, endpoint_url, info)
    return target


def _download_verified(
    uri: str, root: Path, key: str, endpoint_url: str | None, info: dict[str, Any] | None
) -> None:
    """Download into a temporary folder, check every file, record what was verified, log
    the fetch, rename into place."""
    partial = root / f".{key}.{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    try:
        expected = download_folder(uri, partial, endpoint_url, info)
        problems = _mismatches(partial, expected)
        if problems:
            raise StagingError(
                f"{uri}: the download does not match what was published: {'; '.join(problems)}"
            )
        _write_stamp(root, key, partial)
        partial.rename(root / key)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    entry = {
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "uri": uri,
        "key": key,
        "files": len(expected),
        "bytes": sum(e.get("size") or 0 for e in expected.values()),
        "seconds": round(time.monotonic() - started, 3),
    }
    with (root / FETCH_LOG).open("a") as log:
        log.write(json.dumps(entry) + "\n")


def _mismatches(folder: Path, expected: dict[str, dict[str, Any]]) -> list[str]:
    """Every file of ``expected`` that is missing, of another size or (when the marker has
    hashes) other bytes."""
    problems = []
    for name, want in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif want.get("size") is not None and path.stat().st_size != want["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {want['size']}")
        elif want.get("sha256") and _sha256(path) != want["sha256"]:
            problems.append(f"{name} has other content (sha256)")
    return problems


def _stamp_path(root: Path, key: str) -> Path:
    return root / f".{key}.verified.json"


def _file_stats(folder: Path) -> dict[str, list[int]]:
    return {
        p.relative_to(folder).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _write_stamp(root: Path, key: str, folder: Path) -> None:
    _stamp_path(root, key).write_text(json.dumps(_file_stats(folder), sort_keys=True))


def _changed_since_verified(root: Path, key: str) -> list[str]:
    """The files of a staged folder whose size or modification time differ from when it
    was verified (every file, when there is no record)."""
    stamp = _stamp_path(root, key)
    now = _file_stats(root / key)
    if not stamp.is_file():
        return sorted(now) or ["(empty folder)"]
    then = json.loads(stamp.read_text())
    return sorted(n for n in set(now) | set(then) if now.get(n) != then.get(n))


@contextlib.contextmanager
def _node_lock(path: Path, uri: str, report_every_s: float = 30.0) -> Iterator[None]:
    """An exclusive lock on ``path`` shared by every process of this node (``flock``):
    the holder stages, the others wait and say so."""
    with path.open("a") as handle:
        waited, started = 0.0, time.monotonic()
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.2)
                if time.monotonic() - started - waited >= report_every_s:
                    waited = time.monotonic() - started
                    logger.info("waiting %.0f s for another process staging %s", waited, uri)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def download_folder(
    uri: str, target: Path, endpoint_url: str | None = None, info: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Copy every file of the remote folder at ``uri`` (the marker's list when committed)
    into the local folder ``target``; returns what each file should be (the marker's
    entries, or the sizes the store lists)."""
    fs, path = filesystem(uri, endpoint_url)
    if info:
        expected = dict(info["files"])
    else:
        found = fs.find(path, detail=True)
        expected = {
            p[len(path) :].lstrip("/"): {"size": entry.get("size")}
            for p, entry in found.items()
            if not p.endswith(COMMIT_FILE)
        }
    for name in expected:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(join(path, name), str(target / name))
    return expected


def read_text(uri: str, endpoint_url: str | None = None) -> str:
    fs, path = filesystem(uri, endpoint_url)
    with fs.open(path, "r", encoding="utf-8") as f:
        return f.read()


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """A whole file in one request (``storage.read_whole``: on S3 one GET, no HEAD)."""
    fs, path = filesystem(uri, endpoint_url)
    return read_whole(fs, path)


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
