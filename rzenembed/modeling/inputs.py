"""What the embedder accepts: text, images, a video as frames, or document pages, with an
instruction; plus the small media helpers that turn paths and arrays into PIL images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray | str | Path


@dataclass
class EmbedInput:
    """One thing to embed.

    ``images`` holds photos or document page images (a page is an image with a layout-aware
    instruction); ``video`` holds the frames of one video, already decoded, in time order.
    """

    text: str = ""
    instruction: str = ""
    images: list[ImageLike] = field(default_factory=list)
    video: list[ImageLike] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not isinstance(self.instruction, str):
            raise TypeError("text and instruction must be strings")
        if isinstance(self.images, (Image.Image, np.ndarray, str, Path)):
            self.images = [self.images]
        if self.video is not None and len(self.video) == 0:
            raise ValueError("a video needs at least one frame")
        if not (self.text or self.instruction or self.images or self.video):
            raise ValueError("an input needs text, an instruction, images or a video")

    @property
    def num_videos(self) -> int:
        return 0 if self.video is None else 1


def as_input(item: EmbedInput | str | dict[str, Any]) -> EmbedInput:
    """Accept an ``EmbedInput``, a bare string (text only) or a mapping of its fields."""
    if isinstance(item, EmbedInput):
        return item
    if isinstance(item, str):
        return EmbedInput(text=item)
    if isinstance(item, dict):
        unknown = set(item) - {"text", "instruction", "images", "video"}
        if unknown:
            raise ValueError(f"unknown input fields {sorted(unknown)}")
        return EmbedInput(**item)
    raise TypeError(f"cannot embed a {type(item).__name__}; pass EmbedInput, str or dict")


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image, an HxWx3 uint8 array or a file path."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (height, width, 3), got {image.shape}")
        return Image.fromarray(image.astype(np.uint8), "RGB")
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    with Image.open(path) as opened:
        return opened.convert("RGB")


def sample_frames(frames: Sequence[ImageLike], max_frames: int, temporal_patch: int = 2) -> list:
    """At most ``max_frames`` evenly spaced frames, padded to a multiple of the temporal patch.

    Qwen2-VL folds ``temporal_patch`` consecutive frames into one token group, so the count
    is rounded up by repeating the last frame rather than dropping content.
    """
    count = len(frames)
    if count > max_frames:
        picks = np.linspace(0, count - 1, num=max_frames).round().astype(int)
        frames = [frames[i] for i in picks]
    loaded = [load_image(f) for f in frames]
    while len(loaded) % temporal_patch:
        loaded.append(loaded[-1])
    return loaded
