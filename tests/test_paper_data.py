"""configs/paper-data.yaml: it validates, and data preparation on a scaled-down copy of it
(one source per format and stage, fixtures in the published layouts under data_root) gives
the stage-1 and stage-2 manifests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rzenembed.config import config_from_dict, load_config
from rzenembed.prep.prepare import prepare_all

from . import format_fixtures

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "paper-data.yaml"
KEEP = [
    "msmarco",
    "laion",
    "megapairs",
    "llava-hound-captions",
    "mmeb-imagenet-1k",
    "mmeb-ok-vqa",
    "mme5-retrieval",
    "colpali-train",
    "video-clips",
    "video-qa",
]
FIXTURES = {
    "text-retrieval": format_fixtures.text_retrieval,
    "webdataset": format_fixtures.webdataset,
    "megapairs": format_fixtures.megapairs,
    "mmeb": format_fixtures.mmeb,
    "visdoc-parquet": format_fixtures.visdoc_parquet,
    "llava-video": format_fixtures.llava_video,
}


def test_the_paper_data_config_validates_with_every_source_of_the_paper():
    cfg = load_config(CONFIG)
    names = {s.name for s in cfg.sources}
    assert len([s for s in cfg.sources if s.format == "mmeb"]) == 23  # 20 MMEB + 3 mmE5
    assert {s.format for s in cfg.sources} == set(FIXTURES)
    assert {s.name for s in cfg.sources if s.stage == "stage1"} >= {"laion", "megapairs"}
    assert cfg.prep.cap_per_dataset == 100_000 and cfg.source("laion").recaption
    for mixture in cfg.stage2.mixtures:
        assert set(mixture.datasets) <= names


def scaled_down(root: Path, tiny_model_dir: Path):
    cfg = load_config(CONFIG)
    data = cfg.model_dump(mode="json")
    data["sources"] = [s for s in data["sources"] if s["name"] in KEEP]
    for mixture in data["stage2"]["mixtures"]:
        mixture["datasets"] = {k: v for k, v in mixture["datasets"].items() if k in KEEP}
    data["data_root"] = str(root / "raw")
    data["storage"] = {"root": str(root / "store")}
    data["model"]["name_or_path"] = str(tiny_model_dir)
    data["prep"].update({"shard_rows": 16, "cap_per_dataset": 50, "max_in_flight": 2})
    data["prep"]["recaption"].update(
        {
            "model": str(tiny_model_dir),
            "actors": 1,
            "gpus_per_actor": 0.0,
            "dtype": "float32",
            "max_new_tokens": 8,
            "max_visual_tokens": 16,
        }
    )
    data["compute"] = {"num_workers": 1}
    return config_from_dict(data)


def write_fixtures(cfg) -> None:
    raw = Path(cfg.data_root)
    for source in cfg.sources:
        folder = raw / source.uri
        FIXTURES[source.format](folder)
        if source.media_root:  # MMEB-train / mmE5: images named from the top folder
            shutil.copytree(
                folder / "images", raw / source.media_root / "images", dirs_exist_ok=True
            )
            shutil.rmtree(folder / "images")


def test_data_prep_on_a_scaled_down_paper_config_gives_both_stages(
    ray_local, tiny_model_dir, tmp_path
):
    cfg = scaled_down(tmp_path, tiny_model_dir)
    write_fixtures(cfg)
    out = prepare_all(cfg, base=str(tmp_path), show_progress=False)
    stage1 = {d.dataset for d in out.stages["stage1"].datasets}
    assert stage1 == {"msmarco", "laion", "megapairs", "llava-hound-captions"}
    assert "recaption" in out.versions["laion"]
    for name in ("balanced", "image-doc-heavy", "video-heavy"):
        manifest = out.stages[f"stage2/{name}"]
        assert {d.dataset for d in manifest.datasets} == {
            cfg.prep.classification_dataset,
            "mmeb-ok-vqa",
            "mme5-retrieval",
            "colpali-train",
            "video-clips",
            "video-qa",
        }
        assert sum(d.probability for d in manifest.datasets) == pytest.approx(1.0)
    clips = out.final["video-clips"].manifest.stats
    assert clips["group_semantics"] == "siblings"
    # The paper's 400k clips: capped in clips of whole videos, before the split decodes any.
    assert cfg.source("video-clips").cap == 400_000
    assert list(out.versions["video-clips"]) == ["ingest", "clean", "cap", "split-clips"]
    # Video QA and captions: frames sampled at preparation, no mp4 left for training.
    for name in ("video-qa", "llava-hound-captions"):
        assert list(out.versions[name])[-1] == "extract-frames", name
        rows = out.final[name].read_table().to_pylist()
        kinds = {m["kind"] for r in rows for s in ("query", "positive") for m in r[s]["media"]}
        assert "video" not in kinds and "frames" in kinds, (name, kinds)
    assert out.versions["video-clips"]["cap"].manifest.stats["capped_by"] == "clips of whole videos"
