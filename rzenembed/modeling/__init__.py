"""The embedding model: Qwen2-VL backbone, EOS pooling, LoRA, and the tiny offline bundle."""

from rzenembed.modeling.card import CARD_FILE, ModelCard, ModelFolderError
from rzenembed.modeling.embedder import RzenEmbedder
from rzenembed.modeling.inputs import EmbedInput

__all__ = ["CARD_FILE", "EmbedInput", "ModelCard", "ModelFolderError", "RzenEmbedder"]
