"""A preparation rehearsal at scale against an object store's latency: image rows on S3
through ingest, clean and cap, every request counted.

Run from the repository root (``--rows 10000``: about 5 minutes on 2 CPU cores; at
``--rows 100000`` writing the 50k pictures to moto alone takes some 9 minutes):

    python benchmarks/prep_rehearsal.py [--rows 100000] [--latency-ms 25] [--slots 2]
        [--shard-rows 2000] [--size 64]

A local S3 server (moto in server mode, in its own process, on 127.0.0.1) holds a
source shaped like a VQA dataset with hard negatives: ``--rows`` rows, two questions on each
picture (``--rows / 2`` distinct ``--size`` px PNGs of random blocks: sharp, none a near
copy of another) and the next picture as each row's negative. The pictures and the records
are written to the server directly; the pipeline reads and writes through the counting
proxy of the tests (``tests/s3_proxy.py``), which holds every request ``--latency-ms``
before forwarding it, as an object store's time to first byte would (S3: 20-30 ms).
``storage.root`` is on the same server: every step's reads and writes pay it too.

The steps run one after another on a local Ray with ``--slots`` CPUs (``prep.max_in_flight``
none: every slot busy). For each: wall time, rows per second and per second per slot,
requests by method and on the media (GET and HEAD per distinct picture), bytes fetched per
distinct picture. Then the projection to the paper's preparation on 48 slots at the same
latency, from the measured per-slot rate of each step (the per-picture work, decode and
hashes, dominates: the latency is hidden by each task's concurrent fetches).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.s3_proxy import CountingProxy, s3_server  # noqa: E402 - the tests' proxy, with latency

BUCKET = "prep-rehearsal"
SLOTS_AT_SCALE = 48
# The paper's preparation in distinct pictures a step reads (configs/paper-data.yaml):
# stage 1 is 2M LAION pairs (one picture each) and 2.5M MegaPairs triplets (query picture,
# target picture and up to 4 hard-negative pictures: about 6 reads a row, many shared);
# stage 2 is MMEB-train at 100k a dataset (20 datasets, one or two pictures a row).
PAPER_PICTURES = {
    "stage 1 (LAION 2M + MegaPairs 2.5M x 6)": 2_000_000 + 2_500_000 * 6,
    "stage 2 (MMEB-train, 20 x 100k x 1.5)": 20 * 100_000 * 3 // 2,
}


def machine() -> str:
    return (
        f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    )


def picture(seed: int, size: int) -> bytes:
    blocks = np.random.default_rng(seed).integers(0, 255, (size // 8, size // 8, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(blocks.repeat(8, 0).repeat(8, 1), "RGB").save(out, "PNG")
    return out.getvalue()


def vqa_rows(rows: int) -> list[dict]:
    from rzenembed.data.schema import media, record, side

    pictures = max(1, rows // 2)
    out = []
    for n in range(rows):
        k = n // 2
        image = [media("image", f"media/p{k:07d}.png")]
        negative = side(media_items=[media("image", f"media/p{(k + 1) % pictures:07d}.png")])
        question = ("What is in the top left corner?", "How many colours are there?")[n % 2]
        query = side(question, "Answer the question about the image:", image)
        out.append(record(f"q{n:08d}", "vqa", "image_qa", query, side(f"answer {n}"), [negative]))
    return out


def write_source(fs, rows: int, size: int) -> int:
    """The pictures and records on the server (not counted); the number of pictures."""
    pictures = max(1, rows // 2)
    started = time.monotonic()
    batch: dict[str, bytes] = {}
    for k in range(pictures):
        batch[f"{BUCKET}/vqa/media/p{k:07d}.png"] = picture(k, size)
        if len(batch) == 2000 or k == pictures - 1:
            fs.pipe(batch)  # one concurrent batch of PUTs
            batch = {}
    records = "".join(json.dumps(r) + "\n" for r in vqa_rows(rows)).encode()
    fs.pipe_file(f"{BUCKET}/vqa/records.jsonl", records)
    print(f"source: {rows} rows, {pictures} pictures written in {time.monotonic() - started:.0f} s")
    return pictures


def config(proxy: CountingProxy, shard_rows: int):
    from rzenembed.config import config_from_dict

    return config_from_dict(
        {
            "model": {"name_or_path": "unused"},
            "storage": {"root": f"s3://{BUCKET}/versions", "endpoint_url": proxy.endpoint},
            "sources": [
                {
                    "name": "vqa",
                    "uri": f"s3://{BUCKET}/vqa",
                    "task_group": "image_qa",
                    "stage": "stage2",
                    "cap": 10**9,  # the cap's work without dropping rows
                }
            ],
            "prep": {"shard_rows": shard_rows, "decontaminate": []},
        }
    )


def step(name: str, proxy: CountingProxy, work) -> dict[str, Any]:
    proxy.reset()
    started = time.monotonic()
    version = work()
    wall = time.monotonic() - started
    media = proxy.requests_to(f"/{BUCKET}/vqa/media/")
    counted = proxy.snapshot()
    return {
        "step": name,
        "version": version,
        "wall_s": wall,
        "requests": counted["requests"],
        "fetched": counted["fetched"],
        "media_get": sum(n for (method, _), n in media.items() if method == "GET"),
        "media_head": sum(n for (method, _), n in media.items() if method == "HEAD"),
    }


def report(results: list[dict[str, Any]], rows: int, pictures: int, slots: int) -> None:
    print(
        f"\n{'step':<7} {'wall s':>7} {'rows/s':>8} {'rows/s/slot':>12} "
        f"{'media GET/pic':>14} {'HEAD/pic':>9} {'KiB/pic':>8}  requests"
    )
    for r in results:
        print(
            f"{r['step']:<7} {r['wall_s']:>7.1f} {rows / r['wall_s']:>8.0f} "
            f"{rows / r['wall_s'] / slots:>12.0f} {r['media_get'] / pictures:>14.2f} "
            f"{r['media_head'] / pictures:>9.2f} {r['fetched'] / pictures / 1024:>8.1f}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(r["requests"].items()))
        )
    per_pic_s = sum(r["wall_s"] for r in results) * slots / pictures  # slot-seconds a picture
    print(
        f"\nall steps: {per_pic_s * 1000:.1f} slot-ms per picture "
        f"({pictures / sum(r['wall_s'] for r in results) / slots:.0f} pictures/s per slot)"
    )
    print(f"projection on {SLOTS_AT_SCALE} slots at the same latency:")
    for name, count in PAPER_PICTURES.items():
        hours = count * per_pic_s / SLOTS_AT_SCALE / 3600
        print(f"  {name}: {count / 1e6:.1f}M pictures -> {hours:.1f} h")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--latency-ms", type=float, default=25.0)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="picture side in pixels")
    args = parser.parse_args()
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per map otherwise
    import ray

    from rzenembed.data.storage import filesystem
    from rzenembed.prep.cap import run_cap
    from rzenembed.prep.clean import run_clean
    from rzenembed.prep.ingest import run_ingest

    print(
        f"machine: {machine()}; {args.rows} rows, {args.latency_ms:g} ms a request, "
        f"{args.slots} slots, {args.shard_rows} rows a shard"
    )
    with s3_server() as (host, port):  # its dummy credentials set before Ray's workers start
        direct = f"http://{host}:{port}"
        fs, _ = filesystem(f"s3://{BUCKET}", direct)
        fs.mkdir(BUCKET)
        pictures = write_source(fs, args.rows, args.size)
        proxy = CountingProxy((host, port), args.latency_ms / 1000)
        cfg = config(proxy, args.shard_rows)
        os.environ.setdefault("RZENEMBED_CACHE", tempfile.mkdtemp(prefix="rehearsal-cache-"))
        ray.init(num_cpus=args.slots, include_dashboard=False, logging_level=logging.WARNING)
        try:
            ingested = step("ingest", proxy, lambda: run_ingest(cfg, cfg.sources[0], None, False))
            cleaned = step("clean", proxy, lambda: run_clean(cfg, ingested["version"], False))
            capped = step(
                "cap", proxy, lambda: run_cap(cfg, cleaned["version"], show_progress=False)
            )
        finally:
            ray.shutdown()
    for r in (ingested, cleaned, capped):
        print(
            f"{r['step']}: {r['version'].rows} rows, rejects {r['version'].manifest.reject_counts}"
        )
    report([ingested, cleaned, capped], args.rows, pictures, args.slots)


if __name__ == "__main__":
    main()
