"""Training-step throughput and peak memory, with GradCache and without.

Run from the repository root:

    python benchmarks/train_bench.py [--batches 16,64,256] [--chunk 8] [--steps N]
        [--threads 1] [--modes gradcache,plain,lazy] [--nested]
    python benchmarks/train_bench.py --gpu [--family qwen3-vl] [--gpu-chunk 32] [--gpu-batch 48]
        [--peak-tflops 989]
    python benchmarks/train_bench.py --gpu --dry-run
    python benchmarks/train_bench.py --loader [--rows 10000,1000000] [--steps 20]

``--loader`` runs the loader part (``benchmarks/loader_bench.py``, documented there): a
training rank's peak RSS against dataset size and the share of step time spent waiting for
data with prefetch on and off.

CPU mode (default) trains the tiny offline Qwen2-VL (built into a temporary folder with
``build_tiny_model``) with LoRA r=8 in float32, one process, no Ray. A step is assembled as
``Trainer.train_step`` does it: ``prepare_batch`` (the processor), ``gradcache_step`` with
``--chunk`` rows per chunk or ``plain_step`` over one chunk per role (the whole batch),
``average_gradients``, gradient clipping and AdamW. ``gradcache`` prepares every chunk up
front (``prepare_batch`` eager); ``lazy`` is what the training loop runs since this
benchmark showed the eager inputs growing with the batch: chunks run the processor only
when they are embedded (``prepare_batch(..., lazy=True)``), so inputs are O(chunk). The
synthetic batch pairs short text captions (queries) with small drawn images (positives,
56x56 or 84x84) and one hard negative per query (an image for even rows, a caption for odd
rows). Every (global batch, mode)
configuration runs in a fresh Python process: 1 warm-up step, then ``--steps`` timed steps
(medians). Torch runs ``--threads`` intra-op threads, 1 by default as in the training loop
(``RZENEMBED_TORCH_THREADS``): on a shared 2-core VM two threads made GradCache's many small
chunk operations over ten times slower whenever another process held a core.

Peak memory on CPU is the growth of the process's resident set: the child reads VmRSS just
before the first step (model, optimiser and the raw synthetic items already built), resets
the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``) and reads VmHWM after the
last step; the difference is the figure reported. ``ru_maxrss`` cannot be reset and, in a
child started by ``subprocess``, starts from the parent's high-water mark, so it is only the
fallback where clear_refs is not writable (the output says which was used). The figure
includes the processor outputs of the whole batch, which ``prepare_batch`` holds for the
duration of the step; they are reported beside it. Beside RSS, one extra step after the
timed ones runs under ``torch.profiler(profile_memory=True)`` and gives the peak of live
tensor bytes, which leaves out allocator caching, fragmentation and one-off library state.

GPU mode builds the real Qwen2-VL-2B architecture from its published dimensions with random
weights (no download), in bfloat16 on CUDA, wrapped in ``RzenEmbedder`` (EOS pooling) with
non-reentrant gradient checkpointing and LoRA r=64 on every vision and LLM linear layer. The
inputs are token ids made directly in the 2B vocabulary (the tiny processor's vocabulary does
not match it): per-device batch ``--gpu-batch`` text queries, image positives and image hard
negatives, each image a (1, 70, 72) patch grid = 1260 visual tokens (the 1280-token budget),
RzenEmbedLoss, GradCache with ``--gpu-chunk`` rows per chunk (default: the 2B config's
``gradcache_chunk``, 32), the forward passes under bf16 autocast as the training runtime runs
them (so the LoRA matmuls run in bf16 too). It reports step time, samples/s, tokens/s,
torch.cuda.max_memory_allocated and max_memory_reserved, and model FLOPs utilisation;
``--dry-run`` runs the same code on CPU with a 2-layer version of the 2B config, tiny
images, a batch of 4 and no autocast.

``--nested`` (either mode) trains with ``loss.matryoshka`` on: the 2B's six nested sizes
(64 .. 1024 and 1536, ``configs/qwen2vl-2b-matryoshka.yaml``), or the tiny model's 8, 16,
32 and 64; run it beside a run without to read what nested sizes cost a step.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from rss import peak_rss_kib, proc_status_kib, reset_peak_rss
from torch import Tensor, nn

from rzenembed.config import LoraConfig, LossConfig, MatryoshkaConfig, ModelConfig, OptimConfig
from rzenembed.losses import make_loss
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.training.gradcache import (
    ContrastiveBatch,
    gradcache_step,
    plain_step,
    prepare_batch,
)
from rzenembed.training.loop import TrainModule, average_gradients, step_seed
from rzenembed.training.optim import build_optimizer

TASK_GROUP = "image_retrieval"
MIB = 2**20
TARGET_RATIO = 1.3
# gradcache: GradCache over eagerly prepared chunks; plain: one chunk per role, full graph;
# lazy: GradCache with each chunk prepared at embed time (the training loop's path).
MODES = ("gradcache", "plain", "lazy")

# --------------------------------------------------------------------------- synthetic data

_SUBJECTS = ("a dog", "a red car", "two children", "a bowl of fruit", "a train", "a bird")
_VERBS = ("sits on", "runs across", "is parked near", "flies over", "rests on")
_PLACES = ("the grass", "a wooden table", "the beach", "a busy street", "the snow")
_SIZES = (56, 84)


def caption(rng: random.Random) -> str:
    """A short caption, 5 to 8 words."""
    words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)}"
    return words.capitalize() + "."


def drawn_image(rng: random.Random, size: int) -> Image.Image:
    """A square RGB image: a flat background with a few filled shapes."""

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    image = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        x1, y1 = x0 + rng.randrange(8, size // 2), y0 + rng.randrange(8, size // 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour())
    return image


def synthetic_items(
    batch: int, seed: int = 0
) -> tuple[list[EmbedInput], list[EmbedInput], list[EmbedInput]]:
    """Caption queries, image positives and one hard negative per query (image or text)."""
    rng = random.Random(seed)
    queries = [EmbedInput(text=caption(rng)) for _ in range(batch)]
    positives = [EmbedInput(images=[drawn_image(rng, _SIZES[i % 2])]) for i in range(batch)]
    negatives = [
        EmbedInput(images=[drawn_image(rng, _SIZES[(i // 2) % 2])])
        if i % 2 == 0
        else EmbedInput(text=caption(rng))
        for i in range(batch)
    ]
    return queries, positives, negatives


# --------------------------------------------------------------------------- CPU memory


def tensor_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live tensor bytes allocated during ``fn`` (torch.profiler allocation events).

    Counts only what torch's CPU allocator hands out, from the level at the start: no
    allocator caching, fragmentation, thread stacks or one-off library state, which RSS
    includes. The profiled step runs after the RSS measurement, so its overhead is unseen.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:  # frees carry a negative size
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def tensor_bytes(chunks: Sequence[dict[str, Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for chunk in chunks for t in chunk.values())


# --------------------------------------------------------------------------- one train step


@dataclass
class StepSetup:
    """What ``Trainer`` holds: embedder + loss as one module, its trainable params, AdamW."""

    module: TrainModule
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    max_grad_norm: float | None


def nested_dims(full: int) -> list[int]:
    """The nested sizes ``--nested`` trains: the 2B config's six (64 .. 1024 and full) for
    a wide model, four (an eighth, a quarter, half, full) for the 64-d tiny one."""
    if full >= 128:
        return [d for d in (64, 128, 256, 512, 1024) if d < full] + [full]
    return [full // 8, full // 4, full // 2, full]


def make_setup(
    embedder: RzenEmbedder, lora: LoraConfig, seed: int = 0, nested: bool = False
) -> StepSetup:
    torch.manual_seed(seed)
    embedder.apply_lora(lora)
    loss = LossConfig()
    if nested:  # loss.matryoshka: the same loss on every nested prefix (MatryoshkaLoss)
        dims = nested_dims(embedder.embedding_dim)
        loss = LossConfig(matryoshka=MatryoshkaConfig(dims=dims))
    module = TrainModule(embedder, make_loss(loss))
    optim = OptimConfig()
    params = [p for p in module.parameters() if p.requires_grad]
    return StepSetup(module, params, build_optimizer(module, optim), optim.max_grad_norm)


def loss_closure(setup: StepSetup, batch: int):
    """``(q, p, n) -> loss dict`` for one task group, with item ids (ids exercise the masks)."""
    loss_module = setup.module.loss
    task = loss_module.task_index([TASK_GROUP] * batch)
    positive_ids = torch.arange(batch)
    negative_ids = torch.arange(batch, 2 * batch).view(batch, 1)

    def loss_fn(q: Tensor, p: Tensor, n: Tensor | None) -> dict[str, Any]:
        ids = {"positive_ids": positive_ids.to(q.device), "negative_ids": None}
        if n is not None:
            ids["negative_ids"] = negative_ids.to(q.device)
        return loss_module(q, p, task.to(q.device), negatives=n, **ids)

    return loss_fn


def optimise(
    setup: StepSetup,
    batch: ContrastiveBatch,
    rows: int,
    gradcache: bool,
    autocast: torch.dtype | None = None,
) -> float:
    """GradCache or plain step, then gradient averaging, clipping and AdamW; returns the loss.
    ``autocast``: the training runtime's autocast dtype on CUDA (the loop's ``embed``)."""
    embedder = setup.module.embedder
    loss_fn = loss_closure(setup, rows)

    def embed(inputs: dict[str, Tensor]) -> Tensor:
        if autocast is None:
            return embedder(**inputs)
        with torch.autocast("cuda", dtype=autocast):
            return embedder(**inputs).float()

    step = gradcache_step if gradcache else plain_step
    out = step(embed, batch, loss_fn)
    average_gradients(setup.params)
    torch.nn.utils.clip_grad_norm_(setup.params, setup.max_grad_norm or float("inf"))
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return float(out["loss"])


def lazy_batch(preparer: RzenEmbedder, items: tuple[list, list, list], chunk: int):
    """The training loop's batch: raw chunks prepared when embedded (one negative each)."""
    return prepare_batch(preparer, *items, 1, chunk, lazy=True)


