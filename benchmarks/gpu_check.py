"""The GPU check: what only a GPU can tell, in one command, in a few minutes.

    python benchmarks/gpu_check.py            (make gpu-check; CUDA devices, <= 8 min)
    python benchmarks/gpu_check.py --dry-run  (every part's code on CPU with gloo; in the suite)
    python benchmarks/gpu_check.py --json results.json   (the figures docs/PERFORMANCE.md
                                                           is filled from)

Parts, each printed as PASS, FAIL or SKIP with its figures and what it asserted:

``setup``
    torch, its CUDA build, the NVIDIA driver and the CUDA version the driver supports, the
    devices. FAIL when the driver is older than the build needs (the pinned torch is a
    CUDA 13 build: driver 580 or newer), with the versions, before anything else runs.
``train``
    One Ray Train worker with ``compute.use_gpu: true`` (NCCL) trains the tiny config in
    bf16 on the sample corpus for six steps. Asserts: the worker's device is CUDA, its
    runtime autocasts in bfloat16, every loss is finite and the mean of the last two is
    below the mean of the first two, the adapter and a checkpoint are on the storage root.
``gradcache``
    On the device, under the runtime's autocast: one GradCache step (chunks of 2) and one
    plain step over the same 8 rows of the tiny model with LoRA. Asserts the losses and
    the LoRA gradients agree: max |difference| <= 5e-2 x max |gradient| under bf16 autocast
    (chunked and whole-batch matmuls round differently; 1e-5 in the float32 dry run) and
    cosine >= 0.999.
``evaluate``
    The evaluation step (a coordinator Ray task and one embedding actor with one GPU)
    scores the trained model and the untrained base and publishes both reports. Asserts
    both reports exist and every embedding actor ran on CUDA, autocasting in bfloat16.
``collective``
    With two or more GPUs (or the dry run, on gloo): two ranks each encode half of a fixed
    batch with one small encoder, compute the loss with candidates gathered across ranks
    (with gradient) over NCCL and average gradients as DDP does; the mean loss and the
    averaged gradients must equal one rank's on the whole batch (1e-4 relative). SKIP with
    one GPU.
``bench``
    ``train_bench.py --gpu``: the real Qwen2-VL-2B architecture (random weights), bf16
    weights under the runtime's bf16 autocast, LoRA r=64, GradCache with the 2B config's
    chunk (32), gradient checkpointing, per-device batch 48; prints step time, samples/s,
    tokens/s, peak allocated and reserved memory and MFU.

``--dry-run`` runs every part on CPU (gloo, float32, the benchmark cut to two layers): it
proves the script works on any machine and measures nothing. The figures of a real run
go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import math
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
                "max_steps": 6,
                "checkpoint_every": 3,
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
    losses = [r["loss"] for r in rows]
    autocast_label = "autocast bfloat16" if want == "cuda" else "no autocast on CPU"
    checks = {
        f"device is {want}": worker["device"].startswith(want),
        autocast_label: worker.get("autocast") == ("torch.bfloat16" if want == "cuda" else None),
        f"{cfg.stage1.max_steps} steps": len(rows) == cfg.stage1.max_steps,
        "every loss finite": all(math.isfinite(v) for v in losses),
        "loss falls (last two below first two)": sum(losses[-2:]) < sum(losses[:2]),
        "a checkpoint on the storage root": len(checkpoints) >= 1,
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "device": worker["device"],
        "backend": worker["backend"],
        "autocast": worker.get("autocast"),
        "steps": len(rows),
        "losses": [round(v, 4) for v in losses],
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
    actors = [a for role in out for a in out[role].get("actors", [])]
    want = "cuda" if cfg.compute.use_gpu else "cpu"
    autocast = "bfloat16" if want == "cuda" else None
    checks = {
        "both reports": set(scores) == {"model", "baseline"},
        f"every actor on {want}": bool(actors)
        and all(a["device"].startswith(want) for a in actors),
        f"every actor autocasts {autocast or 'nothing (CPU)'}": all(
            a["autocast"] == autocast for a in actors
        ),
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "actors": actors,
        "all": scores,
        "seconds": round(time.perf_counter() - started, 1),
    }


def part_setup(dry: bool) -> dict[str, Any]:
    """torch, its CUDA build, the driver and what it supports; FAIL on a driver too old."""
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "cuda_build": torch.version.cuda}
    driver = _nvidia_smi("driver_version")
    out["driver"] = driver
    try:  # the CUDA version the driver supports, as the CUDA runtime reports it
        code = int(torch._C._cuda_getDriverVersion())
        out["driver_cuda"] = f"{code // 1000}.{code % 1000 // 10}" if code else None
    except Exception:  # no driver at all
        out["driver_cuda"] = None
    if dry:
        return {**out, "ok": True, "asserted": {"dry run: no CUDA needed": True}}
    build = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
    have = tuple(int(x) for x in (out["driver_cuda"] or "0.0").split(".")[:2])
    checks = {
        f"driver supports CUDA {torch.version.cuda}": have >= build,
        "a CUDA device is visible": torch.cuda.is_available(),
    }
    if not checks[f"driver supports CUDA {torch.version.cuda}"]:
        out["error"] = (
            f"the NVIDIA driver {driver} supports CUDA {out['driver_cuda']}, but torch "
            f"{torch.__version__} is built for CUDA {torch.version.cuda}: update the driver "
            "(CUDA 13 needs 580 or newer) or install a torch build for the driver's CUDA"
        )
    if torch.cuda.is_available():
        out["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {**out, "ok": all(checks.values()), "asserted": checks}


def _nvidia_smi(field: str) -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout else None


def part_gradcache(cfg: Any, dry: bool) -> dict[str, Any]:
    """GradCache and the plain step on the device under the runtime's autocast: the same
    loss and LoRA gradients."""
    import torch

    from rzenembed.config import LoraConfig, LossConfig
    from rzenembed.losses import RzenEmbedLoss
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.runtime import Runtime, autocast_for
    from rzenembed.training.gradcache import gradcache_step, plain_step, prepare_batch

    if dry:
        runtime = Runtime(torch.device("cpu"))
    else:
        runtime = Runtime(
            torch.device("cuda"), "nccl", autocast_for(cfg.model, torch.device("cuda"))
        )
    torch.manual_seed(0)
    embedder = RzenEmbedder.from_pretrained(cfg.model.name_or_path, config=cfg.model)
    embedder.apply_lora(LoraConfig(r=4, alpha=8.0, dropout=0.0))
    embedder.to(runtime.device).train()
    loss_module = RzenEmbedLoss(LossConfig(false_negative_delta=None)).to(runtime.device)
    from PIL import Image

    images = [Image.new("RGB", (56, 56), (40 * i, 255 - 30 * i, 90)) for i in range(8)]
    queries = [f"a picture of colour number {i}" for i in range(8)]
    positives = [{"images": [img], "text": ""} for img in images]
    task = loss_module.task_index(["image_retrieval"] * 8).to(runtime.device)
    params = [p for p in embedder.parameters() if p.requires_grad]

    def run(step, chunk):
        for p in params:
            p.grad = None
        batch = prepare_batch(embedder, queries, positives, None, 0, chunk)

        def embed(inputs):
            with runtime.autocast():
                return embedder(**inputs).float()

        out = step(embed, batch, lambda q, p, n: loss_module(q, p, task, negatives=n))
        return float(out["loss"]), torch.cat([p.grad.flatten().float() for p in params])

    plain_loss, plain = run(plain_step, None)
    cached_loss, cached = run(gradcache_step, 2)
    tolerance = 1e-5 if dry else 5e-2
    difference = float((cached - plain).abs().max() / plain.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(cached, plain, dim=0))
    checks = {
        f"gradients within {tolerance:g} of the largest": difference <= tolerance,
        "gradient cosine >= 0.999": cosine >= 0.999,
        "losses within 1e-3": abs(cached_loss - plain_loss) <= 1e-3 * max(1.0, abs(plain_loss)),
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "device": str(runtime.device),
        "loss_plain_gradcache": [round(plain_loss, 5), round(cached_loss, 5)],
        "max_difference": difference,
        "cosine": cosine,
    }


def part_collective(dry: bool) -> dict[str, Any]:
    """Two ranks over NCCL (gloo in the dry run): the loss with candidates gathered across
    ranks equals one rank's on the whole batch, gradients included."""
    import torch

    if not dry and torch.cuda.device_count() < 2:
        return {"ok": True, "skipped": f"{torch.cuda.device_count()} GPU: needs two"}
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="gpu-check-ranks-") as folder:
        port = _free_port()
        ctx = mp.get_context("spawn")
        ranks = [
            ctx.Process(target=_collective_rank, args=(r, 2, port, folder, dry)) for r in range(2)
        ]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join(180)
        if any(r.exitcode != 0 for r in ranks):
            errors = [p.read_text() for p in Path(folder).glob("rank*.error")]
            return {"ok": False, "error": "\n".join(errors)[-3000:] or "a rank did not finish"}
        results = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(2)]
    single_loss, single_grads = _collective_reference()
    loss = sum(r["loss"] for r in results) / 2
    relative = max(
        float((r["grad"] - single_grads).abs().max() / single_grads.abs().max()) for r in results
    )
    checks = {
        "two-rank loss equals one rank's": abs(loss - single_loss) <= 1e-4 * abs(single_loss),
        "averaged gradients within 1e-4 of the largest": relative <= 1e-4,
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "backend": results[0]["backend"],
        "loss_two_ranks_one_rank": [loss, single_loss],
        "max_difference": relative,
    }


