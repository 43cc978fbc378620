"""Ingest/validate: a raw source becomes the first committed version of a dataset.

Each row is checked for shape and types, empty or oversized text, and every media item it
references: the URI must stay inside the source folder, the file must exist and decode
(images: header size checked before pixels are decoded; videos: the last frame must
decode). Good rows are normalised to ``RECORD_SCHEMA``; bad ones become rejects with a
reason code. A whole video's item gets its length as the range [0, length] (``start_s``,
``end_s``): the cap counts a video's clips before the split from it, without opening it.
Media are not copied: records keep URIs relative to the source folder, which the manifest
records as ``media_root``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rzenembed.config import PipelineConfig, SourceConfig, digest_of
from rzenembed.data import media as media_ops
from rzenembed.data.engine import run_shards
from rzenembed.data.formats import get_format
from rzenembed.data.importers import (
    FileScan,
    RowChunk,
    SourceError,
    combine_source_digest,
    file_sha256,
    file_uris,
    first_media_paths,
    list_source_files,
    media_listing,
    plan_chunks,
    read_chunk,
    scan_data_file,
    source_listing_digest,
    source_media_root,
    source_uri,
)
from rzenembed.data.media_facts import (
    FACTS_FOLDER,
    MediaFacts,
    facts_table,
    image_facts,
    video_facts,
)
from rzenembed.data.media_fetch import MediaFetcher, MediaMissing, windows
from rzenembed.data.record_checks import RowError, check_texts, normalise, record_sides
from rzenembed.data.storage import (
    UnsafeURIError,
    filesystem,
    frame_files,
    join,
    read_whole,
    resolve_media_uri,
)
from rzenembed.data.version import (
    DatasetVersion,
    InputRef,
    VersionNotFoundError,
    put_table,
    write_atomically,
)
from rzenembed.prep.base import ShardJob, committed, execute, plan_step, reject

STEP = "ingest"
CODE_VERSION = "3"  # 2: a whole video's length stamped on its item; 3: media facts for clean
# The row checks (``RowError``, ``normalise``, ``check_texts``) live in
# ``rzenembed.data.record_checks``, below ``inspect-source`` too; the clean and video steps
# still import ``RowError`` from here.


def run_ingest(
    cfg: PipelineConfig,
    source: SourceConfig,
    base: str | None = None,
    show_progress: bool = True,
) -> DatasetVersion:
    """Validate ``source`` into a new version (or return the committed one for the same input).

    Streaming: the driver only lists the source's files. One Ray task per data file (the
    files the format reads) counts its rows, hashes its bytes and notes where each shard's
    rows begin; files the format leaves as not data (img2dataset's ``.parquet`` next to its
    tars) are only hashed, since the source's digest, combined from those per-file digests,
    covers them whatever the format. Each shard task then reads its own rows straight from
    the file (a byte offset in JSONL, JSON arrays and tars, the covering row groups in
    Parquet, rows skipped in gzipped JSONL). No row ever passes through the driver. Shards
    hold ``prep.shard_rows`` rows and never cross a file.
    """
    uri = source_uri(source, base, cfg.data_root)
    endpoint = cfg.storage.endpoint_url
    fmt = get_format(source.format)
    section = {"source": source.model_dump(mode="json", exclude={"uri"}), "prep": _prep_knobs(cfg)}
    section_digest = digest_of(section)
    seen = SeenListing(cfg, source.name, uri, section_digest)
    if (known := seen.version()) is not None:
        return known  # the data files are the ones a committed version was ingested from
    listing = list_source_files(uri, source.format, endpoint)
    files, not_data = file_uris(uri, listing.data), file_uris(uri, listing.not_data)
    chunk_rows = min(cfg.prep.shard_rows, fmt.max_chunk_rows or cfg.prep.shard_rows)
    # Media inside the data files are written out under the storage root, content-addressed;
    # everything else is read where it is, from the source's media root.
    if fmt.embeds_media:
        media_root = join(cfg.storage.root, "_media", source.name)
    else:
        media_root = source_media_root(source, base, cfg.data_root)
    every = run_shards(
        _scan_job,
        [(f, endpoint, chunk_rows) for f in files] + [(f, endpoint, None) for f in not_data],
        max_in_flight=cfg.prep.max_in_flight,
        show_progress=show_progress,
    )
    scans = every[: len(files)]
    named = sorted((scan.path.rsplit("/", 1)[-1], scan.sha256) for scan in every)
    digest = combine_source_digest(named, media_listing(uri, endpoint))
    inputs = [InputRef(uri=uri, content_digest=digest)]
    plan = plan_step(cfg, STEP, source.name, CODE_VERSION, section_digest, inputs)
    if (done := committed(plan, cfg)) is not None:
        seen.remember(done)
        return done  # a committed version: its media were checked when it was written
    if not fmt.embeds_media:
        check_media_prefix(source, uri, media_root, endpoint)
    params = {
        "source": source,
        "root": media_root,
        "max_text_chars": cfg.prep.max_text_chars,
        "max_image_pixels": cfg.prep.max_image_pixels,
        "endpoint_url": endpoint,
    }

    def jobs(staging: str) -> list[ShardJob]:
        chunks = plan_chunks(scans, chunk_rows)
        sink = media_root if fmt.embeds_media else None
        # what clean needs of every media object, recorded beside the shards (media_facts)
        shard_params = {**params, "facts_uri": join(staging, FACTS_FOLDER)}
        return [
            ShardJob(
                c.name,
                staging,
                STEP,
                validate_rows,
                _ChunkLoader(source, c, endpoint, sink),
                shard_params,
                endpoint,
            )
            for c in chunks
        ]

    version = execute(
        plan,
        cfg,
        jobs,
        media_root=media_root,
        show_progress=show_progress,
        side_folders=(FACTS_FOLDER,),
    )
    seen.remember(version)
    return version


class SeenListing:
    """Which committed version a source's data-file listing was last ingested into.

    The full identity of a source hashes every data file and lists every media object: for
    a web crawl on an object store, terabytes read and millions of entries listed, on every
    run. Before that, ingest lists the source's top-level files once (``source_listing_
    digest``: names, sizes, ETags) and looks the listing up under ``<root>/<dataset>/ingest/
    _seen/``: a listing seen before, with the same config section and code, names its
    version, which is returned without a byte read. A new listing takes the full path and
    is remembered after the commit. A media object replaced under unchanged data files is
    not noticed this way (refresh the step)."""

    FOLDER = "_seen"

    def __init__(self, cfg: PipelineConfig, dataset: str, uri: str, section_digest: str):
        self.endpoint = cfg.storage.endpoint_url
        key = digest_of(
            {
                "listing": source_listing_digest(uri, self.endpoint),
                "section": section_digest,
                "code": CODE_VERSION,
            }
        )
        self.uri = join(cfg.storage.root, dataset, STEP, self.FOLDER, f"{key}.json")

    def version(self) -> DatasetVersion | None:
        fs, path = filesystem(self.uri, self.endpoint)
        try:
            found = json.loads(read_whole(fs, path))["version"]
            return DatasetVersion.open(found, self.endpoint)
        except (FileNotFoundError, VersionNotFoundError):
            return None  # never seen, or its version was deleted since

    def remember(self, version: DatasetVersion) -> None:
        fs, path = filesystem(self.uri, self.endpoint)
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        write_atomically(fs, path, json.dumps({"version": version.uri}))


def check_media_prefix(
    source: SourceConfig, uri: str, media_root: str, endpoint_url: str | None, rows: int = 20
) -> None:
    """Before any shard task: do the first rows' media paths resolve under the media root?
    If none of them does, the root is wrong for the whole source (MMEB-train rows name
    ``images/<subset>/...`` from the download's top folder, not from the subset's), and a
    run would reject every row one by one; this fails at once and says what was expected."""
    paths = first_media_paths(source, uri, rows, endpoint_url)
    if not paths:
        return
    for path in paths:  # the first that exists settles it: one request for a good source
        try:
            full = resolve_media_uri(media_root, path)
        except UnsafeURIError:
            continue
        fs, local = filesystem(full, endpoint_url)
        if fs.exists(local):
            return
    if paths:
        prefix = paths[0].split("/", 1)[0]
        raise SourceError(
            f"source {source.name!r}: none of the first {len(paths)} media paths exists under "
            f"the media root {media_root} (e.g. {paths[0]!r}); expected a folder "
            f"{prefix + '/'!r} there: set sources[].media_root to the folder the paths "
            "start from"
        )


def _scan_job(job: tuple[str, str | None, int | None]) -> FileScan:
    """A data file's scan; a file that is not data (no ``chunk_rows``) is only hashed."""
    path, endpoint, chunk_rows = job
    if chunk_rows is None:
        return FileScan(path, 0, file_sha256(path, endpoint), [])
    return scan_data_file(path, endpoint, chunk_rows)


