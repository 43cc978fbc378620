"""A complete, tiny Qwen2-VL model folder built offline, for tests, the demo and CI.

The folder has exactly what a real checkpoint has (``config.json``, safetensors weights,
``tokenizer.json``, image and video processor configs, chat template) so it loads through
the very same ``from_pretrained`` path as Qwen2-VL-2B/7B. Weights are random but seeded;
the tokenizer is a byte-level BPE trained here on a small built-in corpus and carries the
Qwen2-VL special tokens. Building it twice with the same seed gives identical files; the
seed changes the weights only, never the vocabulary.

Command line: ``rzenembed tiny-model OUT [--seed N]``.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from rzenembed import prompts
from rzenembed.modeling.backbones import Backbone, backbone

# The special tokens of Qwen2-VL, in the order the real vocabulary lists them.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenisation: split on this pattern, then map bytes to printable characters.
_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The chat template of Qwen2-VL-Instruct, written for this project (images and videos as
# vision placeholders, text items inline).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Dimensions of the tiny model; small enough for CPU tests, shaped like the real one."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_embed_dim: int = 32
    vision_heads: int = 2
    vision_mlp_ratio: int = 2
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # sums to head_dim / 2 = 8
    bpe_vocab_size: int = 1024
    max_position_embeddings: int = 4096
    min_visual_tokens: int = 4
    max_visual_tokens: int = 64


_SUBJECTS = (
    "a dog",
    "a cat",
    "two children",
    "an old man",
    "a red car",
    "a blue bicycle",
    "a bird",
    "a bowl of fruit",
    "a laptop",
    "a train",
    "a cup of coffee",
    "the city skyline",
    "a mountain lake",
    "a football player",
    "a chart",
    "a scanned invoice",
    "a slide",
)
_VERBS = (
    "sits on",
    "runs across",
    "stands next to",
    "is parked near",
    "flies over",
    "rests on",
    "is shown in",
    "appears beside",
    "moves toward",
    "is drawn on",
)
_PLACES = (
    "the grass",
    "a wooden table",
    "the beach",
    "a busy street",
    "the snow",
    "a kitchen",
    "the page",
    "a river",
    "the stage",
    "a white background",
)
_EXTRA = (
    "Find an image that matches the given caption.",
    "Retrieve the video that shows the described event.",
    "Find a document image that matches the given query.",
    "Answer the question about the image.",
    "Represent the given video for classification.",
    "What is the total amount on the invoice in 2024?",
    "Which quarter had the highest revenue according to the chart?",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 50% $20 #1 (a) [b] {c} <d> e-mail: a@b.c",
)


def training_corpus(seed: int = 0, sentences: int = 1500) -> list[str]:
    """A deterministic corpus of captions, instructions and the project's prompt strings."""
    rng = random.Random(seed)
    combos = list(itertools.product(_SUBJECTS, _VERBS, _PLACES))
    rng.shuffle(combos)
    lines = [f"{s.capitalize()} {v} {p}." for s, v, p in combos[:sentences]]
    lines += list(_EXTRA) * 20
    lines += [
        prompts.PAPER_SYSTEM_PROMPT,
        prompts.PAPER_TEXT_PROMPT,
        prompts.PAPER_VISUAL_PROMPT,
        prompts.RELEASE_SYSTEM_PROMPT,
        "system\nuser\nassistant\n",
    ] * 50
    return lines


def build_tokenizer(spec: TinySpec, corpus_seed: int = 0):
    """Train a byte-level BPE with Qwen2's pre-tokeniser and wrap it as a Qwen2 tokenizer."""
    from transformers import Qwen2Tokenizer

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    raw.train_from_iterator(training_corpus(corpus_seed), trainer=trainer)
    model = raw.model
    vocab = raw.get_vocab()
    merges = _merges_of(model)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def _merges_of(bpe_model) -> list[tuple[str, str]]:
    """The learned merges, in rank order, read back from the trained model's JSON."""
    import json

    state = json.loads(Tokenizer(bpe_model).to_str())
    return [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]
    ]


