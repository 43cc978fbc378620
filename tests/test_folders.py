"""Published model folders on a local disk and on S3 (moto): commit marker, staging by
digest, loading a model from S3, and verification that never trusts a staged copy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rzenembed.data.folders import (
    COMMIT_FILE,
    is_published,
    publish_folder,
    published_info,
    stage_folder,
)
from rzenembed.data.storage import filesystem
from rzenembed.modeling.digest import digests_of, model_digest
from rzenembed.tracking import LineageRef
from rzenembed.verify import CHANGED, MISSING, OK, check_folder

BUCKET = "rzenembed-folders"


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    fs.mkdir(BUCKET)
    return fs


def test_a_local_publish_appears_whole_and_is_immutable(tiny_model_dir, tmp_path):
    target = tmp_path / "store" / "model"
    target.mkdir(parents=True)
    (target / "half-written.bin").write_bytes(b"x")  # a crashed run's leftover, no marker
    assert not is_published(str(target))
    marker = publish_folder(tiny_model_dir, str(target), **digests_of(tiny_model_dir))
    assert not (target / "half-written.bin").exists()
    assert (target / COMMIT_FILE).is_file() and "model.safetensors" in marker["files"]
    assert published_info(str(target))["digest"] == model_digest(str(target))
    with pytest.raises(FileExistsError, match="immutable"):
        publish_folder(tiny_model_dir, str(target))
    assert stage_folder(str(target)) == target  # a local folder is used where it is


def test_a_model_on_s3_is_staged_once_and_loads_like_the_local_one(
    tiny_model_dir, tiny_model_config, s3, s3_endpoint, tmp_path, monkeypatch, capsys
):
    from rzenembed.cli import main
    from rzenembed.modeling import RzenEmbedder

    monkeypatch.setenv("RZENEMBED_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/models/tiny"
    assert main(["publish", str(tiny_model_dir), uri, "--endpoint-url", s3_endpoint]) == 0
    assert "published" in capsys.readouterr().out
    digests = digests_of(tiny_model_dir)
    assert published_info(uri, s3_endpoint)["digest"] == digests["digest"]
    # The digest of a published remote folder comes from its marker: nothing downloaded.
    assert model_digest(uri, s3_endpoint, weights_only=True) == digests["weights_digest"]
    assert not (tmp_path / "cache").exists()
    staged = stage_folder(uri, s3_endpoint)
    assert staged == tmp_path / "cache" / digests["digest"]
    assert stage_folder(uri, s3_endpoint) == staged  # the second call reuses the copy
    remote = RzenEmbedder.from_pretrained(uri, config=tiny_model_config, endpoint_url=s3_endpoint)
    local = RzenEmbedder.from_pretrained(tiny_model_dir, config=tiny_model_config)
    texts = ["a red circle", "two blue squares"]
    torch.testing.assert_close(remote.encode(texts), local.encode(texts))
    assert remote.base_uri == uri  # an adapter trained on it names the URI, not the cache


def test_verify_downloads_a_remote_model_afresh(
    tiny_model_dir, s3, s3_endpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("RZENEMBED_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/models/checked"
    digests = digests_of(tiny_model_dir)
    publish_folder(tiny_model_dir, uri, s3_endpoint, **digests)
    stage_folder(uri, s3_endpoint)  # a staged copy exists, keyed by the recorded digest
    ref = LineageRef("model", "checked", uri, digests["digest"])
    assert check_folder(ref, uri, s3_endpoint).status == OK
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    s3.pipe(f"{BUCKET}/models/checked/config.json", json.dumps(config).encode())
    assert check_folder(ref, uri, s3_endpoint).status == CHANGED
    s3.rm(f"{BUCKET}/models/checked", recursive=True)
    assert check_folder(ref, uri, s3_endpoint).status == MISSING


def test_an_unpublished_remote_folder_is_staged_by_its_listing(
    tiny_model_dir, s3, s3_endpoint, tmp_path
):
    s3.put(str(tiny_model_dir), f"{BUCKET}/models/by-hand", recursive=True)
    uri = f"s3://{BUCKET}/models/by-hand"
    assert not is_published(uri, s3_endpoint)
    staged = stage_folder(uri, s3_endpoint, cache=tmp_path / "cache")
    assert model_digest(str(staged)) == digests_of(tiny_model_dir)["digest"]
    shutil.rmtree(staged)


def _stage_in_a_process(uri: str, endpoint: str, cache: str, out: str) -> None:
    """One node-local process staging the folder (spawned: nothing shared but the disk)."""
    from pathlib import Path

    from rzenembed.data.folders import stage_folder

    Path(out).write_text(str(stage_folder(uri, endpoint, cache=Path(cache))))


def test_four_processes_staging_at_once_download_once_and_share_the_verified_copy(
    tiny_model_dir, s3, s3_endpoint, tmp_path
):
    import multiprocessing

    uri = f"s3://{BUCKET}/models/shared"
    marker = publish_folder(tiny_model_dir, uri, s3_endpoint, **digests_of(tiny_model_dir))
    assert all(len(entry["sha256"]) == 64 for entry in marker["files"].values())
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"staged{i}.txt" for i in range(4)]
    procs = [
        ctx.Process(target=_stage_in_a_process, args=(uri, s3_endpoint, str(cache), str(o)))
        for o in outs
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0, 0]
    staged = {o.read_text() for o in outs}
    assert staged == {str(cache / marker["digest"])}
    fetches = [json.loads(line) for line in (cache / "fetch.log").read_text().splitlines()]
    assert len(fetches) == 1 and fetches[0]["uri"] == uri
    assert fetches[0]["files"] == len(marker["files"])
    assert model_digest(staged.pop()) == marker["digest"]


def test_a_corrupted_cached_file_is_found_and_staged_again(
    tiny_model_dir, s3, s3_endpoint, tmp_path, caplog
):
    uri = f"s3://{BUCKET}/models/corrupted"
    publish_folder(tiny_model_dir, uri, s3_endpoint, **digests_of(tiny_model_dir))
    cache = tmp_path / "cache"
    staged = stage_folder(uri, s3_endpoint, cache=cache)
    weights = staged / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-8] + b"\x00" * 8)  # bytes flipped in place
    with caplog.at_level("WARNING", logger="rzenembed.data.folders"):
        again = stage_folder(uri, s3_endpoint, cache=cache)
    assert again == staged and weights.read_bytes() == good
    assert "model.safetensors" in caplog.text and "staging it again" in caplog.text
    assert len((cache / "fetch.log").read_text().splitlines()) == 2


def test_a_download_that_differs_from_the_marker_is_refused_naming_the_file(
    tiny_model_dir, s3, s3_endpoint, tmp_path
):
    from rzenembed.data.folders import StagingError

    uri = f"s3://{BUCKET}/models/tampered"
    publish_folder(tiny_model_dir, uri, s3_endpoint, **digests_of(tiny_model_dir))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["tampered"] = True  # another file's bytes after the commit
    s3.pipe(f"{BUCKET}/models/tampered/config.json", json.dumps(config).encode())
    cache = tmp_path / "cache"
    with pytest.raises(StagingError, match=r"config\.json has (other content|\d+ bytes)"):
        stage_folder(uri, s3_endpoint, cache=cache)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing half-staged is left
