from __future__ import annotations

from pathlib import Path

import pytest

from rzenembed.config import (
    ConfigError,
    config_digest,
    config_from_dict,
    load_config,
    parse_override,
)

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"name_or_path": "runs/tiny-model"}}


@pytest.mark.parametrize("name", ["tiny", "qwen2vl-2b", "qwen2vl-7b", "qwen2vl-2b-matryoshka"])
def test_shipped_configs_load_and_start_with_their_command(name):
    path = ROOT / "configs" / f"{name}.yaml"
    cfg = load_config(path)
    first, second = path.read_text().splitlines()[:2]
    assert first.startswith("# ")
    assert second.startswith("#   ") and ("rzenembed" in second or "make demo" in second)
    assert cfg.model.template == "rzenembed-paper"


@pytest.mark.parametrize("name", ["qwen2vl-2b", "qwen2vl-7b"])
def test_paper_configs_carry_the_paper_hyperparameters(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (cfg.lora.r, cfg.lora.vision, cfg.lora.llm) == (64, True, True)
    for stage in (cfg.stage1, cfg.stage2):
        assert stage.optim.lr == 2e-4
        assert stage.optim.schedule == "cosine"
        assert stage.optim.weight_decay == 0.05
        assert stage.global_batch_size == 768
        assert stage.epochs == 1
    assert cfg.loss.hardness_alpha == 9
    assert cfg.loss.false_negative_delta == 0.95
    assert cfg.model.max_visual_tokens == 1280
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.gradient_checkpointing is True
    assert cfg.prep.cap_per_dataset == 100_000
    assert len(cfg.stage2.mixtures) >= 2


def test_the_matryoshka_config_is_the_paper_config_with_nested_dimensions():
    nested = load_config(ROOT / "configs/qwen2vl-2b-matryoshka.yaml")
    paper = load_config(ROOT / "configs/qwen2vl-2b.yaml")
    assert paper.loss.matryoshka is None
    assert nested.loss.matryoshka.dims == [64, 128, 256, 512, 1024, 1536]  # 1536: Qwen2-VL-2B
    same = nested.model_copy(update={"name": paper.name, "loss": paper.loss})
    assert config_digest(same) == config_digest(paper)  # nothing else differs


def test_extends_lays_a_file_over_its_parent_and_refuses_a_loop(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "model: {name_or_path: runs/tiny-model, video_frames: 4}\n"
        "eval: {sets: [a, b], batch_size: 8}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nmodel: {video_frames: 8}\neval: {sets: [c]}\n"
    )
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.model.name_or_path == "runs/tiny-model" and cfg.model.video_frames == 8
    assert cfg.eval.sets == ["c"] and cfg.eval.batch_size == 8  # lists replaced, maps merged
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="'extends' comes back to itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml' does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_dotted_overrides_apply_in_order_and_parse_yaml_values():
    cfg = config_from_dict(
        MINIMAL,
        [
            "loss.hardness_alpha=5",
            "loss.false_negative_delta=null",
            "loss.temperature.learnable=false",
            "stage1.optim.lr=1e-3",
            "loss.hardness_alpha=7",
        ],
    )
    assert cfg.loss.hardness_alpha == 7
    assert cfg.loss.false_negative_delta is None
    assert cfg.loss.temperature.learnable is False
    assert cfg.stage1.optim.lr == 1e-3


def test_override_into_a_list_item_by_index():
    data = {
        **MINIMAL,
        "sources": [{"name": "a", "uri": "/d/a", "task_group": "image_qa"}],
    }
    cfg = config_from_dict(data, ["sources.0.cap=10"])
    assert cfg.sources[0].cap == 10
    with pytest.raises(ConfigError, match=r"sources\.3: got index '3'; expected 0\.\.0"):
        config_from_dict(data, ["sources.3.cap=10"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("loss.hardnes_alpha=5", r"loss\.hardnes_alpha: unknown key"),
        ("stage1.optim.lr=-0.1", r"stage1\.optim\.lr: got -0\.1; Input should be greater than 0"),
        ("model.template=rzen-typo", r"model\.template: got 'rzen-typo'; expected one of plain, "),
        ("model.dtype=float8", r"model\.dtype: got 'float8'"),
        ("loss.temperature.init=5", r"loss\.temperature: .*min <= init <= max"),
        ("compute.num_workers=zero", r"compute\.num_workers: got 'zero'"),
    ],
)
def test_bad_values_name_the_field_the_value_and_the_expectation(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(MINIMAL, [override])


def test_missing_required_model_section_is_reported():
    with pytest.raises(ConfigError, match=r"model: got .*Field required"):
        config_from_dict({})


def test_mixture_naming_an_unknown_dataset_fails():
    data = {
        **MINIMAL,
        "sources": [{"name": "a", "uri": "/d/a", "task_group": "image_qa"}],
        "stage2": {"mixtures": [{"name": "m", "datasets": {"a": 1, "b": 2}}]},
    }
    with pytest.raises(ConfigError, match=r"names unknown datasets \['b'\]"):
        config_from_dict(data)


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_digest_is_stable_and_sensitive():
    a = config_from_dict(MINIMAL)
    b = config_from_dict(MINIMAL)
    c = config_from_dict(MINIMAL, ["loss.hardness_alpha=1"])
    assert config_digest(a) == config_digest(b)
    assert config_digest(a) != config_digest(c)
    assert config_digest(a.model) == config_digest(c.model)
    assert len(config_digest(a)) == 64


def test_resolve_paths_makes_local_paths_absolute(tmp_path):
    from rzenembed.config import config_from_dict, resolve_paths

    (tmp_path / "models" / "tiny").mkdir(parents=True)
    cfg = config_from_dict({
        "storage": {"root": "runs/data"},
        "sources": [
            {"name": "a", "uri": "corpus/a", "task_group": "image_retrieval"},
            {"name": "b", "uri": "s3://bucket/b", "task_group": "image_retrieval"},
        ],
        "model": {"name_or_path": "models/tiny"},
        "eval": {"sets": ["corpus/eval", "/abs/eval"]},
        "tracking": {"tracking_uri": "sqlite:///runs/mlflow.db"},
    })  # fmt: skip
    out = resolve_paths(cfg, tmp_path)
    assert out.storage.root == str(tmp_path / "runs/data")
    assert [s.uri for s in out.sources] == [str(tmp_path / "corpus/a"), "s3://bucket/b"]
    assert out.model.name_or_path == str(tmp_path / "models/tiny")
    assert out.eval.sets == [str(tmp_path / "corpus/eval"), "/abs/eval"]
    assert out.tracking.tracking_uri == f"sqlite:///{tmp_path}/runs/mlflow.db"
    hub = resolve_paths(cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"name_or_path": "Qwen/Qwen2-VL-2B-Instruct"})}), tmp_path)  # fmt: skip
    assert hub.model.name_or_path == "Qwen/Qwen2-VL-2B-Instruct"  # not a local folder here


@pytest.mark.parametrize(("gpus", "per_rank"), [(16, 48), (8, 96)])
def test_the_cluster_shape_is_one_number_and_keeps_the_global_batch(gpus, per_rank):
    cfg = load_config(ROOT / "configs/qwen2vl-2b.yaml", [f"compute.gpus={gpus}"])
    compute = cfg.compute
    assert (compute.num_workers, compute.eval_actors) == (gpus, gpus)
    assert compute.use_gpu and compute.gpus_per_worker == 1 and compute.step_gpus == 1
    assert cfg.stage1.global_batch_size == 768 == per_rank * compute.num_workers
    again = config_from_dict(cfg.model_dump(mode="json"))  # what tasks receive
    assert again.compute == compute


def test_a_key_that_contradicts_compute_gpus_is_refused_naming_both():
    with pytest.raises(ConfigError, match=r"gpus 16 sets num_workers .* num_workers 4 contradicts"):
        load_config(ROOT / "configs/qwen2vl-2b.yaml", ["compute.num_workers=4"])
