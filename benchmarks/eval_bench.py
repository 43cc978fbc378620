"""Evaluation costs: embedding throughput and global ranking time.

Run from the repository root:

    python benchmarks/eval_bench.py [--texts 512] [--images 128] [--videos 16]
                                    [--batch-size 16] [--queries 10000]
                                    [--candidates 100000] [--dim 1536]
                                    [--project-gpus 8] [--rates text=..,image=..,video=..]
                                    [--sets IMPORTED_MMEB_V2]

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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
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
