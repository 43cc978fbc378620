"""One video budget: preparation stores clips with the frame count and size the processor
uses in training and evaluation, whatever the source resolution."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rzenembed.config import ConfigError, ModelConfig, config_from_dict
from rzenembed.data import media as media_ops
from rzenembed.modeling import EmbedInput, RzenEmbedder
from rzenembed.prep.video import sample_clip

FRAMES, BUDGET = 8, 1280


def mp4(width: int, height: int, frames: int = 12, fps: int = 4) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for index in range(frames):
            pixels = np.full((height, width, 3), 20 * index % 255, dtype=np.uint8)
            pixels[: height // 2, : width // 3] = (200, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def knobs(frames: int = FRAMES, budget: int = BUDGET) -> dict:
    return {
        "video_frames": frames,
        "max_visual_tokens": budget,
        "min_visual_tokens": 4,
        "jpeg_quality": 90,
    }


@pytest.fixture(scope="module")
def clips() -> dict[tuple[int, int], dict]:
    out = {}
    for size in ((1280, 720), (640, 360)):
        data = mp4(*size)
        out[size] = sample_clip(data, media_ops.probe_video(data), "v.mp4", 0.0, 3.0, knobs())
    return out


def frame_sizes(item: dict) -> set[tuple[int, int]]:
    return {Image.open(io.BytesIO(b)).size for b in item["frames"]}


def test_a_720p_and_a_360p_source_get_the_same_frames(clips):
    wide, small = clips[(1280, 720)], clips[(640, 360)]
    assert len(wide["frames"]) == len(small["frames"]) == FRAMES
    # Resized before counting: 8 frames x 250880 px -> both 644x364 (23 x 13 tokens).
    budget = media_ops.VideoBudget(FRAMES, BUDGET)
    assert frame_sizes(wide) == frame_sizes(small) == {budget.frame_size(1280, 720)}
    assert budget.frame_size(1280, 720) == (644, 364)
    assert wide["timestamps"] == small["timestamps"]


def test_the_processor_sees_stored_frames_unchanged_and_within_budget(clips, tiny_model_dir):
    cfg = ModelConfig(
        name_or_path=str(tiny_model_dir), video_frames=FRAMES, max_visual_tokens=BUDGET
    )
    embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=cfg)
    frames = [Image.open(io.BytesIO(b)) for b in clips[(640, 360)]["frames"]]
    grid = embedder.prepare([EmbedInput(video=frames)])["video_grid_thw"]
    width, height = frames[0].size
    assert grid.tolist() == [[FRAMES // 2, height // 14, width // 14]]  # no resize
    assert FRAMES // 2 * (height // 28) * (width // 28) <= BUDGET
    # A raw 1280x720 video given to the processor lands on the same grid.
    raw = [Image.new("RGB", (1280, 720), (9, 9, 9))] * FRAMES
    assert embedder.prepare([EmbedInput(video=raw)])["video_grid_thw"].tolist() == grid.tolist()


def test_one_config_value_sets_the_frames_everywhere(tiny_model_dir):
    from rzenembed.prep.video import _knobs

    cfg = config_from_dict({"model": {"name_or_path": "m", "video_frames": 6}})
    assert _knobs(cfg)["video_frames"] == 6
    with pytest.raises(ConfigError, match=r"model\.video_frames"):
        config_from_dict({"model": {"name_or_path": "m"}, "prep": {"frames_per_clip": 8}})


def test_an_odd_frame_count_keeps_the_padded_frame_within_budget(tiny_model_dir):
    # 7 frames are padded to 8 (the last repeated): the size is shared among 8, so the
    # stored clip (8 frames) and a 7-frame video land on the same grid, within budget.
    odd, even = media_ops.VideoBudget(7, BUDGET), media_ops.VideoBudget(8, BUDGET)
    assert odd.frame_pixels() == even.frame_pixels()
    assert odd.frame_count(1280, 720) == 8
    cfg = ModelConfig(name_or_path=str(tiny_model_dir), video_frames=7, max_visual_tokens=BUDGET)
    embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=cfg)
    raw = [Image.new("RGB", (1280, 720), (9, 9, 9))] * 7
    stored = [Image.new("RGB", odd.frame_size(1280, 720), (9, 9, 9))] * 8
    grids = [embedder.prepare([EmbedInput(video=v)])["video_grid_thw"] for v in (raw, stored)]
    assert grids[0].tolist() == grids[1].tolist()
    t, h, w = grids[0][0].tolist()
    assert t == 4 and t * (h // 2) * (w // 2) <= BUDGET


def test_a_qwen3_vl_model_gets_frames_stored_on_its_own_16_pixel_patches(tiny_family_dir):
    from rzenembed.prep.video import _knobs

    model_dir = tiny_family_dir("qwen3-vl")
    cfg = config_from_dict({"model": {"name_or_path": str(model_dir), "video_frames": FRAMES}})
    assert _knobs(cfg)["patch"] == 16  # read from the folder (model.family: auto)
    data = mp4(640, 360)
    clip = sample_clip(
        data, media_ops.probe_video(data), "v.mp4", 0.0, 3.0, {**knobs(), "patch": 16}
    )
    frames = [Image.open(io.BytesIO(b)) for b in clip["frames"]]
    width, height = frames[0].size
    assert width % 32 == 0 and height % 32 == 0
    model_cfg = ModelConfig(
        name_or_path=str(model_dir), video_frames=FRAMES, max_visual_tokens=BUDGET
    )
    embedder = RzenEmbedder.from_pretrained(model_dir, config=model_cfg)
    grid = embedder.prepare([EmbedInput(video=frames)])["video_grid_thw"]
    assert grid.tolist() == [[FRAMES // 2, height // 16, width // 16]]  # no resize
    assert FRAMES // 2 * (height // 32) * (width // 32) <= BUDGET
    raw = [Image.new("RGB", (640, 360), (9, 9, 9))] * FRAMES
    assert embedder.prepare([EmbedInput(video=raw)])["video_grid_thw"].tolist() == grid.tolist()
