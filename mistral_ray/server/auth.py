"""Bearer API keys, kept only as SHA-256 digests and compared in constant time.

The router never stores or logs a key: it keeps `{digest: key id}` and reports the id.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional


class ApiKeys:
    def __init__(self, entries: list[str]):
        self._keys: list[tuple[bytes, str]] = []
        for entry in entries:
            key_id, sep, key = entry.partition(":")
            if not sep or not key_id.strip() or not key.strip():
                raise ValueError("API key entries must be `<key id>:<key>` (the entry is not shown)")
            self._keys.append((_digest(key.strip()), key_id.strip()))
        if not self._keys:
            raise ValueError("API keys are enabled but none were found (router.api_keys.file / env)")

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ids(self) -> tuple[str, ...]:
        """The key ids, in the key file's order (no keys)."""
        return tuple(dict.fromkeys(key_id for _, key_id in self._keys))

    def identify(self, authorization: Optional[str]) -> Optional[str]:
        """The key id for an `Authorization: Bearer <key>` header, or None. Every stored digest is
        compared, with hmac.compare_digest, so timing does not tell which key (or how much) matched."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = _digest(presented.strip())
        found = None
        for stored, key_id in self._keys:
            if hmac.compare_digest(stored, digest):
                found = key_id
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
