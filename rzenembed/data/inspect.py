"""Check a downloaded source before a long run: its first rows through the format's
importer, without writing anything.

``inspect_source`` reads the first ``rows`` raw rows of the folder (file then row order,
streaming), converts them with the format, runs the ingest checks that need no decoding
(shape, texts, where each media item would be read and whether it is there) and reports
the converted records, the reject reasons met and the media paths. Media a format embeds
are named by the content address they would get, and not written. A folder whose rows do
not look like the format at all (none of the first rows has the format's fields) raises
``SourceError`` naming the fields the format expects and the keys the first row has.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats import REJECT_KEY, convert, get_format
from rzenembed.data.formats.media_sink import MediaSink
from rzenembed.data.importers import SourceError, rows_of_file, source_files
from rzenembed.data.storage import UnsafeURIError, filesystem, frame_files, resolve_media_uri


class _DrySink(MediaSink):
    """Names embedded media by content, writes nothing."""

    def put(self, data: bytes, suffix: str | None = None) -> str:
        return self.address(data, suffix)


@dataclass
class Inspection:
    format: str
    rows_read: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first detail
    media: list[tuple[str, bool]] = field(default_factory=list)  # (path, found)


def inspect_source(
    uri: str, fmt: str, rows: int = 5, endpoint_url: str | None = None, **options: Any
) -> Inspection:
    from rzenembed.prep.ingest import RowError, check_texts, normalise

    form = get_format(fmt)
    source = SourceConfig(
        name="inspect", uri=uri, format=fmt, task_group="text_retrieval", **options
    )
    files = [f for f in source_files(uri, endpoint_url) if f.endswith(form.suffixes)]
    if not files:
        raise SourceError(f"{uri}: no {' or '.join(form.suffixes)} files for format {fmt!r}")
    fs, _ = filesystem(uri, endpoint_url)
    raws = itertools.islice((r for f in files for r in rows_of_file(fs, f)), rows)
    report = Inspection(fmt)
    recognised, first_keys = 0, None
    sink = _DrySink("") if form.embeds_media else None
    for position, raw in enumerate(raws):
        report.rows_read += 1
        if first_keys is None:
            first_keys = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        recognised += form.looks_right(raw)
        for converted in convert(source, raw, position, sink):
            try:
                if isinstance(converted, dict) and REJECT_KEY in converted:
                    raise RowError(converted[REJECT_KEY], converted["__detail__"])
                record = normalise(converted, source)
                check_texts(record, 10**9)
            except RowError as err:
                report.rejects[err.reason] += 1
                report.examples.setdefault(err.reason, str(err))
                continue
            report.records.append(record)
            if not form.embeds_media:
                report.media.extend(_media_of(record, uri, endpoint_url))
    if report.rows_read and not recognised:
        raise SourceError(
            f"{uri} does not look like format {fmt!r}: expected {form.fields}; "
            f"the first row has {first_keys}"
        )
    return report


def _media_of(record: dict[str, Any], root: str, endpoint_url: str | None):
    sides = [record["query"], record["positive"], *record["negatives"]]
    for item in (m for s in sides for m in s["media"]):
        try:
            full = resolve_media_uri(root, item["uri"])
        except UnsafeURIError:
            yield item["uri"], False
            continue
        if item["kind"] == "frames" and not item.get("frames"):
            yield item["uri"], bool(frame_files(full, endpoint_url))
        else:
            fs, path = filesystem(full, endpoint_url)
            yield item["uri"], fs.exists(path)


def first_media_paths(
    source: SourceConfig, uri: str, rows: int, endpoint_url: str | None = None
) -> list[str]:
    """The media paths the first ``rows`` rows of ``source`` name (converted by its format;
    rows a format rejects name none)."""
    form = get_format(source.format)
    files = [f for f in source_files(uri, endpoint_url) if f.endswith(form.suffixes)]
    fs, _ = filesystem(uri, endpoint_url)
    paths: list[str] = []
    raws = itertools.islice((r for f in files for r in rows_of_file(fs, f)), rows)
    for position, raw in enumerate(raws):
        for record in convert(source, raw, position, _DrySink("")):
            if not isinstance(record, dict) or REJECT_KEY in record:
                continue
            for key in ("query", "positive"):
                side = record.get(key)
                if isinstance(side, dict):
                    paths += [m["uri"] for m in side.get("media") or [] if m.get("uri")]
    return paths
