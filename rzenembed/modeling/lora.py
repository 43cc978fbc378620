"""LoRA on every linear layer of the vision encoder and of the LLM, never on the LM head.

Targets are listed by full module name (found by walking the model) rather than by a
suffix pattern, so a new backbone layer cannot be silently missed and the LM head can
never be caught by a broad pattern.
"""

from __future__ import annotations

from torch import nn

from rzenembed.config import LoraConfig
from rzenembed.modeling.backbones import LLM_PREFIX, VISION_PREFIX


def lora_target_modules(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA should wrap, given the config's towers."""
    prefixes = tuple(p for p, on in ((VISION_PREFIX, cfg.vision), (LLM_PREFIX, cfg.llm)) if on)
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefixes)
    ]
    if not names:
        raise ValueError(
            f"no linear layers under {prefixes}; is this a supported Qwen-VL model "
            f"(transformers >= 5 layout: model.visual / model.language_model)?"
        )
    return names


def apply_lora(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Wrap ``model`` (a Qwen-VL generation model of any supported family) with fresh LoRA
    adapters.

    Returns the peft model; only the LoRA factors are trainable afterwards.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_modules(model, cfg),
        bias="none",
    )
    return get_peft_model(model, peft_config, adapter_name=adapter_name)


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
