"""The cap keeps whole videos: it runs before the clip split, counts each video as the
clips the split will cut from it, and keeps videos in seeded rank order while their clips
fit. A video and its clips stay or go together, and no sibling reference is left pointing
at a dropped clip.

A source of 30 real MP4 videos with 3, 4 and 5 captioned segments (120 clips) is capped at
40 clips; the reference is computed here from the rank function alone.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rzenembed.config import config_from_dict
from rzenembed.data.sample_render import mp4_bytes
from rzenembed.data.schema import media, record, side
from rzenembed.prep.cap import rank
from rzenembed.prep.prepare import prepare_source, source_steps

pytestmark = pytest.mark.slow
VIDEOS, FPS, SEGMENT_S, CAP = 30, 4, 1.0, 40


def segment_count(index: int) -> int:
    return 3 + index % 3  # 3, 4, 5: 120 clips over 30 videos


def write_source(folder: Path) -> None:
    """30 videos of distinct colours, one record each with its captioned segments."""
    (folder / "media").mkdir(parents=True)
    rows = []
    for index in range(VIDEOS):
        count = segment_count(index)
        frames = []
        for part in range(count):
            colour = ((index * 37 + part * 91) % 256, (index * 11) % 256, (part * 70) % 256)
            frames += [Image.new("RGB", (64, 48), colour)] * int(SEGMENT_S * FPS)
        (folder / "media" / f"v{index:02d}.mp4").write_bytes(mp4_bytes(frames, FPS))
        segments = [
            {"start_s": p * SEGMENT_S, "end_s": (p + 1) * SEGMENT_S, "text": f"part {p} of {index}"}
            for p in range(count)
        ]
        rows.append(
            record(
                f"video-{index:02d}",
                "clips30",
                "video_retrieval",
                side(f"the whole of video {index}"),
                side(media_items=[media("video", f"media/v{index:02d}.mp4")]),
                segments=segments,
            )
        )
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def capped(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("video-cap")
    write_source(root / "clips30")
    cfg = config_from_dict(
        {
            "model": {"name_or_path": "unused", "max_visual_tokens": 16, "video_frames": 2},
            "storage": {"root": str(root / "versions")},
            "sources": [
                {
                    "name": "clips30",
                    "uri": str(root / "clips30"),
                    "task_group": "video_retrieval",
                    "stage": "stage2",
                    "video": "split-clips",
                    "cap": CAP,
                }
            ],
            "prep": {"shard_rows": 8, "videos_per_shard": 4, "clip_min_s": 0.5},
        }
    )
    return cfg, prepare_source(cfg, cfg.sources[0], show_progress=False)


def reference_videos(seed: int) -> list[str]:
    """The videos ranked first whose clips fit the cap, by hand from ``rank``."""
    ranked = sorted(range(VIDEOS), key=lambda i: rank(seed, f"video-{i:02d}"))
    kept, clips = [], 0
    for index in ranked:
        if clips + segment_count(index) > CAP:
            break
        kept.append(f"video-{index:02d}")
        clips += segment_count(index)
    return kept


def test_the_cap_runs_before_the_split(capped):
    cfg, steps = capped
    assert source_steps(cfg.sources[0]) == ["ingest", "clean", "cap", "split-clips"]
    assert list(steps) == ["ingest", "clean", "cap", "split-clips"]
    assert steps["ingest"].rows == steps["clean"].rows == VIDEOS


def test_whole_videos_are_kept_and_only_they_are_decoded(capped):
    cfg, steps = capped
    expected = reference_videos(cfg.prep.seed)
    assert 1 < len(expected) < VIDEOS
    assert sorted(steps["cap"].read_table(columns=["id"]).column("id").to_pylist()) == sorted(
        expected
    )
    split = steps["split-clips"]
    assert split.manifest.stats["rows_in"] == len(expected)  # the split saw only kept videos
    clips = split.read_table(columns=["id", "group_id"]).to_pylist()
    per_video = Counter(c["group_id"] for c in clips)
    assert per_video == {f"video:{v}": segment_count(int(v[-2:])) for v in expected}
    assert len(clips) == sum(per_video.values()) <= CAP
    assert len(clips) > CAP - 5  # the next video (at most 5 clips) did not fit


def test_no_sibling_reference_dangles(capped):
    _, steps = capped
    rows = steps["split-clips"].read_table(columns=["id", "negatives"]).to_pylist()
    ids = {r["id"] for r in rows}
    refs = [n["ref"] for r in rows for n in r["negatives"] if n.get("ref")]
    assert refs and set(refs) <= ids
    assert steps["cap"].manifest.stats["dangling_references"] == 0
    assert steps["cap"].manifest.stats["capped_by"] == "clips of whole videos"


def test_ingest_stamps_each_video_with_its_length(capped):
    _, steps = capped
    for row in steps["ingest"].read_table(columns=["id", "positive"]).to_pylist():
        (item,) = row["positive"]["media"]
        index = int(row["id"][-2:])
        assert item["start_s"] == 0.0
        assert item["end_s"] == pytest.approx(segment_count(index) * SEGMENT_S, abs=0.3)


def test_capping_split_clips_keeps_whole_groups(capped, tmp_path):
    """Clips already split (siblings sharing a group) are capped by group too: each group
    counts its clips, whole groups in rank order of their group id."""
    from rzenembed.prep.cap import run_cap

    cfg, steps = capped
    split = steps["split-clips"]
    elsewhere = cfg.model_copy(
        update={"storage": cfg.storage.model_copy(update={"root": str(tmp_path)})}
    )
    again = run_cap(elsewhere, split, limit=10, show_progress=False)
    groups = Counter(split.read_table(columns=["group_id"]).column("group_id").to_pylist())
    ranked = sorted(groups, key=lambda g: rank(cfg.prep.seed, g))
    expected, total = [], 0
    for group in ranked:
        if total + groups[group] > 10:
            break
        expected.append(group)
        total += groups[group]
    kept = Counter(again.read_table(columns=["group_id"]).column("group_id").to_pylist())
    assert kept == {g: groups[g] for g in expected}
    assert again.manifest.stats["dropped_by_cap"] == split.rows - total
    assert again.manifest.stats["dangling_references"] == 0
    assert again.manifest.stats["group_semantics"] == "siblings"  # clips stay negatives
    assert np.sum(list(kept.values())) == total
