"""Inline JPEG frames or video URI + time range: what each costs per training clip.

Run from the repository root (about 30 s on 2 CPU cores):

    python benchmarks/frames_storage_bench.py [--repeats N] [--clips-per-video K]

The question: should the Parquet shards hold each clip's frames as JPEG bytes, decoded once
at prep time (option "inline"), or only the video URI and a time range, decoded by the
training workers (option "video")? For a few synthetic H.264 MP4s written with PyAV, each
cut into ``K`` equal clips of 8 frames sampled at segment centres, the script measures:

* time to get one clip's 8 RGB frames at training time: decode 8 JPEGs with PIL (inline)
  against opening the video from bytes with decord and one ``get_batch`` of 8 frames
  (video), the median of ``N`` passes over all clips, storage reads excluded for both;
* bytes per clip: the 8 JPEGs at quality 90 against the clip's share of the video file
  (file size / K, if the shard's clips tile the video) and against the whole file (what a
  worker fetches from the store when it reads the video for each clip);
* the one-off prep cost of the inline option (decode + JPEG-encode 8 frames).

Content matters to H.264 far more than to JPEG: "flat" is a cartoon-like scene (flat
colours, a moving bar) that inter-frame coding compresses almost to nothing, "textured" a
panning noise texture with sensor-like noise on every frame, closer to camera footage.
"""

from __future__ import annotations

import argparse
import io
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import decord
import numpy as np
from PIL import Image

from rzenembed.data.media import decode_frames, encode_frames, frame_timestamps

FRAMES_PER_CLIP = 8


@dataclass(frozen=True)
class VideoSpec:
    """One synthetic test video."""

    content: str
    width: int
    height: int
    seconds: int
    fps: int
    keyframe_s: float = 2.0  # 0: libx264's default, one keyframe every 250 frames

    @property
    def label(self) -> str:
        gop = f"k{self.keyframe_s:g}s" if self.keyframe_s else "k250"
        return f"{self.content} {self.width}x{self.height} {self.seconds}s@{self.fps} {gop}"


SPECS = [
    VideoSpec("flat", 128, 96, 20, 10),
    VideoSpec("textured", 128, 96, 20, 10),
    VideoSpec("textured", 320, 240, 20, 10),
    VideoSpec("textured", 320, 240, 20, 30),
    VideoSpec("textured", 320, 240, 20, 30, keyframe_s=0),
]