# --------------------------------------------------------------------------- CPU child


def cpu_child(args: argparse.Namespace) -> dict[str, Any]:
    """One (batch, mode) configuration in this fresh process; returns its measurements."""
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir
    config = ModelConfig(
        name_or_path=model_dir, max_visual_tokens=64, video_frames=4, max_text_tokens=128
    )
    embedder = RzenEmbedder.from_pretrained(model_dir, config=config)
    setup = make_setup(embedder, LoraConfig(r=8, alpha=16.0), nested=args.nested)
    setup.module.train()
    items = synthetic_items(args.batch)
    chunk = None if args.mode == "plain" else args.chunk
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    resettable = reset_peak_rss()
    lazy = args.mode == "lazy"
    records = [cpu_step(setup, items, chunk, step, lazy) for step in range(1 + args.steps)]
    peak = peak_rss_kib(resettable)
    tensors = tensor_peak_bytes(lambda: cpu_step(setup, items, chunk, 1 + args.steps, lazy))
    timed = records[1:]
    return {
        "batch": args.batch,
        "mode": args.mode,
        "chunk": chunk,
        "threads": torch.get_num_threads(),
        "prepare_s": statistics.median(r["prepare_s"] for r in timed),
        "compute_s": statistics.median(r["compute_s"] for r in timed),
        "loss": timed[-1]["loss"],
        "prepared_mib": records[0]["prepared_bytes"] / MIB,
        "baseline_mib": baseline / 1024,
        "peak_mib": (peak - baseline) / 1024,
        "tensor_peak_mib": tensors / MIB,
        "peak_method": "VmHWM after clear_refs" if resettable else "ru_maxrss",
        "tokens": records[0]["tokens"],
    }


