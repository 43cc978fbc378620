"""The training loader: a rank's memory against dataset size, and time waiting for data.

Run from the repository root (also as ``python benchmarks/train_bench.py --loader``):

    python benchmarks/loader_bench.py [--rows 10000,1000000] [--steps 20] [--batch 32]
        [--loader-workers 0,2]

Datasets are written in code into a temporary folder as committed dataset versions, the way
preparation writes them (Parquet shards, row groups of ``ROW_GROUP_BYTES``):

- ``text-N``: N text rows (query, positive, one hard negative; ~150 bytes of text each);
- ``image-N``: N rows whose positives are 160x120 JPEG files on disk (200 distinct files),
  the queries and negatives captions.

Each configuration runs in a fresh Python process that builds a training rank exactly as a
Ray Train worker does (``rzenembed.training.loop.Trainer``: the stage manifest, lazy
``DatasetRows``, the sampler, the tiny Qwen2-VL with LoRA r=8, ``StepLoader``), and runs
``--steps`` steps of ``--batch`` rows (GradCache chunks of 8, one hard negative) after 3
warm-up steps, one torch thread. It reports:

- peak RSS: ``VmHWM`` of the whole child, from interpreter start to the last step (the
  model, the optimiser, the sampler's permutation, the row cache and the loader included);
- data wait: the training thread's seconds on data instead of compute (waiting for the
  loader; with prefetch off also the processor, which then runs inside the step), as a
  share of the step, median and total over the timed steps (``data_wait_fraction``);
- load time: what building one step's batch takes on the loader thread.

The data-wait part runs the image rows with prefetch off, then with prefetch on once per
``--loader-workers`` value (``compute.loader_workers``: threads running the processor over a
step's chunks at once; 0: one after another on the loader thread). The wait it prints is
the rank's ``data_wait_by_rank`` entry, as the training log records it for every rank (one
rank here).

``eager`` runs beside them: the peak RSS of a process that only reads the same dataset
the way ranks did before rows were read lazily (``read_table().to_pylist()``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rss import proc_status_kib

MIB = 2**20
SHARD_ROWS = 2048  # prep.shard_rows' default
WORDS = [
    "red",
    "blue",
    "green",
    "small",
    "large",
    "round",
    "square",
    "bright",
    "dark",
    "striped",
    "old",
    "new",
]
NOUNS = [
    "circle",
    "square",
    "triangle",
    "house",
    "tree",
    "car",
    "boat",
    "bird",
    "cat",
    "dog",
    "lamp",
    "chair",
]


# --------------------------------------------------------------------------- datasets


def sentence(rng: random.Random, words: int = 20) -> str:
    return " ".join(rng.choice(WORDS if i % 2 else NOUNS) for i in range(words))


def text_shard(start: int, rows: int, rng: random.Random) -> list[dict]:
    from rzenembed.data.schema import record, side

    return [
        record(
            f"t{i}",
            "bench",
            "text_retrieval",
            side(sentence(rng), "Retrieve the passage that answers the query."),
            side(sentence(rng)),
            [side(sentence(rng))],
        )
        for i in range(start, start + rows)
    ]


def image_files(folder: Path, count: int = 200) -> list[str]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1)
    names = []
    for k in range(count):
        image = Image.new("RGB", (160, 120), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            box = (
                sorted(rng.randrange(160) for _ in range(2)),
                sorted(rng.randrange(120) for _ in range(2)),
            )
            colour = tuple(rng.randrange(256) for _ in range(3))
            draw.rectangle([box[0][0], box[1][0], box[0][1], box[1][1]], fill=colour)
        name = f"img_{k:04d}.jpg"
        image.save(folder / name, quality=90)
        names.append(name)
    return names


def image_shard(start: int, rows: int, rng: random.Random, names: list[str]) -> list[dict]:
    from rzenembed.data.schema import media, record, side

    return [
        record(
            f"i{i}",
            "bench",
            "image_retrieval",
            side(sentence(rng, 12), "Find the image that matches the caption."),
            side("", "", [media("image", names[i % len(names)])]),
            [side(sentence(rng, 12))],
        )
        for i in range(start, start + rows)
    ]


def write_dataset(folder: Path, kind: str, rows: int) -> str:
    """A committed version of ``rows`` rows and a stage manifest over it; returns the
    manifest's URI."""
    from rzenembed.data.schema import RECORD_SCHEMA, records_table
    from rzenembed.data.version import VersionWriter
    from rzenembed.prep.mixture import STAGE_MANIFEST, StageDataset, StageManifest

    rng = random.Random(0)
    names = image_files(folder / "media") if kind == "image" else []
    writer = VersionWriter(str(folder / "version"), RECORD_SCHEMA)
    for shard, start in enumerate(range(0, rows, SHARD_ROWS)):
        count = min(SHARD_ROWS, rows - start)
        batch = (
            image_shard(start, count, rng, names)
            if kind == "image"
            else text_shard(start, count, rng)
        )
        writer.write_shard(f"part-{shard:05d}", records_table(batch))
    version = writer.commit(
        dataset=f"{kind}-{rows}",
        step="bench",
        config_digest="bench",
        code_version="1",
        inputs=[],
        stats={"media_root": str(folder / "media"), "group_semantics": "same-item"},
    )
    group = "image_retrieval" if kind == "image" else "text_retrieval"
    entry = StageDataset(
        version.manifest.dataset,
        version.uri,
        version.content_digest,
        rows,
        group,
        1.0,
        max_negatives=1,
    )
    manifest = StageManifest("stage1", "all", [entry])
    manifest.digest = manifest.content_digest()
    manifest.uri = str(folder / STAGE_MANIFEST)
    Path(manifest.uri).write_text(manifest.to_json())
    return manifest.uri


