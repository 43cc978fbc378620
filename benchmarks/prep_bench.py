"""Data-preparation costs: cap memory and speed, clip splitting, clean on 1 vs 2 Ray workers.

Run from the repository root (``--part all`` takes 3-6 minutes on 2 CPU cores):

    python benchmarks/prep_bench.py [--part cap|clips|clean|all] [--rows-large 5000000]
        [--rows-small 1000000] [--limit 100000] [--images 600] [--out DIR]

cap
    Writes two committed dataset versions of short text-only records (``--rows-large`` and
    ``--rows-small`` rows, 100k rows per shard, built column-wise as Arrow arrays), then caps
    each to ``--limit`` rows. Every measurement runs in a fresh Python process so that its
    memory is its own: reading the id column only (what ``select_ids`` reads, without the
    ranking), ``select_ids`` (the single-process reference ranking, O(N) in memory), the
    previous ``run_cap`` (``select_ids`` on the driver, then shard tasks filtering Python
    rows against the shipped id set: the baseline) and ``run_cap`` (ranks and an Arrow
    filter on the workers), both on a local Ray with 2 CPUs. Each child reports its RSS
    after imports and setup (the baseline) and its peak RSS while the work ran, read from
    VmHWM in /proc/self/status after resetting it at the baseline (``echo 5 >
    /proc/self/clear_refs``). ``ru_maxrss`` is not used: a child started by
    ``subprocess`` (vfork + exec) inherits the parent's high-water mark in it, and the
    parent has held the generated tables. Only the driver process is measured; Ray workers
    hold one shard each whatever the dataset size.
driver
    Raw text sources of ``--driver-rows`` rows (default 100k and 1M, JSONL files of 250k
    rows) through ingest -> clean -> cap (a stage-2 source, capped at 100k) on a local Ray
    with 2 CPUs, each size in a fresh process: the driver's time and memory (baseline after
    imports and Ray start, then the reset high-water mark, as for the cap).
dedup
    The clean step's duplicate decision on generated pHash facts (``--dedup-rows``, default
    10k, 30k and 100k images): the keys, the partitions' group-by and the resolve of the
    distributed rule, one core, beside the sequential reference ``decide``.
clips
    Writes a 60 s, 128x96, 10 fps H.264 MP4 (libx264, qp 30, preset fast) and runs the
    clip-splitting path on it: ``split_row`` with 10 s clips and 8 frames per clip, i.e.
    read, probe, then per clip ``decode_frames`` (a new decord reader each time) and JPEG
    encoding. Baseline: one decord ``VideoReader`` on the same file and one ``get_batch``
    of the same frame indices. Both are given in sampled frames per second, the median of
    9 runs after a warm-up, the pieces measured in turn.
clean
    Renders ``--images`` 128x96 PNG scenes, ingests them with ``run_ingest`` (25 rows per
    shard) and times, on a local Ray with 2 CPUs, ``run_clean`` and its inspection pass
    alone (``inspect_row`` over each shard as Ray tasks) with ``prep.max_in_flight`` = 1
    and = 2. Each ``run_clean`` gets a new storage root, so no run is a cache hit. A
    control, pure-Python CPU-bound Ray tasks as long as one shard's inspection, shows how
    much of a second core the machine gave at the time. The same inspection run serially
    in one process gives the per-image cost without Ray. Everything takes turns over 5
    rounds; the best run of each is the figure (other load only ever slows a run down),
    the median is printed next to it.

recaption
    Captions/s of the recaption step's ``Captioner`` (``generate``, greedy) on ``--captions``
    random 96x96 images at batch sizes 1, 8 and 32, with the tiny model on CPU in one
    process (no Ray: the actor runs exactly this loop). Every caption is forced to 32 new
    tokens (``min_new_tokens`` in the captioner's generation config) so that an early
    end-of-sequence cannot flatter a batch size. Median of 3 runs after a warm-up; the
    batching gain is the ratio to batch 1. ``--gpu`` runs the same on CUDA with the real
    Qwen2-VL-2B architecture (random weights, bfloat16) instead of the tiny model.

The 1-minute load average is printed before and after each part: on a shared machine the
clean part's speed-up depends on both cores being free, which the control row shows.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from rss import proc_status_kib, reset_peak_rss

from rzenembed.config import PipelineConfig, config_from_dict
from rzenembed.data.schema import MEDIA_TYPE, RECORD_SCHEMA, SIDE_TYPE, media, record, side
from rzenembed.data.version import DatasetVersion, VersionWriter

SHARD_ROWS = 100_000
CHILD_TIMEOUT_S = 900
RAY_CPUS = 2
CAP_MODES = {
    "read": "read id column only",
    "select": "select_ids",
    "previous": "previous run_cap (driver select_ids + Python-row filter, Ray 2 CPUs)",
    "run_cap": "run_cap (ranks and Arrow filter on the workers, Ray 2 CPUs)",
}


# --------------------------------------------------------------------------- helpers


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain text table, columns right-aligned but the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    print(f"\n{title}")
    for row in cells:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join([first, *rest]))


def timed(work: Callable[[], object]) -> tuple[float, object]:
    """Wall time of one call of ``work`` and its result."""
    start = time.perf_counter()
    result = work()
    return time.perf_counter() - start, result


def interleaved_medians(works: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each piece of work after a warm-up call of each; the pieces take
    turns in every round, so a change of load on the machine hits them all alike."""
    for work in works.values():
        work()
    times: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            times[name].append(timed(work)[0])
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> str:
    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
        model = names[0]
    pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{os.cpu_count()} CPUs, {model}, {pages / 1024**3:.0f} GiB RAM"