def _prep_knobs(cfg: PipelineConfig) -> dict[str, Any]:
    return {
        "max_text_chars": cfg.prep.max_text_chars,
        "max_image_pixels": cfg.prep.max_image_pixels,
        "shard_rows": cfg.prep.shard_rows,
    }


@dataclass
class _ChunkLoader:
    """A picklable loader of one shard's raw rows, read on the worker."""

    source: SourceConfig
    chunk: RowChunk
    endpoint_url: str | None
    media_root: str | None = None  # where a format writes the media its files embed

    def __call__(self) -> list[tuple[int, Any]]:
        return read_chunk(self.source, self.chunk, self.endpoint_url, self.media_root)


def validate_rows(
    rows: list[tuple[int, Any]],
    shard: str,
    *,
    source: SourceConfig,
    root: str,
    max_text_chars: int,
    max_image_pixels: int,
    endpoint_url: str | None,
    facts_uri: str | None = None,
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Each raw row normalised and checked (texts, then media, fetched a window at a time);
    with ``facts_uri``, the facts of every media object checked go to ``<facts_uri>/
    <shard>.parquet`` (``rzenembed.data.media_facts``: clean reads them, not the media)."""
    kept, rejected = [], []
    facts: dict[str, MediaFacts] = {}
    # A raw row a format expanded into several records shares its position with them.
    extra = len(rows) - len({position for position, _ in rows})
    fetcher = MediaFetcher(endpoint_url)

    def refuse(order: int, position: int, raw: Any, err: RowError) -> None:
        shown = raw if isinstance(raw, dict) else {"value": raw}
        shown = shown.get("__raw__", shown)  # a format's reject: the row as it came
        rejected.append((order, reject(STEP, shown, err.reason, str(err), shard, position)))

    for window in windows(list(enumerate(rows))):
        shaped = []
        for order, (position, raw) in window:
            try:
                row = normalise(raw, source)
                check_texts(row, max_text_chars)
                shaped.append((order, position, raw, row))
            except RowError as err:
                refuse(order, position, raw, err)
        # the window's media in one concurrent batch, each distinct object once
        fetcher.prefetch(uri for *_, row in shaped for uri in media_uris(row, root))
        for order, position, raw, row in shaped:
            try:
                check_media(row, root, max_image_pixels, endpoint_url, fetcher, facts)
                kept.append(row)
            except RowError as err:
                refuse(order, position, raw, err)
    if facts_uri is not None:
        put_table(facts_uri, f"{shard}.parquet", facts_table(facts), endpoint_url)
    rejected = [r for _, r in sorted(rejected, key=lambda pair: pair[0])]
    return kept, rejected, {"extra_records": extra} if extra else {}


# --------------------------------------------------------------------------- media checks


def media_uris(row: dict[str, Any], root: str) -> list[str]:
    """The full URIs of a row's media files (folders of frames and URIs that escape the
    root left out: they are listed or refused where they are checked)."""
    uris = []
    for _, part in record_sides(row):
        for item in part["media"]:
            if item["kind"] == "frames" or not item.get("uri"):
                continue
            try:
                uris.append(resolve_media_uri(root, item["uri"]))
            except UnsafeURIError:
                continue
    return uris


def check_media(
    row: dict[str, Any],
    root: str,
    max_pixels: int,
    endpoint_url: str | None,
    fetcher: MediaFetcher | None = None,
    facts: dict[str, MediaFacts] | None = None,
) -> None:
    """Every media item of the row exists inside the root and decodes (``fetcher``: where
    the bytes were prefetched, else each is read now). ``facts``: each object's facts by
    full URI, added to as objects are checked; an object already there (another row's)
    passed its check and is not decoded again."""
    for where, part in record_sides(row):
        for i, item in enumerate(part["media"]):
            label = f"{where}.media[{i}] {item['uri']!r}"
            try:
                full = resolve_media_uri(root, item["uri"])
            except UnsafeURIError as exc:
                raise RowError("uri_escapes_root", f"{label}: {exc}") from None
            if item["kind"] == "frames" and not item.get("frames"):
                _check_frame_folder(full, label, max_pixels, endpoint_url)
                continue
            known = facts.get(full) if facts is not None else None
            if known is None:
                data = read_media(full, label, endpoint_url, fetcher)
                known = _measured(data, item, label, max_pixels)
                if facts is not None:
                    facts[full] = known
            if known.kind == "video" and item.get("start_s") is None and item.get("end_s") is None:
                item["start_s"], item["end_s"] = 0.0, known.duration_s


def _measured(data: bytes, item: dict[str, Any], label: str, max_pixels: int) -> MediaFacts:
    """An object's facts once it decodes (an image) or probes whole (a video)."""
    try:
        if item["kind"] == "image":
            return image_facts(data, media_ops.decode_image(data, max_pixels=max_pixels))
        return video_facts(data, media_ops.probe_video(data).duration_s)
    except media_ops.MediaError as exc:
        raise RowError(exc.reason, f"{label}: {exc}") from None


def _check_frame_folder(uri: str, label: str, max_pixels: int, endpoint_url: str | None) -> None:
    """A folder of frames must hold images; its first and last decode."""
    files = frame_files(uri, endpoint_url)
    if not files:
        raise RowError("media_missing", f"{label}: no frame images in the folder")
    for file in {files[0], files[-1]}:
        try:
            media_ops.decode_image(read_media(file, label, endpoint_url), max_pixels=max_pixels)
        except media_ops.MediaError as exc:
            raise RowError(exc.reason, f"{label}: {file.rsplit('/', 1)[-1]}: {exc}") from None


def read_media(
    uri: str, label: str, endpoint_url: str | None, fetcher: MediaFetcher | None = None
) -> bytes:
    """The bytes of one media file: from ``fetcher`` when given, else one GET (no HEAD)."""
    try:
        if fetcher is not None:
            return fetcher.read(uri)
        fs, path = filesystem(uri, endpoint_url)
        return read_whole(fs, path)
    except (FileNotFoundError, MediaMissing, IsADirectoryError):
        raise RowError("media_missing", f"{label}: file not found") from None
