"""An optional second look at mined negatives: a vision-language model as relevance judge.

The rules see embeddings only; an unlabelled positive the embedding model ranks below
``percpos`` x its positive survives them. The judge (by default the recaption model, any
Qwen-VL family) is shown the query and a mined candidate and asked whether the candidate
also answers the query; the probability it gives "yes" over "no" as the next token is read
in one forward pass (no generation). Candidates at or above ``mining.judge.threshold`` are
dropped as false negatives and counted (``judged_relevant``). Off by default: it costs a
forward pass of a generative model per (query, chosen negative).

Pictures go in as images; a video side contributes its first frame (the judge sees what
the clip shows, cheaply).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rzenembed.config import JudgeConfig
from rzenembed.modeling.embedder import EmbedInput


def _pictures(item: EmbedInput) -> list[Any]:
    return list(item.images) + ([item.video[0]] if item.video else [])


def _described(label: str, item: EmbedInput) -> str:
    words = " ".join(x for x in (item.instruction, item.text) if x).strip()
    return f"{label}: {words or '(the picture)'}"


class RelevanceJudge:
    """P("yes") that a candidate also answers a query, from a Qwen-VL generation model."""

    def __init__(self, path: str, settings: JudgeConfig, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor

        from rzenembed.modeling.backbones import backbone_of_folder

        self.settings = settings
        self.device = device
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        model_cls = backbone_of_folder(path).model_cls
        self.model = model_cls.from_pretrained(path, dtype=dtype[settings.dtype]).to(device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"  # the next token is read on the right
        unit = self.processor.image_processor.patch_size * self.processor.image_processor.merge_size
        self.processor.image_processor.size = {
            "shortest_edge": 4 * unit * unit,
            "longest_edge": settings.max_visual_tokens * unit * unit,
        }
        tokenizer = self.processor.tokenizer
        self.answers = [tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no")]

    def _prompt(self, query: EmbedInput, candidate: EmbedInput) -> tuple[str, list[Any]]:
        content: list[dict[str, Any]] = []
        images: list[Any] = []
        for label, item in (("Query", query), ("Candidate", candidate)):
            pictures = _pictures(item)
            content += [{"type": "image"} for _ in pictures]
            content.append({"type": "text", "text": _described(label, item)})
            images += pictures
        content.append({"type": "text", "text": self.settings.prompt})
        message = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(message, add_generation_prompt=True), images

    def relevance(self, pairs: Sequence[tuple[EmbedInput, EmbedInput]]) -> list[float]:
        """P("yes") against "no" for each (query, candidate), in order."""
        import torch

        out: list[float] = []
        size = self.settings.batch_size
        for start in range(0, len(pairs), size):
            built = [self._prompt(q, c) for q, c in pairs[start : start + size]]
            prompts = [prompt for prompt, _ in built]
            flat = [picture for _, pictures in built for picture in pictures]
            inputs = self.processor(
                text=prompts, images=flat or None, padding=True, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                logits = self.model(**inputs).logits[:, -1, self.answers].float()
            out += torch.softmax(logits, dim=-1)[:, 0].tolist()
        return out