def bench_config(storage_root: str, sources: list[dict] | None = None, **prep: Any):
    """A pipeline config for the benchmark: only storage, sources and prep matter here."""
    data = {
        "model": {"name_or_path": "unused"},
        "storage": {"root": storage_root},
        "sources": sources or [],
        "prep": prep,
    }
    return config_from_dict(data)


def start_ray() -> None:
    """Start a local Ray with 2 CPUs and make sure both workers exist and have imported
    the pipeline, so that no timed run pays for worker start-up."""
    from rzenembed.compute.connect import ensure_ray
    from rzenembed.data.engine import run_shards

    ensure_ray(num_cpus=RAY_CPUS)
    run_shards(_warm_worker, [1.0] * RAY_CPUS, max_in_flight=RAY_CPUS, show_progress=False)


def _warm_worker(seconds: float) -> int:
    import rzenembed.prep.cap
    import rzenembed.prep.clean  # noqa: F401

    time.sleep(seconds)  # overlapping tasks force a second worker process
    return os.getpid()


# --------------------------------------------------------------------------- cap: data


@functools.lru_cache(maxsize=2)
def constant_columns(rows: int) -> dict[str, pa.Array]:
    """The columns every generated shard of ``rows`` rows shares."""
    no_media = pa.ListArray.from_arrays(
        pa.array(np.zeros(rows + 1, np.int32)), pa.array([], MEDIA_TYPE)
    )
    no_sides = pa.ListArray.from_arrays(
        pa.array(np.zeros(rows + 1, np.int32)), pa.array([], SIDE_TYPE)
    )
    return {
        "dataset": pa.repeat(pa.scalar("bench"), rows),
        "task_group": pa.repeat(pa.scalar("text_retrieval"), rows),
        "instruction": pa.repeat(pa.scalar("Retrieve the passage for the query."), rows),
        "no_media": no_media,
        "negatives": no_sides,
        "group_id": pa.nulls(rows, pa.string()),
        "label": pa.nulls(rows, pa.string()),
        "segments": pa.nulls(rows, RECORD_SCHEMA.field("segments").type),
    }


def side_array(instruction: pa.Array, text: pa.Array, no_media: pa.Array) -> pa.StructArray:
    return pa.StructArray.from_arrays([instruction, text, no_media], fields=list(SIDE_TYPE))


def records_chunk(start: int, rows: int) -> pa.Table:
    """Rows ``start .. start + rows`` of a text-only dataset, built column-wise."""
    const = constant_columns(rows)
    numbers = pa.array(np.arange(start, start + rows, dtype=np.int64)).cast(pa.string())
    ids = pc.binary_join_element_wise("row-", pc.utf8_lpad(numbers, 10, "0"), "")
    query = pc.binary_join_element_wise("what is item ", numbers, "?", "")
    passage = pc.binary_join_element_wise("item ", numbers, " is a short passage.", "")
    columns = [
        ids,
        const["dataset"],
        const["task_group"],
        side_array(const["instruction"], query, const["no_media"]),
        side_array(pa.repeat(pa.scalar(""), rows), passage, const["no_media"]),
        const["negatives"],
        const["group_id"],
        const["label"],
        const["segments"],
    ]
    return pa.Table.from_arrays(columns, schema=RECORD_SCHEMA)


