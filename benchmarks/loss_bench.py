"""Cost of RzenEmbedLoss (every refinement on) next to plain InfoNCE, forward + backward;
with ``--nested``, the same loss on six nested dimensions (``loss.matryoshka``) next to it.

Run from the repository root:

    python benchmarks/loss_bench.py [--device cpu|cuda] [--repeats N] [--nested]

``--nested`` times ``MatryoshkaLoss`` with dims 64, 128, 256, 512, 1024 and the full 1536
(the config ``configs/qwen2vl-2b-matryoshka.yaml`` trains) against ``RzenEmbedLoss`` at full
size, and, for reference, the same sum computed the plain way (six separate losses on cut
and renormalised embeddings, each with its own matrix product).

Both losses see the same inputs: a global batch of 768 L2-normalised query, positive and
one explicit hard negative embeddings of dim 1536 (leaf tensors, so backward computes the
gradients an encoder would receive). Plain InfoNCE is a cross-entropy over
q @ candidates.T / tau, written out below. Time is the median of ``--repeats`` runs after
warm-up. Peak memory is the largest amount allocated above what was live before the step
(the inputs): on CUDA from torch.cuda.max_memory_allocated, on CPU from the allocation
events torch.profiler records with profile_memory=True. The output says which was used.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rzenembed.config import LossConfig, MatryoshkaConfig
from rzenembed.losses import MatryoshkaLoss, RzenEmbedLoss

Inputs = dict[str, Tensor]
Step = Callable[[Inputs], Tensor]


def make_inputs(batch: int, dim: int, negs: int, device: str, dtype: torch.dtype) -> Inputs:
    """Embeddings shaped like a training step: queries close to positives, some ids shared."""
    gen = torch.Generator(device=device).manual_seed(0)

    def unit(*shape: int) -> Tensor:
        return F.normalize(torch.randn(*shape, generator=gen, device=device), dim=-1)

    positive = unit(batch, dim)
    query = F.normalize(positive + 0.8 * unit(batch, dim), dim=-1)
    negatives = F.normalize(positive[:, None, :] + 1.2 * unit(batch, negs, dim), dim=-1)
    groups = torch.randint(0, batch // 4, (batch,), generator=gen, device=device)
    return {
        "query": query.to(dtype).requires_grad_(),
        "positive": positive.to(dtype).requires_grad_(),
        "negatives": negatives.to(dtype).requires_grad_(),
        "task_index": torch.arange(batch, device=device) % 8,
        "positive_ids": torch.arange(batch, device=device),
        "group_ids": groups,
    }


def plain_infonce_step(tau: float) -> Step:
    """Textbook InfoNCE: every other candidate is a negative, one fixed temperature."""

    def step(x: Inputs) -> Tensor:
        q, p, n = x["query"], x["positive"], x["negatives"]
        candidates = torch.cat([p, n.reshape(-1, p.shape[1])])  # (b * (1 + K), D)
        logits = (q @ candidates.T).float() / tau  # (b, b * (1 + K))
        return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))

    return step


def rzenembed_step(loss: RzenEmbedLoss) -> Step:
    """The full loss with the default config: hardness weighting, masks, 8 task temperatures."""

    def step(x: Inputs) -> Tensor:
        return loss(
            x["query"],
            x["positive"],
            x["task_index"],
            negatives=x["negatives"],
            positive_ids=x["positive_ids"],
            group_ids=x["group_ids"],
        )["loss"]

    return step


NESTED = [64, 128, 256, 512, 1024, 1536]


def separate_prefixes_step(loss: RzenEmbedLoss, dims: list[int]) -> Step:
    """The nested loss written out: one full loss per prefix, each on cut, renormalised
    embeddings (a matrix product per prefix)."""

    def step(x: Inputs) -> Tensor:
        total = None
        for d in dims:
            out = loss(
                F.normalize(x["query"][:, :d], dim=-1),
                F.normalize(x["positive"][:, :d], dim=-1),
                x["task_index"],
                negatives=F.normalize(x["negatives"][..., :d], dim=-1),
                positive_ids=x["positive_ids"],
                group_ids=x["group_ids"],
            )["loss"]
            total = out if total is None else total + out
        return total

    return step


def run_once(step: Step, x: Inputs) -> None:
    for name in ("query", "positive", "negatives"):
        x[name].grad = None
    step(x).backward()


def timed_run(step: Step, x: Inputs, device: str) -> float:
    """Wall time of one forward + backward; CUDA is synchronised on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_once(step, x)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(
    steps: dict[str, Step], x: Inputs, repeats: int, warmup: int, device: str
) -> dict[str, float]:
    """Median time per step, the steps interleaved so that a load change on a shared
    machine hits both sides of the ratio alike."""
    for _ in range(warmup):
        for step in steps.values():
            run_once(step, x)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed_run(step, x, device))
    return {name: statistics.median(values) for name, values in times.items()}


