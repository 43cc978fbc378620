"""What a process that does no model work imports: a data step's Ray task or Ray Job
driver, the job driver's entry point, the CLI and the endpoint's HTTP front (its replicas
import ``rzenembed.serving.app``) must not import torch, transformers or peft (about 3
CPU-seconds a process for torch, 7-9 with the rest, before any work; a pipeline starts
hundreds of such processes). The packages' names still resolve on use."""

from __future__ import annotations

import subprocess
import sys

import pytest

LIGHT_MODULES = [
    "rzenembed.cli",
    "rzenembed.compute.job_main",
    "rzenembed.compute.steps",
    "rzenembed.prep.prepare",
    "rzenembed.prep.decontaminate",
    "rzenembed.prep.mixture",
    "rzenembed.evaluation.evalset",
    "rzenembed.modeling.backbones",
    "rzenembed.modeling.card",
    "rzenembed.serving.app",
]
HEAVY = ("torch", "transformers", "peft")


def test_light_modules_import_no_model_library():
    probe = (
        f"import sys\nfor m in {LIGHT_MODULES!r}: __import__(m)\n"
        f"print(' '.join(k for k in {HEAVY!r} if k in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", f"imported by a light module: {done.stdout.strip()}"


def test_package_names_resolve_on_first_use():
    import rzenembed.evaluation as evaluation
    import rzenembed.modeling as modeling
    from rzenembed.evaluation.runner import evaluate
    from rzenembed.modeling.embedder import RzenEmbedder

    assert modeling.RzenEmbedder is RzenEmbedder
    assert evaluation.evaluate is evaluate
    assert {"RzenEmbedder", "ModelCard", "EmbedInput"} <= set(dir(modeling))
    with pytest.raises(AttributeError, match="no attribute 'Embedder'"):
        _ = modeling.Embedder
