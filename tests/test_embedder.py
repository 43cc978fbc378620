"""The embedder on the tiny model of every backbone family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL):
pooling, batch invariance, text/image/video/page inputs, LoRA coverage, save/load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from rzenembed.config import LoraConfig
from rzenembed.modeling import EmbedInput, ModelCard, ModelFolderError, RzenEmbedder
from rzenembed.modeling.backbones import FAMILIES
from rzenembed.modeling.tiny import TinySpec

from .conftest import random_image, tiny_config_for


# Every test here runs on each family's tiny model (these override the session fixtures).
@pytest.fixture(scope="module", params=FAMILIES)
def tiny_model_dir(request, tiny_family_dir):
    return tiny_family_dir(request.param)


@pytest.fixture(scope="module")
def tiny_model_config(tiny_model_dir):
    return tiny_config_for(tiny_model_dir)


def mixed_inputs() -> list[EmbedInput]:
    frames = [random_image(10 + i, (56, 84)) for i in range(4)]
    return [
        EmbedInput(text="A dog runs across the grass.", instruction="Find an image."),
        EmbedInput(text="a cat"),
        EmbedInput(images=[random_image(1)], instruction="Represent the given image."),
        EmbedInput(video=frames, instruction="Represent the given video."),
        EmbedInput(images=[random_image(2, (196, 140))], text="", instruction="Read the page."),
        EmbedInput(
            text="Two children stand next to a red car on a busy street in the snow.",
            images=[random_image(3, (70, 70))],
        ),
    ]


def test_pooled_vector_is_the_eos_hidden_state(tiny_embedder):
    tokenizer = tiny_embedder.processor.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for side in ("right", "left"):
        tiny_embedder.processor.tokenizer.padding_side = side
        batch = tiny_embedder.prepare(mixed_inputs())
        with torch.no_grad():
            hidden = tiny_embedder.core(**batch, use_cache=False).last_hidden_state
            pooled = tiny_embedder(**batch)
        mask = batch["attention_mask"]
        assert not bool(mask.all()), "the batch must actually be padded"
        for row in range(mask.shape[0]):
            last = max(i for i in range(mask.shape[1]) if mask[row, i] == 1)
            assert batch["input_ids"][row, last] == eos_id
            expected = hidden[row, last] / hidden[row, last].norm()
            torch.testing.assert_close(pooled[row], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_embedding_alone_equals_embedding_in_a_padded_mixed_batch(tiny_embedder, side):
    tiny_embedder.cfg = tiny_embedder.cfg.model_copy(update={"padding_side": side})
    tiny_embedder._configure_processor()
    items = mixed_inputs()
    together = tiny_embedder.encode(items, batch_size=len(items))
    for i, item in enumerate(items):
        alone = tiny_embedder.encode([item])
        torch.testing.assert_close(alone[0], together[i], atol=1e-4, rtol=0)


def test_encode_returns_unit_float32_vectors_in_input_order(tiny_embedder):
    items = mixed_inputs()
    out = tiny_embedder.encode(items, batch_size=2)
    assert out.dtype == torch.float32
    assert out.shape == (len(items), TinySpec().hidden_size)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(items)))
    reversed_out = tiny_embedder.encode(items[::-1], batch_size=2)
    torch.testing.assert_close(reversed_out.flip(0), out, atol=1e-5, rtol=0)
    assert not torch.allclose(out[0], out[1])


def test_no_vocabulary_logits_are_computed(tiny_embedder):
    calls = []
    handle = tiny_embedder.hf_model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    tiny_embedder.encode(["a dog"])
    handle.remove()
    assert calls == []


def test_visual_token_budget_comes_from_config(tiny_model_dir, tiny_model_config):
    def image_tokens(max_tokens: int) -> int:
        cfg = tiny_model_config.model_copy(
            update={"max_visual_tokens": max_tokens, "min_visual_tokens": 1}
        )
        embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=cfg)
        batch = embedder.prepare([EmbedInput(images=[random_image(0, (300, 300))])])
        count = int((batch["input_ids"] == embedder.hf_model.config.image_token_id).sum())
        assert count == int(batch["image_grid_thw"].prod()) // 4  # 2x2 merge per token
        return count

    assert 1 <= image_tokens(4) <= 4
    assert 16 < image_tokens(64) <= 64


def test_long_text_is_truncated_to_max_text_tokens(tiny_model_dir, tiny_model_config):
    cfg = tiny_model_config.model_copy(update={"max_text_tokens": 5})
    embedder = RzenEmbedder.from_pretrained(tiny_model_dir, config=cfg)
    rendered = embedder.render(EmbedInput(text="a dog sits on the grass " * 20))
    assert "a dog sits on" in rendered
    assert rendered.count("grass") <= 1


def expected_lora_parameters(spec: TinySpec, r: int, family: str = "qwen2-vl") -> int:
    """Hand count: r * (in + out) for every linear layer of the vision tower and the LLM,
    as each family lays its vision tower out."""
    e, h = spec.vision_embed_dim, spec.hidden_size
    mlp = e * spec.vision_mlp_ratio
    attention = (e + 3 * e) + (e + e)  # qkv, proj
    # Qwen2.5-VL's vision MLP is gated (gate_proj, up_proj, down_proj); the others have two
    # layers (fc1, fc2; Qwen3-VL: linear_fc1, linear_fc2).
    gates = 2 if family == "qwen2.5-vl" else 1
    vision_mlp = gates * (e + mlp) + (mlp + e)
    merged = e * spec.spatial_merge_size**2
    merger = (merged + merged) + (merged + h)  # two layers
    # Qwen3-VL: one more merger per deepstack layer (the tiny model taps every block).
    mergers = 1 + (spec.vision_depth if family == "qwen3-vl" else 0)
    kv = h // spec.num_heads * spec.num_kv_heads
    inter = spec.intermediate_size
    llm_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h)
    vision = spec.vision_depth * (attention + vision_mlp) + mergers * merger
    return r * (vision + spec.num_layers * llm_layer)


def test_lora_wraps_every_vision_and_llm_linear_and_not_the_lm_head(tiny_embedder):
    from peft.tuners.lora import LoraLayer

    tiny_embedder.apply_lora(LoraConfig(r=4, alpha=8, dropout=0.0))
    model = tiny_embedder.hf_model
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    plain_linears = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(n.startswith(w + ".") for w in wrapped)
    }
    assert plain_linears == {"lm_head"}
    assert any(n.startswith("model.visual.blocks.") for n in wrapped)
    assert any(n.startswith("model.visual.merger.") for n in wrapped)
    assert any(n.startswith("model.language_model.layers.") for n in wrapped)
    trainable = sum(p.numel() for p in tiny_embedder.parameters() if p.requires_grad)
    family = tiny_embedder.family.family
    expected = {"qwen2-vl": 13_056, "qwen2.5-vl": 13_824, "qwen3-vl": 16_640}[family]
    assert trainable == expected_lora_parameters(TinySpec(), 4, family) == expected
    assert all("lora_" in n for n, p in tiny_embedder.named_parameters() if p.requires_grad)


def test_lora_on_the_llm_only(tiny_embedder):
    from peft.tuners.lora import LoraLayer

    tiny_embedder.apply_lora(LoraConfig(r=2, alpha=4, vision=False, llm=True))
    wrapped = [n for n, m in tiny_embedder.hf_model.named_modules() if isinstance(m, LoraLayer)]
    assert wrapped and all(n.startswith("model.language_model.") for n in wrapped)


def test_gradients_reach_the_lora_factors(tiny_embedder):
    tiny_embedder.apply_lora(LoraConfig(r=4, alpha=8, dropout=0.0))
    # B starts at zero; give it values so A receives gradient too.
    for name, param in tiny_embedder.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.02)
    tiny_embedder.train()
    vectors = tiny_embedder(**tiny_embedder.prepare(mixed_inputs()[:3]))
    (vectors[0] @ vectors[2]).backward()  # text x image: both towers
    grads = {n: p.grad for n, p in tiny_embedder.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "visual" in n)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "language_model" in n)


def test_adapter_and_merged_folders_round_trip(tiny_embedder, tmp_path):
    tiny_embedder.apply_lora(LoraConfig(r=4, alpha=8, dropout=0.0))
    for name, param in tiny_embedder.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    items = mixed_inputs()
    before = tiny_embedder.encode(items)

    adapter = tiny_embedder.save_pretrained(tmp_path / "adapter", extra={"stage": 2})
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not list(adapter.glob("*.bin")) and not list(adapter.glob("*.pt"))
    card = ModelCard.load(adapter)
    assert (card.kind, card.template, card.embedding_dim, card.extra) == (
        "adapter",
        "rzenembed-paper",
        64,
        {"stage": 2},
    )
    loaded = RzenEmbedder.from_pretrained(adapter)
    torch.testing.assert_close(loaded.encode(items), before, atol=1e-5, rtol=0)

    merged = tiny_embedder.merge_lora().save_pretrained(tmp_path / "merged")
    assert (merged / "model.safetensors").is_file()
    assert ModelCard.load(merged).kind == "model"
    reloaded = RzenEmbedder.from_pretrained(merged)
    assert not reloaded.is_lora
    torch.testing.assert_close(reloaded.encode(items), before, atol=1e-4, rtol=0)


def test_loading_uses_the_saved_template(tiny_embedder, tiny_model_config, tmp_path):
    tiny_embedder.cfg = tiny_embedder.cfg.model_copy(update={"template": "rzenembed-v2-release"})
    folder = tiny_embedder.save_pretrained(tmp_path / "m")
    asked_for_paper = tiny_model_config.model_copy(update={"template": "rzenembed-paper"})
    loaded = RzenEmbedder.from_pretrained(folder, config=asked_for_paper)
    assert loaded.cfg.template == "rzenembed-v2-release"
    assert loaded.render(EmbedInput(text="x")).startswith(
        "<|im_start|>system\nYou are a helpful assistant."
    )
    assert json.loads((folder / "rzenembed.json").read_text())["template"] == "rzenembed-v2-release"


def test_clear_errors_for_bad_folders(tmp_path, tiny_model_dir):
    with pytest.raises(ModelFolderError, match="model folder not found"):
        RzenEmbedder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ModelFolderError, match=r"has no rzenembed\.json"):
        RzenEmbedder.from_pretrained(tiny_model_dir)


def test_bad_inputs_are_rejected(tiny_embedder, tmp_path):
    with pytest.raises(ValueError, match="needs text, an instruction, images or a video"):
        EmbedInput()
    with pytest.raises(ValueError, match="at least one frame"):
        EmbedInput(video=[])
    with pytest.raises(FileNotFoundError, match="image file not found"):
        tiny_embedder.encode([EmbedInput(images=[str(tmp_path / "nope.png")])])
    with pytest.raises(TypeError, match="cannot embed a int"):
        tiny_embedder.encode([3])


ROUND_TRIP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from PIL import Image
    from rzenembed.modeling import EmbedInput, RzenEmbedder

    def img(seed, h, w):
        rng = np.random.RandomState(seed)
        return Image.fromarray(rng.randint(0, 255, (h, w, 3), dtype=np.uint8))

    embedder = RzenEmbedder.from_pretrained(sys.argv[1])
    items = [
        EmbedInput(text="A red car is parked near the river.", instruction="Find an image."),
        EmbedInput(images=[img(0, 84, 112)]),
        EmbedInput(video=[img(i, 56, 84) for i in range(4)]),
        EmbedInput(images=[img(9, 196, 140)], instruction="Understand the document page."),
    ]
    out = embedder.encode(items)
    print(json.dumps({"shape": list(out.shape), "norms": out.norm(dim=1).tolist(),
                      "template": embedder.cfg.template}))
    """
)


