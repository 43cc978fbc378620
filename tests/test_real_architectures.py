"""The real architectures (Qwen2-VL-2B/7B, Qwen2.5-VL-3B/7B, Qwen3-VL-2B/8B), built on the
meta device (no weights, no memory): published sizes, and LoRA on every linear layer of both
towers, never on the LM head, at full size too."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from rzenembed.config import LoraConfig
from rzenembed.modeling.architectures import (
    ARCHITECTURES,
    QWEN2VL_DIMENSIONS,
    architecture_config,
    qwen2vl_config,
)
from rzenembed.modeling.backbones import LLM_PREFIX, VISION_PREFIX, backbone
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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_family_has_its_published_size_and_lora_on_every_linear_layer(name):
    dims = ARCHITECTURES[name]
    with torch.device("meta"):
        model = backbone(dims["family"]).model_cls(architecture_config(name))
        total = sum(p.numel() for p in model.parameters())
        linears = {
            n: m
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith((VISION_PREFIX, LLM_PREFIX))
        }
        wrapped = apply_lora(model, LoraConfig(r=16, alpha=32))
    assert total / 1e9 == pytest.approx(dims["billions"], rel=0.01)  # within 1% of published
    assert any(n.startswith(VISION_PREFIX) for n in linears)
    assert any(n.startswith(LLM_PREFIX) for n in linears)
    # Every linear layer of both towers carries a rank-16 LoRA pair, nothing else trains.
    expected = sum(16 * (m.in_features + m.out_features) for m in linears.values())
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable} == set(
        linears
    )
    assert not any("lm_head" in n for n in trainable)


def test_unknown_architecture_is_named():
    with pytest.raises(KeyError, match="qwen2vl-3b"):
        qwen2vl_config("qwen2vl-3b")
