"""Lazy package exports: ``from rzenembed.modeling import RzenEmbedder`` keeps working while
``import rzenembed.modeling.backbones`` stops importing torch and transformers.

Why it matters: every Ray worker, job driver and CLI process that only reads a config, plans a
data step or names a backbone family imported torch through a package ``__init__`` (about
3 CPU-seconds a process before any work; seven or more with transformers), and a pipeline
starts hundreds of such processes. Names resolve on first use and stay cached in the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``exports[name]`` (a
    submodule, relative to the package) the first time ``name`` is asked for."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
