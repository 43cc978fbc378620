"""Evaluation costs: embedding throughput and global ranking time.

Run from the repository root:

    python benchmarks/eval_bench.py [--texts 512] [--images 128] [--videos 16]
                                    [--batch-size 16] [--queries 10000]
                                    [--candidates 100000] [--dim 1536]
                                    [--project-gpus 8] [--rates text=..,image=..,video=..]
                                    [--sets IMPORTED_MMEB_V2]
                                    [--part all|encode|pool] [--pool-cpus 2]
                                    [--gpu-factor 1]

The evaluation-throughput figures in docs/PERFORMANCE.md: ``--part pool``.

1. **Embedding throughput** (items/s) of the tiny model on CPU through
   ``RzenEmbedder.encode``, for text-only inputs (4 to 200 words, log-uniform, so lengths
   differ as in real corpora) and image inputs (sides from 28 to 224 pixels: 4 to 64 visual
   tokens), with length-sorted batching (what ``encode`` does) and without; the ratio is
   what sorting buys by cutting padding. Each figure is the median of ``--repeats`` runs
   after one warm-up run.
2. **Ranking** ``--queries`` queries against a global corpus of ``--candidates`` random unit
   vectors of ``--dim`` dimensions with ``score_dataset`` (blocked matrix products, then the
   tie-exact per-query metrics), split into the matrix products alone and the whole call.
3. **The full MMEB-V2 run, projected**: the items the 78 datasets embed (queries plus
   candidates, by kind: text, image, 8-frame video), from an imported release (``--sets``:
   exact counts) or from the benchmark table with the assumptions ``WORKLOAD`` states,
   divided by per-device rates (items/s) and ``--project-gpus`` embedding actors. The rates
   are the ones measured in part 1 (tiny model, this machine) unless ``--rates`` gives
   rates measured elsewhere, e.g. by ``--gpu`` on a GPU machine: the Qwen2-VL-2B
   architecture with random weights in bf16 (``--gpu --dry-run``: 2 layers on CPU, to
   check the code path).
4. **The actor-pool evaluation path** (``--part pool``; ``all`` runs 1-3 and 4): what
   ``_score_with_actors`` runs, timed on its own: raw sides (text, image files, 8-frame
   videos stored as folders of 224x224 JPEG frames) sent by ``ActorPoolEncoder`` to
   ``EmbedActor``s, which decode and embed them in calls of ``--batch-size`` sides, two in
   flight per actor. Local Ray with ``--pool-cpus`` CPUs (explicit), no dashboard, one CPU
   per actor; items/s with 1 and 2 actors (after one warm-up pass per kind; each figure
   the median of ``--repeats``) and the 2-actor / 1-actor ratio. Then the 78-dataset
   projection of part 3 from these per-item rates (per actor) on ``--project-gpus``
   devices. No GPU figure exists in docs/PERFORMANCE.md yet, so this is a CPU-rate
   projection: the tiny model's one-core actor rates, multiplied by ``--gpu-factor``
   (default 1: unscaled), with actors assumed to scale linearly; it sizes the pipeline's
   overheads, not the 2B model's GPU time (use ``--rates`` from ``--gpu`` for that).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rzenembed.config import ModelConfig
from rzenembed.evaluation.benchmark import mmeb_v2
from rzenembed.evaluation.evalset import EvalDataset, discover, load_eval_folder
from rzenembed.evaluation.runner import SCORE_BLOCK, score_dataset
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.modeling.tiny import build_tiny_model

WORDS = [
    "red",
    "green",
    "blue",
    "circle",
    "square",
    "star",
    "moves",
    "left",
    "right",
    "top",
    "bottom",
    "page",
    "table",
    "row",
]


def texts(count: int, rng: np.random.Generator) -> list[EmbedInput]:
    lengths = np.exp(rng.uniform(np.log(4), np.log(200), count)).astype(int)
    return [
        EmbedInput(text=" ".join(rng.choice(WORDS, n)), instruction="Find it.") for n in lengths
    ]


def images(count: int, rng: np.random.Generator) -> list[EmbedInput]:
    out = []
    for _ in range(count):
        side = int(rng.integers(28, 225))
        pixels = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        out.append(EmbedInput(images=[Image.fromarray(pixels, "RGB")], instruction="Represent."))
    return out


def videos(count: int, rng: np.random.Generator, frames: int = 8) -> list[EmbedInput]:
    """Videos of ``frames`` frames at 224x224 (the benchmark samples 8 frames)."""
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 255, (frames, 224, 224, 3), dtype=np.uint8)
        clip = [Image.fromarray(f, "RGB") for f in pixels]
        out.append(EmbedInput(video=clip, instruction="Understand the content of the video."))
    return out


# --------------------------------------------------------------------------- projection

# Unique candidates the benchmark's datasets embed, where the table cannot say. Image CLS
# lists are class lists (the class counts below); other local image lists hold 1,000
# candidates per query, between fully shared (1,000) and all distinct (queries x 1,000):
# both bounds are projected. Video QA ranks about 5 options, moment retrieval about 10
# clips per query; a visual-document corpus is taken as ``PAGES`` pages.
CLASSES = {
    "ImageNet-1K": 1000,
    "N24News": 24,
    "HatefulMemes": 2,
    "VOC2007": 20,
    "SUN397": 397,
    "Place365": 365,
    "ImageNet-A": 200,
    "ImageNet-R": 200,
    "ObjectNet": 313,
    "Country211": 211,
}
LOCAL_LIST = 1000
QA_OPTIONS, MRET_CLIPS, PAGES, SSV2_LABELS = 5, 10, 1000, 174


def table_workload(bound: str) -> dict[str, float]:
    """Items by kind (text, image, video) the 78 datasets embed, by the assumptions above
    (``bound``: ``low`` shares local image lists across queries, ``high`` does not)."""
    items = {"text": 0.0, "image": 0.0, "video": 0.0}
    for d in mmeb_v2():
        n = d.queries
        if d.parser == "image_cls":
            items["image"] += n
            items["text"] += CLASSES[d.dataset]
        elif d.parser in ("image_qa", "image_i2t", "image_t2i", "image_i2i_vg"):
            items["text" if d.parser == "image_t2i" else "image"] += n
            listed = LOCAL_LIST if bound == "low" else n * LOCAL_LIST
            items["text" if d.parser in ("image_qa", "image_i2t") else "image"] += listed
        elif d.parser in ("video_cls", "video_ssv2"):
            items["video"] += n
            items["text"] += d.labels or SSV2_LABELS
        elif d.parser == "video_ret":
            items["text"] += n
            items["video"] += n
        elif d.parser in ("video_mret", "video_momentseeker"):
            items["video"] += n * (1 + MRET_CLIPS)
        elif d.modality == "video":  # QA
            items["video"] += n
            items["text"] += n * QA_OPTIONS
        else:  # visual documents
            items["text"] += n
            items["image"] += PAGES
    return items


def sets_workload(root: str) -> dict[str, float]:
    """Items by kind in imported evaluation sets (exact)."""
    items = {"text": 0.0, "image": 0.0, "video": 0.0}
    for folder in discover(root):
        for dataset in load_eval_folder(folder):
            sides = [q["query"] for q in dataset.queries]
            sides += [c["candidate"] for c in dataset.candidates]
            for side in sides:
                kinds = {m["kind"] for m in side.get("media") or []}
                kind = "video" if kinds & {"video", "frames"} else "image" if kinds else "text"
                items[kind] += 1
    return items


def project(items: dict[str, float], rates: dict[str, float], gpus: int) -> float:
    """Hours of embedding with ``gpus`` actors, each at ``rates`` items/s."""
    return sum(items[k] / rates[k] for k in items) / gpus / 3600


def gpu_embedder(dry: bool, family: str = "qwen2-vl"):
    """The family's ~2B architecture with random weights (bf16 on CUDA; 2 layers on CPU
    for a dry run), as ``train_bench.py --gpu`` builds it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_bench import architecture, build_gpu_embedder

    from rzenembed.modeling.tiny import TinySpec, build_tokenizer

    if not dry and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA; use --gpu --dry-run to check the code on CPU")
    config = architecture(2 if dry else None, family)
    # Inputs go through the tiny processor (no download): the backbone must know its
    # placeholder ids (all inside the 2B vocabulary).
    ids = build_tokenizer(TinySpec()).get_vocab()
    for field, token in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    ):
        setattr(config, field, ids[token])
        setattr(config.text_config, field, ids[token])
    if dry:
        return build_gpu_embedder(config, torch.device("cpu"), torch.float32, family)
    return build_gpu_embedder(config, torch.device("cuda"), torch.bfloat16, family)


