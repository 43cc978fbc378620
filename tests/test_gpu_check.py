"""``make gpu-check`` in its CPU dry run: every part runs, passes and prints its figures.

The dry run exercises the script end to end (the setup report, Ray Train with one worker,
GradCache against the plain step, evaluation with an embedding actor, two gloo ranks
against one, the 2B benchmark cut to two layers) so that the real check, run only when a
GPU is at hand, does not fail for a reason a CPU could have shown.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_check_dry_run_passes_every_part(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    for part in ("setup", "train", "gradcache", "evaluate", "collective", "bench"):
        assert any(line.startswith(f"PASS {part}:") for line in lines), done.stdout
    assert lines[-1] == "gpu-check: PASS"
    results = json.loads(out.read_text())
    assert results["train"]["device"] == "cpu" and results["train"]["backend"] == "gloo"
    assert results["train"]["steps"] == 6 and results["train"]["checkpoints"] >= 1
    assert 0.0 <= results["evaluate"]["all"]["model"] <= 1.0
    assert {a["device"] for a in results["evaluate"]["actors"]} == {"cpu"}
    # What each part asserted is in its result, every check true.
    for part in ("train", "gradcache", "evaluate", "collective"):
        assert results[part]["asserted"] and all(results[part]["asserted"].values()), part
    assert results["gradcache"]["max_difference"] <= 1e-5
    assert results["collective"]["backend"] == "gloo"
    figures = results["bench"]["figures"]
    assert any(line.startswith("MFU") for line in figures)
    assert any(line.startswith("tokens/s") for line in figures)