def write_version(uri: str, rows: int, dataset: str) -> DatasetVersion:
    """Commit a generated text-only version of ``rows`` rows at ``uri``."""
    writer = VersionWriter(uri, RECORD_SCHEMA)
    for index, start in enumerate(range(0, rows, SHARD_ROWS)):
        table = records_chunk(start, min(SHARD_ROWS, rows - start))
        writer.write_shard(f"part-{index:05d}", table)
    return writer.commit(
        dataset=dataset,
        step="generate",
        config_digest="prep-bench",
        code_version="1",
        inputs=[],
        stats={"media_root": uri},
    )


# --------------------------------------------------------------------------- cap: children


def read_ids(version: DatasetVersion) -> int:
    """What ``select_ids`` does without the ranking: the id column of each shard as str."""
    count = 0
    for table in version.iter_tables(columns=["id"]):
        count += len(table.column("id").to_pylist())
    return count


def _previous_filter(job: tuple) -> int:
    """The previous cap's per-shard work: the shard as Python rows, kept by id set membership,
    written back through ``Table.from_pylist``."""
    from rzenembed.data.schema import RECORD_SCHEMA
    from rzenembed.data.version import put_table

    uri, shard, keep, staging = job
    rows = DatasetVersion.open(uri).read_shard(shard).to_pylist()
    kept = [row for row in rows if row["id"] in keep]
    put_table(staging, shard.path, pa.Table.from_pylist(kept, schema=RECORD_SCHEMA))
    return len(kept)


def previous_run_cap(cfg, version: DatasetVersion, limit: int, storage_root: str) -> int:
    """The cap as it was before it moved to the workers (the baseline of the speed-up): the
    driver ranks every id (``select_ids``), then every shard task receives the kept-id set
    and filters Python rows."""
    from rzenembed.data.engine import run_shards
    from rzenembed.prep.cap import select_ids

    keep = select_ids(version, limit, seed=0)
    staging = os.path.join(storage_root, "previous")
    jobs = [(version.uri, shard, keep, staging) for shard in version.manifest.shards]
    return sum(
        run_shards(
            _previous_filter, jobs, max_in_flight=cfg.prep.max_in_flight, show_progress=False
        )
    )


def prepare_child(source_dir: str, storage_root: str, shard_rows: int) -> None:
    """The driver of ingest -> clean -> cap of one raw source, in this fresh process; prints
    a JSON line with the time per step and the driver's memory."""
    import gc

    from rzenembed.prep.prepare import prepare_source

    start_ray()
    source = {
        "name": "bench-text",
        "uri": source_dir,
        "task_group": "text_retrieval",
        "stage": "stage2",
    }
    cfg = bench_config(storage_root, [source], shard_rows=shard_rows)
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    steps = prepare_source(cfg, cfg.sources[0], show_progress=False)
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    result = {
        "rows": steps["ingest"].manifest.stats["rows_in"],
        "kept": steps["cap"].rows,
        "seconds": seconds,
        "baseline_kib": baseline,
        "peak_kib": peak,
        "peak_reset": reset,
    }
    print("RESULT " + json.dumps(result), flush=True)


def child_main(mode: str, version_uri: str, limit: int, storage_root: str) -> None:
    """One measurement in this fresh process; prints a JSON line with time and memory."""
    import gc

    from rzenembed.prep.cap import run_cap, select_ids

    version = DatasetVersion.open(version_uri)
    if mode in ("run_cap", "previous"):
        start_ray()
        cfg = bench_config(storage_root, cap_per_dataset=limit)
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    if mode == "read":
        kept = min(limit, read_ids(version))
    elif mode == "select":
        kept = len(select_ids(version, limit, seed=0))
    elif mode == "previous":
        kept = previous_run_cap(cfg, version, limit, storage_root)
    else:
        kept = run_cap(cfg, version, show_progress=False).rows
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    result = {
        "mode": mode,
        "rows": version.rows,
        "kept": kept,
        "seconds": seconds,
        "baseline_kib": baseline,
        "peak_kib": peak,
        "peak_reset": reset,
    }
    print("RESULT " + json.dumps(result), flush=True)


