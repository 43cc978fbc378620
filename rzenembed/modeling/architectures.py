"""Published dimensions of the supported backbones, for building the real architectures
without weights.

Used to check code against the real shapes (LoRA coverage, parameter counts) on the meta
device, and by GPU benchmarks that need a real-size model with random weights. Each entry
names its family (``backbones.py``); ``architecture_config`` builds the family's config.
"""

from __future__ import annotations

from typing import Any

from rzenembed.modeling.backbones import backbone

_QWEN2_MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
_QWEN3_MROPE = {
    "rope_type": "default",
    "rope_theta": 5e6,
    "mrope_section": [24, 20, 20],
    "mrope_interleaved": True,
}
_QWEN25_VISION = {
    "depth": 32,
    "hidden_size": 1280,
    "intermediate_size": 3420,
    "num_heads": 16,
    "patch_size": 14,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}


def _text(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, rope: dict, **extra: Any
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab,
        "rope_parameters": dict(rope),
        **extra,
    }


# name -> family, text and vision config, tied embeddings, the published size (billions)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2vl-2b": {
        "family": "qwen2-vl",
        "text": _text(1536, 8960, 28, 12, 2, 151936, _QWEN2_MROPE),
        "vision": {
            "depth": 32,
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "hidden_size": 1536,
            "patch_size": 14,
        },
        "tie_word_embeddings": True,
        "billions": 2.21,
    },
    "qwen2vl-7b": {
        "family": "qwen2-vl",
        "text": _text(3584, 18944, 28, 28, 4, 152064, _QWEN2_MROPE),
        "vision": {
            "depth": 32,
            "embed_dim": 1280,
            "num_heads": 16,
            "mlp_ratio": 4,
            "hidden_size": 3584,
            "patch_size": 14,
        },
        "tie_word_embeddings": False,
        "billions": 8.29,
    },
    "qwen25vl-3b": {
        "family": "qwen2.5-vl",
        "text": _text(2048, 11008, 36, 16, 2, 151936, _QWEN2_MROPE),
        "vision": {**_QWEN25_VISION, "out_hidden_size": 2048},
        "tie_word_embeddings": True,
        "billions": 3.75,
    },
    "qwen25vl-7b": {
        "family": "qwen2.5-vl",
        "text": _text(3584, 18944, 28, 28, 4, 152064, _QWEN2_MROPE),
        "vision": {**_QWEN25_VISION, "out_hidden_size": 3584},
        "tie_word_embeddings": False,
        "billions": 8.29,
    },
    "qwen3vl-2b": {
        "family": "qwen3-vl",
        "text": _text(2048, 6144, 28, 16, 8, 151936, _QWEN3_MROPE, head_dim=128),
        "vision": {
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "patch_size": 16,
            "out_hidden_size": 2048,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [5, 11, 17],
        },
        "tie_word_embeddings": True,
        "billions": 2.13,
    },
    "qwen3vl-8b": {
        "family": "qwen3-vl",
        "text": _text(4096, 12288, 36, 32, 8, 151936, _QWEN3_MROPE, head_dim=128),
        "vision": {
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "patch_size": 16,
            "out_hidden_size": 4096,
            "num_position_embeddings": 2304,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        "tie_word_embeddings": False,
        "billions": 8.77,
    },
}
# Kept for the benchmarks written before the other families.
QWEN2VL_DIMENSIONS = {k: v for k, v in ARCHITECTURES.items() if v["family"] == "qwen2-vl"}


def architecture_config(name: str):
    """The family's transformers config with the named model's published dimensions."""
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    dims = ARCHITECTURES[name]
    entry = backbone(dims["family"])
    vision = {"spatial_merge_size": 2, "temporal_patch_size": 2, **dims["vision"]}
    return entry.load_class(entry.config_class)(
        text_config=dict(dims["text"]),
        vision_config=vision,
        tie_word_embeddings=dims["tie_word_embeddings"],
    )


def qwen2vl_config(name: str):
    """``architecture_config`` under its first name (Qwen2-VL only then)."""
    return architecture_config(name)
