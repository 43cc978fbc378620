"""Training reads on object storage: what reading rows through ``DatasetRows`` fetches.

Run from the repository root (about a minute on 2 CPU cores):

    python benchmarks/s3_read_bench.py [--rows 1000] [--shards 24] [--shard-rows 256]
        [--row-kib 32] [--batch 48] [--threads 8] [--footer-shards 200]
        [--shuffle rows,blocks] [--footer-mib 8] [--latency-ms 0] [--where s3,local]
        [--repeats 5]

A local S3 server (moto in server mode, on 127.0.0.1) sits behind a small TCP proxy written
here that forwards bytes both ways and counts them: every byte the server sends back (HTTP
headers included) is a byte fetched, and every request line the client sends is a request
(split by method). The reads go through the proxy; writing the data goes to the server
directly and is not counted.

The dataset is a committed version written by ``VersionWriter`` (row groups of about
``ROW_GROUP_BYTES``): ``--shards`` shards of ``--shard-rows`` rows, each row a short query
and a positive with ``--row-kib`` KiB of inline frames (random bytes, incompressible like
JPEG), so a 256 KiB row group holds a few rows. Then:

1. footers: a fresh ``DatasetRows`` loads every shard's footer (sequentially one by one, or
   with ``prefetch_footers`` where it exists), counted on their own;
2. rows: ``--rows`` rows in the order the stage sampler plans them for one dataset
   (``--shuffle rows``: a uniform permutation; ``blocks``: row-group blocks), read as
   training does: ``fetch`` of one ``--batch`` rows' slice at a time on a pool of
   ``--threads`` threads, with the default 64 MiB row-group cache and a footer budget of
   ``--footer-mib`` (training's default 8 MiB; a smaller one shows what happens when a
   dataset's footers do not all fit, as with thousands of shards).

For the rows it prints the row groups touched, the sum of their compressed bytes (all
columns, from the Parquet footers) and of their training columns, the bytes and requests
fetched from the server, their ratio to the touched compressed bytes and the wall time.
Separately it times loading the footers of ``--footer-shards`` small shards sequentially
and (where the API exists) concurrently. On loopback a request costs only the server's CPU;
``--latency-ms`` holds every request that long before forwarding it, as an object store's
time to first byte would (S3: some 20-30 ms), which is what concurrent requests hide.
``--where local`` times the same row reads from a local folder, best of ``--repeats`` (no
counting: the disk path must not get slower).

The script runs against the code as it is, before and after the byte-range reads: where
``prefetch_footers`` or the ``blocks`` shuffle do not exist it loads footers one by one and
skips ``blocks``.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from rzenembed.data.schema import RECORD_SCHEMA, media, record, records_table, side
from rzenembed.data.storage import filesystem, join
from rzenembed.data.version import DatasetVersion, VersionWriter
from rzenembed.training.rows import TRAINING_COLUMNS, DatasetRows
from rzenembed.training.sampler import StageSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.s3_proxy import CountingProxy, s3_server

MIB = 2**20
BUCKET = "s3-read-bench"
FRAMES_PER_ROW = 4


# --------------------------------------------------------------------------- counting proxy


# --------------------------------------------------------------------------- data


def training_rows(shard: int, rows: int, row_kib: int, rng: np.random.Generator) -> list[dict]:
    frame_bytes = row_kib * 2**10 // FRAMES_PER_ROW
    out = []
    for i in range(rows):
        frames = [rng.bytes(frame_bytes) for _ in range(FRAMES_PER_ROW)]
        out.append(
            record(
                f"s{shard}-r{i}",
                "bench",
                "video_retrieval",
                side(f"a caption of clip {shard}.{i}"),
                side(media_items=[media("frames", timestamps=[0.5, 1.5, 2.5, 3.5], frames=frames)]),
                [side(f"another caption {shard}.{i}")],
                group_id=f"video:{shard}.{i // 4}",
            )
        )
    return out


def write_dataset(
    uri: str, shards: int, shard_rows: int, row_kib: int, endpoint: str | None
) -> DatasetVersion:
    rng = np.random.default_rng(0)
    writer = VersionWriter(uri, RECORD_SCHEMA, endpoint)
    for k in range(shards):
        writer.write_shard(
            f"part-{k:05d}", records_table(training_rows(k, shard_rows, row_kib, rng))
        )
    return writer.commit(
        dataset="bench",
        step="bench",
        config_digest="bench",
        code_version="1",
        inputs=[],
        stats={"media_root": "", "group_semantics": "siblings"},
    )


@dataclass
class Layout:
    """Where every row lives and what its row group weighs, read straight from the footers
    (not through the code under test)."""

    footer_bytes: list[int]  # serialized footer of each shard
    starts: np.ndarray  # first row of each shard, then the total
    bounds: list[np.ndarray]  # per shard: first row of each row group, then the rows
    compressed: list[list[int]]  # per shard and row group: all columns
    training: list[list[int]]  # per shard and row group: the training columns only

    def groups_of(self, indices: list[int]) -> set[tuple[int, int]]:
        touched = set()
        for index in indices:
            shard = int(np.searchsorted(self.starts, index, side="right")) - 1
            row = index - int(self.starts[shard])
            group = int(np.searchsorted(self.bounds[shard], row, side="right")) - 1
            touched.add((shard, group))
        return touched


def layout_of(version: DatasetVersion, endpoint: str | None) -> Layout:
    counts = [s.rows for s in version.manifest.shards]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    footer_bytes, bounds, compressed, training = [], [], [], []
    for uri in version.shard_uris():
        fs, path = filesystem(uri, endpoint)
        metadata = pq.read_metadata(path, filesystem=fs)
        footer_bytes.append(metadata.serialized_size)
        groups = [metadata.row_group(g) for g in range(metadata.num_row_groups)]
        bounds.append(np.cumsum([0, *(g.num_rows for g in groups)]).astype(np.int64))
        compressed.append([_compressed(g) for g in groups])
        training.append([_compressed(g, set(TRAINING_COLUMNS)) for g in groups])
    return Layout(footer_bytes, starts, bounds, compressed, training)


def _compressed(group: pq.RowGroupMetaData, top_level: set[str] | None = None) -> int:
    total = 0
    for c in range(group.num_columns):
        column = group.column(c)
        if top_level is None or column.path_in_schema.split(".")[0] in top_level:
            total += column.total_compressed_size
    return total


# --------------------------------------------------------------------------- the runs


def sampler_order(rows: DatasetRows, count: int, batch: int, shuffle: str) -> list[list[int]]:
    """``count`` rows as the sampler plans them for one dataset, in ``batch``-row steps."""
    kwargs: dict[str, Any] = {}
    if shuffle != "rows":
        kwargs = {"shuffle": shuffle, "blocks": [rows.row_group_sizes()]}
    sampler = StageSampler(["bench"], [1.0], [len(rows)], global_batch=batch, seed=0, **kwargs)
    steps = -(-count // batch)
    plans = [sampler.plan(step).indices.tolist() for step in range(steps)]
    flat = [i for plan in plans for i in plan][:count]
    return [flat[i : i + batch] for i in range(0, count, batch)]


def has_footer_prefetch() -> bool:
    return hasattr(DatasetRows, "prefetch_footers")


def load_footers(rows: DatasetRows, concurrent: bool) -> None:
    if concurrent:
        rows.prefetch_footers()
    elif has_footer_prefetch():
        rows.prefetch_footers(threads=1)
    else:  # before the change: one at a time, as reads needed them
        for shard in range(len(rows.version.manifest.shards)):
            rows._footer(shard)


def measure(proxy: CountingProxy | None, work) -> dict[str, Any]:
    if proxy is not None:
        proxy.reset()
    started = time.perf_counter()
    work()
    wall = time.perf_counter() - started
    counted = proxy.snapshot() if proxy is not None else {}
    return {"wall_s": wall, **counted}


def read_rows(
    uri: str,
    endpoint: str | None,
    proxy: CountingProxy | None,
    layout: Layout,
    args: argparse.Namespace,
    shuffle: str,
) -> dict[str, Any]:
    budget = int(args.footer_mib * MIB)
    rows = DatasetRows.open(uri, "video_retrieval", 1, endpoint_url=endpoint, footer_bytes=budget)
    footers = measure(proxy, lambda: load_footers(rows, concurrent=has_footer_prefetch()))
    batches = sampler_order(rows, args.rows, args.batch, shuffle)
    with ThreadPoolExecutor(args.threads) as pool:
        read = measure(proxy, lambda: [rows.fetch(b, pool=pool) for b in batches])
    touched = layout.groups_of([i for b in batches for i in b])
    compressed = sum(layout.compressed[s][g] for s, g in touched)
    training = sum(layout.training[s][g] for s, g in touched)
    return {
        "shuffle": shuffle,
        "rows": args.rows,
        "groups": len(touched),
        "compressed": compressed,
        "training": training,
        "footers": footers,
        "read": read,
        "cache": (rows.cache.hits, rows.cache.misses),
    }


def footer_timing(uri: str, endpoint: str, proxy: CountingProxy) -> dict[str, Any]:
    results = {}
    modes = ["sequential", "concurrent"] if has_footer_prefetch() else ["sequential"]
    for mode in modes:
        rows = DatasetRows.open(uri, "text_retrieval", 0, endpoint_url=endpoint)
        results[mode] = measure(proxy, lambda r=rows, m=mode: load_footers(r, m == "concurrent"))
    return results


# --------------------------------------------------------------------------- report


def mib(n: float) -> str:
    return f"{n / MIB:.1f}"


def requests_text(requests: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(requests.items())) or "0"


def print_rows(result: dict[str, Any]) -> None:
    read, footers = result["read"], result["footers"]
    print(
        f"\nrows ({result['shuffle']} shuffle): {result['rows']} rows read, "
        f"{result['groups']} row groups touched, cache hits/misses {result['cache']}"
    )
    print(
        f"  touched row groups compressed: {mib(result['compressed'])} MiB "
        f"(training columns {mib(result['training'])} MiB)"
    )
    if "fetched" in read:
        print(
            f"  footers first: {mib(footers['fetched'])} MiB fetched, requests "
            f"{requests_text(footers['requests'])}, {footers['wall_s']:.2f} s"
        )
        print(
            f"  rows: {mib(read['fetched'])} MiB fetched, requests "
            f"{requests_text(read['requests'])}, "
            f"ratio fetched/compressed {read['fetched'] / result['compressed']:.2f}, "
            f"{read['fetched'] / result['rows'] / 1024:.0f} KiB a row, {read['wall_s']:.2f} s"
        )
    else:
        print(f"  footers {footers['wall_s']:.2f} s, rows {read['wall_s']:.2f} s")


def run_on_s3(args: argparse.Namespace, shuffles: list[str]) -> None:
    with s3_server() as address:
        direct = f"http://{address[0]}:{address[1]}"
        proxy = CountingProxy(address, args.latency_ms / 1000)
        fs, _ = filesystem(f"s3://{BUCKET}", direct)
        fs.mkdir(BUCKET)
        uri = f"s3://{BUCKET}/rows"
        started = time.perf_counter()
        version = write_dataset(uri, args.shards, args.shard_rows, args.row_kib, direct)
        written_s = time.perf_counter() - started
        layout = layout_of(version, direct)
        groups = sum(len(b) - 1 for b in layout.bounds)
        size = sum(sum(c) for c in layout.compressed)
        print(
            f"dataset: {args.shards} shards x {args.shard_rows} rows of ~{args.row_kib} KiB, "
            f"{groups} row groups ({args.shard_rows * args.shards / groups:.1f} rows each), "
            f"{mib(size)} MiB compressed, footers of {np.mean(layout.footer_bytes) / 1024:.0f} "
            f"KiB (budget {args.footer_mib:g} MiB); written in {written_s:.1f} s"
        )
        for shuffle in shuffles:
            print_rows(read_rows(uri, proxy.endpoint, proxy, layout, args, shuffle))

        footer_uri = f"s3://{BUCKET}/footers"
        write_dataset(footer_uri, args.footer_shards, 8, 1, direct)
        timing = footer_timing(footer_uri, proxy.endpoint, proxy)
        print(f"\nfooters of {args.footer_shards} shards:")
        for mode, figures in timing.items():
            print(
                f"  {mode}: {figures['wall_s']:.2f} s, {mib(figures['fetched'])} MiB fetched, "
                f"requests {requests_text(figures['requests'])}"
            )


def run_on_local_disk(args: argparse.Namespace, shuffles: list[str]) -> None:
    """The same reads from a local folder, ``--repeats`` times (the disk path must stay as
    fast as it was; one run on a shared machine is too noisy to tell)."""
    with tempfile.TemporaryDirectory() as folder:
        uri = join(folder, "rows")
        layout = layout_of(
            write_dataset(uri, args.shards, args.shard_rows, args.row_kib, None), None
        )
        for shuffle in shuffles:
            walls = [
                read_rows(uri, None, None, layout, args, shuffle)["read"]["wall_s"]
                for _ in range(args.repeats)
            ]
            print(
                f"\nlocal disk, {shuffle} shuffle: {args.rows} rows in {min(walls):.2f} s "
                f"(best of {args.repeats}; median {statistics.median(walls):.2f} s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--shard-rows", type=int, default=256)
    parser.add_argument("--row-kib", type=int, default=32)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--footer-shards", type=int, default=200)
    parser.add_argument("--shuffle", default="rows,blocks")
    parser.add_argument(
        "--footer-mib", type=float, default=8.0, help="footer_bytes of DatasetRows (MiB)"
    )
    parser.add_argument("--where", default="s3", help="s3, local or s3,local")
    parser.add_argument("--repeats", type=int, default=5, help="local-disk runs")
    parser.add_argument(
        "--latency-ms", type=float, default=0.0, help="added to every request (S3: ~20-30)"
    )
    args = parser.parse_args()
    blocks_supported = "shuffle" in inspect.signature(StageSampler).parameters
    shuffles = [s for s in args.shuffle.split(",") if s == "rows" or blocks_supported]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{args.latency_ms:g} ms added per request"
    )
    where = args.where.split(",")
    if "s3" in where:
        run_on_s3(args, shuffles)
    if "local" in where:
        run_on_local_disk(args, shuffles)


if __name__ == "__main__":
    main()