def run_child(mode: str, version: DatasetVersion, limit: int, storage_root: str) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        mode,
        "--version",
        version.uri,
        "--limit",
        str(limit),
        "--storage",
        storage_root,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout + done.stderr)
        raise RuntimeError(f"{mode} child failed with exit code {done.returncode}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if result["kept"] != min(limit, version.rows):
        raise AssertionError(f"{mode} kept {result['kept']} rows, expected {limit}")
    return result


def bench_cap(out: Path, rows_large: int, rows_small: int, limit: int) -> None:
    sizes = {"large": rows_large, "small": rows_small}
    results: dict[str, dict[str, dict]] = {}
    writes: dict[str, float] = {}
    for name, rows in sizes.items():
        start = time.perf_counter()
        version = write_version(str(out / f"cap-input-{name}"), rows, f"bench-{name}")
        writes[name] = time.perf_counter() - start
        print(f"cap: wrote {rows:,} rows in {writes[name]:.1f} s", flush=True)
        results[name] = {}
        for mode in CAP_MODES:
            results[name][mode] = run_child(mode, version, limit, str(out / f"cap-out-{name}"))
            print(f"cap: {mode} on {rows:,} rows done", flush=True)
    report_cap(sizes, writes, results, limit)


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def report_cap(sizes: dict, writes: dict, results: dict, limit: int) -> None:
    rows = []
    for name, count in sizes.items():
        for mode, label in CAP_MODES.items():
            r = results[name][mode]
            rows.append(
                [
                    f"{count:,} rows, {label}",
                    f"{writes[name]:.1f}" if mode == "read" else "",
                    f"{r['seconds']:.1f}",
                    f"{count / r['seconds'] / 1000:.0f}k",
                    _mib(r["baseline_kib"]),
                    _mib(r["peak_kib"]),
                    _mib(r["peak_kib"] - r["baseline_kib"]),
                ]
            )
    headers = ["cap to N=" + f"{limit:,}", "write s", "time s", "rows/s"]
    headers += ["baseline MiB", "peak MiB", "increase MiB"]
    print_table("cap: time and driver memory (each in a fresh process)", headers, rows)
    for mode in CAP_MODES:
        large, small = results["large"][mode], results["small"][mode]
        growth = (large["peak_kib"] - large["baseline_kib"]) / max(
            1, small["peak_kib"] - small["baseline_kib"]
        )
        print(
            f"{mode}: memory ratio large/small: increase {growth:.2f}x, "
            f"peak {large['peak_kib'] / small['peak_kib']:.2f}x (target: within 1.5x)"
        )
    if not all(r["peak_reset"] for by_mode in results.values() for r in by_mode.values()):
        print("note: /proc/self/clear_refs not writable: peaks include import-time peaks")


# --------------------------------------------------------------------------- clips


def write_video(path: Path, seconds: int = 60, size: tuple[int, int] = (128, 96), fps: int = 10):
    """An H.264 MP4 of a square crossing a drifting gradient (libx264, qp 30, fast)."""
    import av

    width, height = size
    ramp = np.linspace(0, 255, width, dtype=np.float32)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "30", "preset": "fast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(seconds * fps):
            pixels = np.empty((height, width, 3), np.uint8)
            pixels[..., 0] = (ramp + index * 2) % 256
            pixels[..., 1] = 120
            pixels[..., 2] = 255 - pixels[..., 0]
            x = (index * 3) % (width - 16)
            y = int((height - 16) * (0.5 + 0.4 * math.sin(index / 15)))
            pixels[y : y + 16, x : x + 16] = (250, 250, 40)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def clip_knobs() -> dict[str, Any]:
    """What ``split_row`` reads from the config: 10 s clips, 8 frames each."""
    return {
        "clip_seconds": 10.0,
        "clip_min_s": 1.0,
        "clip_hard_negatives": 2,
        "jpeg_quality": 90,
        "max_visual_tokens": 1280,
        "video_frames": 8,
        "min_visual_tokens": 4,
    }


def bench_clips(out: Path, repeats: int = 9) -> None:
    import decord

    from rzenembed.data import media as media_ops
    from rzenembed.prep.video import clip_windows, split_row

    folder = out / "clips"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "long.mp4"
    write_video(path)
    data = path.read_bytes()
    knobs = clip_knobs()
    row = record(
        "long-video",
        "bench-videos",
        "video_retrieval",
        side("a square crosses a gradient"),
        side(media_items=[media("video", "long.mp4")]),
    )
    clips = split_row(row, str(folder), knobs, None)
    times = [ts for clip in clips for ts in clip["positive"]["media"][0]["timestamps"]]
    info = media_ops.probe_video(data)
    indices = [min(math.floor(t * info.fps + 0.5), info.num_frames - 1) for t in times]
    windows = clip_windows(info.duration_s, None, knobs["clip_seconds"], knobs["clip_min_s"])
    per_clip = [clip["positive"]["media"][0]["timestamps"] for clip in clips]

    def bare() -> None:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        reader.get_batch(indices).asnumpy()

    frames = [media_ops.decode_frames(data, ts) for ts in per_clip]
    median = interleaved_medians(
        {
            "split": lambda: split_row(row, str(folder), knobs, None),
            "bare": bare,
            "probe": lambda: media_ops.probe_video(data),
            "decode": lambda: [media_ops.decode_frames(data, t) for t in per_clip],
            "encode": lambda: [media_ops.encode_frames(f, 90) for f in frames],
        },
        repeats,
    )
    split_s, bare_s = median["split"], median["bare"]
    count = len(indices)
    print(
        f"\nclips: {path.stat().st_size / 1024:.0f} KiB MP4, {info.num_frames} frames, "
        f"{info.duration_s:.0f} s, {info.width}x{info.height} @ {info.fps:g} fps; "
        f"{len(windows)} clips x {count // len(windows)} frames = {count} sampled frames"
    )
    rows = [
        ["clip path (split_row)", f"{split_s * 1000:.1f}", f"{count / split_s:.0f}"],
        ["  of which probe_video", f"{median['probe'] * 1000:.1f}", ""],
        ["  of which decode_frames per clip", f"{median['decode'] * 1000:.1f}", ""],
        ["  of which JPEG encode", f"{median['encode'] * 1000:.1f}", ""],
        ["bare decord (1 reader, 1 get_batch)", f"{bare_s * 1000:.1f}", f"{count / bare_s:.0f}"],
    ]
    print_table(f"clips: median of {repeats}", ["path", "ms per video", "frames/s"], rows)
    print(f"clip path / bare decord frames/s: {bare_s / split_s:.2f}x")


# --------------------------------------------------------------------------- clean


def write_image_source(folder: Path, images: int, seed: int = 0) -> None:
    """``images`` rows of caption -> 128x96 PNG scene, in the project's own raw format."""
    from rzenembed.data import sample_render as draw

    rng = np.random.default_rng(seed)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(images):
        placed = draw.place_shapes(rng, (128, 96), int(rng.integers(1, 4)))
        image = draw.scene_image(rng, placed, (128, 96))
        draw.add_clutter(rng, image, int(rng.integers(2, 6)))
        uri = f"media/scene_{i:05d}.png"
        (folder / uri).write_bytes(draw.png_bytes(image))
        row = record(
            f"scene-{i:05d}",
            "bench-images",
            "image_retrieval",
            side(draw.caption(placed), "Find an image that matches the given caption."),
            side(media_items=[media("image", uri)]),
        )
        lines.append(json.dumps(row))
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")


def image_source(folder: Path) -> dict[str, Any]:
    return {"name": "bench-images", "uri": str(folder), "task_group": "image_retrieval"}


def clean_config(root: Path, source: dict, in_flight: int) -> PipelineConfig:
    return bench_config(str(root), [source], shard_rows=25, max_in_flight=in_flight)


def clean_knobs(cfg: PipelineConfig) -> Any:
    """The thresholds ``run_clean`` hands to ``inspect_row`` (no decontamination)."""
    from rzenembed.prep.clean import clean_knobs as knobs_of

    return knobs_of(cfg, cfg.sources[0].name)


def inspect_shard(job: tuple) -> int:
    """The clean step's inspection of one shard (a Ray task); returns the row count."""
    from rzenembed.prep.clean import inspect_row

    loader, root, knobs = job
    return len([inspect_row(i, row, root, knobs, None) for i, row in enumerate(loader())])


def inspect_jobs(version: DatasetVersion, cfg: PipelineConfig) -> list[tuple]:
    from rzenembed.prep.base import media_root_of, version_shard_loader

    root, knobs = media_root_of(version), clean_knobs(cfg)
    return [(version_shard_loader(version, s), root, knobs) for s in version.manifest.shards]


def serial_inspect_seconds(version: DatasetVersion, cfg: PipelineConfig) -> float:
    """Every shard's inspection in this process, one after the other: no Ray."""
    jobs = inspect_jobs(version, cfg)
    seconds, _ = timed(lambda: [inspect_shard(job) for job in jobs])
    return seconds


def bench_clean(out: Path, images: int, repeats: int = 5) -> None:
    from rzenembed.data.engine import run_shards
    from rzenembed.prep.clean import run_clean
    from rzenembed.prep.ingest import run_ingest

    folder = out / "clean-source"
    write_image_source(folder, images)
    source = image_source(folder)
    start_ray()
    ingest_cfg = clean_config(out / "clean-ingest", source, 2)
    version = run_ingest(ingest_cfg, ingest_cfg.sources[0], show_progress=False)
    jobs = inspect_jobs(version, ingest_cfg)
    fan_out = functools.partial(run_shards, show_progress=False)
    seconds: dict[str, list[float]] = {"serial": [serial_inspect_seconds(version, ingest_cfg)]}
    burns = [calibrate_burn(seconds["serial"][0] / len(jobs))] * len(jobs)
    for attempt in range(repeats):
        if attempt:
            seconds["serial"].append(serial_inspect_seconds(version, ingest_cfg))
        for k in (1, 2):  # alternate, so that load changes hit both settings alike
            control_s, _ = timed(lambda k=k: fan_out(burn, burns, max_in_flight=k))
            inspect_s, _ = timed(lambda k=k: fan_out(inspect_shard, jobs, max_in_flight=k))
            cfg = clean_config(out / f"clean-{k}-{attempt}", source, k)
            clean_s, cleaned = timed(lambda cfg=cfg: run_clean(cfg, version, show_progress=False))
            seconds.setdefault(f"control-{k}", []).append(control_s)
            seconds.setdefault(f"inspect-{k}", []).append(inspect_s)
            seconds.setdefault(f"run_clean-{k}", []).append(clean_s)
    print(
        f"\nclean: {version.rows} ingested image rows in {len(jobs)} shards of 25; "
        f"kept/rejected by clean: {cleaned.rows}/{cleaned.manifest.rejected}"
    )
    report_clean(version.rows, seconds)


def burn(count: int) -> int:
    """Pure-Python CPU work: the control task that shows how many cores Ray really got."""
    return sum(i * i for i in range(count))


def calibrate_burn(seconds: float) -> int:
    """The ``burn`` count that takes about ``seconds`` here."""
    count = 100_000
    elapsed = min(timed(lambda: burn(count))[0] for _ in range(5))
    return max(1000, round(count * seconds / elapsed))


CLEAN_ROWS = {
    "control-1": "control, pure-Python tasks, max_in_flight=1",
    "control-2": "control, pure-Python tasks, max_in_flight=2",
    "serial": "inspect_row, serially in the driver (no Ray)",
    "inspect-1": "inspection pass on Ray, max_in_flight=1",
    "inspect-2": "inspection pass on Ray, max_in_flight=2",
    "run_clean-1": "run_clean, max_in_flight=1",
    "run_clean-2": "run_clean, max_in_flight=2",
}


def report_clean(images: int, seconds: dict[str, list[float]]) -> None:
    best = {key: min(values) for key, values in seconds.items()}
    median = {key: statistics.median(values) for key, values in seconds.items()}
    rows = [
        [
            label,
            f"{best[key]:.2f}",
            f"{images / best[key]:.0f}",
            f"{median[key]:.2f}",
            " ".join(f"{s:.2f}" for s in seconds[key]),
        ]
        for key, label in CLEAN_ROWS.items()
    ]
    headers = ["Ray with 2 CPUs", "best s", "images/s", "median s", "each run s"]
    print_table(f"clean: {len(seconds['serial'])} rounds", headers, rows)
    for what in ("control", "inspect", "run_clean"):
        one, two = f"{what}-1", f"{what}-2"
        print(
            f"{what}: speed-up max_in_flight 2 vs 1: {best[one] / best[two]:.2f}x best, "
            f"{median[one] / median[two]:.2f}x median"
        )


# --------------------------------------------------------------------------- driver


def write_text_source(folder: Path, rows: int, per_file: int = 250_000) -> None:
    """``rows`` text pairs in the project's JSONL format, ``per_file`` rows per file."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, per_file):
        with (folder / f"records-{start // per_file:04d}.jsonl").open("w") as f:
            for i in range(start, min(rows, start + per_file)):
                f.write(
                    json.dumps(
                        {
                            "id": f"r{i}",
                            "query": {"text": f"question number {i}"},
                            "positive": {"text": f"the answer to {i} is {i * 7}"},
                        }
                    )
                    + "\n"
                )


def bench_driver(out: Path, sizes: list[int], shard_rows: int = 10_000) -> None:
    """Driver peak RSS and time of ingest -> clean -> cap (stage-2 cap 100k) on text sources
    of each size, each in a fresh process on a local Ray with 2 CPUs."""
    results = {}
    for rows in sizes:
        folder = out / f"text-{rows}"
        write_text_source(folder, rows)
        store = str(out / f"store-{rows}")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--prepare-child",
            str(folder),
            "--storage",
            store,
            "--shard-rows",
            str(shard_rows),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            sys.stderr.write(done.stdout + done.stderr)
            raise RuntimeError(f"prepare child failed with exit code {done.returncode}")
        results[rows] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"driver: {rows:,} rows prepared", flush=True)
    table = [
        [
            f"{rows:,}",
            f"{r['seconds']:.1f}",
            f"{rows / r['seconds'] / 1000:.1f}k",
            _mib(r["baseline_kib"]),
            _mib(r["peak_kib"]),
            _mib(r["peak_kib"] - r["baseline_kib"]),
            f"{r['kept']:,}",
        ]
        for rows, r in results.items()
    ]
    print_table(
        "driver: ingest -> clean -> cap, driver memory (each in a fresh process)",
        ["rows", "time s", "rows/s", "baseline MiB", "peak MiB", "increase MiB", "kept"],
        table,
    )
    small, large = results[min(sizes)], results[max(sizes)]
    growth = (large["peak_kib"] - large["baseline_kib"]) / max(
        1, small["peak_kib"] - small["baseline_kib"]
    )
    print(
        f"driver peak {max(sizes):,} / {min(sizes):,} rows: "
        f"{large['peak_kib'] / small['peak_kib']:.2f}x (target: within 1.3x); "
        f"increase {growth:.2f}x"
    )


# --------------------------------------------------------------------------- dedup


def _complete_edges(tables: list, radius: int, rows: set[int]) -> list:
    """The partitions' complete edge lists of ``rows`` (the resolve's second round)."""
    from rzenembed.prep.dedup import find_groups

    return [find_groups(t, radius, only=rows) for t in tables]


def bench_dedup(counts_arg: str, radius: int = 4) -> None:
    """The dedup decision for 10k..100k images' facts, single-threaded, each piece timed:
    keys (what the inspection tasks add), the partitions' group-by (what the partition
    tasks do; summed over partitions, i.e. the CPU time to spread over the workers), the
    driver's resolve, and the sequential reference ``decide`` for comparison. Facts are
    generated (image decoding is the inspection's own, linear, cost)."""
    from rzenembed.prep.clean import partition_count
    from rzenembed.prep.dedup import (
        decide,
        find_groups,
        order_of,
        partition_keys,
        planted_facts,
        resolve,
        row_keys,
    )

    rows_out = []
    for count in [int(c) for c in counts_arg.split(",")]:
        shards = planted_facts(count, radius)
        partitions = partition_count(count, len(shards))
        start = time.perf_counter()
        tables: list[list] = [[] for _ in range(partitions)]
        for s, facts in enumerate(shards):
            keys = []
            for f in facts:
                keys += row_keys(order_of(s, f.position), f, "example", radius)
            for p, table in enumerate(partition_keys(keys, partitions)):
                tables[p].append(table)
        keyed = time.perf_counter()
        merged = [pa.concat_tables(t) for t in tables]
        groups = [find_groups(t, radius) for t in merged]
        grouped = time.perf_counter()
        complete = functools.partial(_complete_edges, merged, radius)
        found = resolve(groups, complete)
        resolved = time.perf_counter()
        decide(shards, radius)
        sequential = time.perf_counter() - resolved
        total = resolved - start
        rows_out.append(
            [
                f"{count:,}",
                partitions,
                f"{keyed - start:.2f}",
                f"{grouped - keyed:.2f}",
                f"{resolved - grouped:.3f}",
                f"{total:.2f}",
                f"{count / total / 1000:.0f}k",
                f"{sequential:.2f}",
                f"{len(found):,}",
            ]
        )
    print_table(
        "dedup: group-by pieces (one core) against the sequential decide",
        [
            "images",
            "partitions",
            "keys s",
            "group-by s",
            "resolve s",
            "total s",
            "images/s",
            "sequential decide s",
            "duplicates",
        ],
        rows_out,
    )


# --------------------------------------------------------------------------- recaption


def captioner_folder(out: Path, gpu: bool) -> Path:
    """The tiny model (or, with ``gpu``, the 2B architecture with random weights) with
    every caption forced to 32 new tokens."""
    from rzenembed.modeling.tiny import build_tiny_model

    folder = out / ("captioner-2b" if gpu else "captioner")
    if not (folder / "config.json").is_file():
        build_tiny_model(folder)
        if gpu:
            import torch
            from transformers import Qwen2VLForConditionalGeneration

            from rzenembed.modeling.architectures import qwen2vl_config

            tiny = json.loads((folder / "config.json").read_text())
            config = qwen2vl_config("qwen2vl-2b")
            # The tiny processor's special token ids, so its prompts place the images.
            for key in ("image_token_id", "video_token_id", "vision_start_token_id",
                        "vision_end_token_id"):  # fmt: skip
                setattr(config, key, tiny[key])
            for stale in folder.glob("model*.safetensors"):
                stale.unlink()
            torch.manual_seed(0)
            model = Qwen2VLForConditionalGeneration(config)
            model.to(torch.bfloat16).save_pretrained(folder)
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**config, "min_new_tokens": 32}))
    return folder