def cpu_step(
    setup: StepSetup, items: tuple[list, list, list], chunk: int | None, step: int, lazy: bool
) -> dict[str, Any]:
    """Seed, prepare (processor), then optimise; the two phases are timed separately.

    ``lazy``: the batch of ``lazy_batch``, whose processor time falls in the step.
    """
    torch.manual_seed(step_seed(0, step, 0))
    embedder, rows = setup.module.embedder, len(items[0])
    started = time.perf_counter()
    if lazy:
        batch = lazy_batch(embedder, items, chunk or rows)
    else:
        batch = prepare_batch(embedder, *items, 1, chunk)
    prepared = time.perf_counter()
    loss = optimise(setup, batch, rows, gradcache=chunk is not None)
    done = time.perf_counter()
    chunks = [] if lazy else batch.chunks()
    return {
        "prepare_s": prepared - started,
        "compute_s": done - prepared,
        "loss": loss,
        "prepared_bytes": tensor_bytes(chunks),
        "tokens": sum(int(c["attention_mask"].sum()) for c in chunks),
    }


# --------------------------------------------------------------------------- CPU parent


def run_configuration(model_dir: Path, batch: int, mode: str, args) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; the child prints one JSON line last."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--model-dir",
        str(model_dir),
        "--batch",
        str(batch),
        "--mode",
        mode,
        "--chunk",
        str(args.chunk),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
        *(["--nested"] if args.nested else []),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} batch {batch} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cpu(args: argparse.Namespace) -> None:
    from rzenembed.modeling.tiny import build_tiny_model

    print_machine()
    print(
        f"tiny Qwen2-VL, LoRA r=8, float32, {args.threads} torch thread(s); 1 warm-up + "
        f"{args.steps} timed step(s), medians; GradCache chunk {args.chunk}; each "
        "configuration in a fresh process"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "tiny", seed=0)
        for batch in args.batches:
            for mode in args.modes:
                row = run_configuration(model_dir, batch, mode, args)
                print_row(row)
                rows.append(row)
    print_summary(rows)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_machine() -> None:
    print(
        f"machine: {platform.machine()} {cpu_model()}, {os.cpu_count()} CPUs, "
        f"python {platform.python_version()}, torch {torch.__version__}; "
        f"1-min load average {os.getloadavg()[0]:.2f}"
    )


