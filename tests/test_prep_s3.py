"""The ingest -> clean -> cap chain against a local S3 server (moto, in server mode, on
loopback) through s3fs: same rejects, same content digests as on a local disk."""

from __future__ import annotations

import pytest

from rzenembed.config import config_from_dict
from rzenembed.data.storage import filesystem
from rzenembed.prep.prepare import prepare_source

from .test_prep_pipeline import sample_config

pytestmark = pytest.mark.slow
DATASET = "sample-captions"


def s3_config(corpus, endpoint: str):
    local = sample_config(corpus, "unused")
    data = local.model_dump(mode="json")
    data["storage"] = {"root": "s3://rzenembed-test/versions", "endpoint_url": endpoint}
    for source in data["sources"]:
        source["uri"] = f"s3://rzenembed-test/corpus/{source['uri']}"
    return config_from_dict(data)


def test_chain_on_s3_matches_local_disk(ray_local, sample_corpus, s3_endpoint, tmp_path):
    fs, _ = filesystem("s3://rzenembed-test", s3_endpoint)
    if not fs.exists("rzenembed-test"):  # the session's S3 server is shared by the tests
        fs.mkdir("rzenembed-test")
    fs.put(str(sample_corpus.root / DATASET), f"rzenembed-test/corpus/{DATASET}", recursive=True)

    remote_cfg = s3_config(sample_corpus, s3_endpoint)
    remote_source = next(s for s in remote_cfg.sources if s.name == DATASET)
    remote = prepare_source(remote_cfg, remote_source, show_progress=False)

    local_cfg = sample_config(sample_corpus, str(tmp_path / "versions"))
    local_source = next(s for s in local_cfg.sources if s.name == DATASET)
    local = prepare_source(
        local_cfg, local_source, base=str(sample_corpus.root), show_progress=False
    )

    assert list(remote) == list(local) == ["ingest", "clean", "cap"]
    for step in local:
        assert remote[step].uri.startswith("s3://rzenembed-test/versions/")
        assert remote[step].content_digest == local[step].content_digest, step
        assert remote[step].manifest.reject_counts == local[step].manifest.reject_counts
    assert remote["ingest"].manifest.reject_counts == {
        "media_missing": 1,
        "media_undecodable": 1,
        "uri_escapes_root": 1,
    }
    assert fs.exists(remote["cap"].uri.removeprefix("s3://") + "/manifest.json")
    assert not fs.glob("rzenembed-test/versions/**/_staging-*")
    # Reading back through a fresh process-independent handle sees the same rows.
    assert remote["cap"].read_table().column("id").to_pylist() == (
        local["cap"].read_table().column("id").to_pylist()
    )
