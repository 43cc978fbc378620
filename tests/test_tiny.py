"""The tiny offline bundle: complete, deterministic, loadable by plain transformers."""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

from rzenembed.cli import main as cli_main
from rzenembed.modeling.tiny import SPECIAL_TOKENS, TinySpec, build_tiny_model


def folder_digests(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path):
    a = folder_digests(build_tiny_model(tmp_path / "a", seed=3))
    b = folder_digests(build_tiny_model(tmp_path / "b", seed=3))
    c = folder_digests(build_tiny_model(tmp_path / "c", seed=4))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(a)


def test_folder_loads_through_plain_transformers_classes(tiny_model_dir):
    spec = TinySpec()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    text_cfg = model.config.text_config
    assert (text_cfg.hidden_size, text_cfg.num_hidden_layers) == (spec.hidden_size, spec.num_layers)
    assert model.config.vision_config.depth == spec.vision_depth
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert text_cfg.vocab_size == len(tokenizer)
    text = "<|im_start|>user\nA dog sits on the grass.<|im_end|>"
    encoded = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(encoded["input_ids"][0]) == text
    with torch.no_grad():
        logits = model(**encoded).logits
    assert logits.shape == (1, encoded["input_ids"].shape[1], len(tokenizer))
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
    )
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in chat


def test_cli_writes_the_bundle(tmp_path, capsys):
    assert cli_main(["tiny-model", str(tmp_path / "cli-model"), "--seed", "1"]) == 0
    assert "written to" in capsys.readouterr().out
    config = json.loads((tmp_path / "cli-model" / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"


def test_weights_use_the_hub_checkpoint_layout(tiny_model_dir):
    """Qwen2-VL-2B/7B on disk name tensors model.layers.* / visual.*; the tiny folder does
    too, so loading it exercises the same key conversion as a real checkpoint."""
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        prefixes = {".".join(k.split(".")[:2]) for k in f.keys()}  # noqa: SIM118
    assert prefixes == {
        "model.embed_tokens",
        "model.layers",
        "model.norm",
        "visual.blocks",
        "visual.merger",
        "visual.patch_embed",
    }
