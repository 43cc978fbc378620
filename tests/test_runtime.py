"""The runtime layer: one place decides the device; a training step keeps every parameter,
buffer and collective tensor on it, and a tensor elsewhere is refused by name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from rzenembed import runtime
from rzenembed.config import ComputeConfig, ModelConfig
from rzenembed.runtime import (
    DEVICE_ENV,
    CudaUnusable,
    DeviceError,
    Runtime,
    activated,
    autocast_for,
    backend_for,
    check_collective,
    task_runtime,
    train_worker_runtime,
)

from .multiprocess import gloo_rank, run_ranks
from .test_negative_padding import padding_stage

META = Runtime(torch.device("meta"), "nccl")


def test_backend_and_precision_follow_the_config():
    assert backend_for(ComputeConfig()) == "gloo"
    assert backend_for(ComputeConfig(use_gpu=True)) == "nccl"
    assert backend_for(ComputeConfig(use_gpu=True, backend="gloo")) == "gloo"
    bf16 = ModelConfig(name_or_path="m", dtype="bfloat16")
    assert autocast_for(bf16, torch.device("cuda")) is torch.bfloat16
    assert autocast_for(bf16, torch.device("cpu")) is None  # no CPU autocast
    assert autocast_for(ModelConfig(name_or_path="m"), torch.device("cuda")) is None


def test_a_cpu_process_gets_the_cpu_and_the_override_wins(monkeypatch):
    model, compute = ModelConfig(name_or_path="m"), ComputeConfig(use_gpu=True)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    if not torch.cuda.is_available():
        assert task_runtime(model, compute).device == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, "meta")
    assert task_runtime(model, compute).device == torch.device("meta")
    assert train_worker_runtime(model, compute).device == torch.device("meta")


def test_a_task_ray_gave_a_gpu_never_falls_back_to_cpu(monkeypatch):
    """Ray assigned a GPU, CUDA unusable (a driver older than torch's CUDA build needs): the
    step is refused at once naming both, instead of running a 7B model on CPU for days."""
    model, compute = ModelConfig(name_or_path="m"), ComputeConfig(use_gpu=True)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(runtime, "_in_ray", lambda: True)
    monkeypatch.setattr(runtime, "_ray_assigned_gpus", lambda: ["0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(runtime, "driver_version", lambda: "535.104.05")
    with pytest.raises(CudaUnusable) as refused:
        task_runtime(model, compute)
    message = str(refused.value)
    assert message.startswith("this Ray task or actor: Ray assigned GPU(s) ['0'] but CUDA is")
    assert "built for CUDA 13.0, which needs NVIDIA driver 580.65.06 or newer" in message
    assert "this node's driver: 535.104.05" in message
    # A training worker given a GPU is refused the same way.
    with pytest.raises(CudaUnusable, match="a training worker: Ray assigned GPU"):
        train_worker_runtime(model, compute)
    # No driver at all is named as such; a task Ray gave no GPU runs on the CPU.
    monkeypatch.setattr(runtime, "driver_version", lambda: None)
    with pytest.raises(CudaUnusable, match=r"driver: none found"):
        task_runtime(model, compute)
    monkeypatch.setattr(runtime, "_ray_assigned_gpus", lambda: [])
    assert task_runtime(model, compute).device == torch.device("cpu")


def test_the_driver_version_is_read_from_the_kernel_module(monkeypatch, tmp_path):
    line = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 2025\n"
    proc = tmp_path / "version"
    proc.write_text(line)
    real = Path

    monkeypatch.setattr(
        runtime, "Path", lambda p: real(proc) if p == "/proc/driver/nvidia/version" else real(p)
    )
    assert runtime.driver_version() == "580.65.06"
    proc.unlink()
    assert runtime.driver_version() is None


def test_a_tensor_elsewhere_is_refused_by_name():
    with pytest.raises(DeviceError, match=r"average_gradients: tensor on cpu, but this step"):
        META.check(torch.zeros(2), "average_gradients")
    module = torch.nn.Linear(2, 2)
    with pytest.raises(DeviceError, match=r"loss\.weight"):
        META.check_module(module, "loss")
    assert check_collective(torch.zeros(1), "x") is not None  # no active runtime: no check
    with activated(META), pytest.raises(DeviceError, match="gather"):
        check_collective(torch.zeros(1), "gather")


# --------------------------------------------------------------------------- one step, 2 ranks


def _rank(rank: int, port: int, out_dir: str) -> None:
    gloo_rank(_one_step, rank, port, out_dir, 2)


def _one_step(rank: int) -> dict[str, Any]:
    """Rank's training step with every collective recorded (name, device of its tensors)."""
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_nn

    from rzenembed.training.loop import RunSpec, Trainer

    spec_file = Path(os.environ["RZENEMBED_TEST_SPEC"])
    trainer = Trainer(RunSpec(**json.loads(spec_file.read_text())))
    seen: list[tuple[str, str]] = []

    def recording(name, fn):
        def call(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, list | tuple) else [tensor]
            seen.extend((name, str(t.device)) for t in tensors)
            return fn(tensor, *args, **kwargs)

        return call

    originals = (dist.all_reduce, dist.all_gather, dist_nn.all_gather)
    dist.all_reduce = recording("all_reduce", dist.all_reduce)
    dist_nn.all_gather = recording("all_gather_with_grad", dist_nn.all_gather)
    try:
        loaded = trainer.load_step(trainer.sampler.plan(0))
        batch = loaded.batch
        with activated(trainer.runtime):
            metrics = trainer.train_step(0, loaded)
    finally:
        dist.all_reduce, dist.all_gather, dist_nn.all_gather = originals
    placed = [str(t.device) for t in [*trainer.module.parameters(), *trainer.module.buffers()]]
    trainer.runtime.check_module(trainer.module, "module")
    return {
        "device": str(trainer.runtime.device),
        "collectives": seen,
        "placed": placed,
        "theta": str(trainer.module.loss.theta.device),
        "loss": metrics["loss"],
        "k": batch.num_negatives,
    }


def test_one_training_step_keeps_everything_on_the_runtime_device(
    tiny_model_dir, tmp_path, monkeypatch
):
    cfg, manifest = padding_stage(tmp_path, tiny_model_dir, [0, 1, 2, 1], steps=1)
    spec = {
        "cfg": cfg.model_dump(mode="json"),
        "stage": "stage2",
        "mixture": "pad",
        "stage_manifest": manifest.uri,
        "base_model": str(tiny_model_dir),
        "output_dir": str(tmp_path / "out"),
        "total_steps": 1,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    monkeypatch.setenv("RZENEMBED_TEST_SPEC", str(tmp_path / "spec.json"))
    (tmp_path / "ranks").mkdir()
    ranks = run_ranks(_rank, 2, tmp_path / "ranks", 180)
    for result in ranks:
        device = result["device"]
        assert device == "cpu" and result["theta"] == device and result["k"] == 2
        assert set(result["placed"]) == {device}
        names = {name for name, _ in result["collectives"]}
        assert {"all_reduce", "all_gather_with_grad"} <= names  # the step's collectives ran
        assert {d for _, d in result["collectives"]} == {device}
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"])  # the all-reduced mean
