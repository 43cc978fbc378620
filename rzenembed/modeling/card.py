"""``rzenembed.json``: what must travel with every saved model or adapter.

The weights alone do not say how to query a model. The card records the prompt template,
the pooling, the embedding size and the settings the model was trained with, so loading
a folder reproduces the exact input format (a wrong template collapses retrieval).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rzenembed.identity import dumps_canonical

CARD_FILE = "rzenembed.json"
CARD_FORMAT_VERSION = 1


class ModelFolderError(FileNotFoundError):
    """A folder that is not a usable rzenembed model (missing card, weights or processor)."""


@dataclass
class ModelCard:
    kind: Literal["model", "adapter"]
    template: str
    embedding_dim: int
    pooling: str = "eos-last-token"
    normalize: bool = True
    base_model: str | None = None  # for adapters: the base folder they apply to
    base_digest: str | None = None  # for adapters: weights_digest of that folder at training
    config_digest: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # runtime model settings
    extra: dict[str, Any] = field(default_factory=dict)  # stage, mixture, soup recipe...
    format_version: int = CARD_FORMAT_VERSION

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILE
        path.write_text(dumps_canonical(asdict(self)))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ModelCard:
        path = Path(folder) / CARD_FILE
        if not path.is_file():
            raise ModelFolderError(
                f"{folder} has no {CARD_FILE}: it is not an rzenembed model folder "
                f"(to start from a raw Qwen2-VL checkpoint, pass a ModelConfig)"
            )
        data = json.loads(path.read_text())
        version = data.get("format_version")
        if version != CARD_FORMAT_VERSION:
            raise ModelFolderError(
                f"{path}: format_version {version!r} is not supported "
                f"(expected {CARD_FORMAT_VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelFolderError(f"{path}: unknown fields {unknown}")
        return cls(**data)

    @staticmethod
    def exists(folder: str | Path) -> bool:
        return (Path(folder) / CARD_FILE).is_file()
