"""Media reads counted on the wire: ingest fetches every distinct media object of an image
source on S3 once per shard, with a GET and never a HEAD; clean fetches none (it judges the
pictures from the facts ingest measured, ``rzenembed.data.media_facts``), so ingest and
clean together make one request per object; training's collation fetches each picture of a
batch once.

The source is shaped like a VQA dataset with hard negatives: pictures asked about by two
questions each (one object, two rows), and a negative picture per row. Everything goes
through a counting proxy in front of the session's S3 server (``tests/s3_proxy.py``).
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from rzenembed.config import config_from_dict
from rzenembed.data.schema import media, record, side
from rzenembed.data.storage import filesystem
from rzenembed.prep.clean import run_clean
from rzenembed.prep.ingest import run_ingest
from rzenembed.training.collate import SourceInfo, collate

from .s3_proxy import CountingProxy

pytestmark = pytest.mark.slow
BUCKET, PICTURES = "rzenembed-media-requests", 8
MEDIA = f"/{BUCKET}/vqa/media/"


def picture(seed: int) -> bytes:
    """A sharp 96x96 picture of random blocks (no blur reject, no near copy of another)."""
    blocks = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(blocks.repeat(8, 0).repeat(8, 1), "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def flat_picture() -> bytes:
    """A uniform grey picture: clean rejects it as blurry (no edges at all)."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (128, 128, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def vqa_rows() -> list[dict]:
    """Two questions per picture; each row's negative is the next picture. Then a copy of
    the first row under another id (clean: ``duplicate_exact``) and a question on a flat
    picture (clean: ``image_blurry``): 18 rows, 9 objects."""
    rows = []
    for k in range(PICTURES):
        image = [media("image", f"media/p{k}.png")]
        negative = side(media_items=[media("image", f"media/p{(k + 1) % PICTURES}.png")])
        for q, question in enumerate(("What is in the top left corner?", "How many colours?")):
            query = side(question, "Answer the question about the image:", image)
            answer = side(f"answer {k}.{q}")
            rows.append(record(f"vqa-{k}-{q}", "vqa", "image_qa", query, answer, [negative]))
    rows.append({**rows[0], "id": "vqa-copy"})
    flat_image = [media("image", "media/flat.png")]
    flat = side("What colour is it?", "Answer the question about the image:", flat_image)
    rows.append(record("vqa-flat", "vqa", "image_qa", flat, side("grey"), []))
    return rows


ROWS, KEPT = 2 * PICTURES + 2, 2 * PICTURES
CLEAN_REJECTS = {"duplicate_exact": 1, "image_blurry": 1}


@pytest.fixture(scope="module")
def source_on_s3(s3_endpoint):
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for k in range(PICTURES):
        fs.pipe_file(f"{BUCKET}/vqa/media/p{k}.png", picture(k))
    fs.pipe_file(f"{BUCKET}/vqa/media/flat.png", flat_picture())
    fs.pipe_file(
        f"{BUCKET}/vqa/records.jsonl", "".join(json.dumps(r) + "\n" for r in vqa_rows()).encode()
    )
    return f"s3://{BUCKET}/vqa"


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    return CountingProxy((host, int(port)))


def config(source_uri, proxy, shard_rows: int, versions: str = "versions", **source):
    """One source on S3 (the VQA source unless ``source`` says otherwise), the storage root
    beside it, every request through ``proxy``."""
    source = {"name": "vqa", "task_group": "image_qa", "stage": "stage2", **source}
    return config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "storage": {"root": f"s3://{BUCKET}/{versions}", "endpoint_url": proxy.endpoint},
            "sources": [{**source, "uri": source_uri}],
            "prep": {"shard_rows": shard_rows, "decontaminate": []},
        }
    )


@pytest.fixture(scope="module")
def cfg(source_on_s3, proxy):
    return config(source_on_s3, proxy, shard_rows=6)


def media_requests(proxy: CountingProxy) -> Counter:
    return proxy.requests_to(MEDIA)


def per_shard_objects(version) -> Counter:
    """GET counts if each shard task fetched every distinct picture its rows name once."""
    expected: Counter = Counter()
    for shard in version.manifest.shards:
        names = set()
        for row in version.read_shard(shard).to_pylist():
            for part in [row["query"], row["positive"], *row["negatives"]]:
                names.update(m["uri"] for m in part["media"])
        expected.update(("GET", f"/{BUCKET}/vqa/{name}") for name in names)
    return expected


@pytest.fixture(scope="module")
def prepared(ray_local, cfg, proxy):
    proxy.reset()
    ingested = run_ingest(cfg, cfg.sources[0], show_progress=False)
    at_ingest = media_requests(proxy)
    proxy.reset()
    cleaned = run_clean(cfg, ingested, show_progress=False)
    return ingested, at_ingest, cleaned, media_requests(proxy)


def test_ingest_fetches_each_picture_of_a_shard_once_with_a_get(prepared):
    ingested, requests, _, _ = prepared
    assert ingested.rows == ROWS and ingested.manifest.rejected == 0
    assert len(ingested.manifest.shards) == 3  # pictures named by two shards: fetched by both
    # no HEAD, and one GET per picture and shard (a row's negative or a second question on
    # the same picture costs nothing more)
    assert requests == per_shard_objects(ingested)
    assert sum(requests.values()) < 2 * 2 * PICTURES + 3  # rows name 35 pictures


