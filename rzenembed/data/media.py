"""Media primitives for the data-preparation steps: decode, check, hash and re-encode.

Every function takes and returns bytes or PIL images, never paths: the steps read files
through fsspec (a local folder or ``s3://``) and hand the bytes over, so the same code runs
on both. Anything wrong with a file is raised as :class:`MediaError`, whose ``reason`` is one
of the reject reason codes of ``rzenembed.prep.base.REASON_CODES``, so a step can turn it into
a reject row without parsing messages.

Images
    :func:`decode_image` checks the pixel count declared in the header *before* any pixel is
    decoded (a decompression bomb never gets allocated), then decodes fully so a truncated
    file is caught here rather than in a training worker. :func:`laplacian_variance` scores
    sharpness, :func:`perceptual_hash` + :func:`hamming` find near duplicates and
    :func:`content_hash` finds exact ones.

Videos
    Read with decord from memory. :func:`probe_video` also rejects truncated files; the rule
    is documented on :func:`probe_video`. :class:`VideoBudget` says at which size and how
    many frames of a video fit the model's visual-token budget.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from scipy.fft import dctn

UNDECODABLE = "media_undecodable"
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_TOO_SMALL = "image_too_small"
VIDEO_TRUNCATED = "video_truncated"


_OBJECT_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class MediaError(ValueError):
    """A media file the pipeline cannot use; ``reason`` is a reject reason code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        # Library messages may embed object addresses ("<BytesIO at 0x7f...>"); rejects
        # must be reproducible, so they are cut out.
        detail = _OBJECT_ADDRESS.sub("", detail)
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int, min_side: int = 1) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image, or raise :class:`MediaError`.

    The pixel count declared in the header is checked against ``max_pixels`` before decoding,
    so a small file claiming a huge canvas costs nothing. PIL's own bomb guard
    (``Image.MAX_IMAGE_PIXELS``, about 89 Mpx) stays as an outer bound: its warning and error
    are both reported as ``image_too_large``, so the effective limit is the smaller of the two.
    Truncated files are errors: this relies on ``ImageFile.LOAD_TRUNCATED_IMAGES`` keeping its
    default (False), and PIL warnings about truncation are promoted to errors too.
    EXIF orientation is applied, and transparent pixels are composited on white so that the
    RGB result looks like what a viewer shows.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("error", message=".*truncat")
        image = _open_checked(data, max_pixels)
        _load_fully(image)
    image = _upright(image)
    if min(image.size) < min_side:
        raise MediaError(IMAGE_TOO_SMALL, f"{image.width}x{image.height} < {min_side} px")
    return _to_rgb(image)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only and refuse images whose declared size is over ``max_pixels``."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(IMAGE_TOO_LARGE, str(err)) from err
    except Exception as err:  # untrusted input: PIL plugins raise many exception types
        raise MediaError(UNDECODABLE, f"not a readable image: {err}") from err
    width, height = image.size
    if width <= 0 or height <= 0:
        raise MediaError(UNDECODABLE, f"empty image {width}x{height}")
    if width * height > max_pixels:
        raise MediaError(IMAGE_TOO_LARGE, f"{width}x{height} > {max_pixels} pixels")
    return image