def print_row(row: dict[str, Any]) -> None:
    total = row["prepare_s"] + row["compute_s"]
    held = f"{row['prepared_mib']:5.1f} MiB" if row["mode"] != "lazy" else "1 chunk  "
    print(
        f"  batch {row['batch']:>4} {row['mode']:<9} step {total:6.2f} s "
        f"(prepare_batch {row['prepare_s']:.2f} s) {row['batch'] / total:6.1f} samples/s | "
        f"RSS peak +{row['peak_mib']:6.1f} MiB, tensor peak {row['tensor_peak_mib']:6.1f} MiB, "
        f"prepared inputs {held} | loss {row['loss']:.3f}",
        flush=True,
    )


def ratio_line(rows: list[dict[str, Any]], key: str) -> str:
    """``key`` at the largest batch over the smallest, with and without the prepared inputs."""
    small, large = rows[0], rows[-1]
    ratio = large[key] / small[key]
    values = ", ".join(f"{r['batch']}: {r[key]:.1f}" for r in rows)
    line = f"{values} MiB; {large['batch']}/{small['batch']} = {ratio:.2f}x"
    if small["prepared_mib"]:
        rest = (large[key] - large["prepared_mib"]) / (small[key] - small["prepared_mib"])
        line += f" ({rest:.2f}x less the prepared inputs)"
    return line


