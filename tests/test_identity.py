"""Canonical identities: equal content gives equal digests, whatever wrote it and wherever."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from rzenembed.identity import (
    canonical,
    dumps_canonical,
    json_digest,
    json_file_digest,
    rewrite_canonical_json,
)
from rzenembed.modeling.digest import (
    WeightsFileError,
    folder_digest,
    weights_digest,
    weights_only_digest,
)
from rzenembed.prep.mixture import StageDataset, StageManifest

ADAPTER_CONFIG = {
    "base_model_name_or_path": "/somewhere/stage1/merged",
    "lora_alpha": 16.0,
    "peft_version": "0.21.2",
    "r": 8,
    "target_modules": ["k_proj", "o_proj", "fc1", "q_proj", "qkv"],
}


def test_set_valued_fields_and_key_order_do_not_matter():
    shuffled = {**ADAPTER_CONFIG, "target_modules": ["qkv", "q_proj", "fc1", "o_proj", "k_proj"]}
    reordered = dict(reversed(list(ADAPTER_CONFIG.items())))
    assert json_digest(ADAPTER_CONFIG) == json_digest(shuffled) == json_digest(reordered)
    # Order of an ordinary list is content.
    assert json_digest({"layers": [1, 2]}) != json_digest({"layers": [2, 1]})


def test_locations_writer_versions_and_times_are_not_identity():
    moved = {**ADAPTER_CONFIG, "base_model_name_or_path": "/elsewhere", "peft_version": "9.9"}
    assert json_digest(moved) == json_digest(ADAPTER_CONFIG)
    assert canonical({"model": {"path": "/a", "digest": "d"}, "created": "now"}) == {
        "model": {"digest": "d"}
    }
    assert json_digest({**ADAPTER_CONFIG, "r": 16}) != json_digest(ADAPTER_CONFIG)
    assert json_digest({**ADAPTER_CONFIG, "target_modules": ["q_proj"]}) != json_digest(
        ADAPTER_CONFIG
    )


def test_files_are_written_canonically(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**ADAPTER_CONFIG, "target_modules": ["v", "a", "m"]}))
    rewrite_canonical_json(path)
    data = json.loads(path.read_text())
    assert data["target_modules"] == ["a", "m", "v"]
    assert data["base_model_name_or_path"] == "/somewhere/stage1/merged"  # kept in the file
    assert list(data) == sorted(data)
    shuffled = {**ADAPTER_CONFIG, "target_modules": ["m", "v", "a"]}
    assert path.read_text() == dumps_canonical(shuffled)


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "b.weight": torch.randn(2, generator=g),
        "c.bias": torch.arange(5, dtype=torch.int64),
    }


def test_weights_enter_by_tensor_content_not_by_file_layout(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "one.safetensors", metadata={"format": "pt"})
    save_file(tensors, tmp_path / "other-meta.safetensors", metadata={"written_by": "x"})
    save_file({"a.weight": tensors["a.weight"]}, tmp_path / "part1.safetensors")
    save_file({k: tensors[k] for k in ("b.weight", "c.bias")}, tmp_path / "part2.safetensors")
    one = weights_only_digest([tmp_path / "one.safetensors"])
    assert one == weights_only_digest([tmp_path / "other-meta.safetensors"])
    assert one == weights_only_digest(
        [tmp_path / "part1.safetensors", tmp_path / "part2.safetensors"]
    )
    changed = dict(tensors)
    changed["b.weight"] = tensors["b.weight"].clone()
    changed["b.weight"][1] += 1e-6
    save_file(changed, tmp_path / "changed.safetensors")
    assert weights_only_digest([tmp_path / "changed.safetensors"]) != one
    as_half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(as_half, tmp_path / "half.safetensors")
    assert weights_only_digest([tmp_path / "half.safetensors"]) != one
    with pytest.raises(WeightsFileError, match="more than one file"):
        weights_only_digest([tmp_path / "one.safetensors", tmp_path / "part1.safetensors"])


def test_a_broken_weights_file_is_an_error_not_a_digest(tmp_path):
    save_file(_tensors(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(WeightsFileError, match="outside the file"):
        weights_only_digest([tmp_path / "cut.safetensors"])
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(WeightsFileError, match="header length"):
        weights_only_digest([tmp_path / "junk.safetensors"])


def _adapter_folder(path, target_modules, base="/roots/a/merged", base_digest="b" * 64):
    path.mkdir(parents=True)
    save_file(_tensors(), path / "adapter_model.safetensors")
    config = {**ADAPTER_CONFIG, "target_modules": target_modules, "base_model_name_or_path": base}
    (path / "adapter_config.json").write_text(json.dumps(config))
    card = {
        "kind": "adapter",
        "template": "plain",
        "embedding_dim": 8,
        "base_model": base,
        "base_digest": base_digest,
        "config_digest": "c",
        "settings": {},
        "extra": {"stage_manifest": f"{base}/stage.json", "manifest_digest": "m"},
        "format_version": 1,
    }
    (path / "rzenembed.json").write_text(json.dumps(card))
    (path / "README.md").write_text(f"trained on {base}")
    return path


def test_an_adapter_digest_ignores_module_order_and_locations(tmp_path):
    first = _adapter_folder(tmp_path / "a", ["k_proj", "q_proj", "fc1"])
    second = _adapter_folder(tmp_path / "b", ["fc1", "k_proj", "q_proj"], base="/roots/b/merged")
    assert folder_digest(first) == folder_digest(second)
    other_base = _adapter_folder(tmp_path / "c", ["fc1", "k_proj", "q_proj"], base_digest="e" * 64)
    assert folder_digest(other_base) != folder_digest(first)
    fewer = _adapter_folder(tmp_path / "d", ["k_proj", "q_proj"])
    assert folder_digest(fewer) != folder_digest(first)
    # The card is left out of a weights digest, not out of a folder digest.
    assert weights_digest(other_base) == weights_digest(first)


def test_a_model_folder_without_weights_has_no_digest(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors"):
        folder_digest(tmp_path)


def test_a_stage_manifest_digest_is_its_content_not_its_location():
    def manifest(root: str, probability: float = 0.5) -> StageManifest:
        datasets = [
            StageDataset(n, f"{root}/{n}/v1", f"{n}-digest", 10, "text_retrieval", probability)
            for n in ("x", "y")
        ]
        return StageManifest("stage1", "all", datasets, uri=f"{root}/_stages/m.json")

    here, there = manifest("/data/a"), manifest("s3://bucket/b")
    assert here.content_digest() == there.content_digest()
    assert manifest("/data/a", 0.4).content_digest() != here.content_digest()


def test_a_report_digest_is_its_scores_not_its_paths_or_time(tmp_path):
    report = {
        "model": {"path": "/a/soup", "digest": "d"},
        "created": "2026-12-01T10:00:00",
        "all": {"score": 0.5, "datasets": 2},
    }
    later = {**report, "model": {"path": "/b/soup", "digest": "d"}, "created": "2027-01-01"}
    (tmp_path / "a.json").write_text(json.dumps(report))
    (tmp_path / "b.json").write_text(json.dumps(later, indent=4))
    assert json_file_digest(tmp_path / "a.json") == json_file_digest(tmp_path / "b.json")
    worse = {**report, "all": {"score": 0.4, "datasets": 2}}
    assert json_digest(worse) != json_digest(report)


def test_a_saved_adapter_lists_its_modules_sorted(tiny_model_dir, tiny_model_config, tmp_path):
    from rzenembed.config import LoraConfig
    from rzenembed.modeling import RzenEmbedder

    embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=tiny_model_config)
    torch.manual_seed(0)
    embedder.apply_lora(LoraConfig(r=2, alpha=4))
    out = embedder.save_pretrained(tmp_path / "adapter")
    modules = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert modules == sorted(modules) and len(modules) > 5
    # The folder's digest does not depend on where its base lives.
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    card = json.loads((moved / "rzenembed.json").read_text())
    card["base_model"] = "/some/other/copy/of/the/base"
    (moved / "rzenembed.json").write_text(json.dumps(card))
    assert folder_digest(moved) == folder_digest(out)
