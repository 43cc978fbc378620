"""Two-stage training on Ray Train with 2 CPU workers, on the sample corpus, tiny model."""

from __future__ import annotations

import pytest
import torch

from rzenembed.config import config_from_dict
from rzenembed.modeling import ModelCard, RzenEmbedder
from rzenembed.training.metrics import read_jsonl
from rzenembed.training.stages import merge_stage1, run_stage2

from .test_prep_pipeline import sample_config

pytestmark = pytest.mark.slow


def training_config(corpus, root, model_dir, **stage):
    base = sample_config(corpus, root).model_dump(mode="json")
    sources = [s["name"] for s in base["sources"] if s["stage"] in ("stage2", "both")]
    base["model"] = {
        "name_or_path": str(model_dir),
        "max_visual_tokens": 16,
        "video_frames": 4,
        "max_text_tokens": 64,
    }
    base["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    common = {
        "global_batch_size": 8,
        "gradcache_chunk": 4,
        "max_steps": 6,
        "checkpoint_every": 3,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        **stage,
    }
    base["stage1"] = dict(common)
    base["stage2"] = {
        **common,
        "mixtures": [
            {"name": "even", "datasets": {n: 1.0 for n in sources}},
            {
                "name": "doc-heavy",
                "datasets": {n: (4.0 if n == "sample-visdoc" else 1.0) for n in sources},
            },
        ],
    }
    base["compute"] = {"num_workers": 2, "cpus_per_worker": 1}
    return config_from_dict(base)


@pytest.fixture(scope="module")
def trained(prepared_for_training, adaptive_stage1):
    """Stage 1 (the session's ``adaptive_stage1``: adaptive sampling, 8 steps; the resume
    tests' reference), its merge, and stage 2 (static sampling, 6 steps) on one mixture
    (``doc-heavy``, the uneven one): a stage-2 run trains one mixture, so a second would
    take the same path again (the pipeline tests train, soup and track both)."""
    cfg, data = prepared_for_training
    _, _, stage1 = adaptive_stage1
    merged = merge_stage1(cfg, stage1.adapter_uri)
    mixture = cfg.stage2.mixtures[-1]
    stage2 = [run_stage2(cfg, data.stages[f"stage2/{mixture.name}"], merged, mixture)]
    return cfg, data, stage1, merged, stage2


def test_each_run_writes_an_adapter_and_its_metrics(trained):
    cfg, _data, stage1, merged, stage2 = trained
    for result in [stage1, *stage2]:
        card = ModelCard.load(result.adapter_uri)
        assert card.kind == "adapter" and card.template == cfg.model.template
        assert card.extra["stage"] == result.stage and card.extra["mixture"] == result.mixture
        assert set(card.extra["temperatures"]) == set(cfg.loss.task_groups)
        steps = read_jsonl(result.metrics_uri)
        assert [s["step"] for s in steps] == list(range(result.steps))
        assert all(s["dataset"] for s in steps)
        # The loader's figures: time on data and its share of the step, the loader's time.
        assert all(0.0 <= s["data_wait_fraction"] < 1.0 for s in steps)
        assert all(s["load_s"] > 0 and s["step_s"] > 0 for s in steps)
        assert all(
            s["data_wait_fraction"]
            == pytest.approx(s["data_wait_s"] / (s["data_wait_s"] + s["step_s"]))
            for s in steps
        )
        # Every rank's wait reaches rank 0's log: its own, the slowest rank, the worst share.
        for s in steps:
            waits = s["data_wait_by_rank"]
            assert len(waits) == 2 and waits[0] == pytest.approx(s["data_wait_s"])
            assert s["data_wait_max_s"] == max(waits) == waits[s["data_wait_slowest_rank"]]
    assert [stage1.steps, *(r.steps for r in stage2)] == [8, 6]
    assert ModelCard.load(merged).kind == "model"
    assert [r.mixture for r in stage2] == ["doc-heavy"]


def test_every_step_draws_one_dataset_from_the_manifest(trained):
    _, data, stage1, _, _stage2 = trained
    allowed = {d.dataset for d in data.stages["stage1"].datasets}
    assert {s["dataset"] for s in read_jsonl(stage1.metrics_uri)} <= allowed


def test_adapters_load_through_the_embedder(trained):
    _cfg, _, _, merged, stage2 = trained
    for result in stage2:
        embedder = RzenEmbedder.from_pretrained(result.adapter_uri)
        assert ModelCard.load(result.adapter_uri).base_model == merged
        vectors = embedder.encode(["a red circle", "a blue square"])
        torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))


def test_a_published_adapter_is_returned_as_found_not_trained_now(trained):
    """Asked again, a trained run returns the same adapter marked ``trained_now=False``
    (nothing ran, so the caller posts its metrics from the file: another tracking store
    that reuses the adapter gets the training curves too)."""
    from rzenembed.training.stages import run_training

    cfg, data, _, merged, stage2 = trained
    mixture = cfg.stage2.mixtures[-1]
    again = run_training(cfg, "stage2", data.stages[f"stage2/{mixture.name}"], merged, mixture.name)
    assert stage2[0].trained_now and not again.trained_now
    assert (again.adapter_uri, again.metrics_uri) == (stage2[0].adapter_uri, stage2[0].metrics_uri)