def print_summary(rows: list[dict[str, Any]]) -> None:
    print(
        f"\nRSS peak: VmHWM over warm-up + timed steps minus VmRSS right before the first step "
        f"({rows[0]['peak_method']}), fresh process per configuration. Tensor peak: live "
        "tensor bytes over one extra profiled step (torch.profiler allocation events). "
        "Prepared inputs: processor outputs of the whole batch, held by an eager prepare_batch "
        "for the step. lazy (what the training loop runs): processor run per chunk at embed time."
    )
    by_mode: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["batch"]):
        by_mode.setdefault(row["mode"], []).append(row)
    for mode, mine in by_mode.items():
        print(f"{mode:<9} RSS peak    {ratio_line(mine, 'peak_mib')}")
        print(f"{'':<9} tensor peak {ratio_line(mine, 'tensor_peak_mib')}")
    for mode in ("gradcache", "lazy"):
        if mode in by_mode and len(by_mode[mode]) > 1:
            mine = by_mode[mode]
            ratio = mine[-1]["peak_mib"] / mine[0]["peak_mib"]
            verdict = "within" if ratio <= TARGET_RATIO else "EXCEEDS"
            print(
                f"{mode} RSS peak {mine[-1]['batch']}/{mine[0]['batch']} = {ratio:.2f}x: "
                f"{verdict} the {TARGET_RATIO}x target"
            )
    print_time_ratios(by_mode)


def print_time_ratios(by_mode: dict[str, list[dict[str, Any]]]) -> None:
    """Step time of each GradCache variant over the plain step, batch by batch."""
    seconds = {
        mode: {r["batch"]: r["prepare_s"] + r["compute_s"] for r in mine}
        for mode, mine in by_mode.items()
    }
    for mode in ("gradcache", "lazy"):
        if mode not in seconds or "plain" not in seconds:
            continue
        pairs = ", ".join(
            f"{batch}: {value / seconds['plain'][batch]:.2f}x"
            for batch, value in seconds[mode].items()
            if batch in seconds["plain"]
        )
        print(f"step time {mode} / plain: {pairs}")


# --------------------------------------------------------------------------- GPU: model

# Token ids of the published Qwen2-VL tokenizer.
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
FRAME_TOKENS = 40  # system prompt + chat frame of the paper template, roughly
GPU_IMAGE_GRID = (1, 70, 72)  # 5040 patches -> 1260 tokens after the 2x2 merge
DRY_RUN_IMAGE_GRID = (1, 8, 8)  # 16 tokens


# The size each family's GPU run uses: its published ~2B (Qwen2.5-VL: 3B, its smallest).
GPU_ARCHITECTURE = {"qwen2-vl": "qwen2vl-2b", "qwen2.5-vl": "qwen25vl-3b", "qwen3-vl": "qwen3vl-2b"}


def architecture(layers: int | None, family: str = "qwen2-vl"):
    """The family's ~2B config; ``layers`` cuts both towers to that depth (dry run)."""
    from rzenembed.modeling.architectures import architecture_config

    config = architecture_config(GPU_ARCHITECTURE[family])
    if layers is not None:
        text, vision = config.text_config, config.vision_config
        text.num_hidden_layers = layers
        if getattr(text, "layer_types", None):
            text.layer_types = text.layer_types[:layers]
        vision.depth = layers
        # Blocks the cut tower no longer has: Qwen3-VL's deepstack taps, Qwen2.5-VL's
        # full-attention blocks.
        for name in ("deepstack_visual_indexes", "fullatt_block_indexes"):
            if getattr(vision, name, None):
                setattr(vision, name, [i for i in getattr(vision, name) if i < layers] or [0])
    return config


def build_gpu_embedder(
    config, device: torch.device, dtype: torch.dtype, family: str = "qwen2-vl"
) -> RzenEmbedder:
    """Random-weight backbone made on ``device``, wrapped like a loaded checkpoint.

    The processor (the tiny model's, of the same family) is only there because
    ``RzenEmbedder`` configures one; inputs are made as token ids directly, so its small
    vocabulary never meets the model.
    """
    from rzenembed.modeling.backbones import backbone
    from rzenembed.modeling.tiny import TinySpec, build_processor, build_tokenizer

    with torch.device(device):
        backbone_model = backbone(family).model_cls._from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    spec = TinySpec()
    processor = build_processor(spec, build_tokenizer(spec), family)
    name = f"random-init:{GPU_ARCHITECTURE[family]}"
    cfg = ModelConfig(
        name_or_path=name,
        dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
        gradient_checkpointing=True,
    )
    return RzenEmbedder(backbone_model, processor, cfg, base_path=name)


# --------------------------------------------------------------------------- GPU: inputs


def text_ids(rng: torch.Generator, length: int) -> list[int]:
    return torch.randint(0, ENDOFTEXT, (length,), generator=rng).tolist()