def throughput(embedder, items, batch_size, sort, repeats) -> float:
    embedder.encode(items[: 2 * batch_size], batch_size, sort_by_length=sort)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        embedder.encode(items, batch_size, sort_by_length=sort)
        times.append(time.perf_counter() - start)
    return len(items) / statistics.median(times)


def ranking(queries: int, candidates: int, dim: int, seed: int = 0) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=gen), dim=1)
    c = torch.nn.functional.normalize(torch.randn(candidates, dim, generator=gen), dim=1)
    relevant = torch.randint(candidates, (queries,), generator=gen).tolist()
    dataset = EvalDataset(
        name="bench",
        category="visdoc_ood",
        media_root=".",
        queries=[
            {"qid": str(i), "candidate_ids": [], "relevant_ids": [str(r)]}
            for i, r in enumerate(relevant)
        ],
        candidates=[
            {"cid": str(i), "dataset": "bench", "candidate": {}} for i in range(candidates)
        ],
    )
    start = time.perf_counter()
    for s in range(0, queries, SCORE_BLOCK):
        (q[s : s + SCORE_BLOCK] @ c.T).numpy()
    matmul = time.perf_counter() - start
    start = time.perf_counter()
    rows = score_dataset(q, c, dataset)
    total = time.perf_counter() - start
    assert len(rows) == queries
    return {"matmul_s": matmul, "total_s": total, "queries_per_s": queries / total}


