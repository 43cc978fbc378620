"""What every source format is made of: ``SourceFormat`` and the reject marker.

The format modules import this, never the package (``rzenembed.data.formats``, whose
registry imports them), so the formats have no import cycle among themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rzenembed.data.raw_files import JSONL_SUFFIXES

REJECT_KEY = "__reject__"

__all__ = ["JSONL_SUFFIXES", "REJECT_KEY", "SourceFormat", "rejected"]


def rejected(reason: str, detail: str, raw: Any) -> dict[str, Any]:
    """A raw row a format cannot use: ingest turns it into a reject with ``reason``."""
    shown = raw if isinstance(raw, dict) else {"value": raw}
    return {REJECT_KEY: reason, "__detail__": detail, "__raw__": shown}


@dataclass(frozen=True)
class SourceFormat:
    """One source format: its data files, what a row holds, how it becomes records."""

    name: str
    # The top-level files of a source folder the format reads as rows (a format that reads
    # JSON Lines reads all of ``JSONL_SUFFIXES``). The folder's other files are media, or,
    # when some format would read them (``raw_files.READABLE_SUFFIXES``), reported as not
    # data: img2dataset's ``.parquet`` and ``_stats.json`` next to its tars.
    suffixes: tuple[str, ...]
    fields: str  # what a row must hold, for error messages and ``inspect-source``
    # (raw row, source, position, media sink) -> records or reject markers
    convert: Callable[..., list[Any]]
    looks_right: Callable[[Any], bool] = lambda raw: isinstance(raw, dict)
    # Media arrive inside the data files (tar members, image structs): they are written
    # into ``<storage.root>/_media/<source name>/`` (content-addressed), the version's
    # media root, instead of being read from the source folder.
    embeds_media: bool = False
    max_chunk_rows: int | None = None  # rows of a shard task when rows carry media bytes
