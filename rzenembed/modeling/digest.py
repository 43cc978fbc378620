"""Content digests of model and adapter folders.

Souping must know that adapters were trained on the very same base weights, and evaluation
caches candidate embeddings per model; both need an identity that does not depend on where
a folder lives. The digest covers what decides the numbers (weight files, the model or
adapter config, the rzenembed card) and nothing else (no README, no processor cache).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# Files that decide what a folder computes.
DIGEST_FILES = ("config.json", "adapter_config.json", "rzenembed.json")
_CHUNK = 8 << 20
_cache: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within the process."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def folder_digest(folder: str | Path, include_card: bool = True) -> str:
    """sha256 over the names and contents of a folder's weight and config files."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    names += [n for n in DIGEST_FILES if (folder / n).is_file()]
    if not include_card and "rzenembed.json" in names:
        names.remove("rzenembed.json")
    if not any(n.endswith(".safetensors") for n in names):
        raise FileNotFoundError(f"{folder} holds no .safetensors weights to digest")
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{file_digest(folder / name)}\n".encode())
    return h.hexdigest()


def weights_digest(folder: str | Path) -> str:
    """The digest of a base model's weights and architecture (its card left out, so that a
    re-saved card with other metadata does not change the identity of the weights)."""
    return folder_digest(folder, include_card=False)