def sequence(rng: torch.Generator, config, body: int, image_tokens: int) -> list[int]:
    """A chat-framed sequence: frame, optional image placeholder run, body text, EOS."""
    half = FRAME_TOKENS // 2
    ids = [IM_START, *text_ids(rng, half - 1)]
    if image_tokens:
        run = [config.image_token_id] * image_tokens
        ids += [config.vision_start_token_id, *run, config.vision_end_token_id]
    ids += text_ids(rng, body)
    return [*ids, IM_END, IM_START, *text_ids(rng, half - 3), ENDOFTEXT]


def token_chunk(
    rng: torch.Generator, config, rows: int, grid: tuple[int, int, int] | None
) -> dict[str, Tensor]:
    """Backbone inputs for ``rows`` captions (``grid`` None) or images with that patch grid."""
    merge = config.vision_config.spatial_merge_size
    patches = grid[0] * grid[1] * grid[2] if grid else 0
    bodies = torch.randint(12, 41, (rows,), generator=rng).tolist()
    if grid:
        bodies = [10] * rows  # "Represent the given image in one word."
    seqs = [sequence(rng, config, body, patches // merge**2) for body in bodies]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((rows, width), ENDOFTEXT, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for row, seq in enumerate(seqs):  # right padding, as ModelConfig.padding_side
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
    chunk = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
    }
    if grid:
        vision = config.vision_config
        patch_dim = 3 * vision.temporal_patch_size * vision.patch_size**2
        chunk["pixel_values"] = torch.randn((rows * patches, patch_dim), generator=rng)
        chunk["image_grid_thw"] = torch.tensor([grid] * rows, dtype=torch.long)
    return chunk


def token_batch(config, batch: int, chunk: int, grid: tuple[int, int, int]) -> ContrastiveBatch:
    """Text queries, image positives and one image hard negative per query, chunked."""
    rng = torch.Generator().manual_seed(0)
    sizes = [min(chunk, batch - start) for start in range(0, batch, chunk)]

    def role(image: bool) -> list[dict[str, Tensor]]:
        return [token_chunk(rng, config, n, grid if image else None) for n in sizes]

    return ContrastiveBatch(
        queries=role(False), positives=role(True), negatives=role(True), num_negatives=1
    )


# --------------------------------------------------------------------------- GPU: FLOPs


@dataclass
class Work:
    """What one pass over a batch feeds each tower (padding excluded)."""

    llm_tokens: int
    llm_square: int  # sum over sequences of length^2 (attention scores)
    patches: int
    patch_square: int  # sum over images of patches^2 (the vision tower attends per image)


def batch_work(batch: ContrastiveBatch) -> Work:
    lengths = torch.cat([c["attention_mask"].sum(1) for c in batch.chunks()])
    grids = [c["image_grid_thw"] for c in batch.chunks() if "image_grid_thw" in c]
    patches = torch.cat(grids).prod(1) if grids else torch.zeros(0, dtype=torch.long)
    return Work(
        llm_tokens=int(lengths.sum()),
        llm_square=int((lengths**2).sum()),
        patches=int(patches.sum()),
        patch_square=int((patches**2).sum()),
    )


def linear_weights(model: nn.Module) -> dict[str, int]:
    """Matmul weights (LoRA factors included) per stream: vision patches, merged, LLM."""
    counts = {"patch": 0, "merged": 0, "llm": 0}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv3d):
            continue
        name = f".{name}"  # the names start at the model given: "visual.", "model.visual."
        if ".visual.merger." in name:
            counts["merged"] += module.weight.numel()
        elif ".visual." in name:
            counts["patch"] += module.weight.numel()
        elif ".language_model." in name:
            counts["llm"] += module.weight.numel()
        # lm_head: never run by the embedder
    return counts