# --------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this fresh process."""
    import torch

    torch.set_num_threads(1)
    if args.eager:
        from rzenembed.data.version import DatasetVersion
        from rzenembed.prep.mixture import StageManifest

        manifest = StageManifest.load(args.manifest)
        started = time.perf_counter()
        rows = DatasetVersion.open(manifest.datasets[0].uri).read_table().to_pylist()
        return {
            "rows_held": len(rows),
            "read_s": time.perf_counter() - started,
            "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
        }
    from rzenembed.config import config_from_dict
    from rzenembed.training.loop import (
        RunSpec,
        Trainer,
        record_data_wait,
        record_slowest_rank,
    )

    warmup, steps = 3, args.steps
    cfg = config_from_dict(
        {
            "model": {
                "name_or_path": args.model_dir,
                "max_visual_tokens": 64,
                "video_frames": 4,
                "max_text_tokens": 128,
            },
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "loss": {"false_negative_delta": None},
            "stage1": {
                "global_batch_size": args.batch,
                "gradcache_chunk": 8,
                "hard_negatives": 1,
                "max_steps": warmup + steps,
                "prefetch": args.prefetch,
                "optim": {"lr": 1e-4, "warmup_ratio": 0.0},
            },
            "compute": {"loader_workers": args.loader_workers},
        }
    )
    spec = RunSpec(
        cfg=cfg.model_dump(mode="json"),
        stage="stage1",
        mixture="all",
        stage_manifest=args.manifest,
        base_model=args.model_dir,
        output_dir=tempfile.mkdtemp(prefix="loader-bench-"),
        total_steps=warmup + steps,
    )
    import pyarrow

    trainer = Trainer(spec)
    records = []
    with trainer.loader() as loader:
        loader.start(0)
        for step in range(warmup + steps):
            loaded, waited = loader.next(step)
            metrics = trainer.train_step(step, loaded)
            loader.advance(step)
            record_data_wait(metrics, waited)
            record_slowest_rank(metrics, trainer)
            (rank_wait,) = metrics["data_wait_by_rank"]
            records.append((rank_wait, metrics["step_s"], loaded.load_s))
    timed = records[warmup:]
    wait = [w for w, _, _ in timed]
    compute = [c for _, c, _ in timed]
    source = next(iter(trainer.sources.values()))
    return {
        "rows": len(source),
        "prefetch": args.prefetch,
        "loader_workers": args.loader_workers,
        "peak_rss_mib": proc_status_kib("VmHWM") / 1024,
        "wait_share_median": statistics.median(w / (w + c) for w, c, _ in timed),
        "wait_share_total": sum(wait) / (sum(wait) + sum(compute)),
        "wait_s_median": statistics.median(wait),
        "compute_s_median": statistics.median(compute),
        "load_s_median": statistics.median(load for _, _, load in timed),
        "row_cache_mib": source.cache.total / MIB,
        "arrow_mib": pyarrow.total_allocated_bytes() / MIB,
    }


