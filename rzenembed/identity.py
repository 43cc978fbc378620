"""Canonical identities: the same content gives the same digest, wherever and whenever it
was written, by whichever process.

A digest in this project names *what something is* (the numbers a model computes, the rows
a dataset holds, the scores a report gives), never where it lives or when it was written.
Two rules make that hold for the JSON files that enter a digest:

- **Canonical form.** A file is parsed, its keys sorted, and set-valued fields (peft's
  ``target_modules``, ...) sorted, so that a writer iterating a Python set in
  hash-randomised order cannot change the digest.
- **Content only.** Keys that record a location (``base_model_name_or_path``, a card's
  ``base_model`` folder, a recipe's adapter ``path``, ...), a writer's version or a
  timestamp are left out. The identity of whatever a location points to is recorded
  beside it as a digest (a card's ``base_digest``, a recipe's adapter ``digest``), and
  that digest does enter.

Files the project writes are written in canonical form too (``write_canonical_json``:
sorted keys, sorted set-valued fields), so equal content also gives equal bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Version of the digest scheme: hashed into every model digest, so a digest taken under an
# older rule can never be mistaken for one taken under this one.
DIGEST_SCHEME = "rzenembed-digest-2"

# Lists whose order means nothing (peft writes some of them from a set).
SET_VALUED_KEYS = frozenset(
    {
        "target_modules",
        "exclude_modules",
        "modules_to_save",
        "layers_to_transform",
        "target_parameters",
    }
)
# Where something lives: the digest recorded beside it stands for it.
LOCATION_KEYS = frozenset(
    {
        "_name_or_path",
        "base_model_name_or_path",
        "base_model",
        "revision",
        "path",
        "uri",
        "stage_manifest",
    }
)
# Who wrote a file and when: not what it holds.
WRITER_KEYS = frozenset({"transformers_version", "peft_version", "created"})
IGNORED_KEYS = LOCATION_KEYS | WRITER_KEYS


def _sort_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def ordered(value: Any, key: str | None = None) -> Any:
    """``value`` with set-valued fields sorted (dict key order is left to the encoder)."""
    if isinstance(value, Mapping):
        return {str(k): ordered(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        items = [ordered(v) for v in value]
        return sorted(items, key=_sort_key) if key in SET_VALUED_KEYS else items
    return value


def canonical(value: Any, key: str | None = None) -> Any:
    """The identity-relevant part of a JSON value: set-valued fields sorted, location,
    writer and time keys removed, recursively."""
    if isinstance(value, Mapping):
        return {
            str(k): canonical(v, str(k)) for k, v in value.items() if str(k) not in IGNORED_KEYS
        }
    if isinstance(value, list | tuple):
        items = [canonical(v) for v in value]
        return sorted(items, key=_sort_key) if key in SET_VALUED_KEYS else items
    return value


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON of ``canonical(value)``: the text a digest is taken of."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def json_digest(value: Any) -> str:
    """sha256 of a JSON value's canonical form."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def json_file_digest(path: str | Path) -> str:
    """sha256 of a JSON file's canonical form (not of its bytes)."""
    return json_digest(json.loads(Path(path).read_text(encoding="utf-8")))


def dumps_canonical(value: Any, indent: int | None = 2) -> str:
    """How the project writes JSON: sorted keys, sorted set-valued fields, a final newline.
    Nothing is removed: a written file keeps its locations for the humans and tools that
    read it."""
    return json.dumps(ordered(value), indent=indent, sort_keys=True, ensure_ascii=False) + "\n"


def write_canonical_json(path: str | Path, value: Any) -> Path:
    path = Path(path)
    path.write_text(dumps_canonical(value), encoding="utf-8")
    return path


def rewrite_canonical_json(path: str | Path) -> Path:
    """Rewrite a JSON file another library wrote (peft, transformers) in canonical form."""
    return write_canonical_json(path, json.loads(Path(path).read_text(encoding="utf-8")))


def source_digest(root: str | Path, folders: tuple[str, ...]) -> str:
    """Digest of the ``.py`` files under ``root/<folder>`` (paths relative to ``root`` and
    contents): what names a version of the code (task cache keys, serving deployments)."""
    root = Path(root)
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]
