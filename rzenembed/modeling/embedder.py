"""The RzenEmbed embedder: a Qwen-VL backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL; see
``backbones.py``), named prompt template, EOS pooling, LoRA.

The backbone runs without its language-model head: the embedding is the last-layer hidden
state of the final (EOS) token, L2-normalised, so no vocabulary-sized logits are ever
computed. The same code loads the tiny test model, Qwen2-VL-2B/7B from a local path, a
saved adapter (base + LoRA) or a merged model.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from rzenembed.config import LoraConfig, ModelConfig, config_digest
from rzenembed.data.folders import FolderNotPublishedError, stage_folder
from rzenembed.data.media import VideoBudget
from rzenembed.data.storage import is_remote, join
from rzenembed.identity import rewrite_canonical_json
from rzenembed.modeling.backbones import backbone_of_folder, backbone_of_model
from rzenembed.modeling.card import ModelCard, ModelFolderError
from rzenembed.modeling.digest import weights_digest
from rzenembed.modeling.inputs import EmbedInput, as_input, load_image, sample_frames
from rzenembed.modeling.lora import apply_lora
from rzenembed.modeling.pooling import eos_pool
from rzenembed.prompts import PromptInput, get_template

log = logging.getLogger(__name__)

# Keys of the processor's output every backbone consumes (an entry may add its own).
BACKBONE_INPUTS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)
# Model settings that travel in rzenembed.json (the path itself does not).
RUNTIME_SETTINGS = (
    "dtype",
    "attn_implementation",
    "min_visual_tokens",
    "max_visual_tokens",
    "video_frames",
    "max_text_tokens",
    "padding_side",
)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


class RzenEmbedder(nn.Module):
    """A Qwen2-VL model turned into an embedding model.

    Build it with ``from_pretrained`` (a model/adapter folder, or a raw checkpoint plus a
    ``ModelConfig``). ``forward`` takes processor outputs and returns (batch, dim) float32
    unit vectors with gradients; ``encode`` is the batched inference entry point.
    """

    def __init__(self, backbone: nn.Module, processor: Any, cfg: ModelConfig, base_path: str):
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.cfg = cfg
        self.base_path = base_path
        self.base_uri = str(Path(base_path).resolve())
        self.template = get_template(cfg.template)
        self.family = backbone_of_model(self.hf_model)
        self._configure_processor()
        if cfg.gradient_checkpointing:
            self.hf_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self.hf_model.config.use_cache = False

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: ModelConfig | None = None,
        device: str | torch.device | None = None,
        trainable: bool = False,
        endpoint_url: str | None = None,
    ) -> RzenEmbedder:
        """Load a model folder, an adapter folder, or (with ``config``) a raw checkpoint.

        ``path`` may be a local folder or a URI on the storage root (``s3://``): a remote
        folder, and an adapter's remote base, are staged to this machine's cache first
        (``rzenembed.data.folders.stage_folder``). A folder with ``rzenembed.json`` is
        queried with the template saved there, whatever ``config.template`` says;
        ``config`` still sets dtype, attention kernel and token budgets. A folder without
        it needs ``config`` and uses ``config.template``.
        """
        uri = str(path)
        path = _staged(uri, endpoint_url)
        card = ModelCard.load(path) if ModelCard.exists(path) else None
        if card is None and config is None:
            ModelCard.load(path)  # raises the explanatory error
        cfg = _resolve_config(path, card, config)
        if card is not None and card.kind == "adapter":
            base_uri = resolve_base(uri, card)
            base_path = _staged(base_uri, endpoint_url)
            backbone = _load_backbone(base_path, cfg)
            from peft import PeftModel

            backbone = PeftModel.from_pretrained(backbone, path, is_trainable=trainable)
            processor = _load_processor(base_path)
        else:
            base_uri, base_path = uri, path
            backbone = _load_backbone(path, cfg)
            processor = _load_processor(path)
        embedder = cls(backbone, processor, cfg, base_path)
        # What a saved adapter names as its base: the URI, not this machine's staged copy.
        embedder.base_uri = base_uri if is_remote(base_uri) else str(Path(base_path).resolve())
        if device is not None:
            embedder.to(device)
        return embedder

    # ------------------------------------------------------------------ structure

    @property
    def is_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.backbone, PeftModel)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (LoRA layers injected, if any)."""
        return self.backbone.get_base_model() if self.is_lora else self.backbone

    @property
    def core(self) -> nn.Module:
        """The backbone without LM head (vision tower + language model)."""
        return self.hf_model.model

    @property
    def embedding_dim(self) -> int:
        return int(self.hf_model.config.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def apply_lora(self, cfg: LoraConfig) -> RzenEmbedder:
        """Add fresh LoRA adapters to every vision/LLM linear layer; freezes the rest."""
        if self.is_lora:
            raise RuntimeError("this embedder already carries LoRA adapters; merge them first")
        self.backbone = apply_lora(self.backbone, cfg)
        self._lora_cfg = cfg
        return self

    def merge_lora(self) -> RzenEmbedder:
        """Fold the LoRA updates into the base weights (W + scale * B A) and drop the adapters."""
        if not self.is_lora:
            raise RuntimeError("no LoRA adapters to merge")
        self.backbone = self.backbone.merge_and_unload()
        return self

    # ------------------------------------------------------------------ inputs

    def _configure_processor(self) -> None:
        """Apply the configured visual-token budgets and padding side to the processor."""
        image_proc = self.processor.image_processor
        unit = (image_proc.patch_size * image_proc.merge_size) ** 2
        min_pixels = self.cfg.min_visual_tokens * unit
        image_proc.size = {
            "shortest_edge": min_pixels,
            "longest_edge": self.cfg.max_visual_tokens * unit,
        }
        video_proc = self.processor.video_processor
        # A video's frames share one budget (the same one preparation sized stored frames
        # with): temporal_patch frames fold into one token group.
        video_proc.size = self.family.video_size(self.video_budget)
        video_proc.cap_pixels_per_frame = False  # our per-frame cap already bounds the total
        self.processor.tokenizer.padding_side = self.cfg.padding_side

    @property
    def video_budget(self) -> VideoBudget:
        """Frames per video and their size, from ``model.video_frames`` and the budget."""
        image_proc = self.processor.image_processor
        return VideoBudget(
            frames=self.cfg.video_frames,
            max_visual_tokens=self.cfg.max_visual_tokens,
            min_visual_tokens=self.cfg.min_visual_tokens,
            patch=image_proc.patch_size,
            merge=image_proc.merge_size,
            temporal_patch=self.processor.video_processor.temporal_patch_size,
        )

    def _truncate(self, text: str) -> str:
        if not text:
            return text
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.cfg.max_text_tokens:
            return text
        return self.processor.tokenizer.decode(ids[: self.cfg.max_text_tokens])

    def render(self, item: EmbedInput) -> str:
        """The exact string the model sees for ``item`` (before visual-token expansion)."""
        return self.template.render(
            PromptInput(
                instruction=item.instruction,
                text=self._truncate(item.text),
                num_images=len(item.images),
                num_videos=item.num_videos,
            )
        )

    def prepare(self, items: Sequence[EmbedInput | str | dict]) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch: rendered prompts, images and videos, padded."""
        items = [as_input(i) for i in items]
        temporal = self.processor.video_processor.temporal_patch_size
        images = [load_image(img) for item in items for img in item.images]
        videos = [
            sample_frames(item.video, self.cfg.video_frames, temporal)
            for item in items
            if item.video is not None
        ]
        batch = self.processor(
            text=[self.render(item) for item in items],
            images=images or None,
            videos=videos or None,
            padding=True,
            return_tensors="pt",
            **self.family.video_call_kwargs(videos),
        )
        return {k: batch[k] for k in self.input_keys if k in batch}

    def with_own_processor(self) -> RzenEmbedder:
        """This embedder for another thread: the same weights (shared, not copied) and a
        processor of its own. A Hugging Face fast tokenizer keeps its padding and truncation
        settings on one shared object that every call rewrites, so two threads calling one
        processor corrupt each other's padding (tensors of unequal lengths)."""
        view = copy.copy(self)  # a new __dict__; parameters and submodules are shared
        object.__setattr__(view, "processor", copy.deepcopy(self.processor))
        return view

    @property
    def input_keys(self) -> tuple[str, ...]:
        """The processor outputs this backbone consumes."""
        return BACKBONE_INPUTS + self.family.extra_inputs

    # ------------------------------------------------------------------ embedding

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """(batch, dim) float32 unit vectors for prepared inputs; differentiable."""
        # Non-blocking: from page-locked memory (the training loader pins prefetched chunks)
        # the copy overlaps the GPU's work; from ordinary memory it is a plain copy.
        inputs = {
            k: v.to(self.device, non_blocking=True)
            for k, v in batch.items()
            if k in self.input_keys
        }
        outputs = self.core(**inputs, use_cache=False, return_dict=True)
        return eos_pool(outputs.last_hidden_state, inputs["attention_mask"])

    @torch.inference_mode()
    def encode(
        self,
        items: Iterable[EmbedInput | str | dict],
        batch_size: int = 16,
        show_progress: bool = False,
        sort_by_length: bool = True,
    ) -> torch.Tensor:
        """Embed ``items`` in batches of similar length; returns (n, dim) float32 on CPU.

        Sorting by estimated length before batching limits padding; the output keeps the
        input order.
        """
        items = [as_input(i) for i in items]
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        was_training = self.training
        self.eval()
        order = list(range(len(items)))
        if sort_by_length:  # off only to measure what the sorting buys (benchmarks/)
            order.sort(key=lambda i: self._estimated_length(items[i]))
        out = torch.empty(len(items), self.embedding_dim, dtype=torch.float32)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="embed", disable=not show_progress, unit="batch"):
            idx = order[start : start + batch_size]
            out[idx] = self(**self.prepare([items[i] for i in idx])).cpu()
        self.train(was_training)
        return out

    def _estimated_length(self, item: EmbedInput) -> int:
        """Tokens, roughly: 4 characters per text token; an image in memory by its pixel
        count within the visual-token budget, a path or a video at the full budget."""
        image_proc = self.processor.image_processor
        unit = (image_proc.patch_size * image_proc.merge_size) ** 2
        visual = item.num_videos * self.cfg.max_visual_tokens
        for image in item.images:
            size = getattr(image, "size", None) if not isinstance(image, np.ndarray) else None
            if isinstance(image, np.ndarray):
                size = (image.shape[1], image.shape[0])
            tokens = self.cfg.max_visual_tokens if size is None else size[0] * size[1] // unit
            visual += min(max(tokens, self.cfg.min_visual_tokens), self.cfg.max_visual_tokens)
        return (len(item.text) + len(item.instruction)) // 4 + visual

    # ------------------------------------------------------------------ saving

    def save_pretrained(self, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write safetensors weights, the processor and ``rzenembed.json``.

        With LoRA adapters only the adapter is written (it names its base folder); call
        ``merge_lora`` first to write a standalone merged model.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.is_lora:
            self.backbone.save_pretrained(out, safe_serialization=True)
            kind, base = "adapter", self.base_uri
            local = Path(self.base_path)
            base_digest = weights_digest(local) if local.is_dir() else None
        else:
            self.hf_model.save_pretrained(out, safe_serialization=True)
            kind, base, base_digest = "model", None, None
        # peft lists target_modules in set order: rewritten canonically, the same model
        # gives the same bytes whatever the process's hash seed.
        for name in ("adapter_config.json", "config.json"):
            if (out / name).is_file():
                rewrite_canonical_json(out / name)
        self.processor.save_pretrained(out)
        card = ModelCard(
            kind=kind,
            template=self.cfg.template,
            embedding_dim=self.embedding_dim,
            base_model=base,
            base_digest=base_digest,
            # Where the base lives is no part of the settings' identity (base_digest is).
            config_digest=config_digest(self.cfg.model_copy(update={"name_or_path": "-"})),
            settings={k: getattr(self.cfg, k) for k in RUNTIME_SETTINGS},
            extra=dict(extra or {}),
        )
        card.save(out)
        return out


class ThreadLocalPreparer:
    """``prepare`` on any number of threads at once: each thread runs the processor of its
    own ``with_own_processor`` view of the embedder, made on its first call."""

    def __init__(self, embedder: RzenEmbedder):
        self.embedder = embedder
        self._local = threading.local()

    def prepare(self, items: Sequence[EmbedInput | str | dict]) -> dict[str, torch.Tensor]:
        view = getattr(self._local, "view", None)
        if view is None:
            view = self._local.view = self.embedder.with_own_processor()
        return view.prepare(items)


def _resolve_config(path: str, card: ModelCard | None, config: ModelConfig | None) -> ModelConfig:
    """The effective ModelConfig: runtime settings from ``config`` (or the card), template
    always from the card when there is one."""
    if config is None:
        assert card is not None
        return ModelConfig(name_or_path=path, template=card.template, **card.settings)
    if card is None:
        return config
    if config.template != card.template:
        log.warning(
            "model %s was saved with template %r; using it instead of the configured %r",
            path,
            card.template,
            config.template,
        )
    return config.model_copy(update={"template": card.template, "name_or_path": path})


def resolve_base(adapter_uri: str, card: ModelCard) -> str:
    """The URI of an adapter's base: as recorded (absolute path or remote URI), or relative
    to the adapter's own location."""
    if not card.base_model:
        raise ModelFolderError(f"{adapter_uri}: adapter card names no base_model")
    base = card.base_model
    if is_remote(base) or base.startswith("/"):
        return base
    return join(adapter_uri, base) if is_remote(adapter_uri) else str(Path(adapter_uri) / base)


def _staged(uri: str, endpoint_url: str | None) -> str:
    """A local folder with the model at ``uri`` (itself when it is local)."""
    try:
        return str(stage_folder(uri, endpoint_url))
    except FolderNotPublishedError:
        raise ModelFolderError(f"model folder not found: {uri}") from None


def _load_backbone(path: str, cfg: ModelConfig) -> nn.Module:
    """The folder's model, with the class its ``model_type`` names (backbones.py); a
    configured ``model.family`` must be the folder's."""
    entry = backbone_of_folder(path)
    if cfg.family not in ("auto", entry.family):
        raise ModelFolderError(
            f"{path} holds a {entry.family} model ({entry.model_type}) but model.family is "
            f"{cfg.family!r}: point model.name_or_path at a {cfg.family} folder, or set "
            f"model.family: auto"
        )
    return entry.model_cls.from_pretrained(
        path,
        dtype=torch_dtype(cfg.dtype),
        attn_implementation=cfg.attn_implementation,
    )


def _load_processor(path: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)
