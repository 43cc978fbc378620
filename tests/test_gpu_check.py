"""``make gpu-check-dry-run``: every part runs on CPU and passes, a planted hung rank is
killed at its timeout, and the check exits within its deadline leaving no process behind.

The dry run exercises the script end to end (the setup report, Ray Train with two gloo
workers and the all-reduce evidence, GradCache against the plain step with dropout and
gradient checkpointing, evaluation with an embedding actor, two gloo ranks against one, the
2B benchmark cut to two layers with its floor and ceiling checks) so that the real check,
run only when a GPU is at hand, does not fail for a reason a CPU could have shown. Its
planted ``collective-hang`` part (one rank never joins a collective and ignores SIGTERM)
shows that a stuck rank costs its part's timeout, not the check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
REAL_PARTS = ("setup", "train", "gradcache", "evaluate", "collective", "bench")
# Under the suite's 600 s pytest timeout: the check's own deadline must come first.
WAIT_S = 560


def run_watching_descendants(argv: list[str], out: Path) -> tuple[int, float, dict]:
    """Run ``argv`` (stdout and stderr to ``out``), noting every descendant seen while it
    runs; returns its exit status, its wall time and those descendants, each with its
    command line, by (pid, start time)."""
    seen: dict[tuple[int, float], tuple[psutil.Process, str]] = {}
    started = time.monotonic()
    with out.open("w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    me = psutil.Process(proc.pid)
    try:
        while proc.poll() is None:
            if time.monotonic() - started > WAIT_S:
                pytest.fail(f"the dry run ran past {WAIT_S} s:\n{out.read_text()[-4000:]}")
            try:
                children = me.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    key = (child.pid, child.create_time())
                    if key not in seen:
                        seen[key] = (child, " ".join(child.cmdline()))
                except psutil.Error:
                    pass
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            for child in me.children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
    return proc.returncode, time.monotonic() - started, seen


def still_running(procs: dict) -> list[str]:
    left = []
    for proc, command in procs.values():
        try:  # is_running also checks the start time: a reused pid is not ours
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid}: {command[:160]}")
        except psutil.Error:
            pass
    return left


def test_the_gpu_check_dry_run_passes_every_part_and_catches_a_planted_hang(tmp_path):
    out, log = tmp_path / "results.json", tmp_path / "output.txt"
    argv = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--plant-hang"]
    code, wall, descendants = run_watching_descendants([*argv, "--json", str(out)], log)
    stdout = log.read_text()
    lines = stdout.splitlines()
    assert code == 0, stdout[-6000:]
    deadline = float(re.search(r"overall deadline (\d+) s", stdout).group(1))
    assert deadline < WAIT_S and wall < deadline, (wall, deadline)
    for part in REAL_PARTS:
        assert any(line.startswith(f"PASS {part}:") for line in lines), stdout[-6000:]
    hang = [line for line in lines if line.startswith("FAIL collective-hang:")]
    assert len(hang) == 1 and "timed out after" in hang[0], stdout[-6000:]
    # The part after the hang still ran, and the verdict counts the hang as caught.
    assert lines.index(hang[0]) < next(i for i, x in enumerate(lines) if x.startswith("PASS bench"))
    assert lines[-1] == "gpu-check: PASS (planted hang caught)"

    # Nothing the check started outlives it: its part runner, Ray's processes, the ranks
    # (the planted one ignores SIGTERM) and the benchmark were all seen, and all are gone.
    commands = [command for _, command in descendants.values()]
    assert any("--hang" in c for c in commands), "the planted rank was never seen running"
    assert any("--runner" in c for c in commands)
    if "RAY_ADDRESS" not in os.environ:  # the runner's own local Ray, not a cluster's
        assert any("raylet" in c for c in commands)
    assert any("gpu_check_bench.py" in c for c in commands)
    for _ in range(10):  # the kernel reaps orphans a moment after their parent exits
        left = still_running(descendants)
        if not left:
            break
        time.sleep(0.5)
    assert not left, "left behind:\n" + "\n".join(left)

    results = json.loads(out.read_text())
    assert results["collective-hang"]["timed_out"] is True
    assert "ignores SIGTERM" in results["collective-hang"]["error"]
    train = results["train"]
    assert train["device"] == "cpu" and train["backend"] == "gloo" and train["workers"] == 2
    assert train["steps"] == 6 and train["checkpoints"] >= 1
    assert train["all_reduce_steps_compared"] == 5
    assert 0.0 <= results["evaluate"]["all"]["model"] <= 1.0
    assert {a["device"] for a in results["evaluate"]["actors"]} == {"cpu"}
    # What each part asserted is in its result, every check true.
    for part in ("train", "gradcache", "evaluate", "collective", "bench"):
        assert results[part]["asserted"] and all(results[part]["asserted"].values()), part
    gradcache = results["gradcache"]
    assert gradcache["lora_dropout"] > 0 and gradcache["gradient_checkpointing"] is True
    assert gradcache["max_difference"] <= 1e-5
    assert gradcache["without_replay"]["max_difference"] > 1e-4
    assert results["collective"]["backend"] == "gloo"
    bench = results["bench"]
    assert any(k.startswith("MFU 0.0% (dry-run floor 0%)") for k in bench["asserted"])
    assert any(k.startswith("peak RSS") and "ceiling" in k for k in bench["asserted"])
    assert any(line.startswith("tokens/s") for line in bench["figures"])
