"""One location check for what clients and dataset rows name: ``file`` and ``s3`` only, no
chained URL, inside a root after normalisation (``..`` resolved) and after following links. A
refused location opens nothing: every file the check or the reader touches is recorded
(``open``, ``os.open``, ``os.stat``, fsspec's opens and reads) and none lies outside the
roots."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import fsspec
import pytest

from rzenembed.data.storage import UnsafeURIError, allowed_location, resolve_media_uri
from rzenembed.serving.protocol import LocationReader, RequestError


@pytest.fixture()
def layout(tmp_path):
    root = tmp_path / "root"
    (root / "media").mkdir(parents=True)
    (root / "media" / "inside.png").write_bytes(b"inside")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"secret")
    (root / "media" / "link.png").symlink_to(outside)
    (root / "media" / "dir-link").symlink_to(tmp_path)
    return root, outside


def hostile(root: Path, outside: Path) -> list[str]:
    media = root / "media"
    return [
        f"file://{outside}",
        f"zip://{media}/inside.png::{outside}",
        f"tar://{media}/inside.png::/etc/passwd",
        f"file://{media}/inside.png::file:///etc/passwd",
        "file:///etc/passwd",
        f"file://{media}/link.png",
        f"file://{media}/dir-link/outside.bin",
        f"file://{media}/../../outside.bin",
        "http://127.0.0.1:9/image.png",
        "https://example.com/a.png",
        "memory://inside.png",
        "s3://some-bucket/key.png",
        "file://media/inside.png",
        "",
    ]


@pytest.fixture()
def opened(monkeypatch):
    """Every path the code under test opens, stats or reads."""
    seen: list[str] = []
    real_open, real_os_open, real_stat = builtins.open, os.open, os.stat

    def spy_open(file, *args, **kwargs):
        seen.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(path, *args, **kwargs):
        seen.append(str(path))
        return real_os_open(path, *args, **kwargs)

    def spy_stat(path, *args, **kwargs):
        seen.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(os, "stat", spy_stat)
    for name in ("open", "cat_file", "size", "info"):
        original = getattr(fsspec.AbstractFileSystem, name)

        def spy(self, path, *args, _original=original, **kwargs):
            seen.append(str(path))
            return _original(self, path, *args, **kwargs)

        monkeypatch.setattr(fsspec.AbstractFileSystem, name, spy)
    return seen


def test_every_escape_is_refused_alike_and_opens_nothing(layout, opened):
    root, outside = layout
    reader = LocationReader([str(root)])
    for location in hostile(root, outside):
        with pytest.raises(RequestError) as error:
            reader.read(location, "input[0].image", 1 << 20)
        assert str(error.value) == "input[0].image: not an allowed location", location
        assert error.value.status == 400
    touched = [p for p in opened if "outside" in p or p.startswith(("/etc", "http"))]
    assert touched == [], touched


def test_a_location_inside_reads_and_an_oversized_one_is_413(layout):
    root, _ = layout
    reader = LocationReader([str(root)])
    assert reader.read(f"file://{root}/media/inside.png", "image", 100) == b"inside"
    with pytest.raises(RequestError) as error:
        reader.read(f"file://{root}/media/inside.png", "image", 3)
    assert error.value.status == 413 and "more than the 3 allowed" in str(error.value)


def test_locations_can_be_turned_off(layout):
    root, _ = layout
    reader = LocationReader([str(root)], enabled=False)
    with pytest.raises(RequestError, match="locations are turned off"):
        reader.read(f"file://{root}/media/inside.png", "image", 100)


def test_dataset_rows_are_held_to_the_same_rule(layout):
    """Ingest resolves a row's media URI with the same check: a chained URL or a link out
    of the dataset folder is a reject, a plain relative path is not."""
    root, outside = layout
    assert resolve_media_uri(str(root), "media/inside.png") == str(root / "media" / "inside.png")
    refused = [
        "media/inside.png::/etc/passwd",
        "media/link.png",
        "../outside.bin",
        f"zip://{root}/a::{outside}",
        "http://host/a.png",
    ]
    for uri in refused:
        with pytest.raises(UnsafeURIError):
            resolve_media_uri(str(root), uri)
    s3_root = "s3://bucket/dataset"
    assert resolve_media_uri(s3_root, "images/a.png") == "s3://bucket/dataset/images/a.png"
    for uri in ("images/../../other/a.png", "s3://other-bucket/a.png", "file:///etc/passwd"):
        with pytest.raises(UnsafeURIError):
            resolve_media_uri(s3_root, uri)
    with pytest.raises(UnsafeURIError, match=r"^not an allowed location$"):
        allowed_location("s3://bucket/other/a.png", [s3_root, str(root)])
