"""Behaviour of the media primitives, against references worked out by hand.

Videos are written here with PyAV (H.264 in MP4). Each frame shows its own index as eight
vertical black/white bands (most significant bit on the left), so a decoded frame says which
frame it is, whatever small colour shifts the codec introduces.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageDraw

from rzenembed.data.media import (
    MediaError,
    VideoBudget,
    VideoInfo,
    content_hash,
    decode_frames,
    decode_image,
    encode_frames,
    encode_jpeg,
    frame_timestamps,
    hamming,
    laplacian_variance,
    perceptual_hash,
    probe_video,
    smart_resize,
)

WIDTH, HEIGHT, FPS, NUM_FRAMES = 128, 96, 10, 50  # a 5.0 s clip
BANDS = 8


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


def index_frame(index: int) -> np.ndarray:
    """A frame whose bands spell ``index`` in binary, white for 1."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    band = WIDTH // BANDS
    for bit in range(BANDS):
        if index >> (BANDS - 1 - bit) & 1:
            pixels[:, bit * band : (bit + 1) * band] = 255
    return pixels


def read_index(image: Image.Image) -> int:
    """The index spelled by a decoded frame's bands."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    band = WIDTH // BANDS
    value = 0
    for bit in range(BANDS):
        centre = grey[:, bit * band + 3 : (bit + 1) * band - 3]
        value = (value << 1) | int(centre.mean() > 128)
    return value


def write_video(target: str | io.BytesIO, options: dict[str, str] | None = None) -> None:
    import av

    with av.open(target, "w", format="mp4", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for index in range(NUM_FRAMES):
            frame = av.VideoFrame.from_ndarray(index_frame(index), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def video_bytes() -> bytes:
    """An MP4 as PyAV writes it to memory: the ``moov`` index after the ``mdat`` data."""
    buffer = io.BytesIO()
    write_video(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def faststart_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The same video with the index first (faststart needs a real file to rewrite)."""
    path = tmp_path_factory.mktemp("video") / "faststart.mp4"
    write_video(str(path), {"movflags": "faststart"})
    return path.read_bytes()


def top_level_boxes(data: bytes) -> dict[bytes, tuple[int, int]]:
    """Type -> (offset, size) of the top-level MP4 boxes of a complete file."""
    boxes, offset = {}, 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        boxes[kind] = (offset, size)
        offset += size
    return boxes


def cut_mdat(data: bytes, keep: int) -> bytes:
    """Keep ``keep`` bytes of an index-first file's ``mdat`` and fix its size to match.

    The boxes then look complete, but the index still lists every sample: the case only
    decord can detect.
    """
    offset, size = top_level_boxes(data)[b"mdat"]
    assert offset + size == len(data), "mdat must be the last box"
    cut = bytearray(data[: offset + keep])
    cut[offset : offset + 4] = struct.pack(">I", keep)
    return bytes(cut)


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def reason_of(excinfo: pytest.ExceptionInfo[MediaError]) -> str:
    return excinfo.value.reason


