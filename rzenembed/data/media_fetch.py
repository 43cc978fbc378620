"""Media bytes for a shard's rows: fetched ahead, concurrently, one GET per distinct object.

On an object store each ``fs.open(...).read()`` costs a HEAD and a GET, one after another:
at 25 ms a request, a shard of 2048 image rows with negatives waits minutes on the network
while its CPU idles. A step instead hands the media URIs of a window of rows to
``MediaFetcher.prefetch``, which fetches the distinct ones in one concurrent batch
(``fs.cat``: a GET each, no HEAD, at most ``concurrency`` in flight), then reads them from
memory. An image several rows share is fetched once per window, and the previous window's
bytes stay for a neighbour that repeats it. Memory is bounded by the window, not the shard.
Media this process has just written (``remember``: the sink of a format that embeds its
images) are read from memory, never fetched back.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import OrderedDict
from collections.abc import Iterable

from fsspec.asyn import sync

from rzenembed.data.storage import filesystem, is_remote

# Rows whose media are fetched together (and held in memory at once).
WINDOW_ROWS = 64
# Requests in flight per task: enough to hide 25 ms of latency behind a core's decode work.
CONCURRENCY = 32


# Bytes this process wrote to the store lately (``remember``), held at most this much.
WRITTEN_HELD_BYTES = 256 << 20


class _Written:
    """Media bytes this process just wrote, by full URI, the oldest dropped first past a
    byte budget. A format that embeds its media (tar shards, Parquet image structs) writes
    each image through the sink, and ingest then checks the same image: it finds the bytes
    here instead of fetching back what it sent a moment ago (a GET per image at 25 ms)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: OrderedDict[str, bytes] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()

    def add(self, uri: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        with self.lock:
            old = self.items.pop(uri, None)
            self.size += len(data) - (len(old) if old is not None else 0)
            self.items[uri] = data
            while self.size > self.limit:
                _, dropped = self.items.popitem(last=False)
                self.size -= len(dropped)

    def get(self, uri: str) -> bytes | None:
        with self.lock:
            return self.items.get(uri)


_written = _Written(WRITTEN_HELD_BYTES)


def remember(uri: str, data: bytes) -> None:
    """Note that ``data`` is now stored at the full ``uri`` (by this process): a later
    fetch of ``uri`` here reads these bytes. Only for content that cannot change under that
    name (content-addressed media)."""
    _written.add(uri, data)


class MediaMissing(Exception):
    """A media object that does not exist (the caller turns it into ``media_missing``)."""


class MediaFetcher:
    """Bytes of full media URIs, prefetched by window (see the module docstring)."""

    def __init__(self, endpoint_url: str | None, concurrency: int = CONCURRENCY):
        self.endpoint_url = endpoint_url
        self.concurrency = concurrency
        self._current: dict[str, bytes | BaseException] = {}
        self._previous: dict[str, bytes | BaseException] = {}

    def prefetch(self, uris: Iterable[str]) -> None:
        """Fetch the distinct ``uris`` not already held, all at once; what an earlier
        window held is kept one more window."""
        uris = list(uris)  # read twice below; callers pass generators
        held = {**self._previous, **self._current}
        wanted = sorted({u for u in uris if u not in held})
        self._previous, self._current = self._current, {u: held[u] for u in uris if u in held}
        for uri in wanted:  # what this process just wrote is not fetched back
            written = _written.get(uri)
            if written is not None:
                self._current[uri] = written
        wanted = [u for u in wanted if u not in self._current]
        got = fetch_whole(wanted, self.endpoint_url, self.concurrency)
        self._current.update(zip(wanted, got, strict=True))

    def read(self, uri: str) -> bytes:
        """The bytes of ``uri`` (fetched now when no window held it)."""
        found = self._current.get(uri, self._previous.get(uri))
        if found is None:
            self.prefetch([*self._current, uri])
            found = self._current[uri]
        if isinstance(found, FileNotFoundError):
            raise MediaMissing(uri)
        if isinstance(found, BaseException):
            raise found
        return found


def fetch_whole(
    uris: list[str], endpoint_url: str | None, concurrency: int = CONCURRENCY
) -> list[bytes | BaseException]:
    """The bytes of each full URI, in order, fetched concurrently with one GET each on an
    object store; a missing or unreadable object gives its exception in its place."""
    out: dict[str, bytes | BaseException] = {}
    by_fs: dict[tuple[str, bool], list[str]] = {}
    for uri in uris:
        by_fs.setdefault((uri.split("://", 1)[0], is_remote(uri)), []).append(uri)
    for (_, remote), group in by_fs.items():
        fs, _ = filesystem(group[0], endpoint_url)
        paths = [filesystem(u, endpoint_url)[1] for u in group] if remote else group
        if getattr(fs, "async_impl", False):
            got = sync(fs.loop, _cat_all, fs, paths, concurrency)
        else:
            got = [_read_local(fs, p) for p in paths]
        out.update(zip(group, got, strict=True))
    return [out[u] for u in uris]


async def _cat_all(fs, paths: list[str], concurrency: int) -> list[bytes | BaseException]:
    """One GET per path (``_cat_file``: no HEAD, no glob expansion of names holding ``[``
    or ``*``), at most ``concurrency`` at once; errors returned in their path's place."""
    gate = asyncio.Semaphore(concurrency)
    takes = "max_concurrency" in inspect.signature(fs._cat_file).parameters
    one_connection = {"max_concurrency": 1} if takes else {}  # else s3fs asks the size: a HEAD

    async def one(path: str) -> bytes | BaseException:
        async with gate:
            try:
                return await fs._cat_file(path, **one_connection)
            except Exception as error:  # handed to the row that asked for it
                return error

    return await asyncio.gather(*(one(p) for p in paths))


def _read_local(fs, path: str) -> bytes | BaseException:
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as error:
        return FileNotFoundError(str(error))
    except OSError as error:
        return error


def windows(items: list, size: int = WINDOW_ROWS) -> Iterable[list]:
    """``items`` in consecutive slices of ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
