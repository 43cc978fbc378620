"""The embedding model: Qwen2-VL backbone, EOS pooling, LoRA, and the tiny offline bundle.

Its names load on first use (``rzenembed.lazy``): importing a light submodule such as
``backbones`` or ``card`` does not import torch.
"""

from typing import TYPE_CHECKING

from rzenembed.lazy import lazy_exports

if TYPE_CHECKING:
    from rzenembed.modeling.card import CARD_FILE, ModelCard, ModelFolderError
    from rzenembed.modeling.embedder import RzenEmbedder
    from rzenembed.modeling.inputs import EmbedInput

__all__ = ["CARD_FILE", "EmbedInput", "ModelCard", "ModelFolderError", "RzenEmbedder"]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "CARD_FILE": "card",
        "ModelCard": "card",
        "ModelFolderError": "card",
        "RzenEmbedder": "embedder",
        "EmbedInput": "inputs",
    },
)
