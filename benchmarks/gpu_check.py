"""The GPU check: what only a GPU can tell, in one command, in a few minutes, never hanging.

    python benchmarks/gpu_check.py            (make gpu-check; CUDA devices, ~8 min, exits
                                               within 20 min whatever happens)
    python benchmarks/gpu_check.py --dry-run --plant-hang   (make gpu-check-dry-run: every
                                               part's code on CPU with gloo, plus a planted
                                               hung rank; in the suite)
    python benchmarks/gpu_check.py --json results.json   (the figures docs/PERFORMANCE.md
                                                           is filled from)

Parts, each printed as PASS, FAIL or SKIP with its figures and what it asserted:

``setup``
    torch, its CUDA build, the NVIDIA driver and the CUDA version the driver supports, the
    devices. FAIL when the driver is older than the build needs (the pinned torch is a
    CUDA 13 build: driver 580 or newer), with the versions; nothing else runs then.
``train``
    Ray Train workers with ``compute.use_gpu: true`` (one GPU each, NCCL) train the tiny
    config in bf16 on the sample corpus for six steps: TWO workers with two or more GPUs,
    one with one GPU (the result says so: no all-reduce to check). Asserts from each rank's
    ``workers/rank<N>.json``: the worker count, backend ``nccl``, a CUDA device (each rank
    its own GPU, by UUID), bfloat16 autocast; every loss finite, the mean of the last two
    below the first two, the adapter and a checkpoint on the storage root. With two
    workers, that the gradient all-reduce ran: a step callback on every rank records, before
    each step, a digest of the rank's trainable weights and of the gradients the rank itself
    computed in the previous step (before averaging). The ranks train on different rows, so
    their own gradients differ at every step, yet their weights must be bitwise equal after
    every step and have moved: independent optimiser steps on different gradients cannot
    give equal weights; only averaging the gradients across ranks (the all-reduce) can.
``gradcache``
    On the device, under the runtime's autocast, with the 2B config's LoRA dropout (0.05)
    and gradient checkpointing on (``configs/qwen2vl-2b.yaml``): one GradCache step and one
    plain step over the same 8 rows in the same chunks of 2, both from the same seed, LoRA
    B factors randomised (so every LoRA gradient is non-zero). GradCache replays each
    chunk's RNG state in its second forward (``rzenembed.training.gradcache``, always on), so
    dropout draws the plain step's masks. Asserts the losses within 1e-3 and the gradients
    within ``GRADCACHE_TOLERANCE`` of the largest gradient (1e-2 under bf16 autocast: the
    same chunks through the same kernels, only the accumulation order differs; 1e-5 in the
    float32 dry run) with cosine >= 0.999; and, so the comparison cannot pass vacuously,
    that GradCache WITHOUT the replay misses by more than ten times the tolerance.
``evaluate``
    The evaluation step (a coordinator and one embedding actor with one GPU) scores the
    trained model and the untrained base and publishes both reports. Asserts both reports
    exist and every embedding actor ran on CUDA, autocasting in bfloat16.
``collective``
    With two or more GPUs (or the dry run, on gloo): two ranks each encode half of a fixed
    batch with one small encoder, compute the loss with candidates gathered across ranks
    (with gradient) over NCCL and average gradients as DDP does; the mean loss and the
    averaged gradients must equal one rank's on the whole batch (1e-4 relative), the same
    on both ranks. SKIP with one GPU.
``bench``
    ``train_bench.py --gpu --steps 3`` (through ``gpu_check_bench.py``): the real
    Qwen2-VL-2B architecture (random weights), bf16 weights under the runtime's bf16
    autocast, LoRA r=64, GradCache with the 2B config's chunk (32), gradient checkpointing,
    per-device batch 48; prints step time, samples/s, tokens/s, peak allocated and
    reserved memory and MFU. FAIL below ``BENCH_MFU_FLOOR_PCT`` (headline MFU) or above
    ``BENCH_RESERVED_CEILING_GIB`` (peak reserved), each printed beside its figure.
``collective-hang`` (only with ``--plant-hang``; the dry-run target passes it)
    The ``collective`` code on two gloo ranks where rank 1 joins the process group, then
    ignores SIGTERM and never joins a collective, so rank 0 waits forever in the loss's
    cross-rank gather (the first collective after the group is formed). It must
    end as ``FAIL collective-hang: ... timed out after N s ...`` with both ranks killed;
    the next part still runs.

Nothing the check starts can outlive or hang it. The parts that run in-process code
(setup, train, gradcache, evaluate, with Ray) run in a part-runner subprocess; the
collective's ranks and the benchmark are subprocesses too; each in a session of its own.
A part that passes its timeout (``TIMEOUTS_S``) is stopped with its whole process tree
(SIGTERM, SIGKILL after 5 s, then joined), reported as ``FAIL <part>: ... timed out after
N s ...``, and the check goes on with the next part (in a fresh runner) and exits non-zero.
A watchdog ends the whole check at its overall deadline (``DEADLINE_S``; ``--deadline``),
printing what was still running, killing it and exiting with FAIL; at the end every
process the check started and that still runs is stopped.

Exit status: 0 when every part passed or was skipped, printing ``gpu-check: PASS``. With
``--plant-hang`` the planted part is expected to FAIL by timing out; the check then exits 0
only when every real part passed AND the planted hang was caught (``gpu-check: PASS
(planted hang caught)``); a planted part that did not time out fails the check. ``make
gpu-check`` never plants anything.

``--dry-run`` runs every part on CPU (gloo, float32, two training workers, the benchmark
cut to two layers in float32, the floor and ceiling at dry-run values that the CPU figures
pass): it proves the script works on any machine and measures nothing. The figures of a
real run go to docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import gpu_check_procs as procs  # noqa: E402 - needs the benchmarks folder on the path

SOURCES = ("sample-text-pairs", "sample-captions")
PARTS = ("setup", "train", "gradcache", "evaluate", "collective", "bench")
PLANTED = "collective-hang"

# Per-part timeouts in seconds (the part runner's start, torch imports included) and the
# check's overall deadline. A healthy CUDA run takes about 8 minutes in all.
TIMEOUTS_S = {
    "setup": 180,
    "train": 420,
    "gradcache": 180,
    "evaluate": 300,
    "collective": 180,
    "bench": 480,
}
DEADLINE_S = 1200
# The dry run on a 2-core VM (about 2.5 minutes when nothing else runs). Its deadline stays
# under the suite's 600 s pytest timeout, so the check, not pytest, reports a stuck part.
DRY_TIMEOUTS_S = {
    "setup": 180,
    "train": 240,
    "gradcache": 120,
    "evaluate": 180,
    "collective": 120,
    PLANTED: 20,
    "bench": 300,
}
DRY_DEADLINE_S = 480

# The benchmark's floors (the 2B config on one H100 SXM or H200, 989 TFLOP/s dense bf16,
# docs/PERFORMANCE.md "GPU mode"). F is about 30 TFLOP per sample at the bench's inputs, so
# the headline MFU (2F / step time / peak; LoRA's useful work) is 29% for a 10 s step at
# batch 48. A floor of 15% is a 19 s step, where the 4F actually executed (GradCache's
# no-grad forward and the checkpoint recompute included) still run at 30% of peak, which a
# healthy bf16 run with flash (sdpa) attention exceeds; float32 matmuls, math attention
# over the ViT's 5040-patch sequences or a host-bound step land far below it. The bench
# divides by 989 whatever the card: an H100 PCIe (756 TFLOP/s) needs the same 148 TFLOP/s.
# Not yet measured (no device lent so far): the first real run should confirm it.
BENCH_MFU_FLOOR_PCT = 15.0
# Peak reserved memory of one bench step, against an 80 GB H100's 79.6 GiB: above 68 GiB
# (85%) the config's per-device batch has no room for what the bench does not load (NCCL
# buffers and gathered candidates of a multi-GPU run, 2048-token texts, 16-frame videos,
# fragmentation over a long run). Expected well below (bf16 weights 4.4 GiB; checkpointed
# activations of one 32-row chunk of 5040-patch images, about 12 GiB in the ViT).
BENCH_RESERVED_CEILING_GIB = 68.0
# The dry run's CPU figures: MFU prints as 0.0% and memory is the process's RSS peak (2.7
# GiB for the 2-layer float32 model); these values pass, so the checks' code runs.
DRY_BENCH_MFU_FLOOR_PCT = 0.0
DRY_BENCH_PEAK_CEILING_GIB = 8.0

# GradCache against the plain step, relative to the largest gradient.
GRADCACHE_TOLERANCE = 1e-2  # bf16 autocast on CUDA
DRY_GRADCACHE_TOLERANCE = 1e-5  # float32 on CPU
GRADCACHE_CHUNK = 2
GPU_CONFIG = REPO / "configs" / "qwen2vl-2b.yaml"


# ======================================================================== the parts (runner)


def check_config(work: Path, dry: bool, workers: int) -> Any:
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
            "compute": {
                "num_workers": workers,
                "cpus_per_worker": 1,
                "use_gpu": not dry,
                "step_cpus": 1,
            },
        }
    )


class WeightProbe:
    """A training step callback (every rank, before every step): appends to
    ``<folder>/rank<N>.jsonl`` a digest of this rank's trainable weights (as the previous
    step left them) and of the gradients this rank computed in the previous step, taken
    by a post-accumulate hook before ``average_gradients`` replaces them with the average.
    It travels to the Ray Train workers pickled by value (this script is ``__main__``)."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, trainer: Any, step: int) -> None:
        import torch

        if getattr(self, "_grads", None) is None:  # first call on this worker: hooks
            self._grads: dict[str, Any] = {}
            for name, param in trainer.module.named_parameters():
                if param.requires_grad:
                    param.register_post_accumulate_grad_hook(
                        lambda p, n=name: self._grads.__setitem__(n, p.grad)
                    )
        weights = {n: p for n, p in trainer.module.named_parameters() if p.requires_grad}
        gpu = None
        if trainer.runtime.device.type == "cuda":  # which physical GPU: its UUID
            props = torch.cuda.get_device_properties(trainer.runtime.device)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpu = str(getattr(props, "uuid", "") or f"CUDA_VISIBLE_DEVICES={visible}")
        row = {
            "step": step,
            "rank": trainer.rank,
            "weights": self.digest(weights),
            "local_grads": self.digest(self._grads) if self._grads else None,
            "gpu": gpu,
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        self._grads = {}
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"rank{trainer.rank}.jsonl").open("a") as out:
            out.write(json.dumps(row) + "\n")

    @staticmethod
    def digest(tensors: dict[str, Any]) -> str:
        import hashlib

        import torch

        h = hashlib.blake2b(digest_size=16)
        for name in sorted(tensors):
            tensor = tensors[name].detach().reshape(-1).contiguous().cpu()
            h.update(name.encode())
            h.update(tensor.view(torch.uint8).numpy().tobytes())
        return h.hexdigest()


