"""The real Qwen2-VL-2B/7B architectures, built on the meta device (no weights, no memory):
the LoRA target discovery and the trainable counts hold at full size too."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from rzenembed.config import LoraConfig
from rzenembed.modeling.architectures import QWEN2VL_DIMENSIONS, qwen2vl_config
from rzenembed.modeling.lora import apply_lora


def hand_count_lora(name: str, r: int) -> int:
    """r * (in + out) summed over every vision and LLM linear layer, from the dimensions."""
    dims = QWEN2VL_DIMENSIONS[name]
    v, t = dims["vision"], dims["text"]
    e, h, inter = v["embed_dim"], t["hidden_size"], t["intermediate_size"]
    mlp = e * v["mlp_ratio"]
    vision_block = (e + 3 * e) + (e + e) + (e + mlp) + (mlp + e)
    merged = e * 4  # 2x2 spatial merge
    merger = (merged + merged) + (merged + h)
    kv = h // t["num_attention_heads"] * t["num_key_value_heads"]
    llm_layer = 2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)
    return r * (v["depth"] * vision_block + merger + t["num_hidden_layers"] * llm_layer)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "billions"),
    [("qwen2vl-2b", 2.21), ("qwen2vl-7b", 8.29)],
)
def test_real_size_lora_coverage_and_counts(name, billions):
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(qwen2vl_config(name))
        total = sum(p.numel() for p in model.parameters())
        assert total / 1e9 == pytest.approx(billions, abs=0.01)  # the published sizes
        wrapped = apply_lora(model, LoraConfig(r=64, alpha=128))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == hand_count_lora(name, 64)
    assert not any("lm_head" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_unknown_architecture_is_named():
    with pytest.raises(KeyError, match="qwen2vl-3b"):
        qwen2vl_config("qwen2vl-3b")
