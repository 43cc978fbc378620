"""Peak memory of souping: every module's dense update at once against one at a time.

    python benchmarks/soup_bench.py [--layers 24] [--hidden 2048] [--adapters 3] [--rank 64]

A stand-in for a model's targeted linear layers (``layers`` square float32 weights of
``hidden`` x ``hidden``) and ``adapters`` random LoRA adapters of rank ``rank`` on every
layer are built, then the soup's arithmetic is applied to the weights in two ways, each in
a fresh process so that neither inherits the other's allocator state:

- ``whole``: ``apply_updates(model, soup_updates(...))``, the dict of every module's float64
  update built first (what the soup did before);
- ``streamed``: ``apply_updates(model, iter_soup_updates(...))``, one module's update
  computed, added and dropped before the next (what ``soup`` does now).

Memory is the process's resident high-water mark above its level right before the
souping (``/proc/self/clear_refs`` reset, then ``VmHWM``), with the weights and factors
already built. The figure to expect: the dense updates of all layers in float64 (8 bytes
per weight) against about two layers' worth.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(mode: str, layers: int, hidden: int, adapters: int, rank: int) -> dict:
    """Build the stand-in, soup it in ``mode``, return the peak above the start."""
    from rzenembed.soup import apply_updates, iter_soup_updates, random_adapters, soup_updates

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        *[torch.nn.Linear(hidden, hidden, bias=False) for _ in range(layers)]
    )
    loaded = random_adapters([str(i) for i in range(layers)], (hidden, hidden), adapters, rank)
    weights = [1.0 / adapters] * adapters
    Path("/proc/self/clear_refs").write_text("5")
    before = _vm("VmRSS")
    started = time.perf_counter()
    if mode == "whole":
        apply_updates(model, soup_updates(loaded, weights, "delta"))
    else:
        apply_updates(model, iter_soup_updates(loaded, weights, "delta"))
    seconds = time.perf_counter() - started
    return {
        "mode": mode,
        "peak_mib": (_vm("VmHWM") - before) / 2**20,
        "seconds": seconds,
        "dense_update_mib": layers * hidden * hidden * 8 / 2**20,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--child", choices=["whole", "streamed"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.layers, args.hidden, args.adapters, args.rank)
    if args.child:
        print(json.dumps(measure(args.child, *shape)))
        return 0
    torch.set_num_threads(1)
    results = {}
    for mode in ("whole", "streamed"):
        command = [sys.executable, __file__, "--child", mode]
        command += ["--layers", str(args.layers), "--hidden", str(args.hidden)]
        command += ["--adapters", str(args.adapters), "--rank", str(args.rank)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
    print(
        f"{args.layers} layers of {args.hidden}x{args.hidden}, {args.adapters} adapters of "
        f"rank {args.rank}; all dense updates in float64: "
        f"{results['whole']['dense_update_mib']:.0f} MiB"
    )
    print("| mode | peak above start | time |")
    print("|---|---|---|")
    for mode, row in results.items():
        print(f"| {mode} | {row['peak_mib']:.0f} MiB | {row['seconds']:.2f} s |")
    ratio = results["whole"]["peak_mib"] / max(results["streamed"]["peak_mib"], 1e-9)
    print(f"peak ratio whole / streamed: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