def all_reduce_evidence(folder: Path, workers: int, steps: int) -> dict[str, Any]:
    """What the ``WeightProbe`` rows of every rank show (see the module docstring)."""
    rows = {}
    for rank in range(workers):
        path = folder / f"rank{rank}.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        rows[rank] = {row["step"]: row for row in map(json.loads, lines)}
    common = sorted(set.intersection(*(set(r) for r in rows.values())))
    after = [s for s in common if s > 0]  # weights after step s - 1, gradients of s - 1
    checks = {f"probe rows of steps 0-{steps - 1} on every rank": common == list(range(steps))}
    if after:
        last = after[-1]
        checks["the weights moved (last probe differs from step 0)"] = (
            rows[0][last]["weights"] != rows[0][0]["weights"]
        )
    if workers > 1 and after:
        checks["each rank's own gradients differed from the others' at every step"] = all(
            len({rows[r][s]["local_grads"] for r in rows}) == workers for s in after
        )
        checks["ranks' weights bitwise equal after every step (the gradient all-reduce ran)"] = all(
            len({rows[r][s]["weights"] for r in rows}) == 1 for s in after
        )
    gpus = [rows[r][0]["gpu"] for r in rows if 0 in rows[r]]
    return {"checks": checks, "steps_compared": len(after), "gpus": gpus}