BATCH, DIM = 8, 16


def _collective_inputs():
    import torch

    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(BATCH, DIM, generator=gen)
    positives = queries + 0.3 * torch.randn(BATCH, DIM, generator=gen)
    torch.manual_seed(4)
    encoder = torch.nn.Linear(DIM, DIM)
    return queries, positives, encoder


def _collective_loss(encoder, queries, positives, gather: bool):
    from rzenembed.config import LossConfig
    from rzenembed.losses import RzenEmbedLoss

    loss = RzenEmbedLoss(LossConfig(false_negative_delta=None, gather_across_ranks=gather))
    loss = loss.to(queries.device)
    task = loss.task_index(["image_retrieval"] * len(queries)).to(queries.device)
    return loss(encoder(queries), encoder(positives), task)["loss"]


def _collective_reference():
    """One rank, the whole batch: the loss and the encoder's gradient."""
    import torch

    queries, positives, encoder = _collective_inputs()
    loss = _collective_loss(encoder, queries, positives, gather=False)
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in encoder.parameters()])


def _collective_rank(rank: int, world: int, port: int, folder: str, dry: bool) -> None:
    """Half the batch, the loss with candidates gathered across ranks, gradients averaged
    over ranks as DDP averages them."""
    import traceback

    import torch
    import torch.distributed as dist

    try:
        backend = "gloo" if dry else "nccl"
        device = torch.device("cpu" if dry else f"cuda:{rank}")
        if not dry:
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        queries, positives, encoder = _collective_inputs()
        encoder = encoder.to(device)
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = _collective_loss(
            encoder, queries[half].to(device), positives[half].to(device), gather=True
        )
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in encoder.parameters()])
        dist.all_reduce(grad)
        result = {"loss": float(loss), "grad": (grad / world).cpu(), "backend": backend}
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except Exception:
        (Path(folder) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        if line.startswith(("step ", "peak memory", "MFU", "executed", "device", "tokens"))
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
    if results[name].get("skipped"):
        status = "SKIP"
    shown = {k: v for k, v in results[name].items() if k not in ("ok", "figures")}
    print(f"{status} {name}: {json.dumps(shown)}", flush=True)
    for line in results[name].get("figures", []):
        print(f"    {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and gloo; measures nothing")
    parser.add_argument("--parts", default="setup,train,gradcache,evaluate,collective,bench")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    dry = args.dry_run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from rzenembed.data.engine import ensure_ray

    parts = args.parts.split(",")
    results: dict[str, Any] = {}
    print(f"gpu-check ({'dry run on CPU' if dry else 'CUDA'}; torch {torch.__version__})")
    run_part("setup", lambda: part_setup(dry), results)
    if not results["setup"]["ok"]:
        print("gpu-check: FAIL")
        return 1
    with tempfile.TemporaryDirectory(prefix="rzenembed-gpu-check-") as tmp:
        os.environ["RZENEMBED_CACHE"] = str(Path(tmp) / "cache")
        cfg, _ = check_config(Path(tmp), dry)
        ensure_ray(num_cpus=2 if dry else None)
        if "train" in parts:
            run_part("train", lambda: part_train(cfg), results)
        if "gradcache" in parts:
            run_part("gradcache", lambda: part_gradcache(cfg, dry), results)
        if "evaluate" in parts and results.get("train", {}).get("ok"):
            run_part("evaluate", lambda: part_evaluate(cfg, results["train"]["adapter"]), results)
        if "collective" in parts:
            run_part("collective", lambda: part_collective(dry), results)
        if "bench" in parts:
            run_part("bench", lambda: part_bench(dry), results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    ok = all(r["ok"] for r in results.values()) and set(parts) <= set(results) | {"setup"}
    print("gpu-check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
