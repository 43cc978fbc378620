"""Published Qwen2-VL dimensions, for building the real architectures without weights.

Used to check code against the real shapes (LoRA coverage, parameter counts) on the meta
device, and by GPU benchmarks that need a real-size model with random weights.
"""

from __future__ import annotations

from typing import Any

QWEN2VL_DIMENSIONS: dict[str, dict[str, Any]] = {
    "qwen2vl-2b": {
        "text": {
            "hidden_size": 1536,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "intermediate_size": 8960,
            "vocab_size": 151936,
            "mrope_section": [16, 24, 24],
        },
        "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
        "tie_word_embeddings": True,
    },
    "qwen2vl-7b": {
        "text": {
            "hidden_size": 3584,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "intermediate_size": 18944,
            "vocab_size": 152064,
            "mrope_section": [16, 24, 24],
        },
        "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
        "tie_word_embeddings": False,
    },
}


def qwen2vl_config(name: str):
    """A transformers ``Qwen2VLConfig`` with the named model's dimensions."""
    from transformers import Qwen2VLConfig

    if name not in QWEN2VL_DIMENSIONS:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(QWEN2VL_DIMENSIONS)}")
    dims = QWEN2VL_DIMENSIONS[name]
    text = dict(dims["text"])
    mrope = text.pop("mrope_section")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope}
    vision = {
        **dims["vision"],
        "hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=dims["tie_word_embeddings"],
    )