# --------------------------------------------------------------------------- parent


def run_child(model_dir: str, manifest: str, **options: Any) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        "--model-dir",
        model_dir,
        "--manifest",
        manifest,
    ]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value is not False:
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path.cwd()), str(Path(__file__).parent)]),
    }
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="10000,100000,1000000", help="text dataset sizes")
    parser.add_argument("--image-rows", type=int, default=10_000, help="image dataset size")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after 3 warm-up")
    parser.add_argument("--batch", type=int, default=32, help="rows per step (one rank)")
    parser.add_argument("--prefetch", type=int, default=2, help="loader depth when on")
    parser.add_argument(
        "--loader-workers", default="0,2", help="processor threads to compare (prefetch on)"
    )
    parser.add_argument(
        "--eager-max", type=int, default=1_000_000, help="largest size read eagerly"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.loader_workers = int(args.loader_workers)
        print(json.dumps(child(args)))
        return
    workers = [int(n) for n in args.loader_workers.split(",")]
    from rzenembed.modeling.tiny import build_tiny_model

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}"
    )
    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as work:
        model_dir = str(build_tiny_model(Path(work) / "tiny"))
        print(f"batch {args.batch} rows/step, {args.steps} timed steps, prefetch {args.prefetch}")
        print("\nmemory: a rank's peak RSS against dataset size (text rows)")
        peaks = {}
        for rows in sizes:
            started = time.perf_counter()
            manifest = write_dataset(Path(work) / f"text-{rows}", "text", rows)
            written = time.perf_counter() - started
            lazy = run_child(
                model_dir,
                manifest,
                steps=args.steps,
                batch=args.batch,
                prefetch=args.prefetch,
                loader_workers=workers[0],
            )
            eager = None if rows > args.eager_max else run_child(model_dir, manifest, eager=True)
            peaks[rows] = lazy["peak_rss_mib"]
            print(
                f"  text-{rows}: rank peak RSS {lazy['peak_rss_mib']:.0f} MiB "
                f"(row cache {lazy['row_cache_mib']:.1f} MiB, Arrow allocations "
                f"{lazy['arrow_mib']:.1f} MiB, wait share "
                f"{lazy['wait_share_total']:.1%}); reading every row as dicts: "
                + (
                    f"{eager['peak_rss_mib']:.0f} MiB in {eager['read_s']:.1f} s"
                    if eager
                    else "not run"
                )
                + f" [dataset written in {written:.0f} s]"
            )
        smallest, largest = min(sizes), max(sizes)
        print(f"  ratio {largest} / {smallest} rows: {peaks[largest] / peaks[smallest]:.3f}x")
        print(f"\ndata wait: image-{args.image_rows} (JPEG positives read, decoded, processed)")
        manifest = write_dataset(Path(work) / "image", "image", args.image_rows)
        settings = [(0, workers[0]), *((args.prefetch, n) for n in workers)]
        for depth, count in settings:
            row = run_child(
                model_dir,
                manifest,
                steps=args.steps,
                batch=args.batch,
                prefetch=depth,
                loader_workers=count,
            )
            label = "prefetch off" if depth == 0 else f"prefetch {depth}, {count} workers"
            print(
                f"  {label:>24}: rank 0 data wait {row['wait_share_total']:.1%} of step time "
                f"(median step {row['wait_share_median']:.1%}; wait "
                f"{row['wait_s_median'] * 1000:.0f} ms, compute "
                f"{row['compute_s_median'] * 1000:.0f} ms, load on the loader thread "
                f"{row['load_s_median'] * 1000:.0f} ms)"
            )


if __name__ == "__main__":
    main()