def part_train(cfg: Any, work: Path) -> dict[str, Any]:
    from rzenembed.data.folders import read_text
    from rzenembed.data.storage import join
    from rzenembed.prep.prepare import prepare_all
    from rzenembed.training.stages import run_training

    started = time.perf_counter()
    workers = cfg.compute.num_workers
    probes = work / "probes"
    shutil.rmtree(probes, ignore_errors=True)
    data = prepare_all(cfg, show_progress=False)
    result = run_training(
        cfg,
        "stage1",
        data.stages["stage1"],
        cfg.model.name_or_path,
        "all",
        step_callbacks=[WeightProbe(str(probes))],
    )
    elapsed = time.perf_counter() - started
    rows = [json.loads(line) for line in read_text(result.metrics_uri).splitlines()]
    run_folder = result.adapter_uri.rsplit("/", 1)[0]
    ranks = [
        json.loads(read_text(join(run_folder, "workers", f"rank{r}.json"))) for r in range(workers)
    ]
    checkpoints = sorted(p.name for p in (Path(cfg.storage.root) / "_train").rglob("checkpoint_*"))
    gpu = cfg.compute.use_gpu
    want, backend = ("cuda", "nccl") if gpu else ("cpu", "gloo")
    losses = [r["loss"] for r in rows]
    autocast_label = "autocast bfloat16" if gpu else "no autocast on CPU"
    evidence = all_reduce_evidence(probes, workers, cfg.stage1.max_steps)
    checks = {
        f"{workers} Ray Train worker{'s' if workers > 1 else ''}": len(ranks) == workers
        and all(w["world_size"] == workers for w in ranks),
        f"backend {backend} on every rank": all(w["backend"] == backend for w in ranks),
        f"device {want} on every rank": all(w["device"].startswith(want) for w in ranks),
        autocast_label: all(
            w.get("autocast") == ("torch.bfloat16" if gpu else None) for w in ranks
        ),
        f"{cfg.stage1.max_steps} steps": len(rows) == cfg.stage1.max_steps,
        "every loss finite": all(math.isfinite(v) for v in losses),
        "loss falls (last two below first two)": sum(losses[-2:]) < sum(losses[:2]),
        "a checkpoint on the storage root": len(checkpoints) >= 1,
        **evidence["checks"],
    }
    if gpu and workers > 1:
        checks["each rank on its own GPU"] = len(set(evidence["gpus"])) == workers
    out = {
        "ok": all(checks.values()),
        "asserted": checks,
        "workers": workers,
        "device": ranks[0]["device"],
        "backend": ranks[0]["backend"],
        "ranks": [{k: w.get(k) for k in ("rank", "device", "backend", "node_id")} for w in ranks],
        "autocast": ranks[0].get("autocast"),
        "steps": len(rows),
        "all_reduce_steps_compared": evidence["steps_compared"] if workers > 1 else 0,
        "losses": [round(v, 4) for v in losses],
        "samples_per_s": round(sum(r["samples_per_s"] for r in rows) / len(rows), 1),
        "checkpoints": len(checkpoints),
        "seconds": round(elapsed, 1),
        "adapter": result.adapter_uri,
    }
    if workers == 1:
        out["note"] = "one GPU: one worker, no gradient all-reduce to check (two need two GPUs)"
    return out