def forward_flops(model: nn.Module, config, work: Work) -> dict[str, float]:
    """One forward pass: 2 x weights x rows for every matmul (``dense``), and 4 x layers x
    width x length^2 for attention scores and their weighted sum (``attention``, counted
    full, not halved for the causal LLM; the ViT attends within each image)."""
    weights = linear_weights(model)
    merge = config.vision_config.spatial_merge_size**2
    text, vision = config.text_config, config.vision_config
    dense = 2 * (
        weights["patch"] * work.patches
        + weights["merged"] * work.patches / merge
        + weights["llm"] * work.llm_tokens
    )
    head_dim = text.hidden_size // text.num_attention_heads
    attention = 4 * text.num_hidden_layers * text.num_attention_heads * head_dim * work.llm_square
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL: embed_dim
    attention += 4 * vision.depth * width * work.patch_square
    return {"dense": float(dense), "attention": float(attention)}


# --------------------------------------------------------------------------- GPU: run


def run_gpu(args: argparse.Namespace) -> None:
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA; use --gpu --dry-run to check the code on CPU")
    device = torch.device("cpu" if dry else "cuda")
    config = architecture(2 if dry else None, args.family)
    grid = DRY_RUN_IMAGE_GRID if dry else GPU_IMAGE_GRID
    batch_size, chunk = (4, 2) if dry else (args.gpu_batch, args.gpu_chunk or config_chunk())
    steps = 1 if dry else args.steps
    print_machine()
    if not dry:
        print(f"device: {torch.cuda.get_device_name()}")
    torch.manual_seed(0)
    embedder = build_gpu_embedder(config, device, torch.bfloat16, args.family)
    setup = make_setup(embedder, LoraConfig(r=64, alpha=128.0), nested=args.nested)
    setup.module.to(device).train()
    batch = token_batch(config, batch_size, chunk, grid)
    work = batch_work(batch)
    flops = forward_flops(setup.module.embedder.core, config, work)
    print_gpu_setup(setup, config, batch_size, chunk, grid, work, dry, args.family)
    probe = MemoryProbe(device)
    autocast = None if dry else torch.bfloat16  # the runtime's, for bf16 model.dtype on CUDA
    times = gpu_steps(setup, batch, steps, warmup=0 if dry else 1, probe=probe, autocast=autocast)
    report_gpu(times, probe, batch_size, flops, args, work)


def config_chunk() -> int:
    """The GradCache chunk the 2B config trains with (``stage1.gradcache_chunk``)."""
    from rzenembed.config import load_config

    repo = Path(__file__).resolve().parent.parent
    return load_config(repo / "configs" / "qwen2vl-2b.yaml").stage1.gradcache_chunk or 32


def print_gpu_setup(
    setup, config, batch, chunk, grid, work: Work, dry: bool, family: str = "qwen2-vl"
) -> None:
    total = sum(p.numel() for p in setup.module.parameters())
    trainable = sum(p.numel() for p in setup.params)
    layers = f"{config.text_config.num_hidden_layers} LLM / {config.vision_config.depth} ViT"
    print(
        f"{'DRY RUN (CPU, 2-layer config) ' if dry else ''}{GPU_ARCHITECTURE[family]} architecture "
        f"({layers} layers), random weights, bf16, sdpa, gradient checkpointing; "
        f"{total / 1e9:.2f} B params, {trainable / 1e6:.1f} M trainable (LoRA r=64)"
    )
    print(
        f"per-device batch {batch} (text query, image positive, image hard negative), "
        f"GradCache chunk {chunk}; image grid {grid} = {grid[1] * grid[2] // 4} tokens; "
        f"{work.llm_tokens / batch:.0f} LLM tokens and {work.patches / batch:.0f} ViT patches "
        "per sample"
    )


class MemoryProbe:
    """Peak memory over the timed steps: CUDA allocator statistics, or RSS growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.static = 0.0
        self.resettable = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.static = torch.cuda.memory_allocated(self.device) / MIB
        else:
            self.static = proc_status_kib("VmRSS") / 1024
            self.resettable = reset_peak_rss()

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / MIB
        return peak_rss_kib(self.resettable) / 1024

    def peak_reserved_mib(self) -> float | None:
        """What the caching allocator held at most (what the device must have free)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_reserved(self.device) / MIB
        return None

    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return "process RSS high-water mark (dry run)"