def peak_bytes(step: Step, x: Inputs, device: str) -> int:
    """Largest allocation level above the pre-step level during one forward + backward."""
    run_once(step, x)  # one-off allocations (cuBLAS workspace, caches) happen here, uncounted
    for name in ("query", "positive", "negatives"):
        x[name].grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(step, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_bytes(lambda: run_once(step, x))


def cpu_peak_bytes(fn: Callable[[], None]) -> int:
    """Peak of the running sum of CPU allocations and frees the profiler saw during ``fn``."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # keep kineto's start/stop chatter quiet
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            sizes.append((node.start_time_ns, node.extra_fields.alloc_size))
    level = peak = 0
    for _, size in sorted(sizes):
        level += size
        peak = max(peak, level)
    return peak


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=768)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--negatives", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--nested", action="store_true", help="six nested dimensions against the full loss"
    )
    return parser.parse_args()


def describe_machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    dtype = getattr(torch, args.dtype)
    x = make_inputs(args.batch, args.dim, args.negatives, args.device, dtype)
    loss = RzenEmbedLoss(LossConfig()).to(args.device)
    steps = {"plain InfoNCE": plain_infonce_step(0.02), "RzenEmbedLoss": rzenembed_step(loss)}
    base = "plain InfoNCE"  # the other rows are compared with it
    if args.nested:
        dims = [d for d in NESTED if d < args.dim] + [args.dim]
        nested = MatryoshkaLoss(LossConfig(matryoshka=MatryoshkaConfig(dims=dims)))
        steps = {
            "RzenEmbedLoss": rzenembed_step(loss),
            f"nested x{len(dims)}": rzenembed_step(nested.to(args.device)),  # type: ignore[arg-type]
            "separate": separate_prefixes_step(loss, dims),
        }
        base = "RzenEmbedLoss"
    how = (
        "torch.cuda.max_memory_allocated"
        if args.device == "cuda"
        else "allocation events of torch.profiler(profile_memory=True)"
    )
    print(
        f"loss_bench: batch {args.batch}, dim {args.dim}, {args.negatives} hard negative(s), "
        f"{args.dtype}, {describe_machine(args.device)}, torch {torch.__version__}"
    )
    print(f"time: median of {args.repeats} interleaved runs after {args.warmup} warm-up")
    print(f"peak memory: allocated above the pre-step level, from {how}")
    seconds = median_seconds(steps, x, args.repeats, args.warmup, args.device)
    peaks = {name: peak_bytes(step, x, args.device) for name, step in steps.items()}
    for name in steps:
        print(f"  {name:<14} {seconds[name] * 1e3:9.2f} ms   peak {peaks[name] / 2**20:8.1f} MiB")
    for name in (n for n in steps if n != base):
        print(
            f"  {name} / {base}: {seconds[name] / seconds[base]:.2f} x time, "
            f"{peaks[name] / peaks[base]:.2f} x memory"
        )


if __name__ == "__main__":
    main()