def part_evaluate(cfg: Any, adapter_uri: str) -> dict[str, Any]:
    from rzenembed.data.storage import join
    from rzenembed.evaluation.step import evaluate_step
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
    """GradCache and the plain step on the device under the runtime's autocast, with the
    GPU config's LoRA dropout and gradient checkpointing: the same loss and LoRA gradients
    with the RNG replay, clearly different ones without it."""
    import torch
    from PIL import Image

    from rzenembed.config import LoraConfig, LossConfig, load_config
    from rzenembed.losses import RzenEmbedLoss
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.runtime import Runtime, autocast_for
    from rzenembed.training import gradcache
    from rzenembed.training.gradcache import gradcache_step, plain_step, prepare_batch

    if dry:
        runtime = Runtime(torch.device("cpu"))
    else:
        runtime = Runtime(
            torch.device("cuda"), "nccl", autocast_for(cfg.model, torch.device("cuda"))
        )
    gpu = load_config(GPU_CONFIG)
    dropout, checkpointing = gpu.lora.dropout, gpu.model.gradient_checkpointing
    model_cfg = cfg.model.model_copy(update={"gradient_checkpointing": checkpointing})
    embedder = RzenEmbedder.from_pretrained(cfg.model.name_or_path, config=model_cfg)
    torch.manual_seed(0)
    embedder.apply_lora(LoraConfig(r=4, alpha=8.0, dropout=dropout))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at zero, which would zero every LoRA A gradient
        for name, param in embedder.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=gen))
    embedder.to(runtime.device).train()
    loss_module = RzenEmbedLoss(LossConfig(false_negative_delta=None)).to(runtime.device)
    images = [Image.new("RGB", (56, 56), (40 * i, 255 - 30 * i, 90)) for i in range(8)]
    queries = [f"a picture of colour number {i}" for i in range(8)]
    positives = [{"images": [img], "text": ""} for img in images]
    task = loss_module.task_index(["image_retrieval"] * 8).to(runtime.device)
    params = [p for p in embedder.parameters() if p.requires_grad]

    def embed(inputs):
        with runtime.autocast():
            return embedder(**inputs).float()

    def run(step, replay: bool = True):
        for p in params:
            p.grad = None
        batch = prepare_batch(embedder, queries, positives, None, 0, GRADCACHE_CHUNK)
        torch.manual_seed(1234)  # every device's generator: both steps draw the same masks
        restore = gradcache.restore_rng_state
        if not replay:  # the negative control: phase 3 draws fresh dropout masks
            gradcache.restore_rng_state = lambda state: None
        try:
            out = step(embed, batch, lambda q, p, n: loss_module(q, p, task, negatives=n))
        finally:
            gradcache.restore_rng_state = restore
        return float(out["loss"]), torch.cat([p.grad.flatten().float() for p in params])

    def compare(a, b) -> tuple[float, float]:
        difference = float((a - b).abs().max() / b.abs().max())
        return difference, float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    plain_loss, plain = run(plain_step)
    cached_loss, cached = run(gradcache_step)
    _, unreplayed = run(gradcache_step, replay=False)
    tolerance = DRY_GRADCACHE_TOLERANCE if dry else GRADCACHE_TOLERANCE
    difference, cosine = compare(cached, plain)
    control, control_cosine = compare(unreplayed, plain)
    dropouts = {m.p for m in embedder.modules() if isinstance(m, torch.nn.Dropout)}
    checks = {
        f"LoRA dropout {dropout} as {GPU_CONFIG.name}": dropout > 0 and dropout in dropouts,
        f"gradient checkpointing {'on' if checkpointing else 'off'} as {GPU_CONFIG.name}": (
            checkpointing and embedder.hf_model.is_gradient_checkpointing
        ),
        f"gradients within {tolerance:g} of the largest (RNG replayed)": difference <= tolerance,
        "gradient cosine >= 0.999": cosine >= 0.999,
        "losses within 1e-3": abs(cached_loss - plain_loss) <= 1e-3 * max(1.0, abs(plain_loss)),
        f"without the replay they differ by more than {10 * tolerance:g}": control > 10 * tolerance,
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "device": str(runtime.device),
        "lora_dropout": dropout,
        "gradient_checkpointing": checkpointing,
        "chunk": GRADCACHE_CHUNK,
        "loss_plain_gradcache": [round(plain_loss, 5), round(cached_loss, 5)],
        "max_difference": difference,
        "cosine": cosine,
        "without_replay": {"max_difference": control, "cosine": control_cosine},
    }


