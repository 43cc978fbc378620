"""The GPU check: what only a GPU can tell, in one command, in a few minutes.

    python benchmarks/gpu_check.py            (make gpu-check; one CUDA device, <= 8 min)
    python benchmarks/gpu_check.py --dry-run  (the same parts on CPU with gloo; in the suite)

Parts, each printed as PASS or FAIL with its figures:

``train``
    One Ray Train worker with ``compute.use_gpu: true`` (NCCL) trains the tiny config on
    the sample corpus for a few steps: the worker's device is CUDA, the model runs under
    bf16 autocast, every collective tensor is on the GPU (the runtime's checks), the
    adapter is published and the checkpoints are on the storage root.
``evaluate``
    The evaluation step (a coordinator Ray task and one embedding actor with one GPU)
    scores the trained model and the untrained base and publishes both reports.
``bench``
    ``train_bench.py --gpu``: the real Qwen2-VL-2B architecture (random weights) in bf16
    with LoRA r=64, GradCache, gradient checkpointing; step time, memory and MFU.

``--dry-run`` runs ``train`` and ``evaluate`` on CPU with gloo and ``bench`` as
``--gpu --dry-run``: it proves the script itself works on any machine, it measures
nothing. The figures of a real run go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SOURCES = ("sample-text-pairs", "sample-captions")


def check_config(work: Path, dry: bool) -> Any:
    from rzenembed.config import config_from_dict
    from rzenembed.data.sample import build_sample_corpus
    from rzenembed.modeling.tiny import build_tiny_model

    model = build_tiny_model(work / "tiny", seed=0)
    corpus = build_sample_corpus(work / "corpus", seed=0)
    sources = [
        {
            "name": n,
            "uri": str(corpus.root / n),
            "stage": "stage1",
            "task_group": "text_retrieval" if n == "sample-text-pairs" else "image_retrieval",
        }
        for n in SOURCES
    ]
    return config_from_dict(
        {
            "name": "gpu-check",
            "storage": {"root": str(work / "store")},
            "sources": sources,
            "prep": {"shard_rows": 32},
            "model": {
                "name_or_path": str(model),
                "max_visual_tokens": 64,
                "video_frames": 2,
                "dtype": "float32" if dry else "bfloat16",
            },
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "loss": {"false_negative_delta": None},
            "stage1": {
                "global_batch_size": 8,
                "gradcache_chunk": 4,
                "max_steps": 4,
                "checkpoint_every": 2,
                "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            },
            "eval": {
                "sets": [str(corpus.root / "eval" / "eval-image-retrieval")],
                "batch_size": 16,
            },
            "compute": {"num_workers": 1, "cpus_per_worker": 1, "use_gpu": not dry, "step_cpus": 1},
        }
    ), corpus


def part_train(cfg: Any) -> dict[str, Any]:
    from rzenembed.data.folders import read_text
    from rzenembed.data.storage import join
    from rzenembed.prep.prepare import prepare_all
    from rzenembed.training.stages import run_stage1

    started = time.perf_counter()
    data = prepare_all(cfg, show_progress=False)
    result = run_stage1(cfg, data.stages["stage1"])
    elapsed = time.perf_counter() - started
    rows = [json.loads(line) for line in read_text(result.metrics_uri).splitlines()]
    run_folder = result.adapter_uri.rsplit("/", 1)[0]
    worker = json.loads(read_text(join(run_folder, "workers", "rank0.json")))
    checkpoints = sorted(p.name for p in (Path(cfg.storage.root) / "_train").rglob("checkpoint_*"))
    want = "cpu" if not cfg.compute.use_gpu else "cuda"
    ok = (
        worker["device"].startswith(want)
        and len(rows) == cfg.stage1.max_steps
        and len(checkpoints) >= 1
    )
    return {
        "ok": ok,
        "device": worker["device"],
        "backend": worker["backend"],
        "autocast": worker.get("autocast"),
        "steps": len(rows),
        "loss_first_last": [round(rows[0]["loss"], 4), round(rows[-1]["loss"], 4)],
        "samples_per_s": round(sum(r["samples_per_s"] for r in rows) / len(rows), 1),
        "checkpoints": len(checkpoints),
        "seconds": round(elapsed, 1),
        "adapter": result.adapter_uri,
    }


def part_evaluate(cfg: Any, adapter_uri: str) -> dict[str, Any]:
    from rzenembed.data.storage import join
    from rzenembed.model_steps import evaluate_step
    from rzenembed.modeling.digest import model_digest, weights_digest

    started = time.perf_counter()
    model = {"uri": adapter_uri, "digest": model_digest(adapter_uri)}
    base = {"uri": cfg.model.name_or_path, "digest": weights_digest(cfg.model.name_or_path)}
    root = join(cfg.storage.root, "_models", cfg.name)
    out = evaluate_step(
        cfg,
        model,
        base,
        list(cfg.eval.sets),
        join(root, "eval-check"),
        join(root, "_embedding_cache"),
    )
    scores = {role: round(out[role]["report"]["all"]["score"], 4) for role in out}
    return {
        "ok": set(scores) == {"model", "baseline"},
        "all": scores,
        "seconds": round(time.perf_counter() - started, 1),
    }


def part_bench(dry: bool) -> dict[str, Any]:
    argv = [sys.executable, str(REPO / "benchmarks" / "train_bench.py"), "--gpu"]
    if dry:
        argv.append("--dry-run")
    else:
        argv += ["--steps", "3"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=420)
    lines = [
        line
        for line in done.stdout.splitlines()
        if line.startswith(("step ", "peak memory", "MFU", "executed", "device"))
    ]
    return {
        "ok": done.returncode == 0,
        "figures": lines,
        "error": done.stderr[-2000:] if done.returncode else "",
    }


def run_part(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    try:
        results[name] = fn()
    except Exception:
        results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    status = "PASS" if results[name]["ok"] else "FAIL"
    shown = {k: v for k, v in results[name].items() if k not in ("ok", "figures")}
    print(f"{status} {name}: {json.dumps(shown)}", flush=True)
    for line in results[name].get("figures", []):
        print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and gloo; measures nothing")
    parser.add_argument("--parts", default="train,evaluate,bench")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    dry = args.dry_run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not dry and not torch.cuda.is_available():
        print("FAIL setup: no CUDA device (use --dry-run to check the script on CPU)")
        return 1
    from rzenembed.data.engine import ensure_ray

    parts = args.parts.split(",")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rzenembed-gpu-check-") as tmp:
        os.environ["RZENEMBED_CACHE"] = str(Path(tmp) / "cache")
        cfg, _ = check_config(Path(tmp), dry)
        ensure_ray(num_cpus=2 if dry else None)
        print(f"gpu-check ({'dry run on CPU' if dry else torch.cuda.get_device_name()})")
        if "train" in parts:
            run_part("train", lambda: part_train(cfg), results)
        if "evaluate" in parts and results.get("train", {}).get("ok"):
            run_part("evaluate", lambda: part_evaluate(cfg, results["train"]["adapter"]), results)
        if "bench" in parts:
            run_part("bench", lambda: part_bench(dry), results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["ok"] for r in results.values()) and set(results) == set(parts)
    print("gpu-check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
