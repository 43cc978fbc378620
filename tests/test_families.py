"""The same recipe on the newer backbone families: stage 1 on Ray Train, the merge, and the
MMEB-V2 evaluation path on the tiny Qwen2.5-VL and Qwen3-VL, trained on the very manifests
the Qwen2-VL training tests use (test_training.py runs the same path on the tiny Qwen2-VL,
and every evaluation test scores it)."""

from __future__ import annotations

import math

import pytest

from rzenembed.evaluation import evaluate
from rzenembed.evaluation.release import import_mmeb_v2
from rzenembed.evaluation.release_fixture import build_release_fixture
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.modeling.backbones import FAMILIES
from rzenembed.modeling.digest import weights_digest
from rzenembed.training.metrics import read_jsonl
from rzenembed.training.stages import merge_stage1, run_stage1

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mmeb_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb")
    return import_mmeb_v2(build_release_fixture(root / "release"), root / "sets").out


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "qwen2-vl"])
def test_stage1_merge_and_evaluation_run_on_the_newer_families(
    prepared_for_training, mmeb_sets, tiny_family_dir, family
):
    cfg, data = prepared_for_training
    model_dir = tiny_family_dir(family)
    model = cfg.model.model_copy(update={"name_or_path": str(model_dir), "family": family})
    compute = cfg.compute.model_copy(update={"num_workers": 1})
    stage1 = cfg.stage1.model_copy(update={"max_steps": 2, "checkpoint_every": 2})
    cfg = cfg.model_copy(update={"model": model, "compute": compute, "stage1": stage1})
    result = run_stage1(cfg, data.stages["stage1"])
    steps = read_jsonl(result.metrics_uri)
    assert [s["step"] for s in steps] == [0, 1]
    assert all(math.isfinite(s["loss"]) for s in steps)
    card = ModelCard.load(result.adapter_uri)
    assert card.kind == "adapter" and card.base_digest == weights_digest(model_dir)
    merged = RzenEmbedder.from_pretrained(merge_stage1(cfg, result.adapter_uri))
    assert merged.family.family == family
    scores = evaluate(merged, mmeb_sets)
    assert len(scores) == 12  # the small release: ten datasets, MVBench and MomentSeeker
    assert all(0.0 <= s.score <= 1.0 and s.frames == 8 for s in scores)