class RunnerState:
    """What the parts of one runner share: the config (built once per check, reloaded by a
    runner started after a timeout) and Ray."""

    def __init__(self, work: Path, dry: bool):
        self.work, self.dry = work, dry
        self._cfg = None

    @property
    def cfg(self) -> Any:
        if self._cfg is None:
            from rzenembed.config import config_from_dict

            saved = self.work / "config.json"
            if saved.exists():
                self._cfg = config_from_dict(json.loads(saved.read_text()))
            else:
                self._cfg = check_config(self.work, self.dry, self.workers())
                saved.write_text(json.dumps(self._cfg.model_dump(mode="json")))
        return self._cfg

    def workers(self) -> int:
        """Two training workers with two or more GPUs (and in the dry run), else one."""
        import torch

        return 2 if self.dry or torch.cuda.device_count() >= 2 else 1

    def ray(self) -> None:
        from rzenembed.compute.connect import ensure_ray

        ensure_ray(num_cpus=2 if self.dry else None)

    def run(self, part: str, **kwargs: Any) -> dict[str, Any]:
        if part == "setup":
            return part_setup(self.dry)
        if part == "train":
            cfg = self.cfg
            self.ray()
            return part_train(cfg, self.work)
        if part == "gradcache":
            return part_gradcache(self.cfg, self.dry)
        if part == "evaluate":
            cfg = self.cfg
            self.ray()
            return part_evaluate(cfg, kwargs["adapter"])
        raise ValueError(f"the runner has no part {part!r}")


def runner_main(work: Path, dry: bool) -> int:
    """The part runner: one JSON request a line on stdin, each result written to
    ``<work>/results/<part>.json``; at the end of its input, Ray is shut down."""
    os.environ["RZENEMBED_CACHE"] = str(work / "cache")
    state = RunnerState(work, dry)
    results = work / "results"
    results.mkdir(parents=True, exist_ok=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            part = request["part"]
            try:
                result = state.run(part, **request.get("args", {}))
            except Exception:
                result = {"ok": False, "error": traceback.format_exc()[-3000:]}
            staged = results / f".{part}.json.tmp"
            staged.write_text(json.dumps(result, default=str))
            staged.replace(results / f"{part}.json")
    finally:
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    return 0


# ================================================================ the collective's ranks


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
    return float(loss.detach()), torch.cat([p.grad.flatten() for p in encoder.parameters()])


def rank_main(rank: int, world: int, port: int, folder: Path, backend: str, hang: bool) -> int:
    """One rank of the ``collective`` part: half the batch, the loss with candidates gathered
    across ranks, gradients and loss averaged over ranks as DDP averages them; writes
    ``rank<N>.json``. ``rank<N>.state`` says how far it got (what a timeout reports). With
    ``hang`` the last rank joins the group, then ignores SIGTERM and never joins a
    collective: the planted hang."""

    def mark(state: str) -> None:
        (folder / f"rank{rank}.state").write_text(state)

    try:
        mark("starting (importing torch)")
        import torch
        import torch.distributed as dist

        device = torch.device("cpu" if backend == "gloo" else f"cuda:{rank}")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        mark("joining the process group")
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        if hang and rank == world - 1:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            mark("planted hang: ignores SIGTERM, never joins a collective")
            while True:
                time.sleep(3600)
        mark("joined the process group; in the loss's cross-rank gather")
        queries, positives, encoder = _collective_inputs()
        encoder = encoder.to(device)
        half = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        loss = _collective_loss(
            encoder, queries[half].to(device), positives[half].to(device), gather=True
        )
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in encoder.parameters()])
        mark("in the gradient all-reduce")
        dist.all_reduce(grad)
        total = torch.tensor([float(loss.detach())], dtype=torch.float64, device=device)
        dist.all_reduce(total)
        grad, mean_loss = (grad / world).cpu(), float(total.item()) / world
        single_loss, single_grad = _collective_reference()
        result = {
            "backend": backend,
            "loss": float(loss.detach()),
            "mean_loss": mean_loss,
            "single_loss": single_loss,
            "max_difference": float((grad - single_grad).abs().max() / single_grad.abs().max()),
            "grad_digest": WeightProbe.digest({"grad": grad}),
        }
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
        mark("done")
        return 0
    except Exception:
        (folder / f"rank{rank}.error").write_text(traceback.format_exc())
        return 1


