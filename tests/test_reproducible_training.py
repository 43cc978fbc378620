"""The same tiny stage trained in two processes (side by side) with different hash seeds and
storage roots: the same adapter digest and the same souped-model digest. One is the test's
own process (on the session's Ray), the other a process of its own with a fixed hash seed
and its own local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rzenembed.config import config_from_dict
from rzenembed.prep.prepare import prepare_all

from .reproduce_stage import train_and_soup

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
STAGE1_SOURCES = ("sample-text-pairs", "sample-captions")


def stage_config(corpus, model_dir, root: Path) -> dict:
    sources = [
        {
            "name": name,
            "uri": str(corpus.root / name),
            "stage": "stage1",
            "task_group": "text_retrieval" if name == "sample-text-pairs" else "image_retrieval",
        }
        for name in STAGE1_SOURCES
    ]
    return {
        "name": "repro",
        "storage": {"root": str(root)},
        "sources": sources,
        "prep": {"shard_rows": 16},
        "model": {
            "name_or_path": str(model_dir),
            "max_visual_tokens": 16,
            "video_frames": 4,
            "max_text_tokens": 64,
        },
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "loss": {"false_negative_delta": None},
        "stage1": {
            "global_batch_size": 4,
            "gradcache_chunk": None,
            "max_steps": 4,
            "checkpoint_every": 4,
            "hard_negatives": 0,
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        },
        "compute": {"num_workers": 1, "cpus_per_worker": 1},
    }


def test_hash_seed_and_storage_root_do_not_change_any_digest(
    ray_local, sample_corpus, tiny_model_dir, tmp_path
):
    data_cfg = config_from_dict(stage_config(sample_corpus, tiny_model_dir, tmp_path / "data"))
    manifest = prepare_all(data_cfg, show_progress=False).stages["stage1"]
    # The other process runs beside this one's training; its output goes to files, so that
    # it never waits on a full pipe.
    config = tmp_path / "run-b.json"
    config.write_text(json.dumps(stage_config(sample_corpus, tiny_model_dir, tmp_path / "run-b")))
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # not this process's
    env = {**os.environ, "PYTHONHASHSEED": seed, "RAY_ADDRESS": ""}
    out, err = tmp_path / "run-b.out", tmp_path / "run-b.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.reproduce_stage", str(config), manifest.uri],
            cwd=REPO,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        here = config_from_dict(stage_config(sample_corpus, tiny_model_dir, tmp_path / "run-a"))
        outputs = [train_and_soup(here, manifest.uri)]
        process.wait(timeout=300)
        assert process.returncode == 0, err.read_text()[-3000:]
        outputs.append(json.loads(out.read_text().strip().splitlines()[-1]))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    first, second = outputs
    assert first["adapter_dir"] != second["adapter_dir"]  # two storage roots
    assert first["hash_probe"] != second["hash_probe"]  # two hash seeds
    modules = [
        json.loads((Path(o["adapter_dir"]) / "adapter_config.json").read_text())["target_modules"]
        for o in outputs
    ]
    assert modules[0] == modules[1] == sorted(modules[0])
    assert first["adapter"] == second["adapter"]
    assert first["soup"] == second["soup"]
