"""The same recipe on every backbone family: stage 1 on Ray Train, the merge, and the
MMEB-V2 evaluation path, each on the tiny model of Qwen2-VL, Qwen2.5-VL and Qwen3-VL."""

from __future__ import annotations

import math

import pytest

from rzenembed.evaluation import evaluate
from rzenembed.evaluation.release import import_mmeb_v2
from rzenembed.evaluation.release_fixture import build_release_fixture
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.modeling.backbones import FAMILIES
from rzenembed.modeling.digest import weights_digest
from rzenembed.prep.prepare import prepare_all
from rzenembed.training.metrics import read_jsonl
from rzenembed.training.stages import merge_stage1, run_stage1

from .test_training import training_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(ray_local, sample_corpus, tiny_model_dir, tmp_path_factory):
    """The sample corpus prepared once; every family trains on the same stage manifest."""
    root = tmp_path_factory.mktemp("families")
    cfg = training_config(
        sample_corpus, str(root / "versions"), tiny_model_dir, max_steps=2, checkpoint_every=2
    )
    data = prepare_all(cfg, base=str(sample_corpus.root), show_progress=False)
    return cfg, data


@pytest.fixture(scope="module")
def mmeb_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb")
    return import_mmeb_v2(build_release_fixture(root / "release"), root / "sets").out


@pytest.mark.parametrize("family", FAMILIES)
def test_stage1_merge_and_evaluation_run_on_every_family(
    prepared, mmeb_sets, tiny_family_dir, family
):
    cfg, data = prepared
    model_dir = tiny_family_dir(family)
    model = cfg.model.model_copy(update={"name_or_path": str(model_dir), "family": family})
    compute = cfg.compute.model_copy(update={"num_workers": 1})
    cfg = cfg.model_copy(update={"model": model, "compute": compute})
    result = run_stage1(cfg, data.stages["stage1"])
    steps = read_jsonl(result.metrics_uri)
    assert [s["step"] for s in steps] == [0, 1]
    assert all(math.isfinite(s["loss"]) for s in steps)
    card = ModelCard.load(result.adapter_uri)
    assert card.kind == "adapter" and card.base_digest == weights_digest(model_dir)
    merged = RzenEmbedder.from_pretrained(merge_stage1(cfg, result.adapter_uri))
    assert merged.family.family == family
    scores = evaluate(merged, mmeb_sets)
    assert len(scores) == 10
    assert all(0.0 <= s.score <= 1.0 and s.frames == 8 for s in scores)