def _load_fully(image: Image.Image) -> None:
    """Decode every pixel now, so truncation or corruption surfaces as a MediaError."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError(IMAGE_TOO_LARGE, str(err)) from err
    except Exception as err:  # untrusted input: truncation is an OSError, others vary
        raise MediaError(UNDECODABLE, f"cannot decode image: {err}") from err


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the pixels as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # the pixels decoded fine; bad metadata is no reason to reject them
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB pixels, compositing any transparency on white instead of dropping the alpha."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey(image: Image.Image) -> np.ndarray:
    """Luma (ITU-R 601, PIL's ``L`` mode) as float64 on the 0-255 scale."""
    return np.asarray(image.convert("L"), dtype=np.float64)


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the greyscale image: low means blurry.

    Only the valid region is used (no padding), so the image border adds no false edges;
    an image smaller than 3x3 has no valid region and scores 0.0.
    """
    grey = _grey(image)
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    centre = grey[1:-1, 1:-1]
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * centre
    return float(laplacian.var())


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash: near-identical pictures get hashes a few bits apart.

    Greyscale, resized to 32x32 (Lanczos), 2-D DCT-II (orthonormal), top-left 8x8 block of
    the lowest frequencies. Each of the 64 coefficients gives one bit, set when it is above
    the median of the block's 63 AC coefficients. The DC term (mean brightness) is left out
    of the median because it is an outlier of another scale that says nothing about
    structure; its own bit is kept so the hash stays 64 bits (it is set for any image that
    is not black). Bits run row-major from the most significant: bit 63 is coefficient (0, 0).
    """
    small = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coefficients = dctn(np.asarray(small, dtype=np.float64), type=2, norm="ortho")
    block = coefficients[:8, :8].ravel()
    threshold = np.median(block[1:])
    value = 0
    for bit in block > threshold:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two non-negative hashes."""
    if a < 0 or b < 0:
        raise ValueError("hashes must be non-negative integers")
    return (a ^ b).bit_count()


def content_hash(text_parts: list[str], media_bytes: list[bytes]) -> str:
    """SHA-256 hex digest identifying a row's exact content, for exact deduplication.

    Each part is prefixed with its length and each list with its count, so no two different
    inputs hash the same bytes: ("ab", "c") differs from ("a", "bc"), and a text "x" differs
    from a media file holding the byte "x".
    """
    digest = hashlib.sha256()
    for tag, parts in ((b"T", [t.encode("utf-8") for t in text_parts]), (b"M", media_bytes)):
        digest.update(tag + struct.pack(">Q", len(parts)))
        for part in parts:
            digest.update(struct.pack(">Q", len(part)))
            digest.update(part)
    return digest.hexdigest()


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Baseline JPEG bytes of ``image`` in RGB; the same pixels always give the same bytes.

    Options are fixed (4:2:0 chroma, no optimisation pass, no progressive scan, no metadata)
    so the output depends only on the pixels, the quality and the libjpeg build.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    out = io.BytesIO()
    image.convert("RGB").save(
        out, format="JPEG", quality=quality, subsampling=2, optimize=False, progressive=False
    )
    return out.getvalue()


# --------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    """What a step needs to know about a video before sampling it."""

    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int


def probe_video(data: bytes) -> VideoInfo:
    """Size, frame rate and duration of a video, after checking it is complete.

    Truncation rule (found empirically with decord 0.6.0 on PyAV-written MP4s cut short):

    1. MP4/MOV (data starting with an ``ftyp`` box): a top-level box whose declared size runs
       past the end of the data is ``video_truncated``. This catches the common case of a
       file cut mid-``mdat``; when the index (``moov``) sits at the end, as PyAV and ffmpeg
       write it by default, decord alone could only say "moov atom not found".
    2. decord fails to open: if it failed reading packets (``av_read_frame failed``, raised
       when the index lists samples past the end of the data) it is ``video_truncated``;
       anything else is ``media_undecodable``.
    3. decord opens it: the last frame index is decoded. When only the tail of the last
       packet is missing, decord opens the file and decodes earlier frames fine, but this
       decode fails, so a failure here is ``video_truncated``.

    Known blind spot: if the missing bytes end exactly on a packet boundary *and* the box
    sizes agree with what is left (an edited file, not a cut download, which rule 1 catches),
    demuxing just ends early: decord reports fewer frames than the index lists and nothing
    fails. Comparing with the index's sample count would catch it, but files with edit lists
    legitimately differ there, so that check is not made.

    Duration is the end time of the last frame, or frames / fps if decord has no timestamps.
    """
    reader = _open_video(data)
    num_frames = len(reader)
    try:
        last = _as_array(reader.get_batch([num_frames - 1]))
    except Exception as err:  # decord raises DECORDError, with varied messages
        raise MediaError(VIDEO_TRUNCATED, f"last frame {num_frames - 1} fails: {err}") from err
    finally:
        reader.seek(0)
    fps = float(reader.get_avg_fps())
    height, width = int(last.shape[1]), int(last.shape[2])
    return VideoInfo(_duration(reader, num_frames, fps), fps, num_frames, width, height)


def _open_video(data: bytes) -> Any:
    """A decord VideoReader over ``data`` with at least one frame and a frame rate."""
    import decord  # deferred: only the video steps need the native library

    _check_mp4_boxes(data)
    try:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    except Exception as err:  # decord raises RuntimeError or DECORDError
        reason = VIDEO_TRUNCATED if "av_read_frame" in str(err) else UNDECODABLE
        raise MediaError(reason, f"decord cannot open the video: {err}") from err
    if len(reader) == 0 or not reader.get_avg_fps() > 0:
        raise MediaError(UNDECODABLE, "the video has no frames or no frame rate")
    return reader


def _mp4_boxes(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(type, offset, declared size) of each top-level ISO-BMFF box; size 0 means 'to EOF'."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 8:
            yield b"", offset, 8  # a box header cut short
            return
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size == 1 and len(data) - offset >= 16:
            size = struct.unpack(">Q", data[offset + 8 : offset + 16])[0]
        yield kind, offset, size
        if size < 8:
            return  # size 0 runs to the end of the file; smaller ones are malformed
        offset += size


def _check_mp4_boxes(data: bytes) -> None:
    """Raise ``video_truncated`` if an MP4 top-level box promises more bytes than there are."""
    if data[4:8] != b"ftyp":
        return
    for kind, offset, size in _mp4_boxes(data):
        if offset + size > len(data):
            name = kind.decode("latin-1") or "box header"
            raise MediaError(
                VIDEO_TRUNCATED, f"'{name}' at {offset} needs {size} bytes, {len(data)} total"
            )


def _duration(reader: Any, num_frames: int, fps: float) -> float:
    """End time of the last frame, falling back to frames / fps."""
    try:
        end = float(np.asarray(reader.get_frame_timestamp(num_frames - 1)).ravel()[-1])
    except Exception:  # some containers carry no usable timestamps
        end = float("nan")
    return end if math.isfinite(end) and end > 0 else num_frames / fps


def _as_array(batch: Any) -> np.ndarray:
    """A decord batch as a numpy array, whatever decord bridge is active."""
    return batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)


def frame_timestamps(start_s: float, end_s: float, num_frames: int) -> list[float]:
    """``num_frames`` times spread uniformly over [start_s, end_s), at segment centres.

    Centres rather than segment starts keep every sample strictly inside the range (never on
    a cut, never at the very end where the next scene may begin) and symmetric in it.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if not end_s > start_s:
        raise ValueError(f"empty time range [{start_s}, {end_s})")
    step = (end_s - start_s) / num_frames
    return [start_s + (i + 0.5) * step for i in range(num_frames)]


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The (height, width) Qwen2-VL's processors resize an image or frame to: both sides
    multiples of ``factor`` (patch x merge, 28 px), the area within ``[min_pixels,
    max_pixels]``, the aspect ratio kept as closely as that allows. The same arithmetic
    as the processors' own ``smart_resize`` (checked against it in the tests), so a frame
    stored at this size passes through the processor unchanged."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is over 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VideoBudget:
    """One video's share of the visual-token budget, the same in preparation, training and
    evaluation.

    ``frames`` (``model.video_frames``) frames share ``max_visual_tokens``: every frame is
    resized to ``max_visual_tokens * unit * temporal_patch / frames`` pixels at most
    (``unit`` = one visual token's 28x28 px; ``temporal_patch`` frames fold into one token
    group), at least ``min_visual_tokens * unit`` or that cap, whichever is smaller. The
    frame count is chosen *after* that resize, so a 1280x720 and a 640x360 source both get
    ``frames`` frames; fewer only when even the smallest frames would not fit.
    """

    frames: int
    max_visual_tokens: int
    min_visual_tokens: int = 4
    patch: int = 14
    merge: int = 2
    temporal_patch: int = 2

    def __post_init__(self) -> None:
        if self.frames < 1 or self.max_visual_tokens < 1 or self.min_visual_tokens < 1:
            raise ValueError(f"frames and visual-token budgets must be >= 1, got {self}")

    @property
    def factor(self) -> int:
        return self.patch * self.merge

    @property
    def unit(self) -> int:
        return self.factor**2

    def frame_pixels(self) -> tuple[int, int]:
        """(min, max) pixels of one frame: the video processor's size settings."""
        # Counted over whole token groups: an odd frame count is padded to the next group
        # (the last frame repeated), and the padded frame takes its share of the budget.
        slots = -(-self.frames // self.temporal_patch) * self.temporal_patch
        per_frame = self.max_visual_tokens * self.unit * self.temporal_patch // slots
        per_frame = max(per_frame, self.unit)
        return min(self.min_visual_tokens * self.unit, per_frame), per_frame

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a ``width`` x ``height`` source frame is resized to."""
        low, high = self.frame_pixels()
        resized_h, resized_w = smart_resize(height, width, self.factor, low, high)
        return resized_w, resized_h

    def frame_count(self, width: int, height: int) -> int:
        """Frames of a ``width`` x ``height`` source that fit the budget at their resized
        size: ``frames`` rounded up to a whole token group, fewer (at least one group)
        only when the budget cannot hold that many groups of the smallest frames."""
        resized_w, resized_h = self.frame_size(width, height)
        per_group = (resized_w // self.factor) * (resized_h // self.factor)
        wanted = -(-self.frames // self.temporal_patch)
        groups = max(1, min(wanted, self.max_visual_tokens // per_group))
        return groups * self.temporal_patch


def resize_frames(images: Sequence[Image.Image], size: tuple[int, int]) -> list[Image.Image]:
    """Each frame at ``size`` (width, height), bicubic as the video processor resizes."""
    return [
        image if image.size == size else image.resize(size, Image.Resampling.BICUBIC)
        for image in images
    ]


def decode_frames(data: bytes, timestamps: Sequence[float]) -> list[Image.Image]:
    """The frames shown at ``timestamps`` (seconds from the first frame), as RGB images.

    Each time maps to the nearest frame start, index = round(t * fps) (halves round up),
    clamped to the video. All frames come from one ``get_batch`` call, which seeks once per
    keyframe run instead of once per frame; ``seek(0)`` afterwards works around decord's
    memory growth after ``get_batch``.
    """
    if not timestamps:
        return []
    reader = _open_video(data)
    fps, last_index = float(reader.get_avg_fps()), len(reader) - 1
    indices = [min(max(math.floor(t * fps + 0.5), 0), last_index) for t in timestamps]
    try:
        frames = _as_array(reader.get_batch(indices))
    except Exception as err:  # decord raises DECORDError, with varied messages
        raise MediaError(UNDECODABLE, f"cannot decode frames {indices}: {err}") from err
    finally:
        reader.seek(0)
    return [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]


def encode_frames(images: Sequence[Image.Image], quality: int = 90) -> list[bytes]:
    """Each frame as deterministic JPEG bytes (see :func:`encode_jpeg`)."""
    return [encode_jpeg(image, quality) for image in images]
