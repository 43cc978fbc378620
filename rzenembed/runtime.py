"""Where the current process runs: its device, precision and process-group backend.

Every step that touches a model asks this module and nothing else: the training loop (in
a Ray Train worker), and the model steps (merge, soup, evaluation, embedding,
recaptioning) in Ray tasks and actors or a local command. The rules:

- **Device.** In a Ray Train worker, the device Ray Train assigned
  (``ray.train.torch.get_device()``: ``cuda:<local rank>`` when the worker got a GPU, else
  CPU). In a Ray task or actor, ``cuda`` when Ray assigned it a GPU, else CPU. A process
  Ray gave a GPU never falls back to CPU: when CUDA is unusable (a driver older than
  torch's CUDA build needs) it fails at once, naming both (``require_cuda``). Outside Ray
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
from pathlib import Path
from typing import Any

import torch

from rzenembed.config import ComputeConfig, ModelConfig

DEVICE_ENV = "RZENEMBED_DEVICE"
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceError(RuntimeError):
    """A tensor that is not on the device its step runs on."""


class CudaUnusable(RuntimeError):
    """Ray gave this process a GPU, but CUDA cannot be used: the step would run on CPU."""


# The oldest NVIDIA driver (Linux) that runs the CUDA major version torch was built for.
MIN_DRIVER = {"13": "580.65.06", "12": "525.60.13"}


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


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version on this machine, or None without one."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return None


def require_cuda(assigned: list[Any], what: str) -> None:
    """Refuse to run ``what`` on CPU when Ray assigned it GPUs (``assigned``) and CUDA is
    unusable here: a 7B merge or 16 evaluation actors would otherwise run on CPU for days.
    The message names the driver found and the one torch's CUDA build needs."""
    if not assigned or torch.cuda.is_available():
        return
    build = torch.version.cuda
    needed = MIN_DRIVER.get((build or "").split(".")[0])
    found = driver_version()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise CudaUnusable(
        f"{what}: Ray assigned GPU(s) {assigned} but CUDA is unusable here "
        f"(torch.cuda.is_available() is False). torch {torch.__version__} is built for CUDA "
        f"{build or 'none (a CPU build)'}"
        + (f", which needs NVIDIA driver {needed} or newer" if needed else "")
        + f"; this node's driver: {found or 'none found (/proc/driver/nvidia/version)'}; "
        f"CUDA_VISIBLE_DEVICES={visible!r}. Update the node's driver or install a torch "
        "build for it (docs/operations.md, 'GPU nodes'); RZENEMBED_DEVICE=cpu forces CPU."
    )


def train_worker_runtime(model: ModelConfig, compute: ComputeConfig) -> Runtime:
    """The runtime of a Ray Train worker: the device Ray Train assigned to this rank."""
    device = _override()
    if device is None:
        import ray.train.torch

        if compute.use_gpu:
            require_cuda(_ray_assigned_gpus() or ["(use_gpu)"], "a training worker")
        device = ray.train.torch.get_device() if compute.use_gpu else torch.device("cpu")
    return Runtime(torch.device(device), backend_for(compute), autocast_for(model, device))


def task_device(want_gpu: bool) -> torch.device:
    """The device of a Ray task or actor, or of a local command.

    In Ray: CUDA only when Ray assigned this task a GPU (the task's ``num_gpus``), and then
    always (``CudaUnusable`` when CUDA does not work: never a silent CPU run). Outside
    Ray: CUDA when one is visible and ``want_gpu`` allows it. ``RZENEMBED_DEVICE`` wins.
    """
    device = _override()
    if device is not None:
        return device
    if _in_ray():
        assigned = _ray_assigned_gpus()
        require_cuda(assigned, "this Ray task or actor")
        use_cuda = bool(assigned)
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