def build_processor(spec: TinySpec, tokenizer, family: str = "qwen2-vl"):
    """The family's processor (image + video processors, chat template) around
    ``tokenizer``, with the family's patch size."""
    from transformers import Qwen2VLImageProcessor

    entry = backbone(family)
    patch = _patch(spec, entry)
    unit = (patch * spec.spatial_merge_size) ** 2
    size = {
        "shortest_edge": spec.min_visual_tokens * unit,
        "longest_edge": spec.max_visual_tokens * unit,
    }
    common = dict(
        size=size,
        patch_size=patch,
        merge_size=spec.spatial_merge_size,
        temporal_patch_size=spec.temporal_patch_size,
    )
    processor_cls = entry.load_class(entry.processor_class)
    video_cls = entry.load_class(entry.video_processor_class)
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**common),
        video_processor=video_cls(**common),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def _patch(spec: TinySpec, entry: Backbone) -> int:
    """The tiny model's patch: the spec's for Qwen2-VL (14), else the family's own."""
    return spec.patch_size if entry.patch_size == 14 else entry.patch_size


def _token_ids(tokenizer) -> dict[str, int]:
    return dict(
        zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)), strict=True)
    )


def _text_config(spec: TinySpec, tokenizer, rope_theta: float) -> dict:
    ids = _token_ids(tokenizer)
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta,
            "mrope_section": list(spec.mrope_section),
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _vision_common(spec: TinySpec, entry: Backbone) -> dict:
    return {
        "depth": spec.vision_depth,
        "num_heads": spec.vision_heads,
        "patch_size": _patch(spec, entry),
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }


def _placeholders(tokenizer) -> dict[str, int]:
    ids = _token_ids(tokenizer)
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen2_vl(spec: TinySpec, tokenizer, entry: Backbone) -> dict:
    vision = {
        **_vision_common(spec, entry),
        "embed_dim": spec.vision_embed_dim,
        "hidden_size": spec.hidden_size,
        "mlp_ratio": spec.vision_mlp_ratio,
    }
    return {"text_config": _text_config(spec, tokenizer, 1_000_000.0), "vision_config": vision}


def _qwen2_5_vl(spec: TinySpec, tokenizer, entry: Backbone) -> dict:
    vision = {
        **_vision_common(spec, entry),
        "hidden_size": spec.vision_embed_dim,
        "intermediate_size": spec.vision_embed_dim * spec.vision_mlp_ratio,
        "out_hidden_size": spec.hidden_size,
        "fullatt_block_indexes": [spec.vision_depth - 1],  # the published: last of each stage
    }
    return {"text_config": _text_config(spec, tokenizer, 1_000_000.0), "vision_config": vision}


def _qwen3_vl(spec: TinySpec, tokenizer, entry: Backbone) -> dict:
    text = _text_config(spec, tokenizer, 5_000_000.0)
    text["head_dim"] = spec.hidden_size // spec.num_heads  # Qwen3 defaults to 128 otherwise
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = {
        **_vision_common(spec, entry),
        "hidden_size": spec.vision_embed_dim,
        "intermediate_size": spec.vision_embed_dim * spec.vision_mlp_ratio,
        "out_hidden_size": spec.hidden_size,
        "num_position_embeddings": 16,  # a 4 x 4 learned position grid
        # Within the tower (the published indexes 8, 16, 24 would leave unused mergers).
        "deepstack_visual_indexes": list(range(spec.vision_depth)),
    }
    return {"text_config": text, "vision_config": vision}


TINY_CONFIGS = {"qwen2-vl": _qwen2_vl, "qwen2.5-vl": _qwen2_5_vl, "qwen3-vl": _qwen3_vl}


def build_config(spec: TinySpec, tokenizer, family: str = "qwen2-vl"):
    """The family's config class at the tiny dimensions, token ids matching ``tokenizer``
    (weights tied at the top level, where every family's config reads it)."""
    entry = backbone(family)
    config_cls = entry.load_class(entry.config_class)
    return config_cls(
        **TINY_CONFIGS[family](spec, tokenizer, entry),
        **_placeholders(tokenizer),
        tie_word_embeddings=True,
    )


def build_tiny_model(
    out_dir: str | Path, seed: int = 0, spec: TinySpec | None = None, family: str = "qwen2-vl"
) -> Path:
    """Write a loadable tiny model folder of ``family`` to ``out_dir``; return its path."""
    spec = spec or TinySpec()
    entry = backbone(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec)  # the vocabulary never depends on the weight seed
    config = build_config(spec, tokenizer, family)
    torch.manual_seed(seed)
    model = entry.model_cls(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    build_processor(spec, tokenizer, family).save_pretrained(out)
    return out
