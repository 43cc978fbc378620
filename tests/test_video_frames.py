"""``video: frames``: a video QA source's videos are sampled into frames once, at
preparation, so training reads stored frames and never decodes an mp4."""

from __future__ import annotations

import pytest

from rzenembed.config import config_from_dict
from rzenembed.data import media as media_ops
from rzenembed.prep.prepare import prepare_source, source_steps
from rzenembed.training.collate import SourceInfo, collate

pytestmark = pytest.mark.slow
FRAMES = 4


@pytest.fixture(scope="module")
def prepared(ray_local, sample_corpus, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("frames")
    cfg = config_from_dict(
        {
            "model": {
                "name_or_path": str(tiny_model_dir),
                "video_frames": FRAMES,
                "max_visual_tokens": 64,
            },
            "storage": {"root": str(root / "versions")},
            "sources": [
                {
                    "name": "sample-video-qa",
                    "uri": str(sample_corpus.root / "sample-video-qa"),
                    "task_group": "video_qa",
                    "stage": "stage2",
                    "video": "frames",
                }
            ],
            "prep": {"shard_rows": 8, "decontaminate": []},
        }
    )
    source = cfg.sources[0]
    return cfg, source, prepare_source(cfg, source, show_progress=False)


def videos(version) -> list[dict]:
    rows = version.read_table().to_pylist()
    return [m for r in rows for part in (r["query"], r["positive"]) for m in part["media"]]


def test_the_step_follows_the_cap_and_keeps_every_row(prepared):
    _, source, steps = prepared
    assert source_steps(source)[-1] == "extract-frames"
    capped, framed = steps["cap"], steps["extract-frames"]
    assert framed.rows + framed.manifest.rejected == capped.rows and framed.manifest.rejected == 0
    ids = lambda v: sorted(v.read_table().column("id").to_pylist())  # noqa: E731
    assert ids(framed) == ids(capped)


def test_every_video_became_its_frames_decoded_once_per_task(prepared):
    _, _, steps = prepared
    before, after = videos(steps["cap"]), videos(steps["extract-frames"])
    assert before and all(m["kind"] == "video" and not m["frames"] for m in before)
    assert len(after) == len(before) and all(m["kind"] == "frames" for m in after)
    for item in after:
        assert len(item["frames"]) == len(item["timestamps"]) == FRAMES
        assert item["start_s"] == 0.0 and item["end_s"] > 0
        assert all(t < item["end_s"] for t in item["timestamps"])
    stats = steps["extract-frames"].manifest.stats
    assert stats["videos_sampled"] == len(before)
    assert stats["videos_decoded"] <= len({m["uri"] for m in before})


def test_training_reads_the_stored_frames_and_decodes_no_video(prepared, monkeypatch):
    _, source, steps = prepared
    version = steps["extract-frames"]
    decoded = []
    monkeypatch.setattr(media_ops, "decode_frames", lambda *a, **k: decoded.append(a) or [])
    info = SourceInfo(
        name=source.name,
        task_group=source.task_group,
        media_root=version.manifest.stats["media_root"],
        group_semantics="none",
        max_negatives=0,
    )
    rows = version.read_table().to_pylist()
    batch = collate(rows, info, hard_negatives=0, max_frames=FRAMES)
    assert decoded == []
    assert all(q.video is not None and len(q.video) == FRAMES for q in batch.queries)