def bench_recaption(out: Path, captions: int, gpu: bool, repeats: int = 3) -> None:
    import numpy as np
    from PIL import Image

    from rzenembed.config import RecaptionConfig
    from rzenembed.prep.recaption import Captioner

    folder = captioner_folder(out, gpu)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), "RGB")
              for _ in range(captions)]  # fmt: skip
    rows, base = [], None
    for batch in (1, 8, 32):
        settings = RecaptionConfig(model=str(folder), max_new_tokens=32, batch_size=batch,
                                   max_visual_tokens=64,
                                   dtype="bfloat16" if gpu else "float32")  # fmt: skip
        captioner = Captioner(str(folder), settings, "cuda" if gpu else "cpu")
        captioner.caption(images[:batch])  # warm-up
        seconds = []
        for _ in range(repeats):
            took, _ = timed(lambda c=captioner: c.caption(images))
            seconds.append(took)
        rate = captions / statistics.median(seconds)
        base = base or rate
        rows.append([batch, f"{rate:.1f}", f"{rate / base:.2f}x",
                     " ".join(f"{s:.2f}" for s in seconds)])  # fmt: skip
    device = "CUDA, Qwen2-VL-2B architecture" if gpu else "CPU, tiny model"
    print_table(f"recaption: {captions} images, 32 new tokens each, {device}",
                ["batch", "captions/s", "vs batch 1", "each run s"], rows)  # fmt: skip


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        choices=["cap", "clips", "clean", "dedup", "driver", "recaption", "all"],
        default="all",
    )
    parser.add_argument("--captions", type=int, default=64, help="images for recaption")
    parser.add_argument("--gpu", action="store_true", help="recaption on CUDA, 2B architecture")
    parser.add_argument("--rows-large", type=int, default=5_000_000)
    parser.add_argument("--rows-small", type=int, default=1_000_000)
    parser.add_argument("--limit", type=int, default=100_000, help="cap N")
    parser.add_argument("--images", type=int, default=600, help="images for the clean part")
    parser.add_argument(
        "--driver-rows", default="100000,1000000", help="driver: raw text rows, comma-separated"
    )
    parser.add_argument("--prepare-child", help=argparse.SUPPRESS)
    parser.add_argument("--shard-rows", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument(
        "--dedup-rows",
        default="10000,30000,100000",
        help="dedup: image counts (pHash facts), comma-separated",
    )
    parser.add_argument("--out", help="working folder (kept); default: a temporary one")
    # Internal: one cap measurement in a fresh process.
    parser.add_argument("--child", choices=list(CAP_MODES), help=argparse.SUPPRESS)
    parser.add_argument("--version", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_parts(args: argparse.Namespace, out: Path) -> None:
    print(f"machine: {machine()}; Python {platform.python_version()}, pyarrow {pa.__version__}")
    parts = {
        "cap": lambda: bench_cap(out, args.rows_large, args.rows_small, args.limit),
        "clips": lambda: bench_clips(out),
        "clean": lambda: bench_clean(out, args.images),
        "dedup": lambda: bench_dedup(args.dedup_rows),
        "driver": lambda: bench_driver(out, [int(r) for r in args.driver_rows.split(",")]),
        "recaption": lambda: bench_recaption(out, args.captions, args.gpu),
    }
    for name, work in parts.items():
        if args.part in (name, "all"):
            before = os.getloadavg()[0]
            seconds, _ = timed(work)
            print(
                f"[{name}: {seconds:.0f} s; 1-min load average {before:.1f} before, "
                f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs]",
                flush=True,
            )


def exit_now() -> None:
    """Stop Ray, flush and exit without the interpreter's teardown.

    ``DatasetVersion.read_shard`` hands pyarrow a Python file object; pyarrow can still be
    cleaning up after such reads when the interpreter shuts down, and then aborts ("terminate
    called without an active exception", apache/arrow#34314) or hangs (#33975). On the
    benchmark machine a script that only read shards this way aborted at exit 24 times in 60.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.version, args.limit, args.storage)
        exit_now()
    if args.prepare_child:
        prepare_child(args.prepare_child, args.storage, args.shard_rows)
        exit_now()
    start = time.perf_counter()
    if args.out:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        run_parts(args, out)
    else:
        with tempfile.TemporaryDirectory(prefix="prep-bench-") as tmp:
            run_parts(args, Path(tmp))
    print(f"\ntotal: {time.perf_counter() - start:.0f} s")
    exit_now()


if __name__ == "__main__":
    main()
