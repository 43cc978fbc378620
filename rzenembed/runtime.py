"""Where the current process runs: its device, precision and process-group backend.

Every step that touches a model asks this module and nothing else: the training loop (in
a Ray Train worker), and the model steps (merge, soup, evaluation, embedding,
recaptioning) in Ray tasks and actors or a local command. The rules:

- **Device.** In a Ray Train worker, the device Ray Train assigned
  (``ray.train.torch.get_device()``: ``cuda:<local rank>`` when the worker got a GPU, else
  CPU). In a Ray task or actor, ``cuda`` when Ray assigned it a GPU, else CPU. Outside Ray
  (a local command), ``cuda`` when one is visible and wanted. ``RZENEMBED_DEVICE`` overrides
  all of these (debugging, a forced CPU run on a GPU host).
- **Backend.** ``compute.backend``; ``auto`` is NCCL when workers use GPUs, else gloo.
- **Precision.** Weights load in ``model.dtype``. On CUDA with a half-precision
  ``model.dtype`` the forward passes run under autocast in that dtype; on CPU there is no
  autocast (the CPU path is for tests and small runs, in float32).

``Runtime.check(tensor, what)`` guards every collective: NCCL needs every tensor on the
rank's CUDA device, and a CPU tensor handed to it fails deep inside the communicator with
an error that names neither the tensor nor the step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from rzenembed.config import ComputeConfig, ModelConfig

DEVICE_ENV = "RZENEMBED_DEVICE"
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(RuntimeError):
    """A tensor that is not on the device its step runs on."""


@dataclass(frozen=True)
class Runtime:
    """The device, autocast dtype and collective backend of one process's work."""

    device: torch.device
    backend: str = "gloo"
    autocast_dtype: torch.dtype | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        """Mixed precision for forward passes where it pays (CUDA, half ``model.dtype``)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a module (parameters and buffers) to this runtime's device."""
        return module.to(self.device)

    def check(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """``tensor`` itself, or a ``DeviceError`` naming it when it lies elsewhere."""
        if not same_device(tensor.device, self.device):
            raise DeviceError(
                f"{what}: tensor on {tensor.device}, but this step runs on {self.device} "
                f"(backend {self.backend}); move it with .to(runtime.device)"
            )
        return tensor

    def check_module(self, module: torch.nn.Module, what: str) -> None:
        """Every parameter and buffer of ``module`` on this runtime's device."""
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            self.check(tensor, f"{what}.{name}")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, where ``cuda`` and ``cuda:<current>`` are the same."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (
        b.index if b.index is not None else current
    )


def backend_for(compute: ComputeConfig) -> str:
    if compute.backend != "auto":
        return compute.backend
    return "nccl" if compute.use_gpu else "gloo"


def autocast_for(model: ModelConfig, device: torch.device) -> torch.dtype | None:
    return HALF.get(model.dtype) if device.type == "cuda" else None


def _override() -> torch.device | None:
    value = os.environ.get(DEVICE_ENV, "").strip()
    return torch.device(value) if value else None


def _ray_assigned_gpus() -> list[Any]:
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # not in a Ray process, or Ray without GPU support
        return []


def _in_ray() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except ImportError:
        return False


def train_worker_runtime(model: ModelConfig, compute: ComputeConfig) -> Runtime:
    """The runtime of a Ray Train worker: the device Ray Train assigned to this rank."""
    device = _override()
    if device is None:
        import ray.train.torch

        device = ray.train.torch.get_device() if compute.use_gpu else torch.device("cpu")
    return Runtime(torch.device(device), backend_for(compute), autocast_for(model, device))


def task_device(want_gpu: bool) -> torch.device:
    """The device of a Ray task or actor, or of a local command.

    In Ray: CUDA only when Ray assigned this task a GPU (the task's ``num_gpus``). Outside
    Ray: CUDA when one is visible and ``want_gpu`` allows it. ``RZENEMBED_DEVICE`` wins.
    """
    device = _override()
    if device is not None:
        return device
    if _in_ray():
        use_cuda = bool(_ray_assigned_gpus()) and torch.cuda.is_available()
    else:
        use_cuda = want_gpu and torch.cuda.is_available()
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def task_runtime(
    model: ModelConfig, compute: ComputeConfig, want_gpu: bool | None = None
) -> Runtime:
    """The runtime of a Ray task or actor, or of a local command (see ``task_device``);
    ``want_gpu`` defaults to ``compute.use_gpu``."""
    device = task_device(compute.use_gpu if want_gpu is None else want_gpu)
    return Runtime(device, backend_for(compute), autocast_for(model, device))


_active: list[Runtime] = []


@contextlib.contextmanager
def activated(runtime: Runtime) -> Iterator[Runtime]:
    """Make ``runtime`` the one ``active()`` returns while the block runs (e.g. a train
    loop), so that deep helpers such as the loss's collectives can check against it."""
    _active.append(runtime)
    try:
        yield runtime
    finally:
        _active.pop()


def active() -> Runtime | None:
    return _active[-1] if _active else None


def check_collective(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Guard for tensors about to enter a collective: on the active runtime's device."""
    runtime = active()
    return runtime.check(tensor, what) if runtime is not None else tensor