def test_tiny_bundle_round_trips_through_a_fresh_process(tiny_embedder, tmp_path):
    folder = tiny_embedder.save_pretrained(tmp_path / "bundle")
    result = subprocess.run(
        [sys.executable, "-c", ROUND_TRIP_SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["shape"] == [4, TinySpec().hidden_size]
    assert report["norms"] == pytest.approx([1.0] * 4, abs=1e-5)
    assert report["template"] == "rzenembed-paper"


def test_the_template_reaches_every_backbone_intact(tiny_embedder):
    """The rendered prompt is what the family's processor tokenises: each placeholder
    expanded to the image's visual tokens, nothing else changed, the EOS last."""
    tokenizer = tiny_embedder.processor.tokenizer
    item = EmbedInput(text="a red car", instruction="Find an image.", images=[random_image(1)])
    rendered = tiny_embedder.render(item)
    assert rendered.count("<|image_pad|>") == 1 and "a red car" in rendered
    batch = tiny_embedder.prepare([item])
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = tiny_embedder.processor.image_processor.merge_size
    assert int((ids == pad).sum()) == int(batch["image_grid_thw"][0].prod()) // merge**2
    assert tokenizer.decode(ids[ids != pad]) == rendered.replace("<|image_pad|>", "")
    assert int(ids[-1]) == tokenizer.convert_tokens_to_ids("<|endoftext|>")