def scene_gradient_disc() -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, 160), (120, 1))
    image = Image.fromarray(np.stack([ramp, ramp * 0.5, 255 - ramp], -1).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((20, 30, 80, 90), fill=(20, 20, 20))
    return image


def scene_vertical_box() -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, 120)[:, None], (1, 160))
    image = Image.fromarray(np.stack([255 - ramp, ramp, ramp * 0.3], -1).astype(np.uint8))
    ImageDraw.Draw(image).rectangle((90, 60, 150, 110), fill=(250, 250, 250))
    return image


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def test_laplacian_variance_matches_hand_computation():
    # Valid region is the 1x2 centre. At (1,1): 0+0+0+0 - 4*9 = -36. At (1,2): the left
    # neighbour is 9, the rest 0, centre 0 -> 9. Mean -13.5, deviations +-22.5,
    # population variance 22.5**2 = 506.25.
    pixels = np.array([[0, 0, 0, 0], [0, 9, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    assert laplacian_variance(Image.fromarray(pixels)) == pytest.approx(506.25)
    # R = G = B = 9 gives luma exactly 9, so an RGB image scores the same.
    rgb = Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2))
    assert laplacian_variance(rgb) == pytest.approx(506.25)


def test_laplacian_variance_flat_and_tiny_images_are_zero():
    assert laplacian_variance(Image.new("RGB", (50, 40), (120, 30, 200))) == 0.0
    assert laplacian_variance(Image.new("L", (2, 10), 7)) == 0.0


def test_laplacian_variance_drops_when_blurred():
    from PIL import ImageFilter

    sharp = scene_gradient_disc()
    blurred = sharp.filter(ImageFilter.GaussianBlur(3))
    assert laplacian_variance(blurred) < laplacian_variance(sharp) / 4


def test_phash_survives_jpeg_and_separates_scenes():
    scene = scene_gradient_disc()
    reencoded = decode_image(encode_jpeg(scene, quality=90), max_pixels=10**6)
    original_hash = perceptual_hash(scene)
    assert 0 <= original_hash < 2**64
    assert hamming(original_hash, perceptual_hash(reencoded)) <= 6
    assert hamming(original_hash, perceptual_hash(scene_vertical_box())) >= 16


def test_hamming_counts_differing_bits():
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(2**64 - 1, 0) == 64
    with pytest.raises(ValueError):
        hamming(-1, 0)


def test_content_hash_is_length_prefixed():
    assert content_hash(["ab", "c"], []) != content_hash(["a", "bc"], [])
    assert content_hash([], [b"ab", b"c"]) != content_hash([], [b"a", b"bc"])
    assert content_hash(["x"], []) != content_hash([], [b"x"])
    assert content_hash(["a"], [b"b"]) == content_hash(["a"], [b"b"])
    assert len(content_hash([], [])) == 64


def test_encode_jpeg_is_deterministic_and_decodable():
    scene = scene_gradient_disc()
    first, second = encode_jpeg(scene), encode_jpeg(scene.copy())
    assert first == second and first[:2] == b"\xff\xd8"
    assert decode_image(first, max_pixels=10**6).size == scene.size
    assert encode_jpeg(scene, quality=30) != first


def test_decode_image_returns_rgb_and_whitens_transparency():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    image = decode_image(png_bytes(rgba), max_pixels=10**6, min_side=8)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_decode_image_rejects_random_bytes():
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(MediaError) as excinfo:
        decode_image(noise, max_pixels=10**6)
    assert reason_of(excinfo) == "media_undecodable"


def test_decode_image_rejects_truncated_png():
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = png_bytes(noisy)
    with pytest.raises(MediaError) as excinfo:
        decode_image(data[: len(data) // 2], max_pixels=10**6)
    assert reason_of(excinfo) == "media_undecodable"


def test_decode_image_rejects_small_images():
    with pytest.raises(MediaError) as excinfo:
        decode_image(png_bytes(Image.new("RGB", (12, 12), "white")), 10**6, min_side=32)
    assert reason_of(excinfo) == "image_too_small"


def test_decode_image_rejects_large_header_before_decoding(monkeypatch):
    data = png_bytes(Image.new("L", (4000, 4000), 0))  # one colour: a few tens of KB
    assert len(data) < 100_000

    def must_not_decode(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr("PIL.PngImagePlugin.PngImageFile.load", must_not_decode)
    with pytest.raises(MediaError) as excinfo:
        decode_image(data, max_pixels=1_000_000)
    assert reason_of(excinfo) == "image_too_large"


def test_pil_bomb_guard_becomes_image_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 is over, but under 2x
    data = png_bytes(Image.new("RGB", (40, 40), "white"))
    with pytest.raises(MediaError) as excinfo:
        decode_image(data, max_pixels=10**6)
    assert reason_of(excinfo) == "image_too_large"


# --------------------------------------------------------------------------------------------
# video: pure arithmetic
# --------------------------------------------------------------------------------------------


def test_frame_timestamps_are_segment_centres():
    assert frame_timestamps(0.0, 4.0, 4) == pytest.approx([0.5, 1.5, 2.5, 3.5])
    assert frame_timestamps(10.0, 11.0, 1) == pytest.approx([10.5])
    assert frame_timestamps(2.0, 3.0, 5) == pytest.approx([2.1, 2.3, 2.5, 2.7, 2.9])
    with pytest.raises(ValueError):
        frame_timestamps(0.0, 1.0, 0)
    with pytest.raises(ValueError):
        frame_timestamps(1.0, 1.0, 2)


def test_frame_size_and_count_hand_cases():
    # 16 frames share 1280 tokens: each frame gets 1280 * 784 * 2 / 16 = 125440 pixels.
    budget = VideoBudget(frames=16, max_visual_tokens=1280)
    assert budget.frame_pixels() == (4 * 784, 125440)
    # 1280x720: 720/28 -> 26, 1280/28 -> 46: 1196 * 784 px is over the cap, so it scales by
    # beta = sqrt(921600 / 125440) = 2.711: floor(9.49) = 9 rows, floor(16.87) = 16 columns.
    assert budget.frame_size(1280, 720) == (448, 252)
    # 640x360 rounds to 644x364 (also over the cap): the same 16x9 grid.
    assert budget.frame_size(640, 360) == (448, 252)
    # 144 tokens per 2-frame group, 8 groups = 1152 <= 1280: all 16 frames, both sources.
    assert budget.frame_count(1280, 720) == budget.frame_count(640, 360) == 16
    # An odd frame count is rounded up to whole token groups.
    assert VideoBudget(frames=5, max_visual_tokens=1280).frame_count(640, 360) == 6
    # 64 frames in 16 tokens: one token per frame is the floor, 16 groups of 1 fit -> 32.
    tight = VideoBudget(frames=64, max_visual_tokens=16)
    assert tight.frame_size(640, 360) == (28, 28) and tight.frame_count(640, 360) == 32
    with pytest.raises(ValueError):
        VideoBudget(frames=0, max_visual_tokens=16)


@pytest.mark.parametrize(
    "height,width,low,high",
    [
        (720, 1280, 3136, 125440),
        (360, 640, 3136, 125440),
        (31, 1000, 3136, 12544),
        (2000, 50, 784, 50000),
        (10, 10, 3136, 125440),
        (479, 853, 200704, 1003520),
    ],
)
def test_smart_resize_matches_the_processors(height, width, low, high):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
        smart_resize as reference,
    )

    assert smart_resize(height, width, 28, low, high) == reference(height, width, 28, low, high)


# --------------------------------------------------------------------------------------------
# video: decoding
# --------------------------------------------------------------------------------------------


def test_probe_video_reports_size_rate_and_duration(video_bytes):
    info = probe_video(video_bytes)
    assert isinstance(info, VideoInfo)
    assert (info.width, info.height, info.num_frames) == (WIDTH, HEIGHT, NUM_FRAMES)
    assert info.fps == pytest.approx(FPS)
    assert info.duration_s == pytest.approx(NUM_FRAMES / FPS, abs=0.15)


def test_probe_video_reads_index_first_files(faststart_bytes):
    assert probe_video(faststart_bytes).num_frames == NUM_FRAMES


def test_decode_frames_returns_the_frames_shown_at_those_times(video_bytes):
    # Centres of 8 segments of 5 s: 0.3125 + 0.625 i; times 10 fps, rounded:
    # 3.125, 9.375, 15.625, 21.875, 28.125, 34.375, 40.625, 46.875.
    times = frame_timestamps(0.0, 5.0, 8)
    frames = decode_frames(video_bytes, times)
    assert [read_index(frame) for frame in frames] == [3, 9, 16, 22, 28, 34, 41, 47]
    assert all(frame.mode == "RGB" and frame.size == (WIDTH, HEIGHT) for frame in frames)


def test_decode_frames_clamps_and_repeats(video_bytes):
    frames = decode_frames(video_bytes, [-1.0, 0.0, 0.0, 99.0])
    assert [read_index(frame) for frame in frames] == [0, 0, 0, NUM_FRAMES - 1]
    assert decode_frames(video_bytes, []) == []


def test_encode_frames_round_trip(video_bytes):
    frames = decode_frames(video_bytes, [1.2, 3.4])
    encoded = encode_frames(frames)
    decoded = [decode_image(data, max_pixels=10**6) for data in encoded]
    assert [read_index(frame) for frame in decoded] == [12, 34]


def test_video_cut_in_half_is_truncated(video_bytes):
    # The index sits after the data, so the half file has no index at all: decord would only
    # say "moov atom not found"; the declared mdat size gives the truncation away.
    with pytest.raises(MediaError) as excinfo:
        probe_video(video_bytes[: len(video_bytes) // 2])
    assert reason_of(excinfo) == "video_truncated"
    with pytest.raises(MediaError) as excinfo:
        decode_frames(video_bytes[: len(video_bytes) // 2], [0.5])
    assert reason_of(excinfo) == "video_truncated"


def test_index_first_video_cut_in_half_is_truncated(faststart_bytes):
    with pytest.raises(MediaError) as excinfo:
        probe_video(faststart_bytes[: len(faststart_bytes) // 2])
    assert reason_of(excinfo) == "video_truncated"


def test_missing_samples_behind_consistent_boxes_are_truncated(faststart_bytes):
    # Boxes consistent, index lists 50 samples, half the data gone: decord fails to open.
    _, mdat_size = top_level_boxes(faststart_bytes)[b"mdat"]
    with pytest.raises(MediaError) as excinfo:
        probe_video(cut_mdat(faststart_bytes, mdat_size // 2))
    assert reason_of(excinfo) == "video_truncated"


def test_missing_tail_of_last_frame_is_truncated(faststart_bytes):
    import decord

    _, mdat_size = top_level_boxes(faststart_bytes)[b"mdat"]
    cut = cut_mdat(faststart_bytes, mdat_size - 6)
    reader = decord.VideoReader(io.BytesIO(cut))  # decord itself opens it without complaint
    assert len(reader) == NUM_FRAMES
    with pytest.raises(MediaError) as excinfo:
        probe_video(cut)
    assert reason_of(excinfo) == "video_truncated"


def test_non_video_bytes_are_undecodable():
    noise = np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for data in (noise, png_bytes(Image.new("RGB", (16, 16))), b""):
        with pytest.raises(MediaError) as excinfo:
            probe_video(data)
        assert reason_of(excinfo) == "media_undecodable"


def test_media_error_is_a_value_error():
    error = MediaError("video_truncated", "last frame")
    assert isinstance(error, ValueError)
    assert error.reason == "video_truncated" and "last frame" in str(error)


def test_cut_on_a_packet_boundary_with_fixed_boxes_goes_unnoticed(faststart_bytes):
    # The documented blind spot: drop exactly the last packet and fix the mdat size; the
    # demuxer then simply ends one frame early, and decord reports 49 frames.
    import av

    with av.open(io.BytesIO(faststart_bytes)) as container:
        last_packet_size = [p.size for p in container.demux(video=0) if p.size][-1]
    _, mdat_size = top_level_boxes(faststart_bytes)[b"mdat"]
    info = probe_video(cut_mdat(faststart_bytes, mdat_size - last_packet_size))
    assert info.num_frames == NUM_FRAMES - 1
