"""The backbone families the recipe runs on, one small entry each: Qwen2-VL, Qwen2.5-VL,
Qwen3-VL.

An entry says which transformers classes make the model and its processor, how the
visual-token budget maps onto the processor's settings, what a video needs beside its
frames, which processor outputs the model consumes and where the two towers' linear layers
live (LoRA). A model folder's ``config.json`` ``model_type`` picks the entry; the
embedder, the tiny models, recaptioning, souping and evaluation ask the entry and never
test a family by name.

What differs between the families, and what the entries do about it:

- **Vision patching**: 14-pixel patches (Qwen2-VL, Qwen2.5-VL), 16-pixel (Qwen3-VL). The
  processors carry their patch size; budgets are computed from it, never assumed.
- **Video budget**: the Qwen2-VL video processor bounds each frame's pixels; Qwen3-VL's
  bounds the whole clip's (frames x height x width). ``video_size`` gives each the same
  total budget.
- **Video time**: Qwen2.5-VL passes ``second_per_grid_ts`` to the model (an extra input);
  Qwen3-VL writes a timestamp before every pair of frames into the text, computed from the
  frames' metadata. Frames arrive here already sampled, so the processor must not sample
  again (``do_sample_frames: False``) and is told a nominal 1 frame per second.
- **LoRA**: all three keep the vision tower under ``model.visual`` and the language model
  under ``model.language_model``; every ``nn.Linear`` under them is a target (the Qwen2.5-VL
  gated vision MLP and the Qwen3-VL deepstack mergers included), the LM head never.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rzenembed.data.media import VideoBudget

VISION_PREFIX = "model.visual."
LLM_PREFIX = "model.language_model."
NOMINAL_FPS = 1.0  # the time base told to processors that write timestamps (frames are pre-sampled)


class UnsupportedBackboneError(ValueError):
    """A model folder whose ``model_type`` no entry handles."""


@dataclass(frozen=True)
class Backbone:
    family: str  # the name configs use: qwen2-vl | qwen2.5-vl | qwen3-vl
    model_type: str  # config.json's model_type
    model_class: str  # transformers: the generative model class
    config_class: str
    processor_class: str
    video_processor_class: str
    patch_size: int  # the published vision patch (pixels)
    clip_pixel_budget: bool  # the video processor's size bounds the whole clip, not a frame
    video_metadata: bool  # the processor writes timestamps from the frames' metadata
    extra_inputs: tuple[str, ...] = ()  # processor outputs the model needs besides the usual
    aliases: tuple[str, ...] = field(default_factory=tuple)

    # classes ------------------------------------------------------------------------------
    def load_class(self, name: str) -> Any:
        import transformers

        return getattr(transformers, name)

    @property
    def model_cls(self) -> Any:
        return self.load_class(self.model_class)

    # processor settings -------------------------------------------------------------------
    def video_size(self, budget: VideoBudget) -> dict[str, int]:
        """The video processor's ``size`` for ``budget``: per frame, or for the whole clip
        (the frame count rounded up to whole temporal groups, as the processor counts)."""
        low, high = budget.frame_pixels()
        if not self.clip_pixel_budget:
            return {"shortest_edge": low, "longest_edge": high}
        groups = -(-budget.frames // budget.temporal_patch)
        frames = groups * budget.temporal_patch
        return {"shortest_edge": low * frames, "longest_edge": high * frames}

    def video_call_kwargs(self, videos: Sequence[Sequence[Any]]) -> dict[str, Any]:
        """What the processor call needs beside the frames of ``videos``."""
        if not videos or not self.video_metadata:
            return {}
        from transformers.video_utils import VideoMetadata

        metadata = [
            VideoMetadata(
                total_num_frames=len(frames),
                fps=NOMINAL_FPS,
                frames_indices=list(range(len(frames))),
            )
            for frames in videos
        ]
        return {"video_metadata": metadata, "do_sample_frames": False}


BACKBONES: tuple[Backbone, ...] = (
    Backbone(
        family="qwen2-vl",
        model_type="qwen2_vl",
        model_class="Qwen2VLForConditionalGeneration",
        config_class="Qwen2VLConfig",
        processor_class="Qwen2VLProcessor",
        video_processor_class="Qwen2VLVideoProcessor",
        patch_size=14,
        clip_pixel_budget=False,
        video_metadata=False,
    ),
    Backbone(
        family="qwen2.5-vl",
        model_type="qwen2_5_vl",
        model_class="Qwen2_5_VLForConditionalGeneration",
        config_class="Qwen2_5_VLConfig",
        processor_class="Qwen2_5_VLProcessor",
        video_processor_class="Qwen2VLVideoProcessor",
        patch_size=14,
        clip_pixel_budget=False,
        video_metadata=False,
        extra_inputs=("second_per_grid_ts",),
    ),
    Backbone(
        family="qwen3-vl",
        model_type="qwen3_vl",
        model_class="Qwen3VLForConditionalGeneration",
        config_class="Qwen3VLConfig",
        processor_class="Qwen3VLProcessor",
        video_processor_class="Qwen3VLVideoProcessor",
        patch_size=16,
        clip_pixel_budget=True,
        video_metadata=True,
    ),
)
FAMILIES = tuple(b.family for b in BACKBONES)


def backbone(family: str) -> Backbone:
    """The entry of a family name (``qwen2-vl``, ``qwen2.5-vl``, ``qwen3-vl``)."""
    for entry in BACKBONES:
        if entry.family == family:
            return entry
    raise UnsupportedBackboneError(f"unknown model family {family!r}; supported: {list(FAMILIES)}")


def backbone_of_type(model_type: str, where: str = "the model") -> Backbone:
    for entry in BACKBONES:
        if entry.model_type == model_type:
            return entry
    supported = ", ".join(f"{b.model_type} ({b.family})" for b in BACKBONES)
    raise UnsupportedBackboneError(
        f"{where} has model_type {model_type!r}; supported model types: {supported}"
    )


def backbone_of_folder(path: str | Path) -> Backbone:
    """The entry for a model folder, from its ``config.json`` ``model_type``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UnsupportedBackboneError(f"{path} has no config.json: not a model folder")
    model_type = json.loads(config.read_text()).get("model_type", "")
    return backbone_of_type(model_type, str(config))


def backbone_of_model(model: Any) -> Backbone:
    """The entry for a loaded transformers model (or its peft wrapper)."""
    config = getattr(model, "config", None)
    return backbone_of_type(getattr(config, "model_type", ""), type(model).__name__)


def configured_backbone(family: str, name_or_path: str) -> Backbone:
    """The entry a ``ModelConfig`` means: its ``family``, or with ``auto`` the folder's
    (Qwen2-VL when the folder is not readable here, e.g. on the object store)."""
    if family != "auto":
        return backbone(family)
    try:
        return backbone_of_folder(name_or_path)
    except UnsupportedBackboneError:
        return backbone("qwen2-vl")