def gpu_steps(
    setup, batch, steps: int, warmup: int, probe: MemoryProbe, autocast=None
) -> list[float]:
    """Step times (GradCache + averaging + clipping + AdamW) after ``warmup`` steps."""
    times, rows = [], sum(chunk["input_ids"].shape[0] for chunk in batch.queries)
    for step in range(warmup + steps):
        if step == warmup:
            probe.start()
        torch.manual_seed(step_seed(0, step, 0))
        synchronize(probe.device)
        started = time.perf_counter()
        loss = optimise(setup, batch, rows, gradcache=True, autocast=autocast)
        synchronize(probe.device)
        elapsed = time.perf_counter() - started
        label = " (warm-up)" if step < warmup else ""
        print(f"  step {step}{label}: {elapsed:.2f} s, loss {loss:.4f}", flush=True)
        if step >= warmup:
            times.append(elapsed)
    return times


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report_gpu(
    times: list[float],
    probe: MemoryProbe,
    batch: int,
    flops: dict[str, float],
    args,
    work: Work,
) -> None:
    """Step time, throughput, memory and FLOPs utilisation under three FLOP conventions."""
    step = statistics.median(times)
    forward = flops["dense"] + flops["attention"]
    capacity = args.peak_tflops * 1e12 * step
    peak, reserved = probe.peak_mib(), probe.peak_reserved_mib()
    print(f"step {step:.2f} s (median of {len(times)}), {batch / step:.2f} samples/s")
    print(
        f"tokens/s {work.llm_tokens / step:,.0f} LLM tokens and {work.patches / step:,.0f} ViT "
        "patches (each embedded once with a graph)"
    )
    held = f"; peak reserved {reserved / 1024:.2f} GiB" if reserved is not None else ""
    print(
        f"peak memory {peak / 1024:.2f} GiB ({probe.method()}){held}; "
        f"{probe.static / 1024:.2f} GiB in use before the timed steps"
    )
    print(
        f"forward FLOPs F = {forward / batch / 1e12:.2f} TFLOP per sample "
        f"({100 * flops['attention'] / forward:.0f}% attention scores)"
    )
    conventions = (
        ("MFU, LoRA useful work: forward + input-gradient backward (2F, '4NT')", 2),
        ("MFU, full fine-tune convention (3F, '6NT'; overstates LoRA)", 3),
        ("executed: + GradCache no-grad forward + checkpoint recompute (4F, '8NT')", 4),
    )
    note = "  [dry run on CPU: not a measurement]" if args.dry_run else ""
    for label, factor in conventions:
        share = 100 * factor * forward / capacity
        print(f"{label}: {share:.1f}% of {args.peak_tflops:g} TFLOP/s{note}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="the 2B architecture on CUDA")
    parser.add_argument(
        "--nested",
        action="store_true",
        help="loss.matryoshka on (six nested sizes on the 2B, four on the tiny model)",
    )
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: 2 layers on CPU")
    parser.add_argument(
        "--family", default="qwen2-vl", choices=sorted(GPU_ARCHITECTURE), help="GPU: backbone"
    )
    parser.add_argument("--batches", default="16,64,256", help="CPU: global batch sizes")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="CPU: among gradcache, plain, lazy"
    )
    parser.add_argument("--chunk", type=int, default=8, help="GradCache rows per chunk")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--gpu-batch", type=int, default=48, help="GPU: per-device batch")
    parser.add_argument(
        "--gpu-chunk", type=int, default=None, help="GPU: GradCache chunk (the 2B config's: 32)"
    )
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak")
    # Internal: one CPU configuration in a child process.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.modes = [m for m in str(args.modes).split(",") if m]
    if not set(args.modes) <= set(MODES):
        parser.error(f"--modes: expected some of {', '.join(MODES)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--loader" in argv:  # the loader part: memory and data wait (loader_bench.py)
        import loader_bench

        argv.remove("--loader")
        loader_bench.main(argv)
        return
    args = parse_args(argv)
    if args.child:
        print(json.dumps(cpu_child(args)))
    elif args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