def measure_rates(embedder, args, rng) -> dict[str, float]:
    print(f"{'inputs':<8}{'items':>7}{'sorted/s':>11}{'unsorted/s':>12}{'ratio':>8}")
    rates = {}
    kinds = (
        ("text", texts(args.texts, rng)),
        ("image", images(args.images, rng)),
        ("video", videos(args.videos, rng)),
    )
    for name, items in kinds:
        fast = throughput(embedder, items, args.batch_size, True, args.repeats)
        slow = throughput(embedder, items, args.batch_size, False, args.repeats)
        rates[name] = fast
        print(f"{name:<8}{len(items):>7}{fast:>11.1f}{slow:>12.1f}{fast / slow:>7.2f}x")
    return rates


# --------------------------------------------------------------------------- actor pool


def write_pool_media(root: Path, counts: dict[str, int], rng: np.random.Generator) -> dict:
    """Raw sides by kind, their media written under ``root`` (what an eval set holds)."""
    sides: dict[str, list[dict]] = {"text": [], "image": [], "video": []}
    for item in texts(counts["text"], rng):
        sides["text"].append({"instruction": item.instruction, "text": item.text, "media": []})
    for i, item in enumerate(images(counts["image"], rng)):
        item.images[0].save(root / f"img{i}.png")
        media = [{"kind": "image", "uri": f"img{i}.png"}]
        sides["image"].append({"instruction": "Represent.", "text": "", "media": media})
    for i, item in enumerate(videos(counts["video"], rng)):
        folder = root / f"clip{i}"
        folder.mkdir()
        for j, frame in enumerate(item.video):
            frame.save(folder / f"{j:03d}.jpg", quality=90)
        media = [{"kind": "frames", "uri": f"clip{i}"}]
        sides["video"].append({"instruction": item.instruction, "text": "", "media": media})
    return sides


def pool_rates(model_dir: Path, root: Path, sides: dict, actors: int, args) -> dict[str, float]:
    """Items/s by kind through ``ActorPoolEncoder`` with ``actors`` one-CPU actors."""
    import ray

    from rzenembed.config import config_from_dict
    from rzenembed.evaluation.actors import EVAL_CALLS_PER_ACTOR, ActorPoolEncoder, EmbedActor

    model = {"name_or_path": str(model_dir), "max_visual_tokens": 64, "max_text_tokens": 512}
    cfg = config_from_dict({"model": {**model, "video_frames": 8}, "compute": {"step_cpus": 1}})
    in_flight = args.in_flight or EVAL_CALLS_PER_ACTOR
    actor_cls = ray.remote(EmbedActor).options(num_cpus=1, num_gpus=0, max_concurrency=in_flight)
    pool = ActorPoolEncoder(
        lambda: actor_cls.remote(cfg, str(model_dir)), actors, in_flight=in_flight
    )
    rates = {}
    try:
        for kind, items in sides.items():
            pool.encode_sides(items[: 2 * args.batch_size], str(root), 8, args.batch_size)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                pool.encode_sides(items, str(root), 8, args.batch_size)
                times.append(time.perf_counter() - start)
            rates[kind] = len(items) / statistics.median(times)
    finally:
        pool.close()
    total = sum(len(v) for v in sides.values())
    rates["all"] = total / sum(len(sides[k]) / rates[k] for k in sides)
    return rates


