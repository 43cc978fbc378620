"""API keys for the embeddings endpoint.

A keys file holds one key per line as its SHA-256 (hex), never the key itself: a leaked
file opens nothing. ``rzenembed api-key new FILE`` makes a key, appends its hash and prints
the key once. A request carries ``Authorization: Bearer <key>``; the endpoint hashes it and
compares the hash with every stored one in constant time (``hmac.compare_digest``), so the
time to answer says nothing about how close a guess was. The file is read again when it
changes (checked at most every few seconds): adding or revoking a key needs no restart.
Lines starting with ``#`` and blank lines are ignored; anything else that is not a 64-digit
hex digest is an error naming the line.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_PREFIX = "rz-"
KEYS_ENV = "RZENEMBED_API_KEYS_FILE"


class KeysFileError(ValueError):
    """A keys file that cannot be used."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(path: str | Path, label: str = "") -> str:
    """A fresh random key: its hash appended to ``path`` (created with mode 0600), the key
    returned (shown once; it cannot be recovered from the file)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = f"# {label}\n" if label else ""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(f"{comment}{key_hash(key)}\n")
    return key


def read_hashes(path: str | Path) -> list[str]:
    hashes = []
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) != 64 or any(c not in "0123456789abcdef" for c in line.lower()):
            raise KeysFileError(
                f"{path}:{number}: expected the SHA-256 of a key (64 hex digits); "
                "make keys with `rzenembed api-key new FILE`"
            )
        hashes.append(line.lower())
    return hashes


class KeyStore:
    """The hashes of the keys a request may carry."""

    def __init__(self, hashes: list[str]):
        if not hashes:
            raise KeysFileError("API keys are on but the keys file holds no key")
        self._hashes = list(hashes)

    def allows(self, authorization: str | None) -> bool:
        """Whether ``Authorization: Bearer <key>`` names a stored key."""
        if not authorization or not authorization.startswith("Bearer "):
            return False
        offered = key_hash(authorization.removeprefix("Bearer ").strip())
        found = False
        for stored in self._hashes:  # every hash compared: no early exit on a match
            found |= hmac.compare_digest(offered, stored)
        return found


def keys_file(configured: str | None) -> str | None:
    """The keys file in force: ``RZENEMBED_API_KEYS_FILE`` or ``serve.api_keys_file``."""
    return os.environ.get(KEYS_ENV) or configured
