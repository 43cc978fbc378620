"""Serving throughput and latency of the embeddings endpoint, against in-process encode.

Run from the repository root:

    python benchmarks/serve_bench.py [--clients 8] [--seconds 20] [--items 1]
                                     [--images 0.25] [--settings 1:0,8:0.005,16:0.01,32:0.02]

The tiny model (saved with its card, served as a folder) is deployed on a local Ray
(``--cpus``) with the real Serve application (``rzenembed.serving.app``); the model replica
gets ``--replica-cpus`` (its torch threads), the HTTP proxy, the API replica and the
clients share the rest. For each batch setting ``max_batch_size:batch_wait_timeout_s`` the
endpoint is rolled to it, warmed up, and driven over loopback HTTP by ``--clients``
concurrent clients (one asyncio loop, aiohttp, one request in flight each) for
``--seconds``. Requests carry ``--items`` items each: text queries of 4 to 60 words, and
with probability ``--images`` a 64-224 px image instead (base64 PNG, as a client sends it).

Printed per setting: requests/s, items/s, p50/p95/p99 request latency, and from the
endpoint's own ``/metrics`` (deltas over the timed run): the mean batch the model replica
actually formed (``rzenembed_batch_items``; with C clients of one request each it cannot
exceed C items per request times C, whatever ``max_batch_size`` allows) and where a
request's time went: ``decode`` (JSON and PNG decoding in the HTTP replica), ``queue``
(waiting for a batch to form, a replica, Ray calls) and ``model`` (processor and forward
pass of its batch). Then in-process ``RzenEmbedder.encode`` on the same raw request items
(base64 PNG decoding included), in the order the clients sent them (not sorted by length),
at the mean batch size the best setting observed, with the replica's thread count; and
the serving overhead: in-process items/s divided by the best served items/s. On a 2-core
machine the clients, the HTTP proxy and the API replicas share one core, so the overhead
measured here is an upper bound on what a GPU replica with idle host cores sees.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from eval_bench import WORDS
from PIL import Image


def workload(count: int, image_share: float, seed: int = 0) -> list[dict]:
    """``count`` request items as JSON (text, or a base64 PNG image with an instruction)."""
    rng = np.random.default_rng(seed)
    items: list[dict] = []
    for _ in range(count):
        if rng.random() < image_share:
            side = int(rng.integers(64, 225))
            pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels, "RGB").save(buffer, format="PNG")
            image = base64.b64encode(buffer.getvalue()).decode()
            items.append({"image": image, "instruction": "Represent the image."})
        else:
            n = int(rng.integers(4, 61))
            items.append({"text": " ".join(rng.choice(WORDS, n)), "instruction": "Find it."})
    return items


async def drive(url: str, items: list[dict], per_request: int, clients: int, seconds: float):
    """Latencies (s) of every request completed in ``seconds``; errors counted."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        k = index * 7919
        while time.perf_counter() < deadline:
            batch = [items[(k + j) % len(items)] for j in range(per_request)]
            k += per_request * clients
            started = time.perf_counter()
            async with session.post(url, json={"input": batch}) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(i, session) for i in range(clients)))
    return latencies, errors


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process_rate(folder: str, items: list[dict], batch: int, repeats: int = 3) -> float:
    """Items/s of ``RzenEmbedder.encode`` on the raw request items: base64 PNGs decoded
    inside the timing, batches of ``batch`` in the given order (not sorted by length)."""
    from rzenembed.modeling import EmbedInput, RzenEmbedder

    embedder = RzenEmbedder.from_pretrained(folder)

    def run(raw: list[dict]) -> None:
        inputs = []
        for item in raw:
            if "image" in item:
                data = io.BytesIO(base64.b64decode(item["image"]))
                image = np.asarray(Image.open(data).convert("RGB"))
                inputs.append(EmbedInput(images=[image], instruction=item["instruction"]))
            else:
                inputs.append(EmbedInput(text=item["text"], instruction=item["instruction"]))
        embedder.encode(inputs, batch_size=batch, sort_by_length=False)

    run(items[:batch])  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(items)
        times.append(time.perf_counter() - started)
    return len(items) / statistics.median(times)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """The endpoint's ``/metrics`` as {(sample, labels): value}, once every HTTP replica
    has sent its counters (``PUSH_EVERY_S``)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    from rzenembed.serving.metrics import PUSH_EVERY_S

    time.sleep(PUSH_EVERY_S + 1.0)
    text = requests.get(url + "/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def observed(before: dict, after: dict) -> dict[str, float]:
    """Mean model batch (items) and mean decode/queue/model milliseconds per request over
    the interval between two scrapes."""

    def delta(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    batches = delta("rzenembed_batch_items_count")
    out = {"mean_batch_items": delta("rzenembed_batch_items_sum") / max(batches, 1.0)}
    for stage in ("decode", "queue", "model"):
        labels = (("stage", stage),)
        count = delta("rzenembed_stage_seconds_count", labels)
        out[f"{stage}_ms"] = 1000 * delta("rzenembed_stage_seconds_sum", labels) / max(count, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--items", type=int, default=1, help="items per request")
    parser.add_argument("--images", type=float, default=0.25, help="share of image items")
    parser.add_argument("--settings", default="1:0,8:0.005,16:0.01,32:0.02")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--replica-cpus",
        type=int,
        default=1,
        help="CPUs (= torch threads) of the model replica, and of in-process encode",
    )
    parser.add_argument("--pool", type=int, default=512, help="distinct items to cycle through")
    args = parser.parse_args()

    import ray
    from ray import serve

    from rzenembed.config import ModelConfig, config_from_dict
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.modeling.tiny import build_tiny_model
    from rzenembed.serving.app import deploy
    from rzenembed.serving.source import resolve_served_model

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    tiny = build_tiny_model(work / "tiny", seed=0)
    config = ModelConfig(name_or_path=str(tiny), max_visual_tokens=64, max_text_tokens=128)
    folder = RzenEmbedder.from_pretrained(tiny, config=config).save_pretrained(work / "model")
    items = workload(args.pool, args.images)
    port = 8731
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)

    results = []
    for setting in args.settings.split(","):
        batch, wait = setting.split(":")
        cfg = config_from_dict(
            {
                "model": {"name_or_path": str(folder)},
                "storage": {"root": str(work)},
                "serve": {
                    "port": port,
                    "num_cpus": args.replica_cpus,
                    # No room for a second replica: replace it between settings.
                    "max_surge_percent": 0,
                    "api_num_cpus": 0,
                    "max_batch_size": int(batch),
                    "batch_wait_timeout_s": float(wait),
                    "auth": "none",  # loopback; a key check costs a hash per request
                },
            }
        )
        deploy(cfg, resolve_served_model(str(folder), cfg))
        base = f"http://127.0.0.1:{port}"
        url = base + "/v1/embeddings"
        asyncio.run(drive(url, items, args.items, args.clients, 3.0))  # warm-up
        before = scrape(base)
        latencies, errors = asyncio.run(drive(url, items, args.items, args.clients, args.seconds))
        seen = observed(before, scrape(base))
        row = {
            "max_batch_size": int(batch),
            "batch_wait_timeout_s": float(wait),
            "requests_per_s": len(latencies) / args.seconds,
            "items_per_s": len(latencies) * args.items / args.seconds,
            "p50_ms": 1000 * percentile(latencies, 50),
            "p95_ms": 1000 * percentile(latencies, 95),
            "p99_ms": 1000 * percentile(latencies, 99),
            "errors": errors,
            **seen,
        }
        results.append(row)
        print(
            f"batch {row['max_batch_size']:>3} wait {row['batch_wait_timeout_s']:.3f}s: "
            f"{row['requests_per_s']:7.1f} req/s {row['items_per_s']:7.1f} items/s  "
            f"p50 {row['p50_ms']:6.1f} ms  p95 {row['p95_ms']:6.1f} ms  "
            f"p99 {row['p99_ms']:6.1f} ms  errors {errors}  "
            f"observed batch {seen['mean_batch_items']:.1f}  decode {seen['decode_ms']:.1f} "
            f"queue {seen['queue_ms']:.1f} model {seen['model_ms']:.1f} ms/request",
            flush=True,
        )
    serve.shutdown()
    ray.shutdown()

    best = max(results, key=lambda r: r["items_per_s"])
    torch.set_num_threads(args.replica_cpus)  # the replica's threads: the same compute
    # The batch the endpoint actually formed, not the most it allowed.
    batch = max(1, round(best["mean_batch_items"]))
    rate = in_process_rate(str(folder), items, batch)
    overhead = rate / best["items_per_s"]
    print(
        f"in-process encode (raw items, batch {batch} = observed, unsorted): "
        f"{rate:.1f} items/s; "
        f"serving overhead at the best setting: {overhead:.2f}x "
        f"(in-process items/s / served items/s)"
    )
    summary = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "clients": args.clients,
        "items_per_request": args.items,
        "image_share": args.images,
        "settings": results,
        "in_process_batch": batch,
        "in_process_items_per_s": rate,
        "overhead": overhead,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
