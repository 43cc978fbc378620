"""Check a downloaded source before a long run: its first rows through the format's
importer, without writing anything.

``inspect_source`` reads the first ``rows`` raw rows of the folder's data files (the ones
ingest reads: ``importers.list_source_files``; file then row order, streaming), converts
them with the format, runs the ingest checks that need no decoding (shape, texts, where
each media item would be read and whether it is there) and reports the converted records,
the reject reasons met, the media paths and the files it ignored as not data (a file some
other format would read, such as img2dataset's ``.parquet`` next to its tars: ingest
ignores it too, and the report says so rather than hiding it). Media a format embeds
are named by the content address they would get, and not written. A folder whose rows do
not look like the format at all (none of the first rows has the format's fields) raises
``SourceError`` naming the fields the format expects and the keys the first row has.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rzenembed.config import SourceConfig
from rzenembed.data.formats import REJECT_KEY, convert, get_format
from rzenembed.data.formats.media_sink import AddressOnlySink
from rzenembed.data.importers import SourceError, first_raw_rows, list_source_files
from rzenembed.data.record_checks import RowError, check_texts, normalise
from rzenembed.data.storage import UnsafeURIError, filesystem, frame_files, resolve_media_uri

NOT_DATA_NAMED = 5  # how many of the files ignored as not data a report names


@dataclass
class Inspection:
    format: str
    rows_read: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    rejects: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # reason -> first detail
    media: list[tuple[str, bool]] = field(default_factory=list)  # (path, found)
    # Files a format could read but this one does not (img2dataset's .parquet and
    # _stats.json next to its tars): how many, and the first few names.
    not_data: int = 0
    not_data_names: list[str] = field(default_factory=list)


def inspect_source(
    uri: str, fmt: str, rows: int = 5, endpoint_url: str | None = None, **options: Any
) -> Inspection:
    """The first ``rows`` rows of the source at ``uri`` read as format ``fmt`` (``options``:
    the source's format settings, as in ``sources[]``)."""
    form = get_format(fmt)
    source = SourceConfig(
        name="inspect", uri=uri, format=fmt, task_group="text_retrieval", **options
    )
    listing = list_source_files(uri, fmt, endpoint_url)
    fs, _ = filesystem(uri, endpoint_url)
    report = Inspection(fmt, not_data=len(listing.not_data))
    report.not_data_names = [p.rsplit("/", 1)[-1] for p in listing.not_data[:NOT_DATA_NAMED]]
    recognised, first_keys = 0, None
    sink = AddressOnlySink() if form.embeds_media else None
    for position, raw in enumerate(first_raw_rows(fs, listing.data, rows)):
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
