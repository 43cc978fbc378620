"""Content digests of model and adapter folders.

Souping must know that adapters were trained on the very same base weights, evaluation
caches candidate embeddings per model, the registry keeps one version per model; all need
an identity that depends on what a folder computes and on nothing else: not where it
lives, not which process wrote it, not how its weights are split into files.

- **Weights** enter tensor by tensor (name, dtype, shape, sha256 of the raw bytes), read
  from every ``*.safetensors`` file of the folder: resharding, a different tensor order in
  the file or other ``__metadata__`` give the same digest; one changed value does not.
- **Config files** (``config.json``, ``adapter_config.json``, ``rzenembed.json``) enter in
  canonical form (``rzenembed.identity``): parsed, keys and set-valued fields sorted,
  locations, writer versions and timestamps left out.
- Nothing else: no README, no tokenizer or processor files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from rzenembed.identity import DIGEST_SCHEME, json_file_digest

# Files that decide what a folder computes, besides its weights.
DIGEST_FILES = ("config.json", "adapter_config.json", "rzenembed.json")
CARD_FILE = "rzenembed.json"
_CHUNK = 8 << 20
_MAX_HEADER = 100 << 20
_file_cache: dict[tuple[str, int, int], str] = {}
_tensor_cache: dict[tuple[str, int, int], dict[str, str]] = {}


class WeightsFileError(ValueError):
    """A ``.safetensors`` file that cannot be read as one (truncated, bad header)."""


def _stat_key(path: str | Path) -> tuple[str, int, int]:
    stat = os.stat(path)
    return (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    key = _stat_key(path)
    if key not in _file_cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
        _file_cache[key] = h.hexdigest()
    return _file_cache[key]


def tensor_digests(path: str | Path) -> dict[str, str]:
    """Tensor name -> ``dtype:shape:sha256(bytes)`` of one safetensors file.

    Tensors are read in file order (one sequential pass) and hashed one by one; the header's
    ``__metadata__`` is not part of any tensor.
    """
    key = _stat_key(path)
    if key in _tensor_cache:
        return _tensor_cache[key]
    size = key[1]
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise WeightsFileError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise WeightsFileError(f"{path}: safetensors header length {header_len} is invalid")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsFileError(f"{path}: unreadable safetensors header ({exc})") from None
        header.pop("__metadata__", None)
        start_of_data = 8 + header_len
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            begin, end = info["data_offsets"]
            if start_of_data + end > size or end < begin:
                raise WeightsFileError(f"{path}: tensor {name} lies outside the file")
            f.seek(start_of_data + begin)
            h, left = hashlib.sha256(), end - begin
            while left:
                block = f.read(min(_CHUNK, left))
                if not block:
                    raise WeightsFileError(f"{path}: truncated inside tensor {name}")
                h.update(block)
                left -= len(block)
            shape = "x".join(str(d) for d in info["shape"])
            out[name] = f"{info['dtype']}:{shape}:{h.hexdigest()}"
    _tensor_cache[key] = out
    return out


def weights_only_digest(files: list[Path]) -> str:
    """The digest of the tensors held by ``files`` together, however they are split."""
    tensors: dict[str, str] = {}
    for file in files:
        for name, entry in tensor_digests(file).items():
            if name in tensors:
                raise WeightsFileError(f"tensor {name} appears in more than one file ({file})")
            tensors[name] = entry
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}\0{tensors[name]}\n".encode())
    return h.hexdigest()


def folder_digest(folder: str | Path, include_card: bool = True) -> str:
    """sha256 over a folder's tensors and the canonical form of its config files."""
    folder = Path(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights to digest")
    h = hashlib.sha256(f"{DIGEST_SCHEME}\n".encode())
    h.update(f"weights\0{weights_only_digest(weights)}\n".encode())
    for name in DIGEST_FILES:
        if name == CARD_FILE and not include_card:
            continue
        if (folder / name).is_file():
            h.update(f"{name}\0{json_file_digest(folder / name)}\n".encode())
    return h.hexdigest()


def weights_digest(folder: str | Path) -> str:
    """The digest of a base model's weights and architecture (its card left out, so that a
    re-saved card with other metadata does not change the identity of the weights)."""
    return folder_digest(folder, include_card=False)


def model_digest(uri: str, endpoint_url: str | None = None, weights_only: bool = False) -> str:
    """The digest of a model folder given by URI: computed from the files of a local folder;
    for a remote one, read from its commit marker when published by the pipeline, else
    computed from a staged copy."""
    from rzenembed.data.folders import published_info, stage_folder
    from rzenembed.data.storage import is_remote

    rule = weights_digest if weights_only else folder_digest
    if not is_remote(uri):
        return rule(uri)
    info = published_info(uri, endpoint_url) or {}
    recorded = info.get("weights_digest" if weights_only else "digest")
    return recorded or rule(stage_folder(uri, endpoint_url))


def digests_of(folder: str | Path) -> dict[str, str]:
    """Both digests of a local folder, as a commit marker records them."""
    return {"digest": folder_digest(folder), "weights_digest": weights_digest(folder)}
