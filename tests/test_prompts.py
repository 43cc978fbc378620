"""Golden strings: each template renders exactly the documented text."""

from __future__ import annotations

import pytest

from rzenembed.prompts import PromptInput, get_template, template_names

PAPER_SYSTEM = (
    "Given an image, summarize the provided image in one word. "
    "Given only text, describe the text in one word."
)
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


def test_registry_lists_the_three_templates():
    assert template_names() == ["plain", "rzenembed-paper", "rzenembed-v2-release"]


def test_unknown_template_names_the_registered_ones():
    with pytest.raises(KeyError, match=r"unknown prompt template 'paper'.*rzenembed-paper"):
        get_template("paper")


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            PromptInput(instruction="Find an image that matches the given caption.", text="A dog."),
            "<|im_start|>system\n" + PAPER_SYSTEM + "<|im_end|>\n"
            "<|im_start|>user\nFind an image that matches the given caption. A dog.\n"
            "Represent the given text in one word.<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>",
        ),
        (
            PromptInput(num_images=1),
            "<|im_start|>system\n" + PAPER_SYSTEM + "<|im_end|>\n"
            "<|im_start|>user\n" + IMG + "Represent the given image in one word.<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>",
        ),
        (
            PromptInput(instruction="Represent the given video.", num_videos=1),
            "<|im_start|>system\n" + PAPER_SYSTEM + "<|im_end|>\n"
            "<|im_start|>user\n" + VID + "Represent the given video.\n"
            "Represent the given image in one word.<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>",
        ),
    ],
)
def test_paper_template(item, expected):
    assert get_template("rzenembed-paper").render(item) == expected


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            PromptInput(
                instruction="Find me an everyday image that matches the given caption: ",
                text="A cat.",
            ),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\nFind me an everyday image that matches the given caption: A cat."
            "<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
        ),
        (
            PromptInput(instruction="Represent the given image.", num_images=2),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n" + IMG + IMG + "Represent the given image.<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>",
        ),
    ],
)
def test_v2_release_template(item, expected):
    assert get_template("rzenembed-v2-release").render(item) == expected


def test_plain_template():
    item = PromptInput(instruction="Query:", text="red car", num_images=1)
    assert get_template("plain").render(item) == IMG + "Query: red car<|endoftext|>"