# ====================================================================== the supervisor


class Runner:
    """The part-runner subprocess, kept between parts (one Ray start), started afresh after
    a part that timed out (the old one stopped with its tree)."""

    def __init__(self, work: Path, dry: bool, tracker: procs.Tracker):
        self.work, self.dry, self.tracker = work, dry, tracker
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--runner", "--work", str(self.work)]
        if self.dry:
            argv.append("--dry-run")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = procs.start(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, text=True)

    def run(self, part: str, timeout: float, **kwargs: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        result = self.work / "results" / f"{part}.json"
        result.unlink(missing_ok=True)
        try:
            self.proc.stdin.write(json.dumps({"part": part, "args": kwargs}) + "\n")
            self.proc.stdin.flush()
        except OSError as error:
            return {"ok": False, "error": f"the part runner is gone: {error}"}
        while time.monotonic() < deadline:
            self.tracker.sweep()
            if result.exists():
                return json.loads(result.read_text())
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                return {
                    "ok": False,
                    "error": f"the part runner exited with code {code} during the part "
                    "(its output is above)",
                }
            time.sleep(0.25)
        if result.exists():
            return json.loads(result.read_text())
        under = len(procs.tree(self.proc.pid)) - 1
        killed = procs.stop([self.proc])
        self.proc = None
        return {
            "ok": False,
            "timed_out": True,
            "error": f"timed out after {timeout:g} s; stopped its runner and the {under} "
            f"processes under it (SIGTERM, SIGKILL for {len(killed)}, joined)",
        }

    def close(self, timeout: float = 60.0) -> None:
        """End of input: the runner shuts Ray down and exits; stopped if it does not."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        if not procs.wait([self.proc], time.monotonic() + timeout, self.tracker):
            procs.stop([self.proc])
        self.proc = None


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def part_collective(
    work: Path, dry: bool, gpus: int, timeout: float, tracker: procs.Tracker, hang: bool = False
) -> dict[str, Any]:
    """Two ranks over NCCL (gloo in the dry run and for the planted hang): the loss with
    candidates gathered across ranks equals one rank's on the whole batch, gradients
    included. Ranks still running at ``timeout`` are killed (the part FAILs, timed out)."""
    if not dry and not hang and gpus < 2:
        return {"ok": True, "skipped": f"{gpus} GPU: needs two"}
    backend = "gloo" if dry or hang else "nccl"
    folder = work / (PLANTED if hang else "collective")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    popens = []
    for rank in range(2):
        argv = [sys.executable, str(Path(__file__).resolve()), "--rank", str(rank)]
        argv += ["--world", "2", "--port", str(port), "--folder", str(folder)]
        argv += ["--backend", backend] + (["--hang"] if hang else [])
        with (folder / f"rank{rank}.log").open("w") as log:
            popens.append(procs.start(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    if not procs.wait(popens, time.monotonic() + timeout, tracker):
        states = [
            f"rank {r} (pid {p.pid}): {_read(folder / f'rank{r}.state') or 'not started'}"
            for r, p in enumerate(popens)
        ]
        killed = procs.stop(popens)
        return {
            "ok": False,
            "timed_out": True,
            "error": f"timed out after {timeout:g} s; {'; '.join(states)}; both ranks "
            f"stopped (SIGTERM, SIGKILL for {len(killed)}, joined)",
            "backend": backend,
        }
    if any(p.returncode != 0 for p in popens):
        errors = [_read(f) for f in sorted(folder.glob("rank*.error"))]
        logs = [_tail(folder / f"rank{r}.log") for r in range(2)]
        return {"ok": False, "error": ("\n".join(errors) or "\n".join(logs))[-3000:]}
    results = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    single = results[0]["single_loss"]
    checks = {
        "two-rank loss equals one rank's": all(
            abs(r["mean_loss"] - single) <= 1e-4 * abs(single) for r in results
        ),
        "averaged gradients within 1e-4 of the largest": all(
            r["max_difference"] <= 1e-4 for r in results
        ),
        "both ranks hold the same averaged gradients": len({r["grad_digest"] for r in results})
        == 1,
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "backend": results[0]["backend"],
        "loss_two_ranks_one_rank": [results[0]["mean_loss"], single],
        "max_difference": max(r["max_difference"] for r in results),
    }


def _read(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FIGURES = ("step ", "peak memory", "MFU", "executed", "device", "tokens")


def part_bench(work: Path, dry: bool, timeout: float, tracker: procs.Tracker) -> dict[str, Any]:
    """The 2B benchmark in a subprocess, killed at ``timeout``; FAIL below the MFU floor or
    above the memory ceiling."""
    argv = [sys.executable, str(BENCHMARKS / "gpu_check_bench.py"), "--gpu"]
    argv += ["--dry-run"] if dry else ["--steps", "3"]
    log_path = work / "bench.log"
    with log_path.open("w") as log:
        popen = procs.start(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    finished = procs.wait([popen], time.monotonic() + timeout, tracker)
    killed = [] if finished else procs.stop([popen])
    text = log_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith(FIGURES)]
    if not finished:
        return {
            "ok": False,
            "timed_out": True,
            "error": f"timed out after {timeout:g} s; stopped (SIGTERM, SIGKILL for "
            f"{len(killed)}, joined)",
            "figures": lines,
        }
    mfu = _number(r"^MFU, LoRA useful work.*: ([0-9.]+)% of", text)
    if dry:  # the CPU figure: the process's RSS high-water mark
        memory = _number(r"^peak memory ([0-9.]+) GiB", text)
        floor, ceiling = DRY_BENCH_MFU_FLOOR_PCT, DRY_BENCH_PEAK_CEILING_GIB
        names = ("dry-run floor", "peak RSS", "dry-run ceiling")
    else:
        memory = _number(r"peak reserved ([0-9.]+) GiB", text)
        floor, ceiling = BENCH_MFU_FLOOR_PCT, BENCH_RESERVED_CEILING_GIB
        names = ("floor", "peak reserved", "ceiling")
    shown_mfu = "not printed" if mfu is None else f"{mfu:.1f}%"
    shown_memory = "not printed" if memory is None else f"{memory:.2f} GiB"
    mfu_check = f"MFU {shown_mfu} ({names[0]} {floor:g}%)"
    memory_check = f"{names[1]} {shown_memory} ({names[2]} {ceiling:g} GiB)"
    checks = {
        "exit code 0": popen.returncode == 0,
        mfu_check: mfu is not None and mfu >= floor,
        memory_check: memory is not None and memory <= ceiling,
    }
    return {
        "ok": all(checks.values()),
        "asserted": checks,
        "mfu_pct": mfu,
        "memory_gib": memory,
        "figures": [mfu_check, memory_check, *lines],
        "error": "" if popen.returncode == 0 else _tail(log_path, 2000),
    }


def _number(pattern: str, text: str) -> float | None:
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else None


class Check:
    """The results so far, the part running now, and how each is printed."""

    def __init__(self, json_path: str | None):
        self.results: dict[str, Any] = {}
        self.current = ""
        self.json_path = json_path
        self.hold: Callable[[], None] = lambda: None  # the watchdog's, once it exists

    def run(self, name: str, fn: Callable[[], dict[str, Any]], planted: bool = False) -> None:
        self.current = name
        try:
            result = fn()
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()[-3000:]}
        self.hold()  # past the deadline the watchdog reports this part and exits
        if planted:
            result["planted"] = "expected to FAIL: timed out"
        self.results[name] = result
        self.current = ""
        status = "SKIP" if result.get("skipped") else "PASS" if result["ok"] else "FAIL"
        shown = {k: v for k, v in result.items() if k not in ("ok", "figures")}
        print(f"{status} {name}: {json.dumps(shown)}", flush=True)
        for line in result.get("figures", []):
            print(f"    {line}", flush=True)

    def expire(self) -> None:
        """The watchdog's last act: the running part failed, the results written."""
        if self.current:
            self.results[self.current] = {
                "ok": False,
                "timed_out": True,
                "error": "the check's overall deadline passed while it ran",
            }
        self.write_json()

    def write_json(self) -> None:
        if self.json_path:
            Path(self.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(self.json_path).write_text(json.dumps(self.results, indent=2) + "\n")


def supervise(args: argparse.Namespace) -> int:
    dry = args.dry_run
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; the parts are {', '.join(PARTS)}")
    timeouts = {**TIMEOUTS_S, PLANTED: DRY_TIMEOUTS_S[PLANTED]}
    timeouts.update(DRY_TIMEOUTS_S if dry else {})
    for item in args.timeout:
        part, _, seconds = item.partition("=")
        if part not in timeouts or not seconds:
            raise SystemExit(f"--timeout {item}: expected PART=SECONDS, PART one of {PARTS}")
        timeouts[part] = float(seconds)
    deadline = args.deadline or (DRY_DEADLINE_S if dry else DEADLINE_S)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The runner's local Ray: Ray Train notices a finished fit at its next health poll, and
    # its placement-group cleaner must not find another cluster's state API through a
    # stale /tmp/ray marker (the suite's tests/conftest.py says more).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    tracker = procs.Tracker()
    check = Check(args.json)
    watchdog = procs.Watchdog(deadline, tracker, lambda: check.current, check.expire)
    check.hold = watchdog.hold
    watchdog.start()
    planted = " + planted hang" if args.plant_hang else ""
    print(
        f"gpu-check ({'dry run on CPU' if dry else 'CUDA'}{planted}; overall deadline "
        f"{deadline:g} s)",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="rzenembed-gpu-check-"))
    runner = Runner(work, dry, tracker)
    results = check.results
    try:
        check.run("setup", lambda: runner.run("setup", timeouts["setup"]))
        if not results["setup"]["ok"]:
            print("gpu-check: FAIL", flush=True)
            return 1
        if "train" in parts:
            check.run("train", lambda: runner.run("train", timeouts["train"]))
        if "gradcache" in parts:
            check.run("gradcache", lambda: runner.run("gradcache", timeouts["gradcache"]))
        if "evaluate" in parts:
            if results.get("train", {}).get("ok"):
                adapter = results["train"]["adapter"]
                check.run(
                    "evaluate",
                    lambda: runner.run("evaluate", timeouts["evaluate"], adapter=adapter),
                )
            else:
                error = "not run: it scores the train part's adapter, and train failed"
                check.run("evaluate", lambda: {"ok": False, "error": error})
        runner.close()  # Ray down before the ranks and the benchmark take the devices
        gpus = len(results["setup"].get("devices", []))
        if "collective" in parts:
            check.run(
                "collective",
                lambda: part_collective(work, dry, gpus, timeouts["collective"], tracker),
            )
        if args.plant_hang:
            check.run(
                PLANTED,
                lambda: part_collective(work, dry, gpus, timeouts[PLANTED], tracker, hang=True),
                planted=True,
            )
        if "bench" in parts:
            check.run("bench", lambda: part_bench(work, dry, timeouts["bench"], tracker))
    finally:
        watchdog.hold()
        runner.close(timeout=30)
        left = tracker.stop_leftovers()
        if left:
            print(f"gpu-check: stopped {len(left)} leftover processes: {'; '.join(left)}")
        shutil.rmtree(work, ignore_errors=True)
        check.write_json()
        watchdog.cancel()
    return verdict(results, parts, args.plant_hang)


def verdict(results: dict[str, Any], parts: list[str], planted: bool) -> int:
    """0 when every real part passed (or was skipped) and, with a planted hang, when the
    planted part failed by timing out; prints the last line."""
    real = {name: r for name, r in results.items() if name != PLANTED}
    missing = [p for p in parts if p not in results]
    failed = [name for name, r in real.items() if not r["ok"]] + missing
    if not planted:
        print("gpu-check: " + ("PASS" if not failed else f"FAIL ({', '.join(failed)})"))
        return 0 if not failed else 1
    caught = results.get(PLANTED, {}).get("timed_out") is True
    if not failed and caught:
        print("gpu-check: PASS (planted hang caught)")
        return 0
    reasons = ([f"failed: {', '.join(failed)}"] if failed else []) + (
        [] if caught else [f"the planted hang was not caught ({PLANTED} did not time out)"]
    )
    print(f"gpu-check: FAIL ({'; '.join(reasons)})")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU and gloo; measures nothing")
    parser.add_argument("--parts", default=",".join(PARTS), help="setup always runs")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--plant-hang",
        action="store_true",
        help=f"add the {PLANTED} part (a rank that never joins a collective), expected to "
        "FAIL by timing out: a self-test of the timeouts",
    )
    parser.add_argument("--deadline", type=float, help="overall deadline in seconds")
    parser.add_argument(
        "--timeout",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="override one part's timeout (repeatable), e.g. to see a timeout handled",
    )
    # Internal: the part runner and the collective's ranks are this script too.
    parser.add_argument("--runner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="gloo", help=argparse.SUPPRESS)
    parser.add_argument("--hang", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.runner:
        return runner_main(Path(args.work), args.dry_run)
    if args.rank is not None:
        folder = Path(args.folder)
        return rank_main(args.rank, args.world, args.port, folder, args.backend, args.hang)
    return supervise(args)


if __name__ == "__main__":
    raise SystemExit(main())
