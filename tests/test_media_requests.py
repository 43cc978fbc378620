"""Media reads counted on the wire: ingest, clean and training's collation each fetch every
distinct media object of an image source on S3 at most once, with a GET and never a HEAD.

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


def vqa_rows() -> list[dict]:
    """Two questions per picture; each row's negative is the next picture."""
    rows = []
    for k in range(PICTURES):
        image = [media("image", f"media/p{k}.png")]
        negative = side(media_items=[media("image", f"media/p{(k + 1) % PICTURES}.png")])
        for q, question in enumerate(("What is in the top left corner?", "How many colours?")):
            query = side(question, "Answer the question about the image:", image)
            answer = side(f"answer {k}.{q}")
            rows.append(record(f"vqa-{k}-{q}", "vqa", "image_qa", query, answer, [negative]))
    return rows


@pytest.fixture(scope="module")
def source_on_s3(s3_endpoint):
    fs, _ = filesystem(f"s3://{BUCKET}", s3_endpoint)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for k in range(PICTURES):
        fs.pipe_file(f"{BUCKET}/vqa/media/p{k}.png", picture(k))
    fs.pipe_file(
        f"{BUCKET}/vqa/records.jsonl", "".join(json.dumps(r) + "\n" for r in vqa_rows()).encode()
    )
    return f"s3://{BUCKET}/vqa"


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    host, port = s3_endpoint.removeprefix("http://").split(":")
    return CountingProxy((host, int(port)))


@pytest.fixture(scope="module")
def cfg(source_on_s3, proxy):
    return config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "storage": {"root": f"s3://{BUCKET}/versions", "endpoint_url": proxy.endpoint},
            "sources": [
                {"name": "vqa", "uri": source_on_s3, "task_group": "image_qa", "stage": "stage2"}
            ],
            "prep": {"shard_rows": 6, "decontaminate": []},
        }
    )


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
    assert ingested.rows == 2 * PICTURES and ingested.manifest.rejected == 0
    assert len(ingested.manifest.shards) == 3  # pictures named by two shards: fetched by both
    # no HEAD, and one GET per picture and shard (a row's negative or a second question on
    # the same picture costs nothing more)
    assert requests == per_shard_objects(ingested)
    assert sum(requests.values()) < 2 * 2 * PICTURES  # rows name 32 pictures


def test_clean_fetches_each_picture_of_a_shard_once_with_a_get(prepared):
    ingested, _, cleaned, requests = prepared
    assert cleaned.rows == 2 * PICTURES  # two questions on one picture are two examples
    assert requests == per_shard_objects(ingested)


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
