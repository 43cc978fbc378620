"""An unchanged source costs one listing: ingest looks up the listing of the source's data
files (names, sizes, ETags) before hashing any file or listing any media object, and a
listing seen before returns the version it was ingested into. On S3 (through the counting
proxy) that is one LIST of the source folder and no GET of a source object."""

from __future__ import annotations

import shutil

import pytest

from rzenembed.data.storage import filesystem
from rzenembed.prep import ingest

from .s3_proxy import CountingProxy
from .test_prep_pipeline import sample_config
from .test_prep_s3 import s3_config

pytestmark = pytest.mark.slow
DATASET = "sample-captions"


def seen_record(proxy: CountingProxy) -> str:
    (path,) = [p for _, p in proxy.paths if "/ingest/_seen/" in p]
    return path


def refuse(what: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"an unchanged source was {what}")

    return refused


def test_a_seen_listing_returns_its_version_without_reading_the_source(
    ray_local, sample_corpus, tmp_path, monkeypatch
):
    corpus = tmp_path / "corpus"
    shutil.copytree(sample_corpus.root / DATASET, corpus / DATASET)
    cfg = sample_config(sample_corpus, str(tmp_path / "versions"))
    source = next(s for s in cfg.sources if s.name == DATASET)
    first = ingest.run_ingest(cfg, source, base=str(corpus))
    seen = list((tmp_path / "versions" / DATASET / "ingest" / "_seen").glob("*.json"))
    assert len(seen) == 1

    with monkeypatch.context() as patch:
        patch.setattr(ingest, "run_shards", refuse("scanned"))
        patch.setattr(ingest, "media_listing", refuse("listed to its media"))
        again = ingest.run_ingest(cfg, source, base=str(corpus), show_progress=False)
    assert again.uri == first.uri

    records = corpus / DATASET / "records.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join(lines[:-1]))  # one row fewer: a new listing and content
    changed = ingest.run_ingest(cfg, source, base=str(corpus), show_progress=False)
    assert changed.uri != first.uri
    assert changed.manifest.stats["rows_in"] == first.manifest.stats["rows_in"] - 1
    assert len(list(seen[0].parent.glob("*.json"))) == 2


def test_on_s3_an_unchanged_source_costs_one_listing_and_no_read(
    ray_local, sample_corpus, s3_endpoint
):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = CountingProxy((host, int(port)))
    fs, _ = filesystem("s3://rzenembed-test", s3_endpoint)
    if not fs.exists("rzenembed-test"):
        fs.mkdir("rzenembed-test")
    fs.put(str(sample_corpus.root / DATASET), f"rzenembed-test/seen/{DATASET}", recursive=True)
    cfg = s3_config(sample_corpus, proxy.endpoint)
    data = cfg.model_dump(mode="json")
    data["storage"]["root"] = "s3://rzenembed-test/seen-versions"
    for s in data["sources"]:
        s["uri"] = s["uri"].replace("/corpus/", "/seen/")
    cfg = type(cfg).model_validate(data)
    source = next(s for s in cfg.sources if s.name == DATASET)
    first = ingest.run_ingest(cfg, source, show_progress=False)
    proxy.reset()
    again = ingest.run_ingest(cfg, source, show_progress=False)
    assert again.uri == first.uri
    # one listing of the source folder, the seen record, the version's manifest: no data
    # file hashed, no media object listed or read, no HEAD
    manifest = f"{first.uri.removeprefix('s3:/')}/manifest.json"
    assert proxy.paths == {
        ("GET", "/rzenembed-test"): 1,  # ListObjectsV2 of the source folder's top level
        ("GET", seen_record(proxy)): 1,
        ("GET", manifest): 1,
    }, proxy.paths