def flat_frame(spec: VideoSpec, index: int) -> np.ndarray:
    """Flat background whose hue drifts, with a white bar sweeping across."""
    pixels = np.empty((spec.height, spec.width, 3), dtype=np.uint8)
    pixels[:] = ((index * 3) % 256, 90, 255 - (index * 3) % 256)
    left = (index * 4) % spec.width
    pixels[:, left : left + spec.width // 10] = 255
    return pixels


def texture(spec: VideoSpec, rng: np.random.Generator) -> np.ndarray:
    """A smooth random texture twice the frame width, to pan over."""
    coarse = rng.integers(0, 256, (spec.height // 8 + 1, spec.width // 4 + 1, 3), np.uint8)
    image = Image.fromarray(coarse).resize((spec.width * 2, spec.height), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.int16)


def textured_frame(
    spec: VideoSpec, index: int, base: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """The texture panned by one pixel per frame, plus per-frame noise like a camera's."""
    left = index % spec.width
    window = base[:, left : left + spec.width]
    noise = rng.normal(0.0, 4.0, window.shape)
    return np.clip(window + noise, 0, 255).astype(np.uint8)


def make_video(spec: VideoSpec) -> bytes:
    """An H.264 MP4 (libx264 defaults but the keyframe interval, yuv420p), in memory."""
    rng = np.random.default_rng(0)
    base = texture(spec, rng)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=spec.fps)
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        if spec.keyframe_s:
            stream.codec_context.gop_size = round(spec.keyframe_s * spec.fps)
        for index in range(spec.seconds * spec.fps):
            if spec.content == "flat":
                pixels = flat_frame(spec, index)
            else:
                pixels = textured_frame(spec, index, base, rng)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def clip_times(spec: VideoSpec, clips: int) -> list[list[float]]:
    """Frame times of each clip: ``clips`` equal ranges, 8 segment centres in each."""
    length = spec.seconds / clips
    return [frame_timestamps(k * length, (k + 1) * length, FRAMES_PER_CLIP) for k in range(clips)]


def frames_from_jpegs(jpegs: list[bytes]) -> list[np.ndarray]:
    """Training-time path of the inline option."""
    return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in jpegs]


def frames_from_video(data: bytes, indices: list[int]) -> np.ndarray:
    """Training-time path of the video option: open from bytes, one batch, rewind."""
    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    frames = reader.get_batch(indices).asnumpy()
    reader.seek(0)
    return frames


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``work`` after one warm-up run."""
    work()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class Result:
    spec: VideoSpec
    file_bytes: int
    jpeg_bytes_per_clip: float
    share_bytes_per_clip: float
    prep_ms_per_clip: float
    inline_ms_per_clip: float
    video_ms_per_clip: float


def measure(spec: VideoSpec, clips: int, repeats: int) -> Result:
    """Both options' costs for every clip of one video, averaged per clip."""
    data = make_video(spec)
    times = clip_times(spec, clips)
    indices = [[math.floor(t * spec.fps + 0.5) for t in clip] for clip in times]

    def prep() -> list[list[bytes]]:
        return [encode_frames(decode_frames(data, clip), quality=90) for clip in times]

    jpegs = prep()
    prep_s = median_seconds(prep, max(1, repeats // 2))
    inline_s = median_seconds(lambda: [frames_from_jpegs(c) for c in jpegs], repeats)
    video_s = median_seconds(lambda: [frames_from_video(data, i) for i in indices], repeats)
    jpeg_total = sum(len(b) for clip in jpegs for b in clip)
    return Result(
        spec=spec,
        file_bytes=len(data),
        jpeg_bytes_per_clip=jpeg_total / clips,
        share_bytes_per_clip=len(data) / clips,
        prep_ms_per_clip=1000 * prep_s / clips,
        inline_ms_per_clip=1000 * inline_s / clips,
        video_ms_per_clip=1000 * video_s / clips,
    )


def print_results(results: list[Result], clips: int) -> None:
    print(f"per clip of {FRAMES_PER_CLIP} frames, {clips} clips per video, times in ms")
    header = (
        f"{'video':<34}{'file KB':>9}{'jpeg KB':>9}{'share KB':>9}{'jpeg/shr':>9}"
        f"{'jpeg/file':>10}{'prep':>7}{'inline':>8}{'video':>8}{'vid/inl':>8}"
    )
    print(header)
    for r in results:
        print(
            f"{r.spec.label:<34}{r.file_bytes / 1024:>9.1f}{r.jpeg_bytes_per_clip / 1024:>9.1f}"
            f"{r.share_bytes_per_clip / 1024:>9.1f}"
            f"{r.jpeg_bytes_per_clip / r.share_bytes_per_clip:>9.2f}"
            f"{r.jpeg_bytes_per_clip / r.file_bytes:>10.2f}"
            f"{r.prep_ms_per_clip:>7.2f}{r.inline_ms_per_clip:>8.2f}"
            f"{r.video_ms_per_clip:>8.2f}{r.video_ms_per_clip / r.inline_ms_per_clip:>8.1f}"
        )
    print(
        "jpeg/shr: inline bytes over the clip's share of the file; jpeg/file: over the whole "
        "file\nread per clip; vid/inl: training-time decode, video option over inline option"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (median)")
    parser.add_argument("--clips-per-video", type=int, default=4, help="clips cut per video")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, decord {decord.__version__}, ", end="")
    print(f"PyAV {av.__version__}, Pillow {Image.__version__}")
    results = [measure(spec, args.clips_per_video, args.repeats) for spec in SPECS]
    print_results(results, args.clips_per_video)


if __name__ == "__main__":
    main()