def pool_part(args, rng: np.random.Generator) -> None:
    """Part 4: the actor-pool path with 1 and 2 actors, then the projection."""
    import ray

    from rzenembed.compute.connect import ensure_ray
    from rzenembed.evaluation.actors import EVAL_CALLS_PER_ACTOR

    counts = {"text": args.pool_texts, "image": args.pool_images, "video": args.pool_videos}
    ensure_ray(num_cpus=args.pool_cpus)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny")
        media = Path(tmp) / "media"
        media.mkdir()
        sides = write_pool_media(media, counts, rng)
        print(
            f"\nactor pool, local Ray num_cpus={args.pool_cpus}, 1 CPU per actor, "
            f"batch {args.batch_size}, {args.in_flight or EVAL_CALLS_PER_ACTOR} calls in flight "
            "per actor"
        )
        print(f"{'actors':<8}{'text/s':>9}{'image/s':>9}{'video/s':>9}{'all/s':>9}")
        measured = {}
        for actors in (1, 2):
            measured[actors] = pool_rates(model_dir, media, sides, actors, args)
            r = measured[actors]
            row = "".join(f"{r[k]:>9.1f}" for k in ("text", "image", "video", "all"))
            print(f"{actors:<8}{row}")
    ray.shutdown()
    ratio = measured[2]["all"] / measured[1]["all"]
    print(f"2 actors / 1 actor: {ratio:.2f}x (items/s, mixed workload {counts})")
    rates = {k: v * args.gpu_factor for k, v in measured[1].items() if k != "all"}
    rate_text = ", ".join(f"{k} {v:.1f}/s" for k, v in rates.items())
    print(
        f"projection, {args.project_gpus} devices, CPU-rate (1-actor pool rates x "
        f"gpu-factor {args.gpu_factor:g}: {rate_text}):"
    )
    for name in ("low", "high"):
        items = table_workload(name)
        hours = project(items, rates, args.project_gpus)
        counts_text = ", ".join(f"{k} {v:,.0f}" for k, v in items.items())
        print(f"  78 datasets ({name}): {counts_text} items -> {hours:.2f} h of embedding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--candidates", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--project-gpus", type=int, default=8)
    parser.add_argument("--rates", help="items/s per device: text=R,image=R,video=R")
    parser.add_argument("--sets", help="an imported MMEB-V2 folder: exact item counts")
    parser.add_argument("--gpu", action="store_true", help="rates of the 2B architecture")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: 2 layers on CPU")
    parser.add_argument("--family", default="qwen2-vl", help="with --gpu: the backbone family")
    parser.add_argument("--part", choices=("all", "encode", "pool"), default="all")
    parser.add_argument("--pool-cpus", type=int, default=2, help="local Ray CPUs for part 4")
    parser.add_argument("--pool-texts", type=int, default=256)
    parser.add_argument("--pool-images", type=int, default=256)
    parser.add_argument("--pool-videos", type=int, default=64)
    parser.add_argument("--in-flight", type=int, help="part 4: calls per actor (default 2)")
    parser.add_argument("--gpu-factor", type=float, default=1.0, help="part 4 rate scale")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    if args.part in ("all", "pool"):
        pool_part(args, np.random.default_rng(1))
    if args.part == "pool":
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.gpu:
            embedder = gpu_embedder(args.dry_run, args.family)
            what = f"{args.family} ~2B architecture" + (
                " (DRY RUN: 2 layers, CPU)" if args.dry_run else " bf16 on CUDA"
            )
        else:
            path = build_tiny_model(Path(tmp) / "tiny")
            cfg = ModelConfig(name_or_path=str(path), max_visual_tokens=64, max_text_tokens=512)
            embedder = RzenEmbedder.from_pretrained(path, config=cfg)
            what = f"tiny model on CPU, torch threads {args.threads}"
        print(f"{what}, batch {args.batch_size}")
        rates = measure_rates(embedder, args, rng)
    if args.rates:
        rates = {k: float(v) for k, v in (part.split("=") for part in args.rates.split(","))}
        what = "the given rates"
    r = ranking(args.queries, args.candidates, args.dim)
    print(
        f"ranking {args.queries} queries x {args.candidates} candidates, dim {args.dim}: "
        f"{r['total_s']:.1f} s ({r['queries_per_s']:.0f} queries/s), "
        f"of which matrix products {r['matmul_s']:.1f} s"
    )
    rate_text = ", ".join(f"{k} {v:.1f}/s" for k, v in rates.items())
    print(f"\nprojection, {args.project_gpus} devices at {what} ({rate_text}):")
    bounds = (
        {"imported": sets_workload(args.sets)}
        if args.sets
        else {"low": table_workload("low"), "high": table_workload("high")}
    )
    for name, items in bounds.items():
        counts = ", ".join(f"{k} {v:,.0f}" for k, v in items.items())
        hours = project(items, rates, args.project_gpus)
        print(f"  78 datasets ({name}): {counts} items -> {hours:.2f} h of embedding")


if __name__ == "__main__":
    main()
