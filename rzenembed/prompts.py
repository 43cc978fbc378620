"""Named prompt templates that turn (instruction, text, media) into the model's input string.

An embedding model is only as good as the template it is queried with: a checkpoint
evaluated with another template than the one it was trained with collapses. Templates are
therefore named, registered here, stored in every model's ``rzenembed.json`` and applied
from there when the model is loaded.

Vision placeholders are the Qwen2-VL ones (``<|vision_start|><|image_pad|><|vision_end|>``
per image, ``<|video_pad|>`` for a video); the processor expands each pad into the right
number of visual tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
EOS_TOKEN = "<|endoftext|>"

PAPER_SYSTEM_PROMPT = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)
PAPER_TEXT_PROMPT = "Represent the given text in one word."
PAPER_VISUAL_PROMPT = "Represent the given image in one word."
RELEASE_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptInput:
    """What a template needs to know about one input, media already counted."""

    instruction: str = ""
    text: str = ""
    num_images: int = 0
    num_videos: int = 0

    @property
    def has_visual(self) -> bool:
        return self.num_images > 0 or self.num_videos > 0

    def vision_placeholders(self) -> str:
        return IMAGE_PLACEHOLDER * self.num_images + VIDEO_PLACEHOLDER * self.num_videos


@dataclass(frozen=True)
class PromptTemplate:
    """A named rendering rule; ``render`` returns the full string, EOS included."""

    name: str
    description: str
    render_fn: Callable[[PromptInput], str]

    def render(self, item: PromptInput) -> str:
        return self.render_fn(item)


def _join_instruction(instruction: str, text: str) -> str:
    """Instruction then query, one space between them when both are present."""
    return " ".join(part for part in (instruction.strip(), text.strip()) if part)


def _chat(system: str, user: str) -> str:
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n"
        f"<|im_start|>assistant\n{EOS_TOKEN}"
    )


def _render_paper(item: PromptInput) -> str:
    representation = PAPER_VISUAL_PROMPT if item.has_visual else PAPER_TEXT_PROMPT
    query = _join_instruction(item.instruction, item.text)
    body = "\n".join(part for part in (query, representation) if part)
    return _chat(PAPER_SYSTEM_PROMPT, item.vision_placeholders() + body)


def _render_v2_release(item: PromptInput) -> str:
    # The released checkpoint pastes the instruction directly in front of the text.
    return _chat(RELEASE_SYSTEM_PROMPT, item.vision_placeholders() + item.instruction + item.text)


def _render_plain(item: PromptInput) -> str:
    return item.vision_placeholders() + _join_instruction(item.instruction, item.text) + EOS_TOKEN


TEMPLATES: dict[str, PromptTemplate] = {
    t.name: t
    for t in (
        PromptTemplate(
            "rzenembed-paper",
            "Paper: one-word system prompt, instruction + query, representation prompt, EOS.",
            _render_paper,
        ),
        PromptTemplate(
            "rzenembed-v2-release",
            "Released v2 checkpoint: helpful-assistant system, instruction pasted before "
            "the text, EOS after the assistant header.",
            _render_v2_release,
        ),
        PromptTemplate(
            "plain",
            "No system prompt, no chat frame: media, instruction + text, EOS.",
            _render_plain,
        ),
    )
}


def template_names() -> list[str]:
    return sorted(TEMPLATES)


def get_template(name: str) -> PromptTemplate:
    """Look a template up by name; unknown names list the registered ones."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(
            f"unknown prompt template {name!r}; registered templates: {', '.join(template_names())}"
        ) from None