def test_clean_fetches_no_picture(prepared, s3_endpoint):
    ingested, _, cleaned, requests = prepared
    assert cleaned.rows == KEPT  # two questions on one picture are two examples
    assert cleaned.manifest.reject_counts == CLEAN_REJECTS
    assert requests == Counter()
    # what it judged from: one table of facts per shard, every picture the shard names
    fs, _ = filesystem(ingested.uri, s3_endpoint)
    facts = sorted(fs.find(f"{ingested.uri.removeprefix('s3://')}/media-facts"))
    assert [f.rsplit("/", 1)[-1] for f in facts] == [
        f"{s.path.rsplit('/', 1)[-1]}" for s in ingested.manifest.shards
    ]


def test_ingest_and_clean_of_one_shard_fetch_each_picture_once(source_on_s3, proxy, ray_local):
    """The acceptance reading: a source whose rows fit one shard costs one GET per picture
    through ingest and clean together."""
    cfg = config(source_on_s3, proxy, shard_rows=ROWS, versions="one-shard")
    proxy.reset()
    cleaned = run_clean(cfg, run_ingest(cfg, cfg.sources[0], show_progress=False), False)
    assert cleaned.rows == KEPT and cleaned.manifest.reject_counts == CLEAN_REJECTS
    names = [f"p{k}.png" for k in range(PICTURES)] + ["flat.png"]
    assert media_requests(proxy) == Counter({("GET", f"{MEDIA}{n}"): 1 for n in names})


def test_clean_judges_a_version_without_facts_from_the_media(prepared, cfg, proxy, s3_endpoint):
    """A version ingested before ingest recorded facts is cleaned from the pictures
    themselves (fetched once per shard), to the same rows and the same rejects."""
    ingested, _, cleaned, _ = prepared
    fs, _ = filesystem(ingested.uri, s3_endpoint)
    folder = f"{ingested.uri.removeprefix('s3://')}/media-facts"
    saved = {path: fs.cat_file(path) for path in fs.find(folder)}
    # another blur threshold that judges these pictures alike: a version computed afresh
    prep = cfg.prep.model_copy(update={"blur_threshold": cfg.prep.blur_threshold + 1e-6})
    fs.rm(folder, recursive=True)
    proxy.reset()
    try:
        again = run_clean(cfg.model_copy(update={"prep": prep}), ingested, show_progress=False)
    finally:
        for path, data in saved.items():
            fs.pipe_file(path, data)
    assert media_requests(proxy) == per_shard_objects(ingested)
    assert again.uri != cleaned.uri
    assert (
        again.read_table().column("id").to_pylist() == cleaned.read_table().column("id").to_pylist()
    )
    details = [r["detail"] for v in (again, cleaned) for r in v.read_rejects().to_pylist()]
    assert details[:2] == details[2:] and len(details) == 4, details


def test_training_reads_each_picture_of_a_batch_once(prepared, proxy, cfg):
    from concurrent.futures import ThreadPoolExecutor

    _, _, cleaned, _ = prepared
    rows = cleaned.read_table().to_pylist()
    info = SourceInfo(
        name="vqa",
        task_group="image_qa",
        media_root=cleaned.manifest.stats["media_root"],
        group_semantics="none",
        max_negatives=1,
        endpoint_url=proxy.endpoint,
    )
    proxy.reset()
    with ThreadPoolExecutor(8) as pool:
        batch = collate(rows, info, hard_negatives=1, max_frames=2, reads=pool)
    assert len(batch.queries) == len(batch.negatives) == 2 * PICTURES
    # one batch of 16 rows naming 8 pictures 32 times: 8 GETs, no HEAD
    assert media_requests(proxy) == Counter(
        {("GET", f"{MEDIA}p{k}.png"): 1 for k in range(PICTURES)}
    )


def test_images_a_tar_shard_embeds_are_written_once_and_never_fetched_back(
    ray_local, proxy, s3_endpoint, tmp_path
):
    """img2dataset shards on S3: ingest writes each embedded image under the content-
    addressed media root (a HEAD, then a PUT for a new object) and checks it from the bytes
    it just wrote: no GET under the media root."""
    from . import format_fixtures

    format_fixtures.webdataset(tmp_path / "tars")
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    fs.put(str(tmp_path / "tars"), f"{BUCKET}/tars", recursive=True)
    cfg = config(
        f"s3://{BUCKET}/tars",
        proxy,
        4,
        "tar-versions",
        name="laion",
        format="webdataset",
        task_group="image_retrieval",
        stage="stage1",
    )
    proxy.reset()
    version = run_ingest(cfg, cfg.sources[0], show_progress=False)
    media = proxy.requests_to(f"/{BUCKET}/tar-versions/_media/laion/")
    written = {path for (method, path) in media if method == "PUT"}
    stored = {p for p in fs.find(f"{BUCKET}/tar-versions/_media/laion") if "." in p[-5:]}
    assert len(written) == len(stored) >= 3, (media, stored)  # each new image, once
    assert not [key for key in media if key[0] == "GET"], media  # none fetched back
    assert version.rows == 3 and version.manifest.rejected == 4, version.manifest.reject_counts
